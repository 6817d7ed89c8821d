"""Clinical-size chest X-ray JPEGs for benchmarks, made from real (small) X-rays.

The public dataset here is 224 x 224; real studies are 1-3 megapixels with varying aspect ratio.
Each output image is a real X-ray upscaled (bicubic) to 1.5-3 MP at an aspect ratio between
0.75 and 1.35, with mild film grain so JPEG sizes and entropy-decoding cost are realistic rather
than those of a smooth upscale, saved as baseline JPEG quality 90: half 8-bit grey (as PACS
exports are), half RGB (as the public dataset's files are). Deterministic for a seed; files that
already exist with the same parameters are reused.

    python benchmarks/clinical_images.py SRC_IMAGEFOLDER OUT_FOLDER [--count N]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

MIN_MP, MAX_MP = 1.5, 3.0
ASPECTS = (0.75, 1.35)
QUALITY = 90
SPEC_FILE = "clinical_images.json"


def sources(src: Path, count: int, seed: int) -> list[tuple[str, Path]]:
    """``count`` (class, path) pairs drawn evenly from the class folders of ``src``."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    rng = np.random.default_rng(seed)
    out = []
    for i, c in enumerate(classes):
        files = sorted(p for p in (src / c).iterdir()
                       if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        n = count // len(classes) + (1 if i < count % len(classes) else 0)
        out += [(c, files[j]) for j in rng.choice(len(files), n, replace=False)]
    return out


def make_one(src: Path, dst: Path, rng: np.random.Generator, grey: bool) -> tuple[int, int]:
    mp = rng.uniform(MIN_MP, MAX_MP) * 1e6
    aspect = rng.uniform(*ASPECTS)  # width / height
    w, h = round((mp * aspect) ** 0.5), round((mp / aspect) ** 0.5)
    with Image.open(src) as im:
        big = im.convert("L").resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(big, dtype=np.float32) + rng.normal(0, 3.0, (h, w)).astype(np.float32)
    big = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    (big if grey else big.convert("RGB")).save(dst, quality=QUALITY)
    return w, h


def build(src, out, count: int = 240, seed: int = 0) -> list[str]:
    """Make (or reuse) ``count`` clinical-size JPEGs under ``out/{CLASS}/``; returns their paths."""
    src, out = Path(src), Path(out)
    spec = {"src": str(src.resolve()), "count": count, "seed": seed, "mp": [MIN_MP, MAX_MP],
            "aspects": list(ASPECTS), "quality": QUALITY, "version": 2}
    spec_path = out / SPEC_FILE
    if spec_path.exists() and json.loads(spec_path.read_text()) == spec:
        return sorted(str(p) for p in out.rglob("*.jpg"))
    rng = np.random.default_rng(seed)
    paths = []
    for i, (cls, path) in enumerate(sources(src, count, seed)):
        (out / cls).mkdir(parents=True, exist_ok=True)
        dst = out / cls / f"{path.stem}_clinical.jpg"
        make_one(path, dst, rng, grey=i % 2 == 0)
        paths.append(str(dst))
    spec_path.write_text(json.dumps(spec, indent=2))
    return sorted(paths)


def describe(paths) -> dict:
    sizes = [Image.open(p).size for p in paths]
    mp = np.array([w * h for w, h in sizes]) / 1e6
    nbytes = np.array([os.path.getsize(p) for p in paths])
    return {"images": len(paths), "megapixels_min": round(float(mp.min()), 2),
            "megapixels_mean": round(float(mp.mean()), 2),
            "megapixels_max": round(float(mp.max()), 2),
            "aspect_min": round(min(w / h for w, h in sizes), 2),
            "aspect_max": round(max(w / h for w, h in sizes), 2),
            "kib_mean": round(float(nbytes.mean()) / 1024, 1)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(json.dumps(describe(build(a.src, a.out, a.count, a.seed)), indent=2))

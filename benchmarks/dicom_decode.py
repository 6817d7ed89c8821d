"""DICOM decode speed: images/s through the one preprocessing
(``pneumo_edge.inputs.images.load_image``: header checks, decode, Modality/VOI LUT, 8-bit,
resize) per transfer syntax.

Files are clinical-size CR-like images made from real X-rays of the bundled samples: upscaled
(bicubic) to 1300 x 1700 (2.2 MP), 12 bits stored in 16, with mild grain so compression ratios
are realistic rather than those of a smooth upscale, Modality CR,
written uncompressed (explicit VR little endian), RLE Lossless, JPEG Lossless process 14 SV1
(GDCM, dev extra), JPEG-LS lossless (pyjpegls, dev extra), JPEG 2000 lossless and lossy
(openjpeg). A baseline row decodes the same pictures as 8-bit grey JPEG (Pillow, draft mode).
Files go to a temporary folder that is removed at the end.

    .venv/bin/python benchmarks/dicom_decode.py [--count 6] [--size 224] [--threads 1]

Prints a markdown table with the machine and the load average before and after.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from common import SAMPLES, machine, write_dicom
from PIL import Image

ROWS, COLS = 1700, 1300


def pictures(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    files = sorted((SAMPLES / "train").rglob("*.jpeg"))[:count]
    out = []
    for f in files:
        with Image.open(f) as im:
            big = im.convert("L").resize((COLS, ROWS), Image.Resampling.BICUBIC)
        arr = np.asarray(big, np.float32) * 16 + rng.normal(0, 24, (ROWS, COLS))
        out.append(np.clip(np.rint(arr), 0, 4095).astype(np.uint16))
    return out


def syntaxes():
    from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSLossless, RLELossless

    rows = [("uncompressed (explicit LE)", None), ("RLE Lossless", RLELossless)]
    try:
        import gdcm  # noqa: F401

        rows.append(("JPEG Lossless p14 SV1", "jpeg-lossless"))
    except ImportError:
        print("(no python-gdcm: JPEG Lossless row skipped)")
    try:
        import jpeg_ls  # noqa: F401

        rows.append(("JPEG-LS lossless", JPEGLSLossless))
    except ImportError:
        print("(no pyjpegls: JPEG-LS row skipped)")
    return rows + [("JPEG 2000 lossless", JPEG2000Lossless), ("JPEG 2000 lossy 10:1", JPEG2000)]


def rate(files: list[Path], size: int, threads: int) -> float:
    from pneumo_edge.inputs.images import load_image
    from pneumo_edge.inputs.pipeline import decode_batches

    load_image(files[0], size)  # warm-up: imports, decoder plugin lookup
    t0 = time.perf_counter()
    if threads == 1:
        for f in files:
            load_image(f, size)
    else:
        for b in decode_batches([str(f) for f in files], size, batch=8, workers=threads):
            assert not b.errors, b.errors
    return len(files) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    pics = pictures(a.count)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dicom-bench-") as tmp:
        tmp = Path(tmp)
        base = []
        for i, v in enumerate(pics):
            p = tmp / f"jpeg{i}.jpg"
            Image.fromarray((v >> 4).astype(np.uint8)).save(p, quality=90)
            base.append(p)
        rows.append(("8-bit JPEG q90 (Pillow, draft)", rate(base, a.size, a.threads),
                     sum(p.stat().st_size for p in base) / len(base)))
        for name, syntax in syntaxes():
            files = [write_dicom(tmp / f"{name[:4]}{i}.dcm", v, syntax)
                     for i, v in enumerate(pics)]
            rows.append((name, rate(files, a.size, a.threads),
                         sum(p.stat().st_size for p in files) / len(files)))
    load1 = Path("/proc/loadavg").read_text().split()[:3]
    m = machine()
    print(f"machine: {platform.machine()}, {m['cpu']}, {m['cores']} logical CPUs; "
          f"python {m['python']}")
    print(f"{a.count} images of {COLS}x{ROWS} (12 bits stored), to {a.size}x{a.size}, "
          f"{a.threads} thread(s); load average before {' '.join(load0)}, "
          f"after {' '.join(load1)}")
    print("\n| transfer syntax | images/s | MB per file |\n|---|---|---|")
    for name, r, size in rows:
        print(f"| {name} | {r:.1f} | {size / 1e6:.2f} |")


if __name__ == "__main__":
    main()

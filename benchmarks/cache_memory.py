"""Peak memory of a training process's data path: the on-disk pixel cache vs decoding into RAM.

    .venv/bin/python benchmarks/cache_memory.py [--counts 5000,50000] [--size 64] [--dir DIR]

For each count N it writes a synthetic pixel cache of N random uint8 images (the layout of
pneumo_edge.train.cache: one flat file + index; random pixels, since memory does not depend on
them), then, each in a fresh process, reads one full epoch of it the way training does:

* ``cache``: pneumo_edge.train.cache.CachedDataset through a shuffled torch DataLoader
  (batch 32, workers 0), the default;
* ``memory``: the whole split as one numpy array (what --no-cache and the earlier code hold),
  then the same epoch through train.data.PixelDataset.

It prints peak RSS (ru_maxrss) per (mode, N). The cache files are removed at the end unless
--keep. Disk needed: N * size * size bytes for the largest N (50k at 64 px: 205 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_cache(where: Path, n: int, size: int) -> Path:
    import numpy as np
    from pneumo_edge.train import cache

    from pneumo_edge.atomic import write_json_atomic

    key = f"{n:08d}{size:04d}".ljust(64, "0")
    data, index = cache._paths(where, "train", key)
    rng = np.random.default_rng(n)
    with open(data, "wb") as f:
        for lo in range(0, n, 1024):
            f.write(rng.integers(0, 256, (min(1024, n - lo), 1, size, size), np.uint8).tobytes())
    labels = (np.arange(n) % 2).tolist()
    write_json_atomic(index, {"key": key, "part": "train", "n": n, "size": size,
                              "version": cache.PREPROCESS_VERSION, "labels": labels,
                              "skipped": []})
    return index


def epoch(index: str, mode: str) -> dict:
    """Run in a child: one epoch over the cache, returns peak RSS and seconds."""
    import numpy as np
    import torch
    from pneumo_edge.train import cache
    from pneumo_edge.train.data import PixelDataset

    meta = json.loads(Path(index).read_text())
    key, n, size = meta["key"], meta["n"], meta["size"]
    px, meta = cache.lookup(Path(index).parent, "train", key, size)
    labels = np.asarray(meta["labels"], np.int64)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    ds = cache.CachedDataset(px, labels) if mode == "cache" else \
        PixelDataset(np.asarray(px), labels)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, num_workers=0)
    total = 0
    for x, _ in loader:
        total += int(x[:, 0, 0, 0].sum())
    return {"mode": mode, "n": n, "size": size,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_data_mb": base / 1024, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="5000,50000")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--dir", default=None, help="where to write the caches (default: a temp dir)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(epoch(*args.child)))
        return
    root = Path(args.dir or tempfile.mkdtemp(prefix="pixel-cache-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in (int(c) for c in args.counts.split(",")):
            where = root / f"n{n}"
            where.mkdir(exist_ok=True)
            index = write_cache(where, n, args.size)
            for mode in ("cache", "memory"):
                out = subprocess.run([sys.executable, __file__, "--child", str(index), mode],
                                     capture_output=True, text=True, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{mode:>6}  {n:>7} images at {args.size} px: peak RSS "
                      f"{r['peak_rss_mb']:7.1f} MB (before the data: "
                      f"{r['rss_before_data_mb']:.1f} MB), epoch {r['seconds']:.1f} s",
                      flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"machine": os.uname().machine, "cpus": os.cpu_count(),
                      "loadavg": Path("/proc/loadavg").read_text().split()[:3], "rows": rows}))


if __name__ == "__main__":
    main()

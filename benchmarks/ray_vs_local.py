"""Images/s of `score --ray` (a local Ray instance on this machine) vs local scoring.

    .venv/bin/python benchmarks/ray_vs_local.py [--model demo-out/r18] [--data FOLDER]
        [--images 480] [--runtime onnx] [--batch 32] [--rounds 2]

Both run pneumo_edge.commands.score.run_score on the same files with -o (the CLI's code path),
in this process, alternating. The Ray figure is measured on an already started local Ray instance
(``ray.init(num_cpus=<cores>)``, started once and not timed: its start-up is printed
separately), so it shows Ray Data's per-run overhead (planning, actor start and model load,
moving pixels through the object store, ordered collection), not the cluster start. On one
machine Ray can only be slower; on a cluster it pays off when the images/s of one box are the
limit. Ray's files go to a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def files_from(data: Path, n: int) -> list[Path]:
    from pneumo_edge.inputs.folders import walk_images

    return [Path(p) for p in walk_images([str(data)]).files[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "demo-out" / "r18"))
    ap.add_argument("--data", default="/work/shared/data/chest_xray/train")
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--runtime", default="onnx")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from pneumo_edge.commands.score import run_score

    work = Path(tempfile.mkdtemp(prefix="rayb", dir="/tmp"))
    try:
        folder = work / "in"
        folder.mkdir()
        for i, p in enumerate(files_from(Path(args.data), args.images)):
            os.symlink(p.resolve(), folder / f"{i:06d}{p.suffix}")
        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), _temp_dir=str(work / "ray"), include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
        start_s = time.perf_counter() - t0
        rows = []
        for r in range(args.rounds):
            for mode in ("local", "ray"):
                out = work / f"{mode}{r}.csv"
                t = time.perf_counter()
                s = run_score([str(folder)], args.model, runtime=args.runtime,
                              batch=args.batch, output=str(out), quiet=True,
                              ray="local" if mode == "ray" else None, log=lambda m: None)
                dt = time.perf_counter() - t
                rows.append({"mode": mode, "round": r, "images": s.files, "seconds": dt,
                             "images_per_s": s.files / dt})
                print(f"round {r} {mode:>5}: {s.files} images in {dt:.1f} s = "
                      f"{s.files / dt:.1f} images/s", flush=True)
        ray.shutdown()
        best = {m: max(x["images_per_s"] for x in rows if x["mode"] == m)
                for m in ("local", "ray")}
        print(f"ray.init (local, not timed above): {start_s:.1f} s; best of {args.rounds}: "
              f"local {best['local']:.1f} images/s, ray {best['ray']:.1f} images/s "
              f"({best['ray'] / best['local']:.2f}x)")
        print(json.dumps({"model": args.model, "runtime": args.runtime, "batch": args.batch,
                          "cpus": os.cpu_count(), "ray_init_s": start_s,
                          "loadavg": Path("/proc/loadavg").read_text().split()[:3],
                          "rows": rows}))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

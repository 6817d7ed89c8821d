"""Training-step throughput: images/s of one optimiser step of the ResNet50 pneumonia model.

What is timed is exactly what ``pneumo-edge train`` runs per batch: the training loop's own
:func:`pneumo_edge.train.loop.train_one_epoch` (channels_last input, ``autocast`` as ``--amp``
sets it, class-weighted cross-entropy, backward, AdamW step, ``loss.item()``), on a model from
:func:`pneumo_edge.model.net.build_model` and the optimiser from the loop's ``_optimizer``.
Input batches are random uint8 ``[B, 1, S, S]`` tensors already in memory, so data loading
and augmentation are *not* included (they run in DataLoader workers during real training).

Modes: ``fp32`` (``--no-amp``) and ``bf16`` (``--amp`` on CPU: ``torch.autocast('cpu',
torch.bfloat16)``, which uses AMX / AVX-512 BF16 where the CPU has them). Each mode: fresh
model, ``--warmup`` untimed steps, then ``--steps`` timed steps; each step's wall time is taken
between consecutive progress callbacks of ``train_one_epoch`` (``loss.item()`` has synchronised).
images/s = batch / mean step time.

    .venv/bin/python benchmarks/train_step.py                 # ResNet50, 224 px, batch 32
    .venv/bin/python benchmarks/train_step.py --steps 3 --warmup 1 --no-write

Prints a JSON object and (unless ``--no-write``) refreshes the ``train_step`` section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"


class StepClock:
    """A stand-in for the loop's progress bar: records the time of every finished step."""

    def __init__(self):
        self.stamps = [time.perf_counter()]

    def update(self, n=1):
        self.stamps.append(time.perf_counter())

    def set_postfix(self, **kw):
        pass

    def step_times(self) -> list[float]:
        return list(np.diff(self.stamps))


def measure(mode: str, arch: str, size: int, batch: int, warmup: int, steps: int,
            threads: int | None = None, seed: int = 0) -> dict:
    import torch
    from pneumo_edge.train.loop import TrainConfig, _optimizer, train_one_epoch
    from torch import nn

    from pneumo_edge.commands.bench import latency_row
    from pneumo_edge.model.net import build_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    device = torch.device("cpu")
    amp = mode == "bf16"
    cfg = TrainConfig(data="-", out="-", arch=arch, image_size=size, batch_size=batch)
    model = build_model(arch, 2, "none").to(device).to(memory_format=torch.channels_last)
    # class weights as --class-weights auto gives them for the public set (1341 vs 3875 images)
    criterion = nn.CrossEntropyLoss(weight=torch.tensor([1.945, 0.673]))
    optimizer = _optimizer(cfg, model)
    gen = torch.Generator().manual_seed(seed)

    def batches(n):
        return [(torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, generator=gen),
                 torch.randint(0, 2, (batch,), generator=gen)) for _ in range(n)]

    if warmup:
        train_one_epoch(model, criterion, optimizer, batches(warmup), device, amp=amp)
    clock = StepClock()
    data = batches(steps)
    clock.stamps = [time.perf_counter()]
    train_one_epoch(model, criterion, optimizer, data, device, amp=amp, progress=clock)
    row = latency_row(f"train-{mode}", "cpu", batch, clock.step_times(), warmup=warmup)
    row = {"mode": mode, "arch": arch, "image_size": size, "batch": batch,
           "threads": torch.get_num_threads(),
           "step_p50_ms": row["p50_ms"], "step_p90_ms": row["p90_ms"],
           "step_mean_ms": row["mean_ms"], "images_per_s": row["images_per_s"],
           "steps": row["iters"], "warmup": warmup}
    return row


def run(arch="resnet50", size=224, batch=32, warmup=3, steps=10, modes=("fp32", "bf16"),
        threads=None, log=None) -> dict:
    from pneumo_edge.commands.bench import machine_info

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    machine = machine_info()
    rows = []
    for mode in modes:
        log(f"train step {arch} {size}px batch {batch} {mode}: {warmup} warm-up + {steps} steps")
        rows.append(measure(mode, arch, size, batch, warmup, steps, threads))
        log(f"  {rows[-1]['images_per_s']:.2f} images/s ({rows[-1]['step_mean_ms']:.0f} ms/step)")
    by = {r["mode"]: r for r in rows}
    speedup = (by["bf16"]["images_per_s"] / by["fp32"]["images_per_s"]
               if "bf16" in by and "fp32" in by else None)
    return {"machine": machine, "rows": rows,
            "bf16_speedup": round(speedup, 3) if speedup else None}


def markdown(result: dict) -> str:
    from pneumo_edge.commands.bench import cpu_summary

    m = result["machine"]
    r0 = result["rows"][0]
    lines = [
        "## Training step (CPU)",
        "",
        f"{r0['arch']}, {r0['image_size']} px, batch {r0['batch']}, one optimiser step "
        "(forward, class-weighted loss, backward, AdamW) through the training loop's own "
        "`train_one_epoch`; in-memory uint8 batches, so data loading and augmentation are not "
        f"included. {r0['warmup']} warm-up steps, then {r0['steps']} timed; images/s = batch / "
        "mean step time.",
        "",
        f"Machine: {cpu_summary(m)}; torch {m['versions'].get('torch')}; "
        f"{r0['threads']} torch threads; {m['date']}; load average at start "
        f"{m['load_avg_1_5_15']}.",
        "",
        "| mode | step p50 ms | step p90 ms | step mean ms | images/s | steps |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for r in result["rows"]:
        name = {"fp32": "fp32 (`--no-amp`)", "bf16": "bf16 autocast (`--amp`)"}.get(r["mode"],
                                                                                  r["mode"])
        lines.append(f"| {name} | {r['step_p50_ms']:.0f} | {r['step_p90_ms']:.0f} | "
                     f"{r['step_mean_ms']:.0f} | {r['images_per_s']:.2f} | {r['steps']} |")
    if result.get("bf16_speedup"):
        lines += ["", f"bf16 autocast / fp32: **{result['bf16_speedup']:.2f}x** images/s on this "
                      "CPU (AMX-BF16)." if m["cpu_flags"].get("amx_bf16") else
                      f"bf16 autocast / fp32: **{result['bf16_speedup']:.2f}x** images/s."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--modes", default="fp32,bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--results", default=str(RESULTS), help="Markdown file to update")
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args(argv)
    result = run(a.arch, a.image_size, a.batch, a.warmup, a.steps,
                 tuple(m.strip() for m in a.modes.split(",") if m.strip()), a.threads)
    print(json.dumps(result, indent=2))
    if not a.no_write:
        from pneumo_edge.commands.bench import update_section

        update_section(a.results, "train_step", markdown(result))
        print(f"updated {a.results}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

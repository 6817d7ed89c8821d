"""PyTorch on a CUDA GPU: eager fp32 vs fp16 channels_last (vs fp16 + CUDA graphs), and
end-to-end scoring of a folder on the GPU. For a CUDA box; nothing here was measured in the
session that wrote it (see RESULTS.md).

    .venv/bin/python benchmarks/gpu_torch.py                       # random-weight ResNet50, 224 px
    .venv/bin/python benchmarks/gpu_torch.py --model runs/r50 --data some/folder --write
    .venv/bin/python benchmarks/gpu_torch.py --device cpu --arch resnet18 --image-size 64 \\
        --batch 1,4 --iters 3 --warmup 1          # smoke test of the code paths without a GPU

Variants (same weights, uint8 ``[N, 1, S, S]`` input, probabilities out, as every runtime):
- ``fp32-eager``: the model as loaded, contiguous (NCHW) input;
- ``fp16-cl``: ``model.half()`` and ``channels_last`` weights and input (tensor cores);
- ``fp16-cl-graph``: the same captured once per batch size in a CUDA graph and replayed
  (removes Python / launch overhead, which dominates at batch 1); ``--no-graphs`` drops it.

Timing, per variant and batch size: ``--warmup`` untimed calls (cuDNN autotuning with
``cudnn.benchmark = True`` happens there), then ``--iters`` timed calls, each bracketed by
``torch.cuda.synchronize()`` and timed with ``time.perf_counter``. Two figures per row:
- ``gpu_*``: input already resident on the GPU, output left there (device compute only);
- ``host_*``: numpy uint8 in (host-to-device copy) to numpy probabilities out (device-to-host
  copy), i.e. what ``pneumo_edge.runtimes.torch_rt`` costs a caller.
images/s = batch / mean latency.

``--data FOLDER`` then runs ``pneumo-edge bench``'s end-to-end pass (scoring's decoder on a
thread pool, overlapped with the torch runtime on CUDA) and reports decode, compute and
end-to-end images/s and which one bounds the pipeline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import make_model_dir

HERE = Path(__file__).resolve().parent


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_calls(fn, warmup: int, iters: int, dev) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(iters):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return times


def variants(model, dev, graphs: bool):
    """name -> (module, input memory format); uint8 input is cast inside the model."""
    import copy

    import torch

    out = {"fp32-eager": (copy.deepcopy(model).float().eval().to(dev), torch.contiguous_format)}
    half = copy.deepcopy(model).half().eval().to(dev).to(memory_format=torch.channels_last)
    out["fp16-cl"] = (half, torch.channels_last)
    if graphs and dev.type == "cuda":
        out["fp16-cl-graph"] = (half, torch.channels_last)
    return out


def bench_variant(name, net, fmt, batch, size, dev, warmup, iters):
    import torch

    from pneumo_edge.commands.bench import latency_row

    rng = np.random.default_rng(0)
    x_host = rng.integers(0, 256, (batch, 1, size, size), dtype=np.uint8)
    x_dev = torch.from_numpy(x_host).to(dev).contiguous(memory_format=fmt)
    with torch.inference_mode():
        if name.endswith("-graph"):
            static_in = x_dev.clone()
            s = torch.cuda.Stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                for _ in range(3):  # warm up on a side stream before capture, as documented
                    net(static_in)
            torch.cuda.current_stream(dev).wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = net(static_in)

            def gpu_call():
                graph.replay()

            def host_call():
                static_in.copy_(torch.from_numpy(x_host), non_blocking=False)
                graph.replay()
                return static_out.float().cpu().numpy()
        else:
            def gpu_call():
                return net(x_dev)

            def host_call():
                x = torch.from_numpy(x_host).to(dev).contiguous(memory_format=fmt)
                return net(x).float().cpu().numpy()

        gpu = latency_row(name, str(dev), batch, time_calls(gpu_call, warmup, iters, dev),
                          warmup=warmup)
        host = latency_row(name, str(dev), batch, time_calls(host_call, warmup, iters, dev),
                           warmup=warmup)
    row = {"variant": name, "batch": batch, "iters": iters, "warmup": warmup}
    for prefix, r in (("gpu", gpu), ("host", host)):
        for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "images_per_s"):
            row[f"{prefix}_{k}"] = r[k]
    return row


def run(args) -> dict:
    import torch

    from pneumo_edge.commands.bench import machine_info, run_bench
    from pneumo_edge.model.torchload import load_model

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_torch.py: torch sees no CUDA GPU (use --device cpu for a smoke "
                         "test of the code paths); no figures written")
    dev = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    tmp = None
    if args.model:
        model_dir = Path(args.model)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="gpu_torch_")
        model_dir = make_model_dir(Path(tmp.name) / "model", args.arch, args.image_size,
                                   export=False)
    model, card = load_model(model_dir)
    size = card.image_size
    batches = [int(b) for b in args.batch.split(",")]
    result = {"machine": machine_info(), "model": {"dir": str(model_dir), "arch": card.arch,
                                                   "image_size": size},
              "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})"
                                    if dev.type == "cuda" else ""),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None,
              "rows": [], "end_to_end": None}
    for name, (net, fmt) in variants(model, dev, not args.no_graphs).items():
        for b in batches:
            print(f"{name} batch {b} ...", file=sys.stderr, flush=True)
            try:
                row = bench_variant(name, net, fmt, b, size, dev, args.warmup, args.iters)
            except torch.cuda.OutOfMemoryError:
                row = {"variant": name, "batch": b, "skipped": "CUDA out of memory"}
                torch.cuda.empty_cache()
            result["rows"].append(row)
            print(f"  {json.dumps(row)}", file=sys.stderr, flush=True)
    if args.data:
        # the torch runtime opens on CUDA when torch sees a GPU (fp32 eager, channels_last)
        e2e = run_bench(model_dir, "torch", [max(batches)], args.warmup, args.iters,
                        data=args.data, data_limit=args.limit)
        result["end_to_end"] = e2e["pipeline"]
    if tmp is not None:
        tmp.cleanup()
    return result


def markdown(result: dict) -> str:
    from pneumo_edge.commands.bench import cpu_summary

    m = result["machine"]
    lines = ["## PyTorch on the GPU (benchmarks/gpu_torch.py)", "",
             f"Device: {result['device']}; torch {result['torch']}, CUDA {result['cuda']}, "
             f"cuDNN {result['cudnn']}; host CPU {cpu_summary(m)}; {m['date']}. "
             f"Model: {result['model']['arch']} {result['model']['image_size']} px.", "",
             "| variant | batch | GPU-only p50 ms | GPU-only img/s | host-to-host p50 ms | "
             "host-to-host p99 ms | host-to-host img/s |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | {r['batch']} | skipped: {r['skipped']} | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['batch']} | {r['gpu_p50_ms']:.2f} | "
                     f"{r['gpu_images_per_s']:.0f} | {r['host_p50_ms']:.2f} | "
                     f"{r['host_p99_ms']:.2f} | {r['host_images_per_s']:.0f} |")
    for p in result.get("end_to_end") or []:
        lines += ["", f"End to end ({p['files']} files, batch {p['batch']}, {p['threads']} decode "
                      f"threads, {p['runtime']} on {p['device']}): decode "
                      f"{p['decode_images_per_s']:.0f} img/s, compute "
                      f"{p['compute_images_per_s']:.0f} img/s, end-to-end "
                      f"{p['end_to_end_images_per_s']:.0f} img/s; bound by {p['bound']}."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: a random-weight model)")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", default="1,8,32,128")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph variant")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data", help="folder for the end-to-end scoring pass")
    ap.add_argument("--limit", type=int, default=None, help="first N files of --data")
    ap.add_argument("--write", action="store_true",
                    help="refresh the gpu_torch section of benchmarks/RESULTS.md")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    a = ap.parse_args(argv)
    result = run(a)
    print(json.dumps(result, indent=2))
    if a.write:
        if not str(a.device).startswith("cuda"):
            raise SystemExit("--write is for GPU figures; not writing CPU smoke-test figures")
        from pneumo_edge.commands.bench import update_section

        update_section(a.results, "gpu_torch", markdown(result))
        print(f"updated {a.results}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

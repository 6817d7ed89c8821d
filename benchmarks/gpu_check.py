"""Verify pneumo-edge's GPU paths on a machine with a CUDA GPU, in about 5 minutes, offline.

Needs only this repository and a venv with torch, torchvision, onnx and onnxruntime (the CPU
build is enough; onnxruntime-gpu, tensorrt and cuda-python are used when present):

    .venv/bin/python benchmarks/gpu_check.py            # or: bash benchmarks/gpu_check.sh
    .venv/bin/python benchmarks/gpu_check.py --dry-run  # the same code paths on the CPU, tiny

Steps (each one recorded as pass / fail / skip with its figures; a failed step does not stop the
others): the environment (GPU, driver, torch / CUDA / cuDNN, onnxruntime providers, TensorRT);
training the tiny model on CUDA (autocast, channels_last); its export (ONNX fp32/fp16 and parity)
and the fp16 graph's checks (fp16 compute, TensorRT's uint8-input rule); torch CUDA fp32 (TF32
off), fp16 and fp16 + CUDA graphs against the CPU; ``auto``'s choice and its reasons; the TensorRT
runtime's buffer, padding and batch-splitting logic (:class:`EngineIO`) with real CUDA memory
(pinned host buffers, device buffers, a stream) and a stand-in execution context that runs the
torch fp16 model on those device buffers; ``pytest -m "gpu or tensorrt"``; torch CUDA
fp32 / fp16 / fp16 + CUDA graphs latency at batch 1/8/32/128 (random-weight ResNet50, 224 px);
end-to-end scoring of the bundled samples. Writes ``gpu_check.json`` and ``gpu_check.md`` to
``--out`` (default runs/gpu_check). Exit status: 0 all steps passed or skipped, 1 a step failed,
2 no CUDA GPU (without ``--dry-run``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from common import REPO, SAMPLES, make_model_dir, write_labelled

BATCHES = (1, 8, 32, 128)


# ----------------------------------------------------------------------------- steps

class Steps:
    """Runs named steps within a time budget; records status, seconds and figures."""

    def __init__(self, budget_s: float, log):
        self.t0, self.budget, self.log, self.rows = time.perf_counter(), budget_s, log, []

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def run(self, name: str, fn, *args, need: float = 0.0):
        """``fn(*args)`` -> a dict of figures (``{"status": "skip", "reason": ...}`` to skip).
        Returns the dict, or None when the step failed or was skipped for time."""
        if self.left() < need:
            return self._record(name, "skip", 0.0, {"reason": f"time budget: {self.left():.0f} s "
                                                              f"left, step needs ~{need:.0f} s"})
        self.log(f"[{time.perf_counter() - self.t0:6.1f} s] {name} ...")
        t = time.perf_counter()
        try:
            out = dict(fn(*args) or {})
        except Exception as exc:  # noqa: BLE001 -- one failed step must not stop the check
            tb = traceback.format_exc().strip().splitlines()[-6:]
            self._record(name, "fail", time.perf_counter() - t,
                         {"error": f"{type(exc).__name__}: {str(exc)[:500]}", "traceback": tb})
            return None
        status = out.pop("status", "pass")
        self._record(name, status, time.perf_counter() - t, out)
        return out if status == "pass" else None

    def _record(self, name, status, seconds, details):
        self.rows.append({"step": name, "status": status, "seconds": round(seconds, 2),
                          **details})
        self.log(f"    {status} ({seconds:.1f} s)" +
                 (f": {details.get('error') or details.get('reason')}" if status != "pass" else ""))


def skip(reason: str) -> dict:
    return {"status": "skip", "reason": reason}


# ----------------------------------------------------------------------------- environment

def environment(torch, dev: str) -> dict:
    from pneumo_edge.commands.bench import machine_info
    from pneumo_edge.runtimes import has_package

    info = {"machine": machine_info(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "cuda_available": torch.cuda.is_available(), "device": dev}
    if dev.startswith("cuda"):
        i = torch.device(dev).index or 0
        props = torch.cuda.get_device_properties(i)
        info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    bf16_supported=torch.cuda.is_bf16_supported())
    try:
        import onnxruntime as ort
        info.update(onnxruntime=ort.__version__, ort_providers=ort.get_available_providers())
    except ImportError:
        info["onnxruntime"] = None
    info["tensorrt"] = _version("tensorrt") if has_package("tensorrt") else None
    info["cuda_python"] = _version("cuda-python")
    return info


def _version(dist: str):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- train, export

def train_tiny(work: Path, dev: str, dry: bool) -> dict:
    from pneumo_edge.train.loop import TrainConfig, train

    from pneumo_edge.model.modeldir import read_card

    data, out = work / "data", work / "run"
    write_labelled(data / "train", per_class=8 if dry else 16, seed=0)
    size = 32 if dry else 64
    train(TrainConfig(data=str(data), out=str(out), arch="resnet18", image_size=size,
                      epochs=1 if dry else 2, min_epochs=1, workers=0, device=dev, batch_size=4,
                      augment=False, amp=not dry, force=True, threshold_for="fixed:0.5"))
    tc = read_card(out).train_config
    return {"run": str(out), "image_size": size, "amp": tc.get("amp"),
            "trained_on": tc.get("device")}


def export_and_check(run: Path) -> dict:
    import onnx
    from pneumo_edge.export.main import run_export
    from pneumo_edge.export.onnx import fp16_problems
    from pneumo_edge.export.tensorrt import uint8_input_problems

    code = run_export(run)
    fp16 = onnx.load(str(run / "model.fp16.onnx"))
    problems = fp16_problems(fp16) + uint8_input_problems(fp16)
    report = json.loads((run / "parity.json").read_text())
    forms = {k: v.get("status") for k, v in report.get("forms", {}).items()}
    out = {"export_exit": code, "fp16_graph_problems": problems, "parity_forms": forms,
           "parity_reference": report.get("reference")}
    if code != 0 or problems:
        raise AssertionError(f"export exit {code}; fp16 graph problems {problems[:2]}")
    return out


# ----------------------------------------------------------------------------- torch vs CPU

def compare_torch(torch, run: Path, dev: str) -> dict:
    from pneumo_edge.runtimes.torch_rt import TorchRuntime, tf32_state

    if not dev.startswith("cuda"):
        return skip("needs CUDA (dry run)")
    cpu = TorchRuntime(run, device="cpu")
    size = cpu.card.image_size
    x = np.random.default_rng(0).integers(0, 256, (64, 1, size, size), dtype=np.uint8)
    ref = cpu(x)
    fp32 = TorchRuntime(run, device=dev)
    got32 = fp32(x)
    tf32 = tf32_state(torch)
    half = TorchRuntime(run, device=dev, precision="fp16")
    graphs = TorchRuntime(run, device=dev, precision="fp16", graphs=True)
    got16, gotg = half(x), graphs(x)
    gotg2 = graphs(x)  # a replay of the captured graph
    out = {"device": fp32.device, "tf32_after_run": tf32, "runtime_tf32": fp32.tf32,
           "fp32_max_abs_diff": float(np.abs(got32 - ref).max()),
           "fp16_max_abs_diff": float(np.abs(got16 - ref).max()),
           "fp16_label_agreement": float((got16.argmax(1) == ref.argmax(1)).mean()),
           "graphs_vs_fp16_max_abs_diff": float(np.abs(gotg - got16).max()),
           "graph_replay_identical": bool(np.array_equal(gotg, gotg2))}
    bad = [k for k, lim in (("fp32_max_abs_diff", 1e-4), ("fp16_max_abs_diff", 1e-2),
                            ("graphs_vs_fp16_max_abs_diff", 1e-3)) if not out[k] <= lim]
    if bad or any(tf32.values()) or not out["graph_replay_identical"]:
        raise AssertionError(f"out of tolerance: {bad}; tf32 {tf32}; figures {out}")
    return out


def auto_choice(run: Path) -> dict:
    from pneumo_edge.runtimes import open_runtime

    said = []
    rt = open_runtime(run, "auto", log=said.append)
    return {"runtime": rt.name, "device": rt.device, "precision": rt.precision,
            "reason": said[0] if said else ""}


# ----------------------------------------------------------------------------- TensorRT IO logic

class TorchMemory:
    """EngineIO's memory interface on torch: pinned host buffers and device buffers on CUDA
    (plain CPU tensors in a dry run), copies and the stand-in's work on one side stream."""

    def __init__(self, torch, device: str):
        self.torch, self.dev = torch, torch.device(device)
        self.cuda = self.dev.type == "cuda"
        self._stream = torch.cuda.Stream(self.dev) if self.cuda else None
        self.stream = self._stream.cuda_stream if self.cuda else 0
        self.tensors, self._host, self.pinned = {}, [], []

    def on_stream(self):
        return self.torch.cuda.stream(self._stream) if self.cuda else contextlib.nullcontext()

    def host(self, nbytes):
        t = self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=self.cuda)
        self._host.append(t)
        self.pinned.append(bool(t.is_pinned()))
        return t.numpy()

    def device(self, nbytes):
        t = self.torch.empty(nbytes, dtype=self.torch.uint8, device=self.dev)
        self.tensors[t.data_ptr()] = t
        return t.data_ptr()

    def h2d(self, dptr, src):
        raw = self.torch.from_numpy(np.ascontiguousarray(src).reshape(-1).view(np.uint8))
        with self.on_stream():
            self.tensors[dptr][:raw.numel()].copy_(raw, non_blocking=True)

    def d2h(self, dst, dptr):
        raw = self.torch.from_numpy(dst.reshape(-1).view(np.uint8))
        with self.on_stream():
            raw.copy_(self.tensors[dptr][:raw.numel()], non_blocking=True)

    def sync(self):
        if self.cuda:
            self._stream.synchronize()

    def close(self):
        self.sync()
        self.tensors.clear()
        self._host.clear()


class StandInContext:
    """IExecutionContext's calls that EngineIO makes; executes ``model`` (uint8 -> probs) from
    the input device buffer into the output device buffer, on the memory's stream, and refuses
    input shapes outside its profile ``lo..hi`` as TensorRT does."""

    def __init__(self, torch, model, mem: TorchMemory, lo, hi, size, classes):
        self.torch, self.model, self.mem = torch, model, mem
        self.lo, self.hi, self.size, self.classes = lo, hi, size, classes
        self.shape, self.addr, self.runs = None, {}, []

    def set_input_shape(self, name, shape):
        if not self.lo <= shape[0] <= self.hi:
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return (self.shape[0], self.classes)

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def execute_async_v3(self, stream):
        torch, m, s = self.torch, self.shape[0], self.size
        if stream != self.mem.stream:
            return False
        with self.mem.on_stream(), torch.inference_mode():
            x = self.mem.tensors[self.addr["in"]][:m * s * s].view(m, 1, s, s)
            probs = self.model(x.contiguous(memory_format=torch.channels_last)).float()
            out = self.mem.tensors[self.addr["out"]]
            out[:probs.numel() * 4].copy_(probs.reshape(-1).view(torch.uint8))
        self.runs.append(m)
        return True


def trt_io(torch, run: Path, dev: str) -> dict:
    from pneumo_edge.runtimes.torch_rt import TorchRuntime
    from pneumo_edge.runtimes.trt_rt import EngineIO

    cuda = dev.startswith("cuda")
    ref = TorchRuntime(run, device=dev, precision="fp16" if cuda else "fp32")
    s, c = ref.card.image_size, len(ref.card.classes)
    mem = TorchMemory(torch, dev)
    ctx = StandInContext(torch, ref.model, mem, 4, 8, s, c)
    io = EngineIO(ctx, mem, "in", "out", s, c, 4, 8, "stand-in engine")
    diffs, chunks = {}, {}
    for n in (1, 5, 8, 19, 0):
        ctx.runs.clear()
        x = np.random.default_rng(n).integers(0, 256, (n, 1, s, s), dtype=np.uint8)
        got = io(x)
        if got.shape != (n, c):
            raise AssertionError(f"batch {n}: shape {got.shape}")
        diffs[n] = float(np.abs(got - ref(x)).max()) if n else 0.0
        chunks[n] = list(ctx.runs)
    io.close()
    want = {1: [4], 5: [5], 8: [8], 19: [8, 8, 4], 0: []}
    out = {"memory": "pinned host + CUDA device buffers" if cuda else "CPU tensors (dry run)",
           "host_pinned": mem.pinned, "chunks": chunks, "max_abs_diff_vs_runtime": diffs}
    tol = 5e-3 if cuda else 1e-5  # fp16: a padded chunk may pick other cuDNN kernels
    out["tolerance"] = tol
    if chunks != want or max(diffs.values()) > tol or (cuda and not all(mem.pinned)):
        raise AssertionError(f"chunks {chunks} (want {want}); diffs {diffs}; pinned {mem.pinned}")
    return out


# ----------------------------------------------------------------------------- pytest

def run_pytest(timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu or tensorrt", "-p",
           "no:cacheprovider", "tests"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          check=False)
    tail = proc.stdout.strip().splitlines()[-15:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)",
                                                 tail[-1] if tail else "")}
    out = {"command": " ".join(cmd[1:]), "exit": proc.returncode, "counts": counts,
           "tail": tail}
    if proc.returncode != 0 or not counts.get("passed"):
        raise AssertionError(f"pytest exit {proc.returncode}: {tail[-1] if tail else ''}")
    return out


# ----------------------------------------------------------------------------- benchmarks

def bench_torch(work: Path, dev: str, arch: str, size: int, batches, iters: int) -> dict:
    from pneumo_edge.commands.bench import bench_runtime
    from pneumo_edge.runtimes.torch_rt import TorchRuntime

    model = make_model_dir(work / "bench_model", arch, size, export=False)
    cuda = dev.startswith("cuda")
    variants = [("fp32, TF32 off" if cuda else "fp32", {"precision": "fp32"})]
    if cuda:
        variants += [("fp16", {"precision": "fp16"}),
                     ("fp16 + CUDA graphs", {"precision": "fp16", "graphs": True})]
    rows = []
    for label, kw in variants:
        rt = TorchRuntime(model, device=dev, **kw)
        for b in batches:
            row = bench_runtime(rt, b, warmup=5 if dev != "cpu" else 1, iters=iters,
                                max_time=3.0)
            rows.append({"variant": label, **row})
        del rt
    return {"model": f"{arch} {size} px, random weights (speed only)", "rows": rows}


def end_to_end(run: Path, dev: str, batch: int) -> dict:
    from pneumo_edge.commands.bench import bench_end_to_end, list_files
    from pneumo_edge.runtimes import open_runtime
    from pneumo_edge.runtimes.torch_rt import TorchRuntime

    files = list_files(SAMPLES)
    runtimes = [open_runtime(run, "auto", log=lambda m: None), TorchRuntime(run, device=dev)]
    if dev.startswith("cuda"):
        runtimes.append(TorchRuntime(run, device=dev, precision="fp16"))
    rows = [bench_end_to_end(rt, files, batch) for rt in runtimes]
    bad = [r for r in rows if r["errors"] or r["files"] != len(files)]
    if bad:
        raise AssertionError(f"end-to-end rows with errors: {bad}")
    return {"files": len(files), "rows": rows}


# ----------------------------------------------------------------------------- report

def markdown(result: dict) -> str:
    env = result["environment"] or {}
    gpu = env.get("gpu", "no GPU (dry run)" if result["dry_run"] else "?")
    drv = next((g.get("driver") for g in env.get("machine", {}).get("gpus", []) or []), None)
    mode = "DRY RUN on the CPU" if result["dry_run"] else f"device {env.get('device')}"
    when = f"- when: {result['started']} UTC; total {result['seconds']:.0f} s; {mode}"
    versions = (f"- driver {drv}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, "
                f"cuDNN {env.get('cudnn')}); onnxruntime {env.get('onnxruntime')} "
                f"{env.get('ort_providers')}; tensorrt {env.get('tensorrt')}; cuda-python "
                f"{env.get('cuda_python')}")
    lines = [f"# gpu_check: {gpu}", "", when, versions, "",
             "| step | status | s | figures |", "|---|---|---|---|"]
    for r in result["steps"]:
        figs = {k: v for k, v in r.items() if k not in ("step", "status", "seconds", "rows",
                                                         "traceback", "tail", "machine")}
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']} | "
                     f"{json.dumps(figs, default=str)[:400].replace('|', '/')} |")
    bench = next((r for r in result["steps"] if r["step"] == "bench torch" and "rows" in r), None)
    if bench:
        lines += ["", f"## torch latency ({bench['model']}; {bench['rows'][0]['device']})", "",
                  "| variant | batch | p50 ms | p90 ms | mean ms | images/s | iters |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['batch']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                  f"{r['mean_ms']:.2f} | {r['images_per_s']:.0f} | {r['iters']} |"
                  for r in bench["rows"]]
    e2e = next((r for r in result["steps"] if r["step"] == "end-to-end" and "rows" in r), None)
    if e2e:
        lines += ["", f"## end-to-end scoring of the {e2e['files']} bundled samples", "",
                  "| runtime | device | decode img/s | compute img/s | end-to-end img/s | bound |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['runtime']} | {p['device']} | {p['decode_images_per_s']:.0f} | "
                  f"{p['compute_images_per_s']:.0f} | {p['end_to_end_images_per_s']:.0f} | "
                  f"{p['bound']} |" for p in e2e["rows"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- driver

def check(args, log) -> dict:
    try:
        import torch
    except ImportError:
        log("error: gpu_check needs torch (pip install -e '.[train]')")
        raise SystemExit(2) from None
    if not args.dry_run and not torch.cuda.is_available():
        log("error: gpu_check needs a CUDA GPU that torch sees (torch.cuda.is_available() is "
            "False); --dry-run runs the same steps on the CPU")
        raise SystemExit(2)
    dev = "cpu" if args.dry_run else args.device
    steps = Steps(args.budget, log)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        env = steps.run("environment", environment, torch, dev)
        if args.model:
            run = Path(args.model)
        else:
            trained = steps.run("train tiny model", train_tiny, work, dev, args.dry_run, need=20)
            run = Path(trained["run"]) if trained else None
            if run is not None:
                steps.run("export + fp16 graph checks", export_and_check, run, need=20)
        if run is not None:
            steps.run("torch vs CPU", compare_torch, torch, run, dev, need=10)
            steps.run("auto", auto_choice, run)
            steps.run("TensorRT IO logic", trt_io, torch, run, dev, need=5)
        if args.dry_run or args.no_pytest:
            steps.run("pytest -m gpu", lambda: skip("dry run" if args.dry_run else "--no-pytest"))
        else:
            steps.run("pytest -m gpu", run_pytest, max(30.0, steps.left() - 120), need=60)
        arch, size = ("resnet18", 32) if args.dry_run else (args.bench_arch, args.bench_size)
        batches = (1, 4) if args.dry_run else BATCHES
        steps.run("bench torch", bench_torch, work, dev, arch, size, batches,
                  2 if args.dry_run else 30, need=30)
        if run is not None:
            steps.run("end-to-end", end_to_end, run, dev, 16 if args.dry_run else 32, need=15)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"started": started, "dry_run": args.dry_run, "device": dev,
            "seconds": round(time.perf_counter() - steps.t0, 1), "environment": env,
            "steps": steps.rows, "ok": not any(r["status"] == "fail" for r in steps.rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "gpu_check"),
                    help="folder for gpu_check.json and gpu_check.md (default runs/gpu_check)")
    ap.add_argument("--device", default="cuda", help="cuda or cuda:N (default cuda)")
    ap.add_argument("--dry-run", action="store_true",
                    help="run the steps on the CPU with tiny sizes (no GPU needed)")
    ap.add_argument("--model", help="an exported model directory to use instead of training "
                                    "and exporting the tiny model")
    ap.add_argument("--no-pytest", action="store_true", help="skip pytest -m gpu")
    ap.add_argument("--bench-arch", default="resnet50")
    ap.add_argument("--bench-size", type=int, default=224)
    ap.add_argument("--budget", type=float, default=450.0,
                    help="seconds; steps that would start past it are skipped (default 450)")
    args = ap.parse_args(argv)
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    result = check(args, log)
    from pneumo_edge.atomic import write_json_atomic, write_text_atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "gpu_check.json", result)
    write_text_atomic(out / "gpu_check.md", markdown(result))
    log(f"{'OK' if result['ok'] else 'FAILED'}: {out / 'gpu_check.json'}, "
        f"{out / 'gpu_check.md'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

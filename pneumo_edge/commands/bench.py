"""Latency and throughput of a model directory per runtime and batch size (``pneumo-edge bench``).

Method (the one trtexec and timm's ``benchmark.py`` use): for each runtime and batch size, run
``warmup`` untimed calls on a real-shaped ``uint8 [N, 1, S, S]`` batch, then ``iters`` timed
calls, each timed on its own with ``time.perf_counter``. From the per-call times:

- ``p50_ms`` / ``p90_ms`` / ``p99_ms``: ``numpy.percentile`` (linear interpolation) of the
  per-call latencies, milliseconds per *batch*;
- ``mean_ms``: their mean;
- ``images_per_s = batch / mean latency``, so throughput is consistent with the latencies shown
  (one stream, one batch in flight at a time; no overlap of calls).

Device synchronisation: every runtime returns a host numpy array, so a timed call ends only when
the device has finished and the result has been copied back: onnxruntime and TensorRT copy their
outputs to host before returning, and the torch runtime on CUDA calls ``.cpu()``, which waits for
the GPU. The timed interval therefore includes the host-to-device copy of the uint8 input and the
device-to-host copy of the ``[N, C]`` probabilities (what a caller of the runtime pays).

Devices: each runtime reports where it runs (``cpu``, ``cuda:0 (NVIDIA H100 80GB HBM3)``), and
rows carry that string; nothing here assumes a CPU. ``torch`` on CUDA is fp32 with TF32 switched off
(parity's reference arithmetic, slower than torch's TF32 default on Ampere and later GPUs);
``torch-fp16`` (fp16 weights and compute, channels_last) runs on CUDA only. A runtime that cannot
run here (no GPU, package missing) is listed under ``skipped`` with the reason, never timed.

``--data FOLDER`` adds an end-to-end pass over real files, per runtime, at one batch size (the
largest asked for): decode + preprocess throughput alone (scoring's decoder,
:func:`pneumo_edge.inputs.pipeline.decode_batches` calling :func:`pneumo_edge.inputs.images.load_image` on
as many threads as scoring uses), compute throughput alone (the runtime over the decoded
batches), end-to-end throughput (:func:`pneumo_edge.commands.score.score_files`, scoring's own loop with
decode overlapped with the model, rows built and discarded instead of written), and which of
decode or compute bounds the pipeline (the slower one alone). On a CPU-only box decode and
compute share the same cores, so end-to-end is below the smaller of the two.

This module imports no torch, onnxruntime or tensorrt itself; the runtimes import what they need.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pneumo_edge.commands.options import BENCH_DEFAULTS as DEFAULTS
from pneumo_edge.errors import ModelError, PneumoError
from pneumo_edge.versions import installed_versions

#: With a time budget, a row still gets at least this many timed calls.
MIN_ITERS = 5
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile",
             "amx_bf16", "amx_int8")
PACKAGES = ("numpy", "pillow", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "torchvision",
            "tensorrt", "cuda-python")


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict:
    """What the figures were measured on: CPU model, cores, SIMD/AMX flags, GPU, library
    versions, load at the time, date. Imports no heavy package (versions from metadata)."""
    cpu_model, flags = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    versions = installed_versions(PACKAGES)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu_model or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "cpu_flags": {f: f in flags for f in CPU_FLAGS},
        "gpu": _gpus(),
        "os": f"{platform.system()} {platform.release()}",
        "hostname": platform.node(),
        "versions": versions,
        "load_avg_1_5_15": load,
        "date": dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
    }


def _cpuinfo() -> tuple[str, set]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


def _gpus() -> list[dict]:
    """NVIDIA GPUs from nvidia-smi (no torch import); empty when there is none."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total,driver_version,compute_cap",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return [{"name": "unknown (nvidia-smi failed)"}]
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        gpus.append(dict(zip(("name", "memory", "driver", "compute_capability"), parts)))
    return gpus


def cpu_summary(machine: dict) -> str:
    """One line: ``Intel(R) Xeon(R) ..., 2 cores (AMX-BF16, AVX-512 BF16/FP16)``."""
    f = machine.get("cpu_flags", {})
    extras = []
    if f.get("amx_bf16"):
        extras.append("AMX-BF16" + ("/INT8" if f.get("amx_int8") else ""))
    if f.get("avx512f"):
        sub = [n for n, k in (("BF16", "avx512_bf16"), ("FP16", "avx512_fp16"),
                              ("VNNI", "avx512_vnni")) if f.get(k)]
        extras.append("AVX-512" + (" " + "/".join(sub) if sub else ""))
    elif f.get("avx2"):
        extras.append("AVX2")
    cores = machine.get("cores_usable") or machine.get("cores")
    text = f"{machine.get('cpu')}, {cores} cores"
    return text + (f" ({', '.join(extras)})" if extras else "")


# ----------------------------------------------------------------------------- latency


def bench_runtime(rt, batch: int, warmup: int = DEFAULTS.warmup,
                  iters: int = DEFAULTS.iters, *,
                  max_time: float | None = DEFAULTS.max_time, seed: int = 0) -> dict:
    """Time ``rt`` on a random ``uint8 [batch, 1, S, S]`` input: ``warmup`` untimed calls, then
    ``iters`` timed ones (fewer, but at least :data:`MIN_ITERS`, once ``max_time`` seconds of
    timed calls have passed). Returns one row (see the module docstring for the definitions)."""
    if batch < 1 or iters < 1 or warmup < 0:
        raise ValueError("batch and iters must be >= 1, warmup >= 0")
    size = rt.card.image_size
    x = np.random.default_rng(seed).integers(0, 256, (batch, 1, size, size), dtype=np.uint8)
    for _ in range(warmup):
        out = rt(x)
    times = []
    t_start = time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        out = rt(x)  # a host numpy array: the device has finished (see module docstring)
        times.append(time.perf_counter() - t0)
        if max_time is not None and len(times) >= MIN_ITERS and \
                time.perf_counter() - t_start >= max_time:
            break
    if not (isinstance(out, np.ndarray) and out.shape == (batch, len(rt.card.classes))):
        raise ModelError(f"{rt.name}: output shape {getattr(out, 'shape', None)} is not "
                         f"[{batch}, {len(rt.card.classes)}]")
    return latency_row(rt.name, rt.device, batch, times, warmup=warmup)


def latency_row(runtime: str, device: str, batch: int, times_s, *, warmup: int = 0) -> dict:
    """A result row from per-call times in seconds."""
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return {
        "runtime": runtime,
        "device": device,
        "batch": int(batch),
        "p50_ms": _sig(p50),
        "p90_ms": _sig(p90),
        "p99_ms": _sig(p99),
        "mean_ms": _sig(mean),
        "min_ms": _sig(ms.min()),
        "max_ms": _sig(ms.max()),
        "std_ms": _sig(ms.std()),
        "images_per_s": _sig(batch / (mean / 1e3)),
        "iters": int(ms.size),
        "warmup": int(warmup),
    }


def _sig(x: float, digits: int = 6) -> float:
    """``x`` to ``digits`` significant digits (JSON stays readable, ratios stay exact enough)."""
    return float(f"{float(x):.{digits}g}")


# ----------------------------------------------------------------------------- end to end


def decode_threads() -> int:
    """The decode thread count scoring uses by default, so the figures match a real run."""
    from pneumo_edge.inputs.pipeline import default_workers

    return default_workers()


def list_files(folder, limit: int | None = None) -> list[str]:
    from pneumo_edge.inputs.folders import walk_images

    if not os.path.isdir(folder):
        raise PneumoError(f"{folder}: no such folder")
    files = walk_images([folder]).files
    if not files:
        raise PneumoError(f"{folder}: no image files")
    return files[:limit] if limit else files


def bench_decode(files, size: int, batch: int, threads: int) -> tuple[list[np.ndarray], dict]:
    """Decode + preprocess every file with scoring's decoder (:func:`pneumo_edge.inputs.pipeline.
    decode_batches`, ``threads`` threads, nothing else running); (pixel batches, stats).
    Files that cannot be decoded are counted; scoring would give them an error row."""
    from pneumo_edge.inputs.pipeline import decode_batches

    t0 = time.perf_counter()
    batches = [b.pixels for b in decode_batches(files, size, batch, threads)]
    secs = time.perf_counter() - t0
    good = sum(len(p) for p in batches)
    return batches, {"files": len(files), "errors": len(files) - good, "decode_s": secs,
                     "decode_images_per_s": len(files) / secs}


def bench_compute(rt, batches: list[np.ndarray]) -> dict:
    """The runtime alone over already-decoded batches, as scoring feeds it (one untimed
    warm-up call on the first batch)."""
    batches = [b for b in batches if len(b)]
    if not batches:
        return {"compute_s": 0.0, "compute_images_per_s": 0.0}
    rt(batches[0])
    t0 = time.perf_counter()
    for b in batches:
        rt(b)
    secs = time.perf_counter() - t0
    return {"compute_s": secs, "compute_images_per_s": sum(map(len, batches)) / secs}


class _Discard:
    """A scoring sink that formats nothing to disk: rows are built (as scoring does), then
    dropped, so the end-to-end figure is decode + model + row building, without file I/O."""

    rows = 0

    def write(self, rows) -> None:
        self.rows += len(rows)


def bench_end_to_end(rt, files, batch: int, threads: int | None = None) -> dict:
    """Decode alone, compute alone, and scoring's own overlapped loop
    (:func:`pneumo_edge.commands.score.score_files`) over ``files``; and which of decode or compute
    bounds the pipeline."""
    from pneumo_edge.commands.score import score_files

    threads = threads or decode_threads()
    pixels, dec = bench_decode(files, rt.card.image_size, batch, threads)
    comp = bench_compute(rt, pixels)
    sink = _Discard()
    t0 = time.perf_counter()
    summary = score_files(files, rt, sink, batch=batch, workers=threads)
    e2e_s = time.perf_counter() - t0
    if sink.rows != len(files):
        raise PneumoError(f"end-to-end pass wrote {sink.rows} rows for {len(files)} files")
    e2e = len(files) / e2e_s
    bound = "decode" if dec["decode_images_per_s"] < comp["compute_images_per_s"] else "compute"
    ceiling = min(dec["decode_images_per_s"], comp["compute_images_per_s"] or float("inf"))
    return {
        "runtime": rt.name,
        "device": rt.device,
        "batch": int(batch),
        "threads": int(threads),
        "files": dec["files"],
        "errors": dec["errors"],
        "decode_images_per_s": round(dec["decode_images_per_s"], 3),
        "compute_images_per_s": round(comp["compute_images_per_s"], 3),
        "end_to_end_images_per_s": round(e2e, 3),
        "end_to_end_s": round(e2e_s, 4),
        "end_to_end_compute_s": round(summary.compute_s, 4),
        "end_to_end_wait_for_decode_s": round(summary.wait_s, 4),
        "bound": bound,
        "efficiency": round(e2e / ceiling, 3) if ceiling else None,
        "pipeline": "pneumo_edge.commands.score.score_files",
    }


# ----------------------------------------------------------------------------- driver


def parse_runtimes(spec: str) -> list[str]:
    """``auto``, ``all`` or a comma list of runtime names -> names to try (``auto`` kept)."""
    from pneumo_edge.runtimes import RUNTIMES

    spec = "auto" if spec is None else spec.strip().lower()
    if spec == "all":
        return list(RUNTIMES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in RUNTIMES and n != "auto"]
    if bad or not names:
        raise ValueError(f"unknown runtime {', '.join(bad) or spec!r}; use auto, all, or a "
                         f"comma list of {', '.join(RUNTIMES)}")
    return list(dict.fromkeys(names))


def parse_batches(spec) -> list[int]:
    if isinstance(spec, (list, tuple)):
        vals = list(spec)
    else:
        try:
            vals = [int(s) for s in str(spec).split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"batch sizes must be whole numbers like 1,8,32, not {spec!r}") from None
    if not vals or any(int(v) < 1 for v in vals):
        raise ValueError(f"batch sizes must be >= 1, got {spec!r}")
    return list(dict.fromkeys(int(v) for v in vals))


def open_for_bench(model, name: str, log=None):
    """(runtime, None) or (None, reason it cannot run here). A model directory that
    contradicts itself (modeldir.Refused) is an error, not a skipped runtime."""
    from pneumo_edge.model.modeldir import Refused
    from pneumo_edge.runtimes import model_dir, open_runtime, why_unavailable

    try:
        why = "" if name == "auto" else why_unavailable(name, None, model_dir(model))
        return (None, why) if why else (open_runtime(model, name, log=log), None)
    except Refused:
        raise
    except PneumoError as exc:
        return None, str(exc)


def run_bench(model, runtimes=DEFAULTS.runtime, batches=DEFAULTS.batch,
              warmup: int = DEFAULTS.warmup, iters: int = DEFAULTS.iters, *,
              data=None, threads: int | None = DEFAULTS.threads,
              max_time: float | None = DEFAULTS.max_time, data_batch: int | None = None,
              data_limit: int | None = DEFAULTS.limit, log=None) -> dict:
    """Benchmark ``model`` (a model directory, or one model file in it) on each runtime in
    ``runtimes`` (a spec string or list of names) and batch size. Returns ``{"machine",
    "model", "settings", "rows", "skipped", "pipeline"}``; ``pipeline`` (end-to-end rows) is
    filled only with ``data``."""
    from pneumo_edge.model import modeldir

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    names = parse_runtimes(runtimes) if isinstance(runtimes, str) else list(runtimes)
    batches = parse_batches(batches)
    target = modeldir.resolve(model, None)
    d, card = target.dir, target.card  # no card.json: filled from the first runtime opened
    files = list_files(data, data_limit) if data else None
    threads = threads or decode_threads()
    data_batch = data_batch or max(batches)
    result = {
        "machine": machine_info(),
        "model": _model_info(d, card),
        "settings": {"runtimes": names, "batches": batches, "warmup": warmup, "iters": iters,
                     "max_time_s": max_time, "data": str(data) if data else None,
                     "data_batch": data_batch if data else None,
                     "decode_threads": threads if data else None,
                     "timing": "perf_counter per call; outputs are host numpy arrays, so GPU "
                               "work is finished; images_per_s = batch / mean latency"},
        "rows": [],
        "skipped": [],
        "pipeline": [],
    }
    seen = set()
    for name in names:
        notes = []
        rt, why = open_for_bench(model, name, log=notes.append)
        if rt is None:
            result["skipped"].append({"runtime": name, "reason": why})
            log(f"skip {name}: {why}")
            continue
        if name == "auto":
            log(notes[0] if notes else f"runtime: {rt.name}")
            result["settings"]["auto_choice"] = notes[0] if notes else rt.name
        if rt.name in seen:
            continue
        seen.add(rt.name)
        if card is None:
            card = rt.card
            result["model"] = _model_info(d, card)
        stage = ""
        try:
            for b in batches:
                stage = f"batch {b}"
                log(f"{rt.name} on {rt.device}: batch {b}, {warmup} warm-up + {iters} timed "
                    "calls")
                row = bench_runtime(rt, b, warmup, iters, max_time=max_time)
                result["rows"].append(row)
                log(f"  p50 {row['p50_ms']:.2f} ms  {row['images_per_s']:.1f} img/s")
            if files:
                stage = "the end-to-end pass"
                log(f"{rt.name}: end-to-end over {len(files)} files, batch {data_batch}, "
                    f"{threads} decode threads")
                result["pipeline"].append(bench_end_to_end(rt, files, data_batch, threads))
        except Exception as exc:  # noqa: BLE001 -- e.g. out of memory at a large batch: go on
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            why = f"failed at {stage}: {type(exc).__name__}: {text}"
            result["skipped"].append({"runtime": rt.name, "reason": why})
            log(f"skip {rt.name}: {why}")
        del rt
    if not result["rows"]:
        reasons = "; ".join(f"{s['runtime']}: {s['reason']}" for s in result["skipped"])
        raise PneumoError(f"no runtime could run {d} here: {reasons}")
    return result


def _model_info(d, card) -> dict:
    if card is None:
        return {"dir": str(d), "arch": "?", "image_size": "?", "classes": []}
    return {"dir": str(d), "arch": card.arch, "image_size": card.image_size,
            "classes": card.classes}


# ----------------------------------------------------------------------------- output


def format_table(result: dict) -> str:
    """The human table: header lines, one row per runtime and batch, skipped runtimes, and the
    end-to-end rows."""
    m = result["machine"]
    model = result["model"]
    lines = [
        f"model: {model['dir']} ({model['arch']}, {model['image_size']} px)",
        f"cpu:   {cpu_summary(m)}",
        "gpu:   " + (", ".join(g.get("name", "?") for g in m["gpu"]) if m["gpu"] else "none"),
        "versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"date:  {m['date']}   load avg: {m['load_avg_1_5_15']}",
        (f"latency per batch after {result['settings']['warmup']} warm-up calls; "
         "img/s = batch / mean latency"),
    ]
    load = m.get("load_avg_1_5_15")
    if load and load[0] >= 0.5 * (m.get("cores_usable") or 1):
        lines.append(f"note: load average {load[0]} on {m.get('cores_usable')} cores when this "
                     "run started: if other work is still running, figures will be low")
    lines.append("")
    head = ("runtime", "device", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "img/s", "iters")
    rows = [(r["runtime"], r["device"], str(r["batch"]), f"{r['p50_ms']:.2f}",
             f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['mean_ms']:.2f}",
             f"{r['images_per_s']:.1f}", str(r["iters"])) for r in result["rows"]]
    lines += _columns(head, rows, right_from=2)
    for s in result["skipped"]:
        lines.append(f"skipped {s['runtime']}: {s['reason']}")
    if result["settings"].get("auto_choice"):
        lines.append(f"auto: {result['settings']['auto_choice']} (--runtime all measures or "
                     "lists every runtime)")
    if result["pipeline"]:
        p0 = result["pipeline"][0]
        lines += ["", (f"end to end over {result['settings']['data']} ({p0['files']} files, "
                       f"{p0['errors']} unreadable; batch {p0['batch']}, {p0['threads']} decode "
                       f"threads)")]
        head = ("runtime", "device", "decode img/s", "compute img/s", "end-to-end img/s", "bound")
        rows = [(p["runtime"], p["device"], f"{p['decode_images_per_s']:.1f}",
                 f"{p['compute_images_per_s']:.1f}", f"{p['end_to_end_images_per_s']:.1f}",
                 p["bound"]) for p in result["pipeline"]]
        lines += _columns(head, rows, right_from=2)
    return "\n".join(lines)


def _columns(head, rows, right_from: int) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i >= right_from else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [fmt(head)] + [fmt(r) for r in rows]


def markdown_table(result: dict) -> str:
    """The latency rows as a Markdown table (for benchmarks/RESULTS.md)."""
    out = ["| runtime | device | batch | p50 ms | p90 ms | p99 ms | mean ms | images/s | iters |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in result["rows"]:
        out.append(f"| {r['runtime']} | {r['device']} | {r['batch']} | {r['p50_ms']:.2f} | "
                   f"{r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['mean_ms']:.2f} | "
                   f"{r['images_per_s']:.1f} | {r['iters']} |")
    for s in result["skipped"]:
        out.append(f"| {s['runtime']} | skipped: {s['reason']} | | | | | | | |")
    return "\n".join(out)


def update_section(path, name: str, body: str, title: str = "# Benchmark results") -> None:
    """Replace the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in the
    Markdown file ``path`` with ``body`` (appending the section when it is not there yet), so
    each benchmark script can refresh its own figures without touching the others'."""
    from pneumo_edge.atomic import write_text_atomic

    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    p = Path(path)
    text = p.read_text(encoding="utf-8") if p.exists() else f"{title}\n"
    if begin in text and end in text and text.index(begin) < text.index(end):
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text_atomic(p, text)

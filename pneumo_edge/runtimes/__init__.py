"""One interface over every way to run a model: open a model directory with a runtime name,
call it on uint8 ``[N, 1, S, S]`` batches of any size, get float32 probabilities ``[N, C]``.

Names: ``torch``, ``torch-fp16``, ``onnx``, ``onnx-fp16``, ``onnx-int8``, ``trt`` (which file
each one runs: :data:`pneumo_edge.model.modeldir.FORMS`) and ``auto``. Each backend module imports its
heavy package lazily, so nothing here needs torch, onnxruntime or a GPU to import.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Protocol

import numpy as np

from pneumo_edge.errors import ModelError, RuntimeUnavailable
from pneumo_edge.model import modeldir
from pneumo_edge.model.card import Card

RUNTIMES = modeldir.RUNTIMES


class Runtime(Protocol):
    name: str  # e.g. "onnx"
    device: str  # e.g. "cpu", "cuda:0 (NVIDIA H100)"
    card: Card  # card.json's, checked against the card inside the file it runs
    path: Path  # the model file it runs
    sha256: str  # of that file, computed once when it was opened
    precision: str  # "fp32", "fp16" or "int8"

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def model_dir(path: str | os.PathLike) -> Path:
    """The model directory for a directory or a model file inside one."""
    return modeldir.resolve(path, None).dir


def open_runtime(model: str | os.PathLike, runtime: str = "auto", *, device: str | None = None,
                 log=None) -> Runtime:
    """Open ``model`` (a model directory, or one model file in it, which fixes the runtime)
    with ``runtime``; ``auto`` reports its choice."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if runtime != "auto" and runtime not in RUNTIMES:
        raise ModelError(f"unknown runtime {runtime!r}; choose auto or one of "
                         f"{', '.join(RUNTIMES)}")
    target = modeldir.resolve(model, runtime)
    if target.form is None:
        rt, why = _auto(target)
        log(f"runtime: {rt.name} on {rt.device} ({why})")
        return rt
    rt = _open(target, target.form.runtime, device)
    if runtime == "auto":
        log(f"runtime: {rt.name} on {rt.device} (the file named: {rt.path})")
    return rt


def _open(t: modeldir.Target, runtime: str, device: str | None) -> Runtime:
    path = modeldir.model_file(t.dir, modeldir.BY_RUNTIME[runtime])
    if runtime in ("torch", "torch-fp16"):
        from pneumo_edge.runtimes.torch_rt import TorchRuntime
        half = {"precision": "fp16"} if runtime == "torch-fp16" else {}
        return TorchRuntime(path, t.card, device=device, **half)
    if runtime == "trt":
        from pneumo_edge.runtimes.trt_rt import TensorRTRuntime
        return TensorRTRuntime(path, t.card)
    from pneumo_edge.runtimes.onnx_rt import OnnxRuntime
    return OnnxRuntime(path, t.card, name=runtime, device=device)


def gpu_present() -> bool:
    """An NVIDIA driver is loaded (cheap: imports nothing)."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


#: ``auto``'s order: fastest first (benchmarks/RESULTS.md). GPU forms are tried only with an
#: NVIDIA driver; a reduced-precision form (fp16, int8) only when parity.json records a pass for
#: that exact file. onnx-fp16 is not in the CPU list: onnxruntime runs fp16 slower than fp32
#: on CPUs.
AUTO_PLAN = (("trt", None), ("torch-fp16", "cuda"), ("onnx", "cuda"), ("torch", "cuda"),
             ("onnx-int8", "cpu"), ("onnx", "cpu"), ("torch", "cpu"))
#: what TensorRT, cuda-python, onnxruntime and torch raise when a model cannot start here
_CANNOT_START = (RuntimeUnavailable, ModelError, RuntimeError, TypeError)


def _auto(t: modeldir.Target) -> tuple[Runtime, str]:
    """The first runtime of AUTO_PLAN that can run here and is allowed to. A runtime that
    cannot run here, or a reduced-precision file without passing parity for this exact file, is
    skipped with its reason; a model directory that contradicts itself (modeldir.Refused) is an
    error, never skipped past."""
    tried: list[tuple[str, str]] = []
    gpu = gpu_present()
    for name, dev in AUTO_PLAN:
        label = f"{name}{'/' + dev if dev else ''}"
        why_not = _unavailable(t.dir, name, dev, gpu)
        if why_not:
            tried.append((label, why_not))
            continue
        try:
            rt = _open(t, name, dev)
        except modeldir.Refused:
            raise
        except _CANNOT_START as exc:
            tried.append((label, str(exc).splitlines()[0] if str(exc) else repr(exc)))
            continue
        form = modeldir.BY_RUNTIME[name]
        if form.precision == "fp32":
            return rt, "auto: fp32" + _skipped(tried)
        evidence = modeldir.parity_evidence(t.dir, form, rt.sha256)
        if evidence.passed:
            return rt, f"auto: {evidence.why}" + _skipped(tried)
        tried.append((label, evidence.why))
    raise RuntimeUnavailable(f"{t.dir}: no runtime can run this model here:"
                             + _skipped(tried).removeprefix("; skipped"))


def _skipped(tried: list[tuple[str, str]]) -> str:
    """``; skipped a: why; b, c: why`` with the runtimes that share a reason together."""
    if not tried:
        return ""
    by_reason: dict[str, list[str]] = {}
    for label, why in tried:
        by_reason.setdefault(why, []).append(label)
    return "; skipped " + "; ".join(f"{', '.join(labels)}: {why}"
                                     for why, labels in by_reason.items())


def _unavailable(d: Path, name: str, dev: str | None, gpu: bool) -> str:
    file = modeldir.BY_RUNTIME[name].file
    if not os.path.lexists(d / file):
        return f"no {file}"
    if (name == "trt" or dev == "cuda") and not gpu:
        return "no NVIDIA GPU"
    pkg = {"trt": "tensorrt", "onnx": "onnxruntime", "onnx-int8": "onnxruntime",
           "torch": "torch", "torch-fp16": "torch"}[name]
    if not has_package(pkg):
        return f"{pkg} not installed"
    return ""

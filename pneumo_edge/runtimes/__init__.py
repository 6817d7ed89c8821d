"""One interface over every way to run a model: open a model directory with a runtime name,
call it on uint8 ``[N, 1, S, S]`` batches of any size, get float32 probabilities ``[N, C]``.

Names: ``torch``, ``onnx``, ``onnx-fp16``, ``onnx-int8``, ``trt`` (which file each one runs:
:data:`pneumo_edge.modeldir.FORMS`) and ``auto``. Each backend module imports its heavy package
lazily, so nothing here needs torch, onnxruntime or a GPU to import.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Protocol

import numpy as np

from pneumo_edge import modeldir
from pneumo_edge.card import Card
from pneumo_edge.errors import ModelError, RuntimeUnavailable

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
    if runtime == "torch":
        from pneumo_edge.runtimes.torch_rt import TorchRuntime
        return TorchRuntime(path, t.card, device=device)
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


def _auto(t: modeldir.Target) -> tuple[Runtime, str]:
    """TensorRT, then onnxruntime CUDA, then torch CUDA, then onnxruntime CPU, then torch CPU.
    A runtime that cannot run here is skipped; a model directory that contradicts itself
    (modeldir.Refused) is an error, never skipped past."""
    tried = []
    gpu = gpu_present()
    plan = [("trt", None), ("onnx", "cuda"), ("torch", "cuda"), ("onnx", "cpu"), ("torch", "cpu")]
    for name, dev in plan:
        why_not = _unavailable(t.dir, name, dev, gpu)
        if why_not:
            tried.append(f"{name}{'/' + dev if dev else ''}: {why_not}")
            continue
        try:
            rt = _open(t, name, dev)
        except modeldir.Refused:
            raise
        except (RuntimeUnavailable, ModelError) as exc:
            tried.append(f"{name}{'/' + dev if dev else ''}: {exc}")
            continue
        return rt, "first available; skipped " + "; ".join(tried) if tried else "first choice"
    raise RuntimeUnavailable(f"{t.dir}: no runtime can run this model here: " + "; ".join(tried))


def _unavailable(d: Path, name: str, dev: str | None, gpu: bool) -> str:
    file = modeldir.BY_RUNTIME[name].file
    if not os.path.lexists(d / file):
        return f"no {file}"
    if (name == "trt" or dev == "cuda") and not gpu:
        return "no NVIDIA GPU"
    pkg = {"trt": "tensorrt", "onnx": "onnxruntime", "torch": "torch"}[name]
    if not has_package(pkg):
        return f"{pkg} not installed"
    return ""

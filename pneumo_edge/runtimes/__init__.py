"""One interface over every way to run a model: open a model directory with a runtime name,
call it on uint8 ``[N, 1, S, S]`` batches of any size, get float32 probabilities ``[N, C]``.

Names: ``torch`` (model.pt), ``onnx`` (model.onnx), ``onnx-fp16`` (model.fp16.onnx), ``trt``
(model.fp16.engine) and ``auto``. Each backend module imports its heavy package lazily, so
nothing here needs torch, onnxruntime or a GPU to import.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Protocol

import numpy as np

from pneumo_edge.card import Card
from pneumo_edge.errors import ModelError, RuntimeUnavailable

RUNTIMES = ("torch", "onnx", "onnx-fp16", "trt")
FILES = {"torch": "model.pt", "onnx": "model.onnx", "onnx-fp16": "model.fp16.onnx",
         "trt": "model.fp16.engine"}


class Runtime(Protocol):
    name: str  # e.g. "onnx"
    device: str  # e.g. "cpu", "cuda:0 (NVIDIA H100)"
    card: Card

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def model_dir(path: str | os.PathLike) -> Path:
    """The model directory for a directory or a file inside one."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not p.is_dir():
        raise ModelError(f"{path}: no such model directory")
    return p


def open_runtime(model: str | os.PathLike, runtime: str = "auto", *, device: str | None = None,
                 log=None) -> Runtime:
    """Open ``model`` (a model directory) with ``runtime``; ``auto`` reports its choice."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    d = model_dir(model)
    card = Card.load(d)
    if runtime == "auto":
        rt, why = _auto(d, card)
        log(f"runtime: {rt.name} on {rt.device} ({why})")
        return rt
    if runtime not in RUNTIMES:
        raise ModelError(f"unknown runtime {runtime!r}; choose auto or one of {', '.join(RUNTIMES)}")
    if not (d / FILES[runtime]).exists():
        hint = "run pneumo-edge export" + (" --trt" if runtime == "trt" else "") \
            if runtime != "torch" else "train a model"
        raise ModelError(f"{d / FILES[runtime]}: not found ({hint})")
    return _open(d, card, runtime, device)


def _open(d: Path, card: Card, runtime: str, device: str | None) -> Runtime:
    if runtime == "torch":
        from pneumo_edge.runtimes.torch_rt import TorchRuntime
        return TorchRuntime(d, card, device=device)
    if runtime in ("onnx", "onnx-fp16"):
        from pneumo_edge.runtimes.onnx_rt import OnnxRuntime
        return OnnxRuntime(d / FILES[runtime], card, name=runtime, device=device)
    from pneumo_edge.runtimes.trt_rt import TensorRTRuntime
    return TensorRTRuntime(d / FILES["trt"], card)


def gpu_present() -> bool:
    """An NVIDIA driver is loaded (cheap: imports nothing)."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _auto(d: Path, card: Card) -> tuple[Runtime, str]:
    """TensorRT, then onnxruntime CUDA, then torch CUDA, then onnxruntime CPU, then torch CPU."""
    tried = []
    gpu = gpu_present()
    plan = [("trt", None), ("onnx", "cuda"), ("torch", "cuda"), ("onnx", "cpu"), ("torch", "cpu")]
    for name, dev in plan:
        why_not = _unavailable(d, name, dev, gpu)
        if why_not:
            tried.append(f"{name}{'/' + dev if dev else ''}: {why_not}")
            continue
        try:
            rt = _open(d, card, name, dev)
        except (RuntimeUnavailable, ModelError) as exc:
            tried.append(f"{name}{'/' + dev if dev else ''}: {exc}")
            continue
        return rt, "first available; skipped " + "; ".join(tried) if tried else "first choice"
    raise RuntimeUnavailable(f"{d}: no runtime can run this model here: " + "; ".join(tried))


def _unavailable(d: Path, name: str, dev: str | None, gpu: bool) -> str:
    if not (d / FILES[name]).exists():
        return f"no {FILES[name]}"
    if (name == "trt" or dev == "cuda") and not gpu:
        return "no NVIDIA GPU"
    pkg = {"trt": "tensorrt", "onnx": "onnxruntime", "torch": "torch"}[name]
    if not has_package(pkg):
        return f"{pkg} not installed"
    return ""

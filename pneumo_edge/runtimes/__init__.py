"""One interface over every way to run a model, and the one place that knows how each form runs.

Open a model directory with a runtime name, call it on uint8 ``[N, 1, S, S]`` batches of any
size, get float32 probabilities ``[N, C]`` (``rt.outputs(batch)``: every output of the model file
by name, ``probs`` first). :data:`BACKENDS` is the table: which module and class run each form,
the packages it needs, whether it needs an NVIDIA GPU, its device policy and the install hint
(which file each form runs: :data:`pneumo_edge.model.modeldir.FORMS`). :func:`open_form` opens
one, :func:`why_unavailable` says cheaply why one cannot run here, :func:`parse_device` reads
``auto|cpu|cuda|cuda:N``; parity, bench, ``auto`` and the TensorRT exporter all go through them.
A new form is one row here, one in ``modeldir.FORMS`` and one module.

Each backend module imports its heavy package lazily, so nothing here needs torch, onnxruntime
or a GPU to import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from pneumo_edge.errors import ModelError, RuntimeUnavailable, UsageError
from pneumo_edge.model import modeldir
from pneumo_edge.model.card import Card

CPU_HINT = "pip install 'pneumo-edge[cpu]', or 'pneumo-edge[gpu]' on an NVIDIA box; never both"
TRAIN_HINT = "pip install 'pneumo-edge[train]'"
GPU_HINT = "on an NVIDIA machine: pip install 'pneumo-edge[gpu]'"

#: device policies: ``any``: auto, cpu, cuda or cuda:N; ``cuda``: a CUDA device only; ``engine``:
#: the GPU model the TensorRT engine was built on (cuda or cuda:N picks which card)
DEVICE_POLICIES = ("any", "cuda", "engine")


@dataclass(frozen=True)
class Backend:
    """How one form runs: ``module.cls(path, card, device=..., **options)``."""

    name: str  # the runtime name (modeldir.BY_RUNTIME[name] is its file and precision)
    module: str
    cls: str
    packages: tuple[tuple[str, str], ...]  # (pip distribution, import name) it needs
    gpu: bool  # needs an NVIDIA GPU
    devices: str  # one of DEVICE_POLICIES
    install: str  # how to get the packages
    options: dict = field(default_factory=dict)


_TORCH = (("torch", "torch"),)
_ORT = (("onnxruntime", "onnxruntime"),)
_TRT = (("tensorrt", "tensorrt"), ("cuda-python", "cuda.bindings"))
_T, _O = "pneumo_edge.runtimes.torch_rt", "pneumo_edge.runtimes.onnx_rt"

BACKENDS = (
    Backend("torch", _T, "TorchRuntime", _TORCH, False, "any", TRAIN_HINT),
    Backend("onnx", _O, "OnnxRuntime", _ORT, False, "any", CPU_HINT, {"name": "onnx"}),
    Backend("onnx-fp16", _O, "OnnxRuntime", _ORT, False, "any", CPU_HINT, {"name": "onnx-fp16"}),
    Backend("onnx-int8", _O, "OnnxRuntime", _ORT, False, "any", CPU_HINT, {"name": "onnx-int8"}),
    Backend("trt", "pneumo_edge.runtimes.trt_rt", "TensorRTRuntime", _TRT, True, "engine",
            GPU_HINT),
    Backend("torch-fp16", _T, "TorchRuntime", _TORCH, True, "cuda", TRAIN_HINT,
            {"precision": "fp16"}),
)
BY_NAME = {b.name: b for b in BACKENDS}
RUNTIMES = modeldir.RUNTIMES
assert set(BY_NAME) == set(RUNTIMES), "every form in modeldir.FORMS needs a row in BACKENDS"


class Runtime(Protocol):
    name: str  # e.g. "onnx"
    device: str  # e.g. "cpu", "cuda:0 (NVIDIA H100)"
    card: Card  # card.json's, checked against the card inside the file it runs
    path: Path  # the model file it runs
    sha256: str  # of that file, computed once when it was opened
    precision: str  # "fp32", "fp16" or "int8"
    verified: modeldir.Verified  # what modeldir.verify_file checked when it was opened

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...  # probabilities [N, C]

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...  # "probs" + any [N]


# ----------------------------------------------------------------------------- devices


def parse_device(device: str | None) -> tuple[str, int | None]:
    """``(kind, index)`` for a device string: ``("auto", None)`` for None/auto, ``("cpu",
    None)``, ``("cuda", None)`` (the current CUDA device) or ``("cuda", N)``. UsageError for
    anything else. The one parser of ``--device`` (runtimes and training)."""
    if device in (None, "auto"):
        return "auto", None
    if device == "cpu":
        return "cpu", None
    kind, colon, index = str(device).partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return "cuda", int(index) if index else None


def gpu_present() -> bool:
    """An NVIDIA driver is loaded (cheap: imports nothing)."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def has_package(name: str) -> bool:
    """``name`` (a module, dotted or not) can be imported here; imports nothing."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def backend(name: str) -> Backend:
    modeldir.form_for_runtime(name)  # the one "unknown runtime" error
    return BY_NAME[name]


def why_unavailable(name: str, device: str | None = None, d: str | os.PathLike | None = None
                    ) -> str:
    """Why runtime ``name`` cannot run on ``device`` here ('' when nothing says so yet):
    its file missing from model directory ``d`` (when given), a device its policy refuses, no
    NVIDIA GPU for a GPU device, or a package not installed. Cheap: imports nothing."""
    b = backend(name)
    if d is not None and not os.path.lexists(Path(d) / modeldir.BY_RUNTIME[name].file):
        return f"no {modeldir.BY_RUNTIME[name].file}"
    kind, _ = parse_device(device)
    if kind == "cpu" and b.devices != "any":
        return f"{name} runs on CUDA only" + (" (on the GPU model its engine was built for)"
                                              if b.devices == "engine" else "")
    if (b.gpu or kind == "cuda") and not gpu_present():
        return "no NVIDIA GPU"
    return missing_packages(name)


def missing_packages(name: str) -> str:
    """'' when runtime ``name``'s packages are installed, else which are not and how to get
    them. Imports nothing."""
    b = backend(name)
    missing = [pip for pip, module in b.packages if not has_package(module)]
    return f"{' and '.join(missing)} not installed ({b.install})" if missing else ""


def open_form(d: str | os.PathLike, name: str, *, device: str | None = None, card=None,
              **options) -> Runtime:
    """Runtime ``name`` on model directory ``d``'s file for it, on ``device``. ``card``:
    card.json's card when the caller has read it (None: the runtime reads it); ``options``:
    backend keywords (``threads`` for onnx, ``graphs`` for torch-fp16)."""
    b = backend(name)
    parse_device(device)  # a bad device string is a usage error before anything is opened
    path = modeldir.model_file(d, modeldir.BY_RUNTIME[name])
    try:
        cls = getattr(importlib.import_module(b.module), b.cls)
    except ImportError as exc:  # the backend module's own imports (never the heavy package)
        raise RuntimeUnavailable(f"cannot import {b.module}: {exc}") from None
    return cls(path, card, device=device, **b.options, **options)


# ----------------------------------------------------------------------------- opening


def model_dir(path: str | os.PathLike) -> Path:
    """The model directory for a directory or a model file inside one."""
    return modeldir.resolve(path, None).dir


def open_runtime(model: str | os.PathLike, runtime: str = "auto", *, device: str | None = None,
                 log=None) -> Runtime:
    """Open ``model`` (a model directory, or one model file in it, which fixes the runtime)
    with ``runtime``; ``auto`` reports its choice. A form named explicitly whose parity failed
    for this very file runs (it was asked for) with a warning on stderr."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if runtime != "auto":
        backend(runtime)
    target = modeldir.resolve(model, runtime)
    if target.form is None:
        rt, why = _auto(target)
        log(f"runtime: {rt.name} on {rt.device} ({why})")
        return rt
    rt = open_form(target.dir, target.form.runtime, device=device, card=target.card)
    evidence = modeldir.parity_evidence(target.dir, target.form, rt.verified)
    if evidence.failed:
        log(f"warning: {evidence.why}; running it because it was named explicitly")
    if runtime == "auto":
        log(f"runtime: {rt.name} on {rt.device} (the file named: {rt.path})")
    return rt


#: ``auto``'s order: fastest first (benchmarks/RESULTS.md). GPU forms are tried only with an
#: NVIDIA driver; a reduced-precision form (fp16, int8) only when parity.json verifies that exact
#: file (modeldir.parity_evidence); no form whose parity failed. onnx-fp16 is not in the CPU
#: list: onnxruntime runs fp16 slower than fp32 on CPUs.
AUTO_PLAN = (("trt", None), ("torch-fp16", "cuda"), ("onnx", "cuda"), ("torch", "cuda"),
             ("onnx-int8", "cpu"), ("onnx", "cpu"), ("torch", "cpu"))
#: what TensorRT, cuda-python, onnxruntime and torch raise when a model cannot start here
_CANNOT_START = (RuntimeUnavailable, ModelError, RuntimeError, TypeError)


def _auto(t: modeldir.Target) -> tuple[Runtime, str]:
    """The first runtime of AUTO_PLAN that can run here and is allowed to. A runtime that
    cannot run here, a form whose parity failed, or a reduced-precision file parity does not
    verify is skipped with its reason; a model directory that contradicts itself
    (modeldir.Refused) is an error, never skipped past."""
    tried: list[tuple[str, str]] = []
    for name, dev in AUTO_PLAN:
        label = f"{name}{'/' + dev if dev else ''}"
        why_not = why_unavailable(name, dev, t.dir)
        if why_not:
            tried.append((label, why_not))
            continue
        try:
            rt = open_form(t.dir, name, device=dev, card=t.card)
        except modeldir.Refused:
            raise
        except _CANNOT_START as exc:
            tried.append((label, str(exc).splitlines()[0] if str(exc) else repr(exc)))
            continue
        form = modeldir.BY_RUNTIME[name]
        evidence = modeldir.parity_evidence(t.dir, form, rt.verified)
        if evidence.passed:
            return rt, f"auto: {evidence.why}" + _skipped(tried)
        if form.precision == "fp32" and not evidence.failed:
            return rt, "auto: fp32" + _skipped(tried)
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

"""The onnxruntime runtimes: model.onnx (fp32), model.fp16.onnx and model.int8.onnx, on the CUDA
provider when it works here, else on CPU. Imports no torch."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from pneumo_edge.errors import ModelError, RuntimeUnavailable
from pneumo_edge.model import modeldir
from pneumo_edge.runtimes import CPU_HINT, parse_device

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: protobuf's limit for a single-file ONNX model
ONNX_CAP = 2 << 30


class OnnxRuntime:
    def __init__(self, path, card=None, name: str | None = None, device: str | None = None,
                 threads: int | None = None):
        """``path``: an exported ONNX file; ``card``: card.json's card (None: read it from the
        file's directory; without card.json the card in the file's metadata is used).
        ``device``: None/``auto`` (CUDA when onnxruntime has a working CUDA provider, else CPU
        with a warning on stderr), ``cpu``, ``cuda`` or ``cuda:N`` (CUDA or RuntimeUnavailable).

        Nothing reaches stdout (scoring may write its CSV there): onnxruntime's own provider
        fallback, which prints to stdout and then runs on CPU under the CUDA name, is off; this
        class falls back itself, before the first real batch, and says so on stderr. One
        warm-up inference proves the provider can run this model on this GPU."""
        path = Path(path)
        form = modeldir.BY_FILE.get(path.name, modeldir.BY_RUNTIME["onnx"])
        self.name, self.path, self.precision = name or form.runtime, path, form.precision
        data = modeldir.read_regular(path, ONNX_CAP)  # one read: what runs is what is hashed
        self.sha256 = hashlib.sha256(data).hexdigest()
        ort, avail = _import_ort()
        want = cuda_device(device, CUDA in avail)
        if want is not None:
            try:
                self._open(ort, path, data, threads, want, card)
                return
            except RuntimeUnavailable as exc:
                if device not in (None, "auto"):
                    raise
                print(f"warning: {path}: {exc}; running on cpu", file=sys.stderr)
        self._open(ort, path, data, threads, None, card)

    def _open(self, ort, path, data: bytes, threads, cuda_id: int | None, card) -> None:
        """Session on ``cuda:cuda_id`` (None: CPU), card checks, one warm-up inference."""
        self.session = _session(ort, path, data, threads, cuda_id)
        self.device = "cpu" if cuda_id is None else f"cuda:{cuda_id}"
        self.input_name = self.session.get_inputs()[0].name
        # the first output is the probabilities whatever the graph calls it; the rest by name
        self.output_names = ["probs"] + [o.name for o in self.session.get_outputs()[1:]]
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.verified = modeldir.verify_file(
            path, self.sha256, modeldir.onnx_card(path, self.metadata),
            self.metadata.get(modeldir.ONNX_WEIGHTS_KEY), card)
        self.card = self.verified.card
        check_io(path, self.session, self.card)
        s = self.card.image_size
        try:  # a provider that registers but cannot run (e.g. no kernels for this GPU)
            self(np.zeros((1, 1, s, s), np.uint8))
        except RuntimeUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own types
            raise ModelError(f"{path}: onnxruntime cannot run it: {_first_line(exc)}") from None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, C]``."""
        return self.outputs(batch)["probs"]

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the model file: ``probs`` ``[N, C]`` first, then any further output
        (e.g. ``ood``) under its graph name, ``[N]``."""
        x = np.ascontiguousarray(batch, dtype=np.uint8)
        try:
            outs = self.session.run(None, {self.input_name: x})
        except Exception as exc:  # onnxruntime raises its own exception types
            if self.device == "cpu":
                raise
            raise RuntimeUnavailable(f"onnxruntime's CUDA provider failed on {self.device}: "
                                     f"{_first_line(exc)}") from None
        return {name: out.astype(np.float32, copy=False)
                for name, out in zip(self.output_names, outs)}


def cuda_device(device: str | None, has_cuda: bool) -> int | None:
    """The CUDA device id ``device`` asks for (None: CPU). ``auto``/None: device 0 when the
    CUDA provider is there."""
    kind, index = parse_device(device)
    if kind == "auto":
        return 0 if has_cuda else None
    if kind == "cpu":
        return None
    if not has_cuda:
        raise RuntimeUnavailable("onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    return index or 0


def _import_ort():
    """(onnxruntime, its available providers)."""
    # onnxruntime writes a device id and a telemetry database under ~/.cache unless this is set
    # before its first import (the CLI sets it too, for every command; this covers library use)
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeUnavailable(f"onnxruntime is not installed ({CPU_HINT})") from None
    return ort, ort.get_available_providers()


def _session(ort, path, data: bytes, threads: int | None, cuda_id: int | None):
    """An InferenceSession on CPU (``cuda_id`` None) or on exactly that CUDA device: CUDA
    missing from its providers after creation is RuntimeUnavailable, never a quiet CPU run."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    if cuda_id is None:  # idle intra-op threads sleep instead of spinning: spinning burns the
        # cores that decode threads and the DICOM node's threads need; measured alternated on
        # 2 shared cores it cost score nothing and saved CPU under load (benchmarks/NODE.md)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    providers = [CPU] if cuda_id is None else [(CUDA, {"device_id": cuda_id}), CPU]
    try:
        with contextlib.redirect_stdout(sys.stderr):  # any print of the library: not stdout
            session = ort.InferenceSession(data, so, providers=providers, enable_fallback=0)
        session.disable_fallback()  # run(): an EP failure raises instead of printing + CPU
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own types
        if cuda_id is not None:
            raise RuntimeUnavailable(f"onnxruntime's CUDA provider cannot open it on "
                                     f"cuda:{cuda_id}: {_first_line(exc)}") from None
        raise ModelError(f"{path}: onnxruntime cannot load it: {_first_line(exc)}") from None
    if cuda_id is not None and CUDA not in session.get_providers():
        raise RuntimeUnavailable(f"onnxruntime's CUDA provider failed to start on cuda:{cuda_id} "
                                 f"(CUDA or cuDNN libraries missing?)")
    return session


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def check_io(path, session, card) -> None:
    """One uint8 input ``[N, 1, S, S]`` of the card's size, the output ``[N, C]`` first, and
    any further outputs (e.g. ``ood``) one value per image, ``[N]``."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or not outputs:
        raise ModelError(f"{path}: expected one input and at least one output, has "
                         f"{len(inputs)} and {len(outputs)}")
    shape, s = list(inputs[0].shape), card.image_size
    hint = modeldir.fix_hint(Path(path).parent, modeldir.BY_RUNTIME["onnx"])
    if inputs[0].type != "tensor(uint8)" or len(shape) != 4 or shape[1:] != [1, s, s]:
        raise modeldir.Refused(f"{path}: input is {inputs[0].type} {shape}, the card needs "
                               f"uint8 [N, 1, {s}, {s}] ({hint})")
    out = list(outputs[0].shape)
    if len(out) != 2 or out[1] != len(card.classes):
        raise modeldir.Refused(f"{path}: output is {out}, the card has {len(card.classes)} "
                               f"classes ({hint})")
    for extra in outputs[1:]:
        if len(extra.shape) != 1 or extra.name == "probs":
            raise modeldir.Refused(f"{path}: output {extra.name} is {list(extra.shape)}, "
                                   f"expected one value per image [N] ({hint})")

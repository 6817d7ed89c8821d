"""The onnxruntime runtimes: model.onnx (fp32) and model.fp16.onnx, CUDA provider when
available. Imports no torch."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from pneumo_edge import modeldir
from pneumo_edge.errors import ModelError, RuntimeUnavailable

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: protobuf's limit for a single-file ONNX model
ONNX_CAP = 2 << 30


class OnnxRuntime:
    def __init__(self, path, card=None, name: str | None = None, device: str | None = None,
                 threads: int | None = None):
        """``path``: an exported ONNX file; ``card``: card.json's card (None: read it from the
        file's directory; without card.json the card in the file's metadata is used)."""
        path = Path(path)
        form = modeldir.BY_FILE.get(path.name, modeldir.BY_RUNTIME["onnx"])
        self.name, self.path, self.precision = name or form.runtime, path, form.precision
        data = modeldir.read_regular(path, ONNX_CAP)  # one read: what runs is what is hashed
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.session, want_cuda = _session(path, data, device, threads)
        del data
        got = self.session.get_providers()
        if want_cuda and CUDA not in got:
            # onnxruntime silently falls back to CPU when CUDA/cuDNN libraries are missing
            if device == "cuda":
                raise RuntimeUnavailable("onnxruntime's CUDA provider failed to start (CUDA or "
                                         "cuDNN libraries missing?) and fell back to CPU")
            print(f"warning: onnxruntime could not start CUDA for {path}; running on CPU",
                  file=sys.stderr)
        self.device = "cuda" if CUDA in got else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.card = checked_card(path, self.session, self.metadata, card)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.uint8)
        return self.session.run(None, {self.input_name: x})[0].astype(np.float32, copy=False)


def _session(path, data: bytes, device: str | None, threads: int | None):
    """(onnxruntime.InferenceSession, whether CUDA was asked for)."""
    # onnxruntime writes a device id and a telemetry database under ~/.cache unless this is set
    # before its first import (the CLI sets it too, for every command; this covers library use)
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeUnavailable(
            "onnxruntime is not installed (pip install 'pneumo-edge[cpu]', or "
            "'pneumo-edge[gpu]' on an NVIDIA box; never both)") from None
    avail = ort.get_available_providers()
    want_cuda = device == "cuda" or (device in (None, "auto") and CUDA in avail)
    if device == "cuda" and CUDA not in avail:
        raise RuntimeUnavailable("onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    providers = [CUDA, CPU] if want_cuda else [CPU]
    try:
        return ort.InferenceSession(data, so, providers=providers), want_cuda
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"{path}: onnxruntime cannot load it: "
                         f"{str(exc).splitlines()[0][:200]}") from None


def checked_card(path, session, metadata: dict, card):
    """The card to run ``path`` with, after checking that card.json (``card``, or read from
    the directory) agrees with the card in the file's metadata, that the file came from the
    model.pt beside it (when there is one), and that its input fits the card."""
    embedded = modeldir.onnx_card(path, metadata)
    if card is None:
        card = modeldir.directory_card(path)
    card = modeldir.agreed_card(path, embedded, card)
    modeldir.check_weights(path, metadata.get(modeldir.ONNX_WEIGHTS_KEY))
    check_io(path, session, card)
    return card


def check_io(path, session, card) -> None:
    """One uint8 input ``[N, 1, S, S]`` of the card's size and one output ``[N, C]``."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"{path}: expected one input and one output, has {len(inputs)} and "
                         f"{len(outputs)}")
    shape, s = list(inputs[0].shape), card.image_size
    hint = modeldir.fix_hint(Path(path).parent, modeldir.BY_RUNTIME["onnx"])
    if inputs[0].type != "tensor(uint8)" or len(shape) != 4 or shape[1:] != [1, s, s]:
        raise modeldir.Refused(f"{path}: input is {inputs[0].type} {shape}, the card needs "
                               f"uint8 [N, 1, {s}, {s}] ({hint})")
    out = list(outputs[0].shape)
    if len(out) != 2 or out[1] != len(card.classes):
        raise modeldir.Refused(f"{path}: output is {out}, the card has {len(card.classes)} "
                               f"classes ({hint})")

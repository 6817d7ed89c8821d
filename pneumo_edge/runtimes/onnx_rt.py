"""The onnxruntime runtimes: model.onnx (fp32) and model.fp16.onnx, CUDA provider when
available. Imports no torch."""

from __future__ import annotations

import os
import sys

import numpy as np

from pneumo_edge.errors import ModelError, RuntimeUnavailable

CUDA = "CUDAExecutionProvider"
CARD_KEY = "pneumo_edge.card"  # metadata_props key written by pneumo_edge.export.onnx
CPU = "CPUExecutionProvider"


class OnnxRuntime:
    def __init__(self, path, card, name: str = "onnx", device: str | None = None,
                 threads: int | None = None):
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
            self.session = ort.InferenceSession(os.fspath(path), so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{path}: onnxruntime cannot load it: "
                             f"{str(exc).splitlines()[0][:200]}") from None
        got = self.session.get_providers()
        if want_cuda and CUDA not in got:
            # onnxruntime silently falls back to CPU when CUDA/cuDNN libraries are missing
            if device == "cuda":
                raise RuntimeUnavailable("onnxruntime's CUDA provider failed to start (CUDA or "
                                         "cuDNN libraries missing?) and fell back to CPU")
            print(f"warning: onnxruntime could not start CUDA for {path}; running on CPU",
                  file=sys.stderr)
        self.name = name
        self.card = card
        self.path, self.sha256, self.precision = identity(path, name)
        self.device = "cuda" if CUDA in got else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        check_matches_card(path, self.session, self.metadata, card)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.uint8)
        return self.session.run(None, {self.input_name: x})[0].astype(np.float32, copy=False)


def identity(path, runtime: str):
    """(path, sha256, precision) of the file a runtime runs."""
    from pathlib import Path

    from pneumo_edge.modeldir import BY_FILE, BY_RUNTIME, sha256_file

    path = Path(path)
    form = BY_FILE.get(path.name) or BY_RUNTIME[runtime]
    return path, sha256_file(path), form.precision


def check_matches_card(path, session, metadata: dict, card) -> None:
    """Refuse an ONNX file that does not fit the model directory's card: one uint8 input
    ``[N, 1, S, S]`` of the card's size, and (when it carries a card) the same classes."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"{path}: expected one input and one output, has {len(inputs)} and "
                         f"{len(outputs)}")
    shape, s = list(inputs[0].shape), card.image_size
    if inputs[0].type != "tensor(uint8)" or len(shape) != 4 or shape[1:] != [1, s, s]:
        raise ModelError(f"{path}: input is {inputs[0].type} {shape}, the card needs uint8 "
                         f"[N, 1, {s}, {s}]; re-export with pneumo-edge export")
    if CARD_KEY in metadata:
        from pneumo_edge.card import Card

        exported = Card.from_json(metadata[CARD_KEY])
        if (exported.classes, exported.image_size) != (card.classes, card.image_size):
            raise ModelError(f"{path}: exported for classes {exported.classes} at "
                             f"{exported.image_size} px, but card.json says {card.classes} at "
                             f"{card.image_size} px; re-export with pneumo-edge export")

"""The onnxruntime runtimes: model.onnx (fp32) and model.fp16.onnx, CUDA provider when
available. Imports no torch."""

from __future__ import annotations

import os
import sys

import numpy as np

from pneumo_edge.errors import ModelError, RuntimeUnavailable

CUDA = "CUDAExecutionProvider"
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
        self.device = "cuda" if CUDA in got else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = self.session.get_modelmeta().custom_metadata_map

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.uint8)
        return self.session.run(None, {self.input_name: x})[0].astype(np.float32, copy=False)

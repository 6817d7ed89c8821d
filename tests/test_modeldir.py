"""The model-directory module: file names, card copies, consistency, atomic writes."""

from __future__ import annotations

import hashlib

import pytest

from pneumo_edge.runtimes import open_runtime


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name,file,precision", [("torch", "model.pt", "fp32"),
                                                 ("onnx", "model.onnx", "fp32"),
                                                 ("onnx-fp16", "model.fp16.onnx", "fp16")])
def test_runtime_says_which_file_it_runs(tiny_exported, name, file, precision):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    rt = open_runtime(tiny_exported, name, device="cpu")
    assert rt.path == tiny_exported / file
    assert rt.sha256 == _sha(tiny_exported / file)
    assert rt.precision == precision

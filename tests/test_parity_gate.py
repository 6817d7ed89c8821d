"""Parity of the gate's output (issue 20) when it fails: the export says which form flags other
images than torch, prints its table and a tolerance that would pass, instead of a traceback."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="parity needs onnx")
pytest.importorskip("onnxruntime", reason="parity runs the ONNX files")
pytest.importorskip("torch", reason="calibrating the tiny model needs torch")


@pytest.fixture(scope="module")
def gated_export(tiny_run, tiny_dataset, session_tmp):
    """The tiny model with a Mahalanobis gate, exported to ONNX fp32, fp16, INT8 (read-only)."""
    from conftest import copy_model_dir
    from pneumo_edge.export.main import run_export
    from pneumo_edge.train.recalibrate import CalibrateOptions, run_calibrate

    run = copy_model_dir(tiny_run, session_tmp("gated") / "run")
    opts = CalibrateOptions(gate="mahalanobis", device="cpu")
    assert run_calibrate(run, tiny_dataset, opts, log=lambda m: None) == 0
    assert run_export(run, skip_parity=True) == 0
    return run


def _scale_whitening(path, factor: float) -> None:
    """Multiply the gate's whitening matrix in the ONNX file: only the ood output changes."""
    proto = onnx.load(str(path))
    hits = [i for i in proto.graph.initializer if "ood_whiten" in i.name]
    assert len(hits) == 1, [i.name for i in proto.graph.initializer]
    w = onnx.numpy_helper.to_array(hits[0]) * np.float32(factor)
    hits[0].CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), hits[0].name))
    onnx.save(proto, str(path))


def test_a_form_whose_gate_flags_other_images_fails_with_its_reason(gated_export, copy_run,
                                                                    capsys):
    from pneumo_edge.export.main import check_parity
    from pneumo_edge.export.parity import default_tolerances, parity_images

    from pneumo_edge.model.modeldir import read_card

    run = copy_run(gated_export)
    card = read_card(run)
    images = parity_images(card, None)
    _scale_whitening(run / "model.onnx", 3.0)  # distances x9: most images flagged
    skip = {"onnx-int8": "not this test's subject"}
    assert check_parity(run, card, images, skip=skip) == 1
    out, err = capsys.readouterr()
    entry = json.loads((run / "parity.json").read_text())["forms"]["onnx"]
    assert entry["status"] == "fail" and entry["failed"] == ["ood_agreement"]
    agree = entry["ood"]["flag_agreement"]
    assert agree < 1.0 and entry["agreement"] == 1.0  # labels unchanged, flags not
    assert "parity FAILED" in out and f"qc flags agree {100 * agree:.2f}% < 100.00%" in out
    # the printed tolerance is enough to pass
    opts = dict(re.findall(r"(--[a-z0-9-]+) ([0-9.e+-]+)", err.split("passed:")[1]))
    assert float(opts["--min-agreement-fp32"]) <= agree
    assert all(k.startswith("--min-agreement-") for k in opts)  # fp16 may miss a flag or two
    tol = default_tolerances()
    for k, v in opts.items():
        tol[k.rsplit("-", 1)[1]].min_agreement = float(v)
    assert check_parity(run, card, images, tol, skip=skip) == 0


def test_int8_keeps_the_calibration_and_the_gate_float(gated_export):
    """The calibration map and the gate's distance run after the classifier: quantized, they
    round the calibrated logits before the softmax, and the whitened features, to 8 bits."""
    from pneumo_edge.model import modeldir

    proto = onnx.load(str(gated_export / modeldir.ONNX_INT8))
    nodes = list(proto.graph.node)
    producers = {o: n.op_type for n in nodes for o in n.output}
    last_conv = max(i for i, n in enumerate(nodes) if n.op_type == "Conv")
    tail = nodes[last_conv + 1:]
    assert {"MatMul", "ReduceSum", "Softmax"} <= {n.op_type for n in tail}
    requantized = {n.input[0] for n in nodes if n.op_type == "QuantizeLinear"}
    for n in tail:
        assert not set(n.output) & requantized, (n.op_type, n.name)
    softmax = next(n for n in tail if n.op_type == "Softmax")
    assert producers[softmax.input[0]] != "DequantizeLinear"

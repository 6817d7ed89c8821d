"""INT8: export writes a calibrated model.int8.onnx with a parity row, and ``auto`` runs it only
when parity.json says it passed for that exact file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="export needs onnx")
pytest.importorskip("onnxruntime", reason="INT8 runs in onnxruntime")

from pneumo_edge.export.main import _check_calib_apart, run_export
from pneumo_edge.export.parity import Tolerance, compare, default_tolerances
from pneumo_edge.export.quantize import QuantOptions, float_nodes, pick_balanced, training_samples

from pneumo_edge.errors import DataError, PneumoError
from pneumo_edge.model import modeldir
from pneumo_edge.model.card import Card
from pneumo_edge.model.modeldir import read_card
from pneumo_edge.runtimes import gpu_present, open_runtime

cpu_only = pytest.mark.skipif(gpu_present(), reason="auto prefers GPU forms on a GPU machine")


def _auto(run):
    said = []
    rt = open_runtime(run, "auto", log=said.append)
    return rt, said[0]


def test_export_writes_a_quantized_int8_file_with_the_io_contract(tiny_exported):
    path = tiny_exported / modeldir.ONNX_INT8
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    # the start (cast + normalisation) and the tail after the last Conv stay float: the start
    # reads no dequantized tensor, no tail node's output is quantized again, and the softmax
    # reads the float logits of the Gemm
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    kept = float_nodes(onnx.load(str(tiny_exported / modeldir.ONNX_FP32)))
    by_name = {n.name: n for n in proto.graph.node}
    assert len(kept) >= 8 and all(name in by_name for name in kept)
    order = {n.name: i for i, n in enumerate(proto.graph.node)}
    first_conv = ops.index("Conv")
    start = [name for name in kept if order[name] < first_conv]
    requantized = {n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    assert start and len(start) < len(kept)
    for name in set(kept) - set(start):
        assert not set(by_name[name].output) & requantized, name
    for name in start:
        assert all(producers.get(i) != "DequantizeLinear" for i in by_name[name].input), name
    softmax = next(n for n in proto.graph.node if n.op_type == "Softmax")
    assert producers[softmax.input[0]] == "Gemm"
    assert (by_name[kept[0]].op_type, list(by_name[kept[0]].input)) == ("Cast", ["image"])
    # weights are int8, one scale per output channel
    inits = {i.name: i for i in proto.graph.initializer}
    int8_weights = [i for i in inits.values() if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 20
    meta = {p.key: p.value for p in proto.metadata_props}
    assert Card.from_dict(json.loads(meta[modeldir.ONNX_CARD_KEY])) == read_card(tiny_exported)
    rt = open_runtime(path, "auto", log=lambda m: None)
    s = rt.card.image_size
    probs = rt(np.zeros((3, 1, s, s), np.uint8))
    assert rt.name == "onnx-int8" and rt.precision == "int8"
    assert probs.shape == (3, 2) and probs.dtype == np.float32
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def _eager_order(proto):
    """The same graph with every node that no Conv needs placed as early as its inputs allow
    (a valid order, as onnxruntime's pre-processing may write): the gate's first-stage branch
    then sits among the convolutions."""
    nodes = list(proto.graph.node)
    kinds = [n.op_type for n in nodes]
    tail = {n.name for n in nodes[len(kinds) - kinds[::-1].index("Conv"):]}
    ready = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer} | {""}
    out = []
    while nodes:
        can = [n for n in nodes if all(i in ready for i in n.input)]
        pick = next((n for n in can if n.name in tail), can[0])
        out.append(pick)
        nodes.remove(pick)
        ready.update(pick.output)
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    del copy.graph.node[:]
    copy.graph.node.extend(out)
    return copy


def test_the_gate_stays_float_in_any_node_order(tiny_run, tiny_dataset, tmp_path):
    """Every node no Conv depends on stays float, wherever the file's order puts it: the
    first stage's distance branches off mid-network, and in the pre-processed graph it came
    before the last Conv (quantized, it flagged 8 of 782 validation images unlike torch on
    the default ResNet50)."""
    from conftest import copy_model_dir
    from pneumo_edge.export.onnx import export_onnx
    from pneumo_edge.train.recalibrate import CalibrateOptions, run_calibrate

    from pneumo_edge.model.torchload import load_checked

    run = copy_model_dir(tiny_run, tmp_path / "run")
    opts = CalibrateOptions(device="cpu", gate="mahalanobis+layer1+orientation")
    assert run_calibrate(run, tiny_dataset, opts, log=lambda m: None) == 0
    model, card, ckpt = load_checked(run)
    path = export_onnx(model, card, tmp_path / "m.onnx", weights_sha256=ckpt.sha256)
    proto = onnx.load(str(path))
    kept = set(float_nodes(proto))
    eager = _eager_order(proto)
    kinds = [n.op_type for n in eager.graph.node]
    last_conv = len(kinds) - 1 - kinds[::-1].index("Conv")
    early = [i for i, n in enumerate(eager.graph.node)
             if n.op_type == "MatMul" and i < last_conv]
    assert early  # the reordering moved a whitening product among the convolutions
    assert set(float_nodes(eager)) == kept
    assert {n.name for n in proto.graph.node if n.op_type == "MatMul"} <= kept


def test_parity_has_the_int8_row_with_calibration_apart_from_validation(tiny_exported):
    report = json.loads((tiny_exported / modeldir.PARITY_JSON).read_text())
    e = report["forms"]["onnx-int8"]
    assert e["status"] == "pass" and e["precision"] == "int8"
    assert e["sha256"] == modeldir.sha256_file(tiny_exported / modeldir.ONNX_INT8)
    assert e["tolerance"] == {"max_abs": None, "min_agreement": 0.99, "max_metric_delta": 0.01,
                              "max_auc_delta": 0.005}
    assert set(e["metric_deltas"]) == {"accuracy", "precision", "recall", "specificity", "f1"}
    cal = e["calibration"]
    assert min(cal["per_class"].values()) > 0 and cal["count"] == sum(cal["per_class"].values())
    card = read_card(tiny_exported)
    assert cal["count"] == card.split["train"]  # the tiny split has fewer than 128 images
    assert cal["method"] == "minmax"


def test_calibration_never_uses_validation_or_test_images(tiny_exported):
    card = read_card(tiny_exported)
    samples, _ = training_samples(card)
    root = card.split["data"]
    used = {os.path.relpath(p, root) for p, _ in samples}
    assert used and not used & set(card.split["val_files"])
    assert not used & set(card.split.get("test_files") or [])
    assert len(used) == card.split["train"]


def test_calibration_sample_is_class_balanced_and_seeded():
    samples = [(f"n{i}", 0) for i in range(300)] + [(f"p{i}", 1) for i in range(12)]
    picked = pick_balanced(samples, 40, 2, seed=7)
    labels = [y for _, y in picked]
    assert len(picked) == 40 and labels.count(1) == 12  # every positive, the rest negatives
    assert picked == pick_balanced(samples, 40, 2, seed=7)
    assert picked != pick_balanced(samples, 40, 2, seed=8)
    assert sorted(pick_balanced(samples, 20, 2, seed=1), key=lambda s: s[1])[-10][1] == 1
    with pytest.raises(DataError, match="every class"):
        pick_balanced([(f"n{i}", 0) for i in range(9)], 4, 2, seed=0)


def test_missing_training_images_name_the_way_out(tmp_path):
    card = Card(classes=["NORMAL", "PNEUMONIA"], image_size=64, positive_class="PNEUMONIA",
                threshold=0.5, arch="resnet18",
                split={"data": str(tmp_path / "gone"), "val_files": []})
    with pytest.raises(DataError, match="--calib-data"):
        training_samples(card)
    with pytest.raises(PneumoError, match="same folder"):
        _check_calib_apart(QuantOptions(calib_data=str(tmp_path)), tmp_path)


@cpu_only
def test_auto_picks_int8_only_for_the_exact_file_that_passed(copy_run, tiny_verified):
    run = copy_run(tiny_verified)
    rt, said = _auto(run)
    assert (rt.name, rt.device) == ("onnx-int8", "cpu")
    assert "parity passed on 200 images: agreement 100.0 %, max metric delta 0.00 points" in said
    # a changed file (still a valid model) is not eligible: auto falls back to fp32 and says why
    proto = onnx.load(str(run / modeldir.ONNX_INT8))
    proto.doc_string += " edited"
    (run / modeldir.ONNX_INT8).write_bytes(proto.SerializeToString())
    rt, said = _auto(run)
    assert rt.name == "onnx" and "model.int8.onnx changed since parity" in said
    # --runtime onnx-int8 names it explicitly: it runs
    assert open_runtime(run, "onnx-int8", log=lambda m: None).name == "onnx-int8"


@cpu_only
@pytest.mark.parametrize("edit", ["fail", "missing entry", "no parity.json", "not json"])
def test_auto_needs_a_passing_parity_entry(copy_run, tiny_verified, edit):
    run = copy_run(tiny_verified)
    path = run / modeldir.PARITY_JSON
    report = json.loads(path.read_text())
    if edit == "fail":
        report["forms"]["onnx-int8"]["status"] = "fail"
    elif edit == "missing entry":
        del report["forms"]["onnx-int8"]
    path.write_text(json.dumps(report))
    if edit == "no parity.json":
        path.unlink()
    elif edit == "not json":
        path.write_text("{")
    rt, said = _auto(run)
    assert rt.name == "onnx" and rt.precision == "fp32"
    assert "onnx-int8/cpu:" in said


@cpu_only
def test_runtime_onnx_forces_fp32(copy_run, tiny_exported):
    rt = open_runtime(copy_run(tiny_exported), "onnx", log=lambda m: None)
    assert rt.name == "onnx" and rt.precision == "fp32"


def test_the_int8_gate_fails_when_labels_flip_near_the_threshold():
    """Probabilities clustered at the threshold: INT8-sized errors (0.02) flip labels, so the
    gate fails on agreement and names what would pass; far from the threshold it passes."""
    rng = np.random.default_rng(0)
    card = Card(classes=["NORMAL", "PNEUMONIA"], image_size=64, positive_class="PNEUMONIA",
                threshold=0.5, arch="resnet18")
    truth = rng.integers(0, 2, 400)
    for centre, verdict in ((0.5, "fail"), (None, "pass")):
        p = np.where(truth == 1, 0.9, 0.1) if centre is None else \
            np.clip(centre + rng.normal(0, 0.02, 400) + 0.01 * (2 * truth - 1), 0, 1)
        ref = np.stack([1 - p, p], 1).astype(np.float32)
        q = np.clip(p + rng.normal(0, 0.02, 400), 0, 1)
        got = np.stack([1 - q, q], 1).astype(np.float32)
        r = compare(ref, got, truth, card, default_tolerances()["int8"])
        assert r["status"] == verdict, r
        if verdict == "fail":
            assert "min_agreement" in r["failed"] and r["agreement"] < 0.99
            assert compare(ref, got, truth, card,
                           Tolerance(**r["smallest_passing"]))["status"] == "pass"


@cpu_only
def test_int8_failure_exits_1_unless_allowed_and_auto_skips_it(copy_run, tiny_run, capsys):
    strict = {"int8": Tolerance(1e-9, 0.99, 0.01, 0.005)}  # no INT8 model is within 1e-9
    run = copy_run(tiny_run)
    assert run_export(run, tolerances=strict) == 1
    assert "--tol-int8" in capsys.readouterr().err
    assert run_export(run, tolerances=strict, allow_int8_fail=True) == 0
    err = capsys.readouterr().err
    assert "warning: parity failed for onnx-int8" in err and "error:" not in err
    report = json.loads((run / modeldir.PARITY_JSON).read_text())
    assert report["forms"]["onnx-int8"]["status"] == "fail" and report["int8_failure_allowed"]
    assert (run / modeldir.ONNX_INT8).exists()
    rt, said = _auto(run)
    assert rt.name == "onnx" and "parity fail for model.int8.onnx" in said


def test_no_int8_skips_it_and_its_parity(copy_run, tiny_run):
    run = copy_run(tiny_run)
    assert run_export(run, int8=False) == 0
    assert not (run / modeldir.ONNX_INT8).exists()
    e = json.loads((run / modeldir.PARITY_JSON).read_text())["forms"]["onnx-int8"]
    assert e["status"] == "skipped" and "--no-int8" in e["reason"]


def test_int8_export_is_deterministic(tiny_exported, tmp_path):
    """Same model, same card seed: the same calibration images and, byte for byte, the INT8
    file export wrote."""
    from pneumo_edge.export.quantize import calibration_pixels, quantize_int8

    card = read_card(tiny_exported)
    weights = modeldir.sha256_file(tiny_exported / modeldir.MODEL_PT)
    pixels, _ = calibration_pixels(card, QuantOptions())
    again = quantize_int8(tiny_exported / modeldir.ONNX_FP32, tmp_path / "again.onnx", card,
                          pixels, weights_sha256=weights, opts=QuantOptions())
    assert again.read_bytes() == (tiny_exported / modeldir.ONNX_INT8).read_bytes()


def _first_activation_scale(path) -> float:
    """The scale of the first QuantizeLinear in the graph: the normalised image entering the
    first Conv (weights are stored quantized, without a QuantizeLinear)."""
    from onnx import numpy_helper

    proto = onnx.load(path)
    inits = {i.name: i for i in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    return float(numpy_helper.to_array(inits[node.input[1]]))


def test_one_extreme_calibration_image_does_not_widen_the_int8_ranges(tiny_exported, tmp_path):
    """Plain MinMax lets one outlier image set a range for every other: the quantization step
    grows with it and the ordinary images lose precision (the default ResNet50 of 2026-12-01:
    one training film drove the last block's activations 8x past the other 127, and its INT8
    file flagged 99.6 % of the validation X-rays out of distribution). Ranges are now taken
    per image with the most extreme left out."""
    from pneumo_edge.export.quantize import calibration_pixels, quantize_int8

    card = read_card(tiny_exported)
    weights = modeldir.sha256_file(tiny_exported / modeldir.MODEL_PT)
    pixels, record = calibration_pixels(card, QuantOptions())
    assert "left out" in record["ranges"]
    # one bright pixel on black: after per-image normalisation its value is ~the image's side
    # (64 standard deviations) where ordinary X-rays stay within a few
    spike = np.zeros_like(pixels[:1])
    spike[..., 0, 0] = 255

    def scale(px, name):
        return _first_activation_scale(quantize_int8(
            tiny_exported / modeldir.ONNX_FP32, tmp_path / name, card, px,
            weights_sha256=weights, opts=QuantOptions()))

    clean = scale(pixels, "clean.onnx")
    assert scale(np.concatenate([pixels, spike]), "spiked.onnx") < 1.25 * clean

"""Parity: passes for faithful exports, fails (exit 1, smallest passing tolerance named) for
unfaithful ones or impossible tolerances, and the named tolerance really does pass."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

onnx = pytest.importorskip("onnx", reason="parity needs onnx")
pytest.importorskip("onnxruntime", reason="parity runs the ONNX files")

from pneumo_edge.export.main import check_parity
from pneumo_edge.export.parity import (
    OPTION,
    Tolerance,
    _ceil_sig,
    _floor,
    compare,
    default_tolerances,
    parity_images,
    suggestion,
)

from pneumo_edge.cli import main
from pneumo_edge.errors import DataError
from pneumo_edge.model.card import Card


@pytest.fixture
def exported(copy_run, tiny_exported):
    """A writable copy of the exported tiny model, its card and its parity images."""
    run = copy_run(tiny_exported)
    card = Card.load(run)
    return run, card, parity_images(card, None)


def _suggested(err: str) -> dict:
    line = next(x for x in err.splitlines() if "smallest tolerance" in x)
    return dict(re.findall(r"(--[a-z0-9-]+) ([0-9.e+-]+)", line.split("passed:")[1]))


def _tolerances(opts: dict) -> dict:
    tol = default_tolerances()
    for p, t in tol.items():
        for field in ("max_abs", "min_agreement", "max_metric_delta", "max_auc_delta"):
            option = OPTION[field].format(p=p)
            if option in opts:
                setattr(t, field, float(opts[option]))
    return tol


def test_faithful_export_passes(exported, capsys):
    run, card, images = exported
    assert check_parity(run, card, images) == 0
    out = capsys.readouterr().out
    assert "parity PASSED" in out and re.search(r"^onnx-fp16 .* pass$", out, re.MULTILINE)
    report = json.loads((run / "parity.json").read_text())
    for form in ("onnx", "onnx-fp16"):
        e = report["forms"][form]
        assert e["agreement"] == 1.0 and e["max_abs_diff"] <= e["tolerance"]["max_abs"]
        assert all(abs(d) <= 0.005 for d in e["metric_deltas"].values())


def test_perturbed_graph_fails_and_names_the_smallest_passing_tolerance(exported, capsys):
    run, card, images = exported
    proto = onnx.load(str(run / "model.onnx"))
    fc = next(i for i in proto.graph.initializer if list(i.dims) == [2] and "fc" in i.name)
    bias = onnx.numpy_helper.to_array(fc).copy()
    bias[card.positive_index] += 0.05  # a small shift of the positive logit
    fc.CopyFrom(onnx.numpy_helper.from_array(bias, fc.name))
    onnx.save(proto, str(run / "model.onnx"))

    assert check_parity(run, card, images) == 1
    captured = capsys.readouterr()
    assert "parity FAILED" in captured.out and "error: parity failed for onnx" in captured.err
    report = json.loads((run / "parity.json").read_text())
    assert report["passed"] is False and report["forms"]["onnx"]["status"] == "fail"
    assert report["forms"]["onnx-fp16"]["status"] == "pass"
    opts = _suggested(captured.err)
    assert float(opts["--tol-fp32"]) >= report["forms"]["onnx"]["max_abs_diff"] > 1e-4
    # the printed tolerance is enough to pass
    assert check_parity(run, card, images, _tolerances(opts)) == 0


def test_absurdly_tight_fp16_tolerance_fails_via_cli(copy_run, tiny_exported):
    run = copy_run(tiny_exported)
    res = CliRunner().invoke(main, ["export", str(run), "--tol-fp16", "1e-12",
                                    "--min-agreement-fp16", "1"])
    assert res.exit_code == 1, res.output
    opts = _suggested(res.stderr)
    assert float(opts["--tol-fp16"]) > 1e-12 and not any("fp32" in k for k in opts)
    card = Card.load(run)  # the printed tolerance passes (checked without exporting again)
    assert check_parity(run, card, parity_images(card), _tolerances(opts)) == 0


def test_parity_data_folder(exported, tiny_labelled):
    run, card, _ = exported
    images = parity_images(card, tiny_labelled)
    assert images.source["source"] == "--parity-data" and images.source["count"] == 16
    assert images.pixels.dtype == np.uint8 and images.pixels.shape == (16, 1, 64, 64)
    assert check_parity(run, card, images) == 0


def test_missing_recorded_images_ask_for_parity_data(tiny_run):
    card = Card.load(tiny_run)
    card.split = {**card.split, "data": "/nonexistent/dataset"}
    with pytest.raises(DataError, match="--parity-data"):
        parity_images(card)


def test_unreadable_parity_images_are_skipped_not_fatal(exported, tiny_labelled, tmp_path):
    import shutil

    _, card, _ = exported
    folder = tmp_path / "labelled"
    shutil.copytree(tiny_labelled, folder)
    (folder / "NORMAL" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    images = parity_images(card, folder, warn=lambda m: None)
    assert images.source["count"] == 16 and images.source["skipped_unreadable"] == 1


def _card():
    return Card(classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", image_size=64,
                threshold=0.5, arch="resnet18")


def test_compare_reports_the_smallest_passing_values():
    card = _card()
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]], np.float32)
    truth = np.array([0, 1, 0, 1])
    same = compare(ref, ref.copy(), truth, card, Tolerance(0.0, 1.0, 0.0))
    assert same["status"] == "pass" and same["max_abs_diff"] == 0.0
    moved = ref.copy()
    moved[3] = [0.52, 0.48]  # flips one label
    r = compare(ref, moved, truth, card, Tolerance(1e-3, 0.99, 0.0))
    assert r["status"] == "fail" and r["failed"] == ["max_abs", "min_agreement",
                                                     "max_metric_delta"]
    need = r["smallest_passing"]
    assert need["min_agreement"] == 0.75 and need["max_abs"] == pytest.approx(0.07)
    assert compare(ref, moved, truth, card, Tolerance(**need))["status"] == "pass"


def test_suggestion_rounds_towards_passing():
    assert _ceil_sig(0.012301, 3) == 0.0124 and _ceil_sig(0.0123, 3) >= 0.0123
    assert _floor(13 / 14, 4) == 0.9285
    text = suggestion({"fp16": {"max_abs": 0.012301, "min_agreement": 13 / 14}})
    assert text == "--tol-fp16 0.0124 --min-agreement-fp16 0.9285"

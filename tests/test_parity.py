"""Parity: passes for faithful exports, fails (exit 1, smallest passing tolerance named) for
unfaithful ones or impossible tolerances, and the named tolerance really does pass."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
from pneumo_edge.model.modeldir import read_card


@pytest.fixture
def exported(copy_run, tiny_exported):
    """A writable copy of the exported tiny model, its card and its parity images."""
    run = copy_run(tiny_exported)
    card = read_card(run)
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
    card = read_card(run)  # the printed tolerance passes (checked without exporting again)
    assert check_parity(run, card, parity_images(card), _tolerances(opts)) == 0


def test_parity_data_folder(exported, tiny_labelled):
    run, card, _ = exported
    images = parity_images(card, tiny_labelled)
    assert images.source["source"] == "--parity-data" and images.source["count"] == 16
    assert images.pixels.dtype == np.uint8 and images.pixels.shape == (16, 1, 64, 64)
    assert check_parity(run, card, images) == 0


def test_missing_recorded_images_ask_for_parity_data(tiny_run):
    card = read_card(tiny_run)
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


# ----------------------------------------------------------------------------- evidence (issue 19)

from pneumo_edge.model import modeldir
from pneumo_edge.runtimes import gpu_present, open_runtime

cpu_only = pytest.mark.skipif(gpu_present(), reason="auto prefers GPU forms on a GPU machine")


def _auto(run):
    said = []
    rt = open_runtime(run, "auto", log=said.append)
    return rt, "\n".join(said)


def _edit_report(run, edit):
    path = run / modeldir.PARITY_JSON
    report = json.loads(path.read_text())
    edit(report)
    path.write_text(json.dumps(report))


def _set_metadata(path, **props):
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props} | props
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))


@cpu_only
def test_mixed_model_directory_does_not_run_the_other_runs_int8(copy_run, tiny_verified):
    """Before: run 1's card.json + model.onnx with run 2's model.int8.onnx + parity.json (same
    classes, threshold and arch, no model.pt on the edge box) ran run 2's INT8 as 'parity
    passed'. Now the evidence is bound to the directory's card and weights: INT8 is refused,
    saying why, and run 1's own fp32 file runs."""
    run = copy_run(tiny_verified, files=["model.int8.onnx", "parity.json"])  # run 2's
    run1 = json.loads((tiny_verified / "card.json").read_text())
    run1.update(created="2026-01-01T00:00:00+00:00", metrics={"note": "run 1"})
    (run / "card.json").write_text(json.dumps(run1))
    (run / "model.onnx").write_bytes((tiny_verified / "model.onnx").read_bytes())
    _set_metadata(run / "model.onnx", **{modeldir.ONNX_CARD_KEY: Card.from_dict(run1).to_json(),
                                         modeldir.ONNX_WEIGHTS_KEY: "1" * 64})
    rt, said = _auto(run)
    assert (rt.name, rt.path.name) == ("onnx", "model.onnx"), said
    assert "onnx-int8/cpu: refused: parity.json and model.int8.onnx are not from the model " \
           "of this directory's card.json" in said


@cpu_only
def test_too_few_parity_images_leave_int8_not_verified(copy_run, tiny_exported, tiny_labelled,
                                                       capsys):
    """Before: parity on 2 images wrote a passing INT8 entry that auto deployed without saying
    on how many images. Below the floor (modeldir.MIN_PARITY_IMAGES, both classes) export says
    the evidence is weak and auto runs fp32, saying on how many images parity ran."""
    run = copy_run(tiny_exported)
    card = read_card(run)
    images = parity_images(card, tiny_labelled)
    images.pixels, images.labels = images.pixels[[0, -1]], images.labels[[0, -1]]
    images.source.update(count=2, per_class={"NORMAL": 1, "PNEUMONIA": 1})
    assert check_parity(run, card, images) == 0
    assert "parity evidence is weak, not verified: parity ran on 2 images" in \
        capsys.readouterr().err
    assert json.loads((run / "parity.json").read_text())["forms"]["onnx-int8"]["status"] == "pass"
    rt, said = _auto(run)
    assert rt.name == "onnx" and rt.precision == "fp32", said
    assert "model.int8.onnx not verified: parity ran on 2 images" in said
    assert f"the floor is {modeldir.MIN_PARITY_IMAGES}" in said


@cpu_only
def test_weaker_parity_run_never_replaces_stronger_evidence_silently(copy_run, tiny_verified,
                                                                     tiny_labelled, capsys):
    """INT8 failed on 200 images; a later pass on 16 images of the very same file does not
    overrule it (the entry stays failed) and the replaced evidence is named on stderr."""
    run = copy_run(tiny_verified)
    card = read_card(run)
    many = parity_images(card, Path(tiny_verified).parent / "parity")
    strict = {"int8": Tolerance(1e-9, 0.99, 0.01, 0.005)}
    tol = default_tolerances() | strict
    assert check_parity(run, card, many, tol) == 1
    capsys.readouterr()
    assert check_parity(run, card, parity_images(card, tiny_labelled)) == 1
    err = capsys.readouterr().err
    assert "model.int8.onnx failed on 200 images in the previous parity.json; it stays failed" \
        in err
    assert "checked model.onnx on 200 images; it is replaced by this run's 16" in err
    entry = json.loads((run / "parity.json").read_text())["forms"]["onnx-int8"]
    assert entry["status"] == "fail" and "failed parity on 200 images before" in entry["reason"]


@cpu_only
def test_auto_holds_recorded_tolerances_to_the_defaults(copy_run, tiny_verified):
    """Before: --min-agreement-int8 0 --max-metric-delta-int8 1 passed INT8 and auto ran it."""
    run = copy_run(tiny_verified)
    _edit_report(run, lambda r: r["forms"]["onnx-int8"]["tolerance"].update(
        min_agreement=0.0, max_metric_delta=1.0))
    rt, said = _auto(run)
    assert rt.name == "onnx" and "model.int8.onnx passed at tolerances looser than the " \
                                  "defaults (min_agreement 0.0 vs 0.99, max_metric_delta 1.0 " \
                                  "vs 0.01)" in said


@cpu_only
def test_failed_fp32_onnx_is_not_run_by_auto_and_explicitly_only_with_a_warning(
        copy_run, tiny_exported):
    """Before: auto ran model.onnx whatever parity.json said about it (fp32 was never checked)."""
    run = copy_run(tiny_exported)
    _edit_report(run, lambda r: r["forms"]["onnx"].update(status="fail"))
    rt, said = _auto(run)
    assert rt.name == "torch" and "onnx/cpu: parity fail for model.onnx" in said, said
    warned = []
    assert open_runtime(run, "onnx", log=warned.append).name == "onnx"
    assert warned == [("warning: parity fail for model.onnx; running it because it was named "
                       "explicitly")]


@pytest.mark.parametrize("edit", [
    lambda e: e.update(agreement=None), lambda e: e.update(metric_deltas="none"),
    lambda e: e.update(tolerance=[1]), lambda e: e.update(status=3)])
def test_parity_json_with_wrong_types_is_one_line_exit_2(copy_run, tiny_verified, tiny_labelled,
                                                         edit):
    """Before: agreement null was a TypeError traceback after auto had opened the model."""
    run = copy_run(tiny_verified)
    _edit_report(run, lambda r: edit(r["forms"]["onnx-int8"]))
    for runtime in ("onnx-int8",) if gpu_present() else ("onnx-int8", "auto"):
        res = CliRunner().invoke(main, ["score", str(tiny_labelled), "--model", str(run),
                                        "--runtime", runtime])
        _one_line_exit_2(res, run)


def _one_line_exit_2(res, run):
    assert res.exit_code == 2 and res.stdout == "" and res.exception.__class__ is SystemExit
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {run / 'parity.json'}: ") and "Traceback" not in \
        res.stderr, res.stderr

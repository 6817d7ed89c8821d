"""The input quality gate (issue 20): the qc verdicts, and a model trained on the bundled sample
X-rays whose gate passes those X-rays and flags blank frames, noise, CT/MR slices and
photographs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from pneumo_edge.model import modeldir, qc
from pneumo_edge.model.card import Card
from pneumo_edge.model.modeldir import read_card

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "chest_xray"
SIZE = 64


def _card(**net) -> Card:
    metrics = {"ood": {"method": "mahalanobis", "threshold": 2.5}} if net.get("ood") else {}
    return Card(classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", image_size=SIZE,
                threshold=0.5, arch="resnet18", net=net, metrics=metrics)


def _samples(size: int = SIZE) -> np.ndarray:
    from pneumo_edge.inputs.images import load_image

    files = sorted(p for p in SAMPLES.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg",
                                                                           ".png"))
    assert len(files) >= 40
    return np.stack([load_image(p, size) for p in files])


def test_blank_frames_are_flagged_and_bundled_xrays_are_not():
    rng = np.random.default_rng(0)
    blank = [np.full((1, SIZE, SIZE), v, np.uint8) for v in (0, 37, 255)]
    blank.append(np.clip(128 + rng.normal(0, 2, (1, SIZE, SIZE)), 0, 255).astype(np.uint8))
    label = np.zeros((1, SIZE, SIZE), np.uint8)
    label[0, :3, :8] = 255  # a burned-in marker on a black frame is still blank
    for img in [*blank, label]:
        assert qc.blank_reason(img) == qc.BLANK
    for img in _samples():
        assert qc.blank_reason(img) == ""


def test_verdict_text_modes_and_header_evidence():
    card = _card(ood="mahalanobis", calibration="temperature+bias")
    px = np.stack([np.full((1, SIZE, SIZE), 0, np.uint8), *_samples()[:2]])
    ood = np.array([9.0, 41.25, 1.0], np.float32)
    got = qc.verdicts(card, px, ood, views=[None, "PA", "LL"])
    assert got == ["blank or near-constant image; out_of_distribution (score 9 > 2.5)",
                   "out_of_distribution (score 41.2 > 2.5)", "lateral view (ViewPosition LL)"]
    assert qc.verdicts(card, px, ood, mode="off") == ["", "", ""]
    assert [qc.view_reason(v) for v in ("RL", " lateral ", "AP", "", None)] == \
        ["lateral view (ViewPosition RL)", "lateral view (ViewPosition LATERAL)", "", "", ""]
    assert qc.ood_reason(float("nan"), qc.gate(card)).startswith("out_of_distribution")


def test_old_cards_have_no_gate_and_say_so_once():
    old = _card()
    assert qc.gate(old) is None and not qc.calibrated(old)
    assert "pneumo-edge calibrate RUN" in qc.uncalibrated_notice(old, "RUN")
    assert qc.uncalibrated_notice(_card(ood="mahalanobis", calibration="temperature+bias"),
                                  "RUN") is None
    # without a gate only the pixels speak
    assert qc.verdicts(old, _samples()[:1], None) == [""]


@pytest.fixture(scope="module")
def xray_run(session_tmp):
    """A small model trained on the bundled sample X-rays (the one model here that has seen
    real radiographs): training calibrates it (train/final.py), then ``calibrate`` fits it
    again with the Mahalanobis gate (from the uncalibrated threshold it recorded)."""
    pytest.importorskip("torch")
    from pneumo_edge.train.loop import TrainConfig, train
    from pneumo_edge.train.recalibrate import CalibrateOptions, run_calibrate

    out = session_tmp("xray_run")
    train(TrainConfig(data=str(SAMPLES), out=str(out), arch="resnet18", image_size=SIZE,
                      epochs=2, min_epochs=1, workers=0, device="cpu", batch_size=4,
                      augment=False, amp=False, force=True, no_cache=True,
                      threshold_for="fixed:0.5"))
    trained = read_card(out)
    assert trained.net["calibration"] == "temperature+bias"
    assert trained.metrics["calibration"]["threshold_before"] == 0.5
    run_calibrate(out, SAMPLES, CalibrateOptions(device="cpu", gate="mahalanobis"),
                  log=lambda m: None)
    again = read_card(out)
    assert again.metrics["calibration"]["threshold_before"] == 0.5
    assert again.net["ood"] == "mahalanobis"
    (out / modeldir.LAST_PT).unlink()  # the resume state (5x model.pt): no test here reads it
    return out


def _scores(run, pixels):
    import torch

    from pneumo_edge.model.torchload import load_model

    model, card = load_model(run)
    with torch.no_grad():
        probs, ood = model.outputs(torch.from_numpy(np.ascontiguousarray(pixels)))
    return card, probs.numpy(), ood.numpy()


def test_gate_passes_bundled_xrays_and_flags_what_is_not_one(xray_run):
    from pneumo_edge.train.calibrate import _variants, shipped_ct_mr

    card, _, ood = _scores(xray_run, _samples())
    verdicts = qc.verdicts(card, _samples(), ood)
    assert sum(v == "" for v in verdicts) >= 0.9 * len(verdicts)
    rng = np.random.default_rng(5)
    junk = np.concatenate([
        np.full((4, 1, SIZE, SIZE), 0, np.uint8), np.full((2, 1, SIZE, SIZE), 255, np.uint8),
        rng.integers(0, 256, (6, 1, SIZE, SIZE)).astype(np.uint8)])
    card, _, ood = _scores(xray_run, junk)
    assert all(qc.verdicts(card, junk, ood))
    slices = shipped_ct_mr()
    if not slices:
        pytest.skip("pydicom's bundled CT/MR files are not installed")
    whole = _variants(slices[:2], SIZE)[::10]  # CT_small and MR_small, whole, unrotated
    card, _, ood = _scores(xray_run, whole)
    # A ResNet18 trained for two epochs on 48 images: its distances move with the thread count
    # (a CT slice scored 4.16 against a threshold of 4.76 with one thread, 4.82 against 4.30
    # with two), so this asserts the ranking and half the verdicts; the full-size figures
    # (97.5 % of CT/MR views flagged) are benchmarks/OOD.md's
    _, _, upright = _scores(xray_run, _samples())
    assert ood.min() > np.quantile(upright, 0.75), (ood, np.quantile(upright, 0.75))
    flagged = [v.startswith("out_of_distribution") for v in qc.verdicts(card, whole, ood)]
    assert sum(flagged) >= len(flagged) / 2, (ood, card.metrics["ood"]["threshold"])


def _score(*args):
    from click.testing import CliRunner

    from pneumo_edge.cli import main

    res = CliRunner().invoke(main, ["score", *map(str, args)], catch_exceptions=False)
    return res.exit_code, list(csv.DictReader(io.StringIO(res.stdout, newline=""))), res.stderr


def test_score_writes_qc_refuses_on_request_and_reads_the_lateral_view(tiny_run, tmp_path):
    """The shared tiny model has no gate (an old model directory): the qc column still names
    blank images and lateral DICOM views; --qc refuse turns them into error rows (exit 1);
    --prevalence needs a calibrated model."""
    from PIL import Image
    from test_dicom import make

    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(np.zeros((80, 80), np.uint8)).save(d / "a_black.png")
    Image.fromarray(rng.integers(0, 256, (80, 80)).astype(np.uint8)).save(d / "b_noise.png")
    picture = rng.integers(0, 4096, (90, 90))
    make(d / "c_lateral.dcm", picture, ViewPosition="LL")
    make(d / "d_pa.dcm", picture)
    code, rows, err = _score(d, "--model", tiny_run, "--runtime", "torch")
    by = {Path(r["path"]).name: r for r in rows}
    assert code == 0, err
    assert by["a_black.png"]["qc"] == qc.BLANK and by["a_black.png"]["label"]
    assert by["c_lateral.dcm"]["qc"] == "lateral view (ViewPosition LL)"
    assert by["b_noise.png"]["qc"] == "" and by["d_pa.dcm"]["qc"] == ""
    assert err.count("has no calibration or input gate") == 1
    assert "qc flagged 2 images" in err
    code, rows, err = _score(d, "--model", tiny_run, "--runtime", "torch", "--qc", "refuse")
    by = {Path(r["path"]).name: r for r in rows}
    assert code == 1
    assert by["a_black.png"]["label"] == "" and by["a_black.png"]["p_PNEUMONIA"] == ""
    assert by["a_black.png"]["error"] == f"refused by --qc refuse: {qc.BLANK}"
    assert by["d_pa.dcm"]["label"] and not by["d_pa.dcm"]["error"]
    code, rows, _ = _score(d, "--model", tiny_run, "--runtime", "torch", "--qc", "off")
    assert code == 0 and all(r["qc"] == "" for r in rows)
    code, _, err = _score(d, "--model", tiny_run, "--prevalence", "0.1")
    assert code == 2 and "--prevalence needs a calibrated" in err


def test_prevalence_moves_probabilities_not_labels(xray_run, tmp_path):
    from pneumo_edge.model import calibration as cal

    files = sorted(p for p in SAMPLES.rglob("*.jpeg"))[:12]
    base = _score(*files, "--model", xray_run, "--runtime", "torch")
    out = tmp_path / "low.csv"
    low = _score(*files, "--model", xray_run, "--runtime", "torch", "--prevalence", "0.05",
                 "-o", out)
    assert base[0] == low[0] == 0
    card = read_card(xray_run)
    trained = card.metrics["calibration"]["prevalence"]
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"), newline="")))
    for a, b in zip(base[1], rows):
        assert a["label"] == b["label"]
        want = cal.adjust_prevalence([float(a["p_PNEUMONIA"])], 0.05, trained)[0]
        assert float(b["p_PNEUMONIA"]) == pytest.approx(want, abs=5e-6)
    record = json.loads((tmp_path / "low.csv.json").read_text())
    assert record["prevalence"] == 0.05 and record["qc"] == "flag"
    assert record["threshold_from"] == "moved to --prevalence 0.05"  # not "--threshold"


def test_pixel_check_done_elsewhere_gives_the_same_cells():
    """A Ray batch carries no pixels, only each decoded file's blank_reason computed on the
    worker: the qc cells are those of a local batch with the pixels."""
    from pneumo_edge.sources import ScoredBatch

    xray = _samples()[0]
    black = np.zeros_like(xray)
    paths, ok, errors = ["a.png", "b.png", "c.png"], [0, 2], {1: "cannot decode"}
    probs = np.full((2, 2), 0.5, np.float32)
    local = ScoredBatch(0, paths, ok, errors, probs, pixels=np.stack([black, xray]))
    remote = ScoredBatch(0, paths, ok, errors, probs,
                         blank=[qc.blank_reason(black), qc.blank_reason(xray)])
    keeper = qc.Gatekeeper(_card())
    assert keeper.cells(local) == keeper.cells(remote) == [qc.BLANK, "", ""]
    assert qc.Gatekeeper(_card(), "off").cells(remote) == ["", "", ""]


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, float("nan"), float("inf")])
def test_prevalence_outside_zero_one_is_a_usage_error(bad):
    from pneumo_edge.errors import UsageError

    card = _card(calibration="temperature+bias")
    with pytest.raises(UsageError, match="not a rate strictly between 0 and 1"):
        qc.Gatekeeper(card, prevalence=bad)


@pytest.fixture(scope="module")
def oriented_xray_run(xray_run, session_tmp):
    """The sample X-ray model calibrated again with the orientation probe in its gate."""
    from conftest import copy_model_dir
    from pneumo_edge.train.recalibrate import CalibrateOptions, run_calibrate

    run = copy_model_dir(xray_run, session_tmp("oriented_xray") / "run")
    run_calibrate(run, SAMPLES, CalibrateOptions(device="cpu", gate="mahalanobis+orientation"),
                  log=lambda m: None)
    return run


def _probe_separates(run, upright, changed) -> float:
    """ROC AUC of the probe's term in ``run``'s network: ``changed`` (positive) against
    ``upright`` (negative)."""
    import torch

    from pneumo_edge.evaluation.metrics import roc_auc
    from pneumo_edge.model.torchload import load_model

    model, _ = load_model(run)
    with torch.no_grad():
        terms = [((model.features(model.normalise(torch.from_numpy(x))) - model.ood_means[0])
                  @ model.ood_orient)[:, 0].numpy() for x in (upright, changed)]
    truth = np.r_[np.zeros(len(terms[0]), bool), np.ones(len(terms[1]), bool)]
    return roc_auc(truth, np.r_[terms[0], terms[1]])


def test_orientation_probe_tells_inverted_sample_xrays_from_upright(oriented_xray_run):
    """The probe is also fitted on inverted (and mirrored-inverted) training X-rays: its term
    is larger on the sample X-rays with their grey levels reversed than on the upright ones,
    and the card counts the inverted images it was fitted on."""
    upright = _samples()
    inverted = np.ascontiguousarray(np.concatenate([255 - upright,
                                                    255 - upright[:, :, :, ::-1]]))
    assert _probe_separates(oriented_xray_run, upright, inverted) > 0.9
    images = read_card(oriented_xray_run).metrics["ood"]["orientation"]["images"]
    assert images["inverted"] > 0 and images["mirrored_inverted"] > 0


def test_orientation_probe_flags_upside_down_sample_xrays(xray_run, oriented_xray_run):
    """The probe's term is larger on the sample X-rays turned than upright (its own training
    images among them), and the combined gate flags upside-down films the distance alone
    passed, while passing the upright ones as before."""
    from pneumo_edge.train.calibrate import turn

    upright = _samples()
    flipped = np.ascontiguousarray(turn(upright, "upside_down"))
    turned = np.ascontiguousarray(np.concatenate([flipped, turn(upright, "rotated_90")]))
    assert _probe_separates(oriented_xray_run, upright, turned) > 0.9
    card = read_card(oriented_xray_run)
    assert card.metrics["ood"]["orientation"]["train_accuracy"] > 0.9
    _, _, ood = _scores(oriented_xray_run, upright)
    assert sum(v == "" for v in qc.verdicts(card, upright, ood)) >= 0.9 * len(upright)
    old_card, _, old_ood = _scores(xray_run, flipped)
    card, _, ood = _scores(oriented_xray_run, flipped)
    old = np.array([v != "" for v in qc.verdicts(old_card, flipped, old_ood)])
    new = np.array([v != "" for v in qc.verdicts(card, flipped, ood)])
    assert new.sum() > old.sum() and new.mean() >= 0.5, (old.mean(), new.mean())

"""The input quality gate (issue 20): the qc verdicts, and a model trained on the bundled sample
X-rays whose gate passes those X-rays and flags blank frames, noise, CT/MR slices and
photographs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pneumo_edge.model import qc
from pneumo_edge.model.card import Card

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
def xray_run(tmp_path_factory):
    """A small model trained on the bundled sample X-rays (the one model here that has seen
    real radiographs): training calibrates it (train/final.py), then ``calibrate`` fits it
    again with the Mahalanobis gate (from the uncalibrated threshold it recorded)."""
    pytest.importorskip("torch")
    from pneumo_edge.train.loop import TrainConfig, train

    from pneumo_edge.commands.calibrate import CalibrateOptions, run_calibrate

    out = tmp_path_factory.mktemp("xray_run")
    train(TrainConfig(data=str(SAMPLES), out=str(out), arch="resnet18", image_size=SIZE,
                      epochs=2, min_epochs=1, workers=0, device="cpu", batch_size=4,
                      augment=False, amp=False, force=True, no_cache=True,
                      threshold_for="fixed:0.5"))
    trained = Card.load(out)
    assert trained.net["calibration"] == "temperature+bias"
    assert trained.metrics["calibration"]["threshold_before"] == 0.5
    run_calibrate(out, SAMPLES, CalibrateOptions(device="cpu", gate="mahalanobis"),
                  log=lambda m: None)
    again = Card.load(out)
    assert again.metrics["calibration"]["threshold_before"] == 0.5
    assert again.net["ood"] == "mahalanobis"
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
    assert all(v.startswith("out_of_distribution") for v in qc.verdicts(card, whole, ood))

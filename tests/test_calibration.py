"""Calibration (issue 20): the numpy fit and maps, the map inside the network, the calibrate
command on the shared tiny model, and the exported graph carrying calibration and the gate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumo_edge.errors import ModelError
from pneumo_edge.model import calibration as cal


def _miscalibrated(n=4000, scale=3.0, shift=1.5, seed=0):
    """Labels drawn from sigmoid(d), and log-probabilities of a model that reports
    sigmoid(scale * d + shift): over-confident and shifted towards the positive class."""
    rng = np.random.default_rng(seed)
    d = rng.normal(0, 2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-d))).astype(int)
    z = scale * d + shift
    logp = np.stack([-np.logaddexp(0, z), -np.logaddexp(0, -z)], axis=1)
    return logp, y


def test_fit_recovers_temperature_and_bias_and_lowers_ece():
    logp, y = _miscalibrated()
    f = cal.fit(logp, y, 1)
    assert f["temperature"] == pytest.approx(3.0, rel=0.1)
    assert f["bias"] == pytest.approx(-0.5, abs=0.15)  # shift / scale
    assert f["nll_after"] < f["nll_before"]
    before = cal.figures(y == 1, np.exp(logp[:, 1]))
    after = cal.figures(y == 1, cal.apply(logp, f["temperature"], f["bias"], 1)[:, 1])
    assert before["ece"] > 0.1 and after["ece"] < 0.03
    assert after["brier"] < before["brier"]
    assert len(after["bins"]) == cal.ECE_BINS == 15


def test_temperature_only_fit_leaves_the_prior_shift():
    logp, y = _miscalibrated()
    t_only = cal.fit(logp, y, 1, bias=False)
    both = cal.fit(logp, y, 1)
    assert t_only["bias"] == 0.0
    assert both["nll_after"] < t_only["nll_after"]


def test_mapped_threshold_keeps_every_label():
    logp, y = _miscalibrated(seed=3)
    f = cal.fit(logp, y, 1)
    q = cal.apply(logp, f["temperature"], f["bias"], 1)[:, 1]
    for t in (0.05, 0.25, 0.5, 0.9):
        t2 = cal.map_threshold(t, f["temperature"], f["bias"])
        assert np.array_equal(np.exp(logp[:, 1]) >= t, q >= t2)
    assert cal.map_threshold(0.0, 2.0, 1.0) == 0.0 and cal.map_threshold(1.0, 2.0, 1.0) == 1.0


def test_fit_refuses_one_class_and_stays_finite_on_separable_data():
    logp, _ = _miscalibrated(n=50)
    with pytest.raises(ModelError, match="both classes"):
        cal.fit(logp, np.ones(50, int), 1)
    # four cleanly separated images: plain maximum likelihood would send 1/T to infinity;
    # Platt's smoothed targets (3/4 and 1/4 here) keep it finite and soften the probabilities
    z = np.array([-4.0, -3.0, 3.0, 4.0])
    sep = np.stack([-np.logaddexp(0, z), -np.logaddexp(0, -z)], axis=1)
    f = cal.fit(sep, (z > 0).astype(int), 1)
    assert not f["at_bound"] and 1.0 < f["temperature"] < 10.0


def test_prevalence_moves_probabilities_not_the_ranking():
    p = np.array([0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
    same = cal.adjust_prevalence(p, 0.3, 0.3)
    assert np.allclose(same, p)
    low = cal.adjust_prevalence(p, 0.05, 0.3)
    assert np.all(np.diff(low) > 0) and np.all(low[1:-1] < p[1:-1])
    assert low[0] == 0.0 and low[-1] == 1.0
    # Bayes' rule on the odds: 0.5 at prevalence 0.3 -> odds 1 * (0.05/0.95) / (0.3/0.7)
    odds = (0.05 / 0.95) / (0.3 / 0.7)
    assert low[3] == pytest.approx(odds / (1 + odds))
    t = cal.adjust_threshold(0.4, 0.05, 0.3)
    assert np.array_equal(p >= 0.4, low >= t)
    with pytest.raises(ModelError):
        cal.adjust_prevalence(p, 1.0, 0.3)


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_network_applies_the_same_map_as_numpy(tta):
    torch = pytest.importorskip("torch")
    from pneumo_edge.model.net import build_model

    torch.manual_seed(0)
    net = build_model("resnet18", 2, norm="image", tta=tta, calibration="temperature+bias",
                      ood="energy").eval()
    net.set_calibration(1.7, -0.8, 1)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 1, 64, 64), np.uint8))
    with torch.no_grad():
        probs, ood = net.outputs(x)
        logp, _, z, _ = net.uncalibrated(x)
    want = cal.apply(logp.numpy(), 1.7, -0.8, 1)
    assert np.abs(probs.numpy() - want).max() < 1e-5
    assert np.allclose(ood.numpy(), -np.log(np.exp(z.numpy()).sum(axis=1)), atol=1e-5)
    assert torch.equal(net(x), probs)


def test_a_network_without_the_options_is_the_old_one():
    torch = pytest.importorskip("torch")
    from pneumo_edge.model.net import build_model

    net = build_model("resnet18", 2).eval()
    assert not any(k.startswith(("cal_", "ood_")) for k in net.state_dict())
    x = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)
    with torch.no_grad():
        probs, ood = net.outputs(x)
        old = torch.softmax(net.backbone(net.normalise(x)), dim=1)
    assert ood is None and torch.allclose(probs, old)


@pytest.fixture(scope="module")
def calibrated_run(tiny_run, tiny_dataset, session_tmp):
    """A copy of the tiny model after ``pneumo-edge calibrate`` (read-only)."""
    from conftest import copy_model_dir
    from pneumo_edge.train.recalibrate import CalibrateOptions, run_calibrate

    run = copy_model_dir(tiny_run, session_tmp("calibrated") / "run")
    lines = []
    assert run_calibrate(run, tiny_dataset, CalibrateOptions(device="cpu"), log=lines.append) == 0
    return run, lines


def test_calibrate_command_keeps_labels_and_records_the_figures(calibrated_run, tiny_run,
                                                                tiny_labelled):
    from pneumo_edge.inputs.pipeline import decode_labelled
    from pneumo_edge.model.modeldir import read_card
    from pneumo_edge.model.torchload import load_model, read_checkpoint

    run, lines = calibrated_run
    old_model, old = load_model(tiny_run)
    model, card = load_model(run)  # card.json agrees with the card inside model.pt
    assert read_checkpoint(run).card == card == read_card(run)
    assert card.net["calibration"] == "temperature+bias"
    assert card.net["ood"] in ("mahalanobis", "energy", "mahalanobis+orientation",
                               "mahalanobis+layer1+orientation")
    c = card.metrics["calibration"]
    assert c["threshold_before"] == old.threshold
    assert card.threshold == pytest.approx(cal.map_threshold(old.threshold, c["temperature"],
                                                             c["bias"]))
    for split in ("val", "test"):
        assert {"before", "after"} <= set(c[split])
        assert len(c[split]["after"]["bins"]) == 15
    g = card.metrics["ood"]
    assert g["false_flag_rate"] == 0.005
    assert set(g["comparison"]) == {"mahalanobis", "energy", "mahalanobis+orientation",
                                    "mahalanobis+layer1+orientation"}
    assert any(line.startswith("calibration: T") for line in lines)
    json.dumps(card.to_dict(), allow_nan=False)  # strict JSON: no NaN slipped in
    torch = pytest.importorskip("torch")
    px, _, _ = decode_labelled(
        [(str(p), 0) for p in sorted(tiny_labelled.rglob("*.*"))], card.image_size)
    with torch.no_grad():
        p_old = old_model(torch.from_numpy(px)).numpy()[:, old.positive_index]
        p_new = model(torch.from_numpy(px)).numpy()[:, card.positive_index]
    assert np.array_equal(p_old >= old.threshold, p_new >= card.threshold)
    assert not np.allclose(p_old, p_new)


def test_combined_thresholds_keep_the_total_false_flag_rate():
    """The probe takes at most its share of the budget, the distance what is left: together
    they flag at most the rate on validation, and T is the lowest threshold that does; the
    one score is above T exactly where either part fires."""
    from pneumo_edge.train.calibrate import PROBE_SHARE, combined, combined_thresholds

    rng = np.random.default_rng(4)
    maha, tilt = rng.gamma(4.0, 0.25, 2000), rng.normal(-6.0, 1.5, 2000)
    tilt[:3] = 30.0  # three upright images the probe dislikes, one of them far off by distance
    maha[0] = 50.0
    rate = 0.005
    gate_t, probe_t = combined_thresholds(maha, tilt, rate)
    either = (maha > gate_t) | (tilt > probe_t)
    assert np.mean(tilt > probe_t) <= rate * PROBE_SHARE and np.mean(either) <= rate
    top = np.max(maha[maha < gate_t])  # a threshold below the highest passed distance
    assert np.mean((maha >= top) | (tilt > probe_t)) > rate  # flags too many
    # no validation image sits on either threshold (parity runs on them: float noise would flip
    # it): each is midway between the highest passed score and the next one up
    assert not np.isclose(maha, gate_t, rtol=1e-6, atol=0).any()
    assert not np.isclose(tilt, probe_t, rtol=1e-6, atol=0).any()
    assert np.array_equal(combined(maha, tilt, gate_t, probe_t) > gate_t, either)
    # the distance alone at the whole rate flags more upright images than it may in the union
    assert gate_t > np.sort(maha)[int(np.ceil((1 - rate) * len(maha))) - 1]


def test_the_gate_covariance_is_shrunk_at_least_the_floor():
    """Features with a few strong directions and many quiet ones (as a trained network's pooled
    features are): Ledoit-Wolf alone shrinks almost nothing, and the inverse covariance then
    weighs the quiet directions hundreds of times the mean, where an INT8 runtime's rounding
    lands (the default ResNet50's INT8 gate failed parity that way). The floor bounds it."""
    from pneumo_edge.train.calibrate import SHRINK_FLOOR, fit_gaussians

    rng = np.random.default_rng(5)
    n, f = 2000, 64
    scale = np.r_[np.full(8, 10.0), np.full(f - 8, 0.1)]
    feats = rng.normal(size=(n, f)) * scale
    labels = np.arange(n) % 2
    feats[labels == 1] += 3.0
    means, whiten, shrink = fit_gaussians(feats, labels, 2)
    assert shrink >= SHRINK_FLOOR
    mean_var = np.mean(scale ** 2)
    # whiten.T @ whiten = inverse covariance / F: its largest eigenvalue, times F and the mean
    # variance, is how much more than an average direction the quietest one is weighed: at
    # most 100x (the quiet directions here have 1/1250 of the mean variance)
    most = np.linalg.eigvalsh(whiten.T @ whiten).max() * f * mean_var
    assert most <= 100.0 * 1.01
    # the strong directions still dominate: the class means stay far apart in the distance
    gap = np.sum(((means[1] - means[0]) @ whiten) ** 2)
    assert gap > 10 * np.median(np.sum(((feats[labels == 0] - means[0]) @ whiten) ** 2, axis=1))


def test_a_gate_threshold_sits_between_validation_scores():
    """Not on one: an image exactly at the threshold is flagged or not by the last bits of a
    runtime's arithmetic, and export's parity compares the flags on these same images (the
    default ResNet50's fp32 ONNX flipped 2 of 782 that way)."""
    from pneumo_edge.train.calibrate import threshold_at

    scores = np.random.default_rng(3).gamma(4.0, 0.25, 782)
    t = threshold_at(scores, 0.005)
    top = np.sort(scores)[int(np.ceil(0.995 * 782)) - 1]
    nxt = np.sort(scores)[int(np.ceil(0.995 * 782))]
    assert t == pytest.approx((top + nxt) / 2) and np.mean(scores > t) <= 0.005
    assert not np.isin(t, scores)
    # the rest flagged anyway (inf), or nothing above: a small margin, never the score itself
    assert threshold_at(np.r_[1.0, 2.0, np.inf], 0.4) > 2.0
    assert threshold_at(np.array([1.0, 1.0]), 0.0) > 1.0


def test_the_orientation_term_lives_in_the_network():
    """``mahalanobis+orientation``: the graph's score is the numpy one (max of the distance and
    T (1 + o - t)), and crosses T where the probe's logit crosses t; a ``mahalanobis`` network
    keeps its buffers and numbers."""
    torch = pytest.importorskip("torch")
    from pneumo_edge.train import calibrate as c

    from pneumo_edge.model.net import build_model

    torch.manual_seed(0)
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (6, 1, 64, 64), np.uint8))
    plain = build_model("resnet18", 2, norm="image", ood="mahalanobis").eval()
    both = build_model("resnet18", 2, norm="image", ood=c.COMBINED).eval()
    both.load_state_dict(plain.state_dict(), strict=False)
    assert not any(k.startswith("ood_orient") for k in plain.state_dict())
    with torch.no_grad():
        feats = plain.uncalibrated(x)[1].numpy().astype(np.float64)
    means, whiten = feats[:2] + 0.05, np.eye(feats.shape[1]) / 20
    probe = {"weights": np.random.default_rng(3).normal(0, 1, feats.shape[1]), "bias": 0.5}
    tilt = c.orientation_logit(feats, probe)
    gate_t, probe_t = 1.7, float(np.median(tilt))
    plain.set_gate(means.astype(np.float32), whiten.astype(np.float32))
    both.set_gate(means.astype(np.float32), whiten.astype(np.float32),
                  c.orientation_fold(probe, means, gate_t, probe_t))
    with torch.no_grad():
        ood_plain, ood_both = plain.outputs(x)[1].numpy(), both.outputs(x)[1].numpy()
    maha = c.mahalanobis(feats, means, whiten)
    assert np.allclose(ood_plain, maha, rtol=1e-5, atol=1e-6)
    want = c.combined(maha, tilt, gate_t, probe_t)
    assert np.allclose(ood_both, want, rtol=1e-5, atol=1e-4)
    assert np.array_equal(ood_both > gate_t, (maha > gate_t) | (tilt > probe_t))
    assert np.any(ood_both > ood_plain * 1.01)  # the term is the larger one somewhere


def test_the_first_stage_distance_lives_in_the_network():
    """``mahalanobis+layer1+orientation``: the graph's score is the numpy one (the combined
    score, or the first stage's distance scaled by T / t1 where larger) and crosses T exactly
    where one of the three terms crosses its own threshold."""
    torch = pytest.importorskip("torch")
    from pneumo_edge.train import calibrate as c

    from pneumo_edge.model.net import build_model

    torch.manual_seed(0)
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (8, 1, 64, 64), np.uint8))
    net = build_model("resnet18", 2, norm="image", ood=c.LAYERED).eval()
    with torch.no_grad():
        _, feats, _, early = (v.numpy().astype(np.float64) for v in net.uncalibrated(x))
    assert early.shape == (8, 64)  # ResNet18's first stage: 64 channels
    rng = np.random.default_rng(3)
    means, whiten = feats[:2] + 0.05, np.eye(feats.shape[1]) / 20
    e_means, e_whiten = early[:2] * 1.1, np.eye(64) / 3
    probe = {"weights": rng.normal(0, 1, feats.shape[1]), "bias": 0.5}
    maha, tilt = c.mahalanobis(feats, means, whiten), c.orientation_logit(feats, probe)
    first = c.mahalanobis(early, e_means, e_whiten)
    gate_t, probe_t, first_t = 1.7, float(np.max(tilt)) + 1, float(np.median(first))
    net.set_gate(means.astype(np.float32), whiten.astype(np.float32),
                 c.orientation_fold(probe, means, gate_t, probe_t),
                 (e_means.astype(np.float32),
                  (e_whiten * np.sqrt(gate_t / first_t)).astype(np.float32)))
    with torch.no_grad():
        ood = net.outputs(x)[1].numpy()
    want = c.layered(maha, tilt, first, gate_t, probe_t, first_t)
    assert np.allclose(ood, want, rtol=1e-4, atol=1e-4)
    assert np.array_equal(ood > gate_t, (maha > gate_t) | (tilt > probe_t) | (first > first_t))
    assert np.any((first > first_t) & (maha <= gate_t))  # the first stage alone flags some


def test_layered_thresholds_share_the_budget():
    """Probe and first stage take their shares of the validation budget; all three together
    flag at most the rate."""
    from pneumo_edge.train import calibrate as c

    rng = np.random.default_rng(5)
    maha, tilt, first = rng.gamma(2, 1, 2000), rng.normal(0, 1, 2000), rng.gamma(3, 1, 2000)
    gate_t, probe_t, first_t = c.layered_thresholds(maha, tilt, first, 0.01)
    assert np.mean(tilt > probe_t) <= 0.01 * c.PROBE_SHARE
    assert 0 < np.mean(first > first_t) <= 0.01 * c.EARLY_SHARE
    score = c.layered(maha, tilt, first, gate_t, probe_t, first_t)
    assert 0.009 <= np.mean(score > gate_t) <= 0.01


@pytest.fixture(scope="module")
def layered_run(tiny_run, tiny_dataset, session_tmp):
    """A copy of the tiny model after ``pneumo-edge calibrate --gate
    mahalanobis+layer1+orientation`` (read-only)."""
    from conftest import copy_model_dir
    from pneumo_edge.train.recalibrate import CalibrateOptions, run_calibrate

    run = copy_model_dir(tiny_run, session_tmp("layered") / "run")
    lines = []
    opts = CalibrateOptions(device="cpu", gate="mahalanobis+layer1+orientation")
    assert run_calibrate(run, tiny_dataset, opts, log=lines.append) == 0
    return run, lines


def test_calibrate_records_the_first_stage_distance(layered_run, tmp_path):
    """The card records the first stage's threshold and budget; the exported fp32 graph's ood
    output is torch's, and flags the shipped photographs as torch does."""
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    from pneumo_edge.export.onnx import export_onnx
    from pneumo_edge.train.calibrate import _variants, shipped_photos

    from pneumo_edge.model.torchload import load_checked

    run, lines = layered_run
    model, card, ckpt = load_checked(run)
    g = card.metrics["ood"]
    assert card.net["ood"] == g["method"] == "mahalanobis+layer1+orientation"
    e, c = g["layer1"], g["comparison"][g["method"]]
    assert e["threshold"] == c["layer1_threshold"] and e["val_flagged"] <= e["budget"]
    assert c["val_flagged"] <= 0.005 and "orientation" in g
    assert "\n  first-stage distance: > " in "\n".join(lines)
    assert model.ood_early_whiten.abs().sum() > 0
    photos = shipped_photos()
    if not photos:
        pytest.skip("matplotlib ships no sample photographs here")
    x = _variants(photos, card.image_size)
    path = export_onnx(model, card, tmp_path / "m.onnx", weights_sha256=ckpt.sha256)
    _, ood = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"image": x})
    with torch.no_grad():
        want = model.outputs(torch.from_numpy(x))[1].numpy()
    assert np.all(np.abs(ood - want) <= 1e-4 * np.maximum(1.0, np.abs(want)))
    assert np.array_equal(ood > g["threshold"], want > g["threshold"])


@pytest.fixture(scope="module")
def oriented_run(tiny_run, tiny_dataset, session_tmp):
    """A copy of the tiny model after ``pneumo-edge calibrate --gate mahalanobis+orientation``
    (read-only)."""
    from conftest import copy_model_dir
    from pneumo_edge.train.recalibrate import CalibrateOptions, run_calibrate

    run = copy_model_dir(tiny_run, session_tmp("oriented") / "run")
    lines = []
    opts = CalibrateOptions(device="cpu", gate="mahalanobis+orientation")
    assert run_calibrate(run, tiny_dataset, opts, log=lines.append) == 0
    return run, lines


def test_calibrate_records_the_orientation_probe(oriented_run):
    from pneumo_edge.model.modeldir import read_card
    from pneumo_edge.model.torchload import load_model, read_checkpoint

    run, lines = oriented_run
    model, card = load_model(run)
    assert read_checkpoint(run).card == card == read_card(run)
    g = card.metrics["ood"]
    assert card.net["ood"] == g["method"] == "mahalanobis+orientation"
    o = g["orientation"]
    c = g["comparison"][g["method"]]
    assert o["threshold"] == c["orientation_threshold"] and g["threshold"] == c["threshold"]
    assert o["val_flagged"] <= o["budget"] == 0.0025 and c["val_flagged"] <= 0.005
    assert o["fitted_on"] == "train" and o["images"]["upright"] > 0
    kinds = {k: n for k, n in o["images"].items() if k != "upright"}
    assert set(kinds) == {"upside_down", "rotated_90", "rotated_270", "inverted",
                          "mirrored_inverted"}
    assert sum(kinds.values()) == o["images"]["upright"]
    assert "rotated" in c["families"]
    assert "\n  orientation probe: logit > " in "\n".join(lines)
    assert model.ood_orient.abs().sum() > 0  # fitted, not the zeros it is built with
    json.dumps(card.to_dict(), allow_nan=False)


@pytest.mark.parametrize("half", [False, True])
def test_onnx_carries_the_orientation_probe(oriented_run, tiny_dataset, tmp_path, half):
    """The exported graph's ood output is torch's combined score, on upright and turned
    images, including those where the probe's term is the larger one."""
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    from pneumo_edge.export.onnx import export_onnx
    from pneumo_edge.train.calibrate import mahalanobis, turn

    from pneumo_edge.inputs.folders import scan_labelled
    from pneumo_edge.inputs.pipeline import decode_labelled
    from pneumo_edge.model.torchload import load_checked

    run, _ = oriented_run
    model, card, ckpt = load_checked(run)
    path = export_onnx(model, card, tmp_path / "m.onnx", weights_sha256=ckpt.sha256, half=half)
    px, _, _ = decode_labelled(scan_labelled(tiny_dataset / "train").samples, card.image_size)
    x = np.ascontiguousarray(np.concatenate([px, turn(px, "upside_down"),
                                             turn(px, "rotated_90")]))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _, ood = sess.run(None, {"image": x})
    with torch.no_grad():
        _, _, feats, _, _ = model._deployed(torch.from_numpy(x))
        want = model.outputs(torch.from_numpy(x))[1].numpy()
    maha = mahalanobis(feats.double().numpy(), model.ood_means.double().numpy(),
                       model.ood_whiten.double().numpy())
    assert np.any(want > maha * 1.01)  # the probe's term decides some of these
    # relative, as parity's max_rel_diff; fp16 rounds the features the probe weighs (a few
    # per cent of its term on this tiny model, whose probe fits 24 images with large weights)
    tol = 5e-2 if half else 1e-4
    assert np.all(np.abs(ood - want) <= tol * np.maximum(1.0, np.abs(want)))


def test_calibrate_names_stale_exports_and_refuses_other_data(tiny_exported, tiny_dataset,
                                                              tiny_labelled, copy_run):
    from pneumo_edge.train.recalibrate import CalibrateOptions, run_calibrate

    from pneumo_edge.errors import PneumoError

    run = copy_run(tiny_exported)
    lines = []
    run_calibrate(run, tiny_dataset, CalibrateOptions(device="cpu"), log=lines.append)
    assert any("model.onnx" in ln and "stale" in ln for ln in lines)
    other = tiny_labelled.parent / "other_data"
    if not other.exists():
        import shutil

        shutil.copytree(tiny_labelled, other / "train")
    with pytest.raises(PneumoError, match="validation split differs"):
        run_calibrate(run, other, CalibrateOptions(device="cpu"), log=lines.append)


@pytest.mark.parametrize("half", [False, True])
def test_onnx_carries_calibration_and_gate(calibrated_run, tmp_path, half):
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    from pneumo_edge.export.onnx import export_onnx

    from pneumo_edge.model.torchload import load_checked

    run, _ = calibrated_run
    model, card, ckpt = load_checked(run)
    path = export_onnx(model, card, tmp_path / "m.onnx", weights_sha256=ckpt.sha256, half=half)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["probs", "ood"]
    x = np.random.default_rng(1).integers(0, 256, (5, 1, card.image_size, card.image_size),
                                          np.uint8)
    probs, ood = sess.run(None, {"image": x})
    with torch.no_grad():
        want_p, want_o = (t.numpy() for t in model.outputs(torch.from_numpy(x)))
    tol = 1e-2 if half else 1e-5
    assert np.abs(probs - want_p).max() <= tol
    assert np.abs(ood - want_o).max() <= tol * max(1.0, float(np.abs(want_o).max()))


def test_training_keeps_an_uncalibrated_model_when_the_fit_fails(tiny_run, tiny_dataset):
    """Validation labels that the model ranks backwards cannot be calibrated (1/T <= 0):
    training's hook warns and keeps the model instead of losing the run."""
    pytest.importorskip("torch")
    from pneumo_edge.train.calibrate import calibrate_trained

    from pneumo_edge.inputs.folders import scan_labelled
    from pneumo_edge.inputs.pipeline import decode_labelled
    from pneumo_edge.model.torchload import load_model

    model, card = load_model(tiny_run)
    px, labels, _ = decode_labelled(scan_labelled(tiny_dataset / "train").samples,
                                    card.image_size)
    lines = []
    out, same = calibrate_trained(model, card, {"train": (px, labels), "val": (px, 1 - labels)},
                                  "cpu", log=lines.append)
    assert out is model and same is card
    assert lines[-1].startswith("warning: calibration and input gate skipped: calibration "
                                "failed")


def test_export_parity_compares_the_ood_output(calibrated_run, copy_run, tiny_labelled):
    """Every exported form of a calibrated model carries both outputs, and parity.json says
    whether each flags the same images as torch at the card's gate threshold."""
    pytest.importorskip("onnxruntime")
    from pneumo_edge.export.main import run_export

    run = copy_run(calibrated_run[0])
    assert run_export(run, parity_data=str(tiny_labelled), allow_int8_fail=True) in (0, 1)
    report = json.loads((run / "parity.json").read_text())
    for form in ("onnx", "onnx-fp16"):
        entry = report["forms"][form]
        assert entry["ood"]["status"] == "pass" and entry["ood"]["flag_agreement"] == 1.0
    assert report["forms"]["onnx"]["ood"]["max_rel_diff"] < 1e-4


def _eval(run, data, tmp_path, *extra):
    from click.testing import CliRunner

    from pneumo_edge.cli import main

    out = tmp_path / f"eval{len(list(tmp_path.glob('eval*.json')))}.json"
    res = CliRunner().invoke(main, ["eval", "--model", str(run), "--data", str(data),
                                    "--runtime", "torch", "--out", str(out), "--resamples",
                                    "100", "--gallery", "0", *map(str, extra)])
    return res, (json.loads(out.read_text()) if res.exit_code == 0 else None)


def test_eval_prevalence_moves_probabilities_as_score_does(calibrated_run, tiny_labelled,
                                                           tmp_path):
    """eval --prevalence P: the probabilities are score --prevalence P's (same files, same
    numbers), every figure is that of the unmoved probabilities moved by hand with Bayes' rule
    on the odds, labels / ranking / ROC AUC stay, and the JSON says what moved and from what."""
    import csv
    import io

    from click.testing import CliRunner

    from pneumo_edge.cli import main
    from pneumo_edge.commands.evaluate import run_evaluation
    from pneumo_edge.runtimes import open_runtime

    run, _ = calibrated_run
    rt = open_runtime(run, "torch", log=lambda m: None)
    trained = rt.card.metrics["calibration"]["prevalence"]
    plain = run_evaluation(rt, tiny_labelled, resamples=100, gallery=0)
    moved = run_evaluation(rt, tiny_labelled, resamples=100, gallery=0, prevalence=0.1)
    r = (0.1 / 0.9) / (trained / (1 - trained))  # the odds ratio, by hand
    want = plain.p * r / (plain.p * r + 1 - plain.p)
    assert moved.paths == plain.paths and np.allclose(moved.p, want, rtol=0, atol=1e-12)
    assert not np.allclose(moved.p, plain.p)
    m0, m1 = plain.metrics, moved.metrics
    t = m0["threshold"] * r / (m0["threshold"] * r + 1 - m0["threshold"])
    assert m1["threshold"] == pytest.approx(t, abs=1e-12)
    for key in ("confusion_matrix", "accuracy", "recall", "specificity", "roc_auc"):
        assert m1[key] == m0[key], key
    truth = plain.truth.astype(float)
    assert m1["calibration"]["brier"] == pytest.approx(np.mean((want - truth) ** 2), abs=1e-12)
    assert m0["calibration"]["brier"] == pytest.approx(np.mean((plain.p - truth) ** 2),
                                                       abs=1e-12)
    pr = m1["prevalence"]
    assert (pr["deployment"], pr["trained"], pr["threshold_card"]) == \
        (0.1, trained, rt.card.threshold)
    assert pr["threshold"] == m1["threshold"] and pr["data"] == 0.5
    assert pr["calibration_unmoved"] == m0["calibration"] and "prevalence" not in m0
    # the same numbers as score --prevalence on the same files
    res = CliRunner().invoke(main, ["score", str(tiny_labelled), "--model", str(run),
                                    "--runtime", "torch", "--prevalence", "0.1"])
    assert res.exit_code == 0, res.output
    rows = {r["path"]: r for r in csv.DictReader(io.StringIO(res.stdout, newline=""))}
    for path, p in zip(moved.paths, moved.p):
        # six decimals in the CSV, float32 in score's output
        assert float(rows[path]["p_PNEUMONIA"]) == pytest.approx(p, abs=2e-6)
        assert (rows[path]["label"] == "PNEUMONIA") == (p >= m1["threshold"])


def test_eval_prevalence_in_the_json_text_and_report(calibrated_run, tiny_labelled, tmp_path):
    from pneumo_edge.commands.evaluate import format_metrics
    from pneumo_edge.model.modeldir import read_card
    from pneumo_edge.outputs.html_report import build_html

    run, _ = calibrated_run
    res, m = _eval(run, tiny_labelled, tmp_path, "--prevalence", "0.1", "--gallery", "1",
                   "--report", tmp_path / "r.html")
    assert res.exit_code == 0, res.output
    assert m["prevalence"]["deployment"] == 0.1
    assert "prevalence   0.1 (validation's" in res.stdout
    assert "Prevalence 0.1 (--prevalence" in (tmp_path / "r.html").read_text(encoding="utf-8")
    card = read_card(run)
    page = build_html(m, card)
    assert "Prevalence 0.1 (--prevalence" in page
    assert f"card threshold moved to prevalence 0.1 {m['threshold']:.4f}" in page
    assert f"{m['threshold']:.4f} (card, moved)" in page
    assert f"threshold    {m['threshold']:.4f}" in format_metrics(m, card)


@pytest.mark.parametrize("value", ["0", "1", "nan", "-0.2", "inf"])
def test_eval_refuses_a_prevalence_that_is_not_a_rate(calibrated_run, tiny_labelled, tmp_path,
                                                      value):
    res, _ = _eval(calibrated_run[0], tiny_labelled, tmp_path, "--prevalence", value)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--prevalence" in lines[0]


def test_eval_prevalence_needs_a_calibrated_model_and_a_rate(tiny_run, calibrated_run,
                                                             tiny_labelled, tmp_path):
    from pneumo_edge.commands.evaluate import run_evaluation
    from pneumo_edge.errors import UsageError
    from pneumo_edge.runtimes import open_runtime

    res, _ = _eval(tiny_run, tiny_labelled, tmp_path, "--prevalence", "0.1")
    assert res.exit_code == 2 and "--prevalence needs a calibrated" in res.stderr
    rt = open_runtime(calibrated_run[0], "torch", log=lambda m: None)
    for bad in (float("nan"), 0.0, 1.5):  # the library call refuses what the CLI would
        with pytest.raises(UsageError, match="not a rate strictly between 0 and 1"):
            run_evaluation(rt, tiny_labelled, prevalence=bad)


def test_a_card_json_with_another_gate_threshold_or_prevalence_is_refused(calibrated_run,
                                                                          tmp_path):
    """The qc column uses the card's gate threshold, --prevalence its validation rate: a
    card.json that disagrees with the card inside the model file on either must be refused
    like one that disagrees on the decision threshold (modeldir.AGREED_METRICS)."""
    pytest.importorskip("onnxruntime")
    from pneumo_edge.export.onnx import export_onnx

    from pneumo_edge.model.modeldir import Refused
    from pneumo_edge.model.torchload import load_checked
    from pneumo_edge.runtimes import open_runtime

    run, _ = calibrated_run
    model, card, ckpt = load_checked(run)
    edge = tmp_path / "edge"
    edge.mkdir()
    export_onnx(model, card, edge / "model.onnx", weights_sha256=ckpt.sha256)
    changed = card.to_dict()
    changed["metrics"]["ood"]["threshold"] *= 100
    changed["metrics"]["calibration"]["prevalence"] = 0.01
    (edge / "card.json").write_text(json.dumps(changed))
    with pytest.raises(Refused):
        open_runtime(edge, "onnx", log=lambda m: None)


def test_ood_benchmark_reports_real_x_rays_of_a_held_out_cluster(calibrated_run, tiny_dataset,
                                                                  monkeypatch):
    """benchmarks/ood.py's held-out acquisition cluster row: absent for a run without the
    cluster proxy (split_pixels gives None), and, given the internal test X-rays themselves as
    the 'cluster', the same flagged share as the test row and a ROC AUC of exactly 0.5."""
    import importlib.util
    from pathlib import Path

    from pneumo_edge.train.recalibrate import split_pixels

    from pneumo_edge.model.torchload import load_model

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("ood_under_test", bench / "ood.py")
    ood = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ood)
    run, _ = calibrated_run
    model, card = load_model(run)
    parts = split_pixels(run, tiny_dataset, card, lambda m: None, holdout=True)
    assert parts["cluster_holdout"] is None
    test = parts["test"][0] if parts["test"] is not None else parts["val"][0]
    assert ood.HOLDOUT not in {r["set"] for r in ood.figures(model, card, test)}
    rows = ood.figures(model, card, test, holdout_px=test.copy())
    by = {(r["set"], r["score"]): r for r in rows}
    method = card.metrics["ood"]["method"]
    held, same = by[(ood.HOLDOUT, method)], by[("internal test X-rays", method)]
    assert held["n"] == same["n"] == len(test) and held["in_graph"]
    assert held["flagged"] == same["flagged"] and held["roc_auc"] == pytest.approx(0.5)
    assert list(dict.fromkeys(r["set"] for r in rows))[:2] == ["internal test X-rays",
                                                               ood.HOLDOUT]

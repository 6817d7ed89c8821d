"""The training recipe's pieces: time budget, three-way patient split, shifted validation."""

import json

import numpy as np
import pytest
from pneumo_edge.train.budget import Plan, lr_factor, parse_duration


@pytest.mark.parametrize("text,seconds", [("55m", 3300), ("1h", 3600), ("1h30m", 5400),
                                          ("900s", 900), ("90", 5400), ("0.5m", 30)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["abc", "5x", "-3m", "nan", "inf", "m", ""])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_no_budget():
    assert parse_duration("none") is None and parse_duration("0") is None


def test_cosine_warms_up_then_reaches_zero_at_the_plan_end():
    f = [lr_factor("cosine", s, 100, 10) for s in range(101)]
    assert f[0] == pytest.approx(0.05) and f[10] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:11]))  # rising warm-up
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then falling
    assert f[100] == pytest.approx(0.0, abs=1e-12)


def test_plan_fits_epochs_to_budget_and_only_shrinks():
    plan = Plan(None, budget_s=1000, steps_per_epoch=10)
    assert plan.epochs == 100  # unmeasured: the cap
    # 1 epoch done at 100 s each, 50 s spent decoding, 150 s kept for the final evaluation
    assert plan.replan(1, elapsed_s=150, epoch_s=100, reserve_s=150)
    assert plan.epochs == 1 + 7  # (1000 - 150 - 150) // 100
    plan.replan(2, elapsed_s=250, epoch_s=100, reserve_s=150)
    assert plan.epochs == 8  # on track: unchanged
    plan.replan(3, elapsed_s=500, epoch_s=250, reserve_s=150)  # the machine got slower
    assert plan.epochs == 4 and not plan.should_stop(3) and plan.should_stop(4)
    plan.replan(4, elapsed_s=510, epoch_s=1, reserve_s=0)  # never grows back
    assert plan.epochs == 4


def test_plan_without_budget_uses_epochs():
    plan = Plan(7, None, 10)
    assert plan.replan(1, 1e9, 1e9, 0) == "" and plan.epochs == 7
    assert Plan(None, None, 10).epochs == 10


def _samples(n_patients=60, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_patients):
        label = int(p % 3 != 0)  # 1/3 NORMAL
        for k in range(int(rng.integers(1, 4))):
            cls = "PNEUMONIA" if label else "NORMAL"
            out.append((f"/d/train/{cls}/person{p}_bacteria_{k}.jpeg", label))
    return out


def test_three_way_split_keeps_patients_apart_and_is_deterministic():
    from pneumo_edge.train.data import grouped_stratified_split

    from pneumo_edge.inputs.folders import patient_id

    samples = _samples()
    sp = grouped_stratified_split(samples, 0.15, seed=3, test_fraction=0.15)
    parts = [sp.train, sp.val, sp.test]
    assert sum(map(len, parts)) == len(samples)
    ids = [{patient_id(p) for p, _ in part} for part in parts]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for part in (sp.val, sp.test):  # both classes, about 15 % each
        labels = [y for _, y in part]
        assert 0 < sum(labels) < len(labels)
        assert 0.08 * len(samples) <= len(part) <= 0.25 * len(samples)
    again = grouped_stratified_split(samples, 0.15, seed=3, test_fraction=0.15)
    assert (again.train, again.val, again.test) == (sp.train, sp.val, sp.test)
    other = grouped_stratified_split(samples, 0.15, seed=4, test_fraction=0.15)
    assert other.test != sp.test


def test_split_without_test_matches_the_two_way_split():
    from pneumo_edge.train.data import grouped_stratified_split

    sp = grouped_stratified_split(_samples(), 0.3, seed=1)
    assert sp.test == [] and sp.info["test"] == 0 and len(sp.val) > 0


def _pixels(n=24, size=64, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    base = (40 + 150 * np.exp(-((yy - size / 2) ** 2 + (xx - size / 3) ** 2) / 200.0))
    return np.stack([np.clip(base + rng.normal(0, 5, base.shape), 0, 255)
                     .astype(np.uint8)[None] for _ in range(n)])


@pytest.mark.parametrize("name", __import__("pneumo_edge.train.shift", fromlist=["x"])
                         .PERTURBATIONS)
def test_each_perturbation_changes_pixels_deterministically(name):
    from pneumo_edge.train.shift import perturb

    px = _pixels()
    a, b = perturb(px, name, seed=5), perturb(px, name, seed=5)
    assert a.dtype == np.uint8 and a.shape == px.shape
    assert np.array_equal(a, b)
    changed = np.mean(a.astype(int) != px.astype(int))
    assert changed > 0.2, f"{name} changed only {changed:.1%} of the pixels"


def test_shifted_set_uses_every_perturbation_about_equally():
    from pneumo_edge.train.shift import PERTURBATIONS, shifted_set

    px = _pixels(n=48)
    out, which = shifted_set(px, seed=2)
    counts = np.bincount(which, minlength=len(PERTURBATIONS))
    assert counts.min() >= 48 // len(PERTURBATIONS) and counts.max() <= counts.min() + 1
    assert not np.array_equal(out, px)
    out2, which2 = shifted_set(px, seed=2)
    assert np.array_equal(out, out2) and np.array_equal(which, which2)


torch_needed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("torch") is None, reason="training needs torch")


@torch_needed
def test_tiny_run_stops_within_its_time_budget_with_a_completed_schedule(tmp_path):
    """A budget of 40 s on the tiny data: the plan is fitted after the first epoch, the run
    trains fewer epochs than its cap and ends with the learning rate at the schedule's end."""
    from conftest import write_labelled
    from pneumo_edge.train.loop import TrainConfig, train

    write_labelled(tmp_path / "data" / "train", per_class=24, seed=7)
    budget = 40.0
    result = train(TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"),
                               arch="resnet18", image_size=64, batch_size=8, workers=0,
                               device="cpu", amp=False, min_epochs=1, time_budget=budget,
                               epochs=None, augment="none"))
    t = result["time"]
    assert t["epochs_trained"] == t["planned_epochs"] < 100
    assert t["total_s"] <= budget * 1.5  # the plan keeps slack; never far past the budget
    history = result["history"]
    # the schedule ran into its decay (on a quiet machine it ends at 0; a machine that turns busy
    # mid-run makes the plan stop early, which is the budget working, so allow half the peak)
    peak = max(r["lr"] for r in history)
    assert t["planned_epochs"] >= 2 and history[-1]["lr"] <= 0.5 * peak
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("val", "shifted_val", "test", "threshold_rules", "shifted_val_per_perturbation"):
        assert key in metrics
    assert metrics["test"]["n"] > 0  # the internal test split (no DATA/test here)

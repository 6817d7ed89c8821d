"""The training recipe's pieces: time budget, three-way patient split, shifted validation,
the recipe options of issue 22 and the ablation runner's row planning."""

import json
from itertools import pairwise

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
    assert all(a <= b for a, b in pairwise(f[:11]))  # rising warm-up
    assert all(a >= b for a, b in pairwise(f[10:]))  # then falling
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
                               epochs=None, augment="none",
                               # the reserve for calibration and the gate, sized for real data
                               # (test_train), would take most of 40 s on these few images
                               calibrate=False))
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


class _AugmentBeforeIssue22:
    """The strong/basic augmentation exactly as it was before the recipe options of issue 22
    (train/data.py at ba77211): the reference the defaults must reproduce."""

    def __init__(self, size, preset):
        from torchvision.transforms import v2

        self.strong = preset == "strong"
        steps = [v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.15),
                                      antialias=True)] if self.strong else []
        steps += [v2.RandomAffine(degrees=10.0, translate=(0.05, 0.05) if self.strong
                                  else (0.1, 0.1)),
                  v2.RandomHorizontalFlip(0.5), v2.ColorJitter(brightness=0.2, contrast=0.2)]
        self.t = v2.Compose(steps)
        self.blur = v2.GaussianBlur(5, sigma=(0.1, 1.2)) if self.strong else None

    def __call__(self, x):
        import torch

        x = self.t(x)
        if not self.strong:
            return x
        if torch.rand(()) < 0.3:
            x = self.blur(x)
        y = x.float() / 255.0
        gamma = float(torch.empty(()).uniform_(-0.4, 0.4).exp())
        y = y.clamp_min(0).pow(gamma) * 255.0
        if torch.rand(()) < 0.3:
            y = y + torch.randn_like(y) * float(torch.empty(()).uniform_(2.0, 8.0))
        return y.round_().clamp_(0, 255).to(torch.uint8)


@torch_needed
@pytest.mark.parametrize("preset", ["strong", "basic"])
def test_default_options_reproduce_the_augmentation_of_before_bit_for_bit(preset):
    import torch
    from pneumo_edge.train.config import TrainConfig
    from pneumo_edge.train.data import augment_for

    x = torch.from_numpy(_pixels(n=1, size=64)[0])
    new = augment_for(TrainConfig(data="d", out="o", image_size=64, augment=preset))
    old = _AugmentBeforeIssue22(64, preset)
    for seed in range(8):
        torch.manual_seed(seed)
        a = old(x.clone())
        after_old = torch.rand(())
        torch.manual_seed(seed)
        b = new(x.clone())
        assert torch.equal(a, b), f"seed {seed}"
        assert torch.rand(()) == after_old  # the same number of draws: later items unchanged


@torch_needed
def test_recipe_options_change_the_augmentation_as_stated():
    import torch
    from pneumo_edge.train.config import TrainConfig
    from pneumo_edge.train.data import augment_for

    x = torch.full((1, 80, 80), 200, dtype=torch.uint8)
    zoom = augment_for(TrainConfig(data="d", out="o", image_size=64, augment="basic",
                                   zoom_out=1.0, zoom_out_min=0.5, jitter=0.0))
    torch.manual_seed(0)
    borders = []
    for _ in range(10):
        y = zoom(torch.full((1, 64, 64), 200, dtype=torch.uint8))
        assert y.shape == (1, 64, 64) and y.dtype == torch.uint8
        borders.append(float((y == 0).float().mean()))
    assert min(borders) > 0 and max(borders) > 0.3  # black canvas around a shrunk image
    crop = augment_for(TrainConfig(data="d", out="o", image_size=64, crop_scale="0.08,1",
                                   train_cache_size=80))
    assert crop.t.transforms[0].scale == (0.08, 1.0)
    assert crop(x).shape == (1, 64, 64)  # 80 px cache, cropped to --image-size
    assert augment_for(TrainConfig(data="d", out="o", jitter=0.3)).t.transforms[-1] \
        .brightness == (0.7, 1.3)


def test_training_crops_come_from_a_larger_cache_by_default_and_only_with_strong_crops():
    """Issue 22's row 4 became the default: the training pixels are cached at 8/7 of
    --image-size (256 at 224) for --augment strong, whose crops bring them back to the model's
    size; basic augmentation has no crops and keeps --image-size; an explicit size wins."""
    pytest.importorskip("torch")
    from pneumo_edge.train.config import TrainConfig

    def size(**kw):
        return TrainConfig(data="d", out="o", **kw).crop_source_size

    assert size() == 256 and size(image_size=64) == 73
    assert size(augment="basic") == 224 and size(train_cache_size=224) == 224
    # a run records the size it used, never the default's name for it
    assert TrainConfig(data="d", out="o").resolved().train_cache_size == 256


def test_class_weight_power_interpolates_between_inverse_frequency_and_none():
    pytest.importorskip("torch")
    from pneumo_edge.train.data import class_weights

    labels = np.array([0] * 10 + [1] * 30)
    full = class_weights(labels, 2, "auto")
    assert class_weights(labels, 2, "auto", 1.0) == full == [2.0, 2 / 3]
    assert class_weights(labels, 2, "auto", 0.0) == [1.0, 1.0]
    half = class_weights(labels, 2, "auto", 0.5)
    assert half == pytest.approx([2 ** 0.5, (2 / 3) ** 0.5])


@torch_needed
@pytest.mark.parametrize("opts,msg", [
    ({"crop_scale": "0.9,0.5"}, "--crop-scale"), ({"crop_scale": "a"}, "--crop-scale"),
    ({"jitter": 1.5}, "--jitter"), ({"zoom_out": -0.1}, "--zoom-out"),
    ({"zoom_out_min": 0.1}, "--zoom-out-min"),
    ({"train_cache_size": 200}, "smaller than --image-size"),
    ({"train_cache_size": 256, "augment": "basic"}, "needs --augment strong"),
    ({"average": "mean"}, "--average"), ({"swa_epochs": 0}, "--swa-epochs"),
    ({"class_weight_power": 0.5, "class_weights": "none"}, "auto only"),
    ({"class_weight_power": 2.0}, "--class-weight-power"),
    ({"proxy": "clusters"}, "--proxy"), ({"proxy_clusters": 1}, "--proxy-clusters"),
    ({"proxy_min_images": 0}, "--proxy-min-images")])
def test_recipe_options_are_checked(opts, msg):
    from pneumo_edge.train.config import TrainConfig, check_config

    from pneumo_edge.errors import UsageError

    with pytest.raises(UsageError, match=msg):
        check_config(TrainConfig(data="d", out="o", **opts))


@torch_needed
def test_swa_average_recomputes_batchnorm_on_the_training_pass():
    """recompute_bn gives the plain mean and variance of the pass (not a moving average)."""
    import torch
    from pneumo_edge.train.loop import recompute_bn

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(1)

        def logits(self, x):
            return self.bn(x.float())

    net = Net()
    net.bn.running_mean.fill_(123.0)
    batches = [(torch.full((2, 1, 4, 4), v), torch.zeros(2)) for v in (10.0, 30.0)]
    recompute_bn(net, batches, torch.device("cpu"))
    assert net.bn.running_mean.item() == pytest.approx(20.0)
    assert net.bn.momentum == 0.1 and not net.training


def _ablation(path=None):
    """benchmarks/ablation.py as a module (or the copy of it at ``path``)."""
    import importlib.util
    from pathlib import Path

    path = path or Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"
    spec = importlib.util.spec_from_file_location("ablation_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_r50_suite_rows_change_one_thing_each_against_the_default_recipe():
    pytest.importorskip("torch")
    from dataclasses import fields

    from pneumo_edge.train.config import TrainConfig

    ab = _ablation()
    rows = ab.SUITES["r50"]
    base = dict(zip(rows[0][1][::2], rows[0][1][1::2]))
    assert base["--proxy"] == "cluster" and base["--arch"] == "resnet50"
    # today's default recipe is the baseline with the adopted rows' changes: every option
    # they spell out is the default (the cache size's default resolved for ResNet50 at 224)
    defaults = {f"--{f.name.replace('_', '-')}": f.default for f in fields(TrainConfig)}
    defaults["--train-cache-size"] = TrainConfig(data="d", out="o").crop_source_size
    adopted = dict(base)
    for i in ab.R50_ADOPTED:
        adopted.update(dict(zip(rows[i][1][::2], rows[i][1][1::2])))
    assert adopted["--train-cache-size"] == "256" != base["--train-cache-size"]
    for opt, value in adopted.items():
        if opt in ("--proxy", "--time-budget", "--epochs"):
            continue
        want = defaults[opt]
        assert (value == want if isinstance(want, str) else float(value) == float(want)), opt
    # fixed epochs instead of the budget (load must not change a row's epochs): what the
    # default's budget gave on a quiet machine, and about as long as that budget
    assert base["--time-budget"] == "none" and int(base["--epochs"]) == ab.R50_EPOCHS
    assert abs(ab.budget_minutes(rows[0][1]) - defaults["--time-budget"] / 60) < 6
    for name, args in rows[1:]:
        opts = dict(zip(args[::2], args[1::2]))
        changed = {k for k in opts if opts[k] != base.get(k)}
        assert 1 <= len(changed) <= 2 and set(opts) >= set(base), name
    est = ab.estimate_hours([(i, a) for i, (_, a) in enumerate(rows)],
                            __import__("pathlib").Path("/nonexistent"))
    assert est.startswith(f"{len(rows)} of {len(rows)} rows to run: about ")


def test_row_state_tells_done_from_interrupted(tmp_path):
    ab = _ablation()
    assert ab.row_state(tmp_path) == "new"
    (tmp_path / "last.pt").write_bytes(b"x")
    assert ab.row_state(tmp_path) == "resume"
    (tmp_path / "metrics.json").write_text(json.dumps({"val": {}}))  # written by a Ctrl-C
    assert ab.row_state(tmp_path) == "resume"
    (tmp_path / "metrics.json").write_text(json.dumps({"ablation": {"minutes": 1}}))
    assert ab.row_state(tmp_path) == "done"


@torch_needed
def test_ablation_runner_end_to_end_on_a_tiny_suite_then_skips_finished_rows(tmp_path):
    """Two rows (baseline, one change) of resnet18 at 32 px for one epoch on two generated
    'sites', with the cluster proxy: both rows run, their table has the holdout's figures,
    and a second call runs nothing."""
    from test_clusters import write_sites

    ab = _ablation()
    data = write_sites(tmp_path / "data", patients=60)
    base = {"--arch": "resnet18", "--image-size": "32", "--time-budget": "none",
            "--epochs": "1", "--min-epochs": "1", "--batch-size": "8", "--workers": "0",
            "--device": "cpu", "--no-calibrate": None, "--proxy": "cluster",
            "--proxy-clusters": "2", "--proxy-min-images": "5"}
    suite = [(n, [x for x in args if x is not None]) for n, args in ab.against(
        base, [("baseline", {}), ("crop 0.3-1", {"--crop-scale": "0.3,1"})])]
    out, md = tmp_path / "ab", tmp_path / "table.md"
    done = ab.run_suite(str(data), out, suite, md=str(md))
    assert [name for name, _ in done] == ["baseline", "crop 0.3-1"]
    for i, (_, r) in enumerate(done):
        assert r["cluster_holdout"]["n"] > 0 and r["proxy"]["k"] == 2
        assert r["ablation"]["args"] == suite[i][1] and not r["ablation"]["resumed"]
    card = json.loads((out / "row01" / "card.json").read_text())
    assert card["train_config"]["crop_scale"] == "0.3,1"
    assert card["metrics"]["cluster_holdout"]["n"] == done[1][1]["cluster_holdout"]["n"]
    text = md.read_text()
    assert "| cluster holdout |" in text and "held out acquisition cluster" in text
    assert (out / "pixel-cache").is_dir() and not (out / "row00" / "pixel-cache").exists()
    stamp = (out / "row00" / "metrics.json").stat().st_mtime_ns
    again = ab.run_suite(str(data), out, suite)
    assert [r for _, r in again] == [r for _, r in done]
    assert (out / "row00" / "metrics.json").stat().st_mtime_ns == stamp


def test_recorded_rows_count_as_done_on_another_machine_and_stale_ones_are_refused(
        tmp_path, monkeypatch):
    """A suite longer than one session: each finished row is written to the record folder
    (kept in git); a later run with an empty OUT (a new machine) trains nothing for recorded
    rows, and its table shows every recorded row in the suite's order. A record whose options
    differ from the row's now is an error, never reused."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    ab = _ablation()
    suite = [("baseline", ["--epochs", "1"]), ("change", ["--epochs", "1", "--jitter", "0.3"])]
    record = tmp_path / "record"
    fake = {i: {"val": {}, "ablation": {"minutes": 1.0, "args": args}}
            for i, (_, args) in enumerate(suite)}
    trained = []

    def run_row(data, out, args, cache=None):  # the training itself is the test above's
        trained.append(out.name)
        return fake[int(out.name[3:])]

    monkeypatch.setattr(ab, "run_row", run_row)
    monkeypatch.setattr(ab, "report", lambda done: " ".join(name for name, _ in done))
    assert ab.run_suite("data", tmp_path / "m1", suite, pick=[1], record=record) == \
        [("change", fake[1])]
    saved = json.loads((record / "row01.json").read_text())
    assert saved["ablation"]["args"] == suite[1][1] and saved["ablation"]["machine"]["cpu"]
    assert trained == ["row01"] and not (record / "row00.json").exists()
    md = tmp_path / "table.md"
    ab.run_suite("data", tmp_path / "m2", suite, pick=[0, 1], md=str(md), record=record)
    assert trained == ["row01", "row00"] and md.read_text() == "baseline change"
    assert "0 of 2 rows to run" in ab.estimate_hours(list(enumerate(a for _, a in suite)),
                                                     tmp_path / "m3", record)
    stale = [("baseline", ["--epochs", "2"]), suite[1]]
    with pytest.raises(SystemExit, match="row00.json: recorded with other options"):
        ab.run_suite("data", tmp_path / "m3", stale, record=record)


def test_the_repositorys_recorded_r50_rows_are_accepted_by_todays_suite():
    """The baseline spells out options added after rows were recorded (the cache size, when
    its default changed); every recorded row must still match its row, never be refused or
    silently stand for another recipe."""
    from pathlib import Path

    ab = _ablation()
    record = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation-r50"
    rows = ab.SUITES["r50"]
    found = sorted(record.glob("row*.json"))
    assert found
    for path in found:
        i = int(path.stem[3:])
        assert ab.recorded(record, i, rows[i][1]) is not None, path.name
    with pytest.raises(SystemExit, match="recorded with other options"):
        ab.recorded(record, 4, rows[0][1])  # row 4 (cache 256) never stands for the baseline


def test_ablation_runner_refuses_a_snapshot_whose_rows_would_import_the_checkout(tmp_path):
    """A suite runs for hours from a snapshot; with an editable install pneumo_edge.train is
    found in the checkout unless the snapshot links it in, and an edit there would change a
    row half-way. The runner must see that before training, and accept its own checkout."""
    import shutil

    checkout = _ablation()
    checkout.check_code_origin()  # the checkout's runner, the checkout's code: fine
    runner = tmp_path / "benchmarks" / "ablation.py"
    runner.parent.mkdir()
    shutil.copy(checkout.__file__, runner)
    with pytest.raises(SystemExit, match="outside this runner's tree"):
        _ablation(runner).check_code_origin()

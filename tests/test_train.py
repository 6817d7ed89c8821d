"""Training on generated data: it learns, and its options, outputs and errors behave."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch", reason="training needs torch")

from conftest import ctrl_c_enabled, write_labelled  # noqa: E402
from pneumo_edge.train.data import class_weights, grouped_stratified_split  # noqa: E402
from pneumo_edge.train.loop import TrainConfig, train  # noqa: E402

from pneumo_edge.cli import main  # noqa: E402
from pneumo_edge.model.card import Card  # noqa: E402
from pneumo_edge.model.modeldir import read_card

QUICK = dict(arch="resnet18", image_size=64, batch_size=16, workers=0, device="cpu", ema=0.0,
             amp=False, min_epochs=1)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def learned(session_tmp):
    data = session_tmp("learn")
    write_labelled(data / "train", per_class=40, seed=3)
    write_labelled(data / "test", per_class=10, seed=4)
    out = session_tmp("learn_run")
    result = train(TrainConfig(data=str(data), out=str(out), epochs=6, lr=2e-3,
                               select="val_f1", force=True, **QUICK))
    return data, out, result


def test_training_learns_well_above_chance(learned):
    _, out, result = learned
    assert result["val"]["accuracy"] >= 0.85
    assert result["val"]["roc_auc"] >= 0.9
    assert result["test"]["accuracy"] >= 0.8  # test/ evaluated with the val-chosen threshold
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 6 and history[0].startswith("epoch,train_loss,val_loss")


def test_model_directory_contents_and_weights_only_checkpoint(learned):
    _, out, result = learned
    for name in ("model.pt", "card.json", "metrics.json", "history.csv", "curves.png",
                 "confusion.png"):
        assert (out / name).stat().st_size > 0, name
    ckpt = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    card = read_card(out)
    assert Card.from_dict(ckpt["card"]) == card
    assert card.classes == ["NORMAL", "PNEUMONIA"] and card.positive_class == "PNEUMONIA"
    assert card.metrics["best_epoch"] == result["best_epoch"]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc",
                "confusion_matrix"):
        assert key in metrics["val"] and key in metrics["test"]
    assert card.train_config["class_weight_values"] is not None


def test_card_threshold_and_metrics_reproduce_on_the_recorded_val_split(learned):
    """Re-run the saved model on the val files the card names: same metrics as recorded."""
    from pneumo_edge.evaluation.metrics import binary_metrics
    from pneumo_edge.inputs.pipeline import decode_labelled, predict
    from pneumo_edge.runtimes import open_runtime

    data, out, _ = learned
    card = read_card(out)
    files = card.split["val_files"]
    labels = [card.classes.index(f.split("/")[1]) for f in files]
    px, y, failed = decode_labelled([(str(data / f), lab) for f, lab in zip(files, labels)], 64)
    probs = predict(open_runtime(out, "torch"), px)
    m = binary_metrics(y == 1, probs[:, 1], card.threshold)
    assert not failed
    for key in ("accuracy", "f1", "recall"):
        assert m[key] == pytest.approx(card.metrics["val"][key], abs=1e-9)


def test_eval_command_prints_and_writes_metrics(learned, tmp_path):
    data, out, result = learned
    res = cli("eval", "--model", out, "--data", data / "test", "--out", tmp_path / "m.json")
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and "PNEUMONIA" in res.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["accuracy"] == pytest.approx(result["test"]["accuracy"])


def test_grouped_split_is_stratified_deterministic_and_leak_free():
    samples = []
    for p in range(60):  # 60 patients, 1-3 images each, positives = patients 0..39
        for k in range(1 + p % 3):
            samples.append((f"/d/person{p}_bacteria_{k}.jpeg" if p < 40
                            else f"/d/IM-{p:04d}-000{k}.jpeg", int(p < 40)))
    a = grouped_stratified_split(samples, 0.3, seed=7)
    b = grouped_stratified_split(samples, 0.3, seed=7)
    c = grouped_stratified_split(samples, 0.3, seed=8)
    assert a.val == b.val and a.val != c.val
    assert len(a.train) + len(a.val) == len(samples)
    from pneumo_edge.inputs.folders import patient_id
    assert not {patient_id(s[0]) for s in a.train} & {patient_id(s[0]) for s in a.val}
    for label in (0, 1):
        n = sum(s[1] == label for s in samples)
        nv = sum(s[1] == label for s in a.val)
        assert abs(nv / n - 0.3) < 0.08


def test_class_weights():
    w = class_weights(np.array([0] * 10 + [1] * 30), 2, "auto")
    assert w == pytest.approx([2.0, 2 / 3])
    assert class_weights(np.array([0, 1]), 2, "none") is None
    assert class_weights(np.array([0, 1]), 2, "1,0.5") == [1.0, 0.5]
    with pytest.raises(ValueError):
        class_weights(np.array([0, 1]), 2, "1,2,3")


def test_resume_continues_from_last_epoch(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(tiny_dataset), out=str(out), epochs=1, **QUICK))
    with pytest.raises(Exception, match="already holds a model"):
        train(TrainConfig(data=str(tiny_dataset), out=str(out), epochs=2, **QUICK))
    result = train(TrainConfig(data=str(tiny_dataset), out=str(out), epochs=2, resume=True,
                               **QUICK))
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    assert len((out / "history.csv").read_text().splitlines()) == 3


def _last_config(run) -> dict:
    """The options the run in ``run`` was trained with, as its last.pt records them."""
    return json.loads(torch.load(run / "last.pt", weights_only=True)["config"])


@pytest.mark.parametrize("change,option", [
    ({"seed": 7}, "--seed"),  # another split: test images could have been trained on
    ({"val_fraction": 0.3}, "--val-fraction"),
    ({"test_fraction": 0.3}, "--test-fraction"),
    ({"jitter": 0.3}, "--jitter"),  # another recipe than the card would record
    ({"lr": 0.01}, "--lr"),
])
def test_resume_refuses_options_that_shape_the_split_or_training(tiny_run, tmp_path, change,
                                                                 option):
    from pneumo_edge.errors import UsageError

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    cfg = TrainConfig(**{**_last_config(out), "out": str(out), "resume": True, **change})
    with pytest.raises(UsageError, match=f"--resume: {option} was .* now"):
        train(cfg)
    assert (out / "last.pt").is_file()


def test_resume_may_extend_the_run_and_move_it(tiny_run, tmp_path):
    from pneumo_edge.train.rundir import changed_options

    cfg = _last_config(tiny_run)
    moved = TrainConfig(**{**cfg, "epochs": 9, "time_budget": None, "device": "cpu",
                           "workers": 0, "cache": str(tmp_path / "c"), "resume": True})
    assert changed_options(cfg, moved) == []
    old = {k: v for k, v in cfg.items() if k not in ("jitter", "proxy")}  # before the options
    assert changed_options(old, TrainConfig(**cfg)) == []


def test_resume_of_a_run_from_before_the_cache_default_changed_keeps_its_cache_size():
    """Runs recorded --train-cache-size as null when null meant --image-size; today's null
    means 8/7 of it (strong crops). Resuming such a run must not switch its crops silently."""
    from pneumo_edge.train.rundir import changed_options

    now = TrainConfig(data="d", out="o")
    old = json.loads(json.dumps(dataclasses.asdict(now)))
    old["train_cache_size"] = None  # how runs before the change recorded the default
    assert changed_options(old, now) == [("train_cache_size", 224, 256)]
    assert changed_options(old, TrainConfig(data="d", out="o", train_cache_size=224)) == []
    assert changed_options(json.loads(json.dumps(dataclasses.asdict(
        now.resolved()))), now) == []


def test_unreadable_images_are_skipped_named_and_counted(tmp_path, capsys):
    data = tmp_path / "d"
    write_labelled(data / "train", per_class=16)
    (data / "train" / "NORMAL" / "broken.png").write_bytes(b"not a png")
    (data / "train" / "PNEUMONIA" / "empty.jpeg").write_bytes(b"")
    train(TrainConfig(data=str(data), out=str(tmp_path / "r"), epochs=1, **QUICK))
    err = capsys.readouterr().err
    assert "broken.png: not a recognised image file" in err and "empty.jpeg: empty file" in err
    assert read_card(tmp_path / "r").data["skipped_unreadable"] == 2


def test_local_weights_file_is_loaded_and_bad_ones_refused(tiny_dataset, tmp_path):
    import torchvision

    src = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(src.conv1.weight, 0.01)
    wfile = tmp_path / "r18.pth"
    torch.save(src.state_dict(), wfile)
    from pneumo_edge.model.net import build_model
    m = build_model("resnet18", 2, str(wfile))
    assert torch.allclose(m.backbone.conv1.weight, torch.full_like(m.backbone.conv1.weight, 0.01))
    res = cli("train", "--data", tiny_dataset, "--out", tmp_path / "x", "--arch", "resnet50",
              "--weights", wfile, "--epochs", "1")
    assert res.exit_code == 2 and "do not fit this architecture" in res.output


def test_imagenet_weights_absent_gives_clear_message(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    res = cli("train", "--data", tiny_dataset, "--out", tmp_path / "x", "--arch", "resnet18",
              "--weights", "imagenet", "--epochs", "1")
    assert res.exit_code == 2
    assert "resnet18-f37072fd.pth" in res.output and "--weights none" in res.output


@pytest.mark.parametrize("layout,msg", [
    (None, "no such folder"),
    ({}, "no train/ folder"),
    ({"train/": None}, "no class folders"),
    ({"train/A/1.png": 1}, "only one class"),
    ({"train/A/1.png": 1, "train/B/": None}, "class folder has no image files"),
])
def test_bad_datasets_exit_2_with_one_line(tmp_path, layout, msg):
    root = tmp_path / "data"
    if layout is not None:
        root.mkdir()
        for rel, v in layout.items():
            p = root / rel
            if rel.endswith("/"):
                p.mkdir(parents=True, exist_ok=True)
            else:
                write_labelled(tmp_path / "src", per_class=1)
                p.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(next((tmp_path / "src" / "NORMAL").iterdir()), p)
    res = cli("train", "--data", root, "--out", tmp_path / "out", "--arch", "resnet18")
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0]
    assert "Traceback" not in res.output


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_leaves_best_checkpoint_usable_and_resume_continues(tiny_dataset, tmp_path, sig):
    """A real SIGINT (Ctrl-C) or SIGTERM to a real training process after its first epoch."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    args = ["--data", str(tiny_dataset), "--out", str(out), "--arch", "resnet18",
            "--image-size", "64", "--min-epochs", "1", "--workers", "0", "--batch-size", "16"]
    proc = subprocess.Popen([sys.executable, "-m", "pneumo_edge", "train", *args,
                             "--epochs", "200"],
                            stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_enabled)
    for line in proc.stderr:
        if line.startswith("epoch 1/"):
            proc.send_signal(getattr(signal, sig))
            break
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130
    assert "interrupted after epoch" in err and "--resume" in err
    card = read_card(out)
    assert torch.load(out / "model.pt", weights_only=True)["card"] == card.to_dict()
    done = int(err.split("interrupted after epoch ")[1].split(":")[0])
    assert 1 <= done < 200
    res = cli("train", *args, "--epochs", str(done + 1), "--resume")
    assert res.exit_code == 0, res.output
    rows = (out / "history.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, done + 2))


def _listing(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_force_replaces_only_training_outputs(tiny_dataset, tmp_path):
    """--force used to delete every file in --out; now only what training and export write."""
    out = tmp_path / "run"
    train(TrainConfig(data=str(tiny_dataset), out=str(out), epochs=1, **QUICK))
    (out / "notes.txt").write_text("the radiologist's notes")
    (out / "model.onnx").write_bytes(b"stale export of the old model")
    (out / "sub").mkdir()
    (out / "sub" / "keep.png").write_bytes(b"x")
    res = cli("train", "--data", tiny_dataset, "--out", out, "--force", "--epochs", "1",
              "--arch", "resnet18", "--image-size", "64", "--workers", "0", "--no-amp",
              "--min-epochs", "1", "--batch-size", "16")
    assert res.exit_code == 0, res.output
    assert (out / "notes.txt").read_text() == "the radiologist's notes"
    assert (out / "sub" / "keep.png").exists() and not (out / "model.onnx").exists()
    assert (out / "model.pt").exists()


@pytest.mark.parametrize("bad", [
    ["--class-weights", "1,2,3"], ["--device", "foo"], ["--lr", "nan"], ["--lr", "inf"],
    ["--weight-decay", "-1"], ["--val-fraction", "nan"], ["--label-smoothing", "0.9"],
    ["--batch-size", "1"], ["--threshold-for", "median"], ["--time-budget", "soon"],
    ["--val-fraction", "0.6", "--test-fraction", "0.5"],
])
def test_bad_options_exit_2_before_out_is_touched(tiny_run, tmp_path, bad):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("last.pt"))
    before = _listing(out)
    res = cli("train", "--data", tiny_run, "--out", out, "--force", *bad)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith("error:") and "Traceback" not in res.output
    assert _listing(out) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_gpu_exits_2_and_writes_nothing(tiny_dataset, tmp_path):
    res = cli("train", "--data", tiny_dataset, "--out", tmp_path / "run", "--device", "cuda")
    assert res.exit_code == 2 and "no CUDA GPU" in res.output
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_stops_with_exit_2_and_saves_no_model(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    res = cli("train", "--data", tiny_dataset, "--out", out, "--lr", "1e30", "--epochs", "2",
              "--arch", "resnet18", "--image-size", "64", "--workers", "0", "--no-amp",
              "--batch-size", "4", "--min-epochs", "1", "--augment", "none")
    assert res.exit_code == 2, res.output
    assert "training loss became" in res.output and "--lr" in res.output
    assert not (out / "model.pt").exists() and not (out / "card.json").exists()


def test_a_last_batch_of_one_image_does_not_crash_batchnorm(tmp_path):
    """16 training images in batches of 5 leave one image over; at 32 px ResNet's last stage
    is 1x1, where BatchNorm in training mode cannot take a batch of one."""
    data = tmp_path / "d"
    write_labelled(data / "train", per_class=8, seed=1)
    write_labelled(data / "val", per_class=3, seed=2)
    write_labelled(data / "test", per_class=3, seed=3)
    result = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1,
                               **{**QUICK, "image_size": 32, "batch_size": 5}))
    assert result["time"]["epochs_trained"] == 1


def _import_graph() -> dict:
    """module -> the project modules it imports (at the top or inside functions), from the
    source (ast), for pneumo_edge and its train/ and export/ sub-packages."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    roots = {"pneumo_edge": repo / "pneumo_edge", "pneumo_edge.train": repo / "train",
             "pneumo_edge.export": repo / "export"}
    files = {".".join([pkg, *[p for p in f.relative_to(d).with_suffix("").parts
                              if p != "__init__"]]): f
             for pkg, d in roots.items() for f in d.rglob("*.py")}
    graph = {}
    for name, f in files.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {m if m in files else node.module
                         for m in (f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_cycle_runs_through_training():
    """Issue 18: loop.py and final.py imported each other (final inside a function); no
    training module is part of an import cycle, lazy imports included."""
    graph = _import_graph()

    def reaches(start, goal):
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        return False

    cycles = [(a, b) for a in graph if a.startswith("pneumo_edge.train")
              for b in graph[a] if reaches(b, a)]
    assert cycles == []
    assert "pneumo_edge.commands.evaluate" not in {d for m, ds in graph.items() for d in ds
                                                   if m.startswith(("pneumo_edge.train",
                                                                    "pneumo_edge.export"))}


def test_the_budget_keeps_time_for_the_calibration_and_the_gate():
    """The final calibration and gate run ~7,700 images through a default run's network after
    the final evaluation; the budget's reserve left them out, so runs ended past the budget."""
    from pneumo_edge.train.calibrate import GATE_SHIPPED_IMAGES
    from pneumo_edge.train.loop import _final_reserve, _gate_images

    n = {"train": 3652, "val": 782, "test": 782}
    data = {k: (None, np.zeros(v)) for k, v in n.items()}
    cfg = TrainConfig(data="d", out="o")
    images = _gate_images(cfg, data)
    assert images == sum(n.values()) + 1000 + 7 * 200 + GATE_SHIPPED_IMAGES
    assert _gate_images(TrainConfig(data="d", out="o", calibrate=False), data) == 0
    s = {"gate_images": images, "val_images": 782}
    eval_s = 38.6  # the default run's per-epoch val + shifted val (2 x 782 images)
    without, with_gate = _final_reserve(eval_s, cfg), _final_reserve(eval_s, cfg, 0.0, s)
    assert with_gate - without == pytest.approx(1.5 * eval_s / (2 * 782) * images)
    assert 4 * 60 < with_gate - without < 6 * 60

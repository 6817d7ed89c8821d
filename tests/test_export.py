"""pneumo-edge export: the ONNX files, their contract, the CLI and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

onnx = pytest.importorskip("onnx", reason="export needs onnx")
ort = pytest.importorskip("onnxruntime", reason="these tests run the ONNX files")

from pneumo_edge.export.main import run_export  # noqa: E402
from pneumo_edge.export.onnx import CARD_KEY, fp16_problems, read_card  # noqa: E402

from pneumo_edge.cli import main  # noqa: E402
from pneumo_edge.errors import DataError, ModelError, PneumoError  # noqa: E402
from pneumo_edge.model import modeldir
from pneumo_edge.model.card import Card  # noqa: E402
from pneumo_edge.runtimes import has_package  # noqa: E402

FILES = ("model.onnx", "model.fp16.onnx")


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _pixels(n, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 1, size, size), dtype=np.uint8)


@pytest.mark.parametrize("name", FILES)
def test_onnx_file_passes_checker_and_is_self_contained(tiny_exported, name):
    onnx.checker.check_model(str(tiny_exported / name), full_check=True)
    proto = onnx.load(str(tiny_exported / name))
    assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)
    assert not list(tiny_exported.glob("*.data"))
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}


@pytest.mark.parametrize("name", FILES)
def test_io_names_dtypes_and_dynamic_batch(tiny_exported, name):
    s = _session(tiny_exported / name)
    (inp,), (out,) = s.get_inputs(), s.get_outputs()
    assert (inp.name, inp.type, inp.shape) == ("image", "tensor(uint8)", ["N", 1, 64, 64])
    assert (out.name, out.type, out.shape) == ("probs", "tensor(float)", ["N", 2])
    for n in (1, 5):
        probs = s.run(None, {"image": _pixels(n)})[0]
        assert probs.shape == (n, 2) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-3)


@pytest.mark.parametrize("name", FILES)
def test_metadata_round_trips_the_card(tiny_exported, name):
    card = modeldir.read_card(tiny_exported)
    assert read_card(tiny_exported / name) == card
    meta = _session(tiny_exported / name).get_modelmeta().custom_metadata_map
    assert Card.from_json(meta[CARD_KEY]).to_dict() == card.to_dict()


def test_fp16_graph_computes_in_fp16(tiny_exported):
    fp16 = onnx.load(str(tiny_exported / "model.fp16.onnx"))
    assert fp16_problems(fp16) == []
    floats = {i.data_type for i in fp16.graph.initializer} - {onnx.TensorProto.INT64}
    assert floats == {onnx.TensorProto.FLOAT16}
    # the check does tell an fp32 graph apart
    assert fp16_problems(onnx.load(str(tiny_exported / "model.onnx")))


@pytest.mark.parametrize("name,tol", [("model.onnx", 1e-4), ("model.fp16.onnx", 1e-2)])
def test_probabilities_match_torch(tiny_exported, tiny_labelled, name, tol):
    from pneumo_edge.inputs.folders import scan_labelled
    from pneumo_edge.inputs.pipeline import decode_labelled
    from pneumo_edge.runtimes.torch_rt import TorchRuntime

    card = modeldir.read_card(tiny_exported)
    px, _, _ = decode_labelled(scan_labelled(tiny_labelled, card.classes).samples, 64)
    ref = TorchRuntime(tiny_exported, card, device="cpu")(px)
    got = _session(tiny_exported / name).run(None, {"image": px})[0]
    assert np.abs(got - ref).max() <= tol


def test_export_writes_parity_json_on_the_card_split(tiny_exported):
    report = json.loads((tiny_exported / "parity.json").read_text())
    card = modeldir.read_card(tiny_exported)
    assert report["passed"] is True
    assert report["images"]["count"] == len(card.split["val_files"])
    assert report["images"]["source"] == "validation split recorded in the card"
    assert report["forms"]["onnx"]["status"] == "pass"
    assert report["forms"]["onnx-fp16"]["status"] == "pass"
    assert report["forms"]["trt"]["status"] == "skipped" and report["forms"]["trt"]["reason"]
    assert {"torch", "onnx", "onnxruntime", "numpy"} <= set(report["versions"])


@pytest.mark.skipif(has_package("tensorrt"), reason="tensorrt is installed here")
def test_trt_without_tensorrt_writes_onnx_and_exits_2(copy_run):
    run = copy_run()
    res = CliRunner().invoke(main, ["export", str(run), "--trt"])
    assert res.exit_code == 2, res.output
    assert (run / "model.onnx").is_file() and (run / "model.fp16.onnx").is_file()
    assert (run / "parity.json").is_file() and "parity PASSED" in res.stdout
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pip install 'pneumo-edge[gpu]'" in errors[0]
    report = json.loads((run / "parity.json").read_text())
    assert report["forms"]["trt"]["status"] == "skipped"
    assert not (run / "model.fp16.engine").exists()


def _cli_error(args) -> str:
    res = CliRunner().invoke(main, ["export", *map(str, args)])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    return res.stderr


def test_missing_model_pt(copy_run):
    run = copy_run()
    (run / "model.pt").unlink()
    assert "model.pt" in _cli_error([run])
    with pytest.raises(ModelError):
        run_export(run)


def test_corrupt_model_pt(copy_run):
    run = copy_run()
    (run / "model.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    assert "not a readable checkpoint" in _cli_error([run])


def test_card_from_a_newer_version(copy_run):
    import torch

    run = copy_run()
    ckpt = torch.load(run / "model.pt", weights_only=True)
    ckpt["card"]["card_version"] = 99
    torch.save(ckpt, run / "model.pt")
    assert "upgrade pneumo-edge" in _cli_error([run])


def test_no_such_run(tmp_path):
    assert "no such model directory" in _cli_error([tmp_path / "nope"])


def test_empty_parity_folder(copy_run, tmp_path):
    run = copy_run()
    (tmp_path / "empty" / "NORMAL").mkdir(parents=True)
    (tmp_path / "empty" / "PNEUMONIA").mkdir()
    assert "no image files" in _cli_error([run, "--parity-data", tmp_path / "empty"])
    with pytest.raises(DataError):
        run_export(run, parity_data=tmp_path)  # no class folders at all
    assert not (run / "model.onnx").exists()  # nothing exported when parity cannot run


def test_no_recorded_split_asks_for_parity_data(copy_run):
    run = copy_run()
    card = json.loads((run / "card.json").read_text())
    card["split"] = {}  # the split is not one of the fields model.pt's copy must agree on
    (run / "card.json").write_text(json.dumps(card))
    assert "--parity-data" in _cli_error([run])


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root can write anywhere")
def test_unwritable_run(copy_run):
    run = copy_run()
    run.chmod(0o555)
    try:
        assert "cannot write" in _cli_error([run])
    finally:
        run.chmod(0o755)


def test_bad_profile_is_refused(copy_run):
    run = copy_run()
    from pneumo_edge.export.tensorrt import BuildOptions

    with pytest.raises(PneumoError, match="batch-min"):
        run_export(run, trt=True, build=BuildOptions(batch_min=8, batch_opt=4, batch_max=32))


def test_cli_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, pneumo_edge.cli; "
            "print([m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("half", [False, True])
def test_flip_tta_model_exports_with_the_uint8_input_feeding_only_a_cast(tmp_path, half):
    """Before: the mirror was taken of the uint8 input, so the graph had a Slice on it, which
    TensorRT refuses for a UINT8 network input (and export did not notice). Now the mirror is
    taken after normalisation, and every export checks the rule."""
    import onnxruntime as ort
    import torch
    from pneumo_edge.export.onnx import export_onnx

    from pneumo_edge.model.net import build_model

    torch.manual_seed(0)
    net = build_model("resnet18", 2, norm="image", tta="flip").eval()
    card = Card(classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", image_size=64,
                threshold=0.5, arch="resnet18", net={"norm": "image", "tta": "flip"})
    path = export_onnx(net, card, tmp_path / "m.onnx", weights_sha256="0" * 64, half=half)
    proto = onnx.load(str(path))
    assert [n.op_type for n in proto.graph.node if "image" in n.input] == ["Cast"]
    x = np.random.default_rng(0).integers(0, 256, (3, 1, 64, 64), dtype=np.uint8)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"image": x})[0]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
        one_sided = torch.softmax(net.backbone(net.normalise(torch.from_numpy(x))), 1).numpy()
    assert np.abs(got - want).max() < (2e-3 if half else 1e-5)
    assert np.abs(want - one_sided).max() > 1e-4  # the mirror really is averaged in


def _hidden(run) -> set:
    import os

    return {n for n in os.listdir(run) if n.startswith(".")}


def test_sigterm_during_int8_quantization_leaves_no_temporary_files(copy_run):
    """Issue 19: a SIGTERM while the INT8 model is being quantized (a real signal to a real
    export) ends the export with its hidden intermediate files (tens of MB for a ResNet50)
    removed; the model directory holds what it held before, plus finished files only."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = copy_run()
    before = _hidden(run)
    proc = subprocess.Popen([sys.executable, "-m", "pneumo_edge", "export", str(run),
                             "--skip-parity"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen = set()
    while proc.poll() is None and not seen:
        seen = {n for n in _hidden(run) - before if "int8" in n}
        time.sleep(0.002)
    assert seen, "the export ended before its INT8 quantization files were seen"
    os.kill(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert _hidden(run) == before
    assert not (run / "model.int8.onnx").exists()


def test_export_and_train_force_remove_only_stale_export_leftovers(tmp_path):
    """Leftovers of an export killed before its clean-up (its process gone) are removed by the
    next export and by train --force; other hidden files, and those of a running export, stay."""
    import os
    import subprocess
    import sys

    from pneumo_edge.train.config import TrainConfig
    from pneumo_edge.train.rundir import prepare_out

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = [f".int8-work.{dead}.k2j4", f".model.int8.onnx.pre{dead}.onnx",
             f".model.int8.onnx.q{dead}.onnx", f".model.onnx.export{dead}"]
    kept = [f".int8-work.{os.getpid()}.x1", ".notes", f".model.int8.onnx.pre{dead}.onnx.mine",
            f"model.int8.onnx.pre{dead}.onnx", ".int8-work.x.y"]

    def litter(d):
        d.mkdir(exist_ok=True)
        for name in stale + kept:
            if name.startswith(".int8-work."):
                (d / name).mkdir()
                (d / name / "pre.onnx").write_bytes(b"x" * 1000)
            else:
                (d / name).write_bytes(b"x")
        return d

    empty = litter(tmp_path / "no-model")  # export fails (no model.pt) after the clean-up
    with pytest.raises(ModelError):
        run_export(empty)
    assert sorted(p.name for p in empty.iterdir()) == sorted(kept)
    out = litter(tmp_path / "run")
    (out / "model.pt").write_bytes(b"an earlier run's")
    prepare_out(out, TrainConfig(data=str(tmp_path), out=str(out), force=True))
    assert sorted(p.name for p in out.iterdir()) == sorted(kept)


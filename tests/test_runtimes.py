"""The onnxruntime and TensorRT runtimes behind open_runtime()."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import copy_model_dir

from pneumo_edge.errors import ModelError, RuntimeUnavailable
from pneumo_edge.model.card import Card
from pneumo_edge.model.modeldir import (
    Refused,
    read_card,
    read_sidecar,
    sha256_file,
    sidecar_path,
    write_card,
)
from pneumo_edge.runtimes import gpu_present, has_package, open_runtime
from pneumo_edge.runtimes.trt_rt import check_sidecar, sidecar_mismatch

HERE = {"tensorrt": "10.3.0", "gpu": "Orin (nvgpu)", "compute_capability": "8.7"}


def _pixels(n, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 1, size, size), dtype=np.uint8)


# --- onnxruntime -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["onnx", "onnx-fp16", "onnx-int8"])
def test_onnx_runtime_runs_any_batch(tiny_exported, name):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    rt = open_runtime(tiny_exported, name, device="cpu")
    assert (rt.name, rt.device) == (name, "cpu") and rt.card == read_card(tiny_exported)
    for n in (1, 5):
        probs = rt(_pixels(n))
        assert probs.shape == (n, 2) and probs.dtype == np.float32


def test_onnx_runtime_refuses_a_file_from_another_model(copy_run, tiny_exported):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    run = copy_run(tiny_exported)
    card = read_card(run)
    card.classes = ["HEALTHY", "PNEUMONIA"]
    write_card(run, card)
    with pytest.raises(ModelError, match="re-export"):
        open_runtime(run, "onnx", device="cpu")


@pytest.mark.parametrize("name,device", [
    ("onnx", "'cpu'"), ("onnx-int8", "'cpu'"),
    pytest.param("auto", "None", marks=pytest.mark.skipif(
        gpu_present(), reason="auto tries torch-fp16 on a GPU machine"))])
def test_onnx_runtime_imports_no_torch(tiny_verified, name, device):
    """Also auto's choice of INT8 on a CPU (reading parity.json's evidence) imports no torch."""
    pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    code = ("import sys; from pneumo_edge.runtimes import open_runtime; import numpy as np; "
            f"rt = open_runtime({str(tiny_verified)!r}, {name!r}, device={device}, "
            "log=lambda m: None); rt(np.zeros((2, 1, 64, 64), np.uint8)); "
            "print(rt.name, 'torch' in sys.modules, 'tensorrt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[1:] == ["False", "False"]
    assert out.stdout.split()[0] == ("onnx-int8" if name == "auto" else name)


def _cuda_claimed(monkeypatch):
    """onnxruntime here claims a CUDA provider (as onnxruntime-gpu does on a box whose CUDA
    libraries are missing); the sessions themselves are real and can only run on CPU."""
    from pneumo_edge.runtimes import onnx_rt

    real = onnx_rt._import_ort

    def claims_cuda():
        ort, _ = real()
        return ort, [onnx_rt.CUDA, onnx_rt.CPU]

    monkeypatch.setattr(onnx_rt, "_import_ort", claims_cuda)


def test_onnx_cuda_that_cannot_start_falls_back_on_stderr_only(tiny_exported, monkeypatch,
                                                                 capfd):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    from pneumo_edge.runtimes.onnx_rt import OnnxRuntime

    _cuda_claimed(monkeypatch)
    rt = OnnxRuntime(tiny_exported / "model.onnx")  # auto: tries cuda:0, then says so
    assert rt.device == "cpu" and rt.session.get_providers() == ["CPUExecutionProvider"]
    assert rt(_pixels(3)).shape == (3, 2)
    out, err = capfd.readouterr()
    assert out == ""  # scoring may be writing its CSV to stdout
    assert "onnxruntime's CUDA provider failed to start on cuda:0" in err and "running on cpu" in err


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_onnx_cuda_asked_for_is_cuda_or_refused(tiny_exported, monkeypatch, capfd, device):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    from pneumo_edge.runtimes.onnx_rt import OnnxRuntime

    _cuda_claimed(monkeypatch)
    index = device.partition(":")[2] or "0"
    with pytest.raises(RuntimeUnavailable, match=f"failed to start on cuda:{index}"):
        OnnxRuntime(tiny_exported / "model.onnx", device=device)
    assert capfd.readouterr().out == ""


def test_onnx_device_strings():
    from pneumo_edge.errors import UsageError
    from pneumo_edge.runtimes.onnx_rt import cuda_device

    assert [cuda_device(d, True) for d in (None, "auto", "cpu", "cuda", "cuda:3")] == \
        [0, 0, None, 0, 3]
    assert cuda_device(None, False) is None and cuda_device("cpu", False) is None
    with pytest.raises(RuntimeUnavailable, match="no CUDA provider"):
        cuda_device("cuda:1", False)
    for bad in ("gpu", "cuda:x", "cuda:-1", "CUDA"):
        with pytest.raises(UsageError, match="unknown device"):
            cuda_device(bad, True)


def test_onnx_runtime_runs_a_warm_up_inference(tiny_exported, monkeypatch):
    """The constructor runs the model once (so a provider that registers but cannot run is
    found before scoring starts): a graph that loads but cannot run is refused there."""
    pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    from pneumo_edge.runtimes import onnx_rt

    calls = []
    real = onnx_rt.OnnxRuntime.__call__
    monkeypatch.setattr(onnx_rt.OnnxRuntime, "__call__",
                        lambda self, x: calls.append(x.shape) or real(self, x))
    onnx_rt.OnnxRuntime(tiny_exported / "model.onnx", device="cpu")
    assert calls == [(1, 1, 64, 64)]


# --- the torch runtimes: what can be checked without a GPU --------------------------------------

def test_torch_fp16_needs_cuda(tiny_run):
    torch = pytest.importorskip("torch")
    from pneumo_edge.errors import UsageError
    from pneumo_edge.runtimes.torch_rt import TorchRuntime

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: tests/test_gpu.py runs torch-fp16")
    with pytest.raises(RuntimeUnavailable, match="torch-fp16 runs on CUDA only"):
        TorchRuntime(tiny_run, precision="fp16")
    with pytest.raises(RuntimeUnavailable, match="torch sees no CUDA GPU"):
        TorchRuntime(tiny_run, device="cuda:1")
    with pytest.raises(UsageError, match="unknown torch precision"):
        TorchRuntime(tiny_run, precision="bf16")
    with pytest.raises(UsageError, match="CUDA graphs are for torch-fp16"):
        TorchRuntime(tiny_run, device="cpu", graphs=True)


def test_torch_device_strings():
    torch = pytest.importorskip("torch")
    from pneumo_edge.errors import UsageError
    from pneumo_edge.runtimes.torch_rt import resolve_device

    assert resolve_device(torch, "cpu") == "cpu"
    here = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    assert resolve_device(torch, None) == here
    for bad in ("gpu", "cuda:x", "mps"):
        with pytest.raises(UsageError, match="unknown device"):
            resolve_device(torch, bad)


def test_torch_cpu_runtime_reports_fp32_without_tf32(tiny_run):
    pytest.importorskip("torch")
    from pneumo_edge.runtimes.torch_rt import TorchRuntime

    rt = TorchRuntime(tiny_run, device="cpu")
    assert (rt.name, rt.precision, rt.device, rt.tf32) == ("torch", "fp32", "cpu", False)
    assert rt(_pixels(3)).shape == (3, 2)


# --- TensorRT: the sidecar check (no tensorrt needed) ------------------------------------------

def test_sidecar_matching_platform_is_accepted():
    assert sidecar_mismatch(dict(HERE), dict(HERE)) == ""


@pytest.mark.parametrize("key,value,words", [
    ("tensorrt", "11.0.0", "TensorRT 10.3.0"),
    ("gpu", "NVIDIA H100 80GB HBM3", "GPU Orin"),
    ("compute_capability", "9.0", "compute capability 8.7"),
])
def test_sidecar_mismatch_is_refused(tmp_path, key, value, words):
    engine = tmp_path / "model.fp16.engine"
    with pytest.raises(ModelError) as err:
        check_sidecar(engine, dict(HERE), {**HERE, key: value})
    msg = str(err.value)
    assert words in msg and value in msg and f"pneumo-edge export {tmp_path} --trt" in msg
    assert len(msg.splitlines()) == 1


def test_engine_from_an_older_onnx_is_refused(tmp_path):
    onnx_file = tmp_path / "model.fp16.onnx"
    onnx_file.write_bytes(b"old model")
    meta = {**HERE, "source_onnx": onnx_file.name, "source_onnx_sha256": sha256_file(onnx_file)}
    check_sidecar(tmp_path / "model.fp16.engine", meta, HERE)  # unchanged: fine
    onnx_file.write_bytes(b"re-exported model")
    with pytest.raises(ModelError, match="older model.fp16.onnx"):
        check_sidecar(tmp_path / "model.fp16.engine", meta, HERE)


def test_missing_or_broken_sidecar(tmp_path):
    engine = tmp_path / "model.fp16.engine"
    with pytest.raises(ModelError, match="--trt"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(Refused, match=f"not valid JSON.*pneumo-edge export {tmp_path} --trt"):
        read_sidecar(engine)
    sidecar_path(engine).write_bytes(b'{"gpu": "\xff"}')
    with pytest.raises(Refused, match="not UTF-8"):
        read_sidecar(engine)


def _fake_engine(run, **sidecar):
    """A model directory with a (fake) engine and a sidecar that describes it correctly
    (card, weights sha256 of model.pt) unless ``sidecar`` overrides a key."""
    (run / "model.fp16.engine").write_bytes(b"engine")
    meta = {**HERE, "card": read_card(run).to_dict(),
            "weights_sha256": sha256_file(run / "model.pt"), **sidecar}
    sidecar_path(run / "model.fp16.engine").write_text(json.dumps(meta))


def test_engine_whose_sidecar_card_disagrees_is_refused_before_any_gpu_work(copy_run):
    run = copy_run()
    card = read_card(run).to_dict()
    _fake_engine(run, card={**card, "classes": card["classes"][::-1]})
    with pytest.raises(Refused) as err:
        open_runtime(run, "trt")
    assert str(err.value).startswith(f"{run}/card.json and {run}/model.fp16.engine.json "
                                     f"disagree on classes: ")
    assert f"pneumo-edge export {run} --trt" in str(err.value)


def test_engine_built_from_other_weights_or_without_a_card_is_refused(copy_run):
    run = copy_run()
    _fake_engine(run, weights_sha256="0" * 64)
    with pytest.raises(Refused, match="model.pt and .*model.fp16.engine.json disagree on "
                                      "weights_sha256"):
        open_runtime(run, "trt")
    _fake_engine(run, card=None)
    with pytest.raises(Refused, match="records no model card"):
        open_runtime(run, "trt")


@pytest.mark.skipif(has_package("tensorrt"), reason="tensorrt is installed here")
def test_trt_runtime_without_tensorrt_says_how_to_install(copy_run, tiny_run):
    run = copy_run()
    _fake_engine(run)
    with pytest.raises(RuntimeUnavailable, match=r"pip install 'pneumo-edge\[gpu\]'"):
        open_runtime(run, "trt")


# --- TensorRT on a GPU (skipped without tensorrt, cuda-python and an NVIDIA GPU) ---------------

@pytest.fixture(scope="module")
def trt_run(tiny_exported, session_tmp):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pneumo-edge[gpu])")
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed (pneumo-edge[gpu])")
    if not gpu_present():
        pytest.skip("no NVIDIA GPU")
    from pneumo_edge.export.main import run_export
    from pneumo_edge.export.tensorrt import BuildOptions

    run = copy_model_dir(tiny_exported, session_tmp("trt") / "run")
    code = run_export(run, trt=True, build=BuildOptions(1, 4, 8, workspace_mib=512))
    assert code == 0
    return run


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_trt_export_writes_engine_sidecar_and_passes_parity(trt_run):
    meta = read_sidecar(trt_run / "model.fp16.engine")
    assert meta["profile"]["min"] == [1, 1, 64, 64] and meta["profile"]["max"] == [8, 1, 64, 64]
    assert meta["source_onnx_sha256"] == sha256_file(trt_run / "model.fp16.onnx")
    assert meta["weights_sha256"] == sha256_file(trt_run / "model.pt")
    assert Card.from_dict(meta["card"]) == read_card(trt_run)
    assert (trt_run / "trt_timing.cache").stat().st_size > 0
    report = json.loads((trt_run / "parity.json").read_text())
    assert report["forms"]["trt"]["status"] == "pass"


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_trt_runtime_matches_torch_and_splits_big_batches(trt_run):
    from pneumo_edge.runtimes.torch_rt import TorchRuntime

    rt = open_runtime(trt_run, "trt")
    assert rt.name == "trt" and rt.device.startswith("cuda") and rt.max_batch == 8
    assert rt.path == trt_run / "model.fp16.engine" and rt.precision == "fp16"
    assert rt.sha256 == sha256_file(rt.path)
    ref = TorchRuntime(trt_run, rt.card, device="cpu")
    for n in (1, 5, 19):  # 19 > profile max 8: three engine calls
        x = _pixels(n, seed=n)
        got = rt(x)
        assert got.shape == (n, 2) and got.dtype == np.float32
        assert np.abs(got - ref(x)).max() <= 1e-2


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_trt_runtime_refuses_an_engine_from_another_gpu(trt_run, copy_run):
    run = copy_run(trt_run)
    side = sidecar_path(run / "model.fp16.engine")
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "gpu": "Some Other GPU"}))
    with pytest.raises(ModelError, match="Some Other GPU"):
        open_runtime(run, "trt")


# --- the runtime table: one place knows how each form runs --------------------------------------

def test_every_form_has_one_backend_row_whose_class_exists_without_heavy_imports():
    import importlib

    from pneumo_edge.model import modeldir
    from pneumo_edge.runtimes import BACKENDS, DEVICE_POLICIES

    assert sorted(b.name for b in BACKENDS) == sorted(modeldir.RUNTIMES)
    for b in BACKENDS:
        assert b.devices in DEVICE_POLICIES and b.install and b.packages
        assert callable(getattr(importlib.import_module(b.module), b.cls))
        assert b.gpu == (b.devices != "any")
    code = ("import sys, importlib; from pneumo_edge.runtimes import BACKENDS; "
            "[importlib.import_module(b.module) for b in BACKENDS]; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'tensorrt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_device_parser():
    from pneumo_edge.errors import UsageError
    from pneumo_edge.runtimes import parse_device

    assert [parse_device(d) for d in (None, "auto", "cpu", "cuda", "cuda:3")] == \
        [("auto", None), ("auto", None), ("cpu", None), ("cuda", None), ("cuda", 3)]
    for bad in ("gpu", "cuda:x", "cuda:-1", "CUDA", "cuda:", "mps", "cpu:0"):
        with pytest.raises(UsageError, match="unknown device"):
            parse_device(bad)


def test_training_reads_device_strings_with_the_same_parser():
    pytest.importorskip("torch")
    from pneumo_edge.train.config import pick_device

    from pneumo_edge.errors import UsageError

    assert str(pick_device("cpu")) == "cpu"
    with pytest.raises(UsageError, match=r"--device cuda:x: unknown device 'cuda:x'"):
        pick_device("cuda:x")


def test_why_unavailable_says_why_without_importing(tiny_run, monkeypatch):
    from pneumo_edge import runtimes

    assert runtimes.why_unavailable("torch", "cpu", tiny_run) == ""
    assert runtimes.why_unavailable("onnx", "cpu", tiny_run) == "no model.onnx"
    assert runtimes.why_unavailable("torch-fp16", "cpu") == "torch-fp16 runs on CUDA only"
    assert runtimes.why_unavailable("trt", "cpu").startswith("trt runs on CUDA only")
    if not gpu_present():
        assert runtimes.why_unavailable("onnx", "cuda:0") == "no NVIDIA GPU"
        assert runtimes.why_unavailable("trt") == "no NVIDIA GPU"
    monkeypatch.setattr(runtimes, "has_package", lambda name: name != "onnxruntime")
    assert runtimes.why_unavailable("onnx-int8", "cpu") == \
        f"onnxruntime not installed ({runtimes.CPU_HINT})"
    with pytest.raises(ModelError, match="unknown runtime 'openvino'"):
        runtimes.why_unavailable("openvino")


# --- outputs(): the probabilities and any further output of the model file ----------------------

def test_onnx_outputs_carry_every_further_graph_output(copy_run, tiny_exported):
    """A model file with further outputs (issue 20's ``ood``; here also one more, ``p1``):
    outputs() has each, [N], by its graph name; calling the runtime still gives the
    probabilities alone."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    from pneumo_edge.runtimes import open_form

    before = open_form(tiny_exported, "onnx", device="cpu").outputs(_pixels(2))
    gated = read_card(tiny_exported).net.get("ood", "none") != "none"
    assert sorted(before) == (["ood", "probs"] if gated else ["probs"])
    run = copy_run(tiny_exported)
    path = run / "model.onnx"
    proto = onnx.load(str(path))
    probs = proto.graph.output[0].name
    proto.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "one"))
    proto.graph.node.append(helper.make_node("Gather", [probs, "one"], ["p1"], axis=1))
    proto.graph.output.append(helper.make_tensor_value_info("p1", onnx.TensorProto.FLOAT, ["N"]))
    onnx.save(proto, str(path))
    rt = open_form(run, "onnx", device="cpu")
    out = rt.outputs(_pixels(3))
    assert set(out) == {*before, "p1"} and out["p1"].shape == (3,)
    assert all(out[k].shape == (3,) for k in out if k != "probs")
    assert np.array_equal(out["p1"], out["probs"][:, 1])
    assert np.array_equal(rt(_pixels(3)), out["probs"])


def test_torch_outputs_take_a_network_that_returns_a_tuple(tiny_run):
    torch = pytest.importorskip("torch")
    from pneumo_edge.model.net import build_model
    from pneumo_edge.runtimes import open_form

    rt = open_form(tiny_run, "torch", device="cpu")
    card = rt.card
    plain = rt.outputs(_pixels(2))
    gated = card.net.get("ood", "none") != "none"
    assert sorted(plain) == (["ood", "probs"] if gated else ["probs"])
    assert plain["probs"].shape == (2, 2) and np.array_equal(rt(_pixels(2)), plain["probs"])
    # the same weights without a gate and with an energy gate (XrayNet.outputs: probs, ood)
    for ood, want in (("none", ["probs"]), ("energy", ["ood", "probs"])):
        net = build_model(card.arch, len(card.classes), weights="none", **{**card.net, "ood": ood})
        net.load_state_dict(rt.model.state_dict(), strict=False)
        other = open_form(tiny_run, "torch", device="cpu")
        other.model = net.eval().to(memory_format=torch.channels_last)
        out = other.outputs(_pixels(2))
        assert sorted(out) == want and np.allclose(out["probs"], plain["probs"], atol=1e-6)
        assert ood == "none" or (out["ood"].shape == (2,) and np.isfinite(out["ood"]).all())

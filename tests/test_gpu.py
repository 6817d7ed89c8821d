"""The GPU paths on a real CUDA GPU: the torch runtime on CUDA (fp32 with TF32 off, fp16, CUDA
graphs) against the CPU, device strings, training the tiny model on CUDA (bf16 autocast,
channels_last) and exporting it, and onnxruntime's CUDA provider when it is installed.

Every test here is marked ``gpu``: conftest skips them with the reason on a machine without a
CUDA GPU, and ``pytest -m gpu`` runs them on one (``benchmarks/gpu_check.py`` does).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumo_edge.errors import RuntimeUnavailable
from pneumo_edge.model.modeldir import read_card

pytestmark = pytest.mark.gpu

S = 64


def _pixels(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 1, S, S), dtype=np.uint8)


@pytest.fixture(scope="module")
def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch


def test_torch_cuda_fp32_matches_cpu_with_tf32_off(torch_cuda, tiny_run):
    from pneumo_edge.runtimes.torch_rt import TorchRuntime, tf32_state

    torch = torch_cuda
    torch.backends.cuda.matmul.allow_tf32 = True  # whatever ran before must not leak in
    torch.backends.cudnn.allow_tf32 = True
    gpu = TorchRuntime(tiny_run, device="cuda")
    cpu = TorchRuntime(tiny_run, device="cpu")
    assert gpu.name == "torch" and gpu.precision == "fp32" and gpu.tf32 is False
    assert gpu.device == f"cuda:{torch.cuda.current_device()} " \
                         f"({torch.cuda.get_device_name(torch.cuda.current_device())})"
    for n in (1, 7, 33):
        x = _pixels(n, seed=n)
        got = gpu(x)
        assert tf32_state(torch) == {"matmul": False, "cudnn": False}
        assert got.shape == (n, 2) and got.dtype == np.float32
        assert np.abs(got - cpu(x)).max() <= 1e-4


def test_torch_fp16_and_cuda_graphs_agree_with_cpu(torch_cuda, tiny_run):
    from pneumo_edge.runtimes.torch_rt import TorchRuntime

    cpu = TorchRuntime(tiny_run, device="cpu")
    half = TorchRuntime(tiny_run, device="cuda:0", precision="fp16")
    graphs = TorchRuntime(tiny_run, device="cuda:0", precision="fp16", graphs=True)
    assert half.name == graphs.name == "torch-fp16" and half.precision == "fp16"
    assert next(half.model.parameters()).dtype == torch_cuda.float16
    for n in (1, 5, 5, 32):  # the second 5 replays the graph captured by the first
        x = _pixels(n, seed=n)
        ref, a, b = cpu(x), half(x), graphs(x)
        assert np.abs(a - ref).max() <= 1e-2 and np.abs(b - a).max() <= 1e-3
        assert (a.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert sorted(graphs._graphs) == [1, 5, 32]


def test_cuda_device_strings(torch_cuda, tiny_run):
    from pneumo_edge.runtimes.torch_rt import TorchRuntime

    n = torch_cuda.cuda.device_count()
    last = TorchRuntime(tiny_run, device=f"cuda:{n - 1}")
    assert last.device.startswith(f"cuda:{n - 1} (")
    assert next(last.model.parameters()).device.index == n - 1
    with pytest.raises(RuntimeUnavailable, match=f"there is no cuda:{n}"):
        TorchRuntime(tiny_run, device=f"cuda:{n}")


def test_train_on_cuda_with_bf16_autocast_then_export(torch_cuda, tiny_dataset, tmp_path):
    """Training on the GPU (autocast; channels_last inputs in the loop), then export of that
    model: ONNX files and parity against the fp32 torch reference."""
    from pneumo_edge.export.main import run_export
    from pneumo_edge.train.loop import TrainConfig, train

    from pneumo_edge.runtimes.torch_rt import TorchRuntime

    out = tmp_path / "cuda_run"
    train(TrainConfig(data=str(tiny_dataset), out=str(out), arch="resnet18", image_size=S,
                      epochs=2, min_epochs=1, workers=0, device="cuda", batch_size=4,
                      augment=False, amp=True, force=True, threshold_for="fixed:0.5"))
    card = read_card(out)
    assert card.train_config["amp"] is True and card.train_config["device"].startswith("cuda")
    assert run_export(out) == 0
    report = json.loads((out / "parity.json").read_text())
    assert report["forms"]["onnx"]["status"] == "pass"
    x = _pixels(6)
    on_gpu = TorchRuntime(out, device="cuda")(x)
    assert np.abs(on_gpu - TorchRuntime(out, device="cpu")(x)).max() <= 1e-4


@pytest.fixture(scope="module")
def ort_cuda():
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (onnxruntime-gpu not installed)")
    return ort


def test_onnx_cuda_provider_matches_cpu(ort_cuda, tiny_exported, capfd):
    from pneumo_edge.runtimes.onnx_rt import OnnxRuntime

    gpu = OnnxRuntime(tiny_exported / "model.onnx", device="cuda:0")
    cpu = OnnxRuntime(tiny_exported / "model.onnx", device="cpu")
    assert gpu.device == "cuda:0" and "CUDAExecutionProvider" in gpu.session.get_providers()
    x = _pixels(9)
    assert np.abs(gpu(x) - cpu(x)).max() <= 1e-4
    assert capfd.readouterr().out == ""  # nothing of onnxruntime's on stdout


def test_onnx_cuda_device_that_is_not_there_is_refused(ort_cuda, tiny_exported, capfd):
    from pneumo_edge.runtimes.onnx_rt import OnnxRuntime

    with pytest.raises(RuntimeUnavailable, match="cuda:64"):
        OnnxRuntime(tiny_exported / "model.onnx", device="cuda:64")
    assert capfd.readouterr().out == ""

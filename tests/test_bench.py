"""pneumo-edge bench: well-formed, self-consistent rows on a tiny model (no timing thresholds)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import copy_model_dir

from pneumo_edge.cli import main
from pneumo_edge.commands import bench
from pneumo_edge.errors import PneumoError
from pneumo_edge.model.card import Card
from pneumo_edge.model.modeldir import read_card
from pneumo_edge.runtimes import RUNTIMES

ROW_KEYS = {"runtime", "batch", "p50_ms", "p90_ms", "p99_ms", "images_per_s", "mean_ms",
            "iters", "device"}
FAST = {"warmup": 1, "iters": 4}


def check_row(row, batch=None):
    assert ROW_KEYS <= set(row)
    if batch is not None:
        assert row["batch"] == batch
    assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert row["min_ms"] <= row["mean_ms"] <= row["max_ms"]
    assert row["images_per_s"] > 0
    # images/s is batch / mean latency (both rounded to a few digits)
    assert row["images_per_s"] == pytest.approx(row["batch"] / (row["mean_ms"] / 1e3), rel=1e-4)
    assert row["iters"] >= 1


class FakeRuntime:
    """Stands in for a runtime: sleeps a little, returns [N, C] probabilities."""

    name = "fake"
    device = "cpu"
    path = "fake.onnx"
    sha256 = "0" * 64
    precision = "fp32"

    def __init__(self, size=16):
        self.card = Card(classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA",
                         image_size=size, threshold=0.5, arch="resnet18")
        self.calls = []

    def __call__(self, batch):
        assert batch.dtype == np.uint8 and batch.shape[1:] == (1, 16, 16)
        self.calls.append(len(batch))
        return np.full((len(batch), 2), 0.5, np.float32)

    def outputs(self, batch):
        return {"probs": self(batch)}


@pytest.fixture(scope="module")
def exported_run(tiny_run, session_tmp):
    """A copy of tiny_run with model.onnx and model.fp16.onnx from the export code, without the
    parity check (bench measures speed; parity has its own tests, and on a barely trained tiny
    model fp16 label agreement near the threshold is not what this file tests)."""
    pytest.importorskip("onnx", reason="export needs onnx")
    pytest.importorskip("onnxruntime", reason="the onnx runtimes need onnxruntime")
    from pneumo_edge.export.main import run_export

    d = copy_model_dir(tiny_run, session_tmp("bench_run") / "run")
    assert run_export(d, skip_parity=True) == 0
    return d


# ----------------------------------------------------------------------------- pure parts


def test_latency_row_is_consistent():
    times = [0.010, 0.012, 0.011, 0.030, 0.009, 0.010]
    row = bench.latency_row("x", "cpu", 8, times, warmup=2)
    check_row(row, 8)
    assert row["p50_ms"] == pytest.approx(np.percentile(np.array(times) * 1e3, 50), abs=1e-3)
    assert row["mean_ms"] == pytest.approx(np.mean(times) * 1e3, abs=1e-3)
    assert row["iters"] == 6 and row["warmup"] == 2


def test_bench_runtime_counts_calls():
    rt = FakeRuntime()
    row = bench.bench_runtime(rt, 3, warmup=2, iters=5)
    check_row(row, 3)
    assert rt.calls == [3] * 7 and row["iters"] == 5 and row["runtime"] == "fake"


def test_max_time_stops_early_but_keeps_a_minimum():
    rt = FakeRuntime()
    row = bench.bench_runtime(rt, 1, warmup=0, iters=1000, max_time=1e-9)
    assert row["iters"] == bench.MIN_ITERS


def test_bench_runtime_rejects_wrong_output_shape():
    class Bad(FakeRuntime):
        def __call__(self, batch):
            return np.zeros((1, 2), np.float32)

    rt = Bad()
    with pytest.raises(PneumoError, match="output shape"):
        bench.bench_runtime(rt, 4, warmup=0, iters=1)


@pytest.mark.parametrize("spec, want", [("auto", ["auto"]), ("all", list(RUNTIMES)),
                                        ("onnx, torch,onnx", ["onnx", "torch"])])
def test_parse_runtimes(spec, want):
    assert bench.parse_runtimes(spec) == want


@pytest.mark.parametrize("spec", ["tensorflow", "", "torch,x"])
def test_parse_runtimes_rejects(spec):
    with pytest.raises(ValueError):
        bench.parse_runtimes(spec)


def test_parse_batches():
    assert bench.parse_batches("1,8,32") == [1, 8, 32]
    assert bench.parse_batches("4, 4") == [4]
    for bad in ("0", "a", "", "1,-2"):
        with pytest.raises(ValueError):
            bench.parse_batches(bad)


def test_machine_info_has_the_header_keys():
    m = bench.machine_info()
    assert {"cpu", "cores", "cpu_flags", "gpu", "versions", "date"} <= set(m)
    assert m["cores"] >= 1 and isinstance(m["gpu"], list)
    assert "amx_bf16" in m["cpu_flags"] and "avx512f" in m["cpu_flags"]
    assert m["versions"]["numpy"] == np.__version__
    assert isinstance(bench.cpu_summary(m), str)


def test_end_to_end_with_fake_runtime(tmp_path):
    from PIL import Image

    for i in range(7):
        Image.fromarray(np.full((20, 30), i * 30, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    files = bench.list_files(tmp_path)
    rt = FakeRuntime()
    p = bench.bench_end_to_end(rt, files, batch=3, threads=2)
    assert p["files"] == 8 and p["errors"] == 1 and p["batch"] == 3
    assert p["bound"] in ("decode", "compute")
    for k in ("decode_images_per_s", "compute_images_per_s", "end_to_end_images_per_s"):
        assert p[k] > 0
    # decode-only, compute-only (warm-up + 3 batches of 7 good files) and end-to-end passes
    assert sum(rt.calls) == 3 + 7 + 7


# ----------------------------------------------------------------------------- real model


def test_run_bench_torch(tiny_run):
    pytest.importorskip("torch")
    from pneumo_edge.runtimes import open_runtime

    device = open_runtime(tiny_run, "torch").device  # cpu here, cuda:0 (name) on a GPU box
    res = bench.run_bench(tiny_run, "torch", [1, 4], log=lambda m: None, **FAST)
    assert [(r["runtime"], r["batch"]) for r in res["rows"]] == [("torch", 1), ("torch", 4)]
    for r in res["rows"]:
        check_row(r)
        assert r["iters"] == FAST["iters"] and r["device"] == device
    assert res["skipped"] == [] and res["pipeline"] == []
    assert res["model"]["image_size"] == read_card(tiny_run).image_size
    text = bench.format_table(res)
    assert "p99 ms" in text and "torch" in text


def test_all_lists_every_runtime_measured_or_skipped(tiny_run):
    """A model with only model.pt: torch is measured, the rest are skipped with a reason."""
    pytest.importorskip("torch")
    res = bench.run_bench(tiny_run, "all", [2], log=lambda m: None, **FAST)
    measured = {r["runtime"] for r in res["rows"]}
    skipped = {s["runtime"]: s["reason"] for s in res["skipped"]}
    assert measured | set(skipped) == set(RUNTIMES) and not measured & set(skipped)
    assert "torch" in measured
    assert "model.fp16.engine" in skipped["trt"] or "tensorrt" in skipped["trt"]
    assert all(reason.strip() for reason in skipped.values())
    assert "skipped trt:" in bench.format_table(res)


def test_onnx_runtimes_and_data_mode(exported_run, tiny_labelled):
    res = bench.run_bench(exported_run, "torch,onnx,onnx-fp16", [1, 3], data=tiny_labelled,
                          threads=2, log=lambda m: None, **FAST)
    assert {(r["runtime"], r["batch"]) for r in res["rows"]} == \
        {(n, b) for n in ("torch", "onnx", "onnx-fp16") for b in (1, 3)}
    for r in res["rows"]:
        check_row(r)
    assert [p["runtime"] for p in res["pipeline"]] == ["torch", "onnx", "onnx-fp16"]
    n_files = len(bench.list_files(tiny_labelled))
    for p in res["pipeline"]:
        assert p["files"] == n_files and p["errors"] == 0 and p["batch"] == 3
        assert p["bound"] in ("decode", "compute") and p["end_to_end_images_per_s"] > 0
    assert "end to end over" in bench.format_table(res)


def test_a_runtime_failing_while_running_is_listed_and_the_rest_go_on(tiny_run, monkeypatch):
    class Fails(FakeRuntime):
        name = "onnx"

        def __call__(self, batch):
            if len(batch) > 2:
                raise MemoryError("out of memory")
            return super().__call__(batch)

    def fake_open(model, name, log=None):
        return (Fails() if name == "onnx" else FakeRuntime()), None

    monkeypatch.setattr(bench, "open_for_bench", fake_open)
    res = bench.run_bench(tiny_run, "onnx,torch", [1, 4], log=lambda m: None, **FAST)
    assert [(r["runtime"], r["batch"]) for r in res["rows"]] == [("onnx", 1), ("fake", 1),
                                                                  ("fake", 4)]
    assert res["skipped"] == [{"runtime": "onnx", "reason": "failed at batch 4: MemoryError: "
                                                            "out of memory"}]


def test_no_runnable_runtime_is_an_error(tmp_path, tiny_run):
    shutil.copy(tiny_run / "card.json", tmp_path / "card.json")
    with pytest.raises(PneumoError, match="no runtime could run"):
        bench.run_bench(tmp_path, "torch,onnx", [1], log=lambda m: None, **FAST)


# ----------------------------------------------------------------------------- CLI


def test_cli_json(tiny_run, tiny_labelled):
    pytest.importorskip("torch")
    r = CliRunner().invoke(main, ["bench", "--model", str(tiny_run), "--runtime", "torch,trt",
                                  "--batch", "1,2", "--warmup", "1", "--iters", "3",
                                  "--data", str(tiny_labelled), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert {"machine", "rows", "skipped", "pipeline"} <= set(out)
    assert {"cpu", "cores", "cpu_flags", "gpu", "versions", "date"} <= set(out["machine"])
    assert [row["batch"] for row in out["rows"]] == [1, 2]
    for row in out["rows"]:
        check_row(row)
    assert out["skipped"][0]["runtime"] == "trt" and out["skipped"][0]["reason"]
    assert out["pipeline"] and out["pipeline"][0]["runtime"] == "torch"


def test_cli_table(tiny_run):
    pytest.importorskip("torch")
    r = CliRunner().invoke(main, ["bench", "--model", str(tiny_run), "--batch", "2",
                                  "--warmup", "0", "--iters", "2"])
    assert r.exit_code == 0, r.output
    assert "p50 ms" in r.stdout and "img/s" in r.stdout
    assert "runtime:" in r.stderr  # auto says what it picked


@pytest.mark.parametrize("args, msg", [(["--runtime", "tflite"], "unknown runtime"),
                                       (["--batch", "0"], "batch"),
                                       (["--iters", "0"], "iters")])
def test_cli_usage_errors(tiny_run, args, msg):
    r = CliRunner().invoke(main, ["bench", "--model", str(tiny_run), *args])
    assert r.exit_code == 2 and msg in r.output


def test_cli_missing_model(tmp_path):
    r = CliRunner().invoke(main, ["bench", "--model", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "error:" in r.stderr


def test_cli_import_stays_free_of_torch():
    code = "import sys, pneumo_edge.cli, pneumo_edge.commands.bench; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ----------------------------------------------------------------------------- gpu_check

GPU_CHECK = [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" /
                                 "gpu_check.py")]


def test_gpu_check_without_cuda_fails_fast_and_clearly(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: gpu_check would run for real")
    proc = subprocess.run([*GPU_CHECK, "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("error: gpu_check needs a CUDA GPU that torch sees "
                                   "(torch.cuda.is_available() is False); --dry-run runs the "
                                   "same steps on the CPU")
    assert not (tmp_path / "out").exists()


def test_gpu_check_dry_run_exercises_its_steps_on_the_cpu(tiny_exported, tmp_path):
    """--dry-run with an exported model: the TensorRT IO logic over torch memory and a stand-in
    context, auto, the torch benchmark and end-to-end scoring run; JSON and markdown written."""
    pytest.importorskip("torch")
    out = tmp_path / "out"
    proc = subprocess.run([*GPU_CHECK, "--dry-run", "--model", str(tiny_exported), "--out",
                           str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    status = {r["step"]: r["status"] for r in result["steps"]}
    assert status == {"environment": "pass", "torch vs CPU": "skip", "auto": "pass",
                      "TensorRT IO logic": "pass", "pytest -m gpu": "skip",
                      "bench torch": "pass", "end-to-end": "pass"}
    io = next(r for r in result["steps"] if r["step"] == "TensorRT IO logic")
    assert io["chunks"] == {"1": [4], "5": [5], "8": [8], "19": [8, 8, 4], "0": []}
    assert max(io["max_abs_diff_vs_runtime"].values()) <= 1e-3
    e2e = next(r for r in result["steps"] if r["step"] == "end-to-end")
    assert e2e["files"] == 48 and all(p["errors"] == 0 for p in e2e["rows"])
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# gpu_check: no GPU (dry run)") and "| TensorRT IO logic | pass |" in md
    assert result["ok"] is True and result["dry_run"] is True

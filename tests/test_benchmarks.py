"""benchmarks/: every script starts from a fresh checkout, shares benchmarks/common.py, reaches
nothing in tests/ and edits no sys.path; every pneumo_edge name a script imports exists."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "common.py")


def _imports(path: Path):
    """(module, name) for every ``from X import name`` in ``path``, at any depth."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield from ((node.module, a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            yield from ((a.name, None) for a in node.names)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_runs_from_any_folder(script, tmp_path):
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-2000:]


def test_no_script_edits_sys_path_or_reaches_tests():
    for path in [*SCRIPTS, BENCH / "common.py"]:
        text = path.read_text()
        assert "sys.path" not in text.replace("``sys.path``", ""), path.name
        for module, _ in _imports(path):
            assert module.split(".")[0] not in ("conftest", "tests"), (path.name, module)


def test_every_name_the_scripts_import_from_the_project_exists(monkeypatch):
    """Imports inside functions only fail when that function runs: check them all here."""
    pytest.importorskip("torch", reason="the training modules need torch")
    monkeypatch.syspath_prepend(str(BENCH))  # as when a script runs: its folder comes first
    siblings = {p.stem for p in BENCH.glob("*.py")}
    for path in [*SCRIPTS, BENCH / "common.py"]:
        for module, name in _imports(path):
            if module.split(".")[0] not in ("pneumo_edge", *siblings) or name is None:
                continue
            mod = importlib.import_module(module)
            if not hasattr(mod, name):  # a submodule: from pneumo_edge.train import cache
                importlib.import_module(f"{module}.{name}")


def test_common_writes_data_the_one_preprocessing_reads(tmp_path, monkeypatch):
    pytest.importorskip("pydicom")
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    from pneumo_edge.inputs.folders import scan_labelled
    from pneumo_edge.inputs.images import load_image

    root = common.write_labelled(tmp_path / "data", per_class=2, seed=3)
    samples = scan_labelled(root).samples
    assert [y for _, y in samples] == [0, 0, 1, 1]
    px = [load_image(p, 32) for p, _ in samples]
    assert max(int(x.max()) for x in px[2:]) > max(int(x.max()) for x in px[:2])  # the blob
    v = (np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 3) % 4096
    dcm = common.write_dicom(tmp_path / "x.dcm", v)
    assert load_image(dcm, 16).shape == (1, 16, 16)
    m = common.machine()
    assert m["cores"] >= 1 and m["python"] == ".".join(map(str, sys.version_info[:3]))


def test_busy_sees_training_as_ablation_runs_it_and_not_a_stopped_one(monkeypatch):
    """A timing benchmark refuses to start while training runs: also ``python -m pneumo_edge
    train`` (how benchmarks/ablation.py starts it: missed before), and not a training process
    paused with SIGSTOP, which uses no CPU."""
    import signal
    import time

    monkeypatch.syspath_prepend(str(BENCH))
    import common

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "-m", "pneumo_edge", "train", "--busy-probe"])
    try:
        assert any("--busy-probe" in line for line in common.busy())
        proc.send_signal(signal.SIGSTOP)
        for _ in range(100):  # the state changes asynchronously
            if common._stopped(str(proc.pid)):
                break
            time.sleep(0.05)
        assert not any("--busy-probe" in line for line in common.busy())
    finally:
        proc.kill()
        proc.wait()


def test_speed_report_names_a_trained_model_whatever_its_folder_is_called(monkeypatch):
    """The report told a trained model from the benchmark's own random-weight one by its
    folder's name (WORK/r50), so the default model in runs/r50 was reported as random weights.
    The run now records which it was; runs saved before keep the old reading."""
    monkeypatch.syspath_prepend(str(BENCH))
    import score_vs_baseline as svb

    trained = svb._model_text({"model": "/work/runs/r50", "random_weights": False})
    assert "trained by `pneumo-edge train`" in trained and "random" not in trained
    assert "random weights" in svb._model_text({"model": "/tmp/b/r50", "random_weights": True})
    assert "random weights" in svb._model_text({"model": "/tmp/b/r50"})  # saved before

"""The edge install: ``pip install .[cpu]`` (no torch) must score an exported model.

In-process we cannot uninstall torch, so the CLI runs in a subprocess where every import
finder is wrapped to not see torch or torchvision (``import torch`` fails the way it does when
torch is not installed, and ``importlib.util.find_spec("torch")`` is None). The real clean-venv
check is ``tests/edge_install_check.sh`` (slow, needs the package index): run it with
``PNEUMO_EDGE_INSTALL_CHECK=1``.
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "chest_xray" / "train"

NO_TORCH = """
import atexit, sys
BLOCKED = {"torch", "torchvision", "functorch", "torchgen"}

class Hide:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None
    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
for name in list(sys.modules):
    assert name.partition(".")[0] not in BLOCKED, name
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("the torch blocker does not work")

@atexit.register
def report():
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    sys.stderr.write(f"BLOCKED-MODULES-LOADED={loaded}\\n")

from pneumo_edge.cli import main
main(sys.argv[1:], prog_name="pneumo-edge")
"""


def run_without_torch(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("runtime", ["onnx", "auto"])
def test_score_without_torch(tiny_exported, tmp_path, runtime):
    out = tmp_path / "out.csv"
    proc = run_without_torch("score", SAMPLES, "--model", tiny_exported, "--runtime", runtime,
                             "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "BLOCKED-MODULES-LOADED=[]" in proc.stderr
    # the device is onnxruntime's (cpu here; cuda:N with a working CUDA provider), never torch
    if runtime == "onnx":
        from pneumo_edge.runtimes import open_runtime

        device = open_runtime(tiny_exported, "onnx", log=lambda m: None).device
        assert f"runtime: onnx on {device} (chosen with --runtime)" in proc.stderr
    else:
        assert re.search(r"^runtime: onnx(-fp16|-int8)? on (cpu|cuda:\d+) ", proc.stderr,
                         re.MULTILINE)
    rows = list(csv.reader(io.StringIO(out.read_text(encoding="utf-8"), newline="")))
    assert rows[0] == ["path", "label", "p_NORMAL", "p_PNEUMONIA", "qc", "error"]
    assert len(rows) == 1 + 48 and all(r[1] for r in rows[1:])


def test_torch_runtime_without_torch_is_a_clear_error(tiny_exported):
    proc = run_without_torch("score", SAMPLES, "--model", tiny_exported, "--runtime", "torch")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "error: torch is not installed" in proc.stderr


def test_cli_and_scoring_modules_import_no_torch():
    code = ("import sys, pneumo_edge.cli, pneumo_edge.commands.score, pneumo_edge.inputs.pipeline, "
            "pneumo_edge.outputs.csvout, pneumo_edge.runtimes.onnx_rt; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PNEUMO_EDGE_INSTALL_CHECK") != "1",
                    reason="clean-venv install check: set PNEUMO_EDGE_INSTALL_CHECK=1 "
                           "(creates a venv and pip-installs .[cpu]; needs the package index)")
def test_clean_venv_install_scores(tiny_exported, tmp_path):
    proc = subprocess.run(["bash", str(REPO / "tests" / "edge_install_check.sh"),
                           str(tiny_exported), str(tmp_path / "venv")],
                          capture_output=True, text=True, timeout=1800, cwd=REPO,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "edge install check: OK" in proc.stdout

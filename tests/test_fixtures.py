"""The shared fixtures leave nothing behind: what a run of the suite writes in pytest's temp
folders is removed at the end, failed or not, but the failed tests' own folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FAILING = '''
def test_uses_the_shared_data_and_fails(tiny_dataset, tmp_path):
    (tmp_path / "kept.txt").write_text("what this failed test wrote")
    assert (tiny_dataset / "train" / "NORMAL").is_dir()
    assert False, "fails on purpose"
'''


def test_a_failed_run_keeps_its_test_s_folder_and_none_of_the_shared_fixtures(tmp_path):
    (tmp_path / "test_inner.py").write_text(FAILING)
    base = tmp_path / "base"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p",
                        "no:cacheprovider", f"--basetemp={base}", "--rootdir", str(tmp_path),
                        str(tmp_path / "test_inner.py")], cwd=tmp_path, capture_output=True,
                       text=True, env={"PYTHONPATH": str(REPO / "tests"), "PATH": "/usr/bin"},
                       check=False)
    assert r.returncode == 1 and "fails on purpose" in r.stdout, r.stdout + r.stderr
    left = sorted(p.name for p in base.iterdir() if not p.is_symlink())  # pytest's *current
    assert left == ["test_uses_the_shared_data_and_0"]
    assert (base / "test_uses_the_shared_data_and_0" / "kept.txt").is_file()

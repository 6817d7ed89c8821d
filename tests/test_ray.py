"""Scoring on Ray (``score --ray``): a local Ray cluster of 2 CPUs, one per module (Ray starts
slowly). Its files stay in a temporary folder, which is removed after ``ray.shutdown()``."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pneumo_edge.cli import main
from pneumo_edge.commands.score import run_score
from pneumo_edge.runtimes import open_runtime

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "chest_xray"

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray scoring needs pip install 'pneumo-edge[ray]'")
    pytest.importorskip("ray.data")
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    # no token file under ~/.ray, no usage report; sockets need a short path
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def inputs(tmp_path):
    """The bundled samples plus hostile files and awkward names, in one folder."""
    from test_score import hostile_folder

    root = tmp_path / "in"
    shutil.copytree(SAMPLES, root / "samples")
    hostile_folder(root / "hostile")
    src = next((SAMPLES / "train" / "NORMAL").iterdir())
    for name in ("comma, \"quoted\".jpeg", "new\nline.jpeg", "ünïcödé 肺.jpeg"):
        shutil.copy(src, root / name)
    return root


def table(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))


def same_rows(got, ref):
    assert got[0] == ref[0]  # the header
    assert [r[0] for r in got] == [r[0] for r in ref]  # every file once, in input order
    assert [r[1] for r in got] == [r[1] for r in ref]  # labels
    assert [r[-1] for r in got] == [r[-1] for r in ref]  # error reasons
    for g, r in zip(got[1:], ref[1:]):
        if r[1]:
            assert np.abs(np.array(g[2:-1], float) - np.array(r[2:-1], float)).max() <= 1e-6


def score(inputs, model, out, **kw):
    return run_score([str(inputs)], str(model), runtime="onnx", batch=4, output=str(out),
                     quiet=True, **kw)


def test_ray_csv_equals_local_scoring(ray_cluster, tiny_exported, inputs, tmp_path):
    local = score(inputs, tiny_exported, tmp_path / "local.csv")
    logs = []
    remote = run_score([str(inputs)], str(tiny_exported), runtime="onnx", batch=4,
                       output=str(tmp_path / "ray.csv"), ray="local", log=logs.append)
    assert remote.exit_code == local.exit_code == 1  # the hostile files failed, in both
    assert (remote.files, remote.scored, remote.failed) == (local.files, local.scored,
                                                            local.failed)
    got, ref = table(tmp_path / "ray.csv"), table(tmp_path / "local.csv")
    same_rows(got, ref)
    assert len(got) - 1 == local.files and local.failed >= 7
    here = open_runtime(tiny_exported, "onnx", log=lambda m: None).device  # cpu, or a GPU
    assert any(f"ray actors ran: onnx on {here}" in m for m in logs), logs
    assert (tmp_path / "ray.csv.json").is_file() and not (tmp_path / "ray.csv.partial").exists()
    assert ray_cluster.is_initialized()  # a cluster it did not start is left running


def test_resume_on_ray_skips_rows_already_written(ray_cluster, tiny_exported, inputs,
                                                  tmp_path):
    out = tmp_path / "out.csv"
    score(inputs, tiny_exported, out)
    ref = table(out)
    kept = 9
    text = out.read_text(encoding="utf-8")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator="\n").writerows(rows[:1 + kept])
    Path(f"{out}.partial").write_text(buf.getvalue(), encoding="utf-8")
    out.unlink()  # as an interrupted run leaves it: FILE.partial and FILE.json
    logs = []
    s = run_score([str(inputs)], str(tiny_exported), runtime="onnx", batch=4,
                  output=str(out), resume=True, ray="local", log=logs.append)
    assert s.resumed == kept and any(f"{kept} of {len(ref) - 1} rows" in m for m in logs)
    same_rows(table(out), ref)


def _actor_pids():
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if b"_ScoreActor" in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
def test_killing_a_worker_mid_run_still_writes_every_row_once(ray_cluster, tiny_exported,
                                                              tmp_path):
    src = sorted((SAMPLES / "train" / "PNEUMONIA").iterdir())[:6]
    root = tmp_path / "many"
    root.mkdir()
    for k in range(240):
        shutil.copy(src[k % len(src)], root / f"img{k:04d}.jpeg")
    (root / "img0100.jpeg").write_bytes(b"")  # an error row in the middle
    ref_s = score(root, tiny_exported, tmp_path / "local.csv")
    out, partial = tmp_path / "ray.csv", tmp_path / "ray.csv.partial"
    result = {}

    def go():
        try:
            result["s"] = run_score([str(root)], str(tiny_exported), runtime="onnx", batch=2,
                                    output=str(out), ray="local", quiet=True)
        except BaseException as exc:  # noqa: BLE001 -- reported by the assertion below
            result["exc"] = exc

    t = threading.Thread(target=go)
    t.start()
    killed, deadline = None, time.monotonic() + 240
    while killed is None and t.is_alive() and time.monotonic() < deadline:
        rows = partial.read_bytes().count(b"\n") if partial.exists() else 0
        pids = _actor_pids()
        if rows > 4 and pids:
            os.kill(pids[0], signal.SIGKILL)
            killed = (pids[0], rows)
        time.sleep(0.02)
    t.join(timeout=300)
    assert not t.is_alive() and "exc" not in result, result
    assert killed is not None, "the run ended before a worker could be killed"
    assert result["s"].exit_code == ref_s.exit_code == 1
    got, ref = table(out), table(tmp_path / "local.csv")
    assert len({r[0] for r in got[1:]}) == len(got) - 1 == 240
    same_rows(got, ref)


def test_without_ray_the_option_says_how_to_install_it(tiny_exported, tmp_path,
                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    res = CliRunner().invoke(main, ["score", str(SAMPLES), "--model", str(tiny_exported),
                                    "-o", str(tmp_path / "x.csv"), "--ray"])
    assert res.exit_code == 2
    assert "pip install 'pneumo-edge[ray]'" in res.stderr
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.csv.partial").exists()


@pytest.mark.parametrize("address", ["samples/chest_xray", "http//x", "a b:1"])
def test_a_path_is_not_taken_for_an_address(tiny_exported, address):
    res = CliRunner().invoke(main, ["score", str(SAMPLES), "--model", str(tiny_exported),
                                    "--ray", address])
    assert res.exit_code == 2 and "not a Ray address" in res.stderr

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
from pneumo_edge.outputs.csvout import file_identity, path_bytes
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
    probs = [k for k, h in enumerate(ref[0]) if h.startswith("p_")]
    other = [k for k in range(len(ref[0])) if k not in probs]
    for g, r in zip(got[1:], ref[1:]):
        assert [g[k] for k in other] == [r[k] for k in other]  # qc, DICOM columns too
        if r[1]:
            assert np.abs(np.array([g[k] for k in probs], float)
                          - np.array([r[k] for k in probs], float)).max() <= 1e-6


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


def test_ray_qc_column_equals_local_scoring(ray_cluster, tiny_exported, tmp_path):
    """The pixel check of the qc column runs where the pixels are (Ray's decode tasks): a blank
    frame is flagged and a sample X-ray is not, with and without --ray."""
    from PIL import Image

    from pneumo_edge.model.qc import BLANK

    root = tmp_path / "in"
    root.mkdir()
    Image.fromarray(np.zeros((120, 100), np.uint8)).save(root / "a_black.png")
    Image.fromarray(np.full((90, 90), 200, np.uint8)).save(root / "b_grey.png")
    shutil.copy(next((SAMPLES / "train" / "NORMAL").iterdir()), root / "c_xray.jpeg")
    (root / "d_broken.png").write_bytes(b"not a png")
    local = score(root, tiny_exported, tmp_path / "local.csv")
    remote = score(root, tiny_exported, tmp_path / "ray.csv", ray="local")
    assert remote.flagged == local.flagged == 2
    got, ref = table(tmp_path / "ray.csv"), table(tmp_path / "local.csv")
    same_rows(got, ref)
    qc = {Path(r[0]).name: r[ref[0].index("qc")] for r in got[1:]}
    assert qc == {"a_black.png": BLANK, "b_grey.png": BLANK, "c_xray.jpeg": "",
                  "d_broken.png": ""}


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
    # as an interrupted run leaves it: FILE.partial, FILE.partial.json, FILE.partial.ids
    Path(f"{out}.json").rename(f"{out}.partial.json")
    Path(f"{out}.partial.ids").write_text("".join(
        file_identity(os.fsdecode(path_bytes(r[0]))) + "\n" for r in rows[1:1 + kept]))
    out.unlink()
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


def test_the_probe_passes_a_real_ray_head(ray_cluster):
    from pneumo_edge.sources.ray import probe

    gcs = ray_cluster.get_runtime_context().gcs_address
    t0 = time.monotonic()
    probe(gcs)  # no UsageError: Ray's GCS answers as a gRPC server
    assert time.monotonic() - t0 < 2


def _server(answer: bytes | None):
    """A TCP server on 127.0.0.1 that sends ``answer`` to each connection (None: nothing,
    it just holds the connection open); (port, stop)."""
    import socket

    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        held = []
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            if answer is not None:
                conn.sendall(answer)
            held.append(conn)
        for c in held:
            c.close()
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1], stop


@pytest.mark.parametrize("answer", [None, b"HTTP/1.1 400 Bad Request\r\n\r\n", b"x"])
def test_an_address_where_nothing_speaks_ray_is_refused_in_seconds(answer):
    pytest.importorskip("ray")
    from pneumo_edge.errors import UsageError
    from pneumo_edge.sources.ray import PROBE_TIMEOUT_S, probe

    port, stop = _server(answer)
    try:
        t0 = time.monotonic()
        with pytest.raises(UsageError, match="does not speak Ray"):
            probe(f"127.0.0.1:{port}")
        assert time.monotonic() - t0 < PROBE_TIMEOUT_S + 1
    finally:
        stop.set()


def _score_process(args, timeout=120):
    import subprocess

    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pneumo_edge", "score", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False,
                       env=dict(os.environ, ORT_DISABLE_TELEMETRY="1"))
    return r, time.monotonic() - t0


@pytest.mark.parametrize("server", ["nothing listening", "not Ray"])
def test_unreachable_cluster_is_one_line_and_exit_2(tiny_exported, tmp_path, server):
    """Issue 19: --ray=127.0.0.1:1 gave no result in 90 s, and an address where something
    else listens retried for minutes with Ray's C++ warnings on stderr."""
    pytest.importorskip("ray")
    port, stop = (1, None) if server == "nothing listening" else _server(b"SSH-2.0-x\r\n")
    try:
        r, took = _score_process([SAMPLES, "--model", tiny_exported, "--runtime", "onnx", "-q",
                                  "-o", tmp_path / "o.csv", f"--ray=127.0.0.1:{port}"])
    finally:
        if stop is not None:
            stop.set()
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: --ray 127.0.0.1:"), \
        r.stderr
    assert ("cannot connect" if port == 1 else "does not speak Ray") in r.stderr
    assert took < 30  # ~15 s on an idle machine: interpreter, model, the probe's 4 s
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_sigterm_ends_a_ray_run_within_seconds(tiny_exported, tmp_path):
    """Issue 19: SIGTERM took 34 s to end a Ray run. A run on a Ray instance of its own ends
    within seconds, keeping its rows for --resume."""
    import subprocess

    pytest.importorskip("ray.data")
    src = next((SAMPLES / "train" / "NORMAL").iterdir())
    d = tmp_path / "in"
    d.mkdir()
    for i in range(400):
        os.link(src, d / f"img_{i:04d}.jpeg")
    out = tmp_path / "o.csv"
    env = dict(os.environ, ORT_DISABLE_TELEMETRY="1", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen([sys.executable, "-m", "pneumo_edge", "score", str(d), "--model",
                             str(tiny_exported), "--runtime", "onnx", "-q", "--batch", "2",
                             "-o", str(out), "--ray"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partial = Path(f"{out}.partial")
    end = time.monotonic() + 240
    while time.monotonic() < end and proc.poll() is None:
        if partial.exists() and partial.read_bytes().count(b"\n") > 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("SIGTERM did not end the Ray run within 20 s") from None
    assert time.monotonic() - t0 < 20 and proc.returncode != 0
    assert b"Traceback" not in err, err[-2000:]
    assert partial.exists() and not out.exists()


def test_ray_actors_carry_the_models_ood_score(tiny_run, tiny_dataset, tmp_path):
    """The qc column needs the network's ood output: the actor returns it with the
    probabilities, the same numbers the runtime gives here (no cluster needed to check)."""
    pytest.importorskip("torch")
    from conftest import copy_model_dir
    from pneumo_edge.train.recalibrate import CalibrateOptions, run_calibrate

    from pneumo_edge.inputs.pipeline import decode_one
    from pneumo_edge.sources.ray import _batch, _ScoreActor

    run = copy_model_dir(tiny_run, tmp_path / "run")
    assert run_calibrate(run, tiny_dataset, CalibrateOptions(device="cpu"),
                         log=lambda m: None) == 0
    rt = open_runtime(run, "torch", log=lambda m: None)
    files = sorted(str(p) for p in (tiny_dataset / "train").rglob("*.png"))[:3] + ["/nonexistent"]
    pixels = np.zeros((4, 1, rt.card.image_size, rt.card.image_size), np.uint8)
    errors = []
    for j, f in enumerate(files):
        px, err, _ = decode_one(f, rt.card.image_size)
        if px is not None:
            pixels[j] = px
        errors.append(err or "")
    assert errors[:3] == ["", "", ""] and errors[3]
    actor = _ScoreActor(str(rt.path), rt.name, rt.sha256, len(rt.card.classes))
    blank = np.array(["", "x", "", ""], object)  # the decode task's pixel checks
    block = actor({"i": np.arange(4), "pixels": pixels, "error": np.array(errors, object),
                   "blank": blank, "cpu_s": np.zeros(4)})
    b = _batch(files, block, 0.0)
    here = rt.outputs(pixels[:3])
    assert b.ok == [0, 1, 2] and b.ood is not None and b.blank == ["", "x", ""]
    assert np.allclose(b.ood, here["ood"], atol=1e-5)
    assert np.allclose(b.probs, here["probs"], atol=1e-6)

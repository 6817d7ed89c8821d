"""Outputs never lie, nothing destroyed: non-finite probabilities, the provenance file and
--resume's refusals, where -o may write, write failures, folders that cannot be listed and
folder symlinks -- each on a real tiny model through the real CLI."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pneumo_edge.cli import main
from pneumo_edge.runtimes import open_runtime

REPO = Path(__file__).resolve().parents[1]
HEADER = ["path", "label", "p_NORMAL", "p_PNEUMONIA", "qc", "error"]


def cli(*args):
    res = CliRunner().invoke(main, [*map(str, args)], catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def rows_of(text: str) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows[0] == HEADER
    return rows[1:]


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (80, 70), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def run_cli_process(args, **kw) -> subprocess.CompletedProcess:
    """``pneumo-edge ARGS`` in a fresh interpreter (for real file descriptors and limits)."""
    return subprocess.run([sys.executable, "-m", "pneumo_edge", *map(str, args)], cwd=REPO,
                          stderr=subprocess.PIPE, text=True, check=False, **kw)


# --------------------------------------------------------------------------- a NaN model


@pytest.fixture
def nan_run(copy_run):
    """A copy of the tiny model whose weights are all NaN: every probability is NaN."""
    torch = pytest.importorskip("torch")
    d = copy_run()
    ckpt = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
    for v in ckpt["state_dict"].values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(ckpt, d / "model.pt")
    return d


def test_nan_model_gives_error_rows_never_a_label(nan_run, tmp_path):
    write_images(tmp_path / "d", 3)
    code, out, err = cli("score", tmp_path / "d", "--model", nan_run, "--runtime", "torch")
    rows = rows_of(out)
    assert code == 1, err
    assert len(rows) == 3
    for r in rows:
        assert r[1:4] == ["", "", ""], r  # no label, no half score
        assert r[-1] == "model produced non-finite probabilities"
    assert "failed 3" in err


def test_score_rows_labels_only_the_finite_rows():
    from pneumo_edge.commands.score import NON_FINITE, score_rows
    from pneumo_edge.inputs.pipeline import Batch
    from pneumo_edge.model.card import Card

    card = Card(classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", image_size=16,
                threshold=0.5, arch="resnet18")
    probs = np.array([[0.9, 0.1], [np.nan, np.nan], [0.2, np.inf], [0.3, 0.7]], np.float32)
    b = Batch(0, ["a.png", "b.png", "c.png", "d.png", "e.png"],
              np.zeros((4, 1, 16, 16), np.uint8), [0, 1, 2, 4], {3: "broken"})
    rows = score_rows(b, probs, card, None)
    assert [r[1] for r in rows] == ["NORMAL", "", "", "", "PNEUMONIA"]
    assert [r[4] for r in rows] == ["", NON_FINITE, NON_FINITE, "broken", ""]
    assert rows[1][2:4] == ["", ""] and rows[2][2:4] == ["", ""]


def test_eval_of_a_nan_model_writes_no_metrics(nan_run, tiny_labelled, tmp_path):
    out = tmp_path / "m.json"
    code, _, err = cli("eval", "--model", nan_run, "--data", tiny_labelled, "--out", out)
    assert code == 1 and "non-finite probabilities for 16 of 16 images" in err, err
    assert not out.exists()


# --------------------------------------------------------------------------- provenance


def test_output_file_gets_a_provenance_record(tiny_exported, tmp_path):
    write_images(tmp_path / "d", 4)
    (tmp_path / "d" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out.csv"
    code, _, err = cli("score", tmp_path / "d", "--model", tiny_exported, "--runtime", "onnx",
                       "-o", out)
    assert code == 1, err
    rec = json.loads((tmp_path / "out.csv.json").read_text())
    m = rec["model"]
    here = open_runtime(tiny_exported, "onnx", log=lambda m: None).device  # cpu, or a GPU
    assert m["runtime"] == "onnx" and m["device"] == here and m["precision"] == "fp32"
    assert Path(m["file"]) == (tiny_exported / "model.onnx").resolve()
    assert m["sha256"] == sha256(tiny_exported / "model.onnx")
    assert Path(m["directory"]) == tiny_exported.resolve()
    assert rec["threshold"] == 0.5 and rec["threshold_from"] == "card"
    assert rec["classes"] == ["NORMAL", "PNEUMONIA"] and rec["image_size"] == 64
    assert {"pneumo_edge", "python", "numpy", "onnxruntime"} <= set(rec["versions"])
    started, finished = (datetime.fromisoformat(rec[k]) for k in ("started", "finished"))
    assert started.utcoffset().total_seconds() == 0 and started <= finished
    assert rec["counts"] == {"files": 5, "scored": 4, "failed": 1, "ignored": 0, "resumed": 0}
    assert rec["exit_code"] == 1 and rec["status"] == "finished"
    assert not list(tmp_path.glob(".out.csv.json*"))  # no temporary file left behind


def interrupted_run(tiny_exported, tmp_path, *extra) -> tuple[Path, Path, bytes]:
    """A finished -o run turned into an interrupted one: out.csv.partial (header and two
    rows), its record out.csv.partial.json and the identities of its rows' files."""
    from pneumo_edge.outputs.csvout import file_identity

    files = write_images(tmp_path / "d", 5)
    out = tmp_path / "out.csv"
    code, _, err = cli("score", tmp_path / "d", "--model", tiny_exported, "--runtime", "onnx",
                       "-o", out, *extra)
    assert code == 0, err
    partial = tmp_path / "out.csv.partial"
    lines = out.read_bytes().splitlines(keepends=True)
    partial.write_bytes(b"".join(lines[:3]))  # header and two rows
    (tmp_path / "out.csv.json").rename(tmp_path / "out.csv.partial.json")
    (tmp_path / "out.csv.partial.ids").write_text(
        "".join(file_identity(str(f)) + "\n" for f in files[:2]))
    out.unlink()
    return tmp_path / "d", out, partial.read_bytes()


@pytest.mark.parametrize("change,word", [
    (("--runtime", "onnx", "--threshold", "0.3"), "threshold was 0.5"),
    (("--runtime", "onnx-fp16"), "sha256"),
    (("--runtime", "torch"), "sha256"),
    (("--runtime", "onnx", "--qc", "refuse"), "--qc was flag"),  # refused rows among flagged ones
])
def test_resume_refuses_another_model_or_threshold(tiny_exported, tmp_path, change, word):
    d, out, before = interrupted_run(tiny_exported, tmp_path)
    record = (tmp_path / "out.csv.partial.json").read_bytes()
    code, stdout, err = cli("score", d, "--model", tiny_exported, "-o", out, "--resume",
                            "--quiet", *change)
    assert code == 2 and stdout == ""
    line = one_error_line(err)
    assert "cannot resume" in line and word in line, line
    assert (tmp_path / "out.csv.partial").read_bytes() == before and not out.exists()
    assert (tmp_path / "out.csv.partial.json").read_bytes() == record


def test_resume_with_the_same_settings_continues(tiny_exported, tmp_path):
    d, out, _ = interrupted_run(tiny_exported, tmp_path, "--threshold", "0.4")
    code, _, err = cli("score", d, "--model", tiny_exported, "--runtime", "onnx",
                       "--threshold", "0.4", "-o", out, "--resume")
    assert code == 0 and "2 of 5 rows already written" in err, err
    rec = json.loads((tmp_path / "out.csv.json").read_text())
    assert rec["counts"]["resumed"] == 2 and rec["threshold_from"] == "--threshold"
    assert rec["first_started"] is not None and len(rows_of(out.read_text())) == 5
    assert not list(tmp_path.glob("out.csv.partial*"))


@pytest.mark.parametrize("cells,why", [
    ({2: "abc"}, "not a number"),
    ({2: "nan", 3: "nan"}, "outside [0, 1]"),
    ({1: "FLIP"}, "label disagrees with its probabilities"),
    ({-1: "a reason"}, "a label and a reason"),  # -1: error, the last column
    ({1: "", -1: ""}, "no label and no reason"),
])
def test_resume_refuses_rows_scoring_never_writes(tiny_exported, tmp_path, cells, why):
    """Issue 19: a partial CSV with malformed rows was continued; now it is refused."""
    d, out, before = interrupted_run(tiny_exported, tmp_path)
    rows = list(csv.reader(io.StringIO(before.decode(), newline="")))
    for k, v in cells.items():
        rows[2][k] = ({"NORMAL": "PNEUMONIA", "PNEUMONIA": "NORMAL"}[rows[2][1]]
                      if v == "FLIP" else v)
    bad = "".join(",".join(r) + "\n" for r in rows).encode()
    (tmp_path / "out.csv.partial").write_bytes(bad)
    code, _, err = cli("score", d, "--model", tiny_exported, "--runtime", "onnx", "-o", out,
                       "--resume", "--quiet")
    line = one_error_line(err)
    assert code == 2 and "row 2 is damaged" in line and why in line, line
    assert (tmp_path / "out.csv.partial").read_bytes() == bad and not out.exists()


def test_an_interrupted_run_never_replaces_the_finished_runs_record(tiny_exported, tmp_path):
    """Issue 19: an interrupted second -o run overwrote the first run's out.csv.json while
    out.csv was still the first run's. Its record now lives beside out.csv.partial until its
    CSV is renamed."""
    write_images(tmp_path / "a", 3)
    write_images(tmp_path / "d", 40, seed=1)
    out = tmp_path / "out.csv"
    code, _, err = cli("score", tmp_path / "a", "--model", tiny_exported, "-o", out, "-q")
    assert code == 0, err
    first, first_record = out.read_bytes(), (tmp_path / "out.csv.json").read_bytes()
    args = ["score", tmp_path / "d", "--model", tiny_exported, "--runtime", "onnx", "-o", out,
            "--batch", "4", "-q"]
    res = run_cli_process(args, preexec_fn=_limit_file_size(1500), timeout=300)
    assert res.returncode == 2, res.stderr
    assert out.read_bytes() == first and (tmp_path / "out.csv.json").read_bytes() == first_record
    running = json.loads((tmp_path / "out.csv.partial.json").read_text())
    assert running["status"] == "write failed" and running["inputs"] == [str(tmp_path / "d")]
    code, _, err = cli(*args, "--resume")
    assert code == 0, err
    record = json.loads((tmp_path / "out.csv.json").read_text())
    assert record["status"] == "finished" and record["counts"]["scored"] == 40
    assert record["input_identity"]["rows"] == 40
    assert len(rows_of(out.read_text())) == 40
    assert not list(tmp_path.glob("out.csv.partial*"))


def test_resume_refuses_rows_without_a_provenance_record(tiny_exported, tmp_path):
    d, out, before = interrupted_run(tiny_exported, tmp_path)
    (tmp_path / "out.csv.partial.json").unlink()
    code, _, err = cli("score", d, "--model", tiny_exported, "--runtime", "onnx", "-o", out,
                       "--resume", "--quiet")
    assert code == 2 and "no record of the model" in one_error_line(err)
    assert (tmp_path / "out.csv.partial").read_bytes() == before


# --------------------------------------------------------------------------- where -o writes


def test_symlink_planted_at_partial_is_never_written_through(tiny_exported, tmp_path):
    write_images(tmp_path / "d", 2)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    partial = tmp_path / "out.csv.partial"
    partial.symlink_to(victim)
    dangling = tmp_path / "b.csv.partial"
    dangling.symlink_to(tmp_path / "created_through_link")
    Path(tmp_path / "b.csv").write_text("old\n")  # --resume would copy it through the link
    for out, extra in ((tmp_path / "out.csv", ()), (tmp_path / "b.csv", ("--resume",))):
        code, stdout, err = cli("score", tmp_path / "d", "--model", tiny_exported, "-o", out,
                                "--quiet", *extra)
        assert code == 2 and stdout == ""
        assert "symbolic link" in one_error_line(err)
    assert victim.read_text() == "precious\n" and partial.is_symlink()
    assert not (tmp_path / "created_through_link").exists() and dangling.is_symlink()
    assert not (tmp_path / "out.csv").exists() and (tmp_path / "b.csv").read_text() == "old\n"


def test_device_fifo_or_hard_link_at_output_is_refused(tiny_exported, tmp_path):
    write_images(tmp_path / "d", 1)
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    shared = tmp_path / "shared.csv"
    shared.write_text("other\n")
    os.link(shared, tmp_path / "linked.csv.partial")
    cases = [("/dev/null", "character device"), (fifo, "FIFO"),
             (tmp_path / "linked.csv", "hard links")]
    for out, word in cases:
        code, _, err = cli("score", tmp_path / "d", "--model", tiny_exported, "-o", out, "-q")
        assert code == 2 and word in one_error_line(err), (out, err)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert not os.path.lexists("/dev/null.partial") and not os.path.lexists("/dev/null.json")
    assert shared.read_text() == "other\n"


# --------------------------------------------------------------------------- write failures


def test_full_stdout_is_one_line_and_exit_2(tiny_exported, tmp_path):
    write_images(tmp_path / "d", 2)
    with open("/dev/full", "wb") as full:
        res = run_cli_process(["score", tmp_path / "d", "--model", tiny_exported, "-q"],
                              stdout=full, timeout=300)
    assert res.returncode == 2, res.stderr
    line = one_error_line(res.stderr)
    assert line.startswith("error: cannot write stdout: No space left on device (")


def test_closed_stdout_is_one_line_and_exit_2(tiny_exported, tmp_path):
    write_images(tmp_path / "d", 1)
    res = run_cli_process(["score", tmp_path / "d", "--model", tiny_exported, "-q"],
                          preexec_fn=lambda: os.close(1), timeout=300)
    assert res.returncode == 2, res.stderr
    assert "cannot write stdout" in one_error_line(res.stderr)


def test_reader_that_stops_early_ends_the_run_quietly(tiny_exported, tmp_path):
    """`score ... | head -1`: a closed pipe is not a write failure: exit 141, nothing said."""
    write_images(tmp_path / "d", 30)
    proc = subprocess.Popen([sys.executable, "-m", "pneumo_edge", "score", str(tmp_path / "d"),
                             "--model", str(tiny_exported), "--batch", "1", "-q"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().decode().rstrip("\n") == ",".join(HEADER)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and err == "", err


def _limit_file_size(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_failed_write_to_output_exits_2_and_resume_completes_it(tiny_exported, tmp_path):
    """A real write failure (the file-size limit, EFBIG, standing in for a full disk): one
    line, exit 2 (never 1), the rows written stay valid, and --resume finishes the CSV."""
    write_images(tmp_path / "d", 40)
    out = tmp_path / "out.csv"
    args = ["score", tmp_path / "d", "--model", tiny_exported, "--runtime", "onnx", "-o", out,
            "--batch", "4", "-q"]
    res = run_cli_process(args, preexec_fn=_limit_file_size(1500), timeout=300)
    assert res.returncode == 2, res.stderr
    line = one_error_line(res.stderr)
    assert line == (f"error: cannot write {out}.partial: File too large "
                    "(use --resume to continue)")
    kept = rows_of((tmp_path / "out.csv.partial").read_text())
    assert 0 < len(kept) < 40 and all(r[1] for r in kept[:-1])
    assert json.loads((tmp_path / "out.csv.partial.json").read_text())["status"] == \
        "write failed"
    code, _, err = cli(*args[:-1], "--resume")
    assert code == 0, err
    _, ref, _ = cli(*args[:6], "--batch", "4")
    assert [r[:2] for r in rows_of(out.read_text())] == [r[:2] for r in rows_of(ref)]


# --------------------------------------------------------------------------- folders


def too_deep_folder(root: Path) -> Path:
    """A folder whose path is longer than PATH_MAX (4096): even root cannot list it. Returns
    the first folder on the way whose path is too long."""
    fd = os.open(root, os.O_RDONLY)
    path, first = str(root), None
    try:
        for i in range(24):
            name = f"{i:02d}" + "x" * 198
            os.mkdir(name, dir_fd=fd)
            path = os.path.join(path, name)
            if first is None and len(path) > 4096:
                first = path
            fd2 = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = fd2
        os.close(os.open("hidden.png", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)
    return Path(first)


def test_unlistable_folder_gets_an_error_row_and_exit_1(tiny_exported, tmp_path):
    d = tmp_path / "d"
    write_images(d, 2)
    deep = too_deep_folder(d)
    code, out, err = cli("score", d, "--model", tiny_exported)
    assert code == 1, err
    rows = {r[0]: r for r in rows_of(out)}
    assert len(rows) == 3 and rows[str(deep)][1] == ""
    assert rows[str(deep)][-1] == "cannot list folder: File name too long"
    assert "failed 1" in err


def test_folder_symlinks_followed_only_with_follow_links(tiny_exported, tmp_path):
    scan, outside = tmp_path / "scan", tmp_path / "outside"
    write_images(scan, 1)
    write_images(outside, 1, seed=5)
    (scan / "away").symlink_to(outside)
    (scan / "same.png").symlink_to(scan / "img_000.png")
    code, out, err = cli("score", scan, "--model", tiny_exported)
    assert code == 0
    names = [os.path.relpath(r[0], scan) for r in rows_of(out)]
    assert names == ["img_000.png", "same.png"]  # the file link and its target: one row each
    assert "1 symbolic links to folders not followed" in err
    code, out, _ = cli("score", scan, "--model", tiny_exported, "--follow-links")
    names = [os.path.relpath(r[0], scan) for r in rows_of(out)]
    assert code == 0 and names == ["away/img_000.png", "img_000.png", "same.png"]


# --------------------------------------------------------------------------- eval


def test_eval_on_a_folder_of_garbage_exits_2(tiny_exported, tmp_path):
    for cls in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "g" / cls).mkdir(parents=True)
        (tmp_path / "g" / cls / "x.png").write_text("not an image")
    out = tmp_path / "m.json"
    code, _, err = cli("eval", "--model", tiny_exported, "--data", tmp_path / "g", "--out", out)
    assert code == 2 and "none of its 2 image files could be decoded" in err.splitlines()[-1]
    assert err.splitlines()[-1].startswith("error: ") and not out.exists()


def test_eval_defaults_to_auto_and_takes_a_model_file(tiny_exported, tiny_labelled, copy_run):
    run_dir = copy_run(tiny_exported)
    code, out, err = cli("eval", "--model", run_dir / "model.onnx", "--data", tiny_labelled)
    assert code == 0, err
    assert "runtime: onnx" in err and "chosen with --runtime" not in err and "accuracy" in out
    assert (run_dir / f"eval_{tiny_labelled.name}.json").is_file()

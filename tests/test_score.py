"""pneumo-edge score: real scoring through the CLI of generated, hostile and bundled images."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ctrl_c_enabled
from PIL import Image

from pneumo_edge.cli import main
from pneumo_edge.inputs import pipeline
from pneumo_edge.inputs.folders import walk_images
from pneumo_edge.model.card import Card
from pneumo_edge.model.modeldir import read_card

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "chest_xray" / "train"
HEADER = ["path", "label", "p_NORMAL", "p_PNEUMONIA", "error"]
SCORED = [*HEADER[:-1], "qc", HEADER[-1]]  # what score writes: the qc column before error


def runtime_line(model, runtime) -> str:
    """``runtime: NAME on DEVICE`` for what ``runtime`` opens on this machine (CPU or GPU)."""
    from pneumo_edge.runtimes import open_runtime

    rt = open_runtime(model, runtime, log=lambda m: None)
    return f"runtime: {rt.name} on {rt.device}"


def run(*args):
    """``pneumo-edge score ARGS`` in-process; (exit code, stdout text, stderr text)."""
    res = CliRunner().invoke(main, ["score", *map(str, args)], catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def rows_of(text: str) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows[0] == SCORED
    assert all(len(r) == len(SCORED) for r in rows)
    return rows[1:]


def grey(seed=0, w=120, h=90) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(60, 20, (h, w))
    img[h // 4: h // 2, w // 3: w // 2] += 150  # an off-centre bright patch: orientation matters
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(grey(seed + i)).save(p)
        paths.append(p)
    return paths


def png_header_only(path: Path, w: int, h: int) -> None:
    """A tiny PNG whose header claims ``w x h`` pixels (a decompression bomb's calling card)."""
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def check_labels(rows, card: Card, threshold=None):
    t = card.threshold if threshold is None else threshold
    for r in rows:
        if r[1]:
            p = [float(x) for x in r[2:4]]
            assert abs(sum(p) - 1) < 1e-4
            assert r[1] == ("PNEUMONIA" if p[1] >= t else "NORMAL"), r
            assert r[-1] == ""


# --------------------------------------------------------------------------- the contract


def test_bundled_samples_header_order_one_row_each(tiny_exported):
    code, out, err = run(SAMPLES, "--model", tiny_exported, "--batch", "5")
    assert code == 0, err
    rows = rows_of(out)
    expected = walk_images([SAMPLES]).files
    assert len(expected) == 48
    assert [r[0] for r in rows] == expected  # sorted walk order, one row per file
    assert all(r[1] and not r[-1] for r in rows)
    check_labels(rows, read_card(tiny_exported))
    assert all(len(x.split(".")[1]) == 6 for r in rows for x in r[2:4])
    # the summary and the runtime choice are on stderr only
    # auto's choice depends on the machine (onnx on CPU here, a GPU runtime on a GPU box)
    assert f"{runtime_line(tiny_exported, 'auto')} (" in err
    assert "files 48, scored 48, failed 0" in err
    assert "images/s" in err and "decode" in err and "compute" in err
    assert "\r" not in err  # no progress bar when stderr is not a terminal


def test_torch_and_onnx_runtimes_agree(tiny_exported, tmp_path):
    write_images(tmp_path / "d", 5)
    got = {}
    for rt in ("torch", "onnx"):
        code, out, err = run(tmp_path / "d", "--model", tiny_exported, "--runtime", rt)
        assert code == 0 and f"{runtime_line(tiny_exported, rt)} (chosen with --runtime)" in err
        got[rt] = rows_of(out)
    assert [r[:2] for r in got["torch"]] == [r[:2] for r in got["onnx"]]
    p = {k: np.array([r[2:4] for r in v], float) for k, v in got.items()}
    assert np.abs(p["torch"] - p["onnx"]).max() <= 1e-4


def test_quiet_prints_nothing_on_stderr(tiny_exported, tmp_path):
    write_images(tmp_path / "d", 3)
    code, out, err = run(tmp_path / "d", "--model", tiny_exported, "--quiet")
    assert code == 0 and err == "" and len(rows_of(out)) == 3


def test_same_rows_whatever_batch_and_workers(tiny_exported, tmp_path):
    write_images(tmp_path / "d", 11)
    ref = rows_of(run(tmp_path / "d", "--model", tiny_exported, "--batch", "32")[1])
    for batch, workers in [(1, 1), (4, 3)]:
        got = rows_of(run(tmp_path / "d", "--model", tiny_exported, "--batch", batch,
                          "--workers", workers)[1])
        assert [r[:2] for r in got] == [r[:2] for r in ref]
        p_got, p_ref = (np.array([r[2:4] for r in rows], float) for rows in (got, ref))
        assert np.abs(p_got - p_ref).max() <= 2e-6


def test_multi_path_input_order_and_no_duplicates(tiny_exported, tmp_path):
    a = write_images(tmp_path / "a", 3)
    b = write_images(tmp_path / "b", 2, seed=10)
    code, out, _ = run(tmp_path / "b", a[1], tmp_path / "a", b[0], "--model", tiny_exported)
    assert code == 0
    paths = [r[0] for r in rows_of(out)]
    assert paths == [str(b[0]), str(b[1]), str(a[1]), str(a[0]), str(a[2])]


def test_threshold_option_overrides_the_card(tiny_exported, tmp_path):
    write_images(tmp_path / "d", 6)
    card = read_card(tiny_exported)
    for t in (0.0, 1.0, 0.5):
        code, out, _ = run(tmp_path / "d", "--model", tiny_exported, "--threshold", t)
        rows = rows_of(out)
        check_labels(rows, card, t)
        if t == 0.0:
            assert {r[1] for r in rows} == {"PNEUMONIA"}
    code, _, err = run(tmp_path / "d", "--model", tiny_exported, "--threshold", "1.5")
    assert code == 2 and "threshold" in err


def test_odd_file_names_stay_valid_csv(tiny_exported, tmp_path):
    names = ['comma,name.png', 'quote"d.png', "new\nline.png", "ünïcødé 肺.png", "CAPS.JPEG",
             "sp ace.TIFF"]
    d = tmp_path / "d"
    d.mkdir()
    for n in names:
        Image.fromarray(grey()).save(d / n, format="TIFF" if n.endswith("TIFF") else
                                     "JPEG" if n.endswith("JPEG") else "PNG")
    raw = os.fsencode(str(d)) + b"/bad\xffbyte.png"  # not UTF-8: Linux allows it
    with open(raw, "wb") as f:
        Image.fromarray(grey()).save(f, format="PNG")
    code, out, err = run(d, "--model", tiny_exported)
    assert code == 0, err
    rows = rows_of(out)
    assert len(rows) == len(names) + 1
    got = {r[0] for r in rows}
    assert {str(d / n) for n in names} <= got
    assert str(d) + "/bad\\xffbyte.png" in got
    assert all(r[1] for r in rows)


def test_carriage_return_and_non_utf8_names_one_cell_each_round_trip(tiny_exported, tmp_path):
    """Issue 19: a CR in a name is quoted (Python's csv read 7 rows for 6 files), and the
    undecodable byte 0xff and the 4 characters backslash x f f never share a cell."""
    from pneumo_edge.outputs.csvout import path_bytes

    d = tmp_path / "d"
    d.mkdir()
    names = [b"cr\rname.png", b"scan\xffA.png", b"scan\\xffA.png", b"back\\slash.png",
             b"plain.png"]
    for n in names:
        with open(os.fsencode(str(d)) + b"/" + n, "wb") as f:
            Image.fromarray(grey()).save(f, format="PNG")
    out = tmp_path / "out.csv"
    code, _, err = run(d, "--model", tiny_exported, "-o", out)
    assert code == 0, err
    rows = rows_of(out.read_bytes().decode("utf-8"))  # as bytes: read_text turns CR into LF
    assert len(rows) == len(names) and all(r[1] for r in rows)
    assert len({r[0] for r in rows}) == len(names)
    assert sorted(path_bytes(r[0]) for r in rows) == \
        sorted(os.fsencode(str(d)) + b"/" + n for n in names)
    assert b'"' + os.fsencode(str(d)) + b'/cr\rname.png"' in out.read_bytes()
    # --resume reads its own CSV back (it refused it before)
    partial = tmp_path / "out.csv.partial"
    as_interrupted(out, out.read_bytes(), [os.fsdecode(path_bytes(r[0])) for r in rows])
    code, _, err = run(d, "--model", tiny_exported, "-o", out, "--resume")
    assert code == 0 and f"{len(names)} of {len(names)} rows" in err, err
    assert not partial.exists()


# --------------------------------------------------------------------------- hostile input


def hostile_folder(root: Path) -> dict[str, str]:
    """Files that must each get an error row, mapped to a word of the expected reason."""
    root.mkdir()
    good = root / "good.jpg"
    Image.fromarray(grey()).save(good, quality=95)
    data = good.read_bytes()
    (root / "zero.png").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    png = io.BytesIO()
    Image.fromarray(grey()).save(png, format="PNG")
    (root / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) * 2 // 3])
    (root / "text.png").write_text("this is not an image\n")
    png_header_only(root / "bomb.png", 100_000, 100_000)
    png_header_only(root / "huge.png", 9_500, 9_500)  # over MAX_PIXELS, under Pillow's limit
    os.symlink(root / "gone.jpg", root / "broken.jpg")
    (root / "notes.txt").write_text("ignored")
    (root / "README").write_text("ignored")
    return {"zero.png": "empty", "truncated.jpg": "truncated", "truncated.png": "truncated",
            "text.png": "not a recognised image", "bomb.png": "too large",
            "huge.png": "too large", "broken.jpg": "symbolic link"}


def test_hostile_files_get_error_rows_not_crashes(tiny_exported, tmp_path):
    bad = hostile_folder(tmp_path / "h")
    img_dir = tmp_path / "h" / "looks_like.png"  # a directory named like an image: descended
    img_dir.mkdir()
    Image.fromarray(grey(3)).save(img_dir / "inside.bmp")
    code, out, err = run(tmp_path / "h", "--model", tiny_exported)
    assert code == 1
    rows = {Path(r[0]).relative_to(tmp_path / "h").as_posix(): r for r in rows_of(out)}
    assert set(rows) == set(bad) | {"good.jpg", "looks_like.png/inside.bmp"}
    for name, word in bad.items():
        r = rows[name]
        assert r[1:4] == ["", "", ""], name  # never a label or half a score
        assert word in r[-1] and "\n" not in r[-1], (name, r[-1])
    assert rows["good.jpg"][1] and rows["looks_like.png/inside.bmp"][1]
    assert f"failed {len(bad)}" in err and "ignored 2" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: chmod 000 does not stop root reading the file")
def test_unreadable_file_gets_error_row(tiny_exported, tmp_path):
    p = write_images(tmp_path / "d", 2)[0]
    p.chmod(0)
    try:
        code, out, _ = run(tmp_path / "d", "--model", tiny_exported)
    finally:
        p.chmod(0o644)
    rows = rows_of(out)
    assert code == 1 and "permission denied" in rows[0][-1] and rows[1][1]


def test_unexpected_decoder_exception_becomes_error_row(tiny_exported, tmp_path, monkeypatch):
    paths = write_images(tmp_path / "d", 3)
    real = pipeline.load_image

    def flaky(path, size):
        if str(path) == str(paths[1]):
            raise RuntimeError("decoder blew up\nsecond line")
        return real(path, size)

    monkeypatch.setattr(pipeline, "load_image", flaky)
    code, out, _ = run(tmp_path / "d", "--model", tiny_exported)
    rows = rows_of(out)
    assert code == 1 and rows[1][-1] == "cannot decode: RuntimeError: decoder blew up"
    assert rows[0][1] and rows[2][1]


def test_modes_and_orientation_score_like_plain_grey(tiny_exported, tmp_path):
    g = grey(5)
    d = tmp_path / "d"
    d.mkdir()
    Image.fromarray(g).save(d / "a_ref.png")
    rgb = Image.fromarray(np.stack([g] * 3, -1))
    rgb.convert("RGBA").save(d / "b_rgba.png")
    pal = Image.fromarray(g, "L").convert("P")
    pal.putpalette([v for i in range(256) for v in (i, i, i)])
    pal.putdata(list(g.flatten()))
    pal.save(d / "c_palette.png")
    Image.fromarray(g.astype(np.uint16) * 257).save(d / "d_grey16.png")
    rgb.convert("CMYK").save(d / "e_cmyk.tif")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    Image.fromarray(np.rot90(g, 1)).save(d / "f_exif.png", exif=exif)
    Image.fromarray(g).save(d / "G_UPPER.PNG")
    code, out, err = run(d, "--model", tiny_exported)
    assert code == 0, err
    rows = {Path(r[0]).name: r for r in rows_of(out)}
    ref = rows["a_ref.png"]
    for name in ("b_rgba.png", "c_palette.png", "d_grey16.png", "f_exif.png", "G_UPPER.PNG"):
        assert rows[name][1:4] == ref[1:4], name  # lossless: the very same pixels
    p = float(rows["e_cmyk.tif"][3])
    assert abs(p - float(ref[3])) < 0.05


def test_memory_stays_bounded_decode_does_not_run_ahead(tmp_path, monkeypatch):
    files = [str(p) for p in write_images(tmp_path / "d", 4)] * 50  # 200 decodes
    started = []

    def counting(path, size):
        started.append(path)
        return np.zeros((1, size, size), np.uint8)

    monkeypatch.setattr(pipeline, "load_image", counting)
    stream = pipeline.decode_batches(files, 16, batch=8, workers=2, ahead=2)
    first = next(stream)
    assert len(first) == 8 and first.pixels.shape == (8, 1, 16, 16)
    # submitted, never more than (ahead + 1) batches beyond what the consumer took
    assert len(started) <= 8 + 8 * 3
    total = len(first) + sum(len(b) for b in stream)
    assert total == 200 and len(started) == 200


# --------------------------------------------------------------------------- usage errors


def test_usage_errors_exit_2_with_one_line(tiny_exported, tmp_path):
    write_images(tmp_path / "d", 1)
    cases = [
        ((tmp_path / "nope", "--model", tiny_exported), "no such file or folder"),
        ((tmp_path / "d", "--model", tmp_path / "nomodel"), "no such model directory"),
        ((tmp_path / "d", "--model", tmp_path / "d"), "no runtime can run this model"),
        ((tmp_path / "d", "--model", tiny_exported, "--resume"), "--resume needs -o"),
        ((tmp_path / "d", "--model", tiny_exported, "--runtime", "trt"),
         "model.fp16.engine: not found"),
    ]
    for args, msg in cases:
        code, out, err = run(*args)
        assert code == 2, (args, err)
        assert out == "" and err.startswith("error: ") and msg in err, err
        assert err.count("\n") == 1, err


def test_mismatched_model_exits_2(tiny_run, copy_run, tmp_path):
    write_images(tmp_path / "d", 2)
    run_dir = copy_run()
    card = json.loads((run_dir / "card.json").read_text())
    card.update(classes=["NORMAL", "BACTERIA", "VIRUS"], positive_class="VIRUS", output={})
    (run_dir / "card.json").write_text(json.dumps(card))
    code, out, err = run(tmp_path / "d", "--model", run_dir, "--runtime", "torch")
    last = err.splitlines()[-1]
    assert code == 2 and out == "" and last.startswith("error: ") and "mismatched" in last, err


def test_no_image_files_is_header_only(tiny_exported, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x")
    code, out, err = run(tmp_path / "d", "--model", tiny_exported)
    assert code == 0 and out == ",".join(SCORED) + "\n" and "no image files" in err


# --------------------------------------------------------------------------- -o and --resume


def test_output_file_matches_stdout_and_leaves_no_partial(tiny_exported, tmp_path):
    write_images(tmp_path / "d", 7)
    _, ref, _ = run(tmp_path / "d", "--model", tiny_exported)
    out_file = tmp_path / "out.csv"
    out_file.write_text("old content\n")
    code, out, err = run(tmp_path / "d", "--model", tiny_exported, "-o", out_file)
    assert code == 0 and out == ""
    assert out_file.read_text(encoding="utf-8") == ref
    assert not (tmp_path / "out.csv.partial").exists()
    assert f"wrote {out_file}" in err


SLOW_CLI = """
import sys, time
import pneumo_edge.runtimes as r
_open = r.open_runtime
class Slow:  # the real runtime, slowed down so the test can interrupt it mid-run
    def __init__(self, rt):
        self.rt = rt
    def __getattr__(self, name):  # name, device, card, path, sha256, precision
        return getattr(self.rt, name)
    def __call__(self, x):
        time.sleep(0.15)
        return self.rt(x)
r.open_runtime = lambda *a, **k: Slow(_open(*a, **k))
from pneumo_edge.cli import main
main(sys.argv[1:], prog_name="pneumo-edge")
"""


def start_slow(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, "score", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            preexec_fn=ctrl_c_enabled)  # noqa: PLW1509 -- signals only





def wait_rows(path: Path, n: int, proc, timeout=120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_bytes().count(b"\n") >= n + 1:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError(f"{path} never reached {n} rows")


@pytest.fixture
def resume_input(tiny_exported, tmp_path):
    d = tmp_path / "in"
    write_images(d / "x", 15)
    write_images(d / "y", 15, seed=20)
    (d / "y" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    _, ref, _ = run(d, "--model", tiny_exported, "--batch", "2")
    return d, rows_of(ref)


def as_interrupted(out: Path, data: bytes, files) -> None:
    """Turn the finished ``-o out`` run into what an interrupted one leaves: ``out.partial``
    holding ``data``, its record ``out.partial.json``, the identities of ``files`` (those its
    rows were written for) in ``out.partial.ids``."""
    from pneumo_edge.outputs.csvout import file_identity

    (out.parent / f"{out.name}.partial").write_bytes(data)
    shutil.move(out.parent / f"{out.name}.json", out.parent / f"{out.name}.partial.json")
    (out.parent / f"{out.name}.partial.ids").write_text(
        "".join(file_identity(str(f)) + "\n" for f in files))
    out.unlink()


def same_rows(got, ref):
    assert [r[0] for r in got] == [r[0] for r in ref]  # no row dropped or duplicated
    assert [r[1] for r in got] == [r[1] for r in ref]
    assert [r[-1] for r in got] == [r[-1] for r in ref]
    for g, r in zip(got, ref):
        if r[1]:
            assert np.allclose([float(x) for x in g[2:4]], [float(x) for x in r[2:4]], atol=2e-6)


def test_resume_after_kill_9(tiny_exported, tmp_path, resume_input):
    d, ref = resume_input
    out = tmp_path / "out.csv"
    partial = tmp_path / "out.csv.partial"
    proc = start_slow([d, "--model", tiny_exported, "--batch", "2", "-o", out])
    wait_rows(partial, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and partial.exists()
    kept = rows_of(partial.read_text(encoding="utf-8"))
    assert 6 <= len(kept) < len(ref)
    code, stdout, err = run(d, "--model", tiny_exported, "--batch", "2", "-o", out, "--resume")
    assert code == 1 and stdout == ""  # the broken file is a failure, in the resumed part
    assert f"{len(kept)} of {len(ref)} rows already written" in err
    assert not partial.exists()
    same_rows(rows_of(out.read_text(encoding="utf-8")), ref)


def test_ctrl_c_keeps_partial_and_says_how_to_resume(tiny_exported, tmp_path, resume_input):
    d, ref = resume_input
    out = tmp_path / "out.csv"
    proc = start_slow([d, "--model", tiny_exported, "--batch", "2", "-o", out])
    wait_rows(tmp_path / "out.csv.partial", 4, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"--resume" in err and b"Traceback" not in err
    code, _, _ = run(d, "--model", tiny_exported, "--batch", "2", "-o", out, "--resume")
    assert code == 1
    same_rows(rows_of(out.read_text(encoding="utf-8")), ref)


def test_resume_drops_a_torn_last_line(tiny_exported, tmp_path, resume_input):
    d, ref = resume_input
    out = tmp_path / "out.csv"
    partial = tmp_path / "out.csv.partial"
    run(d, "--model", tiny_exported, "--batch", "2", "-o", out)
    text = out.read_bytes()
    lines = text.split(b"\n")
    torn = b"\n".join(lines[:10]) + b"\n" + lines[10][:-7]  # 9 rows and a half-written one
    # and the zero fill a crash can leave; identities written for the torn row too
    as_interrupted(out, torn + b"\0" * 100, [r[0] for r in ref[:10]])
    assert not partial.read_bytes().endswith(b"\n")
    code, _, err = run(d, "--model", tiny_exported, "--batch", "2", "-o", out, "--resume")
    assert code == 1 and "9 of" in err
    same_rows(rows_of(out.read_text(encoding="utf-8")), ref)


def test_resume_of_a_finished_file_rescans_nothing(tiny_exported, tmp_path, resume_input):
    d, ref = resume_input
    out = tmp_path / "out.csv"
    run(d, "--model", tiny_exported, "-o", out)
    before = out.read_bytes()
    code, _, err = run(d, "--model", tiny_exported, "-o", out, "--resume")
    assert code == 1  # the earlier run's failed row still counts
    assert out.read_bytes() == before and f"{len(ref)} of {len(ref)} rows" in err


def test_resume_refuses_a_partial_from_other_input(tiny_exported, tmp_path, resume_input):
    d, _ = resume_input
    out = tmp_path / "out.csv"
    partial = tmp_path / "out.csv.partial"
    run(d / "y", "--model", tiny_exported, "-o", out)
    as_interrupted(out, out.read_bytes(), [])
    code, _, err = run(d, "--model", tiny_exported, "-o", out, "--resume")
    assert code == 2 and "cannot resume" in err and "input changed" in err
    assert partial.exists() and not out.exists()  # left as it was
    partial.write_text("path,label,p_A,p_B,error\n")
    code, _, err = run(d, "--model", tiny_exported, "-o", out, "--resume")
    assert code == 2 and "header" in err


def test_without_resume_a_stale_partial_is_replaced(tiny_exported, tmp_path, resume_input):
    d, ref = resume_input
    out = tmp_path / "out.csv"
    (tmp_path / "out.csv.partial").write_text("garbage\n")
    code, _, err = run(d, "--model", tiny_exported, "--batch", "2", "-o", out)
    assert code == 1 and "starting over" in err
    same_rows(rows_of(out.read_text(encoding="utf-8")), ref)


def test_resume_of_a_finished_file_from_other_input_leaves_it_alone(tiny_exported, tmp_path,
                                                                     resume_input):
    d, _ = resume_input
    out = tmp_path / "out.csv"
    run(d / "y", "--model", tiny_exported, "-o", out)
    before = out.read_bytes()
    code, _, err = run(d, "--model", tiny_exported, "-o", out, "--resume")
    assert code == 2 and "cannot resume" in err
    assert out.read_bytes() == before and not (tmp_path / "out.csv.partial").exists()


def test_read_partial_keeps_exactly_the_whole_rows_at_any_cut():
    from pneumo_edge.outputs.csvout import StdoutSink, read_partial

    files = ["a.png", 'we,ird "q"\nname.png', "ü\n\n.png", "z.png"]
    buf = io.BytesIO()
    sink = StdoutSink(HEADER, buf)
    rows = [[f, "NORMAL", "0.900000", "0.100000", ""] for f in files[:3]]
    rows[1] = [files[1], "", "", "", 'bad, "really"\nbad']
    sink.write(rows)
    sink.close()
    data = buf.getvalue()
    ends = []  # byte offset at which each whole record (header, rows) ends
    for k in range(1, len(rows) + 2):
        text = io.StringIO(newline="")
        csv.writer(text, lineterminator="\n").writerows([HEADER, *rows][:k])
        ends.append(len(text.getvalue().encode()))
    assert ends[-1] == len(data)
    for cut in range(len(data) + 1):
        done, keep = read_partial(io.BytesIO(data[:cut] + b"\0" * 3), HEADER, files, "p")
        whole = [e for e in ends if e <= cut]
        assert keep == (whole[-1] if whole else 0), cut
        assert done.rows == max(0, len(whole) - 1)
        assert done.failed == (1 if done.rows >= 2 else 0)


def test_resume_rescores_files_replaced_since_the_interrupted_run(tiny_exported, tmp_path,
                                                                  resume_input):
    """Issue 19: --resume after input files were replaced (same names, other content) kept
    their old rows. Now the rows stop at the first changed file and the rest is scored again."""
    d, ref = resume_input
    out = tmp_path / "out.csv"
    proc = start_slow([d, "--model", tiny_exported, "--batch", "2", "-o", out])
    wait_rows(tmp_path / "out.csv.partial", 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    changed = Path(ref[2][0])
    Image.fromarray(grey(99, w=100, h=130)).save(changed, format=changed.suffix[1:].replace(
        "jpg", "jpeg").upper())
    code, new_ref, _ = run(d, "--model", tiny_exported, "--batch", "2")
    new_ref = rows_of(new_ref)
    assert new_ref[2][2:4] != ref[2][2:4]  # the replacement scores differently
    code, _, err = run(d, "--model", tiny_exported, "--batch", "2", "-o", out, "--resume")
    assert code == 1 and "2 of" in err and "changed since its row was written" in err, err
    same_rows(rows_of(out.read_text(encoding="utf-8")), new_ref)


def test_resume_of_a_finished_file_rescores_after_an_input_changed(tiny_exported, tmp_path,
                                                                    resume_input):
    d, ref = resume_input
    out = tmp_path / "out.csv"
    run(d, "--model", tiny_exported, "-o", out)
    assert "input_identity" in json.loads((tmp_path / "out.csv.json").read_text())
    changed = Path(ref[-3][0])
    Image.fromarray(grey(77)).save(changed, format="PNG" if changed.suffix == ".png" else "JPEG")
    code, new_ref, _ = run(d, "--model", tiny_exported)
    code, _, err = run(d, "--model", tiny_exported, "-o", out, "--resume")
    assert code == 1 and "scoring all again" in err, err
    assert rows_of(out.read_text(encoding="utf-8")) == rows_of(new_ref)

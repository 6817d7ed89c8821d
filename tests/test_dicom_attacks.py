"""Hostile and misleading DICOM input (issue 19): files that decode wrong are not scored, tag
values never reach a message or the CSV, and no file exhausts memory or hangs the run. Files
are written with the helpers of tests/test_dicom.py."""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless
from test_dicom import REPO, SIZE, make, picture

from pneumo_edge.inputs import dicom, images
from pneumo_edge.inputs.folders import walk_images
from pneumo_edge.inputs.images import ImageError, load_image

SECRET = "ZQXSECRET"
MB = 1024 * 1024


@pytest.fixture()
def stored():
    return picture().astype(np.uint16) * 16  # 96x96, 12-bit


def secretly(path: Path, stored: np.ndarray, **kw) -> Path:
    """:func:`make` with values pydicom warns about when they are set (the test's own writes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make(path, stored, **kw)


def reason(path, max_pixels=10**8) -> str:
    with pytest.raises(ImageError) as err:
        load_image(path, SIZE, max_pixels=max_pixels)
    return err.value.reason


def _raster(path: Path, rows: int, cols: int) -> Path:
    """Keep the pixel data, change Rows/Columns (same pixel count: pydicom reshapes it)."""
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = rows, cols
    ds.save_as(path)
    return path


# -- 1. DICOM that decodes wrong is not scored ---------------------------------------------------


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless])
def test_codestream_size_other_than_rows_columns_is_refused(tmp_path, stored, syntax):
    if syntax == JPEGLSLossless and importlib.util.find_spec("jpeg_ls") is None:
        pytest.skip("pyjpegls (dev extra) encodes JPEG-LS")
    grey = picture()
    f = make(tmp_path / "x.dcm", grey if syntax == JPEGBaseline8Bit else stored,
             bits_stored=8 if syntax == JPEGBaseline8Bit else 12, syntax=syntax)
    load_image(f, SIZE)  # as written: scored
    _raster(f, 48, 192)  # 96x96 codestream, header says 192x48
    why = reason(f)
    assert "codestream is 96x96" in why and "192x48" in why, why


def test_codestream_sizes_are_read_from_the_frame_headers():
    """SOF (JPEG), SOF55 (JPEG-LS) and SIZ (J2K, bare or inside a JP2 box), by hand."""
    jpeg = b"\xff\xd8\xff\xe0\x00\x04ab\xff\xc0\x00\x0b\x08\x01\x2c\x02\x58\x01\x01\x11\x00"
    jls = b"\xff\xd8\xff\xf8\x00\x03x\xff\xf7\x00\x0b\x0c\x00\x40\x00\x80\x01\x01\x11\x00"
    siz = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + struct.pack(">IIII", 700, 500, 100, 0)
    assert dicom.codestream_size(jpeg) == (600, 300)
    assert dicom.codestream_size(jls) == (128, 64)
    assert dicom.codestream_size(siz + b"\x00" * 20) == (600, 500)
    assert dicom.codestream_size(b"\x00\x00\x00\x0cjP  " + siz + b"\x00" * 20) == (600, 500)
    assert dicom.codestream_size(b"\xff\xd8\xff\xda\x00\x02") is None  # scan before a frame
    assert dicom.codestream_size(b"not a codestream") is None


def test_image_constant_after_the_voi_lut_is_refused(tmp_path, stored):
    f = make(tmp_path / "w.dcm", stored, WindowCenter=60000, WindowWidth=10)  # above all values
    assert "constant after the VOI LUT" in reason(f)
    ok = make(tmp_path / "ok.dcm", stored, WindowCenter=2048, WindowWidth=4096)
    load_image(ok, SIZE)


def test_for_processing_images_are_refused(tmp_path, stored):
    by_intent = make(tmp_path / "intent.dcm", stored, PresentationIntentType="FOR PROCESSING")
    by_class = make(tmp_path / "class.dcm", stored)
    ds = pydicom.dcmread(by_class)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1.1"
    ds.save_as(by_class)
    for f in (by_intent, by_class):
        assert "For Processing" in reason(f)
    load_image(make(tmp_path / "p.dcm", stored, PresentationIntentType="FOR PRESENTATION"), SIZE)


# -- 3. Patient data never leaks -------------------------------------------------------------


def test_uid_grammar():
    for good in ("1.2.840.10008.1.2", "0.1", "2.25." + "1" * 59):
        assert dicom.valid_uid(good), good
    for bad in ("", "1.2.840.ZQX.DOE^JOHN", "1..2", "1.02", ".1", "1.", "1.2 ", "2.25." + "1" * 60):
        assert not dicom.valid_uid(bad), bad


def test_a_uid_holding_text_is_left_empty_with_a_note_that_quotes_nothing(tmp_path, stored):
    f = secretly(tmp_path / "u.dcm", stored, StudyInstanceUID=f"1.2.840.{SECRET}.DOE^JOHN",
                 SOPClassUID=f"1.2.{SECRET}")
    ident = dicom.identity(f, ("TransferSyntaxUID", "SOPClassUID"))
    assert ident.uids[0] == "" and ident.uids[1] and ident.uids[2].startswith("1.2.")
    assert ident.tags == ("1.2.840.10008.1.2.1", "")
    assert ident.notes and all(SECRET not in n for n in ident.notes)
    assert any("StudyInstanceUID" in n for n in ident.notes)


def test_refusal_reasons_name_the_tag_never_its_value(tmp_path, stored):
    files = {"part.dcm": secretly(tmp_path / "part.dcm", stored, body_part=f"{SECRET} DOE"),
             "mod.dcm": secretly(tmp_path / "mod.dcm", stored, modality=SECRET),
             "pi.dcm": secretly(tmp_path / "pi.dcm", stored, photometric=SECRET)}
    nopix = pydicom.dcmread(secretly(tmp_path / "n.dcm", stored, SOPClassUID=f"1.2.{SECRET}"))
    del nopix.PixelData
    nopix.save_as(tmp_path / "nopix.dcm")
    files["nopix.dcm"] = tmp_path / "nopix.dcm"
    for name, f in files.items():
        why = reason(f)
        assert SECRET not in why and why, (name, why)
    assert "BodyPartExamined is not CHEST" in reason(files["part.dcm"])
    assert "Modality (not a code of the standard)" in reason(files["mod.dcm"])
    # the standard's own codes are a fixed vocabulary: quoted
    assert "Modality 'CT'" in reason(make(tmp_path / "ct.dcm", stored, modality="CT",
                                          body_part=None))


def _warning_folder(d: Path, n: int = 8) -> Path:
    """PNGs and DICOMs alternating; each DICOM makes pydicom warn with a value in the text."""
    d.mkdir()
    rng = np.random.default_rng(0)
    v = picture().astype(np.uint16) * 16
    for i in range(0, 2 * n, 2):
        Image.fromarray(rng.integers(0, 255, (600, 600), dtype=np.uint8)).save(d / f"f{i:02d}.png")
        secretly(d / f"f{i + 1:02d}.dcm", v, StudyInstanceUID=f"1.2.840.{SECRET}.DOE^JOHN",
                 SpecificCharacterSet=f"{SECRET}_CS")
    return d


RUNS = """
import sys
from pneumo_edge.cli import main
folder, model, out = sys.argv[1:4]
for i in range(int(sys.argv[4])):
    try:
        main(["score", folder, "--model", model, "--runtime", "onnx", "-o", f"{out}{i}.csv"],
             standalone_mode=False)
    except SystemExit:
        pass
"""


def test_pydicom_warnings_never_reach_stderr_on_a_mixed_folder(tiny_exported, tmp_path):
    d = _warning_folder(tmp_path / "mix")
    proc = subprocess.run([sys.executable, "-c", RUNS, d, tiny_exported, tmp_path / "o", "8"],
                          cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("files 16, scored 16") == 8, proc.stderr[-2000:]
    assert SECRET not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("StudyInstanceUID is not a valid UID: left empty") == 8 * 8
    for i in range(8):
        text = (tmp_path / f"o{i}.csv").read_text()
        assert SECRET not in text
        rows = list(csv.DictReader(io.StringIO(text)))
        assert all(r["label"] for r in rows) and len(rows) == 16
        assert all(r["study_uid"] == "" and r["series_uid"] for r in rows if r["sop_uid"])


def test_decoding_leaves_the_warnings_filters_alone(tmp_path, monkeypatch):
    """catch_warnings and filterwarnings swap the process-wide filter list: from a decode
    thread they race (a PNG thread restoring the list drops pydicom's filter just installed by
    a DICOM thread). Filters are installed once, before decoding; decoding never touches them."""
    d = _warning_folder(tmp_path / "mix", 2)
    walk = walk_images([d])
    assert any(f[0] == "ignore" and f[3] is not None and "pydicom" in f[3].pattern
               for f in warnings.filters)
    calls = []
    monkeypatch.setattr(warnings, "catch_warnings", lambda *a, **k: calls.append("catch"))
    monkeypatch.setattr(warnings, "filterwarnings", lambda *a, **k: calls.append("filter"))
    monkeypatch.setattr(warnings, "simplefilter", lambda *a, **k: calls.append("simple"))
    for f in walk.files:
        load_image(f, SIZE)
    assert calls == []


# -- 4. No input exhausts memory, nothing hangs ---------------------------------------------------


MEASURE = """
import resource, sys, time
from pneumo_edge.inputs.images import ImageError, load_image
t = time.perf_counter()
try:
    load_image(sys.argv[1], 64)
    print("SCORED")
except ImageError as exc:
    print("REFUSED", exc.reason)
print("SECONDS", time.perf_counter() - t)
try:  # this process's own peak (ru_maxrss would carry the parent's over fork + exec)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("MAXRSS_MB", int(hwm.split()[1]) / 1024)
except OSError:
    print("MAXRSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def measure(path: Path) -> tuple[str, float, float]:
    """(outcome line, seconds, peak RSS in MB) of decoding ``path`` in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, path], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    lines = dict(line.partition(" ")[::2] for line in proc.stdout.splitlines())
    assert "SECONDS" in lines, proc.stderr[-2000:]
    outcome = "SCORED" if "SCORED" in proc.stdout else lines["REFUSED"]
    return outcome, float(lines["SECONDS"]), float(lines["MAXRSS_MB"])


def _baseline_mb(tmp_path: Path) -> float:
    return measure(make(tmp_path / "small.dcm", picture().astype(np.uint16) * 16))[2]


def test_small_dicom_holding_a_huge_jpeg_is_refused_before_decoding(tmp_path):
    f = make(tmp_path / "bomb.dcm", picture(), bits_stored=8, syntax=JPEGBaseline8Bit)
    ds = pydicom.dcmread(f)
    buf = io.BytesIO()
    Image.new("L", (12000, 12000), 128).save(buf, "JPEG", quality=50)
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([buf.getvalue()])
    ds.Rows = ds.Columns = 64
    ds.save_as(f)
    assert f.stat().st_size < 4 * MB
    why = reason(f, max_pixels=100_000_000)
    assert "too large: the JPEG Baseline" in why and "12000x12000" in why, why
    outcome, _, rss = measure(f)
    assert "too large" in outcome and rss < _baseline_mb(tmp_path) + 30, (outcome, rss)


def _deflated(path: Path, body: bytes, zeros: int) -> Path:
    """A deflated DICOM: the file meta of ``body``'s file, then ``body``'s data set and
    ``zeros`` zero bytes, deflated (a bomb when ``zeros`` is large)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(io.BytesIO(body))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    start = 132 + 12 + struct.unpack("<I", data[140:144])[0]  # after the written file meta
    plain = zlib.decompress(data[start:], -zlib.MAX_WBITS)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [data[:start], packer.compress(plain)]
    block = bytes(8 * MB)
    for _ in range(zeros // len(block)):
        chunks.append(packer.compress(block))
    path.write_bytes(b"".join([*chunks, packer.flush()]))
    return path


def test_deflated_dicom_inflating_past_the_cap_is_refused(tmp_path, stored, monkeypatch):
    body = make(tmp_path / "plain.dcm", stored).read_bytes()
    ok = _deflated(tmp_path / "ok.dcm", body, 0)
    load_image(ok, SIZE)
    bomb = _deflated(tmp_path / "bomb.dcm", body, 400 * MB)
    assert bomb.stat().st_size < 2 * MB
    outcome, seconds, rss = measure(bomb)
    assert "inflates to more than" in outcome, outcome
    assert rss < _baseline_mb(tmp_path) + 30 and seconds < 10, (rss, seconds)
    monkeypatch.setattr(dicom, "MAX_INFLATED_BYTES", 10_000)  # the cap is what refuses
    assert "inflates to more than 10,000 bytes" in reason(ok)


def test_a_million_empty_elements_are_refused_quickly(tmp_path, stored):
    f = make(tmp_path / "many.dcm", stored)
    data = f.read_bytes()
    start = 132 + 12 + pydicom.dcmread(f).file_meta.FileMetaInformationGroupLength
    # private groups 0x0009..: element (gggg,eeee) LO of length 0, in ascending order
    empty = b"".join(struct.pack("<HH2sH", g, e, b"LO", 0)
                     for g in range(0x0009, 0x0009 + 2 * 16, 2) for e in range(0x1000, 0xFFFF))
    f.write_bytes(data[:start] + empty + data[start:])
    assert f.stat().st_size > 7 * MB
    outcome, seconds, rss = measure(f)
    assert "too many data elements" in outcome, outcome
    assert seconds < 10 and rss < _baseline_mb(tmp_path) + 60, (seconds, rss)


def test_a_fifo_in_a_dicom_folder_is_an_error_row_not_a_hang(tiny_exported, tmp_path, stored):
    d = tmp_path / "in"
    d.mkdir()
    make(d / "a.dcm", stored)
    for name in ("b.dcm", "c_noextension", "d.png"):
        os.mkfifo(d / name)
    proc = subprocess.run([sys.executable, "-m", "pneumo_edge", "score", d, "--model",
                           tiny_exported, "--runtime", "onnx"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    rows = {Path(r["path"]).name: r for r in csv.DictReader(io.StringIO(proc.stdout))}
    assert proc.returncode == 1, proc.stderr
    assert set(rows) == {"a.dcm", "b.dcm", "d.png"}  # c_noextension: never opened, not an input
    assert rows["a.dcm"]["label"]
    for name in ("b.dcm", "d.png"):
        assert "not a regular file" in rows[name]["error"], rows[name]


def test_identity_and_sniff_never_open_a_fifo(tmp_path):
    fifo = tmp_path / "x.dcm"
    os.mkfifo(fifo)
    result = {}
    t = threading.Thread(target=lambda: result.update(
        ident=dicom.identity(fifo), kind=images.input_kind(tmp_path / "x.dcm"),
        sniffed=dicom.sniff(fifo)), daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # release the blocked open before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("opening a FIFO blocked")
    assert result["ident"].uids == ("", "", "") and result["sniffed"] is False



def test_the_header_is_parsed_once_per_scored_file(tmp_path, stored, monkeypatch):
    f = make(tmp_path / "a.dcm", stored)
    calls = []
    real = dicom._parse_header
    monkeypatch.setattr(dicom, "_parse_header", lambda *a: calls.append(a[1]) or real(*a))
    load_image(f, SIZE)
    first = dicom.identity(f, ("Modality",))
    assert len(calls) == 1 and first.uids[2].startswith("1.2.") and first.tags == ("DX",)
    assert dicom.identity(f) == dicom.Identity(first.uids, ())  # not remembered twice: parsed
    assert len(calls) == 2
    load_image(f, SIZE)
    os.utime(f, ns=(0, 10**9))  # changed since it was decoded: read again
    assert dicom.identity(f).uids == first.uids and len(calls) == 4

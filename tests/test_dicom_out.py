"""DICOM result objects (issue 21 part 1): ``score --dicom-out`` writes an SR (and with --explain a
heatmap SC) per scored DICOM input, in its study, valid for dciodvfy, carrying the CSV's number;
nothing for error rows or other inputs; --resume writes no second SR; a --threshold override is
recorded; no patient data leaves the DICOM objects."""

from __future__ import annotations

import csv
import dataclasses
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
from test_dicom import PHI_ID, PHI_NAME, _score, make, picture
from test_score import as_interrupted

from pneumo_edge.outputs import dicom_objects as dob

PHI_DATE = "19470101"
RICH = {"StudyDate": "20240102", "StudyTime": "101500", "StudyID": "S1",
        "AccessionNumber": "ACC7731", "PatientSex": "F", "InstanceNumber": 3,
        "ImagerPixelSpacing": [0.2, 0.2], "PatientOrientation": ["L", "F"],
        "Manufacturer": "Acme", "ReferringPhysicianName": "Doe^J"}


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines dciodvfy prints for ``path`` (warnings are allowed)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60,
                          check=False)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


def inputs(root: Path) -> Path:
    """Two CR/DX chest files (one with the usual study attributes, one MONOCHROME1 without
    BodyPartExamined), a PNG, a CT slice and a broken .dcm."""
    d = root / "in"
    d.mkdir()
    v = picture().astype(np.int32) * 16
    make(d / "a_rich.dcm", v, **RICH)
    make(d / "b_mono1.dcm", 4095 - v, photometric="MONOCHROME1", modality="CR", body_part=None)
    Image.fromarray(picture(1)).save(d / "c.png")
    make(d / "d_ct.dcm", v, modality="CT")
    (d / "e_broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    return d


def rows_of(out: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in csv.DictReader(io.StringIO(out.read_text()))}


@pytest.fixture(scope="module")
def scored(tiny_exported, session_tmp):
    """One run: score --dicom-out --explain --explain-which all on :func:`inputs`."""
    root = session_tmp("dicom_out")
    d = inputs(root)
    proc = _score([d, "--model", tiny_exported, "--runtime", "onnx", "-o", root / "out.csv",
                   "--dicom-out", root / "dcm", "--explain", root / "ex", "--explain-which", "all"])
    return root, d, proc


def test_sr_and_sc_are_valid_in_the_study_and_carry_the_csv_numbers(scored):
    root, d, proc = scored
    assert proc.returncode == 1, proc.stderr  # the CT and the broken file are error rows
    rows = rows_of(root / "out.csv")
    assert list(rows) == ["a_rich.dcm", "b_mono1.dcm", "c.png", "d_ct.dcm", "e_broken.dcm"]
    written = sorted((root / "dcm").rglob("*.dcm"))
    assert len(written) == 4  # SR + SC for each of the two scored DICOM files
    for name in ("a_rich.dcm", "b_mono1.dcm"):
        src = pydicom.dcmread(d / name)
        row = rows[name]
        sr_path = Path(row["dicom_sr"])
        assert sr_path == root / "dcm" / src.SOPInstanceUID / (sr_path.name)
        sr = pydicom.dcmread(sr_path)
        got = dob.read_result(sr_path)
        assert got["probability"] == float(row["p_PNEUMONIA"])  # the CSV's number, exactly
        assert got["threshold"] == 0.5 and "threshold: 0.5 (card)" in got["parameters"]
        assert got["present"] == (row["label"] == "PNEUMONIA")
        assert got["source_sop_uid"] == src.SOPInstanceUID
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
        assert sr.StudyInstanceUID == src.StudyInstanceUID == row["study_uid"]
        assert sr.SeriesInstanceUID != src.SeriesInstanceUID
        assert str(sr.PatientName) == PHI_NAME and sr.PatientID == PHI_ID  # filed by the PACS
        ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert ref.ReferencedSOPSequence[0].ReferencedSOPClassUID == src.SOPClassUID
        sc = pydicom.dcmread(sr_path.with_name(sr_path.name.replace(".sr.", ".sc.")))
        assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.BurnedInAnnotation == "YES"
        assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape[2] == 3
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        uids = {src.SOPInstanceUID, sr.SOPInstanceUID, sc.SOPInstanceUID}
        assert len(uids) == 3
    assert str(pydicom.dcmread(rows["a_rich.dcm"]["dicom_sr"]).AccessionNumber) == "ACC7731"
    for path in written:
        assert dciodvfy_errors(path) == [], path


def test_nothing_for_error_rows_and_non_dicom_inputs(scored):
    root, d, _ = scored
    rows = rows_of(root / "out.csv")
    for name in ("c.png", "d_ct.dcm", "e_broken.dcm"):
        assert rows[name]["dicom_sr"] == ""
    ct = pydicom.dcmread(d / "d_ct.dcm", stop_before_pixels=True)
    assert not rows["d_ct.dcm"]["label"] and not (root / "dcm" / ct.SOPInstanceUID).exists()
    assert len(list((root / "dcm").iterdir())) == 2


def test_no_patient_data_outside_the_dicom_objects(scored):
    root, _, proc = scored
    text = (root / "out.csv").read_text() + proc.stdout + proc.stderr \
        + (root / "out.csv.json").read_text() + (root / "ex" / "explain.csv").read_text()
    for phi in (PHI_NAME, PHI_NAME.split("^")[0], PHI_ID, PHI_DATE, "ACC7731", "Doe"):
        assert phi not in text


def test_the_heatmap_has_the_warning_and_the_probability_burned_in(scored):
    root, _, _ = scored
    row = rows_of(root / "out.csv")["a_rich.dcm"]
    sc = pydicom.dcmread(row["dicom_sr"].replace(".sr.dcm", ".sc.dcm"))
    info = dob.ResultInfo(float(row["p_PNEUMONIA"]), row["label"], "PNEUMONIA", 0.5, "card",
                          "0" * 64, "model.onnx", "onnx", "fp32", "x")
    banner = dob.burn_in(np.zeros((10, 10, 3), np.uint8), info)[:48]  # the two text lines
    assert np.array_equal(sc.pixel_array[:48, :banner.shape[1]], banner)
    assert banner.any() and banner.shape[1] <= sc.Columns


def test_resume_writes_no_second_sr(tiny_exported, tmp_path):
    d = inputs(tmp_path)
    out, dcm = tmp_path / "out.csv", tmp_path / "dcm"
    args = [d, "--model", tiny_exported, "--runtime", "onnx", "-o", out, "--dicom-out", dcm]
    assert _score(args).returncode == 1
    full = out.read_text()
    before = {p: (p.stat().st_mtime_ns, pydicom.dcmread(p).SOPInstanceUID)
              for p in dcm.rglob("*.dcm")}
    assert len(before) == 2 and not list(dcm.rglob("*.sc.dcm"))
    lines = full.splitlines(keepends=True)  # a_rich's row kept, b_mono1's lost
    as_interrupted(out, "".join(lines[:2]).encode(), [d / "a_rich.dcm"])
    proc = _score([*args, "--resume"])
    assert proc.returncode == 1, proc.stderr
    assert out.read_text() == full
    after = {p: (p.stat().st_mtime_ns, pydicom.dcmread(p).SOPInstanceUID)
             for p in dcm.rglob("*.dcm")}
    assert after == before  # b_mono1's SR was there: kept, not written again
    assert "1 already there" in proc.stderr


def test_threshold_override_is_recorded_and_replaces_the_sr(tiny_exported, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    make(d / "a.dcm", picture().astype(np.int32) * 16)
    dcm = tmp_path / "dcm"
    base = [d, "--model", tiny_exported, "--runtime", "onnx", "--dicom-out", dcm]
    first = _score(base)
    assert first.returncode == 0, first.stderr
    sr_path = Path(next(csv.DictReader(io.StringIO(first.stdout)))["dicom_sr"])
    uid = pydicom.dcmread(sr_path).SOPInstanceUID
    proc = _score([*base, "--threshold", "0.999"])
    assert proc.returncode == 0, proc.stderr
    row = next(csv.DictReader(io.StringIO(proc.stdout)))
    got = dob.read_result(row["dicom_sr"])
    assert row["dicom_sr"] == str(sr_path) and row["label"] == "NORMAL"
    assert got["threshold"] == 0.999 and not got["present"]
    assert "threshold: 0.999 (--threshold override)" in got["parameters"]
    assert pydicom.dcmread(sr_path).SOPInstanceUID != uid
    assert dciodvfy_errors(sr_path) == []


def test_a_file_where_the_folder_should_be_is_a_usage_error(tiny_exported, tmp_path):
    make(tmp_path / "a.dcm", picture().astype(np.int32) * 16)
    (tmp_path / "taken").write_text("x")
    proc = _score([tmp_path / "a.dcm", "--model", tiny_exported, "--dicom-out",
                   tmp_path / "taken"])
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.count("\n") == 1 and "taken" in proc.stderr and "folder" in proc.stderr


# -- the writer as the DICOM node calls it ---------------------------------------------------

def info_for(p: float = 0.25, threshold: float = 0.5) -> dob.ResultInfo:
    return dob.ResultInfo(p, "NORMAL", "PNEUMONIA", threshold, "card", "ab" * 32, "model.onnx",
                          "onnx", "fp32", "0.1.0")


def test_a_received_dataset_with_pixels_gets_an_sr_without_them(tmp_path):
    src = pydicom.dcmread(make(tmp_path / "a.dcm", picture().astype(np.int32) * 16, **RICH))
    assert dob.existing_sr(tmp_path / "out", src.SOPInstanceUID, "ab" * 32) is None
    paths = dob.write_result_objects(src, info_for(0.1234567), tmp_path / "out",
                                     np.full((40, 60, 3), 90, np.uint8))
    assert [p.name for p in paths] == ["abababababab.sr.dcm", "abababababab.sc.dcm"]
    assert dob.existing_sr(tmp_path / "out", src.SOPInstanceUID, "ab" * 32) == paths[0]
    sr = pydicom.dcmread(paths[0])
    assert "PixelData" not in sr and dob.read_result(paths[0])["probability"] == 0.123457
    again = dob.write_result_objects(src, info_for(0.1234567), tmp_path / "out")
    assert again == paths and pydicom.dcmread(paths[0]).SOPInstanceUID == sr.SOPInstanceUID
    for p in paths:
        assert dciodvfy_errors(p) == [], p


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the test sets them
@pytest.mark.parametrize("uid", ["", "../../etc", "1.2.3/4"])
def test_a_source_without_a_usable_sop_uid_gets_nothing(tmp_path, uid):
    src = pydicom.dcmread(make(tmp_path / "a.dcm", picture().astype(np.int32) * 16))
    src.SOPInstanceUID = uid
    with pytest.raises(dob.DicomOutError) as err:
        dob.write_result_objects(src, info_for(), tmp_path / "out")
    assert "SOPInstanceUID" in str(err.value) and PHI_NAME not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_full_precision_threshold_is_recognised_and_another_replaces_both(tmp_path):
    """A card's threshold has all 17 digits of a double (more than a DICOM DS holds): the SR
    written with it is still recognised as current; another threshold replaces SR and SC."""
    src = pydicom.dcmread(make(tmp_path / "a.dcm", picture().astype(np.int32) * 16))
    out, t = tmp_path / "out", 0.4372158241271973
    sr, sc = dob.write_result_objects(src, info_for(threshold=t), out,
                                      np.zeros((8, 8, 3), np.uint8))
    uid = pydicom.dcmread(sr).SOPInstanceUID
    assert dob.read_result(sr)["threshold"] == t
    assert dob.write_result_objects(src, info_for(threshold=t), out) == [sr, sc]
    assert pydicom.dcmread(sr).SOPInstanceUID == uid
    assert dob.write_result_objects(src, info_for(threshold=0.3), out) == [sr]
    assert pydicom.dcmread(sr).SOPInstanceUID != uid and not sc.exists()


def test_dicom_out_with_heatmaps_imports_no_torch(tiny_exported, tmp_path):
    from test_edge import run_without_torch  # the torch-hiding launcher of the edge tests

    d = tmp_path / "in"
    d.mkdir()
    make(d / "a.dcm", picture().astype(np.int32) * 16)
    proc = run_without_torch("score", d, "--model", tiny_exported, "--runtime", "onnx",
                             "--dicom-out", tmp_path / "dcm", "--explain", tmp_path / "ex",
                             "--explain-which", "all")
    assert proc.returncode == 0, proc.stderr
    assert "BLOCKED-MODULES-LOADED=[]" in proc.stderr
    assert len(list((tmp_path / "dcm").rglob("*.sr.dcm"))) == 1
    assert len(list((tmp_path / "dcm").rglob("*.sc.dcm"))) == 1


@pytest.mark.parametrize("tags", [{"PatientSex": "U"}, {"PatientBirthDate": "19470132"},
                                  {"StudyDate": "2024/01/02"}, {"StudyTime": "25:00"},
                                  {"PatientID": "x" * 70},
                                  {"ReferringPhysicianName": "a^b^c^d^e^f"}])
def test_invalid_patient_and_study_values_are_written_empty(tmp_path, monkeypatch, tags):
    """Hospital data is not always valid DICOM: such a Type 2 value is left empty in the
    objects (which then pass dciodvfy) rather than costing the image its result."""
    from pydicom import config

    monkeypatch.setattr(config.settings, "writing_validation_mode", config.IGNORE)
    src = make(tmp_path / "a.dcm", picture().astype(np.int32) * 16, **RICH | tags)
    monkeypatch.setattr(config.settings, "writing_validation_mode", config.WARN)
    paths = dob.write_result_objects(src, info_for(), tmp_path / "out",
                                     np.zeros((8, 8, 3), np.uint8))
    for p in paths:
        ds = pydicom.dcmread(p)
        assert all(str(ds.get(k)) == "" for k in tags) and ds.StudyID == "S1"
        assert dciodvfy_errors(p) == [], p


def test_the_qc_verdict_goes_into_the_sr(tiny_exported, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    make(d / "lat.dcm", picture().astype(np.int32) * 16, ViewPosition="LL")
    proc = _score([d, "--model", tiny_exported, "--runtime", "onnx", "--dicom-out",
                   tmp_path / "dcm"])
    assert proc.returncode == 0, proc.stderr
    row = next(csv.DictReader(io.StringIO(proc.stdout)))
    assert row["qc"] and row["label"]  # flagged, still labelled (--qc flag)
    assert f"input quality: {row['qc']}" in dob.read_result(row["dicom_sr"])["parameters"]


# -- the fast SR (a content template per model and result, per-image items built new) ---------

def _dump(ds) -> str:
    """``ds`` as text, without what is new in every build (highdicom's random UIDs, times, and
    the file meta group length, which follows the random UIDs' lengths)."""
    import re

    lines = [ln for ln in str(ds).splitlines()
             if not re.search(r"(Content|Instance Creation) (Date|Time)|DateTime|"
                              r"File Meta Information Group Length", ln)]
    return re.sub(r"1\.2\.826\.0\.1\.3680043\.10\.511\.3\.\d+", "UID", "\n".join(lines))


def two_sources(tmp_path: Path):
    """Two images of two patients in two studies: one with the attributes of an image library
    entry, one CR without them (MONOCHROME1, no body part)."""
    v = picture().astype(np.int32) * 16
    a = make(tmp_path / "a.dcm", v, **RICH)
    b = make(tmp_path / "b.dcm", 4095 - v, photometric="MONOCHROME1", modality="CR",
             body_part=None, PatientName="Other^Person", PatientID="PID-2",
             StudyDate="20230506", InstanceNumber=7)
    return a, b


def test_the_fast_sr_equals_the_one_highdicom_builds_in_full(tmp_path):
    """result_sr (the template path) and build_sr (highdicom from scratch) write the same
    dataset, for two different images through one shared template and for each label."""
    a, b = two_sources(tmp_path)
    for header in (dob._evidence(a), dob._evidence(b)):
        for info in (info_for(0.1234567), dob.ResultInfo(
                0.91, "PNEUMONIA", "PNEUMONIA", 0.5, "--threshold override", "cd" * 32,
                "m.onnx", "onnx", "int8", "0.1.0", prevalence=0.2, qc="lateral view")):
            fast, full = dob.result_sr(header, info), dob.build_sr(header, info)
            written = _bytes(fast)
            again = pydicom.dcmread(io.BytesIO(written))
            # as written (its template's items were encoded once, this image's anew)
            assert _dump(again) == _dump(pydicom.dcmread(io.BytesIO(_bytes(full))))
            assert "Other^Person" in _dump(again) or header.PatientID != "PID-2"
            # and those bytes are the ones pydicom writes for the decoded dataset
            assert sum(1 for _ in again.iterall()) > 50  # decoded, so encoded anew below
            assert _bytes(again) == written


@pytest.mark.parametrize("charset, raw", [("ISO_IR 100", True), ("ISO_IR 192", True),
                                           (["ISO 2022 IR 6", "ISO 2022 IR 100"], False)])
def test_the_fast_sr_in_other_character_sets(tmp_path, charset, raw):
    """A source in Latin-1 or UTF-8 gets the template's pre-encoded items; one with ISO 2022
    code extensions (whose escapes pydicom places itself) gets them encoded anew; both write
    what highdicom's full build writes, the patient's name included."""
    v = picture().astype(np.int32) * 16
    src = make(tmp_path / "a.dcm", v, SpecificCharacterSet=charset, PatientName="Müller^Jörg",
               **RICH)
    header = dob._evidence(src)
    fast, full = dob.result_sr(header, info_for(0.3)), dob.build_sr(header, info_for(0.3))
    assert fast.get_item("ContentSequence").is_raw == raw
    again = pydicom.dcmread(io.BytesIO(_bytes(fast)))
    assert _dump(again) == _dump(pydicom.dcmread(io.BytesIO(_bytes(full))))
    assert str(again.PatientName) == "Müller^Jörg"


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_two_images_in_one_run_get_their_own_values(tmp_path):
    """The second image's SR carries its own probability, label, source reference, study,
    patient, SOP and tracking UIDs (nothing of the first image's, whose template it shares)."""
    a, b = two_sources(tmp_path)
    srs = [dob.write_result_objects(src, info, tmp_path / "out")[0] for src, info in
           ((a, info_for(0.1234567)), (b, dataclasses.replace(info_for(0.2), probability=0.3)))]
    dsa, dsb = (pydicom.dcmread(p) for p in srs)
    srca, srcb = (pydicom.dcmread(p) for p in (a, b))
    for ds, src, p in ((dsa, srca, 0.123457), (dsb, srcb, 0.3)):
        got = dob.read_result(ds.filename)
        assert got["probability"] == p and got["source_sop_uid"] == src.SOPInstanceUID
        assert ds.StudyInstanceUID == src.StudyInstanceUID and got["study_uid"] == ds.StudyInstanceUID
        assert (ds.PatientName, ds.PatientID, ds.StudyDate) == (
            src.PatientName, src.PatientID, src.StudyDate)
        ev = ds.CurrentRequestedProcedureEvidenceSequence[0]
        assert ev.StudyInstanceUID == src.StudyInstanceUID
        assert ev.ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
            .ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert dciodvfy_errors(ds.filename) == []
    images = [[i for i in dob._walk(ds.ContentSequence) if i.ValueType == "IMAGE"]
              for ds in (dsa, dsb)]
    assert [len(i) for i in images] == [2, 1]  # a: library entry + group source; b: group only
    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images[0]} == {
        srca.SOPInstanceUID}
    uids = [{str(i.UID) for i in dob._walk(ds.ContentSequence) if i.ValueType == "UIDREF"
             and dob._code(i) == "112040"} for ds in (dsa, dsb)]
    assert len(uids[0]) == len(uids[1]) == 1 and uids[0] != uids[1]
    assert dsa.SOPInstanceUID != dsb.SOPInstanceUID
    assert dsa.SeriesInstanceUID != dsb.SeriesInstanceUID  # one series per study and model


def test_warnings_are_silenced_at_import_not_while_building(tmp_path):
    """The warnings filter list is global and not thread-safe: importing dicom_objects installs
    the filters; building objects (in the node's or a run's threads) never touches them."""
    src = make(tmp_path / "a.dcm", picture().astype(np.int32) * 16, **RICH)
    code = (
        "import sys, warnings\n"
        "from pneumo_edge.outputs import dicom_objects as dob\n"
        "before = list(warnings.filters)\n"
        "assert any(f[3] is not None and f[3].match('highdicom.sr') for f in before)\n"
        "info = dob.ResultInfo(0.3, 'NORMAL', 'PNEUMONIA', 0.5, 'card', 'ab' * 32, 'm.onnx',\n"
        "                      'onnx', 'fp32', '0.1.0')\n"
        "import numpy as np\n"
        f"dob.write_result_objects({str(src)!r}, info, {str(tmp_path / 'out')!r},\n"
        "                         np.zeros((8, 8, 3), np.uint8))\n"
        "assert list(warnings.filters) == before, 'filters changed while building'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_score_explain_with_dicom_out_computes_each_heatmap_once(tiny_exported, tmp_path,
                                                                 monkeypatch):
    """``score --explain DIR --dicom-out DIR2``: the SC's heatmap is handed to explain's PNG,
    so each selected image is explained once (occlusion is the costly part), and the PNG of
    the DICOM image exists alongside its SC."""
    from pneumo_edge.commands.score import run_score
    from pneumo_edge.explain.methods import Explainer

    d = tmp_path / "in"
    d.mkdir()
    make(d / "a.dcm", picture().astype(np.int32) * 16, **RICH)
    make(d / "b.dcm", picture(1).astype(np.int32) * 16)
    Image.fromarray(picture(2)).save(d / "c.png")
    calls = []
    real = Explainer.__call__
    monkeypatch.setattr(Explainer, "__call__", lambda self, image: calls.append(1) or
                        real(self, image))
    s = run_score([str(d)], tiny_exported, runtime="onnx", output=tmp_path / "s.csv",
                  explain=tmp_path / "ex", explain_which="all", dicom_out=tmp_path / "dcm",
                  quiet=True)
    assert s.exit_code == 0
    assert len(calls) == 3  # a, b (SC + PNG each) and c (PNG only)
    assert len(list((tmp_path / "dcm").rglob("*.sc.dcm"))) == 2
    assert len(list((tmp_path / "ex").glob("*.png"))) == 3
    rows = list(csv.DictReader(io.StringIO((tmp_path / "ex" / "explain.csv").read_text())))
    assert all(r["heatmap"] and not r["error"] for r in rows)

"""DICOM input: files built here with pydicom from a bundled sample X-ray (12-bit values,
MONOCHROME1/2, rescale, window, VOI LUT sequence, compressed syntaxes, big endian, no extension,
broken files), read through the one preprocessing, scored to CSV, and never leaking PHI."""

from __future__ import annotations

import csv
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from pneumo_edge.inputs import dicom
from pneumo_edge.inputs.folders import scan_labelled, walk_images
from pneumo_edge.inputs.images import ImageError, load_image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "chest_xray" / "train" / "PNEUMONIA"
PHI_NAME = "Zzyzx^Quentavious"
PHI_ID = "PID-93418827"
SIZE = 64


def picture(name_index: int = 0, side: int = 96) -> np.ndarray:
    """A bundled sample X-ray as 8-bit grey ``side x side``, with one pixel 0 and one 255 so
    the full range is present (the stored 12-bit values then map back exactly)."""
    path = sorted(SAMPLE.iterdir())[name_index]
    with Image.open(path) as im:
        grey = np.asarray(im.convert("L").resize((side, side), Image.Resampling.BILINEAR))
    grey = grey.copy()
    grey[0, 0], grey[0, 1] = 0, 255
    return grey


def make(path: Path, stored: np.ndarray, *, photometric="MONOCHROME2", bits_stored=12,
         signed=False, syntax=ExplicitVRLittleEndian, modality="DX", body_part="CHEST",
         **tags) -> Path:
    """Write ``stored`` (2-D integer values) as a single-frame DICOM file with PHI in it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI_NAME, PHI_ID, "19470101"
    ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, int(signed)
    for k, v in tags.items():
        setattr(ds, k, v)
    dtype = {(8, 0): np.uint8, (16, 0): np.uint16, (16, 1): np.int16}[ds.BitsAllocated, signed]
    arr = stored.astype(dtype)
    if syntax == ExplicitVRBigEndian:
        ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
        meta.TransferSyntaxUID = syntax
        ds.save_as(path, implicit_vr=False, little_endian=False, enforce_file_format=True)
        return path
    ds.PixelData = arr.tobytes()
    if syntax == ImplicitVRLittleEndian:
        meta.TransferSyntaxUID = syntax
    elif syntax == JPEG2000:
        ds.compress(syntax, arr, j2k_cr=[15])
    elif syntax == JPEGBaseline8Bit:
        _encapsulate_jpeg(ds, arr)
    elif syntax != ExplicitVRLittleEndian:
        ds.compress(syntax, arr, **({"encoding_plugin": "pydicom"} if syntax == RLELossless
                                    else {}))
    ds.save_as(path, enforce_file_format=True)
    return path


def _encapsulate_jpeg(ds, arr: np.ndarray) -> None:
    from pydicom.encaps import encapsulate

    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=95)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"


def jpeg_lossless(src: Path, dst: Path) -> Path:
    """Transcode ``src`` to JPEG Lossless process 14 SV1 with GDCM (no PyPI encoder in pydicom)."""
    gdcm = pytest.importorskip("gdcm", reason="python-gdcm (dev extra) encodes JPEG Lossless")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return dst


def grey_of(path) -> np.ndarray:
    return dicom.read_grey(path, max_pixels=10**8)


@pytest.fixture()
def grey():
    return picture()


# -- the pixel pipeline -----------------------------------------------------------------------


def test_12bit_monochrome2_without_voi_is_the_picture(tmp_path, grey):
    f = make(tmp_path / "a.dcm", grey.astype(np.uint16) * 16)
    assert np.array_equal(grey_of(f), grey)


@pytest.mark.parametrize("variant", ["mono1", "mono1_inverse", "mono2_inverse", "rescale", "signed", "implicit", "big_endian",
                                     "rle", "j2k_lossless", "jpeg_ls", "jpeg_lossless",
                                     "padding", "bits16"])
def test_same_picture_stored_differently_gives_the_same_pixels(tmp_path, grey, variant):
    v = grey.astype(np.int32) * 16
    kw: dict = {}
    if variant == "mono1":
        v, kw = 4095 - v, {"photometric": "MONOCHROME1"}
    elif variant == "mono1_inverse":  # how the DX module pairs them: one inversion
        v, kw = 4095 - v, {"photometric": "MONOCHROME1", "PresentationLUTShape": "INVERSE"}
    elif variant == "mono2_inverse":
        v, kw = 4095 - v, {"PresentationLUTShape": "INVERSE"}
    elif variant == "rescale":  # modality values 2 * stored - 1024: the same picture
        kw = {"RescaleSlope": 2, "RescaleIntercept": -1024}
    elif variant == "signed":
        v, kw = v - 2048, {"signed": True}
    elif variant == "bits16":
        v, kw = v * 16, {"bits_stored": 16}
    elif variant == "padding":  # a padded border outside the range; excluded, then black
        v = np.pad(v, 4, constant_values=4095)
        kw = {"PixelPaddingValue": 4095}
    elif variant in ("implicit", "big_endian", "rle", "j2k_lossless", "jpeg_ls"):
        kw = {"syntax": {"implicit": ImplicitVRLittleEndian, "big_endian": ExplicitVRBigEndian,
                         "rle": RLELossless, "j2k_lossless": JPEG2000Lossless,
                         "jpeg_ls": JPEGLSLossless}[variant]}
        if variant == "jpeg_ls":
            pytest.importorskip("jpeg_ls", reason="pyjpegls (dev extra) encodes JPEG-LS")
    f = make(tmp_path / f"{variant}.dcm", v, **kw)
    if variant == "jpeg_lossless":
        f = jpeg_lossless(f, tmp_path / "jll.dcm")
        assert pydicom.dcmread(f).file_meta.TransferSyntaxUID.is_compressed
    got = grey_of(f)
    if variant == "padding":
        assert (got[:4] == 0).all() and (got[:, -4:] == 0).all()
        got = got[4:-4, 4:-4]
    assert np.array_equal(got, grey)


def test_lossy_syntaxes_decode_close_to_the_picture(tmp_path, grey):
    j2k = grey_of(make(tmp_path / "j2k.dcm", grey.astype(np.uint16) * 16, syntax=JPEG2000))
    jpg = grey_of(make(tmp_path / "jpg.dcm", grey, bits_stored=8, syntax=JPEGBaseline8Bit))
    for got in (j2k, jpg):
        diff = np.abs(got.astype(int) - grey.astype(int))
        assert diff.mean() < 3 and diff.max() < 60 and got.shape == grey.shape


def test_a_narrower_window_changes_the_pixels_as_the_standard_says(tmp_path, grey):
    stored = grey.astype(np.uint16) * 16
    c, w = 2048.0, 1024.0
    f = make(tmp_path / "w.dcm", stored, WindowCenter=c, WindowWidth=w)
    x = stored.astype(float)  # PS3.3 C.11.2.1.2.1, output range 0..4095 (12 bits unsigned)
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0,
                 np.where(x > c - 0.5 + (w - 1) / 2, 4095.0,
                          ((x - (c - 0.5)) / (w - 1) + 0.5) * 4095))
    expected = np.rint(y * 255 / 4095)
    got = grey_of(f)
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert not np.array_equal(got, grey_of(make(tmp_path / "n.dcm", stored)))
    assert (got == 0).sum() > (grey == 0).sum() and (got == 255).sum() > (grey == 255).sum()


def test_sigmoid_and_linear_exact_windows_follow_pydicom(tmp_path, grey):
    from pydicom.pixels import apply_windowing

    stored = grey.astype(np.uint16) * 16
    for fn in ("SIGMOID", "LINEAR_EXACT"):
        f = make(tmp_path / f"{fn}.dcm", stored, WindowCenter=1800, WindowWidth=900,
                 VOILUTFunction=fn)
        ds = pydicom.dcmread(f)
        ref = apply_windowing(ds.pixel_array, ds)
        assert np.abs(grey_of(f).astype(int) - np.rint(ref * 255 / 4095)).max() <= 1


def test_voi_lut_sequence_is_applied_and_preferred(tmp_path, grey):
    stored = grey.astype(np.uint16) * 16
    lut = np.rint(np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    f = make(tmp_path / "lut.dcm", stored, VOILUTSequence=[item], WindowCenter=100,
             WindowWidth=10)
    expected = np.rint(lut[stored].astype(float) * 255 / 65535)
    assert np.abs(grey_of(f).astype(int) - expected).max() <= 1


# -- what is refused ----------------------------------------------------------------------------


def broken_files(tmp_path: Path, grey: np.ndarray) -> dict[str, str]:
    """name -> a fragment of the reason; each file is one error row."""
    v = grey.astype(np.uint16) * 16
    good = make(tmp_path / "good.dcm", v)
    data = good.read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[:-500])
    (tmp_path / "garbage.dcm").write_bytes(b"\x00" * 128 + b"DICX" + data[132:])
    nopix = pydicom.dcmread(good)
    del nopix.PixelData
    nopix.save_as(tmp_path / "nopixels.dcm")
    make(tmp_path / "ct.dcm", v, modality="CT", body_part=None)
    make(tmp_path / "knee.dcm", v, body_part="KNEE")
    multi = pydicom.dcmread(good)
    multi.NumberOfFrames = 2
    multi.PixelData = v.tobytes() * 2
    multi.save_as(tmp_path / "multiframe.dcm")
    rgb = make(tmp_path / "rgb.dcm", v)
    ds = pydicom.dcmread(rgb)
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
    ds.save_as(rgb)
    big = pydicom.dcmread(good)
    big.Rows = big.Columns = 20000
    big.save_as(tmp_path / "huge.dcm")
    rle = make(tmp_path / "rle_cut.dcm", v, syntax=RLELossless).read_bytes()
    (tmp_path / "rle_cut.dcm").write_bytes(rle[:len(rle) * 2 // 3])
    return {"truncated.dcm": "truncated", "garbage.dcm": "no DICM marker",
            "nopixels.dcm": "DICOM without pixel data", "ct.dcm": "Modality 'CT'",
            "knee.dcm": "BodyPartExamined is not CHEST", "multiframe.dcm": "multi-frame DICOM (2",
            "rgb.dcm": "only greyscale", "huge.dcm": "too large: 20000x20000",
            "rle_cut.dcm": "truncated DICOM pixel data (RLE Lossless)"}


def test_every_broken_file_is_refused_with_its_reason(tmp_path, grey):
    for name, fragment in broken_files(tmp_path, grey).items():
        with pytest.raises(ImageError) as err:
            load_image(tmp_path / name, SIZE)
        assert fragment in err.value.reason, (name, err.value.reason)
        assert PHI_NAME.split("^")[0] not in str(err.value)


# -- discovery ----------------------------------------------------------------------------------


def test_discovery_by_extension_any_case_and_by_the_dicm_marker(tmp_path, grey):
    v = grey.astype(np.uint16) * 16
    for name in ("a.DCM", "b.Dicom", "1.2.840.113619.2.55.3", "noext"):
        make(tmp_path / name, v)
    (tmp_path / "notes").write_text("not DICOM at all\n" * 20)
    (tmp_path / "DICOMDIR").write_bytes((tmp_path / "noext").read_bytes())
    (tmp_path / "x.png").write_bytes(b"")
    walk = walk_images([tmp_path])
    names = [Path(f).name for f in walk.files]
    assert names == ["1.2.840.113619.2.55.3", "a.DCM", "b.Dicom", "noext", "x.png"]
    assert walk.dicom == 4 and walk.ignored == 2
    assert np.array_equal(load_image(tmp_path / "noext", SIZE), load_image(tmp_path / "a.DCM",
                                                                           SIZE))


def test_labelled_dicom_folder_is_a_dataset(tmp_path):
    for cls, idx in (("NORMAL", 0), ("PNEUMONIA", 1)):
        (tmp_path / cls).mkdir()
        make(tmp_path / cls / "x.dcm", picture(idx).astype(np.uint16) * 16)
    lf = scan_labelled(tmp_path)
    assert [Path(p).name for p, _ in lf.samples] == ["x.dcm", "x.dcm"]
    from pneumo_edge.commands.evaluate import decode_labelled

    px, labels, failed = decode_labelled(lf.samples, SIZE)
    assert px.shape == (2, 1, SIZE, SIZE) and list(labels) == [0, 1] and not failed


# -- scoring ------------------------------------------------------------------------------------


def _score(args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "pneumo_edge", "score", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def test_score_mixed_folder_same_probabilities_uids_and_no_phi(tiny_exported, tmp_path, grey):
    d = tmp_path / "pacs"
    d.mkdir()
    v = grey.astype(np.int32) * 16
    make(d / "a_plain.dcm", v)
    make(d / "b_mono1.dcm", 4095 - v, photometric="MONOCHROME1")
    make(d / "c_rescale.dcm", v, RescaleSlope=2, RescaleIntercept=-1024)
    make(d / "d_rle.dcm", v, syntax=RLELossless)
    make(d / "e_j2k.dcm", v, syntax=JPEG2000Lossless)
    make(d / "f_noextension", v)
    Image.fromarray(grey).save(d / "g_png.png")
    make(d / "h_bigendian.dcm", v, syntax=ExplicitVRBigEndian)
    same = ["b_mono1.dcm", "c_rescale.dcm", "d_rle.dcm", "e_j2k.dcm", "f_noextension",
            "g_png.png", "good.dcm", "h_bigendian.dcm"]
    if importlib.util.find_spec("jpeg_ls"):  # encoders of the dev extra
        same.append(make(d / "i_jpegls.dcm", v, syntax=JPEGLSLossless).name)
    if importlib.util.find_spec("gdcm"):
        same.append(jpeg_lossless(make(tmp_path / "src.dcm", v), d / "j_jpeglossless.dcm").name)
    make(d / "k_jpeg_baseline.dcm", grey, bits_stored=8, syntax=JPEGBaseline8Bit)
    make(d / "l_j2k_lossy.dcm", v, syntax=JPEG2000)
    (tmp_path / "bad").mkdir()
    broken = broken_files(tmp_path / "bad", grey)
    out = tmp_path / "out.csv"
    proc = _score([d, tmp_path / "bad", "--model", tiny_exported, "--runtime", "onnx", "-o",
                   out, "--dicom-columns", "Modality,ViewPosition,BodyPartExamined"])
    assert proc.returncode == 1, proc.stderr
    text = out.read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    head = text.splitlines()[0].split(",")
    assert head[-1] == "error" and head[-7:-1] == ["study_uid", "series_uid", "sop_uid",
                                                  "Modality", "ViewPosition",
                                                  "BodyPartExamined"]
    by = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == len(same) + 3 + len(broken)  # + a_plain, k, l (good.dcm is in bad/)
    ref = by["a_plain.dcm"]
    p_cols = [h for h in head if h.startswith("p_")]
    for name in same:  # the same picture: the same probabilities
        r = by[name]
        assert r["label"] and not r["error"], (name, r)
        assert all(abs(float(r[c]) - float(ref[c])) <= 1e-4 for c in p_cols), name
    for name in ("b_mono1.dcm", "c_rescale.dcm", "d_rle.dcm", "e_j2k.dcm", "f_noextension"):
        r = by[name]
        assert r["sop_uid"].startswith("1.2.") and r["sop_uid"] != ref["sop_uid"]
        assert (r["Modality"], r["ViewPosition"], r["BodyPartExamined"]) == ("DX", "PA", "CHEST")
    assert by["g_png.png"]["sop_uid"] == by["g_png.png"]["Modality"] == ""
    assert by["k_jpeg_baseline.dcm"]["label"] and by["l_j2k_lossy.dcm"]["label"]  # lossy: scored
    for name, fragment in broken.items():
        assert not by[name]["label"] and fragment in by[name]["error"], (name, by[name])
    assert by["ct.dcm"]["study_uid"] and by["ct.dcm"]["Modality"] == "CT"
    everything = text + proc.stdout + proc.stderr + Path(f"{out}.json").read_text()
    for phi in (PHI_NAME, PHI_NAME.split("^")[0], PHI_ID, "19470101"):
        assert phi not in everything
    assert "Warning" not in proc.stderr  # pydicom's warnings (they may quote values) are off


def test_no_dicom_input_keeps_the_plain_header(tiny_exported, tmp_path, grey):
    Image.fromarray(grey).save(tmp_path / "a.png")
    proc = _score([tmp_path, "--model", tiny_exported, "--runtime", "onnx"])
    assert proc.returncode == 0, proc.stderr
    assert "uid" not in proc.stdout.splitlines()[0]


def test_identifying_dicom_columns_are_refused(tiny_exported, tmp_path, grey):
    make(tmp_path / "a.dcm", grey.astype(np.uint16) * 16)
    proc = _score([tmp_path, "--model", tiny_exported, "--dicom-columns", "PatientName"])
    assert proc.returncode == 2 and "PatientName" in proc.stderr and not proc.stdout


def test_resume_keeps_the_dicom_header(tiny_exported, tmp_path, grey):
    from test_score import as_interrupted

    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        make(d / f"{i}.dcm", grey.astype(np.uint16) * 16)
    out = tmp_path / "out.csv"
    assert _score([d, "--model", tiny_exported, "--runtime", "onnx", "-o", out]).returncode == 0
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    as_interrupted(out, "".join(lines[:2]).encode(), [d / "0.dcm"])  # header + the first row
    proc = _score([d, "--model", tiny_exported, "--runtime", "onnx", "-o", out, "--resume"])
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == full


def test_dicom_scoring_imports_no_torch(tiny_exported, tmp_path, grey):
    from test_edge import run_without_torch  # the torch-hiding launcher of the edge tests

    v = grey.astype(np.uint16) * 16
    make(tmp_path / "a.dcm", v, syntax=JPEG2000Lossless)
    make(tmp_path / "b", v, syntax=RLELossless)
    out = tmp_path / "out.csv"
    proc = run_without_torch("score", tmp_path, "--model", tiny_exported, "--runtime", "onnx",
                             "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "BLOCKED-MODULES-LOADED=[]" in proc.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 2 and all(r["label"] and r["sop_uid"] for r in rows)


def _relabelled(name: str, tmp_path: Path) -> Path:
    """A file of pydicom's bundled test data (MIT licence) relabelled as a DX chest film."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file(name))
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    out = tmp_path / name
    ds.save_as(out)
    return out


def test_pydicom_test_files_in_other_syntaxes_decode_to_the_same_pixels(tmp_path):
    """Third-party encoders (pydicom's test data: one MR image stored in several syntaxes)."""
    ref = grey_of(_relabelled("MR_small.dcm", tmp_path))
    for name in ("MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
                 "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                 "MR_small_jpeg_ls_lossless.dcm"):
        assert np.array_equal(grey_of(_relabelled(name, tmp_path)), ref), name
    ext = grey_of(_relabelled("JPGExtended.dcm", tmp_path))  # JPEG Extended, 12-bit lossy
    assert ext.shape == (1024, 256) and ext.std() > 10


def test_deflated_transfer_syntax(tmp_path, grey):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    f = make(tmp_path / "plain.dcm", grey.astype(np.uint16) * 16)
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "deflated.dcm").file_meta.TransferSyntaxUID.is_deflated
    assert np.array_equal(grey_of(tmp_path / "deflated.dcm"), grey)
    del ds.PixelData
    ds.save_as(tmp_path / "deflated_nopixels.dcm", enforce_file_format=True)
    with pytest.raises(dicom.DicomError, match="DICOM without pixel data"):
        grey_of(tmp_path / "deflated_nopixels.dcm")


def test_a_bad_header_value_is_a_reason_not_a_crash(tmp_path, grey):
    """Training's decode catches only ImageError: any failure inside pydicom must become one."""
    f = make(tmp_path / "slope.dcm", grey.astype(np.uint16) * 16, RescaleIntercept=0)
    ds = pydicom.dcmread(f)
    ds.add_new(0x00281053, "DS", "1")  # RescaleSlope, then corrupted to a non-number below
    ds.save_as(f)
    data = f.read_bytes().replace(b"DS\x02\x001 ", b"DS\x02\x00x!")
    f.write_bytes(data)
    with pytest.raises(ImageError, match="invalid DICOM header value"):
        load_image(f, SIZE)


def _dicom_and_png_twins(root: Path, per_class: int = 6) -> tuple[Path, Path]:
    """The same labelled images as DICOM (12-bit, some MONOCHROME1, some extensionless) under
    ``root/dicom`` and as PNG under ``root/png``."""
    from conftest import CLASSES, make_image

    rng = np.random.default_rng(3)
    for label, cls in enumerate(CLASSES):
        for sub in ("dicom", "png"):
            (root / sub / cls).mkdir(parents=True)
        for i in range(per_class):
            img = make_image(label, rng)
            img[0, 0], img[0, 1] = 0, 255
            Image.fromarray(img).save(root / "png" / cls / f"{i}.png")
            v = img.astype(np.int32) * 16
            name = f"{i}.dcm" if i % 3 else f"{i}"
            if i % 2:
                make(root / "dicom" / cls / name, 4095 - v, photometric="MONOCHROME1")
            else:
                make(root / "dicom" / cls / name, v, syntax=RLELossless)
    return root / "dicom", root / "png"


def test_eval_data_path_on_dicom_equals_the_same_pngs(tiny_exported, tmp_path):
    """eval, parity and quantisation read labelled folders with scan_labelled + decode_labelled:
    DICOM twins of PNG files give the same pixels and probabilities."""
    from pneumo_edge.commands.evaluate import decode_labelled
    from pneumo_edge.runtimes import open_runtime

    dcm, png = _dicom_and_png_twins(tmp_path)
    rt = open_runtime(tiny_exported, "onnx", log=lambda m: None)
    (pa, la, fa), (pb, lb, fb) = (decode_labelled(scan_labelled(d, rt.card.classes).samples,
                                                  rt.card.image_size) for d in (dcm, png))
    assert len(pa) == 12 and not fa and not fb
    assert np.array_equal(pa, pb) and np.array_equal(la, lb)
    assert np.abs(np.asarray(rt(pa)) - np.asarray(rt(pb))).max() <= 1e-6


def test_training_reads_a_dicom_dataset(tmp_path):
    pytest.importorskip("torch", reason="training needs torch")
    from pneumo_edge.train.loop import TrainConfig, train

    dcm, _ = _dicom_and_png_twins(tmp_path / "data")
    (tmp_path / "ds").mkdir()
    dcm.rename(tmp_path / "ds" / "train")
    out = tmp_path / "run"
    train(TrainConfig(data=str(tmp_path / "ds"), out=str(out), arch="resnet18", image_size=32,
                      epochs=1, min_epochs=1, workers=0, device="cpu", batch_size=4,
                      augment=False, amp=False, force=True, threshold_for="fixed:0.5"))
    import json

    split = json.loads((out / "card.json").read_text())["data"]
    assert (out / "model.pt").exists() and split["skipped_files"] == []
    assert sum(sum(split[f"{k}_counts"].values()) for k in ("train", "val", "test")) == 12

"""DICOM files: recognising them, turning one into 8-bit grey, and the identity tags a CSV row may
carry. :mod:`pneumo_edge.inputs.images` calls :func:`read_grey` and then does the same resize as for
every other image, so a model sees the same pixels from DICOM wherever it runs.

Which files are DICOM: the extensions ``.dcm`` and ``.dicom`` (any case), and any other regular
file whose bytes 128..131 are ``DICM`` (the DICOM Part 10 preamble and prefix; only the first
132 bytes are read to find out). A file named ``DICOMDIR`` is a media directory, not an image,
and is passed over.

The pixel pipeline, in the standard's order (pydicom's own functions do the LUT maths):

1. read the header only (``stop_before_pixels``) and refuse, before decoding, anything that is
   not one greyscale radiograph: no pixel data (SR, presentation state, ...), several frames,
   colour, more than ``max_pixels`` pixels, a Modality other than CR/DX/DR, or a
   BodyPartExamined that is present and not CHEST (a CT slice is never scored as a chest film);
2. decode the stored values (compressed syntaxes with the pylibjpeg decoders);
3. Modality LUT (Rescale Slope/Intercept or the Modality LUT Sequence): ``apply_modality_lut``;
4. VOI LUT: the VOI LUT Sequence if present, else the first Window Center/Width with its VOI
   LUT Function (LINEAR, LINEAR_EXACT, SIGMOID): ``apply_voi_lut``. Its output range (the LUT's
   bits, or the window's output range as pydicom computes it) is scaled to 0..255. Without any
   VOI, the range of the values present is scaled to 0..255, Pixel Padding Value (and Pixel
   Padding Range Limit) excluded from that range;
5. MONOCHROME1 is inverted (255 - v), after the VOI step; so is MONOCHROME2 with Presentation
   LUT Shape INVERSE (MONOCHROME1 with INVERSE, as the DX module pairs them, is inverted once);
6. padding pixels are set to 0 (black).

No patient data (name, ID, birth date, ...) is ever read into a message: reasons name tags and
transfer syntaxes only, and pydicom's own warnings (which may quote values) are silenced.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
MAGIC_OFFSET = 128
MAGIC = b"DICM"
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR")
BODY_PART = "CHEST"
UID_COLUMNS = ("study_uid", "series_uid", "sop_uid")
#: Tags ``--dicom-columns`` may add to the CSV: none of them identifies a patient.
SAFE_TAGS = ("Modality", "ViewPosition", "BodyPartExamined", "PhotometricInterpretation",
             "TransferSyntaxUID", "SOPClassUID", "BitsStored", "Rows", "Columns",
             "Manufacturer", "ManufacturerModelName")
_UID_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class DicomError(Exception):
    """A DICOM file that cannot become pixels; ``str()`` is the reason (no patient data)."""


def is_dicom_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in DICOM_EXTENSIONS


def is_dicomdir(path: str | os.PathLike) -> bool:
    return Path(path).name.upper() == "DICOMDIR"


def sniff(path: str | os.PathLike) -> bool:
    """Whether a regular file has ``DICM`` at byte 128; reads at most 132 bytes, never blocks
    on a FIFO or device (those are not opened), False when it cannot be read."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            head = f.read(MAGIC_OFFSET + len(MAGIC))
    except OSError:
        return False
    return head[MAGIC_OFFSET:] == MAGIC


def _pydicom():
    """pydicom, imported on first use, with its warnings and log lines silenced (they can quote
    tag values, and so patient data)."""
    import logging
    import warnings

    import pydicom

    global _QUIET
    if not _QUIET:
        logger = logging.getLogger("pydicom")
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
        warnings.filterwarnings("ignore", module=r"pylibjpeg|openjpeg|libjpeg|rle")
        _QUIET = True
    return pydicom


_QUIET = False


def read_header(path: str | os.PathLike):
    """The dataset without its pixel data; :class:`DicomError` for a file that is not DICOM."""
    return _read_header(path)[0]


def _read_header(path):
    """(dataset without pixel data, whether Pixel Data follows the header: True, False, or None
    when the stream cannot tell, as in a deflated transfer syntax)."""
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, force=False, stop_before_pixels=True)
            syntax = ds.file_meta.get("TransferSyntaxUID")
            if syntax is None or syntax.is_deflated:
                return ds, None
            tag = f.read(4)  # pydicom leaves the file at the tag it stopped before
            order = "<" if syntax.is_little_endian else ">"
            return ds, len(tag) == 4 and struct.unpack(order + "HH", tag) == (0x7FE0, 0x0010)
    except InvalidDicomError:
        raise DicomError("not a DICOM file (no DICM marker at byte 128)") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a hostile header must become a reason
        raise DicomError(f"unreadable DICOM header ({type(exc).__name__})") from None


def check_image(ds, max_pixels: int) -> None:
    """Refuse (``DicomError``) a dataset that is not one greyscale chest radiograph, before any
    pixel is decoded. ``ds`` may come from :func:`read_header`."""
    modality = _text(ds.get("Modality"))
    if modality.upper() not in RADIOGRAPH_MODALITIES:
        raise DicomError(f"DICOM Modality {modality or '(missing)'!r} is not a radiograph "
                         f"({'/'.join(RADIOGRAPH_MODALITIES)}): not scored")
    part = _text(ds.get("BodyPartExamined"))
    if part and part.upper() != BODY_PART:
        raise DicomError(f"DICOM BodyPartExamined {part!r} is not {BODY_PART}: not scored")
    frames = _int(ds.get("NumberOfFrames"), 1)
    if frames > 1:
        raise DicomError(f"multi-frame DICOM ({frames} frames)")
    photometric = _text(ds.get("PhotometricInterpretation"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(f"DICOM PhotometricInterpretation {photometric or '(missing)'!r}: "
                         "only greyscale (MONOCHROME1/2) is scored")
    if _int(ds.get("SamplesPerPixel"), 1) != 1:
        raise DicomError("DICOM with more than one sample per pixel (colour)")
    rows, cols = _int(ds.get("Rows"), 0), _int(ds.get("Columns"), 0)
    if rows * cols > max_pixels:
        raise DicomError(f"too large: {cols}x{rows} pixels (limit {max_pixels:,})")
    if rows < 1 or cols < 1:
        raise DicomError(f"DICOM image of {cols}x{rows} pixels")
    bits = _int(ds.get("BitsAllocated"), 0)
    if bits not in (8, 16):
        raise DicomError(f"DICOM BitsAllocated {bits}: only 8 and 16 are scored")


def read_grey(path: str | os.PathLike, *, max_pixels: int) -> np.ndarray:
    """The DICOM file at ``path`` as 8-bit grey, ``uint8 [rows, cols]`` (module docstring)."""
    head, has_pixels = _read_header(path)
    try:
        if has_pixels is False:
            raise DicomError(f"DICOM without pixel data ({_sop_class(head)})")
        check_image(head, max_pixels)
        stored, ds = _decode(path, head, has_pixels)
        return to_8bit(stored, ds)
    except (DicomError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 -- a bad value (slope, LUT, ...): a reason, no
        # pixels; only the exception's type, since its text may quote a tag's value
        raise DicomError(f"invalid DICOM header value ({type(exc).__name__})") from None


def _decode(path, head, has_pixels):
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(path, force=False)
        if "PixelData" not in ds:  # pydicom drops a Pixel Data cut off before its end
            raise DicomError(f"truncated DICOM pixel data ({_syntax(head)})" if has_pixels
                             else f"DICOM without pixel data ({_sop_class(head)})")
        syntax = ds.file_meta.TransferSyntaxUID
        plugin = "pylibjpeg" if syntax.is_compressed else ""
        arr = ds.pixel_array if not plugin else pydicom.pixels.pixel_array(
            ds, decoding_plugin=plugin)
    except (MemoryError, DicomError):
        raise
    except NotImplementedError as exc:
        raise DicomError(f"cannot decode transfer syntax {_syntax(head)}: "
                         f"{_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 -- truncated or corrupt data: a reason, no pixels
        raise DicomError(f"corrupt or truncated DICOM pixel data ({_syntax(head)}): "
                         f"{_first_line(exc)}") from None
    rows, cols = int(ds.Rows), int(ds.Columns)
    if arr.shape != (rows, cols):
        raise DicomError(f"DICOM pixel data decoded to shape {arr.shape}, "
                         f"not {rows}x{cols}")
    return arr, ds


def to_8bit(stored: np.ndarray, ds) -> np.ndarray:
    """Stored values -> Modality LUT -> VOI LUT -> 0..255 -> MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    pad = padding_mask(stored, ds)
    values = apply_modality_lut(stored, ds)
    has_lut, has_window = bool(ds.get("VOILUTSequence")), "WindowCenter" in ds \
        and "WindowWidth" in ds
    try:
        if has_lut:  # a VOI LUT takes integer inputs
            values = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values
            lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
        elif has_window:
            lo, hi = _window_range(ds)
        if has_lut or has_window:
            values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
        else:
            lo, hi = _range_present(values, pad)
    except DicomError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a bad LUT or window: a reason, no pixels
        raise DicomError(f"DICOM VOI LUT or window cannot be applied: {_first_line(exc)}") \
            from None
    grey = _scale(values, lo, hi)
    if _inverted(ds):
        grey = 255 - grey
    grey[pad] = 0
    return grey


def _inverted(ds) -> bool:
    """MONOCHROME1 is shown inverted (with or without Presentation LUT Shape INVERSE, which the
    DX module pairs with it: one inversion); so is MONOCHROME2 with Presentation LUT Shape
    INVERSE."""
    if _text(ds.get("PhotometricInterpretation")) == "MONOCHROME1":
        return True
    return _text(ds.get("PresentationLUTShape")).upper() == "INVERSE"


def _window_range(ds) -> tuple[float, float]:
    """The output range of pydicom's windowing for this dataset: the values it gives far below
    and far above the window (its y_min and y_max; no maths of our own)."""
    from pydicom.pixels import apply_windowing

    with np.errstate(over="ignore"):
        ends = apply_windowing(np.array([-1e300, 1e300]), ds, index=0)
    lo, hi = float(ends[0]), float(ends[1])
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise DicomError("DICOM window gives no output range")
    return lo, hi


def _range_present(values: np.ndarray, pad: np.ndarray) -> tuple[float, float]:
    inside = values[~pad] if pad.any() else values
    if inside.size == 0:
        raise DicomError("DICOM image is all padding (Pixel Padding Value)")
    lo, hi = float(inside.min()), float(inside.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DicomError("DICOM image has NaN or infinite values after the Modality LUT")
    if not hi > lo:
        raise DicomError(f"DICOM image is constant (every pixel {lo:g}): no range to scale")
    return lo, hi


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``round((v - lo) * 255 / (hi - lo))`` clipped to 0..255, in place on a float64 copy."""
    scaled = np.array(values, dtype=np.float64)
    scaled -= lo
    scaled *= 255.0 / (hi - lo)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def padding_mask(stored: np.ndarray, ds) -> np.ndarray:
    """Pixels whose stored value is the Pixel Padding Value (or between it and the Pixel Padding
    Range Limit, inclusive)."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return np.zeros(stored.shape, bool)
    a = int(value)
    b = int(ds.get("PixelPaddingRangeLimit", a))
    lo, hi = min(a, b), max(a, b)
    return (stored >= lo) & (stored <= hi)


@dataclass(frozen=True)
class Identity:
    """The UIDs (and chosen non-identifying tags) of one DICOM file, for its CSV row."""

    uids: tuple[str, str, str]
    tags: tuple[str, ...]


def identity(path: str | os.PathLike, tags=()) -> Identity:
    """The study, series and SOP instance UIDs and the values of ``tags`` (each one of
    :data:`SAFE_TAGS`); empty strings for a file whose header cannot be read or lacks them."""
    try:
        ds = read_header(path)
    except DicomError:
        return Identity(("", "", ""), tuple("" for _ in tags))
    uids = tuple(_text(ds.get(k))[:64] for k in _UID_TAGS)
    values = tuple(_tag(ds, t) for t in tags)
    return Identity(uids, values)  # type: ignore[arg-type]


def _tag(ds, name: str) -> str:
    if name not in SAFE_TAGS:
        raise ValueError(f"{name} is not one of the tags that may be written: {SAFE_TAGS}")
    if name == "TransferSyntaxUID":
        meta = getattr(ds, "file_meta", None)
        return _text(meta.get("TransferSyntaxUID") if meta is not None else None)
    return " ".join(_text(ds.get(name)).split())[:64]


def _text(elem) -> str:
    """A value (or data element) as a stripped string ('' when absent or unreadable)."""
    try:
        value = elem.value if hasattr(elem, "value") else elem
    except Exception:  # noqa: BLE001
        return ""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip()


def _int(elem, default: int) -> int:
    text = _text(elem)
    try:
        return int(float(text)) if text else default
    except ValueError:
        return default


def _sop_class(ds) -> str:
    uid = ds.get("SOPClassUID")
    try:
        name = uid.name if uid is not None else ""
    except Exception:  # noqa: BLE001
        name = ""
    return name or "unknown SOP class"


def _syntax(ds) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    try:
        return uid.name if uid is not None else "no transfer syntax"
    except Exception:  # noqa: BLE001
        return "unknown transfer syntax"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]

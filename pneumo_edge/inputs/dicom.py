"""DICOM files: recognising them, turning one into 8-bit grey, and the identity tags a CSV row may
carry. :mod:`pneumo_edge.inputs.images` calls :func:`read_grey` and then does the same resize as for
every other image, so a model sees the same pixels from DICOM wherever it runs.

Which files are DICOM: the extensions ``.dcm`` and ``.dicom`` (any case), and any other regular
file whose bytes 128..131 are ``DICM`` (the DICOM Part 10 preamble and prefix; only the first
132 bytes are read to find out). A file named ``DICOMDIR`` is a media directory, not an image,
and is passed over. Only regular files are ever opened (a FIFO, device or socket is refused
from its ``fstat`` after a non-blocking open, so nothing hangs).

Reading is bounded, whatever the file says: the header (everything before Pixel Data) is parsed
once, through a reader that refuses more than :data:`MAX_HEADER_READS` reads (about half as many
data elements, nested ones included) or :data:`MAX_HEADER_BYTES` bytes; a deflated transfer
syntax is inflated as a stream and refused when it would exceed :data:`MAX_INFLATED_BYTES`;
Pixel Data is read only after the header passed the checks below, from where the header ended.

The pixel pipeline, in the standard's order (pydicom's own functions do the LUT maths):

1. refuse, from the header and before any pixel is decoded, anything that is not one greyscale
   radiograph for presentation: no pixel data (SR, presentation state, ...), several frames,
   colour, more than ``max_pixels`` pixels, a Modality other than CR/DX/DR, a BodyPartExamined
   that is present and not CHEST (a CT slice is never scored as a chest film), and "For
   Processing" images (Presentation Intent Type FOR PROCESSING or a For Processing SOP class:
   raw detector data, not meant to be looked at);
2. for JPEG, JPEG-LS and JPEG 2000 syntaxes, read the codestream's own size from the first
   fragment (JPEG SOF / JPEG-LS SOF55 / J2K SIZ) and refuse it when it is above ``max_pixels``
   or differs from Rows x Columns (it would be decoded into the wrong raster), before decoding;
3. decode the stored values (compressed syntaxes with the pylibjpeg decoders);
4. Modality LUT (Rescale Slope/Intercept or the Modality LUT Sequence): ``apply_modality_lut``;
5. VOI LUT: the VOI LUT Sequence if present, else the first Window Center/Width with its VOI
   LUT Function (LINEAR, LINEAR_EXACT, SIGMOID): ``apply_voi_lut``. Its output range (the LUT's
   bits, or the window's output range as pydicom computes it) is scaled to 0..255. Without any
   VOI, the range of the values present is scaled to 0..255, Pixel Padding Value (and Pixel
   Padding Range Limit) excluded from that range. An image that is constant after this step
   (a window entirely outside the stored values) is refused: there is nothing to score;
6. MONOCHROME1 is inverted (255 - v), after the VOI step; so is MONOCHROME2 with Presentation
   LUT Shape INVERSE (MONOCHROME1 with INVERSE, as the DX module pairs them, is inverted once);
7. padding pixels are set to 0 (black).

No patient data (name, ID, birth date, ...) and no tag value is ever put into a message: reasons
name the tag, not its value (``BodyPartExamined is not CHEST``), except values from a short
fixed vocabulary of the standard's codes (:data:`MODALITY_CODES`, :data:`PHOTOMETRIC_CODES`,
transfer syntax and SOP class names from pydicom's UID dictionary). UIDs reach the CSV only when
they follow the DICOM UID grammar (:func:`valid_uid`). pydicom's own warnings and log lines
(which may quote values) are silenced process-wide by :func:`quiet`.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import struct
import threading
import warnings
import zlib
from collections import OrderedDict
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
#: Reads of the file while parsing one header (every data element takes one to three).
MAX_HEADER_READS = 100_000
#: Bytes a header (everything before Pixel Data) may take.
MAX_HEADER_BYTES = 64 * 1024 * 1024
#: Bytes a deflated data set may inflate to (a 16-bit 80-megapixel image is 160 MB).
MAX_INFLATED_BYTES = 256 * 1024 * 1024
#: Modality codes of the standard (PS3.3 C.7.3.1.1.1): the only Modality values a reason quotes.
MODALITY_CODES = frozenset({
    "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CR", "CT", "CTPROTOCOL", "DG", "DOC", "DR", "DX",
    "ECG", "EPS", "ES", "FID", "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS", "KER", "KO", "LEN",
    "LS", "MG", "MR", "M3D", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV", "OPTENF", "OPV",
    "OSS", "OT", "PLAN", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE", "RTIMAGE",
    "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN", "RTSTRUCT", "RWV", "SEG", "SM", "SMR",
    "SR", "SRF", "STAIN", "TEXTUREMAP", "TG", "US", "VA", "XA", "XC"})
#: Photometric Interpretation codes of the standard: the only such values a reason quotes.
PHOTOMETRIC_CODES = frozenset({
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
    "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "HSV", "ARGB", "CMYK", "XYB"})
#: SOP classes of raw detector data ("For Processing"): never scored.
FOR_PROCESSING_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray Image Storage - For Processing
})
_PIXEL_DATA = 0x7FE00010
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_PYDICOM_WARNINGS = (r"pydicom(\.|$)", r"pylibjpeg|openjpeg|libjpeg|rle")


class DicomError(Exception):
    """A DICOM file that cannot become pixels; ``str()`` is the reason (no patient data)."""


def is_dicom_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in DICOM_EXTENSIONS


def is_dicomdir(path: str | os.PathLike) -> bool:
    return Path(path).name.upper() == "DICOMDIR"


def valid_uid(text: str) -> bool:
    """The DICOM UID grammar (PS3.5 9.1): digits and dots, no empty component, no leading zero
    in a component, at most 64 characters."""
    return 0 < len(text) <= 64 and _UID.fullmatch(text) is not None


def sniff(path: str | os.PathLike) -> bool:
    """Whether a regular file has ``DICM`` at byte 128; reads at most 132 bytes, never blocks
    on a FIFO or device (those are not read), False when it cannot be read."""
    try:
        with open_regular(path) as f:
            head = f.read(MAGIC_OFFSET + len(MAGIC))
    except (OSError, DicomError):
        return False
    return head[MAGIC_OFFSET:] == MAGIC


def open_regular(path: str | os.PathLike):
    """``path`` opened for binary reading when it is a regular file; :class:`DicomError` for a
    FIFO, device or socket, which is not opened (``stat`` first; the open is non-blocking and
    checked again with ``fstat``, for a file swapped in between)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise DicomError("not a regular file (FIFO, device or socket): not read")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DicomError("not a regular file (FIFO, device or socket): not read")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def quiet() -> None:
    """Silence pydicom's and its decoders' warnings and log lines, process-wide (they can quote
    tag values, and so patient data). Idempotent and cheap. The warnings filter list is global
    and ``warnings.catch_warnings`` is not thread-safe, so this runs at import and again in the
    main thread before decode threads start (:func:`pneumo_edge.inputs.folders.walk_images`),
    never from inside a decode thread."""
    logger = logging.getLogger("pydicom")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    logger.propagate = False
    for module in _PYDICOM_WARNINGS:  # to the front, ahead of any catch-all (no duplicates)
        warnings.filterwarnings("ignore", module=module)


quiet()


def _pydicom():
    """pydicom, imported on first use, reading values without validation warnings (they quote
    the invalid value; a value that matters is checked here instead)."""
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return pydicom


class _Capped:
    """A binary file as pydicom reads it, with a cap on read calls and on bytes (``None``: no
    cap); a read past a cap raises :class:`DicomError` before reading."""

    def __init__(self, f, *, max_reads: int | None, max_bytes: int | None, what: str):
        self.f, self.max_reads, self.max_bytes, self.what = f, max_reads, max_bytes, what
        self.reads = self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        if self.max_reads is not None and self.reads > self.max_reads:
            raise DicomError(f"DICOM {self.what} has too many data elements (over "
                             f"{self.max_reads:,} reads): not read")
        if self.max_bytes is not None:
            left = self.max_bytes - self.bytes
            if size is None or size < 0 or size > left:
                raise DicomError(f"DICOM {self.what} is larger than {self.max_bytes:,} bytes: "
                                 "not read")
        data = self.f.read(size)
        self.bytes += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()


@dataclass
class _Header:
    """A parsed header and the stream positioned where it ended (at Pixel Data, if any)."""

    ds: object  # pydicom FileDataset without pixel data
    stream: _Capped
    implicit: bool
    little: bool

    @property
    def has_pixels(self) -> bool:
        """Whether Pixel Data follows the header (peeks at the next tag)."""
        pos = self.stream.tell()
        tag = self.stream.f.read(4)
        self.stream.seek(pos)
        order = "<" if self.little else ">"
        return len(tag) == 4 and struct.unpack(order + "HH", tag) == (0x7FE0, 0x0010)


def read_header(path: str | os.PathLike):
    """The dataset without its pixel data; :class:`DicomError` for a file that is not DICOM."""
    with _open(path) as f:
        return _parse_header(f, path).ds


def _open(path):
    try:
        return open_regular(path)
    except OSError as exc:
        raise DicomError(f"cannot read: {exc.strerror or type(exc).__name__}") from None


def _parse_header(f, path) -> _Header:
    """Parse preamble, file meta and the data set up to Pixel Data, once, within the caps."""
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

    head = _Capped(f, max_reads=MAX_HEADER_READS, max_bytes=MAX_HEADER_BYTES, what="header")
    try:
        preamble = read_preamble(head, False)
        meta = _read_file_meta_info(head)
        syntax = meta.get("TransferSyntaxUID")
        if not syntax:
            raise DicomError("DICOM file meta without a Transfer Syntax UID")
        implicit, little, deflated = _encoding(syntax)
        if deflated:
            head.f = _inflate(f, MAX_INFLATED_BYTES)
        body = read_dataset(head, implicit, little, stop_when=_at_pixel_data)
        ds = pydicom.dataset.FileDataset(os.fspath(path), body, preamble, meta, implicit, little)
    except InvalidDicomError:
        raise DicomError("not a DICOM file (no DICM marker at byte 128)") from None
    except (DicomError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 -- a hostile header must become a reason
        raise DicomError(f"unreadable DICOM header ({type(exc).__name__})") from None
    return _Header(ds, head, implicit, little)


_PIXEL_TAGS = frozenset({_PIXEL_DATA, 0x7FE00008, 0x7FE00009})  # (float, double float) pixels


def _at_pixel_data(tag, vr, length) -> bool:
    return tag in _PIXEL_TAGS


def _encoding(syntax) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated) of a transfer syntax; any syntax pydicom does not
    know is explicit VR little endian, as the standard says of every encapsulated one (PS3.5
    A.4): its pixel data then fails to decode, with the syntax in the reason."""
    try:
        return bool(syntax.is_implicit_VR), bool(syntax.is_little_endian), syntax.is_deflated
    except ValueError:
        return False, True, False


def _inflate(f, cap: int) -> io.BytesIO:
    """The rest of ``f`` inflated (raw deflate, PS3.5 A.5), refused past ``cap`` bytes: a first
    pass counts the inflated size in 1 MiB steps, holding nothing; only then is it inflated."""
    start = f.tell()
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    try:
        while (chunk := f.read(1 << 20)) and not inflater.eof:
            while chunk:
                total += len(inflater.decompress(chunk, 1 << 20))
                if total > cap:
                    raise DicomError(f"deflated DICOM inflates to more than {cap:,} bytes: "
                                     "not read")
                chunk = inflater.unconsumed_tail
        f.seek(start)
        return io.BytesIO(zlib.decompressobj(-zlib.MAX_WBITS).decompress(f.read()))
    except zlib.error:
        raise DicomError("corrupt deflated DICOM data") from None


def check_image(ds, max_pixels: int) -> None:
    """Refuse (``DicomError``) a dataset that is not one greyscale chest radiograph for
    presentation, before any pixel is decoded. ``ds`` may come from :func:`read_header`.
    Reasons name tags, never their values, except the standard's own codes (module docstring)."""
    modality = _text(ds.get("Modality")).upper()
    if modality not in RADIOGRAPH_MODALITIES:
        raise DicomError(f"DICOM {_code('Modality', modality, MODALITY_CODES)} is not a "
                         f"radiograph ({'/'.join(RADIOGRAPH_MODALITIES)}): not scored")
    part = _text(ds.get("BodyPartExamined"))
    if part and part.upper() != BODY_PART:
        raise DicomError(f"DICOM BodyPartExamined is not {BODY_PART}: not scored")
    if for_processing(ds):
        raise DicomError("DICOM For Processing image (raw detector data, not for display): "
                         "not scored")
    frames = _int(ds.get("NumberOfFrames"), 1)
    if frames > 1:
        raise DicomError(f"multi-frame DICOM ({frames} frames)")
    photometric = _text(ds.get("PhotometricInterpretation"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(f"DICOM {_code('PhotometricInterpretation', photometric, PHOTOMETRIC_CODES)}"
                         ": only greyscale (MONOCHROME1/2) is scored")
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


def for_processing(ds) -> bool:
    """Raw detector data: Presentation Intent Type FOR PROCESSING or a For Processing SOP
    class (in the data set or the file meta)."""
    if _text(ds.get("PresentationIntentType")).upper() == "FOR PROCESSING":
        return True
    meta = getattr(ds, "file_meta", None)
    classes = {_text(ds.get("SOPClassUID")),
               _text(meta.get("MediaStorageSOPClassUID") if meta is not None else None)}
    return bool(classes & FOR_PROCESSING_CLASSES)


def _code(tag: str, value: str, vocabulary) -> str:
    """``Tag 'VALUE'`` when the value is one of the standard's codes, else the tag alone."""
    if not value:
        return f"{tag} (missing)"
    return f"{tag} {value!r}" if value in vocabulary else f"{tag} (not a code of the standard)"


def read_grey(path: str | os.PathLike, *, max_pixels: int) -> np.ndarray:
    """The DICOM file at ``path`` as 8-bit grey, ``uint8 [rows, cols]`` (module docstring)."""
    with _open(path) as f:
        head = _parse_header(f, path)
        _remember(path, f, head.ds)
        try:
            if not head.has_pixels:
                raise DicomError(f"DICOM without pixel data ({_sop_class(head.ds)})")
            check_image(head.ds, max_pixels)
            ds = _read_pixel_data(head)
            check_codestream(ds, max_pixels)
            stored = _decode(ds)
            return to_8bit(stored, ds)
        except (DicomError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 -- a bad value (slope, LUT, ...): a reason, no
            # pixels; only the exception's type, since its text may quote a tag's value
            raise DicomError(f"invalid DICOM header value ({type(exc).__name__})") from None


def _read_pixel_data(head: _Header):
    """The header's dataset with its Pixel Data element, read from where the header ended
    (elements after Pixel Data are not read)."""
    from pydicom.filereader import read_dataset

    ds = head.ds
    stream = head.stream
    stream.max_reads = stream.max_bytes = None  # the file's size bounds it (images.py)
    try:
        rest = read_dataset(stream, head.implicit, head.little,
                            stop_when=lambda tag, vr, length: tag != _PIXEL_DATA)
    except (DicomError, MemoryError):
        raise
    except Exception:  # noqa: BLE001 -- cut off inside an element
        rest = {}
    if _PIXEL_DATA not in rest:  # pydicom drops a Pixel Data cut off before its end
        raise DicomError(f"truncated DICOM pixel data ({_syntax(ds)})")
    ds.update(rest)
    return ds


def check_codestream(ds, max_pixels: int) -> None:
    """For JPEG, JPEG-LS and JPEG 2000 pixel data: the size the first fragment's codestream
    declares must be within ``max_pixels`` and equal Columns x Rows; else :class:`DicomError`,
    before anything is decoded."""
    from pydicom.uid import (
        JPEG2000TransferSyntaxes,
        JPEGLSTransferSyntaxes,
        JPEGTransferSyntaxes,
    )

    syntax = ds.file_meta.TransferSyntaxUID
    if syntax not in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes):
        return
    size = codestream_size(_first_fragment(ds.PixelData))
    name = _syntax(ds)
    if size is None:
        raise DicomError(f"{name} pixel data without a readable codestream size: not scored")
    w, h = size
    if w * h > max_pixels:
        raise DicomError(f"too large: the {name} codestream is {w}x{h} pixels "
                         f"(limit {max_pixels:,})")
    rows, cols = _int(ds.get("Rows"), 0), _int(ds.get("Columns"), 0)
    if (w, h) != (cols, rows):
        raise DicomError(f"the {name} codestream is {w}x{h} pixels but Columns x Rows say "
                         f"{cols}x{rows}: not scored")


def _first_fragment(data: bytes) -> bytes:
    from pydicom.encaps import generate_fragments, parse_basic_offsets

    buf = io.BytesIO(data)
    try:
        parse_basic_offsets(buf)
        return next(generate_fragments(buf), b"")
    except Exception:  # noqa: BLE001 -- not encapsulated as the standard says
        raise DicomError(f"corrupt encapsulated DICOM pixel data ({len(data):,} bytes)") \
            from None


_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC),
                  *range(0xCD, 0xD0), 0xF7})  # JPEG frame headers; 0xF7: JPEG-LS SOF55


def codestream_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG, JPEG-LS or JPEG 2000 codestream declares in its frame header
    (SOF / SOF55 / SIZ), None when there is none before the image data."""
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    i = data.find(b"\xff\x4f\xff\x51", 0, 1 << 16)  # J2K SOC + SIZ (also inside a JP2 box)
    if i < 0 or len(data) < i + 24:
        return None
    x, y, x0, y0 = struct.unpack(">IIII", data[i + 8:i + 24])
    return max(x - x0, 0), max(y - y0, 0)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # segments without a length
            i += 2
        elif marker in _SOF:
            if len(data) < i + 9:
                return None
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        elif marker in (0xDA, 0xD9):  # scan data or end of image before any frame header
            return None
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _decode(ds) -> np.ndarray:
    pydicom = _pydicom()
    try:
        plugin = "pylibjpeg" if ds.file_meta.TransferSyntaxUID.is_compressed else ""
        arr = ds.pixel_array if not plugin else pydicom.pixels.pixel_array(
            ds, decoding_plugin=plugin)
    except MemoryError:
        raise
    except NotImplementedError:
        raise DicomError(f"cannot decode transfer syntax {_syntax(ds)}") from None
    except Exception as exc:  # noqa: BLE001 -- truncated or corrupt data: a reason, no pixels
        raise DicomError(f"corrupt or truncated DICOM pixel data ({_syntax(ds)}): "
                         f"{_first_line(exc)}") from None
    rows, cols = int(ds.Rows), int(ds.Columns)
    if arr.shape != (rows, cols):
        raise DicomError(f"DICOM pixel data decoded to shape {arr.shape}, "
                         f"not {rows}x{cols}")
    return arr


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
    inside = grey[~pad]
    if inside.size and inside.min() == inside.max():
        raise DicomError("DICOM image is constant after the VOI LUT (its window or LUT maps "
                         "every pixel to one value): not scored")
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
    notes: tuple[str, ...] = ()  # why a value was left empty; they quote no value


def identity(path: str | os.PathLike, tags=()) -> Identity:
    """The study, series and SOP instance UIDs and the values of ``tags`` (each one of
    :data:`SAFE_TAGS`); empty strings for a file whose header cannot be read or lacks them.

    The UID rule: a UID (and a TransferSyntaxUID or SOPClassUID tag) is written only when it
    follows the DICOM UID grammar (:func:`valid_uid`); any other value (text, a name, too long)
    is left empty and ``notes`` says which tag, never what it held.

    The header :func:`read_grey` just parsed for this very file (same device, inode, size and
    mtime) is not parsed again: its fields are remembered (at most :data:`_RECENT_MAX` files)."""
    bad = [t for t in tags if t not in SAFE_TAGS]
    if bad:
        raise ValueError(f"{bad[0]} is not one of the tags that may be written: {SAFE_TAGS}")
    fields = _recalled(path)
    if fields is None:
        try:
            fields = _fields(read_header(path))
        except DicomError:
            return Identity(("", "", ""), tuple("" for _ in tags))
    notes: list[str] = []
    uids = tuple(_uid(fields[k], k, notes) for k in _UID_TAGS)
    values = tuple(_uid(fields[t], t, notes) if t in ("TransferSyntaxUID", "SOPClassUID")
                   else " ".join(fields[t].split())[:64] for t in tags)
    return Identity(uids, values, tuple(notes))  # type: ignore[arg-type]


_RECENT: OrderedDict[tuple, dict[str, str]] = OrderedDict()
_RECENT_LOCK = threading.Lock()
_RECENT_MAX = 2048


def _fields(ds) -> dict[str, str]:
    """The header values :func:`identity` may use, as text (cut at 256 characters)."""
    meta = getattr(ds, "file_meta", None)
    fields = {k: _text(ds.get(k))[:256] for k in (*_UID_TAGS, *SAFE_TAGS)}
    fields["TransferSyntaxUID"] = _text(meta.get("TransferSyntaxUID")
                                        if meta is not None else None)[:256]
    return fields


def _file_key(path, st: os.stat_result) -> tuple:
    return os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _remember(path, f, ds) -> None:
    key = _file_key(path, os.fstat(f.fileno()))
    with _RECENT_LOCK:
        _RECENT[key] = _fields(ds)
        while len(_RECENT) > _RECENT_MAX:
            _RECENT.popitem(last=False)


def _recalled(path) -> dict[str, str] | None:
    try:
        key = _file_key(path, os.stat(path))
    except OSError:
        return None
    with _RECENT_LOCK:
        return _RECENT.pop(key, None)


def _uid(text: str, tag: str, notes: list[str]) -> str:
    if not text or valid_uid(text):
        return text
    notes.append(f"{tag} is not a valid UID: left empty")
    return ""


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
    return _uid_name(ds.get("SOPClassUID"), "SOP class")


def _syntax(ds) -> str:
    meta = getattr(ds, "file_meta", None)
    return _uid_name(meta.get("TransferSyntaxUID") if meta is not None else None,
                     "transfer syntax")


def _uid_name(uid, what: str) -> str:
    """A UID's name from pydicom's dictionary, else the UID when it is one, else a phrase:
    never a value that is not a UID (pydicom's ``UID.name`` echoes any text)."""
    text = _text(uid)
    if not text:
        return f"no {what}"
    from pydicom.uid import UID

    if UID(text).keyword:
        return UID(text).name
    return text if valid_uid(text) else f"unknown {what}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]

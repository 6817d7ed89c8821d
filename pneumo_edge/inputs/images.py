"""The only code that turns an image file into model pixels.

Training, evaluation, parity and scoring all call :func:`load_image`, so a model sees the same
pixels wherever it runs. The contract: decode, apply EXIF orientation, convert to 8-bit grey,
resize (squash) to ``size x size`` with Pillow's antialiased bilinear filter, and return a
C-contiguous ``uint8`` array of shape ``[1, size, size]``.

JPEGs are decoded with ``Image.draft('L', (size, size))``: libjpeg decodes only the luma plane at
the smallest DCT scale (1/2, 1/4, 1/8) that is still at least ``size`` pixels on each side. On
multi-megapixel X-rays that is several times faster, and because every caller goes through this
function the reduced-scale pixels are what the model was trained on too.

How each pixel type becomes 8-bit grey (one rule per type, never a silent clip):

- ``L`` (8-bit grey): as stored.
- ``1`` (bilevel): 0 and 255.
- ``I;16`` and ``I`` holding only values 0..65535 (16-bit PNG/TIFF; Pillow reads 16-bit PNGs
  as ``I``): scaled over the full 16-bit range, ``round(v * 255 / 65535)``. A 12-bit image in
  a 16-bit file therefore looks dark, exactly as it is stored; nothing is stretched.
- ``I`` (32-bit integer) with negative values or values above 65535, and ``F`` (32-bit float,
  e.g. float TIFFs) always: scaled over the image's own range,
  ``round((v - min) * 255 / (max - min))``, so min is 0 and max is 255 (a 0..4080 float TIFF
  uses all 256 levels instead of being clipped white). Such an image with a NaN or infinite
  pixel, or a constant one (max == min, nothing to scale), is refused with the reason: it
  gets an error row, never a label.
- colour and palette (``RGB``, ``RGBA``, ``P``, ``CMYK``, ``YCbCr``, ...): through RGB to
  ITU-R 601 luma; alpha is dropped (``LA``: its grey channel).
- anything else: refused (unsupported pixel mode).

DICOM files (``.dcm``/``.dicom`` any case, or any other file with ``DICM`` at byte 128) go
through :mod:`pneumo_edge.inputs.dicom` (Modality LUT, VOI LUT, MONOCHROME1 inversion, no draft) to
8-bit grey, then through the same resize as every other image.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pneumo_edge.inputs.dicom import DICOM_EXTENSIONS, DicomError, is_dicomdir, quiet, sniff

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})

#: Refuse images above this many pixels (a 4000x5000 mammogram is 20 MP; bombs are far larger).
MAX_PIXELS = 80_000_000
#: Refuse files above this many bytes before opening them.
MAX_FILE_BYTES = 512 * 1024 * 1024


def quiet_decoders() -> None:
    """Process-wide, once per run, in the main thread before decode threads start (the warnings
    filter list is global, and ``warnings.catch_warnings`` inside decode threads would race):
    pydicom's warnings off (:func:`pneumo_edge.inputs.dicom.quiet`), and Pillow's
    DecompressionBombWarning too (the ``max_pixels`` check below refuses those images itself,
    with its reason)."""
    quiet()
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


quiet_decoders()


class ImageError(Exception):
    """A file that cannot be turned into pixels. ``str()`` is one line: ``PATH: reason``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_path(path: str | os.PathLike) -> bool:
    """A file with an image extension (Pillow) or a DICOM extension; extensionless DICOM is
    found by :func:`input_kind`."""
    suffix = Path(path).suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix in DICOM_EXTENSIONS


def input_kind(path: str | os.PathLike) -> str | None:
    """``"image"`` (Pillow), ``"dicom"`` or None (not an input). Only a file with neither an
    image nor a DICOM extension is opened: its first 132 bytes are read for ``DICM``."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in DICOM_EXTENSIONS:
        return "dicom"
    if is_dicomdir(path):
        return None
    return "dicom" if sniff(path) else None


def load_image(path: str | os.PathLike, size: int, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` and return model input pixels, ``uint8 [1, size, size]``.

    Raises :class:`ImageError` (naming the file and the reason) for anything that cannot be
    decoded completely: a truncated file is never returned with grey filler.
    """
    grey = decode_grey(path, draft_size=size, max_pixels=max_pixels)
    return to_pixels(grey, size)


def to_pixels(grey: Image.Image, size: int) -> np.ndarray:
    """Resize an 8-bit grey image to ``size x size`` and return it as ``uint8 [1, size, size]``."""
    if grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(grey, dtype=np.uint8)[None])


def decode_grey(
    path: str | os.PathLike, *, draft_size: int | None = None, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Decode a file completely into an upright 8-bit grey (mode ``L``) Pillow image."""
    _check_file(path)
    if input_kind(path) == "dicom":
        return _decode_dicom(path, max_pixels)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(path, f"too large: {w}x{h} pixels (limit {max_pixels:,})")
            if draft_size and im.format == "JPEG":
                im.draft("L", (draft_size, draft_size))
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_grey(im, path)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"too large (decompression bomb check): {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not a recognised image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(path, f"corrupt or truncated image: {_short(exc)}") from None


def _decode_dicom(path, max_pixels: int) -> Image.Image:
    from pneumo_edge.inputs.dicom import read_grey

    try:
        return Image.fromarray(read_grey(path, max_pixels=max_pixels))
    except DicomError as exc:
        raise ImageError(path, str(exc)) from None


def _check_file(path: str | os.PathLike) -> None:
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        reason = "broken symbolic link" if p.is_symlink() else "no such file"
        raise ImageError(path, reason) from None
    except OSError as exc:
        raise ImageError(path, f"cannot read: {exc.strerror or exc}") from None
    if p.is_dir():
        raise ImageError(path, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the first read: never opened
        raise ImageError(path, "not a regular file (FIFO, device or socket): not read")
    if st.st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageError(path, f"too large: {st.st_size:,} bytes")
    if not os.access(p, os.R_OK):
        raise ImageError(path, "cannot read: permission denied")


def _to_grey(im: Image.Image, path) -> Image.Image:
    """Any Pillow mode to 8-bit grey by the rules in the module docstring."""
    mode = im.mode
    if mode == "L":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_wide_to_8bit(np.asarray(im), mode, path), mode="L")
    if mode in ("LA", "La"):
        return im.getchannel(0)
    if mode == "1":
        return im.convert("L")
    if mode in ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGB").convert("L")
    raise ImageError(path, f"unsupported pixel mode {mode!r}")


def _wide_to_8bit(arr: np.ndarray, mode: str, path) -> np.ndarray:
    """16-bit, 32-bit integer and float grey to uint8 (see the module docstring)."""
    arr = arr.astype(np.float64)
    if mode != "F" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        lo, hi = 0.0, 65535.0  # 16-bit grey (Pillow reads 16-bit PNGs as I or I;16)
    else:
        if not np.isfinite(arr).all():
            raise ImageError(path, f"mode {mode} image has NaN or infinite pixels")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not hi > lo:
            raise ImageError(path, f"mode {mode} image is constant (every pixel {lo:g}): "
                                   "no range to scale to 8 bits")
    scaled = (arr - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


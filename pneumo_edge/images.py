"""The only code that turns an image file into model pixels.

Training, evaluation, parity and scoring all call :func:`load_image`, so a model sees the same
pixels wherever it runs. The contract: decode, apply EXIF orientation, convert to 8-bit grey,
resize (squash) to ``size x size`` with Pillow's antialiased bilinear filter, and return a
C-contiguous ``uint8`` array of shape ``[1, size, size]``.

JPEGs are decoded with ``Image.draft('L', (size, size))``: libjpeg decodes only the luma plane at
the smallest DCT scale (1/2, 1/4, 1/8) that is still at least ``size`` pixels on each side. On
multi-megapixel X-rays that is several times faster, and because every caller goes through this
function the reduced-scale pixels are what the model was trained on too.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})

#: Refuse images above this many pixels (a 4000x5000 mammogram is 20 MP; bombs are far larger).
MAX_PIXELS = 80_000_000
#: Refuse files above this many bytes before opening them.
MAX_FILE_BYTES = 512 * 1024 * 1024


class ImageError(Exception):
    """A file that cannot be turned into pixels. ``str()`` is one line: ``PATH: reason``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
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
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(path, f"too large (decompression bomb check): {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not a recognised image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(path, f"corrupt or truncated image: {_short(exc)}") from None


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
    if st.st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageError(path, f"too large: {st.st_size:,} bytes")
    if not os.access(p, os.R_OK):
        raise ImageError(path, "cannot read: permission denied")


def _to_grey(im: Image.Image, path) -> Image.Image:
    """Any Pillow mode to 8-bit grey. 16-bit and 32-bit grey are scaled over their full range
    (never clipped at 255); colour goes through RGB to ITU-R 601 luma; alpha is dropped."""
    mode = im.mode
    if mode == "L":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        if mode == "F":
            scaled = np.clip(arr, 0.0, 1.0) * 255.0 if arr.max(initial=0) <= 1.0 else arr
        else:
            full = 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) <= 65535) else 2**32 - 1
            scaled = arr.astype(np.float64) * (255.0 / full)
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    if mode in ("LA", "La"):
        return im.getchannel(0)
    if mode == "1":
        return im.convert("L")
    if mode in ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGB").convert("L")
    raise ImageError(path, f"unsupported pixel mode {mode!r}")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


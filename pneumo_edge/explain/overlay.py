"""Heatmap pictures with Pillow only (the edge install has no matplotlib): the X-ray as the model
saw it, the heatmap blended over it in a colour map, a legend with the scale and its meaning, and
a caption with the file, the label, the probability and the threshold.

A heatmap is a float array ``[S, S]`` scaled to ``[0, 1]`` (:func:`render` draws 0 transparent
and 1 at full colour); what 0 and 1 mean in the method's own units is the legend's ``low`` and
``high`` text.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: colour map control points (position, RGB): dark blue -> cyan -> green -> yellow -> red, the
#: order of a "jet"-like scale most radiology viewers use; interpolated linearly in between
_STOPS = ((0.0, (48, 18, 160)), (0.25, (30, 150, 235)), (0.5, (60, 200, 90)),
          (0.75, (250, 215, 40)), (1.0, (215, 30, 30)))
ALPHA = 0.55  # opacity of the colour at the top of the scale; it fades to 0 at the bottom
PANEL = 320  # pixels of the image panel's side (the model's S x S pixels are scaled to it)


def colormap(values: np.ndarray) -> np.ndarray:
    """uint8 RGB ``[..., 3]`` for values in ``[0, 1]`` (clipped)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    xs = [s[0] for s in _STOPS]
    rgb = [np.interp(v, xs, [s[1][c] for s in _STOPS]) for c in range(3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def blend(grey: np.ndarray, heat: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """uint8 RGB ``[S, S, 3]``: ``grey`` (uint8 ``[S, S]``) with ``heat`` (``[S, S]`` in
    ``[0, 1]``) in colour over it, more opaque where the heat is higher."""
    if grey.shape != heat.shape:
        raise ValueError(f"image {grey.shape} and heatmap {heat.shape} differ in size")
    if not np.isfinite(heat).all():
        raise ValueError("heatmap has non-finite values")
    h = np.clip(heat, 0.0, 1.0)[..., None]
    base = np.repeat(grey[..., None].astype(np.float64), 3, axis=-1)
    out = base * (1 - alpha * h) + colormap(h[..., 0]).astype(np.float64) * alpha * h
    return out.round().clip(0, 255).astype(np.uint8)


@dataclass
class Legend:
    title: str  # what the colour shows, e.g. "Grad-CAM, relative to this image's maximum"
    low: str  # what the bottom of the scale means, e.g. "0"
    high: str  # and the top, e.g. "1 (max)" or "0.42 drop in P(PNEUMONIA)"


def font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render(grey: np.ndarray, heat: np.ndarray, legend: Legend, caption: list[str]) -> Image.Image:
    """The picture: blended image, a colour bar with ``legend`` to its right, ``caption`` lines
    below. ``grey``: uint8 ``[S, S]``; ``heat``: ``[S, S]`` in ``[0, 1]``."""
    f, small = font(14), font(12)
    panel = Image.fromarray(blend(grey, heat)).resize((PANEL, PANEL), Image.Resampling.BILINEAR)
    bar_w, gap, legend_w = 18, 10, 150
    line_h = 18
    title = _wrap(legend.title, 64)
    width = PANEL + gap + bar_w + legend_w
    height = PANEL + 12 + line_h * (len(title) + len(caption))
    im = Image.new("RGB", (width, height), "white")
    im.paste(panel, (0, 0))
    ramp = colormap(np.linspace(1, 0, PANEL))[:, None, :].repeat(bar_w, axis=1)
    im.paste(Image.fromarray(ramp), (PANEL + gap, 0))
    d = ImageDraw.Draw(im)
    x = PANEL + gap + bar_w + 6
    d.text((x, 0), legend.high, fill="black", font=small)
    d.text((x, PANEL - 14), legend.low, fill="black", font=small)
    y = PANEL + 8
    for k, line in enumerate(title + list(caption)):
        d.text((4, y), line, fill="black", font=small if k < len(title) else f)
        y += line_h
    return im


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + ([cur] if cur else [])


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()

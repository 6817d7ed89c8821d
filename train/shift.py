"""Shifted validation: the validation images as another hospital's machine might have produced
them, so a recipe can be judged on robustness, not only on its own split.

Each perturbation imitates one acquisition difference: exposure (gamma), contrast, blur, sensor
noise, framing (zoom in / out), patient rotation, JPEG re-compression and a lower source
resolution. They act on the decoded uint8 pixels ``[N, 1, S, S]`` (the one preprocessing's
output), are deterministic (fixed parameters; noise from a seeded generator) and keep the format.

``shifted_set`` gives every validation image exactly one perturbation, assigned round-robin over
a seeded permutation, so the shifted set costs one more pass over validation and every
perturbation is represented about equally in both classes.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter


def _gamma(img: np.ndarray, g: float) -> np.ndarray:
    return np.round(255.0 * (img / 255.0) ** g).astype(np.uint8)


def _contrast(img: np.ndarray, k: float) -> np.ndarray:
    mean = img.mean()
    return np.clip(np.round(mean + k * (img.astype(np.float64) - mean)), 0, 255).astype(np.uint8)


def _pil(fn):
    def apply(img: np.ndarray, *args) -> np.ndarray:
        return np.asarray(fn(Image.fromarray(img, mode="L"), *args), dtype=np.uint8)
    return apply


@_pil
def _blur(im: Image.Image, sigma_224: float) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(sigma_224 * im.width / 224))


@_pil
def _zoom(im: Image.Image, k: float) -> Image.Image:
    s = im.width
    if k > 1:  # zoom in: centre crop, resized back
        c = round(s / k)
        o = (s - c) // 2
        return im.crop((o, o, o + c, o + c)).resize((s, s), Image.BILINEAR)
    small = im.resize((round(s * k),) * 2, Image.BILINEAR)  # zoom out: black border
    out = Image.new("L", (s, s), 0)
    out.paste(small, ((s - small.width) // 2, (s - small.height) // 2))
    return out


@_pil
def _rotate(im: Image.Image, degrees: float) -> Image.Image:
    return im.rotate(degrees, resample=Image.BILINEAR, fillcolor=0)


@_pil
def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("L")


@_pil
def _lowres(im: Image.Image, k: float) -> Image.Image:
    s = im.width
    return im.resize((max(8, round(s * k)),) * 2, Image.BILINEAR).resize((s, s), Image.BICUBIC)


def _noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noisy = img.astype(np.float64) + rng.normal(0.0, sigma, img.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


#: name -> function(image [S, S] uint8, rng) -> image [S, S] uint8
PERTURBATIONS = {
    "gamma_0.6": lambda x, r: _gamma(x, 0.6),
    "gamma_1.6": lambda x, r: _gamma(x, 1.6),
    "contrast_0.6": lambda x, r: _contrast(x, 0.6),
    "contrast_1.4": lambda x, r: _contrast(x, 1.4),
    "blur_1.5px": lambda x, r: _blur(x, 1.5),
    "noise_10": lambda x, r: _noise(x, 10.0, r),
    "zoom_in_1.15": lambda x, r: _zoom(x, 1.15),
    "zoom_out_0.85": lambda x, r: _zoom(x, 0.85),
    "rotate_+8": lambda x, r: _rotate(x, 8.0),
    "rotate_-8": lambda x, r: _rotate(x, -8.0),
    "jpeg_q20": lambda x, r: _jpeg(x, 20),
    "lowres_0.33": lambda x, r: _lowres(x, 1 / 3),
}


def perturb(pixels: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """All of ``pixels`` ``[N, 1, S, S]`` under one perturbation."""
    fn, rng = PERTURBATIONS[name], np.random.default_rng(seed)
    return np.stack([fn(p[0], rng)[None] for p in pixels])


def shifted_set(pixels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(perturbed pixels [N, 1, S, S], index of the perturbation applied to each image)."""
    names = list(PERTURBATIONS)
    rng = np.random.default_rng(seed)
    which = np.empty(len(pixels), dtype=np.int64)
    which[rng.permutation(len(pixels))] = np.arange(len(pixels)) % len(names)
    out = np.empty_like(pixels)
    for k, name in enumerate(names):
        idx = np.flatnonzero(which == k)
        if len(idx):
            out[idx] = perturb(pixels[idx], name, seed + k)
    return out, which

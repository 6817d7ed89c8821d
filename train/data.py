"""Dataset, grouped stratified split and augmentation.

Images are decoded once with :func:`pneumo_edge.images.load_image` (the one preprocessing) and
kept in memory as uint8 ``[1, S, S]`` (S*S bytes each: 50 kB at 224 px). Augmentation works on
those decoded grey pixels and yields the same uint8 format, so the model sees in training
exactly the kind of input it gets at the edge.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from pneumo_edge.folders import patient_id
from pneumo_edge.evaluate import decode_labelled


@dataclass
class Split:
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    info: dict = field(default_factory=dict)


def grouped_stratified_split(samples, val_fraction: float, seed: int) -> Split:
    """Split ``(path, label)`` samples so that each class keeps about ``val_fraction`` in val and
    no patient (parsed from file names) appears on both sides. Deterministic under ``seed``."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (path, _) in enumerate(samples):
        groups[patient_id(path)].append(i)
    by_class: dict[int, list[str]] = defaultdict(list)
    for key in sorted(groups):
        labels = [samples[i][1] for i in groups[key]]
        by_class[max(set(labels), key=labels.count)].append(key)
    rng = np.random.default_rng(seed)
    val_idx: list[int] = []
    for label in sorted(by_class):
        keys = by_class[label]
        rng.shuffle(keys)
        target = round(val_fraction * sum(len(groups[k]) for k in keys))
        taken = 0
        for k in keys:
            if taken >= target:
                break
            val_idx += groups[k]
            taken += len(groups[k])
    val_set = set(val_idx)
    train = [s for i, s in enumerate(samples) if i not in val_set]
    val = [s for i, s in enumerate(samples) if i in val_set]
    info = {"method": "grouped_stratified", "val_fraction": val_fraction, "seed": seed,
            "patients": len(groups), "train": len(train), "val": len(val)}
    return Split(train, val, info)


def preload(samples, size: int, workers: int = 4, warn=None):
    """Decode all samples with the one preprocessing. Returns (uint8 array [N,1,S,S], labels
    int64 [N], skipped paths); files that cannot be decoded are skipped with a warning naming each."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    pixels, labels, failed = decode_labelled(samples, size, workers=max(1, workers))
    for exc in failed:
        warn(f"skipping {exc}")
    return pixels, labels, [exc.path for exc in failed]


class Augment:
    """The seed's augmentation on decoded grey uint8 pixels: small rotation and shift,
    horizontal flip, brightness/contrast jitter. (The seed's random grayscale is a no-op on
    grey X-rays and is left out.) Output: uint8 [1, S, S]."""

    def __init__(self, degrees=10.0, translate=0.1, flip=0.5, contrast=0.2, brightness=0.2):
        from torchvision.transforms import v2

        self.t = v2.Compose([
            v2.RandomAffine(degrees=degrees, translate=(translate, translate)),
            v2.RandomHorizontalFlip(flip),
            v2.ColorJitter(brightness=brightness, contrast=contrast),
        ])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.t(x)


class PixelDataset(torch.utils.data.Dataset):
    def __init__(self, pixels: np.ndarray, labels: np.ndarray, augment: Augment | None = None):
        self.pixels = torch.from_numpy(pixels)
        self.labels = torch.from_numpy(labels)
        self.augment = augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.pixels[i]
        if self.augment is not None:
            x = self.augment(x)
        return x, self.labels[i]


def class_weights(labels: np.ndarray, num_classes: int, spec: str = "auto") -> list[float] | None:
    """``auto``: inverse frequency, scaled so a balanced set gives 1.0 each; ``none``;
    or explicit ``w1,w2,...``."""
    if spec == "none":
        return None
    if spec == "auto":
        counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
        counts[counts == 0] = 1.0
        return (len(labels) / (num_classes * counts)).tolist()
    try:
        w = [float(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"--class-weights {spec!r}: use auto, none or numbers like 1.0,0.35") from None
    if len(w) != num_classes or any(x <= 0 for x in w):
        raise ValueError(f"--class-weights {spec!r}: need {num_classes} positive numbers")
    return w

"""The training data: loading (:func:`load_data`: the split, the decoding, the pixel cache),
the grouped stratified split, the dataset and augmentation.

Images are decoded once with :func:`pneumo_edge.inputs.images.load_image` (the one preprocessing) and
kept in memory as uint8 ``[1, S, S]`` (S*S bytes each: 50 kB at 224 px). Augmentation works on
those decoded grey pixels and yields the same uint8 format, so the model sees in training
exactly the kind of input it gets at the edge.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pneumo_edge.train import distributed as dist_
from pneumo_edge.train.shift import shifted_set

from pneumo_edge.errors import DataError, UsageError
from pneumo_edge.inputs.folders import patient_id, scan_labelled
from pneumo_edge.inputs.pipeline import decode_labelled


@dataclass
class Split:
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    info: dict = field(default_factory=dict)
    test: list[tuple[str, int]] = field(default_factory=list)


def grouped_stratified_split(samples, val_fraction: float, seed: int,
                             test_fraction: float = 0.0) -> Split:
    """Split ``(path, label)`` samples into train / val (/ test) so that each class keeps about
    ``val_fraction`` (and ``test_fraction``) of its images in val (and test) and no patient
    (parsed from file names) appears in two parts. Deterministic under ``seed``. Patients are
    assigned whole, by their majority label, in a seeded random order: test first, then val."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"val fraction {val_fraction} + test fraction {test_fraction} "
                         "must leave images for training")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (path, _) in enumerate(samples):
        groups[patient_id(path)].append(i)
    by_class: dict[int, list[str]] = defaultdict(list)
    for key in sorted(groups):
        labels = [samples[i][1] for i in groups[key]]
        by_class[max(set(labels), key=labels.count)].append(key)
    rng = np.random.default_rng(seed)
    part = {}  # sample index -> "val" | "test"
    for label in sorted(by_class):
        keys = list(by_class[label])
        rng.shuffle(keys)
        total = sum(len(groups[k]) for k in keys)
        quota = {"test": round(test_fraction * total), "val": round(val_fraction * total)}
        taken = {"test": 0, "val": 0}
        for k in keys:
            name = next((n for n in ("test", "val") if taken[n] < quota[n]), None)
            if name is None:
                break
            for i in groups[k]:
                part[i] = name
            taken[name] += len(groups[k])
    train = [s for i, s in enumerate(samples) if i not in part]
    val = [s for i, s in enumerate(samples) if part.get(i) == "val"]
    test = [s for i, s in enumerate(samples) if part.get(i) == "test"]
    info = {"method": "grouped_stratified", "val_fraction": val_fraction,
            "test_fraction": test_fraction, "seed": seed, "patients": len(groups),
            "train": len(train), "val": len(val), "test": len(test)}
    return Split(train, val, info, test)


def preload(samples, size: int, workers: int = 4, warn=None):
    """Decode all samples with the one preprocessing. Returns (uint8 array [N,1,S,S], labels
    int64 [N], skipped paths); files that cannot be decoded are skipped with a warning naming each."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    pixels, labels, failed = decode_labelled(samples, size, workers=max(1, workers))
    for exc in failed:
        warn(f"skipping {exc}")
    return pixels, labels, [exc.path for exc in failed]


AUGMENTS = ("none", "basic", "strong")


class Augment:
    """Augmentation on decoded grey uint8 pixels ``[1, S, S]`` -> the same format, so the model
    sees in training the kind of input it gets at the edge.

    ``basic``: the seed's recipe: small rotation and shift, horizontal flip, brightness and
    contrast jitter (its random grayscale is a no-op on grey X-rays and is left out).
    ``strong``: acquisition-like variation on top: random resized crops (framing and source
    scale), gamma (exposure curves), blur and sensor noise, each drawn from torch's RNG (so
    DataLoader workers are seeded as usual)."""

    def __init__(self, size: int, preset: str = "basic"):
        from torchvision.transforms import v2

        if preset not in AUGMENTS[1:]:
            raise ValueError(f"unknown augmentation {preset!r}; choose one of {AUGMENTS}")
        self.strong = preset == "strong"
        steps = [v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.15),
                                      antialias=True)] if self.strong else []
        steps += [v2.RandomAffine(degrees=10.0, translate=(0.05, 0.05) if self.strong
                                  else (0.1, 0.1)),
                  v2.RandomHorizontalFlip(0.5),
                  v2.ColorJitter(brightness=0.2, contrast=0.2)]
        self.t = v2.Compose(steps)
        self.blur = v2.GaussianBlur(5, sigma=(0.1, 1.2)) if self.strong else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self.t(x)
        if not self.strong:
            return x
        if torch.rand(()) < 0.3:
            x = self.blur(x)
        y = x.float() / 255.0
        gamma = float(torch.empty(()).uniform_(-0.4, 0.4).exp())  # 0.67 .. 1.49
        y = y.clamp_min(0).pow(gamma) * 255.0
        if torch.rand(()) < 0.3:
            y = y + torch.randn_like(y) * float(torch.empty(()).uniform_(2.0, 8.0))
        return y.round_().clamp_(0, 255).to(torch.uint8)


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


def load_data(cfg, d=dist_.SINGLE, log=None) -> dict:
    """The labelled images of ``cfg.data`` split into train, val (and test), decoded with the
    one preprocessing (through the pixel cache unless ``cfg.no_cache``), with the shifted
    validation set and what the card records about the data. ``log``: progress lines."""
    log = log or _stderr
    root = Path(cfg.data)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    if not (root / "train").is_dir():
        raise DataError(f"{root}: no train/ folder (expected {root}/train/CLASS/images)")
    tr = scan_labelled(root / "train")
    classes = tr.classes
    pos = _positive_index(cfg, classes)
    if cfg.class_weights not in ("auto", "none"):
        try:
            class_weights(None, len(classes), cfg.class_weights)
        except ValueError as exc:
            raise UsageError(f"{exc} (the data has classes {', '.join(classes)})") from None
    train_s, val, test, split = _split(cfg, root, tr, classes)
    workers = max(2, cfg.workers)
    named = [(n, s) for n, s in (("train", train_s), ("val", val), ("test", test)) if s]
    if cfg.no_cache:
        log(f"decoding {len(train_s) + len(val) + len(test)} images at {cfg.image_size} px "
            "into memory (--no-cache) ...")
        parts = {name: preload(samples, cfg.image_size, workers=workers)
                 for name, samples in named}
    else:
        parts = _from_cache(cfg, named, workers, d, log)
    for name in ("train", "val"):
        counts = np.bincount(parts[name][1], minlength=len(classes))
        if counts.min() == 0:
            raise DataError(f"{root}: the {name} set has no readable images of class "
                            f"{classes[int(counts.argmin())]}")
    skipped = [p for part in parts.values() for p in part[2]]
    split["val_files"] = sorted(os.path.relpath(p, root) for p, _ in val)
    split["test_files"] = sorted(os.path.relpath(p, root) for p, _ in test)
    counts = {name: dict(zip(classes, np.bincount(part[1], minlength=len(classes)).tolist()))
              for name, part in parts.items()}
    if cfg.no_cache:
        shifted, which = shifted_set(parts["val"][0], cfg.seed)
    else:
        shifted, which = _shifted_from_cache(cfg, val, parts["val"][0], d)
    return {"classes": classes, "pos": pos, "split": split,
            "train": parts["train"][:2], "val": parts["val"][:2],
            "shifted": (shifted, parts["val"][1]), "shifted_which": which,
            "test": parts["test"][:2] if "test" in parts else None,
            "data_info": {**{f"{k}_counts": v for k, v in counts.items()},
                          "skipped_unreadable": len(skipped), "skipped_files": skipped[:100]}}


def cache_dir(cfg) -> Path:
    from pneumo_edge.train.cache import default_dir

    return Path(cfg.cache) if cfg.cache else default_dir(cfg.out)


def _from_cache(cfg, named, workers, d, log) -> dict:
    """Each part from the on-disk pixel cache: rank 0 decodes what is missing (the other
    ranks wait), then every rank reads the same files."""
    from pneumo_edge.train import cache

    where = cache_dir(cfg)
    parts = {}
    if d.is_main:
        try:
            for name, samples in named:
                px, labels, skipped, built = cache.cached_part(
                    where, name, samples, cfg.image_size, workers=workers, log=log)
                log(f"pixel cache {where}: {name} {len(labels)} images "
                    + ("decoded and stored" if built else "reused"))
                parts[name] = (px, labels, skipped)
        except OSError as exc:
            raise DataError(f"{where}: cannot use the pixel cache ({exc}); choose another "
                            "folder with --cache DIR or train with --no-cache") from None
    dist_.barrier(d, "waiting for rank 0 to build the pixel cache")
    if not d.is_main:
        try:
            for name, samples in named:
                px, labels, skipped, _ = cache.cached_part(where, name, samples,
                                                           cfg.image_size, build_it=False)
                parts[name] = (px, labels, skipped)
        except OSError as exc:
            raise DataError(f"rank {d.rank}: {exc}") from None
    return parts


def _shifted_from_cache(cfg, val, val_pixels, d):
    from pneumo_edge.train import cache

    where = cache_dir(cfg)
    key = cache.cache_key(val, cfg.image_size)
    out = cache.cached_shifted(where, key, val_pixels, cfg.seed) if d.is_main else None
    dist_.barrier(d, "waiting for rank 0 to build the shifted validation set")
    if not d.is_main:
        out = cache.cached_shifted(where, key, val_pixels, cfg.seed, build_it=False)
    return out


def _positive_index(cfg, classes) -> int:
    if cfg.positive_class:
        if cfg.positive_class not in classes:
            raise UsageError(f"--positive-class {cfg.positive_class} is not one of {classes}")
        return classes.index(cfg.positive_class)
    return classes.index("PNEUMONIA") if "PNEUMONIA" in classes else len(classes) - 1


def _split(cfg, root, tr, classes):
    """(train, val, test samples, split info). DATA/val and DATA/test are used when present;
    what is missing is split off train, grouped by patient and stratified by class."""
    has_val, has_test = (root / "val").is_dir(), (root / "test").is_dir()
    val = scan_labelled(root / "val", classes).samples if has_val else []
    test = scan_labelled(root / "test", classes).samples if has_test else []
    if has_val and has_test:
        return tr.samples, val, test, {"method": "folders", "data": str(root.resolve())}
    sp = grouped_stratified_split(tr.samples, 0.0 if has_val else cfg.val_fraction, cfg.seed,
                                  0.0 if has_test else cfg.test_fraction)
    info = {**sp.info, "data": str(root.resolve()),
            "val_source": "folder" if has_val else "split",
            "test_source": "folder" if has_test else ("split" if sp.test else "none")}
    return sp.train, val if has_val else sp.val, test if has_test else sp.test, info


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)

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


class Augment:
    """Augmentation on decoded grey uint8 pixels ``[1, S, S]`` -> ``[1, size, size]`` uint8, so
    the model sees in training the kind of input it gets at the edge.

    ``basic``: the seed's recipe: small rotation and shift, horizontal flip, brightness and
    contrast jitter (its random grayscale is a no-op on grey X-rays and is left out).
    ``strong``: acquisition-like variation on top: random resized crops (framing and source
    scale; ``crop_scale`` is their area range, and the source may be larger than ``size``),
    gamma (exposure curves), blur and sensor noise. ``zoom_out``: the probability of shrinking
    the image by a factor from ``[zoom_out_min, 1]`` into a black canvas at a random place
    (after the geometric and jitter steps; 0 draws nothing, so the stream of random numbers
    is the one of a recipe without it). Every draw comes from torch's RNG (so DataLoader
    workers are seeded as usual)."""

    def __init__(self, size: int, preset: str = "basic", *, crop_scale=(0.7, 1.0),
                 jitter: float = 0.2, zoom_out: float = 0.0, zoom_out_min: float = 0.7):
        from torchvision.transforms import v2

        if preset not in ("basic", "strong"):  # the presets of config.AUGMENTS it implements
            raise ValueError(f"unknown augmentation {preset!r}; choose basic or strong")
        self.strong = preset == "strong"
        steps = [v2.RandomResizedCrop(size, scale=tuple(crop_scale), ratio=(0.85, 1.15),
                                      antialias=True)] if self.strong else []
        steps += [v2.RandomAffine(degrees=10.0, translate=(0.05, 0.05) if self.strong
                                  else (0.1, 0.1)),
                  v2.RandomHorizontalFlip(0.5),
                  v2.ColorJitter(brightness=jitter, contrast=jitter)]
        self.t = v2.Compose(steps)
        self.blur = v2.GaussianBlur(5, sigma=(0.1, 1.2)) if self.strong else None
        self.zoom_out, self.zoom_out_min = zoom_out, zoom_out_min

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self.t(x)
        if self.zoom_out > 0 and torch.rand(()) < self.zoom_out:
            x = self._shrink(x)
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

    def _shrink(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        s = x.shape[-1]
        n = max(8, round(s * float(torch.empty(()).uniform_(self.zoom_out_min, 1.0))))
        out = torch.zeros_like(x)
        top, left = (int(torch.randint(0, s - n + 1, ())) for _ in range(2))
        out[..., top:top + n, left:left + n] = F.resize(x, [n, n], antialias=True)
        return out


def augment_for(cfg) -> Augment | None:
    """The training augmentation the options of ``cfg`` (a TrainConfig) ask for."""
    preset = cfg.augment_preset
    if preset == "none":
        return None
    return Augment(cfg.image_size, preset, crop_scale=cfg.crop_range, jitter=cfg.jitter,
                   zoom_out=cfg.zoom_out, zoom_out_min=cfg.zoom_out_min)


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


def class_weights(labels: np.ndarray, num_classes: int, spec: str = "auto",
                  power: float = 1.0) -> list[float] | None:
    """``auto``: inverse frequency, scaled so a balanced set gives 1.0 each, raised to
    ``power`` (1: as is, 0: all 1.0); ``none``; or explicit ``w1,w2,...``."""
    if spec == "none":
        return None
    if spec == "auto":
        counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
        counts[counts == 0] = 1.0
        w = len(labels) / (num_classes * counts)
        return (w if power == 1 else w ** power).tolist()
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
    root, tr, classes, pos = _scan(cfg)
    train_s, val, test, split = _split(cfg, root, tr, classes)
    named = [(n, s, cfg.image_size) for n, s in (("train", train_s), ("val", val),
                                                 ("test", test)) if s]
    crop = cfg.crop_source_size
    if crop != cfg.image_size:  # the training images at the larger size the crops come from
        named.append(("train_crop", train_s, crop))
    parts = _decode(cfg, named, d, log)
    train_crop = parts.pop("train_crop", None)
    if cfg.proxy == "cluster":
        samples = {"train": train_s, "val": val, "test": test}
        held = _hold_out_cluster(cfg, root, classes, parts, samples, train_crop, d, log)
        train_s, val, test, train_crop = (samples["train"], samples["val"], samples["test"],
                                          held["train_crop"])
        split.update(held["split"])
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
        shifted, which = shifted_set(np.asarray(parts["val"][0]), cfg.seed)
    else:
        shifted, which = _shifted_from_cache(cfg, val, parts["val"][0], d)
    return {"classes": classes, "pos": pos, "split": split,
            "train": parts["train"][:2], "val": parts["val"][:2],
            "train_crop": train_crop[:2] if train_crop is not None else None,
            "shifted": (shifted, parts["val"][1]), "shifted_which": which,
            "test": parts["test"][:2] if "test" in parts else None,
            "cluster_holdout": parts["cluster_holdout"][:2] if "cluster_holdout" in parts
            else None,
            "data_info": {**{f"{k}_counts": v for k, v in counts.items()},
                          "skipped_unreadable": len(skipped), "skipped_files": skipped[:100]}}


def _scan(cfg):
    """(root, the scanned DATA/train, classes, positive class index), checked."""
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
    return root, tr, classes, pos


def _decode(cfg, named, d, log) -> dict:
    """{part: (pixels, labels, skipped paths)} for ``(part, samples, size)`` triples, through
    the pixel cache unless --no-cache."""
    workers = max(2, cfg.workers)
    if not cfg.no_cache:
        return _from_cache(cfg, named, workers, d, log)
    log(f"decoding {sum(len(s) for _, s, _ in named)} images into memory (--no-cache) ...")
    return {name: preload(samples, size, workers=workers) for name, samples, size in named}


def _hold_out_cluster(cfg, root, classes, parts, samples, train_crop, d, log) -> dict:
    """--proxy cluster (:mod:`pneumo_edge.train.clusters`): the held-out cluster's patients
    leave every part (``parts`` and ``samples`` are updated in place) and become the part
    ``cluster_holdout``. Returns the filtered train_crop and what the split records."""
    from pneumo_edge.train.clusters import Rows, acquisition_features, cluster_holdout, summary

    names = [n for n in ("train", "val", "test") if n in parts]
    decoded = {n: _decoded_samples(samples[n], parts[n][2]) for n in names}
    feats = np.concatenate([acquisition_features(parts[n][0]) for n in names])
    pool = [s for n in names for s in decoded[n]]
    mask, info = cluster_holdout(feats, [y for _, y in pool], [p for p, _ in pool], classes,
                                 k=cfg.proxy_clusters, seed=cfg.seed,
                                 min_images=cfg.proxy_min_images)
    held, at = [], 0
    for n in names:
        m = mask[at:at + len(decoded[n])]
        at += len(decoded[n])
        keep = np.flatnonzero(~m)
        px, labels, skipped = parts[n]
        parts[n] = (Rows(px, keep), labels[keep], skipped)
        if n == "train" and train_crop is not None:
            train_crop = (Rows(train_crop[0], keep), train_crop[1][keep], train_crop[2])
        gone = {decoded[n][i][0] for i in np.flatnonzero(m)}
        samples[n] = [s for s in samples[n] if s[0] not in gone]
        held += [decoded[n][i] for i in np.flatnonzero(m)]
    held.sort()
    parts.update(_decode(cfg, [("cluster_holdout", held, cfg.image_size)], d, log))
    log(summary(info))
    info["holdout_files"] = [os.path.relpath(p, root) for p, _ in held]
    counts = {n: len(samples[n]) for n in names}
    return {"train_crop": train_crop,
            "split": {**counts, "cluster_holdout": len(held), "proxy": info}}


def _decoded_samples(samples, skipped) -> list:
    """The samples whose pixels a part holds, in its order (the unreadable ones left out)."""
    gone = set(skipped)
    return [s for s in samples if s[0] not in gone]


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
            for name, samples, size in named:
                px, labels, skipped, built = cache.cached_part(
                    where, name, samples, size, workers=workers, log=log)
                log(f"pixel cache {where}: {name} {len(labels)} images "
                    + ("decoded and stored" if built else "reused"))
                parts[name] = (px, labels, skipped)
        except OSError as exc:
            raise DataError(f"{where}: cannot use the pixel cache ({exc}); choose another "
                            "folder with --cache DIR or train with --no-cache") from None
    dist_.barrier(d, "waiting for rank 0 to build the pixel cache")
    if not d.is_main:
        try:
            for name, samples, size in named:
                px, labels, skipped, _ = cache.cached_part(where, name, samples, size,
                                                           build_it=False)
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

"""``pneumo-edge eval``: a model's metrics on any labelled ImageFolder split, with any runtime."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pneumo_edge.errors import DataError, PneumoError
from pneumo_edge.folders import scan_labelled
from pneumo_edge.images import ImageError, load_image
from pneumo_edge.metrics import METRIC_KEYS, binary_metrics


def decode_labelled(samples, size: int, workers: int = 4):
    """(pixels [N,1,S,S] uint8, labels [N], failed [ImageError]) for (path, label) samples."""

    def one(item):
        try:
            return load_image(item[0], size)
        except ImageError as exc:
            return exc

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, samples))
    ok = [(r, s[1]) for r, s in zip(results, samples) if not isinstance(r, ImageError)]
    failed = [r for r in results if isinstance(r, ImageError)]
    px = np.stack([o[0] for o in ok]) if ok else np.zeros((0, 1, size, size), np.uint8)
    return px, np.array([o[1] for o in ok], dtype=np.int64), failed


def predict(runtime, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
    out = [runtime(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
    return np.concatenate(out) if out else np.zeros((0, len(runtime.card.classes)), np.float32)


def evaluate_folder(runtime, folder, batch: int = 32, warn=None) -> dict:
    """Metrics at the card's threshold, refusing what would make them lie: a folder where no
    image decodes (DataError, exit 2) and non-finite probabilities (PneumoError, exit 1)."""
    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    card = runtime.card
    lf = scan_labelled(folder, card.classes)
    px, labels, failed = decode_labelled(lf.samples, card.image_size)
    if len(px) == 0:
        first = f" (first: skipping {failed[0]})" if failed else ""
        raise DataError(f"{folder}: none of its {len(failed)} image files could be decoded"
                        f"{first}; no metrics")
    for f in failed:
        warn(f"skipping {f}")
    probs = predict(runtime, px, batch)
    bad = int((~np.isfinite(probs).all(axis=1)).sum())
    if bad:
        err = PneumoError(f"the model produced non-finite probabilities for {bad} of "
                          f"{len(probs)} images of {folder}; no metrics written")
        err.exit_code = 1
        raise err
    pos = card.positive_index
    m = binary_metrics(labels == pos, probs[:, pos], card.threshold)
    return {"data": str(folder), "runtime": runtime.name, "device": runtime.device,
            "skipped_unreadable": len(failed), **m}


def format_metrics(m: dict, card) -> str:
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    neg = "rest" if len(card.classes) > 2 else \
        [c for c in card.classes if c != card.positive_class][0]
    pos = card.positive_class
    w = max(len(neg), len(pos), 9)
    lines = [f"{k:<12} {m[k]:.4f}" for k in METRIC_KEYS]
    corner = "true \\ pred"
    lines += [f"{'threshold':<12} {m['threshold']:.4f}", f"{'images':<12} {m['n']}", "",
              f"{corner:<{w}}  {neg:>{w}}  {pos:>{w}}",
              f"{neg:<{w}}  {tn:>{w}}  {fp:>{w}}", f"{pos:<{w}}  {fn:>{w}}  {tp:>{w}}"]
    return "\n".join(lines)

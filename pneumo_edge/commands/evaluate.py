"""``pneumo-edge eval``: a model's metrics on any labelled ImageFolder split, with any runtime."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from pneumo_edge.commands.options import EVAL_DEFAULTS as DEFAULTS
from pneumo_edge.errors import DataError, PneumoError
from pneumo_edge.evaluation import stats
from pneumo_edge.evaluation.metrics import METRIC_KEYS, binary_metrics
from pneumo_edge.inputs.folders import scan_labelled
from pneumo_edge.inputs.pipeline import decode_labelled, predict_outputs
from pneumo_edge.model.qc import Gatekeeper, evaluation_entries
from pneumo_edge.outputs.csvout import path_text

RESAMPLES = stats.RESAMPLES
GALLERY = DEFAULTS.gallery  # most confident false negatives and false positives shown
TABLE_THRESHOLDS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass
class Evaluation:
    """What eval computed: ``metrics`` (eval's JSON) and the per-image data behind it."""

    metrics: dict
    paths: list  # decoded files, in the order of the arrays below
    truth: np.ndarray  # bool [N], True = the positive class
    p: np.ndarray  # [N] probability of the positive class (moved to --prevalence if given)
    pixels: np.ndarray  # uint8 [N, 1, S, S]
    gate: Gatekeeper | None = None  # the run's prevalence (and qc) settings, as score's


def run_evaluation(runtime, folder, batch: int = DEFAULTS.batch, warn=None, *,
                   resamples: int = DEFAULTS.resamples, gallery: int = DEFAULTS.gallery,
                   prevalence: float | None = DEFAULTS.prevalence) -> Evaluation:
    """Metrics at the card's threshold with bootstrap confidence intervals, calibration,
    curves, a threshold table and the most confident mistakes, refusing what would make them
    lie: a folder where no image decodes (DataError, exit 2) and non-finite probabilities
    (PneumoError, exit 1). ``prevalence``: as score's ``--prevalence`` (the same
    :class:`pneumo_edge.model.qc.Gatekeeper`): probabilities and threshold moved by Bayes' rule
    on the odds, so labels, ranking and ROC AUC stay and the calibration figures are those of
    the moved probabilities; a bad value or an uncalibrated model is a UsageError (exit 2)."""
    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    card = runtime.card
    gate = Gatekeeper(card, prevalence=prevalence)  # before any decoding
    ok, px, labels, failed, lf = _decoded(folder, card, warn)
    probs, ood = predict_outputs(runtime, px, batch)
    bad = int((~np.isfinite(probs).all(axis=1)).sum())
    if bad:
        err = PneumoError(f"the model produced non-finite probabilities for {bad} of "
                          f"{len(probs)} images of {path_text(str(folder))}; no metrics "
                          "written")
        err.exit_code = 1
        raise err
    pos = card.positive_index
    truth, raw = labels == pos, probs[:, pos].astype(np.float64)
    p, threshold = gate.positive(raw), gate.threshold
    m = binary_metrics(truth, p, threshold)
    m = {"data": path_text(str(folder)), "runtime": runtime.name, "device": runtime.device,
         "model_file": path_text(str(runtime.path)), "skipped_unreadable": len(failed), **m,
         "npv": stats.rates(truth, p >= threshold)["npv"],
         "counts": {c: int(sum(1 for _, y in lf.samples if y == i))
                    for i, c in enumerate(card.classes)},
         "failed": [{"path": path_text(f.path), "reason": f.reason} for f in failed],
         **uncertainty(ok, truth, p, threshold, resamples),
         **evaluation_entries(card, truth, raw, px, ood, gate),  # issue 20: ECE, qc, prevalence
         "gallery": mistakes(ok, truth, p, threshold, gallery)}
    return Evaluation(m, ok, truth, p, px, gate)


def _decoded(folder, card, warn):
    """(decoded file names, pixels, labels, failed, the scan) of a labelled folder; refuses
    a folder where no image decodes."""
    lf = scan_labelled(folder, card.classes)
    px, labels, failed = decode_labelled(lf.samples, card.image_size)
    gone = {f.path for f in failed}
    ok = [str(path) for path, _ in lf.samples if str(path) not in gone]
    if len(ok) != len(px):  # a decoder that names a file differently: never misattribute
        raise PneumoError(f"{folder}: {len(px)} images decoded but {len(ok)} file names "
                          "matched; cannot tell which probability belongs to which file")
    if len(px) == 0:
        first = f" (first: skipping {failed[0]})" if failed else ""
        raise DataError(f"{folder}: none of its {len(failed)} image files could be decoded"
                        f"{first}; no metrics")
    for f in failed:
        warn(f"skipping {f}")
    return ok, px, labels, failed, lf


def evaluate_folder(runtime, folder, batch: int = 32, warn=None) -> dict:
    """:func:`run_evaluation`'s metrics (eval's JSON)."""
    return run_evaluation(runtime, folder, batch, warn).metrics


def uncertainty(paths, truth, p, threshold: float, resamples: int = RESAMPLES) -> dict:
    """The figures of eval's JSON and report beyond the point metrics."""
    groups, unit = stats.groups_of(paths)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    return {
        "confidence_intervals": {
            "method": f"percentile bootstrap, {resamples} resamples of {unit}s with replacement"
                      + (" (patient ids parsed from the file names)" if unit == "patient" else
                         " (no patient ids in the file names: each image its own unit)"),
            "resamples": resamples, "seed": stats.SEED, "level": stats.LEVEL, "unit": unit,
            "units": n_groups, "threshold": threshold,
            "metrics": stats.bootstrap_ci(truth, p, threshold, groups, resamples=resamples)},
        "calibration": stats.calibration(truth, p),
        "curves": stats.curves(truth, p),
        "threshold_table": stats.threshold_table(truth, p, (threshold, *TABLE_THRESHOLDS)),
    }


def mistakes(paths, truth, p, threshold: float, k: int = GALLERY) -> dict:
    """The ``k`` most confident false negatives (lowest probability among positives called
    negative) and false positives (highest among negatives called positive)."""
    pred = p >= threshold
    fn = [i for i in np.argsort(p, kind="stable") if truth[i] and not pred[i]][:k]
    fp = [i for i in np.argsort(-p, kind="stable") if not truth[i] and pred[i]][:k]
    row = (lambda i: {"index": int(i), "path": path_text(str(paths[i])), "p": float(p[i])})
    return {"false_negatives": [row(i) for i in fn], "false_positives": [row(i) for i in fp]}


def format_metrics(m: dict, card) -> str:
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    neg = "rest" if len(card.classes) > 2 else \
        next(c for c in card.classes if c != card.positive_class)
    pos = card.positive_class
    w = max(len(neg), len(pos), 9)
    ci = m.get("confidence_intervals", {})
    lines = [f"{k:<12} {m[k]:.4f}" + _interval(ci, k) for k in METRIC_KEYS]
    if ci:
        lines.append(f"{'':<12} 95 % intervals: {ci['method']}")
    if "calibration" in m:
        lines.append(f"{'calibration':<12} ECE {m['calibration']['ece']:.4f}, "
                     f"Brier {m['calibration']['brier']:.4f}")
    if m.get("prevalence"):
        pr = m["prevalence"]
        lines.append(f"{'prevalence':<12} {pr['deployment']:g} (validation's {pr['trained']:.4f}):"
                     f" probabilities and the card's threshold {pr['threshold_card']:.4f} "
                     "moved by Bayes' rule on the odds")
    corner = "true \\ pred"
    lines += [f"{'threshold':<12} {m['threshold']:.4f}", f"{'images':<12} {m['n']}", "",
              f"{corner:<{w}}  {neg:>{w}}  {pos:>{w}}",
              f"{neg:<{w}}  {tn:>{w}}  {fp:>{w}}", f"{pos:<{w}}  {fn:>{w}}  {tp:>{w}}"]
    return "\n".join(lines)


def _interval(ci: dict, key: str) -> str:
    v = ci.get("metrics", {}).get(key)
    if not v or not (np.isfinite(v["low"]) and np.isfinite(v["high"])):
        return ""
    return f"  ({v['low']:.4f} - {v['high']:.4f})"

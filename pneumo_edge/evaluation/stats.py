"""How sure an evaluation is (numpy only): bootstrap confidence intervals that resample
patients, calibration (reliability bins, expected calibration error, Brier score), ROC and
precision-recall curves, and sensitivity / specificity / PPV / NPV at chosen thresholds.

Everything takes ``truth`` (bool, True = the positive class) and ``p`` (the positive class's
probability) for the same images.
"""

from __future__ import annotations

import numpy as np

from pneumo_edge.evaluation.metrics import roc_auc
from pneumo_edge.inputs.folders import patient_id

#: metrics with a confidence interval, in report order (recall = sensitivity, precision = PPV)
CI_KEYS = ("accuracy", "recall", "specificity", "precision", "npv", "f1", "roc_auc")
RESAMPLES = 2000
SEED = 20181008  # fixed: the same data always gives the same intervals
LEVEL = 0.95
MAX_CURVE_POINTS = 400


def _safe(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def rates(truth, pred) -> dict:
    """Counts and rates of a prediction; an undefined ratio (no case in its denominator) is
    NaN here, never a made-up 0."""
    t, q = np.asarray(truth, bool), np.asarray(pred, bool)
    tp, fp = int(np.sum(t & q)), int(np.sum(~t & q))
    fn, tn = int(np.sum(t & ~q)), int(np.sum(~t & ~q))
    prec, rec = _safe(tp, tp + fp), _safe(tp, tp + fn)
    f1 = _safe(2 * prec * rec, prec + rec) if np.isfinite(prec) and np.isfinite(rec) \
        else float("nan")
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "accuracy": _safe(tp + tn, len(t)),
            "recall": rec, "specificity": _safe(tn, tn + fp), "precision": prec,
            "npv": _safe(tn, tn + fn), "f1": f1}


def groups_of(paths) -> tuple[np.ndarray, str]:
    """Group index per image and the unit resampled: ``patient`` when file names carry patient
    ids (:func:`pneumo_edge.inputs.folders.patient_id`; a file without one is its own patient), else
    ``image`` (every file its own group)."""
    from pathlib import Path

    ids = [patient_id(p) for p in paths]
    _, inverse = np.unique(np.array(ids, dtype=object), return_inverse=True)
    named = any(i != Path(p).name.lower() for i, p in zip(ids, paths))
    unit = "patient" if named else "image"
    return inverse.astype(np.int64), unit


def bootstrap_ci(truth, p, threshold: float, groups=None, *, resamples: int = RESAMPLES,
                 seed: int = SEED, level: float = LEVEL) -> dict:
    """Percentile bootstrap intervals of :data:`CI_KEYS` at ``threshold``: each resample draws
    as many groups (patients) as there are, with replacement, and takes all their images.
    A resample where a metric is undefined (e.g. no positive case drawn) is left out of that
    metric's interval; ``valid`` says how many were used."""
    t, s = np.asarray(truth, bool), np.asarray(p, np.float64)
    g = np.arange(len(t)) if groups is None else np.asarray(groups)
    members = [np.flatnonzero(g == k) for k in np.unique(g)]
    rng = np.random.default_rng(seed)
    pred = s >= threshold
    draws = {k: [] for k in CI_KEYS}
    for _ in range(resamples):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[k] for k in pick])
        r = rates(t[idx], pred[idx])
        r["roc_auc"] = roc_auc(t[idx], s[idx])
        for k in CI_KEYS:
            draws[k].append(r[k])
    point = rates(t, pred) | {"roc_auc": roc_auc(t, s)}
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    out = {}
    for k in CI_KEYS:
        v = np.array(draws[k], np.float64)
        v = v[np.isfinite(v)]
        lo, hi = (np.quantile(v, [lo_q, hi_q]) if len(v) else (np.nan, np.nan))
        out[k] = {"value": point[k], "low": float(lo), "high": float(hi), "valid": len(v)}
    return out


def calibration(truth, p, bins: int = 10) -> dict:
    """Reliability diagram data over ``bins`` equal-width bins of the predicted probability,
    expected calibration error (ECE: the count-weighted mean |observed - predicted| over the
    bins) and Brier score (mean squared error of the probability against 0/1 truth)."""
    t, s = np.asarray(truth, np.float64), np.asarray(p, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = which == b
        n = int(m.sum())
        row = {"low": float(edges[b]), "high": float(edges[b + 1]), "n": n,
               "mean_predicted": float(s[m].mean()) if n else None,
               "observed": float(t[m].mean()) if n else None}
        if n:
            ece += n / len(t) * abs(row["observed"] - row["mean_predicted"])
        rows.append(row)
    return {"bins": rows, "ece": float(ece) if len(t) else float("nan"),
            "brier": float(np.mean((s - t) ** 2)) if len(t) else float("nan"),
            "binning": f"{bins} equal-width bins of the predicted probability"}


def _thin(*cols, limit: int = MAX_CURVE_POINTS):
    n = len(cols[0])
    if n <= limit:
        return [c.tolist() for c in cols]
    keep = np.unique(np.linspace(0, n - 1, limit).round().astype(int))
    return [c[keep].tolist() for c in cols]


def curves(truth, p) -> dict:
    """ROC (false positive rate, true positive rate) and precision-recall points, one per
    distinct score used as the threshold (thinned to at most MAX_CURVE_POINTS for plotting)."""
    t, s = np.asarray(truth, bool), np.asarray(p, np.float64)
    order = np.argsort(-s, kind="mergesort")
    ts, ss = t[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]  # the last index of each score
    tp = np.cumsum(ts)[last].astype(np.float64)
    fp = (last + 1 - tp).astype(np.float64)
    P, N = max(int(t.sum()), 1), max(int((~t).sum()), 1)
    tpr, fpr = np.r_[0.0, tp / P], np.r_[0.0, fp / N]
    prec = tp / (tp + fp)
    thr = ss[last]
    roc = _thin(fpr, tpr, np.r_[np.inf, thr])
    pr = _thin(tp / P, prec, thr)
    return {"roc": {"fpr": roc[0], "tpr": roc[1],
                    "threshold": [None if not np.isfinite(x) else x for x in roc[2]]},
            "pr": {"recall": pr[0], "precision": pr[1], "threshold": pr[2]},
            "positives": int(t.sum()), "negatives": int((~t).sum())}


def threshold_table(truth, p, thresholds) -> list[dict]:
    """Counts, sensitivity, specificity, PPV and NPV at each threshold (sorted, deduplicated)."""
    t, s = np.asarray(truth, bool), np.asarray(p, np.float64)
    out = []
    for th in sorted({float(x) for x in thresholds}):
        r = rates(t, s >= th)
        out.append({"threshold": th, **{k: r[k] for k in ("tp", "fp", "fn", "tn")},
                    "sensitivity": r["recall"], "specificity": r["specificity"],
                    "ppv": r["precision"], "npv": r["npv"]})
    return out

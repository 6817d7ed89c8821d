"""Binary classification metrics (numpy only), the positive class against the rest.

Key names are fixed (they appear in metrics.json, card.json and parity.json): ``accuracy``,
``precision``, ``recall`` (sensitivity), ``specificity``, ``f1``, ``roc_auc`` and
``confusion_matrix`` as ``[[tn, fp], [fn, tp]]`` (rows: truth, columns: prediction).
Undefined ratios (e.g. precision with no positive predictions) are reported as 0.0.
"""

from __future__ import annotations

import numpy as np

METRIC_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def confusion_matrix(y_true, y_pred) -> np.ndarray:
    """``[[tn, fp], [fn, tp]]`` for boolean-like truth and prediction arrays."""
    t = np.asarray(y_true).astype(bool)
    p = np.asarray(y_pred).astype(bool)
    return np.array([[np.sum(~t & ~p), np.sum(~t & p)], [np.sum(t & ~p), np.sum(t & p)]],
                    dtype=np.int64)


def _ratio(num, den) -> float:
    return float(num) / float(den) if den else 0.0


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted as one half).
    NaN when only one class is present."""
    t = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    uniq, start, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def binary_metrics(y_true, p_pos, threshold: float) -> dict:
    """All metrics for truth ``y_true`` (1 = positive) and positive-class probabilities."""
    t = np.asarray(y_true).astype(bool)
    p = np.asarray(p_pos, dtype=np.float64)
    return metrics_from_predictions(t, p >= threshold, p) | {"threshold": float(threshold)}


def metrics_from_predictions(y_true, y_pred, scores=None) -> dict:
    cm = confusion_matrix(y_true, y_pred)
    (tn, fp), (fn, tp) = cm
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    out = {
        "n": int(cm.sum()),
        "accuracy": _ratio(tp + tn, cm.sum()),
        "precision": precision,
        "recall": recall,
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * precision * recall, precision + recall),
        "roc_auc": roc_auc(y_true, scores) if scores is not None else float("nan"),
        "confusion_matrix": cm.tolist(),
    }
    return out


def choose_threshold(y_true, p_pos, rule: str = "f1") -> float:
    """Pick the decision threshold on validation data.

    ``f1``: the threshold with the best F1 (ties: the highest such threshold, fewer false
    alarms); ``youden``: the best sensitivity + specificity - 1 (Youden's J; ties: the highest
    threshold), which weighs both classes equally whatever their counts; ``recall:R``: the
    highest threshold whose recall is at least R; ``fixed:T``: T.
    Thresholds are midpoints between neighbouring distinct scores, so the choice does not sit
    exactly on a validation example's probability.
    """
    kind, _, arg = rule.partition(":")
    if kind == "fixed":
        return _unit(float(arg), rule)
    t = np.asarray(y_true).astype(bool)
    p = np.asarray(p_pos, dtype=np.float64)
    cands = _candidate_thresholds(p)
    if kind == "f1":
        f1s = [metrics_from_predictions(t, p >= c)["f1"] for c in cands]
        best = max(f1s)
        return float(max(c for c, f in zip(cands, f1s) if f == best))
    if kind == "youden":
        js = [_youden(t, p >= c) for c in cands]
        best = max(js)
        return float(max(c for c, j in zip(cands, js) if j == best))
    if kind == "recall":
        target = _unit(float(arg), rule)
        ok = [c for c in cands if _ratio(np.sum(t & (p >= c)), t.sum()) >= target]
        return float(max(ok)) if ok else float(min(cands))
    raise ValueError(f"unknown threshold rule {rule!r} (use f1, youden, recall:R or fixed:T)")


def _youden(t: np.ndarray, pred: np.ndarray) -> float:
    return _ratio(np.sum(t & pred), t.sum()) + _ratio(np.sum(~t & ~pred), (~t).sum()) - 1.0


def _candidate_thresholds(p: np.ndarray) -> list[float]:
    u = np.unique(p)
    mids = (u[:-1] + u[1:]) / 2.0 if len(u) > 1 else np.array([])
    return sorted({0.5, *[float(m) for m in mids], float(u[0]) if len(u) else 0.5})


def _unit(x: float, rule: str) -> float:
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"threshold rule {rule!r}: value must be in [0, 1]")
    return x


def validate_threshold_rule(rule: str) -> str:
    kind, _, arg = rule.partition(":")
    if kind in ("f1", "youden") and not arg:
        return rule
    if kind in ("recall", "fixed"):
        try:
            _unit(float(arg), rule)
            return rule
        except ValueError:
            pass
    raise ValueError(f"bad threshold rule {rule!r}: use f1, youden, recall:0.95 or fixed:0.5")

"""Calibrated probabilities (numpy only): fit temperature + bias on validation, apply it, map the
decision threshold onto the calibrated scale, adjust for a deployment prevalence, and the
figures that show it worked (ECE over 15 bins, Brier score, reliability bins: the one
implementation in :func:`pneumo_edge.evaluation.stats.calibration`).

The map, for the deployed log-probabilities ``l`` (log of what the uncalibrated network
outputs, test-time augmentation included) and the positive class ``k``:
``q = softmax(l / T + b e_k)``. With two classes this is ``sigmoid(logit(p) / T + b)``:
``T`` undoes over- or under-confidence, ``b`` undoes the prior shift that class-weighted training
puts into every probability. Both are fitted by minimising the negative log-likelihood on the
validation split (convex in ``1/T`` and ``b``: Newton's method), against Platt's smoothed
targets (``(n_k + 1) / (n_k + 2)`` for an image of class k with n_k such images), which keep
the fit finite when validation is small and cleanly separated, and change nothing measurable
on hundreds of images. The network applies the same map
inside the graph (:class:`pneumo_edge.model.net.XrayNet`, option ``calibration``).
"""

from __future__ import annotations

import numpy as np

from pneumo_edge.errors import ModelError
from pneumo_edge.evaluation.stats import calibration as reliability

#: bins of the expected calibration error and the reliability diagram (issue 20)
ECE_BINS = 15
METHOD = "temperature+bias"
#: bounds of 1/T and |b|: on cleanly separated validation data the likelihood keeps improving as
#: 1/T grows, so the fit stops at the bound (and says so) instead of running off to infinity
MAX_INV_T, MAX_BIAS = 20.0, 20.0
_EPS = 1e-12


def log_probs(probs) -> np.ndarray:
    """``log(p)`` in float64 with zeros kept finite (the log of float32's smallest positive)."""
    return np.log(np.clip(np.asarray(probs, np.float64), _EPS, None))


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def apply(logp, temperature: float, bias: float, positive: int) -> np.ndarray:
    """Calibrated probabilities ``[N, C]`` of uncalibrated log-probabilities ``logp`` ``[N, C]``
    (:func:`log_probs` of probabilities)."""
    s = np.array(logp, np.float64) / temperature
    s[:, positive] += bias
    return _softmax(s)


def fit(logp, labels, positive: int, *, bias: bool = True, steps: int = 100) -> dict:
    """Temperature (and bias, unless ``bias=False``) minimising the mean negative
    log-likelihood of ``labels`` (class indices) under :func:`apply` of ``logp``.
    Returns ``{"temperature", "bias", "nll_before", "nll_after"}``. ModelError when the data
    cannot support a fit (one class only, or probabilities that rank the classes backwards)."""
    lp, y = np.asarray(logp, np.float64), np.asarray(labels, np.int64)
    c = lp.shape[1]
    if len(np.unique(y)) < 2:
        raise ModelError("calibration needs both classes in the validation split")
    onehot = _targets(y, c)
    theta = np.array([1.0, 0.0])  # (1/T, b)
    for _ in range(steps):
        grad, hess = _grad_hess(lp, onehot, positive, theta, bias)
        step = np.linalg.solve(hess + 1e-9 * np.eye(2), grad)
        t = 1.0
        while _nll(lp, onehot, positive, theta - t * step) > \
                _nll(lp, onehot, positive, theta) + 1e-12 and t > 1e-6:
            t /= 2  # backtracking: never a step that makes the fit worse
        new = np.clip(theta - t * step, [-MAX_INV_T, -MAX_BIAS], [MAX_INV_T, MAX_BIAS])
        moved, theta = np.max(np.abs(new - theta)), new
        if moved < 1e-10:
            break
    if not theta[0] > 0:
        raise ModelError("calibration failed: on validation the probabilities rank the classes "
                         "backwards (fitted 1/T <= 0)")
    hard = np.eye(c)[y]  # the reported likelihoods are of the labels themselves
    return {"temperature": float(1.0 / theta[0]), "bias": float(theta[1]),
            "at_bound": bool(theta[0] >= MAX_INV_T or abs(theta[1]) >= MAX_BIAS),
            "nll_before": _nll(lp, hard, positive, np.array([1.0, 0.0])),
            "nll_after": _nll(lp, hard, positive, theta)}


def _targets(y: np.ndarray, c: int) -> np.ndarray:
    """Platt's smoothed targets: ``(n_k + 1) / (n_k + 2)`` on the true class k, the rest spread
    evenly over the others."""
    counts = np.bincount(y, minlength=c).astype(np.float64)
    hit = (counts[y] + 1.0) / (counts[y] + 2.0)
    out = np.repeat(((1.0 - hit) / (c - 1))[:, None], c, axis=1)
    out[np.arange(len(y)), y] = hit
    return out


def _scores(lp, positive, theta) -> np.ndarray:
    s = lp * theta[0]
    s[:, positive] += theta[1]
    return s


def _nll(lp, onehot, positive, theta) -> float:
    s = _scores(lp, positive, theta)
    m = s.max(axis=1, keepdims=True)
    logz = (m + np.log(np.exp(s - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(logz - (s * onehot).sum(axis=1)))


def _grad_hess(lp, onehot, positive, theta, bias: bool):
    """Gradient and Hessian of the mean NLL in (1/T, b); with ``bias=False`` b stays 0."""
    q = _softmax(_scores(lp, positive, theta))
    n = len(lp)
    ds = np.stack([lp, np.zeros_like(lp)], axis=2)  # d scores / d theta: [N, C, 2]
    if bias:
        ds[:, positive, 1] = 1.0
    r = q - onehot
    grad = np.einsum("nc,nck->k", r, ds) / n
    mean_ds = np.einsum("nc,nck->nk", q, ds)
    hess = (np.einsum("nc,nck,ncl->kl", q, ds, ds) - np.einsum("nk,nl->kl", mean_ds, mean_ds)) / n
    if not bias:
        hess[1, 1] = 1.0  # b's row: a zero gradient and a unit curvature keep it at 0
    return grad, hess


def map_threshold(threshold: float, temperature: float, bias: float) -> float:
    """The threshold on the calibrated scale that gives the same labels (two classes: the map
    is monotone in the positive probability)."""
    if threshold <= 0.0 or threshold >= 1.0:
        return float(threshold)
    d = np.log(threshold) - np.log1p(-threshold)
    return float(1.0 / (1.0 + np.exp(-(d / temperature + bias))))


def invert(p_pos, temperature: float, bias: float) -> np.ndarray:
    """The uncalibrated positive probabilities behind calibrated ones (two classes): the
    inverse of :func:`map_threshold`'s map, so eval can show both sides from one run."""
    p = np.clip(np.asarray(p_pos, np.float64), 1e-300, 1.0)
    with np.errstate(divide="ignore"):
        d = (np.log(p) - np.log1p(-p) - bias) * temperature
    return 1.0 / (1.0 + np.exp(-d))


def adjust_prevalence(p_pos, prevalence: float, trained: float) -> np.ndarray:
    """Bayes' rule on the odds: calibrated positive probabilities that reflect a population with
    positive rate ``trained`` (the validation split's), moved to one with rate ``prevalence``.
    Monotone: the ranking (and, with :func:`adjust_threshold`, every label) is unchanged."""
    p = np.clip(np.asarray(p_pos, np.float64), 0.0, 1.0)
    ratio = _odds(prevalence) / _odds(trained)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = p * ratio / (p * ratio + (1.0 - p))
    return np.where(p >= 1.0, 1.0, out)


def adjust_threshold(threshold: float, prevalence: float, trained: float) -> float:
    """The threshold moved with :func:`adjust_prevalence`, so labels stay those of the card."""
    return float(adjust_prevalence(np.array([threshold]), prevalence, trained)[0])


def _odds(rate: float) -> float:
    if not 0.0 < rate < 1.0:
        raise ModelError(f"prevalence {rate!r} is not a rate strictly between 0 and 1")
    return rate / (1.0 - rate)


def figures(truth, p_pos) -> dict:
    """ECE (15 equal-width bins), Brier score and the reliability bins of positive-class
    probabilities ``p_pos`` against ``truth`` (True = positive)."""
    return reliability(truth, p_pos, bins=ECE_BINS)


def report(sets: dict, fitted: dict, positive: int) -> dict:
    """What the card records: the parameters and, per named set of ``(logp, labels)``
    (uncalibrated log-probabilities), ECE / Brier / reliability bins before and after."""
    out = {"method": METHOD, "temperature": fitted["temperature"], "bias": fitted["bias"],
           "fitted_on": "val", "at_bound": fitted["at_bound"], "nll_before": fitted["nll_before"],
           "nll_after": fitted["nll_after"], "ece_bins": ECE_BINS}
    for name, (logp, labels) in sets.items():
        truth = np.asarray(labels) == positive
        cal = apply(logp, fitted["temperature"], fitted["bias"], positive)[:, positive]
        out[name] = {"before": figures(truth, np.exp(np.asarray(logp)[:, positive])),
                     "after": figures(truth, cal)}
    return out

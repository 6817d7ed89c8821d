"""Calibration and the input quality gate of a trained network (torch side), fitted after model
selection without touching the weights:

- calibration: temperature + bias on the validation split's deployed log-probabilities
  (:mod:`pneumo_edge.model.calibration`), the card's threshold mapped onto the calibrated scale
  (same labels);
- the gate: class Gaussians with one shared, shrunk covariance on the training split's pooled
  features (Mahalanobis) and the energy score of the logits, compared on out-of-distribution
  families made from the validation images and from files the installed packages ship
  (:func:`ood_families`); the better one (mean flag rate over the families, then mean ROC AUC)
  goes into the network, its threshold set on validation at ``rate`` false flags (default
  0.5 %: :data:`FALSE_FLAG_RATE`);
- the orientation probe (:func:`fit_probe`): a logistic regression on the pooled features of
  upright training X-rays against the same images upside down, turned a quarter or inverted
  (grey levels reversed, also mirrored), whose logit joins the Mahalanobis distance in one
  score (``mahalanobis+orientation``, :func:`combined_thresholds`): upside-down and inverted
  films are where the distance alone is weakest;
- the first stage's distance (``mahalanobis+layer1+orientation``, :func:`layered_thresholds`):
  the same distance on the first residual stage's output averaged over the image, joining
  the other two: photographs and CT/MR slices, close to X-rays in the last features, are far
  from them in the first.

:func:`calibrate_network` returns a new network (options ``calibration`` and ``ood`` set) and
the card entries; training (train/final.py) and ``pneumo-edge calibrate`` both call it.
"""

from __future__ import annotations

import numpy as np
import torch

from pneumo_edge.evaluation.metrics import roc_auc
from pneumo_edge.model import calibration as cal
from pneumo_edge.model.qc import FALSE_FLAG_RATE

COMBINED = "mahalanobis+orientation"
LAYERED = "mahalanobis+layer1+orientation"  # pneumo_edge.model.net.LAYER1_GATE
GATES = ("mahalanobis", "energy", COMBINED, LAYERED)
#: the first stage's distance's share of the false-flag budget on validation (``LAYERED``):
#: what it catches (photographs, CT and MR slices, noise, blank and black-bordered frames) lies
#: at 2-200 times the validation X-rays' highest distances (benchmarks/OOD.md), so a quarter
#: of the budget (one or two validation images) costs it nothing there
EARLY_SHARE = 0.25
#: the orientation probe's share of the false-flag budget on validation; the Mahalanobis
#: threshold takes what is left, so that both together flag at most the rate
PROBE_SHARE = 0.5
#: upright training X-rays the probe is fitted on, each also turned or inverted once
#: (:data:`TURNS`)
PROBE_IMAGES = 1000
#: what the probe tells from upright X-rays, in rotation (one per image): upside down (a
#: vertical flip) a third of the time, a quarter turn either way, inverted, mirrored and
#: inverted a sixth each. Inversions joined the turns because inverted films sit where severe
#: pneumonia does in distance (benchmarks/OOD.md): with them the probe flags inverted films
#: itself, and the distance's threshold, no longer needed for them, rises past that tail
TURNS = ("upside_down", "rotated_90", "inverted", "upside_down", "rotated_270",
         "mirrored_inverted")
#: L2 penalty of the probe (on standardised features, per image of the mean loss). 1e-2, not
#: 1e-3: on the default ResNet50 the weaker penalty's larger weights carried the INT8 file's
#: feature rounding into the score (its gate flagged 98.85 % of validation as torch did, below
#: parity's 99 %; 99.49 % with this one and the covariance floor below), for the same share of
#: upside-down films flagged (benchmarks/OOD.md)
PROBE_L2 = 1e-2
#: the least shrinkage of the shared covariance towards a multiple of the identity (Ledoit-Wolf's
#: estimate when larger). Ledoit-Wolf minimises the covariance's own error, and on the default
#: ResNet50's 2,048 features it chose 0.001: the inverse then weighs the feature directions of
#: least variance up to ~1,000 times the mean, where an INT8 runtime's rounding lands. 1 %
#: bounds that at 100x; every out-of-distribution family flags as before (benchmarks/OOD.md)
SHRINK_FLOOR = 0.01


@torch.no_grad()
def split_outputs(model, pixels: np.ndarray, device, batch: int = 64) -> dict:
    """The uncalibrated deployed log-probabilities ``logp`` [N, C], the pooled features
    ``feats`` [N, F], the raw logits ``logits`` [N, C] and the first stage's averaged output
    ``early`` [N, E] of uint8 ``pixels``, as numpy."""
    model.eval()
    out = {"logp": [], "feats": [], "logits": [], "early": []}
    for i in range(0, len(pixels), batch):
        x = torch.from_numpy(np.ascontiguousarray(pixels[i:i + batch])).to(device)
        logp, feats, z, early = model.uncalibrated(x)
        for k, v in (("logp", logp), ("feats", feats), ("logits", z), ("early", early)):
            out[k].append(v.float().cpu().numpy().astype(np.float64))
    return {k: np.concatenate(v) if v else np.zeros((0, 0)) for k, v in out.items()}


def fit_gaussians(feats: np.ndarray, labels: np.ndarray, classes: int):
    """Class means [C, F], the whitening matrix [F, F] of the shared covariance, shrunk towards
    a multiple of the identity by the Ledoit-Wolf rule (more features than a validation split
    has images) and at least :data:`SHRINK_FLOOR`, scaled by 1/sqrt(F) so a training image
    scores about 1; and the shrinkage used."""
    means = np.stack([feats[labels == c].mean(axis=0) for c in range(classes)])
    x = feats - means[labels]
    n, f = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / f
    d2 = np.sum((s - mu * np.eye(f)) ** 2)
    b2 = min((np.sum(np.sum(x * x, axis=1) ** 2) - n * np.sum(s * s)) / n ** 2, d2)
    shrink = max(b2 / d2 if d2 > 0 else 1.0, SHRINK_FLOOR)
    cov = (1 - shrink) * s + shrink * mu * np.eye(f)
    w, v = np.linalg.eigh(cov)
    whiten = (v / np.sqrt(np.clip(w, 1e-12 * max(w.max(), 1e-12), None))) @ v.T / np.sqrt(f)
    return means, whiten, float(shrink)


def mahalanobis(feats: np.ndarray, means: np.ndarray, whiten: np.ndarray) -> np.ndarray:
    """The graph's score in numpy: min over classes of |(f - mean_c) W|^2."""
    return np.min([np.sum(((feats - m) @ whiten) ** 2, axis=1) for m in means], axis=0)


def energy(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=1, keepdims=True)
    return -(m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))


def threshold_at(scores: np.ndarray, rate: float) -> float:
    """A threshold that flags (score > threshold) at most ``rate`` of ``scores``: midway
    between the highest score it passes and the next one up. Not the passed score itself:
    that image would sit exactly on the threshold, and the last bits of any other runtime's
    arithmetic (fp32 ONNX vs torch: 5e-5 relative) would flag it; export's parity runs on
    these same validation images and counted such flips."""
    s = np.sort(np.asarray(scores, np.float64))
    keep = min(max(int(np.ceil((1.0 - rate) * len(s))) - 1, 0), len(s) - 1)
    above = s[keep + 1:][np.isfinite(s[keep + 1:]) & (s[keep + 1:] > s[keep])]
    if not above.size:  # nothing finite above (the rest flagged anyway): a small margin
        return float(s[keep] + 1e-3 * max(abs(s[keep]), 1.0))
    return float((s[keep] + above[0]) / 2)


def turn(pixels: np.ndarray, kind: str) -> np.ndarray:
    """uint8 ``[N, 1, S, S]`` upside down (``upside_down``: a vertical flip), turned a quarter
    (``rotated_90`` anticlockwise, ``rotated_270``), ``inverted`` (grey levels reversed) or
    ``mirrored_inverted`` (also flipped left to right)."""
    if kind == "upside_down":
        return pixels[:, :, ::-1, :]
    if kind == "inverted":
        return 255 - pixels
    if kind == "mirrored_inverted":
        return 255 - pixels[:, :, :, ::-1]
    return np.rot90(pixels, {"rotated_90": 1, "rotated_270": 3}[kind], axes=(2, 3))


def fit_probe(model, pixels: np.ndarray, feats: np.ndarray, device, *, n: int = PROBE_IMAGES,
              l2: float = PROBE_L2, seed: int = 20) -> dict:
    """The orientation probe: a logistic regression (L2) telling the pooled features of up to
    ``n`` upright training X-rays (``pixels``, their features ``feats``) from those of the same
    images turned or inverted (:data:`TURNS` in rotation, one each; features from the
    network's own forward pass). ``weights`` [F] and ``bias`` act on raw features (logit > 0:
    turned or inverted)."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(pixels), size=min(n, len(pixels)), replace=False))
    kinds = np.array([TURNS[i % len(TURNS)] for i in range(len(idx))])
    turned = np.concatenate([turn(pixels[idx[kinds == k]], k) for k in dict.fromkeys(TURNS)])
    x = np.concatenate([feats[idx], split_outputs(model, turned, device)["feats"]])
    y = np.r_[np.zeros(len(idx)), np.ones(len(turned))]
    weights, bias = logistic(x, y, l2)
    return {"weights": weights, "bias": bias, "l2": l2,
            "train_accuracy": float(np.mean(((x @ weights + bias) > 0) == y)),
            "images": {"upright": len(idx),
                       **{k: int(np.sum(kinds == k)) for k in dict.fromkeys(TURNS)}}}


def logistic(x: np.ndarray, y: np.ndarray, l2: float):
    """(weights [F], bias) of an L2-penalised logistic regression fitted by LBFGS on
    standardised features (a floor on each feature's spread keeps near-constant ones from
    getting huge raw weights), returned for the raw features."""
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    sd = np.maximum(sd, 0.05 * sd.mean() + 1e-12)
    xs = torch.from_numpy((x - mu) / sd)
    yt = torch.from_numpy(np.asarray(y, np.float64))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, yt) \
            + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weights = w.detach().numpy() / sd
    return weights, float(b.detach()) - float(mu @ weights)


def orientation_logit(feats: np.ndarray, probe: dict) -> np.ndarray:
    return feats @ probe["weights"] + probe["bias"]


def combined_thresholds(maha: np.ndarray, tilt: np.ndarray, rate: float,
                        share: float = PROBE_SHARE):
    """(gate threshold T, probe threshold t) on validation's Mahalanobis distances ``maha`` and
    probe logits ``tilt``: t flags at most ``share`` of ``rate``, then T is the smallest
    threshold at which the distance and the probe together flag at most ``rate``."""
    t = threshold_at(tilt, rate * share)
    return threshold_at(np.where(tilt > t, np.inf, maha), rate), t


def combined(maha: np.ndarray, tilt: np.ndarray, gate_t: float, probe_t: float) -> np.ndarray:
    """The graph's ``mahalanobis+orientation`` score: max(distance, T (1 + o - t)), above T
    exactly where the distance is above T or the probe's logit above its threshold."""
    return np.maximum(maha, gate_t * (1.0 + tilt - probe_t))


def layered_thresholds(maha: np.ndarray, tilt: np.ndarray, first: np.ndarray, rate: float):
    """(gate threshold T, probe threshold t, first-stage threshold t1) on validation: t flags
    at most :data:`PROBE_SHARE` of ``rate``, t1 (on the first stage's distances ``first``) at
    most :data:`EARLY_SHARE` of it, then T is the smallest threshold at which all three
    together flag at most ``rate``."""
    t = threshold_at(tilt, rate * PROBE_SHARE)
    t1 = threshold_at(first, rate * EARLY_SHARE)
    return threshold_at(np.where((tilt > t) | (first > t1), np.inf, maha), rate), t, t1


def layered(maha, tilt, first, gate_t: float, probe_t: float, first_t: float) -> np.ndarray:
    """The graph's ``mahalanobis+layer1+orientation`` score: :func:`combined`, or the first
    stage's distance scaled by T / t1 where that is larger (above T exactly where the
    distance is above t1)."""
    return np.maximum(combined(maha, tilt, gate_t, probe_t), first * (gate_t / first_t))


def orientation_fold(probe: dict, means: np.ndarray, gate_t: float, probe_t: float):
    """(weights [F], bias) of the probe's term ``T (1 + o - t)`` as a linear function of the
    features minus the first class mean (what :meth:`XrayNet.set_gate` takes)."""
    w = probe["weights"]
    return gate_t * w, gate_t * (1.0 + probe["bias"] + float(means[0] @ w) - probe_t)


def compare_gates(val: dict, families: dict, gaussians, rate: float, probe=None,
                  early=None) -> dict:
    """Per score: its threshold on validation, the validation flag rate, and per family the flag
    rate and the ROC AUC of validation (negative) against that family (positive). With a
    fitted ``probe``, also ``mahalanobis+orientation`` (and its probe's threshold and
    validation flag rate alone); with ``early`` too (the first stage's class means and
    whitening), ``mahalanobis+layer1+orientation`` (and the first stage's threshold)."""
    means, whiten = gaussians
    sets = {"val": val, **families}
    maha = {k: mahalanobis(o["feats"], means, whiten) for k, o in sets.items()}
    scores = {"mahalanobis": maha, "energy": {k: energy(o["logits"]) for k, o in sets.items()}}
    thresholds = {g: threshold_at(s["val"], rate) for g, s in scores.items()}
    extra = {}
    if probe is not None:
        tilt = {k: orientation_logit(o["feats"], probe) for k, o in sets.items()}
        gate_t, probe_t = combined_thresholds(maha["val"], tilt["val"], rate)
        scores[COMBINED] = {k: combined(maha[k], tilt[k], gate_t, probe_t) for k in sets}
        thresholds[COMBINED] = gate_t
        extra[COMBINED] = {"orientation_threshold": probe_t,
                           "orientation_val_flagged": float(np.mean(tilt["val"] > probe_t))}
    if probe is not None and early is not None:
        first = {k: mahalanobis(o["early"], *early) for k, o in sets.items()}
        ts = layered_thresholds(maha["val"], tilt["val"], first["val"], rate)
        scores[LAYERED] = {k: layered(maha[k], tilt[k], first[k], *ts) for k in sets}
        thresholds[LAYERED] = ts[0]
        extra[LAYERED] = {"orientation_threshold": ts[1],
                          "orientation_val_flagged": float(np.mean(tilt["val"] > ts[1])),
                          "layer1_threshold": ts[2],
                          "layer1_val_flagged": float(np.mean(first["val"] > ts[2]))}
    out = {}
    for name, s in scores.items():
        v, thr = s["val"], thresholds[name]
        fam = {}
        for fname in families:
            truth = np.r_[np.zeros(len(v), bool), np.ones(len(s[fname]), bool)]
            fam[fname] = {"n": len(s[fname]), "flagged": float(np.mean(s[fname] > thr)),
                          "roc_auc": roc_auc(truth, np.r_[v, s[fname]])}
        out[name] = {"threshold": thr, "val_flagged": float(np.mean(v > thr)), "families": fam,
                     "mean_flagged": float(np.mean([f["flagged"] for f in fam.values()])),
                     "mean_roc_auc": float(np.mean([f["roc_auc"] for f in fam.values()])),
                     **extra.get(name, {})}
    return out


def choose_gate(comparison: dict) -> str:
    return max(comparison, key=lambda g: (round(comparison[g]["mean_flagged"], 3),
                                          comparison[g]["mean_roc_auc"]))


def calibrate_network(model, card, data: dict, device, *, gate: str = "auto",
                      rate: float = FALSE_FLAG_RATE, log=print):
    """(new network with calibration and gate inside, calibration entry, gate entry).
    ``data``: ``train``, ``val`` and optionally ``test`` as (uint8 pixels, labels)."""
    from pneumo_edge.model.net import build_model

    pos, ncls = card.positive_index, len(card.classes)
    if ncls != 2:
        raise ValueError(f"calibration maps the threshold for two classes; the card has {ncls}")
    outs = {k: split_outputs(model, px, device) for k, (px, _) in data.items() if px is not None}
    fitted = cal.fit(outs["val"]["logp"], data["val"][1], pos)
    sets = {k: (outs[k]["logp"], data[k][1]) for k in ("val", "test") if k in outs}
    calib = {**cal.report(sets, fitted, pos),
             "prevalence": float(np.mean(data["val"][1] == pos)),
             "threshold_before": card.threshold}
    means, whiten, shrink = fit_gaussians(outs["train"]["feats"], data["train"][1], ncls)
    probe = fit_probe(model, data["train"][0], outs["train"]["feats"], device) \
        if gate in ("auto", COMBINED, LAYERED) else None
    early = fit_gaussians(outs["train"]["early"], data["train"][1], ncls) \
        if gate in ("auto", LAYERED) else None
    fams = {k: split_outputs(model, px, device)
            for k, px in ood_families(data["val"][0], card.image_size).items()}
    comparison = compare_gates(outs["val"], fams, (means, whiten), rate, probe,
                               early and early[:2])
    chosen = choose_gate(comparison) if gate == "auto" else gate
    net = build_model(card.arch, ncls, **{**card.net, "calibration": cal.METHOD, "ood": chosen})
    net.load_state_dict(model.state_dict(), strict=False)
    net.set_calibration(fitted["temperature"], fitted["bias"], pos)
    entry = {"method": chosen, "threshold": comparison[chosen]["threshold"],
             "false_flag_rate": rate, "fitted_on": "val", "chosen_by": gate if gate != "auto"
             else "mean flag rate over the families, then mean ROC AUC",
             "shrinkage": shrink, "comparison": comparison}
    if chosen != "energy":
        entry.update(install_gate(net, comparison[chosen], (means, whiten), probe, early, rate))
    log(summary(calib, entry))
    return net.to(device).eval(), calib, entry


def install_gate(net, c: dict, gaussians, probe, early, rate: float) -> dict:
    """Set ``net``'s distance gate (its method's buffers) from the fitted parts and its
    comparison entry ``c``; returns the card entries of the probe and the first stage."""
    means, whiten = gaussians
    orient, folded, entries = None, None, {}
    if net.ood in (COMBINED, LAYERED):
        orient = orientation_fold(probe, means, c["threshold"], c["orientation_threshold"])
        entries["orientation"] = probe_entry(probe, c, rate)
    if net.ood == LAYERED:
        e_means, e_whiten, e_shrink = early
        scale = np.sqrt(c["threshold"] / c["layer1_threshold"])
        folded = (e_means.astype(np.float32), (e_whiten * scale).astype(np.float32))
        entries["layer1"] = {
            "method": "Mahalanobis distance of the first residual stage's output averaged over "
                      "the image, to the training classes (shared covariance, shrunk)",
            "threshold": c["layer1_threshold"], "val_flagged": c["layer1_val_flagged"],
            "budget": rate * EARLY_SHARE, "fitted_on": "train", "shrinkage": e_shrink,
            "term": "score = max(..., threshold_gate * distance / threshold)"}
    net.set_gate(means.astype(np.float32), whiten.astype(np.float32), orient, folded)
    return entries


def probe_entry(probe: dict, comparison: dict, rate: float) -> dict:
    """The card's record of the orientation probe (``metrics.ood.orientation``)."""
    return {"method": "logistic regression (L2) on the pooled features: upright training "
                      "X-rays against the same images upside down, turned a quarter or "
                      "inverted (also mirrored)",
            "threshold": comparison["orientation_threshold"],
            "val_flagged": comparison["orientation_val_flagged"],
            "budget": rate * PROBE_SHARE, "fitted_on": "train", "images": probe["images"],
            "l2": probe["l2"], "train_accuracy": probe["train_accuracy"],
            "term": "score = max(mahalanobis, threshold_gate * (1 + logit - threshold))"}


def calibrate_card(model, card, data: dict, device, *, gate: str = "auto",
                   rate: float = FALSE_FLAG_RATE, log=print):
    """(calibrated network, its card): :func:`calibrate_network` plus the card: ``net`` options,
    the threshold mapped onto the calibrated scale (from the uncalibrated one when ``model`` was
    calibrated before), ``metrics["calibration"]`` and ``metrics["ood"]``."""
    from dataclasses import replace

    if card.net.get("calibration", "none") != "none":  # recalibrating: start from the raw scale
        card = replace(card, threshold=card.metrics["calibration"]["threshold_before"])
    net, calib, entry = calibrate_network(model, card, data, device, gate=gate, rate=rate,
                                          log=log)
    new = replace(card, net={**card.net, "calibration": net.calibration, "ood": net.ood},
                  threshold=cal.map_threshold(card.threshold, calib["temperature"],
                                              calib["bias"]),
                  metrics={**card.metrics, "calibration": calib, "ood": entry})
    new.validate()
    return net, new


def calibrate_trained(model, card, data: dict, device, log=print):
    """:func:`calibrate_card` at the end of training: data that cannot support a fit (e.g. a
    validation split that ranks the classes backwards) leaves the model uncalibrated with a
    warning instead of losing the run."""
    from pneumo_edge.errors import ModelError

    try:
        return calibrate_card(model, card, data, device, log=log)
    except (ModelError, ValueError) as exc:
        log(f"warning: calibration and input gate skipped: {exc} (the model is saved "
            f"uncalibrated; pneumo-edge calibrate can add both later)")
        return model, card


def summary(calib: dict, gate: dict) -> str:
    lines = [f"calibration: T {calib['temperature']:.3f}, b {calib['bias']:+.3f} (fitted on val)"]
    for k in ("val", "test"):
        if k in calib:
            b, a = calib[k]["before"], calib[k]["after"]
            lines.append(f"  {k}: ECE {b['ece']:.3f} -> {a['ece']:.3f}, "
                         f"Brier {b['brier']:.3f} -> {a['brier']:.3f}")
    lines.append(f"gate: {gate['method']} > {gate['threshold']:.4g} "
                 f"({gate['false_flag_rate']:.1%} false flags on val)")
    if "orientation" in gate:
        o = gate["orientation"]
        lines.append(f"  orientation probe: logit > {o['threshold']:.3g} flags "
                     f"{o['val_flagged']:.2%} of val alone (fitted on {o['images']['upright']}"
                     f" training X-rays and as many turned; train accuracy "
                     f"{o['train_accuracy']:.3f})")
    if "layer1" in gate:
        e = gate["layer1"]
        lines.append(f"  first-stage distance: > {e['threshold']:.4g} flags "
                     f"{e['val_flagged']:.2%} of val alone")
    for g, c in gate["comparison"].items():
        fams = ", ".join(f"{k} {v['flagged']:.0%}" for k, v in c["families"].items())
        lines.append(f"  {g}: flags {fams}; mean ROC AUC {c['mean_roc_auc']:.3f}")
    return "\n".join(lines)


#: images in the families besides those made from validation X-rays: the CT/MR slices and
#: photographs the packages ship, about
GATE_SHIPPED_IMAGES = 70


def family_images(n_val: int) -> int:
    """About how many images :func:`ood_families` makes from ``n_val`` X-rays (for the time
    budget): blank and noise frames (at least 8 each) and five sets from up to 200 of them."""
    x = min(n_val, 200)
    return 2 * max(x, 8) + 5 * x + GATE_SHIPPED_IMAGES


def ood_families(xrays: np.ndarray, size: int, seed: int = 20) -> dict:
    """uint8 [M, 1, S, S] sets a chest X-ray model must not label silently: made from the
    X-rays ``xrays`` (upside down, turned a quarter either way, inverted, mirrored and inverted,
    padded into a black border), blank frames, noise, and the CT/MR slices and photographs the
    installed packages ship."""
    rng = np.random.default_rng(seed)
    x = xrays[: min(len(xrays), 200)]
    n = max(len(x), 8)
    fams = {"blank": _blank(rng, n, size), "noise": _noise(rng, n, size),
            "upside_down": turn(x, "upside_down"),
            "rotated": np.concatenate([turn(x[0::2], "rotated_90"),
                                       turn(x[1::2], "rotated_270")]),
            "inverted": turn(x, "inverted"),
            "mirrored_inverted": turn(x, "mirrored_inverted"), "padded": _padded(x)}
    for name, images in (("ct_mr", shipped_ct_mr()), ("photo", shipped_photos())):
        if images:
            fams[name] = _variants(images, size)
    return {k: np.ascontiguousarray(v, dtype=np.uint8) for k, v in fams.items() if len(v)}


def _blank(rng, n: int, size: int) -> np.ndarray:
    levels = rng.integers(0, 256, n)
    img = levels[:, None, None, None] + rng.normal(0, 1.0, (n, 1, size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def _noise(rng, n: int, size: int) -> np.ndarray:
    half = n // 2
    uni = rng.integers(0, 256, (half, 1, size, size))
    gauss = np.clip(rng.normal(128, 50, (n - half, 1, size, size)), 0, 255)
    return np.concatenate([uni, gauss]).astype(np.uint8)


def _padded(x: np.ndarray) -> np.ndarray:
    """Each X-ray shrunk to a third of the frame, centred in black."""
    import PIL.Image

    s = x.shape[-1]
    k = max(s // 3, 4)
    out = np.zeros_like(x)
    for i, img in enumerate(x):
        small = np.asarray(PIL.Image.fromarray(img[0]).resize((k, k), PIL.Image.BILINEAR))
        out[i, 0, (s - k) // 2:(s - k) // 2 + k, (s - k) // 2:(s - k) // 2 + k] = small
    return out


def _variants(images: list[np.ndarray], size: int) -> np.ndarray:
    """Each grey image (any size) at the model's size, whole and as four corner crops, each also
    rotated a quarter turn: ten views per image, through the one resize."""
    from PIL import Image

    from pneumo_edge.inputs.images import to_pixels

    out = []
    for img in images:
        h, w = img.shape
        crops = [img, img[: h * 2 // 3, : w * 2 // 3], img[h // 3:, : w * 2 // 3],
                 img[: h * 2 // 3, w // 3:], img[h // 3:, w // 3:]]
        for c in crops:
            px = to_pixels(Image.fromarray(np.ascontiguousarray(c)), size)
            out += [px, np.rot90(px, axes=(1, 2))]
    return np.stack(out)


def shipped_ct_mr() -> list[np.ndarray]:
    """Grey 8-bit slices of pydicom's bundled CT and MR files (through pneumo-edge's DICOM
    decoding), when pydicom ships them."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        return []
    out = []
    for name in ("CT_small.dcm", "MR_small.dcm", "693_J2KI.dcm", "examples_overlay.dcm"):
        try:
            out.append(_slice_grey(get_testdata_file(name)))
        except Exception:  # noqa: BLE001, S112 -- a file this pydicom lacks or cannot decode
            continue
    return out


def _slice_grey(path) -> np.ndarray:
    """8-bit grey pixels of a DICOM slice: pneumo-edge's decoding, or (when that refuses a
    modality) the stored values scaled over their range."""
    from pneumo_edge.inputs.images import ImageError, decode_grey

    try:
        return np.asarray(decode_grey(path))
    except ImageError:
        import pydicom

        a = pydicom.dcmread(path).pixel_array.astype(np.float64)
        return np.uint8(np.round(255 * (a - a.min()) / max(np.ptp(a), 1e-9)))


def shipped_photos() -> list[np.ndarray]:
    """Grey versions of the photographs matplotlib ships in its sample data, when installed."""
    try:
        from matplotlib import cbook
        from PIL import Image
    except ImportError:
        return []
    out = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        try:
            with cbook.get_sample_data(name) as f, Image.open(f) as im:
                out.append(np.asarray(im.convert("L")))
        except Exception:  # noqa: BLE001, S112 -- a sample this matplotlib lacks
            continue
    return out

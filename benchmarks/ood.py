"""The input quality gate on any calibrated model directory (issue 20): for the internal test
split and each out-of-distribution family (blank frames, noise, upside-down, inverted,
mirrored-and-inverted and black-bordered test X-rays, pydicom's bundled CT/MR slices,
matplotlib's sample photographs), the share the gate flags and the score's ROC AUC against the
test X-rays, for the score in the network and for the other one when it can be computed; and
the gate's cost per image (the ood head plus the blank check) against the network's time.

    .venv/bin/python benchmarks/ood.py --model RUN --data DATA [--out benchmarks/OOD.md]

DATA is the folder RUN was trained on (its split is rebuilt from the card, as ``pneumo-edge
calibrate`` does). Prints a Markdown report (and writes it with --out), with the machine and
its load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from common import machine


def scores(model, pixels: np.ndarray, gate: dict) -> dict:
    """{score name: [N]}: the network's own ood output, energy from the logits and, when the
    network's gate joins the Mahalanobis distance with other terms, the distance alone (from
    the network's own buffers) and, for ``mahalanobis+layer1+orientation``, the first stage's
    distance alone (``layer1``, on its own threshold's scale); one forward pass (the steps of
    ``XrayNet.outputs``: its ood output is ``_ood`` of these features and logits)."""
    import torch
    from pneumo_edge.train.calibrate import COMBINED, LAYERED, energy, mahalanobis

    parts = {"ood": [], "feats": [], "logits": [], "early": []}
    with torch.no_grad():
        for i in range(0, len(pixels), 64):
            _, _, feats, z, early = model._deployed(
                torch.from_numpy(np.ascontiguousarray(pixels[i:i + 64])))
            for k, v in (("ood", model._ood(feats, z.float(), early)), ("feats", feats),
                         ("logits", z), ("early", early)):
                parts[k].append(v.float().numpy().astype(np.float64))
    parts = {k: np.concatenate(v) for k, v in parts.items()}
    out = {gate["method"]: parts["ood"], "energy": energy(parts["logits"])}
    if gate["method"] in (COMBINED, LAYERED):
        out["mahalanobis"] = mahalanobis(parts["feats"], model.ood_means.double().numpy(),
                                         model.ood_whiten.double().numpy())
    if gate["method"] == LAYERED:
        folded = mahalanobis(parts["early"], model.ood_early_means.double().numpy(),
                             model.ood_early_whiten.double().numpy())
        out[LAYER1] = folded * gate["layer1"]["threshold"] / gate["threshold"]
    return out


#: the first stage's distance alone, in the report's rows
LAYER1 = "layer1 distance"


#: the real X-rays of the acquisition cluster a ``--proxy cluster`` run held out of training,
#: validation and test (darker, noisier films: docs/train.md): chest radiographs the gate should
#: pass, from an acquisition the model never saw
HOLDOUT = "held-out acquisition cluster X-rays"


def figures(model, card, test_px: np.ndarray, holdout_px=None) -> list[dict]:
    """One row per (set, score): n, flagged share (qc: blank check + gate), ROC AUC; with
    ``holdout_px``, the held-out acquisition cluster's X-rays too (:data:`HOLDOUT`)."""
    from pneumo_edge.train.calibrate import ood_families

    from pneumo_edge.evaluation.metrics import roc_auc
    from pneumo_edge.model import qc

    gate = qc.gate(card)
    thresholds = {k: v["threshold"] for k, v in gate["comparison"].items()}
    if "layer1" in gate:
        thresholds[LAYER1] = gate["layer1"]["threshold"]
    sets = {"internal test X-rays": test_px,
            **({HOLDOUT: holdout_px} if holdout_px is not None and len(holdout_px) else {}),
            **ood_families(test_px, card.image_size)}
    base = scores(model, test_px, gate)
    rows = []
    for name, px in sets.items():
        s = base if px is test_px else scores(model, px, gate)
        blank = np.array([qc.blank_reason(p) != "" for p in px])
        for method, v in s.items():
            if method not in thresholds:
                continue
            flagged = blank | (v > thresholds[method])
            truth = np.r_[np.zeros(len(test_px), bool), np.ones(len(px), bool)]
            auc = None if px is test_px else roc_auc(truth, np.r_[base[method], v])
            rows.append({"set": name, "score": method, "in_graph": method == gate["method"],
                         "n": len(px), "flagged": float(flagged.mean()), "roc_auc": auc})
    return rows


def gate_cost(model, card, pixels: np.ndarray, reps: int = 7) -> dict:
    """ms per image: the whole network (gate included), the gate's head alone (from the pooled
    features to the score: timed by itself, since on a busy machine the difference of two
    whole-network timings is noise) and the blank check; medians over ``reps`` runs."""
    import torch

    from pneumo_edge.model import qc

    x = torch.from_numpy(np.ascontiguousarray(pixels))
    times = {"network": [], "ood head": [], "blank check": []}
    with torch.no_grad():
        _, _, feats, z, early = model._deployed(x)
        model.outputs(x)  # warm-up
        for _ in range(reps):
            for name, fn in (("network", lambda: model.outputs(x)),
                             ("ood head", lambda: model._ood(feats, z.float(), early)),
                             ("blank check", lambda: [qc.blank_reason(p) for p in pixels])):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1000 / len(pixels))
    med = {k: float(np.median(v)) for k, v in times.items()}
    med["gate"] = med["ood head"] + med["blank check"]
    med["share"] = med["gate"] / med["network"]
    return med


def calibration_choice(model, card, parts: dict) -> list[dict]:
    """Temperature alone vs temperature + bias, both fitted on validation: ECE (15 bins) and
    Brier on validation and the internal test split (the figures behind the choice)."""
    from pneumo_edge.train.calibrate import split_outputs

    from pneumo_edge.model import calibration as cal

    pos = card.positive_index
    logp = {k: split_outputs(model, parts[k][0], "cpu")["logp"] for k in ("val", "test")
            if parts.get(k) is not None}
    fits = {"none": {"temperature": 1.0, "bias": 0.0},
            "temperature": cal.fit(logp["val"], parts["val"][1], pos, bias=False),
            "temperature+bias": cal.fit(logp["val"], parts["val"][1], pos)}
    rows = []
    for name, f in fits.items():
        for split, lp in logp.items():
            p = cal.apply(lp, f["temperature"], f["bias"], pos)[:, pos]
            fig = cal.figures(parts[split][1] == pos, p)
            rows.append({"map": name, "T": f["temperature"], "b": f["bias"], "split": split,
                         "ece": fig["ece"], "brier": fig["brier"]})
    return rows


def probe_text(gate: dict) -> str:
    """What the report says about the gate's orientation probe (empty without one)."""
    o = gate.get("orientation")
    if not o:
        return ""
    c = gate["comparison"]
    kinds = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in o["images"].items()
                      if k != "upright")
    return (f" The gate is the larger of the Mahalanobis distance and the orientation probe's "
            f"term (logit threshold {o['threshold']:.3g}, fitted on {o['images']['upright']} "
            f"training X-rays against as many of them changed: {kinds}): the probe alone "
            f"flags {o['val_flagged']:.2%} of validation, both together "
            f"{c[gate['method']]['val_flagged']:.2%}; the distance alone at its own threshold "
            f"({c['mahalanobis']['threshold']:.4g}) is the `mahalanobis` row."
            + layer1_text(gate))


def layer1_text(gate: dict) -> str:
    """What the report says about the gate's first-stage distance (empty without one)."""
    e = gate.get("layer1")
    if not e:
        return ""
    return (f" The third term is the first residual stage's distance (its own threshold "
            f"{e['threshold']:.4g}, fitted at {e['budget']:.2%} of validation: it flags "
            f"{e['val_flagged']:.2%} there alone): the `{LAYER1}` row.")


def report(rows, cost, card, run, data, started, calib=()) -> str:
    m = machine()
    g = card.metrics["ood"]
    lines = [f"# Input quality gate: {card.arch} {card.image_size} px", "",
             (f"Model {run} (trained on {data}); gate in the network: **{g['method']}**, "
             f"threshold {g['threshold']:.4g} at {g['false_flag_rate']:.1%} false flags on "
             f"validation. Flagged = blank check or score above its threshold (the qc column); "
             "ROC AUC = the score separating the set from the internal test X-rays."
             + probe_text(g)), "",
             "| set | score | n | flagged | ROC AUC |", "|---|---|---:|---:|---:|"]
    for r in rows:
        auc = "" if r["roc_auc"] is None else f"{r['roc_auc']:.3f}"
        star = " (in graph)" if r["in_graph"] else ""
        lines.append(f"| {r['set']} | {r['score']}{star} | {r['n']} | {r['flagged']:.1%} | "
                     f"{auc} |")
    if calib:
        lines += ["", "Calibration maps fitted on validation (ECE over 15 bins):", "",
                  "| map | T | b | split | ECE | Brier |", "|---|---:|---:|---|---:|---:|"]
        lines += [f"| {r['map']} | {r['T']:.3f} | {r['b']:+.3f} | {r['split']} | "
                  f"{r['ece']:.4f} | {r['brier']:.4f} |" for r in calib]
    lines += ["", (f"Gate cost (torch, CPU, batch {cost['batch']}): the network takes "
                   f"{cost['network']:.2f} ms/image; its ood head {cost['ood head']:.3f} and the "
                   f"blank check {cost['blank check']:.3f} ms/image: the gate adds "
                   f"{cost['gate']:.3f} ms/image = {cost['share']:.2%} of the network's time."),
              "", (f"Machine: {m.get('cpu', '?')}, {os.cpu_count()} cores; load average "
                  f"{os.getloadavg()[0]:.1f} at the end (started at {started:.1f}); "
                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="A calibrated model directory.")
    ap.add_argument("--data", required=True, help="The folder the model was trained on.")
    ap.add_argument("--out", help="Also write the Markdown report here.")
    ap.add_argument("--batch", type=int, default=32, help="Batch for the cost figures.")
    args = ap.parse_args(argv)
    from pneumo_edge.train.recalibrate import split_pixels
    from pneumo_edge.model import qc
    from pneumo_edge.model.torchload import load_model

    started = os.getloadavg()[0]
    model, card = load_model(args.model)
    if qc.gate(card) is None:
        sys.exit(f"error: {args.model} has no gate: run pneumo-edge calibrate first")
    parts = split_pixels(Path(args.model), args.data, card, lambda m: print(m, file=sys.stderr),
                         holdout=True)
    test = parts["test"] if parts["test"] is not None else parts["val"]
    held = parts.pop("cluster_holdout")
    rows = figures(model, card, test[0], None if held is None else held[0])
    cost = {**gate_cost(model, card, test[0][:args.batch]), "batch": args.batch}
    calib = calibration_choice(model, card, parts)
    text = report(rows, cost, card, args.model, args.data, started, calib)
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

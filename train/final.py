"""The final evaluation of a training run: the selected weights, run as they will be deployed
(``XrayNet.forward``: fp32, test-time augmentation included), on the validation split, the
shifted validation (:mod:`pneumo_edge.train.shift`) and the test split (DATA/test, or the
internal patient-grouped split that selection never saw).

The decision threshold is chosen here, once, on the deployed network's probabilities with
``--threshold-for``, on the validation images pooled with their shifted copies (``--threshold-on
val+shifted``, default: a threshold that still balances sensitivity and specificity when the
images change) or on validation alone (``val``), so the card's threshold, its metrics and
every exported form agree. Every rule is also applied to the same probabilities, on both
sources (``threshold_rules`` in metrics.json): rules are compared on validation and shifted
validation; test is reported, never used to choose.
"""

from __future__ import annotations

import datetime as dt
import time

import numpy as np

from pneumo_edge.evaluation.metrics import METRIC_KEYS, binary_metrics, choose_threshold
from pneumo_edge.model import modeldir
from pneumo_edge.model.card import Card

#: rules compared in metrics.json (the configured one is always included)
COMPARED_RULES = ("f1", "youden", "recall:0.95", "recall:0.98", "fixed:0.5")


def final_evaluation(out, state, cfg, data, device, t_start, log) -> dict:
    from pneumo_edge.train.checkpoint import save_model
    from pneumo_edge.train.shift import PERTURBATIONS

    from pneumo_edge.model.net import build_model

    t0 = time.monotonic()
    best = state["best"]
    card = Card.from_dict(best["card"])
    pos = card.positive_index
    model = build_model(cfg.arch, len(card.classes), **cfg.net).to(device)
    model.load_state_dict(best["state_dict"])
    which = data["shifted_which"]
    sets = {"val": data["val"], "shifted_val": data["shifted"]}
    for k in ("test", "cluster_holdout"):  # reported, never used to choose
        if data.get(k) is not None:
            sets[k] = data[k]
    probs = {k: predict_deployed(model, px, device)[:, pos] for k, (px, _) in sets.items()}
    truth = {k: labels == pos for k, (_, labels) in sets.items()}
    threshold = choose_threshold(*_threshold_data(truth, probs, cfg.threshold_on),
                                 cfg.threshold_for)
    metrics = {k: binary_metrics(truth[k], probs[k], threshold) for k in sets}
    per = {name: binary_metrics(truth["shifted_val"][which == i],
                                probs["shifted_val"][which == i], threshold)
           for i, name in enumerate(PERTURBATIONS)}
    card.threshold = threshold
    card.metrics = {**metrics, "best_epoch": best["epoch"], "threshold_rule": cfg.threshold_for,
                    "threshold_on": cfg.threshold_on,
                    "test_source": card.split.get("test_source", "folder")}
    card.created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    card.validate()
    if cfg.calibrate:  # issue 20: calibration and the gate go into the network and the card
        from pneumo_edge.train.calibrate import calibrate_trained

        model, card = calibrate_trained(model, card, {k: data[k] for k in ("train", "val",
                                                                            "test")
                                                      if data[k] is not None}, device, log=log)
    save_model(out, model, card)
    modeldir.write_card(out, card)
    result = {"best_epoch": best["epoch"], "select": cfg.select, "average": _average(best, cfg),
              "threshold": threshold,
              "threshold_rule": cfg.threshold_for, **metrics,
              "shifted_val_per_perturbation": per,
              "threshold_on": cfg.threshold_on, **_proxy(card),
              **{k: card.metrics[k] for k in ("calibration", "ood") if k in card.metrics},
              "threshold_rules": _compare_rules(truth, probs, cfg.threshold_for,
                                                cfg.threshold_on),
              "time": {"budget_s": cfg.time_budget, "planned_epochs": state["planned_epochs"],
                       "epochs_trained": state["epoch"],
                       "final_evaluation_s": round(time.monotonic() - t0, 1),
                       "total_s": round(time.monotonic() - t_start, 1)},
              "history": state["history"]}
    modeldir.write_json_atomic(out / modeldir.METRICS_JSON, result)
    _plots(out, state, card, best)
    log(_summary(result, card, out))
    return result


def _average(best, cfg) -> dict:
    """Which weights were evaluated: the SWA average (its epochs), the EMA, or the raw ones."""
    if best.get("average"):
        return best["average"]
    if cfg.average == "ema" and cfg.ema > 0:
        return {"method": "ema", "decay": cfg.ema}
    note = {"note": "--average swa did not run (interrupted, or no epoch since --resume): "
                    "the selected epoch's weights"} \
        if cfg.average == "swa" else {}
    return {"method": "none", **note}


def _proxy(card) -> dict:
    """How the cluster proxy was built (the card's split has it, with its files)."""
    info = card.split.get("proxy")
    return {"proxy": {k: v for k, v in info.items() if k != "holdout_files"}} if info else {}


def predict_deployed(model, pixels: np.ndarray, device, batch: int = 64) -> np.ndarray:
    """The deployed network's probabilities (``forward``: fp32, test-time augmentation
    included), as every runtime computes them."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch):
            x = torch.from_numpy(pixels[i:i + batch]).to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def _threshold_data(truth, probs, on: str):
    """(truth, probabilities) the threshold is chosen on: ``val``, or ``val+shifted`` (the
    validation images as they are and under the perturbations, pooled)."""
    if on == "val":
        return truth["val"], probs["val"]
    return (np.concatenate([truth["val"], truth["shifted_val"]]),
            np.concatenate([probs["val"], probs["shifted_val"]]))


def _compare_rules(truth, probs, configured, on) -> dict:
    out = {}
    for source in dict.fromkeys((on, "val", "val+shifted")):
        for rule in dict.fromkeys((configured, *COMPARED_RULES)):
            t = choose_threshold(*_threshold_data(truth, probs, source), rule)
            out[f"{rule} on {source}"] = {"threshold": t, **{k: {
                m: v for m, v in binary_metrics(truth[k], probs[k], t).items()
                if m in METRIC_KEYS} for k in truth}}
    return out


def _plots(out, state, card, best) -> None:
    from pneumo_edge.train.plots import plot_confusion, plot_curves

    sets = {k: card.metrics[k] for k in ("val", "shifted_val", "test") if k in card.metrics}
    plot_curves(state["history"], out / modeldir.CURVES_PNG, selected=best["epoch"],
                final=sets, threshold=card.threshold)
    plot_confusion(sets["val"]["confusion_matrix"], card, out / modeldir.CONFUSION_PNG,
                   title=f"epoch {best['epoch']} weights at the card's threshold "
                         f"{card.threshold:.3f}",
                   more={{"shifted_val": "shifted validation"}.get(k, k): m["confusion_matrix"]
                         for k, m in sets.items() if k != "val"})


def _summary(result, card, out) -> str:
    lines = [(f"best epoch {result['best_epoch']} of {result['time']['epochs_trained']} "
              f"({result['select']}); threshold {card.threshold:.3f} "
              f"({result['threshold_rule']} on {result['threshold_on']}); "
              f"{result['time']['total_s'] / 60:.1f} min in all")]
    for k in ("val", "shifted_val", "test", "cluster_holdout"):
        if k in result:
            m = result[k]
            lines.append(f"{k:>15} ({m['n']}): " + ", ".join(
                f"{key} {m[key]:.3f}" for key in METRIC_KEYS))
    lines.append(f"wrote {out}/: " + " ".join(n for n in modeldir.TRAINING_OUTPUTS
                                                if n != modeldir.LAST_PT))
    return "\n".join(lines)

"""What training writes into and reads back from its output folder: the checks before it is
touched, --force, model.pt and card.json for the best epoch so far, last.pt for --resume, and
history.csv. File names and the atomic writer belong to :mod:`pneumo_edge.model.modeldir`. In a
torchrun job only rank 0 calls the writers here (train/loop.py guards each call); every rank
may read (check_out, resume_state)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
from pneumo_edge.train.checkpoint import save_model
from pneumo_edge.train.config import UNSET_MEANT, TrainConfig

from pneumo_edge.errors import PneumoError, UsageError
from pneumo_edge.evaluation.metrics import binary_metrics, choose_threshold
from pneumo_edge.model import modeldir
from pneumo_edge.model.card import Card
from pneumo_edge.model.modeldir import CARD_JSON, HISTORY_CSV, LAST_PT, MODEL_PT
from pneumo_edge.versions import installed_versions


def check_out(out: Path, cfg: TrainConfig) -> None:
    """What --out holds allows this run (read-only: nothing is written here)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    if cfg.resume:
        if not (out / LAST_PT).is_file():
            raise UsageError(f"{out}: nothing to resume (no {LAST_PT})")
        return
    has_model = any((out / n).exists() for n in (MODEL_PT, CARD_JSON, LAST_PT))
    if has_model and not cfg.force:
        raise UsageError(f"{out}: already holds a model; use --force to replace it or "
                         f"--resume to continue it")
    parent = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{out}: cannot write there (permission denied)")


def prepare_out(out: Path, cfg: TrainConfig) -> None:
    """Create --out; with --force, remove only the files an earlier training run wrote there
    (and that model's exports, and an interrupted export's temporary files). Runs after every
    option, the device and the data are checked."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.force and not cfg.resume:
            # only what a training run writes, and the exports of the model it replaces
            for name in modeldir.TRAINING_OUTPUTS + modeldir.EXPORT_OUTPUTS:
                p = out / name
                if p.is_file() or p.is_symlink():
                    p.unlink()
            from pneumo_edge.export.main import remove_stale

            remove_stale(out)  # what an export killed mid-way left (hidden temporary files)
    except OSError as exc:
        raise PneumoError(f"{out}: cannot write there ({exc.strerror or exc})") from None


def card_base(cfg, data, amp, device, weights, dist=None) -> dict:
    classes = data["classes"]
    return dict(classes=classes, positive_class=classes[data["pos"]], image_size=cfg.image_size,
                arch=cfg.arch, net=cfg.net,
                train_config=config_dict(cfg, amp, device, weights, dist),
                split=data["split"], data=data["data_info"], versions=versions())


def save_best(out, model, card_base, epoch, score, probs, cfg) -> dict:
    """model.pt and card.json for the best epoch so far, so an interrupted run leaves a usable
    model; the final threshold and metrics are set by the final evaluation."""
    vprobs, vlabels, pos = probs
    threshold = choose_threshold(vlabels == pos, vprobs[:, pos], cfg.threshold_for)
    m = binary_metrics(vlabels == pos, vprobs[:, pos], threshold)
    card = Card(threshold=threshold, metrics={"val": m, "best_epoch": epoch,
                                              "threshold_rule": cfg.threshold_for,
                                              "provisional": True},
                created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                **card_base)
    save_model(out, model, card)
    modeldir.write_card(out, card)
    return {"epoch": epoch, "score": score, "card": card.to_dict(),
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}


def save_last(out, s, state, cfg) -> None:
    best = dict(state["best"]) if state["best"] else None
    modeldir.torch_save_atomic(out / LAST_PT, {
        "model": s["model"].state_dict(), "optimizer": s["optimizer"].state_dict(),
        "scheduler": s["scheduler"].state_dict(),
        "ema": s["ema"].model.state_dict() if s["ema"] else {},
        "ema_updates": s["ema"].updates if s["ema"] else 0,
        "epoch": state["epoch"], "planned_epochs": state["planned_epochs"] or 0,
        "history": json.dumps(state["history"]),
        "best": json.dumps({k: v for k, v in best.items() if k != "state_dict"}) if best else "",
        "best_state_dict": best["state_dict"] if best else {},
        "config": json.dumps(asdict(cfg)), "rng": torch.get_rng_state(),
    })


#: the options a resumed run may change: how long it trains, where and how fast it runs, and
#: what only the final evaluation reads. Every other option shapes the split (a changed --seed
#: or --proxy would move images from the run's training set into its test set) or the
#: training, and the card would record a recipe the network was not trained with.
RESUME_MAY_CHANGE = frozenset({"epochs", "time_budget", "workers", "device", "amp", "resume",
                               "force", "cache", "no_cache", "out", "threshold_for",
                               "threshold_on", "calibrate"})
#: what runs from before an option existed used, where it is not the option's default today
_BEFORE = {"norm": "imagenet", "tta": "none"}


def changed_options(old: dict, cfg) -> list[tuple[str, object, object]]:
    """(option, value in the interrupted run's config, value now) for each option a resume
    may not change; an option the old config lacks counts as what runs used before it existed
    (its default, or ``_BEFORE``)."""
    now = json.loads(json.dumps(asdict(cfg.resolved())))
    out = []
    for f in fields(cfg):
        if f.name in RESUME_MAY_CHANGE:
            continue
        was = old[f.name] if f.name in old else json.loads(json.dumps(
            _BEFORE.get(f.name, f.default)))
        if was is None and f.name in UNSET_MEANT:
            was = old.get(UNSET_MEANT[f.name])
        if was != now[f.name]:
            out.append((f.name, was, now[f.name]))
    return out


def resume_state(out, s, cfg) -> dict:
    """Load last.pt into the model, EMA, optimizer and schedule in ``s``; the loop's state."""
    raw = modeldir.read_regular(out / LAST_PT)  # a FIFO or device there cannot hang us
    try:
        last = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise UsageError(f"{out / LAST_PT}: not a readable training state "
                         f"({str(exc).splitlines()[0][:120]})") from None
    for k, was, now in changed_options(json.loads(last["config"]), cfg):
        raise UsageError(f"--resume: --{k.replace('_', '-')} was {was!r} in {out}, now {now!r} "
                         "(a resumed run keeps the options that shape its split and its "
                         "training; use another --out for another recipe)")
    s["model"].load_state_dict(last["model"])
    s["optimizer"].load_state_dict(last["optimizer"])
    s["scheduler"].load_state_dict(last["scheduler"])
    if s["ema"] is not None and last.get("ema"):
        s["ema"].model.load_state_dict(last["ema"])
        s["ema"].updates = int(last["ema_updates"])
    torch.set_rng_state(last["rng"])
    best = json.loads(last["best"]) if last["best"] else None
    if best:
        best["state_dict"] = last["best_state_dict"]
    return {"epoch": last["epoch"], "history": json.loads(last["history"]), "best": best,
            "planned_epochs": int(last.get("planned_epochs") or 0) or None}


def write_history(out, history) -> None:
    if not history:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0]))
    w.writeheader()
    w.writerows(history)
    modeldir.write_text_atomic(out / HISTORY_CSV, buf.getvalue())


def config_dict(cfg, amp, device, weights, dist=None) -> dict:
    """The card's training config: the options, and how the run was spread (world size,
    backend; --batch-size is per process, so the global batch is their product)."""
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("resume", "force")}
    world = dist.world_size if dist is not None else 1
    d.update(amp=amp, device=str(device), class_weight_values=weights, world_size=world,
             backend=(dist.backend if dist is not None and dist.enabled else "none"),
             global_batch_size=cfg.batch_size * world)
    return d


def versions() -> dict:
    return installed_versions(("torch", "torchvision", "numpy", "pillow"))

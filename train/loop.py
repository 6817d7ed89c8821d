"""The training loop, after torchvision's references/classification/train.py:
``train_one_epoch``, ``evaluate`` and ``train`` (the main function the CLI calls)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pneumo_edge.card import Card, json_safe, write_atomic
from pneumo_edge.errors import DataError, PneumoError
from pneumo_edge.folders import scan_labelled
from pneumo_edge.metrics import METRIC_KEYS, binary_metrics, choose_threshold
from pneumo_edge.train.checkpoint import LAST_FILE, MODEL_FILE, save_atomic, save_model
from pneumo_edge.train.data import (Augment, PixelDataset, class_weights,
                                    grouped_stratified_split, preload)
from pneumo_edge.net import build_model
from pneumo_edge.versions import installed_versions

SELECT = {"val_loss": ("loss", -1), "val_f1": ("f1", 1), "val_auroc": ("roc_auc", 1)}  # key, sign


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "resnet50"
    weights: str = "none"
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    clip_grad: float = 0.0
    scheduler: str = "cosine"
    class_weights: str = "auto"
    augment: bool = True
    val_fraction: float = 0.3
    seed: int = 42
    select: str = "val_loss"
    min_epochs: int = 3
    threshold_for: str = "f1"
    positive_class: str = ""
    amp: bool | None = None
    workers: int = 2
    device: str = "auto"
    resume: bool = False
    force: bool = False


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PneumoError("--device cuda: no CUDA GPU is visible to torch")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool):
    dtype = torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() \
        else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def train_one_epoch(model, criterion, optimizer, loader, device, *, amp=False, scaler=None,
                    clip_grad=0.0, scheduler_step=None, progress=None) -> float:
    model.train()
    total, n = 0.0, 0
    for x, y in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with autocast(device, amp):
            loss = criterion(model.logits(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip_grad > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if scheduler_step is not None:
            scheduler_step()
        total += loss.item() * len(y)
        n += len(y)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{total / n:.4f}")
    return total / max(n, 1)


@torch.inference_mode()
def evaluate(model, criterion, loader, device, *, amp=False):
    """(mean loss, probabilities [N, C] float32 numpy, labels [N])."""
    model.eval()
    losses, probs, labels = 0.0, [], []
    for x, y in loader:
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        y = y.to(device)
        with autocast(device, amp):
            logits = model.logits(x).float()
        losses += criterion(logits, y).item() * len(y)
        probs.append(torch.softmax(logits, 1).cpu().numpy())
        labels.append(y.cpu().numpy())
    n = sum(len(p) for p in probs)
    return losses / max(n, 1), np.concatenate(probs), np.concatenate(labels)


def epoch_metrics(loss, probs, labels, pos, threshold=0.5) -> dict:
    m = binary_metrics(labels == pos, probs[:, pos], threshold)
    return {"loss": loss, **{k: m[k] for k in METRIC_KEYS}}


def train(cfg: TrainConfig) -> dict:
    """Train, select on validation, write the model directory. Returns metrics.json's dict."""
    out = Path(cfg.out)
    _prepare_out(out, cfg)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    amp = (device.type == "cuda") if cfg.amp is None else cfg.amp
    data = _load_data(cfg)
    classes, pos = data["classes"], data["pos"]
    model = build_model(cfg.arch, len(classes), cfg.weights).to(device)
    model = model.to(memory_format=torch.channels_last)
    weights = class_weights(data["train"][1], len(classes), cfg.class_weights)
    criterion = nn.CrossEntropyLoss(
        weight=torch.tensor(weights, dtype=torch.float32, device=device) if weights else None)
    train_loader, val_loader, test_loader = _loaders(cfg, data, device)
    optimizer = _optimizer(cfg, model)
    scheduler, per_batch = _scheduler(cfg, optimizer, len(train_loader))
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" \
        and not torch.cuda.is_bf16_supported() else None
    state = {"epoch": 0, "history": [], "best": None}
    if cfg.resume:
        state = _resume(out, model, optimizer, scheduler, cfg)
    card_base = dict(classes=classes, positive_class=classes[pos], image_size=cfg.image_size,
                     arch=cfg.arch, train_config=_config_dict(cfg, amp, device, weights),
                     split=data["split"], data=data["data_info"], versions=versions())
    log(f"training {cfg.arch} on {device} ({'mixed precision' if amp else 'fp32'}): "
        f"{len(data['train'][1])} train / {len(data['val'][1])} val images, "
        f"epochs {state['epoch'] + 1}..{cfg.epochs}")
    eligible_from = min(cfg.min_epochs, cfg.epochs)
    _stop_on_sigterm()
    key, sign = SELECT[cfg.select]
    try:
        for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            bar = _bar(len(train_loader), f"epoch {epoch}/{cfg.epochs}")
            train_loss = train_one_epoch(
                model, criterion, optimizer, train_loader, device, amp=amp, scaler=scaler,
                clip_grad=cfg.clip_grad, scheduler_step=scheduler.step if per_batch else None,
                progress=bar)
            bar.close()
            if scheduler is not None and not per_batch:
                scheduler.step()
            vloss, vprobs, vlabels = evaluate(model, criterion, val_loader, device, amp=amp)
            row = {"epoch": epoch, "train_loss": train_loss,
                   **{f"val_{k}": v for k, v in epoch_metrics(vloss, vprobs, vlabels, pos).items()},
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            state["history"].append(row)
            score = row[f"val_{key}"]
            improved = epoch >= eligible_from and (
                state["best"] is None or sign * score > sign * state["best"]["score"])
            if improved:
                state["best"] = _save_best(out, model, card_base, epoch, score, vprobs, vlabels,
                                           pos, cfg.threshold_for)
            state["epoch"] = epoch
            _save_last(out, model, optimizer, scheduler, state, cfg)
            _write_history(out, state["history"])
            log(_epoch_line(row, improved))
    except KeyboardInterrupt:
        log(f"interrupted after epoch {state['epoch']}: "
            + (f"best checkpoint so far (epoch {state['best']['epoch']}) is in {out / MODEL_FILE}; "
               if state["best"] else "no checkpoint saved yet; ")
            + f"continue with: pneumo-edge train --data {cfg.data} --out {cfg.out} --resume")
        if state["best"]:
            _finish(out, state, cfg, criterion, test_loader, device, amp, data, pos)
        raise
    if state["best"] is None:
        raise PneumoError("no epoch was trained (use more --epochs than the resumed run had)")
    return _finish(out, state, cfg, criterion, test_loader, device, amp, data, pos)


def _stop_on_sigterm() -> None:
    """SIGTERM (kill, a scheduler's stop) ends training like Ctrl-C: the best checkpoint so far
    is kept and finished. A run started in the background with `&` ignores SIGINT, so this is
    how such a run is stopped cleanly."""
    import signal
    import threading

    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def _prepare_out(out: Path, cfg: TrainConfig) -> None:
    has_model = (out / MODEL_FILE).exists() or (out / "card.json").exists()
    if cfg.resume:
        if not (out / LAST_FILE).exists():
            raise PneumoError(f"{out}: nothing to resume (no {LAST_FILE})")
        return
    if has_model and not cfg.force:
        raise PneumoError(f"{out}: already holds a model; use --force to overwrite it or "
                          f"--resume to continue it")
    if out.exists() and not out.is_dir():
        raise PneumoError(f"{out}: exists and is not a folder")
    if cfg.force:
        for name in os.listdir(out) if out.is_dir() else []:
            p = out / name
            if p.is_file():
                p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise PneumoError(f"{out}: cannot write there ({exc.strerror or exc})") from None


def _load_data(cfg: TrainConfig) -> dict:
    root = Path(cfg.data)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    if not (root / "train").is_dir():
        raise DataError(f"{root}: no train/ folder (expected {root}/train/CLASS/images)")
    tr = scan_labelled(root / "train")
    classes = tr.classes
    if cfg.positive_class:
        if cfg.positive_class not in classes:
            raise DataError(f"--positive-class {cfg.positive_class} is not one of {classes}")
        pos = classes.index(cfg.positive_class)
    else:
        pos = classes.index("PNEUMONIA") if "PNEUMONIA" in classes else len(classes) - 1
    if (root / "val").is_dir():
        val = scan_labelled(root / "val", classes).samples
        train_s, split = tr.samples, {"method": "folder", "val_folder": str(root / "val")}
    else:
        sp = grouped_stratified_split(tr.samples, cfg.val_fraction, cfg.seed)
        train_s, val, split = sp.train, sp.val, sp.info
    split["data"] = str(root.resolve())
    log(f"decoding {len(train_s) + len(val)} images at {cfg.image_size} px ...")
    train_px = preload(train_s, cfg.image_size, workers=max(2, cfg.workers))
    val_px = preload(val, cfg.image_size, workers=max(2, cfg.workers))
    test = None
    if (root / "test").is_dir():
        test = preload(scan_labelled(root / "test", classes).samples, cfg.image_size)
    for name, (_, labels, _) in (("train", train_px), ("val", val_px)):
        counts = np.bincount(labels, minlength=len(classes))
        if counts.min() == 0:
            raise DataError(f"{root}: the {name} set has no readable images of class "
                            f"{classes[int(counts.argmin())]}")
    skipped = train_px[2] + val_px[2] + (test[2] if test else [])
    split["val_files"] = sorted(os.path.relpath(p, root) for p, _ in val)
    return {"classes": classes, "pos": pos, "split": split,
            "train": train_px[:2], "val": val_px[:2], "test": test[:2] if test else None,
            "data_info": {"train_counts": dict(zip(classes, np.bincount(
                train_px[1], minlength=len(classes)).tolist())),
                "val_counts": dict(zip(classes, np.bincount(
                    val_px[1], minlength=len(classes)).tolist())),
                "skipped_unreadable": len(skipped), "skipped_files": skipped[:100]}}


def _loaders(cfg, data, device):
    pin = device.type == "cuda"
    gen = torch.Generator().manual_seed(cfg.seed)
    train_ds = PixelDataset(*data["train"], augment=Augment() if cfg.augment else None)
    train = torch.utils.data.DataLoader(
        train_ds, batch_size=cfg.batch_size, shuffle=True, generator=gen, drop_last=False,
        num_workers=cfg.workers, pin_memory=pin, persistent_workers=cfg.workers > 0)

    def plain(arrays):
        return torch.utils.data.DataLoader(PixelDataset(*arrays), batch_size=cfg.batch_size * 2,
                                           shuffle=False, pin_memory=pin)

    return train, plain(data["val"]), plain(data["test"]) if data["test"] else None


def _optimizer(cfg, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay,
                               nesterov=True)
    raise PneumoError(f"unknown optimizer {cfg.optimizer!r}")


def _scheduler(cfg, optimizer, steps_per_epoch):
    """(scheduler or None, stepped per batch?)."""
    s = cfg.scheduler
    if s == "none":
        return None, False
    if s == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, max(1, cfg.epochs // 3), 0.1), False
    if s == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, cfg.epochs)), False
    if s == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch), True
    raise PneumoError(f"unknown scheduler {s!r}")


def _save_best(out, model, card_base, epoch, score, probs, labels, pos, rule) -> dict:
    threshold = choose_threshold(labels == pos, probs[:, pos], rule)
    m = binary_metrics(labels == pos, probs[:, pos], threshold)
    card = Card(threshold=threshold, metrics={"val": m, "best_epoch": epoch,
                                              "threshold_rule": rule},
                created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                **card_base)
    save_model(out, model, card)
    card.save(out)
    return {"epoch": epoch, "score": score, "card": card.to_dict(),
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}


def _save_last(out, model, optimizer, scheduler, state, cfg) -> None:
    best = dict(state["best"]) if state["best"] else None
    save_atomic({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "epoch": state["epoch"], "history": json.dumps(state["history"]),
        "best": json.dumps({k: v for k, v in best.items() if k != "state_dict"}) if best else "",
        "best_state_dict": best["state_dict"] if best else {},
        "config": json.dumps(asdict(cfg)), "rng": torch.get_rng_state(),
    }, out / LAST_FILE)


def _resume(out, model, optimizer, scheduler, cfg) -> dict:
    last = torch.load(out / LAST_FILE, map_location="cpu", weights_only=True)
    old = json.loads(last["config"])
    for k in ("arch", "image_size", "data"):
        if old[k] != getattr(cfg, k):
            raise PneumoError(f"--resume: {k} was {old[k]!r} in {out}, now {getattr(cfg, k)!r}")
    model.load_state_dict(last["model"])
    optimizer.load_state_dict(last["optimizer"])
    if scheduler is not None and last["scheduler"]:
        scheduler.load_state_dict(last["scheduler"])
    torch.set_rng_state(last["rng"])
    best = json.loads(last["best"]) if last["best"] else None
    if best:
        best["state_dict"] = last["best_state_dict"]
    log(f"resuming {out} after epoch {last['epoch']}")
    return {"epoch": last["epoch"], "history": json.loads(last["history"]), "best": best}


def _write_history(out, history) -> None:
    if not history:
        return
    tmp = out / ".history.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, out / "history.csv")


def _epoch_line(row, improved) -> str:
    return (f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}  val loss "
            f"{row['val_loss']:.4f}  acc {row['val_accuracy']:.3f}  f1 {row['val_f1']:.3f}  "
            f"auroc {row['val_roc_auc']:.3f}  ({row['seconds']:.0f} s)"
            + ("  * saved" if improved else ""))


def _bar(total, desc):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, leave=False,
                disable=None, dynamic_ncols=True)


def _finish(out, state, cfg, criterion, test_loader, device, amp, data, pos) -> dict:
    """Write metrics.json, plots and the final card for the selected epoch."""
    from pneumo_edge.net import build_model
    from pneumo_edge.train.plots import plot_confusion, plot_curves

    best = state["best"]
    card = Card.from_dict(best["card"])
    result = {"best_epoch": best["epoch"], "select": cfg.select, "threshold": card.threshold,
              "val": card.metrics["val"], "history": state["history"]}
    if test_loader is not None:
        model = build_model(cfg.arch, len(card.classes)).to(device)
        model.load_state_dict(best["state_dict"])
        tloss, tprobs, tlabels = evaluate(model, criterion, test_loader, device, amp=amp)
        result["test"] = binary_metrics(tlabels == pos, tprobs[:, pos], card.threshold)
        card.metrics["test"] = result["test"]
        save_model(out, model, card)
    card.save(out)
    write_atomic(out / "metrics.json", json.dumps(json_safe(result), indent=2) + "\n")
    plot_curves(state["history"], out / "curves.png")
    plot_confusion(card.metrics["val"]["confusion_matrix"], card, out / "confusion.png",
                   title=f"validation, epoch {best['epoch']}, threshold {card.threshold:.3f}")
    log(f"best epoch {best['epoch']} ({cfg.select} {best['score']:.4f}); threshold "
        f"{card.threshold:.3f}; val " + ", ".join(
            f"{k} {card.metrics['val'][k]:.3f}" for k in METRIC_KEYS)
        + f"\nwrote {out}/: model.pt card.json metrics.json history.csv curves.png confusion.png")
    return result



def _config_dict(cfg, amp, device, weights) -> dict:
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("resume", "force")}
    d.update(amp=amp, device=str(device), class_weight_values=weights)
    return d


def versions() -> dict:
    return installed_versions(("torch", "torchvision", "numpy", "pillow"))

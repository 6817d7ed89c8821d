"""The training loop, after torchvision's references/classification/train.py:
``train_one_epoch``, ``evaluate`` and ``train`` (the main function the CLI calls). Options and
their checks are :mod:`pneumo_edge.train.config`; the data (split, decoding, pixel cache),
:mod:`pneumo_edge.train.data`; what is written to the output folder,
:mod:`pneumo_edge.train.rundir`; the time plan, :mod:`pneumo_edge.train.budget`; the final
evaluation of the selected weights, :mod:`pneumo_edge.train.final`."""

from __future__ import annotations

import collections
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pneumo_edge.train import distributed as dist_
from pneumo_edge.train import rundir
from pneumo_edge.train.budget import Plan, lr_factor
from pneumo_edge.train.config import SELECT, TrainConfig, check_config, default_amp, pick_device
from pneumo_edge.train.data import PixelDataset, augment_for, class_weights, load_data
from torch import nn

from pneumo_edge.errors import PneumoError
from pneumo_edge.evaluation.metrics import METRIC_KEYS, binary_metrics
from pneumo_edge.model import modeldir
from pneumo_edge.model.net import build_model

_QUIET = {"on": False}  # ranks other than 0 of a torchrun job keep quiet


def log(msg: str) -> None:
    if not _QUIET["on"]:
        print(msg, file=sys.stderr, flush=True)


def autocast(device: torch.device, enabled: bool):
    dtype = torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() \
        else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


class NonFiniteLoss(PneumoError):
    """The training loss became NaN or infinite (exit 2: an option is at fault)."""


def train_one_epoch(model, criterion, optimizer, loader, device, *, amp=False, scaler=None,
                    clip_grad=0.0, scheduler_step=None, progress=None, ema=None, mixup=0.0,
                    num_classes=2, on_step=None) -> float:
    model.train()
    total, n = 0.0, 0
    for x, y in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        x, target = _mix(x, y, mixup, num_classes) if mixup > 0 else (x, y)
        with autocast(device, amp):
            loss = criterion(model.logits(x).float(), target)
        value = loss.item()
        if not math.isfinite(value):
            group = optimizer.param_groups[0]
            raise NonFiniteLoss(
                f"the training loss became {value} after {n} images of this epoch, so this "
                f"epoch was not saved; the learning rate (--lr "
                f"{group.get('initial_lr', group['lr']):g}) is the likely cause, then "
                "--class-weights, --mixup or --amp")
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
        if ema is not None:
            ema.update(model)
        total += value * len(y)
        n += len(y)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{total / n:.4f}")
        if on_step is not None:
            on_step()
    return total / max(n, 1)


def _mix(x, y, alpha, num_classes):
    """Mixup: a Beta(alpha, alpha) blend of the batch with a shuffled copy; soft targets."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(y), device=y.device)
    mixed = x.float() * lam + x[perm].float() * (1.0 - lam)
    onehot = nn.functional.one_hot(y, num_classes).float()
    return mixed, onehot * lam + onehot[perm] * (1.0 - lam)


class Ema:
    """An exponential moving average of the weights (BatchNorm statistics included), with the
    usual warm-up of the decay so the first steps do not freeze the random initialisation."""

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(m.detach(), 1.0 - d)
            else:
                e.copy_(m)


@torch.inference_mode()
def evaluate(model, criterion, loader, device, *, amp=False):
    """(mean loss, probabilities [N, C] float32 numpy, labels [N]) from the logits (no
    test-time augmentation): the per-epoch view used for selection."""
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
    """Check everything, train within the time budget, select on validation, write the model
    directory. Returns metrics.json's dict."""
    t_start = time.monotonic()
    out = Path(cfg.out)
    check_config(cfg)
    cfg = cfg.resolved()
    d = dist_.from_env()
    device = dist_.device_for(d, cfg.device) if d.enabled else pick_device(cfg.device)
    d = dist_.init(d, device)
    _QUIET["on"] = not d.is_main
    try:
        return _train(cfg, out, d, device, t_start)
    finally:
        _QUIET["on"] = False
        dist_.close(d)


def _train(cfg, out, d, device, t_start) -> dict:
    amp = default_amp(device) if cfg.amp is None else cfg.amp
    rundir.check_out(out, cfg)
    data = load_data(cfg, d, log)
    if d.is_main:
        rundir.prepare_out(out, cfg)
    dist_.barrier(d, "waiting for rank 0 to prepare --out")
    torch.manual_seed(cfg.seed)
    s = _setup(cfg, data, device, amp, d)
    state = {"epoch": 0, "history": [], "best": None, "planned_epochs": None}
    if cfg.resume:
        state = rundir.resume_state(out, s, cfg)
        if not d.is_main and state["best"]:
            state["best"] = {"epoch": state["best"]["epoch"], "score": state["best"]["score"]}
        log(f"resuming {out} after epoch {state['epoch']} (plan: "
            f"{state['planned_epochs'] or 'not measured yet'} epochs)")
    plan = s["plan"]
    if state["planned_epochs"]:  # resumed: keep the plan, unless --epochs now says otherwise
        plan.epochs, plan.measured = cfg.epochs or state["planned_epochs"], True
    if d.enabled:  # the same model on every rank, each rank its own augmentation draws
        torch.manual_seed(cfg.seed + 7919 * d.rank + 104729 * state["epoch"])
    _log_start(cfg, data, device, amp, state, plan)
    _stop_on_sigterm()
    try:
        _epochs(cfg, out, s, state, data, device, amp, t_start)
    except KeyboardInterrupt:
        if not d.is_main:
            raise
        log(f"interrupted after epoch {state['epoch']}: "
            + (f"best checkpoint so far (epoch {state['best']['epoch']}) is in "
               f"{out / modeldir.MODEL_PT}; "
               if state["best"] else "no checkpoint saved yet; ")
            + f"continue with: {_launcher(d)} train --data {cfg.data} --out {cfg.out} --resume")
        if state["best"]:
            _finish(out, state, cfg, data, device, t_start)
        raise
    if state["best"] is None:
        raise PneumoError("no epoch was trained (use more --epochs than the resumed run had)")
    if not d.is_main:  # rank 0 alone runs the final evaluation and writes the directory
        return {}
    if cfg.average == "swa" and s["swa"]:
        state["best"] = _swa(cfg, out, s, state, data, device, amp)
    elif cfg.average == "swa":
        log("--average swa: no epoch trained in this process to average (a resumed run that "
            "had finished): the selected epoch's weights are kept")
    return _finish(out, state, cfg, data, device, t_start)


def _swa(cfg, out, s, state, data, device, amp) -> dict:
    """--average swa: the uniform average of the raw weights of the last --swa-epochs epochs
    (fewer after a --resume: the ones trained since), BatchNorm statistics recomputed on one
    pass over the training images as trained (augmented), replacing the selected epoch."""
    import copy

    epochs = [e for e, _ in s["swa"]]
    states = [sd for _, sd in s["swa"]]
    avg = {k: (sum(sd[k].double() for sd in states) / len(states)).to(v.dtype)
           if v.dtype.is_floating_point else v.clone() for k, v in states[-1].items()}
    model = copy.deepcopy(s["model"])
    model.load_state_dict(avg)
    recompute_bn(model, s["train"], device, amp)
    loss, probs, labels = evaluate(model, s["criterion"], s["val"], device, amp=amp)
    row = epoch_metrics(loss, probs, labels, data["pos"])
    log(f"weight average (swa) of epochs {epochs[0]}-{epochs[-1]} ({len(epochs)}), BatchNorm "
        f"statistics recomputed on the training images: val loss {row['loss']:.4f}  auroc "
        f"{row['roc_auc']:.3f} (selection had chosen epoch {state['best']['epoch']})")
    base = rundir.card_base(cfg, data, amp, device, s["weights"], s["dist"])
    best = rundir.save_best(out, model, base, state["epoch"], row["roc_auc"],
                            (probs, labels, data["pos"]), cfg)
    best["average"] = {"method": "swa", "epochs": epochs, "selected_epoch_before":
                       state["best"]["epoch"], "batchnorm": "recomputed on one augmented "
                       "pass over the training images"}
    return best


@torch.no_grad()
def recompute_bn(model, loader, device, amp=False) -> None:
    """BatchNorm running statistics of ``model`` recomputed as plain means over one pass of
    ``loader`` (averaged weights make the averaged statistics wrong)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    model.train()
    for x, _ in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            model.logits(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def _launcher(d) -> str:
    return f"torchrun --nproc_per_node={d.world_size} -m pneumo_edge" if d.enabled \
        else "pneumo-edge"


def _setup(cfg, data, device, amp, d=dist_.SINGLE) -> dict:
    """Model, EMA, loss, loaders, optimiser, plan and schedule."""
    classes = data["classes"]
    model = build_model(cfg.arch, len(classes), cfg.weights, **cfg.net).to(device)
    model = model.to(memory_format=torch.channels_last)
    train_model = _ddp(model, device, d)
    weights = class_weights(data["train"][1], len(classes), cfg.class_weights,
                            cfg.class_weight_power)
    criterion = nn.CrossEntropyLoss(
        weight=torch.tensor(weights, dtype=torch.float32, device=device) if weights else None,
        label_smoothing=cfg.label_smoothing)
    train_loader, val_loader, shifted_loader = _loaders(cfg, data, device, d)
    optimizer = _optimizer(cfg, model)
    plan = Plan(cfg.epochs, cfg.time_budget, len(train_loader))
    warmup = round(cfg.warmup_epochs * len(train_loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg.scheduler, step, plan.total_steps, warmup))
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" \
        and not torch.cuda.is_bf16_supported() else None
    ema = Ema(model, cfg.ema) if cfg.ema > 0 and cfg.average == "ema" else None
    return {"model": model, "ema": ema, "swa": collections.deque(maxlen=cfg.swa_epochs),
            "criterion": criterion, "weights": weights, "train": train_loader,
            "val": val_loader, "shifted": shifted_loader, "optimizer": optimizer,
            "scheduler": scheduler, "scaler": scaler, "plan": plan,
            "num_classes": len(classes), "dist": d, "train_model": train_model,
            "gate_images": _gate_images(cfg, data), "val_images": len(data["val"][1])}


def _gate_images(cfg, data) -> int:
    """Images the final calibration and input gate (issue 20) run through the network after
    the final evaluation: the train, val and test splits again (features and log-probabilities),
    the orientation probe's turned training images and the gate's test families."""
    if not cfg.calibrate:
        return 0
    from pneumo_edge.train.calibrate import PROBE_IMAGES, family_images

    splits = sum(len(data[k][1]) for k in ("train", "val", "test") if data.get(k) is not None)
    return (splits + min(PROBE_IMAGES, len(data["train"][1]))
            + family_images(len(data["val"][1])))


class _DdpNet(nn.Module):
    """What train_one_epoch drives under DistributedDataParallel: ``logits`` goes through the
    DDP wrapper (so gradients are averaged over ranks); ``state_dict`` is the plain network's."""

    def __init__(self, net, device):
        super().__init__()
        from torch.nn.parallel import DistributedDataParallel

        self.net = net
        self.ddp = DistributedDataParallel(
            _Logits(net), device_ids=[device.index] if device.type == "cuda" else None)

    def logits(self, x):
        return self.ddp(x)

    forward = logits

    def state_dict(self, *args, **kwargs):
        return self.net.state_dict(*args, **kwargs)


class _Logits(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.logits(x)


def _ddp(model, device, d):
    return _DdpNet(model, device) if d.enabled else model


def _log_start(cfg, data, device, amp, state, plan) -> None:
    budget = f"time budget {cfg.time_budget / 60:.1f} min (decoding and final evaluation " \
        "included), epochs set after the first one" if cfg.time_budget else "no time budget"
    log(f"training {cfg.arch} {cfg.image_size} px on {device} "
        f"({'mixed precision' if amp else 'fp32'}): {len(data['train'][1])} train / "
        f"{len(data['val'][1])} val / {len(data['test'][1]) if data['test'] else 0} test "
        f"images; up to {plan.epochs} epochs from {state['epoch'] + 1}; {budget}")


def _epochs(cfg, out, s, state, data, device, amp, t_start) -> None:
    key, sign = SELECT[cfg.select]
    eligible_from = min(cfg.min_epochs, s["plan"].epochs)
    recent: list[float] = []  # the last two epochs' seconds
    card_base = rundir.card_base(cfg, data, amp, device, s["weights"], s["dist"])
    while not s["plan"].should_stop(state["epoch"]):
        epoch = state["epoch"] + 1
        t0 = time.perf_counter()
        on_step = _early_plan(cfg, s, t_start) if not s["plan"].measured else None
        row = _one_epoch(cfg, s, epoch, device, amp, data["pos"], on_step)
        state["history"].append(row)
        score = row[f"{key}"]
        improved = epoch >= min(eligible_from, s["plan"].epochs) and (
            state["best"] is None or sign * score > sign * state["best"]["score"])
        d = s["dist"]
        if improved and d.is_main:
            state["best"] = rundir.save_best(out, s["ema"].model if s["ema"] else s["model"],
                                       card_base, epoch, score, row.pop("_probs"), cfg)
        elif improved:
            state["best"] = {"epoch": epoch, "score": score}
        row.pop("_probs", None)
        if cfg.average == "swa" and d.is_main:  # the raw weights of the last epochs
            s["swa"].append((epoch, {k: v.detach().cpu().clone()
                                     for k, v in s["model"].state_dict().items()}))
        state["epoch"] = epoch
        recent = (recent + [time.perf_counter() - t0])[-2:]
        elapsed = time.monotonic() - t_start
        msg = s["plan"].replan(epoch, elapsed, max(recent), _final_reserve(
            row["eval_seconds"], cfg, row["seconds"] - row["eval_seconds"], s))
        msg = _share_plan(s, msg)
        state["planned_epochs"] = s["plan"].epochs
        if d.is_main:
            rundir.save_last(out, s, state, cfg)
            rundir.write_history(out, state["history"])
        log(_epoch_line(row, improved, s["plan"].epochs, elapsed, cfg.time_budget))
        if msg:
            log(msg)


def _early_plan(cfg, s, t_start):
    """A step callback for the first epoch: after a few steps (the first one, with its warm-up
    costs, not counted) estimate an epoch and plan the schedule, so the learning rate follows a
    plan that completes from the first epoch on."""
    k = max(2, min(10, len(s["train"]) // 4))
    t_epoch, marks = time.monotonic(), []

    def on_step():
        marks.append(time.perf_counter())
        if len(marks) == k + 1:
            step_s = (marks[-1] - marks[0]) / k
            eval_s = step_s * 2 * len(s["val"].dataset) / cfg.batch_size / 3  # forward only
            msg = s["plan"].estimate(t_epoch - t_start, step_s * len(s["train"]) + eval_s,
                                     _final_reserve(eval_s, cfg, step_s * len(s["train"]),
                                                    s))
            msg = _share_plan(s, msg)
            if msg:
                log(msg)

    return on_step


def _share_plan(s, msg):
    """Every rank follows rank 0's plan (epochs and schedule), or they would drift apart."""
    d, plan = s["dist"], s["plan"]
    if not d.enabled:
        return msg
    plan.epochs, plan.measured, msg = dist_.broadcast(d, (plan.epochs, plan.measured, msg),
                                                      "sharing the time plan")
    return msg


def _one_epoch(cfg, s, epoch, device, amp, pos, on_step=None) -> dict:
    t0 = time.perf_counter()
    d = s["dist"]
    if d.enabled:
        s["train"].sampler.set_epoch(epoch)
    bar = _bar(len(s["train"]), f"epoch {epoch}/{s['plan'].epochs}") if d.is_main else None
    train_loss = train_one_epoch(
        s["train_model"], s["criterion"], s["optimizer"], s["train"], device, amp=amp,
        scaler=s["scaler"], clip_grad=cfg.clip_grad, scheduler_step=s["scheduler"].step,
        progress=bar, ema=s["ema"], mixup=cfg.mixup, num_classes=s["num_classes"],
        on_step=on_step)
    if bar is not None:
        bar.close()
    if d.enabled:  # the mean over every rank's images
        total = dist_.gather(d, (train_loss, len(s["train"].sampler)), "gathering train loss")
        train_loss = sum(v * n for v, n in total) / max(1, sum(n for _, n in total))
    t1 = time.perf_counter()
    judged = s["ema"].model if s["ema"] else s["model"]
    dist_.broadcast_state(d, judged, "sharing the weights to evaluate")
    vloss, vprobs, vlabels = evaluate_gathered(judged, s["criterion"], s["val"], device, d,
                                               amp=amp)
    sloss, sprobs, _ = evaluate_gathered(judged, s["criterion"], s["shifted"], device, d,
                                         amp=amp)
    t2 = time.perf_counter()
    return {"epoch": epoch, "train_loss": train_loss,
            **{f"val_{k}": v for k, v in epoch_metrics(vloss, vprobs, vlabels, pos).items()},
            **{f"shifted_val_{k}": v
               for k, v in epoch_metrics(sloss, sprobs, vlabels, pos).items()},
            "lr": s["optimizer"].param_groups[0]["lr"], "seconds": t2 - t0,
            "eval_seconds": t2 - t1, "_probs": (vprobs, vlabels, pos)}


def _final_reserve(eval_seconds: float, cfg, train_seconds: float = 0.0,
                   s: dict | None = None) -> float:
    """Seconds to keep for the final evaluation: val, shifted val and test through the deployed
    network in fp32 (about 3x the mixed-precision per-epoch evaluation of val + shifted val),
    twice over with flip averaging, plus plots and writes; with --average swa also its
    BatchNorm pass over the training images (forward only: about a third of an epoch's
    training) and one evaluation of validation; with calibration (the default) the images the
    calibration and the gate run, in fp32 (``s["gate_images"]``: about 7,700 for the default
    run, which the budget left out until 2026-12-01, so a default run ended ~5 minutes past
    its budget)."""
    swa = train_seconds / 3 + eval_seconds if cfg.average == "swa" else 0.0
    per_image = eval_seconds / (2 * s["val_images"]) if s and s.get("val_images") else 0.0
    gate = 1.5 * per_image * (s or {}).get("gate_images", 0) * (2 if cfg.tta == "flip" else 1)
    return eval_seconds * 1.5 * 3 * (2 if cfg.tta == "flip" else 1) + 10.0 + swa + gate


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


@torch.inference_mode()
def evaluate_gathered(model, criterion, loader, device, d, *, amp=False):
    """:func:`evaluate` over every rank: each rank runs a contiguous share of the loader's
    dataset in the loader's batches (the batches one process would run), and every rank gets
    all the results in dataset order, so the loss, probabilities and labels are those of a
    single-process evaluation of the same weights."""
    if not d.enabled:
        return evaluate(model, criterion, loader, device, amp=amp)
    model.eval()
    part = dist_.shard(len(loader.dataset), loader.batch_size, d)
    mine = torch.utils.data.DataLoader(torch.utils.data.Subset(loader.dataset, part),
                                       batch_size=loader.batch_size, shuffle=False)
    losses, probs, labels = [], [], []
    for x, y in mine:
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        y = y.to(device)
        with autocast(device, amp):
            logits = model.logits(x).float()
        losses.append(criterion(logits, y).item() * len(y))
        probs.append(torch.softmax(logits, 1).cpu().numpy())
        labels.append(y.cpu().numpy())
    every = dist_.gather(d, (losses, probs, labels), "gathering validation results")
    losses = [v for r in every for v in r[0]]
    probs = [p for r in every for p in r[1]]
    labels = [y for r in every for y in r[2]]
    n = sum(len(p) for p in probs)
    total = 0.0
    for v in losses:  # in the single process's order
        total += v
    return (total / max(n, 1),
            np.concatenate(probs) if probs else np.zeros((0, 2), np.float32),
            np.concatenate(labels) if labels else np.zeros(0, np.int64))


def _dataset(pixels, labels, augment=None):
    from pneumo_edge.train.cache import CachedDataset

    if isinstance(pixels, np.ndarray):
        return PixelDataset(pixels, labels, augment)
    return CachedDataset(pixels, labels, augment)  # a pixel-cache file or a view of one


def _loaders(cfg, data, device, d=dist_.SINGLE):
    pin = device.type == "cuda"
    gen = torch.Generator().manual_seed(cfg.seed)
    train_ds = _dataset(*(data.get("train_crop") or data["train"]), augment=augment_for(cfg))
    sampler, per_rank = None, len(train_ds)
    if d.enabled:  # each rank a disjoint share, reshuffled every epoch (set_epoch)
        sampler = torch.utils.data.DistributedSampler(
            train_ds, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=cfg.seed)
        per_rank = len(sampler)
    # a last batch of one image would make BatchNorm fail in training mode: drop it
    train = torch.utils.data.DataLoader(
        train_ds, batch_size=cfg.batch_size, shuffle=sampler is None,
        generator=gen if sampler is None else None, sampler=sampler,
        drop_last=per_rank % cfg.batch_size == 1,
        num_workers=cfg.workers, pin_memory=pin, persistent_workers=cfg.workers > 0)

    def plain(arrays):
        return torch.utils.data.DataLoader(_dataset(*arrays), batch_size=cfg.batch_size * 2,
                                           shuffle=False, pin_memory=pin)

    return train, plain(data["val"]), plain(data["shifted"])


def _optimizer(cfg, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay,
                           nesterov=True)


def _epoch_line(row, improved, planned, elapsed, budget) -> str:
    clock = f"{elapsed / 60:.1f}/{budget / 60:.0f} min" if budget else f"{elapsed / 60:.1f} min"
    return (f"epoch {row['epoch']}/{planned}: train loss {row['train_loss']:.4f}  val loss "
            f"{row['val_loss']:.4f}  auroc {row['val_roc_auc']:.3f}  shifted auroc "
            f"{row['shifted_val_roc_auc']:.3f}  ({row['seconds']:.0f} s; {clock})"
            + ("  * saved" if improved else ""))


def _bar(total, desc):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, leave=False,
                disable=None, dynamic_ncols=True)


def _finish(out, state, cfg, data, device, t_start) -> dict:
    """The final evaluation of the selected weights through the deployed network; writes
    model.pt, card.json, metrics.json and the plots."""
    from pneumo_edge.train.final import final_evaluation

    return final_evaluation(out, state, cfg, data, device, t_start, log)

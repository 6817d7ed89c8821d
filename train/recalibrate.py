"""``pneumo-edge calibrate RUN --data DATA``: fit calibration and the input quality gate for an
existing model directory without retraining (:mod:`pneumo_edge.train.calibrate`), then rewrite
model.pt and card.json (each atomically). The weights do not change; the network gains the
calibration map and the gate, so exported files made before are stale (their weights sha256
no longer matches model.pt, and runtimes refuse them): re-run ``pneumo-edge export RUN``.

The data must be the folder the model was trained on: its split is rebuilt from the card's
recorded seed and fractions and must give the same validation files. Imports torch only when
run (the options dataclass is read by the CLI for --help).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pneumo_edge.errors import UsageError
from pneumo_edge.model import modeldir
from pneumo_edge.model.qc import FALSE_FLAG_RATE

GATE_CHOICES = ("auto", "mahalanobis", "energy", "mahalanobis+orientation",
                "mahalanobis+layer1+orientation")


def _opt(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class CalibrateOptions:
    gate: str = _opt("auto", "Out-of-distribution score put into the network: mahalanobis, "
                             "energy, mahalanobis+orientation (the distance joined by a probe "
                             "for upside-down, quarter-turned and inverted films), "
                             "mahalanobis+layer1+orientation (and the same distance on the "
                             "first stage's features: photographs, CT/MR), or auto (the one "
                             "that flags more of the test families).")
    false_flag_rate: float = _opt(FALSE_FLAG_RATE, "Share of validation X-rays the gate may flag; its "
                                         "threshold is set there.")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1 ...")


def run_calibrate(run: str | os.PathLike, data: str | os.PathLike,
                  opts: CalibrateOptions | None = None, log=None) -> int:
    """Calibrate ``run`` on ``data``; returns the exit code (0)."""
    from pneumo_edge.model.torchload import load_checked
    from pneumo_edge.train.calibrate import calibrate_card
    from pneumo_edge.train.checkpoint import save_model
    from pneumo_edge.train.config import pick_device

    opts = opts or CalibrateOptions()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    run = Path(run)
    if opts.gate not in GATE_CHOICES:
        raise UsageError(f"--gate {opts.gate!r}: choose one of {', '.join(GATE_CHOICES)}")
    if not 0.0 < opts.false_flag_rate < 0.5:
        raise UsageError(f"--false-flag-rate {opts.false_flag_rate}: use a rate in (0, 0.5)")
    device = pick_device(opts.device)
    model, card, _ = load_checked(run, str(device))
    parts = split_pixels(run, data, card, log)
    net, new = calibrate_card(model, card, parts, device, gate=opts.gate,
                              rate=opts.false_flag_rate, log=log)
    save_model(run, net, new)
    modeldir.write_card(run, new)
    log(f"wrote {run / modeldir.MODEL_PT} and {run / modeldir.CARD_JSON}: threshold "
        f"{card.threshold:.4f} -> {new.threshold:.4f} on the calibrated scale (same labels)")
    stale = [name for name in modeldir.EXPORT_OUTPUTS if os.path.lexists(run / name)]
    if stale:
        log(f"note: {', '.join(stale)} in {run} came from the uncalibrated network and are now "
            f"stale (runtimes refuse them); run: pneumo-edge export {run}")
    return 0


def split_pixels(run: Path, data, card, log, holdout: bool = False) -> dict:
    """train / val / test pixels of ``data`` split as the card records (and, with ``holdout``,
    ``cluster_holdout``: the acquisition cluster a ``--proxy cluster`` run held out, or None);
    UsageError when the validation files differ from the ones the model was selected on."""
    from pneumo_edge.train.config import TrainConfig
    from pneumo_edge.train.data import load_data

    known = set(TrainConfig.__dataclass_fields__)
    tc = {k: v for k, v in card.train_config.items() if k in known}
    cfg = TrainConfig(**{**tc, "data": os.fspath(data), "out": os.fspath(run), "cache": "",
                         "no_cache": not (run / modeldir.PIXEL_CACHE).is_dir(),
                         "image_size": card.image_size,
                         "train_cache_size": card.image_size})  # no crops here
    d = load_data(cfg, log=log)
    want = card.split.get("val_files")
    if want is not None and d["split"].get("val_files") != want:
        raise UsageError(f"{data}: its validation split differs from the one {run} was "
                         f"selected on (calibrate with the data the model was trained on)")
    if d["classes"] != card.classes:
        raise UsageError(f"{data}: classes {d['classes']} differ from the card's {card.classes}")
    out = {"train": d["train"], "val": d["val"], "test": d["test"]}
    if holdout:
        out["cluster_holdout"] = d.get("cluster_holdout")
    return out

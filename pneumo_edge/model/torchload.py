"""Load ``model.pt`` for the torch runtime and for export: the weights, the card inside it
(checked against card.json) and the file's sha256, from one read of the file.

torch is imported inside the functions, so importing this module is cheap; the network itself
is :mod:`pneumo_edge.model.net`.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from pneumo_edge.errors import ModelError
from pneumo_edge.model import modeldir
from pneumo_edge.model.card import Card

#: largest model.pt read into memory (a ResNet50 is ~100 MB)
PT_CAP = 4 << 30


@dataclass
class Checkpoint:
    path: Path
    state_dict: dict
    card: Card  # the card inside model.pt
    sha256: str  # of the file's bytes, the weights' identity recorded at export
    verified: modeldir.Verified | None = None  # set by load_checked: checked against card.json


def checkpoint_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / modeldir.MODEL_PT if path.is_dir() else path


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """model.pt (or a directory holding one), loaded with ``weights_only=True``."""
    import torch

    path = checkpoint_path(path)
    if not os.path.lexists(path):
        raise ModelError(f"{path}: no such checkpoint (train a model first: pneumo-edge train "
                         f"--data DATA --out {path.parent})")
    data = modeldir.read_regular(path, PT_CAP)
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- torch raises many types for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"{path}: not a readable checkpoint ({first[:120]})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) \
            or "card" not in ckpt:
        raise ModelError(f"{path}: not a pneumo-edge checkpoint (no state_dict and card)")
    card = modeldir.card_from(ckpt["card"], path)
    return Checkpoint(path, ckpt["state_dict"], card, hashlib.sha256(data).hexdigest())


def build_from(ckpt: Checkpoint, device: str = "cpu"):
    """The XrayNet of ``ckpt`` in eval mode on ``device``."""
    from pneumo_edge.model.net import build_model

    card = ckpt.card
    try:
        model = build_model(card.arch, len(card.classes), weights="none", **card.net)
    except TypeError as exc:  # an option this pneumo-edge's network does not have
        raise ModelError(f"{ckpt.path}: the card's net options {card.net} do not fit this "
                         f"pneumo-edge ({exc}); upgrade pneumo-edge") from None
    try:
        model.load_state_dict(ckpt.state_dict)
    except RuntimeError as exc:
        raise ModelError(f"{ckpt.path}: weights do not match the card's {card.arch}: "
                         f"{str(exc).splitlines()[0][:160]}") from None
    return model.eval().to(device)


def load_model(path: str | os.PathLike, device: str = "cpu", card: Card | None = None):
    """(XrayNet in eval mode on ``device``, Card) from a model directory or its model.pt.
    The card is card.json's (``card``, or read from the directory), which must agree with the
    card inside model.pt; without card.json, model.pt's own."""
    model, card, _ = load_checked(path, device, card)
    return model, card


def load_checked(path: str | os.PathLike, device: str = "cpu", card: Card | None = None):
    """(model, agreed Card, Checkpoint) — :func:`load_model` plus the checkpoint (sha256, and
    what :func:`pneumo_edge.model.modeldir.verify_file` checked, in ``verified``)."""
    ckpt = read_checkpoint(path)
    ckpt.verified = modeldir.verify_file(ckpt.path, ckpt.sha256, ckpt.card, None, card)
    return build_from(ckpt, device), ckpt.verified.card, ckpt

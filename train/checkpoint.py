"""model.pt: the selected weights plus the model card, loadable with
``torch.load(weights_only=True)``; last.pt: the full training state for ``--resume``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pneumo_edge.card import Card
from pneumo_edge.errors import ModelError

MODEL_FILE = "model.pt"
LAST_FILE = "last.pt"


def save_atomic(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_model(run_dir, model, card: Card) -> Path:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(run_dir) / MODEL_FILE
    # the card goes in as plain JSON types, so weights_only loading accepts it
    card_dict = json.loads(card.to_json())
    save_atomic({"format": "pneumo-edge", "state_dict": state, "card": card_dict}, path)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such checkpoint (train a model first)") from None
    except Exception as exc:
        raise ModelError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "card" not in ckpt:
        raise ModelError(f"{path}: not a pneumo-edge checkpoint (no state_dict and card)")
    return ckpt


def load_model(path: str | os.PathLike, device: str = "cpu"):
    """(XrayNet in eval mode on ``device``, Card) from a model directory or model.pt."""
    from pneumo_edge.net import build_model

    ckpt = read_checkpoint(path)
    card = Card.from_dict(ckpt["card"])
    model = build_model(card.arch, len(card.classes), weights="none", **card.net)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not match the card's {card.arch}: "
                         f"{str(exc).splitlines()[0][:160]}") from None
    return model.eval().to(device), card

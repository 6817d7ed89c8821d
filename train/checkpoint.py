"""What training writes: model.pt (the selected weights plus the model card, loadable with
``torch.load(weights_only=True)``) and last.pt (the full training state for ``--resume``), both
through the model directory's one atomic writer. Reading model.pt is
:mod:`pneumo_edge.model.torchload` (the edge side needs it too)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pneumo_edge.model import modeldir
from pneumo_edge.model.card import Card

# the names belong to pneumo_edge.model.modeldir; these aliases keep the training loop's imports
MODEL_FILE = modeldir.MODEL_PT
LAST_FILE = modeldir.LAST_PT


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see modeldir.torch_save_atomic)."""
    return modeldir.torch_save_atomic(path, obj)


def save_model(run_dir, model, card: Card) -> Path:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # the card goes in as plain JSON types, so weights_only loading accepts it
    card_dict = json.loads(card.to_json())
    return modeldir.torch_save_atomic(Path(run_dir) / modeldir.MODEL_PT,
                                      {"format": "pneumo-edge", "state_dict": state,
                                       "card": card_dict})

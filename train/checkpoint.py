"""What training writes as model.pt: the selected weights plus the model card, loadable with
``torch.load(weights_only=True)``, through the model directory's one atomic writer. Reading
model.pt is :mod:`pneumo_edge.model.torchload` (the edge side needs it too); last.pt (the full
training state for ``--resume``) is written by :mod:`pneumo_edge.train.rundir`."""

from __future__ import annotations

import json
from pathlib import Path

from pneumo_edge.model import modeldir
from pneumo_edge.model.card import Card


def save_model(run_dir, model, card: Card) -> Path:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # the card goes in as plain JSON types, so weights_only loading accepts it
    card_dict = json.loads(card.to_json())
    return modeldir.torch_save_atomic(Path(run_dir) / modeldir.MODEL_PT,
                                      {"format": "pneumo-edge", "state_dict": state,
                                       "card": card_dict})

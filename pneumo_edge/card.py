"""The model card: what a model directory's model is, how it was made, and how to use it.

It travels in three places and must round-trip exactly through each: ``card.json`` in the model
directory, the ``card`` entry of ``model.pt``, and the ``metadata_props`` of the ONNX files.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pneumo_edge.errors import ModelError

#: Bump when a change makes older readers misread a card.
CARD_VERSION = 1
CARD_FILE = "card.json"


@dataclass
class Card:
    classes: list[str]
    positive_class: str
    image_size: int
    threshold: float
    arch: str
    card_version: int = CARD_VERSION
    #: network options for pneumo_edge.net.build_model (norm, tta); {} = the original network
    net: dict = field(default_factory=dict)
    input: dict = field(default_factory=dict)
    output: dict = field(default_factory=dict)
    train_config: dict = field(default_factory=dict)
    split: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created: str = ""

    def __post_init__(self):
        if not self.input:
            self.input = {
                "name": "image",
                "dtype": "uint8",
                "shape": ["N", 1, self.image_size, self.image_size],
                "meaning": "8-bit grey pixels from pneumo_edge.images.load_image",
            }
        if not self.output:
            self.output = {"name": "probs", "dtype": "float32", "shape": ["N", len(self.classes)]}
        self.validate()

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive_class)

    def validate(self) -> None:
        if self.card_version > CARD_VERSION:
            raise ModelError(
                f"model card version {self.card_version} is newer than this pneumo-edge "
                f"understands ({CARD_VERSION}); upgrade pneumo-edge"
            )
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ModelError(f"model card needs two or more distinct classes, has {self.classes}")
        if self.positive_class not in self.classes:
            raise ModelError(f"positive class {self.positive_class!r} is not one of {self.classes}")
        if not (isinstance(self.image_size, int) and 16 <= self.image_size <= 4096):
            raise ModelError(f"model card image_size {self.image_size!r} is not a usable size")
        if not (0.0 <= float(self.threshold) <= 1.0):
            raise ModelError(f"model card threshold {self.threshold!r} is not in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Card:
        if not isinstance(d, dict):
            raise ModelError("model card is not a JSON object")
        missing = [k for k in ("classes", "positive_class", "image_size", "threshold", "arch")
                   if k not in d]
        if missing:
            raise ModelError(f"model card lacks {', '.join(missing)}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> Card:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ModelError(f"model card is not valid JSON: {exc}") from None

    def save(self, run_dir: str | os.PathLike) -> Path:
        path = Path(run_dir) / CARD_FILE
        write_atomic(path, self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> Card:
        path = Path(run_dir)
        if path.is_dir():
            path = path / CARD_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelError(f"{path}: no model card (is this a pneumo-edge model directory?)") from None
        except OSError as exc:
            raise ModelError(f"{path}: cannot read model card: {exc.strerror or exc}") from None
        try:
            return cls.from_json(text)
        except ModelError as exc:
            raise ModelError(f"{path}: {exc}") from None

    def label_for(self, probs_row) -> str:
        """The label for one row of probabilities: the positive class when its probability
        reaches the threshold, otherwise the most probable of the other classes."""
        return self.classes[self.label_index(probs_row)]

    def label_index(self, probs_row, threshold: float | None = None) -> int:
        t = self.threshold if threshold is None else threshold
        pos = self.positive_index
        if probs_row[pos] >= t:
            return pos
        others = [(p, i) for i, p in enumerate(probs_row) if i != pos]
        return max(others)[1]


def json_safe(x):
    """``x`` with non-finite floats (an undefined ROC AUC) as None, so json.dumps writes valid
    JSON instead of NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

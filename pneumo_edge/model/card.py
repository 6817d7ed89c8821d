"""The model card: what a model directory's model is, how it was made, and how to use it.

It travels in three places and must round-trip exactly through each: ``card.json`` in the model
directory, the ``card`` entry of ``model.pt``, and the ``metadata_props`` of the ONNX files
(and the TensorRT engine's sidecar). Reading and writing those files, and checking that the
copies agree, is :mod:`pneumo_edge.model.modeldir`'s job; this module is the card itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from pneumo_edge.errors import ModelError

#: Bump when a change makes older readers misread a card.
CARD_VERSION = 1


@dataclass
class Card:
    classes: list[str]
    positive_class: str
    image_size: int
    threshold: float
    arch: str
    card_version: int = CARD_VERSION
    #: network options for pneumo_edge.model.net.build_model (norm, tta); {} = the original network
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
                "meaning": "8-bit grey pixels from pneumo_edge.inputs.images.load_image",
            }
        if not self.output and isinstance(self.classes, list):
            self.output = {"name": "probs", "dtype": "float32", "shape": ["N", len(self.classes)]}
        self.validate()

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive_class)

    def validate(self) -> None:
        """Refuse (ModelError) a card whose fields have the wrong type or value."""
        if not _is_int(self.card_version):
            raise ModelError(f"model card card_version {self.card_version!r} is not a whole number")
        if self.card_version > CARD_VERSION:
            raise ModelError(
                f"model card version {self.card_version} is newer than this pneumo-edge "
                f"understands ({CARD_VERSION}); upgrade pneumo-edge"
            )
        self._validate_classes()
        if not (_is_int(self.image_size) and 16 <= self.image_size <= 4096):
            raise ModelError(f"model card image_size {self.image_size!r} is not a usable size "
                             f"(a whole number of pixels, 16 to 4096)")
        if not (_is_real(self.threshold) and 0.0 <= self.threshold <= 1.0):
            raise ModelError(f"model card threshold {self.threshold!r} is not a number in [0, 1]")
        if not (isinstance(self.arch, str) and self.arch):
            raise ModelError(f"model card arch {self.arch!r} is not a name")
        self._validate_dicts()

    def _validate_classes(self) -> None:
        c = self.classes
        if not (isinstance(c, list) and all(isinstance(x, str) and x for x in c)):
            raise ModelError(f"model card classes {c!r} is not a list of class names")
        if len(c) < 2 or len(set(c)) != len(c):
            raise ModelError(f"model card needs two or more distinct classes, has {c}")
        if not isinstance(self.positive_class, str) or self.positive_class not in c:
            raise ModelError(f"positive class {self.positive_class!r} is not one of {c}")

    def _validate_dicts(self) -> None:
        for name in ("net", "input", "output", "train_config", "split", "metrics", "data",
                     "versions"):
            if not isinstance(getattr(self, name), dict):
                raise ModelError(f"model card {name} is not a JSON object")
        if not all(isinstance(k, str) and isinstance(v, (str, int, float, bool))
                   for k, v in self.net.items()):
            raise ModelError(f"model card net {self.net!r} is not a set of named options")
        if not isinstance(self.created, str):
            raise ModelError(f"model card created {self.created!r} is not text")

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
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ModelError(f"model card is not valid JSON: {exc}") from None

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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

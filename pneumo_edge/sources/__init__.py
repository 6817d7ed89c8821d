"""Sources of scored batches: what ``score`` writes rows from.

A source turns the walked file list into :class:`ScoredBatch` objects, in input order, each
file exactly once (decoded and scored, or with the reason it failed). Scoring
(:func:`pneumo_edge.commands.score.score_source`) knows nothing else about where the
probabilities came from:

- :class:`pneumo_edge.sources.local.LocalSource`: decode threads on this machine
  (:mod:`pneumo_edge.inputs.pipeline`) feeding a runtime opened here;
- :class:`pneumo_edge.sources.ray.RaySource`: decoding and the model on a Ray cluster.

What the summary and the provenance record need to know about the model is plain data
(:class:`ModelInfo`), not the runtime object, so a source may run the model elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pneumo_edge.model.card import Card


@dataclass(frozen=True)
class ModelInfo:
    """The model a source scores with, as the CSV's provenance record states it."""

    name: str  # runtime name, e.g. "onnx-int8"
    device: str  # e.g. "cpu"
    path: Path  # the model file
    sha256: str  # of that file
    precision: str  # "fp32", "fp16" or "int8"
    card: Card

    @classmethod
    def of(cls, runtime) -> ModelInfo:
        return cls(runtime.name, runtime.device, Path(runtime.path), runtime.sha256,
                   runtime.precision, runtime.card)


@dataclass
class ScoredBatch:
    """Consecutive input files ``start .. start + len(paths) - 1`` after decoding and scoring.

    ``probs``: float32 ``[len(ok), C]``, one row per decoded file in ``ok`` order (a row may be
    non-finite: scoring turns it into an error row). ``pixels``: the decoded uint8
    ``[len(ok), 1, S, S]`` when the source has them here (local), else None. ``ood``: an
    optional out-of-distribution score per decoded file (``[len(ok)]``) from models that have
    one. ``blank``: where the pixels stay elsewhere (Ray workers), the pixel check's verdict
    per decoded file (:func:`pneumo_edge.model.qc.blank_reason`, ``[len(ok)]``), else None."""

    start: int
    paths: list[str]
    ok: list[int]  # positions (within this batch) of the decoded files
    errors: dict[int, str]  # position -> reason
    probs: np.ndarray
    pixels: np.ndarray | None = None
    ood: np.ndarray | None = None
    blank: list[str] | None = None
    decode_cpu_s: float = 0.0  # CPU seconds spent decoding this batch
    compute_s: float = 0.0  # wall seconds this process spent running the model
    wait_s: float = 0.0  # wall seconds this process waited for the batch

    def __len__(self) -> int:
        return len(self.paths)


class Source(Protocol):
    """Where scored batches come from."""

    model: ModelInfo
    workers: int  # decode threads (local) or decode tasks in flight (cluster), for the summary

    def batches(self, files: Sequence[str], start: int = 0,
                known: dict[str, str] | None = None) -> Iterator[ScoredBatch]:
        """``files[start:]`` as scored batches in input order; ``known``: paths that failed
        already (a folder that cannot be listed) -> reason, never opened."""
        ...

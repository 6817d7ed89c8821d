"""The local source of scored batches: decode threads on this machine
(:func:`pneumo_edge.inputs.pipeline.decode_batches`) feeding a runtime opened here, the model
running on one batch while the threads decode the next ones."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np

from pneumo_edge.errors import ModelError
from pneumo_edge.inputs.pipeline import decode_batches, default_workers
from pneumo_edge.sources import ModelInfo, ScoredBatch


class LocalSource:
    """``runtime`` on batches of ``batch`` files decoded by ``workers`` threads."""

    def __init__(self, runtime, batch: int = 32, workers: int | None = None):
        self.rt, self.batch = runtime, batch
        self.workers = workers or default_workers()
        self.model = ModelInfo.of(runtime)

    def batches(self, files: Sequence[str], start: int = 0,
                known: dict[str, str] | None = None) -> Iterator[ScoredBatch]:
        card = self.model.card
        stream = decode_batches(files, card.image_size, self.batch, self.workers, start=start,
                                known=known)
        try:
            while True:
                t0 = time.perf_counter()
                b = next(stream, None)
                t1 = time.perf_counter()
                if b is None:
                    return
                probs, ood = run_outputs(self.rt, b.pixels, len(card.classes))
                yield ScoredBatch(b.start, b.paths, b.ok, b.errors, probs, pixels=b.pixels,
                                  ood=ood,
                                  decode_cpu_s=b.decode_cpu_s, wait_s=t1 - t0,
                                  compute_s=time.perf_counter() - t1)
        finally:
            stream.close()


def run_model(runtime, pixels: np.ndarray, n_classes: int) -> np.ndarray:
    """``runtime`` on one batch of pixels: float32 ``[N, n_classes]``; a runtime that raises
    or answers in another shape is a :class:`ModelError` (the run stops, exit 2)."""
    return run_outputs(runtime, pixels, n_classes)[0]


def run_outputs(runtime, pixels: np.ndarray, n_classes: int):
    """(probabilities ``[N, n_classes]``, the out-of-distribution score ``[N]`` or None when the
    model has no gate) of ``runtime`` on one batch: :func:`run_model`'s checks."""
    if len(pixels) == 0:
        return np.zeros((0, n_classes), np.float32), None
    try:
        outs = runtime.outputs(pixels)
        probs, ood = np.asarray(outs["probs"]), outs.get("ood")
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 -- each backend raises its own types
        text = " ".join(str(exc).split())[:200]
        raise ModelError(f"the {runtime.name} runtime failed on a batch {tuple(pixels.shape)}: "
                         f"{text} (mismatched model?)") from None
    if probs.shape != (len(pixels), n_classes):
        raise ModelError(f"the {runtime.name} model returned shape {probs.shape} for a batch of "
                         f"{len(pixels)}; its card has {n_classes} classes (mismatched model)")
    if ood is not None and np.shape(ood) != (len(pixels),):
        raise ModelError(f"the {runtime.name} model returned an ood output of shape "
                         f"{np.shape(ood)} for a batch of {len(pixels)} (mismatched model)")
    return probs, ood

"""Decode files in parallel with inference: a bounded, in-order stream of batches for scoring,
and the labelled decoding and prediction that eval, training, calibration and parity share.

Decoding runs on a small thread pool (Pillow releases the GIL while it decodes and resizes);
the caller runs the model on the batches it pulls. At most ``ahead + 1`` batches of files are
queued or decoded ahead of the consumer, so memory stays flat however many files there are.
Every file comes back exactly once, in input order, either as pixels or as a one-line reason.
Imports no torch.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pneumo_edge.inputs.images import ImageError, load_image


@dataclass
class Batch:
    """Consecutive input files ``start .. start + len(paths) - 1``."""

    start: int
    paths: list[str]
    pixels: np.ndarray  # uint8 [len(ok), 1, S, S], the decoded files in order
    ok: list[int]  # positions (within this batch) of the decoded files
    errors: dict[int, str] = field(default_factory=dict)  # position -> reason
    decode_cpu_s: float = 0.0  # CPU seconds the decode threads spent on this batch

    def __len__(self) -> int:
        return len(self.paths)


def default_workers() -> int:
    """Decode threads: as many as cores, at least 2 (so one file's I/O wait never stalls)."""
    return max(2, min(8, os.cpu_count() or 2))


def decode_one(path: str, size: int) -> tuple[np.ndarray | None, str | None, float]:
    """(pixels, None, cpu_s) or (None, reason, cpu_s); never raises for a bad file."""
    t0 = time.thread_time()
    try:
        px, err = load_image(path, size), None
    except ImageError as exc:
        px, err = None, exc.reason
    except MemoryError:
        px, err = None, "not enough memory to decode it"
    except Exception as exc:  # noqa: BLE001 -- a decoder bug on hostile input must not end the run
        text = str(exc).strip().splitlines()
        px, err = None, f"cannot decode: {type(exc).__name__}" + (f": {text[0]}" if text else "")
    return px, err, time.thread_time() - t0


def decode_batches(files: Sequence[str], size: int, batch: int = 32, workers: int | None = None,
                   start: int = 0, ahead: int = 2,
                   known: dict[str, str] | None = None) -> Iterator[Batch]:
    """Yield ``files[start:]`` as decoded batches, in order, decoding ahead in threads.

    ``known`` maps paths that already failed (a folder that cannot be listed) to their reason:
    they come back as failures without being opened."""
    known = known or {}
    if batch < 1:
        raise ValueError("batch must be at least 1")
    pool = ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="decode")
    pending: deque[Future] = deque()
    todo = iter(range(start, len(files)))
    limit = batch * (ahead + 1)

    def fill():
        while len(pending) < limit:
            i = next(todo, None)
            if i is None:
                return
            if files[i] in known:
                done: Future = Future()
                done.set_result((None, known[files[i]], 0.0))
                pending.append(done)
            else:
                pending.append(pool.submit(decode_one, files[i], size))

    try:
        fill()
        pos = start
        while pending:
            futures = [pending.popleft() for _ in range(min(batch, len(pending)))]
            fill()  # keep the pool busy while the consumer waits for and runs this batch
            yield _assemble(pos, files, [f.result() for f in futures], size)
            pos += len(futures)
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _assemble(start: int, files: Sequence[str], results, size: int) -> Batch:
    ok = [j for j, r in enumerate(results) if r[0] is not None]
    pixels = np.empty((len(ok), 1, size, size), dtype=np.uint8)
    for k, j in enumerate(ok):
        pixels[k] = results[j][0]
    errors = {j: r[1] for j, r in enumerate(results) if r[0] is None}
    return Batch(start, list(files[start:start + len(results)]), pixels, ok, errors,
                 sum(r[2] for r in results))


def decode_labelled(samples, size: int, workers: int = 4):
    """(pixels [N,1,S,S] uint8, labels [N], failed [ImageError]) for ``(path, label)`` samples,
    all in memory: the labelled decoding of eval, training, INT8 calibration and parity. A file
    that cannot be decoded is left out and named in ``failed`` (:func:`decode_one`'s reason)."""
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="decode") as pool:
        results = list(pool.map(lambda s: decode_one(s[0], size)[:2], samples))
    ok = [(px, s[1]) for (px, _), s in zip(results, samples) if px is not None]
    failed = [ImageError(s[0], err) for (px, err), s in zip(results, samples) if px is None]
    pixels = np.stack([o[0] for o in ok]) if ok else np.zeros((0, 1, size, size), np.uint8)
    return pixels, np.array([o[1] for o in ok], dtype=np.int64), failed


def predict(runtime, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
    """``runtime``'s probabilities [N, C] for ``pixels``, ``batch`` images at a time."""
    out = [runtime(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
    return np.concatenate(out) if out else np.zeros((0, len(runtime.card.classes)), np.float32)


def predict_outputs(runtime, pixels: np.ndarray, batch: int = 32):
    """(probabilities [N, C], the ood score [N] or None for a model without a gate)."""
    outs = [runtime.outputs(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
    probs = np.concatenate([o["probs"] for o in outs]) if outs else \
        np.zeros((0, len(runtime.card.classes)), np.float32)
    has = bool(outs) and outs[0].get("ood") is not None
    return probs, (np.concatenate([o["ood"] for o in outs]) if has else None)

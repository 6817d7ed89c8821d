"""``pneumo-edge score ... --ray [ADDRESS]``: the same scoring on a Ray cluster, with Ray Data.

The file list (walked on the driver, as local scoring walks it) becomes a Ray dataset of
``(index, path bytes)``; tasks decode it with :func:`pneumo_edge.inputs.pipeline.decode_one` (the one
preprocessing and its error reasons); an actor pool runs the model (each actor opens the model
file once, the very file the driver opened and checked: same sha256, or the actor refuses; one
GPU per actor when the cluster has GPUs); the results stream back to the driver in input order
and go through :func:`pneumo_edge.commands.score.score_files` like local batches. So the CSV (header,
rows, error rows, number formats, DICOM columns), the ``-o`` file with its provenance record,
and ``--resume`` are local scoring's own: rows are written in input order to ``FILE.partial``
as they arrive, and a rerun with ``--resume`` skips the rows already written. The driver is the
only writer, so worker nodes need no shared file system for the output (they do need to read
the input paths).

Failures: a killed decode task is retried and a killed actor is restarted by Ray (its batch is
run again); rows are written by index, once each, and a gap or repeat in the stream is an
error, never a silently shifted CSV. Ray is imported only here, only when ``--ray`` is used.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass

import numpy as np

from pneumo_edge.errors import ModelError, PneumoError, UsageError
from pneumo_edge.inputs.pipeline import Batch

INSTALL_HINT = "--ray needs Ray Data: pip install 'pneumo-edge[ray]' (or pip install 'ray[data]')"
_ADDRESS = re.compile(r"^(auto|local|ray://[^\s]+|[A-Za-z0-9_.\-\[\]:]+:\d+)$")


def check_address(address: str) -> str:
    """``local`` (a Ray instance started for this run), ``auto`` (the cluster this machine
    belongs to, or RAY_ADDRESS), ``HOST:PORT`` or ``ray://HOST:PORT``."""
    if not _ADDRESS.match(address):
        raise UsageError(f"--ray {address!r}: not a Ray address (local, auto, HOST:PORT or "
                         "ray://HOST:PORT); write --ray=ADDRESS, or put --ray after the paths")
    return address


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


@dataclass
class RayBatch(Batch):
    """A :class:`Batch` whose probabilities were computed on the cluster (``probs``: one row
    per decoded file, in ``ok`` order)."""

    probs: np.ndarray | None = None


class RayScorer:
    """Stands in for the driver's runtime in :func:`pneumo_edge.commands.score.score_files`: it has the
    runtime's name, card, file and sha256 (for the provenance record), runs it for the local
    pre-flight check, and supplies the decoded-and-scored batches from Ray (``batches``)."""

    def __init__(self, runtime, address: str = "local", *, log=None, actors: int | None = None):
        self.rt, self.address = runtime, check_address(address)
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.actors = actors
        self.started = False
        self.actor_runtimes: set = set()
        import_ray()  # say how to install it before any row is written

    def __getattr__(self, name):  # name, device, card, path, sha256, precision
        return getattr(self.rt, name)

    def __call__(self, pixels):
        return self.rt(pixels)

    def batches(self, files, size, batch, workers=None, start=0, known=None):
        """Like :func:`pneumo_edge.inputs.pipeline.decode_batches`: ``files[start:]`` as batches in
        input order, each carrying its probabilities."""
        if start >= len(files):
            return
        ray = self._connect()
        try:
            yield from self._stream(ray, files, size, batch, start, known or {})
        finally:
            self.close()

    def _connect(self):
        ray = import_ray()
        if not ray.is_initialized():
            kwargs = {"address": None if self.address == "local" else self.address,
                      "include_dashboard": False, "log_to_driver": False,
                      "logging_level": logging.WARNING}
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UsageError(f"--ray {self.address}: cannot connect "
                                 f"({str(exc).strip().splitlines()[0][:160]})") from None
            self.started = True
        return ray

    def close(self):
        if self.started:
            import ray

            ray.shutdown()
            self.started = False

    def _stream(self, ray, files, size, batch, start, known):
        ds = dataset(ray, files, start, known, size, batch, self.rt, self.actors)
        expect = start
        for block in _guarded(iter(ds.iter_batches(batch_size=batch, batch_format="numpy"))):
            idx = block["i"].astype(np.int64)
            if len(idx) and (idx[0] != expect or np.any(np.diff(idx) != 1)):
                raise PneumoError(f"Ray returned rows out of order (expected file {expect}, "
                                  f"got {int(idx[0])}); nothing after row {expect} was written")
            expect += len(idx)
            self.actor_runtimes.update(set(block["runtime"].tolist()))
            yield _batch(files, block)
        if expect != len(files):
            raise PneumoError(f"Ray returned {expect - start} of {len(files) - start} rows; "
                              "rerun with --resume")
        if self.actor_runtimes:
            self.log("ray actors ran: " + ", ".join(sorted(self.actor_runtimes)))


def _guarded(blocks):
    """Ray's own failures (a task that kept failing, an actor that cannot open the model)
    as one line: the rows written so far stay, --resume continues."""
    while True:
        try:
            block = next(blocks)
        except StopIteration:
            return
        except PneumoError:
            raise
        except Exception as exc:  # noqa: BLE001 -- Ray wraps the cause in its own types
            cause = getattr(exc, "cause", None) or exc
            text = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
            raise ModelError(f"Ray scoring failed: {text[:240]}") from None
        yield block


def _batch(files, block) -> RayBatch:
    idx = block["i"].astype(np.int64)
    errors = [str(e) for e in block["error"]]
    ok = [j for j, e in enumerate(errors) if not e]
    return RayBatch(int(idx[0]), [files[i] for i in idx],
                    np.zeros((0, 1, 1, 1), np.uint8), ok,
                    {j: e for j, e in enumerate(errors) if e},
                    float(np.sum(block["cpu_s"])),
                    probs=np.asarray(block["probs"], np.float32)[ok])


def cluster_plan(ray, actors: int | None):
    """(number of model actors, GPUs per actor): one actor per GPU when the cluster has GPUs,
    else one per four CPUs (at least one), leaving CPUs to the decode tasks."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus:
        return actors or gpus, 1
    return actors or max(1, int(res.get("CPU", 1)) // 4), 0


def dataset(ray, files, start, known, size, batch, rt, actors=None):
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in input order
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # stderr: our summary, not Ray's
    n_actors, gpus = cluster_plan(ray, actors)
    items = [{"i": i, "path": os.fsencode(files[i]), "known": known.get(files[i], "")}
             for i in range(start, len(files))]
    blocks = max(1, min(len(items), -(-len(items) // (batch * 4))))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(_decode, fn_kwargs={"size": size}, batch_size=batch,
                        batch_format="numpy", num_cpus=1)
    return ds.map_batches(
        _ScoreActor, fn_constructor_kwargs={"file": str(rt.path), "runtime": rt.name,
                                            "sha256": rt.sha256,
                                            "classes": len(rt.card.classes)},
        batch_size=batch, batch_format="numpy", compute=ActorPoolStrategy(size=n_actors),
        num_gpus=gpus, num_cpus=0 if gpus else 1)  # Ray Data retries tasks and restarts
    # actors without limit by default (max_retries, max_restarts, max_task_retries = -1)


def _decode(block: dict, size: int) -> dict:
    """Decode task: pixels (zeros for a failed file) and the reason it failed."""
    from pneumo_edge.inputs.pipeline import decode_one

    n = len(block["i"])
    pixels = np.zeros((n, 1, size, size), np.uint8)
    errors, cpu = [], np.zeros(n, np.float64)
    for j in range(n):
        if block["known"][j]:
            errors.append(str(block["known"][j]))
            continue
        px, err, cpu[j] = decode_one(os.fsdecode(bytes(block["path"][j])), size)
        if px is not None:
            pixels[j] = px
        errors.append(err or "")
    return {"i": block["i"], "pixels": pixels, "error": np.array(errors, dtype=object),
            "cpu_s": cpu}


class _ScoreActor:
    """One model load per actor: the file the driver opened, with the runtime it chose."""

    def __init__(self, file: str, runtime: str, sha256: str, classes: int):
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        from pneumo_edge.runtimes import open_runtime

        self.rt = open_runtime(file, runtime, log=lambda m: None)
        if self.rt.sha256 != sha256:
            raise ModelError(f"{file}: on this Ray node its sha256 is {self.rt.sha256[:12]}, "
                             f"the driver checked {sha256[:12]}: not the same model file")
        self.classes = classes
        self.tag = f"{self.rt.name} on {self.rt.device}"

    def __call__(self, block: dict) -> dict:
        errors = block["error"]
        ok = np.array([not e for e in errors], bool)
        probs = np.full((len(errors), self.classes), np.nan, np.float32)
        if ok.any():
            out = np.asarray(self.rt(np.ascontiguousarray(block["pixels"][ok])), np.float32)
            if out.shape != (int(ok.sum()), self.classes):
                raise ModelError(f"the {self.rt.name} model returned shape {out.shape} for a "
                                 f"batch of {int(ok.sum())} (mismatched model)")
            probs[ok] = out
        return {"i": block["i"], "probs": probs, "error": errors, "cpu_s": block["cpu_s"],
                "runtime": np.array([self.tag] * len(errors), dtype=object)}

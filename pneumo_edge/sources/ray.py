"""``pneumo-edge score ... --ray [ADDRESS]``: the same scoring on a Ray cluster, with Ray Data.

The file list (walked on the driver, as local scoring walks it) becomes a Ray dataset of
``(index, path bytes)``; tasks decode it with :func:`pneumo_edge.inputs.pipeline.decode_one` (the one
preprocessing and its error reasons); an actor pool runs the model (each actor opens the model
file once, the very file the driver opened and checked: same sha256, or the actor refuses; one
GPU per actor when the cluster has GPUs; probabilities and, for a model with that output, its
ood score); the qc column's pixel check (:func:`pneumo_edge.model.qc.blank_reason`) runs in the
decode tasks, since the pixels stay on the cluster; the results stream back to the driver in
input order
and go through :func:`pneumo_edge.commands.score.score_source` like local batches. So the CSV (header,
rows, error rows, number formats, DICOM columns), the ``-o`` file with its provenance record,
and ``--resume`` are local scoring's own: rows are written in input order to ``FILE.partial``
as they arrive, and a rerun with ``--resume`` skips the rows already written. The driver is the
only writer, so worker nodes need no shared file system for the output (they do need to read
the input paths).

Failures: a killed decode task is retried and a killed actor is restarted by Ray (its batch is
run again); rows are written by index, once each, and a gap or repeat in the stream is an
error, never a silently shifted CSV. Ray is imported only here, only when ``--ray`` is used.

Reaching the cluster: a ``HOST:PORT`` (or ``ray://HOST:PORT``) address is probed before Ray is
started (:func:`probe`): nothing listening, no route, or a server that does not answer as a
gRPC (HTTP/2) server does, as Ray's GCS and Ray Client do, is one :class:`UsageError` (exit 2)
within :data:`PROBE_TIMEOUT_S` seconds each for the connection and the answer, instead of Ray's
own minute of retries and C++ warnings on stderr.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time

import numpy as np

from pneumo_edge.errors import ModelError, PneumoError, UsageError
from pneumo_edge.sources import ModelInfo, ScoredBatch

INSTALL_HINT = "--ray needs Ray Data: pip install 'pneumo-edge[ray]' (or pip install 'ray[data]')"
_ADDRESS = re.compile(r"^(auto|local|ray://[^\s]+|[A-Za-z0-9_.\-\[\]:]+:\d+)$")


def check_address(address: str) -> str:
    """``local`` (a Ray instance started for this run), ``auto`` (the cluster this machine
    belongs to, or RAY_ADDRESS), ``HOST:PORT`` or ``ray://HOST:PORT``."""
    if not _ADDRESS.match(address):
        raise UsageError(f"--ray {address!r}: not a Ray address (local, auto, HOST:PORT or "
                         "ray://HOST:PORT); write --ray=ADDRESS, or put --ray after the paths")
    return address


#: seconds for the TCP connection, and again for the server's first answer, of :func:`probe`
PROBE_TIMEOUT_S = 4.0
#: the HTTP/2 client connection preface and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5)
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Refuse (:class:`UsageError`) a ``HOST:PORT`` or ``ray://HOST:PORT`` address where no
    gRPC server answers: a server speaking HTTP/2 sends its SETTINGS frame first. ``local``
    and ``auto`` are Ray's to resolve and pass unprobed."""
    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except (OSError, ValueError) as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else \
            (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)
        raise UsageError(f"--ray {address}: cannot connect ({why}); is the Ray cluster up "
                         "at that address?") from None
    with sock:
        try:
            sock.settimeout(timeout)
            sock.sendall(_H2_PREFACE)
            head = _read_exactly(sock, 9)
        except OSError:
            head = b""
    if len(head) < 9 or head[3] != 0x4:  # frame type 4: SETTINGS
        raise UsageError(f"--ray {address}: the server there does not speak Ray (no gRPC "
                         f"answer within {timeout:g} s); give the Ray head's GCS address (port "
                         "6379 by default) or ray://HOST:10001")


def _read_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


class RaySource:
    """Scored batches from a Ray cluster: decode tasks and an actor pool running the file
    ``runtime`` (opened and checked on the driver) was opened from, with the same runtime."""

    def __init__(self, runtime, address: str = "local", *, batch: int = 32, log=None,
                 actors: int | None = None):
        self.model = ModelInfo.of(runtime)
        self.address, self.batch = check_address(address), batch
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.actors, self.workers = actors, 0
        self.started = False
        self.actor_runtimes: set = set()
        import_ray()  # say how to install it before any row is written
        probe(self.address)  # an unreachable cluster: one line before any row is written

    def batches(self, files, start=0, known=None):
        """``files[start:]`` as scored batches in input order, each carrying its
        probabilities, ood scores and pixel checks (no pixels: they stay on the cluster)."""
        if start >= len(files):
            return
        ray = self._connect()
        try:
            yield from self._stream(ray, files, start, known or {})
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

    def _stream(self, ray, files, start, known):
        ds = dataset(ray, files, start, known, self.model, self.batch, self.actors)
        self.workers = int(ray.cluster_resources().get("CPU", 0))
        expect, blocks = start, iter(ds.iter_batches(batch_size=self.batch, batch_format="numpy"))
        while True:
            t0 = time.perf_counter()
            block = _next_block(blocks)
            if block is None:
                break
            idx = block["i"].astype(np.int64)
            if len(idx) and (idx[0] != expect or np.any(np.diff(idx) != 1)):
                raise PneumoError(f"Ray returned rows out of order (expected file {expect}, "
                                  f"got {int(idx[0])}); nothing after row {expect} was written")
            expect += len(idx)
            self.actor_runtimes.update(set(block["runtime"].tolist()))
            yield _batch(files, block, time.perf_counter() - t0)
        if expect != len(files):
            raise PneumoError(f"Ray returned {expect - start} of {len(files) - start} rows; "
                              "rerun with --resume")
        if self.actor_runtimes:
            self.log("ray actors ran: " + ", ".join(sorted(self.actor_runtimes)))


def _next_block(blocks):
    """The next block from Ray (None at the end); Ray's own failures (a task that kept
    failing, an actor that cannot open the model) as one line: the rows written so far stay,
    --resume continues."""
    try:
        return next(blocks)
    except StopIteration:
        return None
    except PneumoError:
        raise
    except Exception as exc:  # noqa: BLE001 -- Ray wraps the cause in its own types
        cause = getattr(exc, "cause", None) or exc
        text = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
        raise ModelError(f"Ray scoring failed: {text[:240]}") from None


def _batch(files, block, wait_s: float) -> ScoredBatch:
    idx = block["i"].astype(np.int64)
    errors = [str(e) for e in block["error"]]
    ok = [j for j, e in enumerate(errors) if not e]
    ood = np.asarray(block["ood"], np.float32)[ok] if np.all(block["has_ood"]) else None
    return ScoredBatch(int(idx[0]), [files[i] for i in idx], ok,
                       {j: e for j, e in enumerate(errors) if e},
                       np.asarray(block["probs"], np.float32)[ok], ood=ood,
                       blank=[str(block["blank"][j]) for j in ok],
                       decode_cpu_s=float(np.sum(block["cpu_s"])), wait_s=wait_s)


def cluster_plan(ray, actors: int | None):
    """(number of model actors, GPUs per actor): one actor per GPU when the cluster has GPUs,
    else one per four CPUs (at least one), leaving CPUs to the decode tasks."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus:
        return actors or gpus, 1
    return actors or max(1, int(res.get("CPU", 1)) // 4), 0


def dataset(ray, files, start, known, model: ModelInfo, batch, actors=None):
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
    ds = ds.map_batches(_decode, fn_kwargs={"size": model.card.image_size}, batch_size=batch,
                        batch_format="numpy", num_cpus=1)
    return ds.map_batches(
        _ScoreActor, fn_constructor_kwargs={"file": str(model.path), "runtime": model.name,
                                            "sha256": model.sha256,
                                            "classes": len(model.card.classes)},
        batch_size=batch, batch_format="numpy", compute=ActorPoolStrategy(size=n_actors),
        num_gpus=gpus, num_cpus=0 if gpus else 1)  # Ray Data retries tasks and restarts
    # actors without limit by default (max_retries, max_restarts, max_task_retries = -1)


def _decode(block: dict, size: int) -> dict:
    """Decode task: pixels (zeros for a failed file), the reason it failed, and the qc
    column's pixel check of each decoded file (the pixels do not travel to the driver)."""
    from pneumo_edge.inputs.pipeline import decode_one
    from pneumo_edge.model.qc import blank_reason

    n = len(block["i"])
    pixels = np.zeros((n, 1, size, size), np.uint8)
    errors, blank, cpu = [], [""] * n, np.zeros(n, np.float64)
    for j in range(n):
        if block["known"][j]:
            errors.append(str(block["known"][j]))
            continue
        px, err, cpu[j] = decode_one(os.fsdecode(bytes(block["path"][j])), size)
        if px is not None:
            pixels[j] = px
            blank[j] = blank_reason(px)
        errors.append(err or "")
    return {"i": block["i"], "pixels": pixels, "error": np.array(errors, dtype=object),
            "blank": np.array(blank, dtype=object), "cpu_s": cpu}


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
        """Probabilities (NaN rows for failed files) and the model's ood score (NaN where it
        has none: ``has_ood`` says whether it has that output)."""
        from pneumo_edge.sources.local import run_outputs

        errors = block["error"]
        ok = np.array([not e for e in errors], bool)
        probs = np.full((len(errors), self.classes), np.nan, np.float32)
        ood = np.full(len(errors), np.nan, np.float32)
        has_ood = False
        if ok.any():
            p, o = run_outputs(self.rt, np.ascontiguousarray(block["pixels"][ok]), self.classes)
            probs[ok] = p
            if o is not None:
                ood[ok], has_ood = o, True
        return {"i": block["i"], "probs": probs, "ood": ood,
                "has_ood": np.full(len(errors), has_ood), "error": errors,
                "blank": block["blank"], "cpu_s": block["cpu_s"],
                "runtime": np.array([self.tag] * len(errors), dtype=object)}

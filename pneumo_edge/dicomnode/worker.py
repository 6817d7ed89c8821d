"""Scoring what the node received, in batches, exactly once.

``results.csv`` is the journal: the scoring CSV contract (:mod:`pneumo_edge.outputs.csvout`
header and rows, the DICOM UID columns), one row per received instance, appended and fsynced
per batch. A batch is committed in this order, each step atomic and durable:

1. score the files (:func:`pneumo_edge.commands.score.score_files`, the one preprocessing):
   :meth:`Worker.run`, in the node's main thread;
2. write the result objects of each scored row into ``staging/<uid>/``, then fsync them all
   with their folders (together, on a few threads) and ``staging/``;
3. append the rows to ``results.csv`` (the commit point);
4. move ``staging/<uid>/`` to ``outbox/<uid>/`` (``dicom/<uid>/`` without ``--send-to``) and
   ``received/<uid>.dcm`` to ``scored/``.

Steps 2-4 are :meth:`Worker.commit`; the node runs them in its commit thread
(:mod:`pneumo_edge.dicomnode.committer`) while step 1 runs on the next batch. Batches are
committed one at a time, in the order they were scored.

After a kill at any point, :class:`Worker` repairs on start: a torn last row is cut; a received
file that already has a row moves to ``scored/``; staged objects of committed rows move on, the
others are deleted and made again when their instance is scored. So every instance gets one row
and one set of objects.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumo_edge.atomic import fsync_dir
from pneumo_edge.commands.options import SCORE_DEFAULTS
from pneumo_edge.dicomnode.store import crash_point
from pneumo_edge.errors import PneumoError
from pneumo_edge.outputs.csvout import (
    csv_line,
    dicom_columns,
    header,
    lock_writer,
    one_line,
    open_new_or_regular,
    path_text,
    read_rows,
)


class Results:
    """``results.csv``: created with its header, or checked and its torn tail cut."""

    def __init__(self, path: Path, head: list[str], on_row=None):
        self.path = path
        self._f = os.fdopen(open_new_or_regular(path), "r+b")
        lock_writer(self._f, path)
        keep = 0
        for row, end in read_rows(self._f, path):
            if keep == 0 and row != head:
                raise PneumoError(
                    f"{path}: its header is not this node's {','.join(head)!r} (another "
                    "model's, or written before a column was added, such as qc); use another "
                    f"--out folder, or stop the node with SIGTERM, move {path.name} aside and "
                    "start it again (a new results.csv is begun; what was scored stays scored)")
            if keep and on_row is not None:
                on_row(row)
            keep = end
        self._f.truncate(keep)
        self._f.seek(keep)
        if keep == 0:
            self.append([head])

    def append(self, rows) -> None:
        self._f.write("".join(csv_line(r) for r in rows).encode("utf-8"))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


@dataclass
class Scored:
    """A batch after :meth:`Worker.run`: its files, its rows (the SR column still empty), the
    (row, :func:`build_objects` job) of each row that gets objects, and the seconds it took."""

    files: list[Path]
    rows: list[list[str]]
    todo: list
    seconds: float


class _Rows:
    """A sink for :func:`score_files` that keeps the rows."""

    partial = None

    def __init__(self):
        self.rows: list[list[str]] = []

    def write(self, rows) -> None:
        self.rows.extend(rows)


class Worker:
    def __init__(self, store, runtime, *, send: bool, explain: bool = False,
                 workers: int | None = None, log=print, qc: str = SCORE_DEFAULTS.qc,
                 builder=None):
        """``qc``: ``--qc`` flag, refuse or off, as score's (the same
        :class:`pneumo_edge.model.qc.Gatekeeper` fills the ``qc`` column). ``builder``: a
        :class:`pneumo_edge.dicomnode.builder.BuilderProcess` that builds the result objects
        (the node's), else they are built in the thread that commits."""
        self.store, self.rt, self.log, self.workers = store, runtime, log, workers
        self.builder = builder
        self.send, self.explain = send, explain
        self.card = runtime.card
        from pneumo_edge.model.qc import Gatekeeper
        from pneumo_edge.outputs.dicom_objects import SR_COLUMN, quiet

        quiet()  # in the main thread, before decode, sender and network threads start
        self.gate = Gatekeeper(self.card, qc)
        self.head = header(self.card.classes, ["qc", *dicom_columns(1), SR_COLUMN])
        self.qc_column = self.head.index("qc")
        self.staging = store.out / "staging"
        self.ready = store.out / ("outbox" if send else "dicom")
        self.results = Results(store.out / "results.csv", self.head, self._recover_row)
        self._recover_staging()
        self._explainer = None
        self._pool = None

    def _recover_row(self, row) -> None:
        name = Path(row[0]).name
        if (self.store.received / name).exists():
            self.store.mark_scored(name)
            self.log(f"recovered: {name} already has its row; not scored again")

    def _recover_staging(self) -> None:
        for d in sorted(self.staging.iterdir()):
            if (self.store.scored / f"{d.name}.dcm").exists():
                self._promote(d.name)
            else:
                shutil.rmtree(d, ignore_errors=True)
        self.store.sync()

    def score(self, files: list[Path]) -> list[list[str]]:
        """Score, stage, commit and move ``files`` (one batch), here; returns their rows."""
        return self.commit(self.run(files))

    def run(self, files: list[Path]) -> Scored:
        """The first stage of a batch: decode, model and heatmaps (the runtime's work); nothing
        is written. :meth:`commit` does the rest, possibly in another thread
        (:class:`pneumo_edge.dicomnode.committer.Committer`) while this scores the next batch."""
        from pneumo_edge.commands.score import score_files

        t0 = time.perf_counter()
        sink = _Rows()
        score_files([str(p) for p in files], self.rt, sink, batch=max(1, len(files)),
                    workers=self.workers, dicom_tags=(), gate=self.gate)
        rows = [r[:-1] + [""] + r[-1:] for r in sink.rows]  # the SR column, before error
        todo = []
        for row, f in zip(rows, files):
            row[0] = path_text(str(self.store.scored / f.name))
            job = self._job(f, row) if row[1] else None
            if job:
                todo.append((row, job))
        return Scored(list(files), rows, todo, time.perf_counter() - t0)

    def commit(self, batch: Scored) -> list[list[str]]:
        """The second stage: write each scored row's result objects into ``staging/``, append
        the rows to ``results.csv`` (the commit), move the objects on and the instances to
        ``scored/``; returns the rows."""
        rows, todo = batch.rows, batch.todo
        for (row, _), (stem, sr, error) in zip(todo, self._build([j for _, j in todo])):
            if error:
                self.log(f"no result objects for {stem}.dcm: {error}")
            else:
                row[-2] = path_text(str(self.store.out / "dicom" / sr.relative_to(self.staging)))
        fsync_dir(self.staging)
        crash_point("staged")
        self.results.append(rows)
        crash_point("committed")
        for i, f in enumerate(batch.files):
            self.store.mark_scored(f.name)
            if i == 1:
                crash_point("moving")  # half the batch moved
            self._promote(f.stem)
        self.store.sync()
        return rows

    def _job(self, src: Path, row: list[str]):
        """What :func:`build_objects` needs for one scored row, or None (logged) when it gets
        no objects."""
        from pneumo_edge.outputs.dicom_objects import ResultInfo

        if row[-3] != src.stem:  # the dataset's SOP Instance UID (sop_uid column)
            self.log(f"no result objects for {src.name}: the dataset's SOP Instance UID is "
                     "not the one it was sent with")
            return None
        info = ResultInfo.from_row(self.rt, row, self.head, self.card.threshold, "card")
        try:
            heat = self._heatmap(src) if self.explain else None
        except Exception as exc:  # noqa: BLE001 -- one instance's heatmap never stops the node
            self.log(f"no result objects for {src.name}: {one_line(str(exc))[:200]}")
            return None
        return src, info, self.staging, heat

    def _build(self, jobs: list) -> list:
        """:func:`build_objects` for each job, in order (in the builder process, else in this
        thread), without fsyncs; then each instance's files and folder are fsynced, all
        instances at once on a few threads (system calls without the GIL; the disk commits
        them together, instead of three waits in a row per instance); an instance whose files
        cannot be made durable gets none.
        (Measured: building on four threads made the node slower: building is Python and they
        fought over the GIL with the scoring thread; hence the builder process, which dies
        with the node.)"""
        built = self.builder.build(jobs) if self.builder else [build_objects(j) for j in jobs]
        folders = [self.staging / stem for stem, _, error in built if not error]
        failed = dict(zip(folders, self._fsyncs().map(fsync_folder, folders)))
        out = []
        for stem, sr, error in built:
            if not error and failed.get(self.staging / stem):
                shutil.rmtree(self.staging / stem, ignore_errors=True)
                sr, error = None, failed[self.staging / stem]
            out.append((stem, sr, error))
        return out

    def _fsyncs(self):
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="fsync")
        return self._pool

    def close(self) -> None:
        self.results.close()
        if self._pool is not None:
            self._pool.shutdown()

    def _heatmap(self, src: Path) -> np.ndarray:
        from pneumo_edge.explain.methods import Explainer
        from pneumo_edge.inputs.images import load_image
        from pneumo_edge.outputs.dicom_objects import heatmap_picture

        if self._explainer is None:
            self._explainer = Explainer(self.rt, "occlusion")
        image = load_image(src, self.card.image_size)
        return heatmap_picture(self._explainer, image, self.card.threshold)

    def _promote(self, stem: str) -> None:
        d = self.staging / stem
        if not d.exists():
            return
        if not any(d.iterdir()):
            d.rmdir()
            return
        target = self.ready / stem
        if target.exists():
            shutil.rmtree(target)
        os.replace(d, target)


#: threads that fsync a batch's result objects (:meth:`Worker._build`)
FSYNC_THREADS = 8


def build_objects(job) -> tuple[str, Path | None, str]:
    """(source UID, SR path, "") or (source UID, None, reason) for one ``(source, ResultInfo,
    staging folder, heatmap or None)``: the SR (+ SC) written into ``staging/<uid>/``, not yet
    fsynced (:func:`fsync_folder`)."""
    from pneumo_edge.outputs.dicom_objects import write_result_objects

    src, info, staging, heat = job
    shutil.rmtree(staging / src.stem, ignore_errors=True)
    try:
        return src.stem, write_result_objects(src, info, staging, heat, sync=False)[0], ""
    except Exception as exc:  # noqa: BLE001 -- one instance's objects never stop the node
        shutil.rmtree(staging / src.stem, ignore_errors=True)
        return src.stem, None, one_line(str(exc))[:200]


def fsync_folder(folder: Path) -> str:
    """fsync each file in ``folder``, then ``folder``: "" or why not (no values)."""
    try:
        for path in folder.iterdir():
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as exc:
        return f"its objects cannot be made durable ({exc.strerror or type(exc).__name__})"
    fsync_dir(folder)
    return ""


def wait_for_batch(store, batch: int, max_wait: float, stop, arrived,
                   busy=frozenset) -> list[Path]:
    """The next batch: ``batch`` files, or fewer once the oldest waited ``max_wait`` seconds or
    the node is stopping; [] when stopping and nothing is left. ``busy()``: the names being
    committed (:meth:`pneumo_edge.dicomnode.committer.Committer.busy`), left out."""
    while True:
        files = store.pending(busy())
        if files and (len(files) >= batch or stop.is_set()):
            return files[:batch]
        if files:
            age = time.time() - files[0].stat().st_mtime
            if age >= max_wait:
                return files[:batch]
            timeout = max_wait - age
        elif stop.is_set():
            return []
        else:
            timeout = 0.5
        arrived.wait(min(timeout, 0.5))
        arrived.clear()

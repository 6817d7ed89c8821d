"""The node's second pipeline stage: a thread that commits scored batches
(:meth:`pneumo_edge.dicomnode.worker.Worker.commit`: result objects built and written, the
rows appended to ``results.csv``, files moved) in the order they were scored, while the main
thread decodes and scores the next batch (onnxruntime and the fsyncs release the GIL).

Nothing about durability changes: a batch counts as done only when its rows are in
``results.csv`` (fsynced), and until then its instances stay in ``received/``. A kill -9 while
batch k is being committed and batch k+1 waits here, scored, loses only work: on restart both
are scored again from ``received/`` (the worker's repair deletes uncommitted staged objects),
so each instance still gets one row and one set of objects. At most one scored batch waits
(``depth``), so memory stays bounded whatever the arrival rate.
"""

from __future__ import annotations

import queue
import threading
import time

from pneumo_edge.dicomnode.store import crash_point


class Committer:
    """Commits ``worker``'s scored batches in a thread, in order; ``done(batch, rows, seconds)``
    after each. An error in the thread stops the pipeline, calls ``on_error()`` (the node
    stops) and is raised again in the caller at the next :meth:`submit` or :meth:`drain`."""

    def __init__(self, worker, done=None, on_error=None, depth: int = 1):
        self.worker, self.done = worker, done or (lambda batch, rows, seconds: None)
        self.on_error = on_error or (lambda: None)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="pneumo-edge-commit",
                                        daemon=True)
        self._thread.start()

    def busy(self) -> set[str]:
        """Names (``<uid>.dcm``) of the instances handed over and not yet committed: still in
        ``received/``, not to be scored again."""
        with self._lock:
            return set(self._busy)

    def submit(self, batch) -> None:
        """Hand over a scored batch (:class:`pneumo_edge.dicomnode.worker.Scored`); waits
        while ``depth`` batches already wait."""
        self._check()
        with self._lock:
            self._busy.update(f.name for f in batch.files)
        while True:
            try:
                self._queue.put(batch, timeout=0.5)
                break
            except queue.Full:
                self._check()
        crash_point("handed")  # tests: a scored batch waits while the one before commits

    def drain(self) -> None:
        """Wait until every batch handed over is committed."""
        while self._queue.unfinished_tasks and self._error is None:
            time.sleep(0.02)
        self._check()

    def close(self) -> None:
        """Stop the thread after what was handed over (call :meth:`drain` first to see its
        errors)."""
        self._queue.put(None)
        self._thread.join()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        while (batch := self._queue.get()) is not None:
            try:
                if self._error is None:
                    t0 = time.perf_counter()
                    rows = self.worker.commit(batch)
                    self.done(batch, rows, time.perf_counter() - t0)
                    with self._lock:
                        self._busy.difference_update(f.name for f in batch.files)
            except BaseException as exc:  # noqa: BLE001 -- handed to the main thread
                self._error = exc  # the batch's files stay busy: the node stops
                self.on_error()
            finally:
                self._queue.task_done()
        self._queue.task_done()

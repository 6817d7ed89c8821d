"""The node's folders under ``--out DIR`` and the atomic inbox.

- ``spool/``: where pynetdicom streams an instance while it arrives (emptied at start);
- ``received/<SOP Instance UID>.dcm``: accepted, not yet scored. An instance is here, fsynced
  with its folder, before the sender gets its success status;
- ``scored/``: moved here once its row is in ``results.csv``;
- ``staging/<name>/``, ``outbox/<name>/``, ``dicom/<name>/``: result objects being written,
  waiting to be sent, and written or sent (see :mod:`pneumo_edge.dicomnode.worker`).

A SOP Instance UID names the file, so an instance sent again (a sender that did not get its
status because the node was killed retries) is recognised and not scored twice.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

from pneumo_edge.atomic import fsync_dir

#: FOR TESTS ONLY, not a user setting: ``POINT:N`` in this environment variable makes the node
#: SIGKILL itself the N-th time it reaches :func:`crash_point` ``POINT`` (a real kill -9 at an
#: exact step of the commit order, which a kill from outside cannot hit; tests/test_listen.py).
#: Unset (the normal case) every crash point returns at once and does nothing. Points:
#: ``accepted`` (durable, status not sent), ``handed`` (a scored batch handed to the commit
#: thread), ``staged``, ``committed``, ``moving`` (worker), ``sent`` (outbox).
KILL_AT = "PNEUMO_EDGE_NODE_KILL_AT"
_passes: dict[str, int] = {}
#: the node's other process (:mod:`pneumo_edge.dicomnode.network` sets it to the scoring
#: process): a crash point kills it too, as a kill -9 of the node does
PARTNER: int | None = None

FOLDERS = ("spool", "received", "scored", "staging", "outbox", "dicom")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def crash_point(point: str) -> None:
    """Tests only (:data:`KILL_AT`): SIGKILL this process here when that variable names
    ``point`` and this is its N-th pass; without the variable, nothing."""
    want = os.environ.get(KILL_AT)
    if not want or want.rpartition(":")[0] != point:
        return
    _passes[point] = _passes.get(point, 0) + 1
    if str(_passes[point]) == want.rpartition(":")[2]:
        import signal

        if PARTNER:
            os.kill(PARTNER, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def instance_name(sop_uid) -> str | None:
    """``<uid>.dcm`` for a well-formed SOP Instance UID (digits and dots, at most 64), else
    None: an attacker's UID never becomes a path."""
    uid = str(sop_uid or "").strip().rstrip("\0")
    return f"{uid}.dcm" if len(uid) <= 64 and _UID.match(uid) else None


class Store:
    """The node's folders; :meth:`accept` is the only way an instance enters ``received/``."""

    def __init__(self, out: str | os.PathLike, clean: bool = True):
        """``clean``: empty ``spool/`` of what a crash left half-received (the scoring process
        does, before the network process starts, which passes False)."""
        self.out = Path(out)
        for name in FOLDERS:
            (self.out / name).mkdir(parents=True, exist_ok=True)
        self.spool = self.out / "spool"
        self.received, self.scored = self.out / "received", self.out / "scored"
        self._lock = threading.Lock()
        if not clean:
            return
        for leftover in self.spool.iterdir():  # half-received before a crash: never acknowledged
            _remove(leftover)
        for leftover in self.received.glob(".tmp-*"):
            _remove(leftover)

    def known(self, name: str) -> bool:
        return (self.received / name).exists() or (self.scored / name).exists()

    def accept(self, spooled: str | os.PathLike, name: str) -> bool:
        """Make the fully received file ``spooled`` durable as ``received/<name>``: fsync the
        file, rename it in, fsync the folder. False when that instance is already here (not
        stored twice). Raises OSError when the disk refuses (the sender then gets a failure)."""
        with self._lock:
            if self.known(name):
                return False
            fd = os.open(spooled, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(spooled, self.received / name)
            fsync_dir(self.received)
            crash_point("accepted")  # durable, status not yet sent
            return True

    def pending(self, busy=frozenset()) -> list[Path]:
        """``received/`` files, oldest first (arrival order, then name), but those named in
        ``busy`` (handed to the commit stage, moved to ``scored/`` any moment)."""
        files = [p for p in self.received.iterdir() if p.name.endswith(".dcm")
                 and not p.name.startswith(".") and p.name not in busy]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def mark_scored(self, name: str) -> None:
        src = self.received / name
        if src.exists():
            os.replace(src, self.scored / name)

    def sync(self) -> None:
        for name in ("received", "scored", "staging", "outbox", "dicom"):
            fsync_dir(self.out / name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

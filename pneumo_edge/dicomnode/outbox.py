"""The persistent outbox: result objects waiting in ``outbox/<uid>/`` are C-STOREd to
``--send-to``; each file moves to ``dicom/<uid>/`` once the PACS answered success (or a warning),
so it is sent again only when the node was killed between that answer and the move. It then
carries the same SOP Instance UID, which a PACS stores once. A PACS that is down or refuses is
retried with exponential back-off (1 s doubling to 60 s); the files wait on disk across restarts.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from pneumo_edge.atomic import fsync_dir
from pneumo_edge.dicomnode.store import crash_point
from pneumo_edge.errors import UsageError

#: what the node sends: Comprehensive SR and Secondary Capture
SEND_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7")
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
_DEST = re.compile(r"^([^@]{1,16})@(.+):([0-9]{1,5})$")


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        m = _DEST.match(text.strip())
        if not m or not 0 < int(m.group(3)) < 65536 or not m.group(1).strip():
            raise UsageError(f"--send-to {text!r}: expected AET@HOST:PORT")
        return cls(m.group(1).strip(), m.group(2), int(m.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class Sender:
    """Sends ``outbox/`` to ``dest`` as ``calling`` from a thread; :meth:`kick` after new files,
    :meth:`stop` to finish."""

    def __init__(self, out: Path, dest: Destination, calling: str, log=print,
                 timeout: float = 30.0):
        self.outbox, self.sent = out / "outbox", out / "dicom"
        self.dest, self.calling, self.log, self.timeout = dest, calling, log, timeout
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pneumo-edge-sender", daemon=True)
        from pynetdicom import _config

        # a file goes out as it is on disk (no decoding and encoding again: that cost as much
        # as building the SR) when the PACS accepted its transfer syntax; set here, in the main
        # thread, before any association
        _config.STORE_SEND_CHUNKED_DATASET = True
        self.delivered = 0

    def start(self) -> None:
        self._thread.start()

    def kick(self) -> None:
        self._wake.set()

    def stop(self, flush: bool = True) -> None:
        """Stop the thread; with ``flush`` first try once more to send what waits."""
        self._stop.set()
        self._wake.set()
        self._thread.join()
        if flush and self.waiting():
            self.send_all()
        left = len(self.waiting())
        if left:
            self.log(f"outbox: {left} objects wait in {self.outbox} for the next start")

    def waiting(self) -> list[Path]:
        return sorted(p for p in self.outbox.rglob("*.dcm") if p.is_file())

    def _loop(self) -> None:
        delay = BACKOFF_FIRST
        while not self._stop.is_set():
            if not self.waiting():
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            if self.send_all():
                delay = BACKOFF_FIRST
                continue
            self.log(f"outbox: retrying {self.dest} in {delay:.0f} s")
            self._stop.wait(delay)
            delay = min(BACKOFF_MAX, delay * 2)

    def send_all(self) -> bool:
        """One association, every waiting file; True when all were delivered."""
        from pynetdicom import AE

        files = self.waiting()
        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for uid in SEND_CLASSES:
            ae.add_requested_context(uid, _syntaxes())
        try:
            assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title)
        except Exception as exc:  # noqa: BLE001 -- a bad address is one more failed try
            self.log(f"outbox: cannot reach {self.dest}: {type(exc).__name__}")
            return False
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "no association"
            self.log(f"outbox: {self.dest} {why}; {len(files)} objects wait")
            return False
        _no_delay(assoc)
        try:
            ok = True
            for f in files:  # one refused object does not hold back the others
                if not assoc.is_established:
                    return False
                ok = self._send_one(assoc, f) and ok
            return ok
        finally:
            if assoc.is_established:
                assoc.release()

    def _send_one(self, assoc, path: Path) -> bool:
        try:
            try:
                status = assoc.send_c_store(path)
            except ValueError:  # its transfer syntax not accepted: sent decoded, converted
                import pydicom

                status = assoc.send_c_store(pydicom.dcmread(path))
        except Exception as exc:  # noqa: BLE001 -- unreadable file or a lost connection
            self.log(f"outbox: {path.name} not sent: {type(exc).__name__}")
            return False
        code = getattr(status, "Status", None)
        if code is None or not (code == 0 or code & 0xF000 == 0xB000):
            self.log(f"outbox: {self.dest} answered "
                     f"{'no status' if code is None else f'0x{code:04X}'} for {path.name}")
            return False
        crash_point("sent")  # the PACS has it, the outbox does not know yet
        self._delivered(path)
        return True

    def _delivered(self, path: Path) -> None:
        target = self.sent / path.relative_to(self.outbox)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        fsync_dir(target.parent)
        fsync_dir(path.parent)
        for d in (path.parent, path.parent.parent):  # empty <uid>/<source uid>/ folders
            if d != self.outbox and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        self.delivered += 1
        self.log(f"sent {path.name} for {path.parent.name} to {self.dest}")


def _no_delay(assoc) -> None:
    """TCP_NODELAY on the association's socket. Each C-STORE is written in several small
    PDUs and then waits for the answer: with Nagle's algorithm on, the last PDU waits for
    the peer's delayed ACK (40 ms on Linux), which made each object cost ~45 ms to send."""
    import socket

    try:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # another pynetdicom layout, or not TCP: just slower
        pass


def _syntaxes():
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    return [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

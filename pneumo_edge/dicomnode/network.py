"""The node's DICOM network side in a process of its own: the Storage SCP that receives
(:mod:`pneumo_edge.dicomnode.scp`, :mod:`pneumo_edge.dicomnode.store`) and the outbox that
sends (:mod:`pneumo_edge.dicomnode.outbox`), apart from the process that scores.

Why a second process: pynetdicom hands every message through several threads (the socket
reader, the association's reactor, our handler), each hop waiting for the GIL. In the scoring
process, each hop waited for decoding, the gate and SR building to let go of the GIL (up to
the 5 ms switch interval, many times per instance): measured on the 2-core machine, Orthanc
sending 128 CR instances to the receiving side alone took 0.54 s, and 14.3 s with one busy
Python thread beside it. With its own interpreter the network side answers at once, and the
two processes share the cores through the OS scheduler instead of one lock.

What the two processes say to each other, one line each, on pipes:

- scoring -> network (the child's stdin): ``kick`` (new objects wait in the outbox), ``stop``
  (accept no new associations, wait for the open ones), ``finish`` (try the outbox once more,
  exit 0);
- network -> scoring (the child's stdout): ``ready`` (listening), ``error <reason>`` (cannot
  listen; exits 2), ``stored`` (an instance is durable in ``received/``), ``closed`` (after
  ``stop``).

Durability does not depend on the pipe: an instance is acknowledged only once it is in
``received/`` (fsynced), and the scoring process reads that folder. The network process logs
its own events on the shared stderr. When the scoring process dies (kill -9), the child's stdin
closes and it exits at once; on Linux the kernel also kills it
(:func:`pneumo_edge.dicomnode.child.die_with_parent`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

from pneumo_edge.dicomnode import child
from pneumo_edge.errors import UsageError

#: seconds the scoring process waits for the network process to listen, or to finish
START_TIMEOUT, FINISH_TIMEOUT = 60.0, 120.0


class NetworkProcess:
    """The scoring process's handle on the network process. ``on_stored()`` after each new
    durable instance; ``on_gone(code)`` when the child exits before :meth:`finish`."""

    def __init__(self, cfg, on_stored, on_gone):
        settings = {"out": str(cfg.out), "host": cfg.host, "port": cfg.port,
                    "ae_title": cfg.ae_title, "allow": cfg.allow, "send_to": cfg.send_to,
                    "limits": dataclasses.asdict(cfg.limits)}
        self.on_stored, self.on_gone = on_stored, on_gone
        self._events: dict[str, threading.Event] = {k: threading.Event()
                                                    for k in ("ready", "closed")}
        self.error, self.finishing = "", False
        self._lock = threading.Lock()
        self.proc = child.start("pneumo_edge.dicomnode.network", json.dumps(settings))
        self._reader = threading.Thread(target=self._read, name="pneumo-edge-network-pipe",
                                        daemon=True)
        self._reader.start()

    def wait_ready(self) -> None:
        """Block until the child listens; UsageError (exit 2) when it cannot."""
        deadline = time.monotonic() + START_TIMEOUT
        while not self._events["ready"].wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._reader.join(5)
                self.proc.kill()
                self.proc.wait()
                raise UsageError(self.error or "the DICOM network process did not start "
                                 f"(exit code {self.proc.returncode})")

    def kick(self) -> None:
        self._tell("kick")

    def stop_accepting(self, timeout: float) -> None:
        """No new associations; returns once the open ones ended (or ``timeout`` passed)."""
        if self._tell("stop"):
            self._events["closed"].wait(timeout)

    def finish(self) -> int:
        """Send what waits once more and end the child; its exit code."""
        self.finishing = True
        self._tell("finish")
        try:
            return self.proc.wait(FINISH_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._reader.join(5)

    def _tell(self, command: str) -> bool:
        with self._lock:
            try:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
                return True
            except (BrokenPipeError, ValueError, OSError):  # the child is gone
                return False

    def _read(self) -> None:
        for line in self.proc.stdout:
            word, _, rest = line.rstrip("\n").partition(" ")
            if word == "stored":
                self.on_stored()
            elif word == "error":
                self.error = rest
            elif word in self._events:
                self._events[word].set()
        code = self.proc.wait()
        if self._events["ready"].is_set() and not self.finishing:
            self.on_gone(code)


# --- the child --------------------------------------------------------------------------------

_say_lock = threading.Lock()
_out = sys.stdout  # the pipe to the scoring process (child.protocol_out, in serve)


def _say(word: str) -> None:
    with _say_lock:
        _out.write(word + "\n")
        _out.flush()


def serve(settings: dict) -> int:
    """The child's whole life: listen, send, obey the scoring process's commands."""
    import tempfile

    from pneumo_edge.dicomnode import store as store_mod
    from pneumo_edge.dicomnode.logline import stamped
    from pneumo_edge.dicomnode.outbox import Destination, Sender
    from pneumo_edge.dicomnode.scp import Handlers, Limits, make_ae, parse_allow
    from pneumo_edge.inputs.dicom import quiet

    global _out
    child.die_with_parent()
    _out = child.protocol_out()
    store_mod.PARTNER = os.getppid()  # tests' crash points kill the whole node
    quiet()
    limits = Limits(**settings["limits"])
    store = store_mod.Store(settings["out"], clean=False)
    tempfile.tempdir = str(store.spool)  # pynetdicom spools C-STOREs here: same disk, no copy
    dest = settings["send_to"] and Destination.parse(settings["send_to"])
    sender = Sender(store.out, dest, settings["ae_title"], stamped) if dest else None
    ae = make_ae(settings["ae_title"], limits)
    handlers = Handlers(store, parse_allow(settings["allow"]), limits,
                        lambda: _say("stored"), stamped)
    host, port = settings["host"], settings["port"]
    try:
        server = ae.start_server((host, port), block=False, evt_handlers=handlers.bindings())
    except OSError as exc:
        _say(f"error cannot listen on {host}:{port}: {exc.strerror or exc}")
        return 2
    if sender:
        sender.start()
    _say("ready")
    return _obey(server, sender, limits.timeout)


def _obey(server, sender, timeout: float) -> int:
    for line in sys.stdin:
        command = line.strip()
        if command == "kick" and sender:
            sender.kick()
        elif command == "stop":
            server.shutdown()
            deadline = time.monotonic() + timeout
            while server.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            _say("closed")
        elif command == "finish":
            if sender:
                sender.stop(flush=True)
            return 0
    os._exit(1)  # stdin closed: the scoring process is gone; so is this node


if __name__ == "__main__":
    sys.exit(serve(json.loads(sys.argv[1])))

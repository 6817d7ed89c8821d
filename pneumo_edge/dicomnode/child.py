"""The node's helper processes (:mod:`pneumo_edge.dicomnode.network`,
:mod:`pneumo_edge.dicomnode.builder`): started by the scoring process with pipes on their
stdin and stdout, and never outliving it."""

from __future__ import annotations

import os
import subprocess
import sys


def start(module: str, *args: str) -> subprocess.Popen:
    """``python -m module args...`` with line pipes on its stdin and stdout (stderr shared).
    Called from the main thread: on Linux the child's death signal follows the thread that
    started it (:func:`die_with_parent`)."""
    return subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1)


def protocol_out():
    """In the child: a text stream on the pipe to the scoring process, for the protocol's lines
    alone. Whatever else reaches stdout (a library's print) goes to /dev/null from here on: it
    would break the protocol, and it could quote a dataset."""
    fd = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the process's lifetime
    return os.fdopen(fd, "w", buffering=1)


def die_with_parent() -> None:
    """In the child, first: ignore SIGINT and SIGTERM (Ctrl-C reaches the whole process
    group; the scoring process says when to stop) and, on Linux, have the kernel SIGKILL this
    process when the scoring process dies (a kill -9 of the node takes its helpers with it).
    Elsewhere the closed stdin ends it, a moment later."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() == 1:  # the parent died before prctl
        os._exit(1)

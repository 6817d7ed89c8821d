"""The node's log line, the same from each of its processes: one event per line on stderr,
stamped with the UTC time to the millisecond (never a dataset value: the callers name AE
titles, addresses, SOP Instance UIDs and counts)."""

from __future__ import annotations

import sys
import time


def stamped(msg: str) -> None:
    """One log line on stderr, prefixed with the UTC time to the millisecond."""
    now = time.time()
    print(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z "
          + msg, file=sys.stderr, flush=True)

"""The node's result objects (SR, SC) built in a process of its own.

Building an SR is Python work (highdicom's constructor, pydicom's encoding: ~10 ms per image
on the 2-core machine). In the scoring process it held the GIL against decoding and the gate
in the main thread, so the two pipeline stages took turns instead of overlapping. Here it runs
on the other core, and the commit thread only waits for it (without the GIL).

One job per line on the child's stdin (JSON: the received file, the :class:`ResultInfo`, the
staging folder, the heatmap picture or null), one answer per line on its stdout, in order:
``[source UID, SR path or null, reason or ""]``, what
:func:`pneumo_edge.dicomnode.worker.build_objects` returns. Nothing here is fsynced: the commit
thread fsyncs what was built before the rows are appended (the commit order is unchanged).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import sys
from pathlib import Path

from pneumo_edge.dicomnode import child
from pneumo_edge.errors import PneumoError

#: jobs handed over before the first answer is read: the answers waiting in the pipe (a few
#: hundred bytes each) stay far below its 64 KiB, so neither side blocks the other
WINDOW = 32


class BuilderGone(PneumoError):
    """The builder process died (a crash, the OOM killer): the node stops (exit 1); what was
    accepted stays in ``received/`` and is scored when it starts again."""

    exit_code = 1


class BuilderProcess:
    """The scoring process's handle: :meth:`build` a batch's jobs, :meth:`close` at the end.
    Start it from the main thread (:func:`pneumo_edge.dicomnode.child.start`)."""

    def __init__(self):
        self.proc = child.start("pneumo_edge.dicomnode.builder")

    def build(self, jobs: list) -> list[tuple[str, Path | None, str]]:
        """:func:`build_objects` of each ``(source, info, staging, heatmap)`` job, in order;
        :class:`BuilderGone` when the process is gone (the node then stops)."""
        try:
            out: list = []
            for i, job in enumerate(jobs):
                if i - len(out) >= WINDOW:
                    out.append(self._answer())
                self.proc.stdin.write(encode(job) + "\n")
                self.proc.stdin.flush()
            while len(out) < len(jobs):
                out.append(self._answer())
            return out
        except (BrokenPipeError, OSError, ValueError):
            raise BuilderGone("the process that builds the result objects stopped (exit code "
                              f"{self.proc.poll()}); nothing of this batch was committed") from None

    def _answer(self) -> tuple[str, Path | None, str]:
        line = self.proc.stdout.readline()
        if not line:
            raise BrokenPipeError
        stem, sr, error = json.loads(line)
        return stem, Path(sr) if sr else None, error

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()


def encode(job) -> str:
    src, info, staging, heat = job
    picture = None
    if heat is not None:
        picture = {"shape": list(heat.shape), "data": base64.b64encode(heat.tobytes()).decode()}
    return json.dumps({"source": str(src), "info": dataclasses.asdict(info),
                       "staging": str(staging), "heatmap": picture})


def decode(line: str):
    import numpy as np

    from pneumo_edge.outputs.dicom_objects import ResultInfo

    job = json.loads(line)
    heat = job["heatmap"]
    if heat is not None:
        heat = np.frombuffer(base64.b64decode(heat["data"]), np.uint8).reshape(heat["shape"])
    return Path(job["source"]), ResultInfo(**job["info"]), Path(job["staging"]), heat


def serve() -> int:
    from pneumo_edge.dicomnode.worker import build_objects
    from pneumo_edge.outputs.dicom_objects import quiet

    child.die_with_parent()
    out = child.protocol_out()
    quiet()
    for line in sys.stdin:
        stem, sr, error = build_objects(decode(line))
        out.write(json.dumps([stem, str(sr) if sr else None, error]) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(serve())

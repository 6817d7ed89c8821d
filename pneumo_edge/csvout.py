"""The scoring CSV: its header and rows, where it goes (stdout, or ``-o FILE`` written through
``FILE.partial`` and renamed on completion) and how an interrupted ``FILE.partial`` is checked
and continued (``--resume``).

Rows are appended batch by batch and fsynced, so a run that is interrupted (Ctrl-C, SIGTERM,
kill -9, power loss) leaves ``FILE.partial`` holding whole batches plus at most one torn batch
at the end; :func:`read_partial` keeps the complete rows, checks they are a prefix of the input
order, and cuts the rest off.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pneumo_edge.errors import PneumoError

PROB_DIGITS = 6


def header(classes) -> list[str]:
    return ["path", "label", *[f"p_{c}" for c in classes], "error"]


def csv_text(s: str) -> str:
    """A path as it appears in the CSV: file names that are not valid UTF-8 (Linux allows any
    bytes) get backslash escapes, so the CSV itself is always valid UTF-8."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:  # surrogate escapes from os.fsdecode: show the raw bytes
        return os.fsencode(s).decode("utf-8", "backslashreplace")


def one_line(s: str) -> str:
    return " ".join(s.split())


def _writer(f) -> csv.writer:
    return csv.writer(f, lineterminator="\n")


class StdoutSink:
    """CSV rows to stdout (as UTF-8 whatever the locale), flushed after every batch."""

    partial = None

    def __init__(self, head: list[str], stream=None):
        binary = stream if stream is not None else _stdout_binary()
        self._text = io.TextIOWrapper(binary, encoding="utf-8", newline="", write_through=True)
        self._csv = _writer(self._text)
        self.write([head])

    def write(self, rows) -> None:
        self._csv.writerows(rows)
        self._text.flush()

    def finish(self) -> None:
        self.close()

    def close(self) -> None:
        if self._text is not None:
            text, self._text = self._text, None
            try:
                text.flush()
            finally:
                text.detach()  # leave stdout itself open


def _stdout_binary():
    sys.stdout.flush()
    return sys.stdout.buffer


@dataclass
class Resumed:
    """What an earlier, interrupted run already wrote."""

    rows: int = 0  # data rows (a prefix of the input files)
    scored: int = 0
    failed: int = 0
    labels: dict = field(default_factory=dict)  # label -> count


class PartialSink:
    """CSV rows appended to ``FILE.partial`` and fsynced after every batch; :meth:`finish`
    renames it to ``FILE`` (readers of ``FILE`` see the old file or the complete new one)."""

    def __init__(self, output, head: list[str], files: list[str], *, resume: bool, log=None):
        log = log or (lambda m: print(m, file=sys.stderr))
        self.final = Path(output)
        self.partial = self.final.with_name(self.final.name + ".partial")
        if self.final.is_dir():
            raise PneumoError(f"{self.final}: is a directory (-o takes a file name)")
        if not self.final.parent.is_dir():
            raise PneumoError(f"{self.final.parent}: no such folder for -o")
        copied = resume and not self.partial.exists() and self.final.exists()
        if copied:
            shutil.copyfile(self.final, self.partial)  # re-check a finished output, add new rows
        self._f = open(self.partial, "a+b")  # noqa: SIM115 -- kept open; created, not truncated
        try:
            _lock(self._f, self.partial)
            self._f.seek(0)
            self.resumed, keep = Resumed(), 0
            if resume:
                self.resumed, keep = read_partial(self._f, head, files, self.partial)
            elif os.fstat(self._f.fileno()).st_size:
                log(f"note: starting over; replacing {self.partial} from an earlier run "
                    "(use --resume to continue it)")
        except BaseException:
            self._f.close()
            if copied:
                self.partial.unlink(missing_ok=True)
            raise
        self._f.truncate(keep)
        self._f.seek(keep)
        self._text = io.TextIOWrapper(self._f, encoding="utf-8", newline="")
        self._csv = _writer(self._text)
        if keep == 0:
            self.write([head])

    def write(self, rows) -> None:
        self._csv.writerows(rows)
        self._text.flush()
        os.fsync(self._f.fileno())

    def finish(self) -> None:
        self.close()
        os.replace(self.partial, self.final)
        _fsync_dir(self.final.parent)

    def close(self) -> None:
        if not self._text.closed:
            self._text.close()


def read_partial(f, head: list[str], files: list[str], name) -> tuple[Resumed, int]:
    """(what the binary file ``f`` holds, how many of its bytes to keep) for an interrupted
    ``FILE.partial``, read as a stream (memory does not grow with its length).

    Keeps whole records only (a record ends at a newline outside quotes; a torn last line or the
    zero fill a crash can leave is cut off), checks the header and that the rows name ``files``
    in order, and raises :class:`PneumoError` when they do not.
    """
    done, keep, first = Resumed(), 0, True
    classes = {h[2:] for h in head[2:-1]}
    for record, end in _records(f):
        row = _parse(record, name)
        if first:
            if row != head:
                got = ",".join(row)[:120]
                raise PneumoError(f"{name}: cannot resume: its header {got!r} is not this "
                                  f"model's {','.join(head)!r}; delete it or drop --resume")
            first = False
        else:
            if done.rows >= len(files):
                raise PneumoError(f"{name}: cannot resume: it has more rows than the input has "
                                  f"image files ({len(files)}); different input?")
            _check_row(row, done.rows, files[done.rows], head, classes, name)
            done.rows += 1
            if row[1]:
                done.scored += 1
                done.labels[row[1]] = done.labels.get(row[1], 0) + 1
            else:
                done.failed += 1
        keep = end
    return done, keep


def _records(f):
    """(record bytes, offset just after it) for each whole CSV record in ``f``: a record ends at
    a newline where the number of quote characters so far is even (csv doubles the quotes
    inside quoted fields)."""
    pos, quotes, pending = 0, 0, []
    for line in f:
        if not line.endswith(b"\n") or b"\0" in line:
            return  # torn, or zero-filled after a crash
        pos += len(line)
        quotes += line.count(b'"')
        pending.append(line)
        if quotes % 2 == 0:
            yield b"".join(pending), pos
            pending.clear()


def _parse(record: bytes, name) -> list[str]:
    try:
        rows = list(csv.reader(io.StringIO(record.decode("utf-8"), newline="")))
    except (UnicodeDecodeError, csv.Error):
        rows = []
    if len(rows) != 1:
        raise PneumoError(f"{name}: cannot resume: not a pneumo-edge CSV; "
                          "delete it or drop --resume")
    return rows[0]


def _check_row(row, i, path, head, classes, name) -> None:
    expected = csv_text(path)
    if len(row) != len(head) or row[0] != expected:
        got = row[0] if row else ""
        raise PneumoError(f"{name}: cannot resume: row {i + 1} is {got!r}, expected {expected!r} "
                          "(input changed since the interrupted run?)")
    if (row[1] and row[1] not in classes) or (not row[1] and not row[-1]):
        raise PneumoError(f"{name}: cannot resume: row {i + 1} is damaged ({row[1]!r})")


def _lock(f, name) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one writer is the user's job
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise PneumoError(f"{name}: another pneumo-edge score is writing it") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

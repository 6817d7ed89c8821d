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
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pneumo_edge.atomic import fsync_dir
from pneumo_edge.errors import PneumoError

PROB_DIGITS = 6


def header(classes, extra=()) -> list[str]:
    """``path,label,p_<class>...,[extra...,]error``: ``error`` is always the last column."""
    return ["path", "label", *[f"p_{c}" for c in classes], *extra, "error"]


def dicom_columns(walk_dicom: int, tags=()) -> list[str]:
    """The DICOM columns of a run: ``study_uid,series_uid,sop_uid`` and then the chosen tags,
    present when at least one input file is DICOM or tags were asked for; none otherwise (a
    run without DICOM keeps the plain header). Unknown or identifying tags: PneumoError."""
    from pneumo_edge.inputs.dicom import SAFE_TAGS, UID_COLUMNS

    bad = [t for t in tags if t not in SAFE_TAGS]
    if bad:
        raise PneumoError(f"--dicom-columns: {bad[0]!r} is not one of the tags that may be "
                          f"written ({', '.join(SAFE_TAGS)})")
    if len(set(tags)) != len(tags):
        raise PneumoError("--dicom-columns: a tag is named twice")
    return [*UID_COLUMNS, *tags] if walk_dicom or tags else []


def dicom_values(path: str, tags=()) -> list[str]:
    """This file's values for :func:`dicom_columns`: its UIDs and tags when it is DICOM (empty
    where its header cannot be read), empty strings for other files."""
    from pneumo_edge.inputs.dicom import identity
    from pneumo_edge.inputs.images import input_kind

    if input_kind(path) != "dicom":
        return [""] * (3 + len(tags))
    ident = identity(path, tags)
    return [*ident.uids, *ident.tags]


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


class WriteError(PneumoError):
    """Writing the CSV failed (disk full, stdout closed, I/O error): exit 2, one line. The rows
    written before it stay valid (whole records; a torn last one is cut by ``--resume``)."""


def _write_failed(name, exc: OSError, hint: str) -> WriteError:
    return WriteError(f"cannot write {name}: {exc.strerror or exc} ({hint})")


STDOUT_HINT = "the rows before it are complete; use -o FILE to get a run --resume can continue"
RESUME_HINT = "use --resume to continue"


class StdoutSink:
    """CSV rows to stdout (as UTF-8 whatever the locale), flushed after every batch.

    A write that fails raises :class:`WriteError`, except a closed pipe (``| head``), which
    stays a :class:`BrokenPipeError` for the caller to end quietly."""

    partial = None

    def __init__(self, head: list[str], stream=None):
        binary = stream if stream is not None else _stdout_binary()
        self._text = io.TextIOWrapper(binary, encoding="utf-8", newline="", write_through=True)
        self._csv = _writer(self._text)
        self.write([head])

    def write(self, rows) -> None:
        try:
            self._csv.writerows(rows)
            self._text.flush()
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            raise _write_failed("stdout", exc if isinstance(exc, OSError) else
                                OSError(0, "it is closed"), STDOUT_HINT) from None

    def finish(self) -> None:
        self.close()

    def close(self) -> None:
        if self._text is not None:
            text, self._text = self._text, None
            try:
                text.flush()
            except (OSError, ValueError):
                pass  # already reported by write()
            finally:
                try:
                    text.detach()  # leave stdout itself open
                except (OSError, ValueError):
                    pass


def _stdout_binary():
    out = sys.stdout
    if out is None or getattr(out, "buffer", None) is None:
        raise WriteError(f"cannot write stdout: it is closed ({STDOUT_HINT})")
    try:
        out.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise _write_failed("stdout", exc, STDOUT_HINT) from None
    return out.buffer


@dataclass
class Resumed:
    """What an earlier, interrupted run already wrote."""

    rows: int = 0  # data rows (a prefix of the input files)
    scored: int = 0
    failed: int = 0
    labels: dict = field(default_factory=dict)  # label -> count


def partial_path(output) -> Path:
    final = Path(output)
    return final.with_name(final.name + ".partial")


def check_output(output) -> None:
    """Refuse (exit 2) an ``-o FILE`` whose FILE, FILE.json or FILE.partial exists and is not
    a regular file (a symlink, device, FIFO, socket, directory) or whose folder is missing:
    -o only ever replaces regular files, and never writes through a link."""
    final = Path(output)
    if not final.parent.is_dir():
        raise PneumoError(f"{final.parent}: no such folder for -o")
    regular_or_absent(final, one_link=False)  # replaced by a rename: other links keep theirs
    regular_or_absent(final.with_name(final.name + ".json"), one_link=False)  # provenance
    regular_or_absent(partial_path(final))  # written into


def regular_or_absent(path: Path, one_link: bool = True) -> os.stat_result | None:
    """lstat of ``path`` when it is a regular file (with one link if ``one_link``), None when
    it is absent; :class:`PneumoError` for anything else (nothing followed, nothing touched)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PneumoError(f"{path}: cannot check it: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PneumoError(f"{path}: is {_kind(st.st_mode)}, not a regular file; -o writes "
                          "only regular files (remove it or choose another name)")
    if one_link and st.st_nlink > 1:
        raise PneumoError(f"{path}: has {st.st_nlink} hard links; -o will not write into a "
                          "file shared with another name (remove it or choose another name)")
    return st


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def open_new_or_regular(path: Path, *, create_only: bool = False) -> int:
    """A read-write fd for ``path``: created (O_EXCL) when absent, else the regular file there.
    Never follows a symlink (O_NOFOLLOW), never opens a device, FIFO or hard-linked file."""
    base = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    existing = regular_or_absent(path)
    flags = base | (os.O_CREAT | os.O_EXCL if existing is None or create_only else 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        raise PneumoError(f"{path}: cannot open it for writing: {exc.strerror or exc} "
                          "(replaced while starting?)") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        raise PneumoError(f"{path}: not a regular file with one name; -o will not write it")
    os.set_blocking(fd, True)
    return fd


class PartialSink:
    """CSV rows appended to ``FILE.partial`` and fsynced after every batch; :meth:`finish`
    renames it to ``FILE`` (readers of ``FILE`` see the old file or the complete new one).

    FILE and FILE.partial must be regular files or absent (:func:`check_output`); a write
    that fails raises :class:`WriteError` and leaves the whole rows for ``--resume``."""

    def __init__(self, output, head: list[str], files: list[str], *, resume: bool, log=None):
        log = log or (lambda m: print(m, file=sys.stderr))
        self.final = Path(output)
        self.partial = partial_path(self.final)
        if self.final.is_dir() and not self.final.is_symlink():
            raise PneumoError(f"{self.final}: is a directory (-o takes a file name)")
        check_output(self.final)
        copied = resume and not os.path.lexists(self.partial) and self.final.exists()
        fd = open_new_or_regular(self.partial, create_only=copied)
        self._f = os.fdopen(fd, "r+b")
        try:
            _lock(self._f, self.partial)
            if copied:  # re-check a finished output, add new rows
                self._copy_from_final()
            self._f.seek(0)
            self.resumed, keep = Resumed(), 0
            if resume:
                self.resumed, keep = read_partial(self._f, head, files, self.partial)
            elif os.fstat(self._f.fileno()).st_size:
                log(f"note: starting over; replacing {self.partial} from an earlier run "
                    "(use --resume to continue it)")
            self._f.truncate(keep)
            self._f.seek(keep)
        except BaseException:
            self._f.close()
            if copied:
                self.partial.unlink(missing_ok=True)
            raise
        self._text = io.TextIOWrapper(self._f, encoding="utf-8", newline="")
        self._csv = _writer(self._text)
        if keep == 0:
            self.write([head])

    def _copy_from_final(self) -> None:
        regular_or_absent(self.final, one_link=False)
        with open(self.final, "rb") as src:
            shutil.copyfileobj(src, self._f)
        self._f.flush()

    def write(self, rows) -> None:
        try:
            self._csv.writerows(rows)
            self._text.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:
            raise _write_failed(self.partial, exc, RESUME_HINT) from None

    def finish(self) -> None:
        try:
            self._text.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:
            raise _write_failed(self.partial, exc, RESUME_HINT) from None
        self.close()
        regular_or_absent(self.final, one_link=False)  # nothing non-regular slipped in
        os.replace(self.partial, self.final)
        fsync_dir(self.final.parent)

    def close(self) -> None:
        if not self._text.closed:
            try:
                self._text.close()
            except OSError:  # a failed flush (disk full): drop what could not be written
                try:
                    self._f.raw.close()
                except OSError:
                    pass


def read_partial(f, head: list[str], files: list[str], name) -> tuple[Resumed, int]:
    """(what the binary file ``f`` holds, how many of its bytes to keep) for an interrupted
    ``FILE.partial``, read as a stream (memory does not grow with its length).

    Keeps whole records only (a record ends at a newline outside quotes; a torn last line or the
    zero fill a crash can leave is cut off), checks the header and that the rows name ``files``
    in order, and raises :class:`PneumoError` when they do not.
    """
    done, keep, first = Resumed(), 0, True
    classes = {h[2:] for h in head[2:-1] if h.startswith("p_")}
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



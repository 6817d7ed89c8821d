"""The scoring CSV: its header and rows, where it goes (stdout, or ``-o FILE`` written through
``FILE.partial`` and renamed on completion) and how an interrupted ``FILE.partial`` is checked
and continued (``--resume``).

Rows are appended batch by batch and fsynced, so a run that is interrupted (Ctrl-C, SIGTERM,
kill -9, power loss) leaves ``FILE.partial`` holding whole batches plus at most one torn batch
at the end; :func:`read_partial` keeps the complete rows, checks they are a prefix of the input
order and well formed (known label, finite probabilities in [0, 1] that give that label at the
run's threshold, a reason on every row without one), and cuts the rest off.

Cells (RFC 4180): a cell holding a comma, a double quote, a carriage return or a line feed is
quoted, its quotes doubled; records end with ``\\n``. The CSV is always valid UTF-8.

Path cells (:func:`path_text`): a file name is a byte string on Linux. Its cell is the name
decoded as UTF-8 with two escapes, so that two different files never share a cell: a
backslash is written ``\\\\`` (doubled) and each byte that is not part of valid UTF-8 is
written ``\\xNN`` (two lowercase hex digits). :func:`path_bytes` undoes it. Names without a
backslash and valid in UTF-8 (nearly all) appear unchanged.

Resume identity: while a run writes ``FILE.partial``, ``FILE.partial.ids`` holds one line per
written row, ``SIZE MTIME_NS INODE`` of that input file as it was scored (``- REASON`` when it
could not be read). ``--resume`` keeps the earlier rows up to the first file whose identity
changed and scores the rest again; when the run finishes the ids file is removed and the
SHA-256 of its lines is recorded in ``FILE.json`` (``input_identity``), so resuming a finished
``FILE`` checks its inputs too (and scores them all again when any changed).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
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
    for note in ident.notes:  # a value left empty (not a valid UID); the note quotes nothing
        print(f"note: {path_text(path)}: {note}", file=sys.stderr)
    return [*ident.uids, *ident.tags]


_BAD_BYTE = re.compile("[\udc80-\udcff]")


def path_text(path: str) -> str:
    """A path as it appears in the CSV (and the report): backslashes doubled, bytes that are
    not valid UTF-8 as ``\\xNN``; never two paths the same cell (see the module docstring)."""
    text = os.fsdecode(os.fsencode(path)).replace("\\", "\\\\")
    return _BAD_BYTE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", text)


_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def path_bytes(cell: str) -> bytes:
    """The file name bytes a path cell stands for (the inverse of :func:`path_text`)."""
    out, pos = bytearray(), 0
    for m in _ESCAPE.finditer(cell):
        out += cell[pos:m.start()].encode("utf-8")
        out += b"\\" if m.group(1) == "\\" else bytes([int(m.group(1)[1:], 16)])
        pos = m.end()
    return bytes(out + cell[pos:].encode("utf-8"))


def one_line(s: str) -> str:
    return " ".join(s.split())


_NEEDS_QUOTES = re.compile('[",\r\n]')


def csv_line(cells) -> str:
    """One CSV record: cells quoted when they hold a comma, quote, CR or LF (RFC 4180)."""
    return ",".join('"' + c.replace('"', '""') + '"' if _NEEDS_QUOTES.search(c) else c
                    for c in cells) + "\n"


NON_FINITE = "model produced non-finite probabilities"


def result_row(path: str, probs, card, threshold: float | None, error: str = "") -> list[str]:
    """``[path, label, p_<class>..., error]`` for one file, the row score and explain share:
    ``probs`` None (the file failed: ``error`` says why) or a non-finite row give an empty
    label and probabilities and the reason; otherwise the label at ``threshold`` (None: the
    card's) and the probabilities with :data:`PROB_DIGITS` decimals."""
    blank = [""] * len(card.classes)
    if probs is None:
        return [path_text(path), "", *blank, one_line(error)]
    if not all(map(_finite, probs)):
        return [path_text(path), "", *blank, NON_FINITE]
    label = card.classes[card.label_index(probs, threshold)]
    return [path_text(path), label, *[f"{float(p):.{PROB_DIGITS}f}" for p in probs], ""]


def _finite(x) -> bool:
    return math.isfinite(float(x))


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
        self.write([head])

    def write(self, rows) -> None:
        try:
            self._text.write("".join(map(csv_line, rows)))
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
    """What an earlier, interrupted run already wrote (and is still true)."""

    rows: int = 0  # data rows kept (a prefix of the input files)
    scored: int = 0
    failed: int = 0
    labels: dict = field(default_factory=dict)  # label -> count
    changed: str | None = None  # the first input file that changed since its row was written


def file_identity(path: str) -> str:
    """``SIZE MTIME_NS INODE`` of the file ``path`` names now (following links, as decoding
    does), or ``- REASON`` when it cannot be read: what ``--resume`` compares."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"- {errno_name(exc)}"
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"


def errno_name(exc: OSError) -> str:
    import errno

    return errno.errorcode.get(exc.errno or 0, "error")


def identity_digest(lines) -> str:
    """SHA-256 of identity lines (each ending in a newline), as ``FILE.json`` records it."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("ascii", "backslashreplace") if isinstance(line, str) else line)
    return h.hexdigest()


def beside(output, suffix: str) -> Path:
    """``FILE`` + ``suffix`` in ``FILE``'s folder (the partial CSV and the sidecars)."""
    final = Path(output)
    return final.with_name(final.name + suffix)


def partial_path(output) -> Path:
    return beside(output, ".partial")


def ids_path(output) -> Path:
    """``FILE.partial.ids``: one identity line per row of ``FILE.partial``."""
    return beside(output, ".partial.ids")


def check_output(output) -> None:
    """Refuse (exit 2) an ``-o FILE`` whose FILE, FILE.json or FILE.partial exists and is not
    a regular file (a symlink, device, FIFO, socket, directory) or whose folder is missing:
    -o only ever replaces regular files, and never writes through a link."""
    final = Path(output)
    if not final.parent.is_dir():
        raise PneumoError(f"{final.parent}: no such folder for -o")
    regular_or_absent(final, one_link=False)  # replaced by a rename: other links keep theirs
    regular_or_absent(final.with_name(final.name + ".json"), one_link=False)  # provenance
    regular_or_absent(partial_path(final).with_name(final.name + ".partial.json"),
                      one_link=False)  # provenance of the running run
    regular_or_absent(partial_path(final))  # written into
    regular_or_absent(ids_path(final))  # written into


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
    """CSV rows appended to ``FILE.partial`` (their files' identities to ``FILE.partial.ids``)
    and fsynced after every batch; :meth:`finish` renames it to ``FILE`` (readers of ``FILE``
    see the old file or the complete new one).

    FILE and FILE.partial must be regular files or absent (:func:`check_output`); a write
    that fails raises :class:`WriteError` and leaves the whole rows for ``--resume``.
    ``check``: a :class:`RowCheck` for the rows ``--resume`` keeps; ``finished_digest``: the
    input identity ``FILE.json`` records for a finished ``FILE`` (resuming it)."""

    def __init__(self, output, head: list[str], files: list[str], *, resume: bool, log=None,
                 check: RowCheck | None = None, finished_digest: str | None = None,
                 seal=None, publish=None):
        self.log = log or (lambda m: print(m, file=sys.stderr))
        self.files, self.seal, self.publish = files, seal, publish
        self.final = Path(output)
        self.partial, self.ids = partial_path(self.final), ids_path(self.final)
        if self.final.is_dir() and not self.final.is_symlink():
            raise PneumoError(f"{self.final}: is a directory (-o takes a file name)")
        check_output(self.final)
        copied = resume and not os.path.lexists(self.partial) and self.final.exists()
        self._f = os.fdopen(open_new_or_regular(self.partial, create_only=copied), "r+b")
        self._ids = None
        try:
            _lock(self._f, self.partial)
            self._ids = os.fdopen(open_new_or_regular(self.ids), "r+b")
            if copied:  # re-check a finished output, add new rows
                self._copy_from_final()
            self._f.seek(0)
            self.resumed, keep, keep_ids = Resumed(), 0, 0
            if resume:
                self.resumed, keep, keep_ids = self._resume(head, files, check, copied,
                                                             finished_digest)
            elif os.fstat(self._f.fileno()).st_size:
                self.log(f"note: starting over; replacing {self.partial} from an earlier run "
                         "(use --resume to continue it)")
            for f, n in ((self._f, keep), (self._ids, keep_ids)):
                f.truncate(n)
                f.seek(n)
        except BaseException:
            self._close_files()
            if copied:
                self.partial.unlink(missing_ok=True)
            raise
        self._text = io.TextIOWrapper(self._f, encoding="utf-8", newline="")
        self.rows = self.resumed.rows  # data rows in FILE.partial
        if keep == 0:
            self._append([head], [])

    def _resume(self, head, files, check, copied: bool, digest) -> tuple[Resumed, int, int]:
        """What to keep of the earlier rows: (rows, CSV bytes, ids bytes)."""
        if not copied:
            self._ids.seek(0)
            done, keep = read_partial(self._f, head, files, self.partial, check=check,
                                      ids=self._ids)
            self._ids.seek(0)
            for _ in range(done.rows):
                self._ids.readline()
            return done, keep, self._ids.tell()
        done, keep = read_partial(self._f, head, files, self.final, check=check)
        now = [file_identity(p) + "\n" for p in files[:done.rows]]
        if digest is None or identity_digest(now) != digest:
            self.log(f"note: {self.final}: its input files changed since it was written (size, "
                     "modification time or inode), or it has no record of them: scoring all "
                     "again")
            return Resumed(), 0, 0
        self._ids.write("".join(now).encode("ascii", "backslashreplace"))
        return done, keep, self._ids.tell()

    def _copy_from_final(self) -> None:
        regular_or_absent(self.final, one_link=False)
        with open(self.final, "rb") as src:
            shutil.copyfileobj(src, self._f)
        self._f.flush()

    def write(self, rows) -> None:
        """Append the rows of the next input files, and their files' identities."""
        ids = [file_identity(p) for p in self.files[self.rows:self.rows + len(rows)]]
        self._append(rows, ids)
        self.rows += len(rows)

    def _append(self, rows, ids) -> None:
        try:
            self._ids.write("".join(i + "\n" for i in ids).encode("ascii", "backslashreplace"))
            self._ids.flush()
            os.fsync(self._ids.fileno())
            self._text.write("".join(map(csv_line, rows)))
            self._text.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:
            raise _write_failed(self.partial, exc, RESUME_HINT) from None

    def finish(self) -> None:
        """Make the rows durable, call ``seal(digest)`` (the provenance record of the finished
        run, written beside FILE.partial), rename FILE.partial to FILE, then call
        ``publish()`` (the record moves beside FILE)."""
        seal, publish = self.seal, self.publish
        try:
            self._text.flush()
            os.fsync(self._f.fileno())
            self._ids.seek(0)
            digest = identity_digest(self._ids)
        except OSError as exc:
            raise _write_failed(self.partial, exc, RESUME_HINT) from None
        self.close()
        if seal is not None:
            seal(digest)
        regular_or_absent(self.final, one_link=False)  # nothing non-regular slipped in
        os.replace(self.partial, self.final)
        if publish is not None:
            publish()
        self.ids.unlink(missing_ok=True)
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
        self._close_files()

    def _close_files(self) -> None:
        for f in (self._f, self._ids):
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass


@dataclass(frozen=True)
class RowCheck:
    """What a kept row must agree with: the card's classes and the run's threshold."""

    card: object
    threshold: float


def read_partial(f, head: list[str], files: list[str], name, *, check: RowCheck | None = None,
                 ids=None) -> tuple[Resumed, int]:
    """(what the binary file ``f`` holds, how many of its bytes to keep) for an interrupted
    ``FILE.partial``, read as a stream (memory does not grow with its length).

    Keeps whole records only (a record ends at a newline outside quotes; a torn last line or the
    zero fill a crash can leave is cut off), checks the header and that the rows name ``files``
    in order and are well formed (with ``check``: labels agree with the probabilities and the
    threshold), and raises :class:`PneumoError` when they do not. ``ids``: the binary
    ``FILE.partial.ids``; rows stop at the first file whose identity differs now
    (``Resumed.changed``).
    """
    done, keep, first = Resumed(), 0, True
    n_probs = sum(1 for h in head[2:-1] if h.startswith("p_"))
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
            path = files[done.rows]
            _check_row(row, done.rows, path, head, n_probs, name, check)
            if ids is not None and ids.readline().decode("ascii", "replace") \
                    != file_identity(path) + "\n":
                done.changed = path
                break
            done.rows += 1
            if row[1]:
                done.scored += 1
                done.labels[row[1]] = done.labels.get(row[1], 0) + 1
            else:
                done.failed += 1
        keep = end
    return done, keep


def read_rows(f, name):
    """(cells, offset just after the record) for each whole record of the binary CSV file
    ``f``, read as a stream; a torn or zero-filled tail ends it (keep up to the last offset).
    :class:`PneumoError` naming ``name`` when a record is not CSV. Readers that append after
    the rows hold :func:`lock_writer` first."""
    for record, end in _records(f):
        yield _parse(record, name), end


def lock_writer(f, name) -> None:
    """Hold the one-writer lock of the open CSV file ``f`` (:class:`PneumoError` naming
    ``name`` when another process holds it)."""
    _lock(f, name)


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


def _check_row(row, i, path, head, n_probs: int, name, check: RowCheck | None) -> None:
    expected = path_text(path)
    if len(row) != len(head) or row[0] != expected:
        got = row[0] if row else ""
        raise PneumoError(f"{name}: cannot resume: row {i + 1} is {got!r}, expected {expected!r} "
                          "(input changed since the interrupted run?)")
    classes = [h[2:] for h in head[2:2 + n_probs]]
    why = _malformed(row[1], row[2:2 + n_probs], row[-1], classes, check)
    if why:
        raise PneumoError(f"{name}: cannot resume: row {i + 1} is damaged ({why}); delete it "
                          "or drop --resume")


def _malformed(label: str, cells: list[str], error: str, classes: list[str],
               check: RowCheck | None) -> str:
    """Why a row is not one scoring writes ('' when it is)."""
    if not label:
        return "" if error and not any(cells) else "no label and no reason, or probabilities " \
            "without a label"
    if error:
        return "a label and a reason"
    if label not in classes:
        return f"label {label[:40]!r} is not one of the model's classes"
    try:
        probs = [float(c) for c in cells]
    except ValueError:
        return "a probability that is not a number"
    if not all(0.0 <= p <= 1.0 for p in probs):
        return "a probability outside [0, 1]"
    if check is None:
        return ""
    return "" if _label_fits(classes.index(label), probs, check.card.positive_index,
                             check.threshold) else "label disagrees with its probabilities " \
        "at the run's threshold"


def _label_fits(k: int, probs: list[float], pos: int, threshold: float) -> bool:
    """Whether class ``k`` is the label of ``probs`` (written with PROB_DIGITS decimals)."""
    tol = 10.0 ** -PROB_DIGITS
    if k == pos:
        return probs[pos] >= threshold - tol
    others = [p for i, p in enumerate(probs) if i != pos]
    return probs[pos] < threshold + tol and probs[k] >= max(others) - tol


def _lock(f, name) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one writer is the user's job
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise PneumoError(f"{name}: another pneumo-edge score is writing it") from None



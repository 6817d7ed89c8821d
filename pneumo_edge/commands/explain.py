"""``pneumo-edge explain`` and ``score --explain``: heatmap pictures into an output folder plus
``explain.csv`` (path, label, probabilities, heatmap file, error), one row per input image file
with the scoring CSV's error-row rules.

The output folder is declared by the user: only ``explain.csv`` and the pictures named after the
inputs (``NNNNN_<file stem>.png``) are written there, nothing else is touched, and existing files
of those names are refused before any work unless ``force``.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumo_edge.atomic import write_bytes_atomic, write_text_atomic
from pneumo_edge.commands.options import EXPLAIN_DEFAULTS as DEFAULTS
from pneumo_edge.errors import ModelError, PneumoError, UsageError
from pneumo_edge.explain.methods import Explainer, picture_png
from pneumo_edge.outputs.csvout import csv_line, result_row

EXPLAIN_CSV = "explain.csv"
WHICH = ("positives", "all")


def csv_header(classes) -> list[str]:
    return ["path", "label", *[f"p_{c}" for c in classes], "heatmap", "error"]


def picture_name(index: int, path: str) -> str:
    """``00001_<stem>.png``: the input's position (1-based) keeps names unique."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)[:60] or "image"
    return f"{index + 1:05d}_{stem}.png"


def prepare_out(out, files, force: bool) -> Path:
    """Create ``out`` if missing (its parent must exist) and refuse, before any work, to
    replace explain.csv or a picture of the same name unless ``force``. Any ``out`` that
    cannot be a folder (a file, a dangling symbolic link, a name too long) is one
    :class:`UsageError`."""
    out = _out_folder(Path(out))
    names = [EXPLAIN_CSV] + [picture_name(i, f) for i, f in enumerate(files)]
    clash = [n for n in names if os.path.lexists(out / n)]
    if clash and not force:
        raise UsageError(f"{out / clash[0]}: exists ({len(clash)} output files would be "
                         "replaced); use --force to replace them, or another --out")
    bad = [n for n in clash if not (out / n).is_file() or (out / n).is_symlink()]
    if bad:
        raise UsageError(f"{out / bad[0]}: is not a regular file; not replaced")
    return out


def _out_folder(out: Path) -> Path:
    """``out`` as an existing folder (created when absent and its parent exists)."""
    try:
        try:
            st = os.stat(out)  # follows a link to a folder
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            return out
        if st is not None:
            raise UsageError(f"{out}: exists and is not a folder (--out names a folder)")
        if os.path.lexists(out):
            raise UsageError(f"{out}: is a symbolic link to nothing (--out names a folder; "
                             "remove the link or choose another name)")
        if not out.parent.is_dir():
            raise UsageError(f"{out.parent}: no such folder for --out")
        out.mkdir()
    except OSError as exc:
        raise UsageError(f"{_short(out)}: cannot use it as the --out folder: "
                         f"{exc.strerror or exc}") from None
    return out


def _short(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 200 else f"{text[:100]}...{text[-60:]} ({len(text)} characters)"


@dataclass
class ExplainSink:
    """Collects explain.csv rows and writes pictures for the rows ``which`` selects."""

    out: Path
    explainer: Explainer
    threshold: float
    which: str = "all"
    rows: list = field(default_factory=list)
    written: int = 0
    failed: int = 0

    def add(self, index: int, path: str, image: np.ndarray | None, error: str = "",
            expl=None) -> None:
        """``expl``: ``image``'s explanation when already computed (else computed here)."""
        card = self.explainer.card
        if image is None:
            return self._failed(path, error)
        try:
            expl = expl if expl is not None else self.explainer(image)
        except ModelError:  # the runtime itself failed: the run stops (exit 2)
            raise
        except PneumoError as exc:  # e.g. non-finite probabilities for this image
            return self._failed(path, str(exc))
        row = result_row(path, expl.probs, card, self.threshold)
        if not row[1]:
            return self._failed(path, row[-1])
        name = ""
        if self.which == "all" or row[1] == card.positive_class:
            name = picture_name(index, path)
            write_bytes_atomic(self.out / name, picture_png(image, path, expl, card,
                                                            self.threshold, row[1]))
            self.written += 1
        self.rows.append([*row[:-1], name, ""])

    def _failed(self, path: str, reason: str) -> None:
        row = result_row(path, None, self.explainer.card, self.threshold, reason)
        self.rows.append([*row[:-1], "", row[-1]])
        self.failed += 1

    def add_unexplained(self, score_row: list) -> None:
        """A row scored but not selected for a picture: the scoring row's path, label and
        probabilities, no heatmap."""
        n = len(self.explainer.card.classes)
        self.rows.append([*score_row[:2 + n], "", ""])

    def finish(self) -> Path:
        lines = [csv_line(csv_header(self.explainer.card.classes)), *map(csv_line, self.rows)]
        return write_text_atomic(self.out / EXPLAIN_CSV, "".join(lines))


def run_explain(paths, model, out, *, method: str = DEFAULTS.method,
                runtime: str = DEFAULTS.runtime, force: bool = False,
                batch: int = DEFAULTS.batch, log=None) -> int:
    """What ``pneumo-edge explain`` does; returns the exit code (0 all explained, 1 some
    failed). Usage errors raise :class:`PneumoError` (exit 2) before anything is written."""
    from pneumo_edge.inputs.folders import walk_images
    from pneumo_edge.inputs.pipeline import decode_batches
    from pneumo_edge.runtimes import open_runtime

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    missing = [p for p in paths if not os.path.lexists(p)]
    if missing:
        raise UsageError(f"{missing[0]}: no such file or folder")
    if method == "gradcam" and runtime not in ("auto", "torch"):
        raise UsageError(f"--method gradcam runs the torch model; --runtime {runtime} cannot "
                         "(use --method occlusion to explain that runtime's file)")
    walk = walk_images(paths)
    out = prepare_out(out, walk.files, force)
    rt = open_runtime(model, "torch" if method == "gradcam" else runtime, log=log)
    sink = ExplainSink(out, Explainer(rt, method, batch=batch), rt.card.threshold)
    for b in decode_batches(walk.files, rt.card.image_size, 8, known=walk.errors):
        ok = dict(zip(b.ok, b.pixels))
        for j, path in enumerate(b.paths):
            sink.add(b.start + j, path, ok.get(j), b.errors.get(j, ""))
    sink.finish()
    log(f"explained {len(walk.files) - sink.failed} of {len(walk.files)} image files with "
        f"{method} ({rt.name}); {sink.written} pictures and {EXPLAIN_CSV} in {out}"
        + (f"; {sink.failed} failed (see the error column)" if sink.failed else ""))
    return 1 if sink.failed else 0


class BatchExplainer:
    """``score --explain DIR``: after each batch of scoring rows is written, the rows scored
    positive (or all) get an occlusion map through the scoring runtime, from the pixels the
    batch decoded (a source that decoded elsewhere, Ray, has none here: the file is decoded
    again); explain.csv is written when the scoring CSV is finished."""

    def __init__(self, out: Path, runtime, threshold: float, which: str, log=None):
        """``out``: the folder :func:`prepare_out` checked (before the model was opened)."""
        if which not in WHICH:
            raise UsageError(f"--explain-which {which!r}: choose positives or all")
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.size = runtime.card.image_size
        self.sink = ExplainSink(out, Explainer(runtime, "occlusion"), threshold, which)
        self.given: dict = {}  # path -> (image, explanation) computed for this batch elsewhere

    def give(self, path: str, image: np.ndarray, expl) -> None:
        """An explanation ``score --dicom-out`` computed (with :attr:`sink`'s explainer) for a
        row of the batch being written: :meth:`add_batch` uses it instead of computing it
        again."""
        self.given[path] = (image, expl)

    def add_batch(self, batch, rows) -> None:
        """``batch``: a :class:`pneumo_edge.sources.ScoredBatch`; ``rows``: its CSV rows."""
        try:
            self._add_batch(batch, rows)
        finally:
            self.given.clear()  # only this batch's: memory stays bounded

    def _add_batch(self, batch, rows) -> None:
        pixels = dict(zip(batch.ok, batch.pixels)) if batch.pixels is not None else None
        positive = self.sink.explainer.card.positive_class
        for j, row in enumerate(rows):
            i, path = batch.start + j, batch.paths[j]
            if not row[1]:  # the scoring error row: same reason here
                self.sink.add(i, path, None, row[-1])
            elif self.sink.which == "positives" and row[1] != positive:
                self.sink.add_unexplained(row)
            elif path in self.given:
                image, expl = self.given[path]
                self.sink.add(i, path, image, expl=expl)
            elif pixels is not None:
                self.sink.add(i, path, pixels[j])
            else:
                self._decode_and_add(i, path)

    def _decode_and_add(self, i: int, path: str) -> None:
        from pneumo_edge.inputs.pipeline import decode_one

        image, error, _ = decode_one(path, self.size)
        self.sink.add(i, path, image, error or "")

    def finish(self) -> None:
        path = self.sink.finish()
        self.log(f"wrote {path} and {self.sink.written} heatmaps")

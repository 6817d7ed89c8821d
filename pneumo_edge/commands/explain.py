"""``pneumo-edge explain`` and ``score --explain``: heatmap pictures into an output folder plus
``explain.csv`` (path, label, probabilities, heatmap file, error), one row per input image file
with the scoring CSV's error-row rules.

The output folder is declared by the user: only ``explain.csv`` and the pictures named after the
inputs (``NNNNN_<file stem>.png``) are written there, nothing else is touched, and existing files
of those names are refused before any work unless ``force``.
"""

from __future__ import annotations

import csv
import io
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumo_edge.atomic import write_bytes_atomic, write_text_atomic
from pneumo_edge.errors import ModelError, PneumoError, UsageError
from pneumo_edge.explain.methods import Explainer, picture_png
from pneumo_edge.outputs.csvout import PROB_DIGITS, csv_text, one_line

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
    replace explain.csv or a picture of the same name unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder (--out names a folder)")
    if not out.exists():
        if not out.parent.is_dir():
            raise UsageError(f"{out.parent}: no such folder for --out")
        out.mkdir()
    names = [EXPLAIN_CSV] + [picture_name(i, f) for i, f in enumerate(files)]
    clash = [n for n in names if os.path.lexists(out / n)]
    if clash and not force:
        raise UsageError(f"{out / clash[0]}: exists ({len(clash)} output files would be "
                         "replaced); use --force to replace them, or another --out")
    bad = [n for n in clash if not (out / n).is_file() or (out / n).is_symlink()]
    if bad:
        raise UsageError(f"{out / bad[0]}: is not a regular file; not replaced")
    return out


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

    def add(self, index: int, path: str, image: np.ndarray | None, error: str = "") -> None:
        card = self.explainer.card
        blank = [""] * len(card.classes)
        if image is None:
            self.rows.append([csv_text(path), "", *blank, "", one_line(error)])
            self.failed += 1
            return
        try:
            expl = self.explainer(image)
        except ModelError:  # the runtime itself failed: the run stops (exit 2)
            raise
        except PneumoError as exc:  # e.g. non-finite probabilities for this image
            self.rows.append([csv_text(path), "", *blank, "", one_line(str(exc))])
            self.failed += 1
            return
        label = card.classes[card.label_index(expl.probs, self.threshold)]
        probs = [f"{float(p):.{PROB_DIGITS}f}" for p in expl.probs]
        name = ""
        if self.which == "all" or label == card.positive_class:
            name = picture_name(index, path)
            write_bytes_atomic(self.out / name, picture_png(image, path, expl, card,
                                                            self.threshold, label))
            self.written += 1
        self.rows.append([csv_text(path), label, *probs, name, ""])

    def add_unexplained(self, path: str, score_row: list) -> None:
        """A row scored but not selected for a picture: the scoring row's label and
        probabilities, no heatmap."""
        n = len(self.explainer.card.classes)
        self.rows.append([csv_text(path), score_row[1], *score_row[2:2 + n], "", ""])

    def finish(self) -> Path:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(csv_header(self.explainer.card.classes))
        w.writerows(self.rows)
        return write_text_atomic(self.out / EXPLAIN_CSV, buf.getvalue())


def run_explain(paths, model, out, *, method: str = "occlusion", runtime: str = "auto",
                force: bool = False, batch: int = 32, log=None) -> int:
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


class ExplainingSink:
    """``score --explain DIR``: wraps the scoring CSV's sink; after each batch of rows is
    written, the rows scored positive (or all) get an occlusion map through the scoring runtime
    itself (the file is decoded again, once more per explained image); explain.csv is written
    when the scoring CSV is finished."""

    def __init__(self, sink, out, files, runtime, threshold: float, which: str, force: bool,
                 log=None):
        if which not in WHICH:
            raise UsageError(f"--explain-which {which!r}: choose positives or all")
        self.inner, self.files, self.next = sink, files, 0
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.size = runtime.card.image_size
        self.sink = ExplainSink(prepare_out(out, files, force), Explainer(runtime, "occlusion"),
                                threshold, which)

    @property
    def partial(self):
        return self.inner.partial

    def write(self, rows) -> None:
        from pneumo_edge.inputs.images import ImageError, load_image

        self.inner.write(rows)
        for row in rows:
            i, path = self.next, self.files[self.next]
            self.next += 1
            if not row[1]:  # the scoring error row: same reason here
                self.sink.add(i, path, None, row[-1])
                continue
            if self.sink.which == "positives" and row[1] != self.sink.explainer.card.positive_class:
                self.sink.add_unexplained(path, row)
                continue
            try:
                self.sink.add(i, path, load_image(path, self.size))
            except ImageError as exc:
                self.sink.add(i, path, None, exc.reason)

    def finish(self) -> None:
        self.inner.finish()
        path = self.sink.finish()
        self.log(f"wrote {path} and {self.sink.written} heatmaps")

    def close(self) -> None:
        self.inner.close()

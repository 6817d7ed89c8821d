"""``pneumo-edge score``: image files and folders -> one CSV row per image file.

Folders are walked (sorted, recursively, symlink-loop safe, nothing twice); files decode on a
thread pool while the model runs on the previous batch (:mod:`pneumo_edge.inputs.pipeline`); rows go
to stdout or ``-o FILE`` batch by batch (:mod:`pneumo_edge.outputs.csvout`). A file that cannot be
scored gets a row with an empty label and the reason. Imports no torch unless the runtime is
torch.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from pneumo_edge.errors import ModelError, PneumoError
from pneumo_edge.inputs.folders import walk_images
from pneumo_edge.inputs.pipeline import Batch, decode_batches, default_workers
from pneumo_edge.outputs import provenance
from pneumo_edge.outputs.csvout import (
    PROB_DIGITS,
    PartialSink,
    StdoutSink,
    WriteError,
    check_output,
    csv_text,
    dicom_columns,
    dicom_values,
    header,
    one_line,
    partial_path,
)


@dataclass
class Summary:
    files: int = 0  # image files in the input
    scored: int = 0
    failed: int = 0
    ignored: int = 0  # other files passed over
    resumed: int = 0  # rows taken from an interrupted run
    links_skipped: int = 0  # folder symlinks not followed
    labels: dict = field(default_factory=dict)
    seconds: float = 0.0  # wall time of this run's scoring
    decode_cpu_s: float = 0.0  # CPU seconds in decode threads
    compute_s: float = 0.0  # wall seconds in the runtime
    wait_s: float = 0.0  # wall seconds the runtime waited for decoded pixels
    workers: int = 0
    failures: list = field(default_factory=list)  # first few (path, reason)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    @property
    def done_now(self) -> int:
        return self.scored + self.failed - self.resumed

    def lines(self, classes) -> list[str]:
        rate = self.done_now / self.seconds if self.seconds > 0 else 0.0
        out = [f"files {self.files}, scored {self.scored}, failed {self.failed}, "
               f"ignored {self.ignored} (not images)"
               + (f", {self.resumed} rows resumed from the earlier run" if self.resumed else "")]
        if self.links_skipped:
            out.append(f"{self.links_skipped} symbolic links to folders not followed "
                       "(--follow-links follows those leading outside the scanned folders)")
        out.append("labels: " + ", ".join(f"{c} {self.labels.get(c, 0)}" for c in classes))
        out.append(f"{self.done_now} images in {self.seconds:.2f} s: {rate:.1f} images/s; "
                   f"decode {self.decode_cpu_s:.2f} s CPU on {self.workers} threads, "
                   f"compute {self.compute_s:.2f} s, waiting for decode {self.wait_s:.2f} s")
        return out


NON_FINITE = "model produced non-finite probabilities"


def score_rows(batch: Batch, probs: np.ndarray, card, threshold: float | None) -> list[list[str]]:
    """CSV rows for one batch, in input order; failed files get an empty label and the reason.
    A NaN or infinite probability is a failure too: such a row never gets a label."""
    blank = [""] * len(card.classes)
    rows = [[csv_text(p), "", *blank, one_line(batch.errors.get(j, ""))]
            for j, p in enumerate(batch.paths)]
    finite = np.isfinite(probs).all(axis=1) if len(probs) else np.ones(0, bool)
    for k, j in enumerate(batch.ok):
        row = probs[k]
        if not finite[k]:
            rows[j][-1] = NON_FINITE
            continue
        rows[j][1] = card.classes[card.label_index(row, threshold)]
        rows[j][2:-1] = [f"{float(p):.{PROB_DIGITS}f}" for p in row]
    return rows


def score_files(files, runtime, sink, *, batch: int = 32, workers: int | None = None,
                threshold: float | None = None, summary: Summary | None = None,
                progress=None, known: dict[str, str] | None = None,
                dicom_tags: tuple | None = None) -> Summary:
    """Score ``files[summary.resumed:]`` with ``runtime``, writing rows to ``sink`` per batch.
    ``known``: paths that failed already (folders that cannot be listed) -> reason.
    ``dicom_tags``: None for no DICOM columns, else the tags after the UIDs (may be empty)."""
    s = summary or Summary(files=len(files))
    s.workers = workers or default_workers()
    card = runtime.card
    source = getattr(runtime, "batches", decode_batches)  # Ray scoring supplies its own
    stream = source(files, card.image_size, batch, s.workers, start=s.resumed, known=known)
    t_start = time.perf_counter()
    try:
        while True:
            t0 = time.perf_counter()
            b = next(stream, None)
            t1 = time.perf_counter()
            s.wait_s += t1 - t0
            if b is None:
                break
            probs = b.probs if getattr(b, "probs", None) is not None \
                else _run(runtime, b.pixels, len(card.classes))
            s.compute_s += time.perf_counter() - t1
            s.decode_cpu_s += b.decode_cpu_s
            rows = score_rows(b, probs, card, threshold)
            if dicom_tags is not None:  # before the error column, which stays last
                rows = [r[:-1] + dicom_values(p, dicom_tags) + r[-1:]
                        for r, p in zip(rows, b.paths)]
            sink.write(rows)
            _count(s, rows, b)
            if progress is not None:
                progress(len(b))
    finally:
        stream.close()
        s.seconds += time.perf_counter() - t_start
    return s


def _run(runtime, pixels: np.ndarray, n_classes: int) -> np.ndarray:
    if len(pixels) == 0:
        return np.zeros((0, n_classes), np.float32)
    try:
        probs = np.asarray(runtime(pixels))
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 -- each backend raises its own types
        raise ModelError(f"the {runtime.name} runtime failed on a batch {tuple(pixels.shape)}: "
                         f"{one_line(str(exc))[:200]} (mismatched model?)") from None
    if probs.shape != (len(pixels), n_classes):
        raise ModelError(f"the {runtime.name} model returned shape {probs.shape} for a batch of "
                         f"{len(pixels)}; its card has {n_classes} classes (mismatched model)")
    return probs


def _count(s: Summary, rows, b: Batch) -> None:
    for j, row in enumerate(rows):
        if row[1]:
            s.scored += 1
            s.labels[row[1]] = s.labels.get(row[1], 0) + 1
        else:
            s.failed += 1
            if len(s.failures) < 5:
                s.failures.append((b.paths[j], row[-1]))


def run_score(paths, model, *, runtime: str = "auto", batch: int = 32, ray=None,
              threshold: float | None = None, output=None, resume: bool = False,
              workers: int | None = None, quiet: bool = False, follow_links: bool = False,
              dicom_tags=(), stdout=None, log=None, explain=None,
              explain_which: str = "positives", explain_force: bool = False,
              dicom_out=None) -> Summary:
    """What the ``score`` command does; returns the summary (its ``exit_code`` is 0 or 1).

    ``ray``: None scores here; a Ray address (``local``, ``auto``, ``HOST:PORT``) scores
    on that cluster with :mod:`pneumo_edge.sources.ray`, same rows and files.

    Raises :class:`PneumoError` (exit 2) for usage errors, before writing anything, and
    :class:`WriteError` (exit 2) when the CSV cannot be written.
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    say = (lambda m: None) if quiet else log
    missing = [p for p in paths if not os.path.lexists(p)]
    if missing:
        raise PneumoError(f"{missing[0]}: no such file or folder")
    if resume and not output:
        raise PneumoError("--resume needs -o FILE (stdout cannot be continued)")
    if resume and explain:
        raise PneumoError("--explain cannot be combined with --resume (it explains the rows "
                          "scored in one run)")
    if output:
        check_output(output)
    if dicom_out:  # SR (+ heatmap SC) per scored DICOM input: pneumo_edge.outputs.dicom_objects
        from pneumo_edge.outputs.dicom_objects import SR_COLUMN, check_out_dir
        check_out_dir(dicom_out)
    walk = walk_images(paths, follow_links=follow_links)
    extra = dicom_columns(walk.dicom, tuple(dicom_tags))
    columns = [*extra, SR_COLUMN] if dicom_out else extra
    rt = _open(model, runtime, say)
    _run(rt, np.zeros((1, 1, rt.card.image_size, rt.card.image_size), np.uint8),
         len(rt.card.classes))  # a model that does not fit its card fails here, before any row
    if ray is not None:
        from pneumo_edge.sources.ray import RayScorer

        rt = RayScorer(rt, ray, log=say)
    used = rt.card.threshold if threshold is None else threshold
    if explain:  # refuse to replace earlier heatmaps before anything is written
        from pneumo_edge.commands.explain import prepare_out
        prepare_out(explain, walk.files, explain_force)
    s = Summary(files=len(walk.files), ignored=walk.ignored, links_skipped=walk.links_skipped)
    record = None
    if output:
        earlier = provenance.check_resume(output, rt, used, _has_rows(output)) if resume else None
        record = provenance.start_record(
            output=output, inputs=paths, model=model, runtime=rt, threshold=used,
            threshold_from="card" if threshold is None else "--threshold",
            follow_links=follow_links, earlier=earlier)
        sink = PartialSink(output, header(rt.card.classes, columns), walk.files, resume=resume,
                           log=say)
        _take_resumed(s, sink.resumed, say, sink.partial)
        provenance.write(output, record)
    else:
        sink = StdoutSink(header(rt.card.classes, columns), stdout)
    if dicom_out:
        from pneumo_edge.outputs.dicom_objects import DicomOutSink
        sink = DicomOutSink(sink, dicom_out, walk.files[s.resumed:], rt, used, threshold is None,
                            explain_which if explain else None, log=say)
    if explain:  # heatmaps of the rows as they are written (pneumo_edge.commands.explain)
        from pneumo_edge.commands.explain import ExplainingSink
        sink = ExplainingSink(sink, explain, walk.files, rt, used, explain_which, explain_force,
                              log=say)
    if not walk.files:
        say("note: no image files found (.jpg .jpeg .png .bmp .tif .tiff .dcm .dicom, "
            "or DICM at byte 128)")
    _score_into(sink, walk, rt, s, batch=batch, workers=workers, threshold=threshold,
                quiet=quiet, log=log, output=output, record=record,
                dicom_tags=tuple(dicom_tags) if extra else None)
    _report(s, rt.card.classes, output, say)
    return s


def _score_into(sink, walk, rt, s: Summary, *, batch, workers, threshold, quiet, log, output,
                record, dicom_tags=None) -> None:
    """Score every file into ``sink`` and finish it; on any failure keep what was written,
    record the outcome in the provenance file, and say how to continue."""
    status = "interrupted"
    with _progress(len(walk.files), s.resumed, quiet) as bar:
        try:
            score_files(walk.files, rt, sink, batch=batch, workers=workers, threshold=threshold,
                        summary=s, progress=bar, known=walk.errors, dicom_tags=dicom_tags)
            sink.finish()
            status = "finished"
        except BaseException as exc:
            sink.close()
            if sink.partial is not None and not isinstance(exc, WriteError):
                log(f"{sink.partial}: kept the rows written so far; "
                    "rerun with --resume to continue")
            status = "write failed" if isinstance(exc, WriteError) else status
            raise
        finally:
            if record is not None:
                _record_end(output, record, s, status, log)


def _record_end(output, record, s: Summary, status: str, log) -> None:
    code = s.exit_code if status == "finished" else (2 if status == "write failed" else None)
    try:
        provenance.write(output, provenance.end_record(record, s, status, code))
    except PneumoError as exc:
        if status == "finished":
            raise
        if status == "interrupted":  # after a write failure the error line says it all
            log(f"warning: {exc}")


def _has_rows(output) -> bool:
    """Whether an earlier run left anything that --resume would keep."""
    for path in (partial_path(output), output):
        try:
            if os.lstat(path).st_size:
                return True
        except OSError:
            pass
    return False


def _open(model, runtime: str, say):
    from pneumo_edge.runtimes import open_runtime

    rt = open_runtime(model, runtime, log=say)
    if runtime != "auto":
        say(f"runtime: {rt.name} on {rt.device} (chosen with --runtime)")
    return rt


def _take_resumed(s: Summary, r, say, partial) -> None:
    s.resumed, s.scored, s.failed, s.labels = r.rows, r.scored, r.failed, dict(r.labels)
    if r.rows:
        say(f"resuming {partial}: {r.rows} of {s.files} rows already written")


def _report(s: Summary, classes, output, say) -> None:
    for path, reason in s.failures:
        say(f"failed: {path}: {reason}")
    if s.failed > len(s.failures):
        say(f"... and {s.failed - len(s.failures)} more failures (see the error column)")
    for line in s.lines(classes):
        say(line)
    if output:
        say(f"wrote {output}")


class _progress:
    """A tqdm bar on stderr when it is a terminal; otherwise nothing."""

    def __init__(self, total: int, initial: int, quiet: bool):
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="img", file=sys.stderr,
                            dynamic_ncols=True, leave=False)

    def __enter__(self):
        return self.bar.update if self.bar is not None else None

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

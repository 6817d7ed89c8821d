"""``pneumo-edge score``: image files and folders -> one CSV row per image file.

Folders are walked (sorted, recursively, symlink-loop safe, nothing twice); a source of scored
batches (:mod:`pneumo_edge.sources`: local decode threads and runtime, or a Ray cluster) turns
them into probabilities; rows go to stdout or ``-o FILE`` batch by batch
(:mod:`pneumo_edge.outputs.csvout`). A file that cannot be scored gets a row with an empty label
and the reason. Imports no torch unless the runtime is torch.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from pneumo_edge.commands.options import SCORE_DEFAULTS as DEFAULTS
from pneumo_edge.errors import PneumoError
from pneumo_edge.inputs.folders import walk_images
from pneumo_edge.model.qc import Gatekeeper, threshold_source, uncalibrated_notice
from pneumo_edge.outputs import provenance
from pneumo_edge.outputs.csvout import (
    NON_FINITE,
    PartialSink,
    RowCheck,
    StdoutSink,
    WriteError,
    check_output,
    dicom_columns,
    dicom_values,
    header,
    partial_path,
    path_text,
    result_row,
)
from pneumo_edge.sources import ScoredBatch, Source
from pneumo_edge.sources.local import LocalSource, run_model

__all__ = ["NON_FINITE", "Summary", "run_score", "score_files", "score_rows", "score_source"]


@dataclass
class Summary:
    files: int = 0  # image files in the input
    scored: int = 0
    failed: int = 0
    ignored: int = 0  # other files passed over
    resumed: int = 0  # rows taken from an interrupted run
    links_skipped: int = 0  # folder symlinks not followed
    flagged: int = 0  # rows with a qc verdict (with --qc refuse also counted in failed)
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
        if self.flagged:
            out.append(f"qc flagged {self.flagged} images (see the qc column)")
        out.append(f"{self.done_now} images in {self.seconds:.2f} s: {rate:.1f} images/s; "
                   f"decode {self.decode_cpu_s:.2f} s CPU on {self.workers} threads, "
                   f"compute {self.compute_s:.2f} s, waiting for decode {self.wait_s:.2f} s")
        return out


def score_rows(batch, probs: np.ndarray, card, threshold: float | None) -> list[list[str]]:
    """CSV rows for one batch (``paths``, ``ok``, ``errors``), in input order
    (:func:`pneumo_edge.outputs.csvout.result_row`): failed files get an empty label and the
    reason; a NaN or infinite probability is a failure too, never a label."""
    probs_of = dict(zip(batch.ok, probs))
    return [result_row(p, probs_of.get(j), card, threshold, batch.errors.get(j, ""))
            for j, p in enumerate(batch.paths)]


def score_files(files, runtime, sink, *, batch: int = 32, workers: int | None = None,
                **kw) -> Summary:
    """:func:`score_source` with the local source: ``runtime`` on this machine's decode
    threads."""
    return score_source(files, LocalSource(runtime, batch, workers), sink, **kw)


def score_source(files, source: Source, sink, *, threshold: float | None = None,
                 summary: Summary | None = None, progress=None,
                 known: dict[str, str] | None = None, dicom_tags: tuple | None = None,
                 after_batch=(), gate: Gatekeeper | None = None) -> Summary:
    """Score ``files[summary.resumed:]`` with ``source``, writing rows to ``sink`` per batch.
    ``known``: paths that failed already (folders that cannot be listed) -> reason.
    ``dicom_tags``: None for no DICOM columns, else the tags after the UIDs (may be empty).
    ``after_batch``: callables ``(scored batch, its rows)`` run after the rows are written
    (``--explain`` uses the batch's decoded pixels). ``gate``: the qc column and
    ``--prevalence`` (:class:`pneumo_edge.model.qc.Gatekeeper`); None writes no qc column."""
    s = summary or Summary(files=len(files))
    s.workers = source.workers
    card = source.model.card
    stream = source.batches(files, s.resumed, known)
    t_start = time.perf_counter()
    try:
        for b in stream:
            s.wait_s += b.wait_s
            s.compute_s += b.compute_s
            s.decode_cpu_s += b.decode_cpu_s
            probs = b.probs if gate is None else gate.probs(b.probs)
            rows = score_rows(b, probs, card, threshold)
            if gate is not None:
                rows = _with_qc(rows, gate.cells(b), gate.mode, s)
            if dicom_tags is not None:  # before the error column, which stays last
                rows = [r[:-1] + dicom_values(p, dicom_tags) + r[-1:]
                        for r, p in zip(rows, b.paths)]
            sink.write(rows)
            for hook in after_batch:
                hook(b, rows)
            _count(s, rows, b)
            if progress is not None:
                progress(len(b))
    finally:
        stream.close()
        s.seconds += time.perf_counter() - t_start
        s.workers = source.workers  # a cluster's is known once it is reached
    return s


def _with_qc(rows, cells, mode: str, s: Summary) -> list[list[str]]:
    """``qc`` goes after the probabilities; with ``--qc refuse`` a flagged scored row becomes an
    error row (no label, no probabilities)."""
    out = []
    for row, qc in zip(rows, cells):
        if qc:
            s.flagged += 1
            if mode == "refuse" and row[1]:
                row = [row[0], "", *[""] * (len(row) - 3), f"refused by --qc refuse: {qc}"]
        out.append([*row[:-1], qc, row[-1]])
    return out


def _count(s: Summary, rows, b: ScoredBatch) -> None:
    for j, row in enumerate(rows):
        if row[1]:
            s.scored += 1
            s.labels[row[1]] = s.labels.get(row[1], 0) + 1
        else:
            s.failed += 1
            if len(s.failures) < 5:
                s.failures.append((b.paths[j], row[-1]))


def run_score(paths, model, *, runtime: str = DEFAULTS.runtime, batch: int = DEFAULTS.batch,
              ray=None, threshold: float | None = DEFAULTS.threshold, output=DEFAULTS.output,
              resume: bool = False, workers: int | None = DEFAULTS.workers, quiet: bool = False,
              follow_links: bool = False, dicom_tags=(), stdout=None, log=None, explain=None,
              explain_which: str = DEFAULTS.explain_which, explain_force: bool = False,
              dicom_out=None, qc: str = DEFAULTS.qc,
              prevalence: float | None = DEFAULTS.prevalence) -> Summary:
    """What the ``score`` command does; returns the summary (its ``exit_code`` is 0 or 1).

    ``ray``: None scores here; a Ray address (``local``, ``auto``, ``HOST:PORT``) scores
    on that cluster with :mod:`pneumo_edge.sources.ray`, same rows and files.
    ``qc``: flag, refuse or off (:mod:`pneumo_edge.model.qc`); ``prevalence``: the deployment
    population's positive rate (probabilities and threshold moved by Bayes' rule on the odds).

    Raises :class:`PneumoError` (exit 2) for usage errors, before writing anything, and
    :class:`WriteError` (exit 2) when the CSV cannot be written.
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    say = (lambda m: None) if quiet else log
    _check_usage(paths, output, resume, explain)
    if dicom_out:  # SR (+ heatmap SC) per scored DICOM input: pneumo_edge.outputs.dicom_objects
        from pneumo_edge.outputs.dicom_objects import SR_COLUMN, check_out_dir
        check_out_dir(dicom_out)
    walk = walk_images(paths, follow_links=follow_links)
    extra = dicom_columns(walk.dicom, tuple(dicom_tags))
    columns = ["qc", *extra, *([SR_COLUMN] if dicom_out else [])]
    if explain:  # refuse to replace earlier heatmaps before anything is opened or written
        from pneumo_edge.commands.explain import BatchExplainer, prepare_out
        explain = prepare_out(explain, walk.files, explain_force)
    rt = _open(model, runtime, say)
    gate = Gatekeeper(rt.card, qc, prevalence, threshold)
    note = uncalibrated_notice(rt.card, model)
    if note:
        say(note)
    source = _source(rt, ray, batch, workers, say)
    moved_by = threshold_source(threshold, prevalence)
    if prevalence is not None:
        threshold = gate.threshold
    used = rt.card.threshold if threshold is None else threshold
    explainer = BatchExplainer(explain, rt, used, explain_which, log=say) if explain else None
    s = Summary(files=len(walk.files), ignored=walk.ignored, links_skipped=walk.links_skipped)
    head = header(rt.card.classes, columns)
    record = None
    if output:
        sink, record = _output_sink(output, head, walk.files, source, s, paths=paths,
                                    model=model, used=used, threshold=threshold, resume=resume,
                                    follow_links=follow_links, say=say,
                                    settings={"qc": qc, "prevalence": prevalence},
                                    threshold_from=moved_by if prevalence is not None else None)
    else:
        sink = StdoutSink(head, stdout)
    if dicom_out:
        from pneumo_edge.outputs.dicom_objects import DicomOutSink
        sink = DicomOutSink(sink, dicom_out, walk.files[s.resumed:], rt, used, moved_by,
                            explain_which if explain else None, log=say, head=head,
                            prevalence=prevalence, explained=explainer)
    if not walk.files:
        say("note: no image files found (.jpg .jpeg .png .bmp .tif .tiff .dcm .dicom, "
            "or DICM at byte 128)")
    _score_into(sink, walk, source, s, threshold=threshold, quiet=quiet, log=log,
                output=output, record=record, dicom_tags=tuple(dicom_tags) if extra else None,
                explainer=explainer, gate=gate)
    _report(s, rt.card.classes, output, say)
    return s


def _check_usage(paths, output, resume: bool, explain) -> None:
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


def _source(rt, ray, batch: int, workers: int | None, say) -> Source:
    """The local source over ``rt``, or Ray's (``ray``: an address) with the same model file;
    ``rt`` runs once first, so a model that does not fit its card fails before any row."""
    run_model(rt, np.zeros((1, 1, rt.card.image_size, rt.card.image_size), np.uint8),
              len(rt.card.classes))
    if ray is None:
        return LocalSource(rt, batch, workers)
    from pneumo_edge.sources.ray import RaySource

    return RaySource(rt, ray, batch=batch, log=say)


def _output_sink(output, head, files, source: Source, s: Summary, *, paths, model, used,
                 threshold, resume: bool, follow_links: bool, say, settings: dict,
                 threshold_from: str | None = None):
    """The ``-o FILE`` sink (continuing ``FILE.partial`` with ``resume``) and the started
    provenance record, written beside ``FILE.partial``; ``settings`` (qc, prevalence) are in it
    from the start and must match on resume."""
    info = source.model
    provenance.recover(output)
    earlier = provenance.check_resume(output, info, used, _has_rows(output), settings) \
        if resume else None
    record = provenance.start_record(
        output=output, inputs=paths, model=model, runtime=info, threshold=used,
        threshold_from=threshold_from or ("card" if threshold is None else "--threshold"),
        follow_links=follow_links, earlier=earlier, settings=settings)
    finished = (earlier or {}).get("input_identity") or {}

    def seal(digest):
        provenance.write(output, provenance.end_record(record, s, "finished", s.exit_code,
                                                       digest))

    sink = PartialSink(output, head, files, resume=resume, log=say,
                       check=RowCheck(info.card, used), finished_digest=finished.get("sha256"),
                       seal=seal, publish=lambda: provenance.publish(output))
    _take_resumed(s, sink.resumed, say, sink.partial)
    provenance.write(output, record)
    return sink, record


def _score_into(sink, walk, source, s: Summary, *, threshold, quiet, log, output, record,
                dicom_tags=None, explainer=None, gate=None) -> None:
    """Score every file into ``sink`` and finish it; on any failure keep what was written,
    record the outcome in the provenance file, and say how to continue."""
    status = "interrupted"
    hooks = (explainer.add_batch,) if explainer is not None else ()
    with _progress(len(walk.files), s.resumed, quiet) as bar:
        try:
            score_source(walk.files, source, sink, threshold=threshold, summary=s,
                         progress=bar, known=walk.errors, dicom_tags=dicom_tags,
                         after_batch=hooks, gate=gate)
            sink.finish()  # with -o, this writes the finished run's provenance record
            status = "finished"
        except BaseException as exc:
            sink.close()
            if sink.partial is not None and not isinstance(exc, WriteError):
                log(f"{sink.partial}: kept the rows written so far; "
                    "rerun with --resume to continue")
            status = "write failed" if isinstance(exc, WriteError) else status
            raise
        finally:
            if record is not None and status != "finished":
                _record_end(output, record, s, status, log)
    if explainer is not None:
        explainer.finish()


def _record_end(output, record, s: Summary, status: str, log) -> None:
    code = 2 if status == "write failed" else None
    try:
        provenance.write(output, provenance.end_record(record, s, status, code))
    except PneumoError as exc:
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
    if r.changed is not None:
        say(f"{path_text(r.changed)}: changed since its row was written (size, modification "
            "time or inode): scoring it and the files after it again")


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

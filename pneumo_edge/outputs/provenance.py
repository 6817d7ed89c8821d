"""``FILE.json`` beside a ``score -o FILE`` CSV: what produced it, for auditors.

Written atomically (temporary file, fsync, rename; never through a symlink). While a run
writes ``FILE.partial``, its record is ``FILE.partial.json`` (``"status": "running"`` when it
starts, its end and counts when it is interrupted or fails); a finished run's record (with the
input identity digest of :mod:`pneumo_edge.outputs.csvout`) is written there and renamed to
``FILE.json`` right after ``FILE.partial`` is renamed to ``FILE``, so ``FILE.json`` always
describes ``FILE``; an earlier run's ``FILE.json`` is never touched by a run that does not
finish. ``--resume`` reads the record of what it continues and refuses to continue a CSV that
another model file, another precision or another threshold started (:func:`check_resume`).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from pneumo_edge.errors import PneumoError

FORMAT = 1
#: size cap for reading a provenance file back (it is a few kB)
MAX_BYTES = 1 << 20
#: libraries whose versions are recorded (those installed)
LIBRARIES = ("numpy", "pillow", "click", "onnxruntime", "onnxruntime-gpu", "torch", "tensorrt")
#: what must match for --resume, as (key in "model", what to call it)
RESUME_KEYS = (("sha256", "model file sha256"), ("precision", "runtime precision"))


def provenance_path(output) -> Path:
    from pneumo_edge.outputs.csvout import beside

    return beside(output, ".json")


def running_path(output) -> Path:
    """``FILE.partial.json``: the record of the run writing ``FILE.partial``."""
    from pneumo_edge.outputs.csvout import beside

    return beside(output, ".partial.json")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def start_record(*, output, inputs, model, runtime, threshold: float, threshold_from: str,
                 follow_links: bool, earlier: dict | None = None,
                 settings: dict | None = None) -> dict:
    """The record of a run that is starting (no end time, counts or exit code yet);
    ``runtime``: a :class:`pneumo_edge.sources.ModelInfo` (or a runtime);
    ``earlier``: the record of the interrupted run it continues (``--resume``);
    ``settings``: what else shapes the rows (``qc``, ``prevalence``), compared on resume."""
    from pneumo_edge.versions import installed_versions

    card = runtime.card
    return {
        "format": FORMAT, "csv": str(Path(output).resolve()),
        "inputs": [str(p) for p in inputs], "follow_links": follow_links,
        "model": {"directory": str(Path(runtime.path).resolve().parent), "given": str(model),
                  "file": str(Path(runtime.path).resolve()), "sha256": runtime.sha256,
                  "runtime": runtime.name, "device": runtime.device,
                  "precision": runtime.precision},
        "threshold": float(threshold), "threshold_from": threshold_from,
        "classes": list(card.classes), "positive_class": card.positive_class,
        "image_size": card.image_size,
        "versions": installed_versions(LIBRARIES),
        "started": utc_now(), "finished": None, "status": "running",
        "first_started": (earlier or {}).get("first_started") or (earlier or {}).get("started"),
        "counts": None, "exit_code": None, **(settings or {}),
    }


def end_record(record: dict, summary, status: str, exit_code: int | None,
               identity: str | None = None) -> dict:
    """``record`` ended; ``identity``: the SHA-256 of the rows' input identity lines (a
    finished run: what ``--resume`` of the finished CSV compares)."""
    out = {**record, "finished": utc_now(), "status": status, "exit_code": exit_code,
           "counts": {"files": summary.files, "scored": summary.scored,
                      "failed": summary.failed, "ignored": summary.ignored,
                      "resumed": summary.resumed}}
    if identity is not None:
        out["input_identity"] = {"sha256": identity, "rows": summary.scored + summary.failed,
                                 "per_row": "SIZE MTIME_NS INODE of the input file, one line "
                                            "per row with a newline"}
    return out


def write(output, record: dict) -> None:
    """Write ``record`` to ``FILE.partial.json`` atomically (the running run's record);
    :class:`PneumoError` when it cannot be."""
    from pneumo_edge.atomic import write_text_atomic
    from pneumo_edge.outputs.csvout import regular_or_absent

    path = running_path(output)
    try:
        regular_or_absent(path, one_link=False)  # replaced by the rename, never written into
        write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise PneumoError(f"cannot write {path}: {exc.strerror or exc} "
                          "(use --resume to continue)") from None
    except PneumoError as exc:
        raise PneumoError(f"{exc} (use --resume to continue)") from None


def publish(output) -> None:
    """Move the finished run's record to ``FILE.json`` (right after its CSV became ``FILE``)."""
    from pneumo_edge.outputs.csvout import regular_or_absent

    regular_or_absent(provenance_path(output), one_link=False)
    try:
        os.replace(running_path(output), provenance_path(output))
    except OSError as exc:
        raise PneumoError(f"cannot write {provenance_path(output)}: {exc.strerror or exc}; "
                          f"the record of {output} is {running_path(output)}") from None


def recover(output) -> None:
    """Finish a publish a crash interrupted: ``FILE.partial`` gone, ``FILE.partial.json``
    says finished (its CSV was renamed to ``FILE``): move the record to ``FILE.json``."""
    from pneumo_edge.outputs.csvout import partial_path

    if os.path.lexists(partial_path(output)) or not os.path.lexists(running_path(output)):
        return
    try:
        record = read(output, running=True)
    except PneumoError:
        return
    if record and record.get("status") == "finished":
        publish(output)


def read(output, running: bool = False) -> dict | None:
    """The record in ``FILE.json`` (``running``: ``FILE.partial.json``), None when there is
    none; PneumoError when unreadable."""
    from pneumo_edge.outputs.csvout import regular_or_absent

    path = running_path(output) if running else provenance_path(output)
    if regular_or_absent(path, one_link=False) is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise ValueError("too large")
        record = json.loads(data.decode("utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("model"), dict):
            raise TypeError("not a provenance record")
    except (OSError, ValueError, TypeError) as exc:
        raise PneumoError(f"{path}: cannot resume: unreadable provenance ({exc}); "
                          "delete the partial output or drop --resume") from None
    return record


def check_resume(output, runtime, threshold: float, has_rows: bool,
                 settings: dict | None = None) -> dict | None:
    """Refuse (exit 2) to continue an interrupted ``-o FILE`` run with another model file,
    precision or threshold than the one that wrote its rows (read from ``FILE.partial.json``
    when ``FILE.partial`` exists, else from the finished ``FILE``'s ``FILE.json``)."""
    from pneumo_edge.outputs.csvout import partial_path

    running = os.path.lexists(partial_path(output))
    path = running_path(output) if running else provenance_path(output)
    record = read(output, running=running)
    if record is None:
        if has_rows:
            raise PneumoError(f"{path}: cannot resume: no record of the model that wrote the "
                              "earlier rows; delete the partial output or drop --resume")
        return None
    now = {"sha256": runtime.sha256, "precision": runtime.precision}
    for key, what in RESUME_KEYS:
        if record["model"].get(key) != now[key]:
            raise PneumoError(f"{path}: cannot resume: {what} was {record['model'].get(key)} "
                              f"in the interrupted run, now {now[key]} ({runtime.path}); "
                              "use the same model or drop --resume")
    if record.get("threshold") != float(threshold):
        raise PneumoError(f"{path}: cannot resume: threshold was {record.get('threshold')} in "
                          f"the interrupted run, now {float(threshold)}; use the same "
                          "--threshold or drop --resume")
    for key, value in (settings or {}).items():
        if record.get(key, value) != value:
            raise PneumoError(f"{path}: cannot resume: --{key} was {record.get(key)} in the "
                              f"interrupted run, now {value}; use the same --{key} or drop "
                              "--resume")
    return record

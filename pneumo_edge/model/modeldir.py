"""The model directory: one folder is one model, and this module is the only code that knows it.

It names every file in a model directory and which runtime reads which, reads and validates
the model card from any of its copies (``card.json``, the ``card`` entry of ``model.pt``, the
ONNX ``metadata_props``, the engine sidecar), checks that the copies agree with the file being
run, and writes every file into the directory with one atomic, fsynced write.

Imports no torch, onnx, onnxruntime or tensorrt at module level.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

# atomic writes have their own home; model-directory code reaches them through this module
from pneumo_edge.atomic import (  # noqa: F401
    fsync_dir,
    torch_save_atomic,
    write_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from pneumo_edge.errors import ModelError
from pneumo_edge.model.card import Card

# ----------------------------------------------------------------------------- file names

CARD_JSON = "card.json"
MODEL_PT = "model.pt"
LAST_PT = "last.pt"
METRICS_JSON = "metrics.json"
HISTORY_CSV = "history.csv"
CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion.png"
ONNX_FP32 = "model.onnx"
ONNX_FP16 = "model.fp16.onnx"
ONNX_INT8 = "model.int8.onnx"
ENGINE = "model.fp16.engine"
SIDECAR = ENGINE + ".json"
PARITY_JSON = "parity.json"
TIMING_CACHE = "trt_timing.cache"

#: metadata_props key of the card in an exported ONNX file
ONNX_CARD_KEY = "pneumo_edge.model.card"
#: metadata_props key of the sha256 of the model.pt the ONNX file was exported from
ONNX_WEIGHTS_KEY = "pneumo_edge.weights_sha256"


@dataclass(frozen=True)
class Form:
    """One runnable file of a model directory: the runtime that reads it and its precision."""

    runtime: str
    file: str
    precision: str


#: every runnable form (``auto``'s order of preference lives in pneumo_edge.runtimes).
#: torch-fp16 runs model.pt in half precision on CUDA: a form of its own because it gives other
#: numbers than torch fp32 and so needs parity evidence like any exported form.
FORMS = (Form("torch", MODEL_PT, "fp32"), Form("onnx", ONNX_FP32, "fp32"),
         Form("onnx-fp16", ONNX_FP16, "fp16"), Form("onnx-int8", ONNX_INT8, "int8"),
         Form("trt", ENGINE, "fp16"), Form("torch-fp16", MODEL_PT, "fp16"))
BY_RUNTIME = {f.runtime: f for f in FORMS}
#: the form a file name means when named with --model (model.pt: torch fp32)
BY_FILE = {f.file: f for f in reversed(FORMS)}
RUNTIMES = tuple(f.runtime for f in FORMS)
#: the files ``pneumo-edge export`` writes, in that order
EXPORTED_FORMS = (BY_RUNTIME["onnx"], BY_RUNTIME["onnx-fp16"], BY_RUNTIME["onnx-int8"],
                  BY_RUNTIME["trt"])
#: the forms parity checks against torch fp32, in that order
PARITY_FORMS = (*EXPORTED_FORMS, BY_RUNTIME["torch-fp16"])

#: what one training run writes (``train --force`` replaces exactly these)
TRAINING_OUTPUTS = (MODEL_PT, LAST_PT, CARD_JSON, METRICS_JSON, HISTORY_CSV, CURVES_PNG,
                    CONFUSION_PNG)
#: the folder of decoded training pixels a run keeps for later runs (default of ``train --cache``;
#: keyed by its inputs and reused, never removed by ``--force``; not needed on an edge box)
PIXEL_CACHE = "pixel-cache"
#: what ``pneumo-edge export`` writes from those (stale once the weights change)
EXPORT_OUTPUTS = (ONNX_FP32, ONNX_FP16, ONNX_INT8, ENGINE, SIDECAR, PARITY_JSON, TIMING_CACHE)


def form_for_runtime(runtime: str) -> Form:
    try:
        return BY_RUNTIME[runtime]
    except KeyError:
        raise ModelError(f"unknown runtime {runtime!r}; choose auto or one of "
                         f"{', '.join(RUNTIMES)}") from None


# ----------------------------------------------------------------------------- identity


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a regular file (refuses FIFOs, directories and devices)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_regular(path: str | os.PathLike):
    """A binary file object for ``path`` if it is a regular file; ModelError otherwise.
    Opened with O_NONBLOCK, so a FIFO swapped in after the check cannot block the open."""
    path = Path(path)
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Refused(f"{path}: not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: str | os.PathLike) -> os.stat_result:
    """os.stat of ``path`` (following links); ModelError unless it is a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelError(f"{path}: not found") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{path}: not a regular file ({_kind(st.st_mode)})")
    return st


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


class Refused(ModelError):
    """A model directory whose files contradict each other or are not what they claim to be
    (a copy of the card that disagrees, a FIFO in place of a model file). ``auto`` never
    skips past this to another runtime: it is an error, never a guess."""


#: the card fields every copy of the card must agree on (what changes the answers)
AGREED_FIELDS = ("classes", "positive_class", "image_size", "threshold", "arch", "net")
#: the entries of the card's metrics a run reads, and their keys every copy must agree on: the
#: input gate's threshold (the qc column) and the calibration's validation rate (--prevalence)
AGREED_METRICS = {"ood": ("method", "threshold"),
                  "calibration": ("method", "temperature", "bias", "prevalence")}
#: largest JSON file read (card.json, the sidecar): a card is a few KiB
JSON_CAP = 1 << 20


def write_card(run_dir: str | os.PathLike, card: Card) -> Path:
    return write_text_atomic(Path(run_dir) / CARD_JSON, card.to_json() + "\n")


# ----------------------------------------------------------------------------- reading


def read_regular(path: str | os.PathLike, cap: int | None = None) -> bytes:
    """The bytes of a regular file, refusing anything over ``cap`` bytes."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if cap is not None and size > cap:
            raise Refused(f"{path}: {size} bytes, more than the {cap} a model file of this "
                          f"kind can be")
        data = f.read(cap + 1 if cap is not None else -1)
    if cap is not None and len(data) > cap:
        raise Refused(f"{path}: more than {cap} bytes")
    return data


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    """A size-capped, UTF-8, JSON file (regular files only)."""
    data = read_regular(path, JSON_CAP)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(f"{path}: {what} is not UTF-8 text") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise Refused(f"{path}: {what} is not valid JSON ({exc})") from None


def card_from(obj, source: str | os.PathLike) -> Card:
    """A Card from a parsed copy of the card; errors name ``source``."""
    try:
        return Card.from_dict(obj)
    except ModelError as exc:
        raise Refused(f"{source}: {exc}") from None


def read_card(path: str | os.PathLike) -> Card:
    """``card.json`` of a model directory (or the card file itself), validated."""
    path = Path(path)
    if path.is_dir():
        path = path / CARD_JSON
    if not os.path.lexists(path):
        raise ModelError(f"{path}: no model card (is this a pneumo-edge model directory?)")
    return card_from(read_json(path, "model card"), path)


def directory_card(model_file: str | os.PathLike) -> Card | None:
    """The card.json next to ``model_file``, or None when there is none."""
    path = Path(model_file).parent / CARD_JSON
    return read_card(path) if os.path.lexists(path) else None


# ----------------------------------------------------------------------------- which file runs


@dataclass(frozen=True)
class Target:
    """What ``--model`` (and ``--runtime``) name: the model directory, the form to run (None
    when ``auto`` on a directory leaves the choice to the runtimes) and card.json's card (None
    when the directory has no card.json: the runtime then uses the card in the file it runs)."""

    dir: Path
    form: Form | None
    card: Card | None

    @property
    def file(self) -> Path | None:
        return None if self.form is None else self.dir / self.form.file


def resolve(model: str | os.PathLike, runtime: str | None = "auto") -> Target:
    """``model`` is a model directory or one model file in it; a file fixes the form, and an
    explicit ``runtime`` that contradicts it is an error."""
    p = Path(model)
    if not os.path.lexists(p):
        raise ModelError(f"{model}: no such model directory or model file")
    d, form = (p, None) if p.is_dir() else (p.parent, _form_of_file(p))
    if runtime not in (None, "auto"):
        want = form_for_runtime(runtime)
        if form is not None and want.file != form.file:
            raise ModelError(f"{p} is run by --runtime {form.runtime}, not --runtime {runtime} "
                             f"(pass the directory {d} to choose the runtime)")
        form = want
    card = read_card(d) if os.path.lexists(d / CARD_JSON) else None
    return Target(d, form, card)


def _form_of_file(p: Path) -> Form | None:
    if p.name in BY_FILE:
        return BY_FILE[p.name]
    if p.name == SIDECAR:
        return BY_RUNTIME["trt"]
    if p.name == CARD_JSON:
        return None
    raise ModelError(f"{p}: not a model file; pass the model directory or one of "
                     f"{', '.join(BY_FILE)}")


def model_file(d: str | os.PathLike, form: Form) -> Path:
    """``d``'s file for ``form``: present and a regular file, or ModelError with the command
    that makes it."""
    path = Path(d) / form.file
    if not os.path.lexists(path):
        raise ModelError(f"{path}: not found ({make_hint(d, form)})")
    check_regular(path)
    return path


def _form_named(file: Path) -> Form:
    """The form of a model file by its name (an ONNX file under another name: onnx)."""
    if file.name == SIDECAR:
        return BY_RUNTIME["trt"]
    return BY_FILE.get(file.name, BY_RUNTIME["onnx"])


def make_hint(d: str | os.PathLike, form: Form) -> str:
    """The command that (re)makes ``form``'s file in ``d``."""
    if form.file == MODEL_PT:
        return f"train a model: pneumo-edge train --data DATA --out {d}"
    if form.runtime == "trt":
        return f"run: pneumo-edge export {d} --trt"
    return f"run: pneumo-edge export {d}"


def fix_hint(d: str | os.PathLike, form: Form) -> str:
    """What to do when ``form``'s file contradicts the rest of ``d``."""
    if form.runtime == "torch":
        return f"mismatched files: {CARD_JSON} must be the one training wrote with {MODEL_PT}"
    if form.runtime == "trt":
        return f"rebuild: pneumo-edge export {d} --trt"
    return f"re-export: pneumo-edge export {d}"


# ----------------------------------------------------------------------------- consistency


def agreed_card(file: str | os.PathLike, embedded: Card, card: Card | None,
                embedded_in: str | os.PathLike | None = None) -> Card:
    """The card to run ``file`` with: card.json's ``card`` when it agrees on every
    AGREED_FIELDS with the card ``embedded`` in ``file`` (or in ``embedded_in``, e.g. the
    engine's sidecar), the embedded one when there is no card.json; Refused otherwise."""
    file = Path(file)
    if card is None:
        return embedded
    for name, ours, theirs in [*((n, getattr(card, n), getattr(embedded, n))
                                 for n in AGREED_FIELDS), *_agreed_metrics(card, embedded)]:
        if ours != theirs:
            raise Refused(f"{file.parent / CARD_JSON} and {embedded_in or file} disagree on "
                          f"{name}: {ours!r} vs {theirs!r} "
                          f"({fix_hint(file.parent, _form_named(file))})")
    return card


def _agreed_metrics(card: Card, embedded: Card):
    """(name, card.json's value, the embedded card's) of each AGREED_METRICS value."""
    for entry, keys in AGREED_METRICS.items():
        ours, theirs = (c.metrics.get(entry) if isinstance(c.metrics.get(entry), dict) else {}
                        for c in (card, embedded))
        for k in keys:
            yield f"metrics.{entry}.{k}", ours.get(k), theirs.get(k)


def check_weights(file: str | os.PathLike, recorded: str | None,
                  recorded_in: str | os.PathLike | None = None) -> None:
    """An exported ``file`` records the sha256 of the model.pt it came from; when that model.pt
    is in the same directory it must be the same one (otherwise the export is stale and the
    card's threshold was chosen for other weights). Refused when it differs or is unrecorded."""
    file = Path(file)
    pt = file.parent / MODEL_PT
    if not os.path.lexists(pt):
        return  # an edge copy without model.pt: the file's own card is the reference
    hint = fix_hint(file.parent, _form_named(file))
    if not recorded:
        raise Refused(f"{recorded_in or file} records no weights sha256, so it cannot be "
                      f"checked against {pt} ({hint})")
    actual = sha256_file(pt)
    if actual != recorded:
        raise Refused(f"{pt} and {recorded_in or file} disagree on weights_sha256: "
                      f"{actual[:16]} vs {str(recorded)[:16]} ({hint})")


# ----------------------------------------------------------------------------- ONNX metadata


def onnx_metadata(card: Card, weights_sha256: str) -> dict[str, str]:
    """The metadata_props an exported ONNX file carries."""
    return {ONNX_CARD_KEY: card.to_json(), ONNX_WEIGHTS_KEY: weights_sha256}


def onnx_card(path: str | os.PathLike, metadata: dict) -> Card:
    """The card in an ONNX file's metadata (from onnxruntime's custom_metadata_map or onnx's
    metadata_props); Refused when it has none."""
    if ONNX_CARD_KEY not in metadata:
        raise Refused(f"{path}: no model card in its metadata (not exported by pneumo-edge; "
                      f"{fix_hint(Path(path).parent, BY_RUNTIME['onnx'])})")
    try:
        obj = json.loads(metadata[ONNX_CARD_KEY])
    except (ValueError, RecursionError) as exc:
        raise Refused(f"{path}: the model card in its metadata is not valid JSON ({exc})") from None
    return card_from(obj, path)


# ----------------------------------------------------------------------------- engine sidecar


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(engine_path)}.json")


def read_sidecar(engine_path: str | os.PathLike) -> dict:
    """The sidecar of an engine: what built it, from which ONNX and weights, and the card."""
    path, rebuild = sidecar_path(engine_path), fix_hint(Path(engine_path).parent, BY_RUNTIME["trt"])
    if not os.path.lexists(path):
        raise ModelError(f"{path}: missing, so nothing says what built "
                         f"{Path(engine_path).name} ({rebuild})")
    try:
        meta = read_json(path, "engine sidecar")
    except Refused as exc:
        raise Refused(f"{exc} ({rebuild})") from None
    if not isinstance(meta, dict):
        raise Refused(f"{path}: not a JSON object ({rebuild})")
    return meta


def sidecar_card(engine_path: str | os.PathLike, meta: dict) -> Card:
    if not isinstance(meta.get("card"), dict):
        raise Refused(f"{sidecar_path(engine_path)}: records no model card "
                      f"({fix_hint(Path(engine_path).parent, BY_RUNTIME['trt'])})")
    return card_from(meta["card"], sidecar_path(engine_path))


def sidecar(platform: dict, onnx_path, card: Card, weights_sha256: str, **build) -> dict:
    """The sidecar dict for an engine built on ``platform`` (tensorrt, gpu,
    compute_capability) from ``onnx_path``; ``build``: profile, timing cache, timings."""
    return {"tensorrt": platform["tensorrt"], "gpu": platform["gpu"],
            "compute_capability": platform["compute_capability"], **build,
            "source_onnx": Path(onnx_path).name, "source_onnx_sha256": sha256_file(onnx_path),
            "weights_sha256": weights_sha256, "card": card.to_dict()}


def stale_source(engine_path: str | os.PathLike, meta: dict) -> str:
    """'' unless the ONNX the engine was built from is in the directory and has changed."""
    name = Path(str(meta.get("source_onnx", ONNX_FP16))).name
    src, want = Path(engine_path).parent / name, meta.get("source_onnx_sha256")
    if not want or not os.path.lexists(src):
        return ""
    return "" if sha256_file(src) == want else f"built from an older {src.name}"


# ----------------------------------------------------------------------------- verification


def card_sha256(card: Card) -> str:
    """The identity of one copy of the card: sha256 of its canonical JSON. Two training runs
    never share it (their metrics, split and creation time differ), so it ties parity evidence
    to the run that made it even where AGREED_FIELDS alone cannot tell two runs apart."""
    return hashlib.sha256(card.to_json().encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Verified:
    """A model file checked against its directory: the card to run it with and the identities
    parity evidence must match (:func:`parity_evidence`)."""

    card: Card  # card.json's when the directory has one, else the file's own
    sha256: str  # of the file's bytes as run
    weights_sha256: str  # of the model.pt the file came from (model.pt: its own sha256)
    card_sha256: str  # card_sha256(card)
    embedded_card_sha256: str  # of the copy of the card inside the file (or its sidecar)


def verify_file(file: str | os.PathLike, sha256: str, embedded: Card, weights: str | None,
                card: Card | None = None, embedded_in: str | os.PathLike | None = None
                ) -> Verified:
    """The one check every runtime makes, once, on the file it is about to run: card.json
    (``card``; None: read from the directory, if there) agrees with the card ``embedded`` in the
    file (or in ``embedded_in``, the engine's sidecar), and the file came from the model.pt beside
    it (``weights``: the model.pt sha256 the file records; for model.pt itself, its ``sha256``).
    Refused on any disagreement."""
    file = Path(file)
    if card is None:
        card = directory_card(file)
    card = agreed_card(file, embedded, card, embedded_in=embedded_in)
    if file.name != MODEL_PT:
        check_weights(file, weights, recorded_in=embedded_in)
    return Verified(card, sha256, weights if file.name != MODEL_PT else sha256,
                    card_sha256(card), card_sha256(embedded))


# ----------------------------------------------------------------------------- parity evidence

#: parity's default tolerances per precision (what ``export`` gates on unless told otherwise, and
#: the floor ``auto`` holds recorded tolerances to): max |dp| (None: reported, not gated), label
#: agreement, max metric delta, max ROC AUC delta
PARITY_TOLERANCES = {
    "fp32": {"max_abs": 1e-4, "min_agreement": 1.0, "max_metric_delta": 0.0,
             "max_auc_delta": 1e-3},
    "fp16": {"max_abs": 1e-2, "min_agreement": 0.995, "max_metric_delta": 0.005,
             "max_auc_delta": 0.005},
    "int8": {"max_abs": None, "min_agreement": 0.99, "max_metric_delta": 0.01,
             "max_auc_delta": 0.005},
}
#: the least evidence that verifies a reduced-precision form: parity on at least this many
#: decodable images, with at least MIN_PARITY_PER_CLASS of every class. Fewer, and a one-image
#: flip (0.5 % at 200) could hide below the tolerances; the form is then "not verified"
MIN_PARITY_IMAGES = 200
MIN_PARITY_PER_CLASS = 20


@dataclass(frozen=True)
class Evidence:
    """What parity.json says about one file: ``passed`` only when its entry passed, on enough
    images, at tolerances no looser than the defaults, for exactly this file and this model's
    weights and card; ``failed`` when it records a failure of exactly this file; ``why`` says
    so in words either way."""

    passed: bool
    why: str
    failed: bool = False


def evidence_size(images: dict, classes) -> tuple[int, str]:
    """(number of parity images, '' when that is enough evidence, else why not)."""
    n, per_class = images.get("count"), images.get("per_class")
    if not _is_count(n) or not isinstance(per_class, dict) or \
            not all(_is_count(per_class.get(c)) for c in classes):
        return 0, "records no image counts per class (re-run: pneumo-edge export)"
    low = [c for c in classes if per_class[c] < MIN_PARITY_PER_CLASS]
    if n < MIN_PARITY_IMAGES or low:
        return n, (f"not verified: parity ran on {n} images "
                   + (f"({', '.join(f'{per_class[c]} {c}' for c in low)})" if low else "")
                   + f", the floor is {MIN_PARITY_IMAGES} with {MIN_PARITY_PER_CLASS} per class")
    return n, ""


def parity_evidence(d: str | os.PathLike, form: Form, v: Verified) -> Evidence:
    """Whether ``d``'s parity.json verifies ``form`` run from the file ``v`` describes.
    A parity.json whose fields have the wrong types is Refused (exit 2), never half-read."""
    path = Path(d) / PARITY_JSON
    if not os.path.lexists(path):
        return Evidence(False, f"no {PARITY_JSON} (run: pneumo-edge export {d})")
    try:
        report = read_json(path, "parity report")
    except ModelError as exc:
        return Evidence(False, str(exc))
    entry = _parity_entry(path, report, form)
    if entry is None:
        return Evidence(False, f"{path}: no entry for {form.runtime}")
    if entry.get("sha256") != v.sha256:
        return Evidence(False, f"{form.file} changed since parity (sha256 differs)")
    ident = report.get("identity") or {}
    if ident.get("weights_sha256") != v.weights_sha256 or \
            not ident.get("card_sha256") == v.card_sha256 == v.embedded_card_sha256:
        return Evidence(False, f"refused: {PARITY_JSON} and {form.file} are not from the model "
                               f"of this directory's {CARD_JSON} (weights or card differ; "
                               f"re-run: pneumo-edge export {d})")
    if entry["status"] != "pass":
        return Evidence(False, f"parity {entry['status']} for {form.file}",
                        failed=entry["status"] == "fail")
    n, weak = evidence_size(report["images"], v.card.classes)
    if weak:
        return Evidence(False, f"{form.file} {weak}")
    loose = looser_than_defaults(entry["tolerance"], form.precision)
    if loose:
        return Evidence(False, f"{form.file} passed at tolerances looser than the defaults "
                               f"({loose}); auto runs it only at the defaults")
    return Evidence(True, _evidence_text(entry, n))


def _parity_entry(path: Path, report, form: Form) -> dict | None:
    """``form``'s entry of a parsed parity.json, its fields type-checked (Refused if not)."""
    def bad(what: str):
        return Refused(f"{path}: {what} (re-run: pneumo-edge export {path.parent})")

    if not isinstance(report, dict) or not isinstance(report.get("forms"), dict):
        raise bad("not a parity report (no forms object)")
    if not isinstance(report.get("images", {}), dict) or \
            not isinstance(report.get("identity", {}), dict):
        raise bad("images or identity is not an object")
    entry = report["forms"].get(form.runtime)
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("status"), str):
        raise bad(f"the {form.runtime} entry has no status")
    if entry["status"] != "pass":
        return entry
    deltas, tol = entry.get("metric_deltas"), entry.get("tolerance")
    if not _is_real(entry.get("agreement")) or not isinstance(deltas, dict) or \
            not all(_is_real(x) for x in deltas.values()) or not isinstance(tol, dict) or \
            not all(x is None or _is_real(x) for x in tol.values()) or \
            not (entry.get("roc_auc_delta") is None or _is_real(entry["roc_auc_delta"])):
        raise bad(f"the {form.runtime} entry's agreement, metric_deltas, roc_auc_delta or "
                  f"tolerance has the wrong type")
    return entry


def looser_than_defaults(tol: dict, precision: str) -> str:
    """'' when the recorded tolerances ``tol`` are at least as strict as PARITY_TOLERANCES for
    ``precision``; else the looser ones, as ``name recorded > default``."""
    out = []
    for key, default in PARITY_TOLERANCES[precision].items():
        got = tol.get(key)
        if default is None:
            continue
        lower_is_looser = key == "min_agreement"
        if got is None or (got < default if lower_is_looser else got > default):
            out.append(f"{key} {got} vs {default}")
    return ", ".join(out)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _evidence_text(entry: dict, n: int) -> str:
    worst = max((abs(v) for v in entry["metric_deltas"].values()), default=0.0)
    text = (f"parity passed on {n} images: agreement {100 * entry['agreement']:.1f} %, "
            f"max metric delta {100 * worst:.2f} points")
    auc = entry.get("roc_auc_delta")
    return text + (f", ROC AUC delta {auc:+.4f}" if auc is not None else "")

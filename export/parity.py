"""Parity: the exported forms must give the same answers as PyTorch on real images.

Every form (model.onnx, model.fp16.onnx, model.int8.onnx, model.fp16.engine, and torch-fp16 on
CUDA) runs on the same decoded pixels as the torch fp32 reference (decoded once, by
pneumo_edge.inputs.images). Per form: max and mean |delta p|, label agreement at the card's threshold,
accuracy / precision / recall (sensitivity) / specificity / F1 and ROC AUC with their deltas
against torch. A form fails when it exceeds its precision's tolerance; the report then names the
smallest tolerance that would have passed (like Polygraphy's comparator).

A form is "skipped" only when it was not built or cannot run on this machine (no GPU, no
TensorRT); a file that exists but fails to open or run is a failure. parity.json records each
file's sha256, the model's identity (model.pt's and the card's sha256) and the image counts:
``auto`` picks a reduced-precision form only when its entry passed for that exact file of this
model, on at least modeldir.MIN_PARITY_IMAGES images, at the default tolerances
(pneumo_edge.model.modeldir.parity_evidence).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pneumo_edge.errors import DataError, ModelError, RuntimeUnavailable
from pneumo_edge.evaluation.metrics import binary_metrics
from pneumo_edge.inputs.folders import scan_labelled
from pneumo_edge.inputs.pipeline import decode_labelled, predict_outputs
from pneumo_edge.model import modeldir
from pneumo_edge.model.card import Card
from pneumo_edge.runtimes import backend, open_form, why_unavailable
from pneumo_edge.versions import installed_versions

CHECKED_METRICS = ("accuracy", "precision", "recall", "specificity", "f1")
#: the forms checked, in order (modeldir.Form: runtime name, file, precision)
FORMS = modeldir.PARITY_FORMS
OPTION = {"max_abs": "--tol-{p}", "min_agreement": "--min-agreement-{p}",
          "max_metric_delta": "--max-metric-delta-{p}", "max_auc_delta": "--max-auc-delta-{p}"}
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class Tolerance:
    """One precision's parity limits (defaults: :func:`default_tolerances`); ``metadata["help"]``
    is what ``pneumo-edge export --help`` says after the precision's name."""

    # max |p_form - p_torch| over all images and classes (None: reported)
    max_abs: float | None = field(metadata={"help": "max |delta p|."})
    # share of images with the same label, 0..1
    min_agreement: float = field(metadata={"help": "share of images with the torch label."})
    # max |metric_form - metric_torch| over CHECKED_METRICS
    max_metric_delta: float = field(metadata={
        "help": "max |delta| of accuracy, precision, sensitivity, specificity, F1 "
                "(0.01 = 1 point)."})
    # |ROC AUC_form - ROC AUC_torch| (None: reported only)
    max_auc_delta: float | None = field(default=None, metadata={"help": "max |delta ROC AUC|."})


def default_tolerances() -> dict[str, Tolerance]:
    """fp32: the same numbers; fp16: the same labels and metrics within half a point; int8
    (whose probabilities move by a few hundredths by design): the same labels on 99 % of images,
    every metric within one point and ROC AUC within 0.005, max |dp| reported, not gated.
    (The numbers live in modeldir.PARITY_TOLERANCES: ``auto`` holds recorded ones to them.)"""
    return {p: Tolerance(**t) for p, t in modeldir.PARITY_TOLERANCES.items()}


@dataclass
class ParityImages:
    pixels: np.ndarray  # uint8 [N, 1, S, S]
    labels: np.ndarray  # class index [N]
    source: dict = field(default_factory=dict)


def parity_images(card: Card, parity_data=None, warn=None) -> ParityImages:
    """Decode the parity images once: ``parity_data`` (FOLDER/CLASS/*) or the card's val split."""
    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    if parity_data is not None:
        samples = scan_labelled(parity_data, card.classes).samples
        source = {"source": "--parity-data", "path": os.path.abspath(parity_data)}
    else:
        samples, source = _card_val_samples(card, warn)
    px, labels, failed = decode_labelled(samples, card.image_size)
    for f in failed[:5]:
        warn(f"parity: skipping {f}")
    if not len(px):
        raise DataError(f"{source['path']}: none of the {len(samples)} parity images can be "
                        f"decoded; pass --parity-data FOLDER")
    per_class = {c: int(np.sum(labels == i)) for i, c in enumerate(card.classes)}
    return ParityImages(px, labels, {"count": len(px), "per_class": per_class, **source,
                                     "skipped_unreadable": len(failed)})


def _card_val_samples(card: Card, warn) -> tuple[list, dict]:
    split = card.split or {}
    ask = "pass --parity-data FOLDER (a labelled folder FOLDER/CLASS/*)"
    if split.get("method") == "folder" and split.get("val_folder"):
        folder = split["val_folder"]
        if not os.path.isdir(folder):
            raise DataError(f"{folder}: the card's validation folder is not here; {ask}")
        return scan_labelled(folder, card.classes).samples, {
            "source": "validation folder recorded in the card", "path": folder}
    root, files = split.get("data"), split.get("val_files") or []
    if not root or not files:
        raise DataError(f"the model card records no validation split to check parity on; {ask}")
    samples = [(os.path.join(root, f), _class_of(f, card)) for f in files]
    present = [s for s in samples if os.path.exists(s[0])]
    if not present:
        raise DataError(f"{root}: the card's {len(files)} validation images are not on this "
                        f"machine; {ask}")
    if len(present) < len(samples):
        warn(f"parity: {len(samples) - len(present)} of the card's validation images are missing")
    return present, {"source": "validation split recorded in the card", "path": root,
                     "missing": len(samples) - len(present)}


def _class_of(rel: str, card: Card) -> int:
    for part in Path(rel).parts[:-1]:
        if part in card.classes:
            return card.classes.index(part)
    raise DataError(f"card validation file {rel} is not under a class folder {card.classes}")


def labels_of(probs: np.ndarray, card: Card) -> np.ndarray:
    return np.array([card.label_index(row) for row in probs], dtype=np.int64)


def score(probs: np.ndarray, truth: np.ndarray, card: Card) -> dict:
    m = binary_metrics(truth == card.positive_index, probs[:, card.positive_index],
                       card.threshold)
    return {k: m[k] for k in (*CHECKED_METRICS, "specificity", "roc_auc", "confusion_matrix")}


def compare(ref: np.ndarray, probs: np.ndarray, truth: np.ndarray, card: Card,
            tol: Tolerance) -> dict:
    """One form against the torch reference: differences, metrics, verdict, smallest pass."""
    dp = np.abs(probs.astype(np.float64) - ref.astype(np.float64))
    agree = float(np.mean(labels_of(probs, card) == labels_of(ref, card)))
    m, m_ref = score(probs, truth, card), score(ref, truth, card)
    deltas = {k: m[k] - m_ref[k] for k in CHECKED_METRICS}
    auc_delta = _auc_delta(m["roc_auc"], m_ref["roc_auc"])
    got = Tolerance(max_abs=float(dp.max()), min_agreement=agree,
                    max_metric_delta=max(abs(d) for d in deltas.values()),
                    max_auc_delta=abs(auc_delta) if auc_delta is not None else None)
    failures = [k for k in ("max_abs", "min_agreement", "max_metric_delta", "max_auc_delta")
                if _exceeds(k, getattr(got, k), getattr(tol, k))]
    return {"status": "fail" if failures else "pass", "max_abs_diff": got.max_abs,
            "mean_abs_diff": float(dp.mean()), "agreement": agree, "roc_auc_delta": auc_delta,
            "disagreements": round((1 - agree) * len(truth)), "metrics": m,
            "metric_deltas": deltas, "tolerance": asdict(tol), "failed": failures,
            "smallest_passing": asdict(got)}


def _auc_delta(auc, auc_ref) -> float | None:
    """ROC AUC difference; None when it is undefined (one class only among the images)."""
    if auc is None or auc_ref is None or not (math.isfinite(auc) and math.isfinite(auc_ref)):
        return None
    return float(auc - auc_ref)


def _exceeds(key: str, got, tol) -> bool:
    if tol is None or got is None:
        return False
    return got < tol if key == "min_agreement" else got > tol


def run_parity(run_dir, card: Card, images: ParityImages, tolerances: dict[str, Tolerance],
               batch: int = 32, skip: dict | None = None, extra: dict | None = None,
               warn=None) -> dict:
    """Run torch and every exported form in ``run_dir`` on ``images``; the parity report.
    ``skip``: form name -> reason, for forms listed as skipped without running them;
    ``extra``: form name -> fields added to its entry (e.g. the INT8 calibration record).
    The report binds the evidence to the model: ``identity`` (model.pt's sha256 and the card's,
    modeldir.card_sha256) and the image counts per class, which ``auto`` holds to
    modeldir.MIN_PARITY_IMAGES; warnings (weak evidence, evidence replaced) go to ``warn``."""
    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    run_dir = Path(run_dir)
    before = _previous_report(run_dir)
    torch_rt = _open_torch(run_dir, card)
    ref, ref_ood = predict_outputs(torch_rt, images.pixels, batch)
    report = {"passed": True, "images": images.source,
              "identity": {"weights_sha256": torch_rt.sha256,
                           "card_sha256": modeldir.card_sha256(card)},
              "evidence_floor": {"images": modeldir.MIN_PARITY_IMAGES,
                                 "per_class": modeldir.MIN_PARITY_PER_CLASS},
              "reference": {"form": "torch", "file": torch_rt.path.name,
                            "sha256": torch_rt.sha256, "precision": "fp32",
                            "device": torch_rt.device, "tf32": getattr(torch_rt, "tf32", False),
                            "metrics": score(ref, images.labels, card)},
              "threshold": card.threshold, "positive_class": card.positive_class,
              "tolerances": {k: asdict(v) for k, v in tolerances.items()}, "forms": {},
              "versions": versions(),
              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    for form in FORMS:
        entry = {"file": form.file, "precision": form.precision, **(extra or {}).get(
            form.runtime, {})}
        entry.update(_check_form(run_dir, card, form, images, ref, tolerances, batch,
                                 (skip or {}).get(form.runtime), ref_ood))
        _weigh_against(before, entry, form, report["identity"], len(images.labels), warn)
        report["passed"] &= entry["status"] != "fail"
        report["forms"][form.runtime] = entry
    _, weak = modeldir.evidence_size(images.source, card.classes)
    if weak:
        warn(f"parity evidence is weak, {weak}: reduced-precision forms are recorded but not "
             f"verified, and auto will not pick them")
    return report


def _previous_report(run_dir: Path) -> dict:
    """The parity.json this run replaces ({} when there is none or it cannot be read)."""
    try:
        old = modeldir.read_json(run_dir / modeldir.PARITY_JSON, "parity report")
    except ModelError:
        return {}
    return old if isinstance(old, dict) and isinstance(old.get("forms"), dict) else {}


def _weigh_against(before: dict, entry: dict, form: modeldir.Form, identity: dict, n: int,
                   warn) -> None:
    """A weaker run never replaces stronger evidence silently: when the previous parity.json
    checked this very file (same sha256, same weights) on more images, say so; when it failed
    there on more images, a pass now does not overrule it: the entry stays failed. (On as many
    images, a pass replaces a failure: that is how a user loosens a tolerance; auto still holds
    recorded tolerances to the defaults.)"""
    old = before.get("forms", {}).get(form.runtime)
    images = before.get("images")
    old_n = images.get("count") if isinstance(images, dict) else None
    same_file = isinstance(old, dict) and old.get("sha256") and \
        old.get("sha256") == entry.get("sha256") and before.get("identity") == identity
    if not same_file or not isinstance(old_n, int):
        return
    if old.get("status") == "fail" and entry["status"] == "pass" and old_n > n:
        entry.update(status="fail", failed=[],
                     reason=f"this file failed parity on {old_n} images before; a pass on {n} "
                            f"does not overrule it (remove {modeldir.PARITY_JSON} to start over)")
        warn(f"parity: {form.file} failed on {old_n} images in the previous {modeldir.PARITY_JSON}"
             f"; it stays failed (a pass on {n} images does not overrule that)")
    elif old_n > n and old.get("status") in ("pass", "fail"):
        warn(f"parity: the previous {modeldir.PARITY_JSON} checked {form.file} on {old_n} images; "
             f"it is replaced by this run's {n}")


def _check_form(run_dir: Path, card: Card, form: modeldir.Form, images: ParityImages,
                ref: np.ndarray, tolerances: dict, batch: int, skip_reason,
                ref_ood: np.ndarray | None = None) -> dict:
    """One form's entry: skipped (not built, or cannot run on this machine), fail (exists but
    cannot be opened or run, or out of tolerance) or pass."""
    if skip_reason:
        return {"status": "skipped", "reason": skip_reason}
    rt, status, why = _open_form(run_dir, card, form)
    if rt is None:
        return {"status": status, "reason": why}
    try:
        probs, ood = predict_outputs(rt, images.pixels, batch)
    except (RuntimeError, TypeError, ValueError, ModelError) as exc:
        # what TensorRT, cuda-python and onnxruntime raise when a loaded model cannot run
        return {"status": "fail", "device": rt.device, "sha256": rt.sha256,
                "reason": f"opened but failed to run: {_one_line(exc)}"}
    entry = compare(ref, probs, images.labels, card, tolerances[form.precision])
    gate = compare_ood(ref_ood, ood, card, tolerances[form.precision])
    if gate is not None:
        entry["ood"] = gate
        if gate["status"] == "fail":
            entry["status"], entry["failed"] = "fail", [*entry["failed"], "ood_agreement"]
    return {"device": rt.device, "sha256": rt.sha256, **entry}


def compare_ood(ref_ood, ood, card: Card, tol: Tolerance) -> dict | None:
    """The gate's output against torch's (issue 20; None for a model without a gate): the
    share of images flagged alike at the card's gate threshold must reach the labels'
    ``min_agreement``; the largest difference, relative to that threshold, is reported."""
    from pneumo_edge.model.qc import gate

    entry = gate(card)
    if ref_ood is None or entry is None:
        return None
    if ood is None:
        return {"status": "fail", "reason": "the file has no ood output"}
    thr = float(entry["threshold"])
    agree = float(np.mean((ood > thr) == (ref_ood > thr)))
    ok = tol.min_agreement is None or agree >= tol.min_agreement
    return {"status": "pass" if ok else "fail", "flag_agreement": agree,
            "max_rel_diff": float(np.max(np.abs(ood - ref_ood)) / max(abs(thr), 1e-12))}


def _open_torch(run_dir: Path, card: Card):
    # fp32 reference on the CPU: CUDA convolutions may use TF32 by default, which alone would
    # exceed the fp32 tolerance (the runtime reports tf32; parity.json records it)
    return open_form(run_dir, "torch", device="cpu", card=card)


def _open_form(run_dir: Path, card: Card, form: modeldir.Form):
    """(runtime, "", "") or (None, "skipped" | "fail", why). ONNX forms run on the CPU (exact
    fp32 reference; int8 is what a CPU edge box runs); torch-fp16 and the engine need CUDA: a
    GPU form that is not built or cannot run here is skipped, any other form that cannot open
    is a failure."""
    gpu_form = backend(form.runtime).gpu
    device = None if gpu_form else "cpu"
    if not os.path.lexists(run_dir / form.file):
        if gpu_form:
            return None, "skipped", "not built (" + modeldir.make_hint(run_dir, form) + ")"
        return None, "fail", f"{form.file} not found"
    why = why_unavailable(form.runtime, device)
    if why:
        return None, ("skipped" if gpu_form else "fail"), why
    try:
        return open_form(run_dir, form.runtime, device=device, card=card), "", ""
    except RuntimeUnavailable as exc:  # no GPU, no tensorrt package: cannot run *here*
        return None, ("skipped" if gpu_form else "fail"), str(exc)
    except (ModelError, RuntimeError, TypeError) as exc:
        return None, "fail", f"cannot open it: {_one_line(exc)}"


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def versions() -> dict:
    return installed_versions(("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy",
                               "pillow", "tensorrt", "cuda-python"))


def smallest_passing(report: dict) -> dict[str, dict]:
    """Per precision with a failing form: the loosest needed value of each violated tolerance
    (as a Tolerance field -> value), over all forms of that precision."""
    need: dict[str, dict] = {}
    for entry in report["forms"].values():
        if entry["status"] != "fail" or "smallest_passing" not in entry:
            continue
        got, p = entry["smallest_passing"], entry["precision"]
        for k in entry["failed"]:
            value = got.get(k)
            if k == "ood_agreement":  # the gate's flags are held to the labels' min_agreement
                k, value = "min_agreement", entry["ood"].get("flag_agreement")
            if value is None:  # no figure would pass (e.g. the file has no ood output)
                continue
            pick = min if k == "min_agreement" else max
            old = need.setdefault(p, {}).get(k)
            need[p][k] = value if old is None else pick(old, value)
    return need


def suggestion(need: dict[str, dict]) -> str:
    """Options that would have passed, rounded so that they really do pass."""
    parts = []
    for p, fields_ in need.items():
        for k, v in fields_.items():
            lower = k == "min_agreement"
            value = _floor(v, 4) if lower else _ceil_sig(v, 3)
            text = f"{value:.6g}"
            if (float(text) > v) if lower else (float(text) < v):
                text = repr(value)
            parts.append(f"{OPTION[k].format(p=p)} {text}")
    return " ".join(parts)


def _ceil_sig(x: float, digits: int) -> float:
    """``x`` rounded up to ``digits`` significant digits (never below ``x``)."""
    if x <= 0 or not math.isfinite(x):
        return x
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
    v = math.ceil(x * scale) / scale
    return v if v >= x else math.nextafter(v, math.inf)


def _floor(x: float, decimals: int) -> float:
    """``x`` rounded down to ``decimals`` places (never above ``x``)."""
    scale = 10 ** decimals
    v = math.floor(x * scale) / scale
    return v if v <= x else math.nextafter(v, -math.inf)

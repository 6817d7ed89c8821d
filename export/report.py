"""parity.json and the parity table printed by ``pneumo-edge export``."""

from __future__ import annotations

import math
from pathlib import Path

from pneumo_edge.model import modeldir

PARITY_FILE = modeldir.PARITY_JSON
COLUMNS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def write_report(run_dir, report: dict) -> Path:
    return modeldir.write_json_atomic(Path(run_dir) / PARITY_FILE, report)


def format_table(report: dict) -> str:
    img = report["images"]
    head = (f"parity on {img['count']} images ({img['source']}: {img['path']}), threshold "
            f"{report['threshold']:.4f}, reference torch fp32 on {report['reference']['device']}")
    rows = [("form", "device", "max|dp|", "mean|dp|", "agree", "acc", "prec", "sens", "spec",
             "f1", "auc", "max|dm|", "dauc", "result")]
    ref = report["reference"]["metrics"]
    rows.append(("torch", report["reference"]["device"], "-", "-", "-",
                 *(_num(ref.get(k)) for k in COLUMNS), "-", "-", "reference"))
    for name, e in report["forms"].items():
        rows.append(_row(name, e))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    verdict = "PASSED" if report["passed"] else "FAILED"
    return "\n".join([head, *lines, f"parity {verdict}"])


def _row(name: str, e: dict) -> tuple:
    if "metrics" not in e:
        return (name, e.get("device", "-"), *("-",) * (len(COLUMNS) + 5),
                f"{e['status']}: {e.get('reason', '')}")
    m, d = e["metrics"], e["metric_deltas"]
    result = e["status"]
    if e["failed"]:
        result += " (" + ", ".join(_why(k, e) for k in e["failed"]) + ")"
    return (name, e["device"], f"{e['max_abs_diff']:.2e}", f"{e['mean_abs_diff']:.2e}",
            f"{100 * e['agreement']:.2f}%", *(_num(m.get(k)) for k in COLUMNS),
            f"{max(abs(v) for v in d.values()):.4f}", _num(e.get("roc_auc_delta"), "+.4f"),
            result)


def _num(v, fmt: str = ".4f") -> str:
    return "-" if v is None or math.isnan(v) else format(v, fmt)


def _why(key: str, e: dict) -> str:
    if key == "ood_agreement":  # the gate (qc) output, held to the labels' min_agreement
        g, tol = e["ood"], e["tolerance"]["min_agreement"]
        if "flag_agreement" not in g:
            return f"qc output: {g.get('reason', 'failed')}"
        return f"qc flags agree {100 * g['flag_agreement']:.2f}% < {100 * tol:.2f}%"
    tol, got = e["tolerance"][key], e["smallest_passing"][key]
    if key == "max_abs":
        return f"max|dp| {got:.3g} > {tol:.3g}"
    if key == "min_agreement":
        return f"agreement {100 * got:.2f}% < {100 * tol:.2f}%"
    if key == "max_auc_delta":
        return f"ROC AUC delta {got:.4f} > {tol:.4f}"
    return f"metric delta {got:.4f} > {tol:.4f}"

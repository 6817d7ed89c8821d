"""``eval --report FILE``: one self-contained HTML page (inline SVG charts, inline PNG heatmaps,
inline CSS; no script, no network, opens from a USB stick) with the figures of eval's JSON.

numpy and the standard library only, so it works on the edge install (no torch, no matplotlib).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math

W, H, PAD = 300, 300, 44  # chart size and the margin for the axis labels


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def num(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) \
        else f"{x:.{digits}f}"


# --- SVG charts ---------------------------------------------------------------------------------

def _xy(x: float, y: float) -> tuple[float, float]:
    return PAD + x * (W - PAD - 10), H - PAD - y * (H - PAD - 10)


def chart(title: str, xlabel: str, ylabel: str, lines=(), points=(), diagonal=False,
          bars=()) -> str:
    """A unit-square chart: ``lines`` [(xs, ys, colour, label)], ``points``
    [(x, y, colour, label)] marked with a ring, ``bars`` [(x0, x1, height, colour)] drawn
    under the lines (heights in [0, 1]), optional y = x diagonal."""
    n_legend = len(lines) + len(points)
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H + 28 + 14 * n_legend}" '
           f'role="img" aria-label="{esc(title)}">'),
           f'<text x="{W / 2}" y="14" text-anchor="middle" font-weight="bold">{esc(title)}</text>',
           '<g transform="translate(0,20)">']
    for k in range(6):
        v = k / 5
        x, y = _xy(v, 0)
        _, yy = _xy(0, v)
        out.append(f'<line x1="{x:.1f}" y1="{_xy(0, 0)[1]:.1f}" x2="{x:.1f}" '
                   f'y2="{_xy(0, 1)[1]:.1f}" stroke="#eee"/>')
        out.append(f'<line x1="{_xy(0, 0)[0]:.1f}" y1="{yy:.1f}" x2="{_xy(1, 0)[0]:.1f}" '
                   f'y2="{yy:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{y + 14:.1f}" text-anchor="middle" '
                   f'font-size="10">{v:.1f}</text>')
        out.append(f'<text x="{PAD - 4}" y="{yy + 3:.1f}" text-anchor="end" '
                   f'font-size="10">{v:.1f}</text>')
    for x0, x1, h, colour in bars:
        (a, b), (c, _) = _xy(x0, h), _xy(x1, 0)
        out.append(f'<rect x="{a:.1f}" y="{b:.1f}" width="{c - a:.1f}" '
                   f'height="{_xy(0, 0)[1] - b:.1f}" fill="{colour}"/>')
    x0, y0 = _xy(0, 0)
    x1, y1 = _xy(1, 1)
    out.append(f'<rect x="{x0:.1f}" y="{y1:.1f}" width="{x1 - x0:.1f}" height="{y0 - y1:.1f}" '
               'fill="none" stroke="#333"/>')
    if diagonal:
        out.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" '
                   'stroke="#999" stroke-dasharray="4 3"/>')
    legend = []
    for xs, ys, colour, label in lines:
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in (_xy(x, y) for x, y in zip(xs, ys)
                                                       if x is not None and y is not None))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        legend.append((colour, label))
    for x, y, colour, label in points:
        a, b = _xy(x, y)
        out.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="5" fill="none" stroke="{colour}" '
                   'stroke-width="2.5"/>')
        legend.append((colour, label))
    for k, (colour, label) in enumerate(legend):  # below the chart, never over a curve
        ly = H + 4 + 14 * k
        out.append(f'<rect x="{x0:.1f}" y="{ly}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x0 + 14:.1f}" y="{ly + 9}" font-size="11">{esc(label)}</text>')
    out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{H - 8}" text-anchor="middle" '
               f'font-size="12">{esc(xlabel)}</text>')
    out.append(f'<text transform="translate(12,{(y0 + y1) / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle" font-size="12">{esc(ylabel)}</text>')
    out.append("</g></svg>")
    return "\n".join(out)


def threshold_name(m: dict) -> str:
    """``card threshold``, or what it became with ``--prevalence``."""
    pr = m.get("prevalence")
    return f"card threshold moved to prevalence {pr['deployment']:g}" if pr else "card threshold"


def roc_chart(m: dict) -> str:
    c = m["curves"]["roc"]
    op = (1 - m["specificity"], m["recall"])
    return chart(f"ROC (AUC {num(m['roc_auc'])})", "1 - specificity", "sensitivity",
                 lines=[(c["fpr"], c["tpr"], "#1f5fa8", "ROC curve")],
                 points=[(*op, "#c0392b", f"{threshold_name(m)} {m['threshold']:.3f}")],
                 diagonal=True)


def pr_chart(m: dict) -> str:
    c = m["curves"]["pr"]
    n = m["curves"]["positives"] + m["curves"]["negatives"]
    prevalence = m["curves"]["positives"] / n if n else 0.0
    return chart("precision-recall", "recall (sensitivity)", "precision (PPV)",
                 lines=[(c["recall"], c["precision"], "#1f5fa8", "PR curve"),
                        ([0, 1], [prevalence, prevalence], "#999",
                         f"prevalence {prevalence:.2f}")],
                 points=[(m["recall"], m["precision"], "#c0392b",
                          f"{threshold_name(m)} {m['threshold']:.3f}")])


def reliability_chart(cal: dict, before: dict | None = None) -> str:
    """Reliability of the probabilities as deployed and, for a calibrated model, ``before``:
    those of the uncalibrated network behind them (issue 20)."""
    bins = [b for b in cal["bins"] if b["n"]]
    total = sum(b["n"] for b in bins) or 1
    bars = [(b["low"], b["high"], b["n"] / total, "#dde6f2") for b in bins]
    lines = [([b["mean_predicted"] for b in bins], [b["observed"] for b in bins], "#1f5fa8",
              "model")]
    title = f"reliability (ECE {num(cal['ece'])}, Brier {num(cal['brier'])})"
    if before is not None:
        old = [b for b in before["bins"] if b["n"]]
        lines.append(([b["mean_predicted"] for b in old], [b["observed"] for b in old],
                      "#aaaaaa", "uncalibrated"))
        title = (f"reliability: ECE {num(before['ece'])} -> {num(cal['ece'])}, "
                 f"Brier {num(before['brier'])} -> {num(cal['brier'])}")
    return chart(title, "mean predicted probability", "observed positive fraction",
                 lines=lines, bars=bars, diagonal=True)


def qc_note(m: dict) -> str:
    """The input quality gate's counts on this data (issue 20), or why there are none."""
    q = m.get("qc")
    if q is None:
        return ""
    kinds = ", ".join(f"{esc(k)} {v}" for k, v in sorted(q["reasons"].items())) or "none"
    cal = "" if m.get("calibrated") else (" This model has no calibration or input gate "
                                          "(pneumo-edge calibrate adds both).")
    return (f"<p class='note'>Input quality gate: {q['flagged']} of {q['images']} images "
            f"flagged (reasons: {kinds}).{cal}</p>")


def prevalence_note(m: dict) -> str:
    """What ``--prevalence`` did to the numbers of this page, or nothing without it."""
    pr = m.get("prevalence")
    if not pr:
        return ""
    before = pr["calibration_unmoved"]
    return (f"<p class='note'>Prevalence {pr['deployment']:g} (--prevalence; the validation "
            f"split the calibration was fitted on had {pr['trained']:.3f}, this folder "
            f"{num(pr['data'])}): every probability on this page and the card's threshold "
            f"{pr['threshold_card']:.4f} (now {pr['threshold']:.4f}) are moved by Bayes' rule "
            "on the odds; labels, ranking and ROC AUC are unchanged. Without the move: ECE "
            f"{num(before['ece'])}, Brier {num(before['brier'])}.</p>")


# --- HTML ---------------------------------------------------------------------------------------

CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1000px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #ccc;
padding: 4px 8px; text-align: right; } th { background: #f2f2f2; } td.l, th.l { text-align: left; }
tr.card { background: #fff3cd; font-weight: bold; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; } .note { color: #555; font-size: 13px; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; } .gallery img { width: 300px; }
figure { margin: 0; width: 300px; } figcaption { word-break: break-all; }
.warn { color: #8a1f11; }
"""

LABELS = {"accuracy": "accuracy", "recall": "sensitivity (recall)",
          "specificity": "specificity", "precision": "precision (PPV)", "npv": "NPV",
          "f1": "F1", "roc_auc": "ROC AUC"}


def _rows(rows) -> str:
    return "\n".join("<tr>" + "".join(rows_cell(c) for c in r) + "</tr>" for r in rows)


def rows_cell(c) -> str:
    if isinstance(c, tuple):  # (text, css class)
        return f'<td class="{c[1]}">{esc(c[0])}</td>'
    return f"<td>{esc(c)}</td>"


def card_section(card, m: dict) -> str:
    src = card.metrics.get("threshold_rule", "") if isinstance(card.metrics, dict) else ""
    items = [("model file", m.get("model_file", "")), ("runtime", f"{m['runtime']} on {m['device']}"),
             ("architecture", card.arch), ("image size", f"{card.image_size} px"),
             ("classes", ", ".join(card.classes)), ("positive class", card.positive_class),
             ("threshold", f"{card.threshold:.4f}" + (f" (rule {src})" if src else "")),
             ("created", card.created or "n/a")]
    if m.get("prevalence"):
        pr = m["prevalence"]
        text = (f"{pr['deployment']:g} (--prevalence; validation {pr['trained']:.3f}): "
                f"threshold {pr['threshold']:.4f}")
        items.insert(-1, ("prevalence", text))
    for key, name in (("val", "validation"), ("test", "test")):  # what training recorded
        rec = card.metrics.get(key) if isinstance(card.metrics, dict) else None
        if isinstance(rec, dict) and "n" in rec:
            items.append((f"{name} at training ({rec['n']} images)",
                          ", ".join(f"{LABELS.get(k, k)} {num(rec.get(k))}"
                                    for k in ("recall", "specificity", "roc_auc"))))
    return "<table>" + _rows([[(k, "l"), (v, "l")] for k, v in items]) + "</table>"


def data_section(m: dict) -> str:
    counts = ", ".join(f"{c}: {n}" for c, n in m["counts"].items())
    out = [(f"<p>Folder <code>{esc(m['data'])}</code>: {esc(counts)} image files; "
           f"{m['n']} evaluated, {m['skipped_unreadable']} could not be decoded.</p>")]
    if m["failed"]:
        out.append('<table><tr><th class="l">file not evaluated</th><th class="l">reason</th>'
                   "</tr>" + _rows([[(f["path"], "l"), (f["reason"], "l")]
                                    for f in m["failed"][:50]]) + "</table>")
        if len(m["failed"]) > 50:
            out.append(f"<p class='note'>... and {len(m['failed']) - 50} more (eval's JSON "
                       "lists them all).</p>")
    return "\n".join(out)


def metrics_section(m: dict) -> str:
    ci = m["confidence_intervals"]
    rows = [[(LABELS[k], "l"), num(v["value"]), f"{num(v['low'])} - {num(v['high'])}",
             v["valid"]] for k, v in ci["metrics"].items()]
    return (f"<p>At the {threshold_name(m)} {m['threshold']:.4f}. 95 % confidence intervals: "
            f"{esc(ci['method'])} ({ci['units']} {ci['unit']}s, seed {ci['seed']}).</p>"
            '<table><tr><th class="l">metric</th><th>value</th><th>95 % CI</th>'
            "<th>resamples used</th></tr>" + _rows(rows) + "</table>"
            "<p class='note'>A resample in which a metric is undefined (e.g. no positive case "
            "drawn) is left out of that metric's interval.</p>")


def confusion_section(m: dict, card) -> str:
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    neg = [c for c in card.classes if c != card.positive_class]
    neg = neg[0] if len(neg) == 1 else f"not {card.positive_class}"
    pos = card.positive_class

    def pct(a, b):
        return f"{a} ({100 * a / b:.1f} %)" if b else f"{a}"

    return ("<table><tr><th class='l'>true \\ predicted</th>"
            f"<th>{esc(neg)}</th><th>{esc(pos)}</th></tr>"
            f"<tr><th class='l'>{esc(neg)}</th><td>{pct(tn, tn + fp)}</td>"
            f"<td>{pct(fp, tn + fp)}</td></tr>"
            f"<tr><th class='l'>{esc(pos)}</th><td>{pct(fn, fn + tp)}</td>"
            f"<td>{pct(tp, fn + tp)}</td></tr></table>"
            "<p class='note'>Rates are of each true class (row): specificity and false "
            "positive rate in the first row, false negative rate and sensitivity in the "
            f"second; threshold {m['threshold']:.4f}.</p>")


def threshold_section(m: dict) -> str:
    rows = []
    for r in m["threshold_table"]:
        mark = abs(r["threshold"] - m["threshold"]) < 1e-12
        used = " (card, moved)" if m.get("prevalence") else " (card)"
        cells = [f"{r['threshold']:.4f}" + (used if mark else ""), num(r["sensitivity"]),
                 num(r["specificity"]), num(r["ppv"]), num(r["npv"]), r["tp"], r["fp"],
                 r["fn"], r["tn"]]
        rows.append(("<tr class='card'>" if mark else "<tr>")
                    + "".join(rows_cell(c) for c in cells) + "</tr>")
    return ("<table><tr><th>threshold</th><th>sensitivity</th><th>specificity</th><th>PPV</th>"
            "<th>NPV</th><th>TP</th><th>FP</th><th>FN</th><th>TN</th></tr>"
            + "\n".join(rows) + "</table>")


def gallery_section(m: dict, pictures: dict) -> str:
    out = []
    for key, title in (("false_negatives", "most confident false negatives"),
                       ("false_positives", "most confident false positives")):
        items = m["gallery"][key]
        out.append(f"<h3>{title}</h3>")
        if not items:
            out.append("<p>none</p>")
            continue
        out.append('<div class="gallery">')
        for it in items:
            png = pictures.get(it["index"])
            if png is None:
                out.append(f"<p>{esc(it['path'])}: P = {it['p']:.3f}</p>")
                continue
            b64 = base64.b64encode(png).decode("ascii")
            out.append(f'<figure><img alt="{esc(it["path"])}" src="data:image/png;base64,'
                       f'{b64}"><figcaption class="note">{esc(it["path"])}</figcaption>'
                       "</figure>")
        out.append("</div>")
    return "\n".join(out)


def build_html(m: dict, card, pictures: dict | None = None, method: str = "") -> str:
    """The report page for eval's metrics ``m``; ``pictures``: gallery index -> PNG bytes."""
    pictures = pictures or {}
    when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>pneumo-edge evaluation: {esc(m['data'])}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>pneumo-edge evaluation of {esc(m['data'])}</h1>",
        (f"<p class='note'>Written {when} by pneumo-edge eval. Research software, not a medical "
        "device.</p>"),
        "<h2>Model</h2>", card_section(card, m),
        "<h2>Data</h2>", data_section(m),
        "<h2>Metrics with 95 % confidence intervals</h2>", prevalence_note(m),
        metrics_section(m),
        "<h2>Confusion matrix</h2>", confusion_section(m, card),
        "<h2>Curves and calibration</h2>", '<div class="charts">',
        roc_chart(m), pr_chart(m),
        reliability_chart(m["calibration"], m.get("calibration_before")), "</div>", qc_note(m),
        (f"<p class='note'>Calibration: {esc(m['calibration']['binning'])}; ECE is the "
        "image-weighted mean gap between observed and predicted; Brier is the mean squared "
        "error of the probability. Bars: share of images per bin.</p>"),
        "<h2>Operating points</h2>", threshold_section(m),
        "<h2>Gallery</h2>",
        (f"<p class='note'>Heatmaps: {esc(method)}.</p>" if method else ""),
        gallery_section(m, pictures),
        "</body></html>",
    ]
    return "\n".join(parts)


def gallery_pictures(ev, runtime) -> dict:
    """Occlusion heatmaps (through ``runtime``, the model evaluated) of the gallery's images:
    gallery index -> PNG bytes; the caption's probability and threshold are the page's (moved
    to ``--prevalence`` when given), the label the card's."""
    import dataclasses

    from pneumo_edge.explain.methods import Explainer, picture_png

    ex, card = Explainer(runtime, "occlusion"), runtime.card
    out = {}
    for key in ("false_negatives", "false_positives"):
        for it in ev.metrics["gallery"][key]:
            px = ev.pixels[it["index"]]
            e = ex(px)
            label = card.classes[card.label_index(e.probs)]
            if ev.gate is not None:
                e = dataclasses.replace(e, probs=ev.gate.probs(e.probs[None])[0])
            out[it["index"]] = picture_png(px, it["path"], e, card, ev.metrics["threshold"],
                                           label)
    return out


def write_report(ev, runtime, path) -> None:
    """``path``: the HTML page for an :class:`pneumo_edge.commands.evaluate.Evaluation` (atomic)."""
    from pneumo_edge.atomic import write_text_atomic

    pictures = gallery_pictures(ev, runtime)
    method = (f"occlusion sensitivity through the evaluated file ({runtime.name}); red = the "
              "largest drop of the positive class's probability when that area is greyed out")
    write_text_atomic(path, build_html(ev.metrics, runtime.card, pictures, method))

"""eval's uncertainty figures (pneumo_edge.evaluation.stats), its JSON, and the HTML report, rendered in a
real browser (headless Chromium) when one is installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from pneumo_edge.evaluation import stats
from pneumo_edge.evaluation.metrics import roc_auc


def _data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.4
    p = np.clip(np.where(truth, rng.normal(0.7, 0.2, n), rng.normal(0.3, 0.2, n)), 0, 1)
    return truth, p


def test_bootstrap_is_deterministic_and_brackets_the_value():
    truth, p = _data()
    a = stats.bootstrap_ci(truth, p, 0.5, resamples=300)
    b = stats.bootstrap_ci(truth, p, 0.5, resamples=300)
    assert a == b
    for k, v in a.items():
        assert v["low"] <= v["value"] <= v["high"], k
        assert v["high"] - v["low"] > 0.01, k  # 300 images: not a point
    assert abs(a["roc_auc"]["value"] - roc_auc(truth, p)) < 1e-12


def test_resampling_patients_widens_the_interval_of_duplicated_images():
    """Five images per patient are not five independent cases: the patient bootstrap must see
    fewer units (a wider interval) than treating every image as its own case."""
    truth, p = _data(80, seed=3)
    t5, p5 = np.repeat(truth, 5), np.repeat(p, 5)
    groups = np.repeat(np.arange(80), 5)
    by_patient = stats.bootstrap_ci(t5, p5, 0.5, groups, resamples=400)
    by_image = stats.bootstrap_ci(t5, p5, 0.5, None, resamples=400)
    for k in ("accuracy", "recall", "roc_auc"):
        w_pat = by_patient[k]["high"] - by_patient[k]["low"]
        w_img = by_image[k]["high"] - by_image[k]["low"]
        assert w_pat > 1.5 * w_img, (k, w_pat, w_img)


def test_groups_come_from_patient_ids_in_file_names():
    g, unit = stats.groups_of(["a/person1_bacteria_1.jpeg", "b/person1_virus_2.jpeg",
                               "IM-0001-0001.jpeg", "scan.png"])
    assert unit == "patient" and g[0] == g[1] and len(set(g.tolist())) == 3
    _, unit = stats.groups_of(["a.png", "b.png"])
    assert unit == "image"


def test_calibration_ece_and_brier():
    rng = np.random.default_rng(1)
    p = rng.random(20000)
    truth = rng.random(20000) < p  # calibrated by construction
    good = stats.calibration(truth, p)
    assert good["ece"] < 0.02
    over = stats.calibration(truth, np.where(p > 0.5, 1.0, 0.0))  # overconfident
    assert over["ece"] > 0.2
    small = stats.calibration([True, False], [0.75, 0.5])
    assert small["brier"] == pytest.approx((0.25 ** 2 + 0.5 ** 2) / 2)
    assert sum(b["n"] for b in good["bins"]) == 20000


def test_curves_and_threshold_table():
    truth, p = _data()
    c = stats.curves(truth, p)
    fpr, tpr = np.array(c["roc"]["fpr"]), np.array(c["roc"]["tpr"])
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(roc_auc(truth, p), abs=1e-9)
    rows = stats.threshold_table(truth, p, [0.5, 0.2, 0.5])
    assert [r["threshold"] for r in rows] == [0.2, 0.5]
    r = rows[1]
    assert r["tp"] == int(np.sum(truth & (p >= 0.5)))
    assert r["npv"] == pytest.approx(r["tn"] / (r["tn"] + r["fn"]))
    assert np.isnan(stats.rates([False, False], [False, False])["recall"])  # no positives


@pytest.fixture(scope="module")
def report(tiny_exported, tiny_labelled, session_tmp):
    """`pneumo-edge eval --report` on the tiny exported model (onnx, torch-free path)."""
    pytest.importorskip("onnxruntime")
    from click.testing import CliRunner

    from pneumo_edge.cli import main

    out = session_tmp("report")
    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_exported), "--data",
                                    str(tiny_labelled), "--runtime", "onnx", "--out",
                                    str(out / "eval.json"), "--report", str(out / "r.html"),
                                    "--resamples", "300", "--gallery", "2"])
    assert res.exit_code == 0, res.output
    return out


def test_eval_json_carries_the_report_figures(report):
    text = (report / "eval.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    m = json.loads(text)
    ci = m["confidence_intervals"]
    assert ci["resamples"] == 300 and "bootstrap" in ci["method"] and ci["seed"] == stats.SEED
    assert set(ci["metrics"]) == set(stats.CI_KEYS)
    assert m["counts"] == {"NORMAL": 8, "PNEUMONIA": 8} and m["n"] == 16
    assert {"ece", "brier", "bins"} <= set(m["calibration"])
    assert any(r["threshold"] == m["threshold"] for r in m["threshold_table"])
    (_, fp), (fn, _) = m["confusion_matrix"]
    from pneumo_edge.commands.evaluate import format_metrics
    from pneumo_edge.model.card import Card

    text = format_metrics(m, Card(classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA",
                                  image_size=64, threshold=m["threshold"], arch="resnet18"))
    lo = ci["metrics"]["accuracy"]["low"]
    assert f"({lo:.4f} - " in text and "300 resamples" in text and "ECE" in text
    assert len(m["gallery"]["false_negatives"]) == min(fn, 2)
    assert len(m["gallery"]["false_positives"]) == min(fp, 2)


def test_eval_report_without_torch(tiny_exported, tiny_labelled, tmp_path):
    """The edge install has no torch and no matplotlib: eval --report must not need them."""
    import os
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['matplotlib'] = None\n"
            "from pneumo_edge.cli import main\n"
            f"main(['eval', '--model', {str(tiny_exported)!r}, '--data', "
            f"{str(tiny_labelled)!r}, '--runtime', 'onnx', '--out', "
            f"{str(tmp_path / 'e.json')!r}, '--report', {str(tmp_path / 'r.html')!r}, "
            "'--resamples', '100'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, ORT_DISABLE_TELEMETRY="1"),
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bootstrap" in (tmp_path / "r.html").read_text(encoding="utf-8")


def test_report_is_self_contained(report):
    html = (report / "r.html").read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", html)
    assert all(u.startswith("data:") for u in urls), urls
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", html)
    m = json.loads((report / "eval.json").read_text())
    for needle in ("300 resamples", "ROC", "precision-recall", "reliability", "ECE",
                   "Brier", f"{m['threshold']:.4f} (card)", "NPV"):
        assert needle in html, needle


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(page, png, tmp_path):
    """Screenshot ``page`` in headless Chromium; returns its stderr (console messages are
    logged there as ``CONSOLE``)."""
    r = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
                        "--window-size=1100,1400", f"--screenshot={png}",
                        "--enable-logging=stderr", "--v=0", page.as_uri()],
                       capture_output=True, text=True, timeout=120, check=False)
    assert png.is_file(), r.stderr[-2000:]
    return r.stderr


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (apt-get install "
                                               "chromium; .ci/run installs it)")
def test_report_renders_in_a_browser(report, tmp_path):
    from PIL import Image

    # the check can fail: a page that logs an error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>console.error('boom')</script></body></html>")
    assert console_lines(render(bad, tmp_path / "bad.png", tmp_path))

    png = tmp_path / "shot.png"
    err = render(report / "r.html", png, tmp_path)
    assert console_lines(err) == []
    with Image.open(png) as im:
        a = np.asarray(im.convert("L"), dtype=np.float64)
    assert a.std() > 20, "the screenshot is blank"
    assert (a < 128).mean() > 0.01, "almost nothing dark on the page (no text, no charts)"


def test_eval_report_with_non_utf8_file_names(tiny_exported, tiny_labelled, tmp_path):
    """Issue 19: a file name that is not UTF-8 ended eval --report in a traceback after the
    whole evaluation. The report shows such names as the CSV does (\\xNN)."""
    from click.testing import CliRunner

    from pneumo_edge.cli import main

    data = tmp_path / "data"
    for cls in ("NORMAL", "PNEUMONIA"):
        (data / cls).mkdir(parents=True)
        for f in sorted((tiny_labelled / cls).iterdir()):
            name = os.fsencode(str(data / cls)) + b"/\xff" + os.fsencode(f.name)
            with open(name, "wb") as out:
                out.write(f.read_bytes())
    with open(os.fsencode(str(data / "NORMAL")) + b"/broken\xfe.png", "wb") as out:
        out.write(b"not a png")
    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_exported), "--data", str(data),
                                    "--runtime", "onnx", "--out", str(tmp_path / "e.json"),
                                    "--report", str(tmp_path / "r.html"), "--resamples", "100",
                                    "--gallery", "8"])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "broken\\xfe.png" in page and "/\\xff" in page

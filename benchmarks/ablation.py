"""Recipe ablation: train one row after another with `pneumo-edge train`, same data, same
patient-grouped train/val/test split (same seed and fractions), and tabulate validation,
shifted validation and internal test metrics with the minutes each row took.

    python benchmarks/ablation.py --data ../shared/data/chest_xray --out runs/ablation \
        --suite small --md benchmarks/ABLATION.md

Rows run sequentially (two cores: never run anything else meanwhile; the load average before
and after each row is recorded). A finished row (its metrics.json exists) is not run again, so
the script can be interrupted and restarted. Each row's threshold comes from its own
--threshold-for; the threshold-rule table compares all rules on the last row's probabilities.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# the small suite: resnet18 at 128 px for a fixed number of epochs, changes added one by one;
# every option is spelled out, so changing the CLI defaults does not change a row
SMALL = {"--arch": "resnet18", "--image-size": "128", "--time-budget": "none", "--epochs": "6",
         "--threshold-for": "youden", "--norm": "imagenet", "--augment": "basic",
         "--label-smoothing": "0", "--ema": "0", "--mixup": "0", "--tta": "none"}
STEPS = [
    ("seed recipe (ImageNet norm, basic augmentation)", {}),
    ("+ per-image normalisation", {"--norm": "image"}),
    ("+ strong augmentation", {"--augment": "strong"}),
    ("+ label smoothing 0.1, weight EMA 0.998", {"--label-smoothing": "0.1", "--ema": "0.998"}),
]


def cumulative(base: dict, steps) -> list[tuple[str, list[str]]]:
    rows, opts = [], dict(base)
    for name, change in steps:
        opts.update(change)
        rows.append((name, [x for kv in opts.items() for x in kv]))
    return rows


SUITES = {"small": cumulative(SMALL, STEPS)}


def row_dir(out: Path, i: int) -> Path:
    return out / f"row{i:02d}"


def run_row(data: str, out: Path, args: list[str]) -> dict:
    metrics = out / "metrics.json"
    if metrics.exists():
        return json.loads(metrics.read_text())
    load0 = os.getloadavg()
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pneumo_edge", "train", "--data", data, "--out", str(out),
           "--force", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    result = json.loads(metrics.read_text())
    result["ablation"] = {"minutes": (time.monotonic() - t0) / 60, "load_before": load0,
                          "load_after": os.getloadavg(), "args": args}
    metrics.write_text(json.dumps(result, indent=2))
    return result


def fmt(m: dict) -> str:
    return (f"{m['accuracy']:.3f} / {m['recall']:.3f} / {m['specificity']:.3f} / "
            f"{m['roc_auc']:.3f}")


def table(rows: list[tuple[str, dict]]) -> str:
    head = ("| change | val acc / sens / spec / AUC | shifted val | internal test | threshold "
            "| epochs | minutes (load before) |\n|---|---|---|---|--:|--:|--:|\n")
    lines = []
    for name, r in rows:
        a = r.get("ablation", {})
        lines.append(f"| {name} | {fmt(r['val'])} | {fmt(r['shifted_val'])} | {fmt(r['test'])} | "
                     f"{r['threshold']:.3f} | {r['time']['epochs_trained']} | "
                     f"{a.get('minutes', float('nan')):.1f} ({a.get('load_before', [0])[0]:.2f}) |")
    return head + "\n".join(lines) + "\n"


def rules_table(r: dict) -> str:
    head = ("| threshold rule (chosen on val) | threshold | val acc / sens / spec / AUC | "
            "shifted val | internal test |\n|---|--:|---|---|---|\n")
    return head + "\n".join(
        f"| {rule} | {v['threshold']:.3f} | {fmt(v['val'])} | {fmt(v['shifted_val'])} | "
        f"{fmt(v['test'])} |" for rule, v in r["threshold_rules"].items()) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--suite", default="small", choices=sorted(SUITES))
    ap.add_argument("--rows", default="", help="comma list of row numbers (default: all)")
    ap.add_argument("--md", help="write the tables to this markdown file")
    a = ap.parse_args()
    suite = SUITES[a.suite]
    pick = [int(x) for x in a.rows.split(",")] if a.rows else range(len(suite))
    done = []
    for i in pick:
        name, args = suite[i]
        done.append((name, run_row(a.data, row_dir(Path(a.out), i), args)))
        text = table(done) + "\nThreshold rules on the last row:\n\n" + rules_table(done[-1][1])
        print(text, flush=True)
        if a.md:
            Path(a.md).write_text(text)


if __name__ == "__main__":
    main()

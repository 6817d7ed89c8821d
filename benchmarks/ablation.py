"""Recipe ablation: train one row after another with `pneumo-edge train`, same data, same
patient-grouped train/val/test split (same seed and fractions), and tabulate validation,
shifted validation and internal test metrics (and, with --proxy cluster, the held-out
acquisition cluster) with the minutes each row took and the load average around it.

    python benchmarks/ablation.py --data ../shared/data/chest_xray --out runs/ablation \
        --suite small --md benchmarks/ABLATION.md
    python benchmarks/ablation.py --data ../shared/data/chest_xray --out runs/ablation-r50 \
        --suite r50 --record benchmarks/ablation-r50 --md runs/ablation-r50/table.md

Suites: ``small`` adds the changes one by one (cumulative, ResNet18 128 px, 6 epochs); ``r50``
is today's default recipe (ResNet50, 224 px, 8 epochs: what its 55-minute budget gives) with
``--proxy cluster``
as the baseline, then one row per change, each against the baseline (not cumulative).

Rows run sequentially (two cores: never run anything else meanwhile). Every row of a suite
shares one pixel cache (OUT/pixel-cache), filled for the row before its clock starts, so no row
spends its time budget decoding and every row trains for the same budget. A finished row (its
metrics.json carries the runner's record) is not run again; a row that was interrupted after
an epoch continues with ``train --resume``, one interrupted earlier starts again. The
threshold-rule table compares all rules on the baseline row's probabilities.

The r50 suite takes longer than one session on one machine (about 4-8 hours on 2 cores), so
``--record DIR`` writes each finished row's result to ``DIR/rowNN.json`` (kept in git, with
the machine and the commit it was trained from) and counts the rows recorded there as done: a
later run on another machine, with an empty OUT, trains only the rows still missing, and its
tables show every recorded row.
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
         "--label-smoothing": "0", "--ema": "0", "--mixup": "0", "--tta": "none",
         "--train-cache-size": "128"}
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


#: the r50 suite's baseline: today's default recipe, every option spelled out (so a later
#: change of a CLI default does not change the row), plus the cluster proxy and the shared cache.
#: Its epochs are fixed at what the default's 55-minute budget gives on a quiet machine (8, the
#: default run of 2026-11-30) instead of the budget itself: the budget sets the epochs from the
#: first epoch's measured speed, so anything else on the two cores would change a row's epochs
#: and so its result; fixed epochs make rows comparable whatever the load, and each row's
#: seconds per epoch (history.csv) show whether it would fit the budget.
R50_EPOCHS = 8
R50 = {"--arch": "resnet50", "--weights": "none", "--image-size": "224", "--time-budget": "none",
       "--epochs": str(R50_EPOCHS),
       "--batch-size": "32", "--lr": "0.001", "--optimizer": "adamw", "--weight-decay": "0.0001",
       "--clip-grad": "0", "--scheduler": "cosine", "--warmup-epochs": "1",
       "--class-weights": "auto", "--class-weight-power": "1", "--augment": "strong",
       "--crop-scale": "0.7,1", "--jitter": "0.2", "--zoom-out": "0", "--zoom-out-min": "0.7",
       "--norm": "image", "--tta": "none", "--label-smoothing": "0.1", "--ema": "0.998",
       "--average": "ema", "--swa-epochs": "3", "--mixup": "0", "--val-fraction": "0.15",
       "--test-fraction": "0.15", "--seed": "42", "--select": "val_auroc", "--min-epochs": "3",
       "--threshold-for": "youden", "--threshold-on": "val+shifted", "--proxy": "cluster",
       "--proxy-clusters": "10", "--proxy-min-images": "50", "--train-cache-size": "224"}
#: rows whose change became the default recipe (today's default = the baseline with these)
R50_ADOPTED = (4,)
R50_CHANGES = [
    ("baseline: the default recipe before this suite", {}),
    ("crop scale 0.08-1 (was 0.7-1)", {"--crop-scale": "0.08,1"}),
    ("colour jitter 0.3 (was 0.2)", {"--jitter": "0.3"}),
    ("zoom-out into a black border: p 0.3, scale 0.7-1", {"--zoom-out": "0.3",
                                                          "--zoom-out-min": "0.7"}),
    ("pixel cache 256 px, crops to 224 (adopted: today's default)",
     {"--train-cache-size": "256"}),
    ("SWA of the last 3 epochs instead of EMA", {"--average": "swa", "--swa-epochs": "3"}),
    ("class-weight power 0.5 (was 1: inverse frequency)", {"--class-weight-power": "0.5"}),
    ("class-weight power 0 (unweighted)", {"--class-weight-power": "0"}),
    ("crop scale 0.08-1 with jitter 0.3 (the published pair)", {"--crop-scale": "0.08,1",
                                                                "--jitter": "0.3"}),
]
#: minutes a row costs besides its time budget (start, final evaluation past the budget's
#: reserve, the cache check), for the estimate
ROW_OVERHEAD_MIN = 4.0
#: minutes one ResNet50 224 px epoch takes on this 2-core machine when it is quiet (training
#: and the per-epoch validation; the default run of 2026-11-30: 6.0-6.5), for rows without a
#: budget
R50_EPOCH_MIN = 6.3


def against(base: dict, changes) -> list[tuple[str, list[str]]]:
    """One row per change, each applied to ``base`` alone (not cumulative)."""
    return [(name, [x for kv in {**base, **change}.items() for x in kv])
            for name, change in changes]


SUITES = {"small": cumulative(SMALL, STEPS), "r50": against(R50, R50_CHANGES)}


def row_dir(out: Path, i: int) -> Path:
    return out / f"row{i:02d}"


def row_state(out: Path) -> str:
    """done (metrics.json with the runner's record), resume (last.pt of an interrupted
    run) or new."""
    try:
        if "ablation" in json.loads((out / "metrics.json").read_text()):
            return "done"
    except (OSError, ValueError):
        pass
    return "resume" if (out / "last.pt").is_file() else "new"


def budget_minutes(args: list[str]) -> float | None:
    """The row's --time-budget in minutes; for a ResNet50 row without one, its --epochs at
    R50_EPOCH_MIN each; None otherwise."""
    from pneumo_edge.train.budget import parse_duration

    opts = dict(zip(args[::2], args[1::2]))
    seconds = parse_duration(opts["--time-budget"]) if "--time-budget" in opts else None
    if seconds:
        return seconds / 60
    if opts.get("--arch") == "resnet50" and opts.get("--epochs"):
        return int(opts["--epochs"]) * R50_EPOCH_MIN
    return None


def estimate_hours(rows, out: Path, record: Path | None = None) -> str:
    todo = [(i, args) for i, args in rows
            if row_state(row_dir(out, i)) != "done" and recorded(record, i, args) is None]
    budgets = [budget_minutes(args) for _, args in todo]
    if any(b is None for b in budgets):
        return f"{len(todo)} of {len(rows)} rows to run (no time budget: no estimate)"
    hours = sum(b + ROW_OVERHEAD_MIN for b in budgets) / 60
    return (f"{len(todo)} of {len(rows)} rows to run: about {hours:.1f} h "
            f"({ROW_OVERHEAD_MIN:.0f} min per row besides its budget)")


def recorded(record: Path | None, i: int, args: list[str]) -> dict | None:
    """Row ``i``'s result as recorded in the repository (``RECORD/rowNN.json``: written when
    the row finished, on whichever machine and session ran it), or None. A record made with
    other options than the suite's row now has is refused (SystemExit), never reused."""
    if record is None:
        return None
    path = record / f"row{i:02d}.json"
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {path}: unreadable ({exc})") from None
    if with_added_later(result.get("ablation", {}).get("args")) != args:
        raise SystemExit(f"error: {path}: recorded with other options than row {i} has now; "
                         "delete it (and rerun the row) or restore the row's options")
    return result


def with_added_later(args: list[str] | None) -> list[str] | None:
    """A recorded row's arguments with the options spelled out after it was recorded, at the
    value they had then by default (``UNSET_MEANT``: the cache size was --image-size until
    row 4 was adopted)."""
    from pneumo_edge.train.config import UNSET_MEANT

    if args is None:
        return args
    opts = dict(zip(args[::2], args[1::2]))
    flag = {k: "--" + k.replace("_", "-") for kv in UNSET_MEANT.items() for k in kv}
    return args + [x for k, was in UNSET_MEANT.items()
                   if flag[k] not in opts and flag[was] in opts
                   for x in (flag[k], opts[flag[was]])]


def record_row(record: Path, i: int, result: dict) -> Path:
    """Write row ``i``'s result (its metrics.json with the runner's record, which names the
    commit it was trained from, and the machine) to ``RECORD/rowNN.json``: small text, kept
    in git, so a suite longer than one session on one machine accumulates its rows."""
    from common import machine  # noqa: PLC0415 -- benchmarks/ is the script's own folder
    from pneumo_edge.atomic import write_text_atomic

    record.mkdir(parents=True, exist_ok=True)
    result = {**result, "ablation": {**result["ablation"], "machine": machine()}}
    return write_text_atomic(record / f"row{i:02d}.json", json.dumps(result, indent=1) + "\n")


#: the tree this runner is in (a checkout, or a snapshot of one)
TREE = Path(__file__).resolve().parents[1]


def source_commit() -> str | None:
    """The git commit of the tree this runner (and the `pneumo-edge train` it starts) runs
    from, when it is a checkout; None otherwise (a snapshot records its commit in COMMIT)."""
    stamp = TREE / "COMMIT"
    if stamp.is_file():
        return stamp.read_text().strip() or None
    try:
        out = subprocess.run(["git", "-C", str(TREE), "rev-parse", "HEAD"], check=True,
                             capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def check_code_origin() -> None:
    """Refuse to train when the rows would run other code than the tree this runner is in.

    A long suite runs from a snapshot of the checkout so that editing the checkout cannot
    change a row half-way (imports are lazy: a module first imported at export time would
    come from the edited tree). With an editable install, ``pneumo_edge.train`` and
    ``pneumo_edge.export`` live outside the ``pneumo_edge`` folder and are found through the
    install's finder, i.e. in the checkout, unless the snapshot links them into its
    ``pneumo_edge/``. The check runs in a child started as the rows are (same interpreter,
    environment and working directory)."""
    probe = ("import importlib.util as u\n"
             "for n in ('pneumo_edge', 'pneumo_edge.train', 'pneumo_edge.export'):\n"
             "    print(u.find_spec(n).origin)")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True).stdout.splitlines()
    for origin in map(Path, out):
        if TREE not in origin.resolve().parents:
            raise SystemExit(f"error: the rows would import {origin}, outside this runner's "
                             f"tree {TREE}; run from that tree, or link train/ and export/ "
                             "into its pneumo_edge/ and set PYTHONPATH to it")


def train_args(data: str, out: Path, args: list[str], cache: Path) -> list[str]:
    return ["--data", data, "--out", str(out), "--cache", str(cache), *args]


def prepare(data: str, out: Path, args: list[str], cache: Path) -> float:
    """Fill the shared pixel cache for a row (its split, the shifted validation, the cluster
    holdout) in a separate process, before the row's clock starts. Returns its seconds."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, __file__, "_prepare", *train_args(data, out, args, cache)],
                   check=True)
    return time.monotonic() - t0


def _prepare_main(argv: list[str]) -> None:
    """The data a `pneumo-edge train` with these arguments would load, through its cache."""
    from pneumo_edge.train.config import TrainConfig, check_config
    from pneumo_edge.train.data import load_data

    from pneumo_edge.cli import train as train_cmd

    cfg = TrainConfig(**train_cmd.make_context("train", argv).params)
    check_config(cfg)
    load_data(cfg)


def run_row(data: str, out: Path, args: list[str], cache: Path | None = None) -> dict:
    """Train one row (skipped when done, resumed when interrupted after an epoch) and add
    the runner's record (minutes, load average before and after, arguments) to its
    metrics.json."""
    metrics = out / "metrics.json"
    state = row_state(out)
    if state == "done":
        return json.loads(metrics.read_text())
    cache = cache or out / "pixel-cache"
    prepared_s = prepare(data, out, args, cache)
    load0 = list(os.getloadavg())
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pneumo_edge", "train", *train_args(data, out, args, cache),
           "--resume" if state == "resume" else "--force"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    result = json.loads(metrics.read_text())
    result["ablation"] = {"minutes": (time.monotonic() - t0) / 60, "load_before": load0,
                          "load_after": list(os.getloadavg()), "args": args,
                          "resumed": state == "resume", "cache_fill_s": round(prepared_s, 1),
                          "commit": source_commit()}
    metrics.write_text(json.dumps(result, indent=2))
    return result


def fmt(m: dict | None) -> str:
    if not m:
        return "-"
    return (f"{m['accuracy']:.3f} / {m['recall']:.3f} / {m['specificity']:.3f} / "
            f"{m['roc_auc']:.3f}")


def table(rows: list[tuple[str, dict]]) -> str:
    head = ("| change | val acc / sens / spec / AUC | shifted val | internal test | "
            "cluster holdout | threshold (uncalibrated scale) | epochs | minutes (load before, after) |\n"
            "|---|---|---|---|---|--:|--:|--:|\n")
    lines = []
    for name, r in rows:
        a = r.get("ablation", {})
        load = f"{a['load_before'][0]:.2f}, {a['load_after'][0]:.2f}" if a else "-"
        lines.append(f"| {name} | {fmt(r['val'])} | {fmt(r['shifted_val'])} | "
                     f"{fmt(r.get('test'))} | {fmt(r.get('cluster_holdout'))} | "
                     f"{r['threshold']:.3f} | {r['time']['epochs_trained']} | "
                     f"{a.get('minutes', float('nan')):.1f} ({load})"
                     f"{' resumed' if a.get('resumed') else ''} |")
    return head + "\n".join(lines) + "\n"


def rules_table(r: dict) -> str:
    head = ("| threshold rule, chosen on | threshold | val acc / sens / spec / AUC | "
            "shifted val | internal test | cluster holdout |\n|---|--:|---|---|---|---|\n")
    return head + "\n".join(
        f"| {rule} | {v['threshold']:.3f} | {fmt(v['val'])} | {fmt(v['shifted_val'])} | "
        f"{fmt(v.get('test'))} | {fmt(v.get('cluster_holdout'))} |"
        for rule, v in r["threshold_rules"].items()) + "\n"


def proxy_text(r: dict) -> str:
    """What the cluster holdout is, from a row's metrics.json."""
    from pneumo_edge.train.clusters import summary

    p = r.get("proxy")
    if not p:
        return ""
    return (f"{summary(p)} (features from the decoded pixels, k-means seed {p['seed']}); "
            f"chosen as {p['rule']}.\n")


def report(done: list[tuple[str, dict]]) -> str:
    return (table(done) + "\n" + proxy_text(done[0][1])
            + f"\nThreshold rules on the first row ({done[0][0]}):\n\n"
            + rules_table(done[0][1]))


def run_suite(data: str, out: Path, suite, pick=None, md: str | None = None,
              shared_cache: bool = True, record: Path | None = None) -> list[tuple[str, dict]]:
    """Run (or skip, or resume) the rows ``pick`` of ``suite``; the tables after each row.
    With ``record`` (a folder in the repository) every finished row is written there and
    rows recorded there count as done: the tables then show every recorded row of the suite,
    in its order. Returns the picked rows' (name, result)."""
    rows = [(i, suite[i][1]) for i in (pick if pick is not None else range(len(suite)))]
    print(f"suite: {estimate_hours(rows, out, record)}", flush=True)
    results = {i: r for i, (_, args) in enumerate(suite)
               if (r := recorded(record, i, args)) is not None}
    if any(i not in results and row_state(row_dir(out, i)) != "done" for i, _ in rows):
        check_code_origin()
    for i, args in rows:
        if i not in results:
            cache = out / "pixel-cache" if shared_cache else None
            results[i] = run_row(data, row_dir(out, i), args, cache)
            if record is not None:
                print(f"recorded {record_row(record, i, results[i])}",
                      flush=True)
        text = report([(suite[j][0], results[j]) for j in sorted(results)])
        print(text, flush=True)
        if md:
            Path(md).write_text(text)
    return [(suite[i][0], results[i]) for i, _ in rows]


def main() -> None:
    if sys.argv[1:2] == ["_prepare"]:
        return _prepare_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--suite", default="small", choices=sorted(SUITES))
    ap.add_argument("--rows", default="", help="comma list of row numbers (default: all)")
    ap.add_argument("--md", help="write the tables to this markdown file")
    ap.add_argument("--record", help="folder in the repository for each finished row's result "
                    "(rowNN.json): recorded rows count as done, across sessions and machines")
    ap.add_argument("--estimate", action="store_true", help="print the estimate and stop")
    a = ap.parse_args()
    suite = SUITES[a.suite]
    pick = [int(x) for x in a.rows.split(",")] if a.rows else None
    record = Path(a.record) if a.record else None
    if a.estimate:
        rows = [(i, suite[i][1]) for i in (pick if pick is not None else range(len(suite)))]
        print(f"suite {a.suite}: {estimate_hours(rows, Path(a.out), record)}")
        return None
    run_suite(a.data, Path(a.out), suite, pick, a.md, record=record)
    return None


if __name__ == "__main__":
    main()

"""The standard benchmark matrix, written to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/run_all.py            # waits for a running training / benchmark
    .venv/bin/python benchmarks/run_all.py --quick    # few iterations, for checking the script

1. A ResNet50 model directory at 224 px with random weights (speed does not depend on the
   weights): :func:`pneumo_edge.model.net.build_model` + ``save_model`` + a :class:`Card`,
   exported to model.onnx and model.fp16.onnx by the export code (``run_export``, parity
   skipped: there is nothing to be faithful to).
2. ``pneumo-edge bench`` on it (a subprocess, exactly the command users run): torch, onnx and
   onnx-fp16 at batch 1, 8 and 32, plus the end-to-end pass over 240 clinical-size JPEGs
   made from the real dataset by ``benchmarks/clinical_images.py``.
3. ``benchmarks/train_step.py``: ResNet50 training-step images/s, fp32 vs bf16 autocast.
4. The score-vs-baseline comparison from ``benchmarks/score_vs_baseline.md`` (written by
   ``benchmarks/score_vs_baseline.py``; ``--score-vs-baseline`` runs it first).
5. GPU: whatever ``benchmarks/gpu_torch.py --write`` recorded on a CUDA box, or a plain
   statement that no GPU figures were measured.

Figures are only honest on a quiet machine: before measuring, the script waits (up to
``--wait-minutes``) while a ``pneumo-edge train`` run or ``score_vs_baseline`` benchmark is
running or the CPU is more than 25 % busy, then records how much CPU other processes used
while it measured (marked disturbed above 5 %). Each step runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    HERE,
    OtherWork,
    busy,
    commands,
    log,
    make_model_dir,
    model_dir_ok,
    wait_quiet,
)
from common import REPO as ROOT

RESULTS = HERE / "RESULTS.md"
SCORE_MD = HERE / "score_vs_baseline.md"
ME = ("run_all.py",)  # this script's own command line (and a shell that started it)
TITLE = "# Benchmark results"
#: Above this share of the machine's CPU used by other processes, the figures are marked.
OTHER_MAX = 0.05


def run_json(cmd: list[str], timeout: float | None = None) -> dict:
    log("$ " + " ".join(cmd))
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} ... exited {r.returncode}")
    return json.loads(r.stdout[r.stdout.index("{"):])


def default_data(count: int) -> tuple[str, dict | None]:
    """(folder, description): ``count`` clinical-size JPEGs (1.5-3 MP, made from the real
    dataset by benchmarks/clinical_images.py, in the same place score_vs_baseline.py keeps
    them), or the bundled 224 px samples when the dataset is not here."""
    src = ROOT.parent / "shared" / "data" / "chest_xray" / "train"
    if not src.is_dir():
        return str(ROOT / "samples" / "chest_xray"), None
    import clinical_images

    folder = Path(tempfile.gettempdir()) / "pneumo_edge_bench" / f"images_{count}"
    log(f"making (or reusing) {count} clinical-size JPEGs in {folder} ...")
    files = clinical_images.build(src, folder, count)
    return str(folder), clinical_images.describe(files)


def header_md(bench: dict, busy_now: list[str], quick: bool) -> str:
    from pneumo_edge.commands.bench import cpu_summary

    m = bench["machine"]
    flags = ", ".join(k for k, v in m["cpu_flags"].items() if v) or "none"
    lines = [
        f"Written by `benchmarks/run_all.py` on {m['date']}. The inference, end-to-end and "
        "training-step figures below come from that one run on this machine (the "
        "score-vs-baseline section is included from its own run and names its own machine "
        "and times):",
        "",
        f"- CPU: {m['cpu']}, {m['cores_usable']} usable cores (of {m['cores']}); flags: {flags}",
        f"- GPU: {', '.join(g.get('name', '?') for g in m['gpu']) if m['gpu'] else 'none'}",
        f"- OS: {m['os']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- load average (1, 5, 15 min) when the inference run started: {m['load_avg_1_5_15']}",
        "- CPU used by other processes while measuring: " + (
            f"{bench['other_cpu_share']:.1%} of the machine (all busy CPU time from /proc/stat "
            "minus this run's own, from getrusage)" if bench.get("other_cpu_share") is not None
            else "not measured"),
        "",
        f"Short form used next to CPU figures below: **{cpu_summary(m)}**.",
    ]
    if busy_now:
        lines += ["", "**Warning: other work was running during this run; the figures are "
                      "disturbed:** " + "; ".join(f"`{c[:100]}`" for c in commands(busy_now))]
    if quick:
        lines += ["", "**Quick mode (`--quick`): few iterations, for checking the scripts; "
                      "not figures to quote.**"]
    return "\n".join(lines)


def bench_md(bench: dict) -> str:
    from pneumo_edge.commands.bench import cpu_summary, markdown_table

    s = bench["settings"]
    model = bench["model"]
    lines = [
        "## Inference latency per runtime and batch size (`pneumo-edge bench`)",
        "",
        f"{model['arch']}, {model['image_size']} px, random weights, on "
        f"{cpu_summary(bench['machine'])}. Command:",
        "",
        "```",
        bench["command"],
        "```",
        "",
        f"Per row: {s['warmup']} untimed warm-up calls, then {s['iters']} timed calls "
        + (f"(fewer, but at least {min(5, s['iters'])}, once {s['max_time_s']:g} s of timed "
           "calls have passed; `iters` says how many ran) " if s.get("max_time_s") else "")
        + "on a random uint8 batch `[N, 1, 224, 224]`, each timed alone with "
        "`time.perf_counter`. p50/p90/p99 are `numpy.percentile` over those per-call latencies "
        "(ms per batch); images/s = batch / mean latency. Runtimes return host numpy arrays, so "
        "a timed call includes any device synchronisation and copies.",
        "",
        markdown_table(bench),
    ]
    if bench["pipeline"]:
        p0 = bench["pipeline"][0]
        lines += [
            "",
            f"### End to end over image files ({p0['files']} files from `{s['data']}`, batch "
            f"{p0['batch']}, {p0['threads']} decode threads; {cpu_summary(bench['machine'])})",
            "",
            (f"The files: {'the first %d of ' % p0['files'] if p0['files'] < d['images'] else ''}"
             f"{d['images']} JPEGs made by `benchmarks/clinical_images.py` from "
             f"the public dataset's X-rays, {d['megapixels_min']}-{d['megapixels_max']} MP "
             f"(mean {d['megapixels_mean']}), aspect {d['aspect_min']}-{d['aspect_max']}, "
             f"{d['kib_mean']:.0f} KiB on average; half 8-bit grey, half RGB. "
             if (d := bench.get("data_description")) else "")
            + "decode = scoring's decoder alone (`pneumo_edge.inputs.pipeline.decode_batches` -> "
            "`pneumo_edge.inputs.images.load_image`); compute = the runtime alone on the decoded "
            "batches; end to end = scoring's loop (`pneumo_edge.commands.score.score_files`: "
            "decode overlapped with the model, CSV rows built but not written); bound = the "
            "slower of decode and compute. On this CPU-only box both share the same cores.",
            "",
            "| runtime | device | decode img/s | compute img/s | end-to-end img/s | bound |",
            "|---|---|--:|--:|--:|---|",
        ]
        for p in bench["pipeline"]:
            lines.append(f"| {p['runtime']} | {p['device']} | {p['decode_images_per_s']:.0f} | "
                         f"{p['compute_images_per_s']:.1f} | {p['end_to_end_images_per_s']:.1f} "
                         f"| {p['bound']} |")
    return "\n".join(lines)


def score_md() -> str:
    lines = ["## Scoring vs a plain PyTorch pipeline (`benchmarks/score_vs_baseline.py`)", ""]
    if SCORE_MD.exists():
        body = SCORE_MD.read_text(encoding="utf-8").strip()
        # nest its headings one level below this page's sections
        body = "\n".join("##" + ln if ln.startswith("#") else ln for ln in body.splitlines())
        st = SCORE_MD.stat()
        lines += [f"Included from `benchmarks/score_vs_baseline.md` (last written "
                  f"{time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(st.st_mtime))}; it names "
                  "its own machine and settings).", "", body]
    else:
        lines.append("Not available: `benchmarks/score_vs_baseline.md` has not been written yet "
                     "(run `benchmarks/score_vs_baseline.py`).")
    return "\n".join(lines)


NO_GPU = """## GPU

**No GPU figures were measured in this session**: the machine that ran this page has no NVIDIA
GPU, so TensorRT (`trt`), onnxruntime's CUDA provider and torch on CUDA were not timed, and
nothing on this page says how fast they are. On a CUDA box run
`benchmarks/gpu_torch.py --write` (torch fp32 eager vs fp16 channels_last vs CUDA graphs, batch
1/8/32/128, plus end-to-end scoring with `--data`) and `pneumo-edge bench --model RUN --runtime
all` (after `pneumo-edge export RUN --trt`); `gpu_torch.py --write` replaces this section with
its figures and the GPU they came from."""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(),
                                                        "pneumo_edge_bench_r50"),
                    help="where to build (or reuse) the random-weight ResNet50 directory")
    ap.add_argument("--rebuild", action="store_true", help="rebuild and re-export the model")
    ap.add_argument("--data", default=None,
                    help="folder for the end-to-end pass (default: clinical-size JPEGs made "
                         "from the real dataset by clinical_images.py)")
    ap.add_argument("--images", type=int, default=240,
                    help="how many clinical-size JPEGs to make for the default --data")
    ap.add_argument("--limit", type=int, default=None, help="first N files of --data")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--runtime", default="torch,onnx,onnx-fp16")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--max-time", type=float, default=90.0,
                    help="seconds of timed calls per bench row before it stops (>= 5 calls)")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--train-warmup", type=int, default=3)
    ap.add_argument("--score-vs-baseline", action="store_true",
                    help="run benchmarks/score_vs_baseline.py first (else include its .md)")
    ap.add_argument("--wait-minutes", type=float, default=60.0,
                    help="how long to wait for a quiet machine")
    ap.add_argument("--force", action="store_true", help="measure even if the machine is busy")
    ap.add_argument("--quick", action="store_true", help="few iterations; for checking the script")
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args(argv)
    if a.quick:
        a.warmup, a.iters, a.train_steps, a.train_warmup = 1, 3, 2, 1
        a.limit = a.limit or 64

    d = Path(a.model_dir)
    if a.rebuild or not model_dir_ok(d, "resnet50", 224):
        log(f"building a random-weight ResNet50 224 px model in {d} and exporting it ...")
        make_model_dir(d, "resnet50", 224)

    busy_now = [] if a.force else wait_quiet(a.wait_minutes, ignore=ME)
    if busy_now and not a.force:
        raise SystemExit("the machine is still busy; not measuring (use --force to measure "
                         "anyway, marked as disturbed):\n  " + "\n  ".join(busy_now))
    if a.force:
        busy_now = busy(ME)

    described = None
    if a.data is None:
        a.data, described = default_data(a.images)
    py = sys.executable
    cli = [py, "-m", "pneumo_edge"]
    if a.score_vs_baseline:
        subprocess.run([py, str(HERE / "score_vs_baseline.py")], cwd=ROOT, check=True)
    bench_cmd = ["bench", "--model", str(d), "--runtime", a.runtime, "--batch", a.batch,
                 "--warmup", str(a.warmup), "--iters", str(a.iters), "--max-time",
                 str(a.max_time), "--data", a.data]
    bench_cmd += ["--limit", str(a.limit)] if a.limit else []
    other = OtherWork()
    bench = run_json(cli + bench_cmd + ["--json"])
    bench["command"] = "pneumo-edge " + " ".join(bench_cmd)
    bench["data_description"] = described
    from pneumo_edge.commands.bench import format_table

    print(format_table(bench))
    train = run_json([py, str(HERE / "train_step.py"), "--no-write", "--steps",
                      str(a.train_steps), "--warmup", str(a.train_warmup)])
    busy_now = list(dict.fromkeys(busy_now + busy(ME)))  # anything that started meanwhile
    other_share = other.share()
    bench["other_cpu_share"] = other_share
    log(f"other processes used {other_share:.1%} of the CPU during the measurements"
        if other_share is not None else "could not measure other processes' CPU use")
    if other_share is not None and other_share > OTHER_MAX:
        busy_now.append(f"0 (other processes used {other_share:.0%} of the CPU during the run)")
    import train_step

    from pneumo_edge.commands.bench import update_section

    out = Path(a.results)
    keep_gpu = out.exists() and "<!-- gpu_torch:begin -->" in out.read_text(encoding="utf-8") \
        and "No GPU figures were measured" not in out.read_text(encoding="utf-8")
    if out.exists() and not keep_gpu:
        out.unlink()  # rebuilt from scratch; the GPU section survives when it holds figures
    update_section(out, "header", header_md(bench, busy_now, a.quick), TITLE)
    update_section(out, "bench", bench_md(bench), TITLE)
    update_section(out, "train_step", train_step.markdown(train), TITLE)
    update_section(out, "score_vs_baseline", score_md(), TITLE)
    if not keep_gpu:
        update_section(out, "gpu_torch", NO_GPU, TITLE)
    print(train_step.markdown(train))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()

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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
SCORE_MD = HERE / "score_vs_baseline.md"
BUSY_PATTERNS = ("pneumo-edge train", "score_vs_baseline")
TITLE = "# Benchmark results"
#: Above this share of the machine's CPU used by other processes, the figures are marked.
OTHER_MAX = 0.05


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_model_dir(out, arch: str = "resnet50", size: int = 224, *, export: bool = True,
                   seed: int = 0) -> Path:
    """A model directory with random weights (for speed only) and, with ``export``, its
    model.onnx and model.fp16.onnx from the export code."""
    import torch
    from pneumo_edge.train.checkpoint import save_model

    from pneumo_edge.model.card import Card
    from pneumo_edge.model.net import build_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(arch, 2, "none").eval()
    card = Card(classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", image_size=size,
                threshold=0.5, arch=arch,
                train_config={"note": "random weights, built by benchmarks/run_all.py for "
                                      "speed measurements only; not a trained model"})
    save_model(out, model, card)
    card.save(out)
    if export:
        from pneumo_edge.export.main import run_export

        code = run_export(out, skip_parity=True)
        if code != 0:
            raise SystemExit(f"export of the benchmark model failed (exit {code})")
    return out


def _model_ok(d: Path, arch: str, size: int) -> bool:
    try:
        card = json.loads((d / "card.json").read_text())
    except (OSError, ValueError):
        return False
    files = [d / f for f in ("model.pt", "model.onnx", "model.fp16.onnx")]
    return (card.get("arch"), card.get("image_size")) == (arch, size) and \
        all(f.exists() for f in files) and \
        min(f.stat().st_mtime for f in files[1:]) >= files[0].stat().st_mtime


def busy() -> list[str]:
    """Command lines of other processes that would disturb the figures."""
    found = []
    for pat in BUSY_PATTERNS:
        r = subprocess.run(["pgrep", "-af", pat], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            pid, _, cmd = line.partition(" ")
            if int(pid) != os.getpid() and "run_all.py" not in cmd and "pgrep" not in cmd:
                found.append(line)
    return found


def _commands(lines: list[str]) -> list[str]:
    """Distinct command lines (a training run shows up once per worker process)."""
    return list(dict.fromkeys(line.partition(" ")[2] for line in lines))


def proc_stat():
    """(total, idle + iowait) CPU ticks of the whole machine from /proc/stat; None where absent."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(vals), vals[3] + (vals[4] if len(vals) > 4 else 0)


def cpu_busy(seconds: float = 3.0) -> float:
    """Share of all CPU time spent busy over ``seconds`` (from /proc/stat; 0 where absent):
    catches other work that the name patterns do not (someone's test run, a script)."""
    a = proc_stat()
    time.sleep(seconds)
    b = proc_stat()
    if not a or not b or b[0] == a[0]:
        return 0.0
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


class OtherWork:
    """How much CPU other processes used while we measured: all busy CPU time on the machine
    (/proc/stat) minus what this script and its finished subprocesses used (getrusage)."""

    def __init__(self):
        import resource

        self._res = resource
        self.t0 = time.perf_counter()
        self.stat0 = self._stat()
        self.ours0 = self._ours()

    @staticmethod
    def _stat():
        ticks = proc_stat()
        return None if ticks is None else (ticks[0] - ticks[1]) / os.sysconf("SC_CLK_TCK")

    def _ours(self):
        r = self._res
        a, b = r.getrusage(r.RUSAGE_SELF), r.getrusage(r.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    def share(self) -> float | None:
        """Other processes' CPU seconds / (wall seconds x cores) since construction."""
        stat1 = self._stat()
        if self.stat0 is None or stat1 is None:
            return None
        wall = time.perf_counter() - self.t0
        others = (stat1 - self.stat0) - (self._ours() - self.ours0)
        return max(0.0, others) / (wall * (os.cpu_count() or 1))


def wait_quiet(minutes: float, poll_s: float = 30.0, max_busy: float = 0.25) -> list[str]:
    deadline = time.time() + minutes * 60
    while True:
        b = busy()
        share = cpu_busy()
        if share > max_busy:
            b.append(f"0 (CPU {share:.0%} busy with other work)")
        if not b or time.time() >= deadline:
            return b
        log(f"waiting for a quiet machine ({len(b)} busy process(es), e.g. {b[0][:100]}); "
            f"{(deadline - time.time()) / 60:.0f} min left")
        time.sleep(poll_s)


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
    sys.path.insert(0, str(HERE))
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
                      "disturbed:** " + "; ".join(f"`{c[:100]}`" for c in _commands(busy_now))]
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
            "batches; end to end = scoring's loop (`pneumo_edge.commands.score.score_files`: decode "
            "overlapped with the model, CSV rows built but not written); bound = the slower of "
            "decode and compute. On this CPU-only box both share the same cores.",
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
    if a.rebuild or not _model_ok(d, "resnet50", 224):
        log(f"building a random-weight ResNet50 224 px model in {d} and exporting it ...")
        make_model_dir(d, "resnet50", 224)

    busy_now = [] if a.force else wait_quiet(a.wait_minutes)
    if busy_now and not a.force:
        raise SystemExit("the machine is still busy; not measuring (use --force to measure "
                         "anyway, marked as disturbed):\n  " + "\n  ".join(busy_now))
    if a.force:
        busy_now = busy()

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
    busy_now = list(dict.fromkeys(busy_now + busy()))  # anything that started meanwhile
    other_share = other.share()
    bench["other_cpu_share"] = other_share
    log(f"other processes used {other_share:.1%} of the CPU during the measurements"
        if other_share is not None else "could not measure other processes' CPU use")
    if other_share is not None and other_share > OTHER_MAX:
        busy_now.append(f"0 (other processes used {other_share:.0%} of the CPU during the run)")
    sys.path.insert(0, str(HERE))
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

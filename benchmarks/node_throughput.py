"""DICOM node throughput: instances received by ``pneumo-edge listen`` -> SR stored in Orthanc,
against plain ``pneumo-edge score`` on the same files, and receive-to-result latency per
instance (p50/p95).

The same N CR DICOMs (bundled sample X-rays, 12 bits) are scored three times with the same
model and runtime: (1) ``pneumo-edge score FOLDER -o CSV``, its own images/s figure (model load
and start excluded); (2) a node with ``--send-to`` a local Orthanc: the files are uploaded to
Orthanc first, then Orthanc is asked to C-STORE them all to the node (REST, one association);
the clock runs from that request to the node's log line for the last SR Orthanc acknowledged
(model load excluded here too); (3) ``score --dicom-out`` into a new folder (the same SRs,
written without the network), for the second row of the summary; then, once, (4) the node's
parts each alone, in its own processes (receiving, building the SRs, sending: CPU per image),
and the best ratio they allow with every core busy. Latency: per instance, the
node's "received" line to its "sent ... .sr.dcm" line (both stamped by the node, to the
millisecond).

    .venv/bin/python benchmarks/node_throughput.py [--model DIR] [--runtime onnx]
        [--case DIR RUNTIME LABEL ...] [--count 64] [--batch 16] [--rounds 3]

They run in turn, ``--rounds`` times each (score, node, score --dicom-out, score, ...), and
are compared round by round as ratios: on a shared machine the load drifts, and a ratio of
neighbouring runs is steadier than either figure.

Needs Orthanc (Debian ``orthanc``). Without --model or --case, a random-weight ResNet18 at 224
px is built (speed only). Each --case is one row of the summary table and one round table. Writes benchmarks/NODE.md with the machine and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from common import REPO, SAMPLES, machine, make_model_dir, write_dicom
from PIL import Image

from pneumo_edge.dicomnode.orthanc import Orthanc, free_port

#: where the hand-written reading of the figures starts in the results file (kept on reruns)
NOTES = "\n## Reading it"
STAMP = re.compile(r"^(\S+Z) (.*)$")


def write_inputs(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    jpegs = sorted((SAMPLES / "train").rglob("*.jpeg"))
    out = []
    for i in range(count):
        with Image.open(jpegs[i % len(jpegs)]) as im:
            v = np.asarray(im.convert("L"), dtype=np.uint16) * 16
        out.append(write_dicom(folder / f"x{i:04d}.dcm", v))
    return out


def children_cpu() -> float:
    """CPU seconds (user + system) of this script's finished child processes so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def proc_cpu(*pids: int) -> float:
    """CPU seconds (user + system, all threads) the running processes ``pids`` and their
    running children (the node's network and builder processes) used so far."""
    return sum(sum(tree_cpu(pid).values()) for pid in pids)


def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of the running process ``pid`` ("main") and of each running child
    (named by its module's last part: "network", "builder")."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            cmd = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        me = int(stat.parent.name)
        if me == pid or int(fields[1]) == pid:
            name = "main" if me == pid else (cmd[2].decode().rpartition(".")[2]
                                             if len(cmd) > 2 else str(me))
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def plain_score(model: Path, folder: Path, runtime: str, batch: int,
                dicom_out: Path | None = None) -> float:
    """score's own images/s and its runtime line; with ``dicom_out``, ``--dicom-out`` there
    (a new folder: every SR is written, none kept from before)."""
    extra = ["--dicom-out", str(dicom_out)] if dicom_out else []
    proc = subprocess.run([sys.executable, "-m", "pneumo_edge", "score", str(folder), "--model",
                           str(model), "--runtime", runtime, "--batch", str(batch), "-o",
                           str(folder.parent / "score.csv"), *extra], cwd=REPO,
                          capture_output=True, text=True, check=True)
    m = re.search(r"images in [\d.]+ s: ([\d.]+) images/s", proc.stderr)
    if not m:
        raise SystemExit(f"no images/s in score's output:\n{proc.stderr[-1000:]}")
    return float(m.group(1)), _runtime_line(proc.stderr)


def _runtime_line(stderr: str) -> str:
    """What the runtime chose (score's "runtime: ..." line), e.g. ``onnx on cpu (...)``."""
    m = re.search(r"^runtime: (.*)$", stderr, re.MULTILINE)
    return m.group(1) if m else "?"


def when(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def node_run(model: Path, files: list[Path], work: Path, runtime: str, batch: int,
             max_wait: float) -> tuple[float, list[float], dict]:
    pacs = Orthanc(free_port(), free_port(), free_port(), work / "orthanc")
    pacs.folder.mkdir()
    pacs.start()
    lines: list[str] = []
    node = subprocess.Popen([sys.executable, "-m", "pneumo_edge", "listen", "--model", str(model),
                             "--out", str(work / "node"), "--port", str(pacs.node_port),
                             "--send-to", pacs.send_to, "--runtime", runtime, "--batch",
                             str(batch), "--max-wait", str(max_wait)],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    reader = threading.Thread(target=lambda: lines.extend(ln.rstrip() for ln in node.stderr),
                              daemon=True)
    reader.start()
    try:
        _wait(lambda: any("listening as" in ln for ln in lines), node)
        ids = [pacs.upload(f) for f in files]
        split0, pacs0 = tree_cpu(node.pid), proc_cpu(pacs.proc.pid)
        t0 = time.time()
        pacs.send_to_node(ids)
        _wait(lambda: sum(" sent " in ln and ".sr.dcm" in ln for ln in lines) >= len(files), node)
        split = {k: v - split0.get(k, 0.0) for k, v in tree_cpu(node.pid).items()}
        cpu = sum(split.values()), proc_cpu(pacs.proc.pid) - pacs0
    finally:
        node.terminate()
        node.wait(120)
        pacs.stop()
    received, sent = {}, {}
    for ln in lines:
        m = STAMP.match(ln)
        if not m:
            continue
        if r := re.match(r"received (\S+)\.dcm \(", m.group(2)):
            received[r.group(1)] = when(m.group(1))
        elif s := re.match(r"sent \S+\.sr\.dcm for (\S+) to", m.group(2)):
            sent[s.group(1)] = when(m.group(1))
    latencies = [sent[u] - received[u] for u in sent if u in received]
    stages = [(float(m.group(1)), float(m.group(2))) for ln in lines if (m := re.search(
        r"scored \d+ instances in ([\d.]+) s, committed in ([\d.]+) s", ln))]
    first, last = min(received.values()), max(received.values())
    span = max(sent.values()) - t0
    return len(files) / span, latencies, {"span": span, "run": sum(a for a, _ in stages),
                                          "commit": sum(b for _, b in stages),
                                          "receiving": last - first, "to_first": first - t0,
                                          "cpu_node": cpu[0], "cpu_pacs": cpu[1],
                                          "cpu_split": split}


def parts_alone(files: list[Path], work: Path) -> dict[str, tuple[float, float]]:
    """CPU seconds per image of the node's parts, each alone on this machine and in the
    node's own processes: receiving (Orthanc C-STOREs ``files`` to the network process),
    building (the builder process makes their SRs) and sending (the network process C-STOREs
    the SRs to Orthanc). Each: (the node's process, Orthanc's)."""
    pacs = Orthanc(free_port(), free_port(), free_port(), work / "orthanc")
    pacs.folder.mkdir(parents=True)
    pacs.start()
    try:
        out = {"receiving": _receiving(pacs, files, work / "recv")}
        received = sorted((work / "recv" / "received").glob("*.dcm"))
        out["building"] = _building(received, work / "built", work / "warm")
        out["sending"] = _sending(pacs, work / "built", len(files), work / "send")
    finally:
        pacs.stop()
    return out


def _receiving(pacs, files: list[Path], out: Path) -> tuple[float, float]:
    from pneumo_edge.dicomnode.network import NetworkProcess
    from pneumo_edge.dicomnode.node import NodeConfig

    got = threading.Semaphore(0)
    recv = NetworkProcess(NodeConfig(model="", out=str(out), port=pacs.node_port), got.release,
                          lambda code: None)
    recv.wait_ready()
    ids = [pacs.upload(f) for f in files]
    c0 = proc_cpu(recv.proc.pid), proc_cpu(pacs.proc.pid)
    pacs.send_to_node(ids)
    for _ in files:
        got.acquire(timeout=300)
    cpu = proc_cpu(recv.proc.pid) - c0[0], proc_cpu(pacs.proc.pid) - c0[1]
    recv.finish()
    return cpu[0] / len(files), cpu[1] / len(files)


def _building(received: list[Path], staging: Path, warm: Path) -> tuple[float, float]:
    from pneumo_edge.dicomnode.builder import BuilderProcess
    from pneumo_edge.outputs.dicom_objects import ResultInfo

    info = ResultInfo(probability=0.25, label="NORMAL", positive_class="PNEUMONIA",
                      threshold=0.5, threshold_source="card", model_sha256="ab" * 32,
                      model_file="model.int8.onnx", runtime="onnx-int8", precision="int8",
                      version="benchmark")
    staging.mkdir()
    warm.mkdir()
    builder = BuilderProcess()
    builder.build([(received[0], info, warm, None)])  # imports, the SR template: once
    c0 = proc_cpu(builder.proc.pid)
    built = builder.build([(f, info, staging, None) for f in received])
    cpu = proc_cpu(builder.proc.pid) - c0
    builder.close()
    if any(err for _, _, err in built):
        raise SystemExit(f"building failed: {next(e for _, _, e in built if e)}")
    return cpu / len(received), 0.0


def _sending(pacs, built: Path, n: int, out: Path) -> tuple[float, float]:
    from pneumo_edge.dicomnode.network import NetworkProcess
    from pneumo_edge.dicomnode.node import NodeConfig

    send = NetworkProcess(NodeConfig(model="", out=str(out), port=free_port(),
                                     send_to=pacs.send_to), lambda: None, lambda code: None)
    send.wait_ready()
    c0 = proc_cpu(send.proc.pid), proc_cpu(pacs.proc.pid)
    for d in built.iterdir():
        os.replace(d, out / "outbox" / d.name)
    send.kick()
    while sum(1 for _ in (out / "dicom").rglob("*.sr.dcm")) < n:
        time.sleep(0.02)
    cpu = proc_cpu(send.proc.pid) - c0[0], proc_cpu(pacs.proc.pid) - c0[1]
    send.finish()
    return cpu[0] / n, cpu[1] / n


def _wait(check, node, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if node.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the node stopped or timed out")
        time.sleep(0.05)


def _random_model(out: Path) -> Path:
    """common.make_model_dir's model, exported without INT8 (it has no training split to
    calibrate on, and this measures the fp32 ONNX file)."""
    from pneumo_edge.export.main import run_export

    make_model_dir(out, "resnet18", 224, export=False)
    if run_export(out, skip_parity=True, int8=False) != 0:
        raise SystemExit("export of the benchmark model failed")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="Model directory (default: random ResNet18).")
    ap.add_argument("--runtime", default="onnx")
    ap.add_argument("--case", nargs=3, action="append", metavar=("DIR", "RUNTIME", "LABEL"),
                    help="A model directory, runtime and label to measure, one table row "
                         "each (repeat; replaces --model/--runtime). DIR 'random' is the "
                         "random-weight ResNet18.")
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-wait", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3, help="score/node alternations")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("NODE.md"))
    args = ap.parse_args()
    cases = args.case or [[str(args.model or "random"), args.runtime,
                           str(args.model) if args.model else RANDOM]]
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = write_inputs(tmp / "in", args.count)
        write_inputs(tmp / "one", 1)
        for c, (model, runtime, label) in enumerate(cases):
            model = _random_model(tmp / "model") if model == "random" else Path(model)
            runs = measure(model, runtime, files, tmp / f"case{c}", args, label)
            results.append((label, runtime, runs))
        parts = parts_alone(files, tmp / "parts")
    load_after = os.getloadavg()
    old = args.out.read_text() if args.out.exists() else ""
    notes = old[old.index(NOTES):] if NOTES in old else ""  # written by hand: kept
    args.out.write_text(report(args, results, parts, load_before, load_after) + notes)
    print(args.out.read_text())


RANDOM = "random-weight ResNet18 224 px"


def measure(model: Path, runtime: str, files: list[Path], work: Path, args, label: str) -> list:
    """``args.rounds`` alternations of plain score and the node on ``files``: per round
    (score images/s, node images/s, latencies, node parts, load after, score's runtime line)."""
    work.mkdir()
    folder = files[0].parent
    cpu = children_cpu()
    plain_score(model, folder.with_name("one"), runtime, args.batch)
    fixed = children_cpu() - cpu  # start, imports, model load: not per image
    runs = []
    for r in range(args.rounds):
        cpu = children_cpu()
        score_ips, chosen = plain_score(model, folder, runtime, args.batch)
        score_cpu = children_cpu() - cpu - fixed
        (work / f"round{r}").mkdir()
        node_ips, lat, parts = node_run(model, files, work / f"round{r}", runtime, args.batch,
                                        args.max_wait)
        parts["cpu_score"] = score_cpu
        parts["score_sr"] = plain_score(model, folder, runtime, args.batch,
                                        work / f"round{r}" / "score-sr")[0]
        runs.append((score_ips, node_ips, lat, parts, os.getloadavg()[0], chosen))
        print(f"{label}, round {r + 1}: score {score_ips:.1f}/s, node {node_ips:.1f}/s "
              f"({node_ips / score_ips:.0%}), score --dicom-out {parts['score_sr']:.1f}/s, "
              f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    return runs


def _median(xs) -> float:
    return float(np.median(xs))


def _split(p: dict, n: int) -> str:
    split = p.get("cpu_split", {})
    return " / ".join(f"{split.get(k, 0.0) / n * 1e3:.0f}" for k in ("main", "network",
                                                                      "builder")) + " ms"


def parts_table(results, parts, cores: int, n: int) -> str:
    """The parts measured alone, and what they allow at best: every core busy, each part
    as cheap as alone, nothing else."""
    rows = [f"| {name} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms |" for name, (a, b) in parts.items()]
    extra = sum(a + b for a, b in parts.values())
    bounds = []
    for label, _, runs in results:
        score_cpu = _median([r[3]["cpu_score"] for r in runs]) / n
        score_ips = _median([r[0] for r in runs])
        best = cores / (score_cpu + extra)
        bounds.append(f"{label}: score's {score_cpu * 1e3:.0f} ms + the parts' "
                      f"{extra * 1e3:.1f} ms -> at most {best:.0f} images/s on {cores} cores, "
                      f"**{best / score_ips:.0%}** of score's {score_ips:.1f}")
    return ("| part (alone) | CPU per image: the node's process | CPU per image: Orthanc |\n"
            "|---|---|---|\n" + "\n".join(rows) + "\n\nThe best the node could do here "
            "(all cores busy, each part as cheap as alone, no pipeline costs): "
            + "; ".join(bounds) + ".\n")


def report(args, results, parts, load_before, load_after) -> str:
    m = machine()
    n = args.count
    summary, details, chosen = [], [], []
    for label, runtime, runs in results:
        chosen.append(f"{label}: {runs[0][5]}")
        ratios = [nd / s for s, nd, *_ in runs]
        lat = [x for r in runs for x in r[2]]
        p50, p95 = np.percentile(lat, [50, 95]) if lat else (float("nan"), float("nan"))
        loads = [r[4] for r in runs]
        summary.append(
            f"| {label} | {runtime}: {runs[0][5].split(' (')[0]} | {_median([r[0] for r in runs]):.1f} | "
            f"{_median([r[1] for r in runs]):.1f} | **{_median(ratios):.0%}** "
            f"({min(ratios):.0%}-{max(ratios):.0%}) | "
            f"{_median([r[3]['cpu_score'] for r in runs]) / n * 1e3:.0f} ms | "
            f"{_median([r[3]['cpu_node'] for r in runs]) / n * 1e3:.0f} + "
            f"{_median([r[3]['cpu_pacs'] for r in runs]) / n * 1e3:.0f} ms | "
            f"{p50:.2f} / {p95:.2f} s | {min(loads):.1f}-{max(loads):.1f} |")
        with_sr = [r[3]["score_sr"] for r in runs if "score_sr" in r[3]]
        if with_sr:
            sr_ratios = [r[1] / r[3]["score_sr"] for r in runs]
            summary.append(
                f"| {label}: against `score --dicom-out` (the same SRs written, no network) | | "
                f"{_median(with_sr):.1f} | {_median([r[1] for r in runs]):.1f} | "
                f"{_median(sr_ratios):.0%} ({min(sr_ratios):.0%}-{max(sr_ratios):.0%}) | | | | |")
        rows = "\n".join(
            f"| {i + 1} | {s:.1f} | {nd:.1f} | {nd / s:.0%} | {p['run'] / n * 1e3:.0f} ms | "
            f"{p['commit'] / n * 1e3:.0f} ms | {p['receiving']:.1f} s | "
            f"{p['cpu_score'] / n * 1e3:.0f} ms | {p['cpu_node'] / n * 1e3:.0f} + "
            f"{p['cpu_pacs'] / n * 1e3:.0f} ms | {_split(p, n)} | {load:.1f} |"
            for i, (s, nd, _, p, load, _) in enumerate(runs))
        details.append(f"""### {label}, runtime {runtime}

| round | score images/s | node images/s | node / score | node: decode + model per image | node: objects + commit per image | node: receiving all | CPU per image: score | CPU per image: node + Orthanc | node's CPU per image: scoring / network / builder | load (1 min) after |
|---|---|---|---|---|---|---|---|---|---|---|
{rows}
""")
    return f"""# DICOM node throughput (benchmarks/node_throughput.py)

{n} CR DICOMs from the bundled samples, batch {args.batch}, --max-wait {args.max_wait} s.
The node figure runs from Orthanc's store request to the last SR Orthanc acknowledged
(receive, fsync, decode, score, SR build and write, commit, C-STORE back to Orthanc, all on
this machine, Orthanc included). `pneumo-edge score` (plain, CSV only), the node and
`pneumo-edge score --dicom-out` (the same SRs written to a folder, no network) run in turn on
the same files with the same model and runtime, {args.rounds} times each; medians of the
rounds. The ratio the issue asks for is the node's against plain score's; the second row says
how much of the gap the DICOM exchange makes, apart from writing the objects.

| model | runtime (what it ran) | score images/s | node images/s | node / score (range) | CPU per image: score | CPU per image: node + Orthanc | latency p50 / p95 | load (1 min) |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(summary)}

What each runtime ran (score's own line): {'; '.join(chosen)}.

**The node's parts, each alone** ({n} instances, in the node's own processes: Orthanc
C-STOREs them to the network process; the builder process makes their SRs; the network
process C-STOREs the SRs to Orthanc):

{parts_table(results, parts, m.get('cores', os.cpu_count()) or 1, n)}

CPU per image: user + system seconds, all threads: for score, its whole process less that of a
score of one image (start, imports, model load); for the node, the node's process + Orthanc's
(Orthanc sends the images and receives the SRs), from the store request to the last SR.
Latency: per instance, the node's "received" line to its "sent ... .sr.dcm" line (all {n}
sent at once, so it includes the queue).

{chr(10).join(details)}
The per-image stage columns are the node's two pipeline stages (main thread: decode, model;
commit thread: SR build (in the builder process) and write with fsync, results.csv, moves),
which overlap. The node's CPU splits into its three processes: scoring (decode, model,
commit), network (receiving and sending) and builder (SRs).

Machine: {m.get('cpu', '?')}, {m.get('cores', os.cpu_count())} cores, Python {m['python']},
{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Load average (1/5/15 min) before
{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in load_after)}.
"""


if __name__ == "__main__":
    main()

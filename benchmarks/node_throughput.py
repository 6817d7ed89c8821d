"""DICOM node throughput: instances received by ``pneumo-edge listen`` -> SR stored in Orthanc,
against plain ``pneumo-edge score`` on the same files, and receive-to-result latency per
instance (p50/p95).

The same N CR DICOMs (bundled sample X-rays, 12 bits) are scored twice with the same model and
runtime: (1) ``pneumo-edge score FOLDER -o CSV``, its own images/s figure (model load and start
excluded); (2) a node with ``--send-to`` a local Orthanc: the files are uploaded to Orthanc
first, then Orthanc is asked to C-STORE them all to the node (REST, one association); the
clock runs from that request to the node's log line for the last SR Orthanc acknowledged
(model load excluded here too). Latency: per instance, the node's "received" line to its
"sent ... .sr.dcm" line (both stamped by the node, to the millisecond).

    .venv/bin/python benchmarks/node_throughput.py [--model DIR] [--count 64] [--batch 16]

Needs Orthanc (Debian ``orthanc``). Without --model, a random-weight ResNet18 at 224 px is built
(speed only). Writes benchmarks/NODE.md with the machine and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import re
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


def plain_score(model: Path, folder: Path, runtime: str, batch: int) -> float:
    proc = subprocess.run([sys.executable, "-m", "pneumo_edge", "score", str(folder), "--model",
                           str(model), "--runtime", runtime, "--batch", str(batch), "-o",
                           str(folder.parent / "score.csv")], cwd=REPO, capture_output=True,
                          text=True, check=True)
    m = re.search(r"images in [\d.]+ s: ([\d.]+) images/s", proc.stderr)
    if not m:
        raise SystemExit(f"no images/s in score's output:\n{proc.stderr[-1000:]}")
    return float(m.group(1))


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
        t0 = time.time()
        pacs.send_to_node(ids)
        _wait(lambda: sum(" sent " in ln and ".sr.dcm" in ln for ln in lines) >= len(files), node)
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
    busy = sum(float(m.group(1)) for ln in lines
               if (m := re.search(r"scored \d+ instances in ([\d.]+) s", ln)))
    first, last = min(received.values()), max(received.values())
    span = max(sent.values()) - t0
    return len(files) / span, latencies, {"span": span, "worker": busy,
                                          "receiving": last - first, "to_first": first - t0}


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
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-wait", type=float, default=0.5)
    ap.add_argument("--runtime", default="onnx")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("NODE.md"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or _random_model(tmp / "model")
        files = write_inputs(tmp / "in", args.count)
        score_ips = plain_score(model, tmp / "in", args.runtime, args.batch)
        node_ips, lat, parts = node_run(model, files, tmp, args.runtime, args.batch, args.max_wait)
    load_after = os.getloadavg()
    p50, p95 = np.percentile(lat, [50, 95]) if lat else (float("nan"), float("nan"))
    m = machine()
    text = f"""# DICOM node throughput (benchmarks/node_throughput.py)

{args.count} CR DICOMs from the bundled samples, runtime {args.runtime}, batch {args.batch},
--max-wait {args.max_wait} s, model {'random-weight ResNet18 224 px' if not args.model else args.model}.
The node figure runs from Orthanc's store request to the last SR Orthanc acknowledged
(receive, fsync, decode, score, SR build, C-STORE back to Orthanc, all on this machine,
Orthanc included).

| | images/s |
|---|---|
| `pneumo-edge score` (plain, CSV only) | {score_ips:.1f} |
| `pneumo-edge listen` (received -> SR stored in Orthanc) | {node_ips:.1f} ({node_ips / score_ips:.0%} of score) |

Receive-to-result latency per instance: p50 {p50:.2f} s, p95 {p95:.2f} s ({len(lat)} instances).

Node time line: {parts['span']:.1f} s from the store request to the last SR acknowledged;
the first instance arrived after {parts['to_first']:.1f} s, the last {parts['receiving']:.1f} s
later (Orthanc sending); the scoring worker was busy {parts['worker']:.1f} s (decode, model,
SR/SC building, journal; batches overlap receiving).

Machine: {m.get('cpu', '?')}, {m.get('cores', os.cpu_count())} cores, Python {m['python']},
{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Load average (1/5/15 min) before
{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in load_after)}:
the machine was shared with other work while this ran, so both figures are low and noisy;
their ratio is the point.
"""
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

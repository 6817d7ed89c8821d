"""What the benchmark scripts share: a model directory to time, the machine the figures come
from, the check for a quiet machine, synthetic labelled images and test DICOM files.

The scripts import it as a sibling module (``from common import make_model_dir``): run them as
files from the repository root, e.g. ``.venv/bin/python benchmarks/run_all.py``, and Python puts
``benchmarks/`` first on ``sys.path`` by itself. Nothing here imports from ``tests/``, and no
script edits ``sys.path``. Heavy packages (torch, pydicom, gdcm) are imported where used.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLES = REPO / "samples" / "chest_xray"
#: command lines that disturb a measurement (another training run or benchmark)
#: training as the console script and as ``python -m pneumo_edge train`` (what ablation.py runs)
BUSY_PATTERNS = ("pneumo-edge train", "pneumo_edge train", "score_vs_baseline")
CLASSES = ("NORMAL", "PNEUMONIA")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- model directory

def make_model_dir(out, arch: str = "resnet50", size: int = 224, *, export: bool = True,
                   seed: int = 0) -> Path:
    """A model directory with random weights (for speed only) and, with ``export``, its
    model.onnx and model.fp16.onnx from the export code (no parity, no INT8 evidence)."""
    import torch
    from pneumo_edge.train.checkpoint import save_model

    from pneumo_edge.model.card import Card
    from pneumo_edge.model.modeldir import write_card
    from pneumo_edge.model.net import build_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(arch, 2, "none").eval()
    card = Card(classes=list(CLASSES), positive_class="PNEUMONIA", image_size=size,
                threshold=0.5, arch=arch,
                train_config={"note": "random weights, built by benchmarks/common.py for "
                                      "speed measurements only; not a trained model"})
    save_model(out, model, card)
    write_card(out, card)
    if export:
        from pneumo_edge.export.main import run_export

        code = run_export(out, skip_parity=True, int8=False)  # random weights: nothing to calibrate on
        if code != 0:
            raise SystemExit(f"export of the benchmark model failed (exit {code})")
    return out


def model_dir_ok(d: Path, arch: str = "resnet50", size: int = 224) -> bool:
    """``d`` holds a :func:`make_model_dir` model of ``arch`` and ``size`` with both ONNX files
    exported after model.pt (so it can be reused instead of rebuilt)."""
    try:
        card = json.loads((d / "card.json").read_text())
    except (OSError, ValueError):
        return False
    files = [d / f for f in ("model.pt", "model.onnx", "model.fp16.onnx")]
    return (card.get("arch"), card.get("image_size")) == (arch, size) and \
        all(f.exists() for f in files) and \
        min(f.stat().st_mtime for f in files[1:]) >= files[0].stat().st_mtime


# ----------------------------------------------------------------------------- machine

def machine() -> dict:
    """What the figures were measured on: pneumo-edge bench's description (CPU, flags, GPU,
    library versions, load average, date) and the Python version."""
    from pneumo_edge.commands.bench import machine_info

    return {**machine_info(), "python": platform.python_version()}


# ----------------------------------------------------------------------------- quiet machine

def busy(ignore: tuple[str, ...] = ()) -> list[str]:
    """``pid command`` lines of other processes that would disturb the figures (this process,
    its parent, stopped processes (``kill -STOP``: they use no CPU) and command lines containing
    an ``ignore`` text excepted)."""
    mine = {os.getpid(), os.getppid()}
    found = []
    for pat in BUSY_PATTERNS:
        r = subprocess.run(["pgrep", "-af", pat], capture_output=True, text=True, check=False)
        for line in r.stdout.splitlines():
            pid, _, cmd = line.partition(" ")
            if int(pid) not in mine and "pgrep" not in cmd and not _stopped(pid) and \
                    not any(t in cmd for t in ignore) and line not in found:
                found.append(line)
    return found


def _stopped(pid: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["T"]


def commands(lines: list[str]) -> list[str]:
    """Distinct command lines of :func:`busy`'s lines (a training run shows up once per
    worker process)."""
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


def wait_quiet(minutes: float, poll_s: float = 30.0, max_busy: float = 0.25,
               ignore: tuple[str, ...] = ()) -> list[str]:
    """Wait up to ``minutes`` for no :func:`busy` process and at most ``max_busy`` of the CPU
    in use; returns what was still busy at the end ([] when the machine became quiet)."""
    deadline = time.time() + minutes * 60
    while True:
        b = busy(ignore)
        share = cpu_busy()
        if share > max_busy:
            b.append(f"0 (CPU {share:.0%} busy with other work)")
        if not b or time.time() >= deadline:
            return b
        log(f"waiting for a quiet machine ({len(b)} busy process(es), e.g. {b[0][:100]}); "
            f"{(deadline - time.time()) / 60:.0f} min left")
        time.sleep(poll_s)


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


# ----------------------------------------------------------------------------- test data

def write_labelled(root: Path, per_class: int = 16, seed: int = 0, size: int = 96) -> Path:
    """``root/{NORMAL,PNEUMONIA}/*.{png,jpeg}``: grey images whose class is plain to see
    (PNEUMONIA a bright blob, NORMAL dark noise), so a tiny model separates them cleanly."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.normal(40, 12, (size, size))
            if label == 1:
                cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
                r = rng.uniform(size / 8, size / 4)
                img += 170 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            ext = "png" if i % 2 == 0 else "jpeg"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(
                root / name / f"{name}_{i:03d}.{ext}")
    return root


def write_dicom(path: Path, v: np.ndarray, syntax=None) -> Path:
    """A CR chest DICOM of the 12-bit pixels ``v`` (uint16 [rows, cols]) with fresh UIDs and no
    patient data: uncompressed (``syntax`` None), compressed by pydicom to ``syntax`` (RLE,
    JPEG-LS, JPEG 2000 at 10:1), or ``"jpeg-lossless"`` (JPEG Lossless SV1, by GDCM)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.Rows, ds.Columns = v.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = v.tobytes()
    if syntax not in (None, "jpeg-lossless"):
        ds.compress(syntax, v, **({"j2k_cr": [10]} if syntax == JPEG2000 else {}))
    ds.save_as(path, enforce_file_format=True)
    return _gdcm_jpeg_lossless(path) if syntax == "jpeg-lossless" else path


def _gdcm_jpeg_lossless(path: Path) -> Path:
    """Rewrite ``path`` as JPEG Lossless, first-order prediction (pydicom cannot encode it)."""
    import gdcm

    r = gdcm.ImageReader()
    r.SetFileName(str(path))
    r.Read()
    c = gdcm.ImageChangeTransferSyntax()
    c.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    c.SetInput(r.GetImage())
    c.Change()
    w = gdcm.ImageWriter()
    w.SetFileName(str(path))
    w.SetFile(r.GetFile())
    w.SetImage(c.GetOutput())
    w.Write()
    return path

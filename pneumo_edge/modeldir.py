"""The model directory: one folder is one model, and this module is the only code that knows it.

It names every file in a model directory and which runtime reads which, reads and validates
the model card from any of its copies (``card.json``, the ``card`` entry of ``model.pt``, the
ONNX ``metadata_props``, the engine sidecar), checks that the copies agree with the file being
run, and writes every file into the directory with one atomic, fsynced write.

Imports no torch, onnx, onnxruntime or tensorrt at module level.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pneumo_edge.errors import ModelError

# ----------------------------------------------------------------------------- file names

CARD_JSON = "card.json"
MODEL_PT = "model.pt"
LAST_PT = "last.pt"
METRICS_JSON = "metrics.json"
HISTORY_CSV = "history.csv"
CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion.png"
ONNX_FP32 = "model.onnx"
ONNX_FP16 = "model.fp16.onnx"
ONNX_INT8 = "model.int8.onnx"
ENGINE = "model.fp16.engine"
SIDECAR = ENGINE + ".json"
PARITY_JSON = "parity.json"
TIMING_CACHE = "trt_timing.cache"

#: metadata_props key of the card in an exported ONNX file
ONNX_CARD_KEY = "pneumo_edge.card"
#: metadata_props key of the sha256 of the model.pt the ONNX file was exported from
ONNX_WEIGHTS_KEY = "pneumo_edge.weights_sha256"


@dataclass(frozen=True)
class Form:
    """One runnable file of a model directory: the runtime that reads it and its precision."""

    runtime: str
    file: str
    precision: str


#: every runnable form, in the order ``auto`` prefers nothing in particular (see runtimes)
FORMS = (Form("torch", MODEL_PT, "fp32"), Form("onnx", ONNX_FP32, "fp32"),
         Form("onnx-fp16", ONNX_FP16, "fp16"), Form("onnx-int8", ONNX_INT8, "int8"),
         Form("trt", ENGINE, "fp16"))
BY_RUNTIME = {f.runtime: f for f in FORMS}
BY_FILE = {f.file: f for f in FORMS}
RUNTIMES = tuple(f.runtime for f in FORMS)
#: the forms ``pneumo-edge export`` writes and checks for parity against torch, in that order
EXPORTED_FORMS = (BY_RUNTIME["onnx"], BY_RUNTIME["onnx-fp16"], BY_RUNTIME["trt"])

#: what one training run writes (``train --force`` replaces exactly these)
TRAINING_OUTPUTS = (MODEL_PT, LAST_PT, CARD_JSON, METRICS_JSON, HISTORY_CSV, CURVES_PNG,
                    CONFUSION_PNG)
#: what ``pneumo-edge export`` writes from those (stale once the weights change)
EXPORT_OUTPUTS = (ONNX_FP32, ONNX_FP16, ONNX_INT8, ENGINE, SIDECAR, PARITY_JSON, TIMING_CACHE)


def form_for_runtime(runtime: str) -> Form:
    try:
        return BY_RUNTIME[runtime]
    except KeyError:
        raise ModelError(f"unknown runtime {runtime!r}; choose auto or one of "
                         f"{', '.join(RUNTIMES)}") from None


# ----------------------------------------------------------------------------- identity


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a regular file (refuses FIFOs, directories and devices)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_regular(path: str | os.PathLike):
    """A binary file object for ``path`` if it is a regular file; ModelError otherwise.
    Opened with O_NONBLOCK, so a FIFO swapped in after the check cannot block the open."""
    path = Path(path)
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ModelError(f"{path}: not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: str | os.PathLike) -> os.stat_result:
    """os.stat of ``path`` (following links); ModelError unless it is a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelError(f"{path}: not found") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"{path}: not a regular file ({_kind(st.st_mode)})")
    return st


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"

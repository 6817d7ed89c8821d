"""``pneumo-edge export RUN [--trt]``: model.pt -> model.onnx, model.fp16.onnx, model.int8.onnx
(unless --no-int8; calibrated on training images) and with --trt model.fp16.engine, then parity
against PyTorch -> parity.json and a table on stdout.

Exit codes (returned by :func:`run_export`): 0 parity passed (or only INT8 failed and
--allow-int8-fail was given: the file stays, marked failed, and ``auto`` never picks it); 1 parity
failed (the smallest passing tolerance is printed); 2 --trt asked for but impossible here (after
the ONNX files and parity are written). Bad input raises PneumoError (the CLI prints one line and
exits 2).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

from pneumo_edge.export.onnx import export_onnx
from pneumo_edge.export.options import EXPORT_DEFAULTS as DEFAULTS
from pneumo_edge.export.parity import (
    ParityImages,
    default_tolerances,
    parity_images,
    run_parity,
    smallest_passing,
    suggestion,
)
from pneumo_edge.export.quantize import (
    WORK_PREFIX,
    QuantOptions,
    calibration_pixels,
    quantize_int8,
)
from pneumo_edge.export.report import format_table, write_report
from pneumo_edge.export.tensorrt import BuildOptions, build_engine, trt_missing

from pneumo_edge.errors import ModelError, PneumoError
from pneumo_edge.model import modeldir


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (kill, a scheduler's stop) ends the export like Ctrl-C, with KeyboardInterrupt,
    so that every ``finally`` runs and no temporary file stays behind (Python's default for
    SIGTERM is to die on the spot). Main thread only; the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if old is None else old)


#: hidden names only an export writes in a model directory, each with the writer's process id:
#: INT8's working folder, the ONNX exporter's scratch file, the write probe, and quantization's
#: two intermediate files of the versions before the working folder
STALE = re.compile(re.escape(WORK_PREFIX) + r"(?P<a>\d+)\..+"
                   r"|\.model(?:\.fp16)?\.onnx\.export(?P<b>\d+)"
                   r"|\.export-write-test(?P<c>\d+)"
                   r"|\.model\.int8\.onnx\.(?:pre|q)(?P<d>\d+)\.onnx")


def remove_stale(run: Path, log=None) -> list[str]:
    """Remove what an export killed before its clean-up (SIGKILL, power loss) left in ``run``:
    names matching :data:`STALE` whose process is gone. Nothing else is touched, nor the
    files of an export still running. Returns the names removed, each said on stderr."""
    log = log or _warn
    removed = []
    try:
        entries = sorted(os.scandir(run), key=lambda e: e.name)
    except OSError:  # a folder that cannot be listed: nothing of ours to find
        return removed
    for entry in entries:
        m = STALE.fullmatch(entry.name)
        if m is None or _alive(int(next(g for g in m.groups() if g))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError as exc:
            log(f"{entry.path}: cannot remove this leftover of an interrupted export "
                f"({exc.strerror or exc})")
            continue
        removed.append(entry.name)
        log(f"removed {entry.path}: temporary files of an interrupted export")
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


@sigterm_interrupts()
def run_export(run_dir, *, trt: bool = False, parity_data=None, build: BuildOptions | None = None,
               opset: int = DEFAULTS.opset, tolerances: dict | None = None,
               skip_parity: bool = False, int8: bool = DEFAULTS.int8,
               quant: QuantOptions | None = None,
               allow_int8_fail: bool = False) -> int:
    """Export the model in ``run_dir`` and check parity; returns the exit code (0, 1 or 2).
    Leftovers of an interrupted export are removed first; SIGTERM ends it like Ctrl-C."""
    run = Path(run_dir)
    check_run_dir(run)
    remove_stale(run)
    model, card, weights_sha256 = load_checkpoint(run)
    build = build or BuildOptions()
    quant = quant or QuantOptions()
    cannot_trt = ""
    if trt:
        build.validate()
        cannot_trt = trt_missing()
    if int8:
        quant.validate()
        _check_calib_apart(quant, parity_data)
    images = None if skip_parity else parity_images(card, parity_data, warn=_warn)
    calib = calibration_pixels(card, quant, warn=_warn) if int8 else None
    for name, half in ((modeldir.ONNX_FP32, False), (modeldir.ONNX_FP16, True)):
        path = export_onnx(model, card, run / name, half=half, opset=opset,
                           weights_sha256=weights_sha256)
        _err(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, opset {opset})")
    if calib is not None:
        path = quantize_int8(run / modeldir.ONNX_FP32, run / modeldir.ONNX_INT8, card, calib[0],
                             weights_sha256=weights_sha256, opts=quant)
        _err(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, static INT8 calibrated on "
             f"{calib[1]['count']} images of the {calib[1]['source']})")
    if trt and not cannot_trt:
        build_engine(run / modeldir.ONNX_FP16, run / modeldir.ENGINE, build, log=_err)
        _err(f"wrote {run / modeldir.ENGINE} and {modeldir.SIDECAR}")
    elif os.path.lexists(run / modeldir.ENGINE):
        _warn_stale_engine(run)
    skip = {"trt": f"--trt impossible here: {cannot_trt}"} if cannot_trt else {}
    if not int8:
        skip["onnx-int8"] = "--no-int8: not built or checked by this export"
    extra = {"onnx-int8": {"calibration": calib[1]}} if calib is not None else {}
    code = 0 if images is None else check_parity(run, card, images, tolerances, skip=skip,
                                                 extra=extra, allow_int8_fail=allow_int8_fail)
    if cannot_trt:
        _err(f"error: --trt: cannot build a TensorRT engine here: {cannot_trt}")
        return code or 2
    return code


def check_parity(run: Path, card, images: ParityImages, tolerances: dict | None = None,
                 skip: dict | None = None, extra: dict | None = None,
                 allow_int8_fail: bool = False) -> int:
    """Run parity on the files in ``run``, write parity.json, print the table; 0 or 1.
    ``skip``: form name -> reason, for forms not to run; ``extra``: fields for a form's entry."""
    tol = default_tolerances()
    tol.update(tolerances or {})
    report = run_parity(run, card, images, tol, skip=skip, extra=extra)
    failed = [k for k, e in report["forms"].items() if e["status"] == "fail"]
    report["int8_failure_allowed"] = bool(allow_int8_fail and "onnx-int8" in failed)
    path = write_report(run, report)
    print(format_table(report), flush=True)
    _err(f"wrote {path}")
    if report["passed"]:
        return 0
    need = smallest_passing(report)
    allowed = failed == ["onnx-int8"] and allow_int8_fail
    _err(f"{'warning' if allowed else 'error'}: parity failed for {', '.join(failed)}"
         + (f"; smallest tolerance that would have passed: {suggestion(need)}" if need else ""))
    if allowed:
        _err(f"--allow-int8-fail: exit 0; {modeldir.ONNX_INT8} stays, marked failed in "
             f"{modeldir.PARITY_JSON}, and auto will not use it")
        return 0
    return 1


def _check_calib_apart(quant: QuantOptions, parity_data) -> None:
    """Calibrating on the images parity checks would grade INT8 on its own calibration set."""
    if quant.calib_data is None or parity_data is None:
        return
    if os.path.realpath(quant.calib_data) == os.path.realpath(parity_data):
        raise PneumoError(f"{quant.calib_data}: --calib-data and --parity-data are the same "
                          "folder; calibrate on training images, check parity on others")


def check_run_dir(run: Path) -> None:
    if not run.exists():
        raise ModelError(f"{run}: no such model directory")
    if not run.is_dir():
        raise ModelError(f"{run}: not a directory (pass the model directory, e.g. runs/r50)")
    probe = run / f".export-write-test{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise PneumoError(f"{run}: cannot write there ({exc.strerror or exc}); "
                          f"copy the model directory somewhere writable") from None


def load_checkpoint(run: Path):
    """(XrayNet in eval mode, Card, sha256 of model.pt) from run/model.pt, checked against
    run/card.json; ModelError for anything unusable."""
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise PneumoError(f"export needs torch, torchvision and onnx ({exc.name} missing): "
                          "pip install 'pneumo-edge[train]'") from None
    from pneumo_edge.model.torchload import load_checked

    model, card, ckpt = load_checked(run / modeldir.MODEL_PT)
    return model, card, ckpt.sha256


def _warn(msg: str) -> None:
    _err(f"warning: {msg}")


def _warn_stale_engine(run: Path) -> None:
    engine = run / modeldir.ENGINE
    try:
        stale = modeldir.stale_source(engine, modeldir.read_sidecar(engine))
    except ModelError as exc:
        stale = str(exc)
    if stale:
        _warn(f"{engine} is out of date ({stale}); rebuild it with: pneumo-edge export "
              f"{run} --trt")

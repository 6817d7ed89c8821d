"""The ``pneumo-edge`` command line: thin click commands over plain functions.

Importing this module imports no torch, onnxruntime or tensorrt; each command imports what it
needs when it runs. User errors, click's usage errors included, print one line ``error: ...``
and exit 2; Ctrl-C exits 130. Every float option uses :class:`Finite` (no nan, no inf).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys

import click

from pneumo_edge import __version__
from pneumo_edge.errors import PneumoError
from pneumo_edge.model import modeldir

RUNTIME_CHOICES = ["auto", *modeldir.RUNTIMES]


class Finite(click.FloatRange):
    """A finite float option value, optionally within ``[min, max]`` (``min_open`` /
    ``max_open`` exclude an end). Rejects nan, inf and out-of-range values with exit 2.

    Use it for every float option: ``type=Finite(0, 1, min_open=True)``. (click's FloatRange
    lets "nan" through, since every comparison with nan is false.)"""

    def __init__(self, min: float | None = None, max: float | None = None,
                 min_open: bool = False, max_open: bool = False):
        super().__init__(min, max, min_open=min_open, max_open=max_open)

    def convert(self, value, param, ctx):
        x = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(x, param, ctx)


class Cli(click.Group):
    """The command group: click's usage errors (unknown option, bad value, missing option or
    argument) become one line ``error: ... (see pneumo-edge CMD --help)`` and exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        # onnxruntime 1.2x/1.3x writes a device id and a telemetry event database under
        # ~/.cache/Microsoft/DeveloperTools unless this is set before it is first imported
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "pneumo-edge"
            _fail(f"{exc.format_message()} (see {where} --help)", exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            _fail("interrupted", 130, prefix="")
        sys.exit(rv if isinstance(rv, int) else 0)


def _fail(message: str, code: int, prefix: str = "error: ") -> None:
    click.echo(prefix + " ".join(message.split()), err=True)
    sys.exit(code)


def friendly(fn):
    """Turn PneumoError into ``error: ...`` and its exit code; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PneumoError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group("pneumo-edge", cls=Cli,
             context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="pneumo-edge")
def main():
    """Train, export and run a chest X-ray pneumonia detector on edge devices."""


class Duration(click.ParamType):
    """A duration: 55m, 1h, 1h30m, 900s, 90 (minutes), or none."""

    name = "duration"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        from pneumo_edge.train.budget import parse_duration  # no torch import

        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@main.command()
@click.option("--data", required=True, type=click.Path(file_okay=False),
              help="ImageFolder root: DATA/train/CLASS/*, optional DATA/val and DATA/test "
                   "(what is missing is split off train, grouped by patient).")
@click.option("--out", required=True, type=click.Path(), help="Model directory to write.")
@click.option("--arch", default="resnet50", type=click.Choice(["resnet50", "resnet18", "resnet34"]))
@click.option("--weights", default="none",
              help="imagenet (from the local torch hub cache), none, or a state-dict PATH.")
@click.option("--image-size", default=224, type=click.IntRange(32, 1024))
@click.option("--time-budget", default="55m", type=Duration(),
              help="Wall time for the whole run (decoding and final evaluation included): the "
                   "first epoch is timed and the schedule is fitted to finish in time. "
                   "none = no budget.")
@click.option("--epochs", default=None, type=click.IntRange(1),
              help="Epochs; with a time budget, the most it may run. Default: what the budget "
                   "allows (10 without a budget).")
@click.option("--batch-size", default=32, type=click.IntRange(2))
@click.option("--lr", default=1e-3, type=Finite(0, min_open=True), help="Peak learning rate.")
@click.option("--optimizer", default="adamw", type=click.Choice(["adamw", "sgd"]))
@click.option("--weight-decay", default=1e-4, type=Finite(0))
@click.option("--clip-grad", default=0.0, type=Finite(0), help="Max grad norm; 0 = off.")
@click.option("--scheduler", default="cosine",
              type=click.Choice(["none", "step", "onecycle", "cosine"]))
@click.option("--warmup-epochs", default=1.0, type=Finite(0),
              help="Linear learning-rate warm-up (cosine).")
@click.option("--class-weights", default="auto", help="auto (inverse frequency), none, or w1,w2.")
@click.option("--augment", default="strong", type=click.Choice(["none", "basic", "strong"]),
              help="basic: rotation, shift, flip, brightness/contrast; strong: also resized "
                   "crops, gamma, blur and noise.")
@click.option("--norm", default="image", type=click.Choice(["image", "imagenet"]),
              help="Input normalisation inside the network: each image by its own mean/std, "
                   "or fixed ImageNet statistics.")
@click.option("--tta", default="none", type=click.Choice(["none", "flip"]),
              help="Average the image and its mirror inside the network (every export too).")
@click.option("--label-smoothing", default=0.1, type=Finite(0, 0.5),
              help="Soft targets: 1-e on the true class.")
@click.option("--ema", default=0.998, type=Finite(0, 1, max_open=True),
              help="Decay of the weights' moving average, which is what gets evaluated and "
                   "saved; 0 = off.")
@click.option("--mixup", default=0.0, type=Finite(0), help="Mixup Beta(a, a); 0 = off.")
@click.option("--val-fraction", default=0.15, type=Finite(0, 1, min_open=True, max_open=True),
              help="Share of train held out for validation when DATA/val is absent.")
@click.option("--test-fraction", default=0.15, type=Finite(0, 1, max_open=True),
              help="Share of train held out as an internal test split when DATA/test is absent "
                   "(never used for selection).")
@click.option("--seed", default=42, type=int)
@click.option("--select", default="val_auroc",
              type=click.Choice(["val_loss", "val_f1", "val_auroc", "shifted_val_loss",
                                 "shifted_val_auroc"]),
              help="How the saved epoch is chosen.")
@click.option("--min-epochs", default=3, type=click.IntRange(1),
              help="Epochs before one can be selected.")
@click.option("--threshold-for", default="youden",
              help="Decision threshold rule: youden (best sensitivity + specificity), f1, "
                   "recall:0.95 or fixed:0.5.")
@click.option("--threshold-on", default="val+shifted", type=click.Choice(["val+shifted", "val"]),
              help="Choose the threshold on validation pooled with shifted validation, or on "
                   "validation alone.")
@click.option("--positive-class", default="", help="Default: PNEUMONIA, else the last class.")
@click.option("--amp/--no-amp", default=None,
              help="Mixed precision. Default: on for CUDA and for CPUs with bf16 instructions "
                   "(AMX, AVX-512 BF16), off otherwise.")
@click.option("--workers", default=2, type=click.IntRange(0), help="DataLoader workers.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--force", is_flag=True,
              help="Replace the model in --out (only the files training and export write "
                   "there; nothing else is deleted).")
@click.option("--cache", default="", type=click.Path(file_okay=False), show_default=False,
              help="Folder of decoded pixels, reused by later runs and shared by every "
                   "torchrun rank (rebuilt when the files, --image-size or the preprocessing "
                   "change). Default: OUT/pixel-cache.")
@click.option("--no-cache", is_flag=True,
              help="Decode every image into memory instead of the pixel cache.")
@friendly
def train(**opts):
    """Train a class-weighted ResNet on an ImageFolder of chest X-rays, within a time budget.

    Every option, the device and the data are checked before --out is touched. Started by
    torchrun (`torchrun --nproc_per_node=N -m pneumo_edge train ...`), it trains with
    DistributedDataParallel (NCCL on GPUs, Gloo on CPU); --batch-size is per process.
    """
    try:
        from pneumo_edge.train.config import TrainConfig, check_config
        from pneumo_edge.train.loop import train as run_train
    except ImportError as exc:
        raise PneumoError(f"training needs torch and torchvision ({exc.name} missing): "
                          "pip install 'pneumo-edge[train]'") from None
    if opts["cache"] and opts["no_cache"]:
        raise click.UsageError("--cache and --no-cache exclude each other")
    cfg = TrainConfig(**opts)
    check_config(cfg)
    run_train(cfg)


@main.command("eval")
@click.option("--model", "model", required=True, type=click.Path(),
              help="Model directory, or one model file in it (runs that file).")
@click.option("--data", required=True, type=click.Path(),
              help="A labelled folder: DATA/CLASS/* with the model's classes.")
@click.option("--runtime", default="auto", type=click.Choice(RUNTIME_CHOICES),
              help="auto picks what score would pick.")
@click.option("--batch", default=32, type=click.IntRange(1))
@click.option("--out", "out", type=click.Path(dir_okay=False),
              help="Metrics JSON to write. Default: MODEL/eval_<folder name>.json")
@click.option("--report", type=click.Path(dir_okay=False),
              help="Also write this self-contained HTML report (curves, calibration, "
                   "confidence intervals, heatmaps of the most confident mistakes).")
@click.option("--resamples", default=2000, type=click.IntRange(100),
              help="Bootstrap resamples (of patients when file names carry patient ids) for "
                   "the 95 % confidence intervals.")
@click.option("--gallery", default=4, type=click.IntRange(0),
              help="Most confident false negatives and false positives listed (each with an "
                   "occlusion heatmap in --report: about 226 model calls per image).")
@friendly
def eval_(model, data, runtime, batch, out, report, resamples, gallery):
    """Metrics and confusion matrix of a model on a labelled folder.

    Exit 2 when no image of the folder could be decoded, 1 (no metrics written) when the
    model gave a NaN or infinite probability for any image."""
    from pathlib import Path

    from pneumo_edge.atomic import write_json_atomic
    from pneumo_edge.commands.evaluate import format_metrics, run_evaluation
    from pneumo_edge.runtimes import open_runtime

    if report and Path(report).is_dir():
        raise PneumoError(f"{report}: is a folder; --report names the HTML file to write")
    rt = open_runtime(model, runtime)
    ev = run_evaluation(rt, data, batch, resamples=resamples, gallery=gallery)
    m = ev.metrics
    click.echo(format_metrics(m, rt.card))
    home = Path(model) if Path(model).is_dir() else Path(model).parent
    out = Path(out) if out else home / f"eval_{Path(data).resolve().name}.json"
    write_json_atomic(out, m)
    click.echo(f"wrote {out}", err=True)
    if report:
        from pneumo_edge.outputs.html_report import write_report

        write_report(ev, rt, report)
        click.echo(f"wrote {report}", err=True)


@main.command()
@click.option("--model", "model", required=True, type=click.Path(), help="Model directory.")
@click.option("--runtime", default="auto",
              help="auto (the runtime scoring would pick), all (every runtime, measured or "
                   "skipped with the reason), or a comma list of torch,onnx,onnx-fp16,trt.")
@click.option("--batch", default="1,8,32", help="Batch sizes, comma separated.")
@click.option("--warmup", default=5, type=click.IntRange(0), help="Untimed calls per row.")
@click.option("--iters", default=30, type=click.IntRange(1), help="Timed calls per row.")
@click.option("--max-time", default=None, type=Finite(0, min_open=True),
              help="Stop a row's timed calls after this many seconds (at least 5 calls).")
@click.option("--data", type=click.Path(file_okay=False),
              help="Also measure decode, compute and end-to-end throughput over this folder.")
@click.option("--limit", default=None, type=click.IntRange(1),
              help="Use only the first N image files of --data.")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="Decode threads for --data. Default: what scoring uses.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
@friendly
def bench(model, runtime, batch, warmup, iters, max_time, data, limit, threads, as_json):
    """Latency (p50/p90/p99 per batch) and images/s per runtime and batch size.

    Each row: WARMUP untimed calls, then ITERS timed calls on a uint8 batch of the model's size;
    images/s = batch / mean latency. Runtimes return host arrays, so GPU work is synchronised.
    """
    from pneumo_edge.commands.bench import format_table, parse_batches, parse_runtimes, run_bench

    try:
        names = parse_runtimes(runtime)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--runtime") from None
    try:
        batches = parse_batches(batch)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--batch") from None
    result = run_bench(model, names, batches, warmup, iters, data=data, threads=threads,
                       max_time=max_time, data_limit=limit)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model", required=True, type=click.Path(), help="Model directory.")
@click.option("--runtime", default="auto", type=click.Choice(RUNTIME_CHOICES),
              help="auto picks TensorRT, onnxruntime CUDA, torch CUDA, onnxruntime CPU, torch CPU.")
@click.option("--batch", default=32, type=click.IntRange(1), help="Images per model call.")
@click.option("--threshold", default=None, type=Finite(0, 1),
              help="Decision threshold on the positive class. Default: the model card's.")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Write the CSV here (atomically, via FILE.partial) instead of stdout.")
@click.option("--resume", is_flag=True, help="Continue an interrupted -o run from FILE.partial.")
@click.option("--workers", default=None, type=click.IntRange(1),
              help="Decode threads. Default: the number of cores, at least 2.")
@click.option("-q", "--quiet", is_flag=True, help="No runtime line, progress bar or summary.")
@click.option("--ray", "ray", default=None, is_flag=False, flag_value="local",
              metavar="[ADDRESS]",
              help="Score on a Ray cluster with Ray Data (same CSV, -o and --resume): ADDRESS "
                   "is HOST:PORT, ray://HOST:PORT or auto; without one, a local Ray instance. "
                   "Write --ray=ADDRESS or put --ray after the paths. Needs "
                   "pip install 'pneumo-edge[ray]'.")
@click.option("--follow-links", is_flag=True,
              help="Follow symbolic links to folders outside the scanned folders.")
@click.option("--explain", type=click.Path(file_okay=False),
              help="Also write occlusion heatmaps (through the scoring runtime) and "
                   "explain.csv into this folder.")
@click.option("--explain-which", default="positives", type=click.Choice(["positives", "all"]),
              help="Which scored images get a heatmap with --explain.")
@click.option("--force-explain", "explain_force", is_flag=True,
              help="Replace heatmaps and explain.csv already in the --explain folder.")
@click.option("--dicom-columns", default="", metavar="TAG,...",
              help="Also write these non-identifying DICOM tags after the UIDs: Modality, "
                   "ViewPosition, BodyPartExamined, PhotometricInterpretation, "
                   "TransferSyntaxUID, SOPClassUID, BitsStored, Rows, Columns, Manufacturer, "
                   "ManufacturerModelName.")
@click.option("--dicom-out", type=click.Path(file_okay=False), metavar="DIR",
              help="Per scored DICOM input, write a DICOM Structured Report (and with --explain "
                   "a heatmap Secondary Capture) in its study to "
                   "DIR/<SOPInstanceUID>/<model sha256[:12]>.sr.dcm; the CSV's dicom_sr "
                   "column names it. Research use only.")
@friendly
def score(paths, model, runtime, batch, threshold, output, resume, workers, quiet, ray,
          follow_links, explain, explain_which, explain_force, dicom_columns, dicom_out):
    """Score image files and folders: CSV (path,label,p_<class>...,error) on stdout or -o.

    Inputs: .jpg .jpeg .png .bmp .tif .tiff, DICOM as .dcm/.dicom (any case), and any other
    file whose bytes 128-131 are DICM (only its first 132 bytes are read to check). When an
    input is DICOM, study_uid,series_uid,sop_uid columns (and --dicom-columns) come before
    error; no patient name or other PHI is written. A DICOM that is not a CR/DX/DR chest
    radiograph gets an error row.

    Exit 0 when every image file was scored, 1 when some could not be (their rows carry the
    reason), 2 for usage errors and when the CSV cannot be written. With -o FILE, FILE.json
    records the model file and its sha256, runtime, threshold, versions and counts.
    """
    from pneumo_edge.commands.score import run_score

    try:
        summary = run_score(paths, model, runtime=runtime, batch=batch, threshold=threshold,
                            output=output, resume=resume, workers=workers, quiet=quiet, ray=ray,
                            follow_links=follow_links, explain=explain,
                            explain_which=explain_which, explain_force=explain_force,
                            dicom_tags=[t.strip() for t in dicom_columns.split(",") if t.strip()],
                            dicom_out=dicom_out)
    except BrokenPipeError:  # the reader stopped (`| head`): stop quietly, like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    sys.exit(summary.exit_code)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model", required=True, type=click.Path(), help="Model directory.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Folder for the pictures and explain.csv (created if missing; nothing "
                   "else in it is touched).")
@click.option("--method", default="occlusion", type=click.Choice(["occlusion", "gradcam"]),
              help="occlusion: through the deployed runtime (torch-free); gradcam: the torch "
                   "model's last convolutional stage.")
@click.option("--runtime", default="auto", type=click.Choice(RUNTIME_CHOICES),
              help="For occlusion: which file to explain (auto as score).")
@click.option("--batch", default=32, type=click.IntRange(1),
              help="Occluded copies per model call.")
@click.option("--force", is_flag=True, help="Replace explain.csv and pictures of the same name.")
@friendly
def explain(paths, model, out, method, runtime, batch, force):
    """Heatmaps of why the model scored each image: a PNG per image (the X-ray, the heatmap,
    a legend, label, probability and threshold) and OUT/explain.csv.

    Exit 0 when every image file was explained, 1 when some could not be (their rows carry
    the reason), 2 for usage errors."""
    from pneumo_edge.commands.explain import run_explain

    sys.exit(run_explain(paths, model, out, method=method, runtime=runtime, force=force,
                         batch=batch))


@main.command()
@click.argument("run", type=click.Path())
@click.option("--trt", is_flag=True,
              help="Also build model.fp16.engine with TensorRT (needs an NVIDIA GPU).")
@click.option("--parity-data", type=click.Path(file_okay=False),
              help="Labelled folder FOLDER/CLASS/* for parity. Default: the card's val split.")
@click.option("--skip-parity", is_flag=True, help="Export only; no parity check.")
@click.option("--batch-min", default=1, type=click.IntRange(1), help="TensorRT profile min batch.")
@click.option("--batch-opt", default=8, type=click.IntRange(1), help="TensorRT profile opt batch.")
@click.option("--batch-max", default=32, type=click.IntRange(1), help="TensorRT profile max batch.")
@click.option("--workspace", default=2048, type=click.IntRange(1),
              help="TensorRT workspace memory pool limit, MiB.")
@click.option("--timing-cache", type=click.Path(dir_okay=False),
              help="TensorRT timing cache, reused across builds. Default: RUN/trt_timing.cache")
@click.option("--opset", default=18, type=click.IntRange(18, 23),
              help="ONNX opset; 18 parses in onnxruntime and TensorRT 10 and 11.")
@click.option("--tol-fp32", default=1e-4, type=Finite(0), help="fp32 max |delta p|.")
@click.option("--min-agreement-fp32", default=1.0, type=Finite(0, 1),
              help="fp32 share of images with the torch label.")
@click.option("--max-metric-delta-fp32", default=0.0, type=Finite(0),
              help="fp32 max |delta| of accuracy, precision, recall, F1.")
@click.option("--tol-fp16", default=1e-2, type=Finite(0), help="fp16 max |delta p|.")
@click.option("--min-agreement-fp16", default=0.995, type=Finite(0, 1),
              help="fp16 share of images with the torch label.")
@click.option("--max-metric-delta-fp16", default=0.005, type=Finite(0),
              help="fp16 max |delta| of accuracy, precision, sensitivity, specificity, F1 "
                   "(0.005 = 0.5 points).")
@click.option("--tol-int8", default=None, type=Finite(0),
              help="int8 max |delta p| (default: reported, not checked).")
@click.option("--min-agreement-int8", default=0.99, type=Finite(0, 1),
              help="int8 share of images with the torch label.")
@click.option("--max-metric-delta-int8", default=0.01, type=Finite(0),
              help="int8 max |delta| of accuracy, precision, sensitivity, specificity, F1 "
                   "(0.01 = 1 point).")
@click.option("--max-auc-delta-fp32", default=1e-3, type=Finite(0), help="fp32 max |delta ROC AUC|.")
@click.option("--max-auc-delta-fp16", default=5e-3, type=Finite(0), help="fp16 max |delta ROC AUC|.")
@click.option("--max-auc-delta-int8", default=5e-3, type=Finite(0), help="int8 max |delta ROC AUC|.")
@click.option("--int8/--no-int8", default=True, show_default=True,
              help="Also write model.int8.onnx (onnxruntime static INT8, calibrated on training "
                   "images) and check its parity.")
@click.option("--calib-images", default=None, type=click.IntRange(2),
              help="INT8 calibration images, class-balanced, from the card's training split "
                   "(default 128).")
@click.option("--calib-method", default="minmax",
              type=click.Choice(["minmax", "percentile", "entropy"]),
              help="INT8 activation range calibration.")
@click.option("--calib-data", type=click.Path(file_okay=False),
              help="Labelled folder FOLDER/CLASS/* of training images to calibrate INT8 on, when "
                   "the card's training images are not on this machine.")
@click.option("--allow-int8-fail", is_flag=True,
              help="Exit 0 when only INT8 fails parity (it stays marked failed; auto skips it).")
@friendly
def export(run, trt, parity_data, skip_parity, batch_min, batch_opt, batch_max, workspace,
           timing_cache, opset, int8, calib_images, calib_method, calib_data, allow_int8_fail,
           **tol):
    """Export RUN/model.pt to ONNX fp32, fp16 and INT8 (and a TensorRT engine with --trt), then
    check parity with PyTorch: parity.json and a table. Exit 1 when parity fails (the smallest
    passing tolerance is printed), 2 for bad input or when --trt is impossible here."""
    try:
        from pneumo_edge.export.main import run_export
        from pneumo_edge.export.parity import Tolerance
        from pneumo_edge.export.quantize import QuantOptions
        from pneumo_edge.export.tensorrt import BuildOptions
    except ImportError as exc:
        raise PneumoError(f"export needs torch and onnx ({exc.name} missing): "
                          "pip install 'pneumo-edge[train]'") from None
    tolerances = {p: Tolerance(tol.get(f"tol_{p}"), tol[f"min_agreement_{p}"],
                               tol[f"max_metric_delta_{p}"], tol[f"max_auc_delta_{p}"])
                  for p in ("fp32", "fp16", "int8")}
    quant = QuantOptions(method=calib_method, calib_data=calib_data,
                         **({"calib_images": calib_images} if calib_images else {}))
    build = BuildOptions(batch_min, batch_opt, batch_max, workspace, timing_cache)
    sys.exit(run_export(run, trt=trt, parity_data=parity_data, build=build, opset=opset,
                        tolerances=tolerances, skip_parity=skip_parity, int8=int8, quant=quant,
                        allow_int8_fail=allow_int8_fail))

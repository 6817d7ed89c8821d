"""The ``pneumo-edge`` command line: thin click commands over plain functions.

Importing this module imports no torch, onnxruntime or tensorrt; each command imports what it
needs when it runs. User errors print one line and exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from pneumo_edge import __version__
from pneumo_edge.errors import PneumoError

RUNTIME_CHOICES = ["auto", "torch", "onnx", "onnx-fp16", "trt"]


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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="pneumo-edge")
def main():
    """Train, export and run a chest X-ray pneumonia detector on edge devices."""


@main.command()
@click.option("--data", required=True, type=click.Path(file_okay=False),
              help="ImageFolder root: DATA/train/CLASS/*, optional DATA/val and DATA/test.")
@click.option("--out", required=True, type=click.Path(), help="Model directory to write.")
@click.option("--arch", default="resnet50", type=click.Choice(["resnet50", "resnet18", "resnet34"]))
@click.option("--weights", default="none",
              help="imagenet (from the local torch hub cache), none, or a state-dict PATH.")
@click.option("--image-size", default=224, type=click.IntRange(32, 1024))
@click.option("--epochs", default=10, type=click.IntRange(1))
@click.option("--batch-size", default=32, type=click.IntRange(1))
@click.option("--lr", default=1e-3, type=click.FloatRange(0, min_open=True))
@click.option("--optimizer", default="adamw", type=click.Choice(["adamw", "sgd"]))
@click.option("--weight-decay", default=1e-4, type=click.FloatRange(0))
@click.option("--clip-grad", default=0.0, type=click.FloatRange(0), help="Max grad norm; 0 = off.")
@click.option("--scheduler", default="cosine",
              type=click.Choice(["none", "step", "onecycle", "cosine"]))
@click.option("--class-weights", default="auto", help="auto (inverse frequency), none, or w1,w2.")
@click.option("--augment/--no-augment", default=True)
@click.option("--val-fraction", default=0.3, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of train held out for validation when DATA/val is absent.")
@click.option("--seed", default=42, type=int)
@click.option("--select", default="val_loss", type=click.Choice(["val_loss", "val_f1", "val_auroc"]),
              help="How the saved epoch is chosen.")
@click.option("--min-epochs", default=3, type=click.IntRange(1),
              help="Epochs before one can be selected.")
@click.option("--threshold-for", default="f1",
              help="Decision threshold chosen on validation: f1, recall:0.95 or fixed:0.5.")
@click.option("--positive-class", default="", help="Default: PNEUMONIA, else the last class.")
@click.option("--amp/--no-amp", default=None,
              help="Mixed precision (bf16 on CPU, fp16/bf16 on CUDA). Default: on for CUDA only.")
@click.option("--workers", default=2, type=click.IntRange(0), help="DataLoader workers.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--force", is_flag=True, help="Overwrite a model already in --out.")
@friendly
def train(**opts):
    """Train a class-weighted ResNet on an ImageFolder of chest X-rays."""
    from pneumo_edge.metrics import validate_threshold_rule

    try:
        validate_threshold_rule(opts["threshold_for"])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--threshold-for") from None
    try:
        from pneumo_edge.train.loop import TrainConfig, train as run_train
    except ImportError as exc:
        raise PneumoError(f"training needs torch and torchvision ({exc.name} missing): "
                          "pip install 'pneumo-edge[train]'") from None
    from pneumo_edge.train.data import class_weights

    if opts["class_weights"] not in ("auto", "none"):
        try:
            class_weights(None, len(opts["class_weights"].split(",")), opts["class_weights"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--class-weights") from None
    run_train(TrainConfig(**opts))


@main.command("eval")
@click.option("--model", "model", required=True, type=click.Path(), help="Model directory.")
@click.option("--data", required=True, type=click.Path(),
              help="A labelled folder: DATA/CLASS/* with the model's classes.")
@click.option("--runtime", default="torch", type=click.Choice(RUNTIME_CHOICES))
@click.option("--batch", default=32, type=click.IntRange(1))
@click.option("--out", "out", type=click.Path(dir_okay=False),
              help="Metrics JSON to write. Default: MODEL/eval_<folder name>.json")
@friendly
def eval_(model, data, runtime, batch, out):
    """Metrics and confusion matrix of a model on a labelled folder."""
    from pathlib import Path

    from pneumo_edge.card import json_safe, write_atomic
    from pneumo_edge.evaluate import evaluate_folder, format_metrics
    from pneumo_edge.runtimes import open_runtime

    rt = open_runtime(model, runtime)
    m = evaluate_folder(rt, data, batch)
    click.echo(format_metrics(m, rt.card))
    out = Path(out) if out else Path(model) / f"eval_{Path(data).resolve().name}.json"
    write_atomic(out, json.dumps(json_safe(m), indent=2) + "\n")
    click.echo(f"wrote {out}", err=True)


@main.command()
@click.option("--model", "model", required=True, type=click.Path(), help="Model directory.")
@click.option("--runtime", default="auto",
              help="auto (the runtime scoring would pick), all (every runtime, measured or "
                   "skipped with the reason), or a comma list of torch,onnx,onnx-fp16,trt.")
@click.option("--batch", default="1,8,32", help="Batch sizes, comma separated.")
@click.option("--warmup", default=5, type=click.IntRange(0), help="Untimed calls per row.")
@click.option("--iters", default=30, type=click.IntRange(1), help="Timed calls per row.")
@click.option("--max-time", default=None, type=click.FloatRange(0, min_open=True),
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
    from pneumo_edge.bench import format_table, parse_batches, parse_runtimes, run_bench

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
@click.option("--threshold", default=None, type=click.FloatRange(0, 1),
              help="Decision threshold on the positive class. Default: the model card's.")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Write the CSV here (atomically, via FILE.partial) instead of stdout.")
@click.option("--resume", is_flag=True, help="Continue an interrupted -o run from FILE.partial.")
@click.option("--workers", default=None, type=click.IntRange(1),
              help="Decode threads. Default: the number of cores, at least 2.")
@click.option("-q", "--quiet", is_flag=True, help="No runtime line, progress bar or summary.")
@friendly
def score(paths, model, runtime, batch, threshold, output, resume, workers, quiet):
    """Score image files and folders: CSV (path,label,p_<class>...,error) on stdout or -o.

    Exit 0 when every image file was scored, 1 when some could not be (their rows carry the
    reason), 2 for usage errors.
    """
    from pneumo_edge.score import run_score

    try:
        summary = run_score(paths, model, runtime=runtime, batch=batch, threshold=threshold,
                            output=output, resume=resume, workers=workers, quiet=quiet)
    except BrokenPipeError:  # the reader stopped (`| head`): stop quietly, like other tools
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    sys.exit(summary.exit_code)


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
@click.option("--tol-fp32", default=1e-4, type=click.FloatRange(0), help="fp32 max |delta p|.")
@click.option("--min-agreement-fp32", default=1.0, type=click.FloatRange(0, 1),
              help="fp32 share of images with the torch label.")
@click.option("--max-metric-delta-fp32", default=0.0, type=click.FloatRange(0),
              help="fp32 max |delta| of accuracy, precision, recall, F1.")
@click.option("--tol-fp16", default=1e-2, type=click.FloatRange(0), help="fp16 max |delta p|.")
@click.option("--min-agreement-fp16", default=0.995, type=click.FloatRange(0, 1),
              help="fp16 share of images with the torch label.")
@click.option("--max-metric-delta-fp16", default=0.005, type=click.FloatRange(0),
              help="fp16 max |delta| of accuracy, precision, recall, F1 (0.005 = 0.5 points).")
@friendly
def export(run, trt, parity_data, skip_parity, batch_min, batch_opt, batch_max, workspace,
           timing_cache, opset, **tol):
    """Export RUN/model.pt to ONNX fp32 + fp16 (and a TensorRT engine with --trt), then check
    parity with PyTorch: parity.json and a table. Exit 1 when parity fails (the smallest
    passing tolerance is printed), 2 for bad input or when --trt is impossible here."""
    try:
        from pneumo_edge.export.main import run_export
        from pneumo_edge.export.parity import Tolerance
        from pneumo_edge.export.tensorrt import BuildOptions
    except ImportError as exc:
        raise PneumoError(f"export needs torch and onnx ({exc.name} missing): "
                          "pip install 'pneumo-edge[train]'") from None
    tolerances = {p: Tolerance(tol[f"tol_{p}"], tol[f"min_agreement_{p}"],
                               tol[f"max_metric_delta_{p}"]) for p in ("fp32", "fp16")}
    build = BuildOptions(batch_min, batch_opt, batch_max, workspace, timing_cache)
    sys.exit(run_export(run, trt=trt, parity_data=parity_data, build=build, opset=opset,
                        tolerances=tolerances, skip_parity=skip_parity))

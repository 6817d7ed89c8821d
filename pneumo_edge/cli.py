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

    from pneumo_edge.card import write_atomic
    from pneumo_edge.evaluate import evaluate_folder, format_metrics
    from pneumo_edge.runtimes import open_runtime

    rt = open_runtime(model, runtime)
    m = evaluate_folder(rt, data, batch)
    click.echo(format_metrics(m, rt.card))
    out = Path(out) if out else Path(model) / f"eval_{Path(data).resolve().name}.json"
    write_atomic(out, json.dumps(m, indent=2) + "\n")
    click.echo(f"wrote {out}", err=True)


def _not_yet(name):
    @main.command(name, context_settings={"ignore_unknown_options": True,
                                          "allow_extra_args": True})
    def cmd():
        click.echo(f"error: pneumo-edge {name} is not yet available", err=True)
        sys.exit(2)

    cmd.__doc__ = f"({name}: not yet available)"
    return cmd


for _name in ("export", "score", "bench"):
    _not_yet(_name)

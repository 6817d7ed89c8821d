"""The ``pneumo-edge`` command line: thin click commands over plain functions.

Importing this module imports no torch, onnxruntime or tensorrt; each command imports what it
needs when it runs. User errors, click's usage errors included, print one line ``error: ...``
and exit 2; Ctrl-C exits 130. Every float option uses :class:`Finite` (no nan, no inf).

Where an option's default and help live (issue 18 item 5: every default stated once):
- An option with a library default is declared ``@from_field(OWNER, "name", type=...)``: its
  default and help text are those of field ``name`` of the dataclass OWNER (a
  ``dataclasses.field`` with ``metadata={"help": ...}``), read when the command first needs its
  options (to run or to show --help). So ``import pneumo_edge.cli`` imports none of them, and
  ``score`` never imports train/ or export/. The owners: TrainConfig (train/config.py),
  ExportOptions (export/options.py), Tolerance (export/parity.py, per precision: see
  :func:`tolerance_option`), QuantOptions (export/quantize.py), BuildOptions
  (export/tensorrt.py), and EvalOptions, BenchOptions, ScoreOptions, ExplainOptions
  (pneumo_edge/commands/options.py).
- What stays here is click's part: the type and range, the flag shape, metavar, ``as_text=``
  (how a default is written on the command line, e.g. 55m for 3300 seconds).
- A choice option names the library's table that validates its value (``choices=
  "module:NAME"``, a tuple or a dict's keys, read with the field), so adding a choice is one
  edit in the library; only ``--runtime``'s list (modeldir.RUNTIMES and auto) is built here.
- An option without a library default (a required path, an off-by-default flag, a CLI-only
  switch) is a plain ``@click.option`` with its help here.
To add an option with a default: give the dataclass field ``metadata={"help": ...}``, pass the
value through in the command, and declare ``@from_field(OWNER, "name", type=...)`` here.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import sys

import click

from pneumo_edge import __version__
from pneumo_edge.errors import PneumoError
from pneumo_edge.model import modeldir

RUNTIME_CHOICES = ["auto", *modeldir.RUNTIMES]
TRAIN = "pneumo_edge.train.config:TrainConfig"
EXPORT = "pneumo_edge.export.options:ExportOptions"
BUILD = "pneumo_edge.export.tensorrt:BuildOptions"
QUANT = "pneumo_edge.export.quantize:QuantOptions"
EVAL = "pneumo_edge.commands.options:EvalOptions"
BENCH = "pneumo_edge.commands.options:BenchOptions"
SCORE = "pneumo_edge.commands.options:ScoreOptions"
EXPLAIN = "pneumo_edge.commands.options:ExplainOptions"
LISTEN = "pneumo_edge.dicomnode.node:NodeConfig"
CALIBRATE = "pneumo_edge.train.recalibrate:CalibrateOptions"


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


class LazyOption:
    """Holds a command's place for a click.Option that :class:`Command` builds on first use."""

    def __init__(self, build):
        self.build = build


def lazy_option(build):
    """Decorator: the option ``build()`` returns, built when the command first needs it."""

    def decorate(f):
        if not hasattr(f, "__click_params__"):  # where click's own @option collects them
            f.__click_params__ = []
        f.__click_params__.append(LazyOption(build))
        return f

    return decorate


def library(ref: str):
    """The object ``"module:name"`` names (the module imported now)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def fields_of(owner) -> dict:
    """The fields of a dataclass, or of ``"module:Class"`` (imported now), by name."""
    return {f.name: f for f in dataclasses.fields(library(owner) if isinstance(owner, str)
                                                  else owner)}


def from_field(owner: str, name: str, *decls: str, as_text=None, choices: str | None = None,
               **kw):
    """The option for field ``name`` of the dataclass ``owner`` ("module:Class"): its default
    (required when the field has none) and help are the field's; ``decls`` default to
    ``--name-with-dashes``, the value arrives as ``name``; ``as_text`` writes the default as a
    user would (for --help; the option's type parses it back); ``choices`` ("module:NAME")
    is the library's table of allowed values (a tuple, or a dict's keys); ``kw`` are click's
    (type, is_flag...)."""

    def build():
        f = fields_of(owner)[name]
        attrs = {"help": f.metadata.get("help")}
        if f.default is not dataclasses.MISSING:
            attrs["default"] = f.default if as_text is None else as_text(f.default)
        elif f.default_factory is dataclasses.MISSING:
            attrs["required"] = True
        if choices is not None:
            attrs["type"] = click.Choice(list(library(choices)))
        option = click.Option([*(decls or [f"--{name.replace('_', '-')}"]), name], **attrs, **kw)
        option.library_default = f"{owner}.{name}"  # where it came from (tests/test_cli.py)
        option.library_choices = choices
        return option

    return lazy_option(build)


def tolerance_option(precision: str, name: str, decl: str, **kw):
    """Parity option ``decl`` for field ``name`` of export.parity.Tolerance: the default is
    ``default_tolerances()[precision]``'s, the help the field's after the precision's name."""

    def build():
        from pneumo_edge.export.parity import Tolerance, default_tolerances

        default = getattr(default_tolerances()[precision], name)
        text = f"{precision} {fields_of(Tolerance)[name].metadata['help']}"
        if default is None:
            text += " Default: reported, not checked."
        option = click.Option([decl, f"{name}_{precision}"], default=default, help=text, **kw)
        option.library_default = f"default_tolerances()[{precision!r}].{name}"
        return option

    return lazy_option(build)


def take(cls, opts: dict, suffix: str = ""):
    """The dataclass ``cls`` made of the options named like its fields (plus ``suffix``), which
    leave ``opts``; fields without an option keep their default."""
    return cls(**{f: opts.pop(f + suffix) for f in fields_of(cls) if f + suffix in opts})


class Command(click.Command):
    """A command whose :class:`LazyOption` places become click options on first use (parsing
    or --help): only then are the modules that own their defaults imported."""

    def get_params(self, ctx):
        if any(isinstance(p, LazyOption) for p in self.params):
            try:
                self.params = [p.build() if isinstance(p, LazyOption) else p for p in self.params]
            except ImportError as exc:
                err = click.ClickException(f"{self.name} needs {exc.name}, which is not "
                                           "installed here")
                err.exit_code = 2
                raise err from None
        return super().get_params(ctx)


class Cli(click.Group):
    """The command group: click's usage errors (unknown option, bad value, missing option or
    argument) become one line ``error: ... (see pneumo-edge CMD --help)`` and exit 2."""

    command_class = Command

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

    @staticmethod
    def text(seconds: float | None) -> str:
        """How a duration in seconds reads: 3300 -> 55m, 5400 -> 1h30m, None -> none."""
        if seconds is None:
            return "none"
        m, sec = divmod(round(seconds), 60)
        h, m = divmod(m, 60)
        return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (sec, "s")) if v) or "0s"


@main.command()
@from_field(TRAIN, "data", type=click.Path(file_okay=False))
@from_field(TRAIN, "out", type=click.Path())
@from_field(TRAIN, "arch", choices="pneumo_edge.model.netopts:ARCHS")
@from_field(TRAIN, "weights")
@from_field(TRAIN, "image_size", type=click.IntRange(32, 1024))
@from_field(TRAIN, "time_budget", type=Duration(), as_text=Duration.text)
@from_field(TRAIN, "epochs", type=click.IntRange(1))
@from_field(TRAIN, "batch_size", type=click.IntRange(2))
@from_field(TRAIN, "lr", type=Finite(0, min_open=True))
@from_field(TRAIN, "optimizer", choices="pneumo_edge.train.config:OPTIMIZERS")
@from_field(TRAIN, "weight_decay", type=Finite(0))
@from_field(TRAIN, "clip_grad", type=Finite(0))
@from_field(TRAIN, "scheduler", choices="pneumo_edge.train.budget:SCHEDULES")
@from_field(TRAIN, "warmup_epochs", type=Finite(0))
@from_field(TRAIN, "class_weights")
@from_field(TRAIN, "augment", choices="pneumo_edge.train.config:AUGMENTS")
@from_field(TRAIN, "norm", choices="pneumo_edge.model.netopts:NORMS")
@from_field(TRAIN, "tta", choices="pneumo_edge.model.netopts:TTAS")
@from_field(TRAIN, "label_smoothing", type=Finite(0, 0.5))
@from_field(TRAIN, "ema", type=Finite(0, 1, max_open=True))
@from_field(TRAIN, "mixup", type=Finite(0))
@from_field(TRAIN, "crop_scale", metavar="MIN,MAX")
@from_field(TRAIN, "jitter", type=Finite(0, 0.9))
@from_field(TRAIN, "zoom_out", type=Finite(0, 1))
@from_field(TRAIN, "zoom_out_min", type=Finite(0.2, 1))
@from_field(TRAIN, "train_cache_size", type=click.IntRange(32, 1024))
@from_field(TRAIN, "average", choices="pneumo_edge.train.config:AVERAGES")
@from_field(TRAIN, "swa_epochs", type=click.IntRange(1))
@from_field(TRAIN, "class_weight_power", type=Finite(0, 1))
@from_field(TRAIN, "val_fraction", type=Finite(0, 1, min_open=True, max_open=True))
@from_field(TRAIN, "test_fraction", type=Finite(0, 1, max_open=True))
@from_field(TRAIN, "seed", type=int)
@from_field(TRAIN, "proxy", choices="pneumo_edge.train.config:PROXIES")
@from_field(TRAIN, "proxy_clusters", type=click.IntRange(2, 20))
@from_field(TRAIN, "proxy_min_images", type=click.IntRange(1))
@from_field(TRAIN, "select", choices="pneumo_edge.train.config:SELECT")
@from_field(TRAIN, "min_epochs", type=click.IntRange(1))
@from_field(TRAIN, "threshold_for")
@from_field(TRAIN, "threshold_on", choices="pneumo_edge.train.config:THRESHOLD_ON")
@from_field(TRAIN, "positive_class")
@from_field(TRAIN, "amp", "--amp/--no-amp")
@from_field(TRAIN, "workers", type=click.IntRange(0))
@from_field(TRAIN, "device")
@from_field(TRAIN, "resume", is_flag=True)
@from_field(TRAIN, "force", is_flag=True)
@from_field(TRAIN, "cache", type=click.Path(file_okay=False), show_default=False)
@from_field(TRAIN, "no_cache", is_flag=True)
@from_field(TRAIN, "calibrate", "--calibrate/--no-calibrate")
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
@from_field(EVAL, "runtime", type=click.Choice(RUNTIME_CHOICES))
@from_field(EVAL, "batch", type=click.IntRange(1))
@click.option("--out", "out", type=click.Path(dir_okay=False),
              help="Metrics JSON to write. Default: MODEL/eval_<folder name>.json")
@click.option("--report", type=click.Path(dir_okay=False),
              help="Also write this self-contained HTML report (curves, calibration, "
                   "confidence intervals, heatmaps of the most confident mistakes).")
@from_field(EVAL, "resamples", type=click.IntRange(100))
@from_field(EVAL, "gallery", type=click.IntRange(0))
@from_field(EVAL, "prevalence", type=Finite(0, 1, min_open=True, max_open=True))
@friendly
def eval_(model, data, runtime, batch, out, report, resamples, gallery, prevalence):
    """Metrics and confusion matrix of a model on a labelled folder.

    Exit 2 when no image of the folder could be decoded, 1 (no metrics written) when the
    model gave a NaN or infinite probability for any image."""
    from pathlib import Path

    from pneumo_edge.atomic import write_json_atomic
    from pneumo_edge.commands.evaluate import format_metrics, run_evaluation
    from pneumo_edge.model.qc import uncalibrated_notice
    from pneumo_edge.runtimes import open_runtime

    if report and Path(report).is_dir():
        raise PneumoError(f"{report}: is a folder; --report names the HTML file to write")
    rt = open_runtime(model, runtime)
    note = uncalibrated_notice(rt.card, model)
    if note:
        click.echo(note, err=True)
    ev = run_evaluation(rt, data, batch, resamples=resamples, gallery=gallery,
                        prevalence=prevalence)
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
@from_field(BENCH, "runtime")
@from_field(BENCH, "batch")
@from_field(BENCH, "warmup", type=click.IntRange(0))
@from_field(BENCH, "iters", type=click.IntRange(1))
@from_field(BENCH, "max_time", type=Finite(0, min_open=True))
@click.option("--data", type=click.Path(file_okay=False),
              help="Also measure decode, compute and end-to-end throughput over this folder.")
@from_field(BENCH, "limit", type=click.IntRange(1))
@from_field(BENCH, "threads", type=click.IntRange(1))
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
@from_field(SCORE, "runtime", type=click.Choice(RUNTIME_CHOICES))
@from_field(SCORE, "batch", type=click.IntRange(1))
@from_field(SCORE, "threshold", type=Finite(0, 1))
@from_field(SCORE, "output", "-o", "--output", type=click.Path(dir_okay=False))
@click.option("--resume", is_flag=True, help="Continue an interrupted -o run from FILE.partial.")
@from_field(SCORE, "workers", type=click.IntRange(1))
@click.option("-q", "--quiet", is_flag=True, help="No runtime line, progress bar or summary.")
@click.option("--ray", "ray", is_flag=False, flag_value="local",
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
@from_field(SCORE, "explain_which", choices="pneumo_edge.commands.explain:WHICH")
@click.option("--force-explain", "explain_force", is_flag=True,
              help="Replace heatmaps and explain.csv already in the --explain folder.")
@from_field(SCORE, "dicom_columns", metavar="TAG,...")
@from_field(SCORE, "qc", choices="pneumo_edge.model.qc:MODES")
@from_field(SCORE, "prevalence", type=Finite(0, 1, min_open=True, max_open=True))
@click.option("--dicom-out", type=click.Path(file_okay=False), metavar="DIR",
              help="Per scored DICOM input, write a DICOM Structured Report (and with --explain "
                   "a heatmap Secondary Capture) in its study to "
                   "DIR/<SOPInstanceUID>/<model sha256[:12]>.sr.dcm; the CSV's dicom_sr "
                   "column names it. Research use only.")
@friendly
def score(paths, model, runtime, batch, threshold, output, resume, workers, quiet, ray,
          follow_links, explain, explain_which, explain_force, dicom_columns, dicom_out, qc,
          prevalence):
    """Score image files and folders: CSV (path,label,p_<class>...,error) on stdout or -o.

    Inputs: .jpg .jpeg .png .bmp .tif .tiff, DICOM as .dcm/.dicom (any case), and any other
    file whose bytes 128-131 are DICM (only its first 132 bytes are read to check). When an
    input is DICOM, study_uid,series_uid,sop_uid columns (and --dicom-columns) come before
    error; no patient name or other PHI is written. A DICOM that is not a CR/DX/DR chest
    radiograph gets an error row.

    The qc column is empty when an image looks like the X-rays the model was trained on, else
    it says why not (blank image, out-of-distribution score, lateral view); --qc refuse turns
    those rows into error rows.

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
                            dicom_out=dicom_out, qc=qc, prevalence=prevalence)
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
@from_field(EXPLAIN, "method", choices="pneumo_edge.explain.methods:METHODS")
@from_field(EXPLAIN, "runtime", type=click.Choice(RUNTIME_CHOICES))
@from_field(EXPLAIN, "batch", type=click.IntRange(1))
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
@click.option("--model", "model", required=True, type=click.Path(), help="Model directory.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="The node's folder: received instances, results.csv, outbox, sent objects.")
@from_field(LISTEN, "port", type=click.IntRange(1, 65535))
@from_field(LISTEN, "ae_title")
@from_field(LISTEN, "host")
@from_field(LISTEN, "allow", metavar="AET[@IP],...")
@from_field(LISTEN, "send_to", metavar="AET@HOST:PORT")
@from_field(LISTEN, "explain", is_flag=True)
@from_field(LISTEN, "batch", type=click.IntRange(1))
@from_field(LISTEN, "max_wait", type=Finite(0))
@from_field(LISTEN, "runtime", type=click.Choice(RUNTIME_CHOICES))
@from_field(LISTEN, "qc", choices="pneumo_edge.model.qc:MODES")
@friendly
def listen(**opts):
    """A DICOM node: receive CR/DX chest radiographs by C-STORE, score them in batches, write
    OUT/results.csv (the score CSV), and send a Structured Report (and with --explain a
    heatmap Secondary Capture) per instance back to --send-to. Every instance acknowledged is
    on disk first and is scored and sent exactly once, across kill -9 and restarts. SIGTERM
    or Ctrl-C: stop accepting, finish what was accepted, exit 0. Research use only."""
    from pneumo_edge.dicomnode.node import NodeConfig, run_node

    sys.exit(run_node(NodeConfig(**opts)))


@main.command()
@click.argument("run", type=click.Path())
@click.option("--data", required=True, type=click.Path(file_okay=False),
              help="The ImageFolder root RUN was trained on (its split is rebuilt from the card).")
@from_field(CALIBRATE, "gate", choices="pneumo_edge.train.recalibrate:GATE_CHOICES")
@from_field(CALIBRATE, "false_flag_rate", type=Finite(0, 0.5, min_open=True, max_open=True))
@from_field(CALIBRATE, "device")
@friendly
def calibrate(run, data, **opts):
    """Fit calibrated probabilities and the input quality gate for RUN without retraining: the
    weights stay, model.pt and card.json are rewritten, exported files become stale (run export
    again). Exit 2 for bad input."""
    from pneumo_edge.train.recalibrate import CalibrateOptions, run_calibrate

    sys.exit(run_calibrate(run, data, take(CalibrateOptions, opts)))


@main.command()
@click.argument("run", type=click.Path())
@click.option("--trt", is_flag=True,
              help="Also build model.fp16.engine with TensorRT (needs an NVIDIA GPU).")
@click.option("--parity-data", type=click.Path(file_okay=False),
              help="Labelled folder FOLDER/CLASS/* for parity. Default: the card's val split.")
@click.option("--skip-parity", is_flag=True, help="Export only; no parity check.")
@from_field(BUILD, "batch_min", type=click.IntRange(1))
@from_field(BUILD, "batch_opt", type=click.IntRange(1))
@from_field(BUILD, "batch_max", type=click.IntRange(1))
@from_field(BUILD, "workspace_mib", "--workspace", type=click.IntRange(1))
@from_field(BUILD, "timing_cache", type=click.Path(dir_okay=False))
@from_field(EXPORT, "opset", type=click.IntRange(18, 23))
@tolerance_option("fp32", "max_abs", "--tol-fp32", type=Finite(0))
@tolerance_option("fp32", "min_agreement", "--min-agreement-fp32", type=Finite(0, 1))
@tolerance_option("fp32", "max_metric_delta", "--max-metric-delta-fp32", type=Finite(0))
@tolerance_option("fp16", "max_abs", "--tol-fp16", type=Finite(0))
@tolerance_option("fp16", "min_agreement", "--min-agreement-fp16", type=Finite(0, 1))
@tolerance_option("fp16", "max_metric_delta", "--max-metric-delta-fp16", type=Finite(0))
@tolerance_option("int8", "max_abs", "--tol-int8", type=Finite(0))
@tolerance_option("int8", "min_agreement", "--min-agreement-int8", type=Finite(0, 1))
@tolerance_option("int8", "max_metric_delta", "--max-metric-delta-int8", type=Finite(0))
@tolerance_option("fp32", "max_auc_delta", "--max-auc-delta-fp32", type=Finite(0))
@tolerance_option("fp16", "max_auc_delta", "--max-auc-delta-fp16", type=Finite(0))
@tolerance_option("int8", "max_auc_delta", "--max-auc-delta-int8", type=Finite(0))
@from_field(EXPORT, "int8", "--int8/--no-int8")
@from_field(QUANT, "calib_images", type=click.IntRange(2))
@from_field(QUANT, "method", "--calib-method",
            choices="pneumo_edge.export.quantize:CALIB_METHODS")
@from_field(QUANT, "calib_data", type=click.Path(file_okay=False))
@click.option("--allow-int8-fail", is_flag=True,
              help="Exit 0 when only INT8 fails parity (it stays marked failed; auto skips it).")
@friendly
def export(run, **opts):
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
    tolerances = {p: take(Tolerance, opts, f"_{p}") for p in ("fp32", "fp16", "int8")}
    quant, build = take(QuantOptions, opts), take(BuildOptions, opts)
    sys.exit(run_export(run, build=build, quant=quant, tolerances=tolerances, **opts))

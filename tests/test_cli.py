"""The command line's front door: commands listed, module entry point, no heavy imports."""

import subprocess
import sys

import click
import pytest
from click._utils import UNSET
from click.testing import CliRunner

from pneumo_edge.cli import Finite, main


def test_help_lists_every_command():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    for cmd in ("train", "eval", "export", "score", "bench"):
        assert f"\n  {cmd} " in res.output, cmd


def test_python_dash_m_entry_point_and_light_import():
    code = ("import sys, runpy; sys.argv = ['pneumo-edge', '--version']\n"
            "try:\n    runpy.run_module('pneumo_edge', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None)\n"
            "heavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'tensorrt') if m in sys.modules]\n"
            "print('heavy:', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pneumo-edge, version 0.1.0" in out.stdout
    assert "heavy: []" in out.stdout


# --------------------------------------------------------------------------- usage errors


def invoke(*args):
    res = CliRunner().invoke(main, list(map(str, args)))
    return res.exit_code, res.stdout, res.stderr


def assert_one_usage_line(code, out, err, *words):
    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Usage:" not in err and "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, err)


@pytest.mark.parametrize("cmd", ["train", "eval", "bench", "score", "export"])
def test_unknown_option_is_one_error_line_with_a_hint(cmd):
    code, out, err = invoke(cmd, "--no-such-option")
    assert_one_usage_line(code, out, err, "--no-such-option", f"(see pneumo-edge {cmd} --help)")


@pytest.mark.parametrize("args,words", [
    (("score", "x"), ["Missing option '--model'", "pneumo-edge score --help"]),
    (("score", "--model", "m"), ["Missing argument", "PATHS"]),
    (("eval", "--data", "d"), ["Missing option '--model'"]),
    (("score", "x", "--model", "m", "--runtime", "fast"), ["--runtime", "'fast'"]),
    (("score", "x", "--model", "m", "--batch", "0"), ["--batch"]),
    (("bench", "--model", "m", "--iters", "many"), ["--iters", "'many'"]),
    (("export",), ["Missing argument 'RUN'"]),
    (("frobnicate",), ["No such command 'frobnicate'", "(see pneumo-edge --help)"]),
])
def test_usage_errors_are_one_line_exit_2(args, words):
    assert_one_usage_line(*invoke(*args), *words)


TRAIN = ("train", "--data", "/nonexistent/data", "--out", "/nonexistent/out")


@pytest.mark.parametrize("args,option", [
    ((*TRAIN, "--lr", "nan"), "--lr"),
    ((*TRAIN, "--lr", "inf"), "--lr"),
    ((*TRAIN, "--lr", "0"), "--lr"),
    ((*TRAIN, "--weight-decay", "-inf"), "--weight-decay"),
    ((*TRAIN, "--clip-grad", "NaN"), "--clip-grad"),
    ((*TRAIN, "--val-fraction", "nan"), "--val-fraction"),
    ((*TRAIN, "--val-fraction", "1"), "--val-fraction"),
    (("score", "x", "--model", "m", "--threshold", "nan"), "--threshold"),
    (("score", "x", "--model", "m", "--threshold", "1.5"), "--threshold"),
    (("bench", "--model", "m", "--max-time", "nan"), "--max-time"),
    (("export", "r", "--tol-fp32", "nan"), "--tol-fp32"),
    (("export", "r", "--min-agreement-fp16", "inf"), "--min-agreement-fp16"),
])
def test_float_options_reject_nan_inf_and_out_of_range(args, option):
    code, out, err = invoke(*args)
    assert_one_usage_line(code, out, err, option)


def test_finite_type_accepts_finite_values_in_range():
    import click

    t = Finite(0, 1, min_open=True)
    assert t.convert("0.25", None, None) == 0.25 and t.convert(1, None, None) == 1.0
    for bad in ("nan", "inf", "-inf", "0", "1.0001", "abc", "1e999"):
        with pytest.raises(click.BadParameter):
            t.convert(bad, None, None)
    assert Finite().convert("-3.5", None, None) == -3.5


# --------------------------------------------------------------------------- defaults stated once


def command_options(name):
    """The click options of command ``name``, built as for --help."""
    cmd = main.commands[name]
    with click.Context(cmd, info_name=name) as ctx:
        return [p for p in cmd.get_params(ctx) if isinstance(p, click.Option)]


def test_every_option_default_is_read_from_the_library():
    """An option whose default is more than 'off' takes it from a dataclass field (issue 18
    item 5); a literal default in cli.py fails here."""
    for name in main.commands:
        for opt in command_options(name):
            if opt.name == "help" or (opt.is_flag and opt.default in (False, None)):
                continue
            if opt.required or opt.default in (None, UNSET):
                continue
            assert getattr(opt, "library_default", None), (name, opt.name, opt.default)


def test_help_shows_the_library_defaults():
    from pneumo_edge.export.onnx import DEFAULT_OPSET
    from pneumo_edge.export.parity import default_tolerances
    from pneumo_edge.export.quantize import DEFAULT_CALIB_IMAGES
    from pneumo_edge.train.config import DEFAULT_BUDGET_S

    from pneumo_edge.commands.evaluate import RESAMPLES

    def help_of(*args):
        res = CliRunner().invoke(main, [*args, "--help"], terminal_width=200)
        assert res.exit_code == 0, res.output
        return " ".join(res.output.split())

    assert DEFAULT_BUDGET_S == 55 * 60 and "[default: 55m]" in help_of("train")
    assert f"[default: {RESAMPLES};" in help_of("eval")
    export = help_of("export")
    assert f"[default: {DEFAULT_OPSET};" in export
    assert f"[default: {DEFAULT_CALIB_IMAGES};" in export
    fp16 = default_tolerances()["fp16"]
    assert (f"fp16 share of images with the torch label. [default: {fp16.min_agreement};"
            in export)
    assert "int8 max |delta p|. Default: reported, not checked. [x>=0]" in export


def load(ref):
    """The object ``"module:name"`` names."""
    import importlib

    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


#: (plain function, the options instance its defaults come from, parameter -> field renames)
PLAIN_FUNCTIONS = [
    ("pneumo_edge.commands.score:run_score", "pneumo_edge.commands.options:SCORE_DEFAULTS", {}),
    ("pneumo_edge.commands.explain:run_explain", "pneumo_edge.commands.options:EXPLAIN_DEFAULTS",
     {}),
    ("pneumo_edge.commands.evaluate:run_evaluation", "pneumo_edge.commands.options:EVAL_DEFAULTS",
     {}),
    ("pneumo_edge.commands.bench:run_bench", "pneumo_edge.commands.options:BENCH_DEFAULTS",
     {"runtimes": "runtime", "batches": "batch", "data_limit": "limit"}),
    ("pneumo_edge.commands.bench:bench_runtime", "pneumo_edge.commands.options:BENCH_DEFAULTS",
     {}),
    ("pneumo_edge.export.main:run_export", "pneumo_edge.export.options:EXPORT_DEFAULTS", {}),
]


def written_defaults(fn) -> dict[str, str]:
    """Parameter -> its default as written in the source of ``fn``."""
    import ast
    import inspect
    import textwrap

    args = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0].args
    pos = [*args.posonlyargs, *args.args]
    pairs = [*zip(pos[len(pos) - len(args.defaults):], args.defaults),
             *((a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None)]
    return {a.arg: ast.unparse(d) for a, d in pairs}


@pytest.mark.parametrize("function,defaults,renamed", PLAIN_FUNCTIONS)
def test_plain_functions_take_their_defaults_from_the_options(function, defaults, renamed):
    """A plain function's keyword default for a CLI option is written as the options instance's
    field (``batch: int = DEFAULTS.batch``), never as a literal: stated once, and a caller
    of run_score gets what --help says."""
    import dataclasses
    import importlib

    fn, instance = load(function), load(defaults)
    fields = {f.name for f in dataclasses.fields(instance)}
    written = {p: d for p, d in written_defaults(fn).items() if renamed.get(p, p) in fields}
    assert written
    assert written == {p: f"DEFAULTS.{renamed.get(p, p)}" for p in written}
    assert vars(importlib.import_module(fn.__module__))["DEFAULTS"] is instance


def test_the_default_options_cannot_be_changed_in_place():
    """The plain functions share these instances: a caller must not be able to move a default
    for everyone (frozen dataclasses)."""
    import dataclasses

    for _, defaults, _ in PLAIN_FUNCTIONS:
        instance = load(defaults)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(instance, dataclasses.fields(instance)[0].name, None)


def test_every_choice_list_is_the_library_table_that_validates_it():
    """A choice option's values are the library's table (issue 18): none is restated in
    cli.py, so adding a choice is one edit; --runtime's list is modeldir's runtimes and auto."""
    from pneumo_edge.cli import RUNTIME_CHOICES

    seen = 0
    for name in main.commands:
        for opt in command_options(name):
            if not isinstance(opt.type, click.Choice):
                continue
            if list(opt.type.choices) == RUNTIME_CHOICES:
                continue
            seen += 1
            assert getattr(opt, "library_choices", None), (name, opt.name)
            assert list(opt.type.choices) == list(load(opt.library_choices)), (name, opt.name)
    assert seen >= 13


COLOURS = ("red", "green")  # a library table, for the test below


def test_a_choice_option_offers_its_table_as_it_is_when_built(monkeypatch):
    """from_field(..., choices="module:NAME") reads the table when the command first needs its
    options: a value added to the table is offered, with no edit to the option."""
    import dataclasses

    from pneumo_edge.cli import Command, from_field

    @dataclasses.dataclass
    class Paint:
        colour: str = dataclasses.field(default="red", metadata={"help": "Which."})

    monkeypatch.setitem(globals(), "Paint", Paint)  # importable as module:Paint
    monkeypatch.setitem(globals(), "COLOURS", (*COLOURS, "blue"))

    @click.command(cls=Command)
    @from_field(__name__ + ":Paint", "colour", choices=__name__ + ":COLOURS")
    def cmd(colour):
        click.echo(colour)

    assert CliRunner().invoke(cmd, ["--colour", "blue"]).output == "blue\n"
    res = CliRunner().invoke(cmd, ["--colour", "mauve"])
    assert res.exit_code == 2 and "'red', 'green', 'blue'" in res.output


def test_train_without_options_runs_the_library_defaults(monkeypatch, tmp_path):
    """The CLI's defaults, parsed back from how --help writes them (55m), are TrainConfig's."""
    from pneumo_edge.train import loop
    from pneumo_edge.train.config import TrainConfig

    seen = []
    monkeypatch.setattr(loop, "train", seen.append)
    res = CliRunner().invoke(main, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert seen == [TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"))]


def test_export_without_options_runs_the_library_defaults(monkeypatch):
    from pneumo_edge.export import main as export_main
    from pneumo_edge.export.options import ExportOptions
    from pneumo_edge.export.parity import default_tolerances
    from pneumo_edge.export.quantize import QuantOptions
    from pneumo_edge.export.tensorrt import BuildOptions

    seen = []
    monkeypatch.setattr(export_main, "run_export", lambda run, **kw: seen.append(kw) or 0)
    res = CliRunner().invoke(main, ["export", "runs/x"])
    assert res.exit_code == 0, res.output
    kw = seen[0]
    assert kw["tolerances"] == default_tolerances()
    assert kw["quant"] == QuantOptions() and kw["build"] == BuildOptions()
    assert (kw["opset"], kw["int8"]) == (ExportOptions().opset, ExportOptions().int8)
    assert not (kw["trt"] or kw["skip_parity"] or kw["allow_int8_fail"]) and not kw["parity_data"]


def test_export_options_reach_their_dataclasses(monkeypatch):
    from pneumo_edge.export import main as export_main

    seen = []
    monkeypatch.setattr(export_main, "run_export", lambda run, **kw: seen.append(kw) or 0)
    res = CliRunner().invoke(main, ["export", "r", "--workspace", "64", "--tol-int8", "0.2",
                                    "--calib-method", "entropy", "--max-auc-delta-fp16", "0.5",
                                    "--no-int8", "--opset", "19"])
    assert res.exit_code == 0, res.output
    kw = seen[0]
    assert kw["build"].workspace_mib == 64 and kw["quant"].method == "entropy"
    assert kw["tolerances"]["int8"].max_abs == 0.2
    assert kw["tolerances"]["fp16"].max_auc_delta == 0.5
    assert kw["tolerances"]["fp32"].max_auc_delta == 1e-3
    assert (kw["int8"], kw["opset"]) == (False, 19)


@pytest.mark.parametrize("args,absent", [
    ((), ("pneumo_edge.train", "pneumo_edge.export", "pneumo_edge.commands.options")),
    (("score", "--help"), ("torch", "pneumo_edge.train", "pneumo_edge.export")),
    (("train", "--help"), ("torch",)),
    (("export", "--help"), ("torch",)),
])
def test_option_defaults_are_read_only_by_the_command_that_needs_them(args, absent):
    code = ("import sys\nfrom pneumo_edge.cli import main\n"
            f"try:\n    main({list(args)!r}, prog_name='pneumo-edge')\n"
            "except SystemExit:\n    pass\n"
            f"print('loaded:', [m for m in {list(absent)!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "loaded: []" in out.stdout, out.stdout + out.stderr


def test_from_field_builds_an_option_from_a_dataclass_field():
    import dataclasses

    from pneumo_edge.cli import Command, from_field

    @dataclasses.dataclass
    class Opts:
        path: str = dataclasses.field(metadata={"help": "Where."})
        size: int = dataclasses.field(default=7, metadata={"help": "How big."})

    @click.command(cls=Command)
    @from_field(Opts.__module__ + ":Opts", "path")
    @from_field(Opts.__module__ + ":Opts", "size", "-s", "--size", type=click.IntRange(1),
                show_default=True)
    def cmd(path, size):
        click.echo(f"{path} {size}")

    globals()["Opts"] = Opts  # importable as module:Opts
    try:
        assert CliRunner().invoke(cmd, ["--path", "p"]).output == "p 7\n"
        assert CliRunner().invoke(cmd, ["--path", "p", "-s", "3"]).output == "p 3\n"
        assert CliRunner().invoke(cmd, ["-s", "3"]).exit_code == 2  # no default: required
        text = " ".join(CliRunner().invoke(cmd, ["--help"]).output.split())
        assert "-s, --size INTEGER RANGE How big. [default: 7; x>=1]" in text
        assert "--path TEXT Where. [required]" in text
    finally:
        del globals()["Opts"]


@pytest.mark.parametrize("cmd,shows", [("train", "[default: 55m]"), ("export", "[default: 128;")])
def test_help_of_torch_commands_works_without_torch(cmd, shows):
    """The defaults of train and export are read from their modules: on an edge install (no
    torch) their --help still works and shows them."""
    from test_edge import run_without_torch

    proc = run_without_torch(cmd, "--help")
    assert proc.returncode == 0, proc.stderr
    assert shows in " ".join(proc.stdout.split())
    assert "BLOCKED-MODULES-LOADED=[]" in proc.stderr

"""The command line's front door: commands listed, module entry point, no heavy imports."""

import subprocess
import sys

import pytest
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

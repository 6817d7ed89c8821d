"""The command line's front door: commands listed, module entry point, no heavy imports."""

import subprocess
import sys

from click.testing import CliRunner

from pneumo_edge.cli import main


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

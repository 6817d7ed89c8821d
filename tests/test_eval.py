"""eval's JSON names files as the scoring CSV does (issue 20): a file name that is not UTF-8 is
written with csvout's rule (``\\xNN``), never as a lone surrogate that strict JSON readers
refuse."""

from __future__ import annotations

import csv
import io
import json
import os

from click.testing import CliRunner

from pneumo_edge.cli import main


def _strings(x):
    if isinstance(x, dict):
        for k, v in x.items():
            yield k
            yield from _strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)
    elif isinstance(x, str):
        yield x


def test_eval_json_names_non_utf8_files_as_the_csv_does(tiny_run, tiny_labelled, tmp_path):
    data = tmp_path / "d\xe9ta"
    for cls, other in (("NORMAL", "PNEUMONIA"), ("PNEUMONIA", "NORMAL")):
        (data / cls).mkdir(parents=True)
        # the other class's images under this one: mistakes, so the gallery lists files
        for f in sorted((tiny_labelled / other).iterdir()):
            with open(os.fsencode(str(data / cls)) + b"/\xff" + os.fsencode(f.name), "wb") as out:
                out.write(f.read_bytes())
    with open(os.fsencode(str(data / "NORMAL")) + b"/broken\xfe.png", "wb") as out:
        out.write(b"not a png")
    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_run), "--data", str(data),
                                    "--runtime", "torch", "--out", str(tmp_path / "e.json"),
                                    "--resamples", "100", "--gallery", "16"])
    assert res.exit_code == 0, res.output
    assert res.stderr.count("has no calibration or input gate") == 1  # an old model directory
    raw = (tmp_path / "e.json").read_bytes()
    m = json.loads(raw.decode("utf-8", errors="strict"))
    assert not any(0xD800 <= ord(c) <= 0xDFFF for s in _strings(m) for c in s), \
        "a lone surrogate in eval's JSON"
    scored = CliRunner().invoke(main, ["score", str(data), "--model", str(tiny_run),
                                       "--runtime", "torch"])
    assert scored.exit_code == 1, scored.output  # the broken file
    cells = {r["path"] for r in csv.DictReader(io.StringIO(scored.stdout, newline=""))}
    assert [f["path"] for f in m["failed"]] == \
        [c for c in cells if c.endswith("broken\\xfe.png")]
    listed = [it["path"] for key in ("false_negatives", "false_positives")
              for it in m["gallery"][key]]
    assert listed and all("/\\xff" in p and p in cells for p in listed)
    assert m["data"] == str(data)  # a valid UTF-8 name stays as it is

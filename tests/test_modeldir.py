"""The model directory (pneumo_edge.model.modeldir): which file runs, every copy of the card agrees
with it, broken or hostile model files are refused with one line and exit 2, atomic writes.

Real tiny models only (conftest's tiny_run / tiny_exported); the CLI where exit codes and
messages matter (in a subprocess with a timeout where a hang is the failure being tested).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pneumo_edge.cli import main
from pneumo_edge.errors import ModelError, PneumoError
from pneumo_edge.model import modeldir
from pneumo_edge.model.modeldir import Refused, read_card
from pneumo_edge.runtimes import gpu_present, open_runtime

REPO = Path(__file__).resolve().parents[1]


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def images(session_tmp) -> Path:
    d = session_tmp("imgs")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 70), np.uint8)).save(d / f"{i}.png")
    return d


def score(images, model, *args):
    """``pneumo-edge score`` in-process: (exit code, stdout, stderr)."""
    res = CliRunner().invoke(main, ["score", str(images), "--model", str(model), *map(str, args)],
                             catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def score_subprocess(images, model, *args, timeout=60):
    """``pneumo-edge score`` in a child process that is killed if it hangs."""
    cmd = [sys.executable, "-m", "pneumo_edge", "score", str(images), "--model", str(model),
           *map(str, args)]
    try:
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: {' '.join(cmd)}")
    return out.returncode, out.stdout, out.stderr


def one_line_error(code, out, err) -> str:
    """The error line of a refused run: exit 2, no CSV, one line, no traceback."""
    assert code == 2, err
    assert out == "" and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    return last


def edit_card(run: Path, **changes) -> None:
    d = json.loads((run / "card.json").read_text())
    d.update(changes)
    (run / "card.json").write_text(json.dumps(d))


# ----------------------------------------------------------------------------- what runs


@pytest.mark.parametrize("name,file,precision", [("torch", "model.pt", "fp32"),
                                                 ("onnx", "model.onnx", "fp32"),
                                                 ("onnx-fp16", "model.fp16.onnx", "fp16")])
def test_runtime_says_which_file_it_runs(tiny_exported, name, file, precision):
    rt = open_runtime(tiny_exported, name, device="cpu")
    assert rt.path == tiny_exported / file
    assert rt.sha256 == _sha(tiny_exported / file)
    assert rt.precision == precision


def test_model_may_name_a_file_which_fixes_the_runtime(tiny_exported):
    rt = open_runtime(tiny_exported / "model.fp16.onnx", "auto", log=lambda m: None)
    assert (rt.name, rt.path, rt.precision) == ("onnx-fp16", tiny_exported / "model.fp16.onnx",
                                                "fp16")
    assert open_runtime(tiny_exported / "model.pt", "torch").name == "torch"
    with pytest.raises(ModelError, match="is run by --runtime onnx-fp16, not --runtime onnx"):
        open_runtime(tiny_exported / "model.fp16.onnx", "onnx")
    with pytest.raises(ModelError, match="not a model file"):
        open_runtime(tiny_exported / "parity.json", "auto")


def test_score_runs_the_named_file_and_refuses_a_contradicting_runtime(tiny_exported, images):
    code, out, err = score(images, tiny_exported / "model.fp16.onnx")
    assert code == 0 and "runtime: onnx-fp16" in err, err
    code, out, err = score(images, tiny_exported / "model.fp16.onnx", "--runtime", "onnx")
    assert "not --runtime onnx" in one_line_error(code, out, err)


def test_directory_with_only_model_onnx_scores_evals_and_benches(tiny_exported, copy_run,
                                                                 images, tiny_labelled):
    from pneumo_edge.commands import bench

    run = copy_run(tiny_exported, files=["model.onnx"])
    assert os.listdir(run) == ["model.onnx"]
    card = read_card(tiny_exported)
    rt = open_runtime(run, "auto", log=lambda m: None)
    assert rt.name == "onnx" and rt.card == card  # the card from the file's metadata
    code, out, err = score(images, run)
    assert code == 0 and out.splitlines()[0] == "path,label,p_NORMAL,p_PNEUMONIA,qc,error", err
    assert len(out.splitlines()) == 4
    res = CliRunner().invoke(main, ["eval", "--model", str(run), "--data", str(tiny_labelled),
                                    "--runtime", "onnx"])
    assert res.exit_code == 0, res.output
    b = bench.run_bench(run, "auto", [2], warmup=1, iters=2, log=lambda m: None)
    assert b["model"]["image_size"] == card.image_size and b["rows"][0]["runtime"] == "onnx"


# ----------------------------------------------------------------------------- agreement


#: the first file auto opens in an exported directory: torch-fp16's model.pt on a GPU machine,
#: model.int8.onnx on a CPU one
AUTO_FIRST = "model.pt" if gpu_present() else "model.int8.onnx"
#: the first ONNX file auto opens (torch-fp16 is not eligible: its parity is skipped on the CPU)
AUTO_FIRST_ONNX = "model.onnx" if gpu_present() else "model.int8.onnx"


@pytest.mark.parametrize("runtime,file", [("torch", "model.pt"), ("onnx", "model.onnx"),
                                          ("onnx-fp16", "model.fp16.onnx"),
                                          ("onnx-int8", "model.int8.onnx"),
                                          ("auto", AUTO_FIRST)])
def test_reversed_classes_in_card_json_exit_2_naming_both_files(tiny_exported, copy_run,
                                                                images, runtime, file):
    """Before: --runtime torch wrote p_NORMAL under the p_PNEUMONIA header."""
    run = copy_run(tiny_exported)
    edit_card(run, classes=["PNEUMONIA", "NORMAL"])
    last = one_line_error(*score(images, run, "--runtime", runtime))
    assert last.startswith(f"error: {run}/card.json and {run}/{file} disagree on classes: "
                           "['PNEUMONIA', 'NORMAL'] vs ['NORMAL', 'PNEUMONIA']"), last
    if file != "model.pt":
        assert last.endswith(f"(re-export: pneumo-edge export {run})"), last


@pytest.mark.parametrize("runtime,file", [("torch", "model.pt"), ("onnx", "model.onnx")])
@pytest.mark.parametrize("field,value", [("image_size", 128), ("threshold", 0.25),
                                         ("positive_class", "NORMAL"), ("net", {"tta": "flip"})])
def test_any_disagreeing_field_exits_2(tiny_exported, copy_run, images, runtime, file, field,
                                       value):
    """Before: a doubled image_size silently ran the model at 128 px."""
    run = copy_run(tiny_exported, files=["card.json", file])
    edit_card(run, **{field: value})
    last = one_line_error(*score(images, run, "--runtime", runtime))
    assert f"{run}/card.json and {run}/{file} disagree on {field}: " in last, last


def test_onnx_from_other_weights_is_refused_but_torch_runs(tiny_exported, copy_run, images):
    """model.pt was retrained after export (same card fields, other weights): the ONNX files
    are stale, so the card's threshold and metrics do not describe them. Refused for every
    exported form, and auto does not quietly fall back to torch; torch itself runs, since
    card.json belongs to this model.pt."""
    import torch

    run = copy_run(tiny_exported)
    ckpt = torch.load(run / "model.pt", weights_only=True)
    ckpt["state_dict"]["backbone.fc.bias"] += 0.01
    torch.save(ckpt, run / "model.pt")
    for runtime, file in (("onnx", "model.onnx"), ("onnx-fp16", "model.fp16.onnx"),
                          ("onnx-int8", "model.int8.onnx"), ("auto", AUTO_FIRST_ONNX)):
        last = one_line_error(*score(images, run, "--runtime", runtime))
        assert f"{run}/model.pt and {run}/{file} disagree on weights_sha256: " in last, last
        assert last.endswith(f"(re-export: pneumo-edge export {run})")
    code, _, err = score(images, run, "--runtime", "torch")
    assert code == 0, err


def test_edge_copy_without_model_pt_runs_on_the_card_in_the_file(tiny_exported, copy_run):
    run = copy_run(tiny_exported, files=["card.json", "model.fp16.onnx"])
    rt = open_runtime(run, "onnx-fp16")
    assert rt.card == read_card(tiny_exported)


def _rewrite_metadata(path: Path, **props) -> None:
    """Replace the metadata_props of an ONNX file (None drops a key)."""
    import onnx

    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props} | props
    del proto.metadata_props[:]
    for k, v in meta.items():
        if v is not None:
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
    onnx.save(proto, str(path))


def test_onnx_without_card_or_weights_record_is_refused(tiny_exported, copy_run):
    pytest.importorskip("onnx")
    run = copy_run(tiny_exported, files=["card.json", "model.pt", "model.onnx"])
    _rewrite_metadata(run / "model.onnx", **{modeldir.ONNX_WEIGHTS_KEY: None})
    with pytest.raises(Refused, match="records no weights sha256"):
        open_runtime(run, "onnx")
    _rewrite_metadata(run / "model.onnx", **{modeldir.ONNX_CARD_KEY: None})
    with pytest.raises(Refused, match="no model card in its metadata"):
        open_runtime(run, "onnx")


def test_export_records_the_weights_identity(tiny_exported):
    import onnx

    for name in ("model.onnx", "model.fp16.onnx"):
        meta = {p.key: p.value for p in onnx.load(str(tiny_exported / name)).metadata_props}
        assert meta[modeldir.ONNX_WEIGHTS_KEY] == _sha(tiny_exported / "model.pt")
    report = json.loads((tiny_exported / "parity.json").read_text())
    assert report["reference"]["sha256"] == _sha(tiny_exported / "model.pt")
    for form in ("onnx", "onnx-fp16"):
        e = report["forms"][form]
        assert e["sha256"] == _sha(tiny_exported / e["file"])


def test_export_refuses_a_card_json_that_disagrees_with_model_pt(copy_run):
    run = copy_run()
    edit_card(run, classes=["PNEUMONIA", "NORMAL"])
    res = CliRunner().invoke(main, ["export", str(run), "--skip-parity"])
    assert res.exit_code == 2 and "disagree on classes" in res.stderr, res.output
    assert not (run / "model.onnx").exists()


# ----------------------------------------------------------------------------- bad card fields


@pytest.mark.parametrize("value,words", [("abc", "'abc'"), (None, "None"), (float("nan"), "nan"),
                                         (1.5, "1.5"), (True, "True")])
def test_bad_threshold_in_card_json_exit_2(tiny_exported, copy_run, images, value, words):
    run = copy_run(tiny_exported, files=["card.json", "model.onnx"])
    edit_card(run, threshold=value)
    last = one_line_error(*score(images, run))
    assert last == f"error: {run}/card.json: model card threshold {words} is not a number in " \
                   "[0, 1]", last


@pytest.mark.parametrize("value", ["224", 0, -1, True])
def test_bad_image_size_in_card_json_exit_2(tiny_exported, copy_run, images, value):
    run = copy_run(tiny_exported, files=["card.json", "model.onnx"])
    edit_card(run, image_size=value)
    last = one_line_error(*score(images, run))
    assert f"card.json: model card image_size {value!r} is not a usable size" in last, last


def test_non_utf8_card_exit_2(tiny_exported, copy_run, images):
    run = copy_run(tiny_exported, files=["card.json", "model.onnx"])
    (run / "card.json").write_bytes(b'{"classes": ["NORMAL", "\xff"]}')
    last = one_line_error(*score(images, run))
    assert last == f"error: {run}/card.json: model card is not UTF-8 text"


# ----------------------------------------------------------------------------- hostile files

MODEL_FILES = [("card.json", "auto"), ("model.pt", "torch"), ("model.onnx", "onnx"),
               ("model.fp16.onnx", "onnx-fp16"), ("model.fp16.engine", "trt"),
               ("model.fp16.engine.json", "trt")]


def _with_engine(run: Path) -> None:
    """A (fake) engine and a sidecar that agrees with the directory, so that the files under
    test are reached (the engine's bytes are never handed to TensorRT here)."""
    (run / "model.fp16.engine").write_bytes(b"engine")
    meta = {"card": read_card(run).to_dict(), "weights_sha256": _sha(run / "model.pt")}
    modeldir.sidecar_path(run / "model.fp16.engine").write_text(json.dumps(meta))


def _replace(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")


@pytest.mark.parametrize("kind,words", [("directory", "a directory"),
                                        ("dev-zero", "a character device")])
@pytest.mark.parametrize("file,runtime", MODEL_FILES)
def test_model_file_that_is_not_a_regular_file_is_refused(tiny_exported, copy_run, file,
                                                          runtime, kind, words):
    run = copy_run(tiny_exported)
    _with_engine(run)
    _replace(run / file, kind)
    with pytest.raises(Refused) as err:
        open_runtime(run, runtime, log=lambda m: None)
    assert str(err.value).startswith(f"{run / file}: not a regular file ({words})")


@pytest.mark.parametrize("file,runtime", MODEL_FILES)
def test_fifo_in_place_of_a_model_file_exits_2_without_hanging(tiny_exported, copy_run, images,
                                                               file, runtime):
    run = copy_run(tiny_exported)
    _with_engine(run)
    _replace(run / file, "fifo")
    last = one_line_error(*score_subprocess(images, run, "--runtime", runtime))
    assert last.startswith(f"error: {run / file}: not a regular file (a FIFO)"), last


@pytest.mark.skipif(gpu_present(), reason="auto tries GPU forms first on a GPU machine")
@pytest.mark.parametrize("broken,int8_passed", [("model.int8.onnx", True),
                                                ("model.onnx", True), ("model.onnx", False)])
def test_auto_does_not_skip_past_a_broken_model_file(tiny_verified, copy_run, broken,
                                                     int8_passed):
    """A broken file auto reaches is an error, also when INT8 is not eligible; a broken file it
    does not reach (model.onnx behind a verified INT8 file) is not its concern."""
    run = copy_run(tiny_verified)
    if not int8_passed:
        report = json.loads((run / "parity.json").read_text())
        report["forms"]["onnx-int8"]["status"] = "fail"
        (run / "parity.json").write_text(json.dumps(report))
    _replace(run / broken, "directory")
    if broken == "model.onnx" and int8_passed:
        assert open_runtime(run, "auto", log=lambda m: None).name == "onnx-int8"
        return
    with pytest.raises(Refused, match=f"{broken}: not a regular file"):
        open_runtime(run, "auto", log=lambda m: None)


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    (tmp_path / "card.json").symlink_to(target)
    modeldir.write_text_atomic(tmp_path / "card.json", "new")
    assert target.read_text() == "keep me"
    assert not (tmp_path / "card.json").is_symlink()
    assert (tmp_path / "card.json").read_text() == "new"


def test_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        modeldir.write_atomic(tmp_path / "model.onnx", half_then_fail)
    assert os.listdir(tmp_path) == ["model.onnx"]
    assert (tmp_path / "model.onnx").read_bytes() == b"old"


def test_atomic_write_errors_are_one_line(tmp_path):
    (tmp_path / "parity.json").mkdir()
    with pytest.raises(PneumoError, match="parity.json: cannot write"):
        modeldir.write_json_atomic(tmp_path / "parity.json", {"a": 1})
    with pytest.raises(PneumoError, match="cannot write"):
        modeldir.write_bytes_atomic(tmp_path / "nope" / "model.onnx", b"x")


def test_atomic_writes_keep_the_usual_permissions_and_valid_json(tmp_path):
    modeldir.write_json_atomic(tmp_path / "metrics.json", {"auc": float("nan"), "n": 3})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"auc": None, "n": 3}
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_torch_save_atomic_round_trips(tmp_path):
    import torch

    modeldir.torch_save_atomic(tmp_path / "last.pt", {"w": torch.arange(3)})
    assert torch.load(tmp_path / "last.pt", weights_only=True)["w"].tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- one home


def test_training_and_export_write_exactly_the_listed_files(tiny_run, tiny_exported):
    assert sorted(os.listdir(tiny_run)) == sorted([*modeldir.TRAINING_OUTPUTS,
                                                   modeldir.PIXEL_CACHE])
    exported = set(os.listdir(tiny_exported)) - set(modeldir.TRAINING_OUTPUTS)
    assert exported == {"model.onnx", "model.fp16.onnx", "model.int8.onnx", "parity.json"}
    assert exported <= set(modeldir.EXPORT_OUTPUTS)


def _imports(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every import in ``path``, including those inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, node.lineno))
    return out


def test_the_edge_package_never_imports_train_or_export():
    """Only the CLI's train and export commands reach into pneumo_edge.train / .export."""
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}"
           for p in sorted((REPO / "pneumo_edge").rglob("*.py")) if p.name != "cli.py"
           for mod, line in _imports(p)
           if mod.startswith(("pneumo_edge.train", "pneumo_edge.export"))]
    assert bad == []


def _named_files(path: Path) -> list[str]:
    """Model-directory file names written as string literals in ``path`` (not docstrings)."""
    names = {*modeldir.TRAINING_OUTPUTS, *modeldir.EXPORT_OUTPUTS}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
            and ast.get_docstring(n, clean=False) is not None}
    return [f"{path.relative_to(REPO)}:{n.lineno} {n.value!r}" for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
            and any(name in n.value for name in names)]


def test_only_modeldir_names_model_files():
    """The edge package and export take every file name from pneumo_edge.model.modeldir (the CLI's
    help texts, and the option dataclasses that hold them, may mention them)."""
    files = [*(REPO / "pneumo_edge").rglob("*.py"), *(REPO / "export").glob("*.py"),
             REPO / "train" / "checkpoint.py"]
    found = [hit for p in sorted(files) if p.name not in ("modeldir.py", "cli.py", "options.py")
             for hit in _named_files(p)]
    assert found == []


def _package_imports() -> dict[str, set[str]]:
    """pneumo_edge's modules (train/ and export/ included) -> the package modules each imports,
    at module level or inside functions (``from a.b import c`` counts a.b.c when c is a module)."""
    homes = {"pneumo_edge": REPO / "pneumo_edge", "pneumo_edge.train": REPO / "train",
             "pneumo_edge.export": REPO / "export"}
    files = {".".join([pkg, *p.relative_to(d).with_suffix("").parts]).removesuffix(".__init__"): p
             for pkg, d in homes.items() for p in d.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        graph[mod] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                     if isinstance(node, ast.ImportFrom) and node.module else [])
            graph[mod] |= {n for n in names if n in files and n != mod
                           and not mod.startswith(n + ".")}  # a package's __init__ is no loop
    return graph


def test_the_card_imports_no_model_directory_code():
    """model/card.py is the card alone: reading and writing it is modeldir's (read_card,
    write_card), so card.py imports modeldir nowhere, not even inside a function."""
    assert _package_imports()["pneumo_edge.model.card"] <= {"pneumo_edge.errors"}


def test_the_import_graph_has_no_loop():
    """No module of the package reaches itself through imports, function-level ones included
    (a lazy import only hides a loop)."""
    graph = _package_imports()
    loops = []
    for start in graph:  # depth-first from each module: a path back to it is a loop
        stack = [(start, (start,))]
        seen = set()
        while stack:
            mod, path = stack.pop()
            for nxt in graph[mod]:
                if nxt == start:
                    loops.append(" -> ".join((*path, start)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))
    assert loops == []

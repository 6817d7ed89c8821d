"""pneumo-edge explain: Grad-CAM and occlusion maps, their pictures and explain.csv, and the
sanity checks of Adebayo et al. (2018): maps must depend on the trained weights, and on a
synthetic class-dependent pattern (conftest.make_image's bright blob) the map must peak on it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import IMAGE_SIZE, make_image
from PIL import Image, ImageFilter

from pneumo_edge.errors import PneumoError

pytest.importorskip("onnxruntime", reason="occlusion through the onnx runtime needs onnxruntime")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a.ravel(), kind="stable"), kind="stable")
    rb = np.argsort(np.argsort(b.ravel(), kind="stable"), kind="stable")
    return float(np.corrcoef(ra, rb)[0, 1])


def blob_images(n: int, seed: int = 123):
    """PNEUMONIA-like images (a bright blob), their model pixels, and the blob's centre found
    from the image itself (the brightest point after blurring), in model pixels."""
    from pneumo_edge.inputs.images import to_pixels

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = make_image(1, rng)
        px = to_pixels(Image.fromarray(img), IMAGE_SIZE)
        blurred = np.asarray(Image.fromarray(px[0]).filter(ImageFilter.GaussianBlur(2)))
        out.append((px, np.unravel_index(int(blurred.argmax()), blurred.shape)))
    return out


@pytest.fixture(scope="module")
def onnx_rt(tiny_exported):
    from pneumo_edge.runtimes import open_runtime

    return open_runtime(tiny_exported, "onnx", log=lambda m: None)


@pytest.fixture(scope="module")
def randomised_run(tiny_run, session_tmp):
    """tiny_run's network with every layer re-initialised (seeded): same architecture, card
    and preprocessing, random weights (the model-randomisation test of Adebayo et al.)."""
    torch = pytest.importorskip("torch")
    from conftest import copy_model_dir
    from pneumo_edge.train.checkpoint import save_model

    from pneumo_edge.model.torchload import load_model

    out = copy_model_dir(tiny_run, session_tmp("randomised") / "run",
                         files=("card.json", "model.pt"))
    model, card = load_model(out / "model.pt")
    torch.manual_seed(0)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    save_model(out, model, card)
    return out


def test_occlusion_peaks_on_the_class_pattern(onnx_rt):
    from pneumo_edge.explain.methods import default_patch, occlusion

    patch, _ = default_patch(IMAGE_SIZE)
    dists = []
    for px, (cy, cx) in blob_images(6):
        drop, _ = occlusion(onnx_rt, px, onnx_rt.card.positive_index)
        my, mx = np.unravel_index(int(drop.argmax()), drop.shape)
        dists.append(float(np.hypot(my - cy, mx - cx)))
    # the blob's radius is IMAGE_SIZE/12 to /6 px (5-11 px here); one patch is 8 px
    assert max(dists) <= 1.5 * patch, \
        f"occlusion maxima {dists} px from the blob centres (patch {patch} px)"


def test_maps_depend_on_the_trained_weights(tiny_run, randomised_run):
    """Adebayo et al.'s model-parameter randomisation: the maps of the trained model and of
    the same network with random weights must differ clearly (low rank correlation)."""
    pytest.importorskip("torch")
    from pneumo_edge.explain.methods import gradcam, occlusion
    from pneumo_edge.runtimes import open_runtime

    trained = open_runtime(tiny_run, "torch", log=lambda m: None)
    rand = open_runtime(randomised_run, "torch", log=lambda m: None)
    pos = trained.card.positive_index
    images = blob_images(4, seed=7)
    px = np.stack([p for p, _ in images])
    rho_cam = [spearman(a, b) for a, b in zip(gradcam(trained.model, px, pos),
                                              gradcam(rand.model, px, pos))]
    rho_occ = [spearman(occlusion(trained, p, pos)[0], occlusion(rand, p, pos)[0])
               for p, _ in images]
    msg = (f"Spearman rank correlation trained vs randomised weights: gradcam "
           f"{np.round(rho_cam, 3).tolist()}, occlusion {np.round(rho_occ, 3).tolist()}")
    print(msg)
    # identical maps would give 1.0; a map that ignores the weights stays near it. Measured
    # on this tiny model: occlusion 0.05-0.21; Grad-CAM -0.93 to -0.03 (at 64 px its grid is
    # 2 x 2 cells, so its ranks are coarse: the maps disagree, often as opposites)
    assert np.mean(rho_occ) < 0.5, msg
    assert np.mean(rho_cam) < 0.5, msg


def test_gradcam_map_shape_and_tta(tiny_run):
    pytest.importorskip("torch")
    from pneumo_edge.explain.methods import Explainer
    from pneumo_edge.runtimes import open_runtime

    rt = open_runtime(tiny_run, "torch", log=lambda m: None)
    px = blob_images(1)[0][0]
    e = Explainer(rt, "gradcam")(px)
    assert e.heat.shape == (IMAGE_SIZE, IMAGE_SIZE)
    assert 0.0 <= e.heat.min() and e.heat.max() <= 1.0
    np.testing.assert_allclose(e.probs, rt(px[None])[0], rtol=1e-6)


def test_gradcam_needs_the_torch_model(onnx_rt):
    from pneumo_edge.explain.methods import Explainer

    with pytest.raises(PneumoError, match="gradcam needs the torch model"):
        Explainer(onnx_rt, "gradcam")


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_explain_folder_rows_pictures_and_refusals(tiny_exported, tiny_labelled, tmp_path):
    from pneumo_edge.commands.explain import EXPLAIN_CSV, run_explain

    data = tmp_path / "in"
    data.mkdir()
    for f in sorted((tiny_labelled / "PNEUMONIA").iterdir())[:2] + \
            sorted((tiny_labelled / "NORMAL").iterdir())[:1]:
        (data / f.name).write_bytes(f.read_bytes())
    (data / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = run_explain([str(data)], tiny_exported, out, method="occlusion", runtime="onnx",
                       log=lambda m: None)
    assert code == 1  # one input failed
    rows = list(csv.DictReader((out / EXPLAIN_CSV).open(encoding="utf-8")))
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in data.iterdir())
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and Path(bad[0]["path"]).name == "empty.png" and not bad[0]["heatmap"]
    for r in rows:
        if r["error"]:
            continue
        assert r["label"] in ("NORMAL", "PNEUMONIA")
        p = float(r["p_PNEUMONIA"])
        assert (r["label"] == "PNEUMONIA") == (p >= 0.5)  # the tiny card's threshold
        with Image.open(out / r["heatmap"]) as im:
            assert im.mode == "RGB" and im.width >= 320
    before = _files(out)
    with pytest.raises(PneumoError, match="--force"):
        run_explain([str(data)], tiny_exported, out, runtime="onnx", log=lambda m: None)
    assert _files(out) == before  # refused before any write
    run_explain([str(data)], tiny_exported, out, runtime="onnx", force=True,
                log=lambda m: None)
    assert (out / "notes.txt").read_text() == "mine"
    assert set(_files(out)) == set(before)


def test_explain_cli_gradcam(tiny_run, tiny_labelled, tmp_path):
    pytest.importorskip("torch")
    from click.testing import CliRunner

    from pneumo_edge.cli import main

    img = min((tiny_labelled / "PNEUMONIA").iterdir())
    res = CliRunner().invoke(main, ["explain", str(img), "--model", str(tiny_run), "--out",
                                    str(tmp_path / "o"), "--method", "gradcam"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((tmp_path / "o" / "explain.csv").open(encoding="utf-8")))
    assert len(rows) == 1 and rows[0]["heatmap"].endswith(".png") and not rows[0]["error"]
    res = CliRunner().invoke(main, ["explain", str(img), "--model", str(tiny_run), "--out",
                                    str(tmp_path / "o2"), "--method", "gradcam",
                                    "--runtime", "onnx"])
    assert res.exit_code == 2 and "gradcam" in res.output


def test_occlusion_explain_is_torch_free(tiny_exported, tiny_labelled, tmp_path):
    """The edge install has no torch: occlusion through onnx must not import it."""
    img = min((tiny_labelled / "PNEUMONIA").iterdir())
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pneumo_edge.commands.explain import run_explain\n"
        f"c = run_explain([{str(img)!r}], {str(tiny_exported)!r}, {str(tmp_path / 'o')!r}, "
        "runtime='onnx', log=lambda m: None)\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "sys.exit(c)\n")
    env = dict(os.environ, ORT_DISABLE_TELEMETRY="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=env, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "explain.csv").is_file()


@pytest.mark.parametrize("which", ["positives", "all"])
def test_score_explain_writes_heatmaps_for_the_chosen_rows(tiny_exported, tiny_labelled,
                                                           tmp_path, which):
    import io

    from pneumo_edge.commands.score import run_score

    buf = io.BytesIO()
    s = run_score([str(tiny_labelled)], tiny_exported, runtime="onnx", quiet=True,
                  stdout=buf, explain=tmp_path / "x", explain_which=which)
    scored = list(csv.DictReader(io.StringIO(buf.getvalue().decode())))
    rows = list(csv.DictReader((tmp_path / "x" / "explain.csv").open(encoding="utf-8")))
    assert s.exit_code == 0
    assert [r["path"] for r in rows] == [r["path"] for r in scored]
    assert [r["label"] for r in rows] == [r["label"] for r in scored]
    want = [r["label"] == "PNEUMONIA" or which == "all" for r in scored]
    assert [bool(r["heatmap"]) for r in rows] == want
    assert sum(want) > 0
    pngs = sorted(p.name for p in (tmp_path / "x").glob("*.png"))
    assert pngs == sorted(r["heatmap"] for r in rows if r["heatmap"])


def test_overlay_colours_and_blend():
    from pneumo_edge.explain.overlay import Legend, blend, colormap, render

    lo, hi = colormap(np.array([0.0, 1.0]))
    assert lo[2] > lo[0] and hi[0] > hi[2]  # blue at the bottom, red at the top
    grey = np.full((8, 8), 100, np.uint8)
    np.testing.assert_array_equal(blend(grey, np.zeros((8, 8))), np.full((8, 8, 3), 100))
    heat = np.zeros((8, 8))
    heat[2, 3] = 1.0
    out = blend(grey, heat)
    assert tuple(out[2, 3]) != (100, 100, 100) and tuple(out[0, 0]) == (100, 100, 100)
    with pytest.raises(ValueError, match="non-finite"):
        blend(grey, np.full((8, 8), np.nan))
    im = render(grey, heat, Legend("what it shows", "0", "max"), ["a", "b"])
    assert im.width > 320 and im.height > 320


def test_score_explain_options_are_checked(tiny_exported, tmp_path):
    from click.testing import CliRunner

    from pneumo_edge.cli import main

    res = CliRunner().invoke(main, ["score", str(tmp_path), "--model", str(tiny_exported),
                                    "--explain", str(tmp_path / "x"), "--explain-which", "some"])
    assert res.exit_code == 2 and "--explain-which" in res.output
    res = CliRunner().invoke(main, ["score", str(tmp_path), "--model", str(tiny_exported),
                                    "-o", str(tmp_path / "o.csv"), "--resume",
                                    "--explain", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--explain cannot be combined with --resume" in res.output
    assert not (tmp_path / "x").exists()


def test_a_failing_runtime_stops_with_one_error(onnx_rt, tmp_path):
    """A runtime that raises (a mismatched or broken model) ends the run with a ModelError
    (exit 2), never a traceback and never as many error rows as there are images."""
    from pneumo_edge.errors import ModelError
    from pneumo_edge.explain.methods import Explainer

    class Broken:  # a real runtime, fed a batch of the wrong size
        name, card = onnx_rt.name, onnx_rt.card

        def __call__(self, pixels):
            return onnx_rt(pixels[:, :, :10, :10])

    with pytest.raises(ModelError, match="onnx runtime failed"):
        Explainer(Broken(), "occlusion")(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE), np.uint8))


def test_score_explain_decodes_each_file_once(tiny_exported, tiny_labelled, tmp_path,
                                              monkeypatch):
    """Issue 18: --explain takes the pixels the scoring batch decoded instead of decoding the
    file again."""
    import io

    from pneumo_edge.commands.score import run_score
    from pneumo_edge.inputs import images, pipeline

    seen = []
    real = images.load_image

    def counting(path, *a, **k):
        seen.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(images, "load_image", counting)
    monkeypatch.setattr(pipeline, "load_image", counting)
    buf = io.BytesIO()
    run_score([str(tiny_labelled)], tiny_exported, runtime="onnx", quiet=True, stdout=buf,
              explain=tmp_path / "x", explain_which="all")
    scored = list(csv.DictReader(io.StringIO(buf.getvalue().decode())))
    assert len(scored) > 2 and sorted(seen) == sorted(r["path"] for r in scored)
    assert len(list((tmp_path / "x").glob("*.png"))) == len(scored)


@pytest.mark.parametrize("command", ["explain", "score"])
@pytest.mark.parametrize("kind", ["dangling", "too long"])
def test_unusable_out_folder_is_one_line(tiny_exported, tiny_labelled, tmp_path, command,
                                         kind):
    """Issue 19: explain --out / score --explain at a dangling symbolic link or a name longer
    than the file system allows: tracebacks before, one line and exit 2 now."""
    from click.testing import CliRunner

    from pneumo_edge.cli import main

    if kind == "dangling":
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "nowhere")
    else:
        out = tmp_path / ("x" * 300)
    img = min((tiny_labelled / "PNEUMONIA").iterdir())
    args = ["explain", str(img), "--model", str(tiny_exported), "--runtime", "onnx", "--out",
            str(out)] if command == "explain" else \
        ["score", str(img), "--model", str(tiny_exported), "--runtime", "onnx", "--explain",
         str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and res.exception is None or isinstance(res.exception,
                                                                       SystemExit), res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert ("symbolic link to nothing" if kind == "dangling" else "too long") in lines[0]
    assert not (tmp_path / "nowhere").exists()

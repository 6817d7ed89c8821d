"""Shared fixtures: a tiny generated chest-X-ray-like dataset and a tiny model trained on it.

Both are session-scoped and built once per pytest run (a few seconds on 2 CPU cores). Tests must
treat them as read-only: copy ``tiny_run`` (``copy_run``) before writing into a model directory.

Disk footprint: ``copy_run`` copies only the files a model directory needs to run (never
last.pt, which holds the optimizer state and is four times model.pt); the shared fixtures'
folders are removed at the end of the session (``session_tmp``), and pyproject.toml keeps the
temporary folders of failed tests only, of the last run only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumo_edge.model import modeldir

CLASSES = ("NORMAL", "PNEUMONIA")
PER_CLASS = 16
IMAGE_SIZE = 64


def make_image(label: int, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """A grey image whose class is visible: PNEUMONIA has a bright blob, NORMAL is dark with
    faint noise. Sizes and positions vary so the images are not identical."""
    img = rng.normal(40, 12, (size, size))
    if label == 1:
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        r = rng.uniform(size / 8, size / 4)
        img += 170 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_labelled(root: Path, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    """Write ``root/{NORMAL,PNEUMONIA}/*.{png,jpeg}`` (alternating formats) and return root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = "png" if i % 2 == 0 else "jpeg"
            path = root / name / f"{name}_{i:03d}.{ext}"
            Image.fromarray(make_image(label, rng), mode="L").save(path)
    return root


def _gpu_skip_reasons() -> dict:
    """Why the ``gpu`` / ``tensorrt`` marked tests cannot run here ('' when they can)."""
    from pneumo_edge.runtimes import gpu_present, has_package

    if not gpu_present():
        gpu = "no NVIDIA GPU on this machine"
    else:
        try:
            import torch
        except ImportError:
            torch = None
        gpu = "" if torch is not None and torch.cuda.is_available() else \
            "an NVIDIA driver is loaded but torch sees no CUDA device"
    def importable(module):
        try:
            return has_package(module)
        except ModuleNotFoundError:  # parent package missing
            return False

    missing = [p for p, m in (("tensorrt", "tensorrt"), ("cuda-python", "cuda.bindings"))
               if not importable(m)]
    trt = gpu or (f"{' and '.join(missing)} not installed (pip install 'pneumo-edge[gpu]')"
                  if missing else "")
    return {"gpu": gpu, "tensorrt": trt}


def pytest_collection_modifyitems(config, items):
    """``gpu``/``tensorrt`` tests skip with the reason where they cannot run, and run (not skip)
    on a CUDA machine: ``pytest -m gpu`` there runs the GPU tests."""
    marked = [i for i in items if i.get_closest_marker("gpu") or i.get_closest_marker("tensorrt")]
    if not marked:
        return
    reasons = _gpu_skip_reasons()
    for item in marked:
        for mark in ("tensorrt", "gpu"):
            if item.get_closest_marker(mark) and reasons[mark]:
                item.add_marker(pytest.mark.skip(reason=f"{mark} test: {reasons[mark]}"))
                break


def ctrl_c_enabled() -> None:
    """``preexec_fn`` for subprocesses that get a real SIGINT: put it back to its default, as in
    a terminal. A test runner started in the background (`cmd &`, as CI may do) ignores SIGINT,
    and children inherit that, so Ctrl-C handling would never run."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory):
    """``tmp_path_factory.mktemp`` for the shared fixtures (datasets, the trained tiny models
    and their copies, exports: about 1.2 GB in all), whose folders are all removed when the
    session ends, whatever its outcome. A failed test keeps only its own ``tmp_path``
    (pyproject: the policy keeps failed tests' folders, of one run)."""
    made: list[Path] = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_dataset(session_tmp) -> Path:
    """An ImageFolder root with ``train/{NORMAL,PNEUMONIA}`` (16 images each, PNG and JPEG)."""
    root = session_tmp("tiny_data")
    write_labelled(root / "train", seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_labelled(session_tmp) -> Path:
    """A separate labelled folder ``{NORMAL,PNEUMONIA}/*`` (8 images each) for eval/parity."""
    return write_labelled(session_tmp("tiny_labelled"), per_class=8, seed=1)


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, session_tmp) -> Path:
    """A trained model directory (resnet18, 64 px, 2 epochs; card.json + model.pt) that
    separates the two classes cleanly (probabilities far from the threshold, so fp16 parity is
    not at the mercy of a coin flip). Read-only for tests: ``copy_run`` gives a writable copy."""
    pytest.importorskip("torch", reason="training the tiny model needs torch")
    from pneumo_edge.train.loop import TrainConfig, train

    out = session_tmp("tiny_run")
    train(TrainConfig(data=str(tiny_dataset), out=str(out), arch="resnet18",
                      image_size=IMAGE_SIZE, epochs=2, min_epochs=1, workers=0, device="cpu",
                      # small batches: enough BatchNorm updates for sane eval-mode statistics
                      batch_size=4, augment=False, amp=False, force=True,
                      # a threshold picked by F1 sits midway between two neighbouring validation
                      # scores, which on ten images can be 1e-4 apart: fp16 parity would then
                      # hinge on rounding. 0.5 keeps the tests about parity, not about that gap.
                      threshold_for="fixed:0.5",
                      # a model directory as made before issue 20 (no calibration, no gate):
                      # what most tests run; tests/test_calibration.py calibrates copies
                      calibrate=False))
    return out


#: what a copied model directory holds by default: the card, every runnable form, the engine's
#: sidecar and the parity report (not last.pt, the training history or the plots)
RUN_FILES = (modeldir.CARD_JSON, *(f.file for f in modeldir.FORMS), modeldir.SIDECAR,
             modeldir.PARITY_JSON)


def copy_model_dir(src: Path, dst: Path, files=RUN_FILES) -> Path:
    """Copy those of ``files`` that ``src`` has into a new folder ``dst``."""
    dst.mkdir(parents=True)
    for name in files:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    return dst


@pytest.fixture
def copy_run(tiny_run, tmp_path):
    """A function that copies the tiny model directory (default ``tiny_run``; any exported
    files it has come along) to a fresh writable folder and returns its path. ``files``: the
    file names to copy (default RUN_FILES); a second call returns a second folder."""
    count = iter(range(1000))

    def copy(src: Path | None = None, files=RUN_FILES) -> Path:
        n = next(count)
        return copy_model_dir(src or tiny_run, tmp_path / ("run" if n == 0 else f"run{n}"),
                              files)

    return copy


@pytest.fixture(scope="session")
def tiny_exported(tiny_run, session_tmp) -> Path:
    """A copy of ``tiny_run`` after ``pneumo-edge export`` (model.onnx, model.fp16.onnx,
    parity.json on the card's validation split). Read-only for tests."""
    pytest.importorskip("onnx", reason="export needs onnx")
    pytest.importorskip("onnxruntime", reason="parity needs onnxruntime")
    from pneumo_edge.export.main import run_export

    out = copy_model_dir(tiny_run, session_tmp("tiny_exported") / "run")
    code = run_export(out)
    assert code == 0, "export of the tiny model failed parity"
    return out


@pytest.fixture(scope="session")
def tiny_verified(tiny_exported, session_tmp) -> Path:
    """A copy of ``tiny_exported`` whose parity.json holds evidence ``auto`` accepts: parity on
    modeldir.MIN_PARITY_IMAGES images (tiny_exported's card split is too small, so there auto
    runs fp32 and says the reduced-precision forms are not verified). The images are copies of
    the ten per class the tiny model ranks most clearly (lowest / highest positive
    probability), so INT8 rounding cannot flip a label or a ranking: the fixture tests auto's
    rules, not the tiny model's margins. Read-only for tests."""
    from pneumo_edge.export.main import check_parity
    from pneumo_edge.export.parity import parity_images

    from pneumo_edge.inputs.images import load_image
    from pneumo_edge.runtimes import open_form

    root = session_tmp("tiny_verified")
    want = -(-modeldir.MIN_PARITY_IMAGES // len(CLASSES))
    candidates = write_labelled(root / "candidates", per_class=40, seed=2)
    torch_rt = open_form(tiny_exported, "torch", device="cpu")
    positive = torch_rt.card.positive_index
    for name in CLASSES:
        files = sorted((candidates / name).iterdir())
        p = torch_rt(np.stack([load_image(f, IMAGE_SIZE) for f in files]))[:, positive]
        order = np.argsort(-p if CLASSES.index(name) == positive else p, kind="stable")
        (root / "parity" / name).mkdir(parents=True)
        for i in range(want):
            f = files[order[i % 10]]
            shutil.copy2(f, root / "parity" / name / f"{i:03d}_{f.name}")
    out = copy_model_dir(tiny_exported, root / "run")
    card = modeldir.read_card(out)
    assert check_parity(out, card, parity_images(card, root / "parity")) == 0, "parity failed"
    return out

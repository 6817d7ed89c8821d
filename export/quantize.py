"""model.onnx -> model.int8.onnx: onnxruntime static INT8 quantization, calibrated on training
images.

The recipe (each choice measured on the default-recipe ResNet50; figures in export/INT8.md):

- onnxruntime's pre-processing step first (symbolic shape inference and graph clean-up), then
  static quantization in QDQ format: weights s8 per output channel, activations u8, MinMax
  calibration over images, not over a batch: each activation's range covers every calibration
  image's own range but those of the most extreme 1 % (at least one image) on either side
  (:func:`image_ranges`). One training film whose last-block activations ran 8x higher than
  the other 127 set the plain MinMax ranges of the default ResNet50 of 2026-12-01, and its
  INT8 file then flagged 99.6 % of the validation images out of distribution. u8 activations
  are what onnxruntime's x86 kernels (VNNI/AMX) run fastest.
- What stays float: the graph's start (uint8 -> float cast, the per-image or ImageNet
  normalisation, the grey -> 3-channel expand) and its end (the classifier Gemm and the
  softmax). The normalised image feeds the first quantized Conv; the pooled features are
  dequantized before the classifier, so the logits and probabilities a clinician reads are
  computed in float from int8 features, never rounded to an 8-bit grid.
- Calibration images come from the training split recorded in the card, never from the
  validation images parity runs on, are decoded by pneumo_edge.inputs.images (the one
  preprocessing), and are sampled class-balanced (both classes represented however unbalanced
  the split is), deterministically under the card's seed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumo_edge.errors import DataError, ModelError
from pneumo_edge.inputs.folders import scan_labelled
from pneumo_edge.inputs.pipeline import decode_labelled
from pneumo_edge.model import modeldir
from pneumo_edge.model.card import Card

#: calibration images by default (class-balanced); chosen by measurement (export/INT8.md)
DEFAULT_CALIB_IMAGES = 128
CALIB_METHODS = ("minmax", "percentile", "entropy")
#: the hidden working folder quantization writes in, beside the output: WORK_PREFIX + pid + "."
WORK_PREFIX = ".int8-work."
#: MinMax ranges leave out this share of the calibration images (at least one) on either side
RANGE_DROP_SHARE = 0.01


@dataclass
class QuantOptions:
    # (default and help: what `pneumo-edge export --help` shows for --calib-*)
    calib_images: int = field(default=DEFAULT_CALIB_IMAGES, metadata={
        "help": "INT8 calibration images, class-balanced, from the card's training split."})
    method: str = field(default="minmax", metadata={"help": "INT8 activation range calibration."})
    # labelled FOLDER/CLASS/*; default: the card's training split
    calib_data: str | None = field(default=None, metadata={
        "help": "Labelled folder FOLDER/CLASS/* of training images to calibrate INT8 on, when "
                "the card's training images are not on this machine."})
    batch: int = 16

    def validate(self) -> None:
        if self.calib_images < 2:
            raise DataError(f"--calib-images {self.calib_images}: needs at least 2 images "
                            "(one per class)")
        if self.method not in CALIB_METHODS:
            raise DataError(f"unknown calibration method {self.method!r}; choose one of "
                            f"{', '.join(CALIB_METHODS)}")


def training_samples(card: Card, calib_data=None) -> tuple[list, str]:
    """(labelled samples to calibrate on, where they came from): ``calib_data`` or the card's
    training split (DATA/train minus the recorded validation and test files)."""
    if calib_data is not None:
        return scan_labelled(calib_data, card.classes).samples, os.path.abspath(calib_data)
    split = card.split or {}
    root = split.get("data")
    ask = "pass --calib-data FOLDER (training images FOLDER/CLASS/*) or --no-int8"
    if not root or "val_files" not in split:
        raise DataError(f"the model card records no training split to calibrate INT8 on; {ask}")
    if not os.path.isdir(os.path.join(root, "train")):
        raise DataError(f"{root}/train: the card's training images are not on this machine; "
                        f"{ask}")
    held_out = set(split.get("val_files") or []) | set(split.get("test_files") or [])
    samples = [(p, y) for p, y in scan_labelled(os.path.join(root, "train"), card.classes).samples
               if os.path.relpath(p, root) not in held_out]
    return samples, f"training split of {root}"


def pick_balanced(samples: list, n: int, n_classes: int, seed: int) -> list:
    """Up to ``n`` samples, as many of each class as possible (ceil(n / classes) each, the
    remainder from the larger classes), in a seeded random order; every class present."""
    rng = np.random.default_rng(seed)
    by_class = [[s for s in samples if s[1] == c] for c in range(n_classes)]
    missing = [c for c, group in enumerate(by_class) if not group]
    if missing:
        raise DataError(f"calibration needs images of every class; none of class index "
                        f"{missing[0]} among {len(samples)} training images")
    for group in by_class:
        rng.shuffle(group)
    share = -(-n // n_classes)
    picked = [s for group in by_class for s in group[:share]]
    rest = [s for group in by_class for s in group[share:]]
    picked = (picked + rest)[:n]
    order = rng.permutation(len(picked))
    return [picked[i] for i in order]


def calibration_pixels(card: Card, opts: QuantOptions, warn=None) -> tuple[np.ndarray, dict]:
    """Decoded calibration images (uint8 [N, 1, S, S]) and a record of them for parity.json."""
    samples, source = training_samples(card, opts.calib_data)
    seed = int((card.split or {}).get("seed", (card.train_config or {}).get("seed", 0)))
    chosen = pick_balanced(samples, opts.calib_images, len(card.classes), seed)
    pixels, labels, failed = decode_labelled(chosen, card.image_size)
    for f in failed[:5]:
        (warn or _warn)(f"int8 calibration: skipping {f}")
    if len(set(labels.tolist())) < len(card.classes):
        raise DataError(f"{source}: the decodable calibration images do not cover every class")
    counts = np.bincount(labels, minlength=len(card.classes)).tolist()
    return pixels, {"source": source, "count": len(pixels), "seed": seed,
                    "per_class": dict(zip(card.classes, counts)), "method": opts.method,
                    **({"ranges": f"per image; the most extreme {RANGE_DROP_SHARE:.0%} of the "
                                  "images (at least one) left out on either side"}
                       if opts.method == "minmax" else {}),
                    "skipped_unreadable": len(failed)}


def float_nodes(proto) -> list[str]:
    """Names of the nodes that stay float: everything before the first Conv (cast and
    normalisation) and every node no Conv depends on: the last block's residual sum, the
    pooling, the classifier, the calibration map, the softmax and the gate, including the
    first stage's pooled features and their distance, which branch off mid-network and may
    come before the last Conv in the file's order (the gate's 2048 x 2048 whitening is ~8
    million multiply-adds per image for a ResNet50, ~0.2 % of its convolutions' ~4 billion).
    Quantized, the tail rounds the logits and the calibrated logits to an 8-bit grid before
    the softmax, and the gate's whitened features and their squares too: on the real ResNet50
    its INT8 file then flagged 22 of 782 validation images differently from torch (the first
    stage's distance, quantized, 8 of 782)."""
    kinds = [n.op_type for n in proto.graph.node]
    if "Conv" not in kinds:
        raise ModelError("the ONNX graph has no Conv node to quantize")
    first = kinds.index("Conv")
    feeds = _feeding_convs(proto.graph.node)
    return [n.name for i, n in enumerate(proto.graph.node)
            if i < first or (n.op_type != "Conv" and n.name not in feeds)]


def _feeding_convs(nodes) -> set[str]:
    """Names of the nodes a Conv depends on (directly or through other nodes)."""
    producer = {o: n for n in nodes for o in n.output}
    seen: set[str] = set()
    todo = [n for n in nodes if n.op_type == "Conv"]
    while todo:
        for name in todo.pop().input:
            up = producer.get(name)
            if up is not None and up.name not in seen:
                seen.add(up.name)
                todo.append(up)
    return seen


def image_ranges(model_path, pixels: np.ndarray, input_name: str) -> dict:
    """{activation: (rmin, rmax)} for every float tensor the graph at ``model_path`` computes:
    per calibration image its minimum and maximum, then the range that covers all images but
    the ``RANGE_DROP_SHARE`` most extreme (at least one) on each side, so one outlier film
    cannot widen a range for all the others (the quantization step grows with the range)."""
    import math

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    proto = onnx.load(os.fspath(model_path))
    made = {o for node in proto.graph.node for o in node.output}
    names = [v.name for v in proto.graph.value_info
             if v.name in made and v.type.tensor_type.elem_type == TensorProto.FLOAT]
    first = len(proto.graph.output)
    for name in names:
        for op in ("ReduceMin", "ReduceMax"):
            proto.graph.node.append(helper.make_node(op, [name], [f"{name}.{op}"], keepdims=0))
            proto.graph.output.append(
                helper.make_tensor_value_info(f"{name}.{op}", TensorProto.FLOAT, []))
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    per = np.array([session.run(None, {input_name: pixels[i:i + 1]})[first:]
                    for i in range(len(pixels))], dtype=np.float64)  # [images, 2 * tensors]
    drop = min(max(1, math.ceil(RANGE_DROP_SHARE * len(pixels))), len(pixels) - 1)
    lows = np.sort(per[:, 0::2], axis=0)[drop]
    highs = np.sort(per[:, 1::2], axis=0)[len(pixels) - 1 - drop]
    return {n: (float(lo), float(hi)) for n, lo, hi in zip(names, lows, highs)}


def _overrides(ranges: dict) -> dict:
    """quantize_static's TensorQuantOverrides for ``ranges`` (zero always inside, as its own
    MinMax keeps it)."""
    return {n: [{"rmin": np.float32(min(lo, 0.0)), "rmax": np.float32(max(hi, 0.0))}]
            for n, (lo, hi) in ranges.items()}


class _Batches:
    """onnxruntime.quantization's calibration data reader protocol over a pixel array."""

    def __init__(self, input_name: str, pixels: np.ndarray, batch: int):
        self.input_name, self.pixels, self.batch, self.i = input_name, pixels, batch, 0

    def get_next(self):
        if self.i >= len(self.pixels):
            return None
        x = self.pixels[self.i:self.i + self.batch]
        self.i += self.batch
        return {self.input_name: np.ascontiguousarray(x)}

    def rewind(self):
        self.i = 0


def quantize_int8(fp32_path, out_path, card: Card, pixels: np.ndarray, *,
                  weights_sha256: str, opts: QuantOptions) -> Path:
    """Quantize the exported ``fp32_path`` with calibration ``pixels``; write ``out_path``
    atomically with the card in its metadata. The intermediate models (as large as the fp32
    model) live in a hidden working folder beside ``out_path``, removed however this ends;
    one a killed process left is removed by the next export (:func:`export.main.remove_stale`)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )
    from pneumo_edge.export.onnx import INPUT_NAME, add_card, check_onnx

    out_path = Path(out_path)
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}.", dir=out_path.parent))
    pre, raw = work / "pre.onnx", work / "quantized.onnx"
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[opts.method]
    try:
        # the quantization tools log progress on stdout, which belongs to the parity table
        with contextlib.redirect_stdout(sys.stderr):
            quant_pre_process(os.fspath(fp32_path), os.fspath(pre), skip_optimization=False)
            keep_float = float_nodes(onnx.load(os.fspath(pre)))
            extra = ({"TensorQuantOverrides": _overrides(image_ranges(pre, pixels, INPUT_NAME))}
                     if opts.method == "minmax" else {})
            quantize_static(
                os.fspath(pre), os.fspath(raw), _Batches(INPUT_NAME, pixels, opts.batch),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=method, nodes_to_exclude=keep_float,
                calibration_providers=["CPUExecutionProvider"], extra_options=extra)
        proto = onnx.load(os.fspath(raw))
    except (ModelError, DataError):
        raise
    except Exception as exc:  # the quantization tools raise many types; say it in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"{out_path}: INT8 quantization failed: {first[:200]}") from None
    finally:  # Ctrl-C and SIGTERM too (export turns SIGTERM into KeyboardInterrupt)
        shutil.rmtree(work, ignore_errors=True)
    add_card(proto, card, weights_sha256)
    check_onnx(proto, card, half=False, shown=out_path)
    return modeldir.write_bytes_atomic(out_path, proto.SerializeToString())


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)

"""torch -> ONNX: ``model.onnx`` (fp32) and ``model.fp16.onnx`` (fp16 weights and compute).

Both take ``image`` uint8 ``[N, 1, S, S]`` and return ``probs`` float32 ``[N, C]`` with a dynamic
batch dimension ``N`` and, when the network has an input quality gate (the card's ``net`` option
``ood``), a second output ``ood`` float32 ``[N]`` (the out-of-distribution score,
:meth:`pneumo_edge.model.net.XrayNet.outputs`); normalisation, calibration and softmax are
inside the graph (XrayNet), and the model
card travels in ``metadata_props`` (with the sha256 of the model.pt it came from; the keys are
:mod:`pneumo_edge.model.modeldir`'s).

Exporter and opset: the torch.export-based exporter (``dynamo=True``) at opset 18.
- torch 2.15 still accepts ``dynamo=False`` but warns that the TorchScript exporter will be
  removed, so new code should not depend on it.
- 18 is the lowest opset the dynamo exporter emits natively (lower ones go through the ONNX
  version converter). onnxruntime 1.17+ runs it, and TensorRT's ONNX parser covers opsets 9 to 20+
  in 10.x (JetPack 6) and up to 25 in 11.x, so one file serves onnxruntime, TensorRT 10 and 11.
- The graph uses only Conv, Relu, Add, MaxPool, ReduceMean, Reshape, Gemm, Mul, Expand, Cast and
  Softmax (BatchNorm folded into Conv), all plain for both runtimes.
``external_data=False`` keeps the weights inside the one file (a ResNet50 is ~100 MB, far below
protobuf's 2 GB limit).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
from pathlib import Path

from pneumo_edge.export.tensorrt import uint8_input_problems

from pneumo_edge.errors import ModelError
from pneumo_edge.model import modeldir
from pneumo_edge.model.card import Card

CARD_KEY = modeldir.ONNX_CARD_KEY
DEFAULT_OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAME = "probs"
OOD_NAME = "ood"
BATCH_DIM = "N"


def export_onnx(model, card: Card, path: str | os.PathLike, *, weights_sha256: str,
                half: bool = False, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` (an XrayNet) to ``path``, check the result, then write it atomically.
    ``weights_sha256``: of the model.pt the weights came from (recorded in the metadata)."""
    import onnx

    path = Path(path)
    scratch = path.with_name(f".{path.name}.export{os.getpid()}")
    try:
        _torch_export(model, card, scratch, half=half, opset=opset, shown=path)
        proto = onnx.load(os.fspath(scratch))
    finally:
        scratch.unlink(missing_ok=True)
    add_card(proto, card, weights_sha256)
    check_onnx(proto, card, half=half, shown=path)
    return modeldir.write_bytes_atomic(path, proto.SerializeToString())


def _torch_export(model, card: Card, dest: Path, *, half: bool, opset: int, shown: Path) -> None:
    """torch.onnx.export of a copy of ``model`` (fp16 when ``half``) to ``dest``."""
    import torch

    net = copy.deepcopy(model).cpu().eval()
    net = net.half() if half else net.float()
    names = output_names(card)
    if len(names) == 2:
        net = _both_outputs(net)
    example = torch.zeros(2, 1, card.image_size, card.image_size, dtype=torch.uint8)
    batch = torch.export.Dim(BATCH_DIM, min=1, max=65536)
    # the exporter reports progress on stdout, which belongs to the parity table
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                net, (example,), dest, dynamo=True, opset_version=opset,
                external_data=False, input_names=[INPUT_NAME], output_names=names,
                dynamic_shapes={"image": {0: batch}}, verbose=False)
        except Exception as exc:  # noqa: BLE001 -- the exporter raises many types; one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"{shown}: torch.onnx.export (opset {opset}) failed: "
                             f"{first[:200]}") from None


def output_names(card: Card) -> list[str]:
    """``probs``, and ``ood`` when the card's network has a gate."""
    return [OUTPUT_NAME, OOD_NAME] if has_gate(card) else [OUTPUT_NAME]


def has_gate(card: Card) -> bool:
    return card.net.get("ood", "none") != "none"


def _both_outputs(net):
    """``net`` (an XrayNet) as a module whose ``forward`` is its ``outputs`` (probs, ood)."""
    import torch

    class BothOutputs(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, image):
            return self.inner.outputs(image)

    return BothOutputs(net)


def add_card(proto, card: Card, weights_sha256: str) -> None:
    """Put the card and the weights' sha256 into ``metadata_props`` (replacing older ones) and
    name the producer."""
    meta = modeldir.onnx_metadata(card, weights_sha256)
    props = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(props)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"pneumo-edge {card.arch} {card.image_size}px, classes {card.classes}"


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """An ONNX file's metadata_props (no weights are loaded)."""
    import onnx

    proto = onnx.load(os.fspath(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def read_card(path: str | os.PathLike) -> Card:
    """The card stored in an ONNX file's metadata."""
    return modeldir.onnx_card(path, read_metadata(path))


def check_onnx(proto, card: Card, *, half: bool, shown: str | os.PathLike = "") -> None:
    """onnx.checker plus the contract: names, dtypes, dynamic batch, and (fp16) fp16 compute."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{shown}: onnx.checker rejects it: {str(exc).splitlines()[0]}") from None
    io = _io_spec(proto)
    want = {"inputs": [(INPUT_NAME, "UINT8", [BATCH_DIM, 1, card.image_size, card.image_size])],
            "outputs": [(OUTPUT_NAME, "FLOAT", [BATCH_DIM, len(card.classes)])]
            + ([(OOD_NAME, "FLOAT", [BATCH_DIM])] if has_gate(card) else [])}
    if io != want:
        raise ModelError(f"{shown}: inputs/outputs are {io}, expected {want}")
    problems = uint8_input_problems(proto)
    if problems:
        raise ModelError(f"{shown}: {problems[0]}")
    if half:
        problems = fp16_problems(proto)
        if problems:
            raise ModelError(f"{shown}: not an fp16 graph: {problems[0]}")


def _io_spec(proto) -> dict:
    import onnx

    def spec(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append((v.name, onnx.TensorProto.DataType.Name(t.elem_type), dims))
        return out

    return {"inputs": spec(proto.graph.input), "outputs": spec(proto.graph.output)}


def fp16_problems(proto) -> list[str]:
    """Why a graph does not compute in fp16 (empty when it does): every floating initializer
    is fp16, and every Conv/Gemm/MatMul works on fp16 tensors."""
    import onnx

    T = onnx.TensorProto
    problems = [f"initializer {i.name} is {T.DataType.Name(i.data_type)}"
                for i in proto.graph.initializer if i.data_type in (T.FLOAT, T.DOUBLE, T.BFLOAT16)]
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    heavy = [n for n in inferred.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    if not heavy:
        problems.append("no Conv/Gemm/MatMul nodes")
    for n in heavy:
        bad = [t for t in (*n.input, *n.output) if t and types.get(t) != T.FLOAT16]
        if bad:
            problems.append(f"{n.op_type} node {n.name} has non-fp16 tensor {bad[0]}")
    return problems

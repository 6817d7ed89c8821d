"""The TensorRT runtime: ``model.fp16.engine`` on an NVIDIA GPU, no torch.

An engine only runs on the GPU model and TensorRT version that built it, so it carries a sidecar
``model.fp16.engine.json`` (written by ``pneumo-edge export --trt``) and this runtime refuses an
engine whose sidecar does not match this machine, or whose source ONNX has changed since. Device
memory and the stream come from cuda-python (``cuda.bindings.runtime``); TensorRT's name-based
tensor API (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) runs it, which is
the same in TensorRT 10 and 11.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pneumo_edge import modeldir
from pneumo_edge.errors import ModelError, RuntimeUnavailable

INSTALL_HINT = "on an NVIDIA machine: pip install 'pneumo-edge[gpu]'"


def rebuild(engine_path) -> str:
    return f"rebuild it here with: pneumo-edge export {Path(engine_path).parent} --trt"


def sidecar_mismatch(meta: dict, here: dict) -> str:
    """Why an engine described by ``meta`` cannot run on the platform ``here`` ('' if it can).
    Both are dicts with ``tensorrt``, ``gpu`` and ``compute_capability``."""
    for key, what in (("tensorrt", "TensorRT"), ("gpu", "GPU"),
                      ("compute_capability", "compute capability")):
        if str(meta.get(key)) != str(here.get(key)):
            return (f"built for {what} {meta.get(key)!s}, this machine has {here.get(key)!s}")
    return ""


def check_sidecar(engine_path, meta: dict, here: dict) -> None:
    """Refuse (ModelError) an engine built elsewhere or from an older model.fp16.onnx."""
    why = sidecar_mismatch(meta, here)
    if not why:
        why = modeldir.stale_source(engine_path, meta)
    if why:
        raise ModelError(f"{engine_path}: {why}; {rebuild(engine_path)}")


def import_gpu_packages():
    """(tensorrt, cuda.bindings.runtime), or RuntimeUnavailable saying how to get them."""
    try:
        import tensorrt as trt
    except ImportError:
        raise RuntimeUnavailable(f"tensorrt is not installed ({INSTALL_HINT})") from None
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise RuntimeUnavailable(f"cuda-python is not installed ({INSTALL_HINT})") from None
    return trt, cudart


def cuda_call(result):
    """Unpack a cuda-python call's (error, value...) tuple; raise on an error."""
    from cuda.bindings import runtime as cudart

    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        raise RuntimeUnavailable(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    return rest[0] if len(rest) == 1 else (tuple(rest) or None)


def current_platform() -> dict:
    """This machine's TensorRT version, GPU name and compute capability (device 0 or current)."""
    trt, cudart = import_gpu_packages()
    try:
        dev = cuda_call(cudart.cudaGetDevice())
        prop = cuda_call(cudart.cudaGetDeviceProperties(dev))
    except RuntimeUnavailable as exc:
        raise RuntimeUnavailable(f"no usable NVIDIA GPU ({exc})") from None
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return {"tensorrt": trt.__version__, "gpu": name.strip("\x00 "), "device": int(dev),
            "compute_capability": f"{prop.major}.{prop.minor}"}


class TensorRTRuntime:
    name = "trt"

    def __init__(self, engine_path, card=None):
        """``card``: card.json's card (None: read it from the engine's directory; without
        card.json the card in the sidecar is used). Everything that can be checked without a
        GPU is checked first: the sidecar, its card against card.json, the weights."""
        self.path, self.precision = Path(engine_path), "fp16"
        meta = modeldir.read_sidecar(engine_path)  # no sidecar: refuse before touching the GPU
        self.card = checked_card(engine_path, meta, card)
        trt, cudart = import_gpu_packages()
        self._cudart = cudart
        here = current_platform()
        check_sidecar(engine_path, meta, here)
        data = modeldir.read_regular(engine_path)  # one read: what runs is what is hashed
        self.sha256 = hashlib.sha256(data).hexdigest()
        # the TensorRT runtime must outlive the engine it deserialised: keep both
        self._trt_runtime, self.engine = _deserialize(trt, engine_path, data)
        self.context = self.engine.create_execution_context()
        self.input, self.output = _io_names(trt, self.engine, engine_path)
        shapes = self.engine.get_tensor_profile_shape(self.input, 0)  # (min, opt, max)
        self.min_batch, self.max_batch = int(shapes[0][0]), int(shapes[2][0])
        self.device = f"cuda:{here['device']} ({here['gpu']})"
        self._stream = cuda_call(cudart.cudaStreamCreate())
        s, card = self.card.image_size, self.card
        self._d_in = cuda_call(cudart.cudaMalloc(self.max_batch * s * s))
        self._d_out = cuda_call(cudart.cudaMalloc(self.max_batch * len(card.classes) * 4))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.uint8)
        parts = [self._run(x[i:i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.card.classes)), np.float32)

    def _run(self, x: np.ndarray) -> np.ndarray:
        cudart, n = self._cudart, len(x)
        if n < self.min_batch:  # the profile does not accept it: pad, then drop the padding
            x = np.concatenate([x, np.zeros((self.min_batch - n, *x.shape[1:]), np.uint8)])
        self.context.set_input_shape(self.input, tuple(x.shape))
        out = np.empty(tuple(self.context.get_tensor_shape(self.output)), np.float32)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(cudart.cudaMemcpyAsync(self._d_in, x.ctypes.data, x.nbytes, h2d, self._stream))
        self.context.set_tensor_address(self.input, self._d_in)
        self.context.set_tensor_address(self.output, self._d_out)
        if not self.context.execute_async_v3(int(self._stream)):  # a cudaStream_t -> its handle
            raise ModelError("TensorRT failed to run the engine (see its log above)")
        cuda_call(cudart.cudaMemcpyAsync(out.ctypes.data, self._d_out, out.nbytes, d2h,
                                         self._stream))
        cuda_call(cudart.cudaStreamSynchronize(self._stream))
        return out[:n]

    def close(self) -> None:
        cudart = getattr(self, "_cudart", None)
        for attr in ("_d_in", "_d_out"):
            if getattr(self, attr, None) is not None:
                cudart.cudaFree(getattr(self, attr))
                setattr(self, attr, None)
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: cuda-python may already be gone
            pass


def checked_card(engine_path, meta: dict, card):
    """card.json's card (``card``, or read from the directory) after checking it against the
    card in the sidecar, and the sidecar's weights sha256 against the model.pt beside it."""
    side = modeldir.sidecar_path(engine_path)
    embedded = modeldir.sidecar_card(engine_path, meta)
    if card is None:
        card = modeldir.directory_card(engine_path)
    card = modeldir.agreed_card(engine_path, embedded, card, embedded_in=side)
    modeldir.check_weights(engine_path, meta.get("weights_sha256"), recorded_in=side)
    return card


def _deserialize(trt, engine_path, data: bytes):
    logger = trt.Logger(trt.Logger.ERROR)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise ModelError(f"{engine_path}: TensorRT cannot load this engine; {rebuild(engine_path)}")
    return runtime, engine


def _io_names(trt, engine, engine_path) -> tuple[str, str]:
    """The one uint8 input and one float32 output of a pneumo-edge engine."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if len(ins) != 1 or len(outs) != 1:
        raise ModelError(f"{engine_path}: expected one input and one output, has {names}")
    if engine.get_tensor_dtype(ins[0]) != trt.DataType.UINT8 or \
            engine.get_tensor_dtype(outs[0]) != trt.DataType.FLOAT:
        raise ModelError(f"{engine_path}: expected uint8 input and float32 output; "
                         f"{rebuild(engine_path)}")
    return ins[0], outs[0]

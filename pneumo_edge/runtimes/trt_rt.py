"""The TensorRT runtime: ``model.fp16.engine`` on an NVIDIA GPU, no torch.

An engine only runs on the GPU model and TensorRT version that built it, so it carries a sidecar
``model.fp16.engine.json`` (written by ``pneumo-edge export --trt``) and this runtime refuses an
engine whose sidecar does not match this machine, or whose source ONNX has changed since. Device
memory (pinned host buffers, device buffers) and the stream come from cuda-python
(``cuda.bindings.runtime``); TensorRT's name-based tensor API (``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``) runs it, which is the same in TensorRT 10 and 11.
The buffer, padding and batch-splitting logic (:class:`EngineIO`) takes the execution context
and the memory as arguments, so it is tested with numpy stand-ins on a CPU and with real CUDA
memory by ``benchmarks/gpu_check.py`` where tensorrt is absent.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pneumo_edge.errors import ModelError, RuntimeUnavailable
from pneumo_edge.model import modeldir
from pneumo_edge.runtimes import GPU_HINT, parse_device

INSTALL_HINT = GPU_HINT


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

    def __init__(self, engine_path, card=None, device: str | None = None):
        """``card``: card.json's card (None: read it from the engine's directory; without
        card.json the card in the sidecar is used); ``device``: None/``auto``/``cuda`` (the
        current CUDA device) or ``cuda:N``. Everything that can be checked without a GPU is
        checked first: the sidecar, its card against card.json, the weights; then the
        engine's tensor shapes against the card, before any buffer is sized from it."""
        self.path, self.precision = Path(engine_path), "fp16"
        kind, index = parse_device(device)
        if kind == "cpu":
            raise RuntimeUnavailable("trt runs on the GPU its engine was built for, not on cpu")
        meta = modeldir.read_sidecar(engine_path)  # no sidecar: refuse before touching the GPU
        data = modeldir.read_regular(engine_path)  # one read: what runs is what is hashed
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.verified = modeldir.verify_file(
            engine_path, self.sha256, modeldir.sidecar_card(engine_path, meta),
            meta.get("weights_sha256"), card, embedded_in=modeldir.sidecar_path(engine_path))
        self.card = self.verified.card
        trt, cudart = import_gpu_packages()
        if index is not None:
            cuda_call(cudart.cudaSetDevice(index))
        here = current_platform()
        check_sidecar(engine_path, meta, here)
        # the TensorRT runtime must outlive the engine it deserialised: keep both
        self._trt_runtime, self.engine = _deserialize(trt, engine_path, data)
        self.input, self.output, extras = _io_names(trt, self.engine, engine_path)
        self.min_batch, self.max_batch = check_engine_shapes(
            engine_path, _dims(self.engine.get_tensor_shape(self.input)),
            _dims(self.engine.get_tensor_shape(self.output)),
            [_dims(d) for d in self.engine.get_tensor_profile_shape(self.input, 0)], self.card)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise ModelError(f"{engine_path}: TensorRT could not create an execution context "
                             f"(out of GPU memory?)")
        self.device = f"cuda:{here['device']} ({here['gpu']})"
        self._io = EngineIO(self.context, CudartMemory(cudart), self.input, self.output,
                            self.card.image_size, len(self.card.classes), self.min_batch,
                            self.max_batch, engine_path, extra_outputs=extras)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, C]``."""
        return self._io(batch)

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """``probs`` ``[N, C]`` and every further output tensor of the engine by name, ``[N]``."""
        return self._io.outputs(batch)

    def close(self) -> None:
        io = getattr(self, "_io", None)
        if io is not None:
            io.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001,S110 -- interpreter shutdown: cuda-python may be gone
            pass


def _dims(dims) -> tuple[int, ...]:
    """A TensorRT Dims (or any sequence of ints) as a tuple of ints."""
    return tuple(int(d) for d in dims)


def check_engine_shapes(engine_path, in_shape, out_shape, profile, card) -> tuple[int, int]:
    """(min batch, max batch) of an engine whose input is ``in_shape`` (``-1`` batch),
    output ``out_shape`` and first optimisation profile ``profile`` (min, opt, max input
    shapes), after checking them against the card; a stale engine (another image size or class
    count) is refused here, before buffers sized from the card could be overrun."""
    s, c = card.image_size, len(card.classes)
    want_in, want_out = (1, s, s), (c,)
    problem = ""
    if len(in_shape) != 4 or tuple(in_shape[1:]) != want_in:
        problem = f"input is {list(in_shape)}, the card needs [N, 1, {s}, {s}]"
    elif len(out_shape) != 2 or tuple(out_shape[1:]) != want_out:
        problem = f"output is {list(out_shape)}, the card has {c} classes"
    elif len(profile) != 3 or any(len(p) != 4 or tuple(p[1:]) != want_in for p in profile):
        problem = f"optimisation profile {[list(p) for p in profile]} does not fit [N, 1, {s}, {s}]"
    elif not 1 <= profile[0][0] <= profile[1][0] <= profile[2][0]:
        problem = f"optimisation profile batch sizes {[p[0] for p in profile]} are not ordered"
    if problem:
        raise modeldir.Refused(f"{engine_path}: {problem}; {rebuild(engine_path)}")
    return int(profile[0][0]), int(profile[2][0])


class CudartMemory:
    """Pinned host buffers, device buffers and one stream from cuda-python's runtime API.

    The interface :class:`EngineIO` uses (a stand-in backed by numpy or torch can replace it):
    ``host(nbytes)`` -> a writable numpy uint8 array in page-locked memory, ``device(nbytes)``
    -> a device pointer (int), ``h2d(dptr, host_array)``, ``d2h(host_array, dptr)`` (both
    asynchronous on ``stream``), ``sync()``, ``stream`` (the handle TensorRT takes), ``close()``.
    """

    def __init__(self, cudart):
        self._cudart, self._host, self._dev = cudart, [], []
        self._stream = cuda_call(cudart.cudaStreamCreate())
        self.stream = int(self._stream)  # a cudaStream_t -> its handle

    def host(self, nbytes: int) -> np.ndarray:
        import ctypes

        ptr = cuda_call(self._cudart.cudaMallocHost(nbytes))
        self._host.append(ptr)
        return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(int(ptr)), np.uint8)

    def device(self, nbytes: int) -> int:
        ptr = cuda_call(self._cudart.cudaMalloc(nbytes))
        self._dev.append(ptr)
        return int(ptr)

    def h2d(self, dptr: int, src: np.ndarray) -> None:
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_call(self._cudart.cudaMemcpyAsync(dptr, src.ctypes.data, src.nbytes, kind,
                                               self._stream))

    def d2h(self, dst: np.ndarray, dptr: int) -> None:
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(self._cudart.cudaMemcpyAsync(dst.ctypes.data, dptr, dst.nbytes, kind,
                                               self._stream))

    def sync(self) -> None:
        cuda_call(self._cudart.cudaStreamSynchronize(self._stream))

    def close(self) -> None:
        cudart = self._cudart
        if self._stream is not None:
            cudart.cudaStreamSynchronize(self._stream)
        while self._dev:
            cudart.cudaFree(self._dev.pop())
        while self._host:
            cudart.cudaFreeHost(self._host.pop())
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None


class EngineIO:
    """Runs uint8 ``[N, 1, S, S]`` batches of any size through an execution context with
    buffers sized once for ``max_batch``: splits a batch into chunks of at most ``max_batch``,
    pads a chunk smaller than ``min_batch`` with zero images (dropped from the result), checks
    every shape TensorRT reports, and copies each result out of the reused pinned buffers.
    Outputs: the probabilities ``[N, C]`` (``output_name``) and any ``extra_outputs``, one
    float32 per image ``[N]`` (e.g. ``ood``).

    ``context``: a TensorRT ``IExecutionContext`` or a stand-in with ``set_input_shape``,
    ``get_tensor_shape``, ``set_tensor_address`` and ``execute_async_v3``; ``memory``: see
    :class:`CudartMemory`."""

    def __init__(self, context, memory, input_name: str, output_name: str, image_size: int,
                 n_classes: int, min_batch: int, max_batch: int, shown="", extra_outputs=()):
        if not 1 <= min_batch <= max_batch:
            raise ModelError(f"{shown}: batch range {min_batch}..{max_batch} is empty")
        self.context, self.mem, self.input, self.output = context, memory, input_name, output_name
        self.size, self.classes, self.shown = image_size, n_classes, shown
        self.min_batch, self.max_batch = min_batch, max_batch
        pixels = max_batch * image_size * image_size
        self.h_in = memory.host(pixels).reshape(max_batch, 1, image_size, image_size)
        self.d_in = memory.device(pixels)
        # name -> (shape of one image's values, pinned host buffer, device buffer); probs first
        self.outs = {}
        for name, per_image in ((output_name, (n_classes,)),
                                *((x, ()) for x in extra_outputs)):
            n = max_batch * (n_classes if per_image else 1)
            self.outs[name] = (per_image,
                               memory.host(n * 4).view(np.float32).reshape(max_batch, *per_image),
                               memory.device(n * 4))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.outputs(batch)["probs"]

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """``probs`` and the extra outputs by name, for a batch of any size."""
        x = np.asarray(batch)
        s = self.size
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (1, s, s):
            raise ModelError(f"{self.shown}: expected uint8 [N, 1, {s}, {s}], got {x.dtype} "
                             f"{list(x.shape)}")
        parts = [self.run_chunk_all(x[i:i + self.max_batch])
                 for i in range(0, len(x), self.max_batch)]
        out = {}
        for name, (per_image, _, _) in self.outs.items():
            key = "probs" if name == self.output else name
            out[key] = (np.concatenate([p[name] for p in parts]) if parts
                        else np.zeros((0, *per_image), np.float32))
        return out

    def run_chunk(self, x: np.ndarray) -> np.ndarray:
        """One engine call for ``len(x) <= max_batch`` images: the probabilities."""
        return self.run_chunk_all(x)[self.output]

    def run_chunk_all(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """One engine call for ``len(x) <= max_batch`` images: every output by tensor name."""
        n = len(x)
        m = max(n, self.min_batch)  # below the profile's minimum: pad, then drop the padding
        self.h_in[:n] = x
        self.h_in[n:m] = 0
        shape = (m, 1, self.size, self.size)
        if not self.context.set_input_shape(self.input, shape):
            raise ModelError(f"{self.shown}: TensorRT refused input shape {list(shape)} "
                             f"(profile batch {self.min_batch}..{self.max_batch})")
        for name, (per_image, _, d_out) in self.outs.items():
            got = _dims(self.context.get_tensor_shape(name))
            if got != (m, *per_image):
                raise ModelError(f"{self.shown}: TensorRT reports output shape {list(got)} "
                                 f"({name}) for a batch of {m}, expected {[m, *per_image]}")
            self.context.set_tensor_address(name, d_out)
        self.mem.h2d(self.d_in, self.h_in[:m])
        self.context.set_tensor_address(self.input, self.d_in)
        if not self.context.execute_async_v3(self.mem.stream):
            raise ModelError(f"{self.shown}: TensorRT failed to run the engine (see its log)")
        for _, h_out, d_out in self.outs.values():
            self.mem.d2h(h_out[:m], d_out)
        self.mem.sync()
        # the pinned buffers are reused by the next call: copy the results out
        return {name: h_out[:n].copy() for name, (_, h_out, _) in self.outs.items()}

    def close(self) -> None:
        mem, self.mem = getattr(self, "mem", None), None
        if mem is not None:
            mem.close()


def _deserialize(trt, engine_path, data: bytes):
    logger = trt.Logger(trt.Logger.ERROR)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise ModelError(f"{engine_path}: TensorRT cannot load this engine; {rebuild(engine_path)}")
    return runtime, engine


def _io_names(trt, engine, engine_path) -> tuple[str, str, list[str]]:
    """The one uint8 input, the float32 probabilities (the first output) and any further
    float32 outputs of a pneumo-edge engine."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if len(ins) != 1 or not outs:
        raise ModelError(f"{engine_path}: expected one input and one or more outputs, has "
                         f"{names}")
    if engine.get_tensor_dtype(ins[0]) != trt.DataType.UINT8 or \
            any(engine.get_tensor_dtype(o) != trt.DataType.FLOAT for o in outs):
        raise ModelError(f"{engine_path}: expected uint8 input and float32 outputs; "
                         f"{rebuild(engine_path)}")
    return ins[0], outs[0], outs[1:]

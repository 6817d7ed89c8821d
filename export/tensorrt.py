"""model.fp16.onnx -> model.fp16.engine with the TensorRT Python API, plus its sidecar JSON.

One path for TensorRT 10 (Jetson) and 11: a strongly typed network (the fp16 ONNX fixes every
tensor's type; TensorRT 11 has no BuilderFlag.FP16 and is always strongly typed, 10 needs the
STRONGLY_TYPED creation flag; older TensorRT is refused), the ONNX parser, one optimisation
profile over the batch dimension, a workspace memory-pool limit, and a timing cache reused across
builds (one that cannot be read or does not fit is a warning, never a failed build). Before
TensorRT sees the graph, its rule for uint8 inputs (they may feed only Cast nodes) is checked.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pneumo_edge.errors import ModelError, PneumoError, RuntimeUnavailable
from pneumo_edge.model import modeldir
from pneumo_edge.runtimes import GPU_HINT as INSTALL_HINT
from pneumo_edge.runtimes import missing_packages, why_unavailable

TIMING_CACHE = modeldir.TIMING_CACHE


@dataclass
class BuildOptions:
    # (default and help: what `pneumo-edge export --help` shows for the TensorRT options)
    batch_min: int = field(default=1, metadata={"help": "TensorRT profile min batch."})
    batch_opt: int = field(default=8, metadata={"help": "TensorRT profile opt batch."})
    batch_max: int = field(default=32, metadata={"help": "TensorRT profile max batch."})
    workspace_mib: int = field(default=2048, metadata={
        "help": "TensorRT workspace memory pool limit, MiB."})
    timing_cache: str | None = field(default=None, metadata={
        "help": f"TensorRT timing cache, reused across builds. Default: RUN/{TIMING_CACHE}"})

    def validate(self) -> None:
        if not 1 <= self.batch_min <= self.batch_opt <= self.batch_max:
            raise PneumoError(f"need 1 <= --batch-min <= --batch-opt <= --batch-max, got "
                              f"{self.batch_min}/{self.batch_opt}/{self.batch_max}")
        if self.workspace_mib < 1:
            raise PneumoError(f"--workspace must be at least 1 MiB, got {self.workspace_mib}")


def trt_missing() -> str:
    """What this machine lacks to build or run an engine ('' when nothing). Imports nothing."""
    if missing_packages("trt"):
        return missing_packages("trt")
    if why_unavailable("trt"):
        return "no NVIDIA GPU on this machine (an engine is built on the GPU that runs it)"
    return ""


def build_engine(onnx_path, engine_path, opts: BuildOptions, log=print) -> dict:
    """Build ``engine_path`` from ``onnx_path``; write the sidecar (with the card and weights
    sha256 from the ONNX file's metadata); return the sidecar dict."""
    import tensorrt as trt

    from pneumo_edge.runtimes.trt_rt import current_platform

    check_trt_version(trt.__version__)
    opts.validate()
    source = check_uint8_inputs(onnx_path)
    card = modeldir.onnx_card(onnx_path, source)
    engine_path = Path(engine_path)
    here = current_platform()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, parser = _parse(trt, builder, logger, onnx_path)  # parser owns the weights: keep it
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
    profile = _profile(builder, network, opts)
    config.add_optimization_profile(profile["trt"])
    cache_path = Path(opts.timing_cache or engine_path.parent / TIMING_CACHE)
    cached = use_timing_cache(config, cache_path, log)
    log(f"building TensorRT {trt.__version__} engine for {here['gpu']} "
        f"(batch {opts.batch_min}/{opts.batch_opt}/{opts.batch_max}) ...")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise ModelError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    modeldir.write_bytes_atomic(engine_path, bytes(serialized))
    if cached:
        save_timing_cache(config, cache_path, log)
    del parser
    meta = modeldir.sidecar(here, onnx_path, card, source.get(modeldir.ONNX_WEIGHTS_KEY, ""),
                            **_build_record(profile, opts, cache_path if cached else None,
                                            seconds))
    modeldir.write_json_atomic(modeldir.sidecar_path(engine_path), meta)
    return meta


def check_trt_version(version: str) -> None:
    """Refuse TensorRT before 10: it has no strongly typed networks, which this build needs
    (the fp16 ONNX fixes every tensor's type)."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise RuntimeUnavailable(f"cannot read the TensorRT version {version!r}") from None
    if major < 10:
        raise RuntimeUnavailable(
            f"TensorRT {version} is too old: pneumo-edge builds strongly typed networks, which "
            f"need TensorRT 10 or later (JetPack 6.x ships TensorRT 10; {INSTALL_HINT})")


def uint8_input_problems(proto) -> list[str]:
    """TensorRT's rule for UINT8 network inputs: each may feed only Cast nodes (empty list
    when the graph keeps it)."""
    import onnx

    uint8 = {v.name for v in proto.graph.input
             if v.type.tensor_type.elem_type == onnx.TensorProto.UINT8}
    return [f"uint8 input {name!r} feeds a {n.op_type} node ({n.name or 'unnamed'}); TensorRT "
            f"accepts a uint8 input only into Cast"
            for n in proto.graph.node if n.op_type != "Cast"
            for name in uint8.intersection(n.input)]


def check_uint8_inputs(onnx_path) -> dict[str, str]:
    """Refuse an ONNX file whose uint8 input TensorRT cannot take; its metadata_props (one
    read of the graph, no weights)."""
    import onnx

    proto = onnx.load(os.fspath(onnx_path), load_external_data=False)
    problems = uint8_input_problems(proto)
    if problems:
        raise ModelError(f"{onnx_path}: {problems[0]}")
    return {p.key: p.value for p in proto.metadata_props}


def _parse(trt, builder, logger, onnx_path):
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:  # check_trt_version lets no such TensorRT through; never build untyped
        raise RuntimeUnavailable(f"TensorRT {trt.__version__} has no STRONGLY_TYPED networks; "
                                 f"pneumo-edge needs TensorRT 10 or later")
    network = builder.create_network(1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors[:300]}")
    return network, parser


def _profile(builder, network, opts: BuildOptions) -> dict:
    if network.num_inputs != 1:
        raise ModelError(f"expected one network input, found {network.num_inputs}")
    inp = network.get_input(0)
    rest = tuple(int(d) for d in inp.shape)[1:]
    shapes = {k: (b, *rest) for k, b in (("min", opts.batch_min), ("opt", opts.batch_opt),
                                          ("max", opts.batch_max))}
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, shapes["min"], shapes["opt"], shapes["max"])
    return {"trt": profile, "input": inp.name, **{k: list(v) for k, v in shapes.items()}}


def use_timing_cache(config, cache_path: Path, log=print) -> bool:
    """Give the build a timing cache: the file's when it exists and fits this GPU/TensorRT,
    else a fresh one. A cache that cannot be read, deserialised or created is a warning, and
    the build goes on without one (False)."""
    data = b""
    if cache_path.exists():
        try:
            data = cache_path.read_bytes()
        except OSError as exc:
            log(f"warning: cannot read the timing cache {cache_path} ({exc.strerror}); "
                f"starting a fresh one")
    if data:
        why = _set_timing_cache(config, data)
        if not why:
            return True
        log(f"warning: the timing cache {cache_path} cannot be used here ({why}); starting a "
            f"fresh one")
    why = _set_timing_cache(config, b"")
    if not why:
        return True
    log(f"warning: TensorRT cannot create a timing cache ({why}); building without one")
    return False


def _set_timing_cache(config, blob: bytes) -> str:
    """'' when ``config`` now uses a timing cache made from ``blob``, else why not."""
    try:
        cache = config.create_timing_cache(blob)
        if cache is None:
            return "TensorRT returned no cache"
        if not config.set_timing_cache(cache, False):
            return "it was built by another GPU or TensorRT version"
    except (RuntimeError, TypeError, ValueError) as exc:  # what TensorRT's bindings raise
        return (str(exc).splitlines() or [type(exc).__name__])[0][:160]
    return ""


def save_timing_cache(config, cache_path: Path, log=print) -> None:
    """Write the build's timing cache for the next build; failure is a warning (the engine is
    already written)."""
    try:
        blob = config.get_timing_cache().serialize()
        modeldir.write_bytes_atomic(cache_path, bytes(blob))
    except (PneumoError, OSError, RuntimeError, TypeError, AttributeError) as exc:
        log(f"warning: could not save the timing cache {cache_path} ({exc}); the next build "
            f"starts without it")


def _build_record(profile, opts, cache_path, seconds) -> dict:
    return {
        "profile": {k: profile[k] for k in ("input", "min", "opt", "max")},
        "workspace_mib": opts.workspace_mib, "strongly_typed": True,
        "timing_cache": os.fspath(cache_path) if cache_path else None,
        "build_seconds": round(seconds, 2),
        "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }

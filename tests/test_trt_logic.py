"""The TensorRT runtime's logic without TensorRT: buffers, padding, batch splitting and the checks
on what TensorRT reports (EngineIO), and the engine-shape check against the card. The execution
context is a stand-in that runs the real tiny ONNX model on the bytes in its "device" memory
(numpy arrays) and, like TensorRT, refuses input shapes outside its optimisation profile."""

from __future__ import annotations

import numpy as np
import pytest

from pneumo_edge.errors import ModelError
from pneumo_edge.model.card import Card
from pneumo_edge.model.modeldir import Refused
from pneumo_edge.runtimes.trt_rt import EngineIO, check_engine_shapes

S, C = 64, 2


class NumpyMemory:
    """EngineIO's memory interface over numpy: device pointers index a dict of byte arrays."""

    stream = 7

    def __init__(self):
        self.buffers, self.copies, self.closed = {}, [], False

    def host(self, nbytes):
        return np.zeros(nbytes, np.uint8)

    def device(self, nbytes):
        ptr = 1000 + len(self.buffers)
        self.buffers[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def h2d(self, dptr, src):
        raw = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
        assert raw.nbytes <= self.buffers[dptr].nbytes, "host-to-device copy overruns"
        self.buffers[dptr][:raw.nbytes] = raw
        self.copies.append(("h2d", raw.nbytes))

    def d2h(self, dst, dptr):
        assert dst.nbytes <= self.buffers[dptr].nbytes, "device-to-host copy overruns"
        dst.reshape(-1).view(np.uint8)[:] = self.buffers[dptr][:dst.nbytes]
        self.copies.append(("d2h", dst.nbytes))

    def sync(self):
        pass

    def close(self):
        self.closed = True


class StandInContext:
    """An IExecutionContext stand-in: profile batch ``lo..hi``, runs ``model`` (uint8 in,
    probabilities out) from the input address to the output address."""

    def __init__(self, model, memory, lo, hi, classes=C):
        self.model, self.mem, self.lo, self.hi, self.classes = model, memory, lo, hi, classes
        self.shape, self.addr, self.runs = None, {}, []
        self.refuse_run = False

    def set_input_shape(self, name, shape):
        if not self.lo <= shape[0] <= self.hi:
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return (self.shape[0], self.classes)

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def execute_async_v3(self, stream):
        if self.refuse_run:
            return False
        assert stream == self.mem.stream
        n = self.shape[0]
        pixels = self.mem.buffers[self.addr["in"]][:n * S * S].reshape(n, 1, S, S)
        probs = np.asarray(self.model(pixels.copy()), np.float32)
        self.mem.buffers[self.addr["out"]][:probs.nbytes] = probs.reshape(-1).view(np.uint8)
        self.runs.append(n)
        return True


@pytest.fixture(scope="module")
def onnx_model(tiny_exported):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    from pneumo_edge.runtimes.onnx_rt import OnnxRuntime

    return OnnxRuntime(tiny_exported / "model.onnx", device="cpu")


def _io(model, lo=4, hi=8, classes=C):
    mem = NumpyMemory()
    ctx = StandInContext(model, mem, lo, hi, classes)
    return EngineIO(ctx, mem, "in", "out", S, C, lo, hi, "model.fp16.engine"), ctx, mem


def _pixels(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 1, S, S), dtype=np.uint8)


def test_splits_pads_and_matches_the_model(onnx_model):
    io, ctx, _ = _io(onnx_model)
    for n, runs in ((1, [4]), (5, [5]), (8, [8]), (19, [8, 8, 4])):
        ctx.runs.clear()
        x = _pixels(n, seed=n)
        got = io(x)
        assert got.shape == (n, C) and got.dtype == np.float32
        assert ctx.runs == runs  # chunks of at most 8; a chunk under 4 padded to 4
        np.testing.assert_allclose(got, onnx_model(x), atol=1e-6)


def test_results_are_copies_of_the_reused_buffer(onnx_model):
    io, _, _ = _io(onnx_model)
    a, b = _pixels(3, seed=1), _pixels(3, seed=2)
    first = io(a)
    keep = first.copy()
    io(b)
    np.testing.assert_array_equal(first, keep)


def test_padding_is_zero_images_not_stale_pixels(onnx_model):
    io, ctx, mem = _io(onnx_model)
    io(_pixels(8, seed=3))  # fills the whole input buffer
    io(_pixels(1, seed=4))  # padded to 4: images 1..3 must be zeros again
    assert ctx.runs[-1] == 4 and mem.copies[-2] == ("h2d", 4 * S * S)
    dev_in = mem.buffers[ctx.addr["in"]][:4 * S * S].reshape(4, S, S)
    assert not dev_in[1:].any()


def test_empty_batch_does_not_call_the_engine(onnx_model):
    io, ctx, _ = _io(onnx_model)
    assert io(np.zeros((0, 1, S, S), np.uint8)).shape == (0, C) and ctx.runs == []


def test_set_input_shape_refusal_is_an_error(onnx_model):
    mem = NumpyMemory()
    ctx = StandInContext(onnx_model, mem, 4, 6)  # the context accepts less than EngineIO thinks
    io = EngineIO(ctx, mem, "in", "out", S, C, 4, 8, "model.fp16.engine")
    with pytest.raises(ModelError, match=r"refused input shape \[8, 1, 64, 64\]"):
        io(_pixels(8))
    assert ctx.runs == []


def test_output_shape_other_than_the_card_is_an_error(onnx_model):
    io, ctx, _ = _io(onnx_model, classes=3)
    with pytest.raises(ModelError, match=r"output shape \[4, 3\].*expected \[4, 2\]"):
        io(_pixels(2))
    assert ctx.runs == []


def test_failed_execution_is_an_error(onnx_model):
    io, ctx, _ = _io(onnx_model)
    ctx.refuse_run = True
    with pytest.raises(ModelError, match="failed to run the engine"):
        io(_pixels(2))


@pytest.mark.parametrize("bad", [np.zeros((2, 1, 32, 32), np.uint8),
                                 np.zeros((2, 1, S, S), np.float32),
                                 np.zeros((2, S, S), np.uint8)])
def test_input_of_another_shape_or_type_never_reaches_the_buffers(onnx_model, bad):
    io, ctx, mem = _io(onnx_model)
    with pytest.raises(ModelError, match=r"expected uint8 \[N, 1, 64, 64\]"):
        io(bad)
    assert mem.copies == [] and ctx.runs == []


def test_close_releases_the_memory(onnx_model):
    io, _, mem = _io(onnx_model)
    io.close()
    io.close()
    assert mem.closed


# --- the engine's shapes against the card ------------------------------------------------------

CARD = Card(classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", image_size=S,
            threshold=0.5, arch="resnet18")
PROFILE = [(1, 1, S, S), (8, 1, S, S), (32, 1, S, S)]


def test_matching_engine_shapes_give_the_batch_range():
    assert check_engine_shapes("e", (-1, 1, S, S), (-1, 2), PROFILE, CARD) == (1, 32)


@pytest.mark.parametrize("in_shape,out_shape,profile,words", [
    ((-1, 1, 128, 128), (-1, 2), PROFILE, "input is [-1, 1, 128, 128], the card needs"),
    ((-1, 3, S, S), (-1, 2), PROFILE, "input is [-1, 3, 64, 64]"),
    ((-1, 1, S, S), (-1, 3), PROFILE, "output is [-1, 3], the card has 2 classes"),
    ((-1, 1, S, S), (-1, 2), [(1, 1, 32, 32), (8, 1, S, S), (32, 1, S, S)], "profile"),
    ((-1, 1, S, S), (-1, 2), [(8, 1, S, S), (4, 1, S, S), (32, 1, S, S)], "not ordered"),
])
def test_stale_engine_shapes_are_refused(tmp_path, in_shape, out_shape, profile, words):
    engine = tmp_path / "model.fp16.engine"
    with pytest.raises(Refused) as err:
        check_engine_shapes(engine, in_shape, out_shape, profile, CARD)
    msg = str(err.value)
    assert words in msg and f"pneumo-edge export {tmp_path} --trt" in msg
    assert len(msg.splitlines()) == 1


# --- export/tensorrt.py: what is checked before TensorRT builds -------------------------------

def test_tensorrt_before_10_is_refused():
    from pneumo_edge.export.tensorrt import check_trt_version

    from pneumo_edge.errors import RuntimeUnavailable

    for ok in ("10.3.0", "10.13.3.9", "11.0.0"):
        check_trt_version(ok)
    for old in ("8.6.1", "9.3.0.post12.dev1"):
        with pytest.raises(RuntimeUnavailable, match=f"TensorRT {old} is too old.*10 or later"):
            check_trt_version(old)


def test_exported_fp16_graph_feeds_its_uint8_input_only_to_a_cast(tiny_exported):
    pytest.importorskip("onnx")
    import onnx
    from pneumo_edge.export.tensorrt import check_uint8_inputs, uint8_input_problems

    proto = onnx.load(str(tiny_exported / "model.fp16.onnx"))
    assert uint8_input_problems(proto) == []
    check_uint8_inputs(tiny_exported / "model.fp16.onnx")


def test_uint8_input_into_another_op_is_refused_before_tensorrt(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from pneumo_edge.export.tensorrt import check_uint8_inputs, uint8_input_problems

    x = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 1, 4, 4])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT16, ["N", 1, 4, 4])
    nodes = [helper.make_node("Identity", ["image"], ["same"], name="flip"),
             helper.make_node("Cast", ["same"], ["probs"], to=TensorProto.FLOAT16)]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    assert uint8_input_problems(proto) == [(
        "uint8 input 'image' feeds a Identity node (flip); TensorRT accepts a uint8 input only "
        "into Cast")]
    path = tmp_path / "model.fp16.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ModelError, match=f"^{path}: uint8 input 'image' feeds a Identity"):
        check_uint8_inputs(path)


class StandInBuilderConfig:
    """IBuilderConfig's timing-cache calls, as TensorRT's bindings behave: a blob it cannot
    parse raises RuntimeError; a cache from another GPU/version is refused by set_timing_cache
    (False)."""

    def __init__(self, broken=False):
        self.used, self.broken = None, broken

    def create_timing_cache(self, blob):
        if self.broken or blob.startswith(b"garbage"):
            raise RuntimeError("Failed to deserialize the timing cache\nsecond line")
        return bytes(blob)

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        if cache.startswith(b"other-gpu"):
            return False
        self.used = cache
        return True


@pytest.mark.parametrize("content,words", [
    (None, None), (b"cache-from-here", None),
    (b"garbage", "cannot be used here (Failed to deserialize the timing cache)"),
    (b"other-gpu", "built by another GPU or TensorRT version"),
])
def test_timing_cache_that_cannot_be_used_is_a_warning(tmp_path, content, words):
    from pneumo_edge.export.tensorrt import use_timing_cache

    path, said = tmp_path / "trt_timing.cache", []
    if content is not None:
        path.write_bytes(content)
    config = StandInBuilderConfig()
    assert use_timing_cache(config, path, said.append) is True
    if words is None:
        assert said == [] and config.used == (content or b"")
    else:
        assert len(said) == 1 and words in said[0] and said[0].startswith("warning: ")
        assert config.used == b""  # a fresh cache: the build goes on
    assert path.read_bytes() == (content or b"") if content else not path.exists()


def test_unreadable_or_uncreatable_timing_cache_builds_without_one(tmp_path):
    from pneumo_edge.export.tensorrt import save_timing_cache, use_timing_cache

    path, said = tmp_path / "trt_timing.cache", []
    path.mkdir()  # exists but cannot be read as a file
    assert use_timing_cache(StandInBuilderConfig(), path, said.append) is True
    assert "cannot read the timing cache" in said[0]
    said.clear()
    broken = StandInBuilderConfig(broken=True)
    assert use_timing_cache(broken, tmp_path / "x", said.append) is False
    assert said == [("warning: TensorRT cannot create a timing cache (Failed to deserialize "
                     "the timing cache); building without one")]

    class Saved:
        def get_timing_cache(self):
            return self

        def serialize(self):
            return b"new cache"

    said.clear()
    save_timing_cache(Saved(), path, said.append)  # a folder in the way: warning, no exception
    assert path.is_dir() and "could not save the timing cache" in said[0]
    save_timing_cache(Saved(), tmp_path / "ok.cache", said.append)
    assert (tmp_path / "ok.cache").read_bytes() == b"new cache"


class OodContext(StandInContext):
    """A stand-in engine with a second output ``ood`` [N] (the positive probability)."""

    def get_tensor_shape(self, name):
        return (self.shape[0],) if name == "ood" else super().get_tensor_shape(name)

    def execute_async_v3(self, stream):
        assert super().execute_async_v3(stream)
        n = self.shape[0]
        probs = self.mem.buffers[self.addr["out"]][:n * C * 4].view(np.float32).reshape(n, C)
        ood = np.ascontiguousarray(probs[:, 1])
        self.mem.buffers[self.addr["ood"]][:ood.nbytes] = ood.view(np.uint8)
        return True


def test_engine_io_returns_every_output_tensor(onnx_model):
    mem = NumpyMemory()
    ctx = OodContext(onnx_model, mem, 4, 8)
    io = EngineIO(ctx, mem, "in", "out", S, C, 4, 8, "model.fp16.engine", extra_outputs=["ood"])
    x = _pixels(11)
    out = io.outputs(x)
    assert sorted(out) == ["ood", "probs"] and out["ood"].shape == (11,)
    assert np.allclose(out["probs"], onnx_model(x), atol=1e-6)
    assert np.array_equal(out["ood"], out["probs"][:, 1]) and np.array_equal(io(x), out["probs"])
    assert io.outputs(x[:0])["ood"].shape == (0,)

"""The torch runtimes: model.pt on CPU or CUDA.

- ``torch`` (``precision="fp32"``): fp32 eager, channels_last. On CUDA, TF32 is switched off for
  matmuls and cuDNN convolutions (``self.tf32 = False``), so it is the same fp32 reference that
  parity compares every other form with, not a 10-bit-mantissa approximation of it.
- ``torch-fp16`` (``precision="fp16"``): CUDA only; fp16 weights and compute, channels_last, and
  optionally one CUDA graph per batch size (``graphs=True``), replayed on later calls of that size.

Device strings: ``None``/``auto`` (CUDA when torch sees it, else CPU), ``cpu``, ``cuda`` (the
current CUDA device) and ``cuda:N``; a CUDA runtime reports ``cuda:N (GPU name)``.
"""

from __future__ import annotations

import numpy as np

from pneumo_edge.errors import RuntimeUnavailable, UsageError
from pneumo_edge.runtimes import TRAIN_HINT, parse_device

PRECISIONS = {"fp32": "torch", "fp16": "torch-fp16"}
#: at most this many batch sizes get a CUDA graph each (each holds its own activations)
MAX_GRAPHS = 8


def disable_tf32(torch) -> None:
    """fp32 matmuls and cuDNN convolutions in full fp32 (process-wide torch settings)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def tf32_state(torch) -> dict:
    """What torch will do with fp32 matmuls and convolutions on CUDA right now."""
    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn": bool(torch.backends.cudnn.allow_tf32)}


def resolve_device(torch, device: str | None) -> str:
    """``cpu`` or ``cuda:N`` for a device string; RuntimeUnavailable when the GPU is not there,
    UsageError for a string that names no device."""
    kind, index = parse_device(device)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return kind
    if not torch.cuda.is_available():
        raise RuntimeUnavailable("torch sees no CUDA GPU")
    n = torch.cuda.current_device() if index is None else index
    count = torch.cuda.device_count()
    if n >= count:
        raise RuntimeUnavailable(f"torch sees {count} CUDA GPU(s); there is no cuda:{n}")
    return f"cuda:{n}"


class TorchRuntime:
    def __init__(self, path, card=None, device: str | None = None, precision: str = "fp32",
                 graphs: bool = False):
        """``path``: model.pt or its directory; ``card``: card.json's card (None: read it
        from the directory), which must agree with the card inside model.pt. ``graphs``: capture
        a CUDA graph per batch size (``torch-fp16`` only)."""
        if precision not in PRECISIONS:
            raise UsageError(f"unknown torch precision {precision!r}; use fp32 or fp16")
        try:
            import torch
        except ImportError:
            raise RuntimeUnavailable(f"torch is not installed ({TRAIN_HINT})") from None
        from pneumo_edge.model.torchload import load_checked

        self.name, self.precision, self._torch = PRECISIONS[precision], precision, torch
        device = resolve_device(torch, device)
        cuda = device != "cpu"
        if precision == "fp16" and not cuda:
            raise RuntimeUnavailable("torch-fp16 runs on CUDA only (fp16 convolutions on a CPU "
                                     "are slow and not what parity checked); torch sees no GPU"
                                     if not torch.cuda.is_available() else
                                     "torch-fp16 runs on CUDA only, not on cpu")
        if graphs and not (cuda and precision == "fp16"):
            raise UsageError("CUDA graphs are for torch-fp16 on a CUDA device")
        self._dev = torch.device(device)
        self.tf32 = False
        if cuda:
            disable_tf32(torch)
        model, self.card, ckpt = load_checked(path, device=device, card=card)
        self.verified, self.path, self.sha256 = ckpt.verified, ckpt.path, ckpt.sha256
        if precision == "fp16":
            model = model.half()
        self.model = model.to(memory_format=torch.channels_last)
        self.device = device if not cuda else f"{device} ({torch.cuda.get_device_name(self._dev)})"
        self.graphs = graphs
        self._graphs: dict[int, tuple] = {}

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, C]``."""
        return self.outputs(batch)["probs"]

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """``probs`` ``[N, C]``, plus ``ood`` ``[N]`` when the network returns a second output."""
        torch = self._torch
        x = np.ascontiguousarray(batch, dtype=np.uint8)
        if self._dev.type == "cuda":
            disable_tf32(torch)  # process-wide: whatever ran since must not change our maths
            if self.graphs and len(x) and (len(x) in self._graphs or len(self._graphs) < MAX_GRAPHS):
                return _named(self._replay(x))
        t = torch.from_numpy(x).to(self._dev)
        with torch.inference_mode():
            out = self._forward(t.contiguous(memory_format=torch.channels_last))
        return _named(out)

    def _forward(self, x):
        """Every output: XrayNet.outputs (probs, ood or None); a plain module's forward."""
        both = getattr(self.model, "outputs", None)
        return both(x) if callable(both) else self.model(x)

    def _replay(self, x: np.ndarray) -> np.ndarray:
        """Run a batch of this size through its CUDA graph (captured on first use)."""
        torch = self._torch
        if len(x) not in self._graphs:
            self._graphs[len(x)] = self._capture(x.shape)
        graph, static_in, static_out = self._graphs[len(x)]
        static_in.copy_(torch.from_numpy(x))
        graph.replay()
        return static_out

    def _capture(self, shape) -> tuple:
        torch = self._torch
        static_in = torch.zeros(shape, dtype=torch.uint8, device=self._dev)
        with torch.inference_mode():
            side = torch.cuda.Stream(self._dev)
            side.wait_stream(torch.cuda.current_stream(self._dev))
            with torch.cuda.stream(side):  # warm-up (cuDNN picks its kernels) off the capture
                for _ in range(2):
                    self._forward(static_in.contiguous(memory_format=torch.channels_last))
            torch.cuda.current_stream(self._dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._forward(static_in.contiguous(memory_format=torch.channels_last))
        return graph, static_in, static_out


#: names of the network's outputs after the probabilities, in order (issue 20: ``ood``)
EXTRA_OUTPUTS = ("ood",)


def _named(out) -> dict[str, np.ndarray]:
    """The network's output (a tensor of probabilities, or a tuple starting with one; None for
    an output the network does not have) as float32 numpy arrays by name."""
    parts = out if isinstance(out, (tuple, list)) else (out,)
    names = ("probs", *EXTRA_OUTPUTS)
    if len(parts) > len(names):
        raise RuntimeError(f"the network returns {len(parts)} outputs; this pneumo-edge knows "
                           f"{', '.join(names)}")
    return {n: p.float().cpu().numpy() for n, p in zip(names, parts) if p is not None}

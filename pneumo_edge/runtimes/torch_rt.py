"""The torch runtime: model.pt on CPU or CUDA (fp32 eager, channels_last)."""

from __future__ import annotations

import numpy as np

from pneumo_edge.errors import RuntimeUnavailable


class TorchRuntime:
    name = "torch"
    precision = "fp32"

    def __init__(self, path, card=None, device: str | None = None):
        """``path``: model.pt or its directory; ``card``: card.json's card (None: read it
        from the directory), which must agree with the card inside model.pt."""
        try:
            import torch
        except ImportError:
            raise RuntimeUnavailable("torch is not installed (pip install 'pneumo-edge[train]')") from None
        from pneumo_edge.torchload import load_checked

        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeUnavailable("torch sees no CUDA GPU")
        self._torch = torch
        self._dev = torch.device(device)
        model, self.card, ckpt = load_checked(path, device=device, card=card)
        self.path, self.sha256 = ckpt.path, ckpt.sha256
        self.model = model.to(memory_format=torch.channels_last)
        self.device = device if device == "cpu" else \
            f"{device} ({torch.cuda.get_device_name(self._dev)})"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.uint8)).to(self._dev)
        with torch.inference_mode():
            probs = self.model(x.contiguous(memory_format=torch.channels_last))
        return probs.float().cpu().numpy()

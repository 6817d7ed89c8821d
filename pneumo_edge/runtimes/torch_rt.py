"""The torch runtime: model.pt on CPU or CUDA (fp32 eager, channels_last)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pneumo_edge.errors import RuntimeUnavailable


class TorchRuntime:
    name = "torch"

    def __init__(self, d, card, device: str | None = None):
        try:
            import torch
        except ImportError:
            raise RuntimeUnavailable("torch is not installed (pip install 'pneumo-edge[train]')") from None
        from pneumo_edge.train.checkpoint import load_model

        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeUnavailable("torch sees no CUDA GPU")
        self._torch = torch
        self._dev = torch.device(device)
        model, ckpt_card = load_model(d, device=device)
        self.model = model.to(memory_format=torch.channels_last)
        self.card = card
        from pneumo_edge.modeldir import MODEL_PT, sha256_file

        self.path = Path(d) / MODEL_PT if Path(d).is_dir() else Path(d)
        self.sha256, self.precision = sha256_file(self.path), "fp32"
        self.device = device if device == "cpu" else \
            f"{device} ({torch.cuda.get_device_name(self._dev)})"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.uint8)).to(self._dev)
        with torch.inference_mode():
            probs = self.model(x.contiguous(memory_format=torch.channels_last))
        return probs.float().cpu().numpy()

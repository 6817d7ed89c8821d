"""The network every runtime serves: uint8 grey ``[N, 1, S, S]`` in, float32 probabilities
``[N, C]`` out. Scaling, normalisation, grey-to-3-channel, optional test-time flip averaging and
softmax live inside it, so exported graphs carry them and the edge side does no float maths.

This module is on the edge side (the torch runtime builds the network from the card); training
imports it from here. torch is imported at module level, so only import this where torch is
expected.

Options (the card's ``net`` entry, passed to :func:`build_model`; an absent entry means the
defaults of cards written before these options existed, so old model directories load as they
were trained):
- ``norm``: ``imagenet`` (fixed ImageNet mean/std) or ``image`` (each image standardised by its
  own mean and standard deviation, so exposure and contrast of the source do not shift the
  network's input; the same arithmetic ships in every exported graph).
- ``tta``: ``none`` or ``flip`` (average the probabilities of the image and its left-right
  mirror inside the network).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from pneumo_edge.errors import ModelError

ARCHS = ("resnet50", "resnet18", "resnet34")
NORMS = ("imagenet", "image")
TTAS = ("none", "flip")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's IMAGENET1K_V1 files, as the torch hub cache names them
IMAGENET_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
}


class XrayNet(nn.Module):
    """Wraps a torchvision ResNet: ``forward`` takes uint8 pixels and returns probabilities."""

    def __init__(self, backbone: nn.Module, norm: str = "imagenet", tta: str = "none"):
        super().__init__()
        if norm not in NORMS or tta not in TTAS:
            raise ModelError(f"unknown network options norm={norm!r} tta={tta!r}")
        self.backbone = backbone
        self.norm, self.tta = norm, tta
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0
        # (x - mean) / std == x * scale + shift, one fused multiply-add per pixel
        self.register_buffer("scale", 1.0 / std)
        self.register_buffer("shift", -mean / std)

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(self.scale.dtype)
        if self.norm == "image":
            # per-image standardisation; eps keeps a constant image finite (it maps to zeros)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            var = (x - mean).square().mean(dim=(1, 2, 3), keepdim=True)
            return ((x - mean) / torch.sqrt(var + 1.0)).expand(-1, 3, -1, -1)
        return x.expand(-1, 3, -1, -1) * self.scale + self.shift

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalise(image))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.normalise(image)
        probs = torch.softmax(self.backbone(x).float(), dim=1)
        if self.tta == "flip":
            # mirrored after normalising (which a mirror does not change): the uint8 input then
            # feeds only the Cast, as TensorRT requires of a UINT8 network input
            mirrored = torch.softmax(self.backbone(torch.flip(x, dims=[3])).float(), dim=1)
            # a mean, not (a + b) * 0.5: no fp32 constant in the fp16 graph
            probs = torch.stack([probs, mirrored]).mean(dim=0)
        return probs


def build_model(arch: str, num_classes: int, weights: str = "none", *, norm: str = "imagenet",
                tta: str = "none") -> XrayNet:
    """A ResNet with a new ``num_classes`` head. ``weights``: ``none``, ``imagenet`` (from the
    local torch hub cache; never downloaded) or a path to a state dict for the backbone.
    ``norm`` and ``tta``: see the module docstring (the card's ``net`` entry)."""
    import torchvision

    if arch not in ARCHS:
        raise ModelError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    backbone = getattr(torchvision.models, arch)(weights=None)
    if weights != "none":
        path = imagenet_path(arch) if weights == "imagenet" else weights
        load_backbone_weights(backbone, path)
    backbone.fc = nn.Linear(backbone.fc.in_features, num_classes)
    return XrayNet(backbone, norm=norm, tta=tta)


def imagenet_path(arch: str) -> str:
    hub = torch.hub.get_dir()
    path = os.path.join(hub, "checkpoints", IMAGENET_FILES[arch])
    if not os.path.isfile(path):
        raise ModelError(
            f"ImageNet weights for {arch} not found at {path}; copy torchvision's "
            f"{IMAGENET_FILES[arch]} there, pass --weights PATH, or use --weights none"
        )
    return path


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Load a torchvision-style state dict; the classifier head is replaced afterwards, so its
    keys may be missing or of another size."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: weights file not found") from None
    except Exception as exc:  # torch raises many types for a bad file
        raise ModelError(f"{path}: cannot load weights: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("backbone."): v for k, v in state.items()
             if not k.removeprefix("backbone.").startswith("fc.")}
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when strict=False
        raise ModelError(f"{path}: weights do not fit this architecture "
                         f"({str(exc).splitlines()[-1].strip()[:160]})") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ModelError(
            f"{path}: weights do not fit this architecture "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. "
            f"{(missing or unexpected)[0]})"
        )

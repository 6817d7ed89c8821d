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
- ``calibration``: ``none`` or ``temperature+bias``: the deployed log-probabilities ``l`` become
  ``softmax(l / T + b e_pos)`` (buffers ``cal_scale`` = 1/T and ``cal_bias`` = b on the positive
  class, fitted by :mod:`pneumo_edge.model.calibration`). For two classes this is Platt scaling of
  the logit difference, a monotone map: labels do not change when the threshold is mapped too.
- ``ood``: ``none``, ``mahalanobis`` or ``energy``: the out-of-distribution score of
  :meth:`XrayNet.outputs` (the graph's second output ``ood``, float32 ``[N]``, higher = less like
  the training X-rays), from the unmirrored image. ``mahalanobis``: the smallest squared
  Mahalanobis distance of the pooled features to the training classes' means under their shared
  (shrunk) covariance, divided by the feature count (about 1 for training images; buffers
  ``ood_means`` [C, F] and ``ood_whiten`` [F, F]). ``energy``: ``-logsumexp(logits)``.
  ``mahalanobis+orientation``: the larger of that distance and an orientation probe's term,
  ``T (1 + o - t)``, with ``o`` the logit of a linear probe on the pooled features telling
  upright X-rays from upside-down, quarter-turned and inverted ones, ``t`` its threshold and
  ``T`` the gate's threshold: one score, one threshold, crossed by the probe's term exactly
  where the probe's own threshold is. The term is folded at fitting time into ``ood_orient``
  [F, 1] and ``ood_orient_bias`` [1], applied to the features minus the first class mean
  (small numbers in the fp16 graph), in the weights' dtype and then float32, as the distance
  is.
  ``mahalanobis+layer1+orientation``: that, and a third term: the same kind of distance on the
  first residual stage's output averaged over the image (``layer1``: 256 channels in
  ResNet50, 64 in ResNet18/34; edges, grain and contrast rather than anatomy), to its own class means and
  shared covariance (buffers ``ood_early_means`` [C, E] and ``ood_early_whiten`` [E, E]),
  scaled at fitting time by ``T / t1`` (``t1`` its own threshold) into the whitening, so it
  crosses ``T`` exactly where the distance crosses ``t1``. Photographs, CT and MR slices sit
  close to X-rays in the last stage's features and far from them in the first's
  (benchmarks/OOD.md).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from pneumo_edge.errors import ModelError
from pneumo_edge.model.netopts import ARCHS, CALIBRATIONS, NORMS, OODS, TTAS

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

    def __init__(self, backbone: nn.Module, norm: str = "imagenet", tta: str = "none",
                 calibration: str = "none", ood: str = "none"):
        super().__init__()
        if norm not in NORMS or tta not in TTAS or calibration not in CALIBRATIONS \
                or ood not in OODS:
            raise ModelError(f"unknown network options norm={norm!r} tta={tta!r} "
                             f"calibration={calibration!r} ood={ood!r}")
        self.backbone = backbone
        self.norm, self.tta, self.calibration, self.ood = norm, tta, calibration, ood
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0
        # (x - mean) / std == x * scale + shift, one fused multiply-add per pixel
        self.register_buffer("scale", 1.0 / std)
        self.register_buffer("shift", -mean / std)
        classes, width = backbone.fc.out_features, backbone.fc.in_features
        if calibration != "none":  # identity until set_calibration
            self.register_buffer("cal_scale", torch.ones(()))
            self.register_buffer("cal_bias", torch.zeros(classes))
        if ood in DISTANCE_GATES:  # zeros until set_gate: score 0
            self.register_buffer("ood_means", torch.zeros(classes, width))
            self.register_buffer("ood_whiten", torch.zeros(width, width))
        if ood in ORIENTED_GATES:
            self.register_buffer("ood_orient", torch.zeros(width, 1))
            self.register_buffer("ood_orient_bias", torch.zeros(1))
        if ood == LAYER1_GATE:
            early = _early_width(backbone)
            self.register_buffer("ood_early_means", torch.zeros(classes, early))
            self.register_buffer("ood_early_whiten", torch.zeros(early, early))

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(self.scale.dtype)
        if self.norm == "image":
            # per-image standardisation; eps keeps a constant image finite (it maps to zeros)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            var = (x - mean).square().mean(dim=(1, 2, 3), keepdim=True)
            return ((x - mean) / torch.sqrt(var + 1.0)).expand(-1, 3, -1, -1)
        return x.expand(-1, 3, -1, -1) * self.scale + self.shift

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features ``[N, F]`` of normalised input (what ``fc`` sees)."""
        return self.trunk(x, early=False)[0]

    def trunk(self, x: torch.Tensor, early: bool = True):
        """(pooled features ``[N, F]``, the first residual stage's output averaged over the
        image ``[N, E]``, or None without ``early``) of normalised input."""
        b = self.backbone
        first = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))
        x = b.layer4(b.layer3(b.layer2(first)))
        return torch.flatten(b.avgpool(x), 1), (torch.flatten(b.avgpool(first), 1) if early
                                                else None)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Raw (uncalibrated) logits of the unmirrored image."""
        return self.backbone(self.normalise(image))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.outputs(image)[0]

    def outputs(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(probabilities float32 ``[N, C]``, out-of-distribution score float32 ``[N]`` or None
        when the network has no gate)."""
        # the first stage's average only where the gate reads it (not in other graphs)
        probs, logp, feats, z, early = self._deployed(image, early=self.ood == LAYER1_GATE)
        if self.calibration != "none":
            # in the weights' dtype (fp16 in the fp16 graph: no fp32 constants there); without
            # test-time augmentation the raw logits stand in for logp (softmax ignores the shift)
            base = z if self.tta == "none" else logp.to(z.dtype)
            probs = torch.softmax((base * self.cal_scale + self.cal_bias).float(), dim=1)
        return probs, self._ood(feats, z.float(), early)

    def uncalibrated(self, image: torch.Tensor):
        """(log-probabilities before calibration [N, C], pooled features [N, F], raw logits
        [N, C], the first stage's averaged output [N, E]): what calibration and the gate are
        fitted on."""
        _, logp, feats, z, early = self._deployed(image)
        return logp, feats, z.float(), early

    def _deployed(self, image: torch.Tensor, early: bool = True):
        """(uncalibrated probabilities, their log, features, logits in the weights' dtype, the
        first stage's averaged output or None without ``early``)."""
        x = self.normalise(image)
        feats, early = self.trunk(x, early)
        z = self.backbone.fc(feats)
        if self.tta == "flip":
            # mirrored after normalising (which a mirror does not change): the uint8 input then
            # feeds only the Cast, as TensorRT requires of a UINT8 network input
            mirrored = torch.softmax(self.backbone(torch.flip(x, dims=[3])).float(), dim=1)
            # a mean, not (a + b) * 0.5: no fp32 constant in the fp16 graph
            probs = torch.stack([torch.softmax(z.float(), dim=1), mirrored]).mean(dim=0)
            return probs, torch.log(probs), feats, z, early
        return (torch.softmax(z.float(), dim=1), torch.log_softmax(z.float(), dim=1), feats, z,
                early)

    def _ood(self, feats: torch.Tensor, z: torch.Tensor,
             early: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.ood == "energy":
            return -torch.logsumexp(z, dim=1)
        if self.ood not in DISTANCE_GATES:
            return None
        diff = feats.unsqueeze(1) - self.ood_means  # [N, C, F]
        score = _distance(diff, self.ood_whiten)
        if self.ood in ORIENTED_GATES:
            # in the weights' dtype, then float32 (a cast buffer would be folded into an
            # fp32 constant, which the fp16 graph must not have)
            tilt = torch.matmul(diff[:, 0, :], self.ood_orient) + self.ood_orient_bias
            score = torch.maximum(score, tilt.float()[:, 0])
        if self.ood == LAYER1_GATE:
            first = _distance(early.unsqueeze(1) - self.ood_early_means, self.ood_early_whiten)
            score = torch.maximum(score, first)
        return score

    @torch.no_grad()
    def set_calibration(self, temperature: float, bias: float, positive: int) -> None:
        self.cal_scale.fill_(1.0 / temperature)
        self.cal_bias.zero_()
        self.cal_bias[positive] = bias

    @torch.no_grad()
    def set_gate(self, means, whiten, orient=None, early=None) -> None:
        """Mahalanobis gate parameters (numpy or torch): class means [C, F], whitening [F, F];
        for the oriented gates also ``orient`` = (weights [F], bias): the probe's term as a
        linear function of the features minus the first class mean; for
        ``mahalanobis+layer1+orientation`` also ``early`` = (class means [C, E], whitening
        [E, E]) of the first stage's averaged output, its scale folded in."""
        self.ood_means.copy_(torch.as_tensor(means))
        self.ood_whiten.copy_(torch.as_tensor(whiten))
        if self.ood in ORIENTED_GATES:
            weights, bias = orient
            self.ood_orient.copy_(torch.as_tensor(weights).reshape(-1, 1))
            self.ood_orient_bias.fill_(float(bias))
        if self.ood == LAYER1_GATE:
            self.ood_early_means.copy_(torch.as_tensor(early[0]))
            self.ood_early_whiten.copy_(torch.as_tensor(early[1]))


#: the gate with the first stage's distance (see the module docstring)
LAYER1_GATE = "mahalanobis+layer1+orientation"
ORIENTED_GATES = ("mahalanobis+orientation", LAYER1_GATE)
DISTANCE_GATES = ("mahalanobis", *ORIENTED_GATES)


def _distance(diff: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """min over classes of |diff_c W|^2 (``diff`` [N, C, F]): float32 ``[N]``."""
    white = torch.matmul(diff, whiten).float()
    return (white * white).sum(dim=2).amin(dim=1)


def _early_width(backbone: nn.Module) -> int:
    """Channels of the first residual stage's output (256 in ResNet50, 64 in ResNet18/34)."""
    last = backbone.layer1[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def build_model(arch: str, num_classes: int, weights: str = "none", *, norm: str = "imagenet",
                tta: str = "none", calibration: str = "none", ood: str = "none") -> XrayNet:
    """A ResNet with a new ``num_classes`` head. ``weights``: ``none``, ``imagenet`` (from the
    local torch hub cache; never downloaded) or a path to a state dict for the backbone.
    ``norm``, ``tta``, ``calibration``, ``ood``: see the module docstring (the card's ``net``
    entry)."""
    import torchvision

    if arch not in ARCHS:
        raise ModelError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    backbone = getattr(torchvision.models, arch)(weights=None)
    if weights != "none":
        path = imagenet_path(arch) if weights == "imagenet" else weights
        load_backbone_weights(backbone, path)
    backbone.fc = nn.Linear(backbone.fc.in_features, num_classes)
    return XrayNet(backbone, norm=norm, tta=tta, calibration=calibration, ood=ood)


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
    except Exception as exc:  # noqa: BLE001 -- torch raises many types for a bad file
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

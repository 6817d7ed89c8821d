"""Why the model said what it said: heatmaps for single X-rays.

- ``gradcam``: Grad-CAM (Selvaraju et al., 2017) on the last convolutional stage (``layer4``)
  of the torch network in model.pt: the stage's activations weighted by the mean gradient of
  the positive class's logit, rectified, upsampled to the input size. Needs torch. With the
  card's ``tta: flip``, the map of the mirrored image is mirrored back and averaged in, as the
  network averages its probabilities.
- ``occlusion``: occlusion sensitivity (Zeiler and Fergus, 2014) through any opened runtime
  (:func:`pneumo_edge.runtimes.open_runtime`: onnx, onnx-fp16, int8, trt, torch), so the map
  explains the exact file that scores on the edge box. A square patch, filled with the image's
  mean grey, slides over the image; each pixel's value is the mean drop of the positive class's
  probability over the patch positions that hide it. Batched and torch-free; it costs one model
  call per patch position (``positions()``), e.g. 15 x 15 = 225 at the defaults.

Maps come back as float arrays ``[S, S]`` in the method's units (Grad-CAM: arbitrary, >= 0;
occlusion: probability drop, may be negative where hiding a patch raises the probability).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pneumo_edge.errors import PneumoError
from pneumo_edge.explain.overlay import Legend
from pneumo_edge.model import modeldir

METHODS = ("gradcam", "occlusion")


# --- Grad-CAM (torch) --------------------------------------------------------------------------

def gradcam(net, pixels: np.ndarray, target: int, layer: str = "layer4") -> np.ndarray:
    """Grad-CAM maps ``[N, S, S]`` (>= 0, unscaled) of ``net`` (a :class:`pneumo_edge.model.net.XrayNet`)
    for class ``target`` on uint8 ``pixels [N, 1, S, S]``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8))
    x = x.to(next(net.parameters()).device)
    cam = _gradcam_once(net, x, target, layer)
    if getattr(net, "tta", "none") == "flip":
        cam = (cam + torch.flip(_gradcam_once(net, torch.flip(x, dims=[3]), target, layer),
                                dims=[2])) / 2
    return cam.cpu().numpy().astype(np.float64)


def _gradcam_once(net, x, target: int, layer: str):
    import torch
    import torch.nn.functional as F

    stage = getattr(net.backbone, layer)
    acts = []
    hook = stage.register_forward_hook(lambda _m, _i, out: acts.append(out))
    try:
        net.eval()
        with torch.enable_grad():
            z = net.logits(x).float()
            # the log-odds of the target class against the rest (for two classes the
            # softmax's own argument), so evidence for the other class counts against it
            others = torch.cat([z[:, :target], z[:, target + 1:]], dim=1)
            score = (z[:, target] - torch.logsumexp(others, dim=1)).sum()
            (grad,) = torch.autograd.grad(score, acts[0])
    finally:
        hook.remove()
    a = acts[0].detach().float()
    weights = grad.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * a).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return cam[:, 0]


# --- occlusion (any runtime, numpy only) ---------------------------------------------------------

def default_patch(size: int) -> tuple[int, int]:
    """(patch, stride): an eighth of the image, moved by half a patch."""
    patch = max(2, size // 8)
    return patch, max(1, patch // 2)


def positions(size: int, patch: int, stride: int) -> list[int]:
    """Patch offsets along one axis, the last one flush with the edge so every pixel is hidden
    at least once."""
    if patch > size:
        raise ValueError(f"patch {patch} is larger than the image ({size})")
    pos = list(range(0, size - patch + 1, stride))
    if pos[-1] != size - patch:
        pos.append(size - patch)
    return pos


def occlusion(runtime, image: np.ndarray, target: int, patch: int | None = None,
              stride: int | None = None, batch: int = 32,
              base: float | None = None) -> tuple[np.ndarray, float]:
    """(map ``[S, S]`` of mean probability drops, the unoccluded probability) for one uint8
    ``image [1, S, S]``, running ``runtime`` on batches of occluded copies. ``base``: the
    unoccluded probability when the caller has it already (else one more model call)."""
    size = image.shape[-1]
    dp, ds = default_patch(size)
    patch, stride = patch or dp, stride or ds
    if base is None:
        base = _probs(runtime, image[None])[0, target]
    fill = np.uint8(round(float(image.mean())))
    offsets = [(y, x) for y in positions(size, patch, stride) for x in positions(size, patch, stride)]
    total = np.zeros((size, size), np.float64)
    count = np.zeros((size, size), np.float64)
    for i in range(0, len(offsets), batch):
        chunk = offsets[i:i + batch]
        copies = np.repeat(image[None], len(chunk), axis=0)
        for k, (y, x) in enumerate(chunk):
            copies[k, 0, y:y + patch, x:x + patch] = fill
        p = _probs(runtime, copies)[:, target]
        for k, (y, x) in enumerate(chunk):
            total[y:y + patch, x:x + patch] += base - p[k]
            count[y:y + patch, x:x + patch] += 1
    return total / count, float(base)


def _probs(runtime, pixels: np.ndarray) -> np.ndarray:
    """The runtime on one batch with scoring's checks (a runtime that raises or answers in another
    shape is a ModelError); a non-finite probability is refused here too."""
    from pneumo_edge.sources.local import run_model

    p = run_model(runtime, pixels, len(runtime.card.classes)).astype(np.float64)
    if not np.isfinite(p).all():
        raise PneumoError(f"the {runtime.name} runtime produced non-finite probabilities")
    return p


# --- one image, either method ------------------------------------------------------------------

@dataclass
class Explanation:
    probs: np.ndarray  # [C], from the runtime that was explained
    heat: np.ndarray  # [S, S] in [0, 1], what the picture shows
    legend: Legend
    method: str


class Explainer:
    """Explains images with ``method`` for an opened runtime. ``gradcam`` needs the torch
    runtime (its ``model``); ``occlusion`` takes any."""

    def __init__(self, runtime, method: str, *, patch: int | None = None,
                 stride: int | None = None, batch: int = 32):
        if method not in METHODS:
            raise PneumoError(f"unknown explain method {method!r}; choose {' or '.join(METHODS)}")
        if method == "gradcam" and not hasattr(runtime, "model"):
            raise PneumoError(f"gradcam needs the torch model ({modeldir.MODEL_PT} and torch); the "
                              f"{runtime.name} runtime has none: use --method occlusion")
        self.rt, self.method, self.batch = runtime, method, batch
        self.card = runtime.card
        self.pos = self.card.positive_index
        size = self.card.image_size
        d = default_patch(size)
        self.patch, self.stride = patch or d[0], stride or d[1]

    def __call__(self, image: np.ndarray) -> Explanation:
        """One uint8 ``image [1, S, S]``."""
        pos_name = self.card.positive_class
        probs = _probs(self.rt, image[None])[0]
        if self.method == "gradcam":
            raw = gradcam(self.rt.model, image[None], self.pos)[0]
            top = float(raw.max())
            heat = raw / top if top > 0 else np.zeros_like(raw)
            legend = Legend(f"Grad-CAM (last convolutional stage) for {pos_name}, scaled to "
                            "this image's maximum: where the network found evidence for it",
                            "0", "max" if top > 0 else "0 (no evidence)")
        else:
            raw, _ = occlusion(self.rt, image, self.pos, self.patch, self.stride, self.batch,
                               base=probs[self.pos])
            top = float(raw.max())
            heat = np.clip(raw, 0, None) / top if top > 0 else np.zeros_like(raw)
            legend = Legend(f"Occlusion: drop of P({pos_name}) when a {self.patch}x"
                            f"{self.patch} px patch covering the spot is greyed out "
                            f"({self.rt.name} runtime, {len(positions(raw.shape[0], self.patch, self.stride)) ** 2} "
                            "patch positions)",
                            "0", f"drop {top:.3f}" if top > 0 else "0 (no drop)")
        if not np.isfinite(heat).all():
            raise PneumoError("the heatmap has non-finite values")
        return Explanation(probs, heat, legend, self.method)


def caption(path: str, expl: Explanation, card, threshold: float, label: str) -> list[str]:
    from pathlib import Path

    name = Path(path).name
    name = name if len(name) <= 60 else name[:28] + "..." + name[-28:]
    p = float(expl.probs[card.positive_index])
    return [name, (f"label {label}   P({card.positive_class}) = {p:.3f}   "
                  f"threshold {threshold:.3f}"),
            f"{expl.method}; {card.image_size}x{card.image_size} px as the model sees them"]


def picture_png(image: np.ndarray, path: str, expl: Explanation, card, threshold: float,
                label: str) -> bytes:
    from pneumo_edge.explain.overlay import png_bytes, render

    return png_bytes(render(image[0], expl.heat, expl.legend,
                            caption(path, expl, card, threshold, label)))

"""The training run's options (the CLI's `train` command maps onto :class:`TrainConfig`), their
checks, and the device they name. Everything here is checked before the output folder is
touched. No torch import at module level: the CLI reads TrainConfig's defaults and help."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, replace
from typing import TYPE_CHECKING

from pneumo_edge.train.budget import SCHEDULES

from pneumo_edge.errors import RuntimeUnavailable, UsageError
from pneumo_edge.evaluation.metrics import validate_threshold_rule

if TYPE_CHECKING:
    import torch

#: --select: the history column and its sign (higher is better)
SELECT = {"val_loss": ("val_loss", -1), "val_f1": ("val_f1", 1),
          "val_auroc": ("val_roc_auc", 1), "shifted_val_loss": ("shifted_val_loss", -1),
          "shifted_val_auroc": ("shifted_val_roc_auc", 1)}
#: the values check_config accepts for these options (and the CLI offers as their choices);
#: train/data.py's Augment implements the augment presets other than none
OPTIMIZERS = ("adamw", "sgd")
AUGMENTS = ("none", "basic", "strong")
THRESHOLD_ON = ("val+shifted", "val")
AVERAGES = ("ema", "swa", "none")
PROXIES = ("none", "cluster")
DEFAULT_BUDGET_S = 55 * 60.0
#: --train-cache-size's default under --augment strong, as a multiple of --image-size (256 px
#: at 224): the best row on the cluster proxy of issue 22's ablation (benchmarks/ABLATION.md)
TRAIN_CACHE_RATIO = 8 / 7
#: options whose unset value, in configs recorded before runs wrote their resolved values,
#: meant another option's value (the cache size was --image-size until its default became
#: TRAIN_CACHE_RATIO times it): resumes (train/rundir.py) and the ablation's recorded rows
#: (benchmarks/ablation.py) read old records with it
UNSET_MEANT = {"train_cache_size": "image_size"}


def _opt(default=MISSING, help: str | None = None):
    """A TrainConfig field: its default and the help text ``pneumo-edge train --help`` shows."""
    return field(default=default, metadata={"help": help} if help else {})


@dataclass
class TrainConfig:
    """The training run's options; each field is a ``pneumo-edge train`` option (``--arch`` for
    ``arch``) whose default and help the CLI reads from here."""

    data: str = _opt(help="ImageFolder root: DATA/train/CLASS/*, optional DATA/val and DATA/test "
                          "(what is missing is split off train, grouped by patient).")
    out: str = _opt(help="Model directory to write.")
    arch: str = _opt("resnet50")
    weights: str = _opt("none", "imagenet (from the local torch hub cache), none, or a "
                                "state-dict PATH.")
    image_size: int = _opt(224)
    epochs: int | None = _opt(None, "Epochs; with a time budget, the most it may run. Default: "
                                    "what the budget allows (10 without a budget).")
    time_budget: float | None = _opt(DEFAULT_BUDGET_S, "Wall time for the whole run (decoding "
                                     "and final evaluation included): the first epoch is timed "
                                     "and the schedule is fitted to finish in time. none = no "
                                     "budget.")  # seconds; None = no budget
    batch_size: int = _opt(32)
    lr: float = _opt(1e-3, "Peak learning rate.")
    optimizer: str = _opt("adamw")
    weight_decay: float = _opt(1e-4)
    clip_grad: float = _opt(0.0, "Max grad norm; 0 = off.")
    scheduler: str = _opt("cosine")
    warmup_epochs: float = _opt(1.0, "Linear learning-rate warm-up (cosine).")
    class_weights: str = _opt("auto", "auto (inverse frequency), none, or w1,w2.")
    augment: str | bool = _opt("strong", "basic: rotation, shift, flip, brightness/contrast; "
                                         "strong: also resized crops, gamma, blur and noise.")
    # (augment True = basic, False = none, for callers of the plain function)
    norm: str = _opt("image", "Input normalisation inside the network: each image by its own "
                              "mean/std, or fixed ImageNet statistics.")  # pneumo_edge.model.net
    tta: str = _opt("none", "Average the image and its mirror inside the network (every export "
                            "too).")
    label_smoothing: float = _opt(0.1, "Soft targets: 1-e on the true class.")
    ema: float = _opt(0.998, "Decay of the weights' moving average, which is what gets "
                             "evaluated and saved; 0 = off.")
    mixup: float = _opt(0.0, "Mixup Beta(a, a); 0 = off.")
    crop_scale: str = _opt("0.7,1", "Area of the random resized crops (--augment strong) as "
                                    "MIN,MAX fractions of the image.")
    jitter: float = _opt(0.2, "Brightness and contrast jitter: each scaled by a factor drawn "
                              "from 1 +- this.")
    zoom_out: float = _opt(0.0, "Probability of shrinking a training image into a black canvas "
                                "(a zoomed-out acquisition, framing with a border); 0 = off.")
    zoom_out_min: float = _opt(0.7, "Smallest scale of a zoomed-out image (drawn uniformly "
                                    "between this and 1).")
    train_cache_size: int | None = _opt(None, "Decode and cache the training images at this "
                                        "size and crop them to --image-size (--augment "
                                        "strong). Default: 8/7 of --image-size with --augment "
                                        "strong (256 at 224), else --image-size; --image-size "
                                        "turns it off. Evaluation stays at --image-size.")
    average: str = _opt("ema", "Weights evaluated and saved: ema (--ema's moving average), "
                               "swa (the uniform average of the last --swa-epochs epochs' "
                               "weights after selection ran, BatchNorm statistics recomputed "
                               "on one training pass), none (the raw weights).")
    swa_epochs: int = _opt(3, "Epochs averaged by --average swa.")
    class_weight_power: float = _opt(1.0, "Exponent on the inverse-frequency class weights of "
                                          "--class-weights auto: 1 = inverse frequency, "
                                          "0 = unweighted.")
    val_fraction: float = _opt(0.15, "Share of train held out for validation when DATA/val is "
                                     "absent.")
    test_fraction: float = _opt(0.15, "Share of train held out as an internal test split when "
                                      "DATA/test is absent (never used for selection).")
    seed: int = _opt(42)
    proxy: str = _opt("none", "cluster: hold out the patients of one acquisition-like cluster "
                              "of the training data (intensity, border, noise and sharpness "
                              "statistics) from train, val and test, and report the model on "
                              "it (cluster_holdout) as a proxy for another hospital's images.")
    proxy_clusters: int = _opt(10, "Clusters formed by --proxy cluster.")
    proxy_min_images: int = _opt(50, "Images of every class the held-out cluster needs.")
    select: str = _opt("val_auroc", "How the saved epoch is chosen.")
    min_epochs: int = _opt(3, "Epochs before one can be selected.")
    threshold_for: str = _opt("youden", "Decision threshold rule: youden (best sensitivity + "
                                        "specificity), f1, recall:0.95 or fixed:0.5.")
    threshold_on: str = _opt("val+shifted", "Choose the threshold on validation pooled with "
                                            "shifted validation, or on validation alone.")
    positive_class: str = _opt("", "Default: PNEUMONIA, else the last class.")
    amp: bool | None = _opt(None, "Mixed precision. Default: on for CUDA and for CPUs with bf16 "
                                  "instructions (AMX, AVX-512 BF16), off otherwise.")
    workers: int = _opt(2, "DataLoader workers.")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1 ...")
    resume: bool = _opt(False, "Continue an interrupted run in --out.")
    force: bool = _opt(False, "Replace the model in --out (only the files training and export "
                              "write there; nothing else is deleted).")
    cache: str = _opt("", "Folder of decoded pixels, reused by later runs and shared by every "
                          "torchrun rank (rebuilt when the files, --image-size or the "
                          "preprocessing change). Default: OUT/pixel-cache.")
    no_cache: bool = _opt(False, "Decode every image into memory instead of the pixel cache.")
    calibrate: bool = _opt(True, "After selection, fit calibrated probabilities and the input "
                                 "quality gate on validation (pneumo-edge calibrate does it "
                                 "later for a model trained without).")

    @property
    def augment_preset(self) -> str:
        if isinstance(self.augment, bool):
            return "basic" if self.augment else "none"
        return self.augment

    @property
    def crop_range(self) -> tuple[float, float]:
        """--crop-scale as (min, max); ValueError when it is not two fractions in order."""
        try:
            lo, hi = (float(x) for x in str(self.crop_scale).split(","))
        except ValueError:
            raise ValueError("use two fractions MIN,MAX such as 0.08,1") from None
        if not (0 < lo <= hi <= 1):
            raise ValueError("need 0 < MIN <= MAX <= 1")
        return lo, hi

    @property
    def net(self) -> dict:
        return {"norm": self.norm, "tta": self.tta}

    @property
    def crop_source_size(self) -> int:
        """The size the training images are decoded at: --train-cache-size, else (the
        default) TRAIN_CACHE_RATIO times --image-size under --augment strong, whose crops
        bring them back to --image-size, and --image-size otherwise."""
        if self.train_cache_size:
            return self.train_cache_size
        if self.augment_preset == "strong":
            return round(self.image_size * TRAIN_CACHE_RATIO)
        return self.image_size

    def resolved(self) -> TrainConfig:
        """This config with its derived defaults spelled out, as a run records it (so a card
        or a resumed run never depends on what a default meant when it was read)."""
        return replace(self, train_cache_size=self.crop_source_size)


def pick_device(name: str) -> torch.device:
    import torch

    from pneumo_edge.runtimes.torch_rt import resolve_device  # the one --device parser

    try:
        return torch.device(resolve_device(torch, name))
    except (UsageError, RuntimeUnavailable) as exc:
        raise UsageError(f"--device {name}: {exc}") from None


def default_amp(device: torch.device) -> bool:
    """Mixed precision where the hardware runs it natively: any CUDA GPU, and CPUs with bf16
    instructions (AMX or AVX-512 BF16; a ResNet50 step was 2.3x faster than fp32 on an AMX Xeon)."""
    if device.type == "cuda":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read(1 << 16)
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def check_config(cfg: TrainConfig) -> None:
    """Every option that can be checked without the data: exit 2 before anything is read or
    written. (The CLI checks most of these too; plain-function callers get the same rules.)"""
    from pneumo_edge.train.data import class_weights  # imports torch

    def bad(opt, why):
        raise UsageError(f"--{opt.replace('_', '-')} {getattr(cfg, opt)!r}: {why}")

    for opt, lo, hi in (("lr", 0, None), ("weight_decay", 0, None), ("clip_grad", 0, None),
                        ("label_smoothing", 0, 0.5), ("ema", 0, 0.99999), ("mixup", 0, None),
                        ("val_fraction", 0, 1), ("test_fraction", 0, 1),
                        ("warmup_epochs", 0, None), ("jitter", 0, 0.9), ("zoom_out", 0, 1),
                        ("zoom_out_min", 0.2, 1), ("class_weight_power", 0, 1)):
        v = getattr(cfg, opt)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            bad(opt, "not a finite number")
        if v < lo or (hi is not None and v > hi) or (opt in ("lr", "val_fraction") and v == 0):
            bad(opt, f"out of range ({lo}..{hi if hi is not None else 'inf'})")
    if cfg.val_fraction + cfg.test_fraction >= 1:
        bad("val_fraction", f"with --test-fraction {cfg.test_fraction} leaves nothing to train on")
    if cfg.time_budget is not None and not (math.isfinite(cfg.time_budget) and cfg.time_budget > 0):
        bad("time_budget", "not a positive duration")
    if cfg.cache and cfg.no_cache:
        bad("cache", "--cache and --no-cache exclude each other")
    if cfg.batch_size < 2:
        bad("batch_size", "must be at least 2 (BatchNorm needs two images per batch)")
    if cfg.augment_preset not in AUGMENTS:
        bad("augment", f"choose one of {', '.join(AUGMENTS)}")
    if cfg.scheduler not in SCHEDULES:
        bad("scheduler", f"choose one of {', '.join(SCHEDULES)}")
    if cfg.select not in SELECT:
        bad("select", f"choose one of {', '.join(SELECT)}")
    if cfg.threshold_on not in THRESHOLD_ON:
        bad("threshold_on", f"choose one of {', '.join(THRESHOLD_ON)}")
    if cfg.optimizer not in OPTIMIZERS:
        bad("optimizer", f"choose one of {', '.join(OPTIMIZERS)}")
    try:
        validate_threshold_rule(cfg.threshold_for)
    except ValueError as exc:
        raise UsageError(f"--threshold-for: {exc}") from None
    _check_recipe(cfg, bad)
    if cfg.class_weights not in ("auto", "none"):
        try:
            class_weights(None, len(cfg.class_weights.split(",")), cfg.class_weights)
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def _check_recipe(cfg: TrainConfig, bad) -> None:
    """The ablation options of issue 22: crops, cache size, weight averaging, class weights,
    the cluster proxy."""
    try:
        _ = cfg.crop_range
    except ValueError as exc:
        bad("crop_scale", str(exc))
    size = cfg.train_cache_size
    if size is not None and size != cfg.image_size:
        if size < cfg.image_size:
            bad("train_cache_size", f"smaller than --image-size {cfg.image_size}")
        if cfg.augment_preset != "strong":
            bad("train_cache_size", "needs --augment strong (its crops bring the images to "
                                    "--image-size)")
    if cfg.average not in AVERAGES:
        bad("average", f"choose one of {', '.join(AVERAGES)}")
    if cfg.swa_epochs < 1:
        bad("swa_epochs", "must be at least 1")
    if cfg.class_weight_power != 1 and cfg.class_weights != "auto":
        bad("class_weight_power", "applies to --class-weights auto only")
    if cfg.proxy not in PROXIES:
        bad("proxy", f"choose one of {', '.join(PROXIES)}")
    if not 2 <= cfg.proxy_clusters <= 20:
        bad("proxy_clusters", "out of range (2..20)")
    if cfg.proxy_min_images < 1:
        bad("proxy_min_images", "must be at least 1")

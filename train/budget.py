"""The time budget and the learning-rate schedule it shapes.

``--time-budget 55m`` means: the whole run, decoding and the final evaluation included, ends
within 55 minutes. The first epoch measures what an epoch costs on this machine; the plan then
sets the number of epochs so that the schedule completes (the learning rate reaches its end),
leaving room for the final evaluation. After every epoch the plan is checked again and only
ever shortened (a machine that got busier), so the run stops on time with a completed schedule
whenever it can. The schedule is a function of progress = step / planned steps, so changing the
plan reshapes the rest of the schedule instead of cutting it off.

No torch import here: the CLI parses durations with this module.
"""

from __future__ import annotations

import math
import re

SCHEDULES = ("none", "step", "onecycle", "cosine")


def parse_duration(text: str) -> float | None:
    """Seconds for ``55m``, ``1h``, ``1h30m``, ``900s``, ``90`` (minutes); None for ``none``
    or ``0``."""
    t = str(text).strip().lower()
    if t in ("none", "off", "0"):
        return None
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t) * 60
    else:
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", t)
        if not parts or not any(parts.groups()):
            raise ValueError(f"{text!r} is not a duration (use e.g. 55m, 1h, 900s or none)")
        h, m, s = (float(g) if g else 0.0 for g in parts.groups())
        seconds = h * 3600 + m * 60 + s
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at ``step`` of ``total`` planned steps. Cosine:
    linear warm-up over ``warmup`` steps, then a half cosine to zero at ``total``; onecycle: the
    same shape with 30 % of the plan as warm-up; step: / 10 at one and two thirds of the plan."""
    p = min(max(step / max(total, 1), 0.0), 1.0)
    if schedule == "none":
        return 1.0
    if schedule == "step":
        return 0.1 ** min(2, int(p * 3))
    if schedule in ("cosine", "onecycle"):
        w = 0.3 * total if schedule == "onecycle" else min(warmup, total // 2)
        if step < w:
            return 0.05 + 0.95 * step / w
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - w) / max(1.0, total - w))))
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")


class Plan:
    """How many epochs this run will train; steps are counted by the caller."""

    def __init__(self, epochs: int | None, budget_s: float | None, steps_per_epoch: int,
                 default_epochs: int = 10, max_epochs: int = 100):
        self.budget_s = budget_s
        self.cap = epochs if epochs else (max_epochs if budget_s else default_epochs)
        # until the first epoch is measured, assume the cap (only the warm-up is affected)
        self.epochs = self.cap
        self.steps_per_epoch = steps_per_epoch
        self.measured = False

    @property
    def total_steps(self) -> int:
        return max(1, self.epochs * self.steps_per_epoch)

    def replan(self, done: int, elapsed_s: float, epoch_s: float, reserve_s: float) -> str:
        """After ``done`` epochs at ``epoch_s`` each (the slowest seen), ``elapsed_s`` since the
        run started: the epochs that still fit. Returns a log line when the plan changed."""
        if self.budget_s is None:
            return ""
        left = self.budget_s - elapsed_s - reserve_s
        fits = done + max(0, math.floor(left / max(epoch_s, 1e-6)))
        new = max(done, min(self.cap if not self.measured else self.epochs, fits))
        self.measured = True
        if new == self.epochs:
            return ""
        old, self.epochs = self.epochs, max(1, new)
        return (f"time budget {self.budget_s / 60:.1f} min: {epoch_s:.0f} s per epoch, "
                f"{reserve_s:.0f} s kept for the final evaluation -> {self.epochs} epochs "
                f"(was {old})")

    def estimate(self, elapsed_s: float, epoch_s: float, reserve_s: float) -> str:
        """The first plan, from the step time measured early in the first epoch
        (``elapsed_s``: spent before that epoch began). The end of the first epoch replaces it
        with a measured plan."""
        if self.budget_s is None or self.measured:
            return ""
        fits = math.floor((self.budget_s - elapsed_s - reserve_s) / max(epoch_s, 1e-6))
        self.epochs = max(1, min(self.cap, fits))
        return (f"time budget {self.budget_s / 60:.1f} min: about {epoch_s:.0f} s per epoch "
                f"-> {self.epochs} epochs (measured again after the first)")

    def should_stop(self, done: int) -> bool:
        return done >= self.epochs

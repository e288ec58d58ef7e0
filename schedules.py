"""Learning-rate schedules: the rate of every step as a pure function of the epoch and step
counters, so that resuming needs only counters. Each script builds its Schedule from its flags and
the epoch loop (loop.py) reads it."""
import math
from dataclasses import dataclass
from typing import Optional

TWA_SCHEDULES = ("step", "step-fraction", "constant", "linear", "cosine")


def step_milestones(epochs):
    """Epochs at which the step schedule divides the rate by 10 (50% and 75% of training)."""
    return int(epochs * 0.5), int(epochs * 0.75 + 0.9)


def lr_at(schedule, base_lr, epoch, epochs, fraction, swa_start=None, swa_lr=None):
    """The learning rate in `epoch` at `fraction` (in [0, 1)) of all training steps: a pure function,
    so that resuming needs only counters. step and swa: per epoch; step-fraction (the step schedule at
    50% and 75% of the steps, so that even one epoch sees all three rates), linear and cosine: per step."""
    if schedule == "constant":
        return base_lr
    if schedule == "swa":
        return base_lr * swa_factor(epoch / swa_start, swa_lr / base_lr)
    if schedule == "step":
        return base_lr * 0.1 ** sum(epoch >= m for m in step_milestones(epochs))
    if schedule == "step-fraction":
        return base_lr * 0.1 ** ((fraction >= 0.5) + (fraction >= 0.75))
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * fraction))
    if schedule == "linear":
        return base_lr * (1 - fraction)
    raise ValueError(f"unknown schedule {schedule!r}")


@dataclass(frozen=True)
class Schedule:
    """A run's learning rate: schedule `name` (see lr_at) from `lr` over `epochs`, a linear warm-up
    over the first `warmup_epochs`, and for the SWA schedule its swa_start and swa_lr. Each script
    builds its own from its flags."""
    name: str
    lr: float
    epochs: int
    warmup_epochs: float = 0.0
    swa_start: Optional[float] = None
    swa_lr: Optional[float] = None

    def rate(self, epoch, batch, steps):
        """The rate of step `batch` of `steps` in `epoch`."""
        fraction = (epoch * steps + batch) / (self.epochs * steps)
        warmup = self.warmup_epochs * steps  # steps of linear warm-up
        scale = min(1.0, (epoch * steps + batch + 1) / warmup) if warmup else 1.0
        return scale * lr_at(self.name, self.lr, epoch, self.epochs, fraction, self.swa_start,
                             self.swa_lr)


def swa_factor(t, ratio):
    """The SWA schedule (Izmailov et al. 2018; the reference's swa/ scripts) at t = epoch / swa_start:
    the full rate for the first half, a linear decay to `ratio` of it by 90%, then `ratio` for good."""
    if t <= 0.5:
        return 1.0
    if t <= 0.9:
        return 1.0 - (1.0 - ratio) * (t - 0.5) / 0.4
    return ratio

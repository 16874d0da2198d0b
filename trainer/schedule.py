"""Learning-rate schedules (§5).

The paper: "an equal learning rate for all layers, which we adjusted manually throughout
training. The heuristic which we followed was to divide the learning rate by 10 when the
validation error rate stopped improving with the current learning rate. The learning rate was
initialized at 0.01 and reduced three times prior to termination."

* :class:`PlateauSchedule` automates that heuristic: after each validation, if the top-1 error has
  not improved by ``min_delta`` for ``patience`` evaluations, divide by 10; after ``max_drops``
  drops, a further stall ends training (``done``). Patience and min_delta are this project's
  choice (the authors decided by hand).
* :class:`StepSchedule` is the fixed alternative: divide by 10 at given epochs.

Both keep their state in plain numbers (``state_dict``) so a checkpoint restores them exactly. Their
defaults are the config's (``OptimConfig``, config.py), where each is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .config import OptimConfig

DEFAULT = OptimConfig()


class PlateauSchedule:
    def __init__(
        self,
        base_lr: float = DEFAULT.lr,
        *,
        factor: float = DEFAULT.lr_drop_factor,
        max_drops: int = DEFAULT.lr_drops,
        patience: int = DEFAULT.plateau_patience,
        min_delta: float = DEFAULT.plateau_min_delta,
        stop_after_last: bool = DEFAULT.stop_after_last_plateau,
    ) -> None:
        self.base_lr, self.factor, self.max_drops = base_lr, factor, max_drops
        self.patience, self.min_delta, self.stop_after_last = patience, min_delta, stop_after_last
        self.lr = base_lr
        self.best: float | None = None  # best validation top-1 error seen
        self.bad_evals = 0  # evaluations since the last improvement
        self.drops = 0
        self.done = False

    def start_epoch(self, epoch: int) -> float:
        return self.lr

    def observe(self, val_top1_err: float) -> str | None:
        """Feed one validation result; returns "drop" or "done" when that happens, else None."""
        if self.best is None or val_top1_err < self.best - self.min_delta:
            self.best = float(val_top1_err)
            self.bad_evals = 0
            return None
        self.bad_evals += 1
        if self.bad_evals < self.patience:
            return None
        self.bad_evals = 0
        if self.drops < self.max_drops:
            self.drops += 1
            self.lr = self.base_lr * self.factor**self.drops
            return "drop"
        if self.stop_after_last:
            self.done = True
            return "done"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "plateau",
            "lr": self.lr,
            "best": self.best,
            "bad_evals": self.bad_evals,
            "drops": self.drops,
            "done": self.done,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("kind") != "plateau":
            raise ValueError(f"checkpoint holds a {d.get('kind')!r} schedule, this run uses 'plateau'")
        self.lr = float(d["lr"])
        self.best = None if d["best"] is None else float(d["best"])
        self.bad_evals, self.drops, self.done = int(d["bad_evals"]), int(d["drops"]), bool(d["done"])


class StepSchedule:
    def __init__(
        self,
        base_lr: float = DEFAULT.lr,
        *,
        milestones: Sequence[int] = DEFAULT.step_epochs,
        factor: float = DEFAULT.lr_drop_factor,
        max_drops: int = DEFAULT.lr_drops,
    ) -> None:
        self.base_lr, self.factor = base_lr, factor
        self.milestones = sorted(int(m) for m in milestones)[:max_drops]
        self.lr = base_lr
        self.done = False

    def lr_for_epoch(self, epoch: int) -> float:
        """lr during epoch ``epoch`` (0-based): one drop for each milestone already reached."""
        return self.base_lr * self.factor ** sum(epoch >= m for m in self.milestones)

    def start_epoch(self, epoch: int) -> float:
        self.lr = self.lr_for_epoch(epoch)
        return self.lr

    def observe(self, val_top1_err: float) -> str | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "step", "lr": self.lr}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("kind") != "step":
            raise ValueError(f"checkpoint holds a {d.get('kind')!r} schedule, this run uses 'step'")
        self.lr = float(d["lr"])


def create_schedule(config) -> PlateauSchedule | StepSchedule:
    """The schedule named by ``config.schedule`` (a :class:`~alexnet.trainer.config.TrainConfig`)."""
    if config.schedule == "plateau":
        return PlateauSchedule(
            config.lr,
            factor=config.lr_drop_factor,
            max_drops=config.lr_drops,
            patience=config.plateau_patience,
            min_delta=config.plateau_min_delta,
            stop_after_last=config.stop_after_last_plateau,
        )
    return StepSchedule(
        config.lr, milestones=config.step_epochs, factor=config.lr_drop_factor, max_drops=config.lr_drops
    )

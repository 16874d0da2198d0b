"""Is the run learning? Per-layer norms and two loss alarms, checked at each log interval.

* :func:`layer_norms`: each learned layer's weight norm and gradient norm (both columns together),
  read after the step at a log interval only, so the graphed step itself is unchanged; on a GPU it
  costs a few small reductions and one host copy, next to the loss's own sync at that point.
* :class:`LossWatch`: two conditions, each reported once per process with one line pointing to
  docs/TRAINING.md and a ``{"kind": "alert"}`` record in metrics.jsonl:

  - **stalled**: the logged training loss has stayed within ``stall_band`` x ln(classes) of
    ln(classes), the loss of a uniform guess, for ``stall_intervals`` logged intervals in a row;
  - **exploding**: a logged loss above ``explode_factor`` times the first logged loss.

The measurements behind both, and what to do, are in docs/TRAINING.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

DOC = "docs/TRAINING.md"


def layer_norms(model: nn.Module, layers: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """``{"weight_norm": {layer: |W|}, "grad_norm": {layer: |dL/dW|}}`` over each layer's weights.

    A layer split in columns counts both columns' kernels. Gradients that are not there (before the
    first step) are left out.
    """
    weights: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    for pname, p in model.named_parameters():
        layer = pname.split(".", 1)[0]
        if layer in weights and p.ndim > 1:
            weights[layer].append(p)
    names, values = [], []
    for layer, params in weights.items():
        w = torch.stack([p.detach().float().norm() ** 2 for p in params]).sum().sqrt()
        names.append(("weight_norm", layer))
        values.append(w)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            g = torch.stack([t.detach().float().norm() ** 2 for t in grads]).sum().sqrt()
            names.append(("grad_norm", layer))
            values.append(g)
    out: dict[str, dict[str, float]] = {"weight_norm": {}, "grad_norm": {}}
    gathered = torch.stack([v.to(values[0].device) for v in values])  # one host copy below
    for (kind, layer), v in zip(names, gathered.tolist(), strict=True):
        out[kind][layer] = v
    return out


@dataclass
class LossWatch:
    """Watches the logged training loss; :meth:`observe` returns the alerts raised by this value."""

    num_classes: int
    stall_intervals: int = 50  # 0 = off
    stall_band: float = 0.05  # fraction of ln(classes)
    explode_factor: float = 3.0  # 0 = off
    first_loss: float | None = None
    near_chance: int = 0  # consecutive logged intervals near ln(classes)
    raised: set[str] = field(default_factory=set)

    @property
    def chance_loss(self) -> float:
        return math.log(self.num_classes)

    def observe(self, step: int, loss: float) -> list[dict]:
        if not math.isfinite(loss):
            return []  # the trainer's non-finite stop handles it
        if self.first_loss is None:
            self.first_loss = loss
        alerts = []
        chance = self.chance_loss
        band = self.stall_band * chance
        self.near_chance = self.near_chance + 1 if abs(loss - chance) <= band else 0
        if self.stall_intervals and self.near_chance >= self.stall_intervals and "stalled" not in self.raised:
            alerts.append(
                self._alert(
                    "stalled",
                    step,
                    loss,
                    f"the training loss has stayed within {band:.3f} of ln({self.num_classes}) = {chance:.3f} "
                    f"(a uniform guess) for {self.near_chance} logged intervals up to step {step}",
                )
            )
        limit = self.explode_factor * self.first_loss
        if self.explode_factor and loss > limit and "exploding" not in self.raised:
            alerts.append(
                self._alert(
                    "exploding",
                    step,
                    loss,
                    f"the training loss is {loss:.3f} at step {step}, {loss / self.first_loss:.1f}x its first "
                    f"logged value {self.first_loss:.3f}",
                )
            )
        return alerts

    def _alert(self, name: str, step: int, loss: float, text: str) -> dict:
        self.raised.add(name)
        anchor = {"stalled": "a-stalled-run", "exploding": "an-exploding-loss"}[name]
        return {
            "kind": "alert",
            "alert": name,
            "step": step,
            "loss": loss,
            "message": f"warning: {text}; see {DOC}#{anchor}",
        }

    def state_dict(self) -> dict:
        return {"first_loss": self.first_loss, "near_chance": self.near_chance, "raised": sorted(self.raised)}

    def load_state_dict(self, state: dict) -> None:
        self.first_loss = state.get("first_loss")
        self.near_chance = int(state.get("near_chance", 0))
        self.raised = set(state.get("raised", ()))

"""Is the run learning? Per-layer norms and two loss alarms, checked at each log interval.

* :class:`LayerNorms`: each learned layer's weight norm and gradient norm (both columns together) as
  ONE device tensor, from one multi-tensor norm per device and one segment sum (a few kernels, not
  one per tensor). The trainer computes it after the step at a log point, so the graphed step itself
  is unchanged, and reads it with the loss one interval later (:class:`HostCopy`): no host
  synchronisation between log points. :func:`layer_norms` computes and reads at once.
* :class:`HostCopy`: device values copied to host memory without blocking (pinned memory, a CUDA
  event); :meth:`HostCopy.read` is the one place that waits for them.
* :class:`LossWatch`: two conditions, each reported once per process with one line pointing to
  docs/TRAINING.md and a ``{"kind": "alert"}`` record in metrics.jsonl:

  - **stalled**: the logged training loss has stayed within ``stall_band`` x ln(classes) of
    ln(classes), the loss of a uniform guess, for ``stall_intervals`` logged intervals in a row;
  - **exploding**: a logged loss above ``explode_factor`` times the first logged loss.

The measurements behind both, and what to do, are in docs/TRAINING.md.

* :class:`FeedWait` and :func:`device_memory`: the time the step waited for its batches and each
  device's peak memory, recorded at each log point (``feed_wait_s``, ``feed_wait_share``, ``memory``);
  one warning when the wait passes ``FEED_WAIT_WARN_SHARE`` of an interval.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import RunSettings
from .rundir import record

DEFAULT = RunSettings()  # the alarms' defaults are the config's (config.py), written once there

DOC = "docs/TRAINING.md"
KINDS = ("weight_norm", "grad_norm")


class LayerNorms:
    """:meth:`compute` gives, as one tensor on ``device``, each layer's weight norm then each layer's
    gradient norm (2 x len(layers) values), over the weights (not the biases) of both columns. A layer
    whose gradients are not there (before the first step) gets -inf there, which :meth:`as_dict` leaves
    out; a NaN or +inf is a non-finite weight or gradient, kept for the trainer's check."""

    def __init__(self, model: nn.Module, layers: tuple[str, ...]):
        self.layers = layers
        self.weights: list[tuple[int, nn.Parameter]] = [
            (layers.index(name.split(".", 1)[0]), p)
            for name, p in model.named_parameters()
            if name.split(".", 1)[0] in layers and p.ndim > 1
        ]
        self._segments: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # made once, on the device

    def compute(self, device: torch.device) -> torch.Tensor:
        n = len(self.layers)
        entries = [(i, p) for i, p in self.weights] + [(n + i, p.grad) for i, p in self.weights if p.grad is not None]
        by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
        for seg, t in entries:
            by_device.setdefault(t.device, []).append((seg, t.detach()))
        # One multi-tensor norm per device (the two columns may be on two GPUs), squared, then one
        # segment sum: a layer's norm over both columns is the root of the sum of their squares.
        squares = torch.cat(
            [
                torch.stack(torch._foreach_norm([t for _, t in group])).float().square().to(device, non_blocking=True)
                for group in by_device.values()
            ]
        )
        index, missing = self._segment(tuple(seg for group in by_device.values() for seg, _ in group), device)
        return torch.zeros(2 * len(self.layers), device=device).index_add_(0, index, squares).sqrt() - missing

    def _segment(self, segs: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The segment ids on the device, and what to subtract: 0, or +inf for a layer with no entry."""
        if segs not in self._segments:
            missing = torch.full((2 * len(self.layers),), math.inf)
            missing[list(set(segs))] = 0.0
            self._segments[segs] = (torch.tensor(segs, device=device), missing.to(device))
        return self._segments[segs]

    def as_dict(self, values: list[float]) -> dict[str, dict[str, float]]:
        """``{"weight_norm": {layer: |W|}, "grad_norm": {layer: |dL/dW|}}`` from :meth:`compute`'s values."""
        n = len(self.layers)
        return {
            kind: {
                layer: v for layer, v in zip(self.layers, values[k * n : (k + 1) * n], strict=True) if v != -math.inf
            }
            for k, kind in enumerate(KINDS)
        }


def layer_norms(model: nn.Module, layers: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """:class:`LayerNorms` computed and read at once (one host copy)."""
    norms = LayerNorms(model, layers)
    return norms.as_dict(norms.compute(norms.weights[0][1].device).tolist())


class HostCopy:
    """``values`` (a 1-d device tensor) copied to host memory without blocking the host: into pinned
    memory, with a CUDA event recorded behind the copy. :meth:`read` waits for that event only, by then
    usually long passed. On the CPU the copy is a plain synchronous one: the same code path."""

    def __init__(self, values: torch.Tensor):
        on_gpu = values.device.type == "cuda"
        self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=on_gpu)
        self.host.copy_(values, non_blocking=on_gpu)
        self.event = torch.cuda.Event() if on_gpu else None
        if self.event is not None:
            self.event.record(torch.cuda.current_stream(values.device))

    def read(self) -> list[float]:
        """The values (the one host synchronisation of a log interval)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


# The feed-wait warning: once per process, when the step waited for its batches more than this share
# of an interval's time (after the first interval, which holds the pipelines' start).
FEED_WAIT_WARN_SHARE = 0.10
FEED_WAIT_FIX = (
    "measure the input pipeline alone with `alexnet-prep bench-pipeline`, then raise --workers (reader "
    "processes), --pipelines or --num-threads, or put the dataset on faster storage (README: Feeding the GPU)"
)


class FeedWait:
    """The time the step waited for its batches: from the request for the next batch until it is ready.

    :meth:`batches` wraps the loader. On a GPU two events on the step's stream bracket each request, so
    the figure is the time the step's stream stood still for data (host time spent in the loader counts
    only where the device had nothing left to do), read at the next log point without a host
    synchronisation; on the CPU it is host time. :meth:`take` hands over an interval's measurements.
    """

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.host_s = 0.0

    def _mark(self):
        if self.stream is None:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return event

    def batches(self, loader):
        it = iter(loader)
        while True:
            start = self._mark()
            try:
                batch = next(it)
            except StopIteration:
                return
            if self.stream is None:
                self.host_s += time.perf_counter() - start
            else:
                self.pairs.append((start, self._mark()))
            yield batch

    def take(self) -> FeedInterval:
        out = FeedInterval(self.pairs, self.host_s)
        self.pairs, self.host_s = [], 0.0
        return out


@dataclass
class FeedInterval:
    pairs: list
    host_s: float

    def seconds(self) -> float:
        """The interval's wait in seconds (its events have completed when its values have been read)."""
        return self.host_s + sum(a.elapsed_time(b) for a, b in self.pairs) / 1000


@dataclass
class FeedWatch:
    """:meth:`observe` returns the feed-wait warning (once per process), for an interval whose step waited
    for its batches more than ``share`` of the time; the process's first interval, which holds the
    pipelines' start, is not judged."""

    share: float = FEED_WAIT_WARN_SHARE
    seen: int = 0
    raised: bool = False

    def observe(self, first: int, last: int, share: float, loss: float) -> list[dict]:
        self.seen += 1
        if self.raised or self.seen == 1 or share <= self.share:
            return []
        self.raised = True
        message = (
            f"warning: the step waited for its batches {100 * share:.0f}% of the time over steps {first}-{last} "
            f"(more than {100 * self.share:.0f}%): the input pipeline is the bottleneck; {FEED_WAIT_FIX}"
        )
        return [record("alert", alert="feed_wait", step=last, loss=loss, message=message)]


def device_memory(devices) -> dict[str, dict[str, float]]:
    """Peak allocated and reserved memory (GiB) of each CUDA device since the process started (read from
    the caching allocator's counters: no synchronisation); empty on the CPU."""
    out: dict[str, dict[str, float]] = {}
    for d in devices:
        if d.type == "cuda":
            out[str(d)] = {
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated(d) / 2**30, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(d) / 2**30, 3),
            }
    return out


@dataclass
class LossWatch:
    """Watches the logged training loss; :meth:`observe` returns the alerts raised by this value."""

    num_classes: int
    stall_intervals: int = DEFAULT.stall_intervals  # 0 = off
    stall_band: float = DEFAULT.stall_band  # fraction of ln(classes)
    explode_factor: float = DEFAULT.explode_factor  # 0 = off
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
        return record("alert", alert=name, step=step, loss=loss, message=f"warning: {text}; see {DOC}#{anchor}")

    def state_dict(self) -> dict:
        return {"first_loss": self.first_loss, "near_chance": self.near_chance, "raised": sorted(self.raised)}

    def load_state_dict(self, state: dict) -> None:
        self.first_loss = state.get("first_loss")
        self.near_chance = int(state.get("near_chance", 0))
        self.raised = set(state.get("raised", ()))

"""The bytes one training step moves, operator by operator, counted on the CPU (issue 26).

The step is the default GPU path's (trainer/step.py ``train_step``): the paper's network (grouped,
1000 classes), bf16 autocast, channels_last model and images, the loss in float32, PaperSGD's update.
A ``TorchDispatchMode`` sees every aten operator the step dispatches (forward, backward, update)
below autocast, so autocast's weight casts are counted too. Each operator counts the bytes of its
tensor arguments (tensor lists included) plus the bytes of the tensors it returns; an operator that
writes its arguments and returns nothing (the optimiser's ``_foreach_*_``) counts those again as
written; views count nothing. ``alexnet::lrn`` and ``alexnet::lrn_backward`` count what their GPU
kernels load and store (trainer/lrn.py ``KERNEL_TENSORS``), not what the CPU reference does.

Two batch sizes (2 and 4 by default) give each operator's bytes as a + b * batch, extrapolated to
batch 128. "before" is the step before issue 26: the norm layers on the reference arithmetic
(``lrn_reference``, autograd through its operators) and the update as four multi-tensor passes
(``optim.foreach_update``); "after" is the step as it is, with ``alexnet::lrn`` and
``alexnet::paper_sgd_``, whose CUDA kernels load w, g, v and store w, v (20 bytes per parameter, the
count's rule gives exactly that for the operator).

    .venv/bin/python benchmarks/bench_bytes.py [--batch 128] [--rows 25]

The step time the bytes imply on an H100 (at 2.5-3 TB/s of achieved HBM bandwidth) is an estimate
of the memory traffic's share only: no convolution or GEMM time, no launch gaps.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import defaultdict
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from alexnet.trainer import lrn as L
from alexnet.trainer import optim as O
from alexnet.trainer.model import AlexNet, LocalResponseNorm
from alexnet.trainer.optim import create_optimizer
from alexnet.trainer.step import train_step

GOAL_GB = 6.0
H100_TBPS = (2.5, 3.0)  # achieved HBM3 bandwidth, of 3.35 TB/s peak


def _nbytes(values) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor))


def _written_args(func, args, kwargs) -> list:
    """The arguments an operator's schema marks as written (``Tensor(a!)``)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            out.append(args[i] if i < len(args) else kwargs.get(arg.name))
    return out


class ByteCount(TorchDispatchMode):
    """Bytes per operator name (and calls), by the rule in the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = str(func.overloadpacket).replace("aten.", "")
        if func.is_view:
            return result
        if name in ("alexnet.lrn", "alexnet.lrn_backward"):
            moved = L.KERNEL_TENSORS[name.split(".")[1]] * _nbytes(args[0])
        else:
            written = _nbytes(result) or _nbytes(_written_args(func, args, kwargs))
            moved = _nbytes((args, kwargs)) + written
        self.bytes[name] += moved
        self.calls[name] += 1
        return result


def _reference_forward(self, x):
    return L.lrn_reference(x, self.size, self.alpha, self.beta, self.k, self.group_size or 0)


def count_step(batch: int, fused: bool) -> ByteCount:
    """One bf16 channels_last training step at ``batch`` (after one uncounted step, so that the
    optimiser's velocities exist), counted."""
    torch.manual_seed(0)
    model = AlexNet().train().to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model, 0.01, 0.9, 5e-4)
    images = (torch.randn(batch, 3, 224, 224) * 50).bfloat16().contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,))
    count = ByteCount()
    with contextlib.ExitStack() as stack:
        if not fused:
            stack.enter_context(mock.patch.object(LocalResponseNorm, "forward", _reference_forward))
            stack.enter_context(mock.patch.object(O, "paper_sgd_", O.foreach_update))
        train_step(model, optimizer, images, labels, precision="bf16")
        with count:
            train_step(model, optimizer, images, labels, precision="bf16")
    return count


def at_batch(small: tuple[ByteCount, ByteCount], batches: tuple[int, int], batch: int) -> dict[str, float]:
    """Each operator's bytes at ``batch``, linear in the batch through the two counts."""
    (c1, c2), (b1, b2) = small, batches
    out = {}
    for name in c1.bytes.keys() | c2.bytes.keys():
        y1, y2 = c1.bytes.get(name, 0), c2.bytes.get(name, 0)
        out[name] = y1 + (y2 - y1) * (batch - b1) / (b2 - b1)
    return out


def table(before: dict[str, float], after: dict[str, float], calls: dict[str, int], rows: int) -> str:
    names = sorted(before.keys() | after.keys(), key=lambda n: -max(before.get(n, 0), after.get(n, 0)))
    lines = [f"{'operator':<34} {'calls':>5} {'before GB':>10} {'after GB':>10}"]
    for name in names[:rows]:
        lines.append(
            f"{name:<34} {calls.get(name, 0):>5} {before.get(name, 0) / 1e9:>10.3f} {after.get(name, 0) / 1e9:>10.3f}"
        )
    rest_b = sum(before.get(n, 0) for n in names[rows:])
    rest_a = sum(after.get(n, 0) for n in names[rows:])
    lines.append(f"{f'({len(names) - rows} others)':<34} {'':>5} {rest_b / 1e9:>10.3f} {rest_a / 1e9:>10.3f}")
    tb, ta = sum(before.values()) / 1e9, sum(after.values()) / 1e9
    lines.append(f"{'total':<34} {'':>5} {tb:>10.2f} {ta:>10.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128, help="the batch to extrapolate to")
    p.add_argument("--small", type=int, nargs=2, default=(2, 4), help="the two batches counted")
    p.add_argument("--rows", type=int, default=25, help="operators listed (the rest summed)")
    args = p.parse_args()
    small = tuple(args.small)
    counts = {fused: tuple(count_step(b, fused) for b in small) for fused in (False, True)}
    before, after = (at_batch(counts[f], small, args.batch) for f in (False, True))
    calls = {**counts[False][1].calls, **counts[True][1].calls}
    print(
        f"bytes per training step at batch {args.batch} (bf16 autocast, channels_last, PaperSGD), "
        f"from batches {small[0]} and {small[1]} on the CPU"
    )
    print(table(before, after, calls, args.rows))
    for label, total in (("before", sum(before.values())), ("after", sum(after.values()))):
        ms = [total / (tbps * 1e12) * 1e3 for tbps in H100_TBPS]
        print(
            f"{label}: {total / 1e9:.2f} GB; at {H100_TBPS[1]:g}-{H100_TBPS[0]:g} TB/s on an H100 "
            f"{ms[1]:.1f}-{ms[0]:.1f} ms of memory traffic a step (estimate)"
        )
    total = sum(after.values()) / 1e9
    print(f"goal <= {GOAL_GB:g} GB: {'met' if total <= GOAL_GB else 'NOT met'} ({total:.2f} GB)")


if __name__ == "__main__":
    main()

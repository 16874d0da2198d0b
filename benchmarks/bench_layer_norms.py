"""What the per-layer norms cost at a log interval, before and after the multi-tensor form (CPU).

The trainer computes each learned layer's weight and gradient norm once per ``--log-every-steps``
(10) steps, after the step. Before: one norm kernel per tensor (30), a stack and a sum per layer, and
a stack of the ~16 results (about 110 small kernels). After (trainer/health.py, ``LayerNorms``): one
multi-tensor norm (``torch._foreach_norm``) and one segment sum, one tensor, read with the loss one
interval later. This times both (the process's CPU time, alternating rounds, medians) beside a training
step of the 1000-class network, and checks that they agree.

On a GPU the gain is not in FLOPs (either form reads the 61 M parameters and their gradients once)
but in launches and synchronisation: ~110 launches become a handful, and the host no longer waits
for them (nor for the loss) at the log point; torch.cuda.set_sync_debug_mode("error") checks that in
tests/test_train.py.

    .venv/bin/python benchmarks/bench_layer_norms.py [--batch-size 128] [--rounds 5]
"""

from __future__ import annotations

import math
import statistics
import time

import click
import torch

from alexnet.pipeline import constants as C
from alexnet.trainer import constants as TC
from alexnet.trainer.health import LayerNorms
from alexnet.trainer.model import LEARNED_LAYERS, AlexNet
from alexnet.trainer.optim import create_optimizer
from alexnet.trainer.step import train_step


def per_tensor_norms(model, layers) -> dict[str, dict[str, float]]:
    """The form before (as it was in trainer/health.py): a norm per tensor, a sum per layer."""
    weights: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    for pname, p in model.named_parameters():
        if pname.split(".", 1)[0] in weights and p.ndim > 1:
            weights[pname.split(".", 1)[0]].append(p)
    names, values = [], []
    for layer, params in weights.items():
        names.append(("weight_norm", layer))
        values.append(torch.stack([p.detach().float().norm() ** 2 for p in params]).sum().sqrt())
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            names.append(("grad_norm", layer))
            values.append(torch.stack([t.detach().float().norm() ** 2 for t in grads]).sum().sqrt())
    out: dict[str, dict[str, float]] = {"weight_norm": {}, "grad_norm": {}}
    for (kind, layer), v in zip(names, torch.stack(values).tolist(), strict=True):
        out[kind][layer] = v
    return out


def _cpu_time(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


@click.command()
@click.option("--batch-size", type=int, default=TC.BATCH_SIZE, show_default=True)
@click.option("--rounds", type=int, default=5, show_default=True)
@click.option("--log-every-steps", type=int, default=10, show_default=True)
def main(batch_size: int, rounds: int, log_every_steps: int) -> None:
    torch.manual_seed(0)
    model = AlexNet().train()
    optimizer = create_optimizer(model, TC.BASE_LR, TC.MOMENTUM, TC.WEIGHT_DECAY)
    x = torch.randn(batch_size, 3, C.CROP_SIZE, C.CROP_SIZE) * 50
    y = torch.randint(0, TC.NUM_CLASSES, (batch_size,))

    def step():
        train_step(model, optimizer, x, y, precision="fp32")

    step()  # warm-up; gradients now exist
    norms = LayerNorms(model, LEARNED_LAYERS)
    cpu = torch.device("cpu")
    before, after = per_tensor_norms(model, LEARNED_LAYERS), norms.as_dict(norms.compute(cpu).tolist())
    worst = max(abs(after[k][n] / before[k][n] - 1) for k in before for n in before[k])
    times: dict[str, list[float]] = {"step": [], "before": [], "after": []}
    for _ in range(rounds):  # alternating, so that the contended machine's load falls on both alike
        times["before"].append(_cpu_time(lambda: per_tensor_norms(model, LEARNED_LAYERS)))
        times["after"].append(_cpu_time(lambda: norms.as_dict(norms.compute(cpu).tolist())))
        times["step"].append(_cpu_time(step))
    step_s, before_s, after_s = (statistics.median(times[k]) for k in ("step", "before", "after"))
    interval = log_every_steps * step_s
    click.echo(
        f"torch threads: {torch.get_num_threads()}, batch {batch_size}, 1000 classes, "
        f"process CPU time (all threads), medians of {rounds} alternating rounds"
    )
    click.echo(f"training step: {step_s * 1000:.0f} ms")
    click.echo(
        f"layer norms, per tensor (before): {before_s * 1000:.1f} ms, "
        f"{100 * before_s / interval:.3f}% of a {log_every_steps}-step interval"
    )
    click.echo(
        f"layer norms, multi-tensor (after): {after_s * 1000:.1f} ms, "
        f"{100 * after_s / interval:.3f}% of a {log_every_steps}-step interval"
    )
    click.echo(f"after/before: {after_s / before_s:.2f}x; largest relative difference of a norm: {worst:.1e}")
    assert math.isfinite(worst) and worst < 1e-4, worst


if __name__ == "__main__":
    main()

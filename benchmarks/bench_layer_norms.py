"""What the per-layer norms cost at a log interval, beside the training steps they summarise (CPU).

The trainer computes each learned layer's weight and gradient norm once per ``--log-every-steps``
(10) steps, after the step. This times that call and a training step of the 1000-class network on
the same machine, side by side, and prints the overhead per logged interval.

    .venv/bin/python benchmarks/bench_layer_norms.py [--batch-size 128] [--repeat 5]
"""

from __future__ import annotations

import statistics
import time

import click
import torch

from alexnet.pipeline import constants as C
from alexnet.trainer import constants as TC
from alexnet.trainer.health import layer_norms
from alexnet.trainer.model import LEARNED_LAYERS, AlexNet
from alexnet.trainer.optim import create_optimizer
from alexnet.trainer.step import train_step


def _timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@click.command()
@click.option("--batch-size", type=int, default=TC.BATCH_SIZE, show_default=True)
@click.option("--repeat", type=int, default=5, show_default=True)
@click.option("--log-every-steps", type=int, default=10, show_default=True)
def main(batch_size: int, repeat: int, log_every_steps: int) -> None:
    torch.manual_seed(0)
    model = AlexNet().train()
    optimizer = create_optimizer(model, TC.BASE_LR, TC.MOMENTUM, TC.WEIGHT_DECAY)
    x = torch.randn(batch_size, 3, C.CROP_SIZE, C.CROP_SIZE) * 50
    y = torch.randint(0, TC.NUM_CLASSES, (batch_size,))

    def step():
        train_step(model, optimizer, x, y, bf16=False, channels_last=False, output_device=torch.device("cpu"))

    step()  # warm-up; gradients now exist
    step_s = _timed(step, repeat)
    norms_s = _timed(lambda: layer_norms(model, LEARNED_LAYERS), repeat)
    interval = log_every_steps * step_s
    click.echo(f"torch threads: {torch.get_num_threads()}, batch {batch_size}, 1000 classes, medians of {repeat}")
    click.echo(f"training step: {step_s * 1000:.0f} ms; layer_norms: {norms_s * 1000:.1f} ms")
    click.echo(f"overhead per log interval of {log_every_steps} steps: {100 * norms_s / interval:.3f}%")


if __name__ == "__main__":
    main()

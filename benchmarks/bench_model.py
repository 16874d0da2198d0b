"""The 2012 network's two placements side by side: same function, and training-step throughput.

Builds the grouped form (both columns on DEVICE, groups=2 convolutions) and the split form (column
one on DEVICE, column two on --second-device, default DEVICE again, so the per-column code path runs
on one device) from the same weights; checks they compute the same function (fp32, eval, against a
CPU float64 run of the grouped form); then times forward+backward+SGD steps on synthetic batches and
prints images/s and the split/grouped ratio.

    python benchmarks/bench_model.py                                   # CPU, batch 16
    python benchmarks/bench_model.py --device cuda:0 --batch 128 --bf16 --channels-last
    python benchmarks/bench_model.py --device cuda:0 --second-device cuda:1 --batch 128 --bf16 --channels-last
"""

from __future__ import annotations

import platform
import statistics
import time

import click
import torch
import torch.nn.functional as F

from alexnet.pipeline import constants as C
from alexnet.trainer import constants as TC
from alexnet.trainer.model import AlexNet, count_parameters


def _sync(devices: list[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def _check(grouped: AlexNet, split: AlexNet, batch: int) -> dict[str, float]:
    """Max |difference| of each form's fp32 logits from a CPU float64 run of the same weights."""
    x = torch.randn(batch, 3, C.CROP_SIZE, C.CROP_SIZE, generator=torch.Generator().manual_seed(0)) * 50
    reference = AlexNet.from_state_dict({k: v.double().cpu() for k, v in grouped.state_dict().items()})
    reference = reference.double().eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            expected = reference(x.double())
            scale = expected.abs().max().item()
            out = {
                name: (model.eval()(x).double().cpu() - expected).abs().max().item() / scale
                for name, model in (("grouped", grouped), ("split", split))
            }
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return out


def _stepper(model: AlexNet, batch: int, bf16: bool, channels_last: bool):
    """One training step (forward, cross-entropy, backward, SGD) on a resident synthetic batch."""
    model.train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, C.CROP_SIZE, C.CROP_SIZE, device=model.input_device).contiguous(memory_format=fmt)
    y = torch.randint(0, model.num_classes, (batch,), device=model.output_device)
    opt = torch.optim.SGD(model.parameters(), lr=TC.BASE_LR, momentum=TC.MOMENTUM, weight_decay=TC.WEIGHT_DECAY)
    device_type = model.input_device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _rate(step, devices: list[torch.device], batch: int, steps: int) -> float:
    """Training images/s over ``steps`` steps, devices synchronised at both ends."""
    _sync(devices)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(devices)
    return batch * steps / (time.perf_counter() - start)


@click.command(help=__doc__)
@click.option("--device", default="cpu", show_default=True, help="Column one's device (and column two's, grouped).")
@click.option("--second-device", default=None, help="Column two's device in the split form [default: --device].")
@click.option("--batch", default=16, show_default=True, help="Images per step (the paper: 128).")
@click.option("--steps", default=3, show_default=True, help="Timed steps per form and round.")
@click.option("--warmup", default=2, show_default=True, help="Untimed steps first, per form.")
@click.option("--rounds", default=3, show_default=True, help="Interleaved timing rounds; the median is reported.")
@click.option("--bf16", is_flag=True, help="bf16 autocast.")
@click.option("--channels-last", is_flag=True, help="channels_last weights and inputs.")
@click.option("--check-batch", default=4, show_default=True, help="Images for the same-function check.")
def main(device, second_device, batch, steps, warmup, rounds, bf16, channels_last, check_batch) -> None:
    torch.backends.cudnn.benchmark = True
    first = torch.device(device)
    second = torch.device(second_device) if second_device else first
    torch.manual_seed(0)
    grouped = AlexNet(devices=[first])
    split = AlexNet.from_state_dict(grouped.state_dict(), devices=[first, second])
    if channels_last:
        grouped = grouped.to(memory_format=torch.channels_last)
        split = split.to(memory_format=torch.channels_last)
    name = torch.cuda.get_device_name(first) if first.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__} | {name} | threads {torch.get_num_threads()} | params {count_parameters(grouped):,}"
    )
    print(
        f"batch {batch}, {rounds} rounds of {steps} steps (+{warmup} warm-up), bf16={bf16}, channels_last={channels_last}"
    )

    diffs = _check(grouped, split, check_batch)
    print(
        f"same function (fp32 logits vs CPU float64, max |diff| / max |logit|): "
        f"grouped {diffs['grouped']:.2e}, split {diffs['split']:.2e}"
    )
    forms = {f"grouped {first}": grouped, f"split {first} + {second}": split}
    steppers = {label: _stepper(model, batch, bf16, channels_last) for label, model in forms.items()}
    for step in steppers.values():
        for _ in range(warmup):
            step()
    # Interleaved rounds, median per form: robust to other load on a shared machine.
    rates: dict[str, list[float]] = {label: [] for label in forms}
    for _ in range(rounds):
        for label, step in steppers.items():
            rates[label].append(_rate(step, forms[label].devices, batch, steps))
    medians = {label: statistics.median(r) for label, r in rates.items()}
    for label, r in rates.items():
        print(f"{label:>32}: {medians[label]:10.1f} training images/s (median of {', '.join(f'{v:.1f}' for v in r)})")
    g, s = medians.values()
    print(f"split / grouped: {s / g:.3f}")
    if max(diffs.values()) > 1e-4:
        raise SystemExit(f"error: the placements disagree (max relative difference {max(diffs.values()):.2e})")


if __name__ == "__main__":
    main()

"""The 2012 network's two placements side by side: same function, and training-step throughput.

Builds the grouped form (both columns on DEVICE, groups=2 convolutions) and the split form (column
one on DEVICE, column two on --second-device, default DEVICE again, so the per-column code path runs
on one device) from the same weights; checks they compute the same function (fp32, eval, against a
CPU float64 run of the grouped form); then times forward+backward+SGD steps on synthetic batches and
prints images/s and the split/grouped ratio. ``--compile`` adds both forms with the forward compiled
(``AlexNet.compile_forward``) and prints compiled/eager. The step is the trainer's
(``step.train_step``, PaperSGD, ``--precision``); on a GPU the models and inputs are channels_last.
``--parts`` also times the update (multi-tensor PaperSGD vs the per-tensor loop it replaced) and
the LRN (float32 denominator vs one in the autocast dtype) in thread CPU time.

    python benchmarks/bench_model.py                                   # CPU, batch 16
    python benchmarks/bench_model.py --batch 32 --compile --parts      # CPU: compiled vs eager
    python benchmarks/bench_model.py --device cuda:0 --batch 128 --precision bf16 --compile
    python benchmarks/bench_model.py --device cuda:0 --second-device cuda:1 --batch 128 --precision bf16
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
from alexnet.trainer.optim import create_optimizer
from alexnet.trainer.precision import PRECISIONS, channels_last, resolve_precision, set_tf32
from alexnet.trainer.step import train_step


def _sync(devices: list[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def _check(models: dict[str, AlexNet], batch: int) -> dict[str, float]:
    """Max |difference| of each form's fp32 logits from a CPU float64 run of the same weights."""
    x = torch.randn(batch, 3, C.CROP_SIZE, C.CROP_SIZE, generator=torch.Generator().manual_seed(0)) * 50
    first = next(iter(models.values()))
    reference = AlexNet.from_state_dict({k: v.double().cpu() for k, v in first.state_dict().items()})
    reference = reference.double().eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            expected = reference(x.double())
            scale = expected.abs().max().item()
            out = {
                name: (model.eval()(x).double().cpu() - expected).abs().max().item() / scale
                for name, model in models.items()
            }
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return out


def _stepper(model: AlexNet, batch: int, precision: str):
    """One training step (forward, cross-entropy, backward, PaperSGD) on a resident synthetic batch."""
    model.train()
    x = torch.randn(batch, 3, C.CROP_SIZE, C.CROP_SIZE, device=model.input_device)
    if channels_last(model.input_device):
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, model.num_classes, (batch,), device=model.output_device)
    opt = create_optimizer(model, TC.BASE_LR, TC.MOMENTUM, TC.WEIGHT_DECAY)
    return lambda: train_step(model, opt, x, y, precision=precision)


@torch.no_grad()
def _loop_update(params, velocities, lr=TC.BASE_LR, mom=TC.MOMENTUM, wd=TC.WEIGHT_DECAY) -> None:
    """PaperSGD's former per-tensor loop (four kernels per tensor), for --parts."""
    for p, v in zip(params, velocities, strict=True):
        v.mul_(mom).add_(p, alpha=-lr * wd).add_(p.grad, alpha=-lr)
        p.add_(v)


def _lrn_low(norm, x: torch.Tensor) -> torch.Tensor:
    """The LRN with its denominator in the autocast dtype (the form before issue 21), for --parts."""
    band, k = norm._band(x.shape[1], x.device, x.dtype)
    return x * F.conv2d(x * x, band, k).pow(-norm.beta)


def _cpu_ms(fn, devices: list[torch.device], reps: int) -> float:
    """Thread CPU time per call (ms): the host's cost, robust to other load on a shared machine."""
    fn()
    _sync(devices)
    start = time.thread_time()
    for _ in range(reps):
        fn()
    _sync(devices)
    return (time.thread_time() - start) / reps * 1e3


def _parts(model: AlexNet, batch: int, precision: str, reps: int) -> None:
    """The update and the LRN timed alone (thread CPU time; on a GPU, the host's launch cost)."""
    devices = model.devices
    opt = create_optimizer(model, TC.BASE_LR, TC.MOMENTUM, TC.WEIGHT_DECAY)
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    velocities = [opt.state[p]["velocity"] for p in params]
    rounds = {"multi-tensor": [], "per-tensor loop": []}
    for _ in range(3):  # alternating rounds, medians
        rounds["multi-tensor"].append(_cpu_ms(opt.step, devices, reps))
        rounds["per-tensor loop"].append(_cpu_ms(lambda: _loop_update(params, velocities), devices, reps))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    print(
        f"PaperSGD update, {len(params)} tensors: multi-tensor {med['multi-tensor']:.2f} ms, "
        f"per-tensor loop {med['per-tensor loop']:.2f} ms (thread CPU time, medians of 3 rounds of {reps})"
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.bfloat16)
    x = torch.relu(torch.randn(batch, 96, 55, 55, device=model.input_device) * 11).to(dtype)
    norm = model.norm1
    with torch.autocast(model.input_device.type, dtype=dtype), torch.no_grad():
        rounds = {"float32 denominator": [], f"{dtype} denominator": []}
        for _ in range(3):
            rounds["float32 denominator"].append(_cpu_ms(lambda: norm(x), devices, reps))
            rounds[f"{dtype} denominator"].append(_cpu_ms(lambda: _lrn_low(norm, x), devices, reps))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    (a, fa), (b, fb) = med.items()
    print(
        f"LRN forward on conv1's output [{batch}, 96, 55, 55] in {dtype}: {a} {fa:.2f} ms, {b} {fb:.2f} ms "
        f"({fa / fb:.2f}x; thread CPU time, medians of 3 rounds of {reps})"
    )


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
@click.option("--warmup", default=2, show_default=True, help="Untimed steps first, per form (compiling included).")
@click.option("--rounds", default=3, show_default=True, help="Interleaved timing rounds; the median is reported.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True)
@click.option("--compile", "compiled", is_flag=True, help="Also both forms with the forward compiled.")
@click.option("--parts", is_flag=True, help="Also time the update and the LRN alone.")
@click.option("--check-batch", default=4, show_default=True, help="Images for the same-function check.")
def main(device, second_device, batch, steps, warmup, rounds, precision, compiled, parts, check_batch) -> None:
    torch.backends.cudnn.benchmark = True
    first = torch.device(device)
    second = torch.device(second_device) if second_device else first
    precision = resolve_precision(precision, first)
    torch.manual_seed(0)
    grouped = AlexNet(devices=[first])
    models = {f"grouped {first}": grouped, f"split {first} + {second}": _copy(grouped, [first, second])}
    if compiled:
        models[f"grouped {first} compiled"] = _copy(grouped, [first]).compile_forward()
        models[f"split {first} + {second} compiled"] = _copy(grouped, [first, second]).compile_forward()
    name = torch.cuda.get_device_name(first) if first.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__} | {name} | threads {torch.get_num_threads()} | params {count_parameters(grouped):,}"
    )
    print(
        f"batch {batch}, {rounds} rounds of {steps} steps (+{warmup} warm-up), {precision}, "
        f"channels_last={channels_last(first)}"
    )

    diffs = _check(models, check_batch)
    print(
        "same function (fp32 logits vs CPU float64, max |diff| / max |logit|): "
        + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
    )
    set_tf32(precision, first)
    steppers = {label: _stepper(model, batch, precision) for label, model in models.items()}
    for label, step in steppers.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        _sync(models[label].devices)
        print(f"{label:>40}: warm-up {time.perf_counter() - t0:.1f} s")
    # Interleaved rounds, median per form: robust to other load on a shared machine.
    rates: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(rounds):
        for label, step in steppers.items():
            rates[label].append(_rate(step, models[label].devices, batch, steps))
    medians = {label: statistics.median(r) for label, r in rates.items()}
    for label, r in rates.items():
        print(f"{label:>40}: {medians[label]:10.1f} training images/s (median of {', '.join(f'{v:.1f}' for v in r)})")
    labels = list(medians)
    print(f"split / grouped: {medians[labels[1]] / medians[labels[0]]:.3f}")
    if compiled:
        print(
            f"compiled / eager: grouped {medians[labels[2]] / medians[labels[0]]:.3f}, "
            f"split {medians[labels[3]] / medians[labels[1]]:.3f}"
        )
    if parts:
        _parts(grouped, batch, precision, reps=5 if first.type == "cpu" else 50)
    if max(diffs.values()) > 1e-4:
        raise SystemExit(f"error: the forms disagree (max relative difference {max(diffs.values()):.2e})")


def _copy(model: AlexNet, devices: list[torch.device]) -> AlexNet:
    copy = AlexNet.from_state_dict(model.state_dict(), devices=devices)
    return copy.to(memory_format=torch.channels_last) if channels_last(devices[0]) else copy


if __name__ == "__main__":
    main()

"""The measurements of the one prepared GPU check (benchmarks/gpu_check.sh), one results file.

    python benchmarks/gpu_check.py --out DIR                 # a GPU host (what gpu_check.sh runs)
    python benchmarks/gpu_check.py --out /tmp/x --cpu-smoke  # every part on the CPU at toy sizes

Measures, on a synthesized dataset (benchmarks/bench_train.py) at the trainer's defaults:

* pipeline images/s (the loader alone) with the global and the buffer shuffle;
* training images/s on synthetic and on fed batches for eager, graphed (CUDA graph) and compiled
  (forward compiled, then graphed) steps, at fp32 and bf16 (``trainer/bench.py``);
* the two-column split on one GPU (devices [cuda:0, cuda:0]), eager and compiled, synthetic batches.

Writes ``gpu_check.json`` (every figure, the versions, the machine) and prints one line per figure.
``--cpu-smoke`` runs the same code on the CPU with batch 4, a few steps and fp32/bf16 alike, so the
script is known to run before a GPU is lent (compiling included: it takes minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import synth_dataset  # noqa: E402


def pipeline_rate(config, batches: int) -> float:
    """Images/s the training loader delivers alone (batches pulled as fast as it gives them)."""
    from alexnet.trainer import distributed as D
    from alexnet.trainer.replica import create_loader_for, resolve_replica

    replica = resolve_replica(config.run.gpus, D.dist_info_from_env())
    loader = create_loader_for(config, "train", replica)
    it = iter(_forever(loader))
    next(it)
    replica.sync()
    start = time.perf_counter()
    for _ in range(batches):
        images, _labels = next(it)[:2]
    replica.sync()
    return batches * images.shape[0] / (time.perf_counter() - start)


def _forever(loader):
    while True:
        yield from loader


def split_on_one_device(device: str, batch: int, precision: str, compiled: bool, steps: int) -> float:
    """Training images/s of the split form with both columns on one device (synthetic batch)."""
    import torch

    from alexnet.trainer.model import AlexNet
    from alexnet.trainer.optim import create_optimizer
    from alexnet.trainer.precision import channels_last, set_tf32
    from alexnet.trainer.step import EagerStep

    dev = torch.device(device)
    set_tf32(precision, dev)
    torch.manual_seed(0)
    model = AlexNet(devices=[dev, dev]).train()
    if channels_last(dev):
        model = model.to(memory_format=torch.channels_last)
    if compiled:
        model.compile_forward()
    step = EagerStep(model, create_optimizer(model, 0.01, 0.9, 5e-4), precision=precision)
    x, y = torch.randn(batch, 3, 224, 224, device=dev) * 50, torch.randint(0, 1000, (batch,), device=dev)
    for _ in range(3):
        step(x, y)
    _sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    _sync(dev)
    return steps * batch / (time.perf_counter() - start)


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    p.add_argument("--cache", type=Path, default=Path("/tmp/alexnet-gpu-check"))
    p.add_argument("--cpu-smoke", action="store_true", help="the CPU at toy sizes (checks the script runs)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled steps")
    args = p.parse_args()

    import torch

    from alexnet.trainer.bench import benchmark
    from alexnet.trainer.config import TrainConfig
    from alexnet.trainer.rundir import versions

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA GPU (use --cpu-smoke on a CPU machine)")
    records, batch, steps, warmup = (64, 4, 2, 1) if smoke else (4096, 128, 50, 10)
    device = "cpu" if smoke else "cuda"
    data_dir = synth_dataset(args.cache / f"synthetic-{records}", records, val_records=32 if smoke else 1000)
    base = {"data_dir": str(data_dir), "gpus": "cpu" if smoke else "0", "batch_size": batch, "progress": False}
    out: dict = {"machine": versions(), "batch": batch, "pipeline_images_per_s": {}, "train": [], "split": []}
    t0 = time.monotonic()

    args.out.mkdir(parents=True, exist_ok=True)

    def say(line: str) -> None:
        """One line per figure, and the results file rewritten after each: a time limit keeps what was done."""
        print(f"[{time.monotonic() - t0:6.1f} s] {line}", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(out, indent=2, default=str) + "\n")

    for shuffle in ("global", "buffer"):
        rate = pipeline_rate(TrainConfig.create(**base, shuffle=shuffle), batches=4 if smoke else 200)
        out["pipeline_images_per_s"][shuffle] = rate
        say(f"pipeline, {shuffle} shuffle: {rate:,.0f} images/s")
    # The defaults' figures first, the compiles (about a minute each) last: what a time limit cuts.
    kinds = {"eager": (False, False), "graphed": (True, False), "compiled": (True, True)}
    order = [(p, k) for k in kinds for p in ("bf16", "fp32") if args.compile or not kinds[k][1]]
    order.insert(2, ("bf16", "split"))  # eager, the split form's only step: after the first two figures
    for precision, kind in order:
        if kind == "split":
            rate = split_on_one_device(device, batch, precision, False, steps)
            out["split"].append({"precision": precision, "compiled": False, "synthetic_images_per_s": rate})
            say(f"split form, both columns on one {device}, {precision}: {rate:,.0f} images/s")
            continue
        graph, compiled = kinds[kind]
        config = TrainConfig.create(**base, precision=precision, cuda_graph=graph, compile=compiled)
        res = benchmark(config, warmup=warmup, steps=steps)
        out["train"].append({"kind": kind, **res})
        say(
            f"train {precision} {kind} ({res['step']}): synthetic {res['synthetic_images_per_s']:,.0f}, "
            f"fed {res['pipeline_images_per_s']:,.0f} images/s (ratio {res['ratio']:.3f})"
        )
    if args.compile:
        rate = split_on_one_device(device, batch, "bf16", True, steps)
        out["split"].append({"precision": "bf16", "compiled": True, "synthetic_images_per_s": rate})
        say(f"split form, both columns on one {device}, bf16, compiled: {rate:,.0f} images/s")
    say(f"done: {args.out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()

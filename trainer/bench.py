"""``alexnet-train bench``: training images/s on synthetic batches and on the pipeline's batches.

Same model, same step (step.py), same replica set-up (replica.py) as training; the ratio says
whether the pipeline starves the model (goal >= 0.95).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from alexnet.pipeline import constants as C
from alexnet.pipeline.artifacts import read_manifest

from . import distributed as D
from .optim import create_optimizer
from .precision import channels_last, loader_dtype
from .replica import build_model, create_loader_for, resolve_replica
from .step import GRAPH_EAGER_STEPS, GraphedStep, create_step


def timed(step, batches: Iterator, replica, warmup: int, steps: int, batch_size: int) -> float:
    """Images/s over ``steps`` steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step(*next(batches))
    replica.sync()
    start = time.perf_counter()
    for _ in range(steps):
        last = step(*next(batches))
    float(last)  # wait for the last step
    replica.sync()
    return steps * batch_size / (time.perf_counter() - start)


def synthetic_batches(config, replica, num_classes: int) -> Iterator:
    """One batch, resident on the device in the loader's dtype and layout (the model's ceiling)."""
    gen = torch.Generator().manual_seed(config.run.seed)
    b, device = config.optim.batch_size, replica.devices[0]
    dtype = getattr(torch, loader_dtype(config.model.precision, device))
    images = torch.randn(b, 3, C.CROP_SIZE, C.CROP_SIZE, generator=gen).mul_(50).to(device, dtype)
    if channels_last(device):
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (b,), generator=gen).to(replica.devices[0])
    while True:
        yield images, labels


def pipeline_batches(loader) -> Iterator:
    """The loader's batches, across epoch ends when the split is small (it refuses a split of less
    than one batch)."""
    while True:
        yield from loader


def benchmark(config, *, warmup: int = 3, steps: int = 10) -> dict[str, Any]:
    """Synthetic vs pipeline images/s for one process at the config's global batch."""
    replica = resolve_replica(config.run.gpus, D.dist_info_from_env())
    num_classes = len(read_manifest(Path(config.run.data_dir)).classes)
    model = build_model(config, replica, num_classes)
    model.train()
    optimizer = create_optimizer(model, config.optim.lr, config.optim.momentum, config.optim.weight_decay)
    step = create_step(model, optimizer, config.model, list(replica.devices), replicas=1)
    if isinstance(step, GraphedStep):
        warmup = max(warmup, GRAPH_EAGER_STEPS + 2)  # the eager steps and the capture stay out of the timing
    b = config.optim.batch_size
    synthetic = timed(step, synthetic_batches(config, replica, num_classes), replica, warmup, steps, b)
    loader = create_loader_for(config, "train", replica, batch_size=b)
    real = timed(step, pipeline_batches(loader), replica, warmup, steps, b)
    return {
        "gpus": replica.gpus,
        "device_note": replica.note,
        "batch_size": b,
        "step": step.note,
        "precision": step.precision,
        "cuda_graph": isinstance(step, GraphedStep),
        "compile": config.model.compile,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "synthetic_images_per_s": synthetic,
        "pipeline_images_per_s": real,
        "ratio": real / synthetic,
    }

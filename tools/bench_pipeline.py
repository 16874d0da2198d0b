"""``alexnet-prep bench-pipeline``: the speed of the train pipeline alone (read, decode, augment, deliver)."""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import click

from alexnet.pipeline.cli_common import data_dir_option
from alexnet.pipeline.errors import AlexnetError
from alexnet.pipeline.loader import SHUFFLES, DataConfig

_DATA = DataConfig()  # the trainer's data defaults (the run config's data section)


def bench_pipeline(data_dir: Path, device: str, batches: int, batch_size: int, data, warmup: int = 3) -> float:
    """Images/s of the train pipeline alone (``data``: a ``DataConfig``), delivered as torch tensors on ``device``
    in the trainer's default feed: on a GPU bfloat16, channels_last (``--precision auto``); float32 NCHW on the CPU."""
    import torch

    from alexnet.pipeline.loader import create_loader

    gpu = device.startswith("cuda")
    loader = create_loader(
        data_dir,
        "train",
        data,
        batch_size=batch_size,
        device=device,
        dtype="bfloat16" if gpu else "float32",
        channels_last=gpu,
    )

    def sync():
        if gpu:
            torch.cuda.synchronize(device)

    stream = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch
    for _ in range(warmup):
        next(stream)
    sync()
    t0 = time.perf_counter()
    for _ in range(batches):
        next(stream)
    sync()
    return batches * batch_size / (time.perf_counter() - t0)


@click.command(
    "bench-pipeline",
    epilog="""\b
Examples:
  alexnet-prep bench-pipeline --device cpu --batches 50
  alexnet-prep bench-pipeline --device gpu --batches 200 --threads 5 --pipelines 3
  alexnet-prep bench-pipeline --shuffle buffer    # the sequential caffe reader
""",
)
@data_dir_option
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--batches", type=click.IntRange(1), default=50, show_default=True)
# The defaults are alexnet-train's: §5's batch of 128 (tests/test_pipeline.py checks that they agree)
# and the data section's threads and pipelines (DataConfig).
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True, help="Images per batch.")
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=_DATA.num_threads,
    show_default=True,
    help="DALI CPU threads per pipeline.",
)
@click.option(
    "--workers",
    type=click.IntRange(0),
    default=_DATA.workers,
    show_default=True,
    help="Reader processes per pipeline (0: the reads on the calling thread).",
)
@click.option(
    "--pipelines",
    type=click.IntRange(0),
    default=_DATA.pipelines,
    show_default=True,
    help="Pipelines taking turns (0: the trainer's, 2 on a GPU and 1 on the CPU; buffer shuffle: 1).",
)
@click.option(
    "--shuffle",
    type=click.Choice(SHUFFLES),
    default=_DATA.shuffle,
    show_default=True,
    help="global: a fresh permutation each epoch (random reads); buffer: the sequential reader.",
)
def bench_pipeline_command(
    data_dir: Path,
    device: str,
    batches: int,
    batch_size: int,
    threads: int,
    workers: int,
    pipelines: int,
    shuffle: str,
) -> None:
    """Run the train pipeline alone (read, decode, augment, deliver) and print its images/s."""
    dev = "cuda:0" if device == "gpu" else "cpu"
    if device == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise AlexnetError("--device gpu: no CUDA GPU is visible")
    data = dataclasses.replace(_DATA, num_threads=threads, workers=workers, pipelines=pipelines, shuffle=shuffle)
    rate = bench_pipeline(data_dir, dev, batches, batch_size, data)
    click.echo(
        f"train pipeline on {device} ({shuffle} shuffle): {rate:,.0f} images/s (batch {batch_size}, "
        f"{batches} batches, {data.resolved_pipelines(dev)} pipeline(s) of {threads} threads, {workers} readers)"
    )

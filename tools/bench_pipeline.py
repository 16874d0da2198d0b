"""``alexnet-prep bench-pipeline``: the speed of the train pipeline alone (read, decode, augment, deliver)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import click

from alexnet.pipeline import constants as C
from alexnet.pipeline.cli_common import config_options, data_dir_option, from_options, opt
from alexnet.pipeline.errors import AlexnetError
from alexnet.pipeline.loader import DataConfig


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


@dataclass(frozen=True)
class BenchPipelineConfig:
    """``alexnet-prep bench-pipeline``'s own settings; the pipeline's are the trainer's ``DataConfig`` fields."""

    device: str = opt("cpu", "Where the pipeline runs.", choices=("cpu", "gpu"))
    batches: int = opt(50, "Timed batches (after 3 untimed ones).", min=1)
    batch_size: int = opt(C.BATCH_SIZE, "Images per batch (alexnet-train's default).", min=1)


# The data settings bench-pipeline varies; the rest are DataConfig's defaults, as in alexnet-train.
DATA_OPTIONS = ("num_threads", "workers", "pipelines", "shuffle")


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
@config_options(BenchPipelineConfig)
@config_options(DataConfig, only=DATA_OPTIONS)
def bench_pipeline_command(data_dir: Path, **options) -> None:
    """Run the train pipeline alone (read, decode, augment, deliver) and print its images/s."""
    cfg, data = from_options(BenchPipelineConfig, options), DataConfig(**options)
    device = cfg.device
    dev = "cuda:0" if device == "gpu" else "cpu"
    if device == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise AlexnetError("--device gpu: no CUDA GPU is visible")
    rate = bench_pipeline(data_dir, dev, cfg.batches, cfg.batch_size, data)
    click.echo(
        f"train pipeline on {device} ({data.shuffle} shuffle): {rate:,.0f} images/s (batch {cfg.batch_size}, "
        f"{cfg.batches} batches, {data.resolved_pipelines(dev)} pipeline(s) of {data.num_threads} threads, "
        f"{data.workers} readers)"
    )

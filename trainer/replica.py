"""This process's replica: its devices, its seeds, and the network and loaders built for it.

Training (train.py), evaluation of a checkpoint (evaluate.py) and the benchmark (bench.py) all
start here, so the model, the optimiser and the loaders are set up in one way only.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Hardware work queues per CUDA context (read when the context is created, so set before any CUDA
# work). With the default 8, DALI's streams share queues with the training stream and each DALI
# batch waits behind whole training steps: the pipeline then starves an H100 (benchmarks/
# results_train.md: 8,000-9,000 img/s instead of 13,000). A value given by the user is kept.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

import torch  # noqa: E402

from alexnet.pipeline.errors import AlexnetError  # noqa: E402

from . import distributed as D  # noqa: E402
from .model import COLUMNS  # noqa: E402


@dataclass(frozen=True)
class Replica:
    info: D.DistInfo
    gpus: str  # the resolved --gpus value
    devices: tuple[torch.device, ...]  # one (both columns) or two (one per column)
    note: str  # a line saying what was chosen

    @property
    def on_gpu(self) -> bool:
        return self.devices[0].type == "cuda"

    def say(self, msg: str) -> None:
        from .rundir import say

        say(self.info.is_main, msg)

    def sync(self) -> None:
        for d in self.devices:
            if d.type == "cuda":
                torch.cuda.synchronize(d)


def parse_gpus(spec: str) -> list[torch.device]:
    """``--gpus`` value to devices: ``"cpu"``, one GPU (``"0"``) or two GPUs, one per column (``"0,1"``)."""
    text = str(spec).strip().lower()
    if text == "cpu":
        return [torch.device("cpu")]
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise AlexnetError(
            f"--gpus {spec!r}: expected 'cpu', one GPU index such as '0', or two such as '0,1' (one per column)"
        )
    indices = [int(p) for p in parts]
    if len(indices) > COLUMNS:
        raise AlexnetError(
            f"--gpus {spec!r}: the 2012 network has two columns; give one GPU (both columns) or two (one each)"
        )
    if len(set(indices)) != len(indices):
        raise AlexnetError(f"--gpus {spec!r}: a GPU is named twice; give '{indices[0]}' to run both columns on it")
    available = torch.cuda.device_count()
    missing = [i for i in indices if i >= available]
    if missing:
        raise AlexnetError(
            f"--gpus {spec!r}: GPU {', '.join(map(str, missing))} not available "
            f"(torch sees {available} CUDA device(s); check CUDA_VISIBLE_DEVICES, or use --gpus cpu)"
        )
    return [torch.device("cuda", i) for i in indices]


def resolve_replica(spec: str, info: D.DistInfo) -> Replica:
    """This replica's ``--gpus`` value, its devices and a line saying what was chosen."""
    count = torch.cuda.device_count()
    resolved = D.replica_gpus(spec, info, count)
    devices = parse_gpus(resolved)
    why = f" (auto: {count} CUDA device(s) visible)" if spec.strip().lower() == "auto" else ""
    if why and count > 2 and not info.enabled:
        why += (
            f"; one process uses GPUs 0,1 (one column each). To train on all {count}, start one replica per GPU: "
            f"torchrun --nproc-per-node {count} -m alexnet.trainer.cli --gpus 0 (README: several GPUs)"
        )
    if devices[0].type == "cpu":
        form = "CPU"
    elif len(devices) == 2:
        form = f"column one on GPU {devices[0].index}, column two on GPU {devices[1].index}"
    else:
        form = f"both columns on GPU {devices[0].index}"
    if devices[0].type == "cuda":
        torch.backends.cudnn.benchmark = True  # fastest algorithms for the fixed 224x224 shapes
    return Replica(info, resolved, tuple(devices), f"--gpus {resolved}: {form}{why}")


def start_replica(gpus: str) -> Replica:
    """The replica of this process, its process group joined (close with ``D.destroy_process_group``)."""
    replica = resolve_replica(gpus, D.dist_info_from_env())
    D.init_process_group(replica.info, replica.on_gpu, replica.devices[0].index if replica.on_gpu else None)
    return replica


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # CPU and every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


def replica_seed(seed: int, rank: int, step: int = 0) -> int:
    """Rank 0 of any run draws the single-process stream; other replicas draw their own dropout masks;
    a resume that cannot restore a replica's generators re-seeds it from (seed, rank, step)."""
    return seed if rank == 0 and step == 0 else (seed * 1_000_003 + rank * 7_919 + step) % 2**63


def build_model(config, replica: Replica, num_classes: int):
    """§5 init, seeded and identical on every replica, in the config's form, channels_last on GPUs;
    TF32 set for the config's precision (precision.py)."""
    from .model import AlexNet
    from .precision import channels_last, set_tf32

    seed_everything(config.run.seed)
    set_tf32(config.model.precision, replica.devices[0])
    model = AlexNet(num_classes=num_classes, devices=list(replica.devices), lrn=config.model.lrn)
    if channels_last(replica.devices[0]):
        model = model.to(memory_format=torch.channels_last)
    return model


def create_loader_for(
    config, split: str, replica: Replica, *, ten_crop: bool = False, batch_size: int | None = None, stats=None
):
    """The pipeline's loader for this replica: its share of ``split``, batches on its first device
    (``stats``: the loader's mean image and Stats instead of the dataset's)."""
    from alexnet.pipeline.loader import create_loader

    from .precision import channels_last, loader_dtype

    info, device = replica.info, replica.devices[0]
    return create_loader(
        Path(config.run.data_dir),
        split,
        config.data,
        batch_size=batch_size if batch_size is not None else config.optim.batch_size // info.world_size,
        seed=config.run.seed,
        rank=info.rank,
        world=info.world_size,
        device=str(device) if device.type == "cuda" else "cpu",
        ten_crop=ten_crop,
        dtype=loader_dtype(config.model.precision, device),  # half the bytes under bf16/fp16
        channels_last=channels_last(device),  # what the step consumes: no transpose on the device
        stats=stats,
    )

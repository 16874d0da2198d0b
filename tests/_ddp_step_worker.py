"""One of two gloo replicas for tests/test_step.py (not a test module itself).

    torchrun --nproc-per-node 2 tests/_ddp_step_worker.py OUT_DIR

Builds the network with --compile through ``create_step`` (DDP over the compiled forward), trains
two steps on its half of each global batch of 16 and writes ``weights-rank{r}.pt``. Dropout is
off (p = 0) so that the replicas compute what one process computes on the global batch.
"""

import sys
from pathlib import Path

import torch

from alexnet.trainer import distributed as D
from alexnet.trainer.config import TrainConfig
from alexnet.trainer.model import AlexNet
from alexnet.trainer.optim import create_optimizer
from alexnet.trainer.step import DDPStep, create_step

GLOBAL_BATCH = 16


def build() -> AlexNet:
    torch.manual_seed(0)
    model = AlexNet(num_classes=10).train()
    model.drop6.p = model.drop7.p = 0.0
    return model


def batches():
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(GLOBAL_BATCH, 3, 224, 224, generator=g) * 50, torch.randint(0, 10, (GLOBAL_BATCH,), generator=g))
        for _ in range(2)
    ]


def main() -> None:
    info = D.dist_info_from_env()
    D.init_process_group(info, on_gpu=False, first_gpu=None)
    model = build()
    step = create_step(
        model,
        create_optimizer(model, 0.01, 0.9, 5e-4),
        TrainConfig.create(compile=True).model,
        [torch.device("cpu")],
        info.world_size,
    )
    assert isinstance(step, DDPStep) and "compiled" in step.note
    share = GLOBAL_BATCH // info.world_size
    for x, y in batches():
        part = slice(info.rank * share, (info.rank + 1) * share)
        step(x[part], y[part])
    torch.save(model.state_dict(), Path(sys.argv[1]) / f"weights-rank{info.rank}.pt")
    D.destroy_process_group()


if __name__ == "__main__":
    main()

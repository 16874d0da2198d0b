"""``alexnet-prep order``: the record positions one replica receives in one epoch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.pipeline.cli_common import config_options, data_dir_option, opt
from alexnet.pipeline.errors import AlexnetError


@dataclass(frozen=True)
class OrderConfig:
    """``alexnet-prep order``'s settings, each default written once here (its options are these fields)."""

    split: str = opt("train", "Split.", choices=A.SPLITS)
    epoch: int = opt(0, "Epoch (0 = the first).", min=0)
    replica: int = opt(0, "Rank of the replica.", min=0)
    replicas: int = opt(1, "Replicas (world size).", min=1)
    seed: int = opt(0, "The run's seed.")
    batch_size: int = opt(
        C.BATCH_SIZE, "The run's global batch (alexnet-train's default); training drops the final partial one.", min=1
    )


@click.command(
    "order",
    epilog="""\b
Examples:
  alexnet-prep order --split train --epoch 2                  # replica 0 of 1, epoch 2
  alexnet-prep order --epoch 5 --replica 3 --replicas 8       # what rank 3 of 8 saw in epoch 5
""",
)
@data_dir_option
@config_options(OrderConfig)
def order_command(data_dir: Path, **options) -> None:
    """Print the record positions one replica receives in one epoch, in order, one per line (nothing is decoded).

    The order of the default global shuffle (the trainer's; val: key order). The buffer shuffle's
    order is decided by DALI's reader as it reads, and has no such listing.
    """
    from alexnet.pipeline.order import replica_order

    cfg = OrderConfig(**options)
    if cfg.batch_size % cfg.replicas:
        raise AlexnetError(f"--batch-size {cfg.batch_size} does not divide over {cfg.replicas} replicas")
    positions = replica_order(
        data_dir,
        cfg.split,
        cfg.epoch,
        seed=cfg.seed,
        rank=cfg.replica,
        world=cfg.replicas,
        batch_size=cfg.batch_size // cfg.replicas,
    )
    click.echo("\n".join(str(p) for p in positions.tolist()))

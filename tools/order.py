"""``alexnet-prep order``: the record positions one replica receives in one epoch."""

from __future__ import annotations

from pathlib import Path

import click

from alexnet.pipeline import artifacts as A
from alexnet.pipeline.cli_common import data_dir_option
from alexnet.pipeline.errors import AlexnetError


@click.command(
    "order",
    epilog="""\b
Examples:
  alexnet-prep order --split train --epoch 2                  # replica 0 of 1, epoch 2
  alexnet-prep order --epoch 5 --replica 3 --replicas 8       # what rank 3 of 8 saw in epoch 5
""",
)
@data_dir_option
@click.option("--split", type=click.Choice(A.SPLITS), default="train", show_default=True)
@click.option("--epoch", type=click.IntRange(0), default=0, show_default=True, help="Epoch (0 = the first).")
@click.option("--replica", type=click.IntRange(0), default=0, show_default=True, help="Rank of the replica.")
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True, help="Replicas (world size).")
@click.option("--seed", type=int, default=0, show_default=True, help="The run's seed.")
# The default is alexnet-train's (§5's 128; tests/test_order.py checks that they agree).
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=128,
    show_default=True,
    help="The run's global batch; training drops the final partial one.",
)
def order_command(
    data_dir: Path, split: str, epoch: int, replica: int, replicas: int, seed: int, batch_size: int
) -> None:
    """Print the record positions one replica receives in one epoch, in order, one per line (nothing is decoded).

    The order of the default global shuffle (the trainer's; val: key order). The buffer shuffle's
    order is decided by DALI's reader as it reads, and has no such listing.
    """
    from alexnet.pipeline.order import replica_order

    if batch_size % replicas:
        raise AlexnetError(f"--batch-size {batch_size} does not divide over {replicas} replicas")
    positions = replica_order(
        data_dir, split, epoch, seed=seed, rank=replica, world=replicas, batch_size=batch_size // replicas
    )
    click.echo("\n".join(str(p) for p in positions.tolist()))

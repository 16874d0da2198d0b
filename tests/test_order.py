"""The epoch order and the draws (pipeline/order.py): pure numpy, plus the record index over a split with gaps."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from _build_lmdb_fixtures import clean_build, run_prep
from scipy.stats import chisquare, spearmanr

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.pipeline.loader import DataConfig, create_loader
from alexnet.pipeline.order import (
    SplitIndex,
    epoch_draws,
    epoch_order,
    replica_indices,
    replica_steps,
    unpacked,
)


def _shares(n, consumed, world, batch, training, seed=0, epoch=0):
    order = epoch_order(n, seed, epoch) if training else np.arange(n)
    return [
        replica_indices(order, consumed, r, world, replica_steps(n, consumed, r, world, batch, training), batch)
        for r in range(world)
    ]


@pytest.mark.parametrize("n", [1, 7, 4097])
def test_each_epoch_is_a_permutation_and_a_pure_function(n):
    for epoch in range(3):
        order = epoch_order(n, 11, epoch)
        assert sorted(order.tolist()) == list(range(n))
        assert np.array_equal(order, epoch_order(n, 11, epoch))


def test_two_epochs_orders_are_uncorrelated():
    """A fresh shuffle of the whole split every epoch, unlike a 4096-record window (DEVIATIONS A4)."""
    n = 20_000
    orders = [epoch_order(n, 0, e) for e in range(4)]
    for a, b in [(0, 1), (1, 2), (0, 3)]:
        assert abs(spearmanr(orders[a], orders[b]).statistic) < 0.05
    assert abs(spearmanr(orders[0], np.arange(n)).statistic) < 0.05  # nor with key order
    assert abs(spearmanr(epoch_order(n, 1, 0), orders[0]).statistic) < 0.05  # another seed


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("n,world,batch", [(1001, 1, 7), (1001, 2, 7), (1001, 3, 7), (10, 3, 3), (10, 3, 4)])
def test_replica_shares_disjoint_and_complete(n, world, batch, training):
    shares = _shares(n, 0, world, batch, training)
    flat = np.concatenate(shares)
    assert len(flat) == len(set(flat.tolist()))
    if training:  # equal full batches everywhere; only the final global partial batch is dropped
        steps = n // (world * batch)
        assert {len(s) for s in shares} == {steps * batch}
        assert sorted(flat.tolist()) == sorted(epoch_order(n, 0, 0)[: steps * world * batch].tolist())
    else:  # every record exactly once; the last batch partial
        assert sorted(flat.tolist()) == list(range(n))


def test_resume_with_another_replica_count_continues_the_permutation():
    """After k steps of W replicas the job consumed order[:k*W*B], whatever W was: 2 x 3 for 5 steps,
    then 3 x 2 (the same global batch of 6) to the end, against one replica of 6."""
    n, order = 1001, epoch_order(1001, 5, 2)
    first = np.concatenate([s[: 5 * 3] for s in _shares(n, 0, 2, 3, True, seed=5, epoch=2)])
    rest = np.concatenate(_shares(n, 30, 3, 2, True, seed=5, epoch=2))
    whole = _shares(n, 0, 1, 6, True, seed=5, epoch=2)[0]
    assert sorted(first.tolist()) == sorted(order[:30].tolist())
    assert sorted(np.concatenate([first, rest]).tolist()) == sorted(whole.tolist())
    assert replica_steps(n, 30, 0, 3, 2, True) + 5 == replica_steps(n, 0, 0, 1, 6, True) == 1001 // 6


def test_crop_offsets_uniform_over_33x33():
    """Chi-square over 1089 cells: all 33x33 offsets equally likely (edges included)."""
    xy = epoch_draws(102_400, 11, 0).crop_xy
    assert xy.min() == 0 and xy.max() == C.CROP_POSITIONS - 1 == 32
    counts = np.bincount(xy[:, 1] * 33 + xy[:, 0], minlength=33 * 33)
    assert counts.min() > 0 and chisquare(counts).pvalue > 1e-4
    # Marginals too: the edge offsets 0 and 32 as likely as the inner ones.
    assert chisquare(np.bincount(xy[:, 0], minlength=33)).pvalue > 1e-4


def test_flip_and_lighting_distributions_and_purity():
    n = 100_000
    d = epoch_draws(n, 3, 4)
    assert abs(d.mirror.mean() - C.MIRROR_PROBABILITY) < 4 * 0.5 / np.sqrt(n) and set(np.unique(d.mirror)) == {0, 1}
    assert abs(d.alpha.std() - C.LIGHTING_STD) < 0.002 and np.abs(d.alpha.mean(axis=0)).max() < 0.002
    again, other = epoch_draws(n, 3, 4), epoch_draws(n, 3, 5)
    assert all(np.array_equal(getattr(d, f), getattr(again, f)) for f in ("crop_xy", "mirror", "alpha"))
    assert not np.array_equal(d.crop_xy, other.crop_xy)  # a new draw for every record every epoch


@pytest.mark.parametrize("p", [1, 7, 1000])
def test_draws_of_a_position_do_not_depend_on_the_number_of_positions(p):
    """Row k is a function of (seed, epoch, k): positions 0..P-1 draw the same with P and with 2P
    positions (one stream per field; from one stream the mirrors would start after the 2P crops)."""
    small, large = epoch_draws(p, 9, 2), epoch_draws(2 * p, 9, 2)
    for f in ("crop_xy", "mirror", "alpha"):
        assert np.array_equal(getattr(small, f), getattr(large, f)[:p]), f
    fields = [small.crop_xy[:, 0], small.mirror, small.alpha[:, 0]]
    if p > 100:  # and the fields' streams are not one another's
        assert all(abs(np.corrcoef(a, b)[0, 1]) < 0.15 for a, b in [(fields[0], fields[1]), (fields[1], fields[2])])


@pytest.fixture(scope="module")
def gapped(tmp_path_factory):
    """The builder's sample dataset (rejected files leave gaps in the positions), with stats added."""
    data = tmp_path_factory.mktemp("gapped") / "data"
    shutil.copytree(clean_build(tmp_path_factory.getbasetemp()), data)
    stats = A.Stats(
        mean_rgb=[120.0, 115.0, 100.0],
        eigval=[900.0, 100.0, 20.0],
        eigvec=np.eye(3).tolist(),
        n_images=1,
        n_pixels=65536,
    )
    A.write_stats(data, stats, np.full(A.MEAN_IMAGE_SHAPE, 120.0, np.float32))
    return data


def test_split_index_maps_records_to_positions_across_gaps(gapped):
    index = SplitIndex(gapped, "train")
    keys = [A.parse_key(k)[0] for s in A.read_manifest(gapped).shard_paths(gapped, "train") for k, _ in A.iter_shard(s)]
    assert index.positions.tolist() == keys and len(keys) < index.num_positions  # there are gaps
    jpegs, lengths, labels = index.read(index.positions[::-1])
    jpegs = unpacked(jpegs, lengths)
    datums = [
        A.Datum.decode(v) for s in A.read_manifest(gapped).shard_paths(gapped, "train") for _, v in A.iter_shard(s)
    ]
    assert labels.tolist() == [d.label for d in datums][::-1]
    assert [j.tobytes() for j in jpegs] == [d.data for d in datums][::-1]


def test_order_cli_equals_the_loaders_delivered_positions(gapped):
    for split, epoch, rank, world in [("train", 1, 1, 2), ("val", 0, 0, 1)]:
        r = run_prep(
            [
                "order",
                "--data-dir",
                str(gapped),
                "--split",
                split,
                "--epoch",
                str(epoch),
                "--seed",
                "2",
                "--replica",
                str(rank),
                "--replicas",
                str(world),
                "--batch-size",
                str(4 * world),
            ]
        )
        assert r.exit_code == 0, r.output
        loader = create_loader(
            gapped, split, DataConfig(num_threads=1), batch_size=4, seed=2, rank=rank, world=world, with_draws=True
        )
        loader.load_state_dict({**loader.state_dict(), "epoch": epoch})
        delivered = [int(i) for _x, _y, d in loader for i in d["index"]]
        assert [int(v) for v in r.output.split()] == delivered and delivered

"""Which records each replica reads in an epoch, and every image's random draws: pure numpy functions.

SGD as §5 ran it sees a fresh random order of the whole training set every epoch, and §4.1 draws a
crop, a flip and three lighting alphas for every image it sees. Both are pure functions here:

* the order of epoch ``e`` is a uniform permutation of the split's records, seeded by (seed, e);
* replica ``r`` of ``W`` reads ``order[c:][r::W]``, where ``c`` is the number of records the whole
  job consumed in this epoch before (0 at an epoch's start, more after a resume), and every
  replica takes the same number of full batches, ``(N - c) // (W * B)``: after ``k`` steps the job
  has consumed exactly ``order[c : c + k * W * B]``, whatever ``W`` was, so a resume with another
  replica count continues the same permutation (like torch's DistributedSampler, strided);
* validation reads the records in key order with the same strided shares; its last batch is
  partial, and every record is read exactly once per epoch over the replicas;
* the draws of epoch ``e`` are arrays indexed by record position (the key's ``{position:08d}``),
  one generator stream per field seeded by (seed, e, field): the same record in the same epoch
  gets the same crop, flip and lighting whatever the number of replicas, pipelines or devices,
  and whatever the number of records (a stream's first P values do not depend on its length).

Imports neither DALI nor torch: ``alexnet-prep order`` prints an epoch's order without either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import artifacts as A
from . import constants as C
from .errors import AlexnetError, ContractError

# Third words of the generators' seed sequences: the order and each field of the draws of one
# (seed, epoch) are independent streams (numpy's SeedSequence mixes every word). One stream per field:
# drawn from one stream in turn, the mirrors and alphas would start after the P crops and so move with P.
ORDER_STREAM = 1
CROP_STREAM, MIRROR_STREAM, ALPHA_STREAM = 2, 3, 4


def epoch_order(num_records: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of ``epoch``: a uniform permutation of ``range(num_records)`` (record indices)."""
    return np.random.default_rng([seed, epoch, ORDER_STREAM]).permutation(num_records)


def replica_steps(num_records: int, consumed: int, rank: int, world: int, batch_size: int, training: bool) -> int:
    """Batches replica ``rank`` takes from ``consumed`` to the epoch's end: train drops the final global
    partial batch (every replica takes the same count, so DDP never waits); val keeps every record
    (its replicas' counts may differ by one)."""
    left = max(num_records - consumed, 0)
    if training:
        return left // (world * batch_size)
    share = max(-(-(left - rank) // world), 0)
    return -(-share // batch_size)


def replica_indices(order: np.ndarray, consumed: int, rank: int, world: int, steps: int, batch_size: int):
    """Record indices replica ``rank`` reads in its next ``steps`` batches: ``order[consumed:][rank::world]``."""
    return order[consumed:][rank::world][: steps * batch_size]


@dataclass(frozen=True)
class Draws:
    """One epoch's §4.1 draws, row ``p`` for the record at position ``p``."""

    crop_xy: np.ndarray  # (P, 2) int32: pixel offsets (x, y), each uniform over 0..32
    mirror: np.ndarray  # (P,) int32: 1 = horizontal flip, probability 0.5
    alpha: np.ndarray  # (P, 3) float32: PCA lighting alphas ~ N(0, 0.1)


def epoch_draws(num_positions: int, seed: int, epoch: int) -> Draws:
    """The draws of every record position in ``epoch``, in the paper's distributions (``Draws``); row
    ``p`` is a function of (seed, epoch, p) only: each field has its own stream, read in position order."""

    def rng(stream: int) -> np.random.Generator:
        return np.random.default_rng([seed, epoch, stream])

    crop_xy = rng(CROP_STREAM).integers(0, C.CROP_POSITIONS, (num_positions, 2), dtype=np.int32)
    mirror = (rng(MIRROR_STREAM).random(num_positions) < C.MIRROR_PROBABILITY).astype(np.int32)
    alpha = rng(ALPHA_STREAM).normal(0.0, C.LIGHTING_STD, (num_positions, 3)).astype(np.float32)
    return Draws(crop_xy=crop_xy, mirror=mirror, alpha=alpha)


class SplitIndex:
    """Record index -> record position (the key's prefix) and shard, for one split.

    A rejected source file leaves a gap in the positions (docs/DATA_CONTRACT.md), so a record's index
    (its place in key order) and its position differ after the first gap: only shards with gaps are
    scanned for their keys; the others hold every position of their block.
    """

    def __init__(self, data_dir: Path, split: str, manifest: A.Manifest | None = None):
        manifest = manifest or A.read_manifest(data_dir)
        self.shard_paths = manifest.shard_paths(Path(data_dir), split)
        shards = manifest.splits[split].shards
        parts = []
        for path, shard in zip(self.shard_paths, shards, strict=True):
            if not (path / "data.mdb").exists():
                raise ContractError(
                    f"shard {path} of {split} is missing: check with alexnet-prep verify, or " + A.REBUILD_HINT
                )
            if shard.num_records == shard.stop_position - shard.first_position:
                # Opened once here, so that a damaged shard is one line now rather than an error in a
                # reader process later (the reads happen there).
                A.open_shard(path).close()
                parts.append(np.arange(shard.first_position, shard.stop_position, dtype=np.int64))
            else:
                parts.append(_scan_positions(path))
        self.positions = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        self.shard_first = np.array([s.first_position for s in shards], dtype=np.int64)
        self.num_positions = int(shards[-1].stop_position) if shards else 0
        self._envs = None
        if len(self.positions) != manifest.splits[split].num_records:
            raise ContractError(
                f"the {split} shards hold {len(self.positions)} records, the manifest says "
                f"{manifest.splits[split].num_records}; run `alexnet-prep verify`"
            )

    def __len__(self) -> int:
        return len(self.positions)

    def __getstate__(self) -> dict:
        """Pickled (for the loader's reader processes) without open environments: each opens its own."""
        return {**self.__dict__, "_envs": None}

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The JPEG bytes and labels of the records at ``positions``, read by key: ``(jpegs, lengths,
        labels)``, record ``i``'s JPEG being ``jpegs[i, :lengths[i]]`` (``unpacked``).

        Each read is one B-tree seek to the key prefix ``{position:08d}_`` (the key's source path is
        not needed). The JPEG is found in the record without a copy (``A.datum_jpeg``) and copied
        once, into its row of one (batch, longest JPEG) array: DALI takes a batch of one array at the
        cost of one, where a list of 128 arrays costs ~1 ms of Python per batch on the thread that
        runs the pipeline. The shards stay open, read-only, for the reader's life.
        """
        if self._envs is None:
            # Readahead on: a record spans ~10 pages, and without it each is its own read from disk.
            self._envs = [A.open_shard(path, readahead=True) for path in self.shard_paths]
        shards = np.searchsorted(self.shard_first, positions, side="right") - 1
        views, labels = [], np.empty(len(positions), dtype=np.int64)
        txns, cursors = [], {}
        try:
            for i, (pos, shard) in enumerate(zip(positions.tolist(), shards.tolist(), strict=True)):
                if shard not in cursors:
                    txns.append(self._envs[shard].begin(buffers=True))
                    cursors[shard] = txns[-1].cursor()
                cursor = cursors[shard]
                prefix = b"%0*d_" % (A.KEY_POSITION_DIGITS, pos)
                if not cursor.set_range(prefix) or not bytes(cursor.key()).startswith(prefix):
                    raise ContractError(f"record {pos} is missing from {self.shard_paths[shard]}")
                jpeg, labels[i] = A.datum_jpeg(cursor.value())
                views.append(jpeg)
            lengths = np.array([len(v) for v in views], dtype=np.int32)
            jpegs = np.empty((len(views), int(lengths.max(initial=0))), dtype=np.uint8)
            for row, view in zip(jpegs, views, strict=True):
                row[: len(view)] = view  # the one copy, while the read transaction holds the page
        finally:
            for txn in txns:
                txn.abort()  # read-only: ends the snapshot (the views die with it)
        return jpegs, lengths, labels

    def where(self, position: int) -> tuple[Path, bytes]:
        """The shard and the key of the record at ``position`` (for error messages)."""
        shard = int(np.searchsorted(self.shard_first, position, side="right") - 1)
        env = A.open_shard(self.shard_paths[shard])
        try:
            with env.begin() as txn:
                cursor = txn.cursor()
                cursor.set_range(b"%0*d_" % (A.KEY_POSITION_DIGITS, position))
                return self.shard_paths[shard], bytes(cursor.key())
        finally:
            env.close()


def unpacked(jpegs: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """The JPEGs of ``SplitIndex.read`` as a list of uint8 arrays (views)."""
    return [row[:n] for row, n in zip(jpegs, lengths.tolist(), strict=True)]


def _scan_positions(shard_path: Path) -> np.ndarray:
    env = A.open_shard(shard_path)
    try:
        with env.begin() as txn:
            keys = txn.cursor().iternext(keys=True, values=False)
            return np.array([A.parse_key(k)[0] for k in keys], dtype=np.int64)
    finally:
        env.close()


class ReplicaPlan:
    """The replica's batches, epoch after epoch, as record positions and draws: what the loader reads
    and ``alexnet-prep order`` prints."""

    def __init__(self, index: SplitIndex, seed: int, rank: int, world: int, batch_size: int, training: bool):
        self.index, self.seed, self.rank, self.world = index, seed, rank, world
        self.batch_size, self.training = batch_size, training
        self._orders: dict[int, np.ndarray] = {}
        self._draws: dict[int, Draws] = {}

    def steps(self, consumed: int) -> int:
        return replica_steps(len(self.index), consumed, self.rank, self.world, self.batch_size, self.training)

    def _cached(self, cache: dict, epoch: int, make):
        if epoch not in cache:
            while len(cache) > 1:  # prefetching crosses an epoch's end: keep this epoch and the next
                cache.pop(min(cache))
            cache[epoch] = make()
        return cache[epoch]

    def indices(self, epoch: int, consumed: int) -> np.ndarray:
        """Record indices the replica reads after ``consumed`` records of ``epoch``, to the epoch's end."""
        n = len(self.index)
        order = (
            self._cached(self._orders, epoch, lambda: epoch_order(n, self.seed, epoch))
            if self.training
            else np.arange(n)
        )
        return replica_indices(order, consumed, self.rank, self.world, self.steps(consumed), self.batch_size)

    def batch(self, epoch: int, consumed: int, k: int) -> np.ndarray:
        """Record positions of the replica's batch ``k`` after ``consumed`` records of ``epoch``."""
        return self.index.positions[self.indices(epoch, consumed)[k * self.batch_size : (k + 1) * self.batch_size]]

    def draws(self, epoch: int) -> Draws:
        return self._cached(self._draws, epoch, lambda: epoch_draws(self.index.num_positions, self.seed, epoch))


def replica_order(
    data_dir: Path, split: str, epoch: int, *, seed: int, rank: int, world: int, batch_size: int
) -> np.ndarray:
    """Record positions in the order replica ``rank`` of ``world`` receives them in ``epoch`` (from its
    start), as the loader delivers them: ``alexnet-prep order``."""
    if not 0 <= rank < world:
        raise AlexnetError(f"replica {rank} is not in [0, {world})")
    plan = ReplicaPlan(SplitIndex(data_dir, split), seed, rank, world, batch_size, training=split == "train")
    return plan.index.positions[plan.indices(epoch, 0)]

"""``alexnet-prep verify``: check a built dataset against its manifest and build-time checksums.

Every shard: present, record count as in the manifest, keys in order and inside the shard's
position block, no source file twice, checksum count as in ``crc32.npy``. Every record (or a
seeded sample of ``--sample N`` per split): CRC-32 against ``crc32.npy``, Datum fields
(channels 3, 256x256, encoded), label in range, and the JPEG decodes to 256x256 RGB
(``images.decode_record``).

Shards are checked in ``--workers`` processes (tools/pool.py), one shard per task; each returns
its keys, and the checks that span shards (a shard's first position after the previous shard's
last, a source file stored once in its split) are made on them afterwards, split by split, so
the problems are the same, in the same order, for any number of workers. A shard is read in key
order with the kernel's readahead on (off for a ``--sample``): with it off every 4 KB page that
is not in the page cache was a synchronous read of its own (benchmarks/RESULTS.md, "verify").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.pipeline import locks
from alexnet.pipeline.cli_common import config_options, data_dir_option, opt
from alexnet.pipeline.errors import AlexnetError, ContractError
from alexnet.pipeline.images import Rejected, decode_record
from alexnet.tools.pool import Pool, default_workers, report

MAX_LISTED = 20  # problems printed one per line; the rest are counted


@dataclass(frozen=True)
class VerifyConfig:
    """``alexnet-prep verify``'s settings, each default written once here (its options are these fields)."""

    data_dir: Path  # --data-dir
    sample: int = opt(0, "Decode and checksum this many random records per split; 0: all records.", min=0)
    seed: int = opt(0, "Seed of the --sample choice.")
    workers: int = opt(0, "Processes, each checking one shard at a time; 0: one per CPU core.", min=0)
    progress: bool = opt(True, "A progress bar.")


@dataclass
class VerifyReport:
    records: dict[str, int] = field(default_factory=dict)  # split -> records found
    checked: int = 0  # records decoded and checksummed
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_record(where: str, value: bytes, crc: int | None, num_classes: int, problems: list[str]) -> None:
    if crc is not None and A.crc32(value) != crc:
        problems.append(f"{where}: checksum mismatch (crc32 {A.crc32(value):08x}, recorded {crc:08x})")
        # still decode: say what else is wrong with it
    try:
        d = A.Datum.decode(value)
    except ContractError as e:
        problems.append(f"{where}: not a Datum ({e})")
        return
    if (d.channels, d.height, d.width) != (3, C.STORED_SIZE, C.STORED_SIZE) or not d.encoded:
        problems.append(
            f"{where}: Datum says channels={d.channels} height={d.height} width={d.width} encoded={d.encoded}, "
            f"expected 3, {C.STORED_SIZE}, {C.STORED_SIZE}, True"
        )
    if not 0 <= d.label < num_classes:
        problems.append(f"{where}: label {d.label} outside 0..{num_classes - 1}")
    try:
        decode_record(d.data, rgb_only=True)
    except Rejected as e:  # any decoder failure is a finding, not a crash
        problems.append(f"{where}: {e}")


@dataclass(frozen=True)
class ShardCheck:
    """One shard's work for a worker: its place in the manifest and the records to decode (None: all)."""

    data_dir: Path
    shard: A.ShardInfo
    num_classes: int
    chosen: frozenset[int] | None  # indices of records inside the shard, in key order


@dataclass
class ShardFindings:
    path: str  # the shard's, as in the manifest
    problems: list[str]
    found: int  # records in the shard
    checked: int  # records decoded and checksummed
    keys: list[bytes]  # every key, in order: the checks that span shards are made on them afterwards


def check_shard(task: ShardCheck, _state=None) -> ShardFindings:
    """One shard: its counts and checksum file, every key inside its block and in order, the chosen records."""
    sh, problems = task.shard, []
    path = task.data_dir / sh.path
    if not (path / "data.mdb").exists():
        return ShardFindings(sh.path, [f"{sh.path}: shard missing"], 0, 0, [])
    try:
        crcs = A.read_record_crcs(path)
    except ContractError as e:
        problems.append(f"{sh.path}: {e}")
        crcs = None
    keys, checked = [], 0
    # Every record is read in key order: let the kernel read ahead (a sample reads a few pages here and there).
    with A.open_shard(path, readahead=task.chosen is None) as env, env.begin(buffers=True) as txn:
        count = txn.stat()["entries"]
        if count != sh.num_records:
            problems.append(f"{sh.path}: {count} records, manifest says {sh.num_records}")
        if crcs is not None and len(crcs) != count:
            problems.append(f"{sh.path}: {len(crcs)} checksums for {count} records")
            crcs = None
        last = -1
        for i, (key, value) in enumerate(txn.cursor()):
            key = bytes(key)
            keys.append(key)
            last = _check_key(sh, key, last, problems)
            if task.chosen is None or i in task.chosen:
                crc = int(crcs[i]) if crcs is not None else None
                _check_record(
                    f"{sh.path} {key.decode(errors='replace')}", bytes(value), crc, task.num_classes, problems
                )
                checked += 1
                report(1)
    return ShardFindings(sh.path, problems, len(keys), checked, keys)


def _position(key: bytes) -> tuple[int, str]:
    """(position, source file) of a key; (-1, the key) when it is malformed (reported by check_shard)."""
    try:
        return A.parse_key(key)
    except ContractError:
        return -1, key.decode(errors="replace")


def _check_key(sh: A.ShardInfo, key: bytes, last: int, problems: list[str]) -> int:
    """A key parses, its position is inside the shard's block and after the previous record's; the new last."""
    try:
        pos, _ = A.parse_key(key)
    except ContractError as e:
        problems.append(f"{sh.path}: {e}")
        pos = -1
    where = f"{sh.path} {key.decode(errors='replace')}"
    if not sh.first_position <= pos < sh.stop_position:
        problems.append(f"{where}: position outside the shard's block [{sh.first_position}, {sh.stop_position})")
    if pos <= last:
        problems.append(f"{where}: position not after the previous record's ({last})")
    return max(last, pos)


def _across_shards(shards: list[A.ShardInfo], found: list[ShardFindings]) -> list[list[str]]:
    """Each shard's problems that span shards: its first key not after the previous shard's last position,
    a source file already stored (in this shard or an earlier one of the split)."""
    seen: set[str] = set()
    last = -1
    out = []
    for sh, f in zip(shards, found, strict=True):
        problems = []
        if f.keys:
            first = _position(f.keys[0])[0]
            if 0 <= first <= last:
                key = f.keys[0].decode(errors="replace")
                problems.append(f"{sh.path} {key}: position not after the previous record's ({last})")
        for key in f.keys:
            pos, rel = _position(key)
            last = max(last, pos)
            if rel in seen:
                problems.append(f"{sh.path} {key.decode(errors='replace')}: source file {rel} stored twice")
            seen.add(rel)
        out.append(problems)
    return out


def _shard_checks(cfg: VerifyConfig, manifest: A.Manifest, rng: np.random.Generator) -> list[ShardCheck]:
    """Every shard's check, split after split; with ``--sample`` the split's seeded choice of records."""
    tasks = []
    for split in manifest.splits.values():
        chosen = None
        if cfg.sample and cfg.sample < split.num_records:
            chosen = np.sort(rng.choice(split.num_records, size=cfg.sample, replace=False))
        start = 0
        for sh in split.shards:
            mine = None
            if chosen is not None:
                lo, hi = np.searchsorted(chosen, [start, start + sh.num_records])
                mine = frozenset((chosen[lo:hi] - start).tolist())
            tasks.append(ShardCheck(cfg.data_dir, sh, len(manifest.classes), mine))
            start += sh.num_records
    return tasks


def verify(cfg: VerifyConfig) -> VerifyReport:
    """Every shard checked in ``cfg.workers`` processes; then the checks that span shards, split by split."""
    manifest = A.read_manifest(cfg.data_dir)
    report = VerifyReport()
    if manifest.classes != sorted(manifest.classes) or len(set(manifest.classes)) != len(manifest.classes):
        report.problems.append(
            "manifest: classes are not sorted unique wnids (labels would not be the sorted-wnid index)"
        )
    tasks = _shard_checks(cfg, manifest, np.random.default_rng(cfg.seed))
    todo = sum(t.shard.num_records if t.chosen is None else len(t.chosen) for t in tasks)
    with Pool(min(cfg.workers or default_workers(), len(tasks)), check_shard) as pool:
        done = pool.run(
            sorted(tasks, key=lambda t: -t.shard.num_records),  # largest first
            name=lambda t: f"shard {t.shard.path}",
            bar={"total": todo, "unit": "rec", "disable": not cfg.progress},
        )
    by_path = {f.path: f for f in done}
    for name, split in manifest.splits.items():
        _check_split_counts(name, split, manifest.rejected, report.problems)
        found = [by_path[sh.path] for sh in split.shards]
        for f, spanning in zip(found, _across_shards(split.shards, found), strict=True):
            report.problems += f.problems + spanning
            report.checked += f.checked
        report.records[name] = sum(f.found for f in found)
        if report.records[name] != split.num_records:
            report.problems.append(
                f"{name}: {report.records[name]} records in the shards, manifest says {split.num_records}"
            )
    return report


def _check_split_counts(name: str, split: A.SplitInfo, rejected: list[dict], problems: list[str]) -> None:
    if split.num_records + split.rejected != split.source_count:
        problems.append(
            f"{name}: {split.num_records} records + {split.rejected} rejected != {split.source_count} source files"
        )
    n_rejected = sum(1 for r in rejected if r.get("split") == name)
    if n_rejected != split.rejected:
        problems.append(f"{name}: manifest lists {n_rejected} rejected files, split says {split.rejected}")


EPILOG = """\b
Examples:
  alexnet-prep verify                          # every record of ./data
  alexnet-prep verify --sample 1000            # 1000 random records per split (counts and keys: all)
  alexnet-prep verify --data-dir /fast/lmdb --sample 5000 --seed 1
  alexnet-prep verify --workers 16             # 16 processes, one shard each at a time
"""


@click.command("verify", epilog=EPILOG)
@data_dir_option
@config_options(VerifyConfig)
def verify_command(data_dir: Path, **options) -> None:
    """Check a dataset: counts against the manifest, keys, checksums, Datum fields, labels, 256x256x3 decode.

    Exits with status 1 and lists the problems when anything is wrong.
    """
    with locks.hold(data_dir, locks.SHARED, "alexnet-prep verify"):
        report = verify(VerifyConfig(data_dir, **options))
    counts = ", ".join(f"{n} {c} records" for n, c in report.records.items())
    if report.ok:
        click.echo(f"ok: {data_dir}: {counts}; {report.checked} records decoded and checksummed")
        return
    for line in report.problems[:MAX_LISTED]:
        click.echo(f"  {line}", err=True)
    more = len(report.problems) - MAX_LISTED
    if more > 0:
        click.echo(f"  ... and {more} more", err=True)
    raise AlexnetError(
        f"{len(report.problems)} problems in {data_dir} ({counts}; {report.checked} records checked); "
        "rebuild with: alexnet-prep build-lmdb SRC --data-dir DIR --overwrite"
    )

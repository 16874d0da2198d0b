"""``alexnet-prep verify``: check a built dataset against its manifest and build-time checksums.

Every shard: present, record count as in the manifest, keys in order and inside the shard's
position block, no source file twice, checksum count as in ``crc32.npy``. Every record (or a
seeded sample of ``--sample N`` per split): CRC-32 against ``crc32.npy``, Datum fields
(channels 3, 256x256, encoded), label in range, and the JPEG decodes to 256x256 RGB.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.pipeline import locks
from alexnet.pipeline.cli_common import data_dir_option
from alexnet.pipeline.errors import AlexnetError, ContractError

MAX_LISTED = 20  # problems printed one per line; the rest are counted


@dataclass(frozen=True)
class VerifyConfig:
    data_dir: Path
    sample: int = 0  # records decoded and checksummed per split; 0: all
    seed: int = 0
    progress: bool = True


@dataclass
class VerifyReport:
    records: dict[str, int] = field(default_factory=dict)  # split -> records found
    checked: int = 0  # records decoded and checksummed
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_record(where: str, value: bytes, crc: int | None, num_classes: int, problems: list[str]) -> None:
    from PIL import Image

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
        with Image.open(io.BytesIO(d.data)) as im:
            im.load()
            if im.format != "JPEG" or im.mode != "RGB" or im.size != (C.STORED_SIZE, C.STORED_SIZE):
                problems.append(
                    f"{where}: image is {im.format} {im.mode} {im.size[0]}x{im.size[1]}, expected RGB JPEG "
                    f"{C.STORED_SIZE}x{C.STORED_SIZE}"
                )
    except Exception as e:  # any decoder failure is a finding, not a crash
        problems.append(f"{where}: JPEG does not decode ({e})")


@dataclass
class _SplitScan:
    """Where the walk over one split's records stands (key order across its shards)."""

    chosen: set[int] | None  # record indices to decode and checksum; None: all
    index: int = 0  # record index over the split
    found: int = 0
    last_pos: int = -1
    seen: set[str] = field(default_factory=set)


def verify(cfg: VerifyConfig) -> VerifyReport:
    from tqdm import tqdm

    manifest = A.read_manifest(cfg.data_dir)
    report = VerifyReport()
    num_classes = len(manifest.classes)
    if manifest.classes != sorted(manifest.classes) or len(set(manifest.classes)) != num_classes:
        report.problems.append(
            "manifest: classes are not sorted unique wnids (labels would not be the sorted-wnid index)"
        )
    rng = np.random.default_rng(cfg.seed)
    todo = sum(min(cfg.sample, s.num_records) if cfg.sample else s.num_records for s in manifest.splits.values())
    with tqdm(total=todo, unit="rec", disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for name, split in manifest.splits.items():
            _check_split_counts(name, split, manifest.rejected, report.problems)
            chosen = None
            if cfg.sample and cfg.sample < split.num_records:
                chosen = set(rng.choice(split.num_records, size=cfg.sample, replace=False).tolist())
            scan = _SplitScan(chosen)
            for sh in split.shards:
                _verify_shard(cfg.data_dir, sh, scan, num_classes, report, bar)
            report.records[name] = scan.found
            if scan.found != split.num_records:
                report.problems.append(f"{name}: {scan.found} records in the shards, manifest says {split.num_records}")
    return report


def _check_split_counts(name: str, split: A.SplitInfo, rejected: list[dict], problems: list[str]) -> None:
    if split.num_records + split.rejected != split.source_count:
        problems.append(
            f"{name}: {split.num_records} records + {split.rejected} rejected != {split.source_count} source files"
        )
    n_rejected = sum(1 for r in rejected if r.get("split") == name)
    if n_rejected != split.rejected:
        problems.append(f"{name}: manifest lists {n_rejected} rejected files, split says {split.rejected}")


def _verify_shard(data_dir: Path, sh: A.ShardInfo, scan: _SplitScan, num_classes: int, report: VerifyReport, bar):
    """One shard: its counts and checksum file, every key, and the chosen records' contents."""
    problems = report.problems
    path = data_dir / sh.path
    if not (path / "data.mdb").exists():
        problems.append(f"{sh.path}: shard missing")
        scan.index += sh.num_records
        return
    try:
        crcs = A.read_record_crcs(path)
    except ContractError as e:
        problems.append(f"{sh.path}: {e}")
        crcs = None
    with A.open_shard(path) as env, env.begin(buffers=True) as txn:
        count = txn.stat()["entries"]
        if count != sh.num_records:
            problems.append(f"{sh.path}: {count} records, manifest says {sh.num_records}")
        if crcs is not None and len(crcs) != count:
            problems.append(f"{sh.path}: {len(crcs)} checksums for {count} records")
            crcs = None
        for i, (key, value) in enumerate(txn.cursor()):
            where = _check_key(sh, bytes(key), scan, problems)
            if scan.chosen is None or scan.index in scan.chosen:
                crc = int(crcs[i]) if crcs is not None else None
                _check_record(where, bytes(value), crc, num_classes, problems)
                report.checked += 1
                bar.update(1)
            scan.index += 1
            scan.found += 1


def _check_key(sh: A.ShardInfo, key: bytes, scan: _SplitScan, problems: list[str]) -> str:
    """Position inside the shard's block and after the previous record's, source file not seen before."""
    try:
        pos, rel = A.parse_key(key)
    except ContractError as e:
        problems.append(f"{sh.path}: {e}")
        pos, rel = -1, key.decode(errors="replace")
    where = f"{sh.path} {key.decode(errors='replace')}"
    if not sh.first_position <= pos < sh.stop_position:
        problems.append(f"{where}: position outside the shard's block [{sh.first_position}, {sh.stop_position})")
    if pos <= scan.last_pos:
        problems.append(f"{where}: position not after the previous record's ({scan.last_pos})")
    scan.last_pos = max(scan.last_pos, pos)
    if rel in scan.seen:
        problems.append(f"{where}: source file {rel} stored twice")
    scan.seen.add(rel)
    return where


EPILOG = """\b
Examples:
  alexnet-prep verify                          # every record of ./data
  alexnet-prep verify --sample 1000            # 1000 random records per split (counts and keys: all)
  alexnet-prep verify --data-dir /fast/lmdb --sample 5000 --seed 1
"""


@click.command("verify", epilog=EPILOG)
@data_dir_option
@click.option(
    "--sample",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Decode and checksum this many random records per split; 0: all records.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --sample choice.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def verify_command(data_dir: Path, sample: int, seed: int, no_progress: bool) -> None:
    """Check a dataset: counts against the manifest, keys, checksums, Datum fields, labels, 256x256x3 decode.

    Exits with status 1 and lists the problems when anything is wrong.
    """
    with locks.hold(data_dir, locks.SHARED, "alexnet-prep verify"):
        report = verify(VerifyConfig(data_dir=data_dir, sample=sample, seed=seed, progress=not no_progress))
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

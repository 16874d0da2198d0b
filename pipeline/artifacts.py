"""The data contract: the one module that owns the on-disk format of a dataset directory.

Tools write through it, the pipeline and the trainer read through it; no other
module spells a file name, a key format or a schema field. Importing it does
not import DALI or torch, so the offline tools start fast.

Dataset directory (``--data-dir``, env ``ALEXNET_DATA_DIR``, default ``./data``)::

    manifest.json          schema version, classes, splits and shards, build options,
                           source counts, rejected files with reasons
    stats.json             mean RGB, RGB covariance eigen-decomposition (pca-stats)
    mean_image.npy         float32 (256, 256, 3), RGB, 0-255 scale (pca-stats)
    rejected.tsv           split, relative path, reason (build-lmdb)
    train/train-00000-of-00004/   one LMDB environment per shard (data.mdb, lock.mdb)
    val/val-00000-of-00001/
    test/test-00000-of-00001/     only when the source has a labelled test set (ILSVRC-2010, ImageNetV2)

Record: a Caffe ``Datum`` (channels=3, height, width, data=<JPEG bytes>, label,
encoded=true), so DALI's ``fn.readers.caffe`` reads the shards natively.
Key: ``{position:08d}_{relative source path}``; position follows a seeded
global shuffle of the split, and shard ``i`` holds a contiguous block of
positions, so reading the shards in manifest order reads the whole split in
shuffled order.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import constants as C
from .errors import ContractError

# 2: a "test" split may be present, and splits count their conversions. Schema 1 (neither) still reads:
# it is schema 2 without them.
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)

DATA_DIR_ENV = "ALEXNET_DATA_DIR"
DEFAULT_DATA_DIR = Path("data")

MANIFEST_FILE = "manifest.json"
STATS_FILE = "stats.json"
MEAN_IMAGE_FILE = "mean_image.npy"
REJECTED_FILE = "rejected.tsv"
# Per-shard sidecar written beside data.mdb: crc32 of each record's value, in key order.
RECORD_CRC_FILE = "crc32.npy"
# Per-shard sidecar kept by the builder while it writes a shard: conversions of the records committed.
CONVERSIONS_FILE = "conversions.json"

# A test split is scored only by ``alexnet-train eval --split test``: training, its schedule, its "best"
# checkpoint and pca-stats never read it.
SPLITS = ("train", "val", "test")
KEY_POSITION_DIGITS = 8
MEAN_IMAGE_SHAPE = (C.STORED_SIZE, C.STORED_SIZE, 3)


# --------------------------------------------------------------------------- keys


def make_key(position: int, relpath: str) -> bytes:
    """Caffe's ``{position:08d}_{relative path}`` key, as bytes (POSIX separators)."""
    return f"{position:0{KEY_POSITION_DIGITS}d}_{Path(relpath).as_posix()}".encode()


def parse_key(key: bytes) -> tuple[int, str]:
    text = key.decode()
    pos, _, rel = text.partition("_")
    if len(pos) != KEY_POSITION_DIGITS or not pos.isdigit() or not rel:
        raise ContractError(f"malformed record key {text!r}")
    return int(pos), rel


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}"


def shard_bounds(num_items: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` position blocks, sizes differing by at most one."""
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    edges = [num_items * i // num_shards for i in range(num_shards + 1)]
    return [(edges[i], edges[i + 1]) for i in range(num_shards)]


def shuffle_order(num_items: int, seed: int) -> np.ndarray:
    """The seeded global shuffle of a split: ``order[position] = source index``."""
    return np.random.default_rng(seed).permutation(num_items)


# --------------------------------------------------------------------------- Datum
# Caffe's caffe.proto, message Datum:
#   1 channels int32, 2 height int32, 3 width int32, 4 data bytes,
#   5 label int32, 6 float_data repeated float, 7 encoded bool.
# Encoded by hand (protobuf wire format) to avoid a protobuf dependency.


def _varint(value: int) -> bytes:
    if value < 0:  # int32 negatives are 10-byte two's complement varints
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = 0
    value = 0
    while True:
        if i >= len(buf):
            raise ContractError("truncated Datum varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ContractError("malformed Datum varint")


@dataclass(frozen=True)
class Datum:
    data: bytes
    label: int
    height: int
    width: int
    channels: int = 3
    encoded: bool = True

    def encode(self) -> bytes:
        parts = [
            b"\x08" + _varint(self.channels),
            b"\x10" + _varint(self.height),
            b"\x18" + _varint(self.width),
            b"\x22" + _varint(len(self.data)) + self.data,
            b"\x28" + _varint(self.label),
            b"\x38" + _varint(1 if self.encoded else 0),  # written explicitly, even when true
        ]
        return b"".join(parts)

    @classmethod
    def decode(cls, buf: bytes) -> Datum:
        fields = {num: bytes(buf[v[0] : v[1]]) if num == 4 else v for num, v in _datum_fields(buf)}
        if 4 not in fields:
            raise ContractError("Datum without data")
        return cls(
            data=fields[4],
            label=int(fields.get(5, 0)),
            height=int(fields.get(2, 0)),
            width=int(fields.get(3, 0)),
            channels=int(fields.get(1, 0)),
            encoded=bool(fields.get(7, 0)),
        )


def _datum_fields(buf) -> Iterator[tuple[int, Any]]:
    """The fields of an encoded Datum in order: ``(number, value)`` for varints (signed int64) and
    ``(number, (start, stop))`` for length-delimited fields (a span of ``buf``: nothing is copied)."""
    i, n = 0, len(buf)
    while i < n:
        tag, i = _read_varint(buf, i)
        num, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
            yield num, value - (1 << 64) if value >= 1 << 63 else value
        elif wire == 2:
            length, i = _read_varint(buf, i)
            if i + length > n:
                raise ContractError("truncated Datum field")
            yield num, (i, i + length)
            i += length
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ContractError(f"unsupported wire type {wire} in Datum")


def datum_jpeg(buf) -> tuple[np.ndarray, int]:
    """The JPEG bytes of an encoded Datum as a uint8 view of ``buf`` (no copy: valid while ``buf`` is)
    and its label; the scan stops at the label, which ``Datum.encode`` writes right after the data."""
    span, label = None, 0
    for num, value in _datum_fields(buf):
        if num == 4:
            span = value
        elif num == 5:
            label = value
            if span is not None:
                break
    if span is None:
        raise ContractError("Datum without data")
    return np.frombuffer(buf, dtype=np.uint8, count=span[1] - span[0], offset=span[0]), int(label)


def crc32(value: bytes) -> int:
    return zlib.crc32(value) & 0xFFFFFFFF


# --------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    path: str  # relative to the dataset directory
    num_records: int
    first_position: int
    stop_position: int  # positions [first_position, stop_position) were assigned to this shard


@dataclass
class SplitInfo:
    num_records: int
    source_count: int
    shards: list[ShardInfo]
    rejected: int = 0
    layout: str = ""  # how the source was detected (e.g. "class-folders", "kaggle-csv")
    # Kept records whose source file was converted, by kind (pipeline.images.CONVERSIONS: "gzip", "png",
    # "cmyk", "grey"); a file converted two ways counts under both.
    conversions: dict[str, int] = field(default_factory=dict)


@dataclass
class Manifest:
    classes: list[str]
    splits: dict[str, SplitInfo]
    class_names: list[str] = field(default_factory=list)  # readable names beside classes; [] if the source had none
    build: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    complete: bool = True
    schema_version: int = SCHEMA_VERSION

    def shard_paths(self, data_dir: Path, split: str) -> list[Path]:
        """Absolute shard paths of a split in manifest (= key) order."""
        if split not in self.splits:
            raise ContractError(f"split {split!r} is not in the manifest (have: {', '.join(self.splits)})")
        return [Path(data_dir) / s.path for s in self.splits[split].shards]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        """The inverse of ``_to_json``; a field this version does not know is an invalid manifest."""
        splits = {
            name: SplitInfo(**{**s, "shards": [ShardInfo(**sh) for sh in s["shards"]]})
            for name, s in d["splits"].items()
        }
        return cls(**{**d, "splits": splits})


def _to_json(obj: Manifest | Stats) -> dict[str, Any]:
    d = asdict(obj)
    return {"schema_version": d.pop("schema_version"), **d}  # first in the file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, rename: old file or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; dataset files are shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _atomic_write_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())


def _read_json(path: Path, what: str, missing: str) -> dict[str, Any]:
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ContractError(missing) from None
    except (OSError, ValueError) as e:
        fix = "; give the dataset's directory" if isinstance(e, NotADirectoryError) else ""
        raise ContractError(f"cannot read {what} {path}: {e.strerror if isinstance(e, OSError) else e}{fix}") from None
    version = d.get("schema_version") if isinstance(d, dict) else None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ContractError(
            f"{path} was written by a newer alexnet (schema version {version}; this one reads {SCHEMA_VERSION}): "
            "upgrade alexnet (pip install -U), or rebuild the dataset with this version"
        )
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ContractError(
            f"{path} has schema version {version}, this alexnet reads schema version "
            f"{' or '.join(map(str, READABLE_SCHEMA_VERSIONS))}; "
            "rebuild the dataset with this version (alexnet-prep build-lmdb --overwrite)"
        )
    return d


def write_manifest(data_dir: Path, manifest: Manifest) -> None:
    atomic_write_json(Path(data_dir) / MANIFEST_FILE, _to_json(manifest))


def read_manifest(data_dir: Path, *, require_complete: bool = True) -> Manifest:
    path = Path(data_dir) / MANIFEST_FILE
    missing = (
        f"no dataset at {data_dir}: {MANIFEST_FILE} is missing (run: alexnet-prep build-lmdb SRC --data-dir {data_dir})"
    )
    try:
        m = Manifest.from_json({**_read_json(path, "manifest", missing), "schema_version": SCHEMA_VERSION})
    except (KeyError, TypeError, ValueError) as e:
        raise ContractError(f"{path} is not a valid manifest: {e}") from None
    if require_complete and not m.complete:
        raise ContractError(
            f"the dataset at {data_dir} is half-built; finish it with: alexnet-prep build-lmdb SRC --data-dir {data_dir}"
        )
    return m


# --------------------------------------------------------------------------- stats


@dataclass
class Stats:
    mean_rgb: list[float]  # 3, 0-255 scale
    eigval: list[float]  # 3, variances of RGB pixel values on the 0-255 scale, descending
    eigvec: list[list[float]]  # 3x3, rows R,G,B; unit eigenvectors as columns
    n_images: int
    n_pixels: int
    covariance: list[list[float]] = field(default_factory=list)  # 3x3, 0-255 scale
    source: dict[str, Any] = field(default_factory=dict)  # what it was computed from
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if np.shape(self.mean_rgb) != (3,) or np.shape(self.eigval) != (3,) or self.eigvec_array.shape != (3, 3):
            raise ContractError("stats: mean_rgb and eigval need 3 values, eigvec 3x3")

    @property
    def eigvec_array(self) -> np.ndarray:
        return np.asarray(self.eigvec, dtype=np.float64)

    @property
    def eigval_array(self) -> np.ndarray:
        return np.asarray(self.eigval, dtype=np.float64)


# pca-stats' two files change together through a journal directory: both are written into PENDING,
# which is renamed to COMMIT (the commit point), then each is moved into place and COMMIT is removed. A
# kill before the commit point leaves the old pair (PENDING is dropped by the next reader or writer);
# after it, the new pair (the next reader or writer finishes the moves; a reader that cannot write,
# a read-only mount, reads the pair from COMMIT).
STATS_PENDING_DIR = ".stats-pending"
STATS_COMMIT_DIR = ".stats-commit"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stats_steps(data_dir: Path, stats: Stats, mean_image: np.ndarray) -> list:
    """``write_stats`` as its steps in order (each leaves a state a kill may leave; tested one by one)."""
    mean_image = np.asarray(mean_image, dtype=np.float32)
    if mean_image.shape != MEAN_IMAGE_SHAPE:
        raise ContractError(f"mean image has shape {mean_image.shape}, expected {MEAN_IMAGE_SHAPE}")
    data_dir = Path(data_dir)
    pending, commit = data_dir / STATS_PENDING_DIR, data_dir / STATS_COMMIT_DIR

    def prepare() -> None:
        settle_stats(data_dir)  # an earlier writer's leftovers first
        if pending.exists():
            shutil.rmtree(pending)
        pending.mkdir(parents=True)

    def move(name: str):
        return lambda: os.replace(commit / name, data_dir / name)

    return [
        prepare,
        lambda: _atomic_write_npy(pending / MEAN_IMAGE_FILE, mean_image),
        lambda: atomic_write_json(pending / STATS_FILE, _to_json(stats)),
        lambda: _fsync_dir(pending),
        lambda: (os.replace(pending, commit), _fsync_dir(data_dir)),  # the commit point
        move(MEAN_IMAGE_FILE),
        move(STATS_FILE),
        lambda: (commit.rmdir(), _fsync_dir(data_dir)),
    ]


def write_stats(data_dir: Path, stats: Stats, mean_image: np.ndarray) -> None:
    """Write ``mean_image.npy`` and ``stats.json`` as one unit: a kill leaves the old pair or the new."""
    for step in stats_steps(data_dir, stats, mean_image):
        step()


def settle_stats(data_dir: Path) -> None:
    """Finish an interrupted ``write_stats`` that passed its commit point. The writer's alone (it holds
    the data directory exclusively): a reader that takes no lock must not move files under a writer."""
    commit = Path(data_dir) / STATS_COMMIT_DIR
    if commit.is_dir():
        for name in (MEAN_IMAGE_FILE, STATS_FILE):
            if (commit / name).exists():
                os.replace(commit / name, Path(data_dir) / name)
        commit.rmdir()


def _stats_file(data_dir: Path, name: str) -> Path:
    """The current ``stats.json`` or ``mean_image.npy``: a committed write's file where it is until the
    next writer settles it (readers change nothing)."""
    committed = Path(data_dir) / STATS_COMMIT_DIR / name
    return committed if committed.exists() else Path(data_dir) / name


def _pca_stats_missing(data_dir: Path, name: str) -> str:
    return f"{name} is missing in {data_dir} (run: alexnet-prep pca-stats --data-dir {data_dir})"


def read_stats(data_dir: Path) -> Stats:
    path = _stats_file(data_dir, STATS_FILE)
    d = _read_json(path, "stats", _pca_stats_missing(data_dir, STATS_FILE))
    try:
        return Stats(**{**d, "schema_version": SCHEMA_VERSION})
    except TypeError as e:
        raise ContractError(f"{path} is not a valid stats file: {e}") from None


def read_mean_image(data_dir: Path) -> np.ndarray:
    path = _stats_file(data_dir, MEAN_IMAGE_FILE)
    if not path.exists():
        raise ContractError(_pca_stats_missing(data_dir, MEAN_IMAGE_FILE))
    arr = np.load(path, allow_pickle=False)
    if arr.shape != MEAN_IMAGE_SHAPE or arr.dtype != np.float32:
        raise ContractError(f"{path}: expected float32 {MEAN_IMAGE_SHAPE}, found {arr.dtype} {arr.shape}")
    return arr


# --------------------------------------------------------------------------- records


REBUILD_HINT = "rebuild the dataset (alexnet-prep build-lmdb SRC --data-dir DIR --overwrite)"


def open_shard(path: Path, *, readonly: bool = True, map_size: int = 1 << 30, readahead: bool = False):
    """Open one shard's LMDB environment (``lmdb`` imported lazily); ``readahead``: let the OS read
    ahead of a page fault (LMDB's default; off here, as for reads spread over more data than RAM)."""
    import lmdb

    path = Path(path)
    if readonly and not (path / "data.mdb").exists():
        raise ContractError(f"shard {path} is missing: " + REBUILD_HINT)
    if not readonly:
        path.mkdir(parents=True, exist_ok=True)
    try:
        return lmdb.open(
            str(path),
            readonly=readonly,
            lock=not readonly,
            map_size=map_size,
            subdir=True,
            readahead=readahead,
            meminit=False,
            max_readers=512,
        )
    except lmdb.Error as e:  # a damaged data.mdb: one line naming the shard and the fix
        why = str(e).removeprefix(f"{path}: ")
        raise ContractError(f"shard {path} cannot be opened ({why}): " + REBUILD_HINT) from None


def check_shards(data_dir: Path, manifest: Manifest, split: str) -> None:
    """Each of the split's shards holds as many records as the manifest says (LMDB's own count: nothing
    is read); one line naming the shard otherwise. ``alexnet-prep verify`` checks everything else."""
    for info, path in zip(manifest.splits[split].shards, manifest.shard_paths(data_dir, split), strict=True):
        env = open_shard(path)
        try:
            entries = env.stat()["entries"]
        finally:
            env.close()
        if entries != info.num_records:
            raise ContractError(
                f"shard {path} holds {entries} records but the manifest says {info.num_records}: the manifest no "
                f"longer matches the shards (alexnet-prep verify --data-dir {data_dir} lists all); " + REBUILD_HINT
            )


def iter_shard(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """Yield ``(key, value)`` pairs of one shard in key order."""
    env = open_shard(path)
    try:
        with env.begin(buffers=False) as txn:
            yield from txn.cursor()
    finally:
        env.close()


def iter_records(data_dir: Path, split: str, manifest: Manifest | None = None) -> Iterator[tuple[bytes, Datum]]:
    """Every record of a split in key order over its shards in manifest order."""
    manifest = manifest or read_manifest(data_dir)
    for shard in manifest.shard_paths(data_dir, split):
        for key, value in iter_shard(shard):
            yield key, Datum.decode(value)


def read_record_crcs(shard_path: Path) -> np.ndarray:
    path = Path(shard_path) / RECORD_CRC_FILE
    if not path.exists():
        raise ContractError(f"checksum file missing: {path}")
    return np.load(path, allow_pickle=False)


def write_record_crcs(shard_path: Path, crcs: np.ndarray) -> None:
    _atomic_write_npy(Path(shard_path) / RECORD_CRC_FILE, np.asarray(crcs, dtype=np.uint32))


def read_conversions(shard_path: Path) -> tuple[int, dict[str, int]]:
    """``(last position counted, conversions by kind)`` of a shard's committed records; ``(-1, {})`` when none."""
    path = Path(shard_path) / CONVERSIONS_FILE
    try:
        d = json.loads(path.read_text())
        return int(d["through_position"]), {str(k): int(v) for k, v in d["conversions"].items()}
    except FileNotFoundError:
        return -1, {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ContractError(f"cannot read {path} ({e}): " + REBUILD_HINT) from None


def write_conversions(shard_path: Path, through_position: int, conversions: dict[str, int]) -> None:
    atomic_write_json(
        Path(shard_path) / CONVERSIONS_FILE, {"through_position": through_position, "conversions": conversions}
    )

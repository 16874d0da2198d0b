"""Writers of test and benchmark inputs (not installed with the package): a whole split of LMDB
shards, ImageNet's archives of an extracted tree, and the stats of in-memory images.

``alexnet-prep build-lmdb`` and ``pca-stats`` are the real, resumable writers; these write the
same formats in a few lines, for fixtures. Benchmarks import this module with the repository's
``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.tools import archives as AR
from alexnet.tools.pca_stats import PixelMoments

# --------------------------------------------------------------------------- a split of LMDB shards


def write_split(
    data_dir: Path,
    split: str,
    records: list[tuple[str, bytes, int]],
    num_shards: int,
    seed: int | None = 0,
    *,
    map_size: int = 1 << 30,
) -> A.SplitInfo:
    """Write a whole split of already-encoded records ``(relpath, jpeg, label)`` in the contract's order.

    Positions follow ``shuffle_order(n, seed)`` (``seed=None``: the given order), shard ``i`` holds
    block ``i`` of ``shard_bounds``, with its ``crc32.npy``. Not resumable; ``alexnet-prep build-lmdb`` is the resumable, parallel writer of the same layout.
    """
    n = len(records)
    order = np.arange(n) if seed is None else A.shuffle_order(n, seed)
    shards = []
    for i, (start, stop) in enumerate(A.shard_bounds(n, num_shards)):
        rel = f"{split}/{A.shard_name(split, i, num_shards)}"
        env = A.open_shard(Path(data_dir) / rel, readonly=False, map_size=map_size)
        crcs = []
        with env.begin(write=True) as txn:
            for pos in range(start, stop):
                relpath, jpeg, label = records[int(order[pos])]
                value = A.Datum(data=jpeg, label=int(label), height=C.STORED_SIZE, width=C.STORED_SIZE).encode()
                txn.put(A.make_key(pos, relpath), value)
                crcs.append(A.crc32(value))
        env.close()
        A.write_record_crcs(Path(data_dir) / rel, np.array(crcs, dtype=np.uint32))
        shards.append(A.ShardInfo(path=rel, num_records=stop - start, first_position=start, stop_position=stop))
    return A.SplitInfo(num_records=n, source_count=n, shards=shards)


# --------------------------------------------------------------------------- ImageNet's archives of a tree


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tf.addfile(info, io.BytesIO(data))


def write_official_archives(tree: Path, out: Path) -> dict[str, Path]:
    """image-net.org's three archives of an extracted tree (train/<wnid>/, flat val/, the devkit folder)."""
    tree, out = Path(tree), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"train": out / AR.OFFICIAL_TRAIN, "val": out / AR.OFFICIAL_VAL, "devkit": out / AR.OFFICIAL_DEVKIT}
    gnu = tarfile.GNU_FORMAT  # as ImageNet's tars (no pax header before each member)
    with tarfile.open(files["train"], "w", format=gnu) as outer:
        for class_dir in sorted(p for p in (tree / "train").iterdir() if p.is_dir()):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=gnu) as inner:
                for f in sorted(class_dir.iterdir()):
                    inner.add(f, arcname=f.name)
            _add_bytes(outer, f"{class_dir.name}.tar", buf.getvalue())
    if (tree / "val").is_dir():
        with tarfile.open(files["val"], "w", format=gnu) as tf:
            for f in sorted((tree / "val").iterdir()):
                tf.add(f, arcname=f.name)
    if (tree / "ILSVRC2012_devkit_t12").is_dir():
        with tarfile.open(files["devkit"], "w:gz") as tf:
            tf.add(tree / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    return {role: f for role, f in files.items() if f.exists()}


def write_kaggle_zip(tree: Path, out: Path, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """Kaggle's zip of an extracted Kaggle tree (ILSVRC/Data/CLS-LOC/..., LOC_*.csv/txt at the root)."""
    tree, out = Path(tree), Path(out)
    with zipfile.ZipFile(out, "w", compression=compression) as zf:
        for f in sorted(p for p in tree.rglob("*") if p.is_file()):
            zf.write(f, arcname=f.relative_to(tree).as_posix())
    return out


# --------------------------------------------------------------------------- stats


def stats_of_images(images: np.ndarray, source: dict) -> tuple[A.Stats, np.ndarray]:
    """``(Stats, mean_image)`` of in-memory uint8 images ``[n, 256, 256, 3]`` (tests, synthetic datasets)."""
    moments = PixelMoments()
    moments.update(images)
    f = moments.finalize()
    return f.to_stats(source), f.mean_image

"""Writers of test and benchmark inputs (not installed with the package): a whole split of LMDB
shards, ImageNet's archives of an extracted tree (ILSVRC-2012's, Kaggle's, ILSVRC-2010's with its
patches and gzip-wrapped members), ILSVRC-2010's extracted tree made from the built-in sample, and
the stats of in-memory images.

``alexnet-prep build-lmdb`` and ``pca-stats`` are the real, resumable writers; these write the
same formats in a few lines, for fixtures. Benchmarks import this module with the repository's
``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.tools import archives as AR
from alexnet.tools.pca_stats import PixelMoments
from alexnet.tools.sample import DEVKIT_DIR, write_meta_mat

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


_GNU = tarfile.GNU_FORMAT  # as ImageNet's tars (no pax header before each member)


def _tar_of_class_tars(path: Path, train_dir: Path, swap: dict[str, bytes]) -> None:
    """A tar of per-class tars ``<wnid>.tar`` of ``train_dir/<wnid>/*``; a file named in ``swap`` gets those bytes."""
    with tarfile.open(path, "w", format=_GNU) as outer:
        for class_dir in sorted(p for p in train_dir.iterdir() if p.is_dir()):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=_GNU) as inner:
                for f in sorted(class_dir.iterdir()):
                    _add_bytes(inner, f.name, swap.get(f.name, f.read_bytes()))
            _add_bytes(outer, f"{class_dir.name}.tar", buf.getvalue())


def _flat_tar(path: Path, folder: Path, swap: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=_GNU) as tf:
        for f in sorted(folder.iterdir()):
            _add_bytes(tf, f.name, swap.get(f.name, f.read_bytes()))


def write_official_archives(tree: Path, out: Path) -> dict[str, Path]:
    """image-net.org's three archives of an extracted tree (train/<wnid>/, flat val/, the devkit folder)."""
    tree, out = Path(tree), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"train": out / AR.OFFICIAL_TRAIN, "val": out / AR.OFFICIAL_VAL, "devkit": out / AR.OFFICIAL_DEVKIT}
    _tar_of_class_tars(files["train"], tree / "train", {})
    if (tree / "val").is_dir():
        _flat_tar(files["val"], tree / "val", {})
    if (tree / "ILSVRC2012_devkit_t12").is_dir():
        with tarfile.open(files["devkit"], "w:gz") as tf:
            tf.add(tree / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    return {role: f for role, f in files.items() if f.exists()}


# --------------------------------------------------------------------------- ILSVRC-2010

# Files of the 2010 tree that are gzip-wrapped JPEGs (as a few of the release's members are, still so
# once extracted by hand) and files that are blank banners in the main tars, replaced by patch_images.tar.
GZIPPED_2010 = ("train/{w0}/{w0}_1.JPEG", "val/ILSVRC2010_val_00000002.JPEG", "test/ILSVRC2010_test_00000003.JPEG")
PATCHED_2010 = ("train/{w1}/{w1}_2.JPEG", "val/ILSVRC2010_val_00000005.JPEG", "test/ILSVRC2010_test_00000001.JPEG")
UNUSED_PATCH_2010 = "val/ILSVRC2010_val_00999999.JPEG"  # a replacement that matches no file: a warning


def write_2010_tree(sample: Path, out: Path) -> dict[str, list[str]]:
    """ILSVRC-2010's release as extracted (and patched) by hand, made from a ``make_sample(val_format="devkit")``
    tree: ``train/<wnid>/``, flat ``val/`` (the sample's val images) and ``test/`` (the same images in reverse
    order), ``devkit-1.0/data/{meta.mat, ILSVRC2010_validation_ground_truth.txt}`` with ILSVRC2010_IDs in an order
    that is not the sorted one, ``ILSVRC2010_test_ground_truth.txt``; a few files gzip-wrapped. No class-name file:
    names come from meta.mat's ``words``. Returns ``{"gzipped": [...], "patched": [...]}`` (paths under ``out``)."""
    sample, out = Path(sample), Path(out)
    shutil.copytree(sample / "train", out / "train")
    wnids = sorted(p.name for p in (out / "train").iterdir())
    ids = {w: int(k) + 1 for w, k in zip(wnids, np.roll(np.arange(len(wnids)), 1), strict=True)}
    (out / "val").mkdir()
    (out / "test").mkdir()
    val_ids = (sample / DEVKIT_DIR / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    id2012 = {i: w for w, i in _leaf_ids(sample / DEVKIT_DIR / "meta.mat").items()}
    wnid_of = [id2012[int(i)] for i in val_ids]
    n = len(wnid_of)
    for k in range(n):
        data = (sample / "val" / f"ILSVRC2012_val_{k + 1:08d}.JPEG").read_bytes()
        (out / "val" / f"ILSVRC2010_val_{k + 1:08d}.JPEG").write_bytes(data)
        (out / "test" / f"ILSVRC2010_test_{n - k:08d}.JPEG").write_bytes(data)
    data_dir = out / "devkit-1.0" / "data"
    data_dir.mkdir(parents=True)
    write_meta_mat(data_dir / "meta.mat", wnids, ids, id_field="ILSVRC2010_ID")
    (data_dir / "ILSVRC2010_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w in wnid_of))
    (out / "ILSVRC2010_test_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w in reversed(wnid_of)))
    names = {"w0": wnids[0], "w1": wnids[1 % len(wnids)]}
    gzipped = [p.format(**names) for p in GZIPPED_2010]
    for rel in gzipped:
        (out / rel).write_bytes(gzip.compress((out / rel).read_bytes(), mtime=0))
    return {"gzipped": gzipped, "patched": [p.format(**names) for p in PATCHED_2010]}


def _leaf_ids(meta: Path) -> dict[str, int]:
    from alexnet.tools.layouts import read_devkit_meta

    return {w: i for i, w in read_devkit_meta(meta).items()}


def banner_jpeg() -> bytes:
    """A blank "image not available" banner, as the main tars hold where patch_images.tar has the image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (500, 374), (240, 240, 240)).save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def write_2010_archives(tree: Path, out: Path, patched: list[str]) -> dict[str, Path]:
    """ILSVRC-2010's archives of a 2010 tree: the ``patched`` files (``<split>/.../<file>``) are banners in the
    main tars and the tree's bytes in ``patch_images.tar`` (``patch_images/<split>/<file>``), which also
    holds ``UNUSED_PATCH_2010``. A split the tree lacks (and its labels) is left out."""
    tree, out = Path(tree), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {role: out / name for role, name in AR.ILSVRC2010.items()}
    banner = {Path(p).name: banner_jpeg() for p in patched}
    _tar_of_class_tars(files["train"], tree / "train", banner)
    for split in ("val", "test"):
        if (tree / split).is_dir():
            _flat_tar(files[split], tree / split, banner)
    if (tree / "devkit-1.0").is_dir():
        with tarfile.open(files["devkit"], "w:gz") as tf:
            tf.add(tree / "devkit-1.0", arcname="devkit-1.0")
    if (tree / "ILSVRC2010_test_ground_truth.txt").is_file():
        shutil.copy(tree / "ILSVRC2010_test_ground_truth.txt", files["test_labels"])
    with tarfile.open(files["patch"], "w", format=_GNU) as tf:
        for rel in patched:
            _add_bytes(tf, f"patch_images/{rel.split('/')[0]}/{Path(rel).name}", (tree / rel).read_bytes())
        _add_bytes(tf, f"patch_images/{UNUSED_PATCH_2010}", banner_jpeg())
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


# --------------------------------------------------------------------------- ImageNetV2


def write_imagenetv2(sample: Path, out: Path, classes: list[str], variant: str = "matched-frequency") -> Path:
    """An ImageNetV2 download made from a ``make_sample(val_format="folders")`` tree: the val images of
    ``classes`` (real ILSVRC-2012 wnids) as ``imagenetv2-<variant>-format-val/<i>/<sha1>.jpeg``, ``<i>`` the
    wnid's index among the sorted 1000, extracted under ``out`` and as ``out/imagenetv2-<variant>.tar.gz``
    (which is returned)."""
    import hashlib

    from alexnet.tools.imagenetv2 import ilsvrc2012_classes

    index = {w: i for i, (w, _) in enumerate(ilsvrc2012_classes())}
    folder = Path(out) / f"imagenetv2-{variant}-format-val"
    for wnid in classes:
        (folder / str(index[wnid])).mkdir(parents=True)
        for f in sorted((Path(sample) / "val" / wnid).iterdir()):
            data = f.read_bytes()
            (folder / str(index[wnid]) / f"{hashlib.sha1(data).hexdigest()}.jpeg").write_bytes(data)
    path = Path(out) / f"imagenetv2-{variant}.tar.gz"
    with tarfile.open(path, "w:gz", format=_GNU) as tf:
        tf.add(folder, arcname=folder.name)
    return path

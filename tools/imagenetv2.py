"""ImageNetV2 (Recht et al., 2019), the usual held-out test set of ILSVRC-2012 models, read as downloaded.

Each variant is downloaded as ``imagenetv2-<variant>.tar.gz`` holding ``<...>-format-val/<i>/<hash>.jpeg``,
``<i>`` being the class's index among the 1000 ILSVRC-2012 wnids in sorted order. The package ships that
list with the classes' names (``ilsvrc2012_classes.txt``, its source in its header). SRC is the tar.gz
(read in place: one pass lists it, each worker reads its shard's members in one more pass, since a
gzip stream cannot be read at an offset), its extracted ``*-format-val`` folder, or a folder holding
exactly one of either. The dataset has a test split only, labelled by wnid; its classes are the ones
present (a subset of ILSVRC-2012's), so ``alexnet-train eval --split test`` maps them onto a 2012
model's outputs. The relative path of an image is ``<i>/<hash>.jpeg`` either way, so the tar.gz and
its folder give the same dataset.
"""

from __future__ import annotations

import fnmatch
import functools
import tarfile
import zlib
from pathlib import Path

import numpy as np

from alexnet.pipeline.errors import AlexnetError
from alexnet.tools import archives as AR
from alexnet.tools import layouts as L

ARCHIVE_PATTERN = "imagenetv2-*.tar.gz"
FOLDER_SUFFIX = "-format-val"
CLASS_LIST = Path(__file__).with_name("ilsvrc2012_classes.txt")
NUM_CLASSES = 1000
LAYOUT = "imagenetv2"


@functools.lru_cache(maxsize=1)
def ilsvrc2012_classes() -> tuple[tuple[str, str], ...]:
    """The 1000 ILSVRC-2012 classes as ``(wnid, words)``, sorted by wnid (the shipped list)."""
    rows = [line.split(" ", 1) for line in CLASS_LIST.read_text().splitlines() if line and not line.startswith("#")]
    return tuple((wnid, words) for wnid, words in rows)


def find(src: Path) -> tuple[str, Path] | None:
    """``("archive", tar.gz)`` or ``("folder", its *-format-val folder)`` when SRC is ImageNetV2; else None."""
    src = Path(src)
    if src.is_file():
        return ("archive", src) if fnmatch.fnmatch(src.name, ARCHIVE_PATTERN) else None
    if not src.is_dir():
        return None
    if src.name.endswith(FOLDER_SUFFIX):
        return "folder", src
    if any((src / d).is_dir() for d in ("train", "val", "test", "ILSVRC")):
        return None
    folders = sorted(p for p in src.glob(f"*{FOLDER_SUFFIX}") if p.is_dir())
    found = folders or sorted(p for p in src.glob(ARCHIVE_PATTERN) if p.is_file())
    if len(found) > 1:
        raise AlexnetError(
            f"{src} holds {len(found)} ImageNetV2 variants ({', '.join(p.name for p in found)}); give one as SRC"
        )
    return ("folder" if found[0].is_dir() else "archive", found[0]) if found else None


def _wnid(index: str, where) -> str:
    if not index.isdigit() or int(index) >= NUM_CLASSES:
        raise AlexnetError(
            f"{where}: class folder {index!r} is not an index 0..{NUM_CLASSES - 1} of the sorted ILSVRC-2012 classes"
        )
    return ilsvrc2012_classes()[int(index)][0]


def _folder_split(folder: Path) -> L.SplitSource:
    rel, indices = L._scan_class_folders(folder)
    if not rel:
        raise AlexnetError(f"{folder} holds no images in class folders (<i>/<hash>.jpeg)")
    wnids = tuple(_wnid(i, folder / i) for i in indices)
    return L.SplitSource("test", folder, LAYOUT, tuple(rel), wnids, label_file=str(CLASS_LIST))


def _archive_split(path: Path) -> L.SplitSource:
    """The test split of a ``.tar.gz``: each member's data offset in the decompressed tar."""
    items = []
    try:
        with tarfile.open(path, "r:gz") as tf:
            for ti in tf:
                parts = ti.name.split("/")
                if ti.isreg() and len(parts) >= 3 and parts[-3].endswith(FOLDER_SUFFIX) and L.is_image(parts[-1]):
                    rel = f"{parts[-2]}/{parts[-1]}"
                    items.append(
                        (rel, _wnid(parts[-2], f"{path}: {ti.name}"), (0, AR.GZ_TAR, ti.offset_data, ti.size, 0))
                    )
                tf.members = []
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise AlexnetError(f"{path}: not a readable tar.gz ({e}); {AR._BROKEN}") from None
    if not items:
        raise AlexnetError(f"{path} holds no <...>{FOLDER_SUFFIX}/<i>/<file> images: is it an ImageNetV2 download?")
    items.sort(key=lambda t: t[0])
    rel, wnids, locs = zip(*items, strict=True)
    return L.SplitSource(
        "test",
        path,
        LAYOUT,
        rel,
        wnids,
        label_file=str(CLASS_LIST),
        archives=(str(path),),
        locations=np.array(list(locs), dtype=AR.LOCATION),
    )


def detect(found: tuple[str, Path], splits: tuple[str, ...]) -> L.DatasetSource:
    """The dataset of an ImageNetV2 download: its test split, its classes (those present) and their names."""
    from dataclasses import replace

    kind, path = found
    if "test" not in splits:
        raise AlexnetError(f"{path} is ImageNetV2, a test set only: build it with --splits test")
    split = _folder_split(path) if kind == "folder" else _archive_split(path)
    source = L.finish_source(path, {"test": split}, False, [])
    names = dict(ilsvrc2012_classes())
    return replace(source, class_names=tuple(names[w] for w in source.classes))

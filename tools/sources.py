"""What ``build-lmdb``'s SRC is: ImageNet's archives (``archives.py``), an ImageNetV2 download
(``imagenetv2.py``: its tar.gz or folder) or an extracted tree (``layouts.py``).

Either way the result is the same :class:`~alexnet.tools.layouts.DatasetSource`: the splits, their
files in sorted order and their labels. ``archives.py`` builds on ``layouts.py`` (its splits are
the ones the archives extract to); this module chooses between them, so neither imports the other
back.
"""

from __future__ import annotations

from pathlib import Path

from alexnet.tools import archives, imagenetv2
from alexnet.tools import layouts as L


def detect_source(
    src: Path,
    *,
    splits: tuple[str, ...] = ("train", "val", "test"),
    val_layout: str = "auto",
    val_labels: Path | None = None,
    allow_missing_classes: bool = False,
    progress: bool = False,
) -> L.DatasetSource:
    """Find the splits under ``src`` (a tree, or ImageNet's archives), list their files (sorted) and label them."""
    src = Path(src)
    v2 = imagenetv2.find(src)
    if v2 is not None:
        return imagenetv2.detect(v2, splits)
    found_archives = archives.find_archives(src)
    if found_archives is not None:
        return archives.detect_archive_source(
            found_archives,
            splits=splits,
            val_layout=val_layout,
            val_labels=val_labels,
            allow_missing_classes=allow_missing_classes,
            progress=progress,
        )
    notes: list[str] = []
    found = L.tree_splits(src, splits, val_layout, val_labels, notes)
    if not found:
        names = [n for roles in archives.RELEASES.values() for n in roles.values() if n.endswith(".tar")]
        notes.append(f"nor ImageNet's archives ({', '.join(names)}, {archives.KAGGLE_ZIP})")
    return L.finish_source(src, found, allow_missing_classes, notes)

"""Find the splits of an ImageNet-layout source tree and the label of every file.

Train: class folders ``<split dir>/<wnid>/*.JPEG``, with the split directory either
``SRC/train`` or the Kaggle copy's ``SRC/ILSVRC/Data/CLS-LOC/train``.

Validation (``SRC/val`` or ``SRC/ILSVRC/Data/CLS-LOC/val``) and test (``SRC/test``: ILSVRC-2010's,
the only year whose test labels are public), one of ``VAL_LAYOUTS``:

- ``class-folders``: ``val/<wnid>/*.JPEG`` (after the usual "valprep" step);
- ``kaggle-csv``: flat ``ILSVRC2012_val_*.JPEG`` + ``LOC_val_solution.csv``
  (``ImageId,PredictionString``; the first token of PredictionString is the wnid);
- ``devkit``: flat files + the devkit's ``ILSVRC2012_validation_ground_truth.txt``
  (line i = ILSVRC2012_ID of ``ILSVRC2012_val_{i:08d}.JPEG``) and ``meta.mat``, which maps
  ILSVRC2012_IDs to wnids. The ID order is *not* the sorted-wnid order (ID 490 is
  n01751748, label 65): labels always come from the wnid, never from the ID. ILSVRC-2010's
  devkit (``devkit-1.0/data``) is the same with ``ILSVRC2010_ID``s, its
  ``ILSVRC2010_validation_ground_truth.txt`` and, for test, ``ILSVRC2010_test_ground_truth.txt``;
- ``list``: flat files + a text file of ``<path relative to val/> <wnid or label>`` lines
  (``val_list.txt``, or Caffe's ``val.txt`` with integer labels in sorted-wnid order).

Labels are the index of the wnid in the sorted list of the dataset's wnids, the same in
every split (the contract). A class that appears in one split and not in another is an
error unless ``allow_missing_classes``.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from alexnet.pipeline.errors import AlexnetError
from alexnet.pipeline.images import IMAGE_SUFFIXES

VAL_LAYOUTS = ("class-folders", "kaggle-csv", "devkit", "list")
TRAIN_CANDIDATES = ("train", "ILSVRC/Data/CLS-LOC/train")
VAL_CANDIDATES = ("val", "ILSVRC/Data/CLS-LOC/val")
TEST_CANDIDATES = ("test",)
KAGGLE_CSV = "LOC_val_solution.csv"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
# The ground truths of the flat splits, by split: ILSVRC-2012's devkit, ILSVRC-2010's devkit and its test file.
GROUND_TRUTHS = {
    "val": (DEVKIT_GROUND_TRUTH, "ILSVRC2010_validation_ground_truth.txt"),
    "test": ("ILSVRC2010_test_ground_truth.txt",),
}
DEVKIT_META = "meta.mat"
DEVKIT_DIRS = ("ILSVRC2012_devkit_t12/data", "ILSVRC2012_devkit_t12", "devkit-1.0/data", "devkit/data")
LIST_FILES = ("val_list.txt", "val.txt", "val_labels.txt")
TEST_LIST_FILES = ("test_list.txt",)
_VAL_NUMBER = re.compile(r"ILSVRC20\d\d_(?:val|test)_(\d+)")


@dataclass(frozen=True)
class SplitSource:
    name: str  # "train", "val" or "test"
    root: Path  # the split's directory; relpaths are relative to it
    layout: str  # "class-folders", "kaggle-csv", "devkit" or "list"
    relpaths: tuple[str, ...]  # sorted, POSIX separators
    wnids: tuple[str, ...]  # parallel to relpaths
    label_file: str = ""  # where the labels came from (flat val layouts)
    # Read from archives (tools/archives.py): the archives, and each file's place in them (parallel
    # to relpaths, dtype archives.LOCATION); None for a tree, whose files are ``root / relpath``.
    archives: tuple[str, ...] = ()
    locations: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.relpaths)

    def labels(self, classes: list[str]) -> np.ndarray:
        index = {w: i for i, w in enumerate(classes)}
        return np.fromiter((index[w] for w in self.wnids), dtype=np.int32, count=len(self.wnids))

    def digest(self) -> str:
        """A fingerprint of the file list and labels: a resumed build must see the same source."""
        h = hashlib.sha1()
        for rel, w in zip(self.relpaths, self.wnids, strict=True):
            h.update(f"{rel}\t{w}\n".encode())
        return h.hexdigest()


@dataclass(frozen=True)
class DatasetSource:
    root: Path
    classes: list[str]  # sorted wnids: label order
    splits: dict[str, SplitSource]
    notes: tuple[str, ...] = ()  # things worth telling the user (a split not found, labels without files)
    class_names: tuple[str, ...] | None = None  # None: read_class_names(root) (archives bring their own)


# Files that name the classes ("<wnid> <name>" per line), looked for at the source root.
CLASS_NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "synsets.txt")


def read_class_names(src: Path, classes: list[str]) -> list[str]:
    """Readable names aligned with ``classes`` from the first of ``CLASS_NAME_FILES`` at ``src``, else
    the ``words`` of the devkit's ``meta.mat`` under it; [] when there is none (a class not named gets its wnid)."""
    for name in CLASS_NAME_FILES:
        path = Path(src) / name
        if path.is_file():
            return parse_class_names(path.read_text(errors="replace"), classes)
    for folder in DEVKIT_DIRS:
        if (Path(src) / folder / DEVKIT_META).is_file():
            return devkit_class_names(read_devkit_synsets(Path(src) / folder / DEVKIT_META), classes)
    return []


def devkit_class_names(synsets: dict[int, tuple[str, str]], classes: list[str]) -> list[str]:
    """Names aligned with ``classes`` from a devkit's leaf synsets (ID -> (wnid, words))."""
    return parse_class_names("\n".join(f"{w} {words}" for w, words in synsets.values()), classes)


def parse_class_names(text: str, classes: list[str]) -> list[str]:
    """Names aligned with ``classes`` from ``<wnid> <name>`` lines (a class not named gets its wnid)."""
    names = {}
    for line in text.splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            names[wnid] = name.strip() or wnid
    return [names.get(w, w) for w in classes]


def is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _scan_class_folders(split_dir: Path) -> tuple[list[str], list[str]]:
    """``(relpaths, wnids)`` of ``split_dir/<class>/<image>``, sorted by relpath."""
    items: list[tuple[str, str]] = []
    with os.scandir(split_dir) as it:
        class_dirs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    for wnid in class_dirs:
        items += [(f"{wnid}/{name}", wnid) for name in _flat_images(split_dir / wnid)[0]]
    items.sort()
    return [r for r, _ in items], [w for _, w in items]


def _flat_images(split_dir: Path) -> tuple[list[str], bool]:
    """The image files directly in ``split_dir`` (sorted), and whether it has class folders."""
    with os.scandir(split_dir) as it:
        entries = list(it)
    has_dirs = any(e.is_dir() and not e.name.startswith(".") for e in entries)
    return sorted(e.name for e in entries if is_image(e.name) and e.is_file()), has_dirs


def _find_file(src: Path, split_dir: Path, names: tuple[str, ...]) -> Path | None:
    """Look for a label file where the distributions put it: SRC, the devkit's data folder, near val/."""
    dirs = [src, *(src / d for d in DEVKIT_DIRS)]
    # val/ and each of its parents up to SRC (the Kaggle tree nests val/ deep)
    dirs += [split_dir, *(d for d in split_dir.parents if d.is_relative_to(src))]
    for directory in dirs:
        for name in names:
            if (directory / name).is_file():
                return directory / name
    return None


def _number(name: str) -> int:
    m = _VAL_NUMBER.search(name)
    if not m:
        raise AlexnetError(
            f"file {name!r} does not follow ILSVRC20XX_val_%08d.JPEG or ILSVRC2010_test_%08d.JPEG; "
            "cannot match it to the ground truth's lines"
        )
    return int(m.group(1))


def read_kaggle_csv(f, path) -> dict[str, str]:
    """``ImageId`` (file stem) -> wnid (first token of ``PredictionString``), from the text stream ``f``."""
    out: dict[str, str] = {}
    reader = csv.reader(f)
    header = next(reader, None)
    if not header or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
        raise AlexnetError(f"{path}: expected the header 'ImageId,PredictionString', found {header}")
    for lineno, row in enumerate(reader, start=2):
        if not row:
            continue
        tokens = row[1].split() if len(row) > 1 else []
        if not tokens:
            raise AlexnetError(f"{path}:{lineno}: no wnid in PredictionString")
        out[row[0].strip()] = tokens[0]
    return out


def read_devkit_synsets(path, where=None) -> dict[int, tuple[str, str]]:
    """ID -> (wnid, words) of the leaf synsets (the classes) of a devkit's ``meta.mat`` (a path or a
    binary stream): ILSVRC-2012's ``ILSVRC2012_ID`` or ILSVRC-2010's ``ILSVRC2010_ID``."""
    from scipy.io import loadmat

    where = where or path
    try:
        synsets = loadmat(path if hasattr(path, "read") else str(path), squeeze_me=True)["synsets"]
        names = synsets.dtype.names or ()
        id_field = next((f for f in ("ILSVRC2012_ID", "ILSVRC2010_ID") if f in names), "ILSVRC2012_ID")
        ids = np.atleast_1d(synsets[id_field])
        wnids = np.atleast_1d(synsets["WNID"])
        words = np.atleast_1d(synsets["words"]) if "words" in names else wnids
        children = np.atleast_1d(synsets["num_children"])
    except (KeyError, ValueError, OSError, TypeError) as e:
        raise AlexnetError(f"{where} is not a devkit meta.mat with a 'synsets' table: {e}") from None
    # Leaves (num_children == 0) are the 1000 classes; the internal WordNet nodes follow them.
    return {
        int(i): (str(w), str(t).strip() or str(w))
        for i, w, t, c in zip(ids, wnids, words, children, strict=True)
        if int(c) == 0
    }


def read_devkit_meta(path, where=None) -> dict[int, str]:
    """ID -> wnid of the leaf synsets of the devkit's ``meta.mat`` (see ``read_devkit_synsets``)."""
    return {i: w for i, (w, _) in read_devkit_synsets(path, where).items()}


def devkit_table(ground_truth: str, id_to_wnid: dict[int, str], gt_path, meta_path) -> dict[int, str]:
    """Validation file number -> wnid, through the devkit's ID order (not the sorted order)."""
    out: dict[int, str] = {}
    for number, line in enumerate(ground_truth.split(), start=1):
        try:
            ilsvrc_id = int(line)
        except ValueError:
            raise AlexnetError(f"{gt_path}:{number}: {line!r} is not a class ID") from None
        if ilsvrc_id not in id_to_wnid:
            raise AlexnetError(f"{gt_path}:{number}: ID {ilsvrc_id} is not a class in {meta_path}")
        out[number] = id_to_wnid[ilsvrc_id]
    return out


def _read_list(path: Path) -> dict[str, str]:
    """``relpath -> wnid-or-integer-label`` (as text; integers are resolved against the classes later)."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise AlexnetError(f"{path}:{lineno}: expected '<relative path> <wnid or label>', found {line!r}")
        out[Path(parts[0]).as_posix()] = parts[1]
    return out


def _layout_of_label_file(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".csv"):
        return "kaggle-csv"
    if "ground_truth" in name:
        return "devkit"
    return "list"


def _label_files(split: str) -> dict[str, tuple[str, ...]]:
    """The label files each flat layout is given by, for a split (Kaggle's CSV labels val only)."""
    if split == "test":
        return {"devkit": GROUND_TRUTHS["test"], "list": TEST_LIST_FILES}
    return {"kaggle-csv": (KAGGLE_CSV,), "devkit": GROUND_TRUTHS["val"], "list": LIST_FILES}


def _find_label_file(src: Path, split_dir: Path, layout: str, num_images: int, split: str = "val") -> tuple[str, Path]:
    """The first label file of ``layout`` (or, for "auto", of any flat layout) where the distributions put it."""
    wanted = _label_files(split)
    for candidate in [layout] if layout != "auto" else list(wanted):
        label_file = _find_file(src, split_dir, wanted.get(candidate, ()))
        if label_file is not None:
            return candidate, label_file
    looked = [f"{' / '.join(v)}{' + ' + DEVKIT_META if k == 'devkit' else ''}" for k, v in wanted.items()]
    raise AlexnetError(
        f"{split_dir} holds {num_images} images without class folders and no label file was found "
        f"(looked for {', or '.join(looked)} in SRC, its devkit folder and beside {split}/)"
        + ("; pass --val-labels FILE" if split == "val" else "")
    )


def _label_table(src: Path, split_dir: Path, layout: str, label_file: Path, names: list[str]) -> tuple[dict, list]:
    """``(label table, each file's key into it)`` from a flat layout's label file."""
    if layout == "kaggle-csv":
        with open(label_file, newline="") as f:
            return read_kaggle_csv(f, label_file), label_keys(layout, names)
    if layout == "devkit":
        meta = label_file.parent / DEVKIT_META
        if not meta.is_file():
            meta = _find_file(src, split_dir, (DEVKIT_META,))
        if meta is None:
            raise AlexnetError(
                f"{label_file} needs the devkit's {DEVKIT_META} beside it to map ILSVRC2012_IDs to wnids"
            )
        table = devkit_table(label_file.read_text(), read_devkit_meta(meta), label_file, meta)
        return table, label_keys(layout, names)
    return _read_list(label_file), names


def label_keys(layout: str, names: list[str]) -> list:
    """Each flat validation file's key into its layout's label table."""
    if layout == "kaggle-csv":
        return [Path(n).stem for n in names]
    if layout == "devkit":
        return [_number(n) for n in names]
    return names


def _flat_split(
    name: str, src: Path, split_dir: Path, layout: str, label_file: Path | None, files: list[str], notes: list[str]
) -> SplitSource:
    """A flat validation or test folder, labelled from its label file (found when not given)."""
    if label_file is None:
        layout, label_file = _find_label_file(src, split_dir, layout, len(files), name)
    elif layout == "auto":
        layout = _layout_of_label_file(label_file)
    if not label_file.is_file():
        raise AlexnetError(f"label file not found: {label_file}")
    table, keys = _label_table(src, split_dir, layout, label_file, files)
    return SplitSource(
        name,
        split_dir,
        layout,
        tuple(files),
        labelled(table, keys, files, label_file, split_dir, notes),
        str(label_file),
    )


def labelled(table: dict, keys: list, names: list[str], label_file, split_dir, notes: list[str]) -> tuple[str, ...]:
    """The wnid of each flat validation or test file; every file must have one."""
    missing = [n for n, k in zip(names, keys, strict=True) if k not in table]
    if missing:
        raise AlexnetError(
            f"{len(missing)} files have no label in {label_file} (first: {missing[0]}); "
            "is it the label file of this copy?"
        )
    if len(table) > len(names):
        notes.append(f"{Path(str(label_file)).name} labels {len(table)} files, {len(names)} are present in {split_dir}")
    return tuple(table[k] for k in keys)


def _split_dir(name: str, src: Path, candidates: tuple[str, ...], notes: list[str]) -> Path | None:
    for rel in candidates:
        if (src / rel).is_dir():
            return src / rel
    notes.append(f"no {name} split (looked for {' and '.join(candidates)} under {src})")
    return None


def _class_folder_split(name: str, split_dir: Path) -> SplitSource:
    rel, wn = _scan_class_folders(split_dir)
    if not rel:
        raise AlexnetError(f"{split_dir} holds no images in class folders (<wnid>/*.JPEG)")
    return SplitSource(name, split_dir, "class-folders", tuple(rel), tuple(wn))


def _labelled_split(
    name: str, src: Path, split_dir: Path, layout: str, label_file: Path | None, notes: list[str]
) -> SplitSource:
    """Class folders (when forced, or found and no flat images) or flat images with a label file."""
    flat, has_class_dirs = _flat_images(split_dir)
    if layout == "class-folders" or (layout == "auto" and not flat and has_class_dirs):
        return _class_folder_split(name, split_dir)
    if not flat:
        raise AlexnetError(f"{split_dir} holds no images")
    return _flat_split(name, src, split_dir, layout, label_file, flat, notes)


def _resolve_integer_labels(found: dict[str, SplitSource]) -> dict[str, SplitSource]:
    """Integer labels (Caffe's val.txt) as wnids: they index the sorted wnids of the class-folder splits."""
    folder_classes = sorted(
        {w for s in found.values() if s.layout == "class-folders" for w in s.wnids if not w.isdigit()}
    )
    out = {}
    for name, split in found.items():
        if any(w.isdigit() for w in split.wnids):
            if not folder_classes:
                raise AlexnetError(
                    f"{split.label_file} gives integer labels but there is no class-folder split to name the classes"
                )
            for r, w in zip(split.relpaths, split.wnids, strict=True):
                if w.isdigit() and int(w) >= len(folder_classes):
                    raise AlexnetError(f"{split.label_file}: label {w} of {r} is outside 0..{len(folder_classes) - 1}")
            wnids = tuple(folder_classes[int(w)] if w.isdigit() else w for w in split.wnids)
            split = replace(split, wnids=wnids)
        out[name] = split
    return out


def _check_every_class_present(splits: dict[str, SplitSource], classes: list[str], allow: bool, notes: list[str]):
    for name, s in splits.items():
        absent = sorted(set(classes) - set(s.wnids))
        if absent:
            msg = f"{len(absent)} of {len(classes)} classes have no {name} images (first: {', '.join(absent[:5])})"
            if not allow:
                raise AlexnetError(msg + "; pass --allow-missing-classes to build anyway")
            notes.append(msg)


def tree_splits(
    src: Path, splits: tuple[str, ...], val_layout: str, val_labels: Path | None, notes: list[str]
) -> dict[str, SplitSource]:
    """The splits of the extracted tree ``src`` (each file listed, sorted, and labelled); {} when there is none."""
    if not src.is_dir():
        raise AlexnetError(f"source {src} is not a directory")
    found: dict[str, SplitSource] = {}
    if "train" in splits and (train_dir := _split_dir("train", src, TRAIN_CANDIDATES, notes)):
        found["train"] = _class_folder_split("train", train_dir)
    if "val" in splits and (val_dir := _split_dir("val", src, VAL_CANDIDATES, notes)):
        found["val"] = _labelled_split("val", src, val_dir, val_layout, val_labels, notes)
    # A test set is optional (only ILSVRC-2010's is labelled): its absence is news only when it alone is asked for.
    test_notes = notes if tuple(splits) == ("test",) else []
    if "test" in splits and (test_dir := _split_dir("test", src, TEST_CANDIDATES, test_notes)):
        found["test"] = _labelled_split("test", src, test_dir, "auto", None, notes)
    return found


def finish_source(
    src: Path, found: dict[str, SplitSource], allow_missing_classes: bool, notes: list[str]
) -> DatasetSource:
    """The classes of the splits found (sorted wnids), checked present in every split."""
    if not found:
        raise AlexnetError(f"no ImageNet splits under {src}: " + "; ".join(notes))
    found = _resolve_integer_labels(found)
    classes = sorted({w for s in found.values() for w in s.wnids})
    if len(found) > 1:
        _check_every_class_present(found, classes, allow_missing_classes, notes)
    return DatasetSource(root=src, classes=classes, splits=found, notes=tuple(notes))

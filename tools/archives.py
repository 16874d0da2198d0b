"""ImageNet read straight from the archives users download, without extracting them.

Sources (``find_archives``):

- image-net.org: ``ILSVRC2012_img_train.tar`` (a tar of 1,000 per-class tars ``<wnid>.tar``),
  ``ILSVRC2012_img_val.tar`` (50,000 flat files) and ``ILSVRC2012_devkit_t12.tar.gz`` (``meta.mat`` and
  the validation ground truth, in ILSVRC2012_ID order); SRC is their folder or one of them;
- image-net.org's ILSVRC-2010 release (the paper's Table 1): ``ILSVRC2010_images_train.tar`` (per-class
  tars, as 2012's), ``ILSVRC2010_images_{val,test}.tar`` (flat), ``ILSVRC2010_devkit-1.0.tar.gz``
  (``meta.mat`` with ``ILSVRC2010_ID``s and the validation ground truth), the separately released
  ``ILSVRC2010_test_ground_truth.txt``, and ``patch_images.tar``, whose ``train/``, ``val/`` and
  ``test/`` folders replace, by file name, members that are blank banners in the main tars (a
  replacement that matches no file of a split that is built is a warning);
- Kaggle: ``imagenet-object-localization-challenge.zip`` (``ILSVRC/Data/CLS-LOC/{train/<wnid>,val}/``,
  ``LOC_val_solution.csv``, ``LOC_synset_mapping.txt``); SRC is the zip or its folder.

One pass over the headers (the outer tar's, then each inner tar's at its offset, in threads; a
zip's central directory) gives every member's (archive, offset, size). The split is the one an
extracted tree gives (same relative paths, sorted; same labels), so the dataset is the same; the
workers read each member with one ``pread`` at its offset (a zip member: its local header, then
its data, inflated and CRC-checked when deflated). A structure that does not hold (a member past
the end of the file, an inner tar whose headers break off, a zip entry whose data cannot be read)
stops with one line naming the archive and the member; a member that is read but does not
decode is rejected like the same file in a tree.
"""

from __future__ import annotations

import gzip
import io
import os
import posixpath
import struct
import sys
import tarfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alexnet.pipeline.errors import AlexnetError
from alexnet.tools import layouts as L

OFFICIAL_TRAIN = "ILSVRC2012_img_train.tar"
OFFICIAL_VAL = "ILSVRC2012_img_val.tar"
OFFICIAL_DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
OFFICIAL = {"train": OFFICIAL_TRAIN, "val": OFFICIAL_VAL, "devkit": OFFICIAL_DEVKIT}
ILSVRC2010 = {
    "train": "ILSVRC2010_images_train.tar",
    "val": "ILSVRC2010_images_val.tar",
    "test": "ILSVRC2010_images_test.tar",
    "devkit": "ILSVRC2010_devkit-1.0.tar.gz",
    "test_labels": "ILSVRC2010_test_ground_truth.txt",
    "patch": "patch_images.tar",
}
RELEASES = {"official": OFFICIAL, "ilsvrc2010": ILSVRC2010}  # kind -> role -> file name
# The archives a member's location points into, by index (LOCATION's "archive").
ARCHIVE_ROLES = ("train", "val", "test", "patch")
KAGGLE_ZIP = "imagenet-object-localization-challenge.zip"
KAGGLE_DATA = "ILSVRC/Data/CLS-LOC/"
# Where a member's bytes are: tar members at their data offset; zip members at their local header; members
# of a gzip-compressed tar (ImageNetV2's) at their data offset in the decompressed stream.
TAR, ZIP_STORED, ZIP_DEFLATED, GZ_TAR = 0, 1, 2, 3
LOCATION = np.dtype([("archive", "u2"), ("kind", "u1"), ("offset", "u8"), ("size", "u8"), ("crc", "u4")])
INDEX_THREADS = 16  # inner tars whose headers are read at once (I/O bound: pread releases the GIL)
_BROKEN = "the archive is damaged or incomplete: download it again (what is built so far is kept)"


@dataclass(frozen=True)
class Archives:
    kind: str  # "official" (ILSVRC-2012), "ilsvrc2010" or "kaggle"
    folder: Path  # where the archives are (label and class-name files beside them are found there)
    files: dict[str, Path]  # role ("train", "val", "test", "devkit", "test_labels", "patch", "zip") -> file


def _release_files(folder: Path) -> list[Archives]:
    """The releases of which ``folder`` holds a split's archive."""
    out = []
    for kind, roles in RELEASES.items():
        files = {role: folder / name for role, name in roles.items() if (folder / name).is_file()}
        if any(role in files for role in ("train", "val", "test")):
            out.append(Archives(kind, folder, files))
    return out


def find_archives(src: Path) -> Archives | None:
    """The archives SRC names or holds; None for an extracted tree (or anything else: the tree code says what)."""
    src = Path(src)
    if src.is_file():
        folder = src.parent
        if src.suffix.lower() == ".zip":
            return Archives("kaggle", folder, {"zip": src})
    elif src.is_dir() and not any((src / d).is_dir() for d in ("train", "val", "test", "ILSVRC")):
        folder = src
        if (src / KAGGLE_ZIP).is_file():
            return Archives("kaggle", folder, {"zip": src / KAGGLE_ZIP})
    else:
        return None
    found = [a for a in _release_files(folder) if not src.is_file() or src in a.files.values()]
    if src.is_file() and not found:
        names = [n for roles in RELEASES.values() for n in roles.values()]
        raise AlexnetError(f"{src} is not one of ImageNet's archives ({', '.join(names)}, {KAGGLE_ZIP})")
    if len(found) > 1:
        raise AlexnetError(
            f"{folder} holds both ILSVRC-2012's and ILSVRC-2010's archives; give one of them as SRC "
            "(the others of its release are found beside it)"
        )
    return found[0] if found else None


# --------------------------------------------------------------------------- tar headers


class _Window(io.RawIOBase):
    """Bytes [start, start + size) of an open file, read with pread (threads share the descriptor)."""

    def __init__(self, fd: int, start: int, size: int):
        self.fd, self.start, self.size, self.pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else max(0, min(n, self.size - self.pos))
        data = os.pread(self.fd, n, self.start + self.pos)
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset + (self.pos if whence == 1 else self.size if whence == 2 else 0)
        return self.pos

    def tell(self) -> int:
        return self.pos


def tar_members(fd: int, start: int, size: int, where: str) -> list[tuple[str, int, int]]:
    """``(name, data offset in the file, size)`` of the regular members of the tar at ``[start, start + size)``.

    tarfile ends its listing quietly at a header it cannot parse, so the listing is complete only
    when what follows the last member is the end-of-archive padding (zeros): anything else is a
    broken tar. A member whose data runs past the end is a tar cut short.
    """
    window = _Window(fd, start, size)
    out = []
    try:
        with tarfile.open(fileobj=window, mode="r:") as tf:
            for ti in tf:
                if ti.offset_data + ti.size > size:
                    raise AlexnetError(
                        f"{where}: member {ti.name} is cut short ({ti.size} bytes declared, "
                        f"{max(0, size - ti.offset_data)} present); {_BROKEN}"
                    )
                if ti.isreg():
                    out.append((ti.name, start + ti.offset_data, ti.size))
                tf.members = []  # the listing is ours; tarfile need not keep it
            end = tf.offset
    except tarfile.TarError as e:
        raise AlexnetError(f"{where}: not a readable tar ({e}); {_BROKEN}") from None
    window.seek(end)
    while tail := window.read(1 << 20):
        if tail.count(0) != len(tail):
            after = out[-1][0] if out else "its start"
            raise AlexnetError(f"{where}: the tar breaks off after {after} (a damaged header at byte {end}); {_BROKEN}")
    return out


def _member_name(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def _index_train_tar(path: Path, progress: bool) -> list[tuple[str, str, tuple]]:  # archive index 0
    """``(relpath, wnid, location)`` of the images in the per-class tars of the train tar."""
    from tqdm import tqdm

    fd = os.open(path, os.O_RDONLY)
    try:
        inner = [(m, off, n) for m, off, n in tar_members(fd, 0, os.fstat(fd).st_size, str(path)) if m.endswith(".tar")]

        def one(member):
            name, off, n = member
            wnid = posixpath.basename(_member_name(name))[: -len(".tar")]
            found = tar_members(fd, off, n, f"{path}: member {name}")
            return [
                (f"{wnid}/{posixpath.basename(m)}", wnid, (0, TAR, o, s, 0))
                for m, o, s in found
                if L.is_image(posixpath.basename(m))
            ]

        items = []
        with (
            ThreadPoolExecutor(INDEX_THREADS) as pool,
            tqdm(total=len(inner), unit="tar", desc=f"indexing {path.name}", disable=not progress, leave=False) as bar,
        ):
            for part in pool.map(one, inner):
                items += part
                bar.update(1)
    finally:
        os.close(fd)
    return items


def _index_flat_tar(path: Path, index: int) -> list[tuple[str, tuple]]:
    """``(file name, location)`` of the images of a flat tar (a validation or test set), sorted by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        found = tar_members(fd, 0, os.fstat(fd).st_size, str(path))
    finally:
        os.close(fd)
    names = [(posixpath.basename(m), o, s) for m, o, s in found]
    return sorted((b, (index, TAR, o, s, 0)) for b, o, s in names if L.is_image(b))


def _index_patches(path: Path) -> dict[str, dict[str, tuple]]:
    """split -> file name -> location of ``patch_images.tar``'s replacements (``<...>/<split>/<file>``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        found = tar_members(fd, 0, os.fstat(fd).st_size, str(path))
    finally:
        os.close(fd)
    out: dict[str, dict[str, tuple]] = {}
    index = ARCHIVE_ROLES.index("patch")
    for m, o, s in found:
        parts = _member_name(m).split("/")
        # <split>/<file>, or <split>/<wnid>/<file>: the file name decides, within its split
        split = next((p for p in reversed(parts[:-1]) if p in ("train", "val", "test")), None)
        if split is not None and L.is_image(parts[-1]):
            out.setdefault(split, {})[parts[-1]] = (index, TAR, o, s, 0)
    return out


def _patched(name: str, items: list, patches: dict[str, tuple], patch_file: Path | None, notes: list[str]) -> list:
    """``items`` with each file that has a replacement read from the patch archive; unused replacements warned of."""
    if not patches:
        return items
    out, used = [], set()
    for rel, wnid, loc in items:
        base = posixpath.basename(rel)
        if base in patches:
            loc = patches[base]
            used.add(base)
        out.append((rel, wnid, loc))
    unused = sorted(set(patches) - used)
    if unused:
        notes.append(
            f"warning: {patch_file}: {len(unused)} {name} replacement(s) match no {name} file and are unused: "
            + ", ".join(unused[:5])
            + (" ..." if len(unused) > 5 else "")
        )
    return out


def _devkit_files(path: Path) -> tuple[bytes, dict[str, str]]:
    """``meta.mat`` bytes and the validation ground truths (file name -> text) from a devkit archive."""
    meta, truths = None, {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for ti in tf:
                base = posixpath.basename(ti.name)
                if ti.isreg() and base == L.DEVKIT_META and meta is None:
                    meta = tf.extractfile(ti).read()
                elif ti.isreg() and base in L.GROUND_TRUTHS["val"]:
                    truths[base] = tf.extractfile(ti).read().decode()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise AlexnetError(f"{path}: not a readable devkit archive ({e}); {_BROKEN}") from None
    if meta is None or not truths:
        absent = " or ".join([L.DEVKIT_META] * (meta is None) + ["a validation ground truth"] * (not truths))
        raise AlexnetError(f"{path} holds no {absent}: is it {OFFICIAL_DEVKIT} or {ILSVRC2010['devkit']}?")
    return meta, truths


# --------------------------------------------------------------------------- the splits


def _split(name: str, root: Path, layout: str, items: list, archives: tuple[str, ...], **kw) -> L.SplitSource:
    """A split of ``(relpath, wnid, location)`` items, in the tree's order (sorted relpaths)."""
    if not items:
        raise AlexnetError(f"{root} holds no {name} images")
    items.sort(key=lambda t: t[0])
    rel, wnids, locs = zip(*items, strict=True)
    return L.SplitSource(
        name, root, layout, rel, wnids, archives=archives, locations=np.array(list(locs), dtype=LOCATION), **kw
    )


def _flat_labels(
    arch: Archives, split: str, where: Path, names: list[str], layout: str, label_file: Path | None, notes, devkit
) -> tuple[str, tuple[str, ...], str]:
    """``(layout, wnid of each name, label file)`` of a flat validation or test set: --val-labels, the devkit
    archive's ground truth (test: the release's test ground truth beside it), or a label file beside the archives.
    ``devkit``: ``(meta.mat's synsets, validation ground truths)`` of the devkit archive, or None."""
    if layout == "class-folders":
        raise AlexnetError(f"{where} is flat: --val-layout class-folders does not apply to it")
    gives = split == "val" or "test_labels" in arch.files
    if label_file is None and devkit is not None and gives and layout in ("auto", "devkit"):
        synsets, truths = devkit
        path = arch.files["devkit"]
        if split == "test":
            text, label_file = arch.files["test_labels"].read_text(), str(arch.files["test_labels"])
        else:
            base = sorted(truths)[0]
            text, label_file = truths[base], f"{path}: {base}"
        id_to_wnid = {i: w for i, (w, _) in synsets.items()}
        table = L.devkit_table(text, id_to_wnid, label_file, f"{path}: {L.DEVKIT_META}")
        layout = "devkit"
    else:
        if label_file is None:
            layout, label_file = L._find_label_file(arch.folder, arch.folder, layout, len(names), split)
        else:
            layout = L._layout_of_label_file(label_file) if layout == "auto" else layout
        table, _ = L._label_table(arch.folder, arch.folder, layout, label_file, names)
        label_file = str(label_file)
    return layout, L.labelled(table, L.label_keys(layout, names), names, label_file, where, notes), label_file


def _read_devkit(arch: Archives) -> tuple[dict, dict] | None:
    """``(ID -> (wnid, words), validation ground truths)`` of the release's devkit archive; None without one."""
    if "devkit" not in arch.files:
        return None
    meta, truths = _devkit_files(arch.files["devkit"])
    return L.read_devkit_synsets(io.BytesIO(meta), where=f"{arch.files['devkit']}: {L.DEVKIT_META}"), truths


def _release(arch: Archives, splits, val_layout, val_labels, notes, progress, devkit) -> dict[str, L.SplitSource]:
    """The splits of image-net.org's archives of one release (ILSVRC-2012's or ILSVRC-2010's)."""
    names = RELEASES[arch.kind]
    archives = tuple(str(arch.files.get(role, "")) for role in ARCHIVE_ROLES)
    patches = _index_patches(arch.files["patch"]) if "patch" in arch.files else {}
    found = {}
    for name in (n for n in ("train", "val", "test") if n in splits and n in names):
        if name not in arch.files:
            if name != "test" or tuple(splits) == ("test",):
                notes.append(f"no {name} split ({names[name]} is not in {arch.folder})")
            continue
        path = arch.files[name]
        beside = [arch.folder / f for f in L.TEST_LIST_FILES if (arch.folder / f).is_file()]
        if name == "test" and "test_labels" not in arch.files and not beside:
            notes.append(f"no test split: {names['test_labels']}, released separately, is not in {arch.folder}")
            continue
        if name == "train":
            items, layout, label_file = _index_train_tar(path, progress), "class-folders", ""
        else:
            members = _index_flat_tar(path, ARCHIVE_ROLES.index(name))
            files = [n for n, _ in members]
            layout, labels = (val_layout, val_labels) if name == "val" else ("auto", None)
            layout, wnids, label_file = _flat_labels(arch, name, path, files, layout, labels, notes, devkit)
            items = [(n, w, loc) for (n, loc), w in zip(members, wnids, strict=True)]
        items = _patched(name, items, patches.get(name, {}), arch.files.get("patch"), notes)
        found[name] = _split(name, path, layout, items, archives, label_file=label_file)
    return found


def _zip_location(zpath: Path, info: zipfile.ZipInfo) -> tuple:
    kinds = {zipfile.ZIP_STORED: ZIP_STORED, zipfile.ZIP_DEFLATED: ZIP_DEFLATED}
    if info.compress_type not in kinds or info.flag_bits & 1:
        raise AlexnetError(
            f"{zpath}: member {info.filename} is encrypted or uses compression method "
            f"{info.compress_type} (only stored and deflated members are read)"
        )
    return (0, kinds[info.compress_type], info.header_offset, info.compress_size, info.CRC)


def _zip_text(zf: zipfile.ZipFile, zpath: Path, info: zipfile.ZipInfo) -> str:
    try:
        return zf.read(info).decode(errors="replace")
    except (zipfile.BadZipFile, OSError, zlib.error, EOFError) as e:
        raise AlexnetError(f"{zpath}: member {info.filename} cannot be read ({e}); {_BROKEN}") from None


def _kaggle(arch: Archives, splits, val_layout, val_labels, notes) -> tuple[dict[str, L.SplitSource], str]:
    """The splits of Kaggle's zip and the text of its LOC_synset_mapping.txt ('' when absent)."""
    zpath = arch.files["zip"]
    try:
        zf = zipfile.ZipFile(zpath)
    except (zipfile.BadZipFile, OSError) as e:
        raise AlexnetError(f"{zpath}: not a readable zip ({e}); {_BROKEN}") from None
    train, val, top = [], [], {}
    with zf:
        for info in zf.infolist():
            name = info.filename
            parts = name[len(KAGGLE_DATA) :].split("/") if name.startswith(KAGGLE_DATA) else []
            if len(parts) == 3 and parts[0] == "train" and not parts[1].startswith(".") and L.is_image(parts[2]):
                train.append((f"{parts[1]}/{parts[2]}", sys.intern(parts[1]), _zip_location(zpath, info)))
            elif len(parts) == 2 and parts[0] == "val" and L.is_image(parts[1]):
                val.append((parts[1], _zip_location(zpath, info)))
            elif "/" not in name:
                top[name] = info
        names_text = _zip_text(zf, zpath, top["LOC_synset_mapping.txt"]) if "LOC_synset_mapping.txt" in top else ""
        csv_info = top.get(L.KAGGLE_CSV)
        found = {}
        if "train" in splits:
            found["train"] = _split("train", zpath, "class-folders", train, (str(zpath),))
        if "val" in splits and val_labels is None and csv_info is not None and val_layout in ("auto", "kaggle-csv"):
            val.sort()
            names = [n for n, _ in val]
            where = f"{zpath}: {L.KAGGLE_CSV}"
            table = L.read_kaggle_csv(io.StringIO(_zip_text(zf, zpath, csv_info), newline=""), where)
            wnids = L.labelled(table, L.label_keys("kaggle-csv", names), names, where, zpath, notes)
            items = [(n, w, loc) for (n, loc), w in zip(val, wnids, strict=True)]
            found["val"] = _split("val", zpath, "kaggle-csv", items, (str(zpath),), label_file=where)
        elif "val" in splits:
            val.sort()
            names = [n for n, _ in val]
            layout, wnids, label_file = _flat_labels(arch, "val", zpath, names, val_layout, val_labels, notes, None)
            items = [(n, w, loc) for (n, loc), w in zip(val, wnids, strict=True)]
            found["val"] = _split("val", zpath, layout, items, (str(zpath),), label_file=label_file)
    return found, names_text


def detect_archive_source(arch: Archives, *, splits, val_layout, val_labels, allow_missing_classes, progress):
    """The dataset in ``arch``: the same splits, files and labels as the tree they extract to.

    Class names: a name file beside the archives (``layouts.CLASS_NAME_FILES``), else Kaggle's
    ``LOC_synset_mapping.txt`` in the zip, else the ``words`` of the devkit's ``meta.mat``."""
    from dataclasses import replace

    notes: list[str] = []
    names_text, devkit = "", None
    if arch.kind == "kaggle":
        found, names_text = _kaggle(arch, splits, val_layout, val_labels, notes)
    else:
        devkit = _read_devkit(arch)
        found = _release(arch, splits, val_layout, val_labels, notes, progress, devkit)
    source = L.finish_source(arch.folder, found, allow_missing_classes, notes)
    names = L.read_class_names(arch.folder, source.classes)
    if not names and names_text:
        names = L.parse_class_names(names_text, source.classes)
    if not names and devkit is not None:
        names = L.devkit_class_names(devkit[0], source.classes)
    return replace(source, class_names=tuple(names))


# --------------------------------------------------------------------------- reading a member (workers)

_fds: dict[str, int] = {}  # this process's open archives
_read_ahead: dict[tuple[str, int], bytes] = {}  # (archive, offset) -> a gzip-compressed tar's member, read ahead


def read_ahead(archives: tuple[str, ...], locations: list[tuple]) -> None:
    """Read the members of gzip-compressed tars among ``locations`` in one pass over each such archive
    (a gzip stream cannot be read at an offset: a pass decompresses it from its start); ``read_member``
    then takes them from memory. Other locations are left to ``read_member``."""
    _read_ahead.clear()
    spans: dict[str, list[tuple[int, int]]] = {}
    for loc in locations:
        if int(loc[1]) == GZ_TAR:
            spans.setdefault(archives[int(loc[0])], []).append((int(loc[2]), int(loc[3])))
    for path, wanted in spans.items():
        _read_ahead.update(((path, offset), data) for offset, data in _gz_members(path, wanted).items())


def _gz_members(path: str, wanted: list[tuple[int, int]]) -> dict[int, bytes]:
    """offset -> bytes of the members ``(offset, size)`` of a gzip-compressed tar, in one pass."""
    out = {}
    try:
        with gzip.open(path, "rb") as f:
            for offset, size in sorted(wanted):
                f.seek(offset)
                out[offset] = data = f.read(size)
                if len(data) != size:
                    raise ValueError(f"the member at byte {offset} has only {len(data)} of its {size} bytes")
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise AlexnetError(f"{path}: cannot be read ({e}); {_BROKEN}") from None
    return out


def read_member(archives: tuple[str, ...], rel: str, loc: tuple) -> bytes:
    """A member's bytes (``loc``: a row of ``LOCATION``); AlexnetError naming it when they cannot be read."""
    archive, kind, offset, size, crc = loc
    path = archives[archive]
    if kind == GZ_TAR:
        data = _read_ahead.pop((path, offset), None)
        return data if data is not None else _gz_members(path, [(offset, size)])[offset]
    try:
        fd = _fds.get(path)
        if fd is None:
            fd = _fds[path] = os.open(path, os.O_RDONLY)
        if kind != TAR:  # a zip member's data follows its local header (whose extra field may differ)
            header = os.pread(fd, 30, offset)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise ValueError("no local header at its offset")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            offset += 30 + name_len + extra_len
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ValueError(f"only {len(data)} of its {size} bytes are in the file")
        if kind == ZIP_DEFLATED:
            inflate = zlib.decompressobj(-15)
            data = inflate.decompress(data)
            if not inflate.eof:
                raise ValueError("its deflate stream ends early")
        if kind != TAR and zlib.crc32(data) != crc:
            raise ValueError("CRC-32 mismatch")
    except (OSError, ValueError, zlib.error) as e:
        raise AlexnetError(f"{path}: member {rel} cannot be read ({e}); {_BROKEN}") from None
    return data

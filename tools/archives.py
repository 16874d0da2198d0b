"""ImageNet read straight from the archives users download, without extracting them.

Sources (``find_archives``):

- image-net.org: ``ILSVRC2012_img_train.tar`` (a tar of 1,000 per-class tars ``<wnid>.tar``),
  ``ILSVRC2012_img_val.tar`` (50,000 flat files) and ``ILSVRC2012_devkit_t12.tar.gz`` (``meta.mat`` and
  the validation ground truth, in ILSVRC2012_ID order); SRC is their folder or one of them;
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
KAGGLE_ZIP = "imagenet-object-localization-challenge.zip"
KAGGLE_DATA = "ILSVRC/Data/CLS-LOC/"
# Where a member's bytes are: tar members at their data offset; zip members at their local header.
TAR, ZIP_STORED, ZIP_DEFLATED = 0, 1, 2
LOCATION = np.dtype([("archive", "u2"), ("kind", "u1"), ("offset", "u8"), ("size", "u8"), ("crc", "u4")])
INDEX_THREADS = 16  # inner tars whose headers are read at once (I/O bound: pread releases the GIL)
_BROKEN = "the archive is damaged or incomplete: download it again (what is built so far is kept)"


@dataclass(frozen=True)
class Archives:
    kind: str  # "official" or "kaggle"
    folder: Path  # where the archives are (label and class-name files beside them are found there)
    files: dict[str, Path]  # role ("train", "val", "devkit", "zip") -> archive


def find_archives(src: Path) -> Archives | None:
    """The archives SRC names or holds; None for an extracted tree (or anything else: the tree code says what)."""
    src = Path(src)
    if src.is_file():
        folder = src.parent
        if src.suffix.lower() == ".zip":
            return Archives("kaggle", folder, {"zip": src})
    elif src.is_dir() and not any((src / d).is_dir() for d in ("train", "val", "ILSVRC")):
        folder = src
        if (src / KAGGLE_ZIP).is_file():
            return Archives("kaggle", folder, {"zip": src / KAGGLE_ZIP})
    else:
        return None
    roles = {"train": OFFICIAL_TRAIN, "val": OFFICIAL_VAL, "devkit": OFFICIAL_DEVKIT}
    files = {role: folder / name for role, name in roles.items() if (folder / name).is_file()}
    if src.is_file() and src not in files.values():
        raise AlexnetError(f"{src} is not one of ImageNet's archives ({', '.join(roles.values())}, {KAGGLE_ZIP})")
    return Archives("official", folder, files) if "train" in files or "val" in files else None


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


def _index_train_tar(path: Path, progress: bool) -> list[tuple[str, str, tuple]]:
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


def _index_val_tar(path: Path) -> list[tuple[str, tuple]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        found = tar_members(fd, 0, os.fstat(fd).st_size, str(path))
    finally:
        os.close(fd)
    return [(_member_name(m), (1, TAR, o, s, 0)) for m, o, s in found if L.is_image(posixpath.basename(m))]


def _devkit_files(path: Path) -> tuple[bytes, str]:
    """``meta.mat`` bytes and the ground-truth text from the devkit archive."""
    want = {"meta.mat": None, L.DEVKIT_GROUND_TRUTH: None}
    try:
        with tarfile.open(path, "r:*") as tf:
            for ti in tf:
                base = posixpath.basename(ti.name)
                if ti.isreg() and base in want and want[base] is None:
                    want[base] = tf.extractfile(ti).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise AlexnetError(f"{path}: not a readable devkit archive ({e}); {_BROKEN}") from None
    absent = [k for k, v in want.items() if v is None]
    if absent:
        raise AlexnetError(f"{path} holds no {' or '.join(absent)}: is it ILSVRC2012_devkit_t12.tar.gz?")
    return want["meta.mat"], want[L.DEVKIT_GROUND_TRUTH].decode()


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


def _val_labels(
    arch: Archives, where: Path, names: list[str], val_layout: str, val_labels: Path | None, notes: list[str]
) -> tuple[str, tuple[str, ...], str]:
    """``(layout, wnid of each name, label file)`` of flat validation files: --val-labels, the devkit archive,
    or a label file beside the archives (an extracted devkit included)."""
    if val_layout == "class-folders":
        raise AlexnetError(f"{where} is flat: --val-layout class-folders does not apply to it")
    devkit = arch.files.get("devkit")
    if val_labels is None and devkit is not None and val_layout in ("auto", "devkit"):
        meta, ground_truth = _devkit_files(devkit)
        id_to_wnid = L.read_devkit_meta(io.BytesIO(meta), where=f"{devkit}: meta.mat")
        table = L.devkit_table(ground_truth, id_to_wnid, f"{devkit}: {L.DEVKIT_GROUND_TRUTH}", f"{devkit}: meta.mat")
        layout, label_file = "devkit", f"{devkit}: {L.DEVKIT_GROUND_TRUTH}"
    else:
        if val_labels is None:
            layout, val_labels = L._find_label_file(arch.folder, arch.folder, val_layout, len(names))
        else:
            layout = L._layout_of_label_file(val_labels) if val_layout == "auto" else val_layout
        table, _ = L._label_table(arch.folder, arch.folder, layout, val_labels, names)
        label_file = str(val_labels)
    return layout, L.labelled(table, L.label_keys(layout, names), names, label_file, where, notes), label_file


def _official(arch: Archives, splits, val_layout, val_labels, notes, progress) -> dict[str, L.SplitSource]:
    archives = tuple(str(arch.files.get(role, "")) for role in ("train", "val"))
    found = {}
    for name, archive in (("train", OFFICIAL_TRAIN), ("val", OFFICIAL_VAL)):
        if name in splits and name not in arch.files:
            notes.append(f"no {name} split ({archive} is not in {arch.folder})")
    if "train" in splits and "train" in arch.files:
        found["train"] = _split(
            "train", arch.files["train"], "class-folders", _index_train_tar(arch.files["train"], progress), archives
        )
    if "val" in splits and "val" in arch.files:
        path = arch.files["val"]
        members = sorted(_index_val_tar(path))
        names = [n for n, _ in members]
        layout, wnids, label_file = _val_labels(arch, path, names, val_layout, val_labels, notes)
        items = [(n, w, loc) for (n, loc), w in zip(members, wnids, strict=True)]
        found["val"] = _split("val", path, layout, items, archives, label_file=label_file)
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
            layout, wnids, label_file = _val_labels(arch, zpath, names, val_layout, val_labels, notes)
            items = [(n, w, loc) for (n, loc), w in zip(val, wnids, strict=True)]
            found["val"] = _split("val", zpath, layout, items, (str(zpath),), label_file=label_file)
    return found, names_text


def detect_archive_source(arch: Archives, *, splits, val_layout, val_labels, allow_missing_classes, progress):
    """The dataset in ``arch``: the same splits, files and labels as the tree they extract to."""
    from dataclasses import replace

    notes: list[str] = []
    names_text = ""
    if arch.kind == "kaggle":
        found, names_text = _kaggle(arch, splits, val_layout, val_labels, notes)
    else:
        found = _official(arch, splits, val_layout, val_labels, notes, progress)
    source = L.finish_source(arch.folder, found, allow_missing_classes, notes)
    if names_text:
        source = replace(source, class_names=tuple(L.parse_class_names(names_text, source.classes)))
    return source


# --------------------------------------------------------------------------- reading a member (workers)

_fds: dict[str, int] = {}  # this process's open archives


def read_member(archives: tuple[str, ...], rel: str, loc: tuple) -> bytes:
    """A member's bytes (``loc``: a row of ``LOCATION``); AlexnetError naming it when they cannot be read."""
    archive, kind, offset, size, crc = loc
    path = archives[archive]
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

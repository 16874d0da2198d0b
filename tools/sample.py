"""The built-in sample: a small ImageNet-layout tree of procedurally drawn, learnable images.

Each class has its own hue and shape (disc, square, triangle, stripes), drawn at a
random place and size over a textured, low-saturation background, so a short CPU
run beats chance clearly. Image sizes and aspect ratios vary (some shorter sides
below 256, to exercise upscaling). Seeded and deterministic: the same arguments
write byte-identical files.

Validation labels come in each format the builder accepts (``val_format``):

- ``folders``: ``val/<wnid>/ILSVRC2012_val_%08d.JPEG`` (after the usual "valprep" step)
- ``kaggle``: the Kaggle copy's tree: ``ILSVRC/Data/CLS-LOC/{train,val}``, flat val,
  ``LOC_val_solution.csv`` and ``LOC_synset_mapping.txt`` at the root
- ``devkit``: flat ``val/`` with ``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt``
  and ``meta.mat``, whose ILSVRC2012_ID order is *not* the sorted-wnid order
- ``list``: flat ``val/`` with ``val_list.txt``: ``<path relative to val/> <wnid>`` per line

With ``awkward=True`` the train split also holds the odd files real ImageNet has
(see ``AWKWARD_KINDS``); the truncated and zero-byte ones must be rejected by the builder.
"""

from __future__ import annotations

import colorsys
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np

from alexnet.pipeline.cli_common import config_options, field_problems, opt
from alexnet.pipeline.errors import AlexnetError

# Real ILSVRC-2012 wnids (sorted order is the label order), for real-looking trees.
REAL_WNIDS = (
    "n01440764",
    "n01443537",
    "n01484850",
    "n01491361",
    "n01494475",
    "n01496331",
    "n01498041",
    "n01514668",
    "n01514859",
    "n01518878",
    "n02102040",
    "n02979186",
    "n03000684",
    "n03028079",
    "n03394916",
    "n03417042",
    "n03425413",
    "n03445777",
    "n03888605",
)
VAL_FORMATS = ("folders", "kaggle", "devkit", "list")
SHAPES = ("disc", "square", "triangle", "stripes")
# kind -> whether the builder keeps it (converted to RGB) or rejects it
AWKWARD_KINDS = dict.fromkeys(("cmyk", "png_named_jpeg", "grayscale", "tiny", "very_large", "exif_rotated"), True)
AWKWARD_KINDS.update(truncated=False, zero_byte=False)
DEVKIT_DIR = "ILSVRC2012_devkit_t12/data"
KAGGLE_DATA = "ILSVRC/Data/CLS-LOC"
INFO_FILE = "sample_info.json"


@dataclass
class SampleInfo:
    root: str
    classes: list[str]  # sorted wnids = label order
    val_format: str
    train_dir: str
    val_dir: str
    train_images: int  # files written under train, awkward ones included
    val_images: int
    awkward: dict[str, str] = field(default_factory=dict)  # kind -> path relative to root
    rejected: list[str] = field(default_factory=list)  # paths (relative to root) a builder must reject
    val_labels: dict[str, str] = field(default_factory=dict)  # val file name -> wnid
    seed: int = 0


def class_wnids(num_classes: int) -> list[str]:
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    # beyond the real list: well-formed, deterministic ids
    extra = [f"n{90000000 + 7919 * k:08d}" for k in range(num_classes - len(REAL_WNIDS))]
    return sorted([*REAL_WNIDS[:num_classes], *extra])


HUE_NAMES = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet", "purple", "magenta")


def class_name(label: int, num_classes: int) -> str:
    """A readable name for a class: its hue and shape ("orange square")."""
    hue = label / num_classes
    return f"{HUE_NAMES[round(hue * len(HUE_NAMES)) % len(HUE_NAMES)]} {SHAPES[label % len(SHAPES)]}"


def draw_image(
    label: int, num_classes: int, rng: np.random.Generator, size: tuple[int, int] | None = None
) -> np.ndarray:
    """One (H, W, 3) uint8 image of a class: its coloured shape over a textured background."""
    if size is None:
        short = int(rng.integers(200, 400))
        aspect = float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3]))
        w, h = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
    else:
        w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Background: a low-saturation gradient between two random colours, plus texture.
    c0, c1 = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx / max(w, 1) + np.sin(angle) * yy / max(h, 1) + 1) / 2
    img = c0 + (c1 - c0) * t[..., None]
    freq = rng.uniform(0.02, 0.08)
    img += 12 * np.sin(freq * xx + rng.uniform(0, 6))[..., None] * np.cos(freq * yy)[..., None]
    # Foreground: the class's shape in the class's colour, random place and size.
    # Evenly spaced hues; neighbouring labels also differ in shape.
    colour = np.array(colorsys.hsv_to_rgb(label / num_classes, 0.85, 0.9)) * 255.0
    colour = np.clip(colour * rng.uniform(0.8, 1.15), 0, 255)
    shape = SHAPES[label % len(SHAPES)]
    m = min(w, h)
    r = rng.uniform(0.2, 0.35) * m
    # Inside the central square, so the stored centre crop always holds the object.
    cx = rng.uniform((w - m) / 2 + r, (w + m) / 2 - r)
    cy = rng.uniform((h - m) / 2 + r, (h + m) / 2 - r)
    dx, dy = xx - cx, yy - cy
    if shape == "disc":
        mask = dx * dx + dy * dy <= r * r
    elif shape == "square":
        mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "triangle":
        mask = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    else:  # stripes inside a square
        mask = (np.abs(dx) <= r) & (np.abs(dy) <= r) & (np.sin(dx * np.pi / (r / 3)) > 0)
    img[mask] = colour
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg_bytes(arr: np.ndarray, quality: int = 90, mode: str | None = None, exif=None) -> bytes:
    from PIL import Image

    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, exif=exif or b"")
    return buf.getvalue()


def _awkward_bytes(kind: str, label: int, num_classes: int, rng: np.random.Generator) -> bytes:
    from PIL import Image

    if kind == "zero_byte":
        return b""
    image = draw_image(label, num_classes, rng, size={"tiny": (31, 23), "very_large": (4000, 3000)}.get(kind))
    if kind == "png_named_jpeg":
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        return buf.getvalue()
    if kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 CW to display
        return _jpeg_bytes(image, exif=exif)
    data = _jpeg_bytes(
        image, quality=85 if kind == "very_large" else 90, mode={"cmyk": "CMYK", "grayscale": "L"}.get(kind)
    )
    return data[: len(data) // 3] if kind == "truncated" else data


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_meta_mat(path: Path, wnids: list[str], ids: dict[str, int], id_field: str = "ILSVRC2012_ID") -> None:
    """A devkit-style ``meta.mat``: struct array ``synsets`` with leaf and internal nodes (ILSVRC-2010's
    devkit names its ID field ``ILSVRC2010_ID``); ``words`` are the sample's class names."""
    from scipy.io import savemat

    fields = f"{id_field} WNID words gloss num_children children wordnet_height num_train_images".split()
    leaves = sorted(wnids, key=lambda w: ids[w])  # the devkit lists synsets in ID order
    n_internal = 2
    arr = np.zeros((len(leaves) + n_internal, 1), dtype=[(f, "O") for f in fields])
    label = {w: i for i, w in enumerate(sorted(wnids))}
    for i, w in enumerate(leaves):
        words = class_name(label[w], len(wnids))
        arr[i, 0] = (ids[w], w, words, "a sample class", 0, np.zeros((1, 0)), 0, 0)
    for j in range(n_internal):  # internal nodes, as the real file has after the 1000 leaves
        arr[len(leaves) + j, 0] = (len(leaves) + j + 1, f"n0{j:07d}", "internal", "", 1, np.array([[1]]), 1, 0)
    savemat(str(path), {"synsets": arr})


@dataclass(frozen=True)
class SampleConfig:
    """``alexnet-prep make-sample``'s settings, each default written once here (its options are these fields)."""

    num_classes: int = opt(10, "Classes.", min=1, max=1000, aliases=("--classes",))
    train_per_class: int = opt(60, "Train images per class.", min=1)
    val_per_class: int = opt(10, "Validation images per class.", min=1)
    val_format: str = opt(
        "folders", "How validation labels are given (each format the builder accepts).", choices=VAL_FORMATS
    )
    awkward: bool = opt(
        False,
        "Add ImageNet's odd files: CMYK, PNG named .JPEG, grayscale, tiny, very large, EXIF-rotated, "
        "truncated and zero-byte.",
    )
    seed: int = opt(0, "Seed of the drawings.")


def make_sample(root: Path, **options) -> SampleInfo:
    """Write the sample tree under ``root`` (``options``: :class:`SampleConfig`'s fields) and return what was written."""
    cfg = SampleConfig(**options)
    problems = field_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    num_classes, val_format, seed = cfg.num_classes, cfg.val_format, cfg.seed
    root = Path(root)
    base = Path(KAGGLE_DATA) if val_format == "kaggle" else Path(".")
    info = SampleInfo(
        root=str(root),
        classes=class_wnids(num_classes),
        val_format=val_format,
        train_dir=(base / "train").as_posix(),
        val_dir=(base / "val").as_posix(),
        train_images=0,
        val_images=0,
        seed=seed,
    )
    _write_train(info, cfg.train_per_class)
    if cfg.awkward:
        _write_awkward(info)
    _write_val(info, cfg.val_per_class)
    # Class names as ImageNet's LOC_synset_mapping.txt gives them (build-lmdb records them).
    (root / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} {class_name(i, num_classes)}\n" for i, w in enumerate(info.classes))
    )
    _write_val_labels(info)
    (root / INFO_FILE).write_text(json.dumps(asdict(info), indent=2) + "\n")
    return info


def _write_train(info: SampleInfo, per_class: int) -> None:
    num_classes = len(info.classes)
    for label, wnid in enumerate(info.classes):
        for n in range(per_class):
            rng = np.random.default_rng([info.seed, 0, label, n])
            path = Path(info.root) / info.train_dir / wnid / f"{wnid}_{n}.JPEG"
            _write(path, _jpeg_bytes(draw_image(label, num_classes, rng)))
            info.train_images += 1


def _write_awkward(info: SampleInfo) -> None:
    """One train file of each of ``AWKWARD_KINDS``; those a builder must reject are listed in ``info.rejected``."""
    num_classes = len(info.classes)
    for k, (kind, kept) in enumerate(AWKWARD_KINDS.items()):
        label = k % num_classes
        wnid = info.classes[label]
        rel = Path(info.train_dir) / wnid / f"{wnid}_{90000 + k}.JPEG"
        rng = np.random.default_rng([info.seed, 2, k])
        _write(Path(info.root) / rel, _awkward_bytes(kind, label, num_classes, rng))
        info.awkward[kind] = rel.as_posix()
        info.train_images += 1
        if not kept:
            info.rejected.append(rel.as_posix())


def _write_val(info: SampleInfo, per_class: int) -> None:
    """Validation images, classes interleaved as in the real set; in class folders only for ``folders``."""
    num_classes = len(info.classes)
    order = np.random.default_rng([info.seed, 1]).permutation(num_classes * per_class)
    for number, i in enumerate(order, start=1):
        label, n = int(i) % num_classes, int(i) // num_classes
        rng = np.random.default_rng([info.seed, 1, label, n])
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        sub = Path(info.classes[label]) / name if info.val_format == "folders" else Path(name)
        _write(Path(info.root) / info.val_dir / sub, _jpeg_bytes(draw_image(label, num_classes, rng)))
        info.val_labels[name] = info.classes[label]
        info.val_images += 1


def _write_val_labels(info: SampleInfo) -> None:
    """The label file of a flat validation format (Kaggle's CSV, the devkit's ground truth, a list)."""
    root, labels = Path(info.root), info.val_labels
    if info.val_format == "kaggle":
        lines = ["ImageId,PredictionString", *(f"{Path(nm).stem},{w} 10 10 100 100" for nm, w in labels.items())]
        (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    elif info.val_format == "devkit":
        # ILSVRC2012_IDs in a shuffled order, so that ID order != sorted-wnid order (as in the real devkit).
        num_classes = len(info.classes)
        id_order = np.random.default_rng([info.seed, 3]).permutation(num_classes)
        if num_classes > 1 and np.all(id_order == np.arange(num_classes)):
            id_order = np.roll(id_order, 1)
        ids = {w: int(id_order[i]) + 1 for i, w in enumerate(info.classes)}
        ground_truth = "".join(f"{ids[w]}\n" for w in labels.values())
        _write(root / DEVKIT_DIR / "ILSVRC2012_validation_ground_truth.txt", ground_truth.encode())
        write_meta_mat(root / DEVKIT_DIR / "meta.mat", info.classes, ids)
    elif info.val_format == "list":
        (root / "val_list.txt").write_text("".join(f"{nm} {w}\n" for nm, w in labels.items()))


@click.command(
    "make-sample",
    epilog="""\b
Examples:
  alexnet-prep make-sample sample/
  alexnet-prep make-sample sample/ --awkward --val-format devkit
  alexnet-prep make-sample sample/ --classes 5 --train-per-class 20 --val-per-class 4
""",
)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@config_options(SampleConfig)
def make_sample_command(out: Path, **options) -> None:
    """Write the built-in sample: a small ImageNet-layout tree of learnable, procedurally drawn images."""
    if out.exists() and any(out.iterdir()):
        raise AlexnetError(f"{out} exists and is not empty; choose a new directory")
    try:
        info = make_sample(out, **options)
    except OSError as e:
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(out) else ""
        raise AlexnetError(
            f"cannot write the sample to {out}: {e.strerror or e}{where}; choose a directory you "
            "can write, e.g. alexnet-prep make-sample sample/"
        ) from None
    click.echo(
        f"wrote {info.train_images} train and {info.val_images} val images in {len(info.classes)} classes "
        f"to {out} (val labels: {info.val_format}{', awkward files: ' + str(len(info.awkward)) if info.awkward else ''})"
    )

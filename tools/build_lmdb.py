"""``alexnet-prep build-lmdb``: an ImageNet tree or its archives -> LMDB shards of shorter-side-256 centre crops.

§2 of the paper: "rescale the image such that the shorter side was of length 256, and then
cropped out the central 256x256 patch". Nothing else: no warping to a square (Caffe's
``convert_imageset --resize_height/width`` does that; it is not the paper).

Image processing (``prepare_image``): ``pipeline/images.py`` decodes the source file to RGB (draft
decoding for large JPEGs, EXIF orientation ignored) and computes the central 256x256 window of the
shorter-side-256 rescale; the result is encoded as JPEG, quality 95 by default (the authors' own
preparation), 4:2:0 chroma.

Parallelism and resumability: each shard is written by one worker process, in key order, in
transactions of ``commit_every`` records. After a kill at any moment the same command finds each
shard's last committed key and continues after it; source files that were rejected before it are
recognised as gaps and checked again for their reason. ``crc32.npy`` is written when a shard is
finished; ``manifest.json`` says ``complete: false`` until every shard is.

Archives (``tools/archives.py``): the workers read each member at its offset in the archive; the
records are the ones a build of the extracted tree writes.
"""

from __future__ import annotations

import functools
import io
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.pipeline import images, locks
from alexnet.pipeline.cli_common import config_options, data_dir_option, opt, package_version
from alexnet.pipeline.errors import AlexnetError
from alexnet.tools import archives
from alexnet.tools.layouts import VAL_LAYOUTS, read_class_names
from alexnet.tools.pool import Pool, default_workers, report
from alexnet.tools.sources import detect_source

DEFAULT_JPEG_QUALITY = 95  # the authors' own preparation (cuda-convnet2 make-data)
DEFAULT_COMMIT_EVERY = 256  # records per LMDB transaction: bounds what a kill can lose and memory per worker
IMAGES_PER_SHARD = 10_000  # default shard size
MAX_SMALL_SHARDS = 16  # small datasets still get up to 16 shards (>= 256 images each), so 16 cores have work
MIN_SHARD_IMAGES = 256
# Options that decide the bytes written: a build resumes only when all of these are unchanged.
_OUTPUT_OPTIONS = (
    "resize_shorter",
    "stored_size",
    "jpeg_quality",
    "resample",
    "draft_min_factor",
    "exif_orientation",
    "seed",
    "num_shards",
    "splits",
    "layouts",
    "source_digests",
    "classes",
    "pil",
)


# --------------------------------------------------------------------------- one image


def prepare_image(data: bytes, *, quality: int = DEFAULT_JPEG_QUALITY, draft: bool = True) -> bytes:
    """Source file bytes -> JPEG bytes of the stored 256x256 RGB centre crop."""
    return prepare_source(data, quality=quality, draft=draft)[0]


def prepare_source(data: bytes, *, quality: int = DEFAULT_JPEG_QUALITY, draft: bool = True):
    """``(prepare_image's JPEG, how the source was converted: images.CONVERSIONS kinds)``."""
    im, kinds = images.decode_source(data, draft=draft)
    buf = io.BytesIO()
    images.resize_centre_crop(im).save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), kinds


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class BuildConfig:
    """``alexnet-prep build-lmdb``'s settings, each default written once here (its options are these fields)."""

    source: Path  # SRC: a tree or ImageNet's archives (the command's argument)
    data_dir: Path  # --data-dir
    workers: int = opt(0, "Worker processes (each writes one shard at a time); 0: all cores.", min=0)
    train_shards: int = opt(0, f"Train shards; 0: about {IMAGES_PER_SHARD} images each (129 for ImageNet).", min=0)
    val_shards: int = opt(0, "Validation shards; 0: from the size, as for train (16 for ImageNet).", min=0)
    jpeg_quality: int = opt(
        DEFAULT_JPEG_QUALITY, "Quality of the stored JPEGs (95: the authors' own preparation).", min=1, max=100
    )
    seed: int = opt(0, "Seed of the global shuffle of each split.")
    splits: tuple[str, ...] = opt(
        A.SPLITS,
        "Which splits to build (a split not found in SRC is skipped with a note; a test set is built only "
        "where SRC has a labelled one: ILSVRC-2010, ImageNetV2, or a test/ folder).",
        choices=(A.SPLITS, ("train", "val"), ("train",), ("val",), ("test",)),
    )
    val_layout: str = opt(
        "auto", "Force how validation labels are read instead of detecting it.", choices=("auto", *VAL_LAYOUTS)
    )
    val_labels: Path | None = opt(
        None,
        "Validation label file: LOC_val_solution.csv, ILSVRC2012_validation_ground_truth.txt "
        "(meta.mat beside it) or a '<relpath> <wnid-or-label>' list.",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
    )
    allow_missing_classes: bool = opt(False, "Build even when a class has no images in a split.")
    overwrite: bool = opt(False, "Delete an existing dataset in --data-dir and rebuild it.")
    commit_every: int = opt(
        DEFAULT_COMMIT_EVERY, "Records per LMDB transaction (what an interruption can cost).", min=1
    )
    # bytes; 0: estimated from the shard size (grows on MapFullError anyway)
    initial_map_size: int = opt(0, "Initial LMDB map size per shard in bytes.", min=0, cli=False)
    progress: bool = opt(True, "A progress bar (the summary is printed either way).")


def default_num_shards(num_items: int) -> int:
    """About IMAGES_PER_SHARD images a shard, but up to 16 shards of >= 256 images on small sets.

    Depends only on the dataset (not on this machine's cores), so the same source always gives
    the same shards: 1,281,167 train images -> 129 shards, 50,000 val -> 16.
    """
    by_size = math.ceil(num_items / IMAGES_PER_SHARD)
    small = min(MAX_SMALL_SHARDS, num_items // MIN_SHARD_IMAGES)
    return max(1, by_size, small)


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    path: str  # absolute shard directory
    source_root: str
    start: int  # first position
    items: list[tuple[str, int, tuple | None]]  # (relpath, label, location in archives) of positions start, ...
    quality: int
    commit_every: int
    map_size: int
    archives: tuple[str, ...] = ()  # the archives the locations point into; () for a tree


@dataclass
class ShardResult:
    split: str
    index: int
    num_records: int
    value_bytes: int
    rejected: list[tuple[str, str]]  # (relpath, reason)
    processed: int  # images processed in this run (not found already committed)
    conversions: dict[str, int] = field(default_factory=dict)  # the shard's records' conversions, by kind


# --------------------------------------------------------------------------- one shard (in a worker)


def _commit(env, batch: list[tuple[bytes, bytes]]) -> None:
    """Write a batch of ascending keys in one transaction; grow the map instead of failing."""
    import lmdb

    while True:
        try:
            with env.begin(write=True) as txn:
                cur = txn.cursor()
                for key, value in batch:
                    cur.put(key, value, append=True)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def _source_bytes(task: ShardTask, rel: str, location: tuple | None) -> bytes:
    """A source file's bytes (an archive member that cannot be read stops the build: AlexnetError)."""
    if location is not None:
        return archives.read_member(task.archives, rel, location)
    try:
        with open(os.path.join(task.source_root, rel), "rb") as f:
            return f.read()
    except OSError as e:  # unreadable source file (permissions, I/O error)
        raise images.Rejected(f"unreadable ({e.strerror or e})") from None


def _stored_jpeg(task: ShardTask, rel: str, location: tuple | None) -> tuple[bytes, tuple[str, ...]]:
    """A source file as the JPEG to store, and how it was converted; ``images.Rejected`` with the reason
    when it cannot be one. An archive member that cannot be read is a damaged archive, not a bad image."""
    return prepare_source(_source_bytes(task, rel, location), quality=task.quality)


class _Conversions:
    """A shard's conversions by kind, kept in its ``conversions.json`` as records are committed, so that a
    resumed build counts them exactly: records committed after the file's last write are counted again."""

    def __init__(self, task: ShardTask, present: set[int]):
        self.path = Path(task.path)
        through, counts = A.read_conversions(self.path)
        self.counts, self.pending = Counter(counts), Counter()
        stale = [task.items[pos - task.start] for pos in sorted(p for p in present if p > through)]
        archives.read_ahead(task.archives, [loc for _, _, loc in stale if loc is not None])
        for rel, _, location in stale:
            self.counts.update(images.decode_source(_source_bytes(task, rel, location))[1])

    def committed(self, through_position: int) -> None:
        self.counts += self.pending
        self.pending.clear()
        A.write_conversions(self.path, through_position, dict(sorted(self.counts.items())))


def _shard_state(env, task: ShardTask) -> tuple[set[int], int, list[int], int]:
    """What a shard already holds: positions, the last of them (start - 1 when none), crc32 and bytes of its values."""
    stop = task.start + len(task.items)
    present: set[int] = set()
    crcs: list[int] = []
    value_bytes = 0
    with env.begin() as txn:
        for key, value in txn.cursor():
            pos, rel = A.parse_key(bytes(key))
            if not task.start <= pos < stop or task.items[pos - task.start][0] != rel:
                raise AlexnetError(
                    f"shard {task.path} holds record {bytes(key).decode()!r} that this build would not write there; "
                    "the source or the options changed: rebuild with --overwrite"
                )
            present.add(pos)
            crcs.append(A.crc32(value))
            value_bytes += len(value)
    return present, max(present, default=task.start - 1), crcs, value_bytes


def build_shard(task: ShardTask, _state=None) -> ShardResult:
    """Write (or finish) one shard: records in key order, committed every ``commit_every``.

    Checksums are taken as records are written (reading the shard back through LMDB's memory map
    would put the whole shard in this process's resident set).
    """
    path = Path(task.path)
    data_mdb = path / "data.mdb"
    map_size = max(task.map_size, data_mdb.stat().st_size * 2 if data_mdb.exists() else 0)
    env = A.open_shard(path, readonly=False, map_size=map_size)
    rejected: list[tuple[str, str]] = []
    processed = 0
    try:
        present, last, crcs, value_bytes = _shard_state(env, task)
        if present:  # resuming: drop the pages the scan mapped in
            env.close()
            env = A.open_shard(path, readonly=False, map_size=map_size)
        report(len(present))
        conversions = _Conversions(task, present)
        todo = [loc for k, (_, _, loc) in enumerate(task.items) if loc is not None and task.start + k not in present]
        archives.read_ahead(task.archives, todo)  # a .tar.gz's members: one pass for the shard
        batch: list[tuple[bytes, bytes]] = []
        for offset, (rel, label, location) in enumerate(task.items):
            pos = task.start + offset
            if pos in present:
                continue
            try:
                jpeg, kinds = _stored_jpeg(task, rel, location)
            except images.Rejected as e:
                rejected.append((rel, str(e)))
                report(1)
                continue
            if pos < last:  # a gap before the last committed key was a rejected file; it decodes now
                raise AlexnetError(
                    f"{rel} was rejected when {task.path} was started but decodes now: the source changed; "
                    "rebuild with --overwrite"
                )
            report(1)
            conversions.pending.update(kinds)
            value = A.Datum(data=jpeg, label=label, height=C.STORED_SIZE, width=C.STORED_SIZE).encode()
            batch.append((A.make_key(pos, rel), value))
            crcs.append(A.crc32(value))
            value_bytes += len(value)
            processed += 1
            if len(batch) >= task.commit_every:
                _commit(env, batch)
                conversions.committed(pos)
                batch = []
        if batch:
            _commit(env, batch)
        conversions.committed(task.start + len(task.items) - 1)
        entries = env.stat()["entries"]
        if entries != len(crcs):
            raise AlexnetError(f"shard {task.path}: {entries} records but {len(crcs)} checksums (internal error)")
        env.sync(True)
    finally:
        env.close()
    A.write_record_crcs(path, np.asarray(crcs, dtype=np.uint32))  # last: marks the shard finished
    return ShardResult(task.split, task.index, len(crcs), value_bytes, rejected, processed, dict(conversions.counts))


# --------------------------------------------------------------------------- driver


@functools.lru_cache(maxsize=1)
def _git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _build_options(cfg: BuildConfig, source, shards: dict[str, int]) -> dict:
    return {
        "resize_shorter": C.RESIZE_SHORTER,
        "stored_size": C.STORED_SIZE,
        "jpeg_quality": cfg.jpeg_quality,
        "resample": images.RESAMPLE_NAME,
        "draft_min_factor": images.DRAFT_MIN_FACTOR,
        "exif_orientation": "ignored",
        "seed": cfg.seed,
        "num_shards": shards,
        "splits": list(source.splits),
        "layouts": {n: s.layout for n, s in source.splits.items()},
        "source_digests": {n: s.digest() for n, s in source.splits.items()},
        "classes": len(source.classes),
        "pil": images.pil_summary(),
        "alexnet_version": package_version(),
        "git_revision": _git_revision(),
    }


def _remove_dataset(data_dir: Path) -> None:
    """--overwrite: delete the files this project writes (never anything else in the folder)."""
    for split in (*A.SPLITS, A.STATS_PENDING_DIR, A.STATS_COMMIT_DIR):
        if (data_dir / split).is_dir():
            shutil.rmtree(data_dir / split)
    for name in (A.MANIFEST_FILE, A.REJECTED_FILE, A.STATS_FILE, A.MEAN_IMAGE_FILE):
        (data_dir / name).unlink(missing_ok=True)


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    start: int
    stop: int


def _plan(cfg: BuildConfig, source, shards: dict[str, int]):
    """The manifest to fill in, the shard plans, and a function making a plan's task (its file list).

    Tasks are made only when dispatched, so at most a few shards' file lists exist at a time.
    """
    names = (
        list(source.class_names) if source.class_names is not None else read_class_names(source.root, source.classes)
    )
    manifest = A.Manifest(classes=source.classes, splits={}, class_names=names, complete=False)
    plans: list[ShardPlan] = []
    orders, labels = {}, {}
    for name, split in source.splits.items():
        n = len(split)
        orders[name] = A.shuffle_order(n, cfg.seed)  # order[position] = index in the sorted file list
        labels[name] = split.labels(source.classes)
        infos = []
        for i, (start, stop) in enumerate(A.shard_bounds(n, shards[name])):
            rel = f"{name}/{A.shard_name(name, i, shards[name])}"
            infos.append(A.ShardInfo(path=rel, num_records=0, first_position=start, stop_position=stop))
            plans.append(ShardPlan(name, i, start, stop))
        manifest.splits[name] = A.SplitInfo(num_records=0, source_count=n, shards=infos, layout=split.layout)

    def make_task(plan: ShardPlan) -> ShardTask:
        split, order, lab = source.splits[plan.split], orders[plan.split], labels[plan.split]
        locs = split.locations
        items = [
            (split.relpaths[i], int(lab[i]), None if locs is None else tuple(int(x) for x in locs[i]))
            for i in map(int, order[plan.start : plan.stop])
        ]
        # ~40 KB per record at quality 95; the map grows on demand anyway.
        map_size = cfg.initial_map_size or max(64 << 20, (plan.stop - plan.start) * 64 << 10)
        path = cfg.data_dir / manifest.splits[plan.split].shards[plan.index].path
        return ShardTask(
            plan.split,
            plan.index,
            str(path),
            str(split.root),
            plan.start,
            items,
            cfg.jpeg_quality,
            cfg.commit_every,
            map_size,
            split.archives,
        )

    return manifest, plans, make_task


def _check_existing(cfg: BuildConfig, options: dict) -> str:
    """'new', 'resume' or 'done'; refuses a dataset built with other options."""
    data_dir = cfg.data_dir
    if not (data_dir / A.MANIFEST_FILE).exists():
        stray = [s for s in A.SPLITS if (data_dir / s).exists()]
        if stray:
            raise AlexnetError(
                f"{data_dir} holds {', '.join(stray)}/ but no {A.MANIFEST_FILE}; "
                "choose another --data-dir or pass --overwrite to replace it"
            )
        return "new"
    old = A.read_manifest(data_dir, require_complete=False)
    differ = [k for k in _OUTPUT_OPTIONS if old.build.get(k) != options.get(k)]
    if old.complete and differ == ["pil"]:
        # A finished dataset stays valid after a PIL upgrade; only a half-built one must not mix versions.
        click.echo(f"note: {data_dir} was built with {old.build.get('pil')}, this is {options.get('pil')}", err=True)
        differ = []
    if differ:
        what = "; ".join(f"{k}: {old.build.get(k)!r} -> {options.get(k)!r}" for k in differ[:4])
        verb = "resume" if not old.complete else "reuse"
        raise AlexnetError(
            f"refusing to {verb} the dataset at {data_dir}: it was built with other options or another source "
            f"({what}); pass --overwrite to rebuild it"
        )
    return "done" if old.complete else "resume"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000


def build_lmdb(cfg: BuildConfig) -> A.Manifest:
    """Build (or finish, or confirm) the dataset at ``cfg.data_dir`` from ``cfg.source``."""
    t0 = time.monotonic()
    workers = cfg.workers or default_workers()
    pool = Pool(workers, build_shard)  # forked now, while this process is small (before the file listing)
    _git_revision()  # forks git now, while this process is small (before the file listing)
    # SIGTERM (a scheduler, `kill`) stops the build like Ctrl-C: workers killed, resumable.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if in_main_thread else None
    try:
        manifest, results, state = _build(cfg, pool)
    except BaseException:
        pool.kill()
        raise
    else:
        pool.close()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if results is not None:  # None: the dataset was already complete
        _finish(cfg, manifest, results, state, workers, time.monotonic() - t0)
    return manifest


def _build(cfg: BuildConfig, pool: Pool):
    """List and check the source, plan the shards, run them: ``(manifest, results or None if done, state)``."""
    source = detect_source(
        cfg.source,
        splits=cfg.splits,
        val_layout=cfg.val_layout,
        val_labels=cfg.val_labels,
        allow_missing_classes=cfg.allow_missing_classes,
        progress=cfg.progress,
    )
    for note in source.notes:
        click.echo(note if note.startswith("warning:") else f"note: {note}", err=True)
    given = {"train": cfg.train_shards, "val": cfg.val_shards}
    shards = {n: given.get(n) or default_num_shards(len(s)) for n, s in source.splits.items()}
    options = _build_options(cfg, source, shards)

    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(cfg.data_dir, os.W_OK):
        raise AlexnetError(f"cannot write to {cfg.data_dir}")
    if cfg.overwrite:
        _remove_dataset(cfg.data_dir)
    state = _check_existing(cfg, options)
    if state == "done":
        m = A.read_manifest(cfg.data_dir)
        counts = ", ".join(f"{n} {s.num_records} records" for n, s in m.splits.items())
        click.echo(f"nothing to do: {cfg.data_dir} is complete ({counts}); pass --overwrite to rebuild")
        return m, None, state

    manifest, plans, make_task = _plan(cfg, source, shards)
    manifest.build = options
    manifest.source = {
        "root": str(Path(cfg.source).resolve()),
        "splits": {
            n: {"dir": str(s.root), "files": len(s), "label_file": s.label_file, **_archives_of(s)}
            for n, s in source.splits.items()
        },
    }
    A.write_manifest(cfg.data_dir, manifest)  # complete=False until every shard is finished

    total = sum(p.stop - p.start for p in plans)
    counts = ", ".join(f"{len(s)} {n}" for n, s in source.splits.items())
    click.echo(
        f"{'resuming' if state == 'resume' else 'building'} {cfg.data_dir}: {counts} images, "
        f"{len(source.classes)} classes, {' + '.join(f'{shards[n]} {n}' for n in source.splits)} shards, "
        f"{_plural(min(pool.size, len(plans)), 'worker process', 'worker processes')}",
        err=True,
    )
    results = pool.run(
        sorted(plans, key=lambda p: p.start - p.stop),  # largest first
        name=lambda p: f"shard {manifest.splits[p.split].shards[p.index].path}",
        hint="a full disk? free space and run the same command again: it resumes",
        prepare=make_task,
        bar={"total": total, "unit": "img", "disable": not cfg.progress},
    )
    return manifest, results, state


def _archives_of(split) -> dict:
    """How the manifest describes an archive source (a tree's description has no such entry)."""
    return {"archives": [a for a in split.archives if a]} if split.archives else {}


def _finish(
    cfg: BuildConfig, manifest: A.Manifest, results: list[ShardResult], state: str, workers: int, elapsed: float
) -> None:
    """Fill the manifest from the shards' results, write rejected.tsv and the complete manifest, summarise."""
    by_shard = {(r.split, r.index): r for r in results}
    rejected: list[dict[str, str]] = []
    for name, info in manifest.splits.items():
        split_rejected = []
        for i, sh in enumerate(info.shards):
            r = by_shard[(name, i)]
            sh.num_records = r.num_records
            split_rejected += [{"split": name, "path": rel, "reason": why} for rel, why in r.rejected]
        info.num_records = sum(sh.num_records for sh in info.shards)
        info.rejected = len(split_rejected)
        info.conversions = dict(
            sorted(sum((Counter(by_shard[(name, i)].conversions) for i in range(len(info.shards))), Counter()).items())
        )
        if info.num_records + info.rejected != info.source_count:
            raise AlexnetError(f"{name}: {info.num_records} records + {info.rejected} rejected != {info.source_count}")
        rejected += sorted(split_rejected, key=lambda r: r["path"])
    manifest.rejected = rejected
    lines = ["split\tpath\treason"] + [f"{r['split']}\t{r['path']}\t{r['reason']}" for r in rejected]
    A.atomic_write_bytes(cfg.data_dir / A.REJECTED_FILE, ("\n".join(lines) + "\n").encode())
    manifest.complete = True
    A.write_manifest(cfg.data_dir, manifest)

    processed = sum(r.processed + len(r.rejected) for r in results)
    value_bytes = sum(r.value_bytes for r in results)
    per_split = ", ".join(
        f"{n} {s.num_records} records in {len(s.shards)} shard{'s' if len(s.shards) > 1 else ''}"
        for n, s in manifest.splits.items()
    )
    click.echo(f"built {cfg.data_dir}: {per_split}; {_human_bytes(value_bytes)} of records")
    if rejected:
        why = Counter(r["reason"].split(" (")[0] for r in rejected)
        detail = ", ".join(f"{k} {v}" for k, v in sorted(why.items()))
        click.echo(f"rejected {len(rejected)} source files ({detail}); list in {cfg.data_dir / A.REJECTED_FILE}")
    converted = Counter()
    for info in manifest.splits.values():
        converted.update(info.conversions)
    if converted:
        detail = ", ".join(f"{k} {v}" for k, v in sorted(converted.items()))
        click.echo(f"converted on the way, and kept: {detail} (by split in {A.MANIFEST_FILE})")
    click.echo(
        f"processed {processed} images in {elapsed:.1f} s ({processed / max(elapsed, 1e-9):.1f} images/s, "
        f"{_plural(min(workers, len(results)), 'worker')})" + (" after resuming" if state == "resume" else "")
    )


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


EPILOG = """\b
Examples:
  alexnet-prep build-lmdb /imagenet                      # -> ./data (or $ALEXNET_DATA_DIR)
  alexnet-prep build-lmdb /imagenet --data-dir /fast/lmdb --workers 32
  alexnet-prep build-lmdb /kaggle/imagenet-object-localization-challenge   # Kaggle layout, detected
  alexnet-prep build-lmdb /imagenet --val-labels /imagenet/devkit/data/ILSVRC2012_validation_ground_truth.txt
  alexnet-prep build-lmdb /downloads        # ILSVRC2012_img_{train,val}.tar + devkit .tar.gz, read in place
  alexnet-prep build-lmdb /downloads/imagenet-object-localization-challenge.zip   # Kaggle's zip, in place
  alexnet-prep build-lmdb sample/ --data-dir demo/data --overwrite

\b
Interrupted (Ctrl-C, kill -9, power cut)? Run the same command again: it continues where it stopped.
"""


@click.command("build-lmdb", epilog=EPILOG)
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@data_dir_option
@config_options(BuildConfig)
def build_lmdb_command(src: Path, data_dir: Path, **options) -> None:
    """Turn ImageNet into LMDB shards: a tree (train/<wnid>/*.JPEG, val/ in any usual label format), or the
    archives as downloaded, read without extracting (SRC: the folder of ILSVRC2012_img_train.tar,
    ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz, or one of them; or Kaggle's zip or its folder).

    Each image is rescaled so its shorter side is 256 and its central 256x256 patch is stored as
    a JPEG inside a Caffe Datum (paper section 2), in a seeded global shuffle, in parallel.
    """
    cfg = BuildConfig(source=src, data_dir=data_dir, **options)
    with locks.hold(data_dir, locks.EXCLUSIVE, "alexnet-prep build-lmdb"):  # before the workers are forked
        build_lmdb(cfg)

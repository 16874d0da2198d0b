"""build-lmdb from image-net.org-style archives against the same files extracted to a tree, in one run.

1. Generates (or reuses) bench_build_lmdb's tree of photo-sized JPEGs (~500x375, quality 90,
   ~95 KB) and packs it as ``ILSVRC2012_img_train.tar`` (a tar of per-class tars), cached.
2. Alternates ``alexnet-prep build-lmdb TREE`` and ``alexnet-prep build-lmdb ARCHIVES`` (default
   workers: all cores), ``--repeat`` rounds, the order swapped every round; before each build every
   source file's pages are dropped from the page cache (posix_fadvise DONTNEED), so both read from
   the disk. Prints each build's images/s (wall time of the whole command, index pass included) and
   CPU ms/image, and the median ratio archive / tree (target >= 0.9).
3. Checks the two datasets are equal (records, every byte), then times ``pca-stats`` and ``verify`` on
   it: the per-record costs of the later steps on photo-derived records, for the ImageNet projection.

``--release 2010``: ILSVRC-2010's ``ILSVRC2010_images_train.tar`` instead, with 1% of the files
gzip-wrapped (in the tree as in the archive: as extracted by hand) and 0.5% blank banners in the
train tar replaced from ``patch_images.tar`` (the tree holds them patched). Target: CPU per image of
the archives within 5% of the tree's; the wall-clock ratio with cold caches is reported.

    python benchmarks/bench_archives.py                          # 3000 images, 3 rounds
    python benchmarks/bench_archives.py --images 6000 --repeat 5
    python benchmarks/bench_archives.py --release 2010 --repeat 6
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
from bench_build_lmdb import cpu_pressure, make_tree, run_build

from alexnet.pipeline import artifacts as A
from alexnet.tools import archives as AR

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fixture writers
from _writers import write_2010_archives, write_official_archives  # noqa: E402


def make_2010(tree: Path, out: Path) -> tuple[Path, Path]:
    """``(2010 tree, its archives)`` of ``tree``'s train split: the tree hard-linked, 1% of its files gzip-wrapped,
    the archives with 0.5% of the files as banners in the train tar and the real ones in patch_images.tar."""
    import gzip

    files = sorted((tree / "train").glob("*/*.JPEG"))
    tree10, archives = out / "tree", out / "archives"
    for k, f in enumerate(files):
        dst = tree10 / "train" / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if k % 100 == 7:
            dst.write_bytes(gzip.compress(f.read_bytes(), mtime=0))
        else:
            os.link(f, dst)
    patched = [f"train/{f.parent.name}/{f.name}" for k, f in enumerate(files) if k % 200 == 3]
    write_2010_archives(tree10, archives, patched)
    return tree10, archives


def drop_cache(root: Path) -> int:
    """posix_fadvise(DONTNEED) on every file under ``root`` (or ``root`` itself): the next read goes to the disk."""
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a freshly written source) are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return len(files)


def cached_fraction(root: Path) -> float:
    """Share of the source's bytes in the page cache (util-linux ``fincore``), to show the drop worked."""
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, files)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return float("nan")
    res = size = 0
    for line in out.splitlines():
        a, b = line.split()
        res, size = res + int(a), size + int(b)
    return res / max(size, 1)


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (all processes) of a command."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--images", type=click.IntRange(1), default=3000, show_default=True)
@click.option("--classes", type=click.IntRange(1), default=10, show_default=True)
@click.option("--repeat", type=click.IntRange(1), default=3, show_default=True)
@click.option("--release", type=click.Choice(["2012", "2010"]), default="2012", show_default=True)
@click.option(
    "--tree",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cached JPEG tree (bench_build_lmdb's). Default: ~/.cache/alexnet/bench-build-lmdb.",
)
def main(images: int, classes: int, repeat: int, release: str, tree: Path | None) -> None:
    """Archive vs extracted tree: images/s of build-lmdb with cold caches, median ratio; pca-stats, verify."""
    from alexnet.tools.pool import default_workers

    tree = tree or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alexnet" / "bench-build-lmdb"
    make_tree(tree, images, classes)
    archives = tree.parent / f"{tree.name}-archives{'-2010' if release == '2010' else ''}"
    stamp = archives / f".complete-{images}-{classes}"
    if not stamp.exists():
        shutil.rmtree(archives, ignore_errors=True)
        if release == "2010":
            make_2010(tree, archives)
        else:
            write_official_archives(tree, archives)
        stamp.write_text("")
    n = sum(1 for _ in (tree / "train").glob("*/*.JPEG"))
    train_tar = AR.OFFICIAL_TRAIN
    if release == "2010":
        tree, archives, train_tar = archives / "tree", archives / "archives", AR.ILSVRC2010["train"]
    size = (archives / train_tar).stat().st_size
    click.echo(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({default_workers()} workers), "
        f"shared with other jobs (load average {os.getloadavg()[0]:.2f}); {n} JPEGs, "
        f"mean {size / n / 1e3:.0f} KB; {train_tar} {size / 1e6:.0f} MB"
    )
    prep = str(Path(sys.executable).parent / "alexnet-prep")
    rates: dict[str, list[float]] = {"tree": [], "archives": []}
    cpu: dict[str, list[float]] = {"tree": [], "archives": []}
    with tempfile.TemporaryDirectory(prefix="bench-archives-") as tmp:
        out = {k: Path(tmp) / k for k in rates}
        src = {"tree": tree, "archives": archives}
        for r in range(repeat):
            for kind in ("tree", "archives") if r % 2 == 0 else ("archives", "tree"):
                drop_cache(src[kind])
                cached = cached_fraction(src[kind])
                ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                wall, _, _, _, _ = run_build(src[kind], out[kind])
                ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                rates[kind].append(n / wall)
                cpu[kind].append(1e3 * ((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)) / n)
                click.echo(
                    f"[{r + 1}/{repeat}] {kind:<8} {n / wall:7.1f} images/s, CPU {cpu[kind][-1]:.2f} ms/image "
                    f"(source {100 * cached:.0f}% cached before; load {os.getloadavg()[0]:.2f}, "
                    f"CPU pressure {cpu_pressure()})"
                )
        med = {k: statistics.median(v) for k, v in rates.items()}
        ratios = [a / t for a, t in zip(rates["archives"], rates["tree"], strict=True)]
        click.echo(
            f"median: tree {med['tree']:.1f} images/s, archives {med['archives']:.1f} images/s; "
            f"ratio archives / tree: median of medians {med['archives'] / med['tree']:.2f}x, "
            f"per round {', '.join(f'{x:.2f}' for x in ratios)} (target >= 0.9)"
        )
        cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
        click.echo(
            f"CPU ms/image (median): tree {cpu_med['tree']:.2f}, archives {cpu_med['archives']:.2f}; "
            f"archives / tree {cpu_med['archives'] / cpu_med['tree']:.3f}x (target <= 1.05)"
        )
        same = all(
            list(A.iter_shard(a)) == list(A.iter_shard(b))
            for a, b in zip(
                A.read_manifest(out["tree"]).shard_paths(out["tree"], "train"),
                A.read_manifest(out["archives"]).shard_paths(out["archives"], "train"),
                strict=True,
            )
        )
        click.echo(f"datasets equal record for record: {same}")
        data = out["archives"]
        disk = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
        click.echo(f"dataset on disk: {disk / n / 1e3:.1f} KB per record ({disk / 1e6:.0f} MB)")
        for step in (["pca-stats", "--no-progress"], ["verify", "--no-progress"]):
            wall, cpu_s = timed([prep, *step, "--data-dir", str(data)])
            click.echo(f"{step[0]}: {n / wall:.1f} records/s, CPU {1e3 * cpu_s / n:.2f} ms/record")


if __name__ == "__main__":
    main()

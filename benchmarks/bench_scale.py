"""The data tools as the work grows: build-lmdb, pca-stats and verify on one layout at two sizes 10x apart.

The layout: 1000 class folders of small synthetic JPEGs (the sample generator's drawings, 200x150,
quality 90), ``--small`` files and ten times as many, spread evenly over the classes (hard links
to 256 distinct files, so the source costs no disk and stays in the page cache: this measures how
the tools' own work and memory grow, not the disk). Each step runs as its own command (default
workers: all cores), timed from outside; its peak anonymous memory is RssAnon summed over its
process tree, sampled every 20 ms (RSS would also count LMDB's mapped file pages, which the kernel
can reclaim). Guards printed: records/s at the larger size >= 0.85x the smaller's (also computed
from CPU time per record, which other jobs on a shared machine disturb less); anonymous memory
growth < 0.5 KB per added record.

    python benchmarks/bench_scale.py                         # 11,000 and 110,000 files (~10 min on 2 cores)
    python benchmarks/bench_scale.py --small 2000            # quick check
"""

from __future__ import annotations

import io
import os
import platform
import resource
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
from bench_build_lmdb import cpu_pressure, run_sampled

CLASSES = 1000
DISTINCT = 256
STEPS = ("build-lmdb", "pca-stats", "verify")


def make_layout(root: Path, files: int) -> Path:
    """``root/train/<wnid>/<wnid>_<i>.JPEG``, ``files`` of them over CLASSES classes (cached)."""
    from PIL import Image

    from alexnet.tools.sample import draw_image

    stamp = root / f".complete-{files}"
    if stamp.exists():
        return root
    wnids = [f"n{10000000 + c:08d}" for c in range(CLASSES)]
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for k in range(DISTINCT):
        buf = io.BytesIO()
        image = draw_image(k % 10, 10, np.random.default_rng(k), size=(200, 150))
        Image.fromarray(image).save(buf, format="JPEG", quality=90)
        (blobs / f"{k}.JPEG").write_bytes(buf.getvalue())
    for i in range(files):
        wnid = wnids[i % CLASSES]
        d = root / "train" / wnid
        if i < CLASSES:
            d.mkdir(parents=True, exist_ok=True)
        os.link(blobs / f"{i % DISTINCT}.JPEG", d / f"{wnid}_{i}.JPEG")
    stamp.write_text("")
    return root


def _anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (all its processes) and peak RssAnon (KB) summed over its process tree."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, _, peak = run_sampled(cmd, lambda pid: (_anon_kb(pid),))
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime), (peak or [0])[0]


def measure(files: int, cache: Path, tmp: Path) -> dict[str, tuple[float, float, int]]:
    """records/s, CPU ms/record and peak anonymous KB of each step at one size."""
    prep = str(Path(sys.executable).parent / "alexnet-prep")
    src = make_layout(cache / f"scale-{files}", files)
    data = tmp / f"data-{files}"
    cmds = {
        "build-lmdb": [prep, "build-lmdb", str(src), "--data-dir", str(data), "--overwrite", "--no-progress"],
        "pca-stats": [prep, "pca-stats", "--data-dir", str(data), "--no-progress"],
        "verify": [prep, "verify", "--data-dir", str(data), "--no-progress"],
    }
    out = {}
    for step, cmd in cmds.items():
        wall, cpu, anon = run_measured(cmd)
        out[step] = (files / wall, 1e3 * cpu / files, anon)
        click.echo(
            f"{files:>8} {step:<11} {files / wall:8.1f} records/s  CPU {1e3 * cpu / files:.3f} ms/record  "
            f"peak anon {anon / 1024:6.1f} MB  "
            f"(load {os.getloadavg()[0]:.2f}, CPU pressure {cpu_pressure()})"
        )
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--small", type=click.IntRange(CLASSES), default=11_000, show_default=True)
@click.option("--factor", type=click.IntRange(2), default=10, show_default=True)
@click.option(
    "--repeat",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="Rounds, the order of the sizes swapped every round; each step's best rate counts.",
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the layouts are kept. Default: ~/.cache/alexnet/bench-scale.",
)
def main(small: int, factor: int, repeat: int, cache: Path | None) -> None:
    """records/s and peak anonymous memory of the three data tools at two sizes; the guards."""
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alexnet" / "bench-scale"
    large = small * factor
    click.echo(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, shared with other jobs "
        f"(load average {os.getloadavg()[0]:.2f}); {CLASSES} classes, {small} and {large} files"
    )
    runs: dict[int, list] = {small: [], large: []}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for r in range(repeat):  # small, large, large, small, ...: a drifting load favours neither
            for n in (small, large) if r % 2 == 0 else (large, small):
                runs[n].append(measure(n, cache, Path(tmp)))
    # Best rate (least disturbed by the other jobs), lowest CPU per record, highest memory of the rounds.
    res = {
        n: {s: (max(x[s][0] for x in v), min(x[s][1] for x in v), max(x[s][2] for x in v)) for s in STEPS}
        for n, v in runs.items()
    }
    click.echo(
        f"\n| step | {small:,} records | {large:,} records | rate ratio (>= 0.85) | CPU/record ratio "
        "| anon KB per added record (< 0.5) |"
    )
    click.echo("|---|---|---|---|---|---|")
    ok = cpu_ok = True
    for step in STEPS:
        (r1, c1, m1), (r2, c2, m2) = res[small][step], res[large][step]
        ratio, per = r2 / r1, (m2 - m1) / (large - small)
        ok &= ratio >= 0.85 and per < 0.5
        cpu_ok &= c1 / c2 >= 0.85 and per < 0.5
        click.echo(
            f"| {step} | {r1:,.0f} rec/s, {c1:.2f} ms CPU, {m1 / 1024:.0f} MB | {r2:,.0f} rec/s, "
            f"{c2:.2f} ms CPU, {m2 / 1024:.0f} MB | {ratio:.2f} | {c1 / c2:.2f} | {per:.3f} |"
        )
    click.echo(
        f"guards on the wall rate: {'met' if ok else 'NOT met'}; on CPU time per record (the same work, "
        f"less sensitive to the other jobs on a shared machine): {'met' if cpu_ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()

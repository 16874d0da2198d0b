"""alexnet-prep verify: its speed-up from worker processes, and what a cold page cache costs it.

1. Workers (issue 28's target): ``verify --workers 1`` and ``--workers 2`` as commands, alternated
   for ``--rounds`` rounds (order swapped every round); the median rate of each, their ratio
   (>= 1.5x) and the CPU time per record of each (summed over the command's processes; within 5%).
2. Cold reads (why verify's rate fell as the dataset grew): the dataset's pages dropped from the
   page cache (posix_fadvise DONTNEED on its data.mdb files) before each pass, then one process
   reads it with LMDB's readahead off (how verify opened shards before) and on (how it opens them
   now that it reads every record in key order): records/s, CPU per record and major page faults
   per record.

The dataset: ``--data-dir`` (an existing one), or bench_scale's layout (1000 classes of 200x150
JPEGs, hard links) of ``--records`` files built once into the cache.

    python benchmarks/bench_verify.py                        # 20,000 records, 3 rounds
    python benchmarks/bench_verify.py --data-dir /tmp/data-110000 --rounds 1
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
from bench_build_lmdb import cpu_pressure
from bench_scale import make_layout

from alexnet.pipeline import artifacts as A

PREP = str(Path(sys.executable).parent / "alexnet-prep")


def dataset(records: int, cache: Path) -> Path:
    """bench_scale's layout of ``records`` files, built once (cached)."""
    src = make_layout(cache / f"scale-{records}", records)
    data = cache / f"data-{records}"
    if not (data / A.MANIFEST_FILE).exists() or not A.read_manifest(data, require_complete=False).complete:
        subprocess.run([PREP, "build-lmdb", str(src), "--data-dir", str(data), "--no-progress"], check=True)
    return data


def run_verify(data: Path, workers: int) -> tuple[float, float]:
    """records/s and CPU ms per record of one ``verify --workers N`` command (all its processes)."""
    n = sum(s.num_records for s in A.read_manifest(data).splits.values())
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([PREP, "verify", "--data-dir", str(data), "--workers", str(workers), "--no-progress"], check=True)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return n / wall, 1e3 * cpu / n


def drop_from_cache(data: Path) -> None:
    for f in data.rglob("data.mdb"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_pass(data: Path, readahead: bool) -> tuple[float, float, float]:
    """records/s, CPU ms and major faults per record of one in-process verify (1 worker) from a cold cache."""
    from alexnet.tools import verify as V

    opened = A.open_shard
    A.open_shard = lambda path, **kw: opened(path, **{**kw, "readahead": readahead})
    try:
        drop_from_cache(data)
        ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        report = V.verify(V.VerifyConfig(data, workers=1, progress=False))
        wall, ru1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    finally:
        A.open_shard = opened
    n = report.checked
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return n / wall, 1e3 * cpu / n, (ru1.ru_majflt - ru0.ru_majflt) / n


def _load() -> str:
    return f"load {os.getloadavg()[0]:.1f}, CPU pressure {cpu_pressure()}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--records", type=click.IntRange(1000), default=20_000, show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True)
@click.option("--cold/--no-cold", default=True, show_default=True, help="Also the cold-cache passes (part 2).")
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where layouts and datasets are kept. Default: ~/.cache/alexnet/bench-scale.",
)
def main(records: int, data_dir: Path | None, rounds: int, cold: bool, cache: Path | None) -> None:
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alexnet" / "bench-scale"
    data = data_dir or dataset(records, cache)
    n = sum(s.num_records for s in A.read_manifest(data).splits.values())
    click.echo(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, shared ({_load()}); {data}: {n:,} records")
    run_verify(data, 2)  # the page cache warm for every timed run
    runs: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for r in range(rounds):
        for w in (1, 2) if r % 2 == 0 else (2, 1):
            runs[w].append(run_verify(data, w))
            click.echo(
                f"round {r + 1}: --workers {w}: {runs[w][-1][0]:7.0f} rec/s, {runs[w][-1][1]:.3f} ms CPU ({_load()})"
            )
    rate = {w: statistics.median(x[0] for x in v) for w, v in runs.items()}
    cpu = {w: statistics.median(x[1] for x in v) for w, v in runs.items()}
    speed, cpu_ratio = rate[2] / rate[1], cpu[2] / cpu[1]
    click.echo(
        f"medians: 1 worker {rate[1]:,.0f} rec/s, {cpu[1]:.3f} ms CPU/record; 2 workers {rate[2]:,.0f} rec/s, "
        f"{cpu[2]:.3f} ms CPU/record\nspeed-up {speed:.2f}x (target >= 1.5x: {'met' if speed >= 1.5 else 'NOT met'}); "
        f"CPU per record 2/1 = {cpu_ratio:.3f} (within 5%: {'met' if abs(cpu_ratio - 1) <= 0.05 else 'NOT met'})"
    )
    if cold:
        for r in range(rounds):
            for readahead in (False, True) if r % 2 == 0 else (True, False):
                rps, ms, faults = cold_pass(data, readahead)
                click.echo(
                    f"cold, 1 process, readahead {'on ' if readahead else 'off'}: {rps:7.0f} rec/s, {ms:.3f} ms CPU, "
                    f"{faults:.2f} major faults per record ({_load()})"
                )


if __name__ == "__main__":
    main()

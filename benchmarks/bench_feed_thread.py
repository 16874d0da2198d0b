"""The training thread's share of the feed: CPU time of the consuming thread per batch, both shuffles.

On a GPU host the thread that calls ``next(loader)`` also drives the training step, so whatever the
loader does on it (an LMDB read, a record parse, a copy, per image) is paid inside every step. This
script measures that cost directly: ``time.thread_time()`` around ``next(loader)`` (the CPU time of
the calling thread only, whatever else runs on the machine), per batch, for the global shuffle
(records read by key in a fresh permutation, in DALI's reader processes) and the buffer shuffle
(DALI's sequential caffe reader), at the trainer's defaults (``DataConfig()``, batch 128), and the
global shuffle with its reads on the training thread (``workers=0``), in rotating rounds.

    .venv/bin/python benchmarks/bench_feed_thread.py [--data-dir DIR] [--batches 30] [--rounds 3] [--cold]

``--cold`` drops the shards' pages from the page cache (posix_fadvise DONTNEED on every data.mdb)
before each measurement, as if the data were larger than RAM, and compares the rates as well.
Target (issue 21): global within 0.5 ms of buffer per batch; cold global rate >= 0.8x buffer's.
Without --data-dir it uses bench_pipeline.py's cached synthetic dataset (6000 records).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time
from pathlib import Path

import numpy as np

from alexnet.pipeline.loader import DataConfig, create_loader
from alexnet.trainer import constants as TC

# name -> the data settings measured: the trainer's defaults, and the reads on the training thread.
CONFIGS = {"global": {}, "buffer": {"shuffle": "buffer"}, "global-in-thread": {"workers": 0}}


def measure(data_dir: Path, config: dict, batch: int, batches: int, cold: bool) -> tuple[float, float]:
    """(consuming thread's CPU ms per batch, images/s) over ``batches`` batches after two warm-up ones."""
    from bench_pipeline import evict

    if cold:
        gc.collect()  # earlier loaders' memory maps closed: their pages can be dropped
        evict(data_dir)
    loader = create_loader(data_dir, "train", DataConfig(**config), batch_size=batch)
    stream = (b for _ in iter(int, 1) for b in loader)  # epoch after epoch
    for _ in range(2):
        next(stream)
    cpu = 0.0
    t0 = time.perf_counter()
    for _ in range(batches):
        c = time.thread_time()
        next(stream)
        cpu += time.thread_time() - c
    wall = time.perf_counter() - t0
    stream.close()
    del loader
    gc.collect()
    return 1e3 * cpu / batches, batches * batch / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--batch-size", type=int, default=TC.BATCH_SIZE)
    ap.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, help="reader processes per pipeline (default: DataConfig's)")
    ap.add_argument("--cold", action="store_true", help="drop the shards from the page cache before each measurement")
    args = ap.parse_args()
    from bench_pipeline import synth_dataset

    if args.workers is not None:
        CONFIGS["global"] = {"workers": args.workers}
    data = args.data_dir or synth_dataset(Path.home() / ".cache/alexnet/bench_pipeline", 6000)
    cfg = DataConfig()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load avg "
        f"{os.getloadavg()[0]:.1f} | dataset {data} | batch {args.batch_size} | DataConfig defaults: {cfg}"
        f"{' | cold page cache' if args.cold else ''}"
    )
    res: dict[str, list[tuple[float, float]]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name in list(res)[r % 3 :] + list(res)[: r % 3]:  # a rotating order
            res[name].append(measure(data, CONFIGS[name], args.batch_size, args.batches, args.cold))
        print(
            f"round {r + 1}: "
            + " | ".join(f"{k} {v[-1][0]:.2f} thread-CPU ms/batch, {v[-1][1]:,.0f} img/s" for k, v in res.items()),
            flush=True,
        )
    ms = {k: float(np.median([x[0] for x in v])) for k, v in res.items()}
    rate = {k: float(np.median([x[1] for x in v])) for k, v in res.items()}
    print(
        f"median consuming-thread CPU per batch of {args.batch_size}: global {ms['global']:.2f} ms, buffer "
        f"{ms['buffer']:.2f} ms, difference {ms['global'] - ms['buffer']:+.2f} ms (target <= +0.5 ms)"
    )
    print(f"the reads on the training thread (workers=0): {ms['global-in-thread']:.2f} ms per batch")
    print(
        f"median rate: global {rate['global']:,.0f} img/s, buffer {rate['buffer']:,.0f} img/s, ratio "
        f"{rate['global'] / rate['buffer']:.2f}x{' (target >= 0.8x cold)' if args.cold else ''}; in-thread "
        f"{rate['global-in-thread']:,.0f} img/s"
    )


if __name__ == "__main__":
    main()

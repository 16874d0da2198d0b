"""Train-pipeline throughput on the CPU: the DALI loader (CPU-only mode), with the global shuffle
(records read from LMDB by key in a fresh permutation every epoch, fed through external_source) and
with the buffer shuffle (the sequential caffe reader), against a plain torch DataLoader.

All three do the same per-image work over the same LMDB shards: read the Datum, decode the JPEG,
subtract the mean image at the crop offset, random 224 crop, flip, PCA lighting, NCHW float32.
The baseline does it with PIL (the active PIL: pillow-simd here) and numpy in DataLoader workers.
The three are measured in turn in every round, in a rotating order; the script prints the rates and the ratios
(targets: global / DataLoader >= 2x, medians of 3 rounds (issue 21; it was 2.5x with the reads on the
training thread, issue 15); global / buffer >= 0.95 (issue 15)).

    .venv/bin/python benchmarks/bench_pipeline.py [--data-dir DIR] [--images 6000] [--threads 2] [--rounds 6]

Both rates and the CPU time per image (all threads and worker processes, DALI's reader processes
included) are printed: the CPU time does not depend on what else runs on the machine, the rates do.

Without --data-dir it writes (once, cached in ~/.cache/alexnet) 6000 realistic 256x256 JPEG
records (quality 95) through the data contract.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import nvidia.dali
import PIL
import torch

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.pipeline.loader import DataConfig, create_loader
from alexnet.trainer import constants as TC

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fixture writers
from _writers import write_split  # noqa: E402


def synth_dataset(root: Path, n: int) -> Path:
    """Photo-like 256x256 JPEGs (gradients, texture, noise; ~40-60 KB at q95) written through the contract."""
    if (root / A.MANIFEST_FILE).exists() and A.read_manifest(root).splits["train"].num_records == n:
        return root
    from bench_pipeline_gpu import photo_jpeg  # the same generator as the GPU benchmark

    records = [(f"synth/{i}.JPEG", photo_jpeg(i), i % 10) for i in range(n)]
    split = write_split(root, "train", records, 1, seed=None, map_size=1 << 32)
    A.write_manifest(root, A.Manifest(classes=[f"n{i:08d}" for i in range(10)], splits={"train": split}))
    stats = A.Stats(
        mean_rgb=[124.0, 116.0, 104.0],
        eigval=[5000.0, 300.0, 60.0],
        eigvec=np.eye(3).tolist(),
        n_images=n,
        n_pixels=n * 65536,
    )
    A.write_stats(root, stats, np.full((256, 256, 3), 120.0, np.float32))
    return root


class TorchBaseline(torch.utils.data.Dataset):
    """The same augmentation with PIL and numpy, one record per __getitem__."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        m = A.read_manifest(data_dir)
        self.shards = m.shard_paths(data_dir, "train")
        self.keys = [k for s in self.shards for k, _ in A.iter_shard(s)]
        self.where = [i for i, s in enumerate(self.shards) for _ in range(m.splits["train"].shards[i].num_records)]
        self.mean_image = A.read_mean_image(data_dir)
        st = A.read_stats(data_dir)
        self.lighting = (st.eigvec_array * np.sqrt(st.eigval_array)[None, :]).astype(np.float32)
        self.envs = None

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        from PIL import Image

        if self.envs is None:  # opened in the worker
            self.envs = [A.open_shard(s) for s in self.shards]
        with self.envs[self.where[i]].begin() as txn:
            d = A.Datum.decode(txn.get(self.keys[i]))
        img = np.asarray(Image.open(io.BytesIO(d.data)).convert("RGB"), dtype=np.float32)
        x, y = np.random.randint(0, C.STORED_SIZE - C.CROP_SIZE + 1, 2)
        patch = (
            img[y : y + C.CROP_SIZE, x : x + C.CROP_SIZE] - self.mean_image[y : y + C.CROP_SIZE, x : x + C.CROP_SIZE]
        )
        if np.random.rand() < C.MIRROR_PROBABILITY:
            patch = patch[:, ::-1]
        patch = patch + self.lighting @ np.random.normal(0, C.LIGHTING_STD, 3).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1))), d.label


def proc_cpu_s(pids) -> float:
    """CPU seconds (user + system) used so far by the processes ``pids`` (all their threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def measure(batches_iter, pids, batch: int, batches: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) over ``batches`` batches, after one warm-up batch."""
    next(batches_iter)
    c0, t0 = proc_cpu_s(pids), time.perf_counter()
    for _ in range(batches):
        next(batches_iter)
    wall, cpu = time.perf_counter() - t0, proc_cpu_s(pids) - c0
    return batches * batch / wall, 1e3 * cpu / (batches * batch)


def rate_torch(data_dir: Path, batch: int, workers: int, batches: int) -> tuple[float, float]:
    ds = TorchBaseline(data_dir)
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=True,
        prefetch_factor=2,
    )

    def endless():
        while True:
            yield from dl

    it = endless()
    next(it)  # the workers are started
    pids = [os.getpid()] + [w.pid for w in dl._iterator._workers]
    out = measure(it, pids, batch, batches)
    del it
    return out


def rate_dali(data_dir: Path, batch: int, threads: int, batches: int, shuffle: str) -> tuple[float, float]:
    loader = create_loader(
        data_dir, "train", DataConfig(num_threads=threads, prefetch=2, shuffle=shuffle), batch_size=batch
    )

    def endless():
        while True:
            yield from loader

    it = endless()
    next(it)  # the pipelines and their reader processes are started
    readers = [pid for pipe in loader._pipes if pipe._py_pool is not None for pid in pipe._py_pool.pids()]
    return measure(it, [os.getpid(), *readers], batch, batches)


def evict(data_dir: Path) -> None:
    """Drop the shards' pages from the page cache (written back first), as if the data were larger than RAM."""
    for shard in A.read_manifest(data_dir).shard_paths(data_dir, "train"):
        fd = os.open(shard / "data.mdb", os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_reads(data_dir: Path, batch: int) -> None:
    """Records/s and MB/s of reading the whole split from a cold page cache, as if the data were larger
    than RAM: the global shuffle's random reads (an epoch's permutation, LMDB by key, one thread, as the
    loader's callback) and the buffer shuffle's sequential caffe reader (DALI, reading alone)."""
    from nvidia.dali import fn, pipeline_def

    from alexnet.pipeline.order import SplitIndex, epoch_order

    paths = A.read_manifest(data_dir).shard_paths(data_dir, "train")
    size, n = sum((s / "data.mdb").stat().st_size for s in paths), A.read_manifest(data_dir).splits["train"].num_records

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=2)
    def caffe():
        return fn.readers.caffe(path=[str(p) for p in paths], random_shuffle=True, initial_fill=4096)[1]

    def global_reads():
        index = SplitIndex(data_dir, "train")  # a fresh one: its memory map is not warm
        positions = index.positions[epoch_order(n, 0, 0)]
        for k in range(0, n, batch):
            index.read(positions[k : k + batch])

    def sequential():
        pipe = caffe()
        pipe.build()
        for _ in range(-(-n // batch)):
            pipe.run()

    for name, read in (("global (random reads)", global_reads), ("buffer (caffe reader)", sequential)):
        gc.collect()  # earlier readers' memory maps closed: their pages can be dropped
        evict(data_dir)
        t0 = time.perf_counter()
        read()
        dt = time.perf_counter() - t0
        print(
            f"cold read, {name}: {n / dt:,.0f} records/s, {size / dt / 1e6:,.0f} MB/s ({n} records, {size / 1e6:,.0f} MB)",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=TC.BATCH_SIZE)
    ap.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    ap.add_argument("--batches", type=int, default=40, help="timed batches per measurement (within one epoch)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument(
        "--cold-read", action="store_true", help="also time reads from a cold page cache, in key order and permuted"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = args.data_dir or synth_dataset(Path.home() / ".cache/alexnet/bench_pipeline", args.images)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores | torch {torch.__version__} "
        f"| PIL {PIL.__version__} | DALI {nvidia.dali.__version__}"
    )
    print(
        f"dataset {data}: batch {args.batch_size}, {args.batches} timed batches per measurement, "
        f"DALI {args.threads} threads vs DataLoader {args.threads} workers, in a rotating order, {args.rounds} rounds"
    )
    if args.cold_read:
        cold_reads(data, args.batch_size)
    rates: dict[str, list[tuple[float, float]]] = {"DataLoader": [], "global": [], "buffer": []}
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        names = list(rates)[r % 3 :] + list(rates)[: r % 3]  # each measured first, second and third in turn
        for name in names:
            if name == "DataLoader":
                rates[name].append(rate_torch(data, args.batch_size, args.threads, args.batches))
            else:
                rates[name].append(rate_dali(data, args.batch_size, args.threads, args.batches, name))
            gc.collect()  # the DataLoader's workers and the pipelines end before the next measurement
        print(
            f"round {r + 1}: "
            + " | ".join(f"{name} {v[-1][0]:7.1f} img/s ({v[-1][1]:.2f} CPU ms/img)" for name, v in rates.items())
            + f" (load avg before {load:.1f})",
            flush=True,
        )
    med = {name: np.median([x[0] for x in v]) for name, v in rates.items()}
    cpu = {name: np.median([x[1] for x in v]) for name, v in rates.items()}
    print("median img/s: " + ", ".join(f"{name} {v:.1f}" for name, v in med.items()))
    print(
        "CPU ms per image (independent of other load on the machine): "
        + ", ".join(f"{name} {v:.2f}" for name, v in cpu.items())
    )
    for num, den, target in (("global", "buffer", 0.95), ("global", "DataLoader", 2.0)):
        per_round = sorted(a[0] / b[0] for a, b in zip(rates[num], rates[den], strict=True))
        print(
            f"{num} / {den}: per-round median {np.median(per_round):.2f}x (min {per_round[0]:.2f}x, "
            f"max {per_round[-1]:.2f}x; target >= {target}x)"
        )


if __name__ == "__main__":
    main()

"""Train-pipeline throughput on the CPU: DALI (CPU-only mode) vs a plain torch DataLoader.

Both do the same per-image work over the same LMDB shards: read the Datum, decode the JPEG,
subtract the mean image at the crop offset, random 224 crop, flip, PCA lighting, NCHW float32.
The baseline does it with PIL (the active PIL: pillow-simd here) and numpy in DataLoader workers.
The two are measured alternately in one run; the script prints both rates and the ratio.

    .venv/bin/python benchmarks/bench_pipeline.py [--data-dir DIR] [--images 2000] [--threads 2] [--rounds 3]

Both rates and the CPU time per image (all threads and worker processes) are printed: the CPU
time does not depend on what else runs on the machine, the rates do.

Without --data-dir it writes (once, cached in ~/.cache/alexnet) 2000 realistic 256x256 JPEG
records (quality 95) through the data contract.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import time
from pathlib import Path

import numpy as np
import nvidia.dali
import PIL
import torch

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.pipeline.loader import LoaderConfig, create_loader
from alexnet.trainer import constants as TC


def synth_dataset(root: Path, n: int) -> Path:
    """Photo-like 256x256 JPEGs (gradients, texture, noise; ~40-60 KB at q95) written through the contract."""
    if (root / A.MANIFEST_FILE).exists() and A.read_manifest(root).splits["train"].num_records == n:
        return root
    from bench_pipeline_gpu import photo_jpeg  # the same generator as the GPU benchmark

    records = [(f"synth/{i}.JPEG", photo_jpeg(i), i % 10) for i in range(n)]
    split = A.write_split(root, "train", records, 1, seed=None, map_size=1 << 32)
    A.write_manifest(root, A.Manifest(classes=[f"n{i:08d}" for i in range(10)], splits={"train": split}))
    stats = A.Stats(mean_rgb=[124.0, 116.0, 104.0], eigval=[5000.0, 300.0, 60.0], eigvec=np.eye(3).tolist(),
                    n_images=n, n_pixels=n * 65536)  # fmt: skip
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
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                     persistent_workers=True, prefetch_factor=2)  # fmt: skip

    def endless():
        while True:
            yield from dl

    it = endless()
    next(it)  # the workers are started
    pids = [os.getpid()] + [w.pid for w in dl._iterator._workers]
    out = measure(it, pids, batch, batches)
    del it
    return out


def rate_dali(data_dir: Path, batch: int, threads: int, batches: int) -> tuple[float, float]:
    loader = create_loader(data_dir, "train", LoaderConfig(batch_size=batch, num_threads=threads, prefetch=2))

    def endless():
        while True:
            yield from loader

    return measure(endless(), [os.getpid()], batch, batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=TC.BATCH_SIZE)
    ap.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    ap.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = args.data_dir or synth_dataset(Path.home() / ".cache/alexnet/bench_pipeline", args.images)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores | torch {torch.__version__} "
          f"| PIL {PIL.__version__} | DALI {nvidia.dali.__version__}")  # fmt: skip
    print(f"dataset {data}: batch {args.batch_size}, {args.batches} timed batches per measurement, "
          f"DALI {args.threads} threads vs DataLoader {args.threads} workers, alternating, {args.rounds} rounds")  # fmt: skip
    dali, base = [], []
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        base.append(rate_torch(data, args.batch_size, args.threads, args.batches))
        dali.append(rate_dali(data, args.batch_size, args.threads, args.batches))
        print(f"round {r + 1}: DataLoader+PIL/numpy {base[-1][0]:7.1f} img/s ({base[-1][1]:.2f} CPU ms/img) | "
              f"DALI CPU {dali[-1][0]:7.1f} img/s ({dali[-1][1]:.2f} CPU ms/img) | ratio {dali[-1][0] / base[-1][0]:.2f}x "
              f"(load avg before {load:.1f})", flush=True)  # fmt: skip
    ratios = sorted(d[0] / b[0] for d, b in zip(dali, base, strict=True))
    med_d, med_b = np.median([d[0] for d in dali]), np.median([b[0] for b in base])
    cpu_d, cpu_b = np.median([d[1] for d in dali]), np.median([b[1] for b in base])
    print(f"median: DataLoader {med_b:.1f} img/s, DALI {med_d:.1f} img/s; per-round ratio median "
          f"{ratios[len(ratios) // 2]:.2f}x (min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x; target >= 2.5x)")  # fmt: skip
    print(f"CPU time per image: DataLoader {cpu_b:.2f} ms, DALI {cpu_d:.2f} ms ({cpu_b / cpu_d:.2f}x less; "
          "independent of other load on the machine)")  # fmt: skip


if __name__ == "__main__":
    main()

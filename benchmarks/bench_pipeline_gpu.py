"""Train-pipeline throughput on one GPU at batch 128, stage by stage, naming the bottleneck.

Each stage is a pipeline of its own over the same shards, batch size and threads, adding one step:
  read          fn.readers.caffe alone (LMDB -> JPEG bytes, shuffled)
  read+decode   + the "mixed" decoder (nvJPEG; hw_decoder_load of the JPEGs to the hardware decoder)
  full          the real train pipeline (mean image, crop, flip, PCA lighting), outputs left on the GPU
  loader        the loader the trainer uses (global shuffle: records read by key in a fresh permutation
                each epoch, fed through external_source): the full pipeline as torch tensors on cuda:0;
                also the buffer shuffle's loader, and the global shuffle's LMDB reading alone
The full pipeline is timed with the whole-image decoder and with region decoding (``roi_decode``), at
two hardware-decoder loads; the loader uses the fastest, with 1, 2 and 3 pipelines taking turns
(``--pipelines``; one pipeline decodes one batch at a time, so several keep the decoder busier), and
the decode and full stages are also timed with that many pipelines. The stages overlap (DALI runs
them concurrently), so the bottleneck is the first stage whose pipeline is already within 10% of the
final rate: the later stages barely slow it down. Before timing, a check:
the GPU pipeline's first batch against numpy applied to the same records decoded alone, with the
batch's own draws, equal up to the two JPEG decoders' differences.

    python benchmarks/bench_pipeline_gpu.py [--data-dir DIR] [--records 20480] [--threads 12]

Without --data-dir it writes a dataset through the data contract into /tmp/alexnet_gpu_bench:
--records records (4 shards) of 4096 distinct photo-like 256x256 JPEGs (quality 95, ~38 KB, about the size
of ImageNet records), drawn in parallel. Everything is printed as it happens; a stage that fails
prints its error and the script goes on.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
import traceback
from dataclasses import replace
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.trainer import constants as TC

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fixture writers
from _writers import write_split  # noqa: E402


def photo_jpeg(i: int) -> bytes:
    """A photo-like 256x256 JPEG (gradient, texture, noise; ~38 KB at q95), seeded by ``i``."""
    from PIL import Image

    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    c0, c1 = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / 512 + 0.5
    img = c0 + (c1 - c0) * t[..., None] + 25 * np.sin(xx * rng.uniform(0.02, 0.2))[..., None]
    img += rng.normal(0, 12, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def synth(root: Path, records: int, distinct: int = 4096, shards: int = 4) -> Path:
    """A train split (and a small val split) written through the data contract; reused if complete."""
    if (root / A.MANIFEST_FILE).exists():
        m = A.read_manifest(root)
        if m.splits["train"].num_records == records:
            return root
    distinct = min(distinct, records)
    with Pool(max(1, min(16, os.cpu_count() or 1))) as pool:
        jpegs = pool.map(photo_jpeg, range(distinct), chunksize=64)

    def write(split: str, n: int, n_shards: int) -> A.SplitInfo:
        records = [(f"s/{pos}.JPEG", jpegs[pos % distinct], pos % TC.NUM_CLASSES) for pos in range(n)]
        return write_split(root, split, records, n_shards, seed=None, map_size=1 << 34)

    splits = {"train": write("train", records, shards), "val": write("val", 1000, 1)}
    A.write_manifest(root, A.Manifest(classes=[f"n{i:08d}" for i in range(TC.NUM_CLASSES)], splits=splits))
    mean_image = np.random.default_rng(1).uniform(100, 140, A.MEAN_IMAGE_SHAPE).astype(np.float32)
    stats = A.Stats(
        mean_rgb=[124.0, 116.0, 104.0],
        eigval=[5000.0, 300.0, 60.0],
        eigvec=np.linalg.qr(np.random.default_rng(2).normal(size=(3, 3)))[0].tolist(),
        n_images=records,
        n_pixels=records * 65536,
    )
    A.write_stats(root, stats, mean_image)
    return root


def time_pipe(pipe, batches: int, warmup: int = 8) -> float:
    """Images/s of ``pipe.run()`` over ``batches`` batches (GPU work drained before the clock stops);
    ``pipe`` may be a list of pipelines, run in turn (one batch each)."""
    import torch
    from nvidia.dali.backend import TensorListGPU

    pipes = pipe if isinstance(pipe, list) else [pipe]
    for p in pipes:
        p.build()
    for _ in range(warmup):
        for p in pipes:
            p.run()
    t0 = time.perf_counter()
    n = 0
    while n < batches:
        for p in pipes:
            out = p.run()
            n += 1
    if isinstance(out[0], TensorListGPU):
        out[0].as_cpu()  # waits for the last batch's GPU work
        torch.cuda.synchronize()
    return n * pipes[0].max_batch_size / (time.perf_counter() - t0)


def decoded_records(data: Path, split: str, positions: np.ndarray, gpu: bool = False) -> np.ndarray:
    """The records at ``positions``, decoded alone (HWC uint8): by DALI's CPU decoder, or with ``gpu``
    by nvJPEG exactly as the GPU pipeline decodes them."""
    from nvidia.dali import fn, pipeline_def, types

    from alexnet.pipeline.loader import DataConfig
    from alexnet.pipeline.order import SplitIndex, unpacked

    jpegs = unpacked(*SplitIndex(data, split).read(np.asarray(positions))[:2])
    hw = {"hw_decoder_load": DataConfig().hw_decoder_load} if gpu else {}

    @pipeline_def(batch_size=len(jpegs), num_threads=2, device_id=0 if gpu else None)
    def pipe():
        encoded = fn.external_source(source=lambda: jpegs, batch=True, dtype=types.UINT8, ndim=1)
        return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB, **hw)

    p = pipe()
    p.build()
    (images,) = p.run()
    if gpu:
        images = images.as_cpu()
    return np.stack([np.array(images.at(i)) for i in range(len(jpegs))])


def read_rate(data: Path, batch: int, batches: int) -> float:
    """Records/s of the global shuffle's reading alone (one Python thread: the loader's external_source
    callback reads LMDB by key and parses the Datums on the thread that runs the pipelines)."""
    from alexnet.pipeline.order import SplitIndex, epoch_order

    index = SplitIndex(data, "train")
    order = index.positions[epoch_order(len(index), 0, 0)]
    t0 = time.perf_counter()
    for k in range(batches):
        index.read(order[(k * batch) % len(order) :][:batch])
    return batches * batch / (time.perf_counter() - t0)


def gpu_vs_cpu_check(data: Path, threads: int, device: str = "cuda:0", n: int = 32) -> bool:
    """The GPU pipeline's first batch against numpy applied to the same records decoded alone by
    nvJPEG, with the batch's own draws: the geometry, mean and lighting must agree (mean difference
    < 0.5 grey levels). The difference to libjpeg-turbo's decode is printed too."""
    from alexnet.pipeline.dali_pipeline import TEN_CROP_ORDER, lighting_scale_values
    from alexnet.pipeline.loader import DataConfig, create_loader

    mean_image = A.read_mean_image(data).astype(np.float64)
    stats = A.read_stats(data)
    s = lighting_scale_values(stats.eigval, C.DEFAULT_LIGHTING_SCALE)
    corner = {
        "top-left": (0, 0),
        "top-right": (32, 0),
        "bottom-left": (0, 32),
        "bottom-right": (32, 32),
        "centre": (16, 16),
    }
    ok = True
    for split in ("train", "val"):
        loader = create_loader(
            data,
            split,
            DataConfig(num_threads=threads),
            batch_size=n,
            seed=3,
            with_draws=True,
            device=device,
            ten_crop=split == "val",
        )
        images, labels, draws = next(iter(loader))
        got = images.float().cpu().numpy()
        gpu = device != "cpu"
        raw = decoded_records(data, split, draws["index"], gpu=gpu).astype(np.float64) - mean_image
        ref = np.empty_like(got)
        for i in range(len(draws["index"])):  # raw holds the batch's records in delivery order
            if split == "train":
                (x, y), m = draws["crop_xy"][i], draws["mirror"][i]
                patch = (raw[i] + stats.eigvec_array @ (draws["alpha"][i] * s))[y : y + 224, x : x + 224]
                ref[i] = (patch[:, ::-1] if m else patch).transpose(2, 0, 1)
            else:
                for j, (name, mirror) in enumerate(TEN_CROP_ORDER):
                    x, y = corner[name]
                    patch = raw[i][y : y + 224, x : x + 224]
                    ref[i, j] = (patch[:, ::-1] if mirror else patch).transpose(2, 0, 1)
        diff = np.abs(got - ref)
        good = images.device.type == device.split(":")[0] and not labels.dtype.is_floating_point and diff.mean() < 0.5
        ok &= good
        if gpu and split == "train":
            cpu_raw = decoded_records(data, split, draws["index"]).astype(np.float64)
            print(
                f"  decoders alone on these records: |nvJPEG - libjpeg-turbo| mean "
                f"{np.abs(raw + mean_image - cpu_raw).mean():.3f} grey levels",
                flush=True,
            )
        print(
            f"  {split}: {tuple(images.shape)} {images.dtype} on {images.device}; |pipeline - numpy(same decode)| "
            f"mean {diff.mean():.3f}, 99.9th pct {np.quantile(diff, 0.999):.2f}, max {diff.max():.1f} grey levels "
            f"-> {'OK' if good else 'MISMATCH'}",
            flush=True,
        )
    return ok


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--records", type=int, default=20480)
    ap.add_argument("--batch-size", type=int, default=TC.BATCH_SIZE)
    ap.add_argument("--threads", type=int, default=max(2, min(12, (os.cpu_count() or 4) - 2)))
    ap.add_argument("--batches", type=int, default=120, help="timed batches per stage")
    ap.add_argument("--skip-check", action="store_true", help="skip the GPU-vs-CPU correctness check")
    ap.add_argument(
        "--cpu-dry-run", action="store_true", help="run every step in DALI's CPU-only mode (tests the script)"
    )
    return ap.parse_args()


class Bench:
    """The stages, timed in turn over one dataset; ``rates`` maps a stage's name to its img/s."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from alexnet.pipeline.dali_pipeline import PipelineSpec
        from alexnet.pipeline.loader import DataConfig

        self.args, self.dry = args, args.cpu_dry_run
        self.dev_id, self.device, self.decoder = (None, "cpu", "cpu") if self.dry else (0, "cuda:0", "mixed")
        if not self.dry and not torch.cuda.is_available():
            sys.exit("error: no CUDA GPU visible (torch.cuda.is_available() is False)")
        self.data = args.data_dir or synth(Path("/tmp/alexnet_gpu_bench"), args.records)
        self.paths = [str(p) for p in A.read_manifest(self.data).shard_paths(self.data, "train")]
        self.b, self.th = args.batch_size, args.threads
        self.stats, self.mean_image = A.read_stats(self.data), A.read_mean_image(self.data)
        # The full graph behind the caffe reader (the buffer shuffle's input; the global shuffle feeds
        # the same graph through external_source, timed as "loader").
        self.spec0 = PipelineSpec(
            data=DataConfig(num_threads=self.th),
            is_training=True,
            batch_size=self.b,
            device_id=self.dev_id,
            dtype="float32",
            channels_last=False,
            ten_crop=False,
            seed=1,
            reader=(tuple(self.paths), 0, 1),
        )
        self.rates: dict[str, float] = {}

    def record(self, name: str, make) -> None:
        try:
            self.rates[name] = make()
            print(f"  {name:<36} {self.rates[name]:>10,.0f} img/s", flush=True)
        except Exception as e:  # a failing stage is reported, the others still run
            print(f"  {name:<36} FAILED: {type(e).__name__}: {(str(e).splitlines() or [repr(e)])[0][:200]}", flush=True)

    def stage(self, kind: str, hw: float, threads: int | None = None, part: tuple[int, int] = (0, 1)):
        """The caffe reader alone (``kind="read"``) or with the decoder, over DALI shard ``part``."""
        from nvidia.dali import fn, pipeline_def, types

        from alexnet.pipeline.dali_pipeline import SHUFFLE_BUFFER

        @pipeline_def(
            batch_size=self.b,
            num_threads=threads or self.th,
            device_id=self.dev_id,
            seed=1 + part[0],
            prefetch_queue_depth=2,
        )
        def pipe():
            jpegs, labels = fn.readers.caffe(
                path=self.paths,
                random_shuffle=True,
                initial_fill=SHUFFLE_BUFFER,
                pad_last_batch=True,
                shard_id=part[0],
                num_shards=part[1],
            )
            if kind == "read":
                return labels
            hw_arg = {} if self.dry else {"hw_decoder_load": hw}
            return fn.decoders.image(jpegs, device=self.decoder, output_type=types.RGB, **hw_arg)

        return pipe()

    def full(self, roi: bool, hw: float, threads: int, k: int = 1) -> float:
        """The full train graph behind the caffe reader, ``k`` pipelines over DALI shards, taking turns."""
        from alexnet.pipeline.dali_pipeline import create_pipeline

        data = replace(self.spec0.data, roi_decode=roi, hw_decoder_load=hw, num_threads=threads)
        specs = [replace(self.spec0, data=data, reader=(tuple(self.paths), i, k)) for i in range(k)]
        return time_pipe([create_pipeline(s, self.mean_image, self.stats) for s in specs], self.args.batches)

    def stages(self) -> tuple[bool, float, str]:
        """read, read+decode and the full graph; the fastest full graph's (roi_decode, hw load, name)."""
        print("stages:", flush=True)
        self.record("read", lambda: time_pipe(self.stage("read", 0.65), self.args.batches))
        for hw in (0.65, 0.9):
            self.record(
                f"read+decode hw_load={hw}", lambda hw=hw: time_pipe(self.stage("decode", hw), self.args.batches)
            )
        for roi in (False, True):
            for hw in (0.65, 0.9):
                self.record(f"full roi_decode={roi} hw_load={hw}", lambda roi=roi, hw=hw: self.full(roi, hw, self.th))
        full = {k: v for k, v in self.rates.items() if k.startswith("full")}
        best = max(full, key=full.get) if full else "full roi_decode=False hw_load=0.65"
        return "roi_decode=True" in best, float(best.rpartition("=")[2]), best

    def loader_rate(self, roi: bool, hw: float, k: int, threads: int, shuffle: str = "global") -> float:
        """The trainer's loader: torch batches on the device, after 8 warm-up batches."""
        import torch

        from alexnet.pipeline.loader import DataConfig, create_loader

        cfg = DataConfig(num_threads=threads, roi_decode=roi, hw_decoder_load=hw, pipelines=k, shuffle=shuffle)
        loader = create_loader(self.data, "train", cfg, batch_size=self.b, device=self.device)

        def endless():
            while True:
                yield from loader

        it = endless()
        for _ in range(8):
            next(it)
        if not self.dry:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(self.args.batches):
            x, y = next(it)
            assert x.shape == (self.b, 3, C.CROP_SIZE, C.CROP_SIZE) and y.dtype == torch.int64
            assert x.device.type == torch.device(self.device).type
        if not self.dry:
            torch.cuda.synchronize()
        return self.args.batches * self.b / (time.perf_counter() - t1)

    def loaders(self, roi: bool, hw: float) -> tuple[str | None, int, int]:
        """The loader with 1-3 pipelines (global shuffle), the buffer shuffle's and the global reading
        alone; the fastest global loader's (name, pipelines, threads)."""
        multi = ((1, self.th), (2, max(2, min(8, self.th))), (3, max(2, min(5, self.th))))  # (pipelines, threads)
        for k, threads in multi:
            self.record(
                f"loader (torch, {self.device}) x{k} pipelines, {threads} thr",
                lambda k=k, threads=threads: self.loader_rate(roi, hw, k, threads),
            )
        self.record(
            f"loader buffer shuffle x1 pipeline, {self.th} thr", lambda: self.loader_rate(roi, hw, 1, self.th, "buffer")
        )
        self.record(
            f"global read alone (LMDB by key + Datum, {self.b} records)",
            lambda: read_rate(self.data, self.b, self.args.batches),
        )
        loaders = {key: v for key, v in self.rates.items() if key.startswith("loader (torch")}
        key = max(loaders, key=loaders.get) if loaders else None
        k_best, th_best = next(((k, t) for k, t in multi if key and f" x{k} pipelines, {t} thr" in key), (1, self.th))
        return key, k_best, th_best

    def chain(self, roi: bool, hw: float, best: str, k_best: int, th_best: int) -> list[tuple[str, str]]:
        """(stage label, rate key) from reading to decoding and augmentation, with ``k_best`` pipelines."""
        chain = [("read", "read")] if "read" in self.rates else []
        if k_best > 1:  # the same stages with k_best pipelines taking turns
            parts = [(i, k_best) for i in range(k_best)]
            self.record(
                f"read+decode hw_load={hw} x{k_best}",
                lambda: time_pipe([self.stage("decode", hw, th_best, p) for p in parts], self.args.batches),
            )
            self.record(f"full roi_decode={roi} hw_load={hw} x{k_best}", lambda: self.full(roi, hw, th_best, k_best))
            keys = (f"read+decode hw_load={hw} x{k_best}", f"full roi_decode={roi} hw_load={hw} x{k_best}")
        else:
            decodes = {k: v for k, v in self.rates.items() if k.startswith("read+decode")}
            keys = (max(decodes, key=decodes.get) if decodes else "", best)
        labels = ("decode", "augmentation (mean, crop, flip, lighting)")
        return chain + [(label, key) for label, key in zip(labels, keys, strict=True) if key in self.rates]


def summarise(rates: dict[str, float], chain: list[tuple[str, str]], loader_key: str | None) -> float:
    """Print the chain's rates and its bottleneck; the fastest loader's img/s."""
    if loader_key:
        chain = [*chain, ("delivery to torch", loader_key)]
    print("summary (img/s): " + " -> ".join(f"{label.split(' (')[0]} {rates[key]:,.0f}" for label, key in chain))
    if chain:
        # Each stage's pipeline contains the previous one and the stages run concurrently: the
        # bottleneck is the first stage that alone is already (within 10%) as slow as the whole.
        end = rates[chain[-1][1]]
        name, key = next((label, key) for label, key in chain if rates[key] <= 1.1 * end)
        print(
            f"bottleneck: {name}: {rates[key]:,.0f} img/s on its own (with the stages before it) "
            f"against {end:,.0f} img/s for the whole chain"
        )
    return rates.get(loader_key, 0.0) if loader_key else 0.0


def main() -> None:
    args = parse_args()
    import nvidia.dali
    import torch

    dry = args.cpu_dry_run
    gpu_name = "CPU-only dry run" if dry else torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    print(
        f"{platform.node()}: {gpu_name}, {os.cpu_count()} CPU cores | torch {torch.__version__} "
        f"| DALI {nvidia.dali.__version__}",
        flush=True,
    )
    t0 = time.perf_counter()
    bench = Bench(args)
    print(
        f"dataset {bench.data}: {A.read_manifest(bench.data).splits['train'].num_records} train records, ready in "
        f"{time.perf_counter() - t0:.1f} s; batch {bench.b}, {bench.th} DALI threads, {args.batches} batches per stage",
        flush=True,
    )
    if not args.skip_check:
        print("GPU vs CPU pipeline check (first batch, same seed):", flush=True)
        try:
            gpu_vs_cpu_check(bench.data, bench.th, bench.device)
        except Exception:  # keep going: the timings are still worth having
            traceback.print_exc()
    roi, hw, best = bench.stages()
    loader_key, k_best, th_best = bench.loaders(roi, hw)
    final = summarise(bench.rates, bench.chain(roi, hw, best, k_best, th_best), loader_key)
    print(
        f"target >= 28,000 img/s on one H100 at batch 128 (moonshot 40,000): loader {final:,.0f} img/s -> "
        f"{'MET' if final >= 28000 else 'NOT MET'}; fastest settings: roi_decode={roi}, hw_decoder_load={hw}, "
        f"{k_best} pipeline(s) of {th_best} threads"
    )


if __name__ == "__main__":
    main()

"""Train-pipeline throughput on one GPU, stage by stage, to name the bottleneck.

Stages, each a pipeline of its own over the same shards at the same batch size:
  read           fn.readers.caffe only (LMDB -> JPEG bytes)
  decode         + nvJPEG ("mixed") full decode
  decode-roi     + nvJPEG region decode of the 224 crop
  full           the real train pipeline (crop, flip, mean image, lighting), outputs left on the GPU
  full+torch     the loader: the real pipeline delivered as torch tensors (what the trainer gets)
The bottleneck is the first stage whose rate is far below the one before it.

    python benchmarks/bench_pipeline_gpu.py [--data-dir DIR] [--records 16384] [--batch-size 128] [--threads 8]

Without --data-dir it synthesizes a dataset through the data contract (distinct photo-like
256x256 JPEGs at quality 95, each written under several keys) in /tmp.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from dataclasses import replace
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from alexnet.pipeline import artifacts as A


def _one_jpeg(i: int) -> bytes:
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


def synth(root: Path, records: int, distinct: int = 2048, shards: int = 4) -> Path:
    if (root / A.MANIFEST_FILE).exists():
        return root
    with Pool(min(16, os.cpu_count() or 1)) as pool:
        jpegs = pool.map(_one_jpeg, range(distinct), chunksize=32)
    infos = []
    for s, (start, stop) in enumerate(A.shard_bounds(records, shards)):
        rel = f"train/{A.shard_name('train', s, shards)}"
        env = A.open_shard(root / rel, readonly=False, map_size=1 << 34)
        with env.begin(write=True) as txn:
            for pos in range(start, stop):
                txn.put(A.make_key(pos, f"s/{pos}.JPEG"), A.Datum(jpegs[pos % distinct], pos % 1000, 256, 256).encode())
        env.close()
        infos.append(A.ShardInfo(path=rel, num_records=stop - start, first_position=start, stop_position=stop))
    A.write_manifest(root, A.Manifest(classes=[f"n{i:08d}" for i in range(1000)],
                                      splits={"train": A.SplitInfo(records, records, infos)}))  # fmt: skip
    A.write_stats(root, A.Stats(mean_rgb=[124.0, 116.0, 104.0], eigval=[5000.0, 300.0, 60.0],
                                eigvec=np.eye(3).tolist(), n_images=records, n_pixels=records * 65536),
                  np.full((256, 256, 3), 120.0, np.float32))  # fmt: skip
    return root


def time_pipe(pipe, batches: int, warmup: int = 10) -> float:
    pipe.build()
    for _ in range(warmup):
        pipe.run()
    t0 = time.perf_counter()
    for _ in range(batches):
        out = pipe.run()
    if hasattr(out[0], "as_cpu"):
        np.asarray(out[0].as_cpu().as_tensor())  # drain the GPU work before stopping the clock
    return batches * pipe.max_batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--records", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--batches", type=int, default=100)
    args = ap.parse_args()

    import torch
    from nvidia.dali import fn, pipeline_def, types

    from alexnet.pipeline.dali_pipeline import PipelineSpec, create_pipeline, spec_paths
    from alexnet.pipeline.loader import LoaderConfig, create_loader

    t0 = time.perf_counter()
    data = args.data_dir or synth(Path("/tmp/alexnet_gpu_bench"), args.records)
    print(f"dataset {data} ready in {time.perf_counter() - t0:.1f} s; {torch.cuda.get_device_name(0)}; "
          f"batch {args.batch_size}, {args.threads} DALI threads, {args.batches} batches per stage", flush=True)  # fmt: skip
    manifest = A.read_manifest(data)
    paths = list(spec_paths(data, manifest, "train"))
    b, th = args.batch_size, args.threads

    def stage(kind: str, roi: bool = False, hw: float = 0.65):
        @pipeline_def(batch_size=b, num_threads=th, device_id=0, seed=1, prefetch_queue_depth=2)
        def pipe():
            jpegs, labels = fn.readers.caffe(path=paths, random_shuffle=True, initial_fill=4096, pad_last_batch=True)
            if kind == "read":
                return labels
            if roi:
                return fn.decoders.image_crop(jpegs, device="mixed", crop=(224, 224), crop_pos_x=0.3, crop_pos_y=0.7,
                                              output_type=types.RGB, hw_decoder_load=hw)  # fmt: skip
            return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=hw)

        return pipe()

    rates = {}
    rates["read"] = time_pipe(stage("read"), args.batches)
    print(f"  read                       {rates['read']:>10,.0f} img/s", flush=True)
    for hw in (0.65, 0.99):
        rates[f"decode hw={hw}"] = time_pipe(stage("decode", hw=hw), args.batches)
        print(f"  + decode (hw_load {hw})      {rates[f'decode hw={hw}']:>10,.0f} img/s", flush=True)
        rates[f"decode-roi hw={hw}"] = time_pipe(stage("decode", roi=True, hw=hw), args.batches)
        print(f"  + decode ROI (hw_load {hw})  {rates[f'decode-roi hw={hw}']:>10,.0f} img/s", flush=True)
    stats, mean_image = A.read_stats(data), A.read_mean_image(data)
    base = PipelineSpec(shard_paths=tuple(paths), is_training=True, batch_size=b, num_threads=th, device_id=0)
    for roi in (True, False):
        for hw in (0.65, 0.99):
            spec = replace(base, roi_decode=roi, hw_decoder_load=hw, enable_checkpointing=True)
            key = f"full roi={roi} hw={hw}"
            rates[key] = time_pipe(create_pipeline(spec, mean_image, stats), args.batches)
            print(f"  full pipeline ROI={roi!s:5} hw_load {hw}  {rates[key]:>10,.0f} img/s", flush=True)

    loader = create_loader(data, "train", LoaderConfig(batch_size=b, num_threads=th, device="cuda:0"))

    def endless():
        while True:
            yield from loader

    it = endless()
    for _ in range(10):
        next(it)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(args.batches):
        x, _y = next(it)
    torch.cuda.synchronize()
    rates["loader"] = args.batches * b / (time.perf_counter() - t1)
    print(f"  loader (torch tensors on cuda:0, default spec) {rates['loader']:>10,.0f} img/s", flush=True)
    order = ["read", "decode hw=0.65", "full roi=True hw=0.65", "loader"]
    drops = [(rates[order[i]] / rates[order[i + 1]], order[i + 1]) for i in range(len(order) - 1)]
    worst = max(drops)
    print(f"bottleneck: {worst[1]} (rate falls {worst[0]:.1f}x from the stage before it)")
    print(f"target >= 20,000 img/s on one H100 at batch 128: loader gives {rates['loader']:,.0f}")


if __name__ == "__main__":
    main()

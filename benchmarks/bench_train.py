"""Training throughput: synthetic batches vs the real pipeline's batches, side by side, one run.

The same model, optimiser and step run twice: first on one batch already on the device
(synthetic: the model's ceiling), then on the DALI pipeline's batches read from LMDB. The ratio
says whether the pipeline keeps the model fed (goal: >= 0.95 on a GPU host).

    # CPU orientation (2-core machine): small batch, a few steps
    python benchmarks/bench_train.py --device cpu --batch-size 16
    # GPU host (one H100), the paper's batch (default precision on a GPU: bf16), compiled forward:
    python benchmarks/bench_train.py --device cuda --batch-size 128 --compile
    # ... in the paper's fp32, with a real dataset instead of the synthesized one:
    python benchmarks/bench_train.py --device cuda --precision fp32 --data-dir /data/imagenet-lmdb

Without ``--data-dir`` it synthesizes (once, cached under ``--cache``) a dataset of ``--records``
256x256 JPEG records in 1000 classes through the data contract, so the network is the full
60,965,224-parameter one. Images are smooth random fields with mild noise: JPEG sizes near real
ImageNet crops (about 20-40 KB), not noise (which would decode slowly and unrealistically).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.trainer import constants as TC

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fixture writers
from _writers import stats_of_images, write_split  # noqa: E402

DISTINCT_IMAGES = 512  # distinct JPEGs, cycled over the records (decode cost per record is what matters)


def _smooth_image(rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    low = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((C.STORED_SIZE, C.STORED_SIZE), Image.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def synth_dataset(data_dir: Path, records: int, num_classes: int = TC.NUM_CLASSES, val_records: int = 1000) -> Path:
    """A contract dataset of ``records`` train and ``val_records`` val JPEG records (cached)."""
    from PIL import Image

    data_dir = Path(data_dir)
    manifest = data_dir / A.MANIFEST_FILE
    if manifest.exists():
        m = A.read_manifest(data_dir)
        if m.splits["train"].num_records == records and len(m.classes) == num_classes:
            return data_dir
        raise SystemExit(f"{data_dir} holds another synthetic dataset; delete it or choose another --cache")
    t0 = time.monotonic()
    rng = np.random.default_rng(0)
    arrays = [_smooth_image(rng) for _ in range(DISTINCT_IMAGES)]
    jpegs = []
    for arr in arrays:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)  # quality as the authors stored (ALEXNET.md)
        jpegs.append(buf.getvalue())
    splits = {}
    for split, n, shards in (("train", records, 4), ("val", val_records, 1)):
        recs = [(f"synthetic/{pos}.JPEG", jpegs[pos % DISTINCT_IMAGES], pos % num_classes) for pos in range(n)]
        size = sum(len(jpeg) + 64 for _, jpeg, _ in recs) // shards
        info = write_split(data_dir, split, recs, shards, seed=None, map_size=max(1 << 26, 2 * size))
        info.layout = "synthetic"
        splits[split] = info
    A.write_stats(data_dir, *stats_of_images(np.stack(arrays), {"synthetic": True}))
    classes = [f"n{90000000 + i:08d}" for i in range(num_classes)]
    A.write_manifest(data_dir, A.Manifest(classes=classes, splits=splits, build={"synthetic": True}))
    mean_kb = np.mean([len(j) for j in jpegs]) / 1024
    print(f"synthesized {records} records ({mean_kb:.0f} KB JPEGs) in {time.monotonic() - t0:.0f} s: {data_dir}")
    return data_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--gpus", default=None, help="trainer --gpus value (default: '0' for cuda, 'cpu' for cpu)")
    p.add_argument("--data-dir", type=Path, default=None, help="a real dataset (default: synthesize one)")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "alexnet-bench-train")
    p.add_argument("--records", type=int, default=None, help="synthetic train records (default 10000 cuda, 512 cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 cuda, 16 cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    p.add_argument(
        "--no-cuda-graph",
        dest="cuda_graph",
        action="store_false",
        help="eager steps instead of one CUDA graph per step (the trainer's default)",
    )
    p.add_argument("--threads", type=int, default=None, help="DALI threads (default: CPU count, at most 16)")
    p.add_argument("--prefetch", type=int, default=3, help="batches the pipeline prepares ahead")
    p.add_argument("--roi-decode", action="store_true", help="decode only the crop window")
    p.add_argument("--hw-decoder-load", type=float, default=0.9, help="GPU: share for the hardware JPEG decoder")
    p.add_argument("--pipelines", type=int, default=0, help="DALI pipelines taken in turn (0: 2 on a GPU, 1 on CPU)")
    p.add_argument("--decoder", choices=("auto", "mixed", "cpu"), default="auto", help="JPEG decoding")
    p.add_argument("--warmup", type=int, default=None, help="default 10 cuda, 2 cpu")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 50 cuda, 5 cpu)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()

    import torch

    from alexnet.trainer.bench import benchmark
    from alexnet.trainer.config import TrainConfig
    from alexnet.trainer.rundir import versions

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU")
    batch = args.batch_size or (TC.BATCH_SIZE if cuda else 16)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    steps = args.steps or (50 if cuda else 5)
    records = args.records or (10_000 if cuda else 512)
    threads = args.threads or min(os.cpu_count() or 1, 16)
    if args.data_dir is None:
        data_dir = synth_dataset(args.cache / f"synthetic-{records}", records)
    else:
        data_dir = args.data_dir
    config = TrainConfig.create(
        data_dir=str(data_dir),
        gpus=args.gpus or ("0" if cuda else "cpu"),
        batch_size=batch,
        precision=args.precision,
        compile=args.compile,
        cuda_graph=args.cuda_graph,
        num_threads=threads,
        prefetch=args.prefetch,
        hw_decoder_load=args.hw_decoder_load,
        roi_decode=args.roi_decode,
        decoder=args.decoder,
        pipelines=args.pipelines,
        progress=False,
    )
    t0 = time.monotonic()
    res = benchmark(config, warmup=warmup, steps=steps)
    v = versions()
    machine = ", ".join(v["gpus"]) if cuda else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"\nalexnet training throughput ({machine}; torch {v['torch']}, DALI {v['dali']})")
    print(
        f"  {res['device_note']}; batch {batch}; {res['step']}; {warmup} warm-up + {steps} timed steps; "
        f"{threads} DALI threads, prefetch {args.prefetch}, hw_decoder_load {args.hw_decoder_load}{', roi_decode' if args.roi_decode else ''}"
    )
    print(f"  synthetic batches  : {res['synthetic_images_per_s']:9.1f} images/s")
    print(f"  pipeline batches   : {res['pipeline_images_per_s']:9.1f} images/s")
    verdict = "meets" if res["ratio"] >= 0.95 else "below"
    print(f"  ratio pipeline/synthetic: {res['ratio']:.3f}  ({verdict} the 0.95 goal)")
    print(f"  ({time.monotonic() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({**res, "machine": machine, "versions": v}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())

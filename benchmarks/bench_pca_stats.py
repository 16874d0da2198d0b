"""pca-stats throughput against decoding alone, and PIL's pixels against DALI's CPU decoder.

In one run, on the same records with the same number of worker processes and the same task split:

1. builds (or reuses, cached under ``~/.cache/alexnet/bench-pca-stats``) a train split of
   ``--records`` photo-like 256x256 JPEGs (quality 95, like the stored centre crops) written through
   the data contract, and reads every record once to warm the page cache;
2. ``decode-only``: each worker reads its records and decodes them with PIL, nothing else;
   ``pca-stats``: ``compute_stats`` end to end (key listing, decoding, exact moments, merging);
   alternated ``--repeat`` times; prints images/s of both and the ratio (target >= 0.8);
3. per-image cost of each step in one process (decode, exact moments), for orientation;
4. decodes ``--compare`` records with PIL and with DALI's CPU decoder (``fn.decoders.image``,
   ``device="cpu"``, ``device_id=None``) and prints the mean and largest absolute pixel difference and
   the effect on the channel means and the eigenvalues.

    python benchmarks/bench_pca_stats.py                      # 1200 records, 2 workers, 3 repeats
    python benchmarks/bench_pca_stats.py --records 3000 --workers 4 --repeat 2
    python benchmarks/bench_pca_stats.py --repeat 1 --dali-device mixed     # PIL vs nvJPEG (GPU)
"""

from __future__ import annotations

import io
import os
import platform
import sys
import time
from pathlib import Path

import click
import numpy as np

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.pipeline.images import decode_record
from alexnet.tools import pca_stats as P
from alexnet.tools.pool import Pool

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fixture writers
from _writers import write_split  # noqa: E402

S = C.STORED_SIZE


# --------------------------------------------------------------------------- the records


def _octave(rng: np.random.Generator, cells: int, amp: float, channels: int) -> np.ndarray:
    from PIL import Image

    small = rng.normal(0, amp, (cells, cells, channels)).astype(np.float32)
    return np.stack(
        [
            np.asarray(Image.fromarray(small[..., c], mode="F").resize((S, S), Image.Resampling.BICUBIC))
            for c in range(channels)
        ],
        -1,
    )


def photo(rng: np.random.Generator) -> np.ndarray:
    """Photo-like uint8 (256, 256, 3): colour gradients, multi-scale luminance and chroma texture, grain."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    base = rng.uniform(50, 200, 3) + rng.uniform(-60, 60, 3) * xx[..., None] + rng.uniform(-60, 60, 3) * yy[..., None]
    luma = _octave(rng, 4, 35, 1) + _octave(rng, 24, 20, 1) + _octave(rng, 96, 18, 1)
    chroma = _octave(rng, 4, 20, 3) + _octave(rng, 20, 6, 3)
    grain = rng.normal(0, 6, (S, S, 1))
    return np.clip(base + luma + chroma + grain, 0, 255).astype(np.uint8)


def make_dataset(root: Path, records: int, shards: int) -> None:
    from PIL import Image

    marker = root / "bench_records.txt"
    if marker.exists() and marker.read_text().strip() == f"{records} {shards}":
        click.echo(f"reusing the cached dataset {root}")
        return
    click.echo(f"writing {records} photo-like 256x256 JPEG records (quality 95) to {root} ...")
    rng = np.random.default_rng(0)
    recs = []
    for p in range(records):
        buf = io.BytesIO()
        Image.fromarray(photo(rng)).save(buf, "JPEG", quality=95)
        recs.append((f"n{p % 10:08d}/n{p % 10:08d}_{p}.JPEG", buf.getvalue(), p % 10))
    split = write_split(root, "train", recs, shards, seed=None, map_size=1 << 32)
    split.layout = "bench"
    A.write_manifest(root, A.Manifest(classes=[f"n{i:08d}" for i in range(10)], splits={"train": split}))
    marker.write_text(f"{records} {shards}\n")


def all_jpegs(root: Path) -> list[bytes]:
    m = A.read_manifest(root)
    return [A.Datum.decode(v).data for shard in m.shard_paths(root, "train") for _, v in A.iter_shard(shard)]


# --------------------------------------------------------------------------- the contenders


def _decode_task(task, _state) -> int:
    """The same reads and the same decode to an array as pca-stats' worker, without any statistics."""
    shard_path, _, keys = task
    env = A.open_shard(Path(shard_path))
    try:
        with env.begin(buffers=True) as txn:
            for key in keys:
                decode_record(A.Datum.decode(bytes(txn.get(key))).data)
    finally:
        env.close()
    return len(keys)


def decode_only(root: Path, workers: int) -> tuple[int, float]:
    """Decoding alone with pca-stats' own task split (and key listing) and worker processes."""
    cfg = P.PcaStatsConfig(workers=workers, progress=False)
    t0 = time.perf_counter()
    tasks, _ = P._plan(root, cfg, workers)
    with Pool(workers, _decode_task) as pool:
        n = sum(pool.run(tasks))
    return n, time.perf_counter() - t0


def pca_stats(root: Path, workers: int) -> tuple[int, float, A.Stats]:
    t0 = time.perf_counter()
    stats, _ = P.compute_stats(root, P.PcaStatsConfig(workers=workers, progress=False))
    return stats.n_images, time.perf_counter() - t0, stats


def per_image_costs(jpegs: list[bytes], n: int = 256, rounds: int = 5) -> dict[str, float]:
    """ms per image in one process, best of ``rounds`` alternated rounds (less sensitive to a shared machine)."""
    jpegs = jpegs[:n]
    n = len(jpegs)
    imgs = np.stack([decode_record(j) for j in jpegs])

    def decode():
        for j in jpegs:
            decode_record(j)

    def decode_and_moments():  # what a pca-stats worker does per record
        m = P.PixelMoments()
        for j in jpegs:
            m.add(decode_record(j))
        m.finalize()

    def moments(use_kernel: bool):
        m = P.PixelMoments(use_kernel=use_kernel)
        for im in imgs:
            m.add(im)
        m.finalize()

    fns = {
        "decode (PIL)": decode,
        "decode + moments": decode_and_moments,
        "moments, compiled kernel": lambda: moments(True),
        "moments, numpy path": lambda: moments(False),
    }
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], (time.perf_counter() - t0) / n * 1e3)
    best["one-process ratio decode / (decode + moments)"] = best["decode (PIL)"] / best["decode + moments"]
    return best


# --------------------------------------------------------------------------- PIL vs DALI


def dali_decode(jpegs: list[bytes], batch: int = 32, device: str = "cpu") -> np.ndarray:
    """Decode with DALI: ``"cpu"`` (CPU-only mode, ``device_id=None``) or ``"mixed"`` (nvJPEG on GPU 0)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=2, device_id=None if device == "cpu" else 0, prefetch_queue_depth=1)
    def pipe():
        return fn.decoders.image(
            fn.external_source(name="jpegs", dtype=types.UINT8), device=device, output_type=types.RGB
        )

    p = pipe()
    p.build()
    out = []
    for i in range(0, len(jpegs), batch):
        chunk = jpegs[i : i + batch]
        chunk = chunk + [chunk[-1]] * (batch - len(chunk))
        p.feed_input("jpegs", [np.frombuffer(j, dtype=np.uint8) for j in chunk])
        (res,) = p.run()
        res = res.as_cpu() if device != "cpu" else res
        out.extend(np.array(res.at(k)) for k in range(batch))
    return np.stack(out[: len(jpegs)])


def compare_decoders(jpegs: list[bytes], device: str = "cpu") -> dict[str, float]:
    pil = np.stack([decode_record(j) for j in jpegs])
    dali = dali_decode(jpegs, device=device)
    diff = np.abs(pil.astype(np.int16) - dali.astype(np.int16))
    stats = []
    for imgs in (pil, dali):
        m = P.PixelMoments()
        for i in range(0, len(imgs), P.CHUNK_IMAGES):
            m.update(imgs[i : i + P.CHUNK_IMAGES])
        stats.append(m.finalize())
    fp, fd = stats
    return {
        "records": len(jpegs),
        "mean |PIL - DALI| (grey levels)": float(diff.mean()),
        "max |PIL - DALI|": int(diff.max()),
        "pixel values that differ (%)": float((diff > 0).mean() * 100),
        "mean-image max |diff|": float(np.abs(fp.mean_image - fd.mean_image).max()),
        "mean RGB PIL": fp.mean_rgb.round(4).tolist(),
        "mean RGB DALI": fd.mean_rgb.round(4).tolist(),
        "mean RGB max |diff|": float(np.abs(fp.mean_rgb - fd.mean_rgb).max()),
        "eigval PIL": fp.eigval.round(3).tolist(),
        "eigval DALI": fd.eigval.round(3).tolist(),
        "eigval rel diff (%)": (np.abs(fp.eigval - fd.eigval) / fp.eigval * 100).round(4).tolist(),
        "eigvec max |diff|": float(np.abs(fp.eigvec - fd.eigvec).max()),
    }


# --------------------------------------------------------------------------- main


@click.command()
@click.option("--records", type=click.IntRange(min=100), default=1200, show_default=True)
@click.option("--shards", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True)
@click.option(
    "--compare",
    type=click.IntRange(min=0),
    default=300,
    show_default=True,
    help="Records decoded by both PIL and DALI's CPU decoder (0: skip).",
)
@click.option(
    "--data-dir", type=click.Path(path_type=Path), default=None, help="Default: ~/.cache/alexnet/bench-pca-stats."
)
@click.option(
    "--dali-device",
    type=click.Choice(["cpu", "mixed"]),
    default="cpu",
    show_default=True,
    help="DALI decoder compared with PIL: cpu (CPU-only mode) or mixed (nvJPEG, needs a GPU).",
)
def main(
    records: int, shards: int, workers: int, repeat: int, compare: int, data_dir: Path | None, dali_device: str
) -> None:
    root = data_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alexnet" / "bench-pca-stats"
    make_dataset(root, records, shards)
    jpegs = all_jpegs(root)  # also warms the page cache
    click.echo(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
        f"decoder {P.decoder_name()}; {len(jpegs)} records, mean JPEG {np.mean([len(j) for j in jpegs]) / 1e3:.1f} kB"
    )
    click.echo(f"\n{'run':>4} {'decode-only img/s':>18} {'pca-stats img/s':>16} {'ratio':>6}")
    ratios = []
    for r in range(repeat):
        if r % 2 == 0:  # alternate which goes first, so that a drifting machine load favours neither
            n_d, t_d = decode_only(root, workers)
            n_s, t_s, _ = pca_stats(root, workers)
        else:
            n_s, t_s, _ = pca_stats(root, workers)
            n_d, t_d = decode_only(root, workers)
        assert n_d == n_s == len(jpegs)
        ratios.append((n_s / t_s) / (n_d / t_d))
        click.echo(
            f"{r + 1:>4} {n_d / t_d:>18.1f} {n_s / t_s:>16.1f} {ratios[-1]:>6.2f}   (load {os.getloadavg()[0]:.2f})"
        )
    click.echo(
        f"ratio pca-stats / decode-only with {workers} workers: median {np.median(ratios):.2f} "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f}); target >= 0.8"
    )
    click.echo("\nper image, one process (ms, best of 5 alternated rounds):")
    for k, v in per_image_costs(jpegs).items():
        click.echo(f"  {k:<46} {v:.3f}")
    if compare:
        click.echo(f"\nPIL vs DALI {dali_device} decoder on {min(compare, len(jpegs))} records:")
        for k, v in compare_decoders(jpegs[:compare], dali_device).items():
            click.echo(f"  {k:<32} {v}")


if __name__ == "__main__":
    main()

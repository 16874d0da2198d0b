"""build-lmdb against a straightforward single-process Pillow loop, side by side, in one run.

1. Generates (or reuses, cached) a tree of ``--images`` ImageNet-typical JPEGs: mostly 500x375
   (some 375x500 and 500x333), quality 90, photo-like procedural content (smooth colour fields,
   textures at several scales, shapes with edges, sensor-like grain) so the files are ~95 KB
   like ImageNet's (~110 KB average).
2. Reads every file once so both contenders start from a warm page cache.
3. Baseline: one process, a plain loop: open, convert RGB, resize shorter side to 256, centre crop,
   JPEG encode q95, Caffe Datum, LMDB put (one transaction per 1000 images). It uses the same PIL
   that is installed (pillow-simd here) and the same resampling filter as build-lmdb (bilinear),
   so both do the same work and write the same pixels (checked below).
4. ``alexnet-prep build-lmdb`` in a subprocess with its defaults (all cores), timed from the outside
   (process start to exit: listing, planning, pool start-up, checksums and manifest included).
   Peak memory: the sum over the build's process tree of PSS (shared pages split between the
   processes sharing them) and of RSS (shared pages counted in each), sampled every 20 ms, and
   the largest single process's ru_maxrss.
5. A per-stage profile of the baseline (decode, resize, crop, encode) on a subset: where the time goes.

    python benchmarks/bench_build_lmdb.py                      # 3000 images, cached tree
    python benchmarks/bench_build_lmdb.py --images 6000 --tree /tmp/bench-tree
"""

from __future__ import annotations

import inspect
import io
import multiprocessing as mp
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C

TREE_VERSION = 1
SIZES = [((500, 375), 0.7), ((375, 500), 0.15), ((500, 333), 0.15)]


# --------------------------------------------------------------------------- the tree


def _octave(rng, h, w, freq, amp, channels):
    from PIL import Image

    small = rng.normal(0, amp, (max(2, h * freq // 500), max(2, w * freq // 500), channels)).astype(np.float32)
    return np.stack(
        [
            np.asarray(Image.fromarray(small[..., c], mode="F").resize((w, h), Image.Resampling.BICUBIC))
            for c in range(channels)
        ],
        -1,
    )


def photo(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A photo-like (H, W, 3) uint8 image: colour fields, multi-scale texture, hard-edged shapes, grain."""
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(60, 190, 3) + rng.uniform(-50, 50, 3) * (xx / w)[..., None]
    base = base + rng.uniform(-50, 50, 3) * (yy / h)[..., None]
    luma = _octave(rng, h, w, 6, 35, 1) + _octave(rng, h, w, 40, 22, 1) + _octave(rng, h, w, 160, 22, 1)
    chroma = _octave(rng, h, w, 6, 20, 3) + _octave(rng, h, w, 30, 6, 3)
    im = Image.fromarray(np.clip(base + luma + chroma, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 150))]
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    arr = np.asarray(im).astype(np.float32) + _octave(rng, h, w, 250, 18, 1) + rng.normal(0, 10, (h, w, 1))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _write_one(args) -> int:
    from PIL import Image

    path, seed = args
    rng = np.random.default_rng(seed)
    (w, h) = SIZES[int(rng.choice(len(SIZES), p=[p for _, p in SIZES]))][0]
    buf = io.BytesIO()
    Image.fromarray(photo(rng, w, h)).save(buf, format="JPEG", quality=90)
    Path(path).write_bytes(buf.getvalue())
    return len(buf.getvalue())


def make_tree(tree: Path, images: int, classes: int) -> None:
    stamp = tree / f".complete-v{TREE_VERSION}-{images}-{classes}"
    if stamp.exists():
        click.echo(f"reusing the cached tree {tree}")
        return
    shutil.rmtree(tree, ignore_errors=True)
    jobs = []
    for i in range(images):
        wnid = f"n{10000000 + i % classes:08d}"
        (tree / "train" / wnid).mkdir(parents=True, exist_ok=True)
        jobs.append((str(tree / "train" / wnid / f"{wnid}_{i}.JPEG"), i))
    t0 = time.monotonic()
    with mp.get_context("fork").Pool() as pool:
        sizes = pool.map(_write_one, jobs, chunksize=32)
    stamp.write_text("")
    click.echo(f"generated {images} JPEGs in {time.monotonic() - t0:.0f} s, mean {np.mean(sizes) / 1e3:.0f} KB")


# --------------------------------------------------------------------------- baseline


def baseline(tree: Path, out: Path) -> tuple[int, float]:
    """The straightforward single-process loop a user would write first."""
    from PIL import Image

    files = sorted((tree / "train").glob("*/*.JPEG"))
    wnids = sorted({p.parent.name for p in files})
    env = A.open_shard(out, readonly=False, map_size=1 << 32)
    t0 = time.perf_counter()
    txn = env.begin(write=True)
    for i, path in enumerate(files):
        im = Image.open(path).convert("RGB")
        w, h = im.size
        scale = C.RESIZE_SHORTER / min(w, h)
        nw, nh = max(C.RESIZE_SHORTER, round(w * scale)), max(C.RESIZE_SHORTER, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - C.STORED_SIZE) // 2, (nh - C.STORED_SIZE) // 2
        im = im.crop((left, top, left + C.STORED_SIZE, top + C.STORED_SIZE))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        datum = A.Datum(data=buf.getvalue(), label=wnids.index(path.parent.name), height=256, width=256)
        txn.put(A.make_key(i, f"{path.parent.name}/{path.name}"), datum.encode())
        if (i + 1) % 1000 == 0:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    env.sync(True)
    env.close()
    return len(files), time.perf_counter() - t0


PLAIN_PILLOW_SPEC = ("pillow>=11", "lmdb", "numpy")


def plain_pillow_python(cache: Path) -> Path:
    """A virtualenv with plain Pillow (not pillow-simd), made once: the issue's baseline is a plain-Pillow loop.

    The project's own environment must keep pillow-simd active, so plain Pillow lives apart from it.
    """
    venv = cache / "plain-pillow-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        click.echo(f"creating {venv} with plain Pillow for the baseline (once)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", *PLAIN_PILLOW_SPEC], check=True)
    return py


def baseline_plain_pillow(py: Path, tree: Path, out: Path, shim: Path) -> tuple[int, float, str]:
    """Run :func:`baseline`, unchanged, under plain Pillow in its own interpreter."""
    (shim / "alexnet").mkdir(parents=True, exist_ok=True)
    link = shim / "alexnet" / "pipeline"
    if not link.exists():
        link.symlink_to(Path(A.__file__).resolve().parent)
    code = (
        "import io, time\nfrom pathlib import Path\nimport PIL\n"
        "from alexnet.pipeline import artifacts as A\nfrom alexnet.pipeline import constants as C\n"
        + inspect.getsource(baseline)
        + f"\nn, t = baseline(Path({str(tree)!r}), Path({str(out)!r}))\nprint(n, t, PIL.__version__)\n"
    )
    r = subprocess.run(
        [str(py), "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(shim)}
    )
    n, t, version = r.stdout.split()
    return int(n), float(t), version


def profile_stages(tree: Path, n: int = 300) -> dict[str, float]:
    """CPU milliseconds per image in each stage of the baseline, on the first n files."""
    from PIL import Image

    files = sorted((tree / "train").glob("*/*.JPEG"))[:n]
    t = dict.fromkeys(("read", "decode", "resize (whole image)", "crop", "encode q95"), 0.0)
    for path in files:
        t0 = time.process_time()
        data = path.read_bytes()
        t1 = time.process_time()
        im = Image.open(io.BytesIO(data)).convert("RGB")
        t2 = time.process_time()
        w, h = im.size
        s = C.RESIZE_SHORTER / min(w, h)
        nw, nh = round(w * s), round(h * s)
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        t3 = time.process_time()
        im = im.crop(((nw - 256) // 2, (nh - 256) // 2, (nw - 256) // 2 + 256, (nh - 256) // 2 + 256))
        im.load()
        t4 = time.process_time()
        im.save(io.BytesIO(), format="JPEG", quality=95)
        t5 = time.process_time()
        for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            t[k] += dt
    return {k: 1e3 * v / len(files) for k, v in t.items()}


# --------------------------------------------------------------------------- build-lmdb


def cpu_pressure() -> str:
    """Linux PSI: share of time some runnable task waited for a CPU (other load on the machine)."""
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
        return ", ".join(f"{kv.split('=')[0]} {kv.split('=')[1]}%" for kv in some[1:3])
    except (OSError, IndexError):
        return "unknown"


def _tree_pids(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return pids


def _mem_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in KB. PSS splits shared pages between their users, so sums do not double count."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def run_sampled(cmd: list[str], measure) -> tuple[float, str, list[int]]:
    """Run ``cmd``; wall seconds, its output, and the peak of each of ``measure(pid)``'s values summed over
    its process tree, sampled every 20 ms (exits with the output if the command fails)."""
    peak: list[int] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample():
        while proc.poll() is None:
            totals = [sum(v) for v in zip(*(measure(p) for p in _tree_pids(proc.pid)), strict=True)]
            peak[:] = [max(a, b) for a, b in zip(peak or totals, totals, strict=True)]
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    elapsed = time.perf_counter() - t0
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output}")
    return elapsed, output, peak


def run_build(tree: Path, out: Path) -> tuple[float, str, int, int, int]:
    """Wall time, output, peak summed RSS and PSS (KB) over the process tree, max single-process ru_maxrss (KB)."""
    prep = Path(sys.executable).parent / "alexnet-prep"
    cmd = [str(prep), "build-lmdb", str(tree), "--data-dir", str(out), "--overwrite", "--no-progress"]
    elapsed, output, peak = run_sampled(cmd, _mem_kb)
    rss, pss = peak or (0, 0)
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return elapsed, output, rss, pss, maxrss


def same_pixels(baseline_dir: Path, built: Path, n: int = 100) -> float:
    """Mean |difference| (grey levels) between the baseline's and build-lmdb's records of the same files."""
    from PIL import Image

    base = {A.parse_key(k)[1]: A.Datum.decode(v).data for k, v in A.iter_shard(baseline_dir)}
    diffs = []
    for key, d in A.iter_records(built, "train"):
        rel = A.parse_key(key)[1]
        a = np.asarray(Image.open(io.BytesIO(d.data))).astype(float)
        b = np.asarray(Image.open(io.BytesIO(base[rel]))).astype(float)
        diffs.append(np.abs(a - b).mean())
        if len(diffs) >= n:
            break
    return float(np.mean(diffs))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--images", type=click.IntRange(1), default=3000, show_default=True)
@click.option("--classes", type=click.IntRange(1), default=10, show_default=True)
@click.option(
    "--repeat",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Alternate baseline and build-lmdb this many times; the best (fastest) run of each counts.",
)
@click.option(
    "--tree",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the generated JPEG tree lives (cached). Default: ~/.cache/alexnet/bench-build-lmdb.",
)
def main(images: int, classes: int, repeat: int, tree: Path | None) -> None:
    """Single-process Pillow loop vs build-lmdb (default workers): images/s, ratio, peak memory."""
    from alexnet.pipeline.images import pil_summary
    from alexnet.tools.pool import default_workers

    tree = tree or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alexnet" / "bench-build-lmdb"
    make_tree(tree, images, classes)
    files = sorted((tree / "train").glob("*/*.JPEG"))
    total_bytes = sum(p.stat().st_size for p in files)
    for p in files:  # warm the page cache for both contenders
        p.read_bytes()
    workers = default_workers()
    click.echo(
        f"machine: {platform.machine()}, {os.cpu_count()} cores ({workers} usable), "
        f"load average {os.getloadavg()[0]:.2f}, CPU pressure {cpu_pressure()}; PIL: {pil_summary()}"
    )
    click.echo(f"tree: {len(files)} JPEGs, mean {total_bytes / len(files) / 1e3:.0f} KB")
    plain_py = plain_pillow_python(tree.parent)
    base_runs, build_runs, plain_runs = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-build-lmdb-") as tmp:
        tmp = Path(tmp)
        for r in range(repeat):
            shutil.rmtree(tmp / "plain", ignore_errors=True)
            n, t_plain, plain_version = baseline_plain_pillow(plain_py, tree, tmp / "plain", tmp / "shim")
            plain_runs.append(t_plain)
            click.echo(
                f"[{r + 1}/{repeat}] baseline, plain Pillow {plain_version}: {n / t_plain:.1f} images/s; ", nl=False
            )
            shutil.rmtree(tmp / "baseline", ignore_errors=True)
            cpu0 = time.process_time()
            n, t_base = baseline(tree, tmp / "baseline")
            base_runs.append((t_base, time.process_time() - cpu0))
            click.echo(f"baseline, pillow-simd: {n / t_base:.1f} images/s", nl=False)
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t_build, output, peak_rss, peak_pss, maxrss = run_build(tree, tmp / "built")
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
            build_runs.append((t_build, cpu, output, peak_rss, peak_pss, maxrss))
            click.echo(
                f"; build-lmdb {n / t_build:.1f} images/s (load average {os.getloadavg()[0]:.2f}, "
                f"CPU pressure {cpu_pressure()})"
            )
        t_base, cpu_base = min(base_runs)
        t_build, cpu_build, output, _, _, _ = min(build_runs, key=lambda b: b[0])
        rate_base, rate_build = n / t_base, n / t_build
        click.echo(
            f"baseline (1 process, plain loop): {n} images in {t_base:.1f} s = {rate_base:.1f} images/s, "
            f"CPU {1e3 * cpu_base / n:.2f} ms/image"
        )
        click.echo(
            f"build-lmdb ({workers} workers):         {n} images in {t_build:.1f} s = {rate_build:.1f} images/s, "
            f"CPU {1e3 * cpu_build / n:.2f} ms/image (wall time of the whole command, all processes' CPU)"
        )
        for line in output.strip().splitlines():
            click.echo(f"    | {line}")
        rate_plain = n / min(plain_runs)
        click.echo(f"baseline (1 process, plain loop) under plain Pillow {plain_version}: {rate_plain:.1f} images/s")
        click.echo(
            f"ratio build-lmdb / plain-Pillow loop (the issue's baseline): {rate_build / rate_plain:.2f}x "
            "(target >= 3.0x)"
        )
        click.echo(f"ratio build-lmdb / the same loop under pillow-simd: {rate_build / rate_base:.2f}x")
        click.echo(
            f"CPU per image, baseline / build-lmdb: {cpu_base / cpu_build:.2f}x "
            f"(x {workers} cores = {workers * cpu_base / cpu_build:.2f}x: the ratio on an otherwise idle machine)"
        )
        peak_rss = max(b[3] for b in build_runs)
        peak_pss = max(b[4] for b in build_runs)
        maxrss = max(b[5] for b in build_runs)
        click.echo(
            f"build-lmdb peak memory: sum over its processes {peak_pss / 1024:.0f} MB PSS "
            f"({peak_rss / 1024:.0f} MB RSS, shared pages counted in each process), "
            f"largest single process {maxrss / 1024:.0f} MB RSS"
        )
        click.echo(
            f"same work: mean |pixel difference| between the two outputs "
            f"{same_pixels(tmp / 'baseline', tmp / 'built'):.3f} grey levels"
        )
    stages = profile_stages(tree)
    total = sum(stages.values())
    click.echo(
        f"baseline stages (ms/image, {total:.2f} total): "
        + ", ".join(f"{k} {v:.2f} ({100 * v / total:.0f}%)" for k, v in stages.items())
    )


if __name__ == "__main__":
    main()

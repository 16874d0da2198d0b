"""``alexnet-prep pca-stats``: the exact mean image and the RGB PCA of the training set, in one pass.

What it computes (paper §2 and §4.1), over every train record (or a seeded ``--sample N``):

* the per-pixel mean image, float32 (256, 256, 3), RGB, 0-255: the "mean activity over the
  training set" subtracted from each pixel (§2); summed in integers, so it is exact before the
  final division;
* the per-channel mean and the 3x3 covariance of all RGB pixel values (population covariance,
  divided by the number of pixels), and its eigen-decomposition for PCA lighting (§4.1):
  eigenvalues descending, unit eigenvectors as columns (rows R, G, B).

Exactness. Pixel values are integers 0..255, so each chunk of images gets exact integer moments.
The compiled kernel (``_moments.c``, built by ``setup.py``; used where it was built) adds each
decoded image in one fused pass to uint16 per-pixel sums and to uint32 column sums of squares and
neighbour products down the image's rows, and the chunk is folded in before either could overflow
(256 images). Without the kernel the same integers come from numpy: channel sums in int64 and the
six distinct sums of products in float32 down blocks of 256 rows (every partial sum is an integer
below 256 * 255**2 < 2**24, so float32 adds them exactly; see ``_gram_exact``). The tests check
both against each other and a direct numpy computation. The chunk's co-moment matrix
``sum (x - m)(x - m)^T = (N * S2 - S S^T) / N`` is formed in Python integers and rounded once.
Chunks, workers and shards are combined with the pairwise update of Chan, Golub and LeVeque
(counts, means, co-moments), which is stable in float64 and independent of how the records were
split up to rounding (the tests pin 1e-6 / 1e-5 relative against a direct numpy computation).

Sign convention of the eigenvectors. An eigenvector is only defined up to sign; each column ``i``
is oriented so that its dot product with ``SIGN_REFERENCE[i]`` is positive: the first (brightness)
axis points to dark, all components negative for ordinary photographs; the second to red over blue
(R - B > 0); the third to red and blue over green (R - 2G + B > 0). This reproduces the widely used
ImageNet eigenvectors (``constants.IMAGENET_REFERENCE_EIGVEC``) column for column. Where a dot
product is zero the largest-magnitude component is made negative.

Decoder. The stored JPEGs are decoded by ``images.decode_record`` (the one decoder of stored records)
with PIL (pillow-simd on libjpeg-turbo, ISLOW IDCT, fancy upsampling). The training pipeline decodes them with DALI (CPU: libjpeg-turbo through
nvImageCodec; GPU: nvJPEG), whose pixels can differ from PIL's by a grey level here and there.
``benchmarks/bench_pca_stats.py`` measures the difference on the same records: PIL and DALI's CPU
decoder gave bit-identical pixels on 300 quality-95 256x256 records (mean absolute difference 0.0,
so the same means and eigenvalues); nvJPEG on a GPU is measured there with ``--dali-device mixed``
(``benchmarks/results_pca_stats.md``). Non-RGB JPEGs (grayscale, CMYK) are converted
to RGB as DALI's ``output_type=RGB`` does; build-lmdb stores RGB only.

Bad input: no manifest, a half-built dataset, no train split, missing shards, or a shard whose record
count disagrees with the manifest fail with one clear line. A record that does not decode (not a
Datum, not a JPEG, not 256x256) is skipped, counted, listed in the summary and in ``source``; more than
``--max-skipped`` of the records skipped fails the run without writing anything. Files are written
atomically through the data contract (an interrupted run leaves the old files or none).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from alexnet.pipeline import artifacts as A
from alexnet.pipeline import constants as C
from alexnet.pipeline import locks
from alexnet.pipeline.cli_common import config_options, data_dir_option, opt, package_version
from alexnet.pipeline.errors import AlexnetError
from alexnet.pipeline.images import decode_record, pil_summary
from alexnet.tools.pool import Pool, default_workers, report

try:  # the fused compiled pass (tools/_moments.c, built by setup.py where a C compiler is available)
    from alexnet.tools import _moments as _kernel

    KERNEL_MISSING = ""
except ImportError as _e:  # pragma: no cover - depends on the build
    _kernel = None
    KERNEL_MISSING = f"{_e}; reinstall with a C compiler (gcc) to build it"

SPLIT = "train"  # §2: the mean activity over the *training* set; §4.1: PCA over the training set
# Images per numpy chunk (without the compiled kernel).
CHUNK_IMAGES = 64
# A chunk's integer sums stay exact: uint16 per-pixel sums for up to 257 images (257 * 255 < 2**16),
# uint32 per-column sums of products for up to 66,051 rows (66,051 * 255**2 < 2**32).
UINT16_SAFE_IMAGES = 256
UINT32_SAFE_ROWS = (2**32 - 1) // 255**2
# Rows per float32 block: a column's sum of products is at most 256 * 255**2 < 2**24 (exact in float32).
BLOCK_PIXELS = 256
MAX_LISTED_SKIPS = 20
# Eigenvector orientation (see the module docstring): column i has a positive dot product with row i.
SIGN_REFERENCE = np.array([[-1.0, -1.0, -1.0], [1.0, 0.0, -1.0], [1.0, -2.0, 1.0]])


@dataclass(frozen=True)
class PcaStatsConfig:
    """``alexnet-prep pca-stats``' settings, each default written once here (its options are these fields)."""

    sample: int = opt(0, "Use a seeded random sample of N train records (0: all).", min=0)
    seed: int = opt(0, "Seed of --sample.")
    workers: int = opt(0, "Decoding processes (0: one per CPU core).", min=0)
    max_skipped: float = opt(
        0.001, "Fail (writing nothing) if more than this fraction of records does not decode.", min=0.0, max=1.0
    )
    progress: bool = opt(True, "A progress bar.")


# --------------------------------------------------------------------------- exact moments


def _gram_exact(images: np.ndarray) -> np.ndarray:
    """``sum over pixels of x x^T`` (3x3, int64), exactly, for uint8 images ``[n, H, W, 3]``.

    The interleaved values (R G B R G B ...) are cut into blocks of 256 rows of 768 values (256
    pixels); a value's channel is its column modulo 3. Per block, in float32: squares, products with
    the next value (R*G at columns 0 mod 3, G*B at 1 mod 3) and with the one after (R*B at 0 mod 3),
    each summed down the 256 rows: at most 256 * 255**2 < 2**24, so every partial sum is an exact
    integer whatever the order. Column sums are added in float64 (exact below 2**53). The products
    that straddle two pixels fall in the columns that are never read. Works on the interleaved
    layout block by block (cache-sized, no transpose): it costs about as much as three passes over
    the pixels.
    """
    flat = np.ascontiguousarray(images).reshape(-1)
    cols = 3 * BLOCK_PIXELS
    block = BLOCK_PIXELS * cols  # 256 rows of 768 values; a multiple of 3, so pixels never straddle blocks
    buf = np.zeros(block + 2, dtype=np.float32)  # two trailing zeros: the shifted views stay in bounds
    views = [buf[k : k + block].reshape(BLOCK_PIXELS, cols) for k in range(3)]  # value, next, the one after
    col = np.empty(cols, dtype=np.float32)
    sums = np.zeros((3, cols), dtype=np.float64)  # squares, shift-1 products, shift-2 products
    for lo in range(0, flat.size, block):
        part = flat[lo : lo + block]
        np.copyto(buf[: part.size], part, casting="unsafe")
        buf[part.size : block] = 0.0  # padding adds nothing
        for k in range(3):
            np.einsum("ij,ij->j", views[0], views[k], out=col)  # multiply and sum down the rows, one pass
            sums[k] += col
    return _gram_of_columns(*sums)


def _gram_of_columns(sq: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """The 3x3 int64 ``sum x x^T`` from per-column sums of interleaved R G B values: squares, products
    with the next value and with the one after (a value's channel is its column modulo 3)."""
    out = np.empty((3, 3), dtype=np.int64)
    out[0, 0], out[1, 1], out[2, 2] = int(sq[0::3].sum()), int(sq[1::3].sum()), int(sq[2::3].sum())
    out[0, 1] = out[1, 0] = int(p1[0::3].sum())  # R*G
    out[1, 2] = out[2, 1] = int(p1[1::3].sum())  # G*B
    out[0, 2] = out[2, 0] = int(p2[0::3].sum())  # R*B
    return out


def _channel_sums(pixel_sums: np.ndarray) -> np.ndarray:
    """Per-channel int64 sums of an interleaved (..., 3) array; rows of 768 values when they fit (faster)."""
    flat = pixel_sums.reshape(-1)
    if flat.size % (3 * BLOCK_PIXELS) == 0:  # a contiguous reduction down rows, then 256 pixels per channel
        return flat.reshape(-1, 3 * BLOCK_PIXELS).sum(0, dtype=np.int64).reshape(-1, 3).sum(0)
    return flat.reshape(-1, 3).sum(0, dtype=np.int64)


class PixelMoments:
    """Mergeable accumulator: image count, per-pixel int64 sums, and RGB pixel moments in float64.

    ``add`` one uint8 image ``[H, W, 3]``, ``update`` a stack ``[n, H, W, 3]``, ``merge`` another
    accumulator (Chan et al.), ``finalize`` for the statistics. Every ``flush_every`` images the chunk's
    exact integer moments (compiled kernel, or ``_gram_exact``) are folded in: module docstring, "Exactness".
    """

    def __init__(self, image_shape: tuple[int, int, int] = A.MEAN_IMAGE_SHAPE, use_kernel: bool | None = None):
        self.image_shape = tuple(image_shape)
        if use_kernel and _kernel is None:
            raise RuntimeError(f"the compiled moments kernel is not available ({KERNEL_MISSING})")
        self.use_kernel = _kernel is not None if use_kernel is None else bool(use_kernel)
        self._n_images = 0  # folded in; n_images adds the pending ones
        self.n_pixels = 0
        self.mean = np.zeros(3, dtype=np.float64)
        self.comoment = np.zeros((3, 3), dtype=np.float64)  # sum over pixels of (x - mean)(x - mean)^T
        self._image_sum = np.zeros(self.image_shape, dtype=np.int64)
        h, w, _ = self.image_shape
        self._row_len = w * 3
        # A chunk stays exact while its uint16 pixel sums and uint32 column sums cannot overflow.
        self.flush_every = max(1, min(UINT16_SAFE_IMAGES, UINT32_SAFE_ROWS // h))
        self._pending = 0  # images added since the last flush
        self._pix: np.ndarray | None = None  # kernel: uint16 per-value sums; numpy: uint8 image buffer
        self._cols: np.ndarray | None = None  # kernel: uint32 (3, row_len) column sums

    @property
    def n_images(self) -> int:
        return self._n_images + self._pending

    @property
    def image_sum(self) -> np.ndarray:
        """Per-pixel int64 sums over every image added so far."""
        self._flush()
        return self._image_sum

    def add(self, image: np.ndarray) -> None:
        if image.dtype != np.uint8 or image.shape != self.image_shape:
            raise ValueError(
                f"expected a uint8 image [{', '.join(map(str, self.image_shape))}], got {image.dtype} {image.shape}"
            )
        if self._pix is None:
            if self.use_kernel:
                self._pix = np.zeros(self.image_shape, dtype=np.uint16)
                self._cols = np.zeros((3, self._row_len), dtype=np.uint32)
            else:
                self._pix = np.empty((min(CHUNK_IMAGES, self.flush_every), *self.image_shape), dtype=np.uint8)
        if self.use_kernel:
            _kernel.accumulate(np.ascontiguousarray(image), self._row_len, self._pix, self._cols)
        else:
            self._pix[self._pending] = image
        self._pending += 1
        if self._pending == (self.flush_every if self.use_kernel else len(self._pix)):
            self._flush()

    def update(self, images: np.ndarray) -> None:
        for image in np.asarray(images):  # add() checks each image
            self.add(image)
        self._flush()

    def _flush(self) -> None:
        """Fold the pending chunk's exact moments into the running ones."""
        n = self._pending
        if n == 0:
            return
        if self.use_kernel:
            pix = self._pix
            self._image_sum += pix
            s = [int(v) for v in _channel_sums(pix)]
            s2 = _gram_of_columns(*self._cols.astype(np.int64))
            pix.fill(0)
            self._cols.fill(0)
        else:
            images = self._pix[:n]
            part = images.sum(0, dtype=np.uint16)  # exact per pixel (at most 256 images)
            self._image_sum += part
            s = [int(v) for v in _channel_sums(part)]
            s2 = _gram_exact(images)
        self._pending = 0
        count = n * self.image_shape[0] * self.image_shape[1]
        mean = np.array([v / count for v in s])
        # exact integer numerator, one rounding: (N S2 - S S^T) / N
        m2 = np.array([[(count * int(s2[a, b]) - s[a] * s[b]) / count for b in range(3)] for a in range(3)])
        self._combine(count, mean, m2)
        self._n_images += n

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        # Chan, Golub & LeVeque (1979): pairwise combination of counts, means and co-moments.
        n_a = self.n_pixels
        if n_b == 0:
            return
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.comoment = self.comoment + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.n_pixels = n

    def merge(self, other: PixelMoments) -> PixelMoments:
        if other.image_shape != self.image_shape:
            raise ValueError(f"cannot merge moments of {other.image_shape} images into {self.image_shape}")
        self._flush()
        other._flush()
        self._combine(other.n_pixels, other.mean, other.comoment)
        self._image_sum += other._image_sum
        self._n_images += other._n_images
        return self

    def __getstate__(self) -> dict:  # what a worker sends back: flushed, without the chunk buffers
        self._flush()
        return {**self.__dict__, "_pix": None, "_cols": None}

    def finalize(self) -> Finalized:
        self._flush()
        if self.n_images == 0:
            raise AlexnetError("no images were accumulated")
        cov = self.comoment / self.n_pixels
        cov = (cov + cov.T) / 2  # symmetric by construction; make it bit-symmetric for eigh
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        eigval = np.maximum(eigval[order], 0.0)  # a covariance is PSD: negatives are rounding only
        eigvec = orient_eigvec(eigvec[:, order])
        mean_image = (self._image_sum / self.n_images).astype(np.float32)
        return Finalized(self.mean.copy(), cov, eigval, eigvec, mean_image, self.n_images, self.n_pixels)


@dataclass
class Finalized:
    mean_rgb: np.ndarray  # (3,) float64, 0-255
    covariance: np.ndarray  # (3, 3) float64, population covariance of RGB pixel values
    eigval: np.ndarray  # (3,) descending
    eigvec: np.ndarray  # (3, 3) unit columns, rows R, G, B
    mean_image: np.ndarray  # float32 (H, W, 3)
    n_images: int
    n_pixels: int

    def to_stats(self, source: dict) -> A.Stats:
        """The contract's ``Stats`` (the mean image is written beside it)."""
        arrays = {k: getattr(self, k).tolist() for k in ("mean_rgb", "eigval", "eigvec", "covariance")}
        return A.Stats(**arrays, n_images=self.n_images, n_pixels=self.n_pixels, source=source)


def orient_eigvec(eigvec: np.ndarray) -> np.ndarray:
    """Flip each column so that its dot product with ``SIGN_REFERENCE[i]`` is positive (module docstring)."""
    out = np.array(eigvec, dtype=np.float64, copy=True)
    for i in range(out.shape[1]):
        d = float(out[:, i] @ SIGN_REFERENCE[i])
        if abs(d) < 1e-9:  # orthogonal to the reference direction: largest-magnitude component negative
            d = -float(out[np.argmax(np.abs(out[:, i])), i])
        if d < 0:
            out[:, i] = -out[:, i]
    return out


# --------------------------------------------------------------------------- decoding and workers


def moments_impl() -> str:
    return "compiled kernel (_moments.c)" if _kernel is not None else f"numpy (no compiled kernel: {KERNEL_MISSING})"


def decoder_name() -> str:
    return f"PIL {pil_summary()}"


def _run_task(task: tuple[str, str, list[bytes]], moments: PixelMoments) -> list[str]:
    """Decode the given records of one shard into ``moments``: the skipped ones ("shard key: reason")."""
    shard_path, shard_rel, keys = task
    skipped: list[str] = []
    with A.open_shard(Path(shard_path)) as env, env.begin(buffers=True) as txn:
        for key in keys:
            value = txn.get(key)
            try:
                if value is None:
                    raise ValueError("record vanished from the shard")
                datum = A.Datum.decode(bytes(value))
                if not datum.encoded:
                    raise ValueError("Datum holds raw pixels, not an encoded image")
                image = decode_record(datum.data)
            except Exception as e:  # any decoder failure is a counted, reported skip
                skipped.append(f"{shard_rel} {key.decode(errors='replace')}: {type(e).__name__}: {e}")
                continue
            moments.add(image)
    report(len(keys))
    return skipped


def _shard_keys(path: Path) -> list[bytes]:
    """Every key of a shard in key order, values untouched (LMDB keeps large values on their own pages)."""
    with A.open_shard(path) as env, env.begin() as txn:
        return list(txn.cursor().iternext(keys=True, values=False))


def _plan(data_dir: Path, cfg: PcaStatsConfig, workers: int) -> tuple[list[tuple[str, str, list[bytes]]], dict]:
    """Tasks (shard, rel path, keys) covering the chosen records, and the ``source`` facts."""
    manifest = A.read_manifest(data_dir)  # refuses a half-built dataset
    if SPLIT not in manifest.splits:
        raise AlexnetError(
            f"the dataset at {data_dir} has no {SPLIT} split (have: {', '.join(manifest.splits) or 'none'})"
        )
    split = manifest.splits[SPLIT]
    paths = manifest.shard_paths(data_dir, SPLIT)
    if not paths or split.num_records == 0:
        raise AlexnetError(f"the {SPLIT} split at {data_dir} has no records")
    missing = [sh.path for sh, p in zip(split.shards, paths, strict=True) if not (p / "data.mdb").exists()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise AlexnetError(
            f"{len(missing)} {SPLIT} shard(s) missing: {missing[0]}{more} (rebuild with alexnet-prep build-lmdb)"
        )
    shard_keys = []
    for sh, p in zip(split.shards, paths, strict=True):
        keys = _shard_keys(p)
        if len(keys) != sh.num_records:
            raise AlexnetError(
                f"shard {sh.path} has {len(keys)} records, the manifest says {sh.num_records} "
                "(check with alexnet-prep verify)"
            )
        shard_keys.append(keys)
    total = sum(len(k) for k in shard_keys)
    if cfg.sample and cfg.sample < total:
        picked = np.sort(np.random.default_rng(cfg.seed).choice(total, size=cfg.sample, replace=False))
        chosen, start = [], 0
        for keys in shard_keys:
            lo, hi = np.searchsorted(picked, [start, start + len(keys)])
            chosen.append([keys[i - start] for i in picked[lo:hi].tolist()])
            start += len(keys)
    else:
        chosen = shard_keys
    n_chosen = sum(len(k) for k in chosen)
    # Enough tasks to keep every worker busy and the bar moving, few enough that merging is free.
    per_task = max(16, min(1024, math.ceil(n_chosen / (workers * 8))))
    tasks = []
    for sh, p, keys in zip(split.shards, paths, chosen, strict=True):
        for i in range(0, len(keys), per_task):
            tasks.append((str(p), sh.path, keys[i : i + per_task]))
    source = {
        "split": SPLIT,
        "shards": [sh.path for sh in split.shards],
        "split_records": total,
        "records_used": n_chosen,
        "sample": cfg.sample if cfg.sample and cfg.sample < total else None,
        "seed": cfg.seed if cfg.sample and cfg.sample < total else None,
    }
    return tasks, source


def compute_stats(data_dir: Path, config: PcaStatsConfig) -> tuple[A.Stats, np.ndarray]:
    """One pass over the train records: ``(Stats, mean_image)`` ready for ``artifacts.write_stats``."""
    data_dir = Path(data_dir)
    workers = config.workers or default_workers()
    with Pool(workers, _run_task, PixelMoments) as pool:
        tasks, source = _plan(data_dir, config, pool.size)
        total = source["records_used"]
        results = pool.run(
            tasks,
            name=lambda t: f"{t[1]} from {t[2][0].decode(errors='replace')}",
            hint="nothing written",
            bar={"total": total, "unit": "img", "desc": "pca-stats", "disable": not config.progress},
        )
        states = pool.states()
    n_skipped = sum(len(task_skipped) for task_skipped in results)
    skipped = list(itertools.islice(itertools.chain.from_iterable(results), MAX_LISTED_SKIPS))
    moments = functools.reduce(PixelMoments.merge, states)
    if n_skipped > config.max_skipped * total:
        listed = "; ".join(skipped[:3])
        raise AlexnetError(
            f"{n_skipped} of {total} records did not decode (more than --max-skipped "
            f"{config.max_skipped:g}); nothing written. First: {listed}"
        )
    if moments.n_images == 0:
        raise AlexnetError("no record decoded; nothing written")
    f = moments.finalize()
    source.update(
        images=f.n_images,
        skipped=n_skipped,
        skipped_records=skipped,
        decoder=decoder_name(),
        moments=moments_impl(),
        covariance="population (sum over pixels / n_pixels), RGB 0-255",
        eigvec_signs=f"column i has a positive dot product with {SIGN_REFERENCE.tolist()}[i] "
        "(first: all negative = towards dark)",
        tool=f"alexnet-prep pca-stats {package_version()}",
    )
    return f.to_stats(source), f.mean_image


# --------------------------------------------------------------------------- summary and CLI


def format_summary(stats: A.Stats) -> str:
    src = stats.source
    ev = stats.eigvec_array
    std = np.sqrt(np.maximum(stats.eigval_array, 0.0))
    ref_std = C.IMAGENET_REFERENCE_STD_255
    ref_vec = np.asarray(C.IMAGENET_REFERENCE_EIGVEC)

    def row(values, fmt="{:9.3f}"):
        return " ".join(fmt.format(v) for v in values)

    used = f"{stats.n_images} images ({stats.n_pixels} pixels)"
    if src.get("sample"):
        used += f", a sample of {src['sample']} of {src.get('split_records')} records (seed {src.get('seed')})"
    lines = [
        f"pca-stats over {src.get('split', SPLIT)}: {used}; decoder {src.get('decoder', '?')}",
        f"skipped records: {src.get('skipped', 0)}",
        *[f"  {s}" for s in src.get("skipped_records", [])],
        "                    this dataset                        ImageNet (for orientation)",
        f"mean RGB        {row(stats.mean_rgb)}              {row(C.IMAGENET_REFERENCE_MEAN_RGB, '{:8.2f}')}",
        f"eigenvalues     {row(stats.eigval, '{:9.2f}')}              {row(np.square(ref_std), '{:8.1f}')}",
        f"std along them  {row(std, '{:9.3f}')}              {row(ref_std, '{:8.2f}')}",
        "eigenvectors (columns; rows R, G, B)",
    ]
    for i, ch in enumerate("RGB"):
        lines.append(f"  {ch}             {row(ev[i], '{:9.4f}')}              {row(ref_vec[i], '{:8.4f}')}")
    return "\n".join(lines)


EPILOG = """\b
Examples:
  alexnet-prep pca-stats                                  # every train record of ./data
  alexnet-prep pca-stats --data-dir /fast/imagenet-lmdb --workers 16
  alexnet-prep pca-stats --sample 20000 --seed 1          # a fast seeded estimate
"""


@click.command("pca-stats", epilog=EPILOG)
@data_dir_option
@config_options(PcaStatsConfig)
def pca_stats_command(data_dir: Path, **options):
    """Mean image and RGB PCA of the train records: writes stats.json and mean_image.npy (§2, §4.1)."""
    cfg = PcaStatsConfig(**options)
    if _kernel is None:
        click.echo(f"warning: pca-stats runs its slower numpy path: {KERNEL_MISSING}", err=True)
    with locks.hold(data_dir, locks.EXCLUSIVE, "alexnet-prep pca-stats"):
        stats, mean_image = compute_stats(data_dir, cfg)
        A.write_stats(data_dir, stats, mean_image)
    click.echo(format_summary(stats))
    click.echo(f"wrote {Path(data_dir) / A.STATS_FILE} and {Path(data_dir) / A.MEAN_IMAGE_FILE}")

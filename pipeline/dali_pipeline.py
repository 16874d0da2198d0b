"""The NVIDIA DALI pipelines: one definition for train and val, for the GPU and DALI's CPU-only mode.

Per training image (§4.1), in this order (each step is a pure function of the decoded 256x256
record and the image's random draws, so the order is only a matter of speed):

1. read a Caffe ``Datum`` with ``fn.readers.caffe`` over all of the split's shards (manifest order),
   this rank's part of them (``shard_id``/``num_shards``); the order on disk is a seeded global
   shuffle and the reader reshuffles it through a 4096-record buffer, seeded per rank, every epoch;
2. decode: ``"mixed"`` (nvJPEG, the hardware decoder where there is one) on a GPU, ``"cpu"`` otherwise;
3. subtract the mean (§2): by default the per-pixel mean image at the crop's own offset, mirrored with
   the image (the exact form; done as one float subtraction of the whole 256x256 mean image before
   the crop); or the per-channel mean (``mean="channel"``);
4. PCA lighting (§4.1): add ``eigvec @ (alpha * s)`` to every pixel, alpha ~ N(0, 0.1) drawn once per
   image, s = sqrt(eigval) (``"sqrt"``, the authors' code) or eigval / 255 (``"eigval01"``);
   folded into the normalisation step as a per-image shift;
5. a 224x224 crop at integer offsets (x, y), each uniform over all 33 values (a continuous position
   would make the edge offsets half as likely), and a horizontal flip with probability 0.5; output
   NCHW float32 or float16. ``roi_decode`` decodes only the crop window instead (same result).

Validation: the centre crop (offset 16, 16), or the ten patches of §4.1 stacked as
``[10, 3, 224, 224]`` per image in ``TEN_CROP_ORDER``; no lighting.

Outputs: images, labels, the record's source (``record_positions``), and in training the random
draws (``offsets``, ``mirror``, ``alpha``), so the preview and the tests can re-compute every image
from its record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import artifacts as A
from . import constants as C
from . import dali
from .errors import AlexnetError, ContractError

READER_NAME = "Reader"
# §4.1 ten patches: (crop_pos_x, crop_pos_y) in [0, 1] of the free range, then each mirrored.
TEN_CROP_POSITIONS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))
TEN_CROP_ORDER = tuple(
    (name, mirror)
    for mirror in (False, True)
    for name in ("top-left", "top-right", "bottom-left", "bottom-right", "centre")
)
# Records held by the reader's shuffle buffer (each ~30-60 kB of JPEG): 4096 is ~200 MB per rank.
SHUFFLE_BUFFER = 4096
MAX_OFFSET = C.STORED_SIZE - C.CROP_SIZE  # 32: offsets 0..32, 33 positions per axis


@dataclass(frozen=True)
class PipelineSpec:
    """Everything one pipeline needs; built by the loader from LoaderConfig and the dataset files."""

    shard_paths: tuple[str, ...]
    is_training: bool
    batch_size: int
    num_threads: int = 2
    device_id: int | None = None  # None: DALI's CPU-only mode
    seed: int = 0
    shard_id: int = 0
    num_shards: int = 1
    dtype: str = "float32"  # "float32" | "float16"
    mean: str = "image"  # "image" | "channel"
    lighting_scale: str = C.DEFAULT_LIGHTING_SCALE
    ten_crop: bool = False
    shuffle: bool = True  # train only; False reads in key order (preview)
    prefetch: int = 2
    enable_checkpointing: bool = True
    roi_decode: bool = False  # train: decode only the crop window (benchmarks/bench_pipeline_gpu.py compares)
    hw_decoder_load: float = 0.9  # GPU: share of images sent to the hardware JPEG decoder (DALI default: 0.65)
    decoder: str = "auto"  # "auto": "mixed" on a GPU, "cpu" without; "cpu" on a GPU decodes on the host


def resolved_decoder(spec: PipelineSpec) -> str:
    """The decoder's DALI backend: ``"mixed"`` (nvJPEG) or ``"cpu"``; "auto" picks by device."""
    gpu = spec.device_id is not None
    decoder = spec.decoder if spec.decoder != "auto" else ("mixed" if gpu else "cpu")
    if decoder not in ("mixed", "cpu") or (decoder == "mixed" and not gpu):
        raise AlexnetError(f"decoder {spec.decoder!r} is not possible here (choose 'auto', 'cpu', or 'mixed' on a GPU)")
    return decoder


def graph_signature(spec: PipelineSpec) -> str:
    """What decides the DALI operator graph beyond the recipe: a DALI checkpoint restores only into
    a pipeline with the same graph (``decoder``, ``roi_decode``, the device, the output dtype)."""
    device = "gpu" if spec.device_id is not None else "cpu"
    return f"{device}/{resolved_decoder(spec)}/{'roi' if spec.roi_decode else 'whole'}/{spec.dtype}"


def lighting_scale_values(eigval: np.ndarray, convention: str) -> np.ndarray:
    """s_i of the lighting shift ``eigvec @ (alpha * s)`` on the 0-255 scale (docs/DEVIATIONS.md A2)."""
    eigval = np.asarray(eigval, dtype=np.float64)
    if convention == "sqrt":  # the authors' released code: standard deviations along the eigenvectors
        return np.sqrt(np.maximum(eigval, 0.0))
    if convention == "eigval01":  # fb.resnet.torch: 0-1-scale variances added to a 0-1 image, times 255
        return eigval / 255.0
    raise AlexnetError(f"unknown lighting scale {convention!r}; choose one of {C.LIGHTING_SCALES}")


def draw_offsets():
    """§4.1 crop offsets: integer (x, y), each uniform over 0..32; every one of the 33x33 equally likely."""
    from nvidia.dali import fn, types

    return fn.random.uniform(values=list(range(MAX_OFFSET + 1)), shape=[2], dtype=types.INT32)


def create_pipeline(spec: PipelineSpec, mean_image: np.ndarray, stats: A.Stats, checkpoint: bytes | None = None):
    """The (un-built) DALI pipeline for ``spec``; train and val differ only by ``spec.is_training``.

    ``checkpoint`` (from ``Pipeline.checkpoint()``) restores reader positions and RNG states.
    """
    dali.require()  # one line naming the extra to install, instead of an ImportError
    from nvidia.dali import fn, pipeline_def, types

    gpu = spec.device_id is not None
    decoder = resolved_decoder(spec)
    out_dtype = {"float32": types.FLOAT, "float16": types.FLOAT16}[spec.dtype]
    eigvec = np.asarray(stats.eigvec, dtype=np.float64)
    scale = lighting_scale_values(stats.eigval, spec.lighting_scale)
    # A per-image shift of eigvec @ (alpha * s) = (eigvec * s) @ alpha: one 3x3 matrix applied to alpha.
    lighting_matrix = (eigvec * scale[None, :]).astype(np.float32)
    mean_rgb = [float(v) for v in stats.mean_rgb]

    @pipeline_def(
        batch_size=spec.batch_size,
        num_threads=spec.num_threads,
        device_id=spec.device_id,
        seed=spec.seed + 7919 * spec.shard_id,  # seeded per rank
        prefetch_queue_depth=spec.prefetch,
        enable_checkpointing=spec.enable_checkpointing,
    )
    def pipe():
        train_shuffle = spec.is_training and spec.shuffle
        jpegs, labels = fn.readers.caffe(
            path=list(spec.shard_paths),
            shard_id=spec.shard_id,
            num_shards=spec.num_shards,
            # The order on disk is already a seeded global shuffle (data contract); on top of it the
            # reader shuffles through a buffer of SHUFFLE_BUFFER records, anew in every epoch. With
            # pad_last_batch the epochs never mix: every record exactly once per epoch.
            random_shuffle=train_shuffle,
            initial_fill=SHUFFLE_BUFFER,
            stick_to_shard=True,
            pad_last_batch=True,
            name=READER_NAME,
        )
        decoder_args = {"hw_decoder_load": spec.hw_decoder_load} if decoder == "mixed" else {}

        def on_device(images):  # host-decoded images go to the GPU as uint8, before any float work
            return images.gpu() if gpu and decoder == "cpu" else images

        labels = fn.cast(labels, dtype=types.INT64)
        if gpu:  # delivered on the GPU by DALI: a host-to-device copy in the loader would wait for the GPU
            labels = labels.gpu()
        # "<shard> at key <position>_<relpath>": which record each image is (record_positions()).
        source = fn.get_property(jpegs, key="source_info")
        base_mean = [0.0, 0.0, 0.0] if spec.mean == "image" else mean_rgb
        crop = (C.CROP_SIZE, C.CROP_SIZE)
        if spec.mean == "image":
            mean_const = types.Constant(
                np.ascontiguousarray(mean_image, dtype=np.float32), device="gpu" if gpu else "cpu"
            )

        def centred(images):
            """§2 mean image, exact form: subtracting the whole 256x256 mean image (float) before the crop
            and flip equals cutting the mean at the crop's own offset and mirroring it with the image."""
            return images - mean_const if spec.mean == "image" else images

        def normalised(images, px, py, flip, norm_mean, *, window: bool):
            """``images`` cut at pixel offset (32 px, 32 py) unless they are the crop ``window`` already,
            mirrored if ``flip``, minus ``norm_mean`` per channel; CHW float32."""
            cut = {} if window else {"crop": crop, "crop_pos_x": px, "crop_pos_y": py}
            return fn.crop_mirror_normalize(
                images, mirror=flip, mean=norm_mean, std=[1.0, 1.0, 1.0], output_layout="CHW",
                dtype=types.FLOAT, **cut,
            )  # fmt: skip

        def delivered(out):
            return fn.cast(out, dtype=out_dtype) if spec.dtype != "float32" else out

        if spec.is_training:
            offsets = draw_offsets()
            pos = fn.cast(offsets, dtype=types.FLOAT) / float(MAX_OFFSET)  # k / 32 is exact: anchor k
            mirror = fn.random.coin_flip(probability=C.MIRROR_PROBABILITY, dtype=types.INT32)
            alpha = fn.random.normal(shape=[3], stddev=C.LIGHTING_STD)
            shift = fn.coord_transform(fn.reshape(alpha, shape=[1, 3]), M=lighting_matrix.ravel().tolist())
            # §4.1 lighting folded into the normalisation: (x - mean) with mean = base mean - shift.
            norm_mean = fn.reshape(types.Constant(np.array(base_mean, dtype=np.float32)) - shift, shape=[3])
            if spec.roi_decode:
                # Decode only the crop window (region decoding); the mean image's patch is then cut at
                # the same offset and mirrored alike. On the CPU it saves nothing (libjpeg still
                # entropy-decodes every block; benchmarks/results_pipeline.md), so it is off by default.
                images = on_device(fn.decoders.image_crop(
                    jpegs, device=decoder, output_type=types.RGB, crop=crop, crop_pos_x=pos[0], crop_pos_y=pos[1],
                    **decoder_args,
                ))  # fmt: skip
                out = normalised(images, pos[0], pos[1], mirror, norm_mean, window=True)
                if spec.mean == "image":
                    out = out - normalised(mean_const, pos[0], pos[1], mirror, base_mean, window=False)
            else:
                images = on_device(fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, **decoder_args))
                out = normalised(centred(images), pos[0], pos[1], mirror, norm_mean, window=False)
            return delivered(out), labels, source, offsets, mirror, alpha

        images = centred(on_device(fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, **decoder_args)))
        if spec.ten_crop:  # §4.1 test time: one mean subtraction, ten cuts
            patches = [
                normalised(images, px, py, int(flip), base_mean, window=False)
                for flip in (False, True)
                for px, py in TEN_CROP_POSITIONS
            ]
            return delivered(fn.stack(*patches)), labels, source
        return delivered(normalised(images, 0.5, 0.5, 0, base_mean, window=False)), labels, source

    return pipe(checkpoint=checkpoint) if checkpoint is not None else pipe()


def record_positions(source_info) -> np.ndarray:
    """Record positions (the key's ``{position:08d}`` prefix) from a batch of the ``source`` output."""
    positions = []
    for i in range(len(source_info)):
        text = bytes(np.asarray(source_info.at(i))).decode()
        _, sep, key = text.rpartition(" at key ")
        if not sep:
            raise ContractError(f"cannot find the record key in DALI's source info {text!r}")
        positions.append(A.parse_key(key.encode())[0])
    return np.array(positions, dtype=np.int64)


def shard_size(total: int, shard_id: int, num_shards: int) -> int:
    """Records in one rank's part of a split (DALI's sharding: contiguous blocks, sizes differ by <= 1)."""
    start = total * shard_id // num_shards
    stop = total * (shard_id + 1) // num_shards
    return stop - start


def spec_paths(data_dir: Path, manifest: A.Manifest, split: str) -> tuple[str, ...]:
    paths = manifest.shard_paths(Path(data_dir), split)
    missing = [str(p) for p in paths if not (p / "data.mdb").exists()]
    if missing:
        raise ContractError(f"{len(missing)} shard(s) of {split} missing, e.g. {missing[0]}")
    return tuple(str(p) for p in paths)

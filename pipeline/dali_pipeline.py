"""The NVIDIA DALI pipelines: one definition for train and val, for the GPU and DALI's CPU-only mode.

Per training image (§4.1), in this order (each step is a pure function of the decoded 256x256
record and the image's random draws, so the order is only a matter of speed):

1. read: with ``shuffle="global"`` (the default) the loader's batches through ``fn.external_source``,
   with their positions and draws (``external_inputs``); with ``shuffle="buffer"`` the caffe reader
   and ``fn.random`` draws (``reader_inputs``, docs/DEVIATIONS.md A4); either way the batch's
   columns by the names of pipeline/columns.py;
2. decode: ``"mixed"`` (nvJPEG, the hardware decoder where there is one) on a GPU, ``"cpu"`` otherwise;
3. subtract the mean (§2): by default the per-pixel mean image at the crop's own offset, mirrored with
   the image (the exact form; done as one float subtraction of the whole 256x256 mean image before
   the crop); or the per-channel mean (``mean="channel"``);
4. PCA lighting (§4.1): add ``eigvec @ (alpha * s)`` to every pixel, alpha ~ N(0, 0.1) drawn once per
   image, s = sqrt(eigval) (``"sqrt"``, the authors' code) or eigval / 255 (``"eigval01"``);
   folded into the normalisation step as a per-image shift;
5. a 224x224 crop at integer offsets (x, y), each uniform over all 33 values (a continuous position
   would make the edge offsets half as likely), and a horizontal flip with probability 0.5; output
   CHW, or HWC (``channels_last``: the loader's NCHW view in channels_last memory, no copy), float32
   or float16 (written by the same operator). ``roi_decode`` decodes only the crop window instead.

Validation (always through ``fn.external_source``, in key order): the centre crop (offset 16, 16),
or the ten patches of §4.1 stacked as ``[10, 3, 224, 224]`` (or ``[10, 224, 224, 3]``) per image in
``TEN_CROP_ORDER``; no lighting.

Outputs: images, then the columns named by ``columns.output_names``: labels, the records' positions
(``index``; global: int64; buffer: DALI's ``source_info``, see ``record_positions``), and in
training the draws (``crop_xy``, ``mirror``, ``alpha``), so the preview and the tests can
re-compute every image from its record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import artifacts as A
from . import columns as K
from . import constants as C
from . import dali
from .errors import AlexnetError, ContractError

if TYPE_CHECKING:
    from .loader import DataConfig

# §4.1 ten patches: (crop_pos_x, crop_pos_y) in [0, 1] of the free range, then each mirrored.
TEN_CROP_POSITIONS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))
TEN_CROP_ORDER = tuple(
    (name, mirror)
    for mirror in (False, True)
    for name in ("top-left", "top-right", "bottom-left", "bottom-right", "centre")
)
# shuffle="buffer": records held by the reader's shuffle buffer (each ~30-60 kB of JPEG): ~200 MB.
SHUFFLE_BUFFER = 4096
MAX_OFFSET = C.STORED_SIZE - C.CROP_SIZE  # 32: offsets 0..32, 33 positions per axis
# Shared-memory bytes per record for the reader processes: a stored 256x256 JPEG at q95 is ~30-60 kB
# (README), and a batch's rows are as long as its longest JPEG.
JPEG_BYTES_HINT = 96 * 1024
DALI_TYPES = {"uint8": "UINT8", "int64": "INT64", "int32": "INT32", "float32": "FLOAT"}  # numpy -> DALI


@dataclass(frozen=True)
class PipelineSpec:
    """One pipeline: the user's data settings and what the loader decides for this replica (no defaults
    here: every user-facing default is in ``DataConfig``)."""

    data: DataConfig
    is_training: bool
    batch_size: int  # images per batch of this pipeline
    device_id: int | None  # None: DALI's CPU-only mode
    dtype: str  # "float32" | "float16" (bfloat16 is cast by the loader)
    channels_last: bool  # images HWC (the loader's torch view: NCHW-shaped, channels_last memory); else CHW
    ten_crop: bool  # val: the ten patches of §4.1
    seed: int  # DALI's own seed; only shuffle="buffer" draws with it
    # shuffle="buffer" train only: (shard paths, shard_id, num_shards) for fn.readers.caffe; else None.
    reader: tuple[tuple[str, ...], int, int] | None


def resolved_decoder(spec: PipelineSpec) -> str:
    """The decoder's DALI backend: ``"mixed"`` (nvJPEG) or ``"cpu"``; "auto" picks by device."""
    gpu = spec.device_id is not None
    decoder = spec.data.decoder if spec.data.decoder != "auto" else ("mixed" if gpu else "cpu")
    if decoder == "mixed" and not gpu:
        raise AlexnetError(
            f"decoder {spec.data.decoder!r} is not possible here (choose 'auto', 'cpu', or 'mixed' on a GPU)"
        )
    return decoder


def lighting_scale_values(eigval: np.ndarray, convention: str) -> np.ndarray:
    """s_i of the lighting shift ``eigvec @ (alpha * s)`` on the 0-255 scale (docs/DEVIATIONS.md A2)."""
    eigval = np.asarray(eigval, dtype=np.float64)
    if convention == "sqrt":  # the authors' released code: standard deviations along the eigenvectors
        return np.sqrt(np.maximum(eigval, 0.0))
    if convention == "eigval01":  # fb.resnet.torch: 0-1-scale variances added to a 0-1 image, times 255
        return eigval / 255.0
    raise AlexnetError(f"unknown lighting scale {convention!r}; choose one of {C.LIGHTING_SCALES}")


def external_inputs(spec: PipelineSpec, source):
    """jpegs, and the batch's columns by name (labels, positions; train: the draws of pipeline/order.py)
    from ``source(iteration)`` (the loader's batches in its order).

    With ``workers`` > 0 DALI calls ``source`` in that many worker processes (parallel external source,
    one batch per call), ``workers`` batches ahead, and passes their outputs through shared memory: the
    reads and the record parsing leave the process that trains (a thread would share its GIL).
    The source gives a few arrays per batch (``loader._Source``): the JPEGs as rows of one uint8 array
    (``SplitIndex.read``), then the columns side by side in one int64 and (train) one float32 matrix,
    one row per record (``columns.pack``): DALI takes an array at the cost of one sample, where a list
    of 128 JPEGs and six outputs cost ~1 ms of Python per batch on the thread that runs the pipeline.
    DALI cuts the columns apart (``columns.layout``) and each JPEG row to its length in its own threads.
    """
    from nvidia.dali import fn, types

    def dali_type(dtype: str):
        return getattr(types, DALI_TYPES[dtype])

    columns = K.batch_columns(spec.is_training)
    kinds = ["uint8", *K.carriers(columns)]
    workers = spec.data.workers
    parallel = {"parallel": True, "prefetch_queue_depth": workers, "bytes_per_sample_hint": JPEG_BYTES_HINT}
    rows, *matrices = fn.external_source(
        source=source,
        num_outputs=len(kinds),
        batch=True,
        dtype=[dali_type(kind) for kind in kinds],
        ndim=[1] * len(kinds),
        **(parallel if workers else {}),
    )
    out = {}
    for column, (matrix, start) in zip(columns, K.layout(columns).values(), strict=True):
        part = matrices[matrix][start] if column.shape == () else matrices[matrix][start : start + column.width]
        out[column.name] = part if column.dtype == column.carrier else fn.cast(part, dtype=dali_type(column.dtype))
    jpegs = fn.slice(rows, start=[0], shape=out.pop("length"), axes=[0])
    return jpegs, out


def reader_inputs(spec: PipelineSpec):
    """shuffle="buffer": jpegs, and the columns by name: labels, source info (``index``), and DALI's
    own draws (seeded by the loader per replica and epoch): the order on disk is the builder's seeded
    shuffle, reshuffled through a buffer of SHUFFLE_BUFFER records (docs/DEVIATIONS.md A4)."""
    from nvidia.dali import fn, types

    paths, shard_id, num_shards = spec.reader
    jpegs, labels = fn.readers.caffe(
        path=list(paths),
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=True,
        initial_fill=SHUFFLE_BUFFER,
        stick_to_shard=True,
    )
    source = fn.get_property(jpegs, key="source_info")  # "<shard> at key <position>_<relpath>"
    # §4.1: integer offsets, each uniform over 0..32 (every one of the 33x33 equally likely).
    offsets = fn.random.uniform(values=list(range(MAX_OFFSET + 1)), shape=[2], dtype=types.INT32)
    mirror = fn.random.coin_flip(probability=C.MIRROR_PROBABILITY, dtype=types.INT32)
    alpha = fn.random.normal(shape=[3], stddev=C.LIGHTING_STD)
    return jpegs, {
        "label": fn.cast(labels, dtype=types.INT64),
        "index": source,
        "crop_xy": offsets,
        "mirror": mirror,
        "alpha": alpha,
    }


class _Graph:
    """The operators shared by the train and val graphs (built inside the pipeline definition)."""

    def __init__(self, spec: PipelineSpec, mean_image: np.ndarray, stats: A.Stats):
        from nvidia.dali import types

        self.spec, self.types = spec, types
        self.gpu = spec.device_id is not None
        self.decoder = resolved_decoder(spec)
        self.decoder_args = {"hw_decoder_load": spec.data.hw_decoder_load} if self.decoder == "mixed" else {}
        scale = lighting_scale_values(stats.eigval, spec.data.lighting_scale)
        # A per-image shift of eigvec @ (alpha * s) = (eigvec * s) @ alpha: one 3x3 matrix applied to alpha.
        self.lighting_matrix = (np.asarray(stats.eigvec, dtype=np.float64) * scale[None, :]).astype(np.float32)
        self.image_mean = spec.data.mean == "image"
        self.base_mean = [0.0, 0.0, 0.0] if self.image_mean else [float(v) for v in stats.mean_rgb]
        if self.image_mean:
            self.mean_const = types.Constant(
                np.ascontiguousarray(mean_image, dtype=np.float32), device="gpu" if self.gpu else "cpu"
            )

    def on_device(self, images):
        """Host-decoded images go to the GPU as uint8, before any float work."""
        return images.gpu() if self.gpu and self.decoder == "cpu" else images

    def decode(self, jpegs):
        from nvidia.dali import fn

        images = fn.decoders.image(jpegs, device=self.decoder, output_type=self.types.RGB, **self.decoder_args)
        return self.on_device(images)

    def centred(self, images):
        """§2 mean image, exact form: subtracting the whole 256x256 mean image (float) before the crop
        and flip equals cutting the mean at the crop's own offset and mirroring it with the image."""
        return images - self.mean_const if self.image_mean else images

    def normalised(self, images, px, py, flip, norm_mean, *, window: bool = False, final: bool = True):
        """``images`` cut at pixel offset (32 px, 32 py) unless they are the crop ``window`` already,
        mirrored if ``flip``, minus ``norm_mean`` per channel; CHW or HWC (``channels_last``), float32,
        or float16 when ``final`` and the spec asks for it (rounded once, in the same pass)."""
        from nvidia.dali import fn

        cut = {} if window else {"crop": (C.CROP_SIZE, C.CROP_SIZE), "crop_pos_x": px, "crop_pos_y": py}
        half = final and self.spec.dtype == "float16"
        return fn.crop_mirror_normalize(
            images,
            mirror=flip,
            mean=norm_mean,
            std=[1.0, 1.0, 1.0],
            output_layout="HWC" if self.spec.channels_last else "CHW",
            dtype=self.types.FLOAT16 if half else self.types.FLOAT,
            **cut,
        )

    def rounded(self, out):
        """float32 ``out`` as float16 if the spec asks for it."""
        from nvidia.dali import fn

        return fn.cast(out, dtype=self.types.FLOAT16) if self.spec.dtype == "float16" else out


def train_graph(g: _Graph, jpegs, columns: dict):
    """§4.1: crop at the drawn offsets, flip, PCA lighting; §2 mean subtraction. The images."""
    from nvidia.dali import fn, types

    offsets, mirror, alpha = columns["crop_xy"], columns["mirror"], columns["alpha"]
    pos = fn.cast(offsets, dtype=types.FLOAT) / float(MAX_OFFSET)  # k / 32 is exact: anchor k
    shift = fn.coord_transform(fn.reshape(alpha, shape=[1, 3]), M=g.lighting_matrix.ravel().tolist())
    # §4.1 lighting folded into the normalisation: (x - mean) with mean = base mean - shift.
    norm_mean = fn.reshape(types.Constant(np.array(g.base_mean, dtype=np.float32)) - shift, shape=[3])
    if g.spec.data.roi_decode:
        # Decode only the crop window (region decoding); the mean image's patch is then cut at the
        # same offset and mirrored alike. On the CPU it saves nothing (libjpeg still entropy-decodes
        # every block; benchmarks/results_pipeline.md), so it is off by default.
        images = g.on_device(
            fn.decoders.image_crop(
                jpegs,
                device=g.decoder,
                output_type=types.RGB,
                crop=(C.CROP_SIZE, C.CROP_SIZE),
                crop_pos_x=pos[0],
                crop_pos_y=pos[1],
                **g.decoder_args,
            )
        )
        out = g.normalised(images, pos[0], pos[1], mirror, norm_mean, window=True, final=not g.image_mean)
        if g.image_mean:  # float32 difference, rounded to float16 (if asked) once, after it
            out = out - g.normalised(g.mean_const, pos[0], pos[1], mirror, g.base_mean, final=False)
            return g.rounded(out)
    else:
        out = g.normalised(g.centred(g.decode(jpegs)), pos[0], pos[1], mirror, norm_mean)
    return out


def val_graph(g: _Graph, jpegs, columns: dict):
    """The centre crop, or §4.1's ten patches (one mean subtraction, ten cuts). The images."""
    from nvidia.dali import fn

    images = g.centred(g.decode(jpegs))
    if g.spec.ten_crop:
        patches = [
            g.normalised(images, px, py, int(flip), g.base_mean)
            for flip in (False, True)
            for px, py in TEN_CROP_POSITIONS
        ]
        return fn.stack(*patches)
    return g.normalised(images, 0.5, 0.5, 0, g.base_mean)


def create_pipeline(spec: PipelineSpec, mean_image: np.ndarray, stats: A.Stats, source=None):
    """The (un-built) DALI pipeline for ``spec``; train and val differ only by ``spec.is_training``.

    ``source(iteration)`` feeds the records and draws (``spec.reader`` None); else the caffe reader reads.
    """
    dali.require()  # one line naming the extra to install, instead of an ImportError
    from nvidia.dali import pipeline_def

    # Reader processes are spawned, not forked: CUDA is initialised in the training process.
    readers = {"py_num_workers": spec.data.workers, "py_start_method": "spawn"} if source and spec.data.workers else {}

    @pipeline_def(
        batch_size=spec.batch_size,
        num_threads=spec.data.num_threads,
        device_id=spec.device_id,
        seed=spec.seed,
        prefetch_queue_depth=spec.data.prefetch,
        **readers,
    )
    def pipe():
        jpegs, columns = reader_inputs(spec) if spec.reader is not None else external_inputs(spec, source)
        graph = _Graph(spec, mean_image, stats)
        images = (train_graph if spec.is_training else val_graph)(graph, jpegs, columns)
        if graph.gpu:  # labels delivered on the GPU by DALI: a host-to-device copy in the loader would wait for it
            columns["label"] = columns["label"].gpu()
        return images, *(columns[name] for name in K.output_names(K.batch_columns(spec.is_training)))

    return pipe()


def record_positions(source_info) -> np.ndarray:
    """Record positions (the key's ``{position:08d}`` prefix) from a batch of the caffe reader's source info."""
    positions = []
    for i in range(len(source_info)):
        text = bytes(np.asarray(source_info.at(i))).decode()
        _, sep, key = text.rpartition(" at key ")
        if not sep:
            raise ContractError(f"cannot find the record key in DALI's source info {text!r}")
        positions.append(A.parse_key(key.encode())[0])
    return np.array(positions, dtype=np.int64)

"""The named columns of a batch: the per-record values that travel beside the JPEGs into DALI and
come back beside the images. This table is their one definition; every place in a column's path
reads its name here, and nothing addresses a column by its place.

    loader._Source          {name: array}  --pack-->   one int64 and one float32 matrix (DALI's external source)
    dali_pipeline           the matrices   --layout--> {name: DataNode}: external_inputs, the train and val graphs
    the pipeline's outputs  images, then ``output_names``
    loader._delivered       {name: TensorList} by ``output_names``: labels, and ``draws`` for preview and tests

Adding a §4.1 draw: its field in ``order.Draws`` (how it is drawn), its ``Column`` here (how it
travels), its use in ``dali_pipeline.train_graph`` (and a DALI draw in ``reader_inputs`` for the
buffer shuffle). Imports neither DALI nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DTYPES = ("int64", "int32", "float32")


@dataclass(frozen=True)
class Column:
    """One per-record value of a batch: ``shape`` per record (``()``: a scalar), ``dtype`` as the graph
    reads it and the loader delivers it; ``draw``: one of ``order.Draws``' fields (training only);
    ``output``: the pipeline gives it back (else only the graph reads it)."""

    name: str
    shape: tuple[int, ...] = ()
    dtype: str = "int64"
    draw: bool = False
    output: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES or len(self.shape) > 1:
            raise ValueError(f"column {self.name!r}: a scalar or a vector of {DTYPES}, not {self.dtype} {self.shape}")

    @property
    def width(self) -> int:
        """Matrix columns the value takes."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def carrier(self) -> str:
        """The matrix it travels in: integers as int64 (exact for every int32), floats as float32."""
        return "int64" if self.dtype.startswith("int") else "float32"


COLUMNS = (
    Column("length", (1,), "int32", output=False),  # the JPEG's bytes in its row: DALI cuts the row to them
    Column("label"),
    Column("index"),  # the record's position (its key's prefix)
    Column("crop_xy", (2,), "int32", draw=True),  # §4.1 crop offsets (x, y) in pixels, each 0..32
    Column("mirror", (), "int32", draw=True),  # §4.1 horizontal flip: 1 = flipped
    Column("alpha", (3,), "float32", draw=True),  # §4.1 PCA lighting alphas
)


def batch_columns(training: bool) -> tuple[Column, ...]:
    """The columns of a train (with the draws) or val batch, in their order."""
    return tuple(c for c in COLUMNS if training or not c.draw)


def carriers(columns: tuple[Column, ...]) -> tuple[str, ...]:
    """The matrices a batch of ``columns`` travels in, in order (float32 only if a column needs it)."""
    return tuple(dict.fromkeys(c.carrier for c in columns))


def layout(columns: tuple[Column, ...]) -> dict[str, tuple[int, int]]:
    """Each column's (matrix, first matrix column): in its carrier, in the table's order."""
    kinds, used, out = carriers(columns), {}, {}
    for c in columns:
        start = used.get(c.carrier, 0)
        out[c.name] = (kinds.index(c.carrier), start)
        used[c.carrier] = start + c.width
    return out


def pack(columns: tuple[Column, ...], values: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One row per record in each carrier: ``values[name]`` (``(batch, *shape)``) side by side."""
    n = len(values[columns[0].name])
    blocks: dict[str, list[np.ndarray]] = {kind: [] for kind in carriers(columns)}
    for c in columns:
        block = np.asarray(values[c.name]).reshape(n, -1)
        if block.shape[1] != c.width:
            raise ValueError(f"column {c.name!r} has {block.shape[1]} values per record, its shape {c.shape} says")
        blocks[c.carrier].append(block)
    return [np.concatenate(parts, axis=1).astype(kind, copy=False) for kind, parts in blocks.items()]


def output_names(columns: tuple[Column, ...]) -> tuple[str, ...]:
    """The pipeline's outputs after the images, by name."""
    return tuple(c.name for c in columns if c.output)

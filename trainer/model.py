"""The 2012 network (Krizhevsky, Sutskever, Hinton, NIPS 2012, §3, Figure 2) and its placement on two GPUs.

Layout (§3.2): two columns, each holding half of every layer's kernels. conv2, conv4 and conv5 see
only their own column's maps; conv1 (the image), conv3 and the fully-connected layers see both
columns. fc6 and fc7 split their output neurons across the columns (2048 each); fc8 is one layer
on the first device.

Three placements compute the same function for the same weights:

* ``devices=["cuda:0", "cuda:1"]`` (split): column one on the first device, column two on the
  second. Activations cross between devices only where the paper's GPUs communicate: into conv3,
  fc6, fc7 and fc8. Each layer issues column one's kernels and then column two's; CUDA launches are
  asynchronous and the forward pass has no host synchronisation, so both GPUs compute at once (and
  autograd runs one backward thread per device).
* ``devices=["cuda:0"]`` or the default CPU (grouped): both columns on one device; conv2/4/5 run
  as grouped convolutions (``groups=2``), which is exactly the column-wise computation.
* ``devices=["cpu", "cpu"]`` (or the same GPU twice) runs the split code path on one device; the
  tests use it to check the split form on a CPU-only machine.

Parameter storage. Every column layer (``ColumnConv2d``, ``ColumnLinear``) keeps one
``nn.Conv2d``/``nn.Linear`` per column in ``layer.columns`` in ALL placements, so the model's
parameter list (names, order, shapes) and hence an optimiser's state are the same whatever the
placement. ``state_dict()`` exposes one canonical layout instead of the per-column tensors: each
layer's two halves concatenated along the output dimension, e.g. ``conv1.weight [96, 3, 11, 11]``
(kernels 0-47 are column one), ``conv2.weight [256, 48, 5, 5]`` (a ``groups=2`` convolution's
weight), ``fc6.weight [4096, 9216]``. ``load_state_dict`` splits it back, so a checkpoint written by
any placement loads into any other.

Response normalisation (§3.3) is computed within each column's own maps: on the paper's GPUs each
held half of the kernels, so the sum over "adjacent kernel maps" could not cross the column
boundary. The grouped form normalises within each half too (``group_size``), so it is the same
function as the split form.

Input size: the paper says 224x224 but (224 - 11) / 4 + 1 is not an integer. conv1 pads the 224x224
input by 2 pixels on each side: floor((224 + 4 - 11) / 4) + 1 = 55, the 55x55 of Figure 2 (the
choice torchvision made; Caffe crops 227 instead). A documented deviation.

Do not move a placed model with ``.to(device)``/``.cuda()``: it places itself at construction
(``.to(memory_format=torch.channels_last)`` and ``.to(dtype)`` are fine).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alexnet.pipeline.errors import AlexnetError

from . import constants as TC
from .lrn import lrn, lrn_reference

COLUMNS = 2  # §3.2 two GPUs, half of the kernels on each
LEARNED_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
# §3 Figure 2 kernels per layer (both columns together) and the fully-connected widths.
CONV1_KERNELS, CONV2_KERNELS, CONV3_KERNELS, CONV4_KERNELS, CONV5_KERNELS = 96, 256, 384, 384, 256
FC_NEURONS = 4096
POOL5_SIZE = 6  # 6x6 maps into fc6
# Deviation (see module docstring): pad conv1 by 2 so a 224x224 input gives 55x55.
CONV1_PADDING = 2

DeviceLike = str | torch.device


# --------------------------------------------------------------------------- devices


def _resolve_devices(devices: DeviceLike | Sequence[DeviceLike] | None) -> list[torch.device]:
    if devices is None:
        return [torch.device("cpu")]
    if isinstance(devices, str | torch.device):
        devices = [devices]
    try:
        resolved = [torch.device(d) for d in devices]
    except (RuntimeError, TypeError) as exc:
        raise AlexnetError(f"devices {devices!r}: {exc}") from None
    if len(resolved) not in (1, COLUMNS):
        raise AlexnetError(f"devices {devices!r}: give one device (both columns) or two (one per column)")
    out = []
    for d in resolved:
        if d.type == "cuda":
            if not torch.cuda.is_available():
                raise AlexnetError(f"device {d} requested but CUDA is not available")
            if d.index is None:
                d = torch.device("cuda", torch.cuda.current_device())
            if d.index >= torch.cuda.device_count():
                raise AlexnetError(f"device {d} requested but torch sees {torch.cuda.device_count()} CUDA device(s)")
        out.append(d)
    return out


def count_parameters(model: nn.Module) -> int:
    """Number of learned scalars (60,965,224 for the 2012 network with 1000 classes)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- layers


class LocalResponseNorm(nn.Module):
    """§3.3 response normalisation.

    b[i] = a[i] / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a[j]^2) ** beta

    ``alpha`` is used as given: the network passes 1e-4 / 5 for the authors' form (``lrn="authors"``,
    what their code computed, equal to ``torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2)``) and 1e-4 for
    the paper's literal text (``lrn="paper-text"``). Takes (N, C, H, W).
    ``group_size``: the channels are normalised in independent blocks of this many maps (one block per
    column; the sum never crosses a block boundary); None means one block of all C maps.

    Runs the custom operator ``alexnet::lrn`` (lrn.py): on a GPU one fused Triton kernel per direction,
    elsewhere the reference arithmetic (``lrn.lrn_reference``). Both compute the denominator in float32
    whatever the input's dtype and any autocast: in bf16, whose spacing near k = 2 is 0.0156,
    k + alpha * sum a^2 takes a handful of values at the paper's init (73% exactly k on conv1-like
    activations), and the normalisation's mean effect comes out 48% off (issue 21;
    tests/test_model.py). The output has the input's dtype and memory format.
    """

    def __init__(
        self,
        size: int = TC.LRN_SIZE,
        alpha: float = TC.LRN_ALPHA,
        beta: float = TC.LRN_BETA,
        k: float = TC.LRN_K,
        group_size: int | None = None,
    ) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k, self.group_size = size, alpha, beta, k, group_size

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, group_size={self.group_size}"

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_exporting():  # an exported program runs in plain PyTorch, without our operators
            return lrn_reference(x, self.size, self.alpha, self.beta, self.k, self.group_size or 0)
        return lrn(x, self.size, self.alpha, self.beta, self.k, self.group_size or 0)


def lrn_alpha(form: str) -> float:
    """The alpha inside the sum for an LRN form (``TC.LRN_FORMS``; docs/DEVIATIONS.md N6)."""
    if form not in TC.LRN_FORMS:
        raise AlexnetError(f"lrn {form!r}: expected one of {', '.join(TC.LRN_FORMS)}")
    return TC.LRN_ALPHA / TC.LRN_SIZE if form == "authors" else TC.LRN_ALPHA


class PaperDropout(nn.Module):
    """§4.2 dropout as the paper and the authors' code ran it (cuda-convnet2's ``dropout2`` layer).

    Training: each output is set to zero with probability ``p`` and the rest pass unchanged.
    Evaluation: every output, multiplied by ``1 - p``. Inverted dropout (``nn.Dropout``) computes the
    same test-time function but scales the kept outputs by 2 while training, which makes the inputs
    of fc7 and fc8 twice as large and their weights' effective learning rate four times the paper's
    (docs/DEVIATIONS.md N4). The mask comes from torch's dropout kernel: 2 * 0.5 is exact.
    """

    def __init__(self, p: float = TC.DROPOUT_P) -> None:
        super().__init__()
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training) * (1.0 - self.p)


def _gather(xs: Sequence[Tensor], device: torch.device) -> Tensor:
    """All columns' maps (or neurons) on ``device``, column one first: where the paper's GPUs communicate."""
    # Asynchronous except into host memory, where the result would be read before the copy ends.
    moved = [t.to(device, non_blocking=device.type != "cpu") for t in xs]
    return moved[0] if len(moved) == 1 else torch.cat(moved, dim=1)


def _exchange(hs: Sequence[Tensor], devices: Sequence[torch.device]) -> list[Tensor]:
    """Both columns' outputs on each column's device (one gather per device, shared by its columns)."""
    gathered: dict[torch.device, Tensor] = {}
    for d in devices:
        if d not in gathered:
            gathered[d] = _gather(hs, d)
    return [gathered[d] for d in devices]


def _merge_columns_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: the two columns' tensors -> one canonical tensor per parameter."""
    for name in ("weight", "bias"):
        parts = [state_dict.pop(f"{prefix}columns.{i}.{name}") for i in range(COLUMNS)]
        state_dict[prefix + name] = torch.cat([p.to(parts[0].device) for p in parts], dim=0)


def _split_columns_hook(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: one canonical tensor per parameter -> the two columns' halves."""
    for name in ("weight", "bias"):
        key = prefix + name
        if key in state_dict:
            full = state_dict.pop(key)
            halves = full.chunk(COLUMNS, dim=0) if full.dim() and full.shape[0] % COLUMNS == 0 else (full, full)
            for i, half in enumerate(halves):
                state_dict[f"{prefix}columns.{i}.{name}"] = half


class _ColumnLayer(nn.Module):
    """A layer with half of its output units in each column; ``columns[i]`` lives on column i's device."""

    columns: nn.ModuleList

    def _finish(self, column_devices: Sequence[torch.device]) -> None:
        for column, device in zip(self.columns, column_devices, strict=True):
            column.to_empty(device=device)  # built on "meta": no wasted default init
        self.register_state_dict_post_hook(_merge_columns_hook)
        self.register_load_state_dict_pre_hook(_split_columns_hook)

    @property
    def canonical_weight_shape(self) -> torch.Size:
        w = self.columns[0].weight
        return torch.Size((COLUMNS * w.shape[0], *w.shape[1:]))


class ColumnConv2d(_ColumnLayer):
    """§3.2 convolution with half of the kernels in each column.

    ``own_column=True`` (conv2, conv4, conv5): each column's kernels see only that column's maps.
    ``own_column=False`` (conv1, conv3): each column's kernels see all input maps.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        own_column: bool,
        column_devices: Sequence[torch.device],
    ) -> None:
        super().__init__()
        self.own_column, self.stride, self.padding = own_column, stride, padding
        in_per_column = in_channels // COLUMNS if own_column else in_channels
        self.columns = nn.ModuleList(
            nn.Conv2d(in_per_column, out_channels // COLUMNS, kernel_size, stride, padding, device="meta")
            for _ in range(COLUMNS)
        )
        self._finish(column_devices)

    def forward(self, x: Tensor) -> Tensor:
        """Grouped form (both columns' maps on one device). The split form calls ``columns[i]`` itself.

        The columns' kernels are stacked each call (2.3 M weights in all five layers, a copy of 9 MB
        in float32, about 3 us on an H100 and inside the CUDA graph or the compiled graph); one
        Parameter per column keeps the parameter list, the optimiser state and the checkpoints the
        same in every placement (module docstring)."""
        weight = torch.cat([c.weight for c in self.columns])
        bias = torch.cat([c.bias for c in self.columns])
        groups = COLUMNS if self.own_column else 1
        return F.conv2d(x, weight, bias, self.stride, self.padding, groups=groups)


class ColumnLinear(_ColumnLayer):
    """§3.2 fully-connected layer: half of the neurons in each column, each seeing all inputs.

    Takes and returns a list of per-column tensors (or a one-element list holding all inputs); the
    split form calls ``columns[i]`` itself.
    """

    def __init__(self, in_features: int, out_features: int, *, column_devices: Sequence[torch.device]) -> None:
        super().__init__()
        self.columns = nn.ModuleList(
            nn.Linear(in_features, out_features // COLUMNS, device="meta") for _ in range(COLUMNS)
        )
        self._finish(column_devices)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        devices = [c.weight.device for c in self.columns]
        return [column(h) for column, h in zip(self.columns, _exchange(xs, devices), strict=True)]


# --------------------------------------------------------------------------- network


class AlexNet(nn.Module):
    """The 2012 network: five convolutional and three fully-connected layers in two columns (§3).

    ``devices``: None (CPU), one device (both columns there, grouped convolutions) or two devices
    (column one on the first, column two on the second). Inputs [N, 3, 224, 224] go to
    ``input_device`` (moved there if needed); logits land on ``output_device`` (the first device).
    Weights are initialised as in §5 at construction (``reset_parameters``; seed with torch.manual_seed).
    """

    def __init__(
        self,
        num_classes: int = TC.NUM_CLASSES,
        devices: DeviceLike | Sequence[DeviceLike] | None = None,
        lrn: str = TC.DEFAULT_LRN,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise AlexnetError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes, self.lrn = num_classes, lrn
        alpha = lrn_alpha(lrn)
        self._devices = _resolve_devices(devices)
        cols = self._devices if self.split else self._devices * COLUMNS
        first = self._devices[0]

        self.conv1 = ColumnConv2d(
            3, CONV1_KERNELS, 11, stride=4, padding=CONV1_PADDING, own_column=False, column_devices=cols
        )
        self.norm1 = LocalResponseNorm(alpha=alpha, group_size=CONV1_KERNELS // COLUMNS)
        self.pool1 = nn.MaxPool2d(TC.POOL_KERNEL, TC.POOL_STRIDE)
        self.conv2 = ColumnConv2d(CONV1_KERNELS, CONV2_KERNELS, 5, padding=2, own_column=True, column_devices=cols)
        self.norm2 = LocalResponseNorm(alpha=alpha, group_size=CONV2_KERNELS // COLUMNS)
        self.pool2 = nn.MaxPool2d(TC.POOL_KERNEL, TC.POOL_STRIDE)
        # conv3 is where the columns first exchange maps (§3.2).
        self.conv3 = ColumnConv2d(CONV2_KERNELS, CONV3_KERNELS, 3, padding=1, own_column=False, column_devices=cols)
        self.conv4 = ColumnConv2d(CONV3_KERNELS, CONV4_KERNELS, 3, padding=1, own_column=True, column_devices=cols)
        self.conv5 = ColumnConv2d(CONV4_KERNELS, CONV5_KERNELS, 3, padding=1, own_column=True, column_devices=cols)
        self.pool5 = nn.MaxPool2d(TC.POOL_KERNEL, TC.POOL_STRIDE)
        self.fc6 = ColumnLinear(CONV5_KERNELS * POOL5_SIZE * POOL5_SIZE, FC_NEURONS, column_devices=cols)
        self.drop6 = PaperDropout()  # §4.2
        self.fc7 = ColumnLinear(FC_NEURONS, FC_NEURONS, column_devices=cols)
        self.drop7 = PaperDropout()
        self.fc8 = nn.Linear(FC_NEURONS, num_classes, device="meta").to_empty(device=first)
        self.reset_parameters()
        # The forward's parts, eager until compile_forward replaces them.
        self._grouped = self._forward_grouped
        self._stages = (self._column_front, self._column_back, self._column_fc)

    # ---- placement

    @property
    def split(self) -> bool:
        """True when each column has its own device entry (the split code path)."""
        return len(self._devices) == COLUMNS

    @property
    def devices(self) -> list[torch.device]:
        return list(self._devices)

    @property
    def input_device(self) -> torch.device:
        return self._devices[0]

    @property
    def output_device(self) -> torch.device:
        return self._devices[0]

    def extra_repr(self) -> str:
        form = "split" if self.split else "grouped"
        return f"num_classes={self.num_classes}, lrn={self.lrn}, devices={[str(d) for d in self._devices]} ({form})"

    # ---- init

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """§5: weights ~ N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7, else 0.

        Drawn on the CPU (``generator``: a CPU generator; None uses the global one seeded by
        torch.manual_seed) in the canonical layout, then copied into place: the same seed gives the
        same weights whatever the placement.
        """
        for name in LEARNED_LAYERS:
            layer = getattr(self, name)
            bias = 1.0 if name in TC.INIT_BIAS_ONE_LAYERS else 0.0
            if isinstance(layer, _ColumnLayer):
                weight = torch.empty(layer.canonical_weight_shape).normal_(0.0, TC.INIT_WEIGHT_STD, generator=generator)
                for column, half in zip(layer.columns, weight.chunk(COLUMNS), strict=True):
                    column.weight.copy_(half)
                    column.bias.fill_(bias)
            else:
                weight = torch.empty(layer.weight.shape).normal_(0.0, TC.INIT_WEIGHT_STD, generator=generator)
                layer.weight.copy_(weight)
                layer.bias.fill_(bias)

    # ---- forward

    def _forward_grouped(self, x: Tensor) -> Tensor:
        h = self.pool1(self.norm1(F.relu(self.conv1(x), inplace=True)))
        h = self.pool2(self.norm2(F.relu(self.conv2(h), inplace=True)))
        h = F.relu(self.conv3(h), inplace=True)
        h = F.relu(self.conv4(h), inplace=True)
        h = torch.flatten(self.pool5(F.relu(self.conv5(h), inplace=True)), 1)
        # Column-wise as in the split form: the same ops and the same dropout draws, in the same order.
        hs = [self.drop6(F.relu(h, inplace=True)) for h in self.fc6([h])]
        hs = [self.drop7(F.relu(h, inplace=True)) for h in self.fc7(hs)]
        return self.fc8(_gather(hs, self.output_device))

    # The split form's per-column stages: each runs on one device between two exchanges (§3.2), so
    # each can be compiled on its own (compile_forward).

    def _column_front(self, i: int, x: Tensor) -> Tensor:
        """Column i from the image (conv1 sees it all) to pool2 (conv2 sees its own column)."""
        h = self.pool1(self.norm1(F.relu(self.conv1.columns[i](x), inplace=True)))
        return self.pool2(self.norm2(F.relu(self.conv2.columns[i](h), inplace=True)))

    def _column_back(self, i: int, h: Tensor) -> Tensor:
        """Column i from conv3 (sees both columns' maps) to pool5, flattened."""
        h = F.relu(self.conv3.columns[i](h), inplace=True)
        h = F.relu(self.conv4.columns[i](h), inplace=True)
        return torch.flatten(self.pool5(F.relu(self.conv5.columns[i](h), inplace=True)), 1)

    def _column_fc(self, i: int, layer: ColumnLinear, drop: PaperDropout, h: Tensor) -> Tensor:
        return drop(F.relu(layer.columns[i](h), inplace=True))

    def _forward_split(self, x: Tensor) -> Tensor:
        # Each stage issues column one's work, then column two's; on two GPUs they run concurrently.
        front, back, fc = self._stages
        devices = [c.weight.device for c in self.conv1.columns]
        hs = [front(i, x.to(d, non_blocking=d.type != "cpu")) for i, d in enumerate(devices)]
        hs = [back(i, h) for i, h in enumerate(_exchange(hs, devices))]  # conv3 sees both columns
        hs = [fc(i, self.fc6, self.drop6, h) for i, h in enumerate(_exchange(hs, devices))]
        hs = [fc(i, self.fc7, self.drop7, h) for i, h in enumerate(_exchange(hs, devices))]
        return self.fc8(_gather(hs, self.output_device))

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.input_device, non_blocking=self.input_device.type != "cpu")
        return self._forward_split(x) if self.split else self._grouped(x)

    def compile_forward(self, **options) -> AlexNet:
        """Compile the forward pass with ``torch.compile`` (``options`` go to it): the grouped form as
        one graph; the split form stage by stage, each stage a single-device graph (a graph spanning
        two GPUs could not be fused or captured). Backward follows the compiled graphs (AOTAutograd).
        The parameters, state dict and placement are unchanged. Returns the model."""
        if self.split:
            self._stages = tuple(torch.compile(f, **options) for f in self._stages)
        else:
            self._grouped = torch.compile(self._forward_grouped, **options)
        return self

    # ---- checkpoints

    def canonical_shapes(self) -> dict[str, torch.Size]:
        """Keys and shapes of ``state_dict()``, without building it."""
        shapes: dict[str, torch.Size] = {}
        for name, p in self.named_parameters():
            if ".columns.0." in name:
                shapes[name.replace(".columns.0.", ".")] = torch.Size((COLUMNS * p.shape[0], *p.shape[1:]))
            elif ".columns." not in name:
                shapes[name] = p.shape
        return shapes

    def check_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Raise AlexnetError naming every missing, unexpected or mis-shaped key (canonical names)."""
        expected = self.canonical_shapes()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        wrong = [
            f"{k} {tuple(state_dict[k].shape)} (expected {tuple(s)})"
            for k, s in expected.items()
            if k in state_dict and tuple(state_dict[k].shape) != tuple(s)
        ]
        problems = []
        if missing:
            problems.append("missing " + ", ".join(missing))
        if unexpected:
            problems.append("unexpected " + ", ".join(unexpected))
        if wrong:
            problems.append("wrong shape " + ", ".join(wrong))
        if problems:
            raise AlexnetError("state dict does not fit the 2012 network: " + "; ".join(problems))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a canonical state dict written by any placement (checked first when strict)."""
        if strict:
            self.check_state_dict(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict[str, Tensor],
        devices: DeviceLike | Sequence[DeviceLike] | None = None,
        lrn: str = TC.DEFAULT_LRN,
    ) -> AlexNet:
        """A network placed on ``devices`` holding ``state_dict``'s weights (class count from fc8)."""
        if "fc8.weight" not in state_dict:
            raise AlexnetError("state dict does not fit the 2012 network: missing fc8.weight")
        model = cls(num_classes=int(state_dict["fc8.weight"].shape[0]), devices=devices, lrn=lrn)
        model.load_state_dict(state_dict)
        return model

    @classmethod
    def from_checkpoint(cls, ck: dict, devices: DeviceLike | Sequence[DeviceLike] | None = None) -> AlexNet:
        """The network of a loaded alexnet-train checkpoint, with the LRN form it was trained with."""
        model_config = (ck.get("config") or {}).get("model") or {}
        lrn = model_config.get("lrn", TC.DEFAULT_LRN)
        return cls.from_state_dict(ck["model"], devices=devices, lrn=lrn)

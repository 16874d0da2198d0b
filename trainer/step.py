"""One SGD step (§5), three ways behind one interface: ``step(images, labels) -> loss``.

* :class:`EagerStep`: forward, loss, backward and the update, kernel by kernel (CPU, two GPUs).
* :class:`DDPStep`: the eager step on a ``DistributedDataParallel`` wrapper (several replicas): the
  backward pass averages the gradients over the replicas.
* :class:`GraphedStep`: the eager step captured once as a CUDA graph and replayed (one GPU, one
  process), bitwise the eager step.

:func:`create_step` picks one from the config and the devices. Each returns the batch's mean loss as
a detached device tensor (no host synchronisation) and exposes the network it trains as ``model``.

``--compile`` compiles the network's forward pass first (``AlexNet.compile_forward``: one graph in
the grouped form, one per column stage in the split form); each of the three steps then runs the
compiled kernels: DDP's gradient hooks fire as the compiled backward produces the gradients, and the
CUDA graph captures the compiled kernels, so a one-GPU step is one launch of fused kernels. The
arithmetic (``--precision``, precision.py) is the same in all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import autocast, channels_last, resolve_precision


def train_step(model, optimizer, images, labels, *, precision: str, scaler=None) -> torch.Tensor:
    """One SGD step (§5) on one batch; returns the batch's mean loss (a detached device tensor).

    ``precision`` is resolved (precision.py); ``scaler`` is fp16's GradScaler, else None."""
    device = images.device
    if channels_last(device):
        images = images.contiguous(memory_format=torch.channels_last)
    labels = labels.reshape(-1).to(_output_device(model), dtype=torch.long, non_blocking=True)
    with autocast(precision, device):
        logits = model(images)
    # Multinomial logistic regression objective (§5), computed in float32.
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:  # fp16: scaled loss; the update is skipped (and the scale lowered) when a gradient overflowed
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


def _output_device(model) -> torch.device:
    return getattr(model, "module", model).output_device  # DDP wraps the network


class EagerStep:
    """The step run kernel by kernel. ``note`` says what runs (for the run's first line)."""

    def __init__(self, model, optimizer, *, precision: str = "fp32"):
        self.model, self.optimizer, self.precision = model, optimizer, precision
        self.scaler = torch.amp.GradScaler(model.output_device.type) if precision == "fp16" else None
        self.note = f"{precision}, eager"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return train_step(self.model, self.optimizer, images, labels, precision=self.precision, scaler=self.scaler)

    def static_input(self, shape: tuple) -> torch.Tensor | None:
        """Where the loader may write the next batch's images (the loader's ``static_input``): None, the
        eager step reads whatever tensor it is given."""
        return None


class DDPStep(EagerStep):
    """The eager step through DistributedDataParallel (built here; it broadcasts rank 0's weights).

    ``device_ids`` stays None: the replica may span two GPUs (one per column) or be on the CPU, the
    two cases DDP documents for multi-device and CPU modules.
    """

    def __init__(self, model, optimizer, **kw):
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(model, optimizer, **kw)
        self.model = DistributedDataParallel(model, device_ids=None, output_device=None, broadcast_buffers=False)
        self.note = f"{self.precision}, DDP"


GRAPH_EAGER_STEPS = 3  # eager steps before a CUDA-graph capture (cuDNN's search, optimiser state)


class GraphedStep(EagerStep):
    """The eager step replayed as one CUDA graph: forward, loss, backward and the §5 update.

    Eager PyTorch launches the step's few hundred kernels one by one from Python; at batch 128 in
    bf16 on an H100 launching takes about as long as the GPU takes to run them, so the step is
    bound by the host (benchmarks/results_train.md). Replaying a captured graph costs one launch.

    The first ``eager_steps`` steps of a batch shape run eagerly on a side stream (cuDNN's algorithm
    search and the optimiser's velocities happen there); the step is then captured with the batch
    copied into static input buffers (under bf16 the loader's one cast from DALI's float32 writes
    the images there: :meth:`static_input`). The update bakes the learning rate into its kernels, so a
    change of lr (a /10 drop) captures again. The kernels are the eager step's: same arithmetic,
    same dropout draws (the CUDA generator advances per replay as per eager step).
    """

    def __init__(self, model, optimizer, *, eager_steps: int = GRAPH_EAGER_STEPS, **kw):
        super().__init__(model, optimizer, **kw)
        if self.scaler is not None:
            raise ValueError("fp16's loss scaling reads its overflow flag on the host: no CUDA graph (use EagerStep)")
        self.note = f"{self.precision}, each step replayed as one CUDA graph"
        self.eager_steps = eager_steps
        self.captures = 0
        self.graph = None
        self._shape: tuple | None = None  # batch shape being warmed up or captured
        self._eager_left = 0
        self._hyper_captured = None
        self._x = self._y = self._loss = None

    def _hyper(self) -> tuple:
        return tuple((g["lr"], g["momentum"], g["weight_decay"]) for g in self.optimizer.param_groups)

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.graph = None  # frees the previous graph's memory pool
        self._x = torch.empty_like(images, memory_format=torch.channels_last)  # GPU only: NHWC
        self._y = torch.empty_like(labels.reshape(-1), dtype=torch.long, device=self.model.output_device)
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the grads in the pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: DALI's threads keep decoding (their CUDA calls would invalidate a "global"
        # capture, and fail themselves); only this thread's calls are checked.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._loss = train_step(self.model, self.optimizer, self._x, self._y, precision=self.precision)
        self.graph, self._hyper_captured = graph, self._hyper()
        self.captures += 1

    def _eager(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A warm-up step on a side stream (as capture requires), ordered with the caller's stream."""
        caller = torch.cuda.current_stream(images.device)
        side = torch.cuda.Stream(images.device)
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            loss = train_step(self.model, self.optimizer, images, labels, precision=self.precision)
        caller.wait_stream(side)
        images.record_stream(side)
        loss.record_stream(caller)  # its memory came from the side stream's pool
        return loss

    def static_input(self, shape: tuple) -> torch.Tensor | None:
        """The captured graph's input buffer, while the next call of this ``shape`` replays the graph
        as captured (no warm-up or capture due): the loader may write that batch's images into it,
        converting in the same pass. It is the graph's, so it holds one batch: the loader writes the
        next one on the same stream, after this replay has read it."""
        if self.graph is None or tuple(shape) != self._shape or self._hyper_captured != self._hyper():
            return None
        return self._x

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape) != self._shape:  # first call, or a new shape: warm up eagerly first
            self._shape, self._eager_left, self.graph = tuple(images.shape), self.eager_steps, None
        if self._eager_left > 0:
            self._eager_left -= 1
            return self._eager(images, labels)
        if self.graph is None or self._hyper_captured != self._hyper():
            self._capture(images, labels)
        if images is not self._x:  # (else the loader wrote them there)
            self._x.copy_(images)
        self._y.copy_(labels.reshape(-1))
        self.graph.replay()
        return self._loss.clone()  # the next replay overwrites the static loss


def one_gpu(devices: list[torch.device], replicas: int) -> bool:
    """Where a CUDA graph can replay the step: one CUDA device in a single process."""
    return len(devices) == 1 and devices[0].type == "cuda" and replicas == 1


def uses_cuda_graph(cuda_graph: bool, devices: list[torch.device], replicas: int, precision: str = "auto") -> bool:
    """``--cuda-graph`` (the default) applies on :func:`one_gpu`, and not to fp16 (its loss scaler reads
    the host); else eager."""
    return cuda_graph and one_gpu(devices, replicas) and resolve_precision(precision, devices[0]) != "fp16"


def create_step(model, optimizer, model_cfg, devices: list[torch.device], replicas: int) -> EagerStep:
    """The step for this replica: DDP with several replicas, a CUDA graph where it applies, else eager;
    the forward compiled first with ``model_cfg.compile`` (each of them composes with it)."""
    precision = resolve_precision(model_cfg.precision, devices[0])
    if model_cfg.compile:
        model.compile_forward()
    if replicas > 1:
        step = DDPStep(model, optimizer, precision=precision)
    elif uses_cuda_graph(model_cfg.cuda_graph, devices, replicas, precision):
        step = GraphedStep(model, optimizer, precision=precision)
    else:
        step = EagerStep(model, optimizer, precision=precision)
    if model_cfg.cuda_graph and precision == "fp16" and one_gpu(devices, replicas):
        step.note += " (no CUDA graph under fp16: its loss scaler reads the overflow flag on the host)"
    if model_cfg.compile:
        step.note += ", forward compiled"
    return step

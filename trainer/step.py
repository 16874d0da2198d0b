"""One SGD step (§5), three ways behind one interface: ``step(images, labels) -> loss``.

* :class:`EagerStep`: forward, loss, backward and the update, kernel by kernel (CPU, two GPUs).
* :class:`DDPStep`: the eager step on a ``DistributedDataParallel`` wrapper (several replicas): the
  backward pass averages the gradients over the replicas.
* :class:`GraphedStep`: the eager step captured once as a CUDA graph and replayed (one GPU, one
  process), bitwise the eager step.

:func:`create_step` picks one from the config and the devices. Each returns the batch's mean loss as
a detached device tensor (no host synchronisation) and exposes the network it trains as ``model``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def train_step(model, optimizer, images, labels, *, bf16: bool, channels_last: bool, output_device) -> torch.Tensor:
    """One SGD step (§5) on one batch; returns the batch's mean loss (a detached device tensor)."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = labels.reshape(-1).to(output_device, dtype=torch.long, non_blocking=True)
    # No autocast weight-cast cache: each weight is cast once per step anyway, and a CUDA graph
    # capture (GraphedStep) must not keep cached casts.
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
        logits = model(images)
    # Multinomial logistic regression objective (§5), computed in float32.
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


class EagerStep:
    def __init__(self, model, optimizer, *, bf16: bool = False, channels_last: bool = False):
        self.model, self.optimizer = model, optimizer
        self.kw = {"bf16": bf16, "channels_last": channels_last, "output_device": model.output_device}

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return train_step(self.model, self.optimizer, images, labels, **self.kw)


class DDPStep(EagerStep):
    """The eager step through DistributedDataParallel (built here; it broadcasts rank 0's weights).

    ``device_ids`` stays None: the replica may span two GPUs (one per column) or be on the CPU, the
    two cases DDP documents for multi-device and CPU modules.
    """

    def __init__(self, model, optimizer, **kw):
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(model, optimizer, **kw)
        self.model = DistributedDataParallel(model, device_ids=None, output_device=None, broadcast_buffers=False)


GRAPH_EAGER_STEPS = 3  # eager steps before a CUDA-graph capture (cuDNN's search, optimiser state)


class GraphedStep(EagerStep):
    """The eager step replayed as one CUDA graph: forward, loss, backward and the §5 update.

    Eager PyTorch launches the step's few hundred kernels one by one from Python; at batch 128 in
    bf16 on an H100 launching takes about as long as the GPU takes to run them, so the step is
    bound by the host (benchmarks/results_train.md). Replaying a captured graph costs one launch.

    The first ``eager_steps`` steps of a batch shape run eagerly on a side stream (cuDNN's algorithm
    search and the optimiser's velocities happen there); the step is then captured with the batch
    copied into static input buffers. The update bakes the learning rate into its kernels, so a
    change of lr (a /10 drop) captures again. The kernels are the eager step's: same arithmetic,
    same dropout draws (the CUDA generator advances per replay as per eager step).
    """

    def __init__(self, model, optimizer, *, eager_steps: int = GRAPH_EAGER_STEPS, **kw):
        super().__init__(model, optimizer, **kw)
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
        fmt = torch.channels_last if self.kw["channels_last"] else torch.contiguous_format
        self._x = torch.empty_like(images, memory_format=fmt)
        self._y = torch.empty_like(labels.reshape(-1), dtype=torch.long, device=self.kw["output_device"])
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the grads in the pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: DALI's threads keep decoding (their CUDA calls would invalidate a "global"
        # capture, and fail themselves); only this thread's calls are checked.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._loss = train_step(self.model, self.optimizer, self._x, self._y, **self.kw)
        self.graph, self._hyper_captured = graph, self._hyper()
        self.captures += 1

    def _eager(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A warm-up step on a side stream (as capture requires), ordered with the caller's stream."""
        caller = torch.cuda.current_stream(images.device)
        side = torch.cuda.Stream(images.device)
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            loss = train_step(self.model, self.optimizer, images, labels, **self.kw)
        caller.wait_stream(side)
        images.record_stream(side)
        loss.record_stream(caller)  # its memory came from the side stream's pool
        return loss

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape) != self._shape:  # first call, or a new shape: warm up eagerly first
            self._shape, self._eager_left, self.graph = tuple(images.shape), self.eager_steps, None
        if self._eager_left > 0:
            self._eager_left -= 1
            return self._eager(images, labels)
        if self.graph is None or self._hyper_captured != self._hyper():
            self._capture(images, labels)
        self._x.copy_(images)
        self._y.copy_(labels.reshape(-1))
        self.graph.replay()
        return self._loss.clone()  # the next replay overwrites the static loss


def uses_cuda_graph(cuda_graph: bool, devices: list[torch.device], replicas: int) -> bool:
    """``--cuda-graph`` (the default) applies to one CUDA device in a single process; else eager."""
    return cuda_graph and len(devices) == 1 and devices[0].type == "cuda" and replicas == 1


def create_step(model, optimizer, model_cfg, devices: list[torch.device], replicas: int) -> EagerStep:
    """The step for this replica: DDP with several replicas, a CUDA graph where it applies, else eager."""
    kw = {"bf16": model_cfg.bf16, "channels_last": model_cfg.channels_last}
    if replicas > 1:
        return DDPStep(model, optimizer, **kw)
    if uses_cuda_graph(model_cfg.cuda_graph, devices, replicas):
        return GraphedStep(model, optimizer, **kw)
    return EagerStep(model, optimizer, **kw)

"""Data-parallel replicas under ``torchrun`` (DistributedDataParallel on torch.distributed).

Launch (one node, two replicas, each holding the two-column model on its own GPU pair)::

    torchrun --nproc-per-node 2 -m alexnet.trainer.cli --gpus 0,1 --data-dir /data/imagenet-lmdb

Several nodes (run on every node; node 0's address as the rendezvous endpoint)::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint node0:29500 \\
        --rdzv-id alexnet-run1 -m alexnet.trainer.cli --gpus 0,1 --run-dir /shared/runs/run1

Other launchers: under ``srun`` or ``mpirun`` the replica's rank, local rank and local count come
from SLURM's (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS``,
``SLURM_STEP_TASKS_PER_NODE``) or Open MPI's (``OMPI_COMM_WORLD_*``) variables when torchrun's are absent;
``MASTER_ADDR`` and ``MASTER_PORT`` must be exported. A launch where they cannot be found stops
with one line saying what to set.

Semantics (documented in the README and the report):

* **Devices.** ``--gpus`` names the devices of ONE replica, counted from that replica's offset
  ``LOCAL_RANK x len(gpus)``: with ``--gpus 0,1`` local replica 0 uses GPUs 0,1, replica 1 uses
  2,3, ... (so 4 replicas need 8 GPUs per node). ``--gpus 0`` gives each replica one GPU. The
  default (``auto``) takes 2 GPUs per replica when the node has at least 2 per local replica,
  else 1; it stops with one line when there are fewer GPUs than local replicas, and trains on
  the CPU only in a single process without GPUs (several CPU replicas need ``--gpus cpu``).
  Backend: NCCL when the replica is on GPUs, gloo on the CPU.
* **Batch and learning rate.** ``--batch-size`` is the GLOBAL batch: each of W replicas takes
  ``batch_size / W`` images per step (it must divide). DDP averages the gradients over
  replicas, and each replica's loss is the mean over its images, so one step follows the
  gradient of the mean loss over the whole global batch, as one process with that batch would.
  The paper's recipe (batch 128, lr 0.01) is therefore unchanged by the replica count; only the
  arithmetic of the batch's split differs (and dropout masks are drawn per replica).
* **Data.** Replica r reads every W-th record of each epoch's permutation of the training split
  (``create_loader(..., rank=r, world=W)``, pipeline/order.py) and of the validation split in key
  order; validation error counts are summed over replicas.
* **Files.** Only rank 0 writes (config, versions, metrics, checkpoints, TensorBoard).
* **Checkpoints.** Rank 0 gathers every replica's RNG states and the loader position (epoch,
  records consumed, seed: the same on every replica) into the checkpoint (``rng[r]``, ``loader``). Resuming
  with the same replica count restores each replica's own RNG entry: exact continuation. With a
  different count (the same global batch), model, optimiser, schedule, counters and the loader
  position are restored, so the epoch's permutation continues without repeating or skipping
  records, and each replica's RNG is re-seeded from (seed, rank, step) (dropout masks differ from
  the uninterrupted run's). With ``--shuffle buffer`` an interrupted epoch restarts instead.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from alexnet.pipeline.errors import AlexnetError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    restart: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT: > 0 when the group was restarted after a failure

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Each launcher's (world size, rank, local rank, local count) variables. The world size's variable
# picks the launcher, and the other three come from the same one, so that values of two launchers
# (mpirun inside an sbatch script, whose SLURM_PROCID is 0 for every process) never mix. Open MPI
# and PMI come before SLURM: mpirun's daemons may be started by srun. SLURM's *step* variables are
# set by srun only; a batch script (sbatch -n 4 has SLURM_NTASKS=4) is one process.
LAUNCHERS = (
    ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),  # torchrun, or set by hand
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH's hydra
    ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),  # srun
)


def _first_int(env, names: tuple[str, ...]) -> tuple[str, int] | None:
    for name in names:
        if env.get(name, "").strip():
            try:
                return name, int(env[name])
            except ValueError:
                raise AlexnetError(f"bad launcher environment: {name}={env[name]!r} is not an integer") from None
    return None


def _slurm_tasks_on_this_node(env) -> tuple[str, int] | None:
    """SLURM_STEP_TASKS_PER_NODE ("4(x2)" or "4,3,2(x3)") at this node's index SLURM_NODEID (srun)."""
    text, node = env.get("SLURM_STEP_TASKS_PER_NODE", ""), env.get("SLURM_NODEID", "0")
    counts: list[int] = []
    for part in filter(None, text.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return ("SLURM_STEP_TASKS_PER_NODE", counts[int(node)]) if node.isdigit() and int(node) < len(counts) else None


def dist_info_from_env(env: dict[str, str] | None = None) -> DistInfo:
    """Replica coordinates from the launcher's environment: torchrun's variables, else SLURM's or
    Open MPI's (``srun``, ``mpirun``); a single replica when none is set.

    A multi-process launch whose local rank or local count cannot be found stops with one line
    saying what to set: guessing them would put two replicas on one GPU.
    """
    env = os.environ if env is None else env
    launcher = next((names for names in LAUNCHERS if env.get(names[0], "").strip()), None)
    world = _first_int(env, launcher[:1]) if launcher else None
    if world is None or world[1] <= 1:
        return DistInfo(restart=restart_count(env))
    rank, local = _first_int(env, launcher[1:2]), _first_int(env, launcher[2:3])
    local_world = _slurm_tasks_on_this_node(env) if launcher[0].startswith("SLURM") else _first_int(env, launcher[3:])
    if launcher[0] == "WORLD_SIZE":  # set by hand in an srun or mpirun script: the local pair from there
        local = local or _first_int(env, ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"))
        local_world = local_world or _first_int(env, ("OMPI_COMM_WORLD_LOCAL_SIZE",)) or _slurm_tasks_on_this_node(env)
    if rank is None or local is None or local_world is None:
        missing = [
            n for n, v in (("RANK", rank), ("LOCAL_RANK", local), ("LOCAL_WORLD_SIZE", local_world)) if v is None
        ]
        raise AlexnetError(
            f"{world[0]}={world[1]} (several processes) but no {', '.join(missing)}: launch with torchrun, or "
            "set RANK, LOCAL_RANK and LOCAL_WORLD_SIZE (plus MASTER_ADDR and MASTER_PORT) for each process"
        )
    if env is os.environ:  # torch.distributed's env:// rendezvous reads RANK, WORLD_SIZE and MASTER_*
        os.environ.setdefault("RANK", str(rank[1]))
        os.environ.setdefault("WORLD_SIZE", str(world[1]))
        if not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
            raise AlexnetError(
                "several processes but MASTER_ADDR or MASTER_PORT is not set: launch with torchrun, or export "
                "MASTER_ADDR (the first node's address) and MASTER_PORT (a free port) for every process"
            )
    return DistInfo(
        rank=rank[1],
        world_size=world[1],
        local_rank=local[1],
        local_world_size=local_world[1],
        restart=restart_count(env),
    )


def restart_count(env) -> int:
    """How many times torchrun has restarted the group (``--max-restarts``); 0 for a first start."""
    text = env.get("TORCHELASTIC_RESTART_COUNT", "").strip()
    return int(text) if text.isdigit() else 0


def replica_gpus(spec: str, info: DistInfo, cuda_count: int) -> str:
    """The ``--gpus`` value of this replica: ``auto`` resolved, then offset by its local rank.

    ``auto`` never falls back to the CPU when GPUs are visible, nor trains several replicas on the
    CPU: those need ``--gpus cpu`` given explicitly. ``cuda_count`` is passed in (not read here) so
    the rule is testable on a CPU machine.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        local = max(info.local_world_size, 1)
        per_replica = cuda_count // local
        if cuda_count and not per_replica:
            raise AlexnetError(
                f"--gpus auto: {local} replicas on this node but only {cuda_count} GPU(s) visible; launch at most "
                f"{cuda_count} per node, or give --gpus cpu to train on the CPU"
            )
        if not cuda_count and info.enabled:
            raise AlexnetError(
                f"--gpus auto: {info.world_size} processes but no GPU visible (check CUDA_VISIBLE_DEVICES); "
                "give --gpus cpu to train the replicas on the CPU"
            )
        spec = "0,1" if per_replica >= 2 else "0" if per_replica == 1 else "cpu"
    if spec == "cpu" or info.local_rank == 0:
        return spec
    parts = [p.strip() for p in spec.split(",")]
    if not all(p.isdigit() for p in parts):
        return spec  # parse_gpus gives the clear error
    offset = info.local_rank * len(parts)
    return ",".join(str(int(p) + offset) for p in parts)


# How long a replica waits for the others at a checkpoint's liveness check before it gives up (a peer's
# host that died without closing its connections; a dead peer process is seen at once).
PEER_TIMEOUT = timedelta(seconds=60)
LOST_REPLICA = "exiting so that the launcher restarts the group (torchrun --max-restarts); the last checkpoint is kept"


def init_process_group(info: DistInfo, on_gpu: bool, first_gpu: int | None) -> None:
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if on_gpu else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(minutes=30)}
    if on_gpu and first_gpu is not None:
        torch.cuda.set_device(first_gpu)
        kwargs["device_id"] = torch.device("cuda", first_gpu)
    store = _restart_store(info)
    if store is not None:
        kwargs.update(store=store, rank=info.rank, world_size=info.world_size)
    dist.init_process_group(**kwargs)


def _restart_store(info: DistInfo):
    """After a torchrun restart, the agent's store under a prefix of this attempt, else None (env://).

    torchrun's static rendezvous (``--master-addr``/``--master-port``) keeps one store for every attempt
    and its workers use it unprefixed, so a restarted replica can read the dead attempt's addresses
    and wait minutes connecting to a process that is gone (torch 2.13)."""
    if not info.restart or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port and port.isdigit()):
        return None
    tcp = dist.TCPStore(addr, int(port), info.world_size, is_master=False, timeout=timedelta(minutes=5))
    return dist.PrefixStore(f"alexnet/attempt-{info.restart}", tcp)


def peers_alive(info: DistInfo) -> None:
    """Every replica reached this point (a host barrier over gloo); raises one line if one is gone.

    Called before a checkpoint's collectives: a collective with a dead peer can hang (NCCL) until the
    launcher kills the survivors, where this check fails at once, so the group exits and is restarted."""
    if not info.enabled:
        return
    with lost_replica():
        dist.monitored_barrier(group=_host_group(), timeout=PEER_TIMEOUT, wait_all_ranks=True)


class lost_replica:
    """Context manager: a collective's failure (a peer died) becomes one line naming what to expect."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, _tb):
        if kind is not None and issubclass(kind, RuntimeError) and not isinstance(exc, AlexnetError):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else kind.__name__
            first = re.sub(r"^\[[^\]]*\.cc:\d+\]\s*", "", first).split(". ")[0]  # gloo's source position
            raise AlexnetError(f"another replica is gone ({first[:200]}): {LOST_REPLICA}") from None
        return False


def destroy_process_group() -> None:
    _HOST_GROUPS.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def collective_device(device: torch.device) -> torch.device:
    """Where this replica's collectives run: gloo reduces CPU tensors, NCCL CUDA tensors."""
    return device if device.type == "cuda" else torch.device("cpu")


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every replica's ``obj`` (in rank order), on every replica. Pickled over the process group:
    our own processes only; nothing unpickled from files."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    with lost_replica():
        dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    with lost_replica():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    with lost_replica():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_flags(flags: list[bool], info: DistInfo) -> list[bool]:
    """Each flag True on every replica if it is True on any (stop decisions must agree, or DDP hangs).

    A host operation: a CPU tensor over gloo. Over NCCL the reduction would queue behind the GPU's
    pending steps and reading it would wait for them, a full synchronisation at every log point."""
    if not info.enabled:
        return list(flags)
    t = torch.tensor([float(f) for f in flags])
    with lost_replica():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group())
    return [v > 0 for v in t.tolist()]


_HOST_GROUPS: list = []  # the gloo group beside an NCCL default group, made at first use


def _host_group():
    """None (the default group) when it is gloo; else one gloo group over the same replicas, made by
    every replica at its first agreement (they all reach it at the same point)."""
    if dist.get_backend() == "gloo":
        return None
    if not _HOST_GROUPS:
        _HOST_GROUPS.append(dist.new_group(backend="gloo"))
    return _HOST_GROUPS[0]

"""Stage 2 of the GPU check (benchmarks/gpu_check.sh): the DALI part, from carried wheels.

    python3 benchmarks/gpu_check.py setup --parts .gpu/parts --env /tmp/alexnet-gpu-env
    python3 benchmarks/gpu_check.py measure --out DIR [--budget-s 180]   # DIR/gpu_check.json
    python3 benchmarks/gpu_check.py measure --out /tmp/x --cpu-smoke     # the same code on the CPU, toy sizes

``setup`` checks the carried parts against their MANIFEST (``sha256sum`` lines written by
``gpu_check.sh pack``: the count and each checksum) before unpacking anything, unpacks the wheels
into ENV/sp, and joins the ``nvidia`` namespace of the DALI wheel with the host's (torch's CUDA
wheels) by ``pkgutil.extend_path`` in DALI's ``nvidia/__init__.py``, so both import whatever either
ships. Standard library only. One line and exit 1 on a missing, extra or corrupt part.

``measure`` times, on a synthesized dataset at the trainer's defaults, each figure isolated and the
JSON rewritten after each (benchmarks/gpu_probe.py's runner: an error is written and the next figure
runs; SIGTERM or the budget ends it with the JSON written and exit 0):

* ``pipeline/global``, ``pipeline/buffer``: images/s of the training loader alone, each shuffle over
  at least one whole epoch; the buffer shuffle's dataset holds at least 10x its buffer
  (pipeline/dali_pipeline.py ``SHUFFLE_BUFFER``), so the figure times reading, not the buffer's fill;
* ``train/<kind>/bf16/synthetic`` and ``.../fed``: training images/s of one step on one resident
  batch and on the loader's batches, separate figures of one model and step (eager, graphed,
  compiled last); the ratio is fed / synthetic.

/dev/shm is checked first: DALI's reader processes pass batches through it, and containers often cap
it at 64 MB; below ``SHM_NEEDED_MB`` the figures run with ``workers=0`` (reads on the pipeline's own
thread) and the JSON and the output say so.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import sys
import tarfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHM_NEEDED_MB = 1024  # DALI's reader processes: (prefetch + workers) batches of 128 decoded-size buffers
NAMESPACE_JOIN = "\n# joined with the host's nvidia.* (gpu_check.py)\nfrom pkgutil import extend_path\n__path__ = extend_path(__path__, __name__)\n"


# --------------------------------------------------------------------------- setup (standard library only)


def verify_parts(parts: Path) -> list[Path]:
    """The parts in MANIFEST order, after checking the count and every checksum; SystemExit naming the fault."""
    manifest = parts / "MANIFEST"
    if not manifest.is_file():
        raise SystemExit(f"gpu_check: {manifest} missing (carry it with the parts; 'gpu_check.sh pack' writes it)")
    listed = []
    for line in manifest.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed.append((name.lstrip("*"), digest))
    present = sorted(p.name for p in parts.glob("part-*"))
    names = [n for n, _ in listed]
    if present != sorted(names):
        missing, extra = sorted(set(names) - set(present)), sorted(set(present) - set(names))
        raise SystemExit(
            f"gpu_check: {len(present)} of {len(names)} parts in {parts}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; not in MANIFEST {', '.join(extra)}" if extra else "")
        )
    for name, digest in listed:
        actual = _sha256(parts / name)
        if actual != digest:
            raise SystemExit(f"gpu_check: {parts / name} is corrupt (sha256 {actual[:12]}, MANIFEST {digest[:12]})")
    return [parts / n for n in names]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Concatenated:
    """The parts read as one stream (what ``cat part-*`` gives), for tarfile's stream mode."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths, self.f = list(paths), None

    def read(self, n: int = -1) -> bytes:
        while True:
            if self.f is None:
                if not self.paths:
                    return b""
                self.f = self.paths.pop(0).open("rb")
            data = self.f.read(n)
            if data:
                return data
            self.f.close()
            self.f = None


def join_namespace(package: Path) -> None:
    """Make ``package`` (a folder named ``nvidia``) a portion that extends itself over every sys.path entry."""
    init = package / "__init__.py"
    text = init.read_text() if init.exists() else ""
    if "extend_path" not in text:
        init.write_text(text + NAMESPACE_JOIN)


def setup(parts: Path, env: Path) -> Path:
    """Verify, unpack the wheels into ENV/sp (once), join the ``nvidia`` namespace; returns ENV/sp."""
    site = env / "sp"
    if (site / ".done").exists():
        return site
    paths = verify_parts(parts)
    shutil.rmtree(env / "wheels", ignore_errors=True)
    with tarfile.open(fileobj=_Concatenated(paths), mode="r|") as tar:
        tar.extractall(env, filter="data")
    wheels = sorted((env / "wheels").glob("*.whl"))
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:  # a wheel is a zip of site-packages
            z.extractall(site)
    if (site / "nvidia").is_dir():
        join_namespace(site / "nvidia")
    (site / ".done").write_text(f"{len(wheels)} wheels from {len(paths)} parts\n")
    print(f"gpu_check: {len(paths)} parts verified, {len(wheels)} wheels unpacked into {site}")
    return site


def shm_workers(requested: int, path: str = "/dev/shm", needed_mb: int = SHM_NEEDED_MB) -> tuple[int, str | None]:
    """(the reader processes to use, a warning or None): 0 where ``path`` has less than ``needed_mb`` free."""
    try:
        free_mb = shutil.disk_usage(path).free / 2**20
    except OSError as exc:
        return 0, f"{path} unusable ({exc}): workers=0, reads on the pipeline's thread"
    if requested and free_mb < needed_mb:
        return 0, f"{path} has {free_mb:.0f} MB free (< {needed_mb} MB): workers=0, reads on the pipeline's thread"
    return requested, None


# --------------------------------------------------------------------------- measure


def pipeline_figure(config, batches: int) -> dict:
    """Images/s the training loader delivers alone over ``batches`` batches after the first."""
    from alexnet.trainer import distributed as D
    from alexnet.trainer.bench import pipeline_batches
    from alexnet.trainer.replica import create_loader_for, resolve_replica

    replica = resolve_replica(config.run.gpus, D.dist_info_from_env())
    it = pipeline_batches(create_loader_for(config, "train", replica))
    next(it)  # the build and, for the buffer shuffle, its fill
    replica.sync()
    start = time.perf_counter()
    for _ in range(batches):
        images = next(it)[0]
    replica.sync()
    seconds = time.perf_counter() - start
    return {
        "images_per_s": round(batches * images.shape[0] / seconds, 1),
        "batches": batches,
        "timed_s": round(seconds, 2),
    }


class TrainFigures:
    """One model and step per (kind, precision), timed on synthetic and on fed batches as two figures."""

    def __init__(self, config_of, warmup: int, steps: int) -> None:
        self.config_of, self.warmup, self.steps, self.built = config_of, warmup, steps, {}

    def _build(self, kind: str, precision: str):
        from alexnet.pipeline.artifacts import read_manifest
        from alexnet.trainer import distributed as D
        from alexnet.trainer.optim import create_optimizer
        from alexnet.trainer.replica import build_model, resolve_replica
        from alexnet.trainer.step import GRAPH_EAGER_STEPS, GraphedStep, create_step

        if (kind, precision) not in self.built:
            config = self.config_of(kind, precision)
            replica = resolve_replica(config.run.gpus, D.dist_info_from_env())
            classes = len(read_manifest(Path(config.run.data_dir)).classes)
            model = build_model(config, replica, classes).train()
            opt = create_optimizer(model, config.optim.lr, config.optim.momentum, config.optim.weight_decay)
            step = create_step(model, opt, config.model, list(replica.devices), replicas=1)
            warmup = self.warmup + (GRAPH_EAGER_STEPS + 2 if isinstance(step, GraphedStep) else 0)
            self.built[(kind, precision)] = (config, replica, classes, step, warmup)
        return self.built[(kind, precision)]

    def run(self, kind: str, precision: str, fed: bool) -> dict:
        from alexnet.trainer.bench import pipeline_batches, synthetic_batches, timed
        from alexnet.trainer.replica import create_loader_for

        config, replica, classes, step, warmup = self._build(kind, precision)
        b = config.optim.batch_size
        if fed:
            batches = pipeline_batches(create_loader_for(config, "train", replica, batch_size=b))
        else:
            batches = synthetic_batches(config, replica, classes)
        rate = timed(step, batches, replica, warmup, self.steps, b)
        return {"images_per_s": round(rate, 1), "step": step.note, "batch": b, "timed_steps": self.steps}


def measure(out: Path, budget_s: float, smoke: bool, compile_: bool) -> int:
    import torch
    from bench_train import synth_dataset
    from gpu_probe import Probe, compile_blocker

    from alexnet.pipeline.dali_pipeline import SHUFFLE_BUFFER
    from alexnet.trainer.config import TrainConfig

    if not smoke and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU (use --cpu-smoke on a CPU machine)", file=sys.stderr)
        return 2
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    probe = Probe(out, budget_s, device, filename="gpu_check.json")
    workers, warning = shm_workers(TrainConfig().data.workers)
    probe.results["shm"] = {"workers": workers, "warning": warning}
    if warning:
        print(f"gpu_check: WARNING {warning}", flush=True)
    batch = 4 if smoke else 128
    base = {"gpus": "cpu" if smoke else "0", "batch_size": batch, "progress": False, "workers": workers}
    sizes = {"global": 64 if smoke else 4096, "buffer": 64 if smoke else 10 * SHUFFLE_BUFFER}
    cache = Path("/tmp/alexnet-gpu-check")
    for shuffle, records in sizes.items():
        data = synth_dataset(cache / f"synthetic-{records}", records, val_records=32 if smoke else 1000)
        config = TrainConfig.create(**base, data_dir=str(data), shuffle=shuffle)
        epoch = 2 if smoke else math.ceil(records / batch)  # at least one whole epoch after the first batch
        probe.run(f"pipeline/{shuffle}", pipeline_figure, config, epoch, cost_s=30)
    data = str(cache / f"synthetic-{sizes['global']}")

    def config_of(kind: str, precision: str):
        graph, compiled = {"eager": (False, False), "graphed": (True, False), "compiled": (True, True)}[kind]
        return TrainConfig.create(**base, data_dir=data, precision=precision, cuda_graph=graph, compile=compiled)

    train = TrainFigures(config_of, warmup=1 if smoke else 10, steps=2 if smoke else 50)
    kinds = ["eager", "graphed"] + (["compiled"] if compile_ else [])
    for kind in kinds:
        blocker = compile_blocker() if kind == "compiled" else None
        for fed in (False, True):
            name = f"train/{kind}/bf16/{'fed' if fed else 'synthetic'}"
            if blocker:
                probe.results["figures"][name] = {"skipped": f"no compile: {blocker}"}
                continue
            probe.run(name, train.run, kind, "bf16", fed, cost_s=90 if kind == "compiled" and not fed else 20)
    probe.results["done"] = not probe.stopped
    probe.write()
    print(f"gpu_check: {probe.path}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup", help="verify the carried parts, unpack the wheels, join the nvidia namespace")
    s.add_argument("--parts", type=Path, default=Path(".gpu/parts"))
    s.add_argument("--env", type=Path, default=Path("/tmp/alexnet-gpu-env"))
    m = sub.add_parser("measure", help="the DALI figures into OUT/gpu_check.json")
    m.add_argument("--out", type=Path, default=Path("/tmp/gpu-check"))
    m.add_argument("--budget-s", type=float, default=180, help="stop starting figures that would end past this")
    m.add_argument("--cpu-smoke", action="store_true", help="the CPU at toy sizes (checks that every part runs)")
    m.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled step")
    args = p.parse_args(argv)
    if args.command == "setup":
        setup(args.parts, args.env)
        return 0
    import signal

    from gpu_probe import on_sigterm

    signal.signal(signal.SIGTERM, on_sigterm)
    return measure(args.out, args.budget_s, args.cpu_smoke, args.compile)


if __name__ == "__main__":
    sys.exit(main())

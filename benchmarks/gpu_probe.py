"""Stage 1 of the GPU check (issue 26): the training step's figures with nothing but Python and torch.

    python benchmarks/gpu_probe.py [--out DIR] [--budget-s 220]   # a GPU host: DIR/gpu_probe.json
    python benchmarks/gpu_probe.py --cpu-smoke --out /tmp/probe   # the same code on the CPU, toy sizes

Imports the project as ``alexnet.*`` (its source on PYTHONPATH, as benchmarks/gpu_check.sh links it)
and of it only the network, the step, the optimiser, the precision switches and the LRN operator:
none of DALI, lmdb, Pillow, click (tests/test_gpu_probe.py runs it where importing them raises).
Runs on torch 2.11 (what GPU hosts were seen with) as on the pinned 2.13; TF32 on the legacy
flags, by the trainer's own ``set_tf32``.

Every figure is isolated: an exception is written into the figure's entry (type, message, the
traceback's tail) and the next figure runs; the JSON is rewritten after each figure, and SIGTERM
(``timeout``) ends the current figure as "interrupted", writes the JSON and exits 0, as does the
script's own time budget (figures that do not fit are written as skipped). Exit 0 whenever the JSON
was written; 2 only for bad arguments.

The figures, cheapest and most telling first, the compiles (about a minute each) last:

* ``lrn``: the fused LRN operator against the reference arithmetic, forward + backward at conv1's
  and conv2's batch-128 shapes in bf16: time, bytes (kernel's loads and stores; the reference's
  operators by benchmarks/bench_bytes.py's rule), agreement;
* ``sgd``: the fused update against the four multi-tensor passes on the network's 61 M parameters:
  time, and the elements that are not bitwise equal after three updates;
* ``train/<kind>/<precision>``: synthetic training img/s, eager / graphed (CUDA graph) / compiled
  (forward compiled, then graphed), bf16 and fp32, and each one's peak device memory;
* ``split``: the two-column split form with both columns on one GPU, eager bf16;
* ``profile``: the 30 kernels with the most device time in a few eager bf16 steps.

Compiling is skipped, with the reason, where there is no C compiler or no Python headers (Inductor
needs both); ``--cpu-smoke`` compiles with the ``aot_eager`` backend (no C compile) to check the path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import sysconfig
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

BATCH, STEPS, WARMUP = 128, 30, 5
SMOKE = {"batch": 2, "steps": 1, "warmup": 1}
COMPILE_COST_S = 90  # what one compiled figure needs, to decide whether it still fits the budget


class Interrupted(Exception):
    """SIGTERM, raised inside the running figure."""


def on_sigterm(signum, frame):
    raise Interrupted("SIGTERM (time limit)")


class Probe:
    """The results file and the figure runner: each figure isolated, the file rewritten after each."""

    def __init__(self, out: Path, budget_s: float, device: torch.device, filename: str = "gpu_probe.json") -> None:
        self.path, self.device = out / filename, device
        self.deadline = time.monotonic() + budget_s
        self.t0 = time.monotonic()
        self.results: dict = {"machine": machine(device), "figures": {}}
        self.stopped = False
        out.mkdir(parents=True, exist_ok=True)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        tmp.replace(self.path)

    def run(self, name: str, fn, *args, cost_s: float = 10) -> None:
        entry: dict = {}
        if self.stopped:
            entry["skipped"] = "interrupted before it started"
        elif time.monotonic() + cost_s > self.deadline:
            entry["skipped"] = f"budget: {self.deadline - time.monotonic():.0f} s left, needs about {cost_s:.0f} s"
        else:
            start = time.monotonic()
            try:
                _reset_peak(self.device)
                entry.update(fn(*args))
                entry["peak_device_mb"] = _peak_mb(self.device)
            except Interrupted as exc:
                entry["error"], self.stopped = f"interrupted: {exc}", True
            except Exception as exc:  # isolated: recorded, and the next figure runs
                entry["error"] = f"{type(exc).__name__}: {exc}"
                entry["traceback"] = traceback.format_exc()[-3000:]
            entry["seconds"] = round(time.monotonic() - start, 2)
        self.results["figures"][name] = entry
        self.write()
        print(f"[{time.monotonic() - self.t0:6.1f} s] {name}: {_summary(entry)}", flush=True)


def _summary(entry: dict) -> str:
    for key in ("skipped", "error"):
        if key in entry:
            return f"{key}: {entry[key]}"
    return ", ".join(f"{k} {v}" for k, v in entry.items() if not isinstance(v, dict | list))


def machine(device: torch.device) -> dict:
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    cuda = device.type == "cuda"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": version("triton"),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "device_memory_gb": round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1) if cuda else None,
        "cpus": os.cpu_count(),
        "compile": compile_blocker() or "possible",
    }


def compile_blocker() -> str | None:
    """Why Inductor cannot compile here (no C compiler, no Python headers), or None."""
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        return "no C compiler (cc, gcc or clang) on PATH"
    include = sysconfig.get_paths().get("include") or ""
    if not (Path(include) / "Python.h").exists():
        return f"no Python headers ({include}/Python.h missing)"
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def timed_ms(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` in ms (synchronised around each call)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


# --------------------------------------------------------------------------- figures


def lrn_figure(device: torch.device, smoke: bool) -> dict:
    """The fused operator against the reference, forward + backward, bf16, conv1's and conv2's maps."""
    from bench_bytes import ByteCount

    from alexnet.trainer import lrn as L
    from alexnet.trainer.model import lrn_alpha

    batch = SMOKE["batch"] if smoke else BATCH
    alpha, out = lrn_alpha("authors"), {}
    for name, (maps, side) in {"norm1": (96, 55), "norm2": (256, 27)}.items():
        x = torch.relu(torch.randn(batch, maps, side, side, device=device) * 11)
        x = x.bfloat16().contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(x)
        hyper = (5, alpha, 0.75, 2.0, maps // 2)

        def fused(x=x, g=g, hyper=hyper):
            return L.lrn(x, *hyper), L.lrn_backward(x, g, *hyper)

        def reference(x=x, g=g, hyper=hyper):
            leaf = x.detach().requires_grad_()
            y = L.lrn_reference(leaf, *hyper)
            return y, torch.autograd.grad(y, leaf, g)[0]

        count = ByteCount()
        with count:
            ref_y, ref_dx = (t.detach() for t in reference())
        (y, dx), repeats = fused(), 1 if smoke else 20
        out[name] = {
            "fused_ms": timed_ms(fused, device, repeats),
            "reference_ms": timed_ms(reference, device, repeats),
            "fused_mb": round(sum(L.KERNEL_TENSORS.values()) * x.numel() * x.element_size() / 2**20, 1),
            "reference_mb": round(sum(count.bytes.values()) / 2**20, 1),
            "max_rel_diff_y": float(((y.float() - ref_y.float()).abs() / ref_y.float().abs().clamp_min(1e-3)).max()),
            "max_diff_dx_of_max": float((dx.float() - ref_dx.float()).abs().max() / ref_dx.float().abs().max()),
            "kernel": "triton" if L._uses_kernel(x) else "reference (no CUDA)",
        }
        out[name]["speedup"] = round(out[name]["reference_ms"] / out[name]["fused_ms"], 2)
        out[name]["fused_gb_per_s"] = round(out[name]["fused_mb"] * 2**20 / 1e6 / out[name]["fused_ms"], 1)
    return out


def sgd_figure(device: torch.device, smoke: bool) -> dict:
    """The fused §5 update against the four multi-tensor passes on the network's parameters."""
    from alexnet.trainer import optim as O
    from alexnet.trainer.model import AlexNet

    model = AlexNet(devices=[device]).to(memory_format=torch.channels_last)
    params = [p.detach() for p in model.parameters()]
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(p.shape, device=device, generator=gen).to(memory_format=_format(p)) * 1e-3 for p in params]
    vel = [torch.zeros_like(p) for p in params]
    copies = ([p.clone() for p in params], [v.clone() for v in vel])
    for _ in range(1 if smoke else 3):
        O.paper_sgd_(params, grads, vel, 0.01, 0.9, 5e-4)
        O.foreach_update(copies[0], grads, copies[1], 0.01, 0.9, 5e-4)
    mismatched = sum(int((a != b).sum()) for a, b in zip(params + vel, copies[0] + copies[1], strict=True))
    repeats = 1 if smoke else 20
    return {
        "fused_ms": timed_ms(lambda: O.paper_sgd_(params, grads, vel, 0.01, 0.9, 5e-4), device, repeats),
        "foreach_ms": timed_ms(lambda: O.foreach_update(params, grads, vel, 0.01, 0.9, 5e-4), device, repeats),
        "elements_not_bitwise": mismatched,
        "kernel": "triton" if device.type == "cuda" else "foreach (no CUDA)",
    }


def _format(p: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )


def _trainer(device: torch.device, precision: str, split: bool = False):
    from alexnet.trainer.model import AlexNet
    from alexnet.trainer.optim import create_optimizer
    from alexnet.trainer.precision import channels_last, set_tf32

    set_tf32(precision, device)
    torch.manual_seed(0)
    model = AlexNet(devices=[device, device] if split else [device]).train()
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    return model, create_optimizer(model, 0.01, 0.9, 5e-4)


def _batch(device: torch.device, precision: str, batch: int):
    from alexnet.trainer.precision import channels_last, loader_dtype

    dtype = getattr(torch, loader_dtype(precision, device))
    images = (torch.randn(batch, 3, 224, 224, device=device) * 50).to(dtype)
    if channels_last(device):
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 1000, (batch,), device=device)


def train_figure(device: torch.device, smoke: bool, kind: str, precision: str, split: bool = False) -> dict:
    """Synthetic training img/s of one step kind (trainer/step.py) at one precision."""
    from alexnet.trainer.step import GRAPH_EAGER_STEPS, EagerStep, GraphedStep

    sizes = SMOKE if smoke else {"batch": BATCH, "steps": STEPS, "warmup": WARMUP}
    if kind != "eager" and device.type != "cuda":
        if smoke and kind == "compiled":
            return _smoke_compiled(device, precision, sizes)
        return {"skipped": "a CUDA graph needs a CUDA device"}
    if kind == "compiled" and compile_blocker():
        return {"skipped": f"no compile: {compile_blocker()}"}
    model, optimizer = _trainer(device, precision, split)
    if kind == "compiled":
        model.compile_forward()
    step = (GraphedStep if kind != "eager" else EagerStep)(model, optimizer, precision=precision)
    warmup = sizes["warmup"] + (GRAPH_EAGER_STEPS + 2 if kind != "eager" else 0)
    images, labels = _batch(device, precision, sizes["batch"])
    for _ in range(warmup):
        step(images, labels)
    _sync(device)
    start = time.perf_counter()
    for _ in range(sizes["steps"]):
        loss = step(images, labels)
    float(loss)
    _sync(device)
    seconds = time.perf_counter() - start
    return {
        "images_per_s": round(sizes["steps"] * sizes["batch"] / seconds, 1),
        "step_ms": round(seconds / sizes["steps"] * 1e3, 3),
        "batch": sizes["batch"],
        "step": step.note,
        "loss": float(loss),
    }


def _smoke_compiled(device: torch.device, precision: str, sizes: dict) -> dict:
    """--cpu-smoke: the compiled forward (aot_eager backend: no C compile) through one eager step."""
    from alexnet.trainer.step import EagerStep

    model, optimizer = _trainer(device, precision)
    model.compile_forward(backend="aot_eager")
    step = EagerStep(model, optimizer, precision=precision)
    loss = step(*_batch(device, precision, sizes["batch"]))
    return {"smoke": "aot_eager backend, eager step (no CUDA graph)", "loss": float(loss)}


def profile_figure(device: torch.device, smoke: bool, top: int = 30) -> dict:
    """The ``top`` kernels (CPU: operators) by device time over a few eager bf16 steps."""
    from torch.profiler import ProfilerActivity, profile

    from alexnet.trainer.step import EagerStep

    model, optimizer = _trainer(device, "bf16")
    step = EagerStep(model, optimizer, precision="bf16")
    images, labels = _batch(device, "bf16", SMOKE["batch"] if smoke else BATCH)
    step(images, labels)
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = 1 if smoke else 3
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(images, labels)
        _sync(device)
    rows = []
    for e in prof.key_averages():
        us = _self_time_us(e, device)
        if us > 0:
            rows.append({"name": e.key[:120], "calls": e.count, "ms_per_step": round(us / 1e3 / steps, 4)})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    return {"steps": steps, "total_ms_per_step": round(total, 3), "slowest": rows[:top]}


def _self_time_us(event, device: torch.device) -> float:
    """Self time on the device (CUDA kernels) or the CPU, by whichever attribute this torch has."""
    names = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",)
    for name in names:
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


# --------------------------------------------------------------------------- main


def figures(device: torch.device, smoke: bool) -> list[tuple[str, tuple, float]]:
    """(name, (function, args...), cost in s) in the order they run."""
    out = [("lrn", (lrn_figure, device, smoke), 15), ("sgd", (sgd_figure, device, smoke), 10)]
    for kind in ("eager", "graphed"):
        for precision in ("bf16", "fp32"):
            out.append((f"train/{kind}/{precision}", (train_figure, device, smoke, kind, precision), 20))
    out.append(("split/eager/bf16", (train_figure, device, smoke, "eager", "bf16", True), 20))
    out.append(("profile", (profile_figure, device, smoke), 20))
    for precision in ("bf16", "fp32"):
        out.append(
            (f"train/compiled/{precision}", (train_figure, device, smoke, "compiled", precision), COMPILE_COST_S)
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/gpu-check"), help="folder for gpu_probe.json")
    p.add_argument(
        "--budget-s", type=float, help="stop starting figures that would end past this [default: 220; --cpu-smoke 1800]"
    )
    p.add_argument("--cpu-smoke", action="store_true", help="the CPU at toy sizes (checks that every part runs)")
    args = p.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_probe: torch sees no CUDA GPU (use --cpu-smoke on a CPU machine)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda", 0 if not args.cpu_smoke else None)
    signal.signal(signal.SIGTERM, on_sigterm)
    probe = Probe(args.out, args.budget_s or (1800 if args.cpu_smoke else 220), device)
    for name, (fn, *fargs), cost in figures(device, args.cpu_smoke):
        probe.run(name, fn, *fargs, cost_s=cost)
    probe.results["done"] = not probe.stopped
    probe.write()
    print(f"gpu_probe: {probe.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

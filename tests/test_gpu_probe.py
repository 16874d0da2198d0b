"""benchmarks/gpu_probe.py (stage 1 of the GPU check) where only Python and torch are usable.

The probe runs with ``--cpu-smoke`` in a subprocess whose PYTHONPATH starts with a folder holding a
``sitecustomize`` that makes importing DALI, lmdb, Pillow, click or tensorboardX raise (and notes the
attempt), and the project's source linked as ``alexnet/{pipeline,trainer,tools}`` the way
benchmarks/gpu_check.sh links it on a GPU host.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("nvidia.dali", "lmdb", "PIL", "click", "tensorboardX")

BLOCKER = f"""
import os, sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {BLOCKED!r}):
            with open(os.environ["ALEXNET_BLOCKED_LOG"], "a") as log:
                log.write(name + "\\n")
            raise ImportError(f"{{name}} is blocked: the GPU host has only Python and torch")
        return None

sys.meta_path.insert(0, _Blocked())
"""


def _probe_env(tmp_path: Path) -> dict:
    site = tmp_path / "site"
    (site / "alexnet").mkdir(parents=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    for name in ("pipeline", "trainer", "tools"):
        (site / "alexnet" / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return {**env, "PYTHONPATH": str(site), "ALEXNET_BLOCKED_LOG": str(tmp_path / "blocked.txt")}


def test_blocker_works(tmp_path):
    """The mechanism itself: importing a blocked module fails in such a subprocess."""
    env = _probe_env(tmp_path)
    run = subprocess.run([sys.executable, "-c", "import lmdb"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "lmdb is blocked" in run.stderr
    assert (tmp_path / "blocked.txt").read_text().split() == ["lmdb"]


def test_cpu_smoke_with_torch_alone(tmp_path):
    env = _probe_env(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_probe.py"), "--cpu-smoke", "--out", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert not (tmp_path / "blocked.txt").exists(), (tmp_path / "blocked.txt").read_text()
    results = json.loads((out / "gpu_probe.json").read_text())
    assert results["done"] is True and results["machine"]["torch"] == __import__("torch").__version__
    figures = results["figures"]
    expected = ["lrn", "sgd", "train/eager/bf16", "train/eager/fp32", "train/graphed/bf16", "train/graphed/fp32"]
    expected += ["split/eager/bf16", "profile", "train/compiled/bf16", "train/compiled/fp32"]
    assert list(figures) == expected
    errors = {k: v["error"] for k, v in figures.items() if "error" in v}
    assert not errors, errors
    assert figures["train/graphed/bf16"]["skipped"] == "a CUDA graph needs a CUDA device"
    assert figures["train/eager/bf16"]["images_per_s"] > 0 and figures["split/eager/bf16"]["images_per_s"] > 0
    assert figures["lrn"]["norm1"]["reference_mb"] > 10 * figures["lrn"]["norm1"]["fused_mb"] > 0
    assert figures["sgd"]["elements_not_bitwise"] == 0  # the CPU runs the multi-tensor form both ways
    assert len(figures["profile"]["slowest"]) == 30
    assert "aot_eager" in figures["train/compiled/bf16"]["smoke"]


def test_an_error_is_isolated_and_the_json_kept(tmp_path):
    """A figure that raises is written with its error and traceback; the next one still runs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_probe
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import torch

    probe = gpu_probe.Probe(tmp_path, budget_s=60, device=torch.device("cpu"))

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access")

    probe.run("broken", broken)
    probe.run("next", lambda: {"images_per_s": 1.0})
    probe.run("too_long", lambda: {}, cost_s=3600)
    figures = json.loads((tmp_path / "gpu_probe.json").read_text())["figures"]
    assert figures["broken"]["error"] == "RuntimeError: CUDA error: an illegal memory access"
    assert "in broken" in figures["broken"]["traceback"]
    assert figures["next"]["images_per_s"] == 1.0
    assert figures["too_long"]["skipped"].startswith("budget:")


def test_sigterm_ends_with_the_json_written_and_exit_0(tmp_path):
    """What `timeout` does at its limit: the running figure is written as interrupted, the rest as
    skipped, and the probe exits 0 (gpu_check.sh runs it under timeout --preserve-status)."""
    import signal
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-u", str(ROOT / "benchmarks" / "gpu_probe.py"), "--cpu-smoke", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_probe_env(tmp_path), stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    first = proc.stdout.readline()  # the first figure is done: the second (sgd) is running
    assert first.split("] ")[1].startswith("lrn:"), first
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    results = json.loads((out / "gpu_probe.json").read_text())
    figures = results["figures"]
    assert results["done"] is False and "error" not in figures["lrn"]
    assert figures["sgd"]["error"].startswith("interrupted: SIGTERM")
    assert figures["profile"]["skipped"] == "interrupted before it started"

"""benchmarks/gpu_check.py's set-up on a GPU host, checked here with real files: the carried parts
verified by count and checksum before unpacking, the ``nvidia`` namespace joined rather than
deleted, /dev/shm checked."""

import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))


def _wheel(path: Path, files: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


def _pack(tmp_path: Path, count: int = 3) -> Path:
    """Two wheels tarred and split into parts with a sha256sum MANIFEST, as gpu_check.sh pack does."""
    wheels = tmp_path / "src" / "wheels"
    wheels.mkdir(parents=True)
    # DALI's wheel ships nvidia/__init__.py; its package lives under it.
    _wheel(wheels / "dali.whl", {"nvidia/__init__.py": "SHIPPED = 1\n", "nvidia/dali/__init__.py": "NAME = 'dali'\n"})
    _wheel(wheels / "lmdb.whl", {"fake_lmdb/__init__.py": "NAME = 'lmdb'\n" + "#" * 2000 + "\n"})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(wheels, arcname="wheels")
    parts = tmp_path / "parts"
    parts.mkdir()
    data = buf.getvalue()
    part_size = -(-len(data) // count)
    for i in range(0, len(data), part_size):
        (parts / f"part-a{chr(ord('a') + i // part_size)}").write_bytes(data[i : i + part_size])
    subprocess.run("sha256sum part-* > MANIFEST", shell=True, cwd=parts, check=True)
    return parts


def test_parts_verified_then_unpacked_and_namespace_joined(tmp_path):
    parts = _pack(tmp_path)
    assert len(gpu_check.verify_parts(parts)) == 3
    site = gpu_check.setup(parts, tmp_path / "env")
    assert (site / "nvidia" / "dali" / "__init__.py").exists() and (site / "fake_lmdb").is_dir()
    assert "SHIPPED = 1" in (site / "nvidia" / "__init__.py").read_text()  # kept, not deleted
    # The host's CUDA wheels: another `nvidia` folder later on sys.path (torch's nvidia.cu13 libraries).
    host = tmp_path / "host"
    (host / "nvidia" / "cu13").mkdir(parents=True)
    (host / "nvidia" / "cu13" / "__init__.py").write_text("NAME = 'cu13'\n")
    code = "import nvidia.dali, nvidia.cu13, fake_lmdb; print(nvidia.dali.NAME, nvidia.cu13.NAME, nvidia.SHIPPED)"
    run = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": f"{site}:{host}"}, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["dali", "cu13", "1"]
    assert gpu_check.setup(parts, tmp_path / "env") == site  # once: the second call finds it done


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("missing", r"2 of 3 parts .*; missing part-ab"),
        ("extra", r"4 of 3 parts .*; not in MANIFEST part-zz"),
        ("corrupt", r"part-ab is corrupt \(sha256 "),
        ("no manifest", r"MANIFEST missing"),
    ],
)
def test_bad_parts_refused_before_unpacking(tmp_path, fault, message):
    parts = _pack(tmp_path)
    assert len(list(parts.glob("part-*"))) == 3
    if fault == "missing":
        (parts / "part-ab").unlink()
    elif fault == "extra":
        (parts / "part-zz").write_bytes(b"x")
    elif fault == "corrupt":
        data = bytearray((parts / "part-ab").read_bytes())
        data[10] ^= 1
        (parts / "part-ab").write_bytes(bytes(data))
    else:
        (parts / "MANIFEST").unlink()
    with pytest.raises(SystemExit, match=message):
        gpu_check.setup(parts, tmp_path / "env")
    assert not (tmp_path / "env").exists()  # nothing unpacked


def test_shm_check_falls_back_to_no_reader_processes(tmp_path):
    assert gpu_check.shm_workers(2, str(tmp_path), needed_mb=1) == (2, None)
    workers, warning = gpu_check.shm_workers(2, str(tmp_path), needed_mb=10**9)
    assert workers == 0 and "MB free" in warning and "workers=0" in warning
    workers, warning = gpu_check.shm_workers(2, str(tmp_path / "absent"))
    assert workers == 0 and "unusable" in warning

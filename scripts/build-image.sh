#!/usr/bin/env bash
# Build the service image with docker (or podman when docker's engine is absent).
#
#   bash scripts/build-image.sh                      # GPU image btd:gpu (needs the nvidia/cuda base)
#   bash scripts/build-image.sh --variant cpu        # CPU image btd:cpu
#   bash scripts/build-image.sh --model PATH         # bake another model in (default models/btd-resnet50.onnx)
#   bash scripts/build-image.sh --local-base         # CPU image on a Debian 12 base made here with
#                                                    # debootstrap (for machines that cannot pull base images)
#
# The build context is staged in a temporary folder holding only what the image needs (the same
# allow-list as .dockerignore), so a dirty work tree never leaks into the image.
# --local-base needs root, debootstrap and podman (Debian: apt-get install debootstrap podman runc).
set -euo pipefail
cd "$(dirname "$0")/.."

variant=gpu
tag=""
model=models/btd-resnet50.onnx
local_base=0
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --local-base) local_base=1; variant=cpu; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
case "$variant" in cpu|gpu) ;; *) echo "--variant must be cpu or gpu" >&2; exit 2 ;; esac
tag="${tag:-btd:$variant}"
if [ ! -f "$model" ]; then
  echo "no model at $model: export one (btd export ...) or pass --model PATH" >&2
  exit 1
fi

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/docker" "$context/models"
cp Dockerfile .dockerignore "$context/"
cp -r app "$context/app"
cp docker/requirements-*.lock "$context/docker/"
cp "$model" "$context/models/btd-resnet50.onnx"
# The INT8 variant beside the model, when there is one: the CPU serves it by default (BTD_MODEL_VARIANT).
int8="${model%.onnx}-int8.onnx"
if [ "$variant" = cpu ] && [ -f "$int8" ]; then
  cp "$int8" "$context/models/btd-resnet50-int8.onnx"
fi

build_args=(--build-arg "VARIANT=$variant")
if [ "$local_base" = 1 ]; then
  engine=podman
  base=localhost/btd-base:bookworm
  if ! podman image exists "$base"; then
    # A minimal Debian 12 with Python 3.11 and venv: what python:3.11-slim-bookworm provides.
    rootfs="$(mktemp -d)"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" \
      http://deb.debian.org/debian >/dev/null
    tar -C "$rootfs" -c . | podman import --message "debootstrap bookworm + python3" - "$base" >/dev/null
    rm -rf "$rootfs"
  fi
  build_args+=(--build-arg "CPU_BASE=$base")
  # pip inside the build trusts the host's CA bundle (a TLS-inspecting proxy may sit in between);
  # the runc here may not raise rlimits, so keep them at values any process may set.
  printf '[global]\ncert = /etc/ssl/host-ca.crt\n' >"$context/pip.conf"
  build_args+=(--volume "/etc/ssl/certs/ca-certificates.crt:/etc/ssl/host-ca.crt:ro"
               --volume "$context/pip.conf:/etc/pip.conf:ro"
               --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  engine=docker
else
  engine=podman
fi

# podman writes OCI images by default, which have no HEALTHCHECK: ask for docker's format.
[ "$engine" = podman ] && build_args+=(--format docker)
"$engine" build "${build_args[@]}" --tag "$tag" "$context"
echo "built $tag with $engine"

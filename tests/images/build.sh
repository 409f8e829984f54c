#!/usr/bin/env bash
# Image tier, part 1 (make images-test): podman, a local base image, and the gateway, operator and CPU
# trainer images built from the REAL Dockerfiles. Part 2 runs them (pytest tests/images).
#
# Nothing is pulled: no registry is reachable from a machine of this project's kind. So the official
# base images the Dockerfiles name by default (python:3.11.11-slim-bookworm) are replaced, by build ARG
# only, with a Debian bookworm base made here with debootstrap (python3.11 as in the official image);
# pip inside the builds uses this machine's own pip configuration (its local wheel folders and file
# indexes, its CA bundle), mounted into the build steps and never copied into an image.
# A user's plain `docker build -f <component>/Dockerfile .` is unaffected: the defaults stay.
#
# Knobs (environment; the Makefile sets the image names):
#   IMAGE_GATEWAY IMAGE_OPERATOR IMAGE_TRAINER  tags to build (default localhost/tinkerkube/<c>:test[-cpu])
#   IMAGE_BASE       the local base (default localhost/tinkerkube-test/pybase:bookworm); kept between runs
#   DEBIAN_MIRROR    default: the first URIs: line of /etc/apt/sources.list.d/debian.sources
#   CONTAINERS_CONF  default tests/images/containers.conf (runc, explicit ulimits)
#   PYTHON           interpreter whose pip configuration the builds mirror (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/tests/images/containers.conf}
IMAGE_GATEWAY=${IMAGE_GATEWAY:-localhost/tinkerkube/gateway:test}
IMAGE_OPERATOR=${IMAGE_OPERATOR:-localhost/tinkerkube/operator:test}
IMAGE_TRAINER=${IMAGE_TRAINER:-localhost/tinkerkube/trainer:test-cpu}
IMAGE_BASE=${IMAGE_BASE:-localhost/tinkerkube-test/pybase:bookworm}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
TORCH_VERSION=$(sed -n 's/^TORCH_VERSION := //p' Makefile)

step_start=0
step() { step_start=$SECONDS; printf '\n==> %s\n' "$*"; }
done_step() { printf '    (%ss)\n' $((SECONDS - step_start)); }

# ---- 1. tools -------------------------------------------------------------------------------------
step "container tools (podman buildah debootstrap runc)"
missing=()
for tool in podman buildah debootstrap runc; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah debootstrap runc >/dev/null
  else
    echo "ERROR: the image tier needs ${missing[*]}: run it as root on Debian (it installs them) or install them"
    exit 2
  fi
fi
if [ "$(id -u)" != 0 ]; then
  echo "ERROR: the image tier runs podman as root (rootless podman needs subuid ranges this setup does not make)"
  exit 2
fi
podman info --format 'podman {{.Version.Version}}, runtime {{.Host.OCIRuntime.Name}}, storage {{.Store.GraphDriverName}}'
done_step

# ---- 2. the local base image (cached) --------------------------------------------------------------
step "base image $IMAGE_BASE"
if podman image exists "$IMAGE_BASE"; then
  echo "cached"
else
  MIRROR=${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d /var/tmp/tinkerkube-pybase.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  echo "debootstrap bookworm from $MIRROR"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR" \
    >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log"; exit 1; }
  rm -f "$rootfs.log"
  # The Dockerfiles call `python` (the official images have it); Debian names it python3.
  ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" --numeric-owner -cf - . | podman import --change 'CMD ["/bin/bash"]' - "$IMAGE_BASE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
fi
done_step

# ---- 3. what pip inside the builds sees: this machine's pip configuration ---------------------------
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pipconf() {  # the effective value of a pip option: environment first, then pip's config files
  local var="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  "$PYTHON" -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'\$/\1/p" | tail -n 1
}
FIND_LINKS=$(pipconf find-links)
INDEX_URL=$(pipconf index-url)
EXTRA_INDEX_URL=$(pipconf extra-index-url)
CERT=$(pipconf cert)
BUNDLE=${CERT:-/etc/ssl/certs/ca-certificates.crt}
MOUNTS=()
local_dir() {  # mount a local folder named by a pip option at the same path inside the build
  local path=${1#file://}
  path=${path%/}
  if [ "${path#/}" != "$path" ] && [ -e "$path" ]; then MOUNTS+=(-v "$path:$path:ro"); fi
}
for item in $FIND_LINKS; do local_dir "$item"; done
# A file index's pages link to files beside it (../files/...): mount the folder that holds the index.
for item in $INDEX_URL $EXTRA_INDEX_URL; do
  case $item in file://*) local_dir "$(dirname "${item%/}")" ;; esac
done
{
  echo "[global]"
  [ -n "$FIND_LINKS" ] && echo "find-links = $FIND_LINKS"
  [ -n "$INDEX_URL" ] && echo "index-url = $INDEX_URL"
  [ -n "$EXTRA_INDEX_URL" ] && echo "extra-index-url = $EXTRA_INDEX_URL"
  # A TLS-intercepting proxy's CA: the host's bundle replaces the base image's for the build steps.
  [ -f "$BUNDLE" ] && echo "cert = /etc/ssl/certs/ca-certificates.crt"
  true
} >"$work/pip.conf"
MOUNTS+=(-v "$work/pip.conf:/etc/pip.conf:ro")
if [ -f "$BUNDLE" ]; then MOUNTS+=(-v "$BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro"); fi
# torch: a local CPU wheel in find-links wins over the official torch index (unreachable offline: ~75 s
# of retries); pip then resolves torch==X against the ordinary index plus that wheel.
TORCH_ARGS=()
for dir in $FIND_LINKS; do
  if compgen -G "${dir#file://}/torch-${TORCH_VERSION}+cpu-*.whl" >/dev/null; then
    TORCH_ARGS=(--build-arg "TORCH_INDEX_URL_OVERRIDE=${INDEX_URL:-https://pypi.org/simple}")
    echo "torch ${TORCH_VERSION}+cpu from $dir"
  fi
done
echo "pip inside the builds:"; sed 's/^/    /' "$work/pip.conf"

# ---- 4. the images, from the real Dockerfiles -------------------------------------------------------
build() {  # image dockerfile build-args...
  local image=$1 dockerfile=$2; shift 2
  step "building $image from $dockerfile"
  podman build --layers "${MOUNTS[@]}" "$@" -f "$dockerfile" -t "$image" . >"$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log"; echo "ERROR: building $image failed"; exit 1; }
  podman image inspect --format '    {{.Size}}' "$image" | numfmt --field=1 --to=iec-i --suffix=B
  done_step
}
build "$IMAGE_GATEWAY" api_gateway/Dockerfile --build-arg "PYTHON_IMAGE=$IMAGE_BASE"
build "$IMAGE_OPERATOR" operator/Dockerfile --build-arg "PYTHON_IMAGE=$IMAGE_BASE"
build "$IMAGE_TRAINER" trainer_pod/Dockerfile --build-arg VARIANT=cpu --build-arg "CPU_BASE_IMAGE=$IMAGE_BASE" \
  "${TORCH_ARGS[@]}"

printf '\nimages built in %ss: %s %s %s\n' "$SECONDS" "$IMAGE_GATEWAY" "$IMAGE_OPERATOR" "$IMAGE_TRAINER"

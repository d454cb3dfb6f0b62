#!/bin/sh
# Set up a fresh Debian/Ubuntu machine that has only python3: the system
# packages ktenv's builds and tests use, then ktenv itself in ./.venv.
# Idempotent; rerun after pulling. Needs root or sudo for apt-get.
set -eu
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# python3-venv: Debian's python3 lacks venv/ensurepip without it.
# cmake, g++, pkg-config, libhwloc-dev, libnuma-dev: KT-Kernel source builds
#   (hard CMake errors without hwloc/numa: upstream #1591).
# numactl: the launch command pins memory with numactl --interleave=all.
# nix-bin: evaluates flake.nix and nix/*.nix in the tests (Debian's Nix 2.8).
# shellcheck: lints the Nix shellHook and the workflow's run: scripts.
PKGS="python3-venv python3-pip git cmake g++ pkg-config libhwloc-dev libnuma-dev numactl nix-bin shellcheck"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "bootstrap: installing$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# A real CUDA 12 toolkit for the JIT tests and sm89/sm90 envs: PyPI has no CUDA 12
# nvcc, so ktenv fetches Debian 13's CUDA 12.4 (sha256-pinned in envs/toolchain.toml,
# ~1 GB download, ~210 MB kept in ~/.cache/ktenv/cuda; a no-op once there).
.venv/bin/python build.py toolchain --arch sm90 --source debian-trixie-12.4 >/dev/null
echo "bootstrap: ready (.venv/bin/python build.py --help)"

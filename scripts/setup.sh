#!/usr/bin/env bash
# Install everything nft needs on Debian 12 (run as root): apt packages, .venv, the package itself,
# mpi4py and GPAW built against Debian's OpenMPI/ScaLAPACK/FFTW/libxc.  Idempotent: each step is
# skipped when its result is already there, so a second run takes a few seconds.
#
#   bash scripts/setup.sh          # then `. scripts/env.sh` for PATH, GPAW and MPI settings
#
# Knobs (environment): PYTHON (interpreter for a new .venv, default python3), NFT_GPAW_SPEC
# (default gpaw==26.7.0), NFT_WHEEL_CACHE (built mpi4py/GPAW wheels, default ~/.cache/nft-wheels).
set -euo pipefail

NFT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$NFT_ROOT"

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="torch==2.13.0"
MPI4PY_SPEC="${NFT_MPI4PY_SPEC:-mpi4py==4.1.2}"
GPAW_SPEC="${NFT_GPAW_SPEC:-gpaw==26.7.0}"
WHEEL_CACHE="${NFT_WHEEL_CACHE:-$HOME/.cache/nft-wheels}"
VENV="$NFT_ROOT/.venv"
STAMPS="$VENV/.nft-stamps"

log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# One set-up at a time per checkout (test runs started side by side share the .venv).
exec 9> "/tmp/nft-setup-$(printf '%s' "$NFT_ROOT" | sha256sum | cut -c1-12).lock"
flock 9

# ---- Debian packages -------------------------------------------------------------------------
APT_PACKAGES=(
    build-essential pkg-config procps
    libxc-dev libopenblas-dev libopenmpi-dev openmpi-bin libscalapack-openmpi-dev libfftw3-dev
    gpaw-data
    cp2k  # CP2K 2023.1 with its basis sets and GTH potentials (cp2k-data): the cp2k parent and its tests
    slurm-wlm munge libpmix-dev
    postgresql  # the server binaries (initdb, pg_ctl) the PostgreSQL tests start in a temporary folder
)
# A system Python needs its venv module and headers from Debian.
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    APT_PACKAGES+=(python3-venv)
fi
if ! "$PYTHON" -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' >/dev/null 2>&1; then
    APT_PACKAGES+=(python3-dev)
fi

missing_packages() {
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
            printf '%s\n' "$pkg"
        fi
    done
}

mapfile -t MISSING < <(missing_packages)
if [ "${#MISSING[@]}" -gt 0 ]; then
    log "apt: installing ${MISSING[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup.sh: missing Debian packages (${MISSING[*]}); run as root or install them" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq -o DPkg::Lock::Timeout=300
    apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${MISSING[@]}" >/dev/null
fi

# ---- virtual environment ---------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
mkdir -p "$STAMPS"
PY="$VENV/bin/python"
PIP_LOG="$STAMPS/pip.log"
: > "$PIP_LOG"
# pip install, its chatter in $PIP_LOG (shown when it fails).
pip_install() {
    if ! "$PY" -m pip install --disable-pip-version-check "$@" >> "$PIP_LOG" 2>&1; then
        tail -n 40 "$PIP_LOG" >&2
        echo "setup.sh: pip install $* failed (log: $PIP_LOG)" >&2
        exit 1
    fi
}

# A stamp holds a fingerprint of the inputs of one step; the step reruns when they change.
stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { printf '%s' "$2" > "$STAMPS/$1"; }
fingerprint() { cat "$@" | sha256sum | cut -c1-16; }

PYVER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"

# CPU torch: the exact pin takes the local CPU wheel (a bare `torch` pulls a multi-GB CUDA build).
if ! "$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' >/dev/null 2>&1; then
    log "pip: $TORCH_SPEC"
    pip_install "$TORCH_SPEC"
fi

# The project with its dev, docs and PostgreSQL extras (editable).
KEY="$(fingerprint pyproject.toml)"
if ! stamp_ok project "$KEY" || ! "$PY" -c 'import pipeline, mypy, mkdocs' >/dev/null 2>&1; then
    log "pip: -e .[dev,docs,postgresql]"
    pip_install "$TORCH_SPEC" -e ".[dev,docs,postgresql]"
    stamp_set project "$KEY"
fi

# Build tools for the MPI extensions, installed beside numpy (builds run without isolation so that
# they compile against the numpy in the venv).
if ! "$PY" -c 'import pybind11, setuptools, wheel, Cython; assert int(setuptools.__version__.split(".")[0]) >= 77' >/dev/null 2>&1; then
    log "pip: build tools"
    pip_install "pybind11>=2.6.2" "setuptools>=77" wheel "cython>=3.0.1"
fi

# Build a wheel once per (spec, python, inputs) and keep it, so a fresh clone installs in seconds.
build_wheel() {  # name spec key [env...]
    local name="$1" spec="$2" key="$3"; shift 3
    local dir="$WHEEL_CACHE/$name-py$PYVER-$key"
    if ! ls "$dir"/*.whl >/dev/null 2>&1; then
        log "building $spec (log: $dir.log)"
        mkdir -p "$dir"
        if ! env "$@" "$PY" -m pip wheel --no-deps --no-build-isolation --no-cache-dir \
                --no-binary "$name" --verbose -w "$dir" "$spec" > "$dir.log" 2>&1; then
            tail -n 40 "$dir.log" >&2
            rm -rf "$dir"
            echo "setup.sh: building $spec failed (log: $dir.log)" >&2
            exit 1
        fi
    fi
    ls "$dir"/*.whl
}

# mpi4py against Debian's OpenMPI.
MPI_KEY="$(printf '%s %s' "$MPI4PY_SPEC" "$(mpicc -showme 2>/dev/null)" | sha256sum | cut -c1-16)"
if ! stamp_ok mpi4py "$MPI_KEY" || ! "$PY" -c 'import mpi4py.MPI' >/dev/null 2>&1; then
    WHEEL="$(build_wheel mpi4py "$MPI4PY_SPEC" "$MPI_KEY" MPICC=mpicc)"
    pip_install --force-reinstall --no-deps "$WHEEL"
    stamp_set mpi4py "$MPI_KEY"
fi

# GPAW with MPI + ScaLAPACK + FFTW + libxc from scripts/gpaw-siteconfig.py.
# The key covers the numpy major version too: the extension is compiled against numpy's C API.
NUMPY_MAJOR="$("$PY" -c 'import numpy; print(numpy.__version__.split(".")[0])')"
GPAW_KEY="$( (printf '%s numpy%s' "$GPAW_SPEC" "$NUMPY_MAJOR"; cat scripts/gpaw-siteconfig.py) \
    | sha256sum | cut -c1-16)"
if ! stamp_ok gpaw "$GPAW_KEY" || ! "$PY" -c 'import _gpaw' >/dev/null 2>&1; then
    WHEEL="$(build_wheel gpaw "$GPAW_SPEC" "$GPAW_KEY" \
        GPAW_CONFIG="$NFT_ROOT/scripts/gpaw-siteconfig.py")"
    pip_install --force-reinstall --no-deps "$WHEEL"
    pip_install "$WHEEL"
    "$VENV/bin/gpaw" info > "$STAMPS/gpaw-info.txt" 2>&1 || true
    for feature in "MPI enabled" scalapack FFTW; do
        if ! grep -E -q "^$feature +yes" "$STAMPS/gpaw-info.txt"; then
            cat "$STAMPS/gpaw-info.txt" >&2
            rm -rf "$(dirname "$WHEEL")"  # do not keep a wheel that lacks what we asked for
            echo "setup.sh: GPAW does not report '$feature: yes' (build log: $(dirname "$WHEEL").log)" >&2
            exit 1
        fi
    done
    stamp_set gpaw "$GPAW_KEY"
fi

log "ready: $VENV"

#!/usr/bin/env bash
# Make a ready environment: .venv with ddtd (editable) and its dependencies, and Fashion-MNIST
# from Debian's packages. Safe to run again: it only installs what is missing or changed.
# Sourced by examples/demo.sh and tests/run.sh; prints the venv's python on the last line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DDTD_VENV:-$root/.venv}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv" >&2
    "$py" -m venv "$venv"
fi
# DDTD_EXTRAS: the optional dependency groups to install (tests/run.sh adds "text": transformers)
extras="${DDTD_EXTRAS:-test}"
stamp="$venv/.ddtd-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || ! grep -qxF "$extras" "$stamp"; then
    echo "setup: installing ddtd and its dependencies [$extras] (torch 2.14.1 comes from this machine's disk)" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[$extras]" >&2
    echo "$extras" > "$stamp"
fi

# DDTD_SKIP_FMNIST=1: no data set (for runs that need none, e.g. benchmarks/gpu_check.sh where apt is out of reach)
fmnist="${DDTD_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
if [ "${DDTD_SKIP_FMNIST:-0}" != 1 ] && [ ! -f "$fmnist/train-images-idx3-ubyte.gz" ]; then
    echo "setup: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)" >&2
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get install -y -qq dataset-fashion-mnist >&2 || {
        $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq dataset-fashion-mnist >&2
    }
fi
echo "$venv/bin/python"

#!/usr/bin/env bash
# Create .venv and install rlflow with its dev tools. On a machine without an NVIDIA GPU the CPU
# build of torch is pinned (constraints-cpu.txt) so nothing pulls the CUDA stack.
# Set RLFLOW_TORCH=cuda to skip the pin on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@"; }
if [ "${RLFLOW_TORCH:-cpu}" = "cpu" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    pip_ -c constraints-cpu.txt torch==2.13.0
    pip_ -c constraints-cpu.txt -e ".[dev]"
else
    pip_ -e ".[dev]"
fi
echo "rlflow installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"

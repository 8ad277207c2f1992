#!/usr/bin/env bash
# One-command GPU acceptance on a fresh Linux GPU host (NVIDIA driver installed):
#   bash tests/gpu/acceptance.sh [OUT_DIR]
# Creates .venv-gpu with a CUDA build of torch, onnxruntime-gpu (replacing the CPU onnxruntime the
# project depends on: both packages provide the same module) and triton, then runs every GPU
# check (tests/gpu/acceptance.py) and writes OUT_DIR/report.md and report.json (default
# gpu-acceptance/). Exit status 0 only when every check passed. Not yet run: no GPU where
# this project is developed.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-gpu-acceptance}"
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install -q torch triton            # the default index serves CUDA builds on Linux x86_64
.venv-gpu/bin/pip install -q -e ".[test,serve,bench]"
.venv-gpu/bin/pip uninstall -q -y onnxruntime
.venv-gpu/bin/pip install -q onnxruntime-gpu
.venv-gpu/bin/python tests/gpu/acceptance.py --out "$out"

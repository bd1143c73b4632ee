#!/usr/bin/env bash
# The GPU benchmark in one call, offline, on a machine where trident is not installed (benchmarks/gpu.py says what
# it measures):
#
#   benchmarks/gpu.sh --out DIR [--smoke] [--time-limit S] [--device cpu]
#
# Needs python3 with torch (CUDA), numpy and safetensors; onnxruntime, tritonclient and network are not needed. trident
# is imported from this source tree through a folder of links in a temporary directory (nothing is installed), and
# the U-Net comes from checkpoints/diffusion/model.safetensors. Writes DIR/gpu.json (after every row) and DIR/gpu.md.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
PY=${PYTHON:-python3}

SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
mkdir "$SHIM/trident"
for room in serving training export benchmarks; do ln -s "$ROOT/$room" "$SHIM/trident/$room"; done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "gpu.sh: nvidia-smi not found"
"$PY" -m trident.benchmarks.gpu "$@"

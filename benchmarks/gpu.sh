#!/usr/bin/env bash
# The latency benchmarks on a CUDA machine: ONNX Runtime's CUDA execution provider on the fp16 graphs (in-process and
# inside Triton's model instances), PyTorch and the diffusers peer on cuda (fp16 autocast for the peer), the fp16
# matmul peak, and each U-Net bucket also replayed as a CUDA graph (static shapes + IO binding).
#
#   benchmarks/gpu.sh [--smoke] [-- PYTEST ARGS...]
#
# Python environment, the first that exists:
#   $TRIDENT_GPU_VENV   a pre-built venv, e.g. carried to a machine without network (nothing is downloaded then)
#   .venv-gpu           made by an earlier run of this script
#   otherwise           .venv-gpu is built from PyPI (needs network): the project with [train,serve,client,dev], then
#                       onnxruntime-gpu in place of onnxruntime (one import name: only one of them may be installed)
# Stops with a message saying what to install when ONNX Runtime has no working CUDAExecutionProvider.
# Results: benchmarks/results/gpu/{<stamp>.json, latest.json, report.md, *.png}. The run is capped at
# TRIDENT_GPU_LIMIT_S seconds (default 450: under 8 minutes with set-up); on the cap pytest is interrupted and the
# report is written from what finished.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SMOKE=()
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=(--smoke); shift ;;
    --) shift; ARGS=("$@"); break ;;
    *) echo "usage: benchmarks/gpu.sh [--smoke] [-- PYTEST ARGS...]" >&2; exit 2 ;;
  esac
done

LIMIT_S=${TRIDENT_GPU_LIMIT_S:-450}
VENV=${TRIDENT_GPU_VENV:-.venv-gpu}
PY="$VENV/bin/python"

# -- environment ------------------------------------------------------------------------------------------------------
if [ ! -x "$PY" ]; then
  if [ -n "${TRIDENT_GPU_VENV:-}" ]; then
    echo "gpu.sh: TRIDENT_GPU_VENV=$VENV has no bin/python" >&2; exit 2
  fi
  echo "gpu.sh: building $VENV from PyPI (needs network; where there is none, carry a pre-built venv and set TRIDENT_GPU_VENV)"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -e '.[train,serve,client,dev]'
  "$PY" -m pip uninstall -q -y onnxruntime
  "$PY" -m pip install -q 'onnxruntime-gpu>=1.18'
fi

# A venv built elsewhere points its editable install at that checkout: re-point it here (offline, no dependencies).
HERE=$(pwd -P)
WHERE=$("$PY" -c 'import pathlib, trident.benchmarks as b; print(pathlib.Path(b.__file__).resolve().parent.parent)' 2>/dev/null || true)
if [ "$WHERE" != "$HERE" ]; then
  echo "gpu.sh: trident in $VENV is '${WHERE:-not installed}', not $HERE: reinstalling it editable (no dependencies)"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
fi

# CUDA and cuDNN from the nvidia-* wheels (torch's, or onnxruntime-gpu[cuda,cudnn]): on LD_LIBRARY_PATH so that the
# Triton Python-backend stubs, which do not import torch, find them too.
NV_LIBS=$("$PY" - <<'EOF'
import glob, os, site
print(os.pathsep.join(sorted({d for sp in site.getsitepackages() for d in glob.glob(os.path.join(sp, "nvidia", "*", "lib"))})))
EOF
)
export LD_LIBRARY_PATH="${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# -- preflight: a real session on the CUDA provider, or stop here --------------------------------------------------------
command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "gpu.sh: nvidia-smi not found"
"$PY" - "$VENV" <<'EOF'
import sys

venv = sys.argv[1]
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

providers = ort.get_available_providers()
if "CUDAExecutionProvider" not in providers:
    sys.exit(f"gpu.sh: onnxruntime {ort.__version__} in {venv} has no CUDAExecutionProvider (it has {providers}).\n"
             f"  Install the GPU build: {venv}/bin/pip uninstall -y onnxruntime && {venv}/bin/pip install onnxruntime-gpu")
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
if session.get_providers()[0] != "CUDAExecutionProvider":
    sys.exit(f"gpu.sh: onnxruntime {ort.__version__} lists CUDAExecutionProvider but could not start it (CUDA 12 / "
             "cuDNN 9 libraries not found?). Install them with `pip install 'onnxruntime-gpu[cuda,cudnn]'` in "
             f"{venv}, or put the CUDA libraries on LD_LIBRARY_PATH.")
assert session.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0].tolist() == [0.0, 2.0]
try:
    import torch
    cuda = torch.cuda.is_available()
    print(f"gpu.sh: torch {torch.__version__}, cuda {'available: ' + torch.cuda.get_device_name(0) if cuda else 'NOT available: PyTorch eager and the diffusers peer will be skipped'}")
except ImportError:
    print("gpu.sh: torch not installed: exports and the PyTorch rows cannot run", file=sys.stderr)
    sys.exit(2)
print(f"gpu.sh: onnxruntime {ort.__version__} runs on CUDAExecutionProvider")
EOF

# -- run ---------------------------------------------------------------------------------------------------------------
export TRIDENT_BENCH_DEVICE=cuda
code=0
timeout --signal=INT --kill-after=30 "$LIMIT_S" \
  "$PY" -m trident.benchmarks.run ${SMOKE[@]+"${SMOKE[@]}"} --out benchmarks/results/gpu -- ${ARGS[@]+"${ARGS[@]}"} || code=$?
if [ "$code" = 124 ]; then
  echo "gpu.sh: stopped after ${LIMIT_S}s; the report covers what finished" >&2
fi
echo "gpu.sh: report in benchmarks/results/gpu/report.md"
exit "$code"

"""The files that run inside Triton: each served model's ``<model>/1/model.py`` and the modules copied beside it.

The rule of this folder: a runtime file imports only the standard library, numpy, ``triton_python_backend_utils``
(the Python backend's own module), onnxruntime and openvino (through ort_runner), each other, and the core modules listed in
RUNTIME_FILES below, which `trident serve build` copies next to model.py. Nothing else of trident is there at run
time: a built repository serves in any Triton with the Python backend, trident installed or not. A test parses every
file in RUNTIME_FILES and fails on any other import.

    graph_model.py   one exported graph (U-Net, generator, decoder, encoder) over its static-batch ONNX files
    router_model.py  container flavour: the dynamically batched front of one graph, over its per-bucket models (BLS)
    loop_model.py    the whole diffusion sampling loop next to the U-Net graphs (Triton name `diffusion_sampler`)
    batching.py      a batched model's execute(): each request checked on its own, one run, each its own rows
    bls.py           the per-bucket models of a graph called through BLS, chunked and padded like BucketRunner
    protocol.py      the model configuration's parameter keys (shared with the repository builder) and error answers
and, copied from the core: graph_runtime.py (GraphRuntime, the one parameter a model reads to run its graph),
card.py, ort_runner.py, sampling.py.
"""
from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_CORE = _HERE.parents[1]  # serving/

# File name in the model's version folder -> source. model.py is chosen per model (MODEL_FILES).
MODEL_FILES = {"graph": _HERE / "graph_model.py", "loop": _HERE / "loop_model.py", "router": _HERE / "router_model.py"}
RUNTIME_FILES = {
    "protocol.py": _HERE / "protocol.py",
    "batching.py": _HERE / "batching.py",
    "bls.py": _HERE / "bls.py",
    "ort_runner.py": _CORE / "ort_runner.py",   # static-batch ONNX Runtime sessions, shared with the in-process SDK
    "card.py": _CORE / "card.py",               # the model card parser
    "graph_runtime.py": _CORE / "graph_runtime.py",  # the runtime manifest: how the model runs its graph
    "sampling.py": _CORE / "sampling.py",       # the sampler math (loop model only, copied to every model for one list)
}
# What a runtime file may import (top-level module names).
ALLOWED_IMPORTS = frozenset({"__future__", "ctypes", "json", "math", "os", "sys", "time", "dataclasses", "functools",
                             "inspect",
                             "typing", "concurrent", "threading", "numpy", "onnxruntime", "openvino", "tqdm",
                             "triton_python_backend_utils",
                             *(Path(name).stem for name in RUNTIME_FILES)})

"""1. One U-Net step at each bucket: PyTorch eager vs in-process ONNX Runtime (row shards off, and the default) vs
Triton (HTTP, gRPC), and the machine's fp32 matrix-multiply peak measured in the same run, so each step's GFLOP/s is
a percentage of it."""
from __future__ import annotations

import numpy as np
import pytest

from trident.benchmarks.common import cuda_sync, require, step_inputs
from trident.serving.spec import UNET

STEP_BACKENDS = ("torch", "ort-whole", "ort", "triton-http", "triton-grpc")


# ----------------------------------------------------------------------------------------------------------------
# Peak: square sgemm (fp16 on the GPU path, the precision its graphs run in), best of several
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["torch", "numpy"])
def test_peak_matmul(benchmark, settings, impl, peak_size):
    n = peak_size
    if impl == "numpy" and settings.device == "cuda":
        pytest.skip("numpy runs on the CPU; the GPU peak is torch's")
    benchmark.group = "peak-matmul"
    benchmark.extra_info.update(item="peak", impl=impl, n=n, flops=2 * n ** 3, threads=settings.threads,
                                dtype="float16" if settings.device == "cuda" else "float32", device=settings.device)
    if impl == "numpy":
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
        benchmark.pedantic(np.matmul, args=(a, b), rounds=settings.peak_repeats, warmup_rounds=1)
        return
    import torch

    torch.set_num_threads(settings.threads)
    dtype = torch.float16 if settings.device == "cuda" else torch.float32
    a, b = (torch.randn(n, n, dtype=dtype, device=settings.device) for _ in range(2))
    sync = cuda_sync(settings)

    def mm():
        torch.mm(a, b)
        sync()

    benchmark.pedantic(mm, rounds=settings.peak_repeats, warmup_rounds=1)


# ----------------------------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_unet_step(benchmark, request, settings, checkpoints, exports, unet_flops, backend, bucket):
    require(exports, "diffusion")
    require(checkpoints, "diffusion")
    client = {"torch": "torch_client", "ort": "ort_client", "ort-whole": "ort_whole_client"}.get(backend)
    if client is not None:
        client = request.getfixturevalue(client)
    else:
        client = request.getfixturevalue("triton_clients")[backend.split("-")[1]]
    if backend != "torch" and bucket not in client.backend.buckets[UNET] and client.backend.buckets[UNET]:
        pytest.skip(f"bucket {bucket} is not exported (buckets {client.backend.buckets[UNET]})")
    run = client.backend.run
    inputs = step_inputs(client.backend.specs[UNET], bucket)
    run(UNET, inputs)  # warm: first-call allocations (torch) and connection set-up (Triton)
    benchmark.group = f"unet-step-b{bucket:02d}"
    benchmark.extra_info.update(item="step", backend=backend, bucket=bucket, rows=bucket, flops=unet_flops(bucket))
    out = benchmark(run, UNET, inputs)
    assert out["noise_pred"].shape == inputs["sample"].shape and np.all(np.isfinite(out["noise_pred"]))


# ----------------------------------------------------------------------------------------------------------------
# GPU only: the same fp16 graph replayed as a CUDA graph (static shapes, inputs and output bound to fixed device
# buffers with IO binding, as ONNX Runtime's enable_cuda_graph requires)
# ----------------------------------------------------------------------------------------------------------------

def cuda_graph_runner(path, inputs: dict[str, np.ndarray], output: str):
    """run(feed) -> output array: copy the feed into the bound device buffers, replay the captured graph, copy out.

    Raises whatever ONNX Runtime raises when the graph cannot be captured (e.g. a node left on the CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=[
        ("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"session providers are {session.get_providers()}")
    bound = {name: ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for name, a in inputs.items()}
    out_meta = next(o for o in session.get_outputs() if o.name == output)
    result = ort.OrtValue.ortvalue_from_shape_and_type(out_meta.shape, np.float32, "cuda", 0)
    binding = session.io_binding()
    for name, value in bound.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_ortvalue_output(output, result)
    session.run_with_iobinding(binding)  # the first run captures the graph

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        for name, value in bound.items():
            value.update_inplace(np.ascontiguousarray(feed[name]))
        session.run_with_iobinding(binding)
        return result.numpy()

    return run, session


@pytest.mark.cuda_only
def test_unet_step_cuda_graph(benchmark, settings, exports, unet_flops, ort_client, bucket):
    require(exports, "diffusion")
    from trident.serving.spec import load_export_metadata

    entry = load_export_metadata(exports["diffusion"])["graphs"][UNET]["fp16" if settings.fp16 else "fp32"]
    if str(bucket) not in entry:
        pytest.skip(f"bucket {bucket} is not exported")
    spec = ort_client.backend.specs[UNET]
    inputs = step_inputs(spec, bucket)
    try:
        run, _ = cuda_graph_runner(exports["diffusion"] / entry[str(bucket)]["file"], inputs, spec.outputs[0].name)
    except Exception as e:  # noqa: BLE001 - reported as the reason, the other backends still run
        pytest.skip(f"ONNX Runtime could not capture this graph as a CUDA graph: {e}")
    # the replay must compute what the plain CUDA session computes
    np.testing.assert_allclose(run(inputs), ort_client.backend.run(UNET, inputs)[spec.outputs[0].name],
                               atol=1e-2, rtol=1e-2)
    benchmark.group = f"unet-step-b{bucket:02d}"
    benchmark.extra_info.update(item="step", backend="ort-cudagraph", bucket=bucket, rows=bucket,
                                flops=unet_flops(bucket))
    out = benchmark(run, inputs)
    assert np.all(np.isfinite(out))

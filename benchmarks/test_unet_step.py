"""1. One U-Net step at each bucket: PyTorch eager vs in-process ONNX Runtime vs Triton (HTTP, gRPC), and the
machine's fp32 matrix-multiply peak measured in the same run, so each step's GFLOP/s is a percentage of it."""
from __future__ import annotations

import numpy as np
import pytest

from trident.benchmarks.common import cuda_sync, require, rounds, step_inputs
from trident.serving.spec import UNET

STEP_BACKENDS = ("torch", "ort", "triton-http", "triton-grpc")


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
    client = {"torch": "torch_client", "ort": "ort_client"}.get(backend)
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

"""3. End-to-end sampling (the client's loop: numpy sampler + one 2B-row U-Net request per step) over Triton vs the
same loop over in-process ONNX Runtime: images/s, latency per image, and the serving overhead between them."""
from __future__ import annotations

import numpy as np
import pytest

from trident.benchmarks.common import class_labels, require, rounds


@pytest.mark.parametrize("backend", ["ort", "triton"])
def test_sample(benchmark, request, settings, exports, backend, sampler_run):
    require(exports, "diffusion")
    sampler, steps = sampler_run
    client = request.getfixturevalue("ort_client" if backend == "ort" else "triton")
    n = settings.sample_batch
    labels = class_labels(n)

    def draw():
        return client.sample(classes=labels, sampler=sampler, steps=steps, guidance=settings.guidance, seed=0,
                             raw=True)

    # DDPM-1000 is minutes long on a CPU: one round. The others: a few (one in a smoke run).
    benchmark.group = f"sample-{sampler}-{steps:04d}-B{n:02d}"
    benchmark.extra_info.update(item="e2e", backend=backend, sampler=sampler, steps=steps, images=n,
                                protocol=settings.protocol if backend == "triton" else None)
    images = benchmark.pedantic(draw, rounds=1 if steps >= 500 else rounds(settings, settings.sample_rounds),
                                iterations=1)
    stats = client.last_stats
    benchmark.extra_info.update(calls=stats.calls, rows=stats.rows, per_call_ms=stats.per_call_ms)
    assert images.shape[0] == n and np.all(np.isfinite(images))

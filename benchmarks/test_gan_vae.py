"""6. One-shot generators for contrast with the diffusion loop: GAN generator and VAE decoder latency per image,
over Triton and in-process ONNX Runtime (one request, one network call)."""
from __future__ import annotations

import numpy as np
import pytest

from trident.benchmarks.common import ONESHOT_GRAPH, require


@pytest.mark.parametrize("backend", ["ort", "triton"])
@pytest.mark.parametrize("kind", ["gan", "vae"])
def test_oneshot(benchmark, request, settings, exports, kind, backend, oneshot_batch):
    require(exports, kind)
    client = request.getfixturevalue("ort_client" if backend == "ort" else "triton")
    n = oneshot_batch
    if kind == "gan":
        def draw():
            return client.generate(n=n, seed=0, raw=True)
    else:
        def draw():
            return client.generate_vae(n, seed=0, raw=True)

    draw()  # warm
    benchmark.group = f"oneshot-B{n:02d}"
    benchmark.extra_info.update(item="oneshot", kind=kind, graph=ONESHOT_GRAPH[kind], backend=backend, images=n,
                                protocol=settings.protocol if backend == "triton" else None)
    images = benchmark(draw)
    assert images.shape[0] == n and np.all(np.isfinite(images))

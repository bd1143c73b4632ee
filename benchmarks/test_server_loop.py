"""3b. Where the sampling loop runs: the client loop (one U-Net request per step) against the server-side loop
(serving/server/runtime/loop_model.py: one request per batch of images), both through the same Triton server, DPM-Solver++ at
the peer's step count, B = 1 and 8."""
from __future__ import annotations

import numpy as np
import pytest

from trident.benchmarks.common import class_labels, require, rounds


@pytest.mark.parametrize("loop", ["client", "server"])
def test_sampling_loop(benchmark, settings, exports, triton, loop, loop_batch):
    require(exports, "diffusion")
    if triton.backend.server_loop is None:
        pytest.skip("the benchmark server has no diffusion_sampler model")
    labels = class_labels(loop_batch)
    steps = settings.peer_steps

    def draw(where=loop):
        return triton.sample(classes=labels, steps=steps, guidance=settings.guidance, seed=0, raw=True, loop=where)

    reference = draw("client")  # both loops must draw these images
    benchmark.group = f"loop-B{loop_batch:02d}"
    benchmark.extra_info.update(item="loop", loop=loop, sampler="dpmpp-2m", steps=steps, images=loop_batch,
                                protocol=settings.protocol)
    draw()  # warm
    benchmark.extra_info["requests"] = triton.last_stats.calls
    images = benchmark.pedantic(draw, rounds=rounds(settings, 2 * settings.sample_rounds), iterations=1)
    np.testing.assert_allclose(images, reference, atol=1e-4)

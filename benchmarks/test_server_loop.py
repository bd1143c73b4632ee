"""3b. Where the sampling loop runs: the client loop (one U-Net request per step) against the server-side loop
(serving/server/runtime/loop_model.py: one request per batch of images), both through the same Triton server, DPM-Solver++ at
the peer's step count, B = 1 and 8. 3c. The server-side loop answered once against streamed."""
from __future__ import annotations

import time

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


def test_server_loop_streaming(benchmark, settings, exports, triton_clients, loop_batch):
    """3c. What streaming the server-side loop costs: the same loop answered once (diffusion_sampler) against
    streamed (diffusion_sampler_stream: the steps' indices and timesteps as they go, no preview), both over gRPC
    (Triton streams only there), B = 1 and 8. The two alternate round by round (the one-response draw runs, timed
    by hand, in each round's setup), so a change in the machine's load hits both alike."""
    require(exports, "diffusion")
    client = triton_clients["grpc"]
    if client.backend.stream_loop is None:
        pytest.skip("the benchmark server has no diffusion_sampler_stream model")
    labels = class_labels(loop_batch)
    steps = settings.peer_steps
    reported, one_response_s, one_response_images = [], [], []

    def draw(**kw):
        return client.sample(classes=labels, steps=steps, guidance=settings.guidance, seed=0, raw=True, loop="server",
                             **kw)

    def streamed():
        return draw(callback=lambda i, t, x, x0: reported.append(i))

    def one_response_first():
        t0 = time.perf_counter()
        one_response_images.append(draw())
        one_response_s.append(time.perf_counter() - t0)

    benchmark.group = f"stream-B{loop_batch:02d}"
    benchmark.extra_info.update(item="stream", sampler="dpmpp-2m", steps=steps, images=loop_batch, protocol="grpc")
    streamed()  # warm (the streaming model makes its sessions on its first request)
    draw()
    images = benchmark.pedantic(streamed, setup=one_response_first, iterations=1,
                                rounds=rounds(settings, 8 * settings.sample_rounds))
    benchmark.extra_info["one_response_s"] = one_response_s
    np.testing.assert_allclose(images, one_response_images[-1], atol=1e-6)  # streaming changes nothing drawn
    assert reported[-steps:] == list(range(steps))  # every step reported, in order

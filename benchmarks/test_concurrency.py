"""5. Concurrency: 1, 2, 4, 8 clients at once, each drawing single images (a few DPM-Solver++ steps, so one request
of 2 rows per step), against the one Triton server: throughput, latency percentiles per image and per request, and
what the dynamic batcher did, from Triton's own metrics (deltas over the measured round: warm-up counts too)."""
from __future__ import annotations

import threading
import time

import numpy as np

from trident.benchmarks import metrics
from trident.benchmarks.common import percentiles_ms, require
from trident.serving.spec import UNET


def test_concurrent_clients(benchmark, settings, exports, server, clients):
    require(exports, "diffusion")
    from trident.serving.client import TridentClient

    url = server.http_url if settings.protocol == "http" else server.grpc_url
    steps, per_client = settings.concurrency_steps, settings.concurrency_images
    image_s, request_s, errors, wall, max_batch = [], [], [], [], []

    def draw(client, i):
        return client.sample(classes=[i % 10], sampler="dpmpp-2m", steps=steps, guidance=settings.guidance,
                             seed=i, raw=True)

    def worker(k: int, ready: threading.Barrier, go: threading.Event):
        # Each thread makes its own client: tritonclient.http runs on gevent, whose connections belong to the thread
        # that made them ("Cannot switch to a different thread" otherwise).
        try:
            with TridentClient.connect(url, settings.protocol) as client:
                draw(client, k)  # connection up, server warm
                max_batch.append(client.backend.max_batch[UNET])
                ready.wait()
                go.wait()
                for j in range(per_client):
                    t0 = time.perf_counter()
                    draw(client, k * per_client + j)
                    image_s.append(time.perf_counter() - t0)
                    request_s.extend(client.last_stats.call_s)
        except Exception as e:  # reported after the round; a silent failure would flatter the numbers
            errors.append(repr(e))
            ready.abort()

    idle = metrics.scrape(server.metrics_url)
    ready, go = threading.Barrier(clients + 1), threading.Event()
    threads = [threading.Thread(target=worker, args=(k, ready, go)) for k in range(clients)]
    for t in threads:
        t.start()
    try:
        ready.wait()  # every client connected and warm
    except threading.BrokenBarrierError:
        pass
    # Triton counts a request when it releases it, which can be after the client holds the answer: wait until
    # every warm-up request (one per step per client) shows, or the round's delta would include a late one.
    before = metrics.scrape_settled(server.metrics_url, idle, UNET, clients * steps, timeout=30)

    def one_round():
        t0 = time.perf_counter()
        go.set()
        for t in threads:
            t.join()
        wall.append(time.perf_counter() - t0)

    benchmark.group = "concurrency"
    if not errors:
        benchmark.pedantic(one_round, rounds=1, iterations=1)
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    wall = wall[-1]  # the measured round (pytest-benchmark keeps no stats under --benchmark-disable)
    images = clients * per_client
    after = metrics.scrape_settled(server.metrics_url, before, UNET, images * steps)
    batcher = metrics.summarize(metrics.delta(before, after, UNET))
    benchmark.extra_info.update(
        item="concurrency", clients=clients, images=images, steps=steps, protocol=settings.protocol,
        wall_s=wall, images_per_s=images / wall, image_latency=percentiles_ms(image_s),
        request_latency=percentiles_ms(request_s), batcher=batcher, max_batch=max_batch[0])
    assert batcher["requests"] == images * steps, f"Triton counted {batcher} for our {images * steps} requests"
    assert np.isfinite(wall)

"""Load and faults against a real embedded Triton server: many clients at once get exactly their own rows, and a
server killed and restarted under running client loops ends each in complete, correct images or a typed error."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import numpy as np
import pytest

from trident.serving.client import AsyncTridentClient, TridentClient, TridentError
from trident.serving.client.backends import ServerUnreachableError
from trident.serving.server.launcher import ServerConfig, TritonServer
from trident.serving.server.repository import build_repository
from trident.serving.spec import DECODER, GENERATOR, UNET

from conftest import settled

GRAPHS = (UNET, GENERATOR, DECODER)


@pytest.fixture(scope="module")
def ort_client(export_dirs):
    with TridentClient.from_onnx(list(export_dirs.values()), threads=1) as client:
        yield client


# ---------------------------------------------------------------------------------------------------------------
# 16 clients x 50 requests
# ---------------------------------------------------------------------------------------------------------------

def random_request(backend, seed: int) -> tuple[str, dict[str, np.ndarray]]:
    """One request of 1 to 9 rows (above the test models' max_batch_size of 4, so some are split) to a random graph,
    with inputs drawn from `seed`: valid timesteps, labels and latents, different in every request."""
    rng = np.random.default_rng(seed)
    graph = GRAPHS[seed % len(GRAPHS)]
    rows = int(rng.integers(1, 10))
    feed = {}
    for t in backend.specs[graph].inputs:
        if t.np_dtype.kind == "i":  # class labels: 0..9, 10 = the U-Net's null class
            feed[t.name] = rng.integers(0, 11 if graph == UNET else 10, rows).astype(np.int64)
        elif t.shape == ():  # a timestep
            feed[t.name] = rng.uniform(0, 999, rows).astype(np.float32)
        else:
            feed[t.name] = rng.standard_normal((rows, *t.shape)).astype(np.float32)
    return graph, feed


def triton_counts(server) -> dict[str, tuple[int, int]]:
    """graph -> (successful, failed) requests so far, from Triton's statistics."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        stats = {s["name"]: s["inference_stats"] for s in client.get_inference_statistics(as_json=True)["model_stats"]}
    return {g: (int(stats[g]["success"].get("count", 0)), int(stats[g]["fail"].get("count", 0))) for g in GRAPHS}


@pytest.mark.server
@pytest.mark.slow
def test_16_clients_x_50_requests_of_mixed_sizes_lose_nothing_and_each_gets_its_own_rows(export_dirs, ort_client,
                                                                                         tmp_path):
    """8 sync clients on threads and 8 asyncio clients in one event loop (half HTTP, half gRPC each), 50 requests
    apiece to the U-Net, the generator and the decoder, all at once through the dynamic batcher. Every answer equals
    those rows run alone (in-process ONNX Runtime, one request at a time), and Triton counts every request."""
    clients, per_client = 16, 50
    seeds = {c: [1000 * c + r for r in range(per_client)] for c in range(clients)}
    expected = {}
    for c in range(clients):
        for seed in seeds[c]:
            graph, feed = random_request(ort_client.backend, seed)
            expected[seed] = ort_client.backend.run(graph, feed)

    repo = tmp_path / "model_repository"
    build_repository(list(export_dirs.values()), repo, server_loop=False)
    results: dict[int, dict] = {}
    failures: list[str] = []
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        before = triton_counts(server)

        def sync_client(c, protocol):
            try:
                url = server.grpc_url if protocol == "grpc" else server.http_url
                with TridentClient.connect(url, protocol) as client:  # made on this thread (HTTP is per thread)
                    for seed in seeds[c]:
                        results[seed] = client.backend.run(*random_request(client.backend, seed))
            except Exception as e:  # noqa: BLE001  (reported below)
                failures.append(f"sync client {c} ({protocol}): {type(e).__name__}: {e}")

        async def async_client(c, protocol):
            url = server.grpc_url if protocol == "grpc" else server.http_url
            async with AsyncTridentClient.connect(url, protocol) as client:
                for seed in seeds[c]:
                    results[seed] = await client.backend.run(*random_request(client.backend, seed))

        async def async_clients():
            outcomes = await asyncio.gather(*(async_client(c, ("http", "grpc")[c % 2]) for c in range(8, 16)),
                                            return_exceptions=True)
            failures.extend(f"async client {8 + i}: {o!r}" for i, o in enumerate(outcomes) if o is not None)

        threads = [threading.Thread(target=sync_client, args=(c, ("http", "grpc")[c % 2])) for c in range(8)]
        threads.append(threading.Thread(target=asyncio.run, args=(async_clients(),)))
        t0 = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        wall = time.monotonic() - t0
        with TridentClient.connect(server.grpc_url, "grpc") as client:
            max_batch = client.backend.max_batch
        sent = {g: 0 for g in GRAPHS}
        for seed in results:
            graph, feed = random_request(ort_client.backend, seed)
            rows = len(next(iter(feed.values())))
            sent[graph] += -(-rows // max_batch[graph])  # requests above max_batch_size are split
        after = settled(lambda: triton_counts(server),
                        lambda now: all(now[g][0] - before[g][0] >= sent[g] for g in GRAPHS))

    assert not failures, failures
    assert len(results) == clients * per_client, f"{clients * per_client - len(results)} requests lost"
    for seed, out in results.items():
        graph, feed = random_request(ort_client.backend, seed)
        for name, array in expected[seed].items():
            assert out[name].shape == array.shape, (seed, name)
            np.testing.assert_allclose(out[name], array, atol=1e-4, err_msg=f"request {seed} ({graph}), {name}")
    for graph in GRAPHS:
        assert after[graph][0] - before[graph][0] == sent[graph], graph  # every request answered once
        assert after[graph][1] == before[graph][1], graph  # and none failed
    print(f"{clients} clients x {per_client} requests: {sum(sent.values())} Triton requests in {wall:.1f} s")


# ---------------------------------------------------------------------------------------------------------------
# The server killed and restarted in the middle of 8 clients' loops
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.server
@pytest.mark.slow
def test_server_killed_and_restarted_mid_loop_ends_each_client_in_correct_images_or_a_typed_error(
        export_dirs, ort_client, tmp_path):
    """8 clients sampling at once (client loops on sync and asyncio clients over HTTP and gRPC with retries, one
    without retries, one streamed server-side loop); the server is SIGKILLed once every loop is a few steps in and
    restarted on the same ports. A client loop with retries resumes where it was, the server-side loop is redone from
    its seed once the server is back (its steps reported once); each must end with the images it would have drawn
    undisturbed. The client without retries must end in a typed error (TridentError). Nothing partial, nothing
    silently different."""
    repo = tmp_path / "model_repository"
    build_repository([export_dirs["diffusion"]], repo)
    server = TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0))
    server.start()
    server.wait_ready()
    fixed_ports = ServerConfig(repo, http_port=server.config.http_port, grpc_port=server.config.grpc_port,
                               metrics_port=server.config.metrics_port)
    # name -> (sync or async, protocol, retries, loop)
    plan = {"sync-http-a": ("sync", "http", 10, "client"), "sync-http-b": ("sync", "http", 10, "client"),
            "sync-grpc-a": ("sync", "grpc", 10, "client"), "sync-grpc-b": ("sync", "grpc", 10, "client"),
            "async-http": ("async", "http", 10, "client"), "async-grpc": ("async", "grpc", 10, "client"),
            "sync-http-no-retries": ("sync", "http", 0, "client"),
            "async-grpc-streamed": ("async", "grpc", 10, "server")}
    kw = {name: dict(classes=[i % 10, (i + 3) % 10], sampler=("ddim", "dpmpp-2m")[i % 2], steps=40, guidance=3.0,
                     seed=50 + i, raw=True) for i, name in enumerate(plan)}
    steps_seen = {name: 0 for name in plan}
    reported = {name: [] for name in plan}  # every step index each callback saw
    outcomes: dict[str, object] = {}

    def progress(name):
        def callback(i, t, x, x0):
            steps_seen[name] = i + 1
            reported[name].append(i)
        return callback

    def url(protocol):
        return server.grpc_url if protocol == "grpc" else server.http_url

    def run_sync(name, protocol, retries):
        try:
            with TridentClient.connect(url(protocol), protocol, retries=retries, backoff_s=0.25) as client:
                outcomes[name] = client.sample(**kw[name], callback=progress(name))
        except Exception as e:  # noqa: BLE001  (judged below)
            outcomes[name] = e

    async def run_async(name, protocol, retries, loop):
        try:
            async with AsyncTridentClient.connect(url(protocol), protocol, retries=retries, backoff_s=0.25) as client:
                outcomes[name] = await client.sample(**kw[name], loop=loop, callback=progress(name))
        except Exception as e:  # noqa: BLE001
            outcomes[name] = e

    async def async_clients():
        await asyncio.gather(*(run_async(name, p, r, loop) for name, (kind, p, r, loop) in plan.items()
                               if kind == "async"))

    threads = [threading.Thread(target=run_sync, args=(name, p, r)) for name, (kind, p, r, _) in plan.items()
               if kind == "sync"]
    threads.append(threading.Thread(target=asyncio.run, args=(async_clients(),)))
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while min(steps_seen.values()) < 3:  # every loop a few steps in
            assert time.monotonic() < deadline, f"loops did not start: {steps_seen}"
            time.sleep(0.02)
        os.kill(server.pid, signal.SIGKILL)
        killed, killed_at = time.monotonic(), dict(steps_seen)
        server.stop(timeout=10)  # reaps it, kills the stubs left behind, frees its shared memory
        server = TritonServer(fixed_ports)  # the clients keep dialling these ports
        server.start()
        server.wait_ready()
        down_s = time.monotonic() - killed
        for thread in threads:
            thread.join(timeout=400)
    finally:
        server.stop()
    print(f"killed at steps {killed_at}; down {down_s:.1f} s; outcomes: "
          + ", ".join(f"{n}: {'images' if isinstance(o, np.ndarray) else type(o).__name__}" for n, o in outcomes.items()))

    assert set(outcomes) == set(plan), f"clients still running: {set(plan) - set(outcomes)}"
    assert all(n < 40 for n in killed_at.values()), killed_at  # every loop was mid-way at the kill
    for name, (kind, protocol, retries, loop) in plan.items():
        got = outcomes[name]
        if isinstance(got, np.ndarray):
            assert got.shape == (2, 1, 28, 28), name
            np.testing.assert_allclose(got, ort_client.sample(**kw[name]), atol=1e-4, err_msg=name)
        else:
            assert isinstance(got, TridentError), f"{name}: {type(got).__name__}: {got}"
    # the retries carried the client loops over the restart and redid the server-side loop; without retries it is a
    # typed error
    resumed = [name for name, (_, _, retries, _) in plan.items() if retries]
    assert all(isinstance(outcomes[name], np.ndarray) for name in resumed), {n: outcomes[n] for n in resumed}
    for name in resumed:  # each step reached the callback once, in order: a redo re-reports none
        assert reported[name] == list(range(40)), f"{name}: steps reported {reported[name]}"
    assert isinstance(outcomes["sync-http-no-retries"], ServerUnreachableError), outcomes["sync-http-no-retries"]

"""One SDK over several replicas (serving/client/backends.py endpoints, grpc_channel): real tritonserver replicas on
this machine, each on its own loopback ports; a client spreads its requests over them, rides over one that is killed
and uses it again once it is back."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from conftest import settled
from trident.serving.client import AsyncTridentClient, TridentClient
from trident.serving.client.backends import endpoints, grpc_channel
from trident.serving.errors import InvalidArgumentError
from trident.serving.server.launcher import ServerConfig, TritonServer
from trident.serving.spec import GENERATOR

CLASSES = [1, 7, 3, 0]


def test_endpoints_and_the_grpc_channel_accept_lists_and_one_dns_name():
    assert endpoints("127.0.0.1:1,127.0.0.1:2") == endpoints(["127.0.0.1:1", " 127.0.0.1:2"]) == ["127.0.0.1:1",
                                                                                                   "127.0.0.1:2"]
    assert grpc_channel(["127.0.0.1:8001"]) == ("127.0.0.1:8001", None)  # one server: tritonclient's defaults
    target, options = grpc_channel(["127.0.0.1:1", "127.0.0.1:2"])
    assert target == "ipv4:127.0.0.1:1,127.0.0.1:2" and ("grpc.lb_policy_name", "round_robin") in options
    target, options = grpc_channel(["dns:///trident-headless.default.svc:8001"])
    assert target.startswith("dns:///") and ("grpc.lb_policy_name", "round_robin") in options
    with pytest.raises(InvalidArgumentError, match="must be IP:port"):
        grpc_channel(["host-a:1", "host-b:2"])
    with pytest.raises(InvalidArgumentError, match="no server address"):
        endpoints(" , ")


def _served(server: TritonServer) -> int:
    """Requests the replica's generator executed (Triton's statistics, read over HTTP)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        stats = client.get_inference_statistics(GENERATOR)["model_stats"][0]
        return int(stats["inference_stats"]["success"]["count"])
    finally:
        client.close()


@pytest.fixture(scope="module")
def replicas(export_dirs, tmp_path_factory):
    from trident.serving.server.repository import build_repository

    repository = tmp_path_factory.mktemp("replicas") / "repository"
    build_repository([export_dirs["gan"]], repository, shard_limit=0)
    servers = [TritonServer(ServerConfig(repository, http_port=0, grpc_port=0, metrics_port=0)) for _ in range(2)]
    for server in servers:
        server.start()
    try:
        for server in servers:
            server.wait_ready()
        yield servers  # the test may replace servers[0] by its restart
    finally:
        for server in servers:
            server.stop()


@pytest.mark.server
def test_clients_spread_over_replicas_ride_over_a_killed_one_and_use_it_again_when_it_is_back(replicas, export_dirs):
    want = TridentClient.from_onnx([export_dirs["gan"]]).generate(CLASSES, seed=9, raw=True)
    a, b = replicas
    urls = {"http": [a.http_url, b.http_url], "grpc": [a.grpc_url, b.grpc_url]}
    clients = {p: TridentClient.connect(urls[p], p, retries=4, backoff_s=0.2) for p in urls}

    async def draw_async(protocol: str, n: int) -> list:
        async with AsyncTridentClient.connect(urls[protocol], protocol, retries=4, backoff_s=0.2) as client:
            return [await client.generate(CLASSES, seed=9, raw=True) for _ in range(n)]

    ways = {f"{kind} {protocol}": (lambda n, p=protocol, k=kind: asyncio.run(draw_async(p, n)) if k == "asyncio"
                                   else [clients[p].generate(CLASSES, seed=9, raw=True) for _ in range(n)])
            for kind in ("sync", "asyncio") for protocol in ("grpc", "http")}

    def draw(n: int) -> list:
        return [image for way in ways.values() for image in way(n)]

    try:
        images = []
        for name, way in ways.items():  # each client kind on its own: every one spreads over both replicas
            before = [_served(a), _served(b)]
            images += way(6)
            after = settled(lambda: (_served(a), _served(b)), lambda v: sum(v) >= sum(before) + 6)
            served = [x - y for x, y in zip(after, before)]
            assert sum(served) == 6 and min(served) > 0, f"{name}: requests per replica {served}"
        os.kill(a.pid, signal.SIGKILL)  # the replica dies with no warning
        a.stop(timeout=10)  # reaps it and the stubs it left
        images += draw(4)  # every request finds the live replica (a retry moves off the dead one)
        for got in images:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        fixed = ServerConfig(a.config.model_repository, http_port=a.config.http_port, grpc_port=a.config.grpc_port,
                             metrics_port=a.config.metrics_port)
        a = replicas[0] = TritonServer(fixed)  # back on the same ports the clients dial
        a.start()
        a.wait_ready()
        deadline = time.monotonic() + 30
        while _served(a) == 0 and time.monotonic() < deadline:  # gRPC reconnects within its backoff (<= 2 s)
            for got in draw(2):
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert _served(a) > 0, "the restarted replica took no traffic"
    finally:
        for client in clients.values():
            client.close()

"""One SDK over several replicas (serving/client/backends.py endpoints, grpc_channel, RetryPolicy.redo_loop): three
real tritonserver replicas on this machine, each on its own loopback ports, serving the diffusion model (U-Net and
both sampling loop models) and the GAN. Clients spread their requests over them, ride over one that is killed in the
middle of their loops, and use it again once it is back."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from conftest import settled
from trident.serving.client import AsyncTridentClient, TridentClient
from trident.serving.client.backends import RetryPolicy, each_step_once, endpoints, grpc_channel, loop_redoable
from trident.serving.errors import InvalidArgumentError
from trident.serving.server.launcher import ServerConfig, TritonServer, free_port
from trident.serving.server.runtime.protocol import OUT_OF_TIME, SHUTTING_DOWN
from trident.serving.spec import GENERATOR, SAMPLING_LOOP, SAMPLING_LOOP_STREAM, UNET

CLASSES = [1, 7, 3, 0]
CLIENT_KINDS = (("sync", "http"), ("sync", "grpc"), ("asyncio", "http"), ("asyncio", "grpc"))
SERVED = (UNET, SAMPLING_LOOP, SAMPLING_LOOP_STREAM, GENERATOR)


# ---------------------------------------------------------------------------------------------------------------
# Without a server: addresses, the gRPC channel, which loop failures are redone
# ---------------------------------------------------------------------------------------------------------------

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


def test_loop_request_is_redone_when_its_replica_went_away_and_not_when_it_timed_out_or_was_refused():
    gone = [ConnectionRefusedError(111, "Connection refused"),
            InferenceServerException("Socket closed", status="StatusCode.UNAVAILABLE"),
            InferenceServerException(f"diffusion_sampler: {SHUTTING_DOWN}; stopped after step 3"),
            InferenceServerException("Request for unknown model: 'diffusion_sampler' has no available versions")]
    final = [InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"),
             InferenceServerException(f"diffusion_sampler: {OUT_OF_TIME} after step 4"), TimeoutError("timed out"),
             InferenceServerException("steps must be an integer in [1, 1000]", status="400")]
    assert [loop_redoable(e) for e in gone] == [True] * len(gone)
    assert [loop_redoable(e) for e in final] == [False] * len(final)
    policy = RetryPolicy(retries=2)
    assert [policy.redo_loop(gone[0], attempt) for attempt in range(4)] == [True, True, False, False]
    # out of redos: the failure that started them says why; a timeout on a redo says itself
    assert policy.loop_gave_up(gone[2], gone[0]) is gone[2] and policy.loop_gave_up(gone[2], final[0]) is final[0]


def test_a_redone_streamed_loop_reports_each_step_once_in_order():
    seen = []
    report = each_step_once(lambda i, t, preview: seen.append((i, t, preview)))
    for i, t in [(0, 999), (1, 666), (2, 333), (0, 999), (1, 666), (2, 333), (3, 0)]:  # a redo from the start
        report(i, t, None)
    assert seen == [(0, 999, None), (1, 666, None), (2, 333, None), (3, 0, None)]


# ---------------------------------------------------------------------------------------------------------------
# Three real replicas
# ---------------------------------------------------------------------------------------------------------------

def _stats(server: TritonServer, model: str) -> tuple[int, int]:
    """(requests answered, executions) of a replica's model, from Triton's statistics (read over HTTP)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        stats = client.get_inference_statistics(model)["model_stats"][0]
        return int(stats["inference_stats"]["success"]["count"]), int(stats.get("execution_count", 0))
    finally:
        client.close()


def _served(server: TritonServer, model: str = GENERATOR) -> int:
    return _stats(server, model)[0]


def _running(server: TritonServer, model: str) -> bool:
    """Whether the replica's model is executing a request now: Triton has handed it more requests (its verbose log,
    log_verbose=1) than it has released (its statistics)."""
    started = server.log_text().count(f'"model {model}, instance {model}_0_0, executing ')
    return started > _stats(server, model)[1]


def _until(condition, what: str, timeout_s: float = 120.0, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(every_s)


@pytest.fixture(scope="module")
def replicas(export_dirs, tmp_path_factory):
    from trident.serving.server.repository import build_repository

    repository = tmp_path_factory.mktemp("replicas") / "repository"
    build_repository([export_dirs["diffusion"], export_dirs["gan"]], repository, shard_limit=0)
    config = ServerConfig(repository, http_port=0, grpc_port=0, metrics_port=0, log_verbose=1)
    servers = [TritonServer(config) for _ in range(3)]
    for server in servers:
        server.start()
    try:
        for server in servers:
            server.wait_ready()
        yield servers  # a test may replace servers[0] by its restart
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def in_process(export_dirs):
    client = TridentClient.from_onnx([export_dirs["diffusion"], export_dirs["gan"]])
    yield client
    client.close()


def _urls(servers) -> dict[str, list[str]]:
    return {"http": [s.http_url for s in servers], "grpc": [s.grpc_url for s in servers]}


@pytest.mark.server
def test_every_client_kind_spreads_its_requests_and_its_server_loops_over_every_replica(replicas, in_process):
    want = in_process.generate(CLASSES, seed=9, raw=True)
    want_loop = in_process.sample([4], steps=2, seed=5, raw=True)
    urls = _urls(replicas)

    def draw(kind: str, protocol: str) -> list:
        """6 GAN requests, then 3 server-side loops."""
        if kind == "sync":
            with TridentClient.connect(urls[protocol], protocol, retries=4, backoff_s=0.2) as client:
                return ([client.generate(CLASSES, seed=9, raw=True) for _ in range(6)]
                        + [client.sample([4], steps=2, seed=5, raw=True, loop="server") for _ in range(3)])

        async def draw_async():
            async with AsyncTridentClient.connect(urls[protocol], protocol, retries=4, backoff_s=0.2) as client:
                return ([await client.generate(CLASSES, seed=9, raw=True) for _ in range(6)]
                        + [await client.sample([4], steps=2, seed=5, raw=True, loop="server") for _ in range(3)])

        return asyncio.run(draw_async())

    def counts():
        return [_served(s, GENERATOR) for s in replicas], [_served(s, SAMPLING_LOOP) for s in replicas]

    for kind, protocol in CLIENT_KINDS:  # each client kind on its own: every one spreads over all three replicas
        before = counts()
        images = draw(kind, protocol)
        after = settled(counts, lambda now: sum(now[0]) >= sum(before[0]) + 6 and sum(now[1]) >= sum(before[1]) + 3)
        gan = [x - y for x, y in zip(after[0], before[0])]
        loops = [x - y for x, y in zip(after[1], before[1])]
        assert sum(gan) == 6 and min(gan) > 0, f"{kind} {protocol}: GAN requests per replica {gan}"
        assert loops == [1, 1, 1], f"{kind} {protocol}: server-side loops per replica {loops}"
        for got in images[:6]:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        for got in images[6:]:
            np.testing.assert_allclose(got, want_loop, rtol=0, atol=1e-4)


@pytest.mark.server
@pytest.mark.parametrize("kind", ["sync", "asyncio"])
def test_server_loop_refused_by_a_replica_is_redone_on_a_live_one(replicas, in_process, kind):
    """A listed replica that refuses connections (nothing listens on its port) costs no loop: over HTTP every other
    request goes to it and is redone on the live one (over gRPC, round_robin never picks it)."""
    want = in_process.sample([2, 5], steps=2, seed=3, raw=True)
    urls = [f"127.0.0.1:{free_port()}", replicas[1].http_url]

    async def draw_async():
        async with AsyncTridentClient.connect(urls, "http", retries=2, backoff_s=0.05) as client:
            return [await client.sample([2, 5], steps=2, seed=3, raw=True, loop="server") for _ in range(4)]

    if kind == "sync":
        with TridentClient.connect(urls, "http", retries=2, backoff_s=0.05) as client:
            images = [client.sample([2, 5], steps=2, seed=3, raw=True, loop="server") for _ in range(4)]
    else:
        images = asyncio.run(draw_async())
    for got in images:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.server
@pytest.mark.slow
def test_16_clients_ride_over_a_replica_killed_mid_loop_and_use_it_again_when_it_is_back(replicas, in_process):
    """16 clients (sync and asyncio, HTTP and gRPC) draw without pause: diffusion client loops, server-side loops
    (gRPC clients also streamed ones) and the GAN. Once every replica has served every model, replica 0 is SIGKILLed
    while it runs a server-side loop and a streamed one that has reported steps; every client draws twice more,
    replica 0 restarts on the same ports and must serve every model again. Every call of every client must return its
    in-process images (a streamed loop reporting each step once): nothing lost, nothing different."""
    urls = _urls(replicas)
    works = ("client loop", "server loop", "gan", "streamed loop")
    plan = []  # (kind, protocol, work, sample() or generate() arguments)
    for k in range(16):
        kind, protocol = CLIENT_KINDS[k % 4]
        work = works[k // 4]
        if work == "streamed loop" and protocol == "http":
            work = "server loop"  # Triton streams over gRPC only
        if work == "gan":
            plan.append((kind, protocol, work, dict(classes=[k % 10, (k + 5) % 10, 3], seed=k, raw=True)))
        else:  # a streamed loop long enough to be killed after it has reported steps
            steps = 6 if work == "streamed loop" else 3
            plan.append((kind, protocol, work, dict(classes=[k % 10, (k + 3) % 10], steps=steps, seed=100 + k,
                                                    raw=True)))
    want = [in_process.generate(**kw) if work == "gan" else in_process.sample(**kw) for _, _, work, kw in plan]
    done, errors, stop = [0] * len(plan), [], threading.Event()
    reported = {k: [] for k, p in enumerate(plan) if p[2] == "streamed loop"}  # each streamed draw's steps so far

    def streams_mid_way() -> bool:
        """Every streamed client is in a draw that has reported steps and not all of them."""
        return all(0 < len(steps) < plan[k][3]["steps"] for k, steps in reported.items())

    def check(k: int, got: np.ndarray, steps: list[int]) -> None:
        np.testing.assert_allclose(got, want[k], rtol=0, atol=1e-4, err_msg=f"client {k} {plan[k][:3]}")
        if plan[k][2] == "streamed loop":
            assert steps == list(range(plan[k][3]["steps"])), f"client {k} reported steps {steps}"
        done[k] += 1

    def call(k: int, client, steps: list[int]):
        _, _, work, kw = plan[k]
        if work == "gan":
            return client.generate(**kw)
        if work == "streamed loop":  # a preview every step: each step is reported at once
            reported[k] = steps
            return client.sample(**kw, loop="server", preview_every=1, callback=lambda i, t, x, x0: steps.append(i))
        return client.sample(**kw, loop="server" if work == "server loop" else "client")

    def sync_client(k: int) -> None:
        protocol = plan[k][1]
        try:
            with TridentClient.connect(urls[protocol], protocol, retries=6, backoff_s=0.2) as client:
                while not stop.is_set():
                    steps = []
                    check(k, call(k, client, steps), steps)
        except Exception as e:  # noqa: BLE001  (every failure fails the test below)
            errors.append(f"client {k} {plan[k][:3]}: {type(e).__name__}: {e}")

    async def asyncio_client(k: int) -> None:
        protocol = plan[k][1]
        try:
            async with AsyncTridentClient.connect(urls[protocol], protocol, retries=6, backoff_s=0.2) as client:
                while not stop.is_set():
                    steps = []
                    check(k, await call(k, client, steps), steps)
        except Exception as e:  # noqa: BLE001
            errors.append(f"client {k} {plan[k][:3]}: {type(e).__name__}: {e}")

    async def asyncio_clients() -> None:
        await asyncio.gather(*(asyncio_client(k) for k, p in enumerate(plan) if p[0] == "asyncio"))

    threads = [threading.Thread(target=sync_client, args=(k,)) for k, p in enumerate(plan) if p[0] == "sync"]
    threads.append(threading.Thread(target=asyncio.run, args=(asyncio_clients(),)))
    a = replicas[0]
    try:
        for thread in threads:
            thread.start()
        _until(lambda: all(_served(s, m) for s in replicas for m in SERVED) and min(done) >= 1 or errors,
               "every replica has served every model")
        assert not errors, errors
        # both streamed clients reported steps of their current draw, so the one replica 0 runs has: its redo
        # must not report them again
        _until(lambda: streams_mid_way() and _running(a, SAMPLING_LOOP) and _running(a, SAMPLING_LOOP_STREAM)
               or errors, "replica 0 runs a server-side loop and a streamed one past its first step", timeout_s=60,
               every_s=0.01)
        os.kill(a.pid, signal.SIGKILL)  # the replica dies with no warning, two loops in flight
        at_kill = list(done)
        a.stop(timeout=10)  # reaps it and the stubs it left
        _until(lambda: all(n >= m + 2 for n, m in zip(done, at_kill)) or errors, "every client drew twice more")
        restart = dataclasses.replace(a.requested_config, http_port=a.config.http_port, grpc_port=a.config.grpc_port,
                                      metrics_port=a.config.metrics_port)
        a = replicas[0] = TritonServer(restart)  # back on the ports the clients dial
        # started from a thread of its own, which the launcher forks without running Python in the child
        # (preexec_fn): a fork that ran Python while the clients' gRPC threads were busy crashed the child (SIGSEGV)
        starter = threading.Thread(target=a.start)
        starter.start()
        starter.join()
        a.wait_ready()
        # gRPC reconnects within its backoff (<= 2 s), HTTP at the next request
        _until(lambda: all(_served(a, m) for m in SERVED) or errors, "the restarted replica served every model")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, "\n".join(errors[:5])
    assert not any(thread.is_alive() for thread in threads), "a client hangs"
    print(f"draws per client: {done} (at the kill: {at_kill})")

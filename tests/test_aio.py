"""AsyncTridentClient over a real embedded Triton server (gRPC and HTTP asyncio clients): the sync client's images for
the same arguments, many tasks sharing the dynamic batcher, and cancellation that stops the requests."""
from __future__ import annotations

import asyncio
import re
import time

import numpy as np
import pytest

from trident.serving import sampling
from trident.serving.client import AsyncTridentClient, TridentClient
from trident.serving.client.backends import InvalidArgumentError, ServerUnreachableError
from trident.serving.server.launcher import ServerConfig, TritonServer, free_port
from trident.serving.server.repository import build_repository
from trident.serving.spec import SAMPLING_LOOP, UNET

from conftest import settled


@pytest.fixture(scope="module")
def server(export_dirs, tmp_path_factory):
    repo = tmp_path_factory.mktemp("aio_repo") / "model_repository"
    build_repository(list(export_dirs.values()), repo)
    # log_verbose 1: Triton logs when it hands a request to a model instance (started_executions)
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0, log_verbose=1)) as srv:
        yield srv


def url_of(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def unet_counts(server) -> tuple[int, int]:
    """(requests, executions) the server's diffusion_unet has answered so far (Triton's statistics)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        stats = client.get_inference_statistics(UNET, as_json=True)["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0)), int(stats.get("execution_count", 0))


def sampler_executions(server) -> int:
    """Executions of the server's non-streaming sampling loop model so far (Triton's statistics)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        stats = client.get_inference_statistics(SAMPLING_LOOP, as_json=True)["model_stats"][0]
    return int(stats.get("execution_count", 0))


def started_executions(server, model: str) -> int:
    """Requests Triton has handed to the model's instance so far, from its verbose log: a request counts here as soon
    as it runs, where the statistics count it only once it is released."""
    return server.log_path.read_text(errors="replace").count(f'"model {model}, instance {model}_0_0, executing ')


async def until(condition, timeout_s: float = 60.0) -> None:
    """Wait, without blocking the event loop, until condition() holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def mixed_jobs(protocol: str) -> list[dict]:
    """32 sample() calls: 1-5 images, the three samplers, guided / unguided / unconditional, a few on the server."""
    rng = np.random.default_rng(13)
    jobs = []
    for k in range(32):
        n = int(rng.integers(1, 6))
        kw = dict(sampler=sampling.SAMPLERS[k % 3], steps=int(rng.integers(2, 5)), seed=100 + k, raw=True)
        if k % 5 == 4:
            kw.update(classes=None, n=n)  # unconditional: N rows a step
        else:
            kw.update(classes=[int(c) for c in rng.integers(0, 10, n)], guidance=1.0 if k % 5 == 3 else 3.0)
        if kw["sampler"] == "ddim" and k % 2:
            kw["eta"] = 0.5
        if k % 8 == 7:
            kw["loop"] = "server"
            if protocol == "grpc" and k % 16 == 15:
                kw["callback"] = lambda *step: None  # streamed
        jobs.append(kw)
    return jobs


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_32_concurrent_sample_tasks_of_mixed_sizes_and_samplers_each_equal_their_sync_result(server, protocol):
    jobs = mixed_jobs(protocol)
    with TridentClient.connect(url_of(server, protocol), protocol) as client:
        expected = [client.sample(**{k: v for k, v in kw.items() if k != "callback"}) for kw in jobs]
        max_batch = client.backend.max_batch[UNET]
    requests0, executions0 = unet_counts(server)

    async def draw_all():
        async with AsyncTridentClient.connect(url_of(server, protocol), protocol) as client:
            return await asyncio.gather(*(client.sample(**kw) for kw in jobs))

    got = asyncio.run(draw_all())
    assert len(got) == len(jobs)  # none lost
    for kw, a, b in zip(jobs, got, expected):
        assert a.shape == b.shape == (kw["n"] if kw["classes"] is None else len(kw["classes"]), 1, 28, 28), kw
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=str(kw))  # float tolerance: other bucket layouts
    def requests_per_step(kw):  # [cond; null] rows, split at the model's max_batch_size
        n = kw["n"] if kw["classes"] is None else len(kw["classes"])
        rows = n if kw["classes"] is None or kw.get("guidance") == 1.0 else 2 * n
        return -(-rows // max_batch)

    sent = sum(kw["steps"] * requests_per_step(kw) for kw in jobs if kw.get("loop") != "server")
    requests1, executions1 = settled(lambda: unet_counts(server), lambda now: now[0] - requests0 >= sent)
    assert requests1 - requests0 == sent  # what the client loop sends per step, no retry, none lost
    # the tasks' requests met in Triton's dynamic batcher: fewer executions than requests
    assert executions1 - executions0 < requests1 - requests0


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_gan_vae_and_interpolation_equal_the_sync_client(server, protocol):
    from trident.training.data import load_fashion_mnist

    a_img, b_img = load_fashion_mnist("test", limit=2).images  # uint8 (28, 28) each
    with TridentClient.connect(url_of(server, protocol), protocol) as client:
        calls = [("generate", (["coat", "bag", 3],), dict(seed=3, raw=True)),
                 ("generate", (None, 5), dict(seed=4, truncation=1.5)),
                 ("generate_vae", (6,), dict(seed=1, temperature=0.8, raw=True)),
                 ("interpolate", ("sneaker", "bag", 5), dict(raw=True)),
                 ("interpolate", (a_img, b_img, 4), dict(spherical=False)),  # encodes the two images first
                 ("decode", (np.zeros((2, client.card("vae").latent_dim)),), dict(raw=True))]
        expected = [getattr(client, name)(*args, **kw) for name, args, kw in calls]

    async def run_all():
        async with AsyncTridentClient.connect(url_of(server, protocol), protocol) as client:
            return await asyncio.gather(*(getattr(client, name)(*args, **kw) for name, args, kw in calls))

    for (name, _, _), a, b in zip(calls, asyncio.run(run_all()), expected):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), atol=1e-4 if a.dtype != np.uint8 else 1,
                                   err_msg=name)


@pytest.mark.server
def test_cancelling_a_task_stops_its_requests(server):
    """The client loop sends no step after its task is cancelled (Triton's request count stands still); a server-side
    loop, streamed or not, is cancelled on the server (the next request does not wait behind a DDPM-1000)."""
    async def scenario():
        async with AsyncTridentClient.connect(server.grpc_url, "grpc") as client:
            # client loop: DDPM-1000, cancelled after a few steps
            steps_done = asyncio.Event()
            task = asyncio.create_task(client.sample(
                [1, 2], sampler="ddpm", steps=1000,
                callback=lambda i, t, x, x0: (i >= 3 and steps_done.set()) or True))
            await asyncio.wait_for(steps_done.wait(), 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # a request already on the wire may still finish: the count once it has stood still for a second
            at_cancel = await asyncio.to_thread(settled, lambda: unet_counts(server)[0], quiet_s=1.0)

            # server-side loops (DDPM-1000 of 8 images: ~2 min here), streamed and not, each cancelled once it runs
            # on the server (its first streamed step; Triton handing the request to the model), so that the loop's
            # own cancel path is what stops it, not Triton dropping a queued request
            waits, executions0 = {}, sampler_executions(server)
            for streamed in (True, False):
                started = asyncio.Event()
                kw = dict(callback=lambda *step: started.set()) if streamed else {}
                executions = started_executions(server, SAMPLING_LOOP)
                task = asyncio.create_task(client.sample(list(range(8)), sampler="ddpm", steps=1000, loop="server",
                                                         **kw))
                if streamed:
                    await asyncio.wait_for(started.wait(), 60)
                else:
                    await until(lambda: started_executions(server, SAMPLING_LOOP) > executions)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                t0 = time.monotonic()
                await client.sample([1], steps=2, loop="server", **({"callback": lambda *s: None} if streamed else {}))
                waits[streamed] = time.monotonic() - t0
            # the non-streaming loop model ran the cancelled request (and the next one), not Triton's queue
            executed = await asyncio.to_thread(settled, lambda: sampler_executions(server),
                                               lambda now: now - executions0 >= 2)
            return at_cancel, unet_counts(server)[0], waits, executed - executions0

    requests0 = unet_counts(server)[0]
    at_cancel, after, waits, executed = asyncio.run(scenario())
    assert after == at_cancel, "requests reached the U-Net after the task was cancelled"
    assert 4 <= at_cancel - requests0 < 1000
    assert waits[True] < 30 and waits[False] < 30, f"a cancelled server-side loop kept running: {waits}"
    assert executed == 2, "the cancelled server-side loop never ran: its cancel path was not tried"


@pytest.mark.server
def test_async_server_refusals_timeouts_and_a_stopping_callback_each_end_their_call_and_the_server_loop(server):
    """What only the server checks (a timestep out of range: INVALID_ARG), a graph it does not serve, an HTTP
    server-side loop past sample_timeout_s (the server stops it too: the client sent the timeout as max_seconds), and
    a streamed loop whose callback returns False (the stream is cancelled). After each loop, the next one on the same
    model does not wait behind a DDPM-1000 of 8 images (~2 min here)."""
    from trident.serving.client import InferenceError, ModelNotReadyError
    from trident.serving.sampling import SamplingCancelled

    async def next_loop_s(client, streamed: bool) -> float:
        t0 = time.monotonic()
        await client.sample([1], steps=2, loop="server", **({"callback": lambda *s: None} if streamed else {}))
        return time.monotonic() - t0

    async def scenario():
        waits = {}
        async with AsyncTridentClient.connect(server.grpc_url, "grpc") as grpc, \
                AsyncTridentClient.connect(server.http_url, "http", sample_timeout_s=2.0) as http:
            spec = http.backend.specs[UNET]
            feed = {t.name: np.zeros((1, *t.shape), t.np_dtype) for t in spec.inputs}
            feed["timestep"][:] = 5000
            with pytest.raises(InferenceError, match=re.escape("the server rejected the request: diffusion_unet: "
                                                                 "input 'timestep' must be in [0, 1000)")):
                await http.backend.run(UNET, feed)
            with pytest.raises(ModelNotReadyError, match="'no_such_graph' is not served at"):
                await grpc.backend.run("no_such_graph", {})
            # whichever timer fires first, the client's or the server's max_seconds (the same 2 s, sent by the
            # client), the caller sees its own timeout
            with pytest.raises(InferenceError, match=r"no answer within sample_timeout_s=2 s"):
                await http.sample(list(range(8)), sampler="ddpm", steps=1000, loop="server")
            waits["http timeout"] = await next_loop_s(grpc, streamed=False)
            with pytest.raises(SamplingCancelled):
                await grpc.sample(list(range(8)), sampler="ddpm", steps=1000, loop="server",
                                  callback=lambda *step: False)
            waits["callback False"] = await next_loop_s(grpc, streamed=True)
        return waits

    waits = asyncio.run(scenario())
    assert all(s < 30 for s in waits.values()), f"a server-side loop kept running: {waits}"


class StreamCuttingProxy:
    """A gRPC proxy in front of the real server that relays every call as it is, except that it ends each
    ModelStreamInfer stream cleanly (status OK) after relaying its first answer, and cancels the stream upstream: what
    a proxy or load balancer between client and Triton can do (an idle or drain timeout), and Triton itself never
    does to a stream whose client side is still open. Bytes pass through unparsed."""

    def __init__(self, upstream: str):
        import grpc
        from concurrent.futures import ThreadPoolExecutor

        self.channel = grpc.insecure_channel(upstream)
        self.cut = 0  # streams ended early so far
        proxy = self

        class Relay(grpc.GenericRpcHandler):
            def service(self, details):
                if details.method.endswith("/ModelStreamInfer"):
                    return grpc.stream_stream_rpc_method_handler(proxy._cut_stream)
                call = proxy.channel.unary_unary(details.method)
                return grpc.unary_unary_rpc_method_handler(lambda request, context: call(request))

        self.server = grpc.server(ThreadPoolExecutor(4), handlers=[Relay()])
        self.url = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _cut_stream(self, requests, context):
        first = next(requests)
        upstream = self.channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")(
            iter([first]))
        answer = next(upstream)
        upstream.cancel()  # the loop on the server stops at its next step
        self.cut += 1
        yield answer

    def close(self):
        self.server.stop(grace=None)
        self.channel.close()


@pytest.mark.server
def test_async_stream_that_ends_before_the_images_raises_server_unreachable_naming_it(server):
    """A streamed server-side loop whose stream ends (status OK) after a progress answer and before the images: the
    callback saw the steps that came, and the call ends in ServerUnreachableError saying the stream ended before the
    images (not a hang until sample_timeout_s, not images)."""
    proxy = StreamCuttingProxy(server.grpc_url)
    steps = []

    async def scenario():
        async with AsyncTridentClient.connect(proxy.url, "grpc", sample_timeout_s=120.0) as client:
            t0 = time.monotonic()
            with pytest.raises(ServerUnreachableError) as ended:
                await client.sample(list(range(8)), sampler="ddpm", steps=1000, loop="server",
                                    callback=lambda i, t, x, x0: steps.append(i))
            return ended.value, time.monotonic() - t0

    try:
        error, took = asyncio.run(scenario())
    finally:
        proxy.close()
    assert proxy.cut == 1
    assert "diffusion_sampler_stream: the stream ended before the images" in str(error) and proxy.url in str(error)
    assert steps and steps == list(range(len(steps))) and len(steps) < 1000, steps
    assert took < 60, f"the call waited {took:.0f} s after its stream ended"


@pytest.mark.server
def test_async_arguments_are_checked_before_any_request(server):
    async def scenario():
        async with AsyncTridentClient.connect(server.http_url, "http") as client:
            with pytest.raises(InvalidArgumentError, match="guidance must be a finite number >= 0 and <= 50"):
                await client.sample([1], guidance=1e308)
            with pytest.raises(InvalidArgumentError, match="unknown class name"):
                await client.sample(["no-such-class"])
            with pytest.raises(InvalidArgumentError, match="loop='server' need a gRPC client"):
                await client.sample([1], loop="server", progress=True)
            with pytest.raises(InvalidArgumentError, match=re.escape("temperature must be > 0")):
                await client.generate_vae(2, temperature=0)

    before = unet_counts(server)
    asyncio.run(scenario())
    assert unet_counts(server) == before


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_connect_to_no_server_raises_server_unreachable_with_the_url(protocol):
    url = f"127.0.0.1:{free_port()}"

    async def connect():
        async with AsyncTridentClient.connect(url, protocol, timeout_s=2.0):
            pass

    t0 = time.monotonic()
    with pytest.raises(ServerUnreachableError, match=re.escape(url)):
        asyncio.run(connect())
    assert time.monotonic() - t0 < 30


@pytest.mark.server
def test_readme_asyncio_example_runs_against_a_server(server):
    """The README's web-service example, as written there (only the address changes): four handlers at once."""
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"### From asyncio.*?```python\n(.*?)```", readme, re.S)
    assert example, "README.md no longer has the asyncio example"
    code = example.group(1).replace('"127.0.0.1:8001"', repr(server.grpc_url))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[200, 200, 200, 200]", done.stdout

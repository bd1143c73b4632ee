"""The asyncio client: TridentClient's methods as coroutines over tritonclient's asyncio clients (gRPC: grpc.aio,
HTTP: aiohttp), for services that hold many users' requests in one event loop (FastAPI, aiohttp).

    from trident.serving.client import AsyncTridentClient

    async with AsyncTridentClient.connect("127.0.0.1:8001", "grpc") as client:
        images = await client.sample(["sneaker"] * 4, steps=20, seed=0)        # uint8 (4, 28, 28, 1)

Same arguments and the same images for the same seed as TridentClient: the checks, the requests and the sampling
loop are ClientBase's (base.py) and sampling.SamplingLoop, shared with the sync client; only the sending differs.
Concurrent calls are independent coroutines whose requests meet in the server's dynamic batcher. Cancelling a task
stops its requests: the client loop sends no further step, and a server-side loop over gRPC is cancelled on the
server (Triton's request cancellation); over HTTP a server-side loop runs on until it ends or its max_seconds (the
client's sample_timeout_s) passes, since an HTTP request cannot be cancelled.
"""
from __future__ import annotations

import asyncio
import random
import time
from typing import Callable

import numpy as np

from ..errors import ModelNotReadyError, ServerUnreachableError, TridentError
from ..graph_runtime import IMAGE, MEAN, PREDICTION
from ..sampling import SamplingCancelled
from ..spec import DECODER, ENCODER, GENERATOR, GraphSpec
from .backends import (TLS, DescribedServer, RetryPolicy, ServerInfo, TritonBackend, check_inputs, client_options,
                       each_step_once, endpoints, failure, grpc_channel, infer_inputs, lost, loop_failure,
                       requested_outputs, stream_message)
from .base import ClientBase, SampleJob, SampleStats

__all__ = ["AsyncTridentClient", "AsyncTritonBackend"]


class AsyncTritonBackend(DescribedServer):
    """A Triton server over tritonclient.grpc.aio or tritonclient.http.aio: TritonBackend's contract with coroutines
    for run and run_loop. Made by `await AsyncTritonBackend.connect(...)` inside the event loop that will use it.

    The handshake (live, ready, every model's card, the sampling loop models) is TritonBackend's, run once in a worker
    thread: both clients hold the same ServerInfo and RetryPolicy, so they learn a server and retry a request the
    same way; every request after the handshake is a coroutine.
    """

    name = "triton-asyncio"

    def __init__(self, server: ServerInfo, policy: RetryPolicy, timeout_s: float, sample_timeout_s: float,
                 tls: TLS | None = None):
        """Use connect()."""
        self.server, self.policy = server, policy
        self.url, self.protocol = server.url, server.protocol
        self.urls = endpoints(self.url)
        self._turn = random.randrange(len(self.urls))  # HTTP: the replica the next request goes to (as TritonBackend)
        self.timeout_s, self.sample_timeout_s = float(timeout_s), float(sample_timeout_s)
        if self.protocol == "http":
            import tritonclient.http.aio as tc

            # no session-wide timeout (aiohttp's would cut a long sampling request): each call gets its own below
            self._clients = [tc.InferenceServerClient(u, conn_timeout=None) for u in self.urls]
        else:
            import tritonclient.grpc.aio as tc

            target, channel_args = grpc_channel(self.urls)
            self._clients = [tc.InferenceServerClient(target, channel_args=channel_args,
                                                      **client_options(self.protocol, tls))]
        self._tc = tc

    @classmethod
    async def connect(cls, url: str = "127.0.0.1:8001", protocol: str = "grpc", **kw) -> "AsyncTritonBackend":
        """kw: TritonBackend's (timeout_s, retries, backoff_s, models, sample_timeout_s)."""
        def handshake() -> TritonBackend:
            backend = TritonBackend(url, protocol, **kw)
            backend.close()  # in the thread that made it (tritonclient.http is per thread)
            return backend

        done = await asyncio.to_thread(handshake)
        return cls(done.server, done.policy, done.timeout_s, done.sample_timeout_s, done.tls)

    async def close(self) -> None:
        for client in self._clients:
            await client.close()

    @property
    def _client(self):
        """The client of the replica whose turn it is (gRPC: the one balanced channel)."""
        return self._clients[self._turn % len(self._clients)]

    # -- one request ----------------------------------------------------------------------------------------------
    async def _infer_once(self, graph: str, spec: GraphSpec, feed: dict, batched: bool, timeout_s: float) -> list:
        inputs = infer_inputs(self._tc, self.protocol, spec, feed, batched)
        outputs = requested_outputs(self._tc, self.protocol, spec)
        if self.protocol == "grpc":
            res = await self._client.infer(graph, inputs, outputs=outputs, client_timeout=timeout_s)
        else:
            res = await asyncio.wait_for(self._client.infer(graph, inputs, outputs=outputs,
                                                            timeout=int(timeout_s * 1e6)), timeout_s)
        return [res.as_numpy(t.name) for t in spec.outputs]

    async def _server_live(self) -> bool:
        try:
            if self.protocol == "grpc":
                return bool(await self._client.is_server_live(client_timeout=self.timeout_s))
            return bool(await asyncio.wait_for(self._client.is_server_live(), self.timeout_s))
        except Exception:
            return False

    async def _infer(self, graph: str, spec: GraphSpec, feed: dict) -> list:
        """One request, retried as self.policy says (TritonBackend._infer's rule, awaited)."""
        attempt = 0
        while True:
            self._turn += 1
            try:
                return await self._infer_once(graph, spec, feed, True, self.timeout_s)
            except Exception as e:
                outcome = self.policy.outcome(e, attempt)
                if outcome != "retry":
                    live = await self._server_live() if outcome == "lost" else None
                    raise failure(outcome, self.url, graph, e, live) from None
            await asyncio.sleep(self.policy.delay(attempt))
            attempt += 1

    async def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if graph not in self.specs:
            raise ModelNotReadyError(f"model {graph!r} is not served at {self.url} (served: {sorted(self.specs)})")
        spec = self.specs[graph]
        n = check_inputs(spec, inputs)
        step = self.max_batch[graph]
        outs = [await self._infer(graph, spec, {k: v[i:i + step] for k, v in inputs.items()})
                for i in range(0, n, step)]
        return {t.name: np.concatenate([o[j] for o in outs]) for j, t in enumerate(spec.outputs)}

    # -- the sampling loop models ---------------------------------------------------------------------------------
    async def run_loop(self, feed: dict[str, np.ndarray], on_step: Callable | None = None,
                       model: str = "diffusion") -> np.ndarray:
        """TritonBackend.run_loop as a coroutine (redone on another replica the same way). Cancelling the task cancels
        the request (gRPC)."""
        loop = self.require_server_loop(stream=on_step is not None, model=model)
        on_step = None if on_step is None else each_step_once(on_step)
        attempt, first = 0, None
        while True:  # redone on another replica as TritonBackend.run_loop is
            self._turn += 1
            try:
                if on_step is not None:
                    return await self._stream_loop(loop.spec, feed, on_step)
                return (await self._infer_once(loop.spec.name, loop.spec, feed, False, self.sample_timeout_s))[0]
            except (SamplingCancelled, TridentError):
                raise
            except Exception as e:
                first = e if first is None else first
                if not self.policy.redo_loop(e, attempt):
                    e = self.policy.loop_gave_up(first, e)
                    error = loop_failure(e, self.url, loop.spec.name, self.sample_timeout_s)
                    raise (error or lost(self.url, loop.spec.name, e, await self._server_live())) from None
            await asyncio.sleep(self.policy.delay(attempt))
            attempt += 1

    async def _stream_loop(self, spec: GraphSpec, feed: dict, on_step: Callable) -> np.ndarray:
        inputs = infer_inputs(self._tc, "grpc", spec, feed, batched=False)
        sent = asyncio.Event()

        async def requests():
            yield {"model_name": spec.name, "inputs": inputs}
            await sent.wait()  # keep our side of the stream open until the answer is in

        responses = self._client.stream_infer(requests(), stream_timeout=self.sample_timeout_s)
        finished = False  # the server sent its last answer (images or error): nothing left to cancel
        try:
            async for result, error in responses:
                if error is not None:
                    finished = True
                    raise error
                images, steps = stream_message(result, spec)
                finished = images is not None
                for step in steps:
                    on_step(*step)
                if finished:
                    return images
            finished = True
            raise ServerUnreachableError(self.url, f"{spec.name}: the stream ended before the images")
        finally:
            sent.set()  # closes our side: the server ends the stream
            if not finished:  # a task cancelled, a callback that said stop: the server's loop ends at its next step
                responses.cancel()


class _Connecting:
    """What AsyncTridentClient.connect returns: await it for the client, or use it in `async with`."""

    def __init__(self, make):
        self._make, self._client = make, None

    def __await__(self):
        return self._make().__await__()

    async def __aenter__(self) -> "AsyncTridentClient":
        self._client = await self._make()
        return self._client

    async def __aexit__(self, *exc) -> None:
        await self._client.close()


class AsyncTridentClient(ClientBase):
    """TridentClient's sample, generate, decode, generate_vae, encode and interpolate as coroutines, over a Triton
    server (gRPC or HTTP); card, class_names, resolve_classes and save_grid as in TridentClient.

    callback(i, t, x, x0) is a plain function, called in the event loop (keep it short). last_stats describes the
    most recently started call; with concurrent calls on one client, time them yourself.
    """

    @classmethod
    def connect(cls, url: str = "127.0.0.1:8001", protocol: str = "grpc", **kw) -> _Connecting:
        """`client = await AsyncTridentClient.connect(url, protocol)` or `async with AsyncTridentClient.connect(...)
        as client`. kw: TridentClient.connect's (timeout_s, retries, backoff_s, models, sample_timeout_s). Raises
        ServerUnreachableError / ModelNotReadyError."""
        async def make() -> AsyncTridentClient:
            return cls(await AsyncTritonBackend.connect(url, protocol, **kw))

        return _Connecting(make)

    async def close(self) -> None:
        await self.backend.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def _timed_run(self, graph: str, inputs: dict, stats: SampleStats) -> dict:
        t0 = time.perf_counter()
        out = await self.backend.run(graph, inputs)
        stats.add(time.perf_counter() - t0, len(next(iter(inputs.values()))))
        return out

    # -- diffusion ----------------------------------------------------------------------------------------------
    async def sample(self, classes=None, n: int | None = None, *, sampler: str | None = None,
                     steps: int | None = None, guidance: float = 3.0, eta: float = 0.0, seed: int | None = 0,
                     spacing: str | None = None, progress: bool = False, callback: Callable | None = None,
                     raw: bool = False, loop: str = "client", preview_every: int = 0,
                     sampler_options: dict | None = None, model: str = "diffusion",
                     guidance_t_min: int = 0) -> np.ndarray:
        """TridentClient.sample as a coroutine: the same arguments (model="diffusion_student" for the student), the
        same images for the same seed."""
        job = self._sample_job(classes, n, sampler=sampler, steps=steps, guidance=guidance, eta=eta, seed=seed,
                               spacing=spacing, progress=progress, callback=callback, loop=loop,
                               preview_every=preview_every, sampler_options=sampler_options, model=model,
                               guidance_t_min=guidance_t_min)
        self.last_stats = stats = SampleStats()
        t0 = time.perf_counter()
        x = await (self._run_loop_on_server(job, stats) if job.loop is None else self._run_loop_here(job, stats))
        stats.wall_s = time.perf_counter() - t0
        return self._finish(x, job.card, raw)

    async def _run_loop_here(self, job: SampleJob, stats: SampleStats) -> np.ndarray:
        loop, graph = job.loop, self._unet_of(job)
        out_name = self.backend.specs[graph].role(PREDICTION).name
        try:
            while not loop.done:
                feed = self._unet_feed(*loop.model_input(), graph=graph)
                step = loop.advance((await self._timed_run(graph, feed, stats))[out_name])
        finally:
            loop.close()
        return np.asarray(step.pred_original_sample, dtype=np.float32)  # as sampling.last_estimate

    async def _run_loop_on_server(self, job: SampleJob, stats: SampleStats) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            x = await self.backend.run_loop(job.feed, on_step=job.on_step, model=job.model)
        finally:
            if job.on_step is not None:
                job.on_step.close()
        stats.add(time.perf_counter() - t0, job.count)
        return np.asarray(x, dtype=np.float32)

    # -- GAN and VAE --------------------------------------------------------------------------------------------
    async def generate(self, classes=None, n: int | None = None, *, seed: int | None = 0,
                       truncation: float | None = None, raw: bool = False) -> np.ndarray:
        """TridentClient.generate as a coroutine."""
        feed, card = self._generate_request(classes, n, seed, truncation)
        return await self._images(GENERATOR, feed, card, raw)

    async def decode(self, z: np.ndarray, raw: bool = False) -> np.ndarray:
        feed, card = self._decode_request(z)
        return await self._images(DECODER, feed, card, raw)

    async def generate_vae(self, n: int, *, seed: int | None = 0, temperature: float = 1.0,
                           raw: bool = False) -> np.ndarray:
        """TridentClient.generate_vae as a coroutine."""
        return await self.decode(self._vae_latents(n, seed, temperature), raw)

    async def encode(self, images: np.ndarray) -> np.ndarray:
        feed = self._encode_request(images)
        self.last_stats = stats = SampleStats()
        return (await self._timed_run(ENCODER, feed, stats))[self.backend.specs[ENCODER].role(MEAN).name]

    async def interpolate(self, start, end, steps: int = 8, *, spherical: bool = True, raw: bool = False) -> np.ndarray:
        """TridentClient.interpolate as a coroutine."""
        card = self._check_interpolation(steps)
        ends = []
        for end_ in (start, end):
            latent, image = self._endpoint(end_, card)
            ends.append(latent if image is None else (await self.encode(image))[0].astype(np.float64))
        return await self.decode(self._latent_path(*ends, steps, spherical), raw)

    async def _images(self, graph, inputs, card, raw):
        self.last_stats = stats = SampleStats()
        t0 = time.perf_counter()
        out = (await self._timed_run(graph, inputs, stats))[self.backend.specs[graph].role(IMAGE).name]
        stats.wall_s = time.perf_counter() - t0
        return self._finish(out, card, raw)

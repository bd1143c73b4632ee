"""Where the networks run: interchangeable backends behind one contract, the Backend protocol below.

- OnnxRuntimeBackend: in-process ONNX Runtime over `trident export` folders (serving/ort_runner.py, as in Triton).
- TritonBackend: a Triton server over HTTP or gRPC; the model cards come from the models' configuration parameters.
- TorchBackend (export/torch_backend.py, needs torch): the PyTorch modules from checkpoints; TridentClient.from_torch
  reaches it through serving/toolchain.py.

All tensor names come from trident.serving.spec. No module here imports torch.
"""
from __future__ import annotations

import asyncio
import os
import queue
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..card import ModelCard
from ..errors import InferenceError, InvalidArgumentError, ModelNotReadyError, ServerUnreachableError, TridentError
from .. import precision as precisions
from ..manifest import RuntimeOptions, graph_runtime, load_export, measure
from ..ort_runner import CPU as CPU_PROVIDER
from ..ort_runner import BucketRunner, plan_chunks  # noqa: F401  (plan_chunks: part of this module's API)
from ..sampling import SamplingCancelled
from ..spec import DIFFUSION_MODELS, KIND_OF_GRAPH, LOOP_MODELS, GraphSpec, graph_spec_of
from ..server.runtime.protocol import CARD as CARD_PARAMETER
from ..server.runtime.protocol import MAX_IMAGES as MAX_IMAGES_PARAMETER
from ..server.runtime.protocol import OUT_OF_TIME, SHUTTING_DOWN

__all__ = ["Backend", "ServerLoop", "ServerInfo", "RetryPolicy", "TLS", "OnnxRuntimeBackend", "TritonBackend",
           "check_inputs", "TridentError", "ServerUnreachableError", "ModelNotReadyError", "InvalidArgumentError",
           "InferenceError"]


@dataclass(frozen=True)
class ServerLoop:
    """A sampling loop model a server runs (Triton name `diffusion_sampler`, or the student's
    `diffusion_student_sampler`; and their streaming twins): its tensors and its request limit."""

    spec: GraphSpec
    max_images: int


@runtime_checkable
class Backend(Protocol):
    """What TridentClient needs from a place where the networks run.

    cards[kind]                 the model card of each model it holds ("diffusion", "gan", "vae")
    specs[graph], buckets[graph]  the tensor spec of each graph, and its static batch sizes (() if any size runs)
    run(graph, inputs)          {tensor name: array (N, ...)} -> {tensor name: array (N, ...)} for any N >= 1
    close()
    server_loop                 the teacher's sampling loop model the backend can call (a ServerLoop), or None
    require_server_loop(stream, model)  the sampling loop of a diffusion model ("diffusion", "diffusion_student";
                                stream: the streaming one), or the typed error that says why there is none
    run_loop(feed, on_step, model)  one request to that loop (inputs as spec.loop_spec): the images; with on_step,
                                the streaming loop, calling on_step(index, timestep, preview or None) at each step (an
                                exception from it, e.g. SamplingCancelled, cancels the request and propagates)
    """

    name: str
    cards: dict[str, ModelCard]
    specs: dict[str, GraphSpec]
    buckets: dict[str, tuple[int, ...]]
    server_loop: ServerLoop | None

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def require_server_loop(self, stream: bool = False, model: str = "diffusion") -> ServerLoop: ...

    def run_loop(self, feed: dict[str, np.ndarray], on_step=None, model: str = "diffusion") -> np.ndarray: ...

    def close(self) -> None: ...


class InProcess:
    """The part of the Backend protocol that is the same for every backend running in this process: no remote
    sampling loop (the client loop is the loop)."""

    name = "in-process"
    server_loop: ServerLoop | None = None

    def require_server_loop(self, stream: bool = False, model: str = "diffusion") -> ServerLoop:
        raise InvalidArgumentError(f"loop='server' needs a Triton server; this client runs {self.name} in-process "
                                   "(use loop='client')")

    def run_loop(self, feed, on_step=None, model: str = "diffusion"):
        self.require_server_loop()


STREAM_POLL_S = 0.25  # how often a streamed loop that has no new answer checks that its stream is still open


def check_inputs(spec: GraphSpec, inputs: dict[str, np.ndarray]) -> int:
    """Names, per-item shapes and a common batch size; returns N."""
    missing = [t.name for t in spec.inputs if t.name not in inputs]
    if missing:
        raise InvalidArgumentError(f"{spec.name}: missing inputs {missing}")
    sizes = set()
    for t in spec.inputs:
        a = np.asarray(inputs[t.name])
        if a.shape[1:] != t.shape:
            raise InvalidArgumentError(f"{spec.name}: input {t.name!r} must have shape (N, {', '.join(map(str, t.shape))})"
                                       f", got {a.shape}")
        sizes.add(a.shape[0])
    if len(sizes) != 1 or 0 in sizes:
        raise InvalidArgumentError(f"{spec.name}: inputs must share one batch size >= 1, got {sorted(sizes)}")
    return sizes.pop()


# ----------------------------------------------------------------------------------------------------------------
# In-process ONNX Runtime
# ----------------------------------------------------------------------------------------------------------------

class OnnxRuntimeBackend(InProcess):
    """Sessions over one or more `trident export` folders: one ort_runner.BucketRunner per graph.

    precision: "fp32" (onnxruntime-fp32), "fp16" (the fp16 graphs, for the CUDA provider), a variant of
    serving/precision.py for every bucket, or "auto": per graph and bucket the fastest variant measured here that
    this CPU runs natively and that passed the quality gate (quality_gate: its verdicts file, by default the one in
    the package's repository; None: no gate) and the parity gate; what was chosen and measured, and why a variant
    was not offered, is in .precision[graph]. threads: intra-op threads of a whole call (None or 0:
    ONNX Runtime's default); row_shards: concurrent row shards on the CPU (0: one per core; 1: off); shard_limit: the
    largest bucket a row shard runs (0, the default: every bucket; "auto": per graph the smallest bucket within 2% of
    the fastest time per row, measured here as `trident serve build` does, recorded in .precision[graph]).
    """

    name = "onnxruntime"

    def __init__(self, export_dirs, threads: int | None = None, providers: list[str] | None = None,
                 precision: str = "fp32", row_shards: int = 0, quality_gate=precisions.DEFAULT_QUALITY_GATE,
                 shard_limit: int | str = 0):
        if isinstance(export_dirs, (str, os.PathLike)):
            export_dirs = [export_dirs]
        gpu = any((p if isinstance(p, str) else p[0]) != CPU_PROVIDER for p in providers or ())
        try:  # the options `trident serve build` takes too, checked by the same class
            options = RuntimeOptions(precision, threads or 0, row_shards, shard_limit, gpu, quality_gate)
        except ValueError as e:
            raise InvalidArgumentError(str(e)) from None
        self.cards, self.buckets, self.specs, self.runners, self.precision = {}, {}, {}, {}, {}
        self.ranges = {}  # graph -> {input: InputRange}: checked before a run, as the Triton models check them
        try:
            for d in export_dirs:
                export = load_export(d)
                self.cards[export.card.kind] = export.card
                for graph, entry in export.graphs.items():
                    try:  # the one GraphRuntime the repository builder makes too, run here on the export's files
                        measured = measure(export, graph, options)
                        runtime = graph_runtime(export, graph, options, measured.choice)
                        runner = BucketRunner(**runtime.runner_arguments(str(d), measured.measured),
                                              providers=providers)
                    except ValueError as e:  # a precision the export lacks, a GPU provider that does not load
                        raise InvalidArgumentError(f"{d}: {e}") from None
                    trial = {"shard_trial": measured.measured.shard_trial} if measured.measured else {}
                    self.precision[graph] = {**measured.record, **trial}
                    self.specs[graph] = entry.spec
                    self.ranges[graph] = runtime.ranges
                    self.runners[graph] = runner
                    self.buckets[graph] = tuple(runner.buckets)
        except BaseException:
            self.close()
            raise

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if graph not in self.runners:
            raise ModelNotReadyError(f"graph {graph!r} is not loaded; loaded: {sorted(self.runners)}")
        spec = self.specs[graph]
        check_inputs(spec, inputs)
        feed = {t.name: np.ascontiguousarray(inputs[t.name], dtype=t.np_dtype) for t in spec.inputs}
        for name, valid in self.ranges[graph].items():  # a student's guidance outside its range, a label past null
            refusal = valid.refusal(graph, name, feed[name])
            if refusal is not None:
                raise InvalidArgumentError(refusal)
        out = self.runners[graph].run(feed)
        return {t.name: out[t.name] for t in spec.outputs}

    def close(self):
        for runner in self.runners.values():
            runner.close()
        self.runners.clear()


# ----------------------------------------------------------------------------------------------------------------
# Triton (HTTP or gRPC)
# ----------------------------------------------------------------------------------------------------------------

def _is_transient(exc: Exception) -> bool:
    """Connection resets, timeouts and 'unavailable' answers are worth a retry; a 4xx-style error is not."""
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout, OSError)):
        return True
    text = str(exc).lower()
    status = str(getattr(exc, "status", lambda: "")() or "").lower()
    # tritonclient.http (geventhttpclient) reports a connection reset while awaiting the answer as
    # HTTPConnectionClosed("connection closed."), an http.client.HTTPException, not a ConnectionError.
    # tritonclient.http.aio (aiohttp) reports a server that went away as ServerDisconnectedError("Server
    # disconnected"), which is not an OSError either.
    return any(s in text or s in status for s in ("unavailable", "deadline", "timed out", "timeout",
                                                    "connection reset", "connection refused", "broken pipe",
                                                    "connection closed", "disconnected"))


def _is_timeout(text: str) -> bool:
    return any(s in text.lower() for s in ("deadline", "timed out", "timeout"))


def _model_gone(exc: Exception) -> bool:
    """A model found ready at connect is unknown now: the server is shutting down (Triton unloads every model on
    SIGTERM, answering "Request for unknown model: ... has no available versions") or an operator unloaded it."""
    text = str(exc).lower()
    return "unknown model" in text or "no available versions" in text


def _detail(e: Exception) -> str:
    return e.message() if hasattr(e, "message") and callable(e.message) else f"{type(e).__name__}: {e}"


@dataclass(frozen=True)
class TLS:
    """TLS towards a gRPC endpoint served with `trident serve --grpc-tls-cert/--grpc-tls-key`: ca, the PEM file of the
    authority that signed the server's certificate (None: the system's roots); cert and key, this client's own
    certificate and key where the server asks for them (mutual TLS, --grpc-tls-ca)."""

    ca: str | os.PathLike | None = None
    cert: str | os.PathLike | None = None
    key: str | os.PathLike | None = None

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise InvalidArgumentError("TLS: a client certificate needs its key, and a key its certificate")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise InvalidArgumentError(f"TLS: {name} file {path} does not exist")

    def grpc_options(self) -> dict:
        """tritonclient.grpc(.aio).InferenceServerClient's keyword arguments."""
        path = lambda p: None if p is None else str(p)  # noqa: E731  (tritonclient reads the files itself)
        return {"ssl": True, "root_certificates": path(self.ca), "private_key": path(self.key),
                "certificate_chain": path(self.cert)}


def client_options(protocol: str, tls: TLS | None) -> dict:
    """The TLS keyword arguments of a tritonclient InferenceServerClient (empty without TLS). Triton's HTTP endpoint
    has no TLS of its own, so tls is refused over HTTP: terminate TLS at a proxy and connect to it over gRPC or HTTP."""
    if tls is None:
        return {}
    if not isinstance(tls, TLS):
        raise InvalidArgumentError(f"tls must be a trident TLS(ca=..., cert=..., key=...), got {type(tls).__name__}")
    if protocol != "grpc":
        raise InvalidArgumentError("tls is for protocol='grpc': Triton's HTTP endpoint has no TLS (terminate it at a "
                                   "proxy or load balancer in front of the server)")
    return tls.grpc_options()


def endpoints(url) -> list[str]:
    """The replicas a client spreads over: "host:port", "h1:p1,h2:p2", a list of those, or one "dns:///name:port"
    (gRPC: every address the name resolves to, as a Kubernetes headless Service gives)."""
    items = [url] if isinstance(url, str) else list(url)
    out = [u.strip() for item in items for u in str(item).split(",") if u.strip()]
    if not out:
        raise InvalidArgumentError(f"no server address in {url!r}")
    return out


def grpc_channel(urls: list[str]) -> tuple[str, list | None]:
    """(target, channel arguments) of one gRPC channel over the replicas: gRPC's own client-side balancing, the
    round_robin policy over every address (several "ip:port", or the addresses of one "dns:///name:port"), retrying
    a dead replica's connection every second or so. One plain address: tritonclient's defaults."""
    if len(urls) == 1 and not urls[0].startswith("dns:"):
        return urls[0], None
    if len(urls) > 1:
        if any(u.startswith("dns:") for u in urls):
            raise InvalidArgumentError("a dns:///name:port address stands alone (its name gives the replicas)")
        hosts = [u.rsplit(":", 1)[0] for u in urls]
        if all(h.count(".") == 3 and h.replace(".", "").isdigit() for h in hosts):
            target = "ipv4:" + ",".join(urls)
        elif all(h.startswith("[") for h in hosts):
            target = "ipv6:" + ",".join(urls)
        else:
            raise InvalidArgumentError(f"several gRPC replicas must be IP:port addresses (or one dns:///name:port): "
                                       f"{urls}")
    else:
        target = urls[0]
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE

    return target, [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
                    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
                    ("grpc.lb_policy_name", "round_robin"),
                    ("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
                    ("grpc.max_reconnect_backoff_ms", 2000)]


def _restricted(e: Exception) -> bool:
    """The server refused an API that `trident serve` locks behind the admin key (HTTP 403, gRPC 'restricted')."""
    text = str(e).lower()
    return "restricted" in text or "403" in text or "forbidden" in text


@dataclass(frozen=True)
class RetryPolicy:
    """How both Triton clients (sync and asyncio) retry a request that failed in transit: a timeout, a reset, an
    'unavailable' answer or a model gone (a restarting server) is retried `retries` times with exponential backoff
    and jitter; an error the server answered is not."""

    retries: int = 3
    backoff_s: float = 0.2

    def delay(self, attempt: int) -> float:
        return self.backoff_s * 2 ** attempt * (1 + 0.1 * random.random())

    def outcome(self, e: Exception, attempt: int) -> str:
        """"retry", or what to raise: "lost" (the server or the model went away), "rejected" (the server answered
        with an error) or "unreachable" (no answer)."""
        from tritonclient.utils import InferenceServerException

        last = attempt >= self.retries
        if isinstance(e, InferenceServerException):
            gone = _is_transient(e) or _model_gone(e)
            return "retry" if gone and not last else ("lost" if gone else "rejected")
        transient = _is_transient(e) or isinstance(e, asyncio.TimeoutError)  # aiohttp's connection errors too
        return "retry" if transient and not last else "unreachable"

    def redo_loop(self, e: Exception, attempt: int) -> bool:
        """Whether a failed request to a sampling loop model is sent again (`retries` times), to another replica: when
        the replica refused it, went away or is shutting down (loop_redoable)."""
        return attempt < self.retries and loop_redoable(e)

    def loop_gave_up(self, first: Exception, last: Exception) -> Exception:
        """The failure to report when a loop request is not redone: after redos that found no replica either, the
        one that started them (it says why the loop was lost); else the last (a timeout, the server's answer)."""
        return first if loop_redoable(last) else last


def loop_redoable(e: Exception) -> bool:
    """A failed sampling loop request worth redoing on another replica: the replica refused it, went away or is shutting
    down. The request carries its seed, so the redo draws the same images; it costs the steps the lost replica had
    done. Never after a timeout (the client's sample_timeout_s or the server's stop at it) nor after the server's own
    answer (a bad request)."""
    from tritonclient.utils import InferenceServerException

    text = _detail(e)
    if SHUTTING_DOWN in text:  # the replica stopped the loop at the launcher's stop file
        return True
    if _is_timeout(text) or OUT_OF_TIME in text or isinstance(e, (TimeoutError, socket.timeout)):
        return False
    if isinstance(e, InferenceServerException):
        return _is_transient(e) or _model_gone(e)
    return _is_transient(e)  # a refused or reset connection (the HTTP clients raise these as they are)


def each_step_once(on_step):
    """on_step for a streamed loop that may be redone on another replica: the redo reports the steps of the first
    attempt again (same seed, same loop, same previews), so only the steps not yet reported are passed on: the
    progress bar pauses while the redo catches up, and the callback sees each step once, in order."""
    reported = -1

    def forward(index: int, t: int, preview) -> None:
        nonlocal reported
        if index > reported:
            reported = index
            on_step(index, t, preview)

    return forward


def failure(outcome: str, url: str, graph: str, e: Exception, live: bool | None) -> TridentError:
    """The typed error for a RetryPolicy outcome; live (only read for "lost") is whether the server still answers."""
    if outcome == "lost":
        return lost(url, graph, e, bool(live))
    if outcome == "rejected":
        return rejected(graph, e)
    return ServerUnreachableError(url, f"{type(e).__name__}: {e}")


@dataclass(frozen=True)
class LoopModels:
    """One diffusion model's sampling loop models on a server: the one-response loop and the streaming one (each None
    where not served or not ready), and why there is no loop (missing) where server_loop is None."""

    server_loop: ServerLoop | None = None
    stream_loop: ServerLoop | None = None
    missing: str = ""


@dataclass(frozen=True)
class ServerInfo:
    """What the handshake learnt of a Triton server, shared by the sync and asyncio clients: each served graph's card,
    tensor spec, buckets and max batch, and the sampling loop models (or why there is none)."""

    url: str
    protocol: str
    cards: dict
    specs: dict
    buckets: dict
    max_batch: dict
    loops: dict  # diffusion kind -> LoopModels (the teacher's under "diffusion", the student's under its kind)

    @property
    def server_loop(self) -> ServerLoop | None:
        """The teacher's sampling loop model (diffusion_sampler), or None."""
        return self.loops["diffusion"].server_loop if "diffusion" in self.loops else None

    @property
    def stream_loop(self) -> ServerLoop | None:
        return self.loops["diffusion"].stream_loop if "diffusion" in self.loops else None

    def require_server_loop(self, stream: bool = False, model: str = "diffusion") -> ServerLoop:
        names = DIFFUSION_MODELS.get(model)
        if names is None:
            raise InvalidArgumentError(f"model must be one of {tuple(DIFFUSION_MODELS)}, got {model!r}")
        found = self.loops.get(model) or LoopModels(missing=f"the server at {self.url} does not serve {names.loop!r}")
        if found.server_loop is None:
            raise ModelNotReadyError(f"{found.missing}; or use loop='client'")
        if not stream:
            return found.server_loop
        if self.protocol != "grpc":
            raise InvalidArgumentError("progress and callback with loop='server' need a gRPC client (the loop streams "
                                       "its steps, which Triton does only over gRPC): connect with protocol='grpc', "
                                       "or use loop='client'")
        if found.stream_loop is None:
            raise ModelNotReadyError(f"the server at {self.url} has no ready {names.stream!r} model, so the "
                                     "server-side loop cannot report progress; rebuild the repository with `trident "
                                     "serve build`, or drop progress and callback, or use loop='client'")
        return found.stream_loop


class DescribedServer:
    """The Backend protocol's metadata, read from the handshake's ServerInfo (self.server) and its RetryPolicy."""

    server: ServerInfo
    policy: RetryPolicy
    cards = property(lambda self: self.server.cards)
    specs = property(lambda self: self.server.specs)
    buckets = property(lambda self: self.server.buckets)
    max_batch = property(lambda self: self.server.max_batch)
    server_loop = property(lambda self: self.server.server_loop)
    stream_loop = property(lambda self: self.server.stream_loop)
    retries = property(lambda self: self.policy.retries)
    backoff_s = property(lambda self: self.policy.backoff_s)

    def require_server_loop(self, stream: bool = False, model: str = "diffusion") -> ServerLoop:
        return self.server.require_server_loop(stream, model)


def rejected(graph: str, e: Exception) -> InferenceError:
    return InferenceError(f"{graph}: the server rejected the request: {_detail(e)}")


def lost(url: str, graph: str, e: Exception, live: bool) -> TridentError:
    """The error for a request that failed because the server or the model went away: ServerUnreachableError when
    the server no longer answers (killed, or shutting down), else ModelNotReadyError (unloaded)."""
    if not live:
        return ServerUnreachableError(url, f"{graph}: {_detail(e)}")
    return ModelNotReadyError(f"model {graph!r} on {url} stopped serving: {_detail(e)}")


def loop_failure(e: Exception, url: str, graph: str, sample_timeout_s: float) -> TridentError | None:
    """The error for a failed request to a sampling loop model, or None when the server or the model went away (the
    caller asks the server whether it is still live, then raises lost())."""
    from tritonclient.utils import InferenceServerException

    text = _detail(e)
    if SHUTTING_DOWN in text:  # the loop stopped at the launcher's stop file (runtime/protocol.py)
        return ServerUnreachableError(url, text)
    # the client's deadline, or the server's own stop at the max_seconds the client sent: whichever came first
    if _is_timeout(text) or OUT_OF_TIME in text or isinstance(e, (TimeoutError, socket.timeout)):
        return InferenceError(f"{graph}: no answer within sample_timeout_s={sample_timeout_s:g} s ({text}); ask for "
                              "fewer images or steps, or raise the timeout")
    if isinstance(e, InferenceServerException):  # the server's own errors, and gRPC's status codes
        return None if _is_transient(e) or _model_gone(e) else rejected(graph, e)
    return ServerUnreachableError(url, text)


def infer_inputs(tc, protocol: str, spec: GraphSpec, feed: dict[str, np.ndarray], batched: bool = True) -> list:
    """The InferInput objects of a request (tc: the tritonclient module, sync or asyncio: they share the classes)."""
    inputs = []
    for t in spec.inputs:
        if t.optional and t.name not in feed:
            continue
        a = np.ascontiguousarray(feed[t.name], dtype=t.np_dtype)
        if batched:
            # Per-item scalars (timestep, class_label) travel as (N, 1): Triton needs non-empty dims when
            # max_batch_size > 0; the model config reshapes them back to (N,).
            a = a.reshape(len(a), *(t.shape or (1,)))
        inp = tc.InferInput(t.name, list(a.shape), t.triton_dtype)
        if protocol == "http":
            inp.set_data_from_numpy(a, binary_data=True)
        else:
            inp.set_data_from_numpy(a)
        inputs.append(inp)
    return inputs


def requested_outputs(tc, protocol: str, spec: GraphSpec) -> list:
    if protocol == "http":
        return [tc.InferRequestedOutput(t.name, binary_data=True) for t in spec.outputs]
    return [tc.InferRequestedOutput(t.name) for t in spec.outputs]


def stream_message(result, spec: GraphSpec) -> tuple[np.ndarray | None, list[tuple[int, int, np.ndarray | None]]]:
    """One response of the streaming loop model: (the images or None, [(index, timestep, preview or None)] of the
    steps it reports, in order; a preview belongs to the response's last step)."""
    image, step, timestep, preview = (result.as_numpy(t.name) for t in spec.outputs)
    if image is None and (step is None or timestep is None):
        raise InferenceError(f"{spec.name}: a response without image, step or timestep")
    indices = [] if step is None else step.reshape(-1).tolist()
    times = [] if timestep is None else timestep.reshape(-1).tolist()
    steps = [(int(i), int(t), None) for i, t in zip(indices, times)]
    if steps and preview is not None:
        steps[-1] = (*steps[-1][:2], preview)
    return image, steps


class TritonBackend(DescribedServer):
    """A Triton server at `url` ("host:port"), protocol "http" or "grpc"; or several replicas of one (endpoints()):
    over gRPC one channel balances the requests round robin (grpc_channel), over HTTP each request goes to the next
    replica; either way a retry goes to another replica than the one that failed.

    On connect: checks the server is live and ready, every trident model it serves is ready, and reads each model's
    model card from its configuration parameters. Requests larger than a model's max_batch_size are split.
    Transient failures (timeouts, resets, 'unavailable') are retried `retries` times with exponential backoff.
    An HTTP backend belongs to the thread that made it (tritonclient.http runs on gevent); give each thread its own
    backend, or use gRPC.
    """

    name = "triton"

    def __init__(self, url: str = "127.0.0.1:8000", protocol: str = "http", timeout_s: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.2, models: tuple[str, ...] | None = None,
                 sample_timeout_s: float = 600.0, tls: TLS | None = None):
        if protocol not in ("http", "grpc"):
            raise InvalidArgumentError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        self.urls = endpoints(url)
        self.url, self.protocol, self.timeout_s = ",".join(self.urls), protocol, float(timeout_s)
        self.sample_timeout_s = float(sample_timeout_s)
        self._long_clients = {}  # HTTP only: per replica, a client whose network timeout fits a whole sampling request
        self.policy = RetryPolicy(int(retries), float(backoff_s))
        self.tls = tls
        tls_options = client_options(protocol, tls)
        # HTTP: the replica the next request goes to; a random start (as gRPC's round_robin picks one), so clients
        # started together do not all send their first request to the first replica, and the next to the second
        self._turn = random.randrange(len(self.urls))
        if protocol == "http":
            import tritonclient.http as tc

            self._clients = [tc.InferenceServerClient(u, connection_timeout=timeout_s, network_timeout=timeout_s)
                             for u in self.urls]
        else:
            import tritonclient.grpc as tc

            target, channel_args = grpc_channel(self.urls)
            self._clients = [tc.InferenceServerClient(target, channel_args=channel_args, **tls_options)]
        self._tc = tc
        # gRPC calls take a deadline per call; HTTP ones use the connection/network timeouts set above.
        self._call_kw = {"client_timeout": self.timeout_s} if protocol == "grpc" else {}
        try:
            for tried in range(len(self._clients)):  # the handshake with the first replica that answers
                try:
                    self.server = self._connect(models)
                    break
                except ServerUnreachableError:
                    if tried == len(self._clients) - 1:
                        raise
                    self._turn += 1
        except BaseException:
            self.close()  # the constructor never returns: nobody else could close the connection
            raise

    @property
    def _client(self):
        """The client of the replica whose turn it is (gRPC: the one balanced channel)."""
        return self._clients[self._turn % len(self._clients)]
    def _connect(self, models) -> ServerInfo:
        url, kw = self.url, self._call_kw
        found = {"cards": {}, "specs": {}, "buckets": {}, "max_batch": {}}
        loops = {}
        try:
            live = self._client.is_server_live(**kw)
            ready = live and self._client.is_server_ready(**kw)
        except Exception as e:  # tritonclient raises several types for a refused connection
            raise ServerUnreachableError(url, f"{type(e).__name__}: {e}") from None
        if not ready:
            raise ServerUnreachableError(url, "the server answered but is not ready")
        try:
            served = self._repository_models()
            for graph in [m for m in models or KIND_OF_GRAPH if m not in LOOP_MODELS]:
                if graph not in served:
                    if models:
                        raise ModelNotReadyError(f"model {graph!r} is not in the server's repository at {url} "
                                                 f"(it has {sorted(served)})")
                    continue
                if not self._client.is_model_ready(graph, **kw):
                    raise ModelNotReadyError(f"model {graph!r} on {url} is not ready "
                                             f"({served[graph] or 'no state'}); see the server log")
                self._load_config(graph, found)
            for kind, names in DIFFUSION_MODELS.items():
                if models is None or names.loop in models:
                    loops[kind] = self._find_server_loop(served, kind, required=models is not None)
        except TridentError:
            raise
        except (ValueError, KeyError, TypeError) as e:  # includes json.JSONDecodeError and a bad card
            raise ModelNotReadyError(f"a model on {url} has an unreadable model card: {e}") from None
        except Exception as e:  # the server went away mid-handshake
            raise ServerUnreachableError(url, f"{type(e).__name__}: {e}") from None
        return ServerInfo(url, self.protocol, **found, loops=loops)

    def _repository_models(self) -> dict[str, str]:
        try:
            index = self._client.get_model_repository_index(**self._call_kw)
        except Exception as e:
            if not _restricted(e):
                raise
            # the repository API is locked (`trident serve` off loopback): ask for each model trident serves by name
            names = (*KIND_OF_GRAPH, *LOOP_MODELS)
            return {name: "READY" for name in names if self._client.is_model_ready(name, **self._call_kw)}
        if self.protocol == "grpc":
            return {m.name: m.state for m in index.models}
        return {m["name"]: m.get("state", "") for m in index}

    def _config(self, model: str) -> tuple[dict[str, str], int, ModelCard]:
        """(parameters, max_batch_size, card) of a served model's configuration."""
        cfg = self._client.get_model_config(model, **self._call_kw)
        if self.protocol == "grpc":
            cfg = cfg.config
            params = {k: v.string_value for k, v in cfg.parameters.items()}
            max_batch = cfg.max_batch_size
        else:
            params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
            max_batch = cfg.get("max_batch_size", 0)
        if CARD_PARAMETER not in params:
            raise ModelNotReadyError(f"model {model!r} has no {CARD_PARAMETER!r} parameter: not a trident model, or "
                                     "built by an older trident (rebuild it with `trident serve build`)")
        return params, int(max_batch), ModelCard.from_json(params[CARD_PARAMETER])

    def _load_config(self, graph: str, found: dict):
        _, max_batch, card = self._config(graph)
        found["cards"][card.kind] = card
        found["specs"][graph] = graph_spec_of(graph, card)
        found["buckets"][graph] = card.buckets.get(graph, ())
        found["max_batch"][graph] = max_batch or max(found["buckets"][graph] or (1,))

    def _find_server_loop(self, served: dict, kind: str, required: bool) -> LoopModels:
        """The sampling loop models of one diffusion model (kind: "diffusion", "diffusion_student"), or why there is
        none. Without them (or with a broken one) the client loop still works, so only a caller that asked for them by
        name (`models`) gets an error here; others learn why on loop='server'."""
        names = DIFFUSION_MODELS[kind]
        server_loop = stream_loop = None
        missing = f"the server at {self.url} does not serve {names.loop!r}"
        try:
            if names.loop not in served:
                raise ModelNotReadyError(f"the server at {self.url} has no {names.loop!r} model; rebuild its "
                                         "repository with `trident serve build` (without --no-server-loop)")
            if not self._client.is_model_ready(names.loop, **self._call_kw):
                raise ModelNotReadyError(f"model {names.loop!r} on {self.url} is not ready "
                                         f"({served[names.loop] or 'no state'}); see the server log")
            params, _, card = self._config(names.loop)
            server_loop = ServerLoop(graph_spec_of(names.loop, card), int(params[MAX_IMAGES_PARAMETER]))
            if names.stream in served and self._client.is_model_ready(names.stream, **self._call_kw):
                params, _, card = self._config(names.stream)
                stream_loop = ServerLoop(graph_spec_of(names.stream, card), int(params[MAX_IMAGES_PARAMETER]))
        except ModelNotReadyError as e:
            if required:
                raise
            missing = str(e)
        except (ValueError, KeyError, TypeError) as e:
            detail = f"{names.loop} on {self.url} has an unreadable model card: {e}"
            if required:
                raise ModelNotReadyError(detail) from None
            missing = detail
        return LoopModels(server_loop, stream_loop, missing)

    def _infer_once(self, graph: str, spec: GraphSpec, feed: dict[str, np.ndarray], batched: bool = True,
                    client=None, timeout_s: float | None = None) -> list[np.ndarray]:
        tc = self._tc
        client = client or self._client
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        inputs = infer_inputs(tc, self.protocol, spec, feed, batched)
        outputs = requested_outputs(tc, self.protocol, spec)
        if self.protocol == "http":
            res = client.infer(graph, inputs, outputs=outputs, timeout=int(timeout_s * 1e6))
        else:
            res = client.infer(graph, inputs, outputs=outputs, client_timeout=timeout_s)
        return [res.as_numpy(t.name) for t in spec.outputs]

    def run_loop(self, feed: dict[str, np.ndarray], on_step=None, model: str = "diffusion") -> np.ndarray:
        """One request to the sampling loop model (inputs as spec.loop_spec): the images, float32. With on_step, to
        the streaming one (see the Backend protocol).

        Each attempt waits up to sample_timeout_s. A replica that refuses the request, dies or shuts down during it
        costs a redo on another replica (RetryPolicy.redo_loop; the same images, the seed travels with the request);
        a streamed redo reports only the steps not reported yet (each_step_once)."""
        loop = self.require_server_loop(stream=on_step is not None, model=model)
        on_step = None if on_step is None else each_step_once(on_step)
        attempt, first = 0, None
        while True:
            try:
                return self._loop_once(loop, feed, on_step)
            except (SamplingCancelled, TridentError):
                raise
            except Exception as e:  # gRPC deadlines, the server's errors, HTTP socket timeouts, a server gone
                first = e if first is None else first
                if not self.policy.redo_loop(e, attempt):
                    e = self.policy.loop_gave_up(first, e)
                    error = loop_failure(e, self.url, loop.spec.name, self.sample_timeout_s)
                    raise (error or self._lost(loop.spec.name, e)) from None
            time.sleep(self.policy.delay(attempt))
            attempt += 1

    def _loop_once(self, loop: ServerLoop, feed: dict[str, np.ndarray], on_step) -> np.ndarray:
        if on_step is not None:
            return self._stream_loop(loop.spec, feed, on_step)
        client = self._client
        if self.protocol == "http":  # the HTTP client's network timeout is fixed per connection
            self._turn += 1
            url = self.urls[self._turn % len(self.urls)]
            if url not in self._long_clients:
                self._long_clients[url] = self._tc.InferenceServerClient(url, connection_timeout=self.timeout_s,
                                                                         network_timeout=self.sample_timeout_s)
            client = self._long_clients[url]
        return self._infer_once(loop.spec.name, loop.spec, feed, batched=False, client=client,
                                timeout_s=self.sample_timeout_s)[0]

    def _stream_loop(self, spec: GraphSpec, feed: dict[str, np.ndarray], on_step) -> np.ndarray:
        """gRPC bidirectional stream: one request, a response per step, the images last. Left early (a callback that
        says stop, a timeout), the stream is closed with cancel_requests=True, so the loop stops on the server too.
        Not after the last answer: a cancellation that crosses the final response left Triton 2.51 unable to unload
        the streaming model at shutdown (seen 1 run in 4 of a stopped server; 0 in 6 since)."""
        answers: queue.Queue = queue.Queue()
        self._client.start_stream(callback=lambda result, error: answers.put((result, error)),
                                  stream_timeout=self.sample_timeout_s)
        finished = False  # the server sent its last answer (images or error): nothing left to cancel
        try:
            self._client.async_stream_infer(spec.name, infer_inputs(self._tc, "grpc", spec, feed, batched=False))
            deadline = time.monotonic() + self.sample_timeout_s + self.timeout_s
            while True:
                try:
                    result, error = answers.get(timeout=STREAM_POLL_S)
                except queue.Empty:
                    if self._stream_ended() and answers.empty():  # ended cleanly (status OK) before the images
                        finished = True
                        raise ServerUnreachableError(self.url, f"{spec.name}: the stream ended before the images"
                                                     ) from None
                    if time.monotonic() > deadline:  # the stream's own deadline should have answered first
                        raise TimeoutError("the stream went silent") from None
                    continue
                if error is not None:
                    finished = True
                    raise error
                images, steps = stream_message(result, spec)
                finished = images is not None
                for step in steps:
                    on_step(*step)
                if finished:
                    return images
        finally:
            self._client.stop_stream(cancel_requests=not finished)

    def _stream_ended(self) -> bool:
        """The gRPC stream's reader has stopped: tritonclient calls back on every answer and on an error, but a stream
        that the other end closes cleanly just ends its reader thread (tritonclient.grpc._infer_stream)."""
        handler = getattr(getattr(self._client, "_stream", None), "_handler", None)
        return handler is not None and not handler.is_alive()

    def _server_live(self) -> bool:
        try:
            return bool(self._client.is_server_live(**self._call_kw))
        except Exception:
            return False

    def _lost(self, graph: str, e: Exception) -> TridentError:
        return lost(self.url, graph, e, self._server_live())

    def _infer(self, graph, spec, feed):
        """One request, retried as self.policy says; over HTTP each attempt goes to the next replica."""
        attempt = 0
        while True:
            self._turn += 1
            try:
                return self._infer_once(graph, spec, feed)
            except Exception as e:
                outcome = self.policy.outcome(e, attempt)
                if outcome != "retry":
                    live = self._server_live() if outcome == "lost" else None
                    raise failure(outcome, self.url, graph, e, live) from None
            time.sleep(self.policy.delay(attempt))
            attempt += 1

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if graph not in self.specs:
            raise ModelNotReadyError(f"model {graph!r} is not served at {self.url} (served: {sorted(self.specs)})")
        spec = self.specs[graph]
        n = check_inputs(spec, inputs)
        step = self.max_batch[graph]
        outs = [self._infer(graph, spec, {k: v[i:i + step] for k, v in inputs.items()}) for i in range(0, n, step)]
        return {t.name: np.concatenate([o[j] for o in outs]) for j, t in enumerate(spec.outputs)}

    def close(self):
        for client in (*getattr(self, "_clients", ()), *self._long_clients.values()):
            try:
                if client is not None:
                    client.close()
            except Exception:
                pass

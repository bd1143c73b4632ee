"""Where the networks run: three interchangeable backends behind one small interface.

    backend.metadata            client metadata per model kind: {"diffusion": {...}, "gan": {...}, "vae": {...}}
    backend.buckets[graph]      the static batch sizes a graph was exported at
    backend.run(graph, inputs)  {tensor name: array (N, ...)} -> {tensor name: array (N, ...)} for any N
    backend.close()

- OnnxRuntimeBackend: in-process ONNX Runtime over `trident export` folders (serving/ort_runner.py, as in Triton).
- TritonBackend: a Triton server over HTTP or gRPC; metadata comes from the models' configuration parameters.
- TorchBackend: the PyTorch modules from checkpoints (only where torch is installed).

All tensor names come from trident.serving.spec. No module here imports torch at import time.
"""
from __future__ import annotations

import json
import os
import random
import socket
import time
from pathlib import Path

import numpy as np

from .ort_runner import BucketRunner, plan_chunks  # noqa: F401  (plan_chunks: part of this module's API)
from .spec import GRAPHS_OF_KIND, KIND_OF_GRAPH, SAMPLER, GraphSpec, client_view, graph_spec_from_meta

METADATA_PARAMETER = "trident_metadata"  # Triton config parameter that holds the client metadata as JSON


class TridentError(RuntimeError):
    """Base class of the SDK's errors."""


class ServerUnreachableError(TridentError):
    def __init__(self, url: str, detail: str = ""):
        super().__init__(f"cannot reach a Triton server at {url}{': ' + detail if detail else ''}. "
                         f"Is it running? Start one with `trident serve` (or `trident demo`), or pass --url.")
        self.url = url


class ModelNotReadyError(TridentError):
    pass


class InvalidArgumentError(TridentError, ValueError):
    """An argument is out of range; raised before any request is sent."""


class InferenceError(TridentError):
    """The server answered a request with an error."""


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

class OnnxRuntimeBackend:
    """Sessions over one or more `trident export` folders: one ort_runner.BucketRunner per graph.

    precision "fp16" loads the fp16 graphs (for the CUDA provider). threads: intra-op threads of a whole call (None
    or 0: ONNX Runtime's default); row_shards: concurrent row shards on the CPU (0: one per core; 1: off).
    """

    name = "onnxruntime"

    def __init__(self, export_dirs, threads: int | None = None, providers: list[str] | None = None,
                 precision: str = "fp32", row_shards: int = 0):
        from .spec import load_export_metadata

        if isinstance(export_dirs, (str, os.PathLike)):
            export_dirs = [export_dirs]
        if precision not in ("fp32", "fp16"):
            raise InvalidArgumentError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
        if (threads or 0) < 0 or row_shards < 0:
            raise InvalidArgumentError(f"threads and row_shards must be >= 0 (0: automatic), got {threads}, {row_shards}")
        self.metadata, self.buckets, self.specs, self.runners = {}, {}, {}, {}
        try:
            for d in export_dirs:
                info = load_export_metadata(d)
                self.metadata[info["kind"]] = client_view(info)
                for graph, entry in info["graphs"].items():
                    files = entry[precision]
                    if not files:
                        raise InvalidArgumentError(f"{d}: no {precision} graphs for {graph}; re-export with --fp16")
                    self.specs[graph] = graph_spec_from_meta(graph, info)
                    self.runners[graph] = BucketRunner({int(b): Path(d) / f["file"] for b, f in files.items()},
                                                       threads=threads or 0, row_shards=row_shards,
                                                       providers=providers)
                    self.buckets[graph] = tuple(self.runners[graph].buckets)
        except BaseException:
            self.close()
            raise

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if graph not in self.runners:
            raise ModelNotReadyError(f"graph {graph!r} is not loaded; loaded: {sorted(self.runners)}")
        spec = self.specs[graph]
        check_inputs(spec, inputs)
        feed = {t.name: np.ascontiguousarray(inputs[t.name], dtype=t.np_dtype) for t in spec.inputs}
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
    return any(s in text or s in status for s in ("unavailable", "deadline", "timed out", "timeout",
                                                    "connection reset", "connection refused", "broken pipe",
                                                    "connection closed"))


def _model_gone(exc: Exception) -> bool:
    """A model found ready at connect is unknown now: the server is shutting down (Triton unloads every model on
    SIGTERM, answering "Request for unknown model: ... has no available versions") or an operator unloaded it."""
    text = str(exc).lower()
    return "unknown model" in text or "no available versions" in text


class TritonBackend:
    """A Triton server at `url` ("host:port"), protocol "http" or "grpc".

    On connect: checks the server is live and ready, every trident model it serves is ready, and reads each model's
    sampling metadata from its configuration parameters. Requests larger than a model's max_batch_size are split.
    Transient failures (timeouts, resets, 'unavailable') are retried `retries` times with exponential backoff.
    An HTTP backend belongs to the thread that made it (tritonclient.http runs on gevent); give each thread its own
    backend, or use gRPC.
    """

    name = "triton"

    def __init__(self, url: str = "127.0.0.1:8000", protocol: str = "http", timeout_s: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.2, models: tuple[str, ...] | None = None,
                 sample_timeout_s: float = 600.0):
        if protocol not in ("http", "grpc"):
            raise InvalidArgumentError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        self.url, self.protocol, self.timeout_s = url, protocol, float(timeout_s)
        self.sample_timeout_s = float(sample_timeout_s)
        self.sampler_loop: dict | None = None  # {"spec", "max_images"} when the server runs diffusion_sampler
        self.sampler_missing = f"the server at {url} does not serve {SAMPLER!r}"  # why sampler_loop is None
        self._long_client = None  # HTTP only: a client whose network timeout fits a whole sampling request
        self.retries, self.backoff_s = int(retries), float(backoff_s)
        if protocol == "http":
            import tritonclient.http as tc

            self._client = tc.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        else:
            import tritonclient.grpc as tc

            self._client = tc.InferenceServerClient(url)
        self._tc = tc
        # gRPC calls take a deadline per call; HTTP ones use the connection/network timeouts set above.
        self._call_kw = {"client_timeout": self.timeout_s} if protocol == "grpc" else {}
        self.metadata, self.buckets, self.specs, self.max_batch = {}, {}, {}, {}
        try:
            self._connect(models)
        except BaseException:
            self.close()  # the constructor never returns: nobody else could close the connection
            raise

    def _connect(self, models):
        url, kw = self.url, self._call_kw
        try:
            live = self._client.is_server_live(**kw)
            ready = live and self._client.is_server_ready(**kw)
        except Exception as e:  # tritonclient raises several types for a refused connection
            raise ServerUnreachableError(url, f"{type(e).__name__}: {e}") from None
        if not ready:
            raise ServerUnreachableError(url, "the server answered but is not ready")
        try:
            served = self._repository_models()
            for graph in [m for m in models or KIND_OF_GRAPH if m != SAMPLER]:
                if graph not in served:
                    if models:
                        raise ModelNotReadyError(f"model {graph!r} is not in the server's repository at {url} "
                                                 f"(it has {sorted(served)})")
                    continue
                if not self._client.is_model_ready(graph, **kw):
                    raise ModelNotReadyError(f"model {graph!r} on {url} is not ready "
                                             f"({served[graph] or 'no state'}); see the server log")
                self._load_config(graph)
            if models is None or SAMPLER in models:
                self._find_sampler(served, required=models is not None)
        except TridentError:
            raise
        except (ValueError, KeyError, TypeError) as e:  # includes json.JSONDecodeError
            raise ModelNotReadyError(f"a model on {url} has unreadable trident metadata: {e}") from None
        except Exception as e:  # the server went away mid-handshake
            raise ServerUnreachableError(url, f"{type(e).__name__}: {e}") from None

    def _repository_models(self) -> dict[str, str]:
        index = self._client.get_model_repository_index(**self._call_kw)
        if self.protocol == "grpc":
            return {m.name: m.state for m in index.models}
        return {m["name"]: m.get("state", "") for m in index}

    def _load_config(self, graph: str):
        cfg = self._client.get_model_config(graph, **self._call_kw)
        if self.protocol == "grpc":
            cfg = cfg.config
            params = {k: v.string_value for k, v in cfg.parameters.items()}
            max_batch = cfg.max_batch_size
        else:
            params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
            max_batch = cfg.get("max_batch_size", 0)
        if METADATA_PARAMETER not in params:
            raise ModelNotReadyError(f"model {graph!r} has no {METADATA_PARAMETER!r} parameter: not a trident model")
        info = json.loads(params[METADATA_PARAMETER])
        kind = KIND_OF_GRAPH[graph]
        self.metadata[kind] = client_view(info)
        self.specs[graph] = graph_spec_from_meta(graph, info)
        self.buckets[graph] = tuple(int(b) for b in info["graphs"][graph]["buckets"]) if "graphs" in info else ()
        self.max_batch[graph] = int(max_batch) or max(self.buckets[graph] or (1,))

    def _find_sampler(self, served: dict, required: bool):
        """Look for the server-side sampling loop. Without it (or with a broken one) the client loop still works, so
        only a caller that asked for it by name (`models`) gets an error here; others learn why on loop='server'."""
        try:
            if SAMPLER not in served:
                raise ModelNotReadyError(f"the server at {self.url} has no {SAMPLER!r} model; rebuild its repository "
                                         "with `trident serve build` (without --no-sampler)")
            if not self._client.is_model_ready(SAMPLER, **self._call_kw):
                raise ModelNotReadyError(f"model {SAMPLER!r} on {self.url} is not ready "
                                         f"({served[SAMPLER] or 'no state'}); see the server log")
            cfg = self._client.get_model_config(SAMPLER, **self._call_kw)
            if self.protocol == "grpc":
                params = {k: v.string_value for k, v in cfg.config.parameters.items()}
            else:
                params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
            info = json.loads(params[METADATA_PARAMETER])
            self.sampler_loop = {"spec": graph_spec_from_meta(SAMPLER, info),
                                 "max_images": int(params["trident_max_images"])}
        except ModelNotReadyError as e:
            if required:
                raise
            self.sampler_missing = str(e)
        except (ValueError, KeyError, TypeError) as e:
            if required:
                raise ModelNotReadyError(f"{SAMPLER} on {self.url} has unreadable trident metadata: {e}") from None
            self.sampler_missing = f"{SAMPLER} on {self.url} has unreadable trident metadata: {e}"

    def _infer_once(self, graph: str, spec: GraphSpec, feed: dict[str, np.ndarray], batched: bool = True,
                    client=None, timeout_s: float | None = None) -> list[np.ndarray]:
        tc = self._tc
        client = client or self._client
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
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
            if self.protocol == "http":
                inp.set_data_from_numpy(a, binary_data=True)
            else:
                inp.set_data_from_numpy(a)
            inputs.append(inp)
        if self.protocol == "http":
            outputs = [tc.InferRequestedOutput(t.name, binary_data=True) for t in spec.outputs]
            res = client.infer(graph, inputs, outputs=outputs, timeout=int(timeout_s * 1e6))
        else:
            outputs = [tc.InferRequestedOutput(t.name) for t in spec.outputs]
            res = client.infer(graph, inputs, outputs=outputs, client_timeout=timeout_s)
        return [res.as_numpy(t.name) for t in spec.outputs]

    def run_sampler(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """One request to the server-side sampling loop (inputs as spec.sampler_spec): the images, float32.

        Not retried (a retry would redo the whole loop); waits up to sample_timeout_s."""
        from tritonclient.utils import InferenceServerException

        if self.sampler_loop is None:
            raise ModelNotReadyError(self.sampler_missing)
        client = self._client
        if self.protocol == "http":  # the HTTP client's network timeout is fixed per connection
            if self._long_client is None:
                self._long_client = self._tc.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                                                   network_timeout=self.sample_timeout_s)
            client = self._long_client
        spec = self.sampler_loop["spec"]

        def timed_out(detail) -> InferenceError:
            return InferenceError(f"{SAMPLER}: no answer within sample_timeout_s={self.sample_timeout_s:g} s "
                                  f"({detail}); ask for fewer images or steps, or raise the timeout")

        try:
            return self._infer_once(SAMPLER, spec, feed, batched=False, client=client,
                                    timeout_s=self.sample_timeout_s)[0]
        except InferenceServerException as e:  # gRPC deadlines arrive here; so do the server's own errors
            if any(s in str(e).lower() for s in ("deadline", "timed out", "timeout")):
                raise timed_out(e.message()) from None
            if _is_transient(e) or _model_gone(e):
                raise self._lost(SAMPLER, e) from None
            raise InferenceError(f"{SAMPLER}: the server rejected the request: {e.message()}") from None
        except Exception as e:  # HTTP: socket.timeout / TimeoutError (or a wrapped one) from the network timeout
            text = f"{type(e).__name__}: {e}"
            if isinstance(e, (TimeoutError, socket.timeout)) or "timed out" in text.lower() \
                    or "timeout" in text.lower():
                raise timed_out(text) from None
            raise ServerUnreachableError(self.url, text) from None

    def _server_live(self) -> bool:
        try:
            return bool(self._client.is_server_live(**self._call_kw))
        except Exception:
            return False

    def _lost(self, graph: str, e: Exception) -> TridentError:
        """The error for a request that failed because the server or the model went away: ServerUnreachableError
        when the server no longer answers (killed, or shutting down), else ModelNotReadyError (unloaded)."""
        detail = e.message() if hasattr(e, "message") else f"{type(e).__name__}: {e}"
        if not self._server_live():
            return ServerUnreachableError(self.url, f"{graph}: {detail}")
        return ModelNotReadyError(f"model {graph!r} on {self.url} stopped serving: {detail}")

    def _infer(self, graph, spec, feed):
        from tritonclient.utils import InferenceServerException

        for attempt in range(self.retries + 1):
            try:
                return self._infer_once(graph, spec, feed)
            except InferenceServerException as e:
                gone = _is_transient(e) or _model_gone(e)
                if attempt == self.retries or not gone:
                    if gone:
                        raise self._lost(graph, e) from None
                    raise InferenceError(f"{graph}: the server rejected the request: {e.message()}") from None
            except Exception as e:
                if attempt == self.retries or not _is_transient(e):
                    raise ServerUnreachableError(self.url, f"{type(e).__name__}: {e}") from None
            time.sleep(self.backoff_s * 2 ** attempt * (1 + 0.1 * random.random()))

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if graph not in self.specs:
            raise ModelNotReadyError(f"model {graph!r} is not served at {self.url} (served: {sorted(self.specs)})")
        spec = self.specs[graph]
        n = check_inputs(spec, inputs)
        step = self.max_batch[graph]
        outs = [self._infer(graph, spec, {k: v[i:i + step] for k, v in inputs.items()}) for i in range(0, n, step)]
        return {t.name: np.concatenate([o[j] for o in outs]) for j, t in enumerate(spec.outputs)}

    def close(self):
        for client in (self._client, self._long_client):
            try:
                if client is not None:
                    client.close()
            except Exception:
                pass


# ----------------------------------------------------------------------------------------------------------------
# PyTorch (reference; needs torch)
# ----------------------------------------------------------------------------------------------------------------

class TorchBackend:
    """The PyTorch modules from `trident train` checkpoints, run eagerly in float32 on `device`."""

    name = "torch"

    def __init__(self, checkpoints, device: str = "cpu", threads: int | None = None):
        try:
            import torch
        except ImportError:
            raise TridentError("TorchBackend needs torch: pip install -e .[train]") from None
        from trident.export.onnx_export import client_metadata, graph_module
        from trident.training.checkpoint import load_model

        if isinstance(checkpoints, (str, os.PathLike)):
            checkpoints = [checkpoints]
        if threads:
            torch.set_num_threads(threads)
        self._torch, self.device = torch, torch.device(device)
        self.metadata, self.buckets, self.specs, self._modules = {}, {}, {}, {}
        for path in checkpoints:
            model, meta = load_model(path)
            info = client_metadata(meta)
            self.metadata[meta["kind"]] = info
            for graph in GRAPHS_OF_KIND.get(meta["kind"], ()):
                self.specs[graph] = graph_spec_from_meta(graph, info)
                self.buckets[graph] = ()
                self._modules[graph] = graph_module(graph, model).to(self.device)

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        spec = self.specs[graph]
        check_inputs(spec, inputs)
        args = [torch.from_numpy(np.ascontiguousarray(inputs[t.name], dtype=t.np_dtype)).to(self.device)
                for t in spec.inputs]
        with torch.inference_mode():
            out = self._modules[graph](*args)
        out = [out] if torch.is_tensor(out) else list(out)
        return {t.name: o.cpu().numpy() for t, o in zip(spec.outputs, out)}

    def close(self):
        self._modules.clear()

"""Static-batch ONNX Runtime execution: bucket chunks, zero padding and row-parallel shards.

One class, BucketRunner, runs N rows through graphs exported at fixed batch sizes ("buckets"). Both the in-process
backend (serving/client/backends.py) and the Triton Python-backend models (serving/server/runtime/) use it, so the two run
the same code. `trident serve build` copies this file next to the model's model.py; it therefore imports only os,
concurrent.futures, numpy and (when a runner is made) onnxruntime and ctypes, so the client SDK, and the container
flavour's front models (which run the chunks on other Triton models: run_in_buckets), use it without onnxruntime.

Chunks: the largest bucket while more rows remain than it holds, then the smallest bucket that holds the rest; the
last chunk is zero-padded (zero is a valid timestep, class label and latent, and every served network treats rows
independently, so padding never changes a real row) and the padding is dropped from the outputs.

Row shards (CPU): on a few cores, one single-threaded run per core on its own rows beats one run whose intra-op
threads share each operator: small convolutions split poorly across threads, while a single row has nothing to
split and runs faster with every thread (the measurements: benchmarks/results/optimizations.md, item 4). So a call
with two or more rows is split into
up to `row_shards` contiguous parts run concurrently on a second set of sessions with fewer threads each (one
session per bucket, run by several worker threads at once: ONNX Runtime sessions are thread-safe and release the
GIL), and a single row, or a split that would pad more rows than the whole call, runs on the whole-call sessions.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# The shared library of each GPU provider, in onnxruntime/capi/ of an onnxruntime-gpu install.
PROVIDER_LIBRARIES = {CUDA: "libonnxruntime_providers_cuda.so", "TensorrtExecutionProvider":
                      "libonnxruntime_providers_tensorrt.so"}


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def plan_chunks(n: int, buckets) -> list[tuple[int, int, int]]:
    """Split n rows into (start, stop, bucket) chunks: the largest bucket while rows exceed it, then the smallest
    bucket that fits the rest (padding fills bucket - (stop - start) rows)."""
    buckets = sorted(int(b) for b in buckets)
    chunks, start = [], 0
    while start < n:
        left = n - start
        bucket = next((b for b in buckets if b >= left), buckets[-1])
        stop = start + min(left, bucket)
        chunks.append((start, stop, bucket))
        start = stop
    return chunks


def run_in_buckets(feed: dict, buckets, run_bucket, start: int = 0, stop: int | None = None) -> list[np.ndarray]:
    """Rows [start, stop) of feed ({name: array (n, ...)}) through fixed-batch graphs, chunk by chunk (plan_chunks):
    run_bucket(bucket, {name: array (bucket, ...)}) -> [output (bucket, ...), ...]; the last chunk is zero-padded and
    its padding dropped. Returns the outputs of the real rows, in run_bucket's order. BucketRunner runs its sessions
    with this; the container flavour's front model (router_model.py) runs per-bucket Triton models."""
    stop = len(next(iter(feed.values()))) if stop is None else stop
    outs = None
    for a, b, bucket in plan_chunks(stop - start, buckets):
        part = {}
        for name, array in feed.items():
            rows = array[start + a:start + b]
            if b - a < bucket:
                rows = np.concatenate([rows, np.zeros((bucket - (b - a), *rows.shape[1:]), rows.dtype)])
            part[name] = rows
        results = run_bucket(bucket, part)
        outs = outs or [[] for _ in results]
        for k, out in enumerate(results):
            outs[k].append(out[:b - a])
    return [o[0] if len(o) == 1 else np.concatenate(o) for o in outs]


def padded_rows(n: int, buckets) -> int:
    """Rows actually computed for n rows (the real ones plus padding)."""
    return sum(bucket for _, _, bucket in plan_chunks(n, buckets))


def plan_shards(n: int, shards: int, buckets) -> list[tuple[int, int]]:
    """Contiguous (start, stop) row ranges to run concurrently, one per shard; [(0, n)] when splitting does not pay.

    Parts differ by at most one row. No split for a single row or shard, nor when the parts together would pad to
    more rows than the whole call (e.g. 40 rows over buckets up to 32: 32 + 8 whole, but 2 x 20 pads to 2 x 32).
    """
    k = min(int(shards), int(n))
    if k < 2:
        return [(0, n)]
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    if sum(padded_rows(s, buckets) for s in sizes) > padded_rows(n, buckets):
        return [(0, n)]
    bounds = np.cumsum([0, *sizes]).tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def execution_providers(device: str, device_id: int = 0) -> list:
    """ONNX Runtime providers for a served model's `execution_provider` parameter ("cpu" or "cuda").

    No quiet CPU fallback: asked for CUDA, an onnxruntime without the CUDA provider is a ValueError naming what is
    missing, and BucketRunner checks that the provider really loaded (ONNX Runtime itself only logs "Failed to create
    CUDAExecutionProvider" and runs on the CPU).
    """
    if device == "cpu":  # without importing onnxruntime: a model whose buckets all run on OpenVINO never loads it
        return [CPU]
    if device != "cuda":
        raise ValueError(f"execution provider must be 'cpu' or 'cuda', got {device!r}")
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        raise ValueError(provider_missing(CUDA, f"this onnxruntime {ort.__version__} is built without it (it has "
                                                f"{ort.get_available_providers()})"))
    return [(CUDA, {"device_id": int(device_id)}), CPU]


def _provider_name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def provider_missing(provider: str, why: str) -> str:
    """Why `provider` cannot run here, naming the shared library that is missing or does not load (its own error)."""
    import ctypes

    import onnxruntime as ort

    library = PROVIDER_LIBRARIES.get(provider, "")
    path = os.path.join(os.path.dirname(ort.__file__), "capi", library)
    if not library:
        detail = ""
    elif not os.path.isfile(path):
        detail = f"{library} is not in {os.path.dirname(path)} (the CPU-only onnxruntime package)"
    else:
        try:
            ctypes.CDLL(path)
            detail = f"{library} loads, so a CUDA driver or device is missing (see ONNX Runtime's log above)"
        except OSError as e:  # e.g. "libcublasLt.so.12: cannot open shared object file: No such file or directory"
            detail = f"{library} does not load: {e}"
    return (f"{provider} was requested but {why}{': ' + detail if detail else ''}. Install onnxruntime-gpu with the "
            "CUDA and cuDNN libraries it needs (pip install 'onnxruntime-gpu[cuda,cudnn]'), or build for the CPU "
            "(without --gpu); nothing falls back to the CPU quietly.")


def check_providers(session, providers) -> None:
    """Raise ValueError when the session does not run on the first provider asked for (ONNX Runtime skipped it)."""
    wanted = _provider_name(providers[0])
    got = session.get_providers()
    if not got or got[0] != wanted:
        raise ValueError(provider_missing(wanted, f"the session runs on {got}"))


_SHARED_ARENA = []  # the process-wide CPU arena, registered once (onnxruntime refuses a second registration)


def _shared_cpu_arena() -> None:
    """Register one CPU memory arena for the whole process. Each session otherwise keeps an arena of its own at the
    peak of its bucket's activations, for good; one shared arena holds the peak of one call at a time, at the same
    speed (benchmarks/results/optimizations.md, "Figures behind the code's comments")."""
    import onnxruntime as ort

    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # defaults: unlimited, doubling
        _SHARED_ARENA.append(info)


def session_options(threads: int, shared_arena: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads)  # 0: ONNX Runtime's default, one per physical core
    options.inter_op_num_threads = 1
    if shared_arena:  # CPU allocations from the process's one arena (_shared_cpu_arena)
        _shared_cpu_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    return options


# Engines a bucket can run on. "onnxruntime" runs the file as it is (fp32, fp16 or int8 QDQ graphs); the OpenVINO
# engines compile it for the CPU at an inference precision: f32, or bf16 (AVX512-BF16 / AMX hardware; OpenVINO keeps
# float32 I/O). An int8 QDQ graph runs int8 kernels on either runtime. serving/precision.py maps user-facing
# precisions ("openvino-bf16", "onnxruntime-int8", ...) to (file, engine) and chooses among them by measurement.
OPENVINO_PRECISION = {"openvino-f32": "f32", "openvino-bf16": "bf16"}  # engine -> OpenVINO's inference precision
ENGINES = ("onnxruntime", *OPENVINO_PRECISION)
_NP_OF_ORT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class _OpenVinoSession:
    """One OpenVINO compiled model behind the part of the onnxruntime.InferenceSession interface BucketRunner uses:
    run(output names, feed) and the inputs' (name, shape, dtype). An InferRequest is not thread-safe: one per call
    at a time (a lock), which matches how a Triton model instance calls it."""

    def __init__(self, path: str, precision: str, threads: int):
        import threading

        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        model = core.read_model(path)
        # The graph's own tensor names, read before compiling: the compiled model merges a tensor's names with those
        # of an op it removes (a timestep input feeding a float-to-float Cast is also "/Cast_output_0" under bf16),
        # and its get_any_name() may then answer the other one. Ports keep their order.
        input_names = [port.get_any_name() for port in model.inputs]
        output_names = [port.get_any_name() for port in model.outputs]
        self.compiled = core.compile_model(model, "CPU", config)
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()
        self._inputs = dict(zip(input_names, self.compiled.inputs))
        self._outputs = dict(zip(output_names, self.compiled.outputs))

    def inputs(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        return [(name, tuple(port.get_shape()), np.dtype(port.get_element_type().to_dtype()))
                for name, port in self._inputs.items()]

    def output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, names, feed: dict) -> list[np.ndarray]:
        with self._lock:
            result = self._request.infer(feed)
            return [np.array(result[self._outputs[name]]) for name in names]  # copies: the request's buffers are reused


class _OrtSession:
    def __init__(self, path: str, options, providers):
        import onnxruntime as ort

        self.session = ort.InferenceSession(path, options, providers=providers)
        check_providers(self.session, providers)  # a GPU that did not load is an error, not the CPU

    def inputs(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        return [(i.name, tuple(i.shape), np.dtype(_NP_OF_ORT[i.type])) for i in self.session.get_inputs()]

    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, names, feed: dict) -> list[np.ndarray]:
        return self.session.run(names, feed)


class _Sessions(dict):
    """{bucket: session}, each made on first use: a session that never runs costs no memory (a U-Net session's
    memory arena grows to its bucket's activations, tens of MB)."""

    def __init__(self, make, buckets):
        import threading

        super().__init__()
        self._make, self.buckets = make, tuple(buckets)
        self._lock = threading.Lock()  # row shards reach a new bucket at once: one session, not one per shard

    def __missing__(self, bucket):
        if bucket not in self.buckets:
            raise KeyError(bucket)
        with self._lock:
            if bucket not in self:
                super().__setitem__(bucket, self._make(bucket))
            return super().__getitem__(bucket)

    def all(self) -> "_Sessions":
        """Every session made."""
        for bucket in self.buckets:
            self[bucket]
        return self


class BucketRunner:
    """Sessions over one graph's bucket files; run() takes and returns any number of rows.

    files       {bucket: path of the ONNX file fixed to that batch size}
    threads     the CPU threads one call may use: intra-op threads of the whole-call sessions (0: ONNX Runtime's
                default, one per physical core, counted here as the available cores)
    row_shards  concurrent row shards (0: one per thread of `threads` on the CPU provider, 1 on any other provider,
                whose device runs one call at a time); shard sessions have max(1, threads // row_shards) threads.
                Only onnxruntime buckets are sharded (OpenVINO spreads one call over its threads itself).
    providers   ONNX Runtime execution providers (default CPU)
    engines     {bucket: one of ENGINES} (default: onnxruntime for every bucket)
    shard_limit the largest bucket a row shard runs (0: the largest bucket): a shard of more rows runs several
                chunks in turn. Rows in flight are what a call's activations cost, and on a CPU the rows per second
                of a conv net level off at some batch size, so a shard limit keeps the memory of the buckets above
                it (their sessions and their activations in the arena) where they buy no speed. The repository
                builder measures it on the serving machine (serving/precision.py: shard_trial).

    Sessions are made on first use; warm() makes and runs those that calls of each bucket's size use (what Triton's
    model_warmup sends), so that memory goes only to the sessions requests run.
    """

    def __init__(self, files: dict, *, threads: int = 0, row_shards: int = 0, providers=None,
                 engines: dict | None = None, shard_limit: int = 0):
        if not files:
            raise ValueError("no bucket files given")
        if int(threads) < 0 or int(row_shards) < 0:
            raise ValueError(f"threads and row_shards must be >= 0 (0: automatic), got {threads}, {row_shards}")
        if int(shard_limit) < 0:
            raise ValueError(f"shard_limit must be >= 0 (0: the largest bucket), got {shard_limit}")
        providers = list(providers or [CPU])
        cpu_only = all(_provider_name(p) == CPU for p in providers)
        budget = int(threads) or available_cores()
        files = {int(b): str(path) for b, path in files.items()}
        self.buckets = sorted(files)
        self.engines = {b: (engines or {}).get(b, "onnxruntime") for b in self.buckets}
        unknown = sorted({e for e in self.engines.values() if e not in ENGINES})
        if unknown:
            raise ValueError(f"unknown engines {unknown}; expected one of {ENGINES}")
        if not cpu_only and any(e != "onnxruntime" for e in self.engines.values()):
            raise ValueError("the OpenVINO engines run on the CPU; use onnxruntime with a GPU execution provider")
        # Each engine's library is loaded only where a bucket runs on it: a host whose buckets all run on OpenVINO
        # holds no onnxruntime (its import and arena), and one all on onnxruntime no openvino.
        ort_buckets = [b for b in self.buckets if self.engines[b] == "onnxruntime"]
        whole = session_options(threads, shared_arena=cpu_only) if ort_buckets else None
        self.sessions = _Sessions(lambda b: _OrtSession(files[b], whole, providers)
                                  if self.engines[b] == "onnxruntime"
                                  else _OpenVinoSession(files[b], OPENVINO_PRECISION[self.engines[b]], threads),
                                  self.buckets)
        self.output_names = self.sessions[self.buckets[0]].output_names()  # also checks the first file loads
        self.row_shards = (int(row_shards) or (budget if cpu_only else 1)) if ort_buckets else 1
        self.shard_limit = int(shard_limit)
        self.shard_sessions, self._pool = None, None
        if self.row_shards > 1:
            per_shard = session_options(max(1, budget // self.row_shards), shared_arena=cpu_only)
            self.shard_sessions = _Sessions(lambda b: _OrtSession(files[b], per_shard, providers), ort_buckets)
            self._pool = ThreadPoolExecutor(self.row_shards, thread_name_prefix="ort-shard")

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-item input shapes (without the batch axis), as the graphs see them."""
        return {name: shape[1:] for name, shape, _ in self.sessions[self.buckets[0]].inputs()}

    def warm(self, every: bool = False) -> None:
        """Run zeros (valid for every input) through the sessions that a call of each bucket's size uses, so those
        calls pay no session's first-run cost; every=True: make and run every session (a call of an unusual size,
        say 40 rows over buckets up to 32, otherwise makes its sessions on first use)."""
        first = self.sessions[self.buckets[0]]
        zeros = {name: (shape[1:], dtype) for name, shape, dtype in first.inputs()}
        for n in self.buckets:
            self.run({name: np.zeros((n, *shape), dtype) for name, (shape, dtype) in zeros.items()})
        if every:
            for sessions in (self.sessions, self.shard_sessions):
                for bucket, session in (sessions.all() if sessions is not None else {}).items():
                    session.run(self.output_names, {name: np.zeros((bucket, *shape), dtype)
                                                    for name, (shape, dtype) in zeros.items()})

    def _run_rows(self, sessions: dict, feed: dict, start: int, stop: int, buckets=None) -> list[np.ndarray]:
        return run_in_buckets(feed, buckets or self.buckets,
                              lambda bucket, part: sessions[bucket].run(self.output_names, part), start, stop)

    def _shards(self, n: int) -> tuple[list[tuple[int, int]], list[int]]:
        """Row shards for n rows, and the buckets they run: only where the whole call would run on onnxruntime
        buckets alone (a bucket chosen for another engine was chosen because it beat onnxruntime, sharded or not, at
        that size)."""
        if self._pool is None or any(self.engines[b] != "onnxruntime" for _, _, b in plan_chunks(n, self.buckets)):
            return [(0, n)], self.buckets
        buckets = self.shard_buckets()
        shards = plan_shards(n, self.row_shards, buckets)
        parts = [bucket for a, b in shards for _, _, bucket in plan_chunks(b - a, buckets)]
        return (shards, buckets) if all(self.engines[b] == "onnxruntime" for b in parts) else ([(0, n)], self.buckets)

    def shard_buckets(self) -> list[int]:
        """The buckets a row shard runs: the onnxruntime buckets up to shard_limit (at least the smallest)."""
        ort_buckets = sorted(self.shard_sessions.buckets) if self.shard_sessions is not None else []
        limit = self.shard_limit or (ort_buckets[-1] if ort_buckets else 0)
        return [b for b in ort_buckets if b <= limit] or ort_buckets[:1]

    def run(self, feed: dict) -> dict[str, np.ndarray]:
        """{input name: array (n, ...)} in the graph's dtypes -> {output name: array (n, ...)}, n >= 1."""
        if not self.sessions:
            raise RuntimeError("this BucketRunner is closed")
        n = len(next(iter(feed.values())))
        if n < 1:
            raise ValueError("run needs at least one row")
        shards, buckets = self._shards(n)
        if len(shards) == 1:
            outs = self._run_rows(self.sessions, feed, 0, n)
        else:
            futures = [self._pool.submit(self._run_rows, self.shard_sessions, feed, a, b, buckets) for a, b in shards]
            parts = [f.result() for f in futures]
            outs = [np.concatenate([p[k] for p in parts]) for k in range(len(self.output_names))]
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.sessions, self.shard_sessions = {}, None

"""Session fixtures of the latency benchmarks: the shipped checkpoints exported once (cached under .trident/exports),
one model repository and one embedded Triton server for the whole session (the distilled student served beside the
teacher where its checkpoint exists), and a client per backend.

Every backend gets the same intra-op thread count (settings.threads): torch, the in-process ONNX Runtime sessions,
the Triton model instances and the matmul peak. Kinds whose checkpoint is missing are skipped with a message.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import pytest

from trident.benchmarks import settings as bench_settings
from trident.benchmarks.common import graph_buckets, require, warm
from trident.benchmarks.settings import KINDS, STUDENT, BenchSettings
from trident.serving.files import file_sha256
from trident.serving.spec import UNET, load_export_metadata

_SETTINGS = pytest.StashKey[BenchSettings]()
_LOAD_AT_START = pytest.StashKey[tuple]()
SMOKE_MAX_TIME_S = 0.1  # a --benchmark-max-time below this (as `make bench-smoke` passes) means a smoke run


def settings_of(config) -> BenchSettings:
    if _SETTINGS not in config.stash:
        smoke = None
        if "TRIDENT_BENCH_SMOKE" not in os.environ:
            max_time = config.getoption("benchmark_max_time", default=1.0)
            smoke = True if max_time is not None and float(max_time) < SMOKE_MAX_TIME_S else None
        config.stash[_SETTINGS] = bench_settings.from_env(smoke=smoke)
    return config.stash[_SETTINGS]


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", str(settings_of(config).threads))  # tritonserver inherits it
    config.stash[_LOAD_AT_START] = os.getloadavg()
    config.addinivalue_line("markers", "cuda_only: GPU path only; deselected unless TRIDENT_BENCH_DEVICE=cuda")


def pytest_collection_modifyitems(config, items):
    if settings_of(config).device == "cuda":
        return
    gpu_only = [item for item in items if item.get_closest_marker("cuda_only")]
    if gpu_only:
        config.hook.pytest_deselected(items=gpu_only)
        items[:] = [item for item in items if not item.get_closest_marker("cuda_only")]


# ----------------------------------------------------------------------------------------------------------------
# Parameters known at collection time
# ----------------------------------------------------------------------------------------------------------------

def pytest_generate_tests(metafunc):
    s = settings_of(metafunc.config)
    params = {
        "bucket": (graph_buckets(s, UNET), lambda b: f"b{b}"),
        "cfg_batch": (s.cfg_batches, lambda b: f"B{b}"),
        "loop_batch": (s.loop_batches, lambda b: f"B{b}"),
        "served_images": (tuple(sorted({1, s.sample_batch})), lambda b: f"B{b}"),
        "sampler_run": (s.sampler_runs, lambda r: f"{r[0]}-{r[1]}"),
        "clients": (s.concurrency, lambda c: f"{c}clients"),
        "oneshot_batch": (s.oneshot_batches, lambda b: f"B{b}"),
        "peak_size": (s.peak_sizes, lambda n: f"n{n}"),
    }
    for name, (values, ident) in params.items():
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, values, ids=[ident(v) for v in values])


# ----------------------------------------------------------------------------------------------------------------
# Machine description stored in the JSON (the report states it)
# ----------------------------------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def _sha12(path: Path) -> str:
    return file_sha256(path)[:12]


def pytest_benchmark_update_machine_info(config, machine_info):
    s = settings_of(config)
    ckpts = {kind: s.checkpoints / kind / "model.safetensors" for kind in (*KINDS, STUDENT)}
    machine_info["trident"] = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "gpu": _gpu_name() if s.device == "cuda" else None,
        "load_average_at_start": list(config.stash.get(_LOAD_AT_START, ())),
        "load_average_at_end": list(os.getloadavg()),
        "settings": s.to_dict(),
        "checkpoints": {kind: (_sha12(p) if p.is_file() else None) for kind, p in ckpts.items()},
        "versions": {d: _version(d) for d in ("torch", "onnxruntime", "onnxruntime-gpu", "tritonclient",
                                              "nvidia-pytriton", "diffusers", "numpy", "pytest-benchmark")},
    }


# ----------------------------------------------------------------------------------------------------------------
# Models, exports, repository, server, clients
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def settings(pytestconfig) -> BenchSettings:
    return settings_of(pytestconfig)


@pytest.fixture(scope="session")
def checkpoints(settings) -> dict[str, Path]:
    """kind -> model.safetensors, for the kinds whose checkpoint exists."""
    found = {kind: settings.checkpoints / kind / "model.safetensors" for kind in KINDS}
    return {kind: path for kind, path in found.items() if path.is_file()}


@pytest.fixture(scope="session")
def exports(settings, checkpoints) -> dict[str, Path]:
    """kind -> export folder: TRIDENT_BENCH_EXPORTS, else each checkpoint exported once (cached by its sha256)."""
    if settings.exports:  # the student's, if given, is the student_export fixture's (served, not in-process)
        given = {load_export_metadata(d)["card"]["kind"]: Path(d) for d in settings.exports}
        return {kind: d for kind, d in given.items() if kind != STUDENT}
    from trident.export.build import ensure_export

    if not checkpoints:
        pytest.skip(f"no checkpoints under {settings.checkpoints}; nothing to benchmark")
    return {kind: ensure_export(path, settings.work / "exports", kind, buckets=settings.buckets,
                                fp16=settings.fp16) for kind, path in checkpoints.items()}


@pytest.fixture(scope="session")
def student_export(settings) -> Path | None:
    """The distilled student's export (issue 19), which the session's server serves beside the teacher: the one of
    kind diffusion_student in TRIDENT_BENCH_EXPORTS, else <checkpoints>/diffusion_student/model.safetensors exported
    once (cached like the others); None where there is neither (item 9 is then skipped)."""
    if settings.exports:
        return next((Path(d) for d in settings.exports if load_export_metadata(d)["card"]["kind"] == STUDENT), None)
    checkpoint = settings.checkpoints / STUDENT / "model.safetensors"
    if not checkpoint.is_file():
        return None
    from trident.export.build import ensure_export

    return ensure_export(checkpoint, settings.work / "exports", STUDENT, buckets=settings.buckets, fp16=settings.fp16)


CUDA_FALLBACK_LOG = ("CUDA execution provider was requested but", "Failed to create CUDAExecutionProvider")


@pytest.fixture(scope="session")
def server(settings, exports, student_export, tmp_path_factory):
    """One embedded Triton server over a repository of every export (the student's too), for the whole session."""
    from trident.serving.server.repository import build_repository
    from trident.serving.server.launcher import ServerConfig, TritonServer

    root = tmp_path_factory.mktemp("triton")
    repository = root / "model_repository"
    served = [*exports.values(), *([student_export] if student_export else [])]
    build_repository(served, repository, gpu=settings.device == "cuda", fp16=settings.fp16,
                     intra_op_threads=settings.threads)
    config = ServerConfig(repository, http_port=0, grpc_port=0, metrics_port=0, log_file=root / "tritonserver.log",
                          startup_timeout_s=300.0)
    with TritonServer(config) as srv:
        if settings.device == "cuda":  # model.py falls back to the CPU with a warning; here that is a failure
            bad = [line for line in srv.log_text().splitlines() if any(m in line for m in CUDA_FALLBACK_LOG)]
            if bad:
                pytest.fail("Triton's models are not on the GPU:\n" + "\n".join(bad[:5]) + f"\nlog: {srv.log_path}",
                            pytrace=False)
        yield srv


@pytest.fixture(scope="session")
def triton_clients(server, settings):
    """protocol -> TridentClient over the session's server."""
    from trident.serving.client import TridentClient

    clients = {"http": TridentClient.connect(server.http_url, "http"),
               "grpc": TridentClient.connect(server.grpc_url, "grpc")}
    yield clients
    for c in clients.values():
        c.close()


@pytest.fixture(scope="session")
def triton(triton_clients, settings):
    """The Triton client of the protocol the sampling items use (TRIDENT_BENCH_PROTOCOL)."""
    return triton_clients[settings.protocol]


@pytest.fixture(scope="session")
def ort_client(settings, exports):
    """In-process ONNX Runtime over the same exports (CUDA provider and fp16 graphs on the GPU path)."""
    from trident.serving.client import TridentClient

    providers = None
    if settings.device == "cuda":
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels (onnxruntime-gpu >= 1.21)
            ort.preload_dlls()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    # a CUDA provider that does not load fails here (ort_runner refuses a silent CPU fallback)
    client = TridentClient.from_onnx(list(exports.values()), threads=settings.threads, providers=providers,
                                     precision="fp16" if settings.fp16 else "fp32")
    warm(client)
    yield client
    client.close()


@pytest.fixture(scope="session")
def ort_whole_client(settings, exports):
    """In-process ONNX Runtime with row shards off (row_shards=1): every call on one multi-threaded session, as
    before row shards were added; the step item reports the ratio against the default."""
    from trident.serving.client import TridentClient

    if settings.device == "cuda":
        pytest.skip("row shards are a CPU setting (one shard on the GPU)")
    client = TridentClient.from_onnx(list(exports.values()), threads=settings.threads, row_shards=1)
    warm(client)
    yield client
    client.close()


@pytest.fixture(scope="session")
def torch_client(settings, checkpoints):
    """PyTorch eager over the checkpoints, fp32 (on cuda with TRIDENT_BENCH_DEVICE=cuda)."""
    import torch

    from trident.serving.client import TridentClient

    if settings.device == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} has no CUDA here: PyTorch eager and the diffusers peer are skipped "
                    "on the GPU path; install a CUDA build of torch to measure them")
    client = TridentClient.from_torch(list(checkpoints.values()), device=settings.device, threads=settings.threads)
    yield client
    client.close()


@pytest.fixture(scope="session")
def unet_module(torch_client):
    """The torch U-Net of the diffusion checkpoint, on the benchmark's device (the module TorchBackend runs)."""
    return torch_client.backend._modules[UNET]


@pytest.fixture(scope="session")
def unet_flops(checkpoints):
    """FLOPs of one U-Net forward at N rows, counted once per N with torch's FlopCounterMode on the CPU (matmul,
    conv and attention products; 2 FLOPs per multiply-add; norms and activations are not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from trident.training.checkpoint import load_model

    require(checkpoints, "diffusion")
    unet, _ = load_model(checkpoints["diffusion"], "diffusion")
    c = unet.config
    cache: dict[int, int] = {}

    def count(n: int) -> int:
        if n not in cache:
            args = (torch.zeros(n, c.in_channels, c.image_size, c.image_size), torch.zeros(n),
                    torch.zeros(n, dtype=torch.int64))
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                unet(*args)
            cache[n] = int(counter.get_total_flops())
        return cache[n]

    return count

"""6. Precision: the U-Net step per bucket on every CPU runtime and precision (serving/precision.py), the peers a
user would pick instead (ONNX Runtime fp32 in one session, OpenVINO fp32, torch.compile), what `--precision auto`
chose on this machine; served DPM-Solver++-20 from an `auto` repository against the fp32 one; and the resident
memory of every served model after the benchmarks' traffic."""
from __future__ import annotations

import json

import re
from pathlib import Path

import numpy as np
import pytest

from trident.benchmarks.common import class_labels, require, rounds, step_inputs
from trident.serving import precision
from trident.serving.manifest import load_export
from trident.serving.spec import UNET, load_export_metadata

# backend -> (variant, engine note) of the step rows; "ort-session" is ONNX Runtime fp32 in one session (no row
# shards): the baseline the step targets are stated against.
STEP_VARIANTS = ("ort-session", *precision.CPU_VARIANTS, "auto", "torch-compile")
CPU = precision.cpu_info()


def _gate(settings):
    """The quality gate `auto` reads; none in a smoke run (only the fp32 runtimes are tried: a shorter trial)."""
    return None if settings.smoke else settings.quality_gate


def _runner(settings, exports, backend, records):
    from trident.serving.ort_runner import BucketRunner

    directory = exports["diffusion"]
    export = load_export(directory)
    entry = export.graphs[UNET]
    if backend == "auto":
        record = records.setdefault("auto", precision.choose(export, UNET, "auto", gate_file=_gate(settings),
                                                             threads=settings.threads))
        choice = {int(b): v for b, v in record["choice"].items()}
    else:
        variant = precision.REFERENCE if backend == "ort-session" else backend
        choice = dict.fromkeys(entry.buckets, variant)
    files = {b: directory / entry.file(v, b).file for b, v in choice.items()}
    runner = BucketRunner(files, threads=settings.threads, row_shards=1 if backend == "ort-session" else 0,
                          engines={b: precision.VARIANTS[v].engine for b, v in choice.items()})
    return runner, choice


@pytest.fixture(scope="module")
def auto_records():
    return {}


@pytest.mark.parametrize("backend", STEP_VARIANTS)
def test_precision_step(benchmark, request, settings, exports, checkpoints, unet_flops, auto_records, backend,
                        bucket):
    require(exports, "diffusion")
    if settings.device != "cpu":
        pytest.skip("the precision rows are the CPU runtimes")
    if precision.not_native(backend, CPU):
        pytest.skip(f"{backend}: {precision.not_native(backend, CPU)} (flags {CPU['flags']})")
    entry = load_export_metadata(exports["diffusion"])["graphs"][UNET]
    if str(bucket) not in entry["fp32"]:
        pytest.skip(f"bucket {bucket} is not exported")
    # the export's held-out real inputs at this bucket: what the output check runs (the timed noise rows are not
    # what the model sees in use: int8's calibrated ranges clip them)
    parity = precision.load_parity(load_export(exports["diffusion"]), UNET)
    real = {name: rows[np.arange(bucket) % len(rows)] for name, rows in parity.items()}
    variant = "torch" if backend == "torch-compile" else (precision.REFERENCE if backend == "ort-session" else None)
    if backend == "torch-compile":
        if settings.smoke:
            pytest.skip("torch.compile takes minutes to compile: not in a smoke run")
        import torch

        module = request.getfixturevalue("unet_module")
        compiled = torch.compile(module)
        torch.set_num_threads(settings.threads)
        spec = request.getfixturevalue("ort_client").backend.specs[UNET]
        inputs = step_inputs(spec, bucket)
        args = [torch.from_numpy(inputs[t.name]) for t in spec.inputs]

        def run(args=args):
            with torch.inference_mode():
                return compiled(*args)

        run()  # compiles
        out = run([torch.from_numpy(real[t.name]) for t in spec.inputs]).numpy()
        fn, precision_name, choice = run, "fp32", None
    else:
        runner, choice = _runner(settings, exports, backend, auto_records)
        spec = request.getfixturevalue("ort_client").backend.specs[UNET]
        inputs = step_inputs(spec, bucket)
        runner.run(inputs)
        out = runner.run(real)[spec.outputs[0].name]
        variant = variant or choice[bucket]
        precision_name = precision.precision_of(variant)
        fn = lambda: runner.run(inputs)  # noqa: E731
    # a fast but wrong variant is no win: its output against onnxruntime-fp32's on the same rows, within its bound
    reference = request.getfixturevalue("ort_client").backend.run(UNET, real)[spec.outputs[0].name]
    err = float(np.max(np.abs(out.astype(np.float64) - reference)))
    assert err <= precision.PARITY_TOLERANCE[precision_name], (backend, bucket, err)
    benchmark.group = f"precision-b{bucket:02d}"
    benchmark.extra_info.update(item="precision", backend=backend, bucket=bucket, variant=variant,
                                precision=precision_name, flops=unet_flops(bucket), cpu=precision.cpu_info(),
                                max_abs_err=err)
    if backend == "auto":
        benchmark.extra_info.update(choice={str(b): v for b, v in choice.items()})
    benchmark(fn)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_peak_matmul_reduced(benchmark, settings, dtype, peak_size):
    """The matching peaks of the precision rows: a torch bf16 GEMM (AMX / AVX512-BF16) and int8 GEMM."""
    import torch

    if settings.device != "cpu":
        pytest.skip("CPU peaks")
    torch.set_num_threads(settings.threads)
    n = peak_size
    if dtype == "bf16":
        a, b = (torch.randn(n, n, dtype=torch.bfloat16) for _ in range(2))
        fn = lambda: torch.mm(a, b)  # noqa: E731
    else:
        if not hasattr(torch, "_int_mm"):
            pytest.skip("this torch has no int8 GEMM (torch._int_mm)")
        a, b = (torch.randint(-128, 127, (n, n), dtype=torch.int8) for _ in range(2))
        fn = lambda: torch._int_mm(a, b)  # noqa: E731
        try:
            fn()
        except RuntimeError as e:
            pytest.skip(f"torch._int_mm does not run here: {e}")
    benchmark.group = "peak-matmul"
    benchmark.extra_info.update(item="peak", impl=f"torch-{dtype}", n=n, flops=2 * n ** 3, threads=settings.threads,
                                dtype={"bf16": "bfloat16", "int8": "int8"}[dtype], device="cpu")
    benchmark.pedantic(fn, rounds=settings.peak_repeats, warmup_rounds=1)


# ----------------------------------------------------------------------------------------------------------------
# Served: an `auto` repository against the fp32 one, DPM-Solver++-20, client loop over gRPC
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auto_server(settings, exports, tmp_path_factory):
    from trident.serving.server.launcher import ServerConfig, TritonServer
    from trident.serving.server.repository import MARKER, build_repository

    if settings.device != "cpu":
        pytest.skip("--precision auto chooses among the CPU runtimes")
    root = tmp_path_factory.mktemp("triton-auto")
    repository = root / "model_repository"
    build_repository(list(exports.values()), repository, intra_op_threads=settings.threads, precision_choice="auto",
                     quality_gate=_gate(settings))
    config = ServerConfig(repository, http_port=0, grpc_port=0, metrics_port=0, log_file=root / "tritonserver.log",
                          startup_timeout_s=300.0)
    with TritonServer(config) as srv:
        # what auto chose here is in each model's generated file (the marker says "auto")
        from trident.serving.graph_runtime import MEASURED_FILE

        srv.marker = json.dumps({**json.loads((repository / MARKER).read_text()), "measured": {
            p.parent.parent.name: json.loads(p.read_text()) for p in sorted(repository.glob(f"*/1/{MEASURED_FILE}"))}})
        yield srv


@pytest.mark.parametrize("repo", ["fp32", "auto"])
def test_served_precision(benchmark, request, settings, exports, repo, served_images):
    images = served_images  # B=1 and the sampling items' B (8)
    require(exports, "diffusion")
    from trident.serving.client import TridentClient

    if repo == "fp32":
        server = request.getfixturevalue("server")
    else:
        server = request.getfixturevalue("auto_server")
    labels = class_labels(images)
    steps = settings.peer_steps
    with TridentClient.connect(server.grpc_url, "grpc") as client:
        def draw():
            return client.sample(classes=labels, sampler="dpmpp-2m", steps=steps, guidance=settings.guidance,
                                 seed=0, raw=True)

        first = draw()  # warms the connection
        # a fast but wrong repository is no win: its images against the in-process fp32 draw of the same seeds
        # (fp32: equal but for bucket layouts; auto: trajectories drift a little through int8, as in
        # tests/test_precision.py's brief quality gate, but stay close)
        if settings.device == "cpu":
            want = request.getfixturevalue("ort_client").sample(classes=labels, sampler="dpmpp-2m", steps=steps,
                                                                guidance=settings.guidance, seed=0, raw=True)
            diff = float(np.mean(np.abs(first - want)))
            assert diff < (1e-4 if repo == "fp32" else 0.1), (repo, diff)
        benchmark.group = f"precision-served-B{images:02d}"
        benchmark.extra_info.update(item="precision-e2e", repo=repo, sampler="dpmpp-2m", steps=steps, images=images)
        out = benchmark.pedantic(draw, rounds=rounds(settings, settings.sample_rounds), iterations=1)
    assert out.shape[0] == images and np.all(np.isfinite(out))


def stub_memory_mb(server_pid: int) -> dict[str, float]:
    """Resident memory (VmRSS, MB) of each Triton Python-backend stub of this server, by model name."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            status = (proc / "status").read_text()
        except (OSError, ValueError, IndexError):
            continue
        if parent == server_pid and cmd and b"triton_python_backend_stub" in cmd[0] and len(cmd) > 1:
            model = Path(cmd[1].decode()).parent.parent.name
            out[model] = out.get(model, 0.0) + int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    return out


@pytest.mark.parametrize("state", ["fp32 after warm-up", "fp32 after traffic", "auto after traffic"])
def test_served_memory(benchmark, request, settings, exports, state):
    """What each served model holds: a fresh server on the suite's fp32 repository, read once its models are ready
    (after Triton's warm-up requests); and the suite's two servers, read after the benchmarks above (the fp32 one
    after the CFG, concurrency, peer and GAN/VAE items too: larger calls grow the memory they keep; the auto one after
    one request to each of its loop models too, so that every U-Net host has run)."""
    from trident.serving.server.launcher import ServerConfig, TritonServer

    require(exports, "diffusion")
    repo = state.split()[0]
    server = request.getfixturevalue("server" if repo == "fp32" else "auto_server")
    benchmark.group = "memory"
    if state.endswith("warm-up"):
        fresh = ServerConfig(Path(server.config.model_repository), http_port=0, grpc_port=0, metrics_port=0,
                             startup_timeout_s=300.0)
        with TritonServer(fresh) as srv:
            memory = benchmark.pedantic(stub_memory_mb, args=(srv.pid,), rounds=1, iterations=1)
    else:
        if repo == "auto":  # the auto server's traffic above is the client loop: run its two loop models once too
            from trident.serving.client import TridentClient

            with TridentClient.connect(server.grpc_url, "grpc") as client:
                for stream in (False, True):  # a callback streams (diffusion_sampler_stream)
                    client.sample(classes=class_labels(settings.sample_batch), sampler="dpmpp-2m", steps=2,
                                  guidance=settings.guidance, seed=0, raw=True, loop="server",
                                  callback=(lambda *a: True) if stream else None)
        memory = benchmark.pedantic(stub_memory_mb, args=(server.pid,), rounds=1, iterations=1)
    assert memory, "no Python-backend stub found under the server process"
    benchmark.extra_info.update(item="memory", repo=state, resident_mb={k: round(v, 1) for k, v in memory.items()})
    if repo == "auto":
        benchmark.extra_info["marker"] = server.marker

"""Helpers shared by the benchmark modules: inputs, skips, timing on the GPU, percentiles."""
from __future__ import annotations

import numpy as np
import pytest

from trident.benchmarks.settings import BenchSettings
from trident.serving.spec import DECODER, DEFAULT_BUCKETS, GENERATOR, load_export_metadata

ONESHOT_GRAPH = {"gan": GENERATOR, "vae": DECODER}


def graph_buckets(s: BenchSettings, graph: str) -> tuple[int, ...]:
    """The buckets a graph is exported at in this run (from the given exports, else the settings)."""
    for directory in s.exports:
        try:
            info = load_export_metadata(directory)
        except Exception:
            continue
        if graph in info.get("graphs", {}):
            return tuple(sorted(int(b) for b in info["graphs"][graph]["buckets"]))
    return s.buckets or DEFAULT_BUCKETS[graph]


def require(kinds, kind: str) -> None:
    """Skip the calling benchmark, saying what to do, when `kind` has no checkpoint (or export)."""
    if kind not in kinds:
        pytest.skip(f"no {kind} model: {kind}/model.safetensors is missing under the checkpoints folder "
                    f"(TRIDENT_BENCH_CHECKPOINTS); train it with `trident train {kind}` or copy the shipped one")


def step_inputs(spec, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic valid inputs of a graph at n rows: noise images/latents, timesteps spread over [0, 1000),
    class labels cycling over 0..9 (valid for every model here)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in spec.inputs:
        if t.name == "timestep":
            out[t.name] = np.linspace(999, 0, n).astype(np.float32)
        elif t.np_dtype.kind in "iu":
            out[t.name] = (np.arange(n) % 10).astype(t.np_dtype)
        else:
            out[t.name] = rng.standard_normal(t.batched(n)).astype(t.np_dtype)
    return out


def buckets_run(rows: int, buckets, max_batch: int) -> list[int]:
    """The static batches one request of `rows` rows executes: the client splits at max_batch_size, then the model
    runs each part in buckets (serving.backends.plan_chunks), padding the last one."""
    from trident.serving.client.backends import plan_chunks

    return [b for i in range(0, rows, max_batch) for _, _, b in plan_chunks(min(max_batch, rows - i), buckets)]


def class_labels(n: int) -> list[int]:
    return [i % 10 for i in range(n)]


def warm(client) -> None:
    """One call per bucket of every graph, so first-run allocations stay out of the timings."""
    backend = client.backend
    for graph, spec in backend.specs.items():
        for n in backend.buckets.get(graph) or (1,):
            backend.run(graph, step_inputs(spec, n))


def cuda_sync(settings: BenchSettings):
    """A callable that waits for queued GPU work (a no-op on CPU), for timing torch on cuda."""
    if settings.device != "cuda":
        return lambda: None
    import torch

    return torch.cuda.synchronize


def percentiles_ms(seconds) -> dict[str, float | None]:
    """p50/p90/p99 (linear interpolation) and mean of a list of durations, in milliseconds."""
    if not len(seconds):
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "mean_ms": None, "count": 0}
    a = 1e3 * np.asarray(seconds, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(a.mean()),
            "count": int(a.size)}


def rounds(settings: BenchSettings, full: int) -> int:
    """Rounds of a pedantic benchmark: `full`, or one in a smoke run."""
    return 1 if settings.smoke else full

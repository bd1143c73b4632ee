"""Runtimes and precisions as one choice, made per bucket by measurement on the machine that serves.

A *variant* is a runtime and a precision: which exported file a bucket runs, and on which ort_runner engine.

    onnxruntime-fp32   the fp32 graph on ONNX Runtime (row-sharded on the CPU): today's default, the reference
    onnxruntime-fp16   the fp16 graph (the GPU path; `--gpu --fp16`)
    onnxruntime-int8   the int8 QDQ graph (export/quantize.py) on ONNX Runtime
    openvino-fp32      the fp32 graph compiled by OpenVINO for the CPU
    openvino-bf16      the fp32 graph, OpenVINO at bf16 inference precision (AVX512-BF16 / AMX hardware only)
    openvino-int8      the int8 QDQ graph on OpenVINO's int8 kernels

`auto` (`trident serve build --precision auto`, `TridentClient.from_onnx(..., precision="auto")`) keeps, for each
bucket, the fastest variant that
  1. this CPU runs natively: bf16 needs avx512_bf16 or amx_bf16 in the CPU flags; a CPU without them never gets
     bf16 (OpenVINO would emulate it, slower);
  2. passed the quality gate for this checkpoint: a reduced precision (bf16, int8) is offered only where
     `trident evaluate --precision-gate` measured it on 1000 images against fp32 (FD within 5%, class agreement
     within 1 point; benchmarks/results/precision_gate.json, keyed by checkpoint sha256);
  3. passes the parity gate here: max abs difference to onnxruntime-fp32 on the export's fixed batch of held-out
     real inputs within PARITY_TOLERANCE for its precision;
  4. beats onnxruntime-fp32 in each of three interleaved timed rounds at that bucket (so `auto` is never slower
     than fp32 by noise); else the bucket stays onnxruntime-fp32.
The choice and every trial number are recorded (the repository's config parameters and trident_repository.json).
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from .ort_runner import BucketRunner
from .spec import DECODER, GENERATOR, UNET

REFERENCE = "onnxruntime-fp32"
# variant -> (the export's graph files, the BucketRunner engine)
VARIANTS = {
    "onnxruntime-fp32": ("fp32", "onnxruntime"),
    "onnxruntime-fp16": ("fp16", "onnxruntime"),
    "onnxruntime-int8": ("int8", "onnxruntime"),
    "openvino-fp32": ("fp32", "openvino-f32"),
    "openvino-bf16": ("fp32", "openvino-bf16"),
    "openvino-int8": ("int8", "openvino-f32"),
}
CPU_VARIANTS = tuple(v for v in VARIANTS if v != "onnxruntime-fp16")
CHOICES = ("auto", *VARIANTS)  # what --precision takes
# Max abs difference to onnxruntime-fp32 on the fixed batch (network outputs: eps of rms ~1, images in [-1, 1]).
# fp32: two runtimes' float32 kernels; bf16: 8 mantissa bits (0.015-0.021 measured on the U-Net); int8: the
# quantized graph (0.05-0.09 measured on the U-Net, see export/quantize.py). A variant outside its bound is broken,
# not merely imprecise: the bounds are guards; the quality gate judges the images.
PARITY_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 0.1, "int8": 0.5}
REDUCED = ("bf16", "int8")  # precisions that need the quality gate
# The graph each model's gate setting draws through (`trident evaluate --precision-gate`: DPM-Solver++-20 at guidance
# 3, the GAN untruncated, the VAE from its prior). A verdict covers only that graph: the VAE's encoder is not judged
# by drawing, so it keeps fp32 runtimes under auto.
JUDGED_GRAPHS = {"diffusion": (UNET,), "gan": (GENERATOR,), "vae": (DECODER,)}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products that accumulate without saturating
# Variants that compute correctly only on some CPUs, with the flags they need (any one): OpenVINO would emulate bf16
# (many times slower); its int8 kernels on a CPU without VNNI drew other images (an AVX2-only EPYC: 58% of a
# guided draw agreed with its class, against 100% at fp32 and through onnxruntime-int8, whose 7-bit weights cannot
# saturate there, export/quantize.py).
NATIVE_FLAGS = {"openvino-bf16": BF16_FLAGS, "openvino-int8": INT8_DOT_FLAGS}
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16")
ROUNDS = 3


def precision_of(variant: str) -> str:
    """"bf16" for openvino-bf16: the numeric precision the variant computes in."""
    return variant.rsplit("-", 1)[1]


def not_native(variant: str, cpu: dict) -> str | None:
    """Why this CPU cannot run the variant as it should (None when it can)."""
    needs = NATIVE_FLAGS.get(variant)
    if needs and not any(f in cpu["flags"] for f in needs):
        return f"this CPU has none of {needs}"
    return None


def cpu_info() -> dict:
    """The CPU model and the flags that matter for the variants (from /proc/cpuinfo where there is one)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": sorted(f for f in REPORTED_FLAGS if f in flags), "cores": os.cpu_count()}


def gate_verdicts(gate_file: str | os.PathLike | None, checkpoint_sha256: str | None) -> dict[str, dict]:
    """The quality gate's verdict per variant for one checkpoint ({} when there is none)."""
    if not gate_file or not checkpoint_sha256 or not Path(gate_file).is_file():
        return {}
    try:
        data = json.loads(Path(gate_file).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data.get("checkpoints", {}).get(checkpoint_sha256, {}).get("variants", {})


def candidates(precisions_exported: set[str], cpu: dict, verdicts: dict[str, dict],
               judged: bool = True) -> dict[str, str | None]:
    """{CPU variant: None if auto may try it, else why not}. judged: the quality gate draws through this graph."""
    out = {}
    for variant in CPU_VARIANTS:
        files, _ = VARIANTS[variant]
        precision = precision_of(variant)
        if files not in precisions_exported:
            out[variant] = f"the export has no {files} graphs"
        elif not_native(variant, cpu):
            out[variant] = not_native(variant, cpu)
        elif precision in REDUCED and not judged:
            out[variant] = "the quality gate does not draw through this graph"
        elif precision in REDUCED and not verdicts.get(variant, {}).get("pass"):
            out[variant] = ("failed the quality gate" if variant in verdicts
                            else "no quality gate result for this checkpoint (`trident evaluate --precision-gate`)")
        else:
            out[variant] = None
    return out


def _rows(parity: dict[str, np.ndarray], names: list[str], n: int) -> dict[str, np.ndarray]:
    """n rows of the fixed batch (repeated if it holds fewer)."""
    have = len(parity[names[0]])
    index = np.arange(n) % have
    return {name: np.ascontiguousarray(parity[name][index]) for name in names}


def trial(files: dict[str, dict[int, str]], parity: dict[str, np.ndarray], allowed: list[str], *, threads: int = 0,
          row_shards: int = 0, rounds: int = ROUNDS, min_seconds: float = 0.2, log=None) -> dict:
    """Time every allowed variant at every bucket, side by side, and choose.

    files: {"fp32" | "int8": {bucket: path}}; parity: {input name: rows} (the export's fixed batch).
    Returns {"choice": {bucket: variant}, "buckets": {bucket: {variant: {"ms", "rounds_ms", "max_abs_err", "ok",
    "why"}}}}. REFERENCE is always measured; a variant that fails to load or run is recorded, not fatal.
    """
    variants = [REFERENCE] + [v for v in allowed if v != REFERENCE]
    buckets = sorted(files["fp32"])
    runners, failed = {}, {}
    for variant in variants:
        precision_files, engine = VARIANTS[variant]
        try:
            runner = BucketRunner(files[precision_files], threads=threads, row_shards=row_shards,
                                  engines={b: engine for b in files[precision_files]})
            runner.warm()
            runners[variant] = runner
        except Exception as e:  # a runtime that cannot load here (missing package, unsupported op) is not chosen
            failed[variant] = f"{type(e).__name__}: {e}"
    try:
        names = list(runners[REFERENCE].input_shapes())
        results = {b: {} for b in buckets}
        for b in buckets:
            feed = _rows(parity, names, b)
            reference = runners[REFERENCE].run(feed)
            reps = {}
            for variant, runner in runners.items():
                out = runner.run(feed)
                err = max(float(np.max(np.abs(out[k].astype(np.float64) - reference[k]))) for k in reference)
                t0, k = time.perf_counter(), 0
                while time.perf_counter() - t0 < min_seconds or k < 2:  # repetitions for ~min_seconds per round
                    runner.run(feed)
                    k += 1
                reps[variant] = k
                results[b][variant] = {"max_abs_err": err, "rounds_ms": []}
            for _ in range(rounds):  # interleaved: every variant once per round
                for variant, runner in runners.items():
                    t0 = time.perf_counter()
                    for _ in range(reps[variant]):
                        runner.run(feed)
                    results[b][variant]["rounds_ms"].append(1e3 * (time.perf_counter() - t0) / reps[variant])
            ref_rounds = results[b][REFERENCE]["rounds_ms"]
            for variant, r in results[b].items():
                r["ms"] = float(np.median(r["rounds_ms"]))
                tolerance = PARITY_TOLERANCE[precision_of(variant)]
                faster = all(m < f for m, f in zip(r["rounds_ms"], ref_rounds))
                r["ok"] = variant == REFERENCE or (r["max_abs_err"] <= tolerance and faster)
                r["why"] = ("reference" if variant == REFERENCE else
                            f"max abs error {r['max_abs_err']:.3g} > {tolerance}" if r["max_abs_err"] > tolerance
                            else "not faster than onnxruntime-fp32 in every round" if not faster else "passed")
            for variant, why in failed.items():
                results[b][variant] = {"ok": False, "why": f"could not run here: {why}"}
            if log:
                log(f"b{b}: " + ", ".join(f"{v} {r['ms']:.2f} ms" for v, r in results[b].items() if "ms" in r))
    finally:
        for runner in runners.values():
            runner.close()
    choice = {b: min((v for v, r in results[b].items() if r["ok"]), key=lambda v: results[b][v]["ms"])
              for b in buckets}
    return {"choice": choice, "buckets": results}


SHARD_SLACK = 0.02  # shard_trial keeps the smallest bucket whose time per row is within this of the fastest


def shard_trial(files: dict[int, str], parity: dict[str, np.ndarray] | None, *, threads: int = 0,
                row_shards: int = 0, rounds: int = ROUNDS, min_seconds: float = 0.1, log=None) -> dict | None:
    """The largest bucket a row shard should run here (ort_runner.BucketRunner's shard_limit), by measurement.

    files: {bucket: path} of the buckets that run on onnxruntime. For each bucket b, a call of row_shards x b rows
    (every shard runs one chunk of b rows, the shards at once, as served) is timed in interleaved rounds; the limit is
    the smallest b whose median time per row is within SHARD_SLACK of the fastest. Buckets above it buy no speed on
    this machine and would cost their sessions and activations (the U-Net's shard sessions for 16 rows hold ~30 MB).
    Returns {"limit", "per_row_ms": {bucket: ms}, "rounds_ms": {bucket: [ms per row]}, "row_shards"}; None where calls
    are not sharded (one shard, or fewer than two buckets)."""
    if len(files) < 2:
        return None
    runner = BucketRunner(files, threads=threads, row_shards=row_shards)
    try:
        if runner.row_shards < 2:
            return None
        buckets = runner.buckets
        names = {name: (shape, dtype) for name, shape, dtype in runner.sessions[buckets[0]].inputs()}
        feeds = {}
        for b in buckets:
            n = runner.row_shards * b
            feeds[b] = (_rows(parity, list(names), n) if parity is not None and set(names) <= set(parity) else
                        {name: np.zeros((n, *shape[1:]), dtype) for name, (shape, dtype) in names.items()})
        reps, per_row = {}, {b: [] for b in buckets}
        for b in buckets:
            runner.shard_limit = b
            runner.run(feeds[b])  # makes and warms this bucket's shard session
            t0, k = time.perf_counter(), 0
            while time.perf_counter() - t0 < min_seconds or k < 2:
                runner.run(feeds[b])
                k += 1
            reps[b] = k
        for _ in range(rounds):  # interleaved: every bucket once per round
            for b in buckets:
                runner.shard_limit = b
                t0 = time.perf_counter()
                for _ in range(reps[b]):
                    runner.run(feeds[b])
                per_row[b].append(1e3 * (time.perf_counter() - t0) / reps[b] / len(feeds[b][next(iter(names))]))
    finally:
        runner.close()
    median = {b: float(np.median(ms)) for b, ms in per_row.items()}
    best = min(median.values())
    limit = min(b for b, ms in median.items() if ms <= best * (1 + SHARD_SLACK))
    if log:
        log(f"row shards x{runner.row_shards}: " + ", ".join(f"b{b} {ms:.3f} ms/row" for b, ms in median.items())
            + f"; shard limit b{limit}")
    return {"limit": limit, "row_shards": runner.row_shards, "per_row_ms": {str(b): ms for b, ms in median.items()},
            "rounds_ms": {str(b): ms for b, ms in per_row.items()}}


def check_shard_limit(value) -> None:
    """ValueError unless value is "auto" or a bucket size >= 0 (0: every bucket): what shard_limit takes."""
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"shard_limit must be 'auto' or a bucket size >= 0 (0: every bucket), got {value!r}")


def measure_shard_limit(export_dir: str | os.PathLike, entry: dict, choice: dict, *, threads: int = 0,
                        row_shards: int = 0, log=None) -> dict | None:
    """shard_trial over the buckets of one graph's entry that choice ({bucket: variant}) runs on onnxruntime, on the
    export's fixed batch: what `trident serve build` and the in-process backend run for shard_limit="auto"."""
    files = {int(b): str(Path(export_dir) / entry[VARIANTS[v][0]][str(b)]["file"])
             for b, v in choice.items() if VARIANTS[v][1] == "onnxruntime"}
    return shard_trial(files, load_parity(export_dir, entry), threads=threads, row_shards=row_shards, log=log)


def load_parity(export_dir: str | os.PathLike, entry: dict) -> dict[str, np.ndarray] | None:
    """The export's fixed batch of held-out real inputs for a graph (None for an export without one)."""
    if "parity_inputs" not in entry:
        return None
    with np.load(Path(export_dir) / entry["parity_inputs"]) as data:
        return {name: data[name] for name in data.files}


def choose(export_dir: str | os.PathLike, meta: dict, graph: str, precision: str, *, gate_file=None,
           threads: int = 0, row_shards: int = 0, log=None) -> dict:
    """What one graph of an export runs per bucket: {"choice": {bucket: variant}, ...record}.

    precision: a variant (every bucket runs it; it must be exported) or "auto" (measured here, see the module
    docstring). The record says what was tried and why, for the repository's trident_repository.json."""
    entry = meta["graphs"][graph]
    buckets = sorted(int(b) for b in entry["buckets"])
    exported = {p for p in ("fp32", "fp16", "int8") if entry.get(p)}
    if precision != "auto":
        if precision not in VARIANTS:
            raise ValueError(f"precision must be one of {CHOICES}, got {precision!r}")
        files = VARIANTS[precision][0]
        if files not in exported:
            raise ValueError(f"{graph}: the export has no {files} graphs for {precision}; re-export "
                             + ("with --fp16" if files == "fp16" else "without --no-int8"))
        return {"precision": precision, "choice": {b: precision for b in buckets}}
    cpu = cpu_info()
    verdicts = gate_verdicts(gate_file, meta.get("source_checkpoint", {}).get("sha256"))
    kind = meta.get("card", {}).get("kind")
    allowed = candidates(exported, cpu, verdicts, judged=graph in JUDGED_GRAPHS.get(kind, ()))
    parity = load_parity(export_dir, entry)
    if parity is None:
        allowed = {v: (why or "the export has no fixed parity batch (re-export)") if v != REFERENCE else None
                   for v, why in allowed.items()}
    files = {p: {int(b): str(Path(export_dir) / f["file"]) for b, f in entry[p].items()}
             for p in exported if p != "fp16"}
    record = {"precision": "auto", "cpu": cpu, "excluded": {v: why for v, why in allowed.items() if why}}
    tried = [v for v, why in allowed.items() if why is None]
    if tried == [REFERENCE]:
        record["choice"] = {b: REFERENCE for b in buckets}
        return record
    record.update(trial(files, parity, tried, threads=threads, row_shards=row_shards, log=log))
    return record

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
  1. this CPU runs natively (NATIVE_FLAGS): bf16 needs avx512_bf16 or amx_bf16 in the CPU flags (OpenVINO would
     emulate it, slower), openvino-int8 needs VNNI (without it OpenVINO's int8 U-Net strays from fp32);
  2. passed the quality gate for this checkpoint: a reduced precision (bf16, int8) is offered only where
     `trident evaluate --precision-gate` measured it on 1000 images against fp32 (FD within 5%, class agreement
     within 1 point; DEFAULT_QUALITY_GATE, keyed by checkpoint sha256), and an int8 verdict only for the
     quantization method it was judged on (the export's metadata.json "int8": {"method"});
  3. passes the parity gate here: max abs difference to onnxruntime-fp32 on the export's fixed batch of held-out
     real inputs within PARITY_TOLERANCE for its precision;
  4. beats onnxruntime-fp32 in each of three interleaved timed rounds at that bucket (so `auto` is never slower
     than fp32 by noise); else the bucket stays onnxruntime-fp32;
  5. keeps the graph on one runtime (onnxruntime or OpenVINO) unless mixing them is more than MIXED_RUNTIME_GAIN
     faster over the buckets: each runtime a model loads costs it ~100 MB (one_runtime).
The choice and every trial number are recorded (the repository's config parameters and trident_repository.json),
and so is every variant not offered, with the reason (record["excluded"]; `trident serve build` prints them, one
line per graph: `not_offered_line`).
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .ort_runner import BucketRunner
from .spec import DECODER, GENERATOR, STUDENT_UNET, UNET

REFERENCE = "onnxruntime-fp32"


@dataclass(frozen=True)
class Variant:
    """A runtime at a precision: which of the export's graph files a bucket runs ("fp32", "fp16", "int8"), on which
    ort_runner engine, computing in which numeric precision."""

    name: str
    files: str
    engine: str
    precision: str


VARIANTS = {v.name: v for v in (
    Variant("onnxruntime-fp32", "fp32", "onnxruntime", "fp32"),
    Variant("onnxruntime-fp16", "fp16", "onnxruntime", "fp16"),
    Variant("onnxruntime-int8", "int8", "onnxruntime", "int8"),
    Variant("openvino-fp32", "fp32", "openvino-f32", "fp32"),
    Variant("openvino-bf16", "fp32", "openvino-bf16", "bf16"),
    Variant("openvino-int8", "int8", "openvino-f32", "int8"),
)}
CPU_VARIANTS = tuple(v for v in VARIANTS if v != "onnxruntime-fp16")
CHOICES = ("auto", *VARIANTS)  # what --precision takes
# Max abs difference to onnxruntime-fp32 on the fixed batch (network outputs: eps of rms ~1, images in [-1, 1]).
# fp32: two runtimes' float32 kernels; bf16: 8 mantissa bits; int8: the quantized graph (export/quantize.py); each
# bound sits well above what the shipped U-Net measured (benchmarks/results/optimizations.md, "Figures behind the
# code's comments"). A variant outside its bound is broken,
# not merely imprecise: the bounds are guards; the quality gate judges the images.
PARITY_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 0.1, "int8": 0.5}
REDUCED = ("bf16", "int8")  # precisions that need the quality gate
# The graph each model's gate setting draws through (`trident evaluate --precision-gate`: DPM-Solver++-20 at guidance
# 3, the GAN untruncated, the VAE from its prior). A verdict covers only that graph: the VAE's encoder is not judged
# by drawing, so it keeps fp32 runtimes under auto.
JUDGED_GRAPHS = {"diffusion": (UNET,), "diffusion_student": (STUDENT_UNET,), "gan": (GENERATOR,), "vae": (DECODER,)}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_DOT_FLAGS = ("amx_int8",)  # the int8 units openvino-int8 was measured to keep parity on
# The CPU flags (any one) a variant needs to run natively, so auto offers it. OpenVINO would emulate bf16 (slower).
# openvino-int8 is offered on AMX only: the CPUs it was measured on without AMX drew other classes from the very int8
# graph onnxruntime-int8 runs within tolerance. On an AVX2 EPYC its U-Net strayed several times past PARITY_TOLERANCE;
# on an AVX512-VNNI EPYC (Zen 4, non-saturating VPDPBUSD, so not the int16 saturation once suspected) it strayed
# 0.51 from fp32 at b1 (onnxruntime-int8: within 0.14) and a brief guided draw agreed with fp32 on 66% of classes
# (tests/test_precision.py); its GAN and VAE matched. The U-Net alone multiplies two quantized activations (attention).
# That was an older teacher: with the v-prediction teacher served since session 7 the same Zen-4 EPYC kept 0.188
# (session 9; within tolerance), at the speed onnxruntime-int8's row shards already give there (21.5-22.6 ms at b16
# against 21.8), so offering it off AMX would need a drawn check on such a CPU and would buy nothing measured.
NATIVE_FLAGS = {"openvino-bf16": BF16_FLAGS, "openvino-int8": INT8_DOT_FLAGS}
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16")
ROUNDS = 3
# The quality gate's verdicts, found beside the package in its source repository (not in the working directory), so
# `--precision auto` reads the same file wherever it runs; an installed package without the file offers no reduced
# precision, and says so.
DEFAULT_QUALITY_GATE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "precision_gate.json"


def precision_of(variant: str) -> str:
    """"bf16" for openvino-bf16: the numeric precision the variant computes in."""
    return VARIANTS[variant].precision


def missing_files(graph: str, variant: str, refused: str | None = None) -> str:
    """Why a graph cannot run a variant whose files the export lacks, and how to export them. refused: why the
    export left out the int8 graphs it made (ExportGraph.int8_refused)."""
    files = VARIANTS[variant].files
    if files == "int8" and refused:
        return f"{graph}: the export has no int8 graphs for {variant}: {refused}"
    return (f"{graph}: the export has no {files} graphs for {variant}; re-export "
            + ("with --fp16" if files == "fp16" else "without --no-int8"))


def not_native(variant: str, cpu: dict) -> str | None:
    """Why this CPU cannot run the variant as it should (None when it can)."""
    needs = NATIVE_FLAGS.get(variant)
    if needs and not any(f in cpu["flags"] for f in needs):
        return f"this CPU has none of {', '.join(needs)}"
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


def gate_reasons(gate_file: str | os.PathLike | None, checkpoint_sha256: str | None,
                 int8_method: str | None = None, timesteps: list[int] | None = None) -> dict[str, str | None]:
    """{reduced-precision CPU variant: None where the quality gate passed it for this checkpoint, else why not}.

    int8_method: how the export being served quantized its int8 graphs (metadata.json "int8": {"method"}). An int8
    verdict counts only when the gate judged graphs made by the same method: another method's graphs compute other
    numbers (8-bit weights saturate on CPUs without VNNI, see export/quantize.py), so its verdict says nothing here.
    timesteps (a diffusion model): the ones its default sampling walks today (sampling.default_timesteps); the
    verdicts count only where the gate recorded the same, since they judge images drawn at those timesteps.
    """
    variants = [v for v in CPU_VARIANTS if precision_of(v) in REDUCED]
    if gate_file is None:
        return dict.fromkeys(variants, "no quality gate file given")
    path = Path(gate_file)
    if not path.is_file():
        return dict.fromkeys(variants, f"no quality gate file at {path} (`trident evaluate --precision-gate` writes "
                                       "it, --quality-gate names another)")
    try:
        checkpoints = json.loads(path.read_text())["checkpoints"]
        if not isinstance(checkpoints, dict):
            raise TypeError(f"'checkpoints' is a {type(checkpoints).__name__}, not an object")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        return dict.fromkeys(variants, f"the quality gate file {path} is unreadable ({type(e).__name__}: {e})")
    if not checkpoint_sha256:
        return dict.fromkeys(variants, "the export records no checkpoint sha256 to look up in the quality gate")
    entry = checkpoints.get(checkpoint_sha256)
    if not isinstance(entry, dict):
        return dict.fromkeys(variants, f"no quality gate verdict for this checkpoint (sha256 {checkpoint_sha256[:12]}) "
                                       f"in {path}: run `trident evaluate --precision-gate`")
    if timesteps is not None and entry.get("timesteps") != list(timesteps):
        judged, now = entry.get("timesteps"), f"{len(timesteps)} steps from {list(timesteps)[:3]}..."
        return dict.fromkeys(variants, (
            f"the quality gate recorded no sampling timesteps for this checkpoint (judged before it did); its default "
            f"sampling walks {now}" if judged is None else
            f"the quality gate judged this checkpoint sampled at other timesteps ({len(judged)} steps from "
            f"{judged[:3]}...) than its default sampling walks now ({now})")
            + ": run `trident evaluate --precision-gate` again")
    verdicts = entry.get("variants") if isinstance(entry.get("variants"), dict) else {}
    out = {}
    for variant in variants:
        verdict = verdicts.get(variant)
        if not isinstance(verdict, dict):
            out[variant] = f"no quality gate verdict for {variant} on this checkpoint in {path}"
        elif precision_of(variant) == "int8" and verdict.get("int8_method") != int8_method:
            out[variant] = ("no quality gate verdict for this quantization method (it judged int8 graphs made by "
                            + ("an unrecorded method" if verdict.get("int8_method") is None else "another method")
                            + "): run `trident evaluate --precision-gate` on exports made as this one")
        elif verdict.get("pass") is not True:
            figures = [f"FD {verdict['fd_ratio']}x fp32's" if "fd_ratio" in verdict else "",
                       f"class agreement {100 * verdict['agreement_drop']:.1f} points below fp32's"
                       if "agreement_drop" in verdict else ""]
            out[variant] = "failed the quality gate" + (f" ({', '.join(f for f in figures if f)})"
                                                        if any(figures) else "")
        else:
            out[variant] = None
    return out


def gated_timesteps(card) -> list[int] | None:
    """The timesteps a diffusion model's gate verdicts must have been drawn at (its default sampling's); None for the
    other kinds."""
    if card.schedule is None:
        return None
    from .sampling import NoiseSchedule, default_timesteps

    return default_timesteps(NoiseSchedule.from_dict(card.schedule), card.distilled_steps)


def candidates(precisions_exported: set[str], cpu: dict, gate: dict[str, str | None],
               judged: bool = True, int8_refused: str | None = None) -> dict[str, str | None]:
    """{CPU variant: None if auto may try it, else why not}. gate: gate_reasons' answer; judged: the quality gate
    draws through this graph; int8_refused: why the export left out this graph's int8 graphs."""
    out = {}
    for variant in CPU_VARIANTS:
        files = VARIANTS[variant].files
        precision = precision_of(variant)
        if files not in precisions_exported:
            out[variant] = (f"the export has no {files} graphs"
                            + (f": {int8_refused}" if files == "int8" and int8_refused else ""))
        elif not_native(variant, cpu):
            out[variant] = not_native(variant, cpu)
        elif precision in REDUCED and not judged:
            out[variant] = "the quality gate does not draw through this graph"
        elif precision in REDUCED:
            out[variant] = gate.get(variant, "no quality gate verdict")
        else:
            out[variant] = None
    return out


def not_offered_line(graph: str, record: dict) -> str | None:
    """One line naming the variants `auto` did not offer for a graph, grouped by why (None when all were offered)."""
    by_why = {}
    for variant, why in record.get("excluded", {}).items():
        by_why.setdefault(why, []).append(variant)
    if not by_why:
        return None
    return f"{graph}: auto did not offer " + "; ".join(f"{', '.join(v)}: {why}" for why, v in by_why.items())


def _rows(parity: dict[str, np.ndarray], names: list[str], n: int) -> dict[str, np.ndarray]:
    """n rows of the fixed batch (repeated if it holds fewer)."""
    have = len(parity[names[0]])
    index = np.arange(n) % have
    return {name: np.ascontiguousarray(parity[name][index]) for name in names}


def judge(variant: str, max_abs_err: float, rounds_ms: list[float], reference_rounds_ms: list[float]
          ) -> tuple[bool, str]:
    """(ok, why) for one variant at one bucket: within its PARITY_TOLERANCE and faster than REFERENCE in every
    interleaved round (a median win could be noise)."""
    if variant == REFERENCE:
        return True, "reference"
    tolerance = PARITY_TOLERANCE[precision_of(variant)]
    if max_abs_err > tolerance:
        return False, f"max abs error {max_abs_err:.3g} > {tolerance}"
    if not all(m < f for m, f in zip(rounds_ms, reference_rounds_ms, strict=True)):
        return False, "not faster than onnxruntime-fp32 in every round"
    return True, "passed"


def trial(files: dict[str, dict[int, str]], parity: dict[str, np.ndarray], allowed: list[str], *, threads: int = 0,
          row_shards: int = 0, rounds: int = ROUNDS, min_seconds: float = 0.2, log=None) -> dict:
    """Time every allowed variant at every bucket, side by side, and choose.

    files: {"fp32" | "int8": {bucket: path}}; parity: {input name: rows} (the export's fixed batch).
    Returns {"choice": {bucket: variant}, "buckets": {bucket: {variant: {"ms", "rounds_ms", "max_abs_err", "ok",
    "why"}}}, "failed": {variant: why}}. REFERENCE is always measured; a variant that fails to load is recorded in
    "failed" (and in each bucket as not ok), not fatal.
    """
    variants = [REFERENCE] + [v for v in allowed if v != REFERENCE]
    buckets = sorted(files["fp32"])
    runners, failed = {}, {}
    for variant in variants:
        files_of, engine = files[VARIANTS[variant].files], VARIANTS[variant].engine
        try:
            runner = BucketRunner(files_of, threads=threads, row_shards=row_shards,
                                  engines=dict.fromkeys(files_of, engine))
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
                r["ok"], r["why"] = judge(variant, r["max_abs_err"], r["rounds_ms"], ref_rounds)
            for variant, why in failed.items():
                results[b][variant] = {"ok": False, "why": f"could not run here: {why}"}
            if log:
                log(f"b{b}: " + ", ".join(f"{v} {r['ms']:.2f} ms" for v, r in results[b].items() if "ms" in r))
    finally:
        for runner in runners.values():
            runner.close()
    fastest = {b: fastest_passed(results[b]) for b in buckets}  # REFERENCE always passes
    choice, runtimes = one_runtime(results, fastest)
    record = {"choice": choice, "buckets": results, "failed": failed}
    if runtimes is not None:
        record["one_runtime"] = runtimes
        if log:
            log(runtimes["why"])
    return record


# The trial times the variants against each other on this machine's cores: what other processes run meanwhile slows
# them unevenly (a contended bucket may go to the variant that suffered least), so the build measures that load and
# warns above this many cores' worth of other work, averaged over the trial.
BUSY_CORES = 0.5


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy clock ticks of all CPUs, clock ticks of this process and its threads), from /proc; None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return user + nice + system + irq + softirq, int(own[11]) + int(own[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


def other_load(before: tuple[int, int] | None, after: tuple[int, int] | None, wall_s: float) -> float | None:
    """Cores' worth of CPU time that other processes used between two _cpu_ticks() readings `wall_s` apart."""
    if before is None or after is None or wall_s <= 0:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy, own = after[0] - before[0], after[1] - before[1]
    return max(0.0, (busy - own) / hz / wall_s)


def busy_warning(graph: str, cores: float | None) -> str | None:
    if cores is None or cores <= BUSY_CORES:
        return None
    return (f"warning: other processes used {cores:.2f} cores on average while {graph}'s variants were timed: the "
            "trial's choice may not hold on a quiet machine; rebuild when the machine is quiet "
            "(trident_measured.json records the load)")


# A second runtime in one Triton model's process costs about 100 MB resident on top of the first: OpenVINO's
# libraries and its first compiled U-Net (~100 MB here), or onnxruntime's library, arena and sessions. A U-Net host
# that ran one OpenVINO bucket beside onnxruntime ones held 257 MB against ~180 MB on onnxruntime alone (an AVX-512
# EPYC; benchmarks/results/optimizations.md). So auto mixes runtimes in one graph only where the mix is worth it:
# faster than the best single runtime by more than this share of the time summed over the buckets.
MIXED_RUNTIME_GAIN = 0.10


def runtime_of(variant: str) -> str:
    """The library a variant loads: "onnxruntime" or "openvino"."""
    return "onnxruntime" if VARIANTS[variant].engine == "onnxruntime" else "openvino"


def fastest_passed(row: dict, runtime: str | None = None) -> str | None:
    """The fastest variant of one bucket's trial results ({variant: {"ms", "ok", ...}}) that passed, on `runtime`
    only where one is given (runtime_of); None where none passed."""
    passed = [v for v, r in row.items() if r["ok"] and (runtime is None or runtime_of(v) == runtime)]
    return min(passed, key=lambda v: row[v]["ms"]) if passed else None


def one_runtime(results: dict, fastest: dict) -> tuple[dict, dict | None]:
    """The buckets' variants on one runtime, unless mixing runtimes wins by more than MIXED_RUNTIME_GAIN.

    results: trial's {bucket: {variant: {"ms", "ok", ...}}}; fastest: {bucket: the fastest variant that passed}.
    A single-runtime assignment takes, per bucket, the fastest passing variant on that runtime; it exists where the
    runtime has one at every bucket (onnxruntime always does: its fp32 reference). The assignments are compared by
    their time summed over the buckets (one call of each size). Returns (choice, record), the record None where
    the fastest variants already share one runtime."""
    if len({runtime_of(v) for v in fastest.values()}) < 2:
        return fastest, None
    options = {}
    for runtime in ("onnxruntime", "openvino"):
        assignment = {b: fastest_passed(results[b], runtime) for b in fastest}
        if None not in assignment.values():
            options[runtime] = assignment

    def total(assignment):
        return float(sum(results[b][v]["ms"] for b, v in assignment.items()))

    mixed = total(fastest)
    best = min(options, key=lambda runtime: total(options[runtime]))
    single = total(options[best])
    record = {"mixed_ms": round(mixed, 3), **{f"{r}_ms": round(total(a), 3) for r, a in options.items()}}
    if single <= mixed * (1 + MIXED_RUNTIME_GAIN):
        record.update(kept=best, why=f"one runtime ({best}): the buckets take {single:.2f} ms on it against "
                                     f"{mixed:.2f} ms mixed, within {MIXED_RUNTIME_GAIN:.0%}, and a second runtime "
                                     "costs ~100 MB per model")
        return options[best], record
    record.update(kept="mixed", why=f"mixed runtimes: {mixed:.2f} ms over the buckets against {single:.2f} ms on "
                                    f"{best} alone, more than {MIXED_RUNTIME_GAIN:.0%} faster")
    return fastest, record


SHARD_SLACK = 0.02  # shard_trial keeps the smallest bucket whose time per row is within this of the fastest


def shard_trial(files: dict[int, str], parity: dict[str, np.ndarray] | None, *, threads: int = 0,
                row_shards: int = 0, rounds: int = ROUNDS, min_seconds: float = 0.1, log=None) -> dict | None:
    """The largest bucket a row shard should run here (ort_runner.BucketRunner's shard_limit), by measurement.

    files: {bucket: path} of the buckets that run on onnxruntime. For each bucket b, a call of row_shards x b rows
    (every shard runs one chunk of b rows, the shards at once, as served) is timed in interleaved rounds; the limit is
    the smallest b whose median time per row is within SHARD_SLACK of the fastest. Buckets above it buy no speed on
    this machine and would cost their sessions and activations (tens of MB for the U-Net's larger buckets).
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
    limit = shard_limit_of(median)
    if log:
        log(f"row shards x{runner.row_shards}: " + ", ".join(f"b{b} {ms:.3f} ms/row" for b, ms in median.items())
            + f"; shard limit b{limit}")
    return {"limit": limit, "row_shards": runner.row_shards, "per_row_ms": {str(b): ms for b, ms in median.items()},
            "rounds_ms": {str(b): ms for b, ms in per_row.items()}}


def shard_limit_of(per_row_ms: dict[int, float]) -> int:
    """The smallest bucket whose time per row is within SHARD_SLACK of the fastest bucket's."""
    best = min(per_row_ms.values())
    return min(b for b, ms in per_row_ms.items() if ms <= best * (1 + SHARD_SLACK))


def check_shard_limit(value) -> None:
    """ValueError unless value is "auto" or a bucket size >= 0 (0: every bucket): what shard_limit takes."""
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"shard_limit must be 'auto' or a bucket size >= 0 (0: every bucket), got {value!r}")


def measure_shard_limit(export, graph: str, choice: dict, *, threads: int = 0, row_shards: int = 0,
                        log=None) -> dict | None:
    """shard_trial over the buckets of one graph of an export (serving/manifest.py Export) that choice ({bucket:
    variant}) runs on onnxruntime, on the export's fixed batch: what manifest.measure runs for shard_limit="auto"."""
    entry = export.graphs[graph]
    files = {b: str(export.directory / entry.file(v, b).file) for b, v in choice.items()
             if VARIANTS[v].engine == "onnxruntime"}
    return shard_trial(files, load_parity(export, graph), threads=threads, row_shards=row_shards, log=log)


def load_parity(export, graph: str) -> dict[str, np.ndarray] | None:
    """The export's fixed batch of held-out real inputs for a graph (None for an export without one)."""
    entry = export.graphs[graph]
    if entry.parity_inputs is None:
        return None
    with np.load(export.directory / entry.parity_inputs) as data:
        return {name: data[name] for name in data.files}


def choose(export, graph: str, precision: str, *, gate_file=None, threads: int = 0, row_shards: int = 0,
           log=None) -> dict:
    """What one graph of an export (serving/manifest.py Export) runs per bucket: {"choice": {bucket: variant}, ...}.

    precision: a variant (every bucket runs it; it must be exported) or "auto" (measured here, see the module
    docstring). The record says what was tried and why, for the repository's trident_repository.json."""
    entry = export.graphs[graph]
    buckets = list(entry.buckets)
    exported = set(entry.files)
    if precision != "auto":
        if precision not in VARIANTS:
            raise ValueError(f"precision must be one of {CHOICES}, got {precision!r}")
        if VARIANTS[precision].files not in exported:
            raise ValueError(missing_files(graph, precision, entry.int8_refused))
        return {"precision": precision, "choice": dict.fromkeys(buckets, precision)}
    cpu = cpu_info()
    gate = gate_reasons(gate_file, export.checkpoint_sha256, export.int8_method, gated_timesteps(export.card))
    allowed = candidates(exported, cpu, gate, judged=graph in JUDGED_GRAPHS.get(export.card.kind, ()),
                         int8_refused=entry.int8_refused)
    parity = load_parity(export, graph)
    if parity is None:
        allowed = {v: (why or "the export has no fixed parity batch (re-export)") if v != REFERENCE else None
                   for v, why in allowed.items()}
    files = {p: {b: str(export.directory / f.file) for b, f in entry.files[p].items()}
             for p in exported if p != "fp16"}
    record = {"precision": "auto", "cpu": cpu, "quality_gate": None if gate_file is None else str(gate_file),
              "excluded": {v: why for v, why in allowed.items() if why}}
    tried = [v for v, why in allowed.items() if why is None]
    if tried == [REFERENCE]:
        record["choice"] = dict.fromkeys(buckets, REFERENCE)
        return record
    ticks, t0 = _cpu_ticks(), time.perf_counter()
    record.update(trial(files, parity, tried, threads=threads, row_shards=row_shards, log=log))
    load = other_load(ticks, _cpu_ticks(), time.perf_counter() - t0)
    record["other_load_cores"] = None if load is None else round(load, 2)
    if log and (warning := busy_warning(graph, load)):
        log(warning)
    record["excluded"].update({v: f"could not run here: {why}" for v, why in record.pop("failed").items()})
    return record

"""The GPU, measured with what the lent machine has: torch (CUDA), the safetensors checkpoints, this source tree.

    benchmarks/gpu.sh --out DIR                       # on the GPU machine: one call, offline, a few minutes
    python -m trident.benchmarks.gpu --out DIR [--device cuda|cpu] [--smoke] [--time-limit S]

That machine has Python with torch (CUDA) and a CPU-only onnxruntime, no tritonclient, no network, and takes at most
64 MiB from here; so this measures the shipped U-Net in torch, not the served ONNX graphs:

1. the U-Net per batch size (the served buckets 1..32, and 64: the CFG rows of a batch of 32) in eager fp32, TF32,
   bf16 and fp16 autocast, `torch.compile`, and CUDA-graph replay (TF32 and bf16): latency per call, rows/s,
   achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode), and each precision's largest eps difference from
   fp32;
2. the whole DPM-Solver++(2M) 20-step loop with guidance 3 at B = 1, 8, 32: the numpy host sampler of today's client
   loop (serving/sampling.py, one device round trip per step: copy in, U-Net, copy out) against the same sampler math
   resident on the device (benchmarks/torch_sampling.py), eager and captured as one CUDA graph, with each loop's
   largest difference from the numpy loop on the fp32 U-Net.

Writes DIR/gpu.json (after every row) and DIR/gpu.md (at the end); a row that fails is recorded with its error and the
run goes on; rows not started within --time-limit seconds are recorded as skipped. `--device cpu --smoke` runs the
same code on the CPU in seconds (tests/test_gpu_benchmark.py): the rows that need CUDA are recorded as skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "diffusion" / "model.safetensors"
UNET_VARIANTS = ("fp32", "tf32", "bf16", "fp16", "compile", "cudagraph", "cudagraph-bf16")
# (loop, U-Net precision): host = serving/sampling.py on numpy, one device round trip per step; device = the torch
# loop (benchmarks/torch_sampling.py); device-graph = that loop captured as one CUDA graph.
LOOP_VARIANTS = (("host", "fp32"), ("host", "tf32"), ("host", "cudagraph"), ("device", "fp32"), ("device", "tf32"),
                 ("device", "bf16"), ("device-graph", "tf32"), ("device-graph", "bf16"))
NEEDS_CUDA = {"tf32", "cudagraph", "cudagraph-bf16", "device-graph"}


@dataclass(frozen=True)
class Settings:
    device: str = "cuda"
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # U-Net rows per call
    loop_batches: tuple[int, ...] = (1, 8, 32)           # images per sampling call
    steps: int = 20
    guidance: float = 3.0
    seed: int = 0
    warmup: int = 5
    min_time_s: float = 0.3      # each U-Net row: at least this long and at least min_iters calls
    min_iters: int = 10
    loop_repeats: int = 5        # timed sampling calls per loop row (after one warm-up call)
    time_limit_s: float = 360.0  # rows not started by then are skipped
    compile_backend: str = "inductor"

    @classmethod
    def smoke(cls, device: str) -> "Settings":
        return cls(device=device, batches=(1, 2), loop_batches=(1, 2), warmup=1, min_time_s=0.0, min_iters=2,
                   loop_repeats=1, time_limit_s=120.0)


# ---------------------------------------------------------------------------------------------------------------------
# Timing and precision switches
# ---------------------------------------------------------------------------------------------------------------------


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def timed(fn, sync, *, warmup: int, min_time_s: float, min_iters: int) -> list[float]:
    """Seconds per call of fn() (each call waited for), after warm-up calls."""
    for _ in range(warmup):
        fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10_000:
            break
    return times


def set_tf32(enabled: bool) -> None:
    """TF32 for matmuls and convolutions (torch >= 2.9 spells it fp32_precision; older ones allow_tf32)."""
    import torch

    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        precision = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def autocast(device: str, precision: str):
    """bf16/fp16 autocast, or nothing. Without autocast's weight cache, which CUDA-graph capture must not use (the
    cached casts are freed when the context exits, under a captured graph); each call enters its own context, so
    eager calls never reuse the cache anyway."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device, dtype=dtype, cache_enabled=False) if dtype is not None else contextlib.nullcontext()


def graphed(fn, device: str):
    """fn() (reading and writing static tensors) captured as a CUDA graph: returns (replay, the captured output)."""
    import torch

    if device != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # cuDNN autotuning and allocator pools outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


# ---------------------------------------------------------------------------------------------------------------------
# The run: rows recorded as they finish
# ---------------------------------------------------------------------------------------------------------------------


class Run:
    def __init__(self, out: Path, settings: Settings, checkpoint: Path):
        self.out, self.settings, self.checkpoint = out, settings, checkpoint
        self.deadline = time.monotonic() + settings.time_limit_s
        self.started = time.time()
        self.result = {"settings": dataclasses.asdict(settings), "checkpoint": str(checkpoint),
                       "environment": {}, "unet": [], "loop": [], "notes": []}

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.time() - self.started, 1)
        tmp = self.out / "gpu.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=1) + "\n")
        tmp.replace(self.out / "gpu.json")

    def row(self, table: str, key: dict, measure, reserve_s: float = 0.0) -> dict:
        """Run one measurement; record its numbers, or why it was skipped or failed, and carry on. A row is started
        only while reserve_s seconds (what it may take at most) are left before the time limit."""
        row = dict(key)
        needs = {key.get("variant"), key.get("loop"), key.get("unet")} & NEEDS_CUDA
        if needs and self.settings.device != "cuda":
            row["skipped"] = f"needs CUDA ({', '.join(sorted(needs))})"
        elif time.monotonic() + reserve_s > self.deadline:
            row["skipped"] = f"time limit ({self.settings.time_limit_s:g} s) reached" + (
                f" (a row needs {reserve_s:g} s)" if reserve_s else "")
        else:
            t0 = time.monotonic()
            try:
                row.update(measure())
            except Exception as e:  # keep going: the next row may work (an illegal CUDA state will fail them all)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
                row["traceback"] = traceback.format_exc(limit=4)[-2000:]
            row["row_s"] = round(time.monotonic() - t0, 2)
        self.result[table].append(row)
        status = row.get("skipped") or row.get("error") or ", ".join(
            f"{k}={v}" for k, v in row.items() if k in ("ms", "rows_per_s", "images_per_s", "max_abs_diff"))
        print(f"[{table}] {' '.join(f'{k}={v}' for k, v in key.items())}: {status}", flush=True)
        self.save()
        return row


def environment(device: str) -> dict:
    import torch

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "numpy": np.__version__, "device": device}
    try:
        import onnxruntime as ort

        env["onnxruntime"] = f"{ort.__version__} (providers: {', '.join(ort.get_available_providers())})"
    except ImportError:
        env["onnxruntime"] = "not installed"
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        try:
            env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                                "--format=csv,noheader"], capture_output=True, text=True,
                                               timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = f"unavailable: {e}"
    return env


def load_unet(checkpoint: Path, device: str):
    from trident.training.checkpoint import card_of, load_model

    model, meta = load_model(checkpoint, "diffusion")
    return model.to(device).eval(), card_of(meta, checkpoint)


def unet_inputs(card, n: int, device: str, seed: int):
    import torch

    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((n, *card.image.shape)).astype(np.float32)).to(device)
    t = torch.from_numpy(rng.uniform(0, card.num_train_timesteps - 1, n).astype(np.float32)).to(device)
    y = torch.from_numpy(rng.integers(0, card.null_class + 1, n).astype(np.int64)).to(device)
    return x, t, y


def count_flops(model, x, t, y) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------------------------------
# 1. The U-Net per batch size
# ---------------------------------------------------------------------------------------------------------------------


def unet_rows(run: Run, model, card, variants=UNET_VARIANTS) -> None:
    import torch

    s = run.settings
    sync = _sync(s.device)
    compiled = None
    for n in s.batches:
        x, t, y = unet_inputs(card, n, s.device, seed=n)
        with torch.inference_mode():
            set_tf32(False)
            reference = model(x, t, y).float()
        try:
            flops = count_flops(model, x, t, y)
        except Exception as e:  # FLOPs are a column, not a row: leave it empty
            flops = None
            run.result["notes"].append(f"FlopCounterMode failed at n={n}: {type(e).__name__}: {e}")
        for variant in variants:
            def measure(variant=variant):
                nonlocal compiled
                set_tf32(variant not in ("fp32",))
                precision = "bf16" if variant in ("bf16", "cudagraph-bf16") else "fp16" if variant == "fp16" else ""
                if variant == "compile":
                    if compiled is None:
                        compiled = torch.compile(model, backend=s.compile_backend, dynamic=False)
                    net = compiled
                else:
                    net = model

                def call():
                    with torch.inference_mode(), autocast(s.device, precision):
                        return net(x, t, y)

                t_first = time.perf_counter()
                if variant.startswith("cudagraph"):
                    fn, out = graphed(call, s.device)
                else:
                    fn, out = call, None
                out = fn() if out is None else (fn(), out)[1]
                sync()
                first_s = time.perf_counter() - t_first  # compile / capture / cuDNN autotuning
                times = timed(fn, sync, warmup=s.warmup, min_time_s=s.min_time_s, min_iters=s.min_iters)
                ms = 1e3 * float(np.median(times))
                return {"ms": round(ms, 4), "rows_per_s": round(n / (ms / 1e3), 1),
                        "tflops": None if flops is None else round(flops / (ms / 1e3) / 1e12, 3),
                        "max_abs_diff": float(f"{(out.float() - reference).abs().max().item():.3g}"),
                        "first_call_s": round(first_s, 3), "calls": len(times)}

            # a compilation for a new shape can take a minute: start one only with that much time left
            run.row("unet", {"rows": n, "variant": variant}, measure, reserve_s=60.0 if variant == "compile" else 0.0)
        set_tf32(False)


# ---------------------------------------------------------------------------------------------------------------------
# 2. The sampling loop: host numpy vs resident on the device
# ---------------------------------------------------------------------------------------------------------------------


def loop_rows(run: Run, model, card) -> None:
    import torch

    from trident.benchmarks.torch_sampling import LoopGraph, TorchDPMSolverPP2M
    from trident.serving import sampling

    s = run.settings
    sync = _sync(s.device)
    schedule = sampling.NoiseSchedule.from_dict(card.schedule)
    for b in s.loop_batches:
        labels_np = (np.arange(b) % len(card.class_names)).astype(np.int64)
        labels = torch.from_numpy(labels_np).to(s.device)
        x_T_np = np.random.default_rng(s.seed).standard_normal((b, *card.image.shape))  # what sample_progressive draws
        x_T = torch.from_numpy(x_T_np).to(s.device)
        reference = {}
        for loop, unet in LOOP_VARIANTS:
            def measure(loop=loop, unet=unet):
                set_tf32(unet != "fp32")
                precision = "bf16" if unet == "bf16" else ""
                if loop == "host":
                    eps = host_eps(model, unet, s.device, precision)
                    def fn():
                        return sampling.last_estimate(sampling.sample_progressive(
                            eps, (b, *card.image.shape), labels_np, schedule=schedule, sampler="dpmpp-2m",
                            steps=s.steps, guidance=s.guidance, null_class=card.null_class, seed=s.seed,
                            prediction_type=card.prediction_type))
                else:
                    def net(xs, ts, ys):
                        with torch.inference_mode(), autocast(s.device, precision):
                            return model(xs, ts, ys)
                    sampler = TorchDPMSolverPP2M(net, schedule, steps=s.steps, guidance=s.guidance,
                                                 prediction_type=card.prediction_type,
                                                 null_class=card.null_class)
                    if loop == "device-graph":
                        with torch.inference_mode():
                            graph = LoopGraph(sampler, x_T, labels)
                        def fn():
                            return graph.replay(x_T).cpu().numpy()
                    else:
                        def fn():
                            with torch.inference_mode():
                                return sampler(x_T, labels).cpu().numpy()
                t_first = time.perf_counter()
                x0 = np.asarray(fn(), dtype=np.float64)  # warm-up (and capture) call; its images are compared
                first_s = time.perf_counter() - t_first
                times = timed(fn, sync, warmup=0, min_time_s=0.0, min_iters=s.loop_repeats)
                ms = 1e3 * float(np.median(times))
                if (loop, unet) == LOOP_VARIANTS[0]:
                    reference["x0"] = x0
                diff = np.abs(x0 - reference["x0"]).max() if "x0" in reference else None
                return {"ms": round(ms, 3), "images_per_s": round(b / (ms / 1e3), 1),
                        "ms_per_step": round(ms / s.steps, 4), "first_call_s": round(first_s, 3),
                        "max_abs_diff": None if diff is None else float(f"{diff:.3g}"), "calls": len(times)}

            run.row("loop", {"images": b, "loop": loop, "unet": unet}, measure)
        set_tf32(False)


def host_eps(model, unet: str, device: str, precision: str):
    """The client loop's eps callable (numpy in, numpy out) over the U-Net on the device: copy in, run, copy out.
    unet "cudagraph" replays one CUDA graph per batch size, captured on first use."""
    import torch

    graphs = {}

    def eps(x, t, y):
        xs, ts, ys = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (x, t, y))
        if unet != "cudagraph":
            with torch.inference_mode(), autocast(device, precision):
                return model(xs, ts, ys).float().cpu().numpy()
        n = len(x)
        if n not in graphs:
            static = [a.clone() for a in (xs, ts, ys)]

            def call():
                with torch.inference_mode():
                    return model(*static)

            replay, out = graphed(call, device)
            graphs[n] = (static, replay, out)
        static, replay, out = graphs[n]
        for dst, src in zip(static, (xs, ts, ys)):
            dst.copy_(src)
        replay()
        return out.float().cpu().numpy()

    return eps


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def _cell(row: dict | None, key: str, fmt: str = "{:.3f}") -> str:
    if row is None:
        return ""
    if "skipped" in row:
        return "skipped"
    if "error" in row:
        return "error"
    value = row.get(key)
    return "" if value is None else fmt.format(value)


def headline(result: dict) -> list[str]:
    """The few sentences the README quotes: best U-Net variant at the largest batch, and what the host loop costs."""
    lines = []
    unet = [r for r in result["unet"] if "ms" in r]
    if unet:
        largest = max(r["rows"] for r in unet)
        at = {r["variant"]: r for r in unet if r["rows"] == largest}
        best = min(at.values(), key=lambda r: r["ms"])
        base = at.get("fp32")
        versus = f", {base['ms'] / best['ms']:.2f}x eager fp32's {base['ms']:.3f} ms" if base else ""
        lines.append(f"U-Net at {largest} rows: fastest is {best['variant']} at {best['ms']:.3f} ms per call "
                     f"({best['rows_per_s']:.0f} rows/s{versus}).")
        small = {r["variant"]: r for r in unet if r["rows"] == min(x["rows"] for x in unet)}
        if small:
            fastest = min(small.values(), key=lambda r: r["ms"])
            lines.append(f"U-Net at {fastest['rows']} row(s): {fastest['variant']} {fastest['ms']:.3f} ms per call; "
                         f"eager fp32 {small['fp32']['ms']:.3f} ms." if "fp32" in small else "")
    loop = [r for r in result["loop"] if "ms" in r]
    for b in sorted({r["images"] for r in loop}):
        rows = {(r["loop"], r["unet"]): r for r in loop if r["images"] == b}
        host, fastest = rows.get(("host", "tf32")), min((r for r in rows.values()), key=lambda r: r["ms"])
        if host is not None and fastest is not host:
            lines.append(f"DPM-Solver++-{result['settings']['steps']} at B={b}: host numpy loop (TF32 U-Net) "
                         f"{host['ms']:.1f} ms, {fastest['loop']} loop ({fastest['unet']}) {fastest['ms']:.1f} ms: "
                         f"{host['ms'] / fastest['ms']:.1f}x; the host loop spends "
                         f"{100 * (1 - fastest['ms'] / host['ms']):.0f}% of its time outside the fastest loop's work.")
    return [line for line in lines if line]


def render(result: dict) -> str:
    env = result["environment"]
    s = result["settings"]
    out = ["# GPU benchmark (benchmarks/gpu.py)", "",
           f"Device: {env.get('gpu', s['device'])}; torch {env.get('torch')}, CUDA {env.get('cuda', '-')}, "
           f"cuDNN {env.get('cudnn', '-')}; Python {env.get('python')}; onnxruntime {env.get('onnxruntime')}; "
           f"{env.get('cpus')} CPUs. Checkpoint: `{Path(result['checkpoint']).name}` "
           f"({Path(result['checkpoint']).parent.name}). Run took {result.get('elapsed_s', 0):.0f} s.", ""]
    if s["time_limit_s"] < 200 or s["min_iters"] < 5:
        out += ["**Smoke settings** (few iterations): the numbers show that the code runs, not how fast.", ""]
    lines = headline(result)
    if lines:
        out += ["## Headline", ""] + [f"- {line}" for line in lines] + [""]
    out += ["## U-Net per call", "",
            "Median ms per call (each call waited for); rows/s and achieved TFLOP/s of the fastest variant; "
            "`max |d eps|` is the largest difference from eager fp32 (TF32 off) over that call's outputs.", ""]
    rows = result["unet"]
    batches = sorted({r["rows"] for r in rows})
    out.append("| rows | " + " | ".join(UNET_VARIANTS) + " | fastest rows/s | TFLOP/s | max abs diff bf16 / fp16 |")
    out.append("|---:|" + "---:|" * len(UNET_VARIANTS) + "---:|---:|---|")
    for n in batches:
        at = {r["variant"]: r for r in rows if r["rows"] == n}
        ok = [r for r in at.values() if "ms" in r]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        diffs = " / ".join(_cell(at.get(v), "max_abs_diff", "{:.2g}") for v in ("bf16", "fp16"))
        out.append(f"| {n} | " + " | ".join(_cell(at.get(v), "ms") for v in UNET_VARIANTS)
                   + f" | {_cell(best, 'rows_per_s', '{:.0f}')} | {_cell(best, 'tflops', '{:.2f}')} | {diffs} |")
    out += ["", "## DPM-Solver++(2M), {steps} steps, guidance {g:g}: the whole sampling call".format(
        steps=s["steps"], g=s["guidance"]), "",
            "host: serving/sampling.py in numpy, the U-Net on the device with one copy in and out per step (today's "
            "client loop without the network); device: the same math in torch (benchmarks/torch_sampling.py); "
            "device-graph: that loop captured as one CUDA graph. `max |d x0|`: largest difference of the images "
            "from the host loop on the fp32 U-Net.", "",
            "| images | loop | U-Net | ms per call | images/s | ms per step | max abs d x0 | first call s |",
            "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in result["loop"]:
        out.append(f"| {r['images']} | {r['loop']} | {r['unet']} | {_cell(r, 'ms', '{:.2f}')} | "
                   f"{_cell(r, 'images_per_s', '{:.1f}')} | {_cell(r, 'ms_per_step', '{:.3f}')} | "
                   f"{_cell(r, 'max_abs_diff', '{:.2g}')} | {_cell(r, 'first_call_s', '{:.2f}')} |")
    problems = [r for r in (*result["unet"], *result["loop"]) if "error" in r or "skipped" in r]
    if problems or result["notes"]:
        out += ["", "## Rows not measured", ""]
        for r in problems:
            key = ", ".join(f"{k}={r[k]}" for k in ("rows", "images", "variant", "loop", "unet") if k in r)
            out.append(f"- {key}: {r.get('error') or r.get('skipped')}")
        out += [f"- {note}" for note in result["notes"]]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trident.benchmarks.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md (created)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--smoke", action="store_true", help="two batch sizes, one timed call each: checks that it runs")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--time-limit", type=float, default=None, help="seconds; rows not started by then are skipped")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; the CPU smoke test uses aot_eager: no C++ build)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu.py: torch sees no CUDA device; run with --device cpu for the CPU smoke run", file=sys.stderr)
        return 2
    if not args.checkpoint.is_file():
        print(f"gpu.py: no checkpoint at {args.checkpoint}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings.smoke(args.device) if args.smoke else Settings(device=args.device)
    overrides = {k: v for k, v in (("time_limit_s", args.time_limit), ("compile_backend", args.compile_backend))
                 if v is not None}
    settings = dataclasses.replace(settings, **overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    run = Run(args.out, settings, args.checkpoint)
    run.result["environment"] = environment(args.device)
    print(f"gpu.py: {json.dumps(run.result['environment'])}", flush=True)
    model, card = load_unet(args.checkpoint, args.device)
    try:  # torch.compile last: its compilations take the longest, and the time limit cuts them first
        unet_rows(run, model, card, [v for v in UNET_VARIANTS if v != "compile"])
        loop_rows(run, model, card)
        unet_rows(run, model, card, ["compile"])
    finally:
        run.save()
        (args.out / "gpu.md").write_text(render(run.result))
    for line in headline(run.result):
        print(f"gpu.py: {line}")
    print(f"gpu.py: wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'} in {run.result['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""pytest-benchmark JSON -> report.md (tables with absolute figures and the ratios between them, the issue's targets
with PASS/FAIL) and bar charts (PNG, drawn with Pillow).

    python -m trident.benchmarks.report benchmarks/results/latest.json [--out DIR]

Every benchmark carries extra_info["item"] (peak, step, cfg, e2e, loop, stream, peer, concurrency, oneshot,
scaling, student) and the fields that identify it; this module reads those, never test names. Times are medians over
rounds unless a cell says otherwise; ratios are taken between medians measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from trident.benchmarks.charts import bars, save_panels
from trident.benchmarks.settings import SAMPLER_LABELS, STUDENT_STEPS

STEP_BACKENDS = ("torch", "ort-whole", "ort", "triton-http", "triton-grpc", "ort-cudagraph")
STEP_LABELS = {"torch": "PyTorch eager", "ort-whole": "ORT, row shards off", "ort": "ORT in-process",
               "triton-http": "Triton HTTP",
               "triton-grpc": "Triton gRPC", "ort-cudagraph": "ORT + CUDA graph"}
PEER_LABELS = {"diffusers-torch": "diffusers loop (PyTorch)", "ours-triton": "ours, Triton client",
               "ours-ort": "ours, ORT in-process", "ours-torch": "ours, PyTorch backend"}



@dataclass(frozen=True)
class Target:
    """One target of the issues: a measured value passes when it is >= bound (at_least) or <= bound."""

    bound: float
    at_least: bool = True

    def check(self, value: float | None) -> bool | None:
        """PASS/FAIL, or None where nothing was measured."""
        if value is None:
            return None
        return value >= self.bound if self.at_least else value <= self.bound


# The issues' targets, in one table.
TARGETS = {
    "peak_fraction": Target(0.75),           # U-Net step at the largest bucket, fraction of the measured matmul peak
    "triton_overhead": Target(0.10, False),  # Triton client loop over in-process ORT
    "cfg_speedup": Target(1.6),              # batched CFG against two calls at B=1
    "peer_ratio": Target(1.5),               # images/s against the diffusers loop peer
    # issue "Reduced precision at equal quality"
    "auto_step": Target(2.0),                # auto U-Net step vs ORT fp32 in one session, at b8 and b32 (bf16 CPUs)
    "auto_served": Target(1.8),              # served DPM-Solver++-20 at B=8, auto repository vs fp32 repository
    "auto_peer": Target(3.0),                # the same vs the diffusers loop peer
    "memory_mb": Target(200, False),         # resident memory of each U-Net host (MEMORY_HOSTS)
    # issue "Beyond one machine"
    "replica_scaling": Target(1.7),          # images/s of 2 replicas on 2 cores over 1 replica on 1 core
    # issue 19 (the distilled student)
    "student_speedup": Target(8.0),          # served images/s at B=8, student 4 steps vs teacher DPM-Solver++-20
}
PRECISION_LABELS = {"ort-session": "ORT fp32, one session", "onnxruntime-fp32": "ORT fp32 (row shards)",
                    "onnxruntime-int8": "ORT int8", "openvino-fp32": "OpenVINO fp32", "openvino-bf16": "OpenVINO bf16",
                    "openvino-int8": "OpenVINO int8", "auto": "auto", "torch-compile": "torch.compile"}
MEMORY_HOSTS = ("diffusion_unet", "diffusion_sampler", "diffusion_sampler_stream")  # the models that run the U-Net
ISSUE_E2E = ("dpmpp-2m", 20, 8)  # sampler, steps, B of the serving-overhead and peer targets


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

def load(path) -> dict:
    data = json.loads(Path(path).read_text())
    if "benchmarks" not in data:
        raise ValueError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' key)")
    return data


def items(data: dict, item: str) -> list[dict]:
    return [b for b in data["benchmarks"] if b.get("extra_info", {}).get("item") == item]


def med(b: dict | None) -> float | None:
    return None if b is None else b["stats"]["median"]


def mean(b: dict | None) -> float | None:
    return None if b is None else b["stats"]["mean"]


def best(b: dict | None) -> float | None:
    return None if b is None else b["stats"]["min"]


def find(bs: list[dict], **match) -> dict | None:
    for b in bs:
        if all(b["extra_info"].get(k) == v for k, v in match.items()):
            return b
    return None


def measured_where(data: dict, bs: list[dict]) -> str:
    """Where the figures of `bs` were measured, when some came from a merged-in run (which may be another machine
    than the run the report describes): "" when all are the base run's."""
    # a benchmark merged twice belongs to the later merge (an earlier record is kept while some of its others stay)
    owner = {name: i for i, m in enumerate(data.get("merged", [])) for name in m.get("benchmarks", [])}
    runs = {owner.get(b.get("fullname")) for b in bs}
    if runs <= {None}:
        return ""
    if len(runs) > 1:
        return "measured in more than one run (the header lists them)"
    m = data["merged"][runs.pop()]
    return f"merged in: measured {str(m.get('datetime', '?'))[:16]} on {m.get('machine') or 'an unrecorded machine'}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# ----------------------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------------------

def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    v = 1e3 * seconds
    return f"{v:.3g}" if v < 100 else f"{v:,.0f}"


def ms_cell(b: dict | None, per: int = 1) -> str:
    """'median (mean)' in ms, divided by `per` (images)."""
    if b is None:
        return "-"
    return f"{ms(med(b) / per)} ({ms(mean(b) / per)})"


def num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 10 ** digits else f"{v:.{digits}g}"


def times(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def pct(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.1f}%" if signed else f"{100 * v:.1f}%"


def table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Markdown table; the first `left` columns align left, the figures right."""
    rule = "|".join("---" if i < left else "---:" for i in range(len(header)))
    out = ["| " + " | ".join(header) + " |", f"|{rule}|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**PASS**" if ok else "**FAIL**")


def run_label(sampler: str, steps: int) -> str:
    return f"{SAMPLER_LABELS.get(sampler, sampler)}-{steps}"


# ----------------------------------------------------------------------------------------------------------------
# Analysis: each returns (markdown lines, figures for targets and plots)
# ----------------------------------------------------------------------------------------------------------------

REDUCED_PEAK_DTYPES = ("bfloat16", "int8")  # peaks of the precision rows (section 7), not "the" peak


def analyse_peak(data):
    bs = [b for b in items(data, "peak") if b["extra_info"]["dtype"] not in REDUCED_PEAK_DTYPES]
    rows, peak, peak_of, dtype = [], None, None, "fp32"
    for b in sorted(bs, key=lambda b: (b["extra_info"]["impl"], b["extra_info"]["n"])):
        e = b["extra_info"]
        g_best, g_med = e["flops"] / best(b) / 1e9, e["flops"] / med(b) / 1e9
        if peak is None or g_best > peak:
            peak, peak_of = g_best, f"{e['impl']} {e['dtype']} matmul n={e['n']}"
            dtype = {"float32": "fp32", "float16": "fp16"}.get(e["dtype"], e["dtype"])
        rows.append([e["impl"], f"{e['n']}x{e['n']}", e["dtype"], ms(best(b)), ms(med(b)), f"{g_best:.1f}",
                     f"{g_med:.1f}", b["stats"]["rounds"]])
    lines = table(["matmul", "size", "dtype", "best ms", "median ms", "GFLOP/s (best)", "GFLOP/s (median)", "rounds"],
                  rows)
    if peak is not None:
        lines += [f"Peak used below: **{peak:.1f} GFLOP/s** ({peak_of}, best of its rounds).", ""]
    return lines, {"peak_gflops": peak, "dtype": dtype}


def analyse_step(data, peak):
    bs = items(data, "step")
    buckets = sorted({b["extra_info"]["bucket"] for b in bs})
    present = {b["extra_info"]["backend"] for b in bs}
    # the GPU-only CUDA graph column and the CPU-only row-shards-off column only where measured
    backends = [k for k in STEP_BACKENDS if k in present or k not in ("ort-cudagraph", "ort-whole")]
    rows, speedups, plot = [], {}, {k: [] for k in backends}
    gflops_at, shard_gain = {}, {}
    for n in buckets:
        got = {k: find(bs, bucket=n, backend=k) for k in backends}
        flops = next((b["extra_info"]["flops"] for b in got.values() if b), None)
        speed = ratio(med(got["torch"]), med(got["ort"]))
        speedups[n] = speed
        g_ort = flops / med(got["ort"]) / 1e9 if flops and got["ort"] else None
        gflops_at[n] = g_ort
        over = {k: ratio(med(got[k]), med(got["ort"])) for k in ("triton-http", "triton-grpc")}
        graph = [times(ratio(med(got["ort"]), med(got["ort-cudagraph"])))] if "ort-cudagraph" in backends else []
        shards = [times(ratio(med(got["ort-whole"]), med(got["ort"])))] if "ort-whole" in backends else []
        shard_gain[n] = ratio(med(got.get("ort-whole")), med(got["ort"])) if shards else None
        rows.append([f"b{n}", num(flops / 1e9 if flops else None), *(ms_cell(got[k]) for k in backends),
                     times(speed), *shards, *(pct(None if v is None else v - 1, signed=True) for v in over.values()),
                     *graph, num(g_ort), pct(ratio(g_ort, peak))])
        for k in backends:
            plot[k].append(None if got[k] is None else 1e3 * med(got[k]))
    header = ["bucket", "GFLOP/step", *(f"{STEP_LABELS[k]} ms" for k in backends), "ORT speedup vs torch",
              *(["row shards on vs off"] if "ort-whole" in backends else []), "Triton HTTP vs ORT", "Triton gRPC vs ORT",
              *(["CUDA graph speedup vs ORT"] if "ort-cudagraph" in backends else []), "ORT GFLOP/s", "% of peak"]
    lines = table(header, rows)
    lines += ["GFLOP/step counts matmul, convolution and attention products (torch FlopCounterMode, 2 FLOP per "
              "multiply-add); norms and activations are not counted, so % of peak is a lower bound on how busy the "
              "cores are. GFLOP/s and % of peak use the median step time.", ""]
    all_gflops = {}
    for b in bs:
        all_gflops.setdefault(b["extra_info"]["bucket"], {})[b["extra_info"]["backend"]] = (
            b["extra_info"]["flops"] / med(b) / 1e9)
    if buckets:
        top = buckets[-1]
        lines += [f"GFLOP/s at the largest bucket (b{top}): " + ", ".join(
            f"{STEP_LABELS[k]} {v:.1f} ({pct(ratio(v, peak))} of peak)" for k, v in all_gflops[top].items()) + ".", ""]
    return lines, {"speedups": speedups, "largest": buckets[-1] if buckets else None, "ort_gflops": gflops_at,
                   "shard_gain": shard_gain, "plot": (buckets, plot)}


def _plan(b: dict | None) -> str:
    return "-" if b is None else "+".join(str(n) for n in b["extra_info"].get("buckets_run", [])) or "-"


def analyse_cfg(data):
    bs = items(data, "cfg")
    rows, speedups = [], {}
    for B in sorted({b["extra_info"]["B"] for b in bs}):
        batched, two = find(bs, B=B, mode="batched"), find(bs, B=B, mode="two-calls")
        speedups[B] = ratio(med(two), med(batched))
        proto = (batched or two)["extra_info"].get("protocol")
        rows.append([f"B={B}", f"1 x {2 * B} rows", _plan(batched), ms_cell(batched), f"2 x {B} rows", _plan(two),
                     ms_cell(two), times(speedups[B]), proto])
    lines = table(["batch", "batched", "static batches run", "batched ms", "two calls", "static batches run",
                   "two calls ms", "two calls / batched", "protocol"], rows)
    lines += ["'Static batches run' lists the exported batch sizes the rows were padded into; a row count that "
              "is not a bucket pays for the padding.", ""]
    return lines, {"speedups": speedups}


def analyse_e2e(data):
    bs = items(data, "e2e")
    runs = sorted({(b["extra_info"]["sampler"], b["extra_info"]["steps"], b["extra_info"]["images"]) for b in bs},
                  key=lambda r: (-r[1], r[0]))
    rows, overhead, plot = [], {}, ([], {"ORT in-process": [], "Triton": []})
    for sampler, steps, n in runs:
        ort, tri = find(bs, sampler=sampler, steps=steps, images=n, backend="ort"), \
            find(bs, sampler=sampler, steps=steps, images=n, backend="triton")
        over = ratio(med(tri), med(ort))
        overhead[(sampler, steps, n)] = None if over is None else over - 1
        rounds = max((b["stats"]["rounds"] for b in (ort, tri) if b), default=0)
        rows.append([run_label(sampler, steps), n, num(ratio(n, med(ort))), ms_cell(ort, n), num(ratio(n, med(tri))),
                     ms_cell(tri, n), pct(overhead[(sampler, steps, n)], signed=True), rounds,
                     (tri or {}).get("extra_info", {}).get("protocol", "-")])
        plot[0].append(f"{run_label(sampler, steps)} B{n}")
        plot[1]["ORT in-process"].append(ratio(n, med(ort)))
        plot[1]["Triton"].append(ratio(n, med(tri)))
    lines = table(["sampler", "B", "ORT images/s", "ORT ms/image", "Triton images/s", "Triton ms/image",
                   "serving overhead", "rounds", "protocol"], rows)
    return lines, {"overhead": overhead, "plot": plot, "runs": runs}


def analyse_loop(data):
    bs = items(data, "loop")
    if not bs:
        return [], {"speedups": {}}
    rows, speedups = [], {}

    def requests(b):
        return "-" if b is None else b["extra_info"].get("requests", "-")

    for n in sorted({b["extra_info"]["images"] for b in bs}):
        client, server = find(bs, images=n, loop="client"), find(bs, images=n, loop="server")
        speedups[n] = ratio(med(client), med(server))
        e = (client or server)["extra_info"]
        rows.append([run_label(e["sampler"], e["steps"]), n, requests(client), ms_cell(client, n), requests(server),
                     ms_cell(server, n), times(speedups[n]), e.get("protocol", "-")])
    lines = table(["sampler", "B", "client loop requests", "client loop ms/image", "server loop requests",
                   "server loop ms/image", "client / server", "protocol"], rows)
    return lines, {"speedups": speedups}


def analyse_stream(data):
    """3c: the server-side loop streamed (the benchmark's own timings) vs answered once (timed in the same rounds,
    extra_info one_response_s), same server, gRPC."""
    rows, ratios = [], {}
    for b in sorted(items(data, "stream"), key=lambda b: b["extra_info"]["images"]):
        e, n = b["extra_info"], b["extra_info"]["images"]
        once = e.get("one_response_s") or []
        once_med, once_mean = (statistics.median(once), statistics.mean(once)) if once else (None, None)
        ratios[n] = ratio(med(b), once_med)
        once_cell = "-" if once_med is None else f"{ms(once_med / n)} ({ms(once_mean / n)})"
        rows.append([run_label(e["sampler"], e["steps"]), n, once_cell, ms_cell(b, n),
                     pct(None if ratios[n] is None else ratios[n] - 1, signed=True), len(once), e.get("protocol", "-")])
    if not rows:
        return [], {"ratios": ratios}
    lines = table(["sampler", "B", "one response ms/image", "streamed ms/image", "streaming cost", "rounds",
                   "protocol"], rows)
    return lines, {"ratios": ratios}


def analyse_student(data):
    """Section 9: the distilled student against its teacher, served: per B, each one's ms/image and images/s (the
    teacher timed by hand in the same rounds, extra_info teacher_s), and the ratio of their images/s."""
    bs = sorted(items(data, "student"), key=lambda b: b["extra_info"]["images"])
    rows, speedups, latency = [], {}, {}
    for b in bs:
        e, n = b["extra_info"], b["extra_info"]["images"]
        teacher = e.get("teacher_s") or []
        t_med, t_mean = (statistics.median(teacher), statistics.mean(teacher)) if teacher else (None, None)
        speedups[n] = ratio(t_med, med(b))  # images/s ratio = inverse time ratio, same B
        latency[n] = (t_med, med(b))
        rows.append([n, e["teacher_rows"] // n, "-" if t_med is None else f"{ms(t_med / n)} ({ms(t_mean / n)})",
                     num(ratio(n, t_med)), e["rows"] // n, ms_cell(b, n), num(ratio(n, med(b))), times(speedups[n]),
                     b["stats"]["rounds"]])
    if not rows:
        return [], {"speedups": speedups}
    e = bs[0]["extra_info"]
    teacher_label, student_label = run_label(e["teacher_sampler"], e["teacher_steps"]), run_label(e["sampler"],
                                                                                                  e["steps"])
    checkpoints = ", ".join(f"{k} {v or '?'}" for k, v in e.get("checkpoints", {}).items())
    precision = "; ".join(f"{graph} {v if isinstance(v, str) else '+'.join(v)}"
                          for graph, v in e.get("precision", {}).items()) or "-"
    lines = [f"Teacher {teacher_label} (one request of 2B rows, [cond; null], per step) against the student "
             f"{student_label} ({e['spacing']} spacing; one row per image per step, the guidance scale an input of "
             f"its U-Net), both at guidance {e['guidance']:g}, from the same Triton server and repository (precision: "
             f"{precision}), through the {e['loop']} loop (item 3's headline; {e['protocol']}). The two alternate "
             "round by round. " + (f"Checkpoints (sha256[:12]): {checkpoints}; the" if checkpoints else "The")
             + f" student's card: distilled steps {e.get('distilled_steps')}, guidance range "
               f"{e.get('guidance_range')}." + (f" Figures {where}." if (where := measured_where(data, bs)) else ""),
             ""]
    lines += table(["B", "teacher rows/image", "teacher ms/image", "teacher images/s", "student rows/image",
                    "student ms/image", "student images/s", "student / teacher images/s", "rounds"], rows)
    if 1 in latency and None not in latency[1]:
        t, s_ = latency[1]
        lines += [f"Latency of one image (B=1, median): teacher {ms(t)} ms, student {ms(s_)} ms "
                  f"(**{times(ratio(t, s_))}** faster).", ""]
    if e.get("distilled_steps") != e["steps"]:
        distilled = ("was not step-distilled (a guidance-only student)" if e.get("distilled_steps") is None else
                     f"was distilled for {e['distilled_steps']} steps, not the {e['steps']} measured here")
        lines += [f"Note: the served student {distilled}: these are the timings of {e['steps']} steps, not a "
                  f"{e['steps']}-step student's quality.", ""]
    return lines, {"speedups": speedups, "labels": (teacher_label, student_label)}


def analyse_peer(data):
    bs = items(data, "peer")
    lines, ratios, plot = [], {}, ([], {})
    for steps, n in sorted({(b["extra_info"]["steps"], b["extra_info"]["images"]) for b in bs}):
        peer = find(bs, steps=steps, images=n, impl="diffusers-torch")
        rows = []
        for impl, label in PEER_LABELS.items():
            b = find(bs, steps=steps, images=n, impl=impl)
            r = ratio(med(peer), med(b))  # images/s ratio = inverse time ratio
            ratios[(steps, n, impl)] = r
            rows.append([label, num(ratio(n, med(b))), ms_cell(b, n), times(r)])
            plot[1].setdefault(label, []).append(ratio(n, med(b)))
        plot[0].append(f"DPM-Solver++-{steps} B{n}")
        lines += [f"DPM-Solver++(2M), {steps} steps, B={n}, guidance in one batched call:", ""]
        lines += table(["implementation", "images/s", "ms/image", "images/s vs diffusers"], rows)
        r = ratios.get((steps, n, "ours-triton"))
        if r is not None:
            lines += [f"Our Triton client draws **{r:.2f}x** the images/s of the diffusers loop on the same weights.",
                      ""]
    return lines, {"ratios": ratios, "plot": plot}


def analyse_concurrency(data):
    bs = sorted(items(data, "concurrency"), key=lambda b: b["extra_info"]["clients"])
    rows, plot = [], ([], {"images/s": [], "p50 ms/image": [], "p99 ms/image": []})
    for b in bs:
        e = b["extra_info"]
        il, rl, bt = e["image_latency"], e["request_latency"], e["batcher"]
        rows.append([e["clients"], e["images"], num(e["images_per_s"]),
                     " / ".join(num(il[k]) for k in ("p50_ms", "p90_ms", "p99_ms")),
                     " / ".join(num(rl[k]) for k in ("p50_ms", "p90_ms", "p99_ms")),
                     num(bt["avg_batch_rows"]), num(bt["avg_requests_per_execution"]),
                     num(bt["queue_us_per_request"]), num(bt["compute_us_per_request"]), int(bt["executions"])])
        plot[0].append(f"{e['clients']} clients")
        plot[1]["images/s"].append(e["images_per_s"])
        plot[1]["p50 ms/image"].append(il["p50_ms"])
        plot[1]["p99 ms/image"].append(il["p99_ms"])
    lines = []
    if bs:
        e = bs[0]["extra_info"]
        lines += [f"Each client draws {e['images'] // e['clients']} image(s) one after another, DPM-Solver++ "
                  f"{e['steps']} steps with guidance: one request of 2 rows per step ({e['protocol']}; "
                  f"max_batch_size {e.get('max_batch')}). Batcher figures are deltas of Triton's metrics for the "
                  "U-Net over the measured round.", ""]
    lines += table(["clients", "images", "images/s", "ms/image p50 / p90 / p99", "ms/request p50 / p90 / p99",
                    "avg batch (rows)", "requests per execution", "queue us/request", "compute us/request",
                    "executions"], rows)
    return lines, {"plot": plot}


def analyse_scaling(data):
    """Section 8: images/s from 1 and 2 pinned replicas per loop, the ratio, and where the cores' time went."""
    bs = items(data, "scaling")
    rows, ratios = [], {}
    for loop in ("client", "server"):
        one = find(bs, loop=loop, replicas=1)
        for b in sorted((b for b in bs if b["extra_info"]["loop"] == loop), key=lambda b: b["extra_info"]["replicas"]):
            e = b["extra_info"]
            r = ratio(e["images_per_s"], (one or {}).get("extra_info", {}).get("images_per_s"))
            if e["replicas"] == 2:
                ratios[loop] = r
            share = e["share"]
            rows.append([f"{loop} loop", e["replicas"], ",".join(map(str, e["cores"])), e["clients"],
                         num(e["images_per_s"]), times(r),
                         " / ".join(pct(v) for v in e["core_busy"].values()),
                         " / ".join(pct(v) for v in e["replica_cpu"]),
                         pct(share["replicas"]), pct(share["clients"]), pct(share["other"]), pct(share["idle"]),
                         " / ".join(str(n) for n in e["requests_per_replica"])])
    if not rows:
        return [], {"ratios": ratios}
    e = bs[0]["extra_info"]
    lines = [f"{run_label(e['sampler'], e['steps'])} at B={e['batch']}, guidance in one batched call, {e['protocol']}; "
             f"{e['clients']} concurrent clients (one SDK client per thread over the replicas' addresses), "
             f"{e['draws_per_client']} draw(s) each per round. Replica i runs pinned to core i (its tritonserver and "
             "model stubs); the client process is pinned to the same cores, so each core is a machine with its "
             "replica and its share of the clients. Shares are of the measured cores' time (wall x cores) over the "
             "rounds: the replicas' processes, the client process, other processes on the machine, idle. "
             "Requests: U-Net requests (client loop) or loop requests (server loop) each replica answered.", ""]
    lines += table(["loop", "replicas", "cores", "clients", "images/s", "vs 1 replica", "core busy",
                    "replica CPU (cores)", "replicas' share", "clients' share", "other", "idle",
                    "requests per replica"], rows)
    for loop, r in ratios.items():
        b = find(bs, loop=loop, replicas=2)
        if r is None or b is None:
            continue
        share = b["extra_info"]["share"]
        limits = sorted(((share[k], k) for k in ("clients", "other", "idle")), reverse=True)
        lines += [f"{loop} loop: 2 replicas draw **{r:.2f}x** the images/s of one; of the two cores' time the replicas "
                  f"used {pct(share['replicas'])}, the rest went to " + ", ".join(f"{k} {pct(v)}" for v, k in limits)
                  + " (what is not the replicas' is what keeps the ratio under 2x).", ""]
    return lines, {"ratios": ratios}


def analyse_oneshot(data, e2e_triton: dict) -> list[str]:
    """GAN/VAE per-image latency, and how many one-shot images each diffusion run's image costs (Triton both)."""
    bs = items(data, "oneshot")
    rows, per_image = [], {}  # (kind, B) -> Triton seconds per image
    for kind in ("gan", "vae"):
        for n in sorted({b["extra_info"]["images"] for b in bs if b["extra_info"]["kind"] == kind}):
            ort, tri = find(bs, kind=kind, images=n, backend="ort"), find(bs, kind=kind, images=n, backend="triton")
            per_image[(kind, n)] = ratio(med(tri), n)
            over = ratio(med(tri), med(ort))
            rows.append([kind.upper(), (ort or tri)["extra_info"]["graph"], n, ms_cell(ort, n), ms_cell(tri, n),
                         pct(None if over is None else over - 1, signed=True)])
    lines = table(["model", "graph", "B", "ORT ms/image", "Triton ms/image", "Triton vs ORT"], rows)
    missing = [k.upper() for k in ("gan", "vae") if not any(b["extra_info"]["kind"] == k for b in bs)]
    if missing:
        lines += [f"Not measured: {', '.join(missing)} (no checkpoint in this run).", ""]
    # Contrast at the largest one-shot batch of each kind (its best per-image cost).
    largest = {kind: max(n for k, n in per_image if k == kind) for kind, _ in per_image}
    if largest and e2e_triton:
        header = ["diffusion run (Triton)", "ms/image"] + [f"x {k.upper()} image (B={n})" for k, n in largest.items()]
        contrast = []
        for (sampler, steps, n), t in e2e_triton.items():
            contrast.append([f"{run_label(sampler, steps)}, B={n}", ms(t / n)] + [
                "-" if not per_image[(k, m)] else f"{t / n / per_image[(k, m)]:,.0f}x" for k, m in largest.items()])
        lines += ["Diffusion vs one-shot generators, per image:", ""] + table(header, contrast)
    return lines


def analyse_precision(data):
    """Section 7: per bucket, every runtime and precision; the auto choice; served auto vs fp32; memory."""
    bs = items(data, "precision")
    if not bs:
        return [], {}
    peaks = {}
    for b in items(data, "peak"):
        e = b["extra_info"]
        key = {"float32": "fp32", "bfloat16": "bf16", "int8": "int8"}.get(e["dtype"])
        if key and e.get("device", "cpu") == "cpu":
            peaks[key] = max(peaks.get(key, 0.0), e["flops"] / best(b) / 1e9)
    buckets = sorted({b["extra_info"]["bucket"] for b in bs})
    backends = [k for k in PRECISION_LABELS if any(b["extra_info"]["backend"] == k for b in bs)]
    rows, speed, plot = [], {}, {PRECISION_LABELS[k]: [] for k in backends}
    auto_choice = {}
    for n in buckets:
        got = {k: find(bs, bucket=n, backend=k) for k in backends}
        base = med(got.get("ort-session"))
        cells = []
        for k in backends:
            b = got[k]
            if b is None:
                cells.append("-")
                plot[PRECISION_LABELS[k]].append(None)
                continue
            g = b["extra_info"]["flops"] / med(b) / 1e9
            peak = peaks.get(b["extra_info"]["precision"])
            cells.append(f"{ms(med(b))} ({times(ratio(base, med(b)))}, {pct(ratio(g, peak))})")
            plot[PRECISION_LABELS[k]].append(1e3 * med(b))
            speed[(n, k)] = ratio(base, med(b))
        if got.get("auto"):
            auto_choice = got["auto"]["extra_info"].get("choice", auto_choice)
        rows.append([f"b{n}", *cells, auto_choice.get(str(n), "-")])
    lines = table(["bucket", *(PRECISION_LABELS[k] for k in backends), "auto chose"], rows)
    lines += ["Each cell: median ms (speedup vs ORT fp32 in one session, % of the matching matmul peak measured in this "
              "run: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in sorted(peaks.items())) + "). int8 rows count "
              "int8 operations against the int8 GEMM peak; bf16 against the bf16 GEMM peak.", ""]
    cpu = next((b["extra_info"].get("cpu") for b in bs if b["extra_info"].get("cpu")), None)
    if cpu:
        where = measured_where(data, bs)
        lines += [f"CPU of this table: {cpu['model']}, {cpu['cores']} cores; flags in play: "
                  f"{', '.join(cpu['flags']) or 'none'}{' (' + where + ')' if where else ''}.", ""]
    served = items(data, "precision-e2e")
    srows, served_ratio = [], {}
    for n in sorted({b["extra_info"]["images"] for b in served}):
        fp32, auto = find(served, images=n, repo="fp32"), find(served, images=n, repo="auto")
        served_ratio[n] = ratio(med(fp32), med(auto))
        srows.append([n, ms_cell(fp32, n), ms_cell(auto, n), times(served_ratio[n])])
    if srows:
        steps = served[0]["extra_info"]["steps"]
        where = measured_where(data, served)
        lines += [f"Served DPM-Solver++-{steps} (client loop, gRPC, guidance in one batched call), the fp32 repository "
                  "against one built with `--precision auto` on the machine that served them"
                  f"{' (' + where + ')' if where else ''}:", ""]
        lines += table(["B", "fp32 repository ms/image", "auto repository ms/image", "auto speedup"], srows)
    mem_bs = items(data, "memory")
    memory = {b["extra_info"]["repo"]: b["extra_info"]["resident_mb"] for b in mem_bs}
    if memory:
        models = sorted({m for v in memory.values() for m in v})
        wheres = [f"'{b['extra_info']['repo']}' {w}" for b in mem_bs if (w := measured_where(data, [b]))]
        lines += ["Resident memory of each served model's Python-backend stub (VmRSS, MB): a fresh server once ready "
                  "(after Triton's warm-up requests), and the suite's servers after the benchmarks' traffic (a "
                  "B=32 sampling loop sends 64-row calls, whose sessions and activations stay)"
                  + (f"; column {'; '.join(wheres)}" if wheres else "") + ":", ""]
        lines += table(["model", *memory], [[m, *(num(v.get(m), 0) if v.get(m) else "-" for v in memory.values())]
                                           for m in models])
    return lines, {"speed": speed, "choice": auto_choice, "served": served_ratio, "memory": memory, "cpu": cpu,
                   "plot": ([f"b{n}" for n in buckets], plot)}


def precision_targets(prec: dict, peer_images_per_s: float | None, auto_images_per_s: float | None) -> list[list]:
    rows = []
    bf16_cpu = bool(prec.get("cpu")) and any(f in prec["cpu"]["flags"] for f in ("amx_bf16", "avx512_bf16"))
    measured = {n for n, _ in prec["speed"]}
    for n in [n for n in (8, 32) if n in measured]:  # the issue's buckets, where this run exported them
        v = prec["speed"].get((n, "auto"))
        rows.append([f"auto U-Net step >= {TARGETS['auto_step'].bound}x ORT fp32 (one session) at b{n}"
                     + ("" if bf16_cpu else " (only on a CPU with AMX or AVX512-BF16)"),
                     "-" if v is None else f"{v:.2f}x ({prec['choice'].get(str(n), '-')})",
                     verdict(TARGETS["auto_step"].check(v) if bf16_cpu else None)])
    slower = [(n, prec["speed"].get((n, "auto")), prec["speed"].get((n, "onnxruntime-fp32")))
              for n in sorted({n for n, _ in prec["speed"]})]
    slower = [(n, a, f) for n, a, f in slower if a is not None and f is not None]
    worst = min(((a / f, n) for n, a, f in slower), default=None)
    rows.append(["auto never slower than fp32 (ORT fp32 as served) at any bucket",
                 "-" if worst is None else f"worst: auto {worst[0]:.2f}x fp32 at b{worst[1]}",
                 verdict(None if worst is None else worst[0] >= 0.97)])
    big = max(prec["served"], default=None)
    s8 = prec["served"].get(big)
    rows.append([f"served DPM-Solver++-20 at B={big}: auto >= {TARGETS['auto_served'].bound}x the fp32 repository",
                 "-" if s8 is None else f"{s8:.2f}x", verdict(TARGETS["auto_served"].check(s8))])
    pr = ratio(auto_images_per_s, peer_images_per_s)
    rows.append([f"served auto >= {TARGETS['auto_peer'].bound}x the diffusers loop peer", "-" if pr is None else f"{pr:.2f}x",
                 verdict(TARGETS["auto_peer"].check(pr))])
    for state, models in prec["memory"].items():
        # the fp32 repository's bound is stated after warm-up (issue 12), the auto repository's after the benchmarks'
        # traffic and for every U-Net host, the streaming loop model included (issue 21)
        if state.endswith("warm-up"):
            hosts = ("diffusion_unet", "diffusion_sampler")
        elif state.startswith("auto"):
            hosts = MEMORY_HOSTS
        else:
            continue
        for model in hosts:
            mb = models.get(model)
            rows.append([f"{model} resident memory <= {TARGETS['memory_mb'].bound} MB ({state}, default settings)",
                         "-" if mb is None else f"{mb:.0f} MB", verdict(TARGETS["memory_mb"].check(mb))])
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------------

def targets(step, peak, peak_dtype, cfg, e2e, peer, smoke: bool, sample_batch: int, peer_steps: int,
            scaling: dict | None = None, student: dict | None = None) -> list[str]:
    rows = []
    sp = {n: v for n, v in step["speedups"].items()}
    ok = None if not sp or any(v is None for v in sp.values()) else all(v > 1 for v in sp.values())
    worst = min((v, n) for n, v in sp.items() if v is not None) if any(v is not None for v in sp.values()) else None
    rows.append(["ORT step faster than PyTorch eager at every bucket",
                 "-" if worst is None else f"slowest speedup {worst[0]:.2f}x at b{worst[1]}; " + ", ".join(
                     f"b{n} {times(v)}" for n, v in sp.items()), verdict(ok)])

    top = step["largest"]
    frac = ratio(step["ort_gflops"].get(top), peak) if top else None
    rows.append([f">= {TARGETS['peak_fraction'].bound:.0%} of measured {peak_dtype} matmul peak at the largest bucket",
                 "-" if frac is None else f"b{top}: ORT {step['ort_gflops'][top]:.1f} GFLOP/s = {pct(frac)} of "
                                          f"{peak:.1f}",
                 verdict(TARGETS["peak_fraction"].check(frac))])

    key = ("dpmpp-2m", peer_steps, sample_batch)
    over = e2e["overhead"].get(key)
    rows.append([f"Triton client loop overhead <= {TARGETS['triton_overhead'].bound:.0%} over in-process ORT for "
                 f"DPM-Solver++-{ISSUE_E2E[1]} at B={ISSUE_E2E[2]}",
                 "-" if over is None else f"{pct(over, signed=True)} ({run_label(*key[:2])}, B={key[2]})",
                 verdict(TARGETS["triton_overhead"].check(over))])

    c1 = cfg["speedups"].get(1)
    rows.append([f"Batched CFG >= {TARGETS['cfg_speedup'].bound}x faster than two calls at B=1",
                 "-" if c1 is None else f"{c1:.2f}x", verdict(TARGETS["cfg_speedup"].check(c1))])

    pr = peer["ratios"].get((peer_steps, sample_batch, "ours-triton"))
    rows.append([f">= {TARGETS['peer_ratio'].bound}x the images/s of the diffusers loop peer at equal steps",
                 "-" if pr is None else f"{pr:.2f}x (DPM-Solver++-{peer_steps}, B={sample_batch})",
                 verdict(TARGETS["peer_ratio"].check(pr))])
    for loop, r in (scaling or {}).get("ratios", {}).items():
        rows.append([f"2 replicas on separate cores >= {TARGETS['replica_scaling'].bound}x the images/s of 1 replica "
                     f"on one core ({loop} loop, DPM-Solver++-{ISSUE_E2E[1]}, B={ISSUE_E2E[2]})",
                     times(r), verdict(TARGETS["replica_scaling"].check(r))])
    sr = (student or {}).get("speedups", {}).get(sample_batch)
    if sr is None:
        measured = "-"
    else:
        teacher_label, student_label = student["labels"]
        measured = f"{sr:.2f}x (student {student_label} vs teacher {teacher_label}, B={sample_batch})"
    rows.append([f"Served student >= {TARGETS['student_speedup'].bound:g}x the images/s of its teacher at "
                 f"B={ISSUE_E2E[2]}, guidance 3 (student at {STUDENT_STEPS} steps, one row per image per step, "
                 f"vs teacher DPM-Solver++-{ISSUE_E2E[1]}, [cond; null] per step; same server, same run)", measured,
                 verdict(TARGETS["student_speedup"].check(sr))])
    lines = table(["target (from the issue)", "measured", "result"], rows, left=3)
    if smoke:
        lines += ["**Smoke run**: sizes were shrunk (few steps, small batches, one round) to check that the suite "
                  "runs; these verdicts say nothing about the targets.", ""]
    elif (peer_steps, sample_batch) != ISSUE_E2E[1:]:
        lines += [f"Note: the end-to-end targets were read at DPM-Solver++-{peer_steps}, B={sample_batch}, not the "
                  f"issue's DPM-Solver++-{ISSUE_E2E[1]}, B={ISSUE_E2E[2]}.", ""]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------

def _machine(data) -> list[str]:
    mi = data.get("machine_info", {})
    t = mi.get("trident", {})
    s = t.get("settings", {})
    v = t.get("versions", {})
    ci = data.get("commit_info", {})
    load_start = ", ".join(f"{x:.2f}" for x in t.get("load_average_at_start", [])) or "-"
    load_end = ", ".join(f"{x:.2f}" for x in t.get("load_average_at_end", [])) or "-"
    ckpts = ", ".join(f"{k} {sha or 'missing'}" for k, sha in t.get("checkpoints", {}).items())
    cpu = mi.get("cpu", {})  # py-cpuinfo's fields, when pytest-benchmark found it
    details = [cpu["hz_advertised_friendly"]] if cpu.get("hz_advertised_friendly") else []
    details += [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in cpu.get("flags", [])]
    simd = f" ({', '.join(details)})" if details else ""
    lines = [
        f"- Run: {data.get('datetime', '?')}, commit {str(ci.get('id', '?'))[:12]}"
        f"{' (dirty)' if ci.get('dirty') else ''}"
        f"{', **smoke run**' if s.get('smoke') else ''}",
        f"- Machine: {t.get('cpu_model', '?')}{simd}, {t.get('logical_cpus', '?')} logical CPUs"
        f"{', GPU ' + t['gpu'] if t.get('gpu') else ''}; {mi.get('system', '')} {mi.get('release', '')}, "
        f"Python {mi.get('python_version', '?')}",
        f"- Load average (1, 5, 15 min) at start: {load_start}; at end: {load_end} (other work on the machine "
        "slows every backend alike, but not necessarily by the same factor)",
        f"- Device {s.get('device', '?')}; {s.get('threads', '?')} thread(s) per call for every backend (torch's "
        f"intra-op threads; ORT in-process and each Triton model instance: that many intra-op threads for one row, "
        f"that many single-threaded row shards for more, see item 1) and for the matmul peak; buckets "
        f"{s.get('buckets', '?')}; "
        f"Triton protocol of items 2-6: {s.get('protocol', '?')}; guidance {s.get('guidance', '?')}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- Checkpoints (sha256[:12]): {ckpts}",
        "- Cells read 'median (mean)'; ratios are between medians of the same run.",
    ]
    for m in data.get("merged", []):
        loads = " / ".join(", ".join(f"{x:.2f}" for x in la) if la else "-" for la in m.get("load_average", []))
        lines.append(f"- Merged in later (`python -m trident.benchmarks.run --merge -- {m.get('selection', '')}`): "
                     f"{len(m.get('benchmarks', []))} benchmarks measured {m.get('datetime', '?')}"
                     f"{' on ' + m['machine'] if m.get('machine') else ''}, commit "
                     f"{str(m.get('commit') or '?')[:12]}{' (dirty)' if m.get('dirty') else ''}, load average at "
                     f"start / end {loads}; the rest of the report is the run described above.")
    if s.get("device") == "cuda":
        lines.append("- GPU path: ORT in-process and Triton run the fp16 graphs on the CUDA execution provider (inputs "
                     "and outputs cross PCIe every call, as a client's do); PyTorch eager runs fp32; the diffusers "
                     "peer runs under fp16 autocast; the peak is an fp16 torch.mm.")
    return lines + [""]


def render(data: dict, out_dir: Path) -> str:
    """The markdown report of one run; writes its PNG plots into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = data.get("machine_info", {}).get("trident", {}).get("settings", {})
    smoke = bool(s.get("smoke"))
    sample_batch, peer_steps = int(s.get("sample_batch", ISSUE_E2E[2])), int(s.get("peer_steps", ISSUE_E2E[1]))

    peak_lines, peak = analyse_peak(data)
    step_lines, step = analyse_step(data, peak["peak_gflops"])
    cfg_lines, cfg = analyse_cfg(data)
    e2e_lines, e2e = analyse_e2e(data)
    loop_lines, _ = analyse_loop(data)
    stream_lines, _ = analyse_stream(data)
    peer_lines, peer = analyse_peer(data)
    conc_lines, conc = analyse_concurrency(data)
    e2e_triton = {r: med(find(items(data, "e2e"), sampler=r[0], steps=r[1], images=r[2], backend="triton"))
                  for r in e2e["runs"]}
    oneshot_lines = analyse_oneshot(data, {r: t for r, t in e2e_triton.items() if t})
    prec_lines, prec = analyse_precision(data)
    scaling_lines, scaling = analyse_scaling(data)
    student_lines, student = analyse_student(data)

    conc_names, conc_series = conc["plot"]
    plots = {
        "step.png": save_panels(out_dir / "step.png", [bars(
            "One U-Net step (median ms, lower is better)", [f"b{n}" for n in step["plot"][0]],
            {STEP_LABELS[k]: v for k, v in step["plot"][1].items()}, "ms")]),
        "sampling.png": save_panels(out_dir / "sampling.png", [bars(
            "End-to-end sampling (images/s, higher is better)", e2e["plot"][0], e2e["plot"][1], "images/s")]),
        "peer.png": save_panels(out_dir / "peer.png", [bars(
            "Ours vs the diffusers loop (images/s, higher is better)", peer["plot"][0], peer["plot"][1],
            "images/s")]),
        "concurrency.png": save_panels(out_dir / "concurrency.png", [
            bars("Concurrent clients: throughput (images/s)", conc_names,
                 {"images/s": conc_series["images/s"]}, "images/s"),
            bars("Concurrent clients: latency per image (ms)", conc_names,
                 {k: v for k, v in conc_series.items() if k != "images/s"}, "ms")]),
    }

    def img(name):
        return [f"![{name}]({name})", ""] if plots.get(name) else []

    lines = ["# trident latency benchmarks", ""] + _machine(data)
    lines += ["## Targets", ""] + targets(step, peak["peak_gflops"], peak["dtype"], cfg, e2e, peer, smoke, sample_batch,
                                          peer_steps, scaling, student)
    lines += ["## 1. One U-Net step per bucket", "",
              "Same inputs (N rows, numpy in and out) through each backend. Speedup = torch median / ORT median; "
              "Triton rows = Triton median / ORT median - 1 (the price of the server hop). 'ORT in-process' and the "
              "Triton models run the default row shards (serving/ort_runner.py: on the CPU, a call of 2+ rows is "
              "split into one part per core, each on a single-threaded session); 'row shards off' is the same "
              "sessions' code with row_shards=1 (every call on one multi-threaded session), and 'row shards on vs "
              "off' = off median / on median.", ""]
    lines += step_lines + img("step.png")
    lines += ["### Machine peak (measured in this run)", ""] + peak_lines
    lines += ["## 2. Batched CFG vs two calls (per step, through Triton)", "",
              "One request of 2B rows ([cond; null]) against two sequential requests of B rows, including the "
              "guidance combine in numpy.", ""] + cfg_lines
    lines += ["## 3. End-to-end sampling: Triton vs in-process ONNX Runtime", "",
              "The same client loop (numpy sampler, one 2B-row U-Net call per step); serving overhead = Triton time "
              "/ ORT time - 1.", ""] + e2e_lines + img("sampling.png")
    if loop_lines:
        lines += ["### 3b. Where the loop runs: client loop vs server-side loop (both through Triton)", "",
                  "The client loop sends one U-Net request per step; the server-side loop (the diffusion_sampler "
                  "model, serving/server/runtime/loop_model.py) runs the same numpy sampler next to the U-Net sessions and "
                  "answers one request per batch. Both draw the same images (checked in the run).", ""] + loop_lines
    if stream_lines:
        lines += ["### 3c. Streaming the server-side loop: one response vs a response per step", "",
                  "The same loop and images; diffusion_sampler answers once, diffusion_sampler_stream (decoupled, "
                  "gRPC) also reports the steps as it goes (what progress bars, callbacks and cancel with "
                  "loop='server' use). The two alternate round by round. Streaming cost = streamed median / "
                  "one-response median - 1.", ""] + stream_lines
    lines += ["## 4. Peer: diffusers DPMSolverMultistepScheduler loop on the same weights", ""] + peer_lines
    lines += img("peer.png")
    lines += ["## 5. Concurrent clients", ""] + conc_lines + img("concurrency.png")
    lines += ["## 6. GAN generator and VAE decoder (one network call)", ""] + oneshot_lines
    if prec_lines:
        peer_b = find(items(data, "peer"), steps=peer_steps, images=sample_batch, impl="diffusers-torch")
        auto_b = find(items(data, "precision-e2e"), images=sample_batch, repo="auto")
        lines += ["## 7. Precision: runtimes and precisions per bucket, chosen per machine", "",
                  "Every CPU variant of serving/precision.py on the same inputs, in-process; `auto` is the choice "
                  "`--precision auto` made in this run (per bucket: the fastest variant this CPU runs natively that "
                  "passed the quality gate, benchmarks/results/precision_gate.json, and the parity gate, and beat "
                  "fp32 in each of three interleaved rounds).", ""]
        lines += table(["target (issue: reduced precision)", "measured", "result"],
                       precision_targets(prec, ratio(sample_batch, med(peer_b)), ratio(sample_batch, med(auto_b))),
                       left=3)
        lines += prec_lines
    if scaling_lines:
        lines += ["## 8. Scaling over replicas: 1 and 2 replicas, each pinned to its own core", ""] + scaling_lines
    if student_lines:
        lines += ["## 9. The distilled student against its teacher, served", ""] + student_lines
    return "\n".join(lines).rstrip() + "\n"


def write_report(json_path, out_dir=None) -> Path:
    json_path = Path(json_path)
    out_dir = Path(out_dir) if out_dir else json_path.parent
    text = render(load(json_path), out_dir)
    path = out_dir / "report.md"
    path.write_text(text)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trident.benchmarks.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path, help="a --benchmark-json file of `pytest benchmarks`")
    p.add_argument("--out", type=Path, default=None, help="folder of report.md and the plots (default: the JSON's)")
    args = p.parse_args(argv)
    try:
        path = write_report(args.json, args.out)
    except (OSError, ValueError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

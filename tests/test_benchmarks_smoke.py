"""The latency benchmarks cannot rot: the whole suite runs once at smoke sizes on the session's small exports (real
Triton server, real sessions), and the report renders from its JSON. Plus the pure parts: metrics and the report."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from trident.benchmarks import metrics, report

ITEMS = ("peak", "step", "cfg", "e2e", "loop", "peer", "concurrency", "oneshot")

PROMETHEUS = """\
# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{model="diffusion_unet",version="1"} 40
nv_inference_count{model="vae_decoder",version="1"} 3
nv_inference_exec_count{model="diffusion_unet",version="1"} 10
nv_inference_request_success{model="diffusion_unet",version="1"} 20
nv_inference_queue_duration_us{model="diffusion_unet",version="1"} 2000
nv_inference_compute_infer_duration_us{model="diffusion_unet",version="1"} 300000
nv_cpu_utilization 0.5
"""


def test_metrics_summary_gives_batch_size_and_per_request_times_from_deltas():
    before = metrics.parse(PROMETHEUS)
    after = metrics.parse(PROMETHEUS.replace(" 40\n", " 72\n").replace(" 10\n", " 14\n").replace(" 20\n", " 36\n")
                          .replace(" 2000\n", " 3600\n").replace(" 300000\n", " 380000\n"))
    s = metrics.summarize(metrics.delta(before, after, "diffusion_unet"))
    assert (s["requests"], s["rows"], s["executions"]) == (16, 32, 4)
    assert s["avg_batch_rows"] == 8 and s["avg_requests_per_execution"] == 4
    assert s["queue_us_per_request"] == 100 and s["compute_us_per_request"] == 5000
    assert ("nv_cpu_utilization", "diffusion_unet") not in before  # server-wide gauges carry no model label


def test_report_renders_with_every_item_missing(tmp_path):
    text = report.render({"benchmarks": [], "machine_info": {}}, tmp_path)
    assert "## Targets" in text and text.count("| n/a |") == 5
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.slow
@pytest.mark.server
def test_benchmark_suite_runs_at_smoke_sizes_and_the_report_renders(checkpoints, export_dirs, tmp_path):
    ckpts = tmp_path / "checkpoints"
    for kind, path in checkpoints.items():
        (ckpts / kind).mkdir(parents=True)
        (ckpts / kind / "model.safetensors").symlink_to(path.resolve())
    out = tmp_path / "results"
    env = dict(os.environ, TRIDENT_BENCH_SMOKE="1", TRIDENT_BENCH_THREADS="1", OMP_NUM_THREADS="1",
               TRIDENT_BENCH_CHECKPOINTS=str(ckpts), TRIDENT_BENCH_WORK=str(tmp_path / "work"),
               TRIDENT_BENCH_EXPORTS=os.pathsep.join(str(d) for d in export_dirs.values()))
    env.pop("TRIDENT_BENCH_DEVICE", None)
    done = subprocess.run([sys.executable, "-m", "trident.benchmarks.run", "--smoke", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

    data = json.loads((out / "latest.json").read_text())
    measured = {b["extra_info"].get("item") for b in data["benchmarks"]}
    assert measured == set(ITEMS), f"missing items: {set(ITEMS) - measured}"
    text = (out / "report.md").read_text()
    for heading in ("## Targets", "## 1. One U-Net step", "## 2. Batched CFG", "## 3. End-to-end", "### 3b. Where",
                    "## 4. Peer", "## 5. Concurrent", "## 6. GAN"):
        assert heading in text
    assert "**Smoke run**" in text and text.count("| n/a |") == 0
    assert "ORT, row shards off ms" in text and "row shards on vs off" in text  # the before/after of row shards
    assert {p.name for p in out.glob("*.png")} == {"step.png", "sampling.png", "peer.png", "concurrency.png"}

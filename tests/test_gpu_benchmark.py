"""The GPU benchmark (benchmarks/gpu.py, benchmarks/gpu.sh) and its torch sampling loop, run here on the CPU.

No GPU on this machine: the smoke run goes through the same code with `--device cpu`, and the rows that need CUDA
(TF32, CUDA graphs) are recorded as skipped. The torch loop is checked against serving/sampling.py, the reference.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trident.benchmarks.gpu import LOOP_VARIANTS, UNET_VARIANTS
from trident.benchmarks.torch_sampling import TorchDPMSolverPP2M
from trident.serving import sampling

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = sampling.NoiseSchedule()
NULL = 10


def numpy_fixed_model(x, t, y):
    """A deterministic stand-in for the U-Net, float32 like the real one, different for every label and timestep.
    Only + - * / in float64 (exactly rounded in numpy and torch alike), so both sides get the same eps bit for bit."""
    x, t, y = (a.astype(np.float64) for a in (x, t, y))
    t, y = t[:, None, None, None], y[:, None, None, None]
    return (x * t / 1000.0 - 0.3 * x * x + 0.05 * (y - 5.0)).astype(np.float32)


def torch_fixed_model(x, t, y):
    x, t, y = x.double(), t.double()[:, None, None, None], y.double()[:, None, None, None]
    return (x * t / 1000.0 - 0.3 * x * x + 0.05 * (y - 5.0)).float()


@pytest.mark.parametrize("labels,guidance,spacing,steps,prediction_type", [
    ([3, 7, 10], 3.0, None, 20, "epsilon"),       # guided: one call on [x; x] with [labels; null]
    ([1, 2, 3], 1.0, "trailing", 7, "epsilon"),   # guidance 1: the conditional batch only
    (None, 3.0, "leading", 5, "epsilon"),         # unconditional
    ([0, 9], 5.0, None, 1, "epsilon"),            # a single (final, first-order) step
    ([3, 7, 10], 3.0, None, 20, "v_prediction"),  # the model predicts v
])
def test_torch_dpmpp_2m_equals_the_numpy_sampler_at_every_step_when_the_model_is_a_fixed_function(
        labels, guidance, spacing, steps, prediction_type):
    b = 3 if labels is None else len(labels)
    shape = (b, 1, 4, 4)
    reference = list(sampling.sample_progressive(
        numpy_fixed_model, shape, None if labels is None else np.array(labels), schedule=SCHEDULE,
        sampler="dpmpp-2m", steps=steps, guidance=guidance, null_class=NULL, spacing=spacing, seed=4,
        prediction_type=prediction_type))
    x_T = torch.from_numpy(np.random.default_rng(4).standard_normal(shape))  # what sample_progressive starts from
    seen = []
    loop = TorchDPMSolverPP2M(torch_fixed_model, SCHEDULE, steps=steps, guidance=guidance, null_class=NULL,
                              spacing=spacing, prediction_type=prediction_type)
    out = loop(x_T, None if labels is None else torch.tensor(labels),
               callback=lambda i, x, x0: seen.append((x.numpy().copy(), x0.numpy().copy())))
    assert [c.t for c in loop.steps] == [step.t for step in reference]
    assert len(seen) == len(reference) == steps
    for (x, x0), step in zip(seen, reference):
        np.testing.assert_allclose(x, step.sample, rtol=0, atol=1e-12)
        np.testing.assert_allclose(x0, step.pred_original_sample, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.numpy(), reference[-1].pred_original_sample, rtol=0, atol=1e-12)


def test_torch_loop_draws_what_the_numpy_client_loop_draws_when_the_model_is_the_unet(checkpoints):
    from trident.training.checkpoint import card_of, load_model

    torch.set_num_threads(1)
    model, meta = load_model(checkpoints["diffusion"], "diffusion")
    card = card_of(meta)
    schedule = sampling.NoiseSchedule.from_dict(card.schedule)
    labels = np.array([2, 7], np.int64)
    shape = (2, *card.image.shape)

    def numpy_unet(x, t, y):
        with torch.inference_mode():
            return model(*(torch.from_numpy(a) for a in (x, t, y))).numpy()

    want = sampling.last_estimate(sampling.sample_progressive(
        numpy_unet, shape, labels, schedule=schedule, sampler="dpmpp-2m", steps=8, guidance=3.0,
        null_class=card.null_class, seed=1, prediction_type=card.prediction_type))
    loop = TorchDPMSolverPP2M(model, schedule, steps=8, guidance=3.0, null_class=card.null_class,
                              prediction_type=card.prediction_type)
    with torch.inference_mode():
        got = loop(torch.from_numpy(np.random.default_rng(1).standard_normal(shape)), torch.from_numpy(labels))
    assert np.abs(want).max() > 0.5  # images, not zeros
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)


def run_gpu_sh(out: Path, *args: str) -> subprocess.CompletedProcess:
    """benchmarks/gpu.sh as on the GPU machine: trident from this source tree (PYTHONPATH emptied), this Python."""
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": ""}
    return subprocess.run([str(ROOT / "benchmarks" / "gpu.sh"), "--out", str(out), "--device", "cpu", "--threads", "1",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_gpu_benchmark_smoke_run_writes_every_row_and_keeps_going_past_a_failed_one_when_on_the_cpu(tmp_path):
    out = tmp_path / "gpu"
    # an unknown torch.compile backend: the compile rows fail, every other row still runs
    # and a time limit no loaded machine reaches: the compile rows must run (and fail), not be skipped for time
    r = run_gpu_sh(out, "--smoke", "--compile-backend", "no_such_backend", "--time-limit", "1800")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "gpu.md"]  # the device tool takes back at most 8
    result = json.loads((out / "gpu.json").read_text())
    assert Path(result["checkpoint"]).resolve() == ROOT / "checkpoints" / "diffusion" / "model.safetensors"
    unet = {(row["rows"], row["variant"]): row for row in result["unet"]}
    assert set(unet) == {(n, v) for n in (1, 2) for v in UNET_VARIANTS}
    for (n, variant), row in unet.items():
        if variant in ("tf32", "cudagraph", "cudagraph-bf16"):
            assert row["skipped"].startswith("needs CUDA"), row
        elif variant == "compile":
            assert "no_such_backend" in row["error"], row
        else:
            assert row["ms"] > 0 and row["rows_per_s"] > 0 and row["tflops"] > 0, row
            assert row["max_abs_diff"] == 0 if variant == "fp32" else 0 < row["max_abs_diff"] < 0.2, row
    loop = {(row["images"], row["loop"], row["unet"]): row for row in result["loop"]}
    assert set(loop) == {(b, *v) for b in (1, 2) for v in LOOP_VARIANTS}
    for b in (1, 2):
        assert loop[b, "host", "fp32"]["max_abs_diff"] == 0
        assert loop[b, "device", "fp32"]["max_abs_diff"] < 1e-4  # the torch loop draws the numpy loop's images
        assert 0 < loop[b, "device", "bf16"]["max_abs_diff"] < 0.2
        assert loop[b, "device-graph", "tf32"]["skipped"].startswith("needs CUDA")
    report = (out / "gpu.md").read_text()
    assert "## Headline" in report and "no_such_backend" in report and "Smoke settings" in report


def test_gpu_benchmark_records_rows_past_the_time_limit_as_skipped_and_still_writes_the_report(tmp_path):
    r = run_gpu_sh(tmp_path, "--smoke", "--time-limit", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    rows = result["unet"] + result["loop"]
    assert rows and all("skipped" in row for row in rows)
    assert any("time limit" in row["skipped"] for row in rows)
    assert "Rows not measured" in (tmp_path / "gpu.md").read_text()

"""Shared session fixtures: one checkpoint and one small export per model kind, made once per test session.

`checkpoints` prefers the shipped checkpoints/<kind>/model.safetensors and otherwise trains a tiny model for a few
steps on Fashion-MNIST; `export_dirs` exports each with buckets TEST_BUCKETS into the session's tmp dir.
`student_checkpoint` / `student_export` are a tiny distilled diffusion student (what serves it, tested on any
machine); `shipped_student_export` exports the shipped one, checkpoints/diffusion_student/ (what it draws).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the CPUs are shared; subprocesses and tritonserver inherit this

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("diffusion", "gan", "vae")
TEST_BUCKETS = (1, 4)
TINY_MODELS = {  # a few seconds of training each; enough for shapes and numerics, not for pretty samples
    "diffusion": '{"base_channels": 16, "channel_mult": [1, 2], "attention_levels": [1]}',
    "gan": '{"gen_channels": 16, "disc_channels": 16}',
    "vae": '{"channels": 8, "hidden": 32}',
}


T = TypeVar("T")


def settled(read: Callable[[], T], reached: Callable[[T], bool] = lambda value: True, quiet_s: float = 0.5,
            timeout_s: float = 15.0) -> T:
    """read() once it has `reached` the expected value and then stayed unchanged for quiet_s (or at timeout_s).

    For Triton's statistics: the server records a request when it releases it, which can be after the client already
    holds the response, so a count read right after the last answer may still be one short. Waiting for the count to
    reach what was sent (and then stay there) keeps both a lost request and a double answer visible."""
    deadline = time.monotonic() + timeout_s
    value, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        elif reached(value) and time.monotonic() - since >= quiet_s:
            break
    return value


def _run_together(commands: dict[str, list[str]]) -> None:
    """Run the commands in parallel; fail with the output of any that fails."""
    processes = {key: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for key, command in commands.items()}
    failed = []
    for key, process in processes.items():
        output, _ = process.communicate()
        if process.returncode != 0:
            failed.append(f"{key}: {' '.join(commands[key])}\n{output[-3000:]}")
    if failed:
        pytest.fail("\n\n".join(failed), pytrace=False)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """kind -> model.safetensors: the shipped one when present, else a tiny one trained now."""
    found = {kind: ROOT / "checkpoints" / kind / "model.safetensors" for kind in KINDS}
    missing = [kind for kind, path in found.items() if not path.is_file()]
    if missing:
        runs = tmp_path_factory.mktemp("tiny_checkpoints")
        _run_together({kind: [sys.executable, "-m", "trident.training.train", kind, "--out", str(runs / kind),
                              "--steps", "4", "--limit", "256", "--batch-size", "8", "--model", TINY_MODELS[kind],
                              "--threads", "1", "--no-progress"] for kind in missing})
        found.update({kind: runs / kind / "model.safetensors" for kind in missing})
    return found


@pytest.fixture(scope="session")
def export_dirs(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """kind -> `trident export` directory of checkpoints[kind] with buckets TEST_BUCKETS (fp32 and fp16 graphs)."""
    root = tmp_path_factory.mktemp("exports")
    buckets = ",".join(map(str, TEST_BUCKETS))
    _run_together({kind: [sys.executable, "-m", "trident.export.onnx_export", str(path), "--out", str(root / kind),
                          "--buckets", buckets, "--fp16"] for kind, path in checkpoints.items()})
    return {kind: root / kind for kind in checkpoints}


STUDENT_STEPS = 4  # the tiny student's card says it was step-distilled for 4 DDIM steps
STUDENT_GUIDANCE = (1.0, 5.0)


@pytest.fixture(scope="session")
def student_checkpoint(tmp_path_factory) -> Path:
    """A tiny step-distilled student's model.safetensors, as `trident distill steps` writes it (its header and card
    from training/train.py), built rather than trained: a U-Net with the guidance input and seeded random weights
    everywhere (a fresh U-Net's zero-initialised layers would leave w, and the class, changing nothing), v-prediction."""
    import torch

    from trident.training import checkpoint as ckpt
    from trident.training.models import UNetConfig, build_model
    from trident.training.train import TrainConfig, model_card

    out = tmp_path_factory.mktemp("student") / "model.safetensors"
    torch.manual_seed(0)
    config = UNetConfig.from_dict({**json.loads(TINY_MODELS["diffusion"]), "guidance_input": True})
    model = build_model("diffusion", config)
    with torch.no_grad():  # the zero-initialised layers (residual branches, output, guidance embedding) get weights
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.05)
    run = TrainConfig(kind="diffusion", out_dir=str(out.parent), distill="steps", teacher="teacher.safetensors",
                      distill_from_steps=2 * STUDENT_STEPS, distill_to_steps=STUDENT_STEPS,
                      guidance_min=STUDENT_GUIDANCE[0], guidance_max=STUDENT_GUIDANCE[1],
                      prediction_type="v_prediction")
    meta = {"kind": "diffusion", "config": config.to_dict(), "card": model_card(run, config).to_dict(),
            "distill": {"stage": "steps", "teacher": "teacher.safetensors", "teacher_sha256": "0" * 64,
                        "guidance_range": list(STUDENT_GUIDANCE), "stages": [STUDENT_STEPS], "spacing": "trailing"}}
    ckpt.save_checkpoint(out, ckpt.with_prefix(model.state_dict(), "model"), meta)
    return out


def _export_student(checkpoint: Path, out: Path, *options: str) -> Path:
    """`trident export` of a student checkpoint with buckets TEST_BUCKETS into out."""
    _run_together({"student": [sys.executable, "-m", "trident.export.onnx_export", str(checkpoint), "--out", str(out),
                               "--buckets", ",".join(map(str, TEST_BUCKETS)), *options]})
    return out


@pytest.fixture(scope="session")
def student_export(student_checkpoint, tmp_path_factory) -> Path:
    """`trident export` of the tiny student with buckets TEST_BUCKETS (fp32 and int8)."""
    return _export_student(student_checkpoint, tmp_path_factory.mktemp("student_export") / "diffusion_student")


SHIPPED_STUDENT = ROOT / "checkpoints" / "diffusion_student" / "model.safetensors"


@pytest.fixture(scope="session")
def shipped_student_export(tmp_path_factory) -> Path:
    """`trident export` of the shipped student with buckets TEST_BUCKETS (fp32 only): no tiny stand-in, as the tests
    that use it judge what the shipped model draws."""
    assert SHIPPED_STUDENT.is_file(), f"needs the shipped student {SHIPPED_STUDENT} (written by `trident distill`)"
    return _export_student(SHIPPED_STUDENT, tmp_path_factory.mktemp("shipped_student_export") / "diffusion_student",
                           "--no-int8")

"""Shared session fixtures: one checkpoint and one small export per model kind, made once per test session.

`checkpoints` prefers the shipped checkpoints/<kind>/model.safetensors and otherwise trains a tiny model for a few
steps on Fashion-MNIST; `export_dirs` exports each with buckets TEST_BUCKETS into the session's tmp dir.
"""
from __future__ import annotations

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

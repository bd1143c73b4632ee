"""The shipped artefacts: checkpoints, the committed model repository, and the demo (the README's main job)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trident.export.build import default_build
from trident.serving.server.repository import MARKER
from trident.serving.server.runtime import RUNTIME_FILES
from trident.serving.graph_runtime import MEASURED_FILE
from trident.training.checkpoint import read_meta

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints"


@pytest.fixture(scope="session")
def shipped_work(tmp_path_factory) -> Path:
    """A fresh export cache of the shipped checkpoints at the default buckets (what `trident demo` builds)."""
    return tmp_path_factory.mktemp("shipped_work")


@pytest.mark.parametrize("kind", ["diffusion", "gan", "vae", "classifier"])
def test_shipped_checkpoint_exists_and_records_how_it_was_trained(kind):
    meta = read_meta(SHIPPED / kind / "model.safetensors", kind)
    assert meta["train"]["command"].startswith("trident train " + kind)
    assert meta["train"]["step"] > 0 and meta["train"]["last_losses"]
    assert (SHIPPED / kind / "TRAINING.md").is_file()


def test_committed_model_repository_equals_a_fresh_build(shipped_work, tmp_path):
    fresh = tmp_path / "model_repository"
    default_build(SHIPPED, fresh, shipped_work, log=lambda *_: None)
    # Committed: the marker and every config.pbtxt. Generated only: the graphs, model.py and the runtime files
    # (copies of serving/server/runtime/*_model.py and of RUNTIME_FILES), and what the build measured on its machine
    # (MEASURED_FILE: the row shards' bucket limit), all git-ignored, so the committed files are the same wherever
    # they are rebuilt.
    def listed(root):
        return sorted(p.relative_to(root) for p in root.rglob("*")
                      if p.is_file() and p.suffix not in (".onnx", ".pyc")
                      and p.name not in ("model.py", *RUNTIME_FILES, MEASURED_FILE, "README.md"))

    committed, built = listed(ROOT / "model_repository"), listed(fresh)
    assert committed == built, "committed model_repository/ lists other files than a fresh `trident serve build`"
    for rel in committed:
        assert (ROOT / "model_repository" / rel).read_bytes() == (fresh / rel).read_bytes(), (
            f"model_repository/{rel} differs from a fresh build: run `trident serve build` and commit the result")
    assert (ROOT / "model_repository" / MARKER).is_file()


@pytest.mark.server
@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_its_images(shipped_work, tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "trident.serving.cli", "demo", "--out", str(out), "--model-repository",
           str(tmp_path / "repo"), "--work", str(shipped_work), "--per-class", "2", "--steps", "4"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for name in ("diffusion.png", "diffusion_guidance.png", "gan.png", "vae.png", "vae_interpolation.png"):
        assert (out / name).stat().st_size > 1000, name
    assert "Triton server up" in r.stdout and "demo done" in r.stdout
    # the demo serves `auto` (issue 21): every graph's precision measured here, in the generated files
    import json
    assert set(json.loads((tmp_path / "repo" / MARKER).read_text())["precision"].values()) == {"auto"}


def test_only_the_configs_of_the_model_repository_are_committed():
    """What `trident serve build` generates beside the configs (graphs, model.py, the runtime files, the measured
    choices) is per machine or a copy of the package: git-ignored, never committed (a copy would go stale)."""
    listed = subprocess.run(["git", "ls-files", "model_repository"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    committed = listed.stdout.split()
    assert committed and all(Path(p).name in ("README.md", MARKER, "config.pbtxt") for p in committed), committed
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *(f"model_repository/m/1/{name}" for name in
                              ("model.py", "x.onnx", *RUNTIME_FILES, MEASURED_FILE))], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert len(ignored) == 3 + len(RUNTIME_FILES), f"not git-ignored: {ignored}"

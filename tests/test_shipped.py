"""The shipped artefacts: checkpoints, the committed model repository, and the demo (the README's main job)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trident.serving.server.repository import MARKER
from trident.serving.server.runtime import RUNTIME_FILES
from trident.serving.graph_runtime import MEASURED_FILE
from trident.training.checkpoint import card_of, read_meta

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints"
STUDENT = "diffusion_student"  # the distilled student (issue 19): a diffusion checkpoint written by `trident distill`


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`trident demo` run once on the shipped checkpoints, from a fresh export cache into a fresh repository: its
    build is the default `trident serve build` (default_build, `--precision auto`), so the tests below judge both
    the demo and the repository a fresh build writes, for one build's cost (the precision trial is most of it)."""
    tmp = tmp_path_factory.mktemp("demo")
    out, repo = tmp / "demo", tmp / "repo"
    cmd = [sys.executable, "-m", "trident.serving.cli", "demo", "--out", str(out), "--model-repository", str(repo),
           "--work", str(tmp / "work"), "--per-class", "2", "--steps", "4"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return r, out, repo


@pytest.mark.parametrize("kind", ["diffusion", "gan", "vae", "classifier", STUDENT])
def test_shipped_checkpoint_exists_and_records_how_it_was_trained(kind):
    meta = read_meta(SHIPPED / kind / "model.safetensors", "diffusion" if kind == STUDENT else kind)
    if kind == STUDENT:  # `trident distill steps` (the shipped one) or `guidance`; its card says it is a student
        assert meta["train"]["command"].startswith("trident distill ")
        card = card_of(meta)
        assert card.kind == STUDENT and card.guidance_range is not None
    else:
        assert meta["train"]["command"].startswith("trident train " + kind)
    assert meta["train"]["step"] > 0 and meta["train"]["last_losses"]
    assert (SHIPPED / kind / "TRAINING.md").is_file()


@pytest.mark.server
@pytest.mark.slow
def test_committed_model_repository_equals_a_fresh_build(demo):
    r, _, fresh = demo  # the demo's build: default_build, with the student's models where it is shipped
    assert (fresh / MARKER).is_file(), r.stdout[-2000:] + r.stderr[-3000:]
    # Committed: the marker and every config.pbtxt. Generated only: the graphs, model.py and the runtime files
    # (copies of serving/server/runtime/*_model.py and of RUNTIME_FILES), and what the build measured on its machine
    # (MEASURED_FILE: the row shards' bucket limit), all git-ignored, so the committed files are the same wherever
    # they are rebuilt. The warm-up inputs some configs name (<model>/warmup/) are committed with them.
    def listed(root):
        return sorted(p.relative_to(root) for p in root.rglob("*")
                      if p.is_file() and p.suffix not in (".onnx", ".pyc")
                      and p.name not in ("model.py", *RUNTIME_FILES, MEASURED_FILE, "README.md"))

    committed, built = listed(ROOT / "model_repository"), listed(fresh)
    assert committed == built, ("committed model_repository/ lists other files than a fresh `trident serve build` "
                                "(a checkpoint added, such as the student?): run it and commit the result")
    for rel in committed:
        assert (ROOT / "model_repository" / rel).read_bytes() == (fresh / rel).read_bytes(), (
            f"model_repository/{rel} differs from a fresh build: run `trident serve build` and commit the result")
    assert (ROOT / "model_repository" / MARKER).is_file()


@pytest.mark.server
@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_its_images(demo):
    r, out, repo = demo
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    names = ["diffusion.png", "diffusion_guidance.png", "gan.png", "vae.png", "vae_interpolation.png"]
    student = (SHIPPED / STUDENT / "model.safetensors").is_file()
    for name in names + [f"{STUDENT}.png"] * student:  # the student's grid beside the teacher's, where it is shipped
        assert (out / name).stat().st_size > 1000, name
    assert "Triton server up" in r.stdout and "demo done" in r.stdout
    if student:  # its grid timed against the teacher's
        line = next(line for line in r.stdout.splitlines() if line.startswith(f"{STUDENT}: 20 images"))
        assert "(teacher: 4 steps, 4 requests of 40 rows in" in line and "x the student's time and" in line, line
    else:
        assert not (out / f"{STUDENT}.png").exists()
    # the demo serves `auto` (issue 21): every graph's precision measured here, in the generated files
    import json
    assert set(json.loads((repo / MARKER).read_text())["precision"].values()) == {"auto"}


def test_only_the_configs_of_the_model_repository_are_committed():
    """What `trident serve build` generates beside the configs (graphs, model.py, the runtime files, the measured
    choices) is per machine or a copy of the package: git-ignored, never committed (a copy would go stale). The
    warm-up inputs a config names (<model>/warmup/: the student's guidance at its range's low end) are part of the
    configuration, the same on every machine, and compared with a fresh build like the configs."""
    listed = subprocess.run(["git", "ls-files", "model_repository"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    committed = listed.stdout.split()
    assert committed and all(Path(p).name in ("README.md", MARKER, "config.pbtxt") or Path(p).parent.name == "warmup"
                             for p in committed), committed
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *(f"model_repository/m/1/{name}" for name in
                              ("model.py", "x.onnx", *RUNTIME_FILES, MEASURED_FILE))], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert len(ignored) == 3 + len(RUNTIME_FILES), f"not git-ignored: {ignored}"

"""9. The distilled student against its teacher, served (issue 19): images/s at B=8 and latency at B=1 of the student
at 4 steps (DDIM on the trailing grid: one row per image per step, the guidance scale an input of its U-Net) against
the teacher's DPM-Solver++-20 (one request of 2B rows, [cond; null], per step), both at the run's guidance (3).

Both from the session's one Triton server (one repository, so the same precision choice), through the client loop:
item 3's headline, the loop whose serving overhead the targets read. The two alternate round by round (the teacher's
draw runs, timed by hand, in each round's setup), so a change in the machine's load hits both alike."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from trident.benchmarks.common import class_labels, require, rounds
from trident.benchmarks.settings import STUDENT
from trident.serving import sampling
from trident.serving.spec import STUDENT_UNET, UNET, load_export_metadata


@pytest.fixture(scope="module")
def student_in_process(settings, student_export):
    """The student's export in-process (ONNX Runtime): what the served student must draw. None on the GPU path (the
    server runs fp16 graphs there)."""
    from trident.serving.client import TridentClient

    if student_export is None or settings.device != "cpu":
        yield None
        return
    with TridentClient.from_onnx([student_export], threads=settings.threads) as client:
        yield client


def _precision(server) -> dict:
    """graph -> the variants the session's repository runs for it (or "auto"), from its trident_repository.json."""
    from trident.serving.server.repository import MARKER

    marker = json.loads((Path(server.config.model_repository) / MARKER).read_text())
    return {graph: record if isinstance(record, str) else sorted(set(record["choice"].values()))
            for graph, record in marker["precision"].items() if graph in (UNET, STUDENT_UNET)}


def _checkpoint_sha12(export: Path) -> str | None:
    """sha256[:12] of the checkpoint an export was made from: the report names the student and teacher it timed (a
    --merge run keeps the full run's header, whose checkpoints may be others)."""
    return load_export_metadata(export).get("source_checkpoint", {}).get("sha256", "")[:12] or None


def test_student_vs_teacher(benchmark, settings, exports, student_export, server, triton, student_in_process,
                            served_images):
    require(exports, "diffusion")
    if student_export is None:
        pytest.skip(f"no {STUDENT} model: {STUDENT}/model.safetensors is missing under the checkpoints folder "
                    f"(TRIDENT_BENCH_CHECKPOINTS); distil it with `trident distill` or copy the shipped one")
    n = served_images
    labels = class_labels(n)
    teacher_sampler, teacher_steps = settings.target_run
    student_run = sampling.default_settings(settings.student_steps)  # DDIM, trailing spacing, these steps
    teacher_s, stats = [], {}

    def draw(model: str):
        run = student_run if model == STUDENT else {"sampler": teacher_sampler, "steps": teacher_steps}
        images = triton.sample(classes=labels, guidance=settings.guidance, seed=0, raw=True, model=model, **run)
        stats[model] = triton.last_stats
        return images

    def teacher_first():
        t0 = time.perf_counter()
        draw("diffusion")
        teacher_s.append(time.perf_counter() - t0)

    want = draw(STUDENT)  # warm, both
    draw("diffusion")
    if student_in_process is not None:  # a fast but wrong student is no win: the served draw is the in-process one
        np.testing.assert_allclose(want, student_in_process.sample(classes=labels, guidance=settings.guidance, seed=0,
                                                                   raw=True, model=STUDENT, **student_run),
                                   rtol=0, atol=1e-4)
    card = triton.card(STUDENT)
    benchmark.group = f"student-B{n:02d}"
    benchmark.extra_info.update(item="student", images=n, loop="client", protocol=settings.protocol,
                                guidance=settings.guidance, sampler=student_run["sampler"], steps=student_run["steps"],
                                spacing=student_run["spacing"], teacher_sampler=teacher_sampler,
                                teacher_steps=teacher_steps, distilled_steps=card.distilled_steps,
                                guidance_range=card.guidance_range, precision=_precision(server),
                                checkpoints={"teacher": _checkpoint_sha12(exports["diffusion"]),
                                             "student": _checkpoint_sha12(student_export)})
    images = benchmark.pedantic(lambda: draw(STUDENT), setup=teacher_first, iterations=1,
                                rounds=rounds(settings, 4 * settings.sample_rounds))
    student, teacher = stats[STUDENT], stats["diffusion"]
    benchmark.extra_info.update(teacher_s=teacher_s, calls=student.calls, rows=student.rows,
                                teacher_calls=teacher.calls, teacher_rows=teacher.rows)
    np.testing.assert_allclose(images, want, rtol=0, atol=1e-6)
    # what the target's ratio stands for: one row per image per step against a [cond; null] pair per step
    assert (student.calls, student.rows) == (student_run["steps"], n * student_run["steps"])
    assert (teacher.calls, teacher.rows) == (teacher_steps, 2 * n * teacher_steps)

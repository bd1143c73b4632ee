"""`trident distill calibrate`: map the guidance scale a distilled student is asked for to the one its network should
see, so that the student at w draws what its teacher draws at w.

A guidance-distilled student takes w as an input. Trained on w ~ U[min, max], its answer to w can come out steeper or
flatter than the teacher's pair (the question came from the harness: the shipped 4-step student at w = 1.25 drew FD
25.7 and 96.3% agreement against the teacher's 26.0 and 96.2% at 1.5). This measures it on the
images, the thing served: for knots w_k over the student's guidance range the teacher draws n images at w_k with its
default sampling (DPM-Solver++-20 with guidance), the student draws the same classes from the same seeds at every w'
of a grid with its own default sampling (a step-distilled student: its DDIM steps), and the knot's input is the w'
whose images lie closest to the teacher's as distributions: the Frechet distance between the two sets in the
features of the project's classifier (training/quality.py, the quality harness's), its minimum refined by a parabola
through its grid neighbours; the inputs are then made non-decreasing. (Per-pair image distance was tried first: it
prefers the w' whose images regress to the mean, a weaker guidance at every w > 1.5, not the teacher's
distribution; TRAINING.md has the figures.) The calibrated student is the same weights with UNetConfig's
guidance_calibration_w / _input set: the network maps w through them (models.calibrated_guidance), so the export,
every sampler and the served models run it with nothing else changed. The seeds are CALIBRATION_SEED upwards, apart
from the quality harness's (0 upwards).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..serving.errors import TridentError
from ..serving.files import file_sha256
from ..training import checkpoint as ckpt
from ..training.quality import FeatureNet, frechet_distance, moments

CALIBRATION_SEED = 10_000  # the harness draws from seed 0 with one seed per 100 images: these never meet it
KNOTS = 9                  # knots over the student's guidance range (w_min, w_min + (w_max - w_min) / 8, ...)
GRID_STEP = 0.125          # the student's candidate inputs: its guidance range in these steps
TEACHER, STUDENT = "diffusion", "diffusion_student"


def draw(client, model: str, w: float, n: int, num_classes: int, seed: int, batch: int = 100) -> np.ndarray:
    """n images of classes i % num_classes at guidance w, the model's default sampling, batch b from seed + b."""
    labels = np.arange(n) % num_classes
    return np.concatenate([client.sample(labels[i:i + batch], guidance=float(w), seed=seed + i, raw=True, model=model)
                           for i in range(0, n, batch)])


def refine(grid: np.ndarray, errors: np.ndarray) -> float:
    """The grid point of least error, moved to the vertex of the parabola through it and its two neighbours (kept
    between them); an end point stays."""
    j = int(np.argmin(errors))
    if j == 0 or j == len(grid) - 1:
        return float(grid[j])
    e0, e1, e2 = errors[j - 1], errors[j], errors[j + 1]
    curvature = e0 - 2 * e1 + e2
    if curvature <= 0:
        return float(grid[j])
    step = grid[j + 1] - grid[j]
    return float(grid[j] + np.clip(0.5 * (e0 - e2) / curvature, -1.0, 1.0) * step)


def measure(teacher, student, guidance_range, num_classes: int, features: FeatureNet, n: int, seed: int,
            log=print) -> dict:
    """The Frechet distances: {"knots", "grid", "fd": [knot][grid point]}; teacher and student are SDK clients
    (TridentClient) serving models "diffusion" and "diffusion_student"."""
    low, high = guidance_range
    knots = np.linspace(low, high, KNOTS)
    grid = np.arange(low, high + 1e-9, GRID_STEP)
    t0 = time.perf_counter()
    reference = []
    for w in knots:
        reference.append(moments(features(draw(teacher, TEACHER, w, n, num_classes, seed))[0]))
        log(f"teacher at w={w:g}: {n} images ({time.perf_counter() - t0:.0f} s)")
    fd = np.zeros((len(knots), len(grid)))
    for j, g in enumerate(grid):
        mu, sigma = moments(features(draw(student, STUDENT, g, n, num_classes, seed))[0])
        fd[:, j] = [frechet_distance(mu, sigma, *ref) for ref in reference]
        log(f"student at w'={g:g} ({time.perf_counter() - t0:.0f} s)")
    return {"knots": knots.tolist(), "grid": grid.tolist(), "fd": fd.tolist(),
            "seconds": round(time.perf_counter() - t0, 1)}


def check_pair(student_path: Path, teacher_path: Path):
    """(student meta, student card, teacher card); ValueError unless the student takes the guidance scale and the
    teacher is a guided-pair model of the same schedule, prediction type and classes."""
    meta = ckpt.read_meta(student_path, "diffusion")
    scard, tcard = ckpt.card_of(meta, student_path), ckpt.card_of(ckpt.read_meta(teacher_path, "diffusion"),
                                                                  teacher_path)
    if scard.guidance_range is None:
        raise ValueError(f"{student_path} takes no guidance scale (not a guidance-distilled student): nothing to "
                         "calibrate")
    if tcard.guidance_range is not None:
        raise ValueError(f"{teacher_path} is itself a student; calibrate against the teacher that draws guided pairs")
    if (scard.schedule, scard.prediction_type, scard.null_class) != (tcard.schedule, tcard.prediction_type,
                                                                    tcard.null_class):
        raise ValueError(f"{student_path} and {teacher_path} differ in schedule, prediction type or classes: "
                         "not a student of this teacher")
    if meta["config"].get("guidance_calibration_w"):
        raise ValueError(f"{student_path} is calibrated already: calibrate the student it was made from "
                         f"(its header's calibration record names the measurements)")
    return meta, scard, tcard


def calibrated_checkpoint(student_path: Path, teacher_path: Path, measured: dict, out: Path, n: int, seed: int,
                          classifier: Path) -> dict:
    """Write out/model.safetensors: the student's weights with the map the measurements choose; returns the record
    (also in the checkpoint's header under "calibration")."""
    tensors, meta = ckpt.load_checkpoint(student_path, "diffusion")
    grid, fd = np.array(measured["grid"]), np.array(measured["fd"])
    inputs = np.maximum.accumulate([refine(grid, row) for row in fd])
    record = {"teacher": str(teacher_path), "teacher_sha256": file_sha256(teacher_path),
              "classifier_sha256": file_sha256(classifier), "n": n, "seed": seed,
              "knots": [round(float(w), 4) for w in measured["knots"]],
              "inputs": [round(float(v), 4) for v in inputs],
              "fd_at_w": [round(float(np.interp(w, grid, row)), 3) for w, row in zip(measured["knots"], fd)],
              "fd_at_input": [round(float(np.interp(v, grid, row)), 3) for v, row in zip(inputs, fd)],
              "grid": [round(float(g), 4) for g in grid], "fd": np.round(fd, 3).tolist(),
              "seconds": measured["seconds"]}
    config = {**meta["config"], "guidance_calibration_w": record["knots"], "guidance_calibration_input": record["inputs"]}
    from ..training.models import UNetConfig

    UNetConfig.from_dict(config)  # checks the map
    meta = {**{k: v for k, v in meta.items() if k not in ("format", "version")}, "config": config,
            "calibration": record}
    out.mkdir(parents=True, exist_ok=True)
    ckpt.save_checkpoint(out / "model.safetensors", tensors, meta)
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trident distill calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("student", type=Path, help="the distilled student's model.safetensors")
    p.add_argument("--teacher", type=Path, required=True, help="the teacher's model.safetensors (draws guided pairs)")
    p.add_argument("--out", type=Path, required=True, help="folder for the calibrated model.safetensors")
    p.add_argument("--classifier", type=Path, default=Path("checkpoints/classifier/model.safetensors"),
                   help="the feature extractor of the distances (the quality harness's classifier)")
    p.add_argument("--n", type=int, default=500, help="images per knot and per candidate input")
    p.add_argument("--seed", type=int, default=CALIBRATION_SEED)
    p.add_argument("--work", type=Path, default=Path(".trident"), help="export cache (the two models run in-process "
                   "on their fp32 ONNX exports, as `trident evaluate` runs them)")
    p.add_argument("--threads", type=int, default=0, help="threads per call (0: every available core)")
    return p


def main(argv=None) -> int:
    from .build import ensure_export
    from ..serving.client import TridentClient

    args = build_parser().parse_args(argv)
    prog = "trident distill calibrate"
    if args.n < 2:
        print(f"{prog}: --n must be >= 2 (a Frechet distance needs a covariance)", file=sys.stderr)
        return 2
    if args.out.resolve() == args.student.resolve().parent:
        print(f"{prog}: --out must be another folder than the student's (the student stays as it was)",
              file=sys.stderr)
        return 2
    try:
        _, scard, tcard = check_pair(args.student, args.teacher)
        features = FeatureNet(args.classifier)
        exports = [ensure_export(args.teacher, args.work / "exports", TEACHER),
                   ensure_export(args.student, args.work / "exports", STUDENT)]
    except (ckpt.CheckpointError, TridentError, ValueError, OSError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    with TridentClient.from_onnx(exports, threads=args.threads) as client:
        measured = measure(client, client, scard.guidance_range, tcard.null_class, features, args.n, args.seed)
    record = calibrated_checkpoint(args.student, args.teacher, measured, args.out, args.n, args.seed, args.classifier)
    for w, v, d0, d1 in zip(record["knots"], record["inputs"], record["fd_at_w"], record["fd_at_input"]):
        print(f"w {w:g} -> network input {v:.3f}   Frechet distance to the teacher's images {d0:.2f} -> {d1:.2f}")
    print(json.dumps({k: record[k] for k in ("knots", "inputs", "seconds")}))
    print(f"wrote {args.out / 'model.safetensors'}")
    return 0

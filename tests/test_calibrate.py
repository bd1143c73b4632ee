"""`trident distill calibrate` (export/calibrate.py): the student's guidance input mapped to its teacher's scale by
measurement, baked into the network (models.calibrated_guidance), and run unchanged by the ONNX export and the SDK."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import ROOT, STUDENT_GUIDANCE, TINY_MODELS
from trident.training import checkpoint as ckpt
from trident.export.calibrate import KNOTS, calibrated_checkpoint, main, measure, refine
from trident.training.models import UNetConfig, build_model, calibrated_guidance


def test_calibrated_guidance_is_piecewise_linear_flat_outside_and_the_identity_without_knots():
    w = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    out = calibrated_guidance(w, (1.0, 3.0, 5.0), (1.0, 2.0, 5.0))
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 1.5, 2.0, 3.5, 5.0, 5.0]))
    assert calibrated_guidance(w, (), ()) is w


@pytest.mark.parametrize("fields, msg", [
    ({"guidance_calibration_w": (1.0, 5.0), "guidance_calibration_input": (1.0,)}, "the same length"),
    ({"guidance_calibration_w": (3.0, 1.0), "guidance_calibration_input": (1.0, 2.0)}, "must ascend"),
    ({"guidance_calibration_w": (1.0, 3.0), "guidance_calibration_input": (2.0, 1.0)}, "must not descend"),
    ({"guidance_calibration_w": (1.0, float("nan")), "guidance_calibration_input": (1.0, 2.0)}, "finite"),
    ({"guidance_input": False, "guidance_calibration_w": (1.0, 5.0), "guidance_calibration_input": (1.0, 5.0)},
     "needs a U-Net with a guidance input"),
])
def test_a_malformed_calibration_is_refused_naming_the_field(fields, msg):
    with pytest.raises(ValueError, match=msg):
        UNetConfig(**{"guidance_input": True, **fields})


def test_refine_finds_the_vertex_between_grid_points_and_keeps_an_end_point():
    grid = np.arange(1.0, 5.01, 0.25)
    assert refine(grid, (grid - 2.1) ** 2) == pytest.approx(2.1)
    assert refine(grid, (grid - 0.5) ** 2) == 1.0  # the minimum lies below the grid: its end
    assert refine(grid, np.abs(grid - 3.0)) == pytest.approx(3.0)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, student_checkpoint):
    """A teacher for conftest's tiny student: its architecture without the guidance input, the same card's schedule
    and v-prediction, seeded random weights (as the student's)."""
    from trident.training.train import TrainConfig, model_card

    out = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    torch.manual_seed(1)
    config = UNetConfig.from_dict(json.loads(TINY_MODELS["diffusion"]))
    model = build_model("diffusion", config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.05)
    card = model_card(TrainConfig(kind="diffusion", out_dir=str(out.parent), prediction_type="v_prediction"), config)
    ckpt.save_checkpoint(out, ckpt.with_prefix(model.state_dict(), "model"),
                         {"kind": "diffusion", "config": config.to_dict(), "card": card.to_dict()})
    return out


CLASSIFIER = ROOT / "checkpoints" / "classifier" / "model.safetensors"


@pytest.fixture(scope="module")
def calibrated(tiny_teacher, student_checkpoint, tmp_path_factory):
    from trident.serving.client import TridentClient
    from trident.training.quality import FeatureNet

    out = tmp_path_factory.mktemp("calibrated")
    with TridentClient.from_torch([tiny_teacher]) as teacher, TridentClient.from_torch([student_checkpoint]) as student:
        measured = measure(teacher, student, STUDENT_GUIDANCE, 10, FeatureNet(CLASSIFIER), n=20, seed=5,
                           log=lambda *a: None)
    record = calibrated_checkpoint(student_checkpoint, tiny_teacher, measured, out, 20, 5, CLASSIFIER)
    return out / "model.safetensors", record


def test_calibrate_writes_the_student_whose_network_at_w_is_the_measured_input(calibrated, student_checkpoint):
    path, record = calibrated
    assert record["knots"] == pytest.approx(np.linspace(*STUDENT_GUIDANCE, KNOTS).tolist())
    inputs = np.array(record["inputs"])
    assert np.all(np.diff(inputs) >= 0) and inputs.min() >= STUDENT_GUIDANCE[0] and inputs.max() <= STUDENT_GUIDANCE[1]
    fd = np.array(record["fd"])
    assert fd.shape == (KNOTS, len(record["grid"])) and np.all(fd >= -1e-6)
    step = record["grid"][1] - record["grid"][0]  # each knot's input is its grid minimum, refined (before monotony)
    best = np.array(record["grid"])[fd.argmin(axis=1)]
    assert np.all(np.abs(np.maximum.accumulate(best) - inputs) <= step + 1e-9)
    student, meta = ckpt.load_model(path, "diffusion")
    plain, plain_meta = ckpt.load_model(student_checkpoint, "diffusion")
    assert meta["calibration"]["inputs"] == record["inputs"] and meta["card"] == plain_meta["card"]
    assert student.config == dataclasses.replace(plain.config, guidance_calibration_w=tuple(record["knots"]),
                                                 guidance_calibration_input=tuple(record["inputs"]))
    torch.manual_seed(0)
    x, t, y = torch.randn(KNOTS, 1, 28, 28), torch.full((KNOTS,), 500.0), torch.arange(KNOTS) % 10
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, y, torch.tensor(record["knots"])),
                                   plain(x, t, y, torch.tensor(record["inputs"])), rtol=1e-5, atol=1e-5)


def test_the_calibrated_students_export_draws_what_its_torch_module_draws(calibrated, tmp_path):
    from conftest import _export_student
    from trident.serving.client import TridentClient

    path, record = calibrated
    assert record["inputs"] != record["knots"]  # the map the export must carry is not the identity
    export = _export_student(path, tmp_path / "diffusion_student", "--no-int8")
    kw = dict(classes=[0, 1, 2], guidance=2.3, seed=3, raw=True, model="diffusion_student")
    with TridentClient.from_onnx([export], threads=1) as onnx, TridentClient.from_torch([path]) as eager:
        np.testing.assert_allclose(onnx.sample(**kw), eager.sample(**kw), rtol=0, atol=1e-4)


def test_calibrate_refuses_a_teacher_that_is_a_student_a_model_without_a_guidance_input_and_a_calibrated_one(
        tiny_teacher, student_checkpoint, calibrated, tmp_path, capsys):
    assert main([str(student_checkpoint), "--teacher", str(student_checkpoint), "--out", str(tmp_path / "a")]) == 2
    assert "is itself a student" in capsys.readouterr().err
    assert main([str(tiny_teacher), "--teacher", str(tiny_teacher), "--out", str(tmp_path / "b")]) == 2
    assert "takes no guidance scale" in capsys.readouterr().err
    assert main([str(student_checkpoint), "--teacher", str(tiny_teacher), "--out", str(student_checkpoint.parent)]) == 2
    assert "another folder than the student's" in capsys.readouterr().err
    assert main([str(calibrated[0]), "--teacher", str(tiny_teacher), "--out", str(tmp_path / "c")]) == 2
    assert "is calibrated already" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")

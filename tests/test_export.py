"""ONNX export: static shapes, parity with PyTorch, metadata, and clean failures."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from trident.export import onnx_export as ex
from trident.serving.spec import GRAPHS_OF_KIND, graph_spec_from_meta, load_export_metadata
from trident.training import checkpoint as ckpt

from conftest import TEST_BUCKETS


def _graphs(export_dirs):
    for kind, d in export_dirs.items():
        info = load_export_metadata(d)
        for graph, entry in info["graphs"].items():
            for precision in ("fp32", "fp16"):
                for bucket, f in entry[precision].items():
                    yield kind, d, info, graph, precision, int(bucket), f


def test_every_graph_has_static_dims_batch_included(export_dirs):
    n = 0
    for kind, d, info, graph, precision, bucket, f in _graphs(export_dirs):
        model = onnx.load(d / f["file"])
        dims = ex.static_dims(model)
        assert all(isinstance(v, int) and v > 0 for ds in dims.values() for v in ds), (graph, dims)
        assert all(ds[0] == bucket for ds in dims.values()), (graph, bucket, dims)
        n += 1
    assert n == sum(len(GRAPHS_OF_KIND[k]) for k in export_dirs) * len(TEST_BUCKETS) * 2


def test_graph_io_names_and_dtypes_come_from_the_spec(export_dirs):
    to_np = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64"}
    for kind, d, info, graph, precision, bucket, f in _graphs(export_dirs):
        spec = graph_spec_from_meta(graph, info)
        model = onnx.load(d / f["file"])
        got = [(v.name, to_np[v.type.tensor_type.elem_type]) for v in list(model.graph.input) + list(model.graph.output)]
        assert got == [(t.name, t.dtype) for t in spec.inputs + spec.outputs]


def test_parity_with_pytorch_is_below_tolerance_and_recorded(export_dirs):
    worst = {}
    for kind, d, info, graph, precision, bucket, f in _graphs(export_dirs):
        limit = ex.FP32_TOLERANCE if precision == "fp32" else ex.FP16_TOLERANCE
        assert 0 <= f["parity_max_abs_err"] < limit
        worst[(graph, precision)] = max(worst.get((graph, precision), 0), f["parity_max_abs_err"])
    print("max abs error vs PyTorch:", {f"{g}/{p}": f"{e:.2e}" for (g, p), e in worst.items()})


def test_onnx_runtime_output_matches_pytorch_again_on_fresh_inputs(checkpoints, export_dirs):
    import torch

    for kind in export_dirs:
        model, meta = ckpt.load_model(checkpoints[kind])
        info = load_export_metadata(export_dirs[kind])
        for graph in info["graphs"]:
            spec = graph_spec_from_meta(graph, info)
            module = ex.graph_module(graph, model)
            inputs = ex.example_inputs(spec, 4, info, seed=123)
            sess = ort.InferenceSession(str(export_dirs[kind] / f"{graph}_b4.onnx"), providers=["CPUExecutionProvider"])
            got = sess.run(None, {t.name: a for t, a in zip(spec.inputs, inputs)})
            with torch.no_grad():
                ref = module(*[torch.from_numpy(a) for a in inputs])
            ref = [ref] if torch.is_tensor(ref) else ref
            for g, r in zip(got, ref):
                np.testing.assert_allclose(g, r.numpy(), atol=1e-4)


def test_timestep_embedding_is_computed_from_the_input_not_folded(export_dirs):
    d = export_dirs["diffusion"]
    model = onnx.load(d / "diffusion_unet_b1.onnx")
    assert any("timestep" in node.input for node in model.graph.node)
    assert any(node.op_type in ("Cos", "Sin") for node in model.graph.node)  # sinusoidal embedding stays in the graph
    sess = ort.InferenceSession(str(d / "diffusion_unet_b1.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    a = sess.run(None, {"sample": x, "timestep": np.array([10.0], np.float32), "class_label": np.array([3])})[0]
    b = sess.run(None, {"sample": x, "timestep": np.array([900.0], np.float32), "class_label": np.array([3])})[0]
    assert not np.allclose(a, b)


def test_metadata_round_trip_carries_everything_a_client_needs(checkpoints, export_dirs):
    for kind, d in export_dirs.items():
        meta = ckpt.read_meta(checkpoints[kind])
        info = json.loads((d / "metadata.json").read_text())
        assert info["kind"] == kind and info["class_names"] == meta["class_names"]
        assert info["image"] == {"channels": 1, "height": 28, "width": 28, "value_range": [-1.0, 1.0]}
        assert info["opset"] == ex.OPSET and info["format"] == "trident.export"
        assert info["source_checkpoint"]["sha256"] == ex._sha256(checkpoints[kind].read_bytes())
        for graph, entry in info["graphs"].items():
            assert entry["buckets"] == list(TEST_BUCKETS)
            assert entry["spec"] == graph_spec_from_meta(graph, info).to_dict()
        if kind == "diffusion":
            assert info["schedule"] == meta["schedule"] and info["null_class"] == 10
            assert info["prediction_type"] == "epsilon"
        else:
            assert info["latent_dim"] == meta["config"]["latent_dim"]
        if kind == "vae":
            assert np.asarray(info["class_centroids"]).shape == (10, info["latent_dim"])


# ---------------------------------------------------------------------------------------------------------------
# Errors: one clear message, nothing half-written
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("buckets,match", [("", "bucket list is empty"), ("2,0", "must be positive"),
                                           ("-4", "must be positive"), ("2,x", "must be integers")])
def test_bad_bucket_list_is_rejected_and_nothing_written(checkpoints, tmp_path, buckets, match):
    with pytest.raises(ex.ExportError, match=match):
        ex.export_checkpoint(checkpoints["vae"], tmp_path / "out", buckets=buckets)
    assert list(tmp_path.iterdir()) == []


def test_classifier_checkpoint_is_refused_with_the_kinds_that_export(tmp_path):
    from trident.training.models import Classifier, ClassifierConfig

    m = Classifier(ClassifierConfig(channels=4))
    p = ckpt.save_checkpoint(tmp_path / "c.safetensors", ckpt.with_prefix(m.state_dict(), "model"),
                             {"kind": "classifier", "config": m.config.to_dict()})
    with pytest.raises(ex.ExportError, match="holds a 'classifier' model; only"):
        ex.export_checkpoint(p, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_gives_checkpoint_error_via_cli(checkpoints, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(checkpoints["gan"].read_bytes()[: 1000])
    assert ex.main([str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "trident export: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unwritable_output_directory_is_reported(checkpoints, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ex.ExportError, match="cannot write the output directory"):
        ex.export_checkpoint(checkpoints["vae"], blocker / "out", buckets="1")


def test_failed_parity_leaves_previous_export_untouched(checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "out"
    ex.export_checkpoint(checkpoints["vae"], out, buckets="1", log=lambda *_: None)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setattr(ex, "FP32_TOLERANCE", 0.0)
    with pytest.raises(ex.ExportError, match="exceeds 0.0"):
        ex.export_checkpoint(checkpoints["vae"], out, buckets="1,4", log=lambda *_: None)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left behind

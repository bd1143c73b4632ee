"""ONNX export: static shapes, parity with PyTorch, metadata, and clean failures."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from trident.export import onnx_export as ex
from trident.serving.spec import GRAPHS_OF_KIND, export_card, graph_spec_of, load_export_metadata
from trident.training import checkpoint as ckpt

from conftest import ROOT, TEST_BUCKETS


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
        spec = graph_spec_of(graph, export_card(info))
        model = onnx.load(d / f["file"])
        got = [(v.name, to_np[v.type.tensor_type.elem_type]) for v in list(model.graph.input) + list(model.graph.output)]
        assert got == [(t.name, t.dtype) for t in spec.inputs + spec.outputs]


# The test's own bounds, not the exporter's (FP32_TOLERANCE 1e-4, FP16_TOLERANCE 2e-2): the outputs here are O(1)
# (tanh images, unit-variance eps, latents within a few units). fp32 graphs differ from PyTorch by op reordering
# only (measured ~1e-6). fp16 weights and activations carry a relative rounding of 2**-11 ~ 5e-4 per op; through
# these shallow networks that stays ~1e-3 (measured 3e-3 at worst, gan_generator), so 1e-2 leaves a margin while a
# wrong weight, a dropped cast or a mis-wired node lands far above it.
TEST_ATOL = {"fp32": 1e-5, "fp16": 1e-2}


def _fixed_inputs(spec, n: int, info: dict) -> list[np.ndarray]:
    """Deterministic inputs chosen here, not by the exporter: timesteps from 0 to T-1, every label including null."""
    rng = np.random.default_rng(20240615)
    inputs = []
    for t in spec.inputs:
        if t.name == "timestep":
            T = int(info["card"]["schedule"]["num_train_timesteps"])
            inputs.append(np.linspace(0, T - 1, n).astype(np.float32))
        elif t.name == "class_label":  # the diffusion U-Net also takes the null class; the GAN only real ones
            top = int(info["card"].get("null_class", len(info["card"]["class_names"]) - 1))
            inputs.append((top - 3 * np.arange(n)) % (top + 1))
        else:
            inputs.append(rng.standard_normal(t.batched(n)).astype(np.float32))
    return inputs


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_runtime_output_matches_the_pytorch_module_on_fixed_inputs(checkpoints, export_dirs, precision):
    """Every exported file (each graph, each bucket) run by ONNX Runtime against the PyTorch module it came from,
    with inputs and bounds of this test's own; the exporter's recorded parity figure is not trusted here.

    What fp16 parity on this machine does and does not show. It runs on the CPU execution provider, which has fp16
    kernels for few ops: ONNX Runtime casts around the rest and computes them in fp32. So it shows that the fp16
    file holds fp16 weights, that its float32 I/O casts are wired, and that rounding weights and the activations
    between nodes to fp16 keeps the output within TEST_ATOL. It does NOT show what the GPU path (CUDA execution
    provider) computes: fp16 arithmetic and accumulation inside convolutions, matmuls, softmax and normalisation,
    and overflow past 65504 there. No GPU runs these tests; that parity is measured on a GPU by the benchmarks.
    """
    import torch

    worst = {}
    for kind, d in export_dirs.items():
        model, _ = ckpt.load_model(checkpoints[kind])
        info = load_export_metadata(d)
        for graph, entry in info["graphs"].items():
            spec = graph_spec_of(graph, export_card(info))
            module = ex.graph_module(graph, model)
            assert sorted(map(int, entry[precision])) == list(TEST_BUCKETS), (graph, precision)
            for bucket, f in entry[precision].items():
                model_proto = onnx.load(d / f["file"])
                weight_types = {w.data_type for w in model_proto.graph.initializer if len(w.dims) > 1}
                expected = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
                assert weight_types == {expected}, (f["file"], weight_types)
                inputs = _fixed_inputs(spec, int(bucket), info)
                so = ort.SessionOptions()
                so.intra_op_num_threads = 1
                sess = ort.InferenceSession(str(d / f["file"]), so, providers=["CPUExecutionProvider"])
                got = sess.run(None, {t.name: a for t, a in zip(spec.inputs, inputs)})
                with torch.no_grad():
                    ref = module(*[torch.from_numpy(a) for a in inputs])
                ref = [ref] if torch.is_tensor(ref) else list(ref)
                assert len(got) == len(ref) == len(spec.outputs)
                for t, g, r in zip(spec.outputs, got, ref):
                    assert g.dtype == np.float32 and g.shape == tuple(r.shape), (f["file"], t.name, g.dtype, g.shape)
                    err = float(np.max(np.abs(g - r.numpy())))
                    assert err < TEST_ATOL[precision], f"{f['file']} {t.name}: max abs error {err:.3g} vs PyTorch"
                    worst[graph] = max(worst.get(graph, 0.0), err)
                assert 0 <= f["parity_max_abs_err"] < TEST_ATOL[precision]  # the figure clients read is recorded
    print(f"{precision} max abs error vs PyTorch:", {g: f"{e:.2e}" for g, e in worst.items()})


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
        trained = ckpt.card_of(meta)
        info = json.loads((d / "metadata.json").read_text())
        # the checkpoint's card, with the exported buckets added and nothing else changed
        assert export_card(info) == trained.with_buckets({g: TEST_BUCKETS for g in info["graphs"]})
        assert info["card"]["kind"] == kind and info["card"]["class_names"] == list(trained.class_names)
        assert info["card"]["image"] == {"channels": 1, "height": 28, "width": 28, "value_range": [-1.0, 1.0]}
        assert info["opset"] == ex.OPSET and info["format"] == "trident.export"
        assert info["source_checkpoint"]["sha256"] == ex._sha256(checkpoints[kind].read_bytes())
        for graph, entry in info["graphs"].items():
            assert entry["buckets"] == list(TEST_BUCKETS)
            assert entry["spec"] == graph_spec_of(graph, export_card(info)).to_dict()
        if kind == "diffusion":
            assert info["card"]["schedule"] == trained.schedule and info["card"]["null_class"] == 10
            # what the checkpoint was trained to predict (the shipped teacher: v), which every sampler follows
            assert info["card"]["prediction_type"] == trained.prediction_type
            assert trained.prediction_type == ("v_prediction" if checkpoints[kind].parent.parent == ROOT / "checkpoints"
                                               else "epsilon")
        else:
            assert info["card"]["latent_dim"] == meta["config"]["latent_dim"]
        if kind == "vae":
            assert np.asarray(info["card"]["class_centroids"]).shape == (10, info["card"]["latent_dim"])


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


def test_int8_beyond_its_tolerance_is_left_out_and_the_reason_reaches_auto_and_a_fixed_int8_build(checkpoints,
                                                                                                 tmp_path, monkeypatch):
    from trident.serving import precision
    from trident.serving.manifest import load_export

    out = tmp_path / "out"
    monkeypatch.setattr(ex, "INT8_TOLERANCE", 0.0)  # a real parity check that fails, made certain
    meta = ex.export_checkpoint(checkpoints["gan"], out, buckets="1,4", log=lambda *_: None)
    entry = meta["graphs"]["gan_generator"]
    assert entry["int8"] == {} and sorted(entry["fp32"]) == ["1", "4"]  # the fp32 export stands
    assert entry["int8_refused"].startswith("its int8 graph at b1 strays") and "beyond 0.0" in entry["int8_refused"]
    assert not (out / "int8").exists() or not any((out / "int8").iterdir())  # no int8 file left behind
    export = load_export(out)
    assert export.graphs["gan_generator"].int8_refused == entry["int8_refused"]
    record = precision.choose(export, "gan_generator", "auto", gate_file=None, row_shards=1)
    assert record["excluded"]["onnxruntime-int8"] == f"the export has no int8 graphs: {entry['int8_refused']}"
    with pytest.raises(ValueError, match="no int8 graphs for onnxruntime-int8: its int8 graph at b1 strays"):
        precision.choose(export, "gan_generator", "onnxruntime-int8")


def test_cached_export_is_made_again_when_its_int8_graphs_came_from_another_quantization_method(checkpoints,
                                                                                                 tmp_path):
    from trident.export.build import ensure_export
    from trident.export.quantize import METHOD

    logs = []
    directory = ensure_export(checkpoints["gan"], tmp_path, "gan", buckets=(1,), log=logs.append)
    assert any(line.startswith("exporting") for line in logs)
    logs.clear()
    assert ensure_export(checkpoints["gan"], tmp_path, "gan", buckets=(1,), log=logs.append) == directory
    assert not logs  # cached: nothing exported
    meta = json.loads((directory / "metadata.json").read_text())
    meta["int8"]["method"] = "8-bit int8 weights (an older trident)"  # graphs that would saturate on AVX2 CPUs
    (directory / "metadata.json").write_text(json.dumps(meta))
    assert ensure_export(checkpoints["gan"], tmp_path, "gan", buckets=(1,), log=logs.append) == directory
    assert any("another quantization method" in line for line in logs), logs
    assert load_export_metadata(directory)["int8"]["method"] == METHOD


def test_teacher_int8_calibration_walks_the_linspace_layout_its_gate_verdict_judged(checkpoints):
    """The teacher's int8 graphs are calibrated on DPM-Solver++ 20 steps on the linspace layout, not on the sampler's
    default (logsnr since session 7): the int8 export cache keys the quantization method only, so a fresh export must
    calibrate as the cached one that precision_gate.json judged did."""
    from trident.export import quantize
    from trident.serving import sampling
    from trident.serving.spec import UNET
    from trident.training.checkpoint import card_of, load_model, read_meta

    path = checkpoints["diffusion"]
    module, _ = load_model(path, "diffusion")
    card = card_of(read_meta(path), path)
    rows = quantize.calibration_inputs(UNET, graph_spec_of(UNET, card), module.eval(), card)
    seen = np.unique(rows[1].astype(np.int64))[::-1]
    schedule = sampling.NoiseSchedule.from_dict(card.schedule)
    linspace = sampling.spaced_timesteps(schedule.num_train_timesteps, 20, "linspace", skip_zero=True)
    default = sampling.make_sampler("dpmpp-2m", schedule)
    default.set_timesteps(20)
    np.testing.assert_array_equal(seen, linspace)
    assert not np.array_equal(seen, default.timesteps)  # the pin matters: the default layout is another one

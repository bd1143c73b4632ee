"""Runtimes and precisions (serving/precision.py, the ort_runner engines, export/quantize.py): every variant against
onnxruntime-fp32, the rules `auto` chooses by, the repository that records the choice, a real server running it,
and the fast version of the quality gate (a short sampling run judged by the classifier)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trident.serving import precision
from trident.serving.files import file_sha256
from trident.serving.ort_runner import BucketRunner
from trident.serving.spec import GRAPHS_OF_KIND, UNET, load_export_metadata

ROOT = Path(__file__).resolve().parents[1]
CPU = precision.cpu_info()


def runnable_here(variant: str) -> bool:
    return precision.not_native(variant, CPU) is None


def files_of(export_dir: Path, entry: dict, files: str) -> dict[int, str]:
    return {int(b): str(export_dir / f["file"]) for b, f in entry[files].items()}


def passing_gate(tmp_path: Path, meta: dict, variants=("openvino-bf16", "onnxruntime-int8", "openvino-int8")) -> Path:
    """A gate file in the format `trident evaluate --precision-gate` writes, passing these variants for meta's
    checkpoint (the real verdicts for the shipped checkpoints are in benchmarks/results/precision_gate.json)."""
    sha = meta["source_checkpoint"]["sha256"]
    path = tmp_path / "gate.json"
    path.write_text(json.dumps({"checkpoints": {sha: {"variants": {v: {"pass": True} for v in variants}}}}))
    return path


@pytest.mark.parametrize("variant", precision.CPU_VARIANTS)
def test_variant_matches_onnxruntime_fp32_within_its_tolerance_when_run_on_the_parity_batch(export_dirs, variant):
    if not runnable_here(variant):
        pytest.skip(f"{variant}: {precision.not_native(variant, CPU)} (flags {CPU['flags']})")
    files, engine = precision.VARIANTS[variant]
    tolerance = precision.PARITY_TOLERANCE[precision.precision_of(variant)]
    for kind, directory in export_dirs.items():
        meta = load_export_metadata(directory)
        for graph in GRAPHS_OF_KIND[kind]:
            entry = meta["graphs"][graph]
            parity = precision.load_parity(directory, entry)
            feed = {name: rows[:5] for name, rows in parity.items()}  # 5 rows: buckets 4 + 1 (zero-padded)
            reference = BucketRunner(files_of(directory, entry, "fp32")).run(feed)
            runner = BucketRunner(files_of(directory, entry, files), engines={b: engine for b in entry["buckets"]})
            out = runner.run(feed)
            for name, ref in reference.items():
                assert out[name].shape == ref.shape and out[name].dtype == np.float32
                err = float(np.max(np.abs(out[name] - ref)))
                assert err <= tolerance, (variant, graph, name, err)
                if precision.precision_of(variant) in precision.REDUCED:
                    assert err > 0, (variant, graph)  # it really ran at the reduced precision


def test_int8_graph_is_quantized_smaller_and_recorded_when_exported(export_dirs):
    import onnx

    meta = load_export_metadata(export_dirs["diffusion"])
    entry = meta["graphs"][UNET]
    assert "QDQ" in meta["int8"]["method"]
    for b, f in entry["int8"].items():
        model = onnx.load(export_dirs["diffusion"] / f["file"])
        ops = {n.op_type for n in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        fp32_size = (export_dirs["diffusion"] / entry["fp32"][b]["file"]).stat().st_size
        assert (export_dirs["diffusion"] / f["file"]).stat().st_size < 0.5 * fp32_size
        assert 0 < f["parity_max_abs_err"] < 0.5


def test_candidates_exclude_bf16_without_bf16_hardware_and_reduced_precisions_without_a_passed_gate():
    no_bf16 = {"flags": ["avx2", "avx512f"]}
    bf16 = {"flags": ["avx512f", "avx512_vnni", "amx_bf16"]}
    exported = {"fp32", "int8"}
    passed = {v: {"pass": True} for v in ("openvino-bf16", "onnxruntime-int8", "openvino-int8")}
    out = precision.candidates(exported, no_bf16, passed)
    assert out["openvino-bf16"].startswith("this CPU has none of")
    assert out["openvino-int8"] == f"this CPU has none of {precision.INT8_DOT_FLAGS}"  # no VNNI: OpenVINO int8 is off
    assert out["onnxruntime-int8"] is None and out["openvino-fp32"] is None and out["onnxruntime-fp32"] is None
    assert precision.candidates(exported, bf16, passed)["openvino-bf16"] is None
    ungated = precision.candidates(exported, bf16, {})
    assert all("no quality gate result" in ungated[v] for v in passed)
    failed = precision.candidates(exported, bf16, {"openvino-int8": {"pass": False}})
    assert failed["openvino-int8"] == "failed the quality gate"
    assert precision.candidates({"fp32"}, bf16, passed)["openvino-int8"] == "the export has no int8 graphs"
    unjudged = precision.candidates(exported, bf16, passed, judged=False)  # e.g. the VAE encoder
    assert unjudged["openvino-int8"] == "the quality gate does not draw through this graph"
    assert unjudged["openvino-fp32"] is None


def test_auto_chooses_per_bucket_only_variants_that_beat_fp32_in_every_round_when_measured(export_dirs, tmp_path):
    meta = load_export_metadata(export_dirs["diffusion"])
    record = precision.choose(export_dirs["diffusion"], meta, UNET, "auto", gate_file=passing_gate(tmp_path, meta),
                              row_shards=1)
    assert record["cpu"]["model"] and sorted(record["choice"]) == sorted(meta["graphs"][UNET]["buckets"])
    for variant in precision.CPU_VARIANTS:  # a variant this CPU cannot run natively is never tried
        if not runnable_here(variant):
            assert record["excluded"][variant] == precision.not_native(variant, CPU)
    for b, variant in record["choice"].items():
        results = record["buckets"][b]
        assert results[precision.REFERENCE]["why"] == "reference" and len(results[variant]["rounds_ms"]) == 3
        if variant != precision.REFERENCE:
            assert all(m < f for m, f in zip(results[variant]["rounds_ms"],
                                             results[precision.REFERENCE]["rounds_ms"]))
            assert results[variant]["max_abs_err"] <= precision.PARITY_TOLERANCE[precision.precision_of(variant)]
        # the fastest of those that passed
        passed = [v for v, r in results.items() if r["ok"]]
        assert variant == min(passed, key=lambda v: results[v]["ms"])


def test_auto_keeps_fp32_when_every_variant_breaks_the_parity_gate(export_dirs, tmp_path, monkeypatch):
    meta = load_export_metadata(export_dirs["gan"])
    monkeypatch.setitem(precision.PARITY_TOLERANCE, "fp32", 0.0)  # a real failed check, made certain
    monkeypatch.setitem(precision.PARITY_TOLERANCE, "bf16", 0.0)
    monkeypatch.setitem(precision.PARITY_TOLERANCE, "int8", 0.0)
    record = precision.choose(export_dirs["gan"], meta, "gan_generator", "auto",
                              gate_file=passing_gate(tmp_path, meta), row_shards=1)
    assert set(record["choice"].values()) == {precision.REFERENCE}
    for results in record["buckets"].values():
        assert all(r["why"].startswith("max abs error") for v, r in results.items() if v != precision.REFERENCE)


def test_auto_without_a_gate_result_tries_only_fp32_runtimes(export_dirs):
    meta = load_export_metadata(export_dirs["vae"])
    record = precision.choose(export_dirs["vae"], meta, "vae_decoder", "auto", gate_file=None, row_shards=1)
    assert set(record["choice"].values()) <= {"onnxruntime-fp32", "openvino-fp32"}
    assert {"openvino-int8", "onnxruntime-int8"} <= set(record["excluded"])


def test_serve_build_auto_records_choice_and_trial_when_built(export_dirs, tmp_path, capsys):
    from trident.serving.server.repository import MARKER, main

    meta = load_export_metadata(export_dirs["gan"])
    out = tmp_path / "repo"
    assert main(["--export", str(export_dirs["gan"]), "--out", str(out), "--precision", "auto",
                 "--quality-gate", str(passing_gate(tmp_path, meta)), "--row-shards", "1"]) == 0
    marker = json.loads((out / MARKER).read_text())
    record = marker["precision"]["gan_generator"]
    assert record["precision"] == "auto" and record["cpu"]["flags"] == precision.cpu_info()["flags"]
    assert all("ms" in r for r in record["buckets"]["1"].values() if r["ok"])
    config = (out / "gan_generator" / "config.pbtxt").read_text()
    chosen = json.loads(json.loads('"' + config.split('key: "trident_precision"')[1].split('string_value: "')[1]
                                   .split('"\n')[0] + '"'))
    assert chosen == record["choice"]
    assert "gan_generator b1:" in capsys.readouterr().out  # the trial's numbers are printed as it runs


def test_serve_build_refuses_a_precision_the_export_lacks_or_the_container_flavour(export_dirs, tmp_path, capsys):
    from trident.serving.server.repository import main

    assert main(["--export", str(export_dirs["gan"]), "--out", str(tmp_path / "a"), "--precision",
                 "onnxruntime-fp16"]) == 2
    assert "fp16" in capsys.readouterr().err
    assert main(["--export", str(export_dirs["gan"]), "--out", str(tmp_path / "b"), "--flavour", "container",
                 "--precision", "openvino-int8"]) == 2
    assert "embedded flavour" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.server
def test_repository_of_a_reduced_precision_serves_it_equal_to_in_process(export_dirs, tmp_path):
    from trident.serving.client import TridentClient
    from trident.serving.server.launcher import ServerConfig, TritonServer
    from trident.serving.server.repository import build_repository

    variant = "openvino-int8"  # runs on every x86 CPU; bf16 would need the hardware
    repo = tmp_path / "repo"
    build_repository([export_dirs["diffusion"], export_dirs["gan"]], repo, precision_choice=variant, row_shards=1)
    labels = np.arange(6) % 10
    with TridentClient.from_onnx([export_dirs["diffusion"], export_dirs["gan"]], precision=variant,
                                 row_shards=1) as local:
        want_d = local.sample(labels, steps=3, seed=4, raw=True)
        want_g = local.generate(labels, seed=4, raw=True)
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        with TridentClient.connect(server.grpc_url, "grpc") as served:
            np.testing.assert_allclose(served.sample(labels, steps=3, seed=4, raw=True), want_d, atol=2e-3)
            np.testing.assert_allclose(served.sample(labels, steps=3, seed=4, raw=True, loop="server"), want_d,
                                       atol=2e-3)
            np.testing.assert_allclose(served.generate(labels, seed=4, raw=True), want_g, atol=2e-3)


@pytest.mark.slow
def test_reduced_precisions_draw_like_fp32_when_sampled_briefly(export_dirs):
    """The fast version of the quality gate: 50 images (5 per class) of DPM-Solver++-10 at guidance 3 through each
    reduced variant, against the same draw at fp32: the shipped classifier agrees as often (within 3 images) and
    the images stay close to fp32's. The full gate (1000 images, FD) is `trident evaluate --precision-gate`."""
    classifier = ROOT / "checkpoints" / "classifier" / "model.safetensors"
    if not classifier.is_file():
        pytest.skip("needs the shipped classifier")
    from trident.serving.client import TridentClient
    from trident.training.quality import FeatureNet

    net = FeatureNet(classifier)
    labels = np.arange(50) % 10
    draws = {}
    for variant in ("onnxruntime-fp32", "openvino-bf16", "onnxruntime-int8", "openvino-int8"):
        if not runnable_here(variant):
            continue
        with TridentClient.from_onnx([export_dirs["diffusion"]], precision=variant) as client:
            draws[variant] = client.sample(labels, steps=10, guidance=3.0, seed=0, raw=True)
    agreement = {v: float(np.mean(net(x)[1].argmax(1) == labels)) for v, x in draws.items()}
    fp32 = draws.pop("onnxruntime-fp32")
    assert agreement["onnxruntime-fp32"] >= 0.9, agreement
    for variant, x in draws.items():
        assert agreement[variant] >= agreement["onnxruntime-fp32"] - 0.06, (variant, agreement)
        # the same seeds: trajectories drift apart a little through int8 (mean |diff| 0.064 measured), not away
        assert float(np.mean(np.abs(x - fp32))) < 0.1, variant
        assert abs(float(x.mean()) - float(fp32.mean())) < 0.02, variant  # no drift in brightness

"""Runtimes and precisions (serving/precision.py, the ort_runner engines, export/quantize.py): every variant against
onnxruntime-fp32, the rules `auto` chooses by, the repository that records the choice, a real server running it,
and the fast version of the quality gate (a short sampling run judged by the classifier)."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from trident.serving import precision
from trident.serving.ort_runner import BucketRunner
from trident.serving.manifest import load_export
from trident.serving.spec import GRAPHS_OF_KIND, UNET, export_card, load_export_metadata

ROOT = Path(__file__).resolve().parents[1]
CPU = precision.cpu_info()
HAS_BF16 = any(f in CPU["flags"] for f in precision.BF16_FLAGS)
COMMITTED_GATE = ROOT / "benchmarks" / "results" / "precision_gate.json"
# Max abs difference to onnxruntime-fp32 on the parity batch, per precision and graph, for the shipped checkpoints:
# measured on an AVX2 EPYC (no VNNI), with a margin. int8: 1.5x the largest of buckets 1 and 4 (U-Net 0.091, GAN
# 0.324, VAE decoder 0.108, encoder 0.128): 7-bit weights make the integer math the same on every CPU, only the float
# dequantization's rounding differs. fp32: 10x the largest measured (4.8e-6, the encoder), as kernels sum in another
# order on each ISA. bf16 cannot run on that EPYC: measured 0.015-0.021 on a 2-core Xeon with AMX (issue 23), so 2x
# the largest, as bf16 kernels differ between AMX and AVX-512 BF16 CPUs and only AMX was measured.
TOLERANCE = {"fp32": dict.fromkeys(("diffusion_unet", "gan_generator", "vae_decoder", "vae_encoder"), 5e-5),
             "int8": {"diffusion_unet": 0.14, "gan_generator": 0.49, "vae_decoder": 0.17, "vae_encoder": 0.2},
             "bf16": dict.fromkeys(("diffusion_unet", "gan_generator", "vae_decoder", "vae_encoder"), 0.042)}


def runnable_here(variant: str) -> bool:
    """This CPU has the instructions the variant needs (what auto requires before it offers it)."""
    return precision.not_native(variant, CPU) is None


def files_of(export_dir: Path, entry: dict, files: str) -> dict[int, str]:
    return {int(b): str(export_dir / f["file"]) for b, f in entry[files].items()}


def passing_gate(tmp_path: Path, meta: dict, variants=("openvino-bf16", "onnxruntime-int8", "openvino-int8"),
                 passed: bool = True, method: str | None = "the export's") -> Path:
    """A gate file in the format `trident evaluate --precision-gate` writes, with these verdicts for meta's checkpoint
    (int8 verdicts judged on the export's quantization method unless method says otherwise, a diffusion model's at the
    timesteps its default sampling walks; the real verdicts for the shipped checkpoints are in
    benchmarks/results/precision_gate.json)."""
    sha = meta["source_checkpoint"]["sha256"]
    method = meta["int8"]["method"] if method == "the export's" else method
    verdicts = {v: {"pass": passed, **({"int8_method": method} if method and "int8" in v else {})} for v in variants}
    timesteps = precision.gated_timesteps(export_card(meta))  # a diffusion model's: what its default sampling walks
    entry = {"variants": verdicts, **({"timesteps": timesteps} if timesteps is not None else {})}
    path = tmp_path / "gate.json"
    path.write_text(json.dumps({"checkpoints": {sha: entry}}))
    return path


def runtime_precisions(session) -> set[str]:
    """The precisions OpenVINO's compiled model computes its layers in (its runtime model's rt_info)."""
    return {op.get_rt_info()["runtimePrecision"].astype(str) for op in session.compiled.get_runtime_model().get_ops()}


@pytest.mark.parametrize("variant", precision.CPU_VARIANTS)
def test_variant_matches_onnxruntime_fp32_within_its_tolerance_when_run_on_the_parity_batch(export_dirs, variant):
    from trident.serving.ort_runner import _OpenVinoSession, _OrtSession

    if not runnable_here(variant):
        pytest.skip(f"{variant}: {precision.not_native(variant, CPU)} (flags {CPU['flags']})")
    files, engine = precision.VARIANTS[variant].files, precision.VARIANTS[variant].engine
    kind_of_precision = precision.precision_of(variant)
    for kind, directory in export_dirs.items():
        meta = load_export_metadata(directory)
        for graph in GRAPHS_OF_KIND[kind]:
            entry = meta["graphs"][graph]
            tolerance = TOLERANCE.get(kind_of_precision, {}).get(graph, precision.PARITY_TOLERANCE[kind_of_precision])
            parity = precision.load_parity(load_export(directory), graph)
            have = len(next(iter(parity.values())))
            reference = BucketRunner(files_of(directory, entry, "fp32"), row_shards=1).run(parity)  # bucket 4
            runner = BucketRunner(files_of(directory, entry, files), engines={b: engine for b in entry["buckets"]},
                                  row_shards=1)
            # 1 row: bucket 1; 3 rows: bucket 4 with a zero-padded row; 5 rows: bucket 4 then bucket 1
            for n in (1, 3, 5):
                out = runner.run(precision._rows(parity, list(parity), n))
                for name, ref in reference.items():
                    want = ref[np.arange(n) % have]
                    assert out[name].shape == want.shape and out[name].dtype == np.float32
                    err = float(np.max(np.abs(out[name] - want)))
                    assert err <= tolerance, (variant, graph, n, name, err)
                    if kind_of_precision in precision.REDUCED:
                        assert err > 0, (variant, graph)  # it really ran at the reduced precision
            # the engine the variant names ran both buckets, at its precision
            for b in (1, 4):
                session = runner.sessions[b]
                if engine == "onnxruntime":
                    assert isinstance(session, _OrtSession), (variant, b)
                else:
                    assert isinstance(session, _OpenVinoSession), (variant, b)
                    computed = runtime_precisions(session)
                    assert ({"i8", "u8"} & computed if files == "int8" else not {"i8", "u8"} & computed), computed
                    hint = session.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
                    assert hint == ("bf16" if kind_of_precision == "bf16" else "f32"), (variant, hint)
            runner.close()


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
        assert 0 < f["parity_max_abs_err"] <= TOLERANCE["int8"][UNET]


def test_candidates_exclude_variants_this_cpu_lacks_the_instructions_for_and_reduced_ones_the_gate_did_not_pass():
    plain = {"flags": ["avx2", "avx512f"]}
    native = {"flags": ["avx512f", "amx_bf16", "amx_int8"]}
    exported = {"fp32", "int8"}
    passed = dict.fromkeys(("openvino-bf16", "onnxruntime-int8", "openvino-int8"))
    out = precision.candidates(exported, plain, passed)
    assert out["openvino-bf16"] == "this CPU has none of avx512_bf16, amx_bf16"
    assert out["openvino-int8"] == "this CPU has none of amx_int8"
    assert out["onnxruntime-int8"] is None and out["openvino-fp32"] is None and out["onnxruntime-fp32"] is None
    assert all(why is None for why in precision.candidates(exported, native, passed).values())
    gate = {"openvino-bf16": "no quality gate file given", "onnxruntime-int8": "failed the quality gate",
            "openvino-int8": "failed the quality gate"}
    assert precision.candidates(exported, native, gate) == {**gate, "onnxruntime-fp32": None, "openvino-fp32": None}
    assert precision.candidates({"fp32"}, native, passed)["openvino-int8"] == "the export has no int8 graphs"
    unjudged = precision.candidates(exported, native, passed, judged=False)  # e.g. the VAE encoder
    assert unjudged["openvino-int8"] == "the quality gate does not draw through this graph"
    assert unjudged["openvino-fp32"] is None


def test_judge_passes_a_variant_only_within_its_tolerance_and_faster_in_every_round():
    judge = precision.judge
    assert judge("onnxruntime-int8", 0.05, [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]) == (True, "passed")
    # a faster median that lost one round is noise, not a win
    assert judge("onnxruntime-int8", 0.05, [1.0, 1.0, 2.1], [2.0, 2.0, 2.0]) == (
        False, "not faster than onnxruntime-fp32 in every round")
    assert judge("onnxruntime-int8", 0.05, [1.0, 2.0, 1.0], [2.0, 2.0, 2.0])[0] is False  # a tie is no win
    assert judge("openvino-fp32", 2e-3, [1.0] * 3, [2.0] * 3) == (False, "max abs error 0.002 > 0.001")
    assert judge(precision.REFERENCE, 0.0, [5.0] * 3, [5.0] * 3) == (True, "reference")


def test_shard_limit_is_the_smallest_bucket_within_two_percent_of_the_fastest_per_row():
    assert precision.shard_limit_of({1: 1.0, 4: 0.509, 16: 0.5}) == 4  # 1.8% slower per row: not worth b16
    assert precision.shard_limit_of({1: 1.0, 4: 0.511, 16: 0.5}) == 16  # 2.2%
    assert precision.shard_limit_of({1: 0.5, 4: 0.6, 16: 0.7}) == 1


def test_auto_measures_every_offered_variant_and_chooses_per_bucket_the_fastest_that_passed(export_dirs, tmp_path):
    meta = load_export_metadata(export_dirs["diffusion"])
    record = precision.choose(load_export(export_dirs["diffusion"]), UNET, "auto",
                              gate_file=passing_gate(tmp_path, meta), row_shards=1)
    assert record["cpu"]["model"] and sorted(record["choice"]) == sorted(meta["graphs"][UNET]["buckets"])
    tried = {v for v in precision.CPU_VARIANTS if runnable_here(v)}  # a judged graph whose gate passed everything
    # nothing offered silently went missing (the gate, the graph's judgement, a runtime that did not load)
    assert set(record["excluded"]) == set(precision.CPU_VARIANTS) - tried, record["excluded"]
    fastest = {}
    for b in record["choice"]:
        results = record["buckets"][b]
        assert set(results) == tried and all(len(r["rounds_ms"]) == precision.ROUNDS for r in results.values())
        assert all((r["ok"], r["why"]) == precision.judge(v, r["max_abs_err"], r["rounds_ms"],
                                                          results[precision.REFERENCE]["rounds_ms"])
                   for v, r in results.items())
        passed = [v for v, r in results.items() if r["ok"]]
        fastest[b] = min(passed, key=lambda v: results[v]["ms"])  # the fastest of those that passed
    # ... kept on one runtime unless the mix wins by more than MIXED_RUNTIME_GAIN (test_one_runtime_*)
    choice, runtimes = precision.one_runtime(record["buckets"], fastest)
    assert record["choice"] == choice and record.get("one_runtime") == runtimes
    assert all(record["buckets"][b][v]["ok"] for b, v in record["choice"].items())


def _results(ms: dict[int, dict[str, float]], failed: dict[int, set] | None = None) -> dict:
    """trial's per-bucket results from made-up medians ({bucket: {variant: ms}}), every variant passing unless
    named in failed ({bucket: {variant}})."""
    return {b: {v: {"ms": t, "ok": v not in (failed or {}).get(b, ())} for v, t in row.items()}
            for b, row in ms.items()}


def test_the_trial_measures_what_other_processes_ran_and_warns_when_it_was_busy():
    import os
    import subprocess
    import sys
    import time
    hz = os.sysconf("SC_CLK_TCK")
    # all CPUs busy for 3 s of ticks, this process for 1 s of them, over 2 s: the others used one core
    assert precision.other_load((0, 0), (3 * hz, hz), 2.0) == pytest.approx(1.0)
    assert precision.other_load(None, (1, 1), 1.0) is None
    assert precision.busy_warning("unet", 0.2) is None and precision.busy_warning("unet", None) is None
    assert "other processes used 0.80 cores on average while unet's variants were timed" in \
        precision.busy_warning("unet", 0.8)
    # a real neighbour that spins one core for the whole window is seen (other work only adds to it)
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 30: pass"])
    try:
        time.sleep(0.5)
        before, t0 = precision._cpu_ticks(), time.perf_counter()
        time.sleep(2.0)
        load = precision.other_load(before, precision._cpu_ticks(), time.perf_counter() - t0)
    finally:
        spin.kill()
        spin.wait()
    assert load is not None and load >= 0.7, load


def test_one_runtime_drops_a_second_runtime_that_wins_less_than_its_memory_is_worth():
    # an AVX-512 EPYC's U-Net: openvino-bf16 wins only b1, onnxruntime-int8 the rest (trident_measured.json)
    results = _results({1: {"onnxruntime-fp32": 2.98, "onnxruntime-int8": 2.93, "openvino-bf16": 2.25},
                        2: {"onnxruntime-fp32": 4.80, "onnxruntime-int8": 3.07, "openvino-bf16": 3.91},
                        16: {"onnxruntime-fp32": 33.0, "onnxruntime-int8": 19.1, "openvino-bf16": 25.0}},
                       failed={1: {"onnxruntime-int8"}})
    fastest = {1: "openvino-bf16", 2: "onnxruntime-int8", 16: "onnxruntime-int8"}
    choice, record = precision.one_runtime(results, fastest)
    assert choice == {1: "onnxruntime-fp32", 2: "onnxruntime-int8", 16: "onnxruntime-int8"}  # b1: int8 failed
    assert record["kept"] == "onnxruntime" and record["mixed_ms"] == pytest.approx(2.25 + 3.07 + 19.1)
    assert record["onnxruntime_ms"] == pytest.approx(2.98 + 3.07 + 19.1)
    assert record["openvino_ms"] == pytest.approx(2.25 + 3.91 + 25.0)
    assert "one runtime (onnxruntime)" in record["why"]


def test_one_runtime_keeps_the_mix_when_it_wins_by_more_than_the_gain_and_prefers_the_faster_single_runtime():
    ms = {1: {"onnxruntime-fp32": 5.0, "openvino-bf16": 2.0}, 32: {"onnxruntime-fp32": 40.0, "openvino-bf16": 20.0,
                                                                  "onnxruntime-int8": 15.0}}
    fastest = {1: "openvino-bf16", 32: "onnxruntime-int8"}
    # 17 ms mixed against 20 on onnxruntime alone (+18%) and 22 on openvino alone: the mix stays
    choice, record = precision.one_runtime(_results(ms), fastest)
    assert choice == fastest and record["kept"] == "mixed"
    assert (record["onnxruntime_ms"], record["openvino_ms"]) == pytest.approx((20.0, 22.0))
    # int8 at 19.5: openvino alone (22.0) is within 10% of the mix (21.5) and beats onnxruntime alone (24.5)
    ms[32]["onnxruntime-int8"] = 19.5
    choice, record = precision.one_runtime(_results(ms), fastest)
    assert choice == {1: "openvino-bf16", 32: "openvino-bf16"} and record["kept"] == "openvino"
    # a runtime without a passing variant at some bucket is no single-runtime option (onnxruntime always has fp32)
    ms[1]["onnxruntime-fp32"] = 3.0
    choice, record = precision.one_runtime(_results(ms, failed={32: {"openvino-bf16"}}), fastest)
    assert "openvino_ms" not in record and choice == {1: "onnxruntime-fp32", 32: "onnxruntime-int8"}
    # one runtime already: nothing to decide, no record
    assert precision.one_runtime(_results(ms), {1: "onnxruntime-fp32", 32: "onnxruntime-int8"}) == (
        {1: "onnxruntime-fp32", 32: "onnxruntime-int8"}, None)


def test_auto_keeps_fp32_when_every_variant_breaks_the_parity_gate(export_dirs, tmp_path, monkeypatch):
    meta = load_export_metadata(export_dirs["gan"])
    monkeypatch.setitem(precision.PARITY_TOLERANCE, "fp32", 0.0)  # a real failed check, made certain
    monkeypatch.setitem(precision.PARITY_TOLERANCE, "bf16", 0.0)
    monkeypatch.setitem(precision.PARITY_TOLERANCE, "int8", 0.0)
    record = precision.choose(load_export(export_dirs["gan"]), "gan_generator", "auto",
                              gate_file=passing_gate(tmp_path, meta), row_shards=1)
    assert set(record["choice"].values()) == {precision.REFERENCE}
    for results in record["buckets"].values():
        assert all(r["why"].startswith("max abs error") for v, r in results.items() if v != precision.REFERENCE)


def test_auto_without_a_gate_result_tries_only_fp32_runtimes(export_dirs):
    meta = load_export_metadata(export_dirs["vae"])
    record = precision.choose(load_export(export_dirs["vae"]), "vae_decoder", "auto", gate_file=None, row_shards=1)
    assert set(record["choice"].values()) <= {"onnxruntime-fp32", "openvino-fp32"}
    assert set(record["buckets"][1]) == {"onnxruntime-fp32", "openvino-fp32"}
    assert {v: why for v, why in record["excluded"].items() if why == "no quality gate file given"} == {
        v: "no quality gate file given" for v in ("openvino-bf16", "onnxruntime-int8", "openvino-int8")
        if runnable_here(v)}


def test_auto_keeps_fp32_and_says_why_for_an_export_without_a_parity_batch(export_dirs, tmp_path):
    meta = load_export_metadata(export_dirs["gan"])
    export = load_export(export_dirs["gan"])
    export.graphs["gan_generator"] = replace(export.graphs["gan_generator"], parity_inputs=None)  # as an export made
    # before parity batches were saved
    record = precision.choose(export, "gan_generator", "auto", gate_file=passing_gate(tmp_path, meta), row_shards=1)
    assert set(record["choice"].values()) == {precision.REFERENCE} and "buckets" not in record  # nothing to trial on
    assert record["excluded"]["openvino-fp32"] == "the export has no fixed parity batch (re-export)"
    assert all(record["excluded"][v] in ("the export has no fixed parity batch (re-export)",
                                         f"this CPU has none of {', '.join(precision.NATIVE_FLAGS.get(v, ()))}")
               for v in precision.CPU_VARIANTS if v != precision.REFERENCE)


def test_serve_build_auto_records_choice_and_trial_when_built(export_dirs, tmp_path, capsys):
    from trident.serving.server.repository import MARKER, main

    meta = load_export_metadata(export_dirs["gan"])
    out = tmp_path / "repo"
    assert main(["--export", str(export_dirs["gan"]), "--out", str(out), "--precision", "auto",
                 "--quality-gate", str(passing_gate(tmp_path, meta)), "--row-shards", "1"]) == 0
    assert json.loads((out / MARKER).read_text())["precision"] == {"gan_generator": "auto"}
    record = auto_record(out, "gan_generator")  # per machine: in the model's generated file
    assert record["precision"] == "auto" and record["quality_gate"] == str(tmp_path / "gate.json")
    assert record["other_load_cores"] >= 0  # what else ran while the variants were timed
    tried = {v for v in precision.CPU_VARIANTS if runnable_here(v)}
    assert set(record["excluded"]) == set(precision.CPU_VARIANTS) - tried
    assert all(set(results) == tried for results in record["buckets"].values())
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from trident.serving.graph_runtime import GraphRuntime

    config = text_format.Parse((out / "gan_generator" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    runtime = GraphRuntime.from_json(config.parameters["trident_runtime"].string_value)
    assert set(runtime.variants.values()) == {"measured"}  # the same configuration whatever this machine chose
    served = runtime.resolved(str(out / "gan_generator" / "1"))
    assert served.variants == {int(b): v for b, v in record["choice"].items()}
    assert "gan_generator b1:" in capsys.readouterr().out  # the trial's numbers are printed as it runs


def auto_record(repository: Path, model: str) -> dict:
    """What `--precision auto` recorded for a model: its choice, trials and exclusions, in the model's generated
    trident_measured.json (per machine; config.pbtxt and trident_repository.json say only "auto")."""
    from trident.serving.graph_runtime import Measured

    return Measured.read(str(repository / model / "1")).precision


def assert_line_names(line: str, graph: str, excluded: dict[str, str]) -> None:
    """The line `trident serve build --precision auto` printed for a graph names each variant not offered and why,
    and no other."""
    assert line.startswith(f"{graph}: auto did not offer "), line
    assert all(variant in line and why in line for variant, why in excluded.items()), (line, excluded)
    assert not any(v in line for v in precision.CPU_VARIANTS if v not in excluded), line


def gate_of(meta: dict, tmp_path: Path, *, sha: str | None = None, passed: bool = True,
            method: str | None = "the export's", text: str | None = None) -> Path:
    """A gate file for meta's export with int8 and bf16 verdicts: passing, failing, for another checkpoint (sha),
    judged on another quantization method, or (text) whatever bytes a broken file holds."""
    path = passing_gate(tmp_path, meta, passed=passed, method=method)
    if sha is not None:
        path.write_text(path.read_text().replace(meta["source_checkpoint"]["sha256"], sha))
    if text is not None:
        path.write_text(text)
    return path


@pytest.mark.parametrize("cause, gate, why", [
    ("no verdict for this checkpoint", dict(sha="0" * 64), "no quality gate verdict for this checkpoint"),
    ("a failed gate", dict(passed=False), "failed the quality gate"),
    ("another quantization method", dict(method="8-bit weights"), "no quality gate verdict for this quantization "
                                                                     "method (it judged int8 graphs made by another"),
    ("a corrupt gate file", dict(text='{"checkpoints": {'), "is unreadable (JSONDecodeError"),
    ("no gate file", None, "no quality gate file at"),
])
def test_serve_build_auto_prints_and_records_why_a_variant_was_not_offered(export_dirs, tmp_path, capsys, monkeypatch,
                                                                        cause, gate, why):
    from trident.serving.server.repository import MARKER, main

    trial = precision.trial  # what is timed does not matter here: one short round
    monkeypatch.setattr(precision, "trial", lambda *a, **kw: trial(*a, **{**kw, "rounds": 1, "min_seconds": 0.0}))
    meta = load_export_metadata(export_dirs["gan"])
    gate_file = gate_of(meta, tmp_path, **gate) if gate is not None else tmp_path / "missing.json"
    out = tmp_path / "repo"
    assert main(["--export", str(export_dirs["gan"]), "--out", str(out), "--precision", "auto", "--quality-gate",
                 str(gate_file), "--row-shards", "1", "--shard-limit", "0"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "auto did not offer" in line]
    assert len(lines) == 1, lines
    excluded = auto_record(out, "gan_generator")["excluded"]
    assert_line_names(lines[0], "gan_generator", excluded)  # the line says what the record keeps
    for variant in precision.CPU_VARIANTS:
        if not runnable_here(variant):
            assert excluded[variant] == f"this CPU has none of {', '.join(precision.NATIVE_FLAGS[variant])}"
        elif "int8" in variant or ("bf16" in variant and cause != "another quantization method"):
            assert why in excluded[variant], (cause, excluded)  # reduced precisions need the gate's verdict
        else:  # fp32 variants need none, and bf16's verdict does not depend on the int8 quantization method
            assert variant not in excluded, excluded


def test_serve_build_auto_prints_the_instructions_a_cpu_lacks_and_offers_every_variant_to_one_that_has_them(
        export_dirs, tmp_path, capsys, monkeypatch):
    """The CPU rule on both sides whatever CPU runs the test: its flags are the one thing replaced (the variants still
    run on this CPU, OpenVINO at bf16 emulating where it must)."""
    from trident.serving.server.repository import MARKER, main

    trial = precision.trial  # what is timed does not matter here: one short round
    monkeypatch.setattr(precision, "trial", lambda *a, **kw: trial(*a, **{**kw, "rounds": 1, "min_seconds": 0.0}))
    meta = load_export_metadata(export_dirs["gan"])
    gate = passing_gate(tmp_path, meta)
    lines, excluded = {}, {}
    for name, flags in (("plain", ["avx2"]), ("native", ["avx2", "avx512_vnni", "amx_bf16", "amx_int8"])):
        monkeypatch.setattr(precision, "cpu_info", lambda flags=flags: {"model": name, "flags": flags, "cores": 2})
        out = tmp_path / name
        assert main(["--export", str(export_dirs["gan"]), "--out", str(out), "--precision", "auto", "--quality-gate",
                     str(gate), "--row-shards", "1", "--shard-limit", "0"]) == 0
        lines[name] = [line for line in capsys.readouterr().out.splitlines() if "auto did not offer" in line]
        excluded[name] = auto_record(out, "gan_generator")["excluded"]
    assert excluded["plain"] == {"openvino-bf16": "this CPU has none of avx512_bf16, amx_bf16",
                                 "openvino-int8": "this CPU has none of amx_int8"}
    assert len(lines["plain"]) == 1
    assert_line_names(lines["plain"][0], "gan_generator", excluded["plain"])
    assert excluded["native"] == {} and lines["native"] == []


def test_serve_build_auto_prints_which_runtime_could_not_load_and_offers_the_rest(export_dirs, tmp_path, capsys,
                                                                                 monkeypatch):
    import sys

    from trident.serving.server.repository import MARKER, main

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails: a machine without the package
    meta = load_export_metadata(export_dirs["gan"])
    out = tmp_path / "repo"
    assert main(["--export", str(export_dirs["gan"]), "--out", str(out), "--precision", "auto", "--quality-gate",
                 str(passing_gate(tmp_path, meta)), "--row-shards", "1", "--shard-limit", "0"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "auto did not offer" in line)
    record = auto_record(out, "gan_generator")
    openvino = [v for v in ("openvino-fp32", "openvino-int8") if runnable_here(v)]
    assert_line_names(line, "gan_generator", record["excluded"])
    assert all(record["excluded"][v].startswith("could not run here: ModuleNotFoundError") for v in openvino)
    assert all(set(results) >= {"onnxruntime-fp32", "onnxruntime-int8"} and
               all(results[v]["ok"] is False for v in openvino) for results in record["buckets"].values())


def test_serve_build_auto_finds_the_committed_gate_from_any_working_directory(export_dirs, tmp_path, capsys,
                                                                            monkeypatch):
    from trident.serving.server.repository import DEFAULT_QUALITY_GATE, build_parser

    assert DEFAULT_QUALITY_GATE == precision.DEFAULT_QUALITY_GATE == COMMITTED_GATE and COMMITTED_GATE.is_file()
    monkeypatch.chdir(tmp_path)  # no benchmarks/ here
    assert build_parser().parse_args(["--precision", "auto"]).quality_gate == COMMITTED_GATE
    meta = load_export_metadata(export_dirs["gan"])
    record = precision.choose(load_export(export_dirs["gan"]), "gan_generator", "auto", gate_file=DEFAULT_QUALITY_GATE,
                              row_shards=1)
    assert record["quality_gate"] == str(COMMITTED_GATE)
    assert not any(why.startswith("no quality gate file") for why in record["excluded"].values()), record["excluded"]


def test_gate_reasons_read_each_kind_of_gate_file(tmp_path):
    """The committed gate: the GAN's int8 failed (FD 1.10x fp32's, agreement 2.2 points below; judged on this
    quantization method), bf16 passed, openvino-int8 not judged (no AMX where it ran); the 6-epoch teacher's int8
    verdicts were judged on graphs quantized before the method was recorded (8-bit weights)."""
    from trident.export.quantize import METHOD

    gate = json.loads(COMMITTED_GATE.read_text())
    gan = next(sha for sha, e in gate["checkpoints"].items() if e["kind"] == "gan")
    assert precision.gate_reasons(COMMITTED_GATE, gan, METHOD) == {
        "openvino-bf16": None,
        "onnxruntime-int8": "failed the quality gate (FD 1.1013x fp32's, class agreement 2.2 points below fp32's)",
        "openvino-int8": f"no quality gate verdict for openvino-int8 on this checkpoint in {COMMITTED_GATE}"}
    unrecorded = next(sha for sha, e in gate["checkpoints"].items()
                      if "int8_method" not in e["variants"].get("onnxruntime-int8", {"int8_method": None}))
    reasons = precision.gate_reasons(COMMITTED_GATE, unrecorded, METHOD)
    assert reasons["openvino-bf16"] is None
    assert all(reasons[v].startswith("no quality gate verdict for this quantization method (it judged int8 graphs "
                                     "made by an unrecorded method)") for v in ("onnxruntime-int8", "openvino-int8"))
    # the same verdicts, had they been judged on this method: they pass; on another method they are not used
    for variant, verdict in gate["checkpoints"][unrecorded]["variants"].items():
        if "int8" in variant:
            verdict["int8_method"] = METHOD
    restamped = tmp_path / "restamped.json"
    restamped.write_text(json.dumps(gate))
    assert set(precision.gate_reasons(restamped, unrecorded, METHOD).values()) == {None}
    assert precision.gate_reasons(restamped, unrecorded, "another method")["onnxruntime-int8"].startswith(
        "no quality gate verdict for this quantization method (it judged int8 graphs made by another method)")
    # another checkpoint, a file that is not JSON or not a gate, none at all
    assert set(precision.gate_reasons(COMMITTED_GATE, "f" * 64, METHOD).values()) == {
        f"no quality gate verdict for this checkpoint (sha256 ffffffffffff) in {COMMITTED_GATE}: run `trident "
        "evaluate --precision-gate`"}
    corrupt = tmp_path / "corrupt.json"
    for text, error in (("{", "JSONDecodeError"), ('{"rule": "x"}', "KeyError"), ('{"checkpoints": []}', "TypeError"),
                        ('[1]', "TypeError")):
        corrupt.write_text(text)
        assert all(why.startswith(f"the quality gate file {corrupt} is unreadable ({error}")
                   for why in precision.gate_reasons(corrupt, gan, METHOD).values()), text
    assert set(precision.gate_reasons(None, gan, METHOD).values()) == {"no quality gate file given"}
    assert set(precision.gate_reasons(tmp_path / "none.json", gan, METHOD).values()) == {
        f"no quality gate file at {tmp_path / 'none.json'} (`trident evaluate --precision-gate` writes it, "
        "--quality-gate names another)"}


def test_gate_verdicts_of_the_shipped_diffusion_models_were_drawn_at_the_timesteps_their_default_sampling_walks(
        tmp_path):
    """The committed gate is current for the shipped teacher and student: each entry records the timesteps its
    verdicts were drawn at, and they are what the default sampling walks now (a verdict from before DPM-Solver++'s
    default moved from linspace to logsnr does not count); another layout's or an unrecorded one's is refused."""
    from trident.export.quantize import METHOD
    from trident.serving.files import file_sha256
    from trident.serving.sampling import NoiseSchedule, default_timesteps
    from trident.training.checkpoint import card_of, read_meta

    gate = json.loads(COMMITTED_GATE.read_text())
    for kind in ("diffusion", "diffusion_student"):
        path = ROOT / "checkpoints" / kind / "model.safetensors"
        card, sha = card_of(read_meta(path), path), file_sha256(path)
        now = precision.gated_timesteps(card)
        assert now == default_timesteps(NoiseSchedule.from_dict(card.schedule), card.distilled_steps)
        assert gate["checkpoints"][sha]["timesteps"] == now, kind
        reasons = precision.gate_reasons(COMMITTED_GATE, sha, METHOD, now)
        assert reasons["openvino-bf16"] is None and reasons["onnxruntime-int8"] is None, (kind, reasons)
        other = [999 - 50 * i for i in range(len(now))]  # another layout of as many steps
        assert all(why.startswith("the quality gate judged this checkpoint sampled at other timesteps")
                   for why in precision.gate_reasons(COMMITTED_GATE, sha, METHOD, other).values()), kind
        del gate["checkpoints"][sha]["timesteps"]
    unrecorded = tmp_path / "unrecorded.json"
    unrecorded.write_text(json.dumps(gate))
    assert all(why.startswith("the quality gate recorded no sampling timesteps for this checkpoint")
               for why in precision.gate_reasons(unrecorded, sha, METHOD, now).values())
    gan = ROOT / "checkpoints" / "gan" / "model.safetensors"
    assert precision.gated_timesteps(card_of(read_meta(gan), gan)) is None


def test_every_committed_gate_entry_names_the_machine_and_date_that_drew_it():
    """Verdicts drawn on different CPUs share one file (bf16 and int8 run other instructions on each), so each entry
    says where and when it was drawn; the file has no single machine for all of them."""
    gate = json.loads(COMMITTED_GATE.read_text())
    assert "machine" not in gate
    for sha, entry in gate["checkpoints"].items():
        machine = entry["machine"]
        assert machine["model"] and isinstance(machine["flags"], list) and machine["cores"] >= 1, sha
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", entry["date"]), sha


def test_gate_verdict_passes_within_five_percent_fd_and_one_point_of_agreement_and_records_the_int8_method():
    from trident.benchmarks.evaluate import gate_verdict

    fp32 = {"fd": 100.0, "agreement": 0.95, "draw_seconds": 2.0}
    ok = gate_verdict(fp32, {"fd": 104.9, "agreement": 0.941, "draw_seconds": 1.0}, "7-bit")
    assert ok["pass"] is True and ok["fd_ratio"] == 1.049 and ok["agreement_drop"] == 0.009
    assert ok["int8_method"] == "7-bit" and "int8_method" not in gate_verdict(fp32, {**fp32, "draw_seconds": 1.0})
    assert gate_verdict(fp32, {"fd": 105.1, "agreement": 0.95, "draw_seconds": 1.0})["pass"] is False
    assert gate_verdict(fp32, {"fd": 90.0, "agreement": 0.939, "draw_seconds": 1.0})["pass"] is False
    vae = gate_verdict({"fd": 300.0, "draw_seconds": 1.0}, {"fd": 310.0, "draw_seconds": 1.0})  # no classes
    assert vae["pass"] is True and "agreement_drop" not in vae


def test_gate_draws_the_student_at_its_cards_steps_and_leaves_it_out_when_its_checkpoint_is_absent(
        student_checkpoint, tmp_path, capsys):
    from conftest import STUDENT_STEPS
    from trident.benchmarks.evaluate import GATE_SETTINGS, Setting, gate_settings, main

    root = tmp_path / "checkpoints"
    checkpoints = {m: root / m / "model.safetensors" for m in ("diffusion", "diffusion_student", "gan", "vae")}
    assert gate_settings(checkpoints) == {m: GATE_SETTINGS[m] for m in ("diffusion", "gan", "vae")}  # no student
    checkpoints["diffusion_student"] = student_checkpoint  # step-distilled for 4 steps: DDIM-4 (trailing) at g3
    settings = gate_settings(checkpoints)
    assert settings["diffusion_student"] == GATE_SETTINGS["diffusion_student"] == Setting(
        "diffusion_student", "ddim", STUDENT_STEPS, 3.0)
    assert list(settings) == list(GATE_SETTINGS) and gate_settings(checkpoints, ("diffusion_student",)) == {
        "diffusion_student": settings["diffusion_student"]}
    # named but absent, or unknown: refused before anything is drawn
    assert main(["--precision-gate", "--gate-models", "diffusion_student", "--checkpoints", str(root)]) == 2
    assert "the gate cannot judge diffusion_student without its checkpoint" in capsys.readouterr().err
    assert main(["--precision-gate", "--gate-models", "diffusion,student", "--checkpoints", str(root)]) == 2
    assert "--gate-models takes diffusion, diffusion_student, gan, vae, got 'diffusion,student'" in (
        capsys.readouterr().err)


def test_auto_offers_the_students_unet_a_reduced_precision_only_with_a_passing_verdict_for_its_own_checkpoint(
        student_export, tmp_path):
    """The student's U-Net is gated as the teacher's is (precision.JUDGED_GRAPHS): its own checkpoint's verdict opens
    bf16 and int8 to `auto`; the committed gate, whose teacher verdicts all passed, does not."""
    from trident.serving.spec import STUDENT_UNET

    export = load_export(student_export)
    reduced = [v for v in precision.CPU_VARIANTS if precision.precision_of(v) in precision.REDUCED]
    passed = precision.choose(export, STUDENT_UNET, "auto", row_shards=1,
                              gate_file=passing_gate(tmp_path, load_export_metadata(student_export)))
    assert {v: why for v, why in passed["excluded"].items() if v in reduced} == {
        v: precision.not_native(v, CPU) for v in reduced if not runnable_here(v)}
    teachers = precision.choose(export, STUDENT_UNET, "auto", row_shards=1, gate_file=COMMITTED_GATE)
    assert all(teachers["excluded"][v].startswith(("no quality gate verdict for this checkpoint", "this CPU has none"))
               for v in reduced), teachers["excluded"]
    assert set(teachers["choice"].values()) <= {"onnxruntime-fp32", "openvino-fp32"}


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

    variant = "openvino-int8"  # runs on every x86 CPU (auto offers it only with VNNI); bf16 needs the hardware
    repo = tmp_path / "repo"
    build_repository([export_dirs["diffusion"], export_dirs["gan"]], repo, precision_choice=variant, row_shards=1)
    labels = np.arange(6) % 10
    with TridentClient.from_onnx([export_dirs["diffusion"], export_dirs["gan"]], precision=variant,
                                 row_shards=1) as local:
        want_d = local.sample(labels, steps=3, seed=4, raw=True)
        want_g = local.generate(labels, seed=4, raw=True)
    # the same files, engines and bucket plan as in-process: equal to the bit here (measured), 1e-5 as the other
    # served tests allow
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        with TridentClient.connect(server.grpc_url, "grpc") as served:
            np.testing.assert_allclose(served.sample(labels, steps=3, seed=4, raw=True), want_d, atol=1e-5)
            np.testing.assert_allclose(served.sample(labels, steps=3, seed=4, raw=True, loop="server"), want_d,
                                       atol=1e-5)
            np.testing.assert_allclose(served.generate(labels, seed=4, raw=True), want_g, atol=1e-5)


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


@pytest.mark.server
def test_serve_build_defaults_to_auto_and_keeps_the_choice_out_of_config_pbtxt(export_dirs, tmp_path, capsys):
    """`trident serve build` without --precision is auto (embedded, CPU); what auto chose on this machine goes into
    each model's generated trident_measured.json, so config.pbtxt is the same whatever a machine chooses, and the
    served model runs what that file says."""
    from trident.serving.client import TridentClient
    from trident.serving.graph_runtime import MEASURED, GraphRuntime, Measured
    from trident.serving.manifest import RuntimeOptions, graph_runtime
    from trident.serving.server.launcher import ServerConfig, TritonServer
    from trident.serving.server.repository import MARKER, main

    repo = tmp_path / "auto"
    assert main(["--export", str(export_dirs["gan"]), "--out", str(repo)]) == 0
    assert "gan_generator: auto did not offer" in capsys.readouterr().out  # it ran auto (and says what it left out)
    assert json.loads((repo / MARKER).read_text())["precision"] == {"gan_generator": "auto"}
    config = (repo / "gan_generator" / "config.pbtxt").read_text()
    runtime = GraphRuntime.from_json(json.loads('"' + config.split('key: "trident_runtime"')[1].split(
        'string_value: "')[1].split('"\n')[0] + '"'))
    assert [b.to_dict() for b in runtime.buckets] == [{"size": 1, "variant": MEASURED}, {"size": 4, "variant": MEASURED}]
    version = repo / "gan_generator" / "1"
    measured = Measured.read(str(version))
    assert [b.size for b in measured.buckets] == [1, 4]
    assert {int(k): v for k, v in measured.precision["choice"].items()} == {b.size: b.variant for b in measured.buckets}
    # another machine's choice, the same configuration
    export, options = load_export(export_dirs["gan"]), RuntimeOptions("auto", shard_limit="auto")
    one = graph_runtime(export, "gan_generator", options, {1: "onnxruntime-fp32", 4: "openvino-fp32"}, as_measured=True)
    two = graph_runtime(export, "gan_generator", options, {1: "openvino-fp32", 4: "onnxruntime-fp32"}, as_measured=True)
    assert one.to_json() == two.to_json() == runtime.to_json()
    # the served model runs what the generated file says: onnxruntime-int8 (visibly other numbers than fp32) written
    # in by hand, with its graph files
    int8 = graph_runtime(export, "gan_generator", RuntimeOptions("onnxruntime-int8"))
    for bucket in int8.buckets:
        (version / bucket.file).parent.mkdir(parents=True, exist_ok=True)
        (version / bucket.file).write_bytes((export_dirs["gan"] / bucket.file).read_bytes())
    (version / "trident_measured.json").write_text(Measured(measured.shard_limit, measured.shard_trial,
                                                            int8.buckets, measured.precision).to_json())
    labels = np.arange(5) % 10
    with TridentClient.from_onnx([export_dirs["gan"]], precision="onnxruntime-int8") as local:
        want = local.generate(labels, seed=3, raw=True)
    with TridentClient.from_onnx([export_dirs["gan"]]) as local:
        fp32 = local.generate(labels, seed=3, raw=True)
    assert np.abs(want - fp32).max() > 1e-3
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        with TridentClient.connect(server.grpc_url, "grpc") as served:
            np.testing.assert_allclose(served.generate(labels, seed=3, raw=True), want, rtol=0, atol=1e-5)
    # where auto does not choose, the default is fp32: the container flavour runs Triton's own backends
    assert main(["--export", str(export_dirs["gan"]), "--out", str(tmp_path / "container"), "--flavour",
                 "container"]) == 0

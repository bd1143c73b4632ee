"""serving/ort_runner.py: bucket chunks and row-parallel shards give the same rows as one whole-batch run."""
from __future__ import annotations

import numpy as np
import pytest

from trident.serving.ort_runner import BucketRunner, execution_providers, padded_rows, plan_chunks, plan_shards
from trident.serving.spec import UNET, export_card, graph_spec_of, load_export_metadata

ALL = (1, 2, 4, 8, 16, 32)


def test_plan_shards_splits_evenly_when_padding_does_not_grow():
    assert plan_shards(1, 2, ALL) == [(0, 1)]                       # one row: the multi-threaded sessions
    assert plan_shards(2, 2, ALL) == [(0, 1), (1, 2)]
    assert plan_shards(8, 2, ALL) == [(0, 4), (4, 8)]
    assert plan_shards(5, 3, ALL) == [(0, 2), (2, 4), (4, 5)]       # parts differ by at most one row
    assert plan_shards(3, 8, (1,)) == [(0, 1), (1, 2), (2, 3)]      # never more parts than rows
    assert plan_shards(8, 1, ALL) == [(0, 8)]                       # one shard: no split


def test_plan_shards_keeps_a_call_whole_when_the_parts_would_pad_more():
    assert padded_rows(40, ALL) == 40 and padded_rows(20, ALL) == 32
    assert plan_shards(40, 2, ALL) == [(0, 40)]                     # 32 + 8 whole; 2 x 20 would pad to 2 x 32
    assert plan_shards(3, 2, (1, 4)) == [(0, 3)]                    # 3 -> 4 whole; 2 + 1 -> 4 + 1


def test_plan_chunks_uses_largest_bucket_then_smallest_fitting():
    assert plan_chunks(9, (1, 4)) == [(0, 4, 4), (4, 8, 4), (8, 9, 1)]
    assert plan_chunks(3, (2, 8, 32)) == [(0, 3, 8)]
    assert plan_chunks(70, (2, 8, 32)) == [(0, 32, 32), (32, 64, 32), (64, 70, 8)]


@pytest.fixture(scope="module")
def unet_files(export_dirs):
    meta = load_export_metadata(export_dirs["diffusion"])
    files = {int(b): export_dirs["diffusion"] / f["file"] for b, f in meta["graphs"][UNET]["fp32"].items()}
    return files, graph_spec_of(UNET, export_card(meta))


def _feed(spec, n, seed):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((n, *spec.input("sample").shape)).astype(np.float32),
            "timestep": rng.integers(0, 1000, n).astype(np.float32),
            "class_label": rng.integers(0, 11, n).astype(np.int64)}


def test_sharded_runs_equal_whole_runs_row_for_row(unet_files):
    files, spec = unet_files
    whole = BucketRunner(files, threads=1, row_shards=1)
    sharded = BucketRunner(files, threads=2, row_shards=2)
    sharded.warm(every=True)  # makes and runs every session of both sets on zeros
    seen = []
    run_rows = sharded._run_rows

    def recording(sessions, feed, start, stop, buckets=None):
        seen.append((sessions is sharded.shard_sessions, start, stop))
        return run_rows(sessions, feed, start, stop, buckets)

    sharded._run_rows = recording
    # which rows each call ran where, with buckets (1, 4): (on the shard sessions?, start, stop)
    expected = {1: [(False, 0, 1)], 2: [(True, 0, 1), (True, 1, 2)], 3: [(False, 0, 3)], 5: [(False, 0, 5)],
                6: [(True, 0, 3), (True, 3, 6)], 8: [(True, 0, 4), (True, 4, 8)], 9: [(True, 0, 5), (True, 5, 9)]}
    try:
        for n, where in expected.items():
            seen.clear()
            feed = _feed(spec, n, seed=n)
            want, got = whole.run(feed), sharded.run(feed)
            assert list(got) == ["noise_pred"] and got["noise_pred"].shape == (n, *spec.outputs[0].shape)
            np.testing.assert_allclose(got["noise_pred"], want["noise_pred"], rtol=0, atol=1e-5)
            assert sorted(seen) == where, (n, seen)
    finally:
        whole.close()
        sharded.close()


def test_shard_limit_runs_larger_shards_in_chunks_of_the_smaller_buckets_with_the_same_rows(unet_files):
    """shard_limit=1 over buckets (1, 4): 8 rows are two shards of four one-row calls each; the rows equal one
    whole-batch session's, and the shards never make the 4-row session (what the limit saves is its memory)."""
    files, spec = unet_files
    whole = BucketRunner(files, threads=1, row_shards=1)
    limited = BucketRunner(files, threads=2, row_shards=2, shard_limit=1)
    calls = []
    make = limited.shard_sessions._make
    limited.shard_sessions._make = lambda b: (calls.append(b), make(b))[1]
    try:
        assert limited.shard_buckets() == [1]
        for n in (2, 5, 8, 9):
            feed = _feed(spec, n, seed=100 + n)
            np.testing.assert_allclose(limited.run(feed)["noise_pred"], whole.run(feed)["noise_pred"], rtol=0,
                                       atol=1e-5, err_msg=f"{n} rows")
        assert calls == [1] and sorted(limited.shard_sessions) == [1]
        limited.shard_limit = 3  # not a bucket: the buckets up to it
        assert limited.shard_buckets() == [1]
        limited.shard_limit = 0  # every bucket
        assert limited.shard_buckets() == [1, 4]
    finally:
        whole.close()
        limited.close()
    with pytest.raises(ValueError, match="shard_limit must be >= 0"):
        BucketRunner(files, shard_limit=-1)
    with pytest.raises(ValueError, match=r"unknown engines \['tensorrt'\]; expected one of"):
        BucketRunner(files, engines={1: "tensorrt"})
    runner = BucketRunner(files, row_shards=1)
    try:
        with pytest.raises(ValueError, match="run needs at least one row"):
            runner.run(_feed(spec, 0, seed=0))
    finally:
        runner.close()


def test_shard_trial_times_every_bucket_on_the_shards_and_keeps_the_smallest_within_two_percent(unet_files):
    from trident.serving import precision

    files, spec = unet_files
    trial = precision.shard_trial(files, None, threads=2, row_shards=2, min_seconds=0.02)
    per_row = {int(b): ms for b, ms in trial["per_row_ms"].items()}
    assert sorted(per_row) == sorted(files) and trial["row_shards"] == 2
    assert all(len(trial["rounds_ms"][str(b)]) == precision.ROUNDS and ms > 0 for b, ms in per_row.items())
    assert trial["limit"] == precision.shard_limit_of(per_row)  # the rule itself: test_precision.py, on numbers
    # nothing to choose: one shard, or one bucket
    assert precision.shard_trial(files, None, threads=2, row_shards=1) is None
    assert precision.shard_trial({1: files[1]}, None, threads=2, row_shards=2) is None


def test_in_process_backend_takes_a_shard_limit_or_measures_one_and_draws_the_same_images(export_dirs):
    from trident.serving.client import TridentClient
    from trident.serving.client.backends import InvalidArgumentError

    d = export_dirs["diffusion"]
    kw = dict(threads=2, row_shards=2)
    with TridentClient.from_onnx(d, **kw) as every, TridentClient.from_onnx(d, shard_limit=1, **kw) as one, \
            TridentClient.from_onnx(d, shard_limit="auto", **kw) as measured:
        assert every.backend.runners[UNET].shard_limit == 0 and "shard_trial" not in every.backend.precision[UNET]
        assert one.backend.runners[UNET].shard_limit == 1
        trial = measured.backend.precision[UNET]["shard_trial"]
        assert measured.backend.runners[UNET].shard_limit == trial["limit"] in every.backend.buckets[UNET]
        want = every.sample([1, 7, 3], steps=3, guidance=3.0, seed=5, raw=True)  # 6 rows a step: 2 shards of 3
        for client in (one, measured):
            np.testing.assert_allclose(client.sample([1, 7, 3], steps=3, guidance=3.0, seed=5, raw=True), want,
                                       rtol=0, atol=1e-5)
    for bad in (-1, "fast", 2.5):
        with pytest.raises(InvalidArgumentError, match="shard_limit must be 'auto' or a bucket size >= 0"):
            TridentClient.from_onnx(d, shard_limit=bad)


def test_row_shards_default_to_the_cores_on_cpu_and_one_elsewhere(unet_files):
    files, _ = unet_files
    from trident.serving.ort_runner import available_cores

    runner = BucketRunner({1: files[1]})
    try:
        assert runner.row_shards == available_cores()
        assert (runner.shard_sessions is None) == (available_cores() == 1)
    finally:
        runner.close()
        runner.close()  # closing twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        runner.run({"sample": np.zeros((1, 1, 28, 28), np.float32)})
    one_thread = BucketRunner({1: files[1]}, threads=1)  # a one-thread budget: no shards
    assert one_thread.row_shards == 1 and one_thread.shard_sessions is None
    one_thread.close()


def test_runner_rejects_bad_settings(unet_files):
    files, _ = unet_files
    with pytest.raises(ValueError, match="no bucket files"):
        BucketRunner({})
    with pytest.raises(ValueError, match="must be >= 0"):
        BucketRunner(files, row_shards=-1)


# This machine's onnxruntime is the CPU build (no CUDA provider): asking it for CUDA must fail loudly, naming what is
# missing, instead of running on the CPU as ONNX Runtime itself does. Where CUDA is available these cannot run.
cpu_only = pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                              reason="needs an onnxruntime without the CUDA provider")
expected_ort_warning = pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")


@cpu_only
def test_execution_providers_refuse_cuda_naming_the_missing_library_when_onnxruntime_is_cpu_only():
    assert execution_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match=r"CUDAExecutionProvider was requested but this onnxruntime .* is built "
                                         r"without it.*libonnxruntime_providers_cuda\.so is not in .*onnxruntime-gpu"):
        execution_providers("cuda", 1)
    with pytest.raises(ValueError, match="must be 'cpu' or 'cuda'"):
        execution_providers("gpu")


@cpu_only
@expected_ort_warning
def test_bucket_runner_fails_instead_of_running_on_the_cpu_when_the_cuda_provider_does_not_load(unet_files):
    files, spec = unet_files
    # ONNX Runtime accepts this list, warns, and makes a CPU session; the runner must not serve from it
    with pytest.raises(ValueError, match=r"CUDAExecutionProvider was requested but the session runs on "
                                         r"\['CPUExecutionProvider'\]: libonnxruntime_providers_cuda\.so"):
        BucketRunner(files, threads=1, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


@cpu_only
@expected_ort_warning
def test_in_process_backend_raises_invalid_argument_when_asked_for_a_gpu_it_does_not_have(export_dirs):
    from trident.serving.client import TridentClient
    from trident.serving.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="libonnxruntime_providers_cuda.so"):
        TridentClient.from_onnx([export_dirs["vae"]], threads=1,
                                providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def cast_then_scale_graph(path) -> str:
    """A graph of 2 rows whose input "timestep" feeds a float-to-float Cast, as the shipped U-Net's does: out = t * [2, 3]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["timestep"], ["/Cast_output_0"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["/Cast_output_0", "w"], ["out"])], "g",
        [helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array([2.0, 3.0], np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_openvino_bucket_is_fed_by_the_graph_input_names_when_compiling_merges_them_with_a_removed_cast(tmp_path):
    # OpenVINO's compiled model gives the input the Cast's output name too and answered it from get_any_name(), which
    # made the bf16 U-Net fail to load
    runner = BucketRunner({2: cast_then_scale_graph(tmp_path / "g_b2.onnx")}, engines={2: "openvino-f32"})
    assert runner.input_shapes() == {"timestep": ()} and runner.output_names == ["out"]
    np.testing.assert_array_equal(runner.run({"timestep": np.array([1.0, 2.0], np.float32)})["out"], [2.0, 6.0])


@pytest.mark.parametrize("engine, absent", [("openvino-f32", "onnxruntime"), ("onnxruntime", "openvino")])
def test_runner_loads_only_the_engine_library_its_buckets_run_when_one_engine_is_chosen(tmp_path, engine, absent):
    # What a Triton model does at load (graph_model.py, loop_model.py), in a fresh process: a host whose buckets all
    # run on one engine must not hold the other's library (benchmarks/results/optimizations.md, item 7)
    import subprocess
    import sys

    path = cast_then_scale_graph(tmp_path / "g_b2.onnx")
    script = (f"import sys, numpy as np\n"
              f"from trident.serving.ort_runner import BucketRunner, execution_providers\n"
              f"runner = BucketRunner({{2: {path!r}}}, engines={{2: {engine!r}}}, providers=execution_providers('cpu'))\n"
              f"runner.warm()\n"
              f"print(runner.run({{'timestep': np.ones(2, np.float32)}})['out'].tolist(), {absent!r} in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[2.0,", "3.0]", "False"], out

"""trident.serving.server.repository and the model.py it ships, up to a real tritonserver serving the exported graphs.

The oracle for every served result is ONNX Runtime run in this process on the exported batch-1 graph, one row at a
time: whatever the server batched, padded or chunked, each row must come back as if it had been run alone.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import re
import sys
import threading
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from trident.export.build import default_build
from trident.serving import precision
from trident.serving.card import ModelCard
from trident.serving.graph_runtime import MEASURED, MEASURED_FILE, GraphRuntime, Measured
from trident.serving.manifest import graph_runtime, load_export
from trident.serving.server.repository import (
    MARKER,
    RepositoryError,
    bucket_config,
    build_options,
    build_repository,
    graph_config,
    loop_config,
    main,
    stand_in_config,
    to_pbtxt,
)
from trident.serving.server.runtime import ALLOWED_IMPORTS, MODEL_FILES, RUNTIME_FILES
from trident.serving.server.runtime.protocol import CARD as CARD_KEY
from trident.serving.server.runtime.protocol import RUNTIME as RUNTIME_KEY
from trident.serving.spec import (GRAPHS_OF_KIND, KIND_OF_GRAPH, SAMPLING_LOOP, SAMPLING_LOOP_STREAM, UNET,
                                  GraphSpec, TensorSpec, export_card, graph_spec_of)

from conftest import KINDS, settled

# the graphs of the session's exports (conftest.KINDS; the student has tests/test_student.py)
GRAPHS = tuple(graph for graph, kind in KIND_OF_GRAPH.items() if kind in KINDS)
LOOPS = (SAMPLING_LOOP, SAMPLING_LOOP_STREAM)  # the sampling loop models: one response, and streaming
# The served repository lets one execute() hold two largest buckets, so requests above the largest bucket (and
# dynamic batches of several requests) go through the chunking path.
SERVED_MAX_BATCH = 8


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: metadata, valid inputs, the in-process oracle
# ---------------------------------------------------------------------------------------------------------------------


def read_meta(export_dir: Path) -> dict:
    return json.loads((export_dir / "metadata.json").read_text())


def label_input(spec: GraphSpec) -> TensorSpec | None:
    """The class label: the only integer input of any graph."""
    return next((t for t in spec.inputs if t.np_dtype.kind == "i"), None)


def timestep_input(spec: GraphSpec) -> TensorSpec | None:
    """The diffusion timestep: the only per-item float scalar."""
    return next((t for t in spec.inputs if t.np_dtype.kind == "f" and t.shape == ()), None)


def image_like_input(spec: GraphSpec) -> TensorSpec:
    return next(t for t in spec.inputs if t.shape)


def valid_inputs(spec: GraphSpec, meta: dict, n: int, seed: int) -> list[np.ndarray]:
    """Model-side arrays (scalars per item have shape (n,))."""
    rng = np.random.default_rng(seed)
    out = []
    for t in spec.inputs:
        if t == label_input(spec):
            out.append(rng.integers(0, len(meta["card"]["class_names"]), size=n).astype(t.np_dtype))
        elif t == timestep_input(spec):
            out.append(rng.uniform(0, meta["card"]["schedule"]["num_train_timesteps"] - 1, size=n).astype(t.np_dtype))
        else:
            out.append(rng.standard_normal(t.batched(n)).astype(t.np_dtype))
    return out


def to_wire(tensor: TensorSpec, array: np.ndarray) -> np.ndarray:
    """What a client sends: a per-item scalar travels as (n, 1) (config dims [1], reshaped to [] for the graph)."""
    return array.reshape(len(array), *(tensor.shape or (1,)))


class Oracle:
    """ONNX Runtime on the exported batch-1 graphs, in this process, one row at a time."""

    def __init__(self, export_dirs: dict[str, Path]):
        import onnxruntime as ort

        self.sessions = {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        for kind, directory in export_dirs.items():
            meta = read_meta(directory)
            for graph in GRAPHS_OF_KIND[kind]:
                file = directory / meta["graphs"][graph]["fp32"]["1"]["file"]
                self.sessions[graph] = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])

    def __call__(self, spec: GraphSpec, arrays: list[np.ndarray]) -> list[np.ndarray]:
        rows = []
        for i in range(len(arrays[0])):
            feed = {t.name: a[i:i + 1] for t, a in zip(spec.inputs, arrays)}
            rows.append(self.sessions[spec.name].run([o.name for o in spec.outputs], feed))
        return [np.concatenate([r[k] for r in rows]) for k in range(len(spec.outputs))]


def assert_outputs_close(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def metas(export_dirs) -> dict[str, dict]:
    """graph -> export metadata."""
    return {graph: read_meta(export_dirs[KIND_OF_GRAPH[graph]]) for graph in GRAPHS}


@pytest.fixture(scope="module")
def specs(metas) -> dict[str, GraphSpec]:
    return {graph: graph_spec_of(graph, export_card(meta)) for graph, meta in metas.items()}


@pytest.fixture(scope="module")
def oracle(export_dirs) -> Oracle:
    return Oracle(export_dirs)


@pytest.fixture(scope="module")
def repository(export_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("served") / "model_repository"
    # row_shards=2: the served models split batches of 2+ rows over two sessions whatever the machine's core count,
    # so every served test below also checks the sharded path against the one-row-at-a-time oracle.
    # shard_limit=0: shards run every bucket, so the plans below are the same on every machine (the measured limit,
    # shard_limit="auto", the default, is tested on its own).
    build_repository(list(export_dirs.values()), out, max_batch_size=SERVED_MAX_BATCH, row_shards=2, shard_limit=0)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Configuration as data and as config.pbtxt (no server)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(export_dirs) -> dict:
    """graph -> its parsed export (manifest.Export)."""
    return {graph: load_export(export_dirs[KIND_OF_GRAPH[graph]]) for graph in GRAPHS}


def embedded_config(graph: str, export, **options) -> dict:
    """The embedded flavour's model of a graph, planned as the builder plans it (fixed precision: no trial)."""
    checked = build_options(shard_limit=0, **options)
    return graph_config(export, graph_runtime(export, graph, checked.runtime), checked)


def runtime_of(config: dict) -> GraphRuntime:
    return GraphRuntime.from_json(config["parameters"][RUNTIME_KEY]["string_value"])


def all_configs(exports) -> list[dict]:
    configs = []
    for graph, export in exports.items():
        configs.append(embedded_config(graph, export))
        configs.append(embedded_config(graph, export, gpu=True, fp16=True, max_batch_size=16, max_queue_delay_us=100,
                                       intra_op_threads=2))
        container = build_options("container", gpu=True, fp16=True, max_batch_size=64, max_queue_delay_us=100,
                                  intra_op_threads=1)
        bucket_models = {n: f"{graph}_b{n}" for n in export.graphs[graph].buckets}
        for n in bucket_models:
            configs.append(bucket_config(export, graph, n, build_options("container")))
            configs.append(bucket_config(export, graph, n, container))
            one = graph_runtime(export, graph, container.runtime, {n: container.runtime.precision})
            configs.append(stand_in_config(export, one, container))
        front = graph_runtime(export, graph, container.runtime, models=bucket_models)
        configs.append(graph_config(export, front, container))
        if graph == UNET:
            configs.append(loop_config(export, front, container))
            configs.append(loop_config(export, graph_runtime(export, graph, container.runtime), container, stream=True))
    return configs


def test_to_pbtxt_round_trips_every_field_when_parsed_by_model_config_pb2(exports):
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    for config in all_configs(exports):
        parsed = text_format.Parse(to_pbtxt(config), model_config_pb2.ModelConfig())
        # ParseDict rejects any key that is not a ModelConfig field, so equality means every field we set is a real
        # one and survived the text form.
        expected = json_format.ParseDict(config, model_config_pb2.ModelConfig())
        assert parsed == expected, config["name"]
        assert parsed.name == config["name"]
        assert {k: v.string_value for k, v in parsed.parameters.items()} == {
            k: v["string_value"] for k, v in config["parameters"].items()}


def test_embedded_config_declares_scalars_as_dims_1_reshaped_to_empty_when_per_item_scalar(exports, specs):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    spec = specs["diffusion_unet"]
    parsed = text_format.Parse(to_pbtxt(embedded_config("diffusion_unet", exports["diffusion_unet"])),
                               model_config_pb2.ModelConfig())
    by_name = {i.name: i for i in parsed.input}
    for tensor in spec.inputs:
        entry = by_name[tensor.name]
        assert model_config_pb2.DataType.Name(entry.data_type) == "TYPE_" + tensor.triton_dtype
        if tensor.shape:
            assert list(entry.dims) == list(tensor.shape) and not entry.HasField("reshape")
        else:
            assert list(entry.dims) == [1]
            assert entry.HasField("reshape") and list(entry.reshape.shape) == []


def test_embedded_config_batches_up_to_largest_bucket_with_warmup_per_bucket_when_defaults(exports, metas, specs):
    for graph, meta in metas.items():
        config = embedded_config(graph, exports[graph])
        buckets = meta["graphs"][graph]["buckets"]
        assert config["backend"] == "python"
        assert config["max_batch_size"] == max(buckets)
        assert config["dynamic_batching"] == {"preferred_batch_size": buckets, "max_queue_delay_microseconds": 500}
        assert config["instance_group"] == [{"kind": "KIND_CPU", "count": 1}]
        runtime = runtime_of(config)
        assert (runtime.threads, runtime.provider, runtime.sizes) == (0, "cpu", tuple(buckets))
        assert [w["batch_size"] for w in config["model_warmup"]] == buckets
        for warmup in config["model_warmup"]:
            assert set(warmup["inputs"]) == {t.name for t in specs[graph].inputs}
            # zero data: Triton's random_data is random bytes, NaN included, which model.py would reject.
            assert all(entry["zero_data"] is True for entry in warmup["inputs"].values())


def test_card_parameter_carries_the_export_card_with_this_graphs_buckets_when_read_back(exports, metas, specs):
    for graph, meta in metas.items():
        params = {k: v["string_value"] for k, v in embedded_config(graph, exports[graph])["parameters"].items()}
        carried = ModelCard.from_json(params[CARD_KEY])
        exported = export_card(meta)
        # The export's card, cut to this graph's buckets: one parser reads both.
        assert carried == exported.with_buckets({graph: meta["graphs"][graph]["buckets"]}), graph
        assert carried.buckets == {graph: tuple(meta["graphs"][graph]["buckets"])}
        assert graph_spec_of(graph, carried) == specs[graph]
        # The only other parameter is the one model.py reads: the graph's runtime manifest, whose tensors are the
        # spec's (names, dtypes, per-item shapes and roles) and whose buckets run the fp32 files the export lists.
        assert set(params) == {CARD_KEY, RUNTIME_KEY}, graph
        runtime = GraphRuntime.from_json(params[RUNTIME_KEY])
        assert [(t.name, t.dtype, t.shape, t.role) for t in (*runtime.inputs, *runtime.outputs)] == [
            (t.name, t.dtype, t.shape, t.role) for t in (*specs[graph].inputs, *specs[graph].outputs)], graph
        assert {b.size: (b.variant, b.file, b.engine) for b in runtime.buckets} == {
            int(b): ("onnxruntime-fp32", f["file"], "onnxruntime") for b, f in meta["graphs"][graph]["fp32"].items()}
        assert GraphRuntime.from_json(runtime.to_json()) == runtime


def test_runtime_manifest_names_every_problem_at_once_when_read_back(exports):
    data = json.loads(graph_runtime(exports[UNET], UNET, build_options(shard_limit=0).runtime).to_json())
    data["colour"] = "red"
    data["buckets"][0]["weight"] = 1
    del data["inputs"][0]["role"]
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\].*missing fields \['role'\].*unknown fields "
                                         r"\['weight'\]"):
        GraphRuntime.from_dict(data)
    data = json.loads(graph_runtime(exports[UNET], UNET, build_options(shard_limit=0).runtime).to_json())
    data["shard_limit"], data["provider"] = -1, "tpu"
    with pytest.raises(ValueError, match=r"shard_limit must be.*provider must be one of"):
        GraphRuntime.from_dict(data)


def test_shard_limit_is_measured_per_graph_and_recorded_when_built_with_defaults(export_dirs, tmp_path):
    """The default build times each graph's buckets on row shards here (precision.shard_trial). Every model that runs
    the graph says MEASURED in its runtime manifest and finds the limit, with the trial's numbers, in its version
    directory (so config.pbtxt and the marker do not depend on the machine); the served model runs with that limit."""
    out = tmp_path / "repo"
    build_repository(list(export_dirs.values()), out, row_shards=2)
    assert "shard_trial" not in (out / MARKER).read_text()
    for graph in GRAPHS:
        models = [graph, *(LOOPS if graph == UNET else ())]
        measured = [json.loads((out / model / "1" / MEASURED_FILE).read_text()) for model in models]
        assert all(m == measured[0] for m in measured), graph  # one trial per graph
        trial = measured[0]["shard_trial"]
        per_row = {int(b): ms for b, ms in trial["per_row_ms"].items()}
        assert sorted(per_row) == sorted(int(b) for b in read_meta(export_dirs[KIND_OF_GRAPH[graph]])["graphs"][graph]
                                         ["buckets"]) and trial["row_shards"] == 2, graph
        assert all(len(rounds) == 3 for rounds in trial["rounds_ms"].values()), graph
        # the smallest bucket within 2% of the fastest time per row (the rule: test_precision.py, on numbers)
        assert measured[0]["shard_limit"] == trial["limit"] == precision.shard_limit_of(per_row), graph
        for model in models:
            assert served_runtime(out / model).shard_limit == MEASURED, model
    runtime = served_runtime(out / UNET)
    arguments = runtime.runner_arguments(str(out / UNET / "1"))
    assert arguments["shard_limit"] == json.loads((out / UNET / "1" / MEASURED_FILE).read_text())["shard_limit"]
    assert arguments["files"] == {b.size: str(out / UNET / "1" / b.file) for b in runtime.buckets}


def test_a_measured_shard_limit_without_its_file_fails_the_load_saying_how_to_rebuild(exports, tmp_path):
    """trident_measured.json is per machine and git-ignored: a repository copied without it must not fail with a
    bare FileNotFoundError."""
    runtime = graph_runtime(exports[UNET], UNET, build_options().runtime)
    assert runtime.shard_limit == MEASURED
    with pytest.raises(RuntimeError, match=r"FileNotFoundError.*rebuild the repository here with `trident serve build`"):
        runtime.runner_arguments(str(tmp_path))
    (tmp_path / MEASURED_FILE).write_text('{"shard_trial": null}')
    with pytest.raises(RuntimeError, match=r"holds no shard limit for diffusion_unet; rebuild .*--shard-limit N"):
        runtime.runner_arguments(str(tmp_path))
    (tmp_path / MEASURED_FILE).write_text(Measured(4).to_json())
    assert runtime.runner_arguments(str(tmp_path))["shard_limit"] == 4


def served_runtime(model_dir: Path) -> GraphRuntime:
    return GraphRuntime.from_json(embedded_parameters(model_dir / "config.pbtxt")[RUNTIME_KEY])


@pytest.mark.server
def test_a_served_model_whose_measured_shard_limit_file_is_missing_fails_to_load_saying_how_to_rebuild(
        export_dirs, tmp_path):
    """The same on a real server: a repository copied to another machine without its trident_measured.json (it is
    git-ignored) fails the model's load with the message above, which the launcher's error carries."""
    from trident.serving.server.launcher import ServerConfig, TritonServer, TritonServerError

    repo = tmp_path / "model_repository"
    build_repository([export_dirs["vae"]], repo, row_shards=1, intra_op_threads=1)  # shard_limit "auto": measured
    missing = repo / "vae_decoder" / "1" / MEASURED_FILE
    missing.unlink()
    with pytest.raises(TritonServerError) as failure:
        with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)):
            pass
    message = str(failure.value)
    assert f"{missing}: how the model runs was measured on the machine that built it (shard limit, auto " \
        "precision) but this file cannot be read (FileNotFoundError" in \
        message and "rebuild the repository here with `trident serve build`" in message, message


def embedded_parameters(config_path: Path) -> dict[str, str]:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    return {k: v.string_value for k, v in config.parameters.items()}


def test_shard_limit_given_is_written_as_is_and_bad_values_are_refused(export_dirs, tmp_path, capsys):

    out = tmp_path / "repo"
    assert main(["--export", str(export_dirs["gan"]), "--out", str(out), "--shard-limit", "1", "--precision",
                 "fp32"]) == 0
    assert served_runtime(out / "gan_generator").shard_limit == 1
    assert not (out / "gan_generator" / "1" / MEASURED_FILE).exists()  # nothing measured: a fixed precision
    with pytest.raises(SystemExit) as exit_info:
        main(["--export", str(export_dirs["gan"]), "--out", str(tmp_path / "other"), "--shard-limit", "-2"])
    assert exit_info.value.code == 2
    assert "expected auto or a bucket size >= 0, got '-2'" in capsys.readouterr().err
    with pytest.raises(RepositoryError, match="shard_limit must be 'auto' or a bucket size >= 0"):
        build_repository([export_dirs["gan"]], tmp_path / "third", shard_limit="fast")
    assert not (tmp_path / "other").exists() and not (tmp_path / "third").exists()


def test_input_ranges_follow_null_class_for_diffusion_and_class_count_for_gan_when_built(exports, metas, specs):
    unet = runtime_of(embedded_config("diffusion_unet", exports["diffusion_unet"])).ranges
    gan = runtime_of(embedded_config("gan_generator", exports["gan_generator"])).ranges
    label, timestep = label_input(specs["diffusion_unet"]).name, timestep_input(specs["diffusion_unet"]).name
    assert (unet[label].low, unet[label].high) == (0, metas["diffusion_unet"]["card"]["null_class"] + 1)
    assert (unet[timestep].low, unet[timestep].high) == (
        0, metas["diffusion_unet"]["card"]["schedule"]["num_train_timesteps"])
    gan_label = label_input(specs["gan_generator"]).name
    assert (gan[gan_label].low, gan[gan_label].high) == (0, len(metas["gan_generator"]["card"]["class_names"]))


# ---------------------------------------------------------------------------------------------------------------------
# Container flavour: generated and checked against the ONNX graphs (the onnxruntime backend is not installed here)
# ---------------------------------------------------------------------------------------------------------------------


def test_container_repository_matches_onnx_graphs_when_built_for_gpu_fp16(export_dirs, exports, metas, tmp_path):
    """The official container's layout, parsed back with Triton's own protobuf definition: per graph a native
    onnxruntime model per bucket (checked against the ONNX file it serves) and a front model under the graph's name
    that batches across clients and names those per-bucket models; the sampling loop model calls them too."""
    import onnx
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    out = tmp_path / "container_repository"
    names = build_repository(list(export_dirs.values()), out, flavour="container", gpu=True, fp16=True)
    per_bucket = sorted(f"{g}_b{n}" for g, meta in metas.items() for n in meta["graphs"][g]["buckets"])
    assert names == sorted((*per_bucket, *GRAPHS, *LOOPS))

    def parsed(name):
        return text_format.Parse((out / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())

    for name in per_bucket:
        graph, bucket = name.rsplit("_b", 1)
        config = parsed(name)
        assert (config.name, config.backend, config.max_batch_size) == (name, "onnxruntime", 0)
        assert [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == ["KIND_GPU"]
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert [(a.name, dict(a.parameters)) for a in accelerator] == [("tensorrt", {"precision_mode": "FP16"})]
        assert sorted(p.name for p in (out / name / "1").iterdir()) == ["model.onnx"]
        model_file = out / name / "1" / "model.onnx"
        recorded = metas[graph]["graphs"][graph]["fp32"][bucket]["sha256"]
        assert hashlib.sha256(model_file.read_bytes()).hexdigest() == recorded
        model = onnx.load(str(model_file))
        for declared, actual in ((config.input, model.graph.input), (config.output, model.graph.output)):
            assert [t.name for t in declared] == [v.name for v in actual]
            for t, v in zip(declared, actual):
                np_dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
                triton = "TYPE_" + TensorSpec(v.name, np_dtype.name, ()).triton_dtype
                assert model_config_pb2.DataType.Name(t.data_type) == triton, (name, v.name)
                assert list(t.dims) == [d.dim_value for d in v.type.tensor_type.shape.dim], (name, v.name)
        assert CARD_KEY not in config.parameters  # clients read the front model's card
        assert len(config.model_warmup) == 1 and config.model_warmup[0].batch_size == 1

    for graph, meta in metas.items():
        buckets = meta["graphs"][graph]["buckets"]
        front = parsed(graph)
        assert (front.backend, front.max_batch_size) == ("python", max(buckets))
        assert list(front.dynamic_batching.preferred_batch_size) == buckets
        assert [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in front.instance_group] == ["KIND_CPU"]
        assert not front.model_warmup  # BLS is not available while the per-bucket models may still be loading
        assert GraphRuntime.from_json(front.parameters[RUNTIME_KEY].string_value).bucket_models == {
            n: f"{graph}_b{n}" for n in buckets}
        carried = ModelCard.from_json(front.parameters[CARD_KEY].string_value)
        assert carried.buckets == {graph: tuple(buckets)}
        # what the front model takes is what the embedded flavour's model of that graph takes
        assert text_format.MessageToString(front.input[0]) == text_format.MessageToString(
            text_format.Parse(to_pbtxt(embedded_config(graph, exports[graph])), model_config_pb2.ModelConfig()).input[0])
        assert sorted(p.name for p in (out / graph / "1").iterdir()) == sorted(("model.py", *RUNTIME_FILES))
        assert (out / graph / "1" / "model.py").read_bytes() == MODEL_FILES["router"].read_bytes()
    for name in LOOPS:  # both sampling loop models call the per-bucket models, the streaming one decoupled
        loop = parsed(name)
        assert (out / name / "1" / "model.py").read_bytes() == MODEL_FILES["loop"].read_bytes()
        assert GraphRuntime.from_json(loop.parameters[RUNTIME_KEY].string_value).bucket_models == {
            n: f"{UNET}_b{n}" for n in metas[UNET]["graphs"][UNET]["buckets"]}
        assert not list((out / name / "1").glob("*.onnx"))
        assert loop.model_transaction_policy.decoupled == (name == SAMPLING_LOOP_STREAM)
    assert json.loads((out / MARKER).read_text())["bucket_backend"] == "onnxruntime"


def test_front_runtime_refuses_per_bucket_models_that_do_not_cover_the_buckets_or_a_batch_below_one(exports):
    export, options = exports["vae_decoder"], build_options("container")
    with pytest.raises(ValueError, match=r"per-bucket models \[1\] do not match the buckets \[1, 4\]"):
        graph_runtime(export, "vae_decoder", options.runtime, models={1: "vae_decoder_b1"})
    with pytest.raises(RepositoryError, match="max_batch_size must be >= 1"):
        build_options("container", max_batch_size=0)
    with pytest.raises(RepositoryError, match="bucket_backend must be one of"):
        build_repository([], Path("unused"), flavour="container", bucket_backend="tensorrt")


def test_bucket_config_runs_on_cpu_without_accelerator_when_no_gpu(exports):
    config = bucket_config(exports["gan_generator"], "gan_generator", 1, build_options("container"))
    assert config["instance_group"] == [{"kind": "KIND_CPU", "count": 1}]
    assert "optimization" not in config
    assert config["parameters"]["intra_op_thread_count"] == {"string_value": "0"}
    with pytest.raises(RepositoryError, match="--gpu"):
        build_options("container", fp16=True)


# ---------------------------------------------------------------------------------------------------------------------
# Building: files, atomic replacement, CLI, default_build
# ---------------------------------------------------------------------------------------------------------------------


def test_build_repository_writes_self_contained_models_when_embedded(repository, metas):
    assert json.loads((repository / MARKER).read_text())["models"] == sorted((*GRAPHS, *LOOPS))
    # tqdm: sampling.py imports it only for a progress bar, inside try/except ImportError
    # ctypes: ort_runner loads a GPU provider's library itself to name what it is missing
    # inspect: sampling.py reads each sampler's options from its constructor's signature
    allowed = {"json", "os", "sys", "concurrent", "threading", "numpy", "onnxruntime", "openvino",
               "triton_python_backend_utils", "ort_runner", "sampling", "card", "graph_runtime", "protocol", "batching",
               "bls",
               "__future__", "math", "time", "dataclasses", "functools", "typing", "tqdm", "ctypes", "inspect"}
    assert ALLOWED_IMPORTS == allowed  # the rule the runtime folder states is the one checked here
    # every Python-backend model gets model.py and the one declared list of runtime files
    code = {graph: ("model.py", *RUNTIME_FILES) for graph in (*metas, *LOOPS)}
    for graph, files in code.items():
        meta = metas.get(graph, metas[UNET])
        version = repository / graph / "1"
        graph_entry = meta["graphs"][UNET if graph in LOOPS else graph]
        for n in graph_entry["buckets"]:
            entry = graph_entry["fp32"][str(n)]
            assert hashlib.sha256((version / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
        # the code must run where trident is not installed: only these imports.
        for file in files:
            tree = ast.parse((version / file).read_text())
            imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                        for alias in node.names}
            imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            assert imported <= allowed, (graph, file, imported - allowed)


def tree_snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_repository_keeps_old_repository_when_a_graph_file_is_corrupt(export_dirs, tmp_path):
    import shutil

    out = tmp_path / "model_repository"
    build_repository([export_dirs["gan"]], out)
    before = tree_snapshot(out)
    broken = tmp_path / "broken_vae_export"
    shutil.copytree(export_dirs["vae"], broken)
    meta = read_meta(broken)
    victim = broken / meta["graphs"]["vae_encoder"]["fp32"]["4"]["file"]
    victim.write_bytes(victim.read_bytes() + b"\0")  # fails while the new tree is half written
    with pytest.raises(RepositoryError, match="sha256"):
        build_repository([export_dirs["gan"], broken], out)
    assert tree_snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken_vae_export", "model_repository"]  # no temp dirs


def test_build_repository_refuses_when_out_is_foreign_nonempty_directory(export_dirs, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RepositoryError, match="refusing to replace"):
        build_repository([export_dirs["gan"]], tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_build_repository_raises_when_same_graph_exported_twice(export_dirs, tmp_path):
    with pytest.raises(RepositoryError, match="gan_generator is in both"):
        build_repository([export_dirs["gan"], export_dirs["gan"]], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_main_builds_container_repository_and_exits_2_with_hint_when_export_missing(export_dirs, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["--export", str(export_dirs["vae"]), "--out", str(out), "--flavour", "container"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["vae_decoder", "vae_decoder_b1", "vae_decoder_b4",
                                                                    "vae_encoder", "vae_encoder_b1", "vae_encoder_b4"]
    assert main(["--export", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "run `trident export CHECKPOINT" in capsys.readouterr().err
    assert main(["--export", str(export_dirs["vae"]), "--out", str(out), "--bucket-backend", "python"]) == 2
    assert "an option of the container flavour" in capsys.readouterr().err


def test_default_build_exports_once_then_reuses_cache_when_checkpoint_unchanged(checkpoints, tmp_path):
    root = tmp_path / "checkpoints"
    (root / "gan").mkdir(parents=True)
    os.symlink(checkpoints["gan"], root / "gan" / "model.safetensors")
    logs: list[str] = []
    kwargs = dict(work=tmp_path / "work", kinds=("gan",), buckets=(1,), log=logs.append)
    assert default_build(root, tmp_path / "repo", **kwargs) == ["gan_generator"]
    digest = hashlib.sha256(checkpoints["gan"].read_bytes()).hexdigest()
    assert [p.name for p in (tmp_path / "work" / "exports").iterdir()] == [f"gan-{digest[:12]}-b1"]
    assert sum("exporting" in line for line in logs) == 1
    logs.clear()
    assert default_build(root, tmp_path / "repo", **kwargs) == ["gan_generator"]
    assert not any("exporting" in line for line in logs)


def test_default_build_serves_the_student_beside_the_others_only_when_its_checkpoint_is_there(checkpoints,
                                                                                             student_checkpoint,
                                                                                             tmp_path):
    from trident.serving.spec import STUDENT_SAMPLING_LOOP, STUDENT_SAMPLING_LOOP_STREAM, STUDENT_UNET

    root = tmp_path / "checkpoints"
    (root / "gan").mkdir(parents=True)
    os.symlink(checkpoints["gan"], root / "gan" / "model.safetensors")
    kwargs = dict(work=tmp_path / "work", kinds=("gan",), buckets=(1,), log=lambda *_: None,
                  precision_choice=precision.REFERENCE, shard_limit=0)  # no timing trials: what is built is tested
    assert default_build(root, tmp_path / "repo", **kwargs) == ["gan_generator"]
    (root / "diffusion_student").mkdir()
    os.symlink(student_checkpoint, root / "diffusion_student" / "model.safetensors")
    assert sorted(default_build(root, tmp_path / "repo", **kwargs)) == sorted(
        ["gan_generator", STUDENT_UNET, STUDENT_SAMPLING_LOOP, STUDENT_SAMPLING_LOOP_STREAM])
    digest = hashlib.sha256(student_checkpoint.read_bytes()).hexdigest()
    # cached under the folder's name: a student's export never takes a teacher's (diffusion-<sha>) name
    assert f"diffusion_student-{digest[:12]}-b1" in {p.name for p in (tmp_path / "work" / "exports").iterdir()}


# ---------------------------------------------------------------------------------------------------------------------
# model.py's execute() with a stand-in for triton_python_backend_utils (which exists only inside the backend stub)
# ---------------------------------------------------------------------------------------------------------------------


def fake_pb_utils() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, array

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError(Exception):
        INVALID_ARG = 3

        def __init__(self, message, code=None):
            super().__init__(message)
            self.code = code

        def message(self):
            return str(self)

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    pb.Tensor, pb.TritonError, pb.InferenceResponse = Tensor, TritonError, InferenceResponse
    pb.TritonModelException = RuntimeError
    pb.get_input_tensor_by_name = lambda request, name: request.get(name)
    pb.triton_string_to_numpy = lambda name: np.dtype(name.removeprefix("TYPE_").lower()
                                                      .replace("fp", "float")).type
    pb.Logger = types.SimpleNamespace(log_warn=print, log_info=print, log_error=print)
    return pb


@pytest.fixture()
def unet_model(repository, metas, monkeypatch):
    """The repository's diffusion_unet/1/model.py, initialised as the Python backend would."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    pb = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    # model.py puts its folder first on sys.path and imports its sibling ort_runner: undo both afterwards
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("ort_runner", None)
    path = repository / "diffusion_unet" / "1" / "model.py"
    module_spec = importlib.util.spec_from_file_location("served_unet_model_py", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = text_format.Parse((repository / "diffusion_unet" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    model = module.TritonPythonModel()
    model.initialize({"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
                      "model_repository": str(repository / "diffusion_unet"), "model_version": "1",
                      "model_instance_kind": "CPU", "model_instance_device_id": "0"})
    yield model, pb
    model.finalize()
    sys.modules.pop("ort_runner", None)


def as_request(pb, spec: GraphSpec, arrays: list[np.ndarray]) -> dict:
    return {t.name: pb.Tensor(t.name, a) for t, a in zip(spec.inputs, arrays)}


def test_execute_runs_smallest_bucket_holding_the_rest_or_largest_when_rows_exceed_it(unet_model, specs, metas):
    """Buckets (1, 4) and row_shards=2: a batch is split in two concurrent halves unless the halves would pad to
    more rows than the whole batch; each part runs the smallest bucket holding its rest."""
    model, pb = unet_model
    spec = specs["diffusion_unet"]
    runs: list[tuple[str, int]] = []
    for where, sessions in (("whole", model.runner.sessions), ("shard", model.runner.shard_sessions)):
        for bucket, session in list(sessions.all().items()):  # made now, so that every one is wrapped
            sessions[bucket] = types.SimpleNamespace(
                run=lambda names, feed, _run=session.run, _w=where, _b=bucket: (runs.append((_w, _b)),
                                                                                 _run(names, feed))[1])
    plans = {}
    for rows in (1, 2, 4, 5, 7, 9):
        runs.clear()
        model.execute([as_request(pb, spec, valid_inputs(spec, metas["diffusion_unet"], rows, seed=rows))])
        plans[rows] = sorted(runs)
    assert plans == {1: [("whole", 1)], 2: [("shard", 1), ("shard", 1)], 4: [("whole", 4)],
                     5: [("whole", 1), ("whole", 4)], 7: [("shard", 4), ("shard", 4)],
                     9: [("shard", 1), ("shard", 4), ("shard", 4)]}


def test_execute_fails_only_bad_requests_when_batched_with_good_ones(unet_model, specs, metas, oracle):
    model, pb = unet_model
    spec = specs["diffusion_unet"]
    meta = metas["diffusion_unet"]
    label = [t.name for t in spec.inputs].index(label_input(spec).name)
    timestep = [t.name for t in spec.inputs].index(timestep_input(spec).name)
    good = [valid_inputs(spec, meta, n, seed=10 + n) for n in (2, 3, 1)]
    bad_label = valid_inputs(spec, meta, 2, seed=20)
    bad_label[label][1] = meta["card"]["null_class"] + 1
    bad_time = valid_inputs(spec, meta, 1, seed=21)
    bad_time[timestep][0] = np.nan
    responses = model.execute([as_request(pb, spec, a) for a in (good[0], bad_label, good[1], bad_time, good[2])])
    assert len(responses) == 5
    assert "must be in [0, 11)" in str(responses[1].error) and "got 11 at row 1" in str(responses[1].error)
    assert "NaN or Inf" in str(responses[3].error)
    assert responses[1].error.code == pb.TritonError.INVALID_ARG
    for response, arrays in zip((responses[0], responses[2], responses[4]), good):
        assert response.error is None
        assert_outputs_close([t.as_numpy() for t in response.output_tensors], oracle(spec, arrays))


def test_execute_answers_each_request_of_a_failed_run_with_the_failure_and_runs_the_next_batch(
        unet_model, specs, metas, oracle, monkeypatch):
    model, pb = unet_model
    spec = specs["diffusion_unet"]
    meta = metas["diffusion_unet"]
    timestep = [t.name for t in spec.inputs].index(timestep_input(spec).name)
    good = [valid_inputs(spec, meta, n, seed=30 + n) for n in (2, 1)]
    bad_time = valid_inputs(spec, meta, 1, seed=33)
    bad_time[timestep][0] = np.nan

    def out_of_memory(feed):
        raise RuntimeError("the session ran out of memory")

    with monkeypatch.context() as patched:
        patched.setattr(model.runner, "run", out_of_memory)
        responses = model.execute([as_request(pb, spec, a) for a in (good[0], bad_time, good[1])])
    assert [str(r.error) for r in (responses[0], responses[2])] == [
        "diffusion_unet: ONNX Runtime failed: the session ran out of memory"] * 2
    assert responses[0].error.code is None  # not INVALID_ARG: nothing was wrong with the request
    assert "NaN or Inf" in str(responses[1].error) and responses[1].error.code == pb.TritonError.INVALID_ARG
    (response,) = model.execute([as_request(pb, spec, good[0])])
    assert response.error is None
    assert_outputs_close([t.as_numpy() for t in response.output_tensors], oracle(spec, good[0]))


# ---------------------------------------------------------------------------------------------------------------------
# Real server on the embedded repository
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Served:
    server: object
    startup_statistics: dict  # per model, read before any test request: what the warmup did


@pytest.fixture(scope="module")
def served(repository):
    from trident.serving.server.launcher import ServerConfig, TritonServer

    with TritonServer(ServerConfig(repository, http_port=0, grpc_port=0, metrics_port=0)) as server:
        with triton_client("http", server.http_url) as client:
            stats = {s["name"]: s for s in client.get_inference_statistics()["model_stats"]}
        print(f"\ntritonserver ready in {server.startup_s:.2f} s ({server.log_path})")
        yield Served(server, stats)


@contextmanager
def triton_client(protocol: str, url: str):
    """A plain tritonclient client, closed after use: Triton's shutdown waits (up to its exit timeout) for every
    HTTP keep-alive connection a client left open."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    client = (httpclient if protocol == "http" else grpcclient).InferenceServerClient(url)
    try:
        yield client
    finally:
        client.close()


def infer(protocol: str, url: str, spec: GraphSpec, arrays: list[np.ndarray], wire: bool = True) -> list[np.ndarray]:
    """One request through plain tritonclient; the datatype follows each array (so tests can send wrong ones)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    module = httpclient if protocol == "http" else grpcclient
    inputs = []
    for tensor, array in zip(spec.inputs, arrays):
        data = to_wire(tensor, array) if wire else array
        entry = module.InferInput(tensor.name, list(data.shape), np_to_triton_dtype(data.dtype))
        entry.set_data_from_numpy(data)
        inputs.append(entry)
    outputs = [module.InferRequestedOutput(o.name) for o in spec.outputs]
    with triton_client(protocol, url) as client:
        result = client.infer(spec.name, inputs, outputs=outputs)
    return [result.as_numpy(o.name) for o in spec.outputs]


def url(served: Served, protocol: str) -> str:
    return served.server.http_url if protocol == "http" else served.server.grpc_url


@pytest.mark.server
@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="needs an onnxruntime without the CUDA provider")
def test_served_model_refuses_to_load_naming_the_missing_library_when_cuda_is_asked_of_a_cpu_onnxruntime(
        export_dirs, tmp_path):
    """`--gpu` where onnxruntime is the CPU build: the model must fail to load, not serve from the CPU. This machine
    has no GPU, and Triton refuses a KIND_GPU instance before model.py runs, so the instances are moved to the CPU
    in the written configs (the one thing mocked); the models still ask ONNX Runtime for CUDA."""
    from trident.serving.server.launcher import ServerConfig, TritonServer, TritonServerError

    repo = tmp_path / "model_repository"
    build_repository([export_dirs["vae"]], repo, gpu=True, intra_op_threads=1)
    for config in repo.glob("*/config.pbtxt"):
        assert served_runtime(config.parent).provider == "cuda"
        config.write_text(config.read_text().replace("KIND_GPU", "KIND_CPU"))
    with pytest.raises(TritonServerError) as failure:
        with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)):
            pass
    message = str(failure.value)
    assert "CUDAExecutionProvider was requested" in message and "libonnxruntime_providers_cuda.so" in message, message


@pytest.mark.server
def test_server_reports_every_model_ready_when_repository_built(served):
    with triton_client("http", served.server.http_url) as client:
        assert client.is_server_ready()
        assert sorted(m["name"] for m in client.get_model_repository_index()) == sorted((*GRAPHS, *LOOPS))
        assert all(client.is_model_ready(graph) for graph in (*GRAPHS, *LOOPS))


@pytest.mark.server
def test_model_warmup_ran_every_bucket_before_first_request_when_server_ready(served, metas):
    for graph, meta in metas.items():
        stats = served.startup_statistics[graph]
        buckets = meta["graphs"][graph]["buckets"]
        assert sorted(b["batch_size"] for b in stats["batch_stats"]) == buckets, graph
        assert stats["inference_count"] == sum(buckets) and stats["inference_stats"]["fail"]["count"] == 0


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_model_config_carries_sampling_metadata_when_fetched(served, metas, protocol):
    for graph, meta in metas.items():
        with triton_client(protocol, url(served, protocol)) as client:
            if protocol == "http":
                config = client.get_model_config(graph)
            else:
                config = client.get_model_config(graph, as_json=True)["config"]
        carried = ModelCard.from_json(config["parameters"][CARD_KEY]["string_value"])
        assert carried == export_card(meta).with_buckets({graph: meta["graphs"][graph]["buckets"]})
        assert int(config["max_batch_size"]) == SERVED_MAX_BATCH
        assert len(config["model_warmup"]) == len(meta["graphs"][graph]["buckets"])


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("graph", GRAPHS)
def test_infer_equals_in_process_onnxruntime_when_one_request(served, specs, metas, oracle, graph, protocol):
    spec = specs[graph]
    arrays = valid_inputs(spec, metas[graph], 3, seed=GRAPHS.index(graph))  # 3 rows: padded to bucket 4
    got = infer(protocol, url(served, protocol), spec, arrays)
    assert_outputs_close(got, oracle(spec, arrays))


def send_together(jobs: list, timeout: float = 60.0) -> list:
    """Run the callables on threads released at the same instant; returns each result or raised exception."""
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        barrier.wait()
        try:
            results[i] = jobs[i]()
        except Exception as e:  # the test inspects it
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results


def execution_counts(served: Served, graph: str, at_least: int = 0) -> tuple[int, int]:
    """(successful requests, executions) of a model. Triton records a request's statistics when it releases the
    request, which can be after the client already holds the response: poll until `at_least` requests show."""
    def read() -> tuple[int, int]:
        model = client.get_inference_statistics(graph)["model_stats"][0]
        return int(model["inference_stats"]["success"]["count"]), int(model["execution_count"])

    with triton_client("http", served.server.http_url) as client:
        return settled(read, lambda now: now[0] >= at_least)


@pytest.mark.server
@pytest.mark.parametrize("graph", ["diffusion_unet", "gan_generator"])
def test_concurrent_requests_of_mixed_sizes_each_get_own_rows_when_batched_together(served, specs, metas, oracle,
                                                                                    graph):
    spec = specs[graph]
    sizes = [1, 2, 3, 5, 7, 1, 2, 8]  # 5, 7 and 8 exceed the largest bucket (4)
    requests_before, executions_before = execution_counts(served, graph)
    for round_ in range(2):
        payloads = [valid_inputs(spec, metas[graph], n, seed=100 * round_ + i) for i, n in enumerate(sizes)]
        protocols = ["http", "grpc"] * (len(sizes) // 2)
        results = send_together([lambda a=a, p=p: infer(p, url(served, p), spec, a)
                                 for a, p in zip(payloads, protocols)])
        for arrays, result in zip(payloads, results):
            assert not isinstance(result, Exception), result
            assert_outputs_close(result, oracle(spec, arrays))
    requests_after, executions_after = execution_counts(served, graph, at_least=requests_before + 2 * len(sizes))
    assert requests_after - requests_before == 2 * len(sizes)
    if graph == "diffusion_unet":
        # A U-Net execution (tens of ms) keeps the single instance busy while the others queue: the batcher must
        # have merged some. A gan_generator execution takes ~1 ms, so on a loaded 2-core machine its requests
        # may all arrive after the previous one finished; there only the per-request rows above are checked.
        assert executions_after - executions_before < 2 * len(sizes)


# A request of 2 rows waits in this repository's batcher until the rows reach a preferred batch size (the buckets: 1,
# 4) or a minute passes (Triton's dynamic batcher: a pending batch below every preferred size waits for
# max_queue_delay_microseconds). So two requests of 2 rows, the second sent while the first waits, run as one
# execution of 4 rows, on any machine; a test that fails by this costs the minute, not a flake.
GATHER_DELAY_US = 60_000_000


@pytest.fixture(scope="module")
def gathering(export_dirs, tmp_path_factory):
    """A server of the diffusion U-Net alone whose dynamic batcher holds a request until its batch is a bucket."""
    from trident.serving.server.launcher import ServerConfig, TritonServer

    out = tmp_path_factory.mktemp("gathering") / "model_repository"
    build_repository([export_dirs["diffusion"]], out, max_batch_size=SERVED_MAX_BATCH, max_queue_delay_us=GATHER_DELAY_US,
                     row_shards=2, shard_limit=0, server_loop=False)
    assert "preferred_batch_size: [ 1, 4 ]" in (out / UNET / "config.pbtxt").read_text()
    with TritonServer(ServerConfig(out, http_port=0, grpc_port=0, metrics_port=0)) as server:
        yield server


def pending_requests(server, model: str) -> int:
    """Requests waiting in the model's queue now (Triton's nv_inference_pending_request_count gauge)."""
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    found = re.search(r'^nv_inference_pending_request_count\{model="%s",version="1"\} (\S+)$' % model, text, re.M)
    assert found, f"no pending request count for {model} in the metrics"
    return int(float(found.group(1)))


@pytest.mark.server
def test_infer_result_unchanged_when_batch_neighbours_hold_extreme_values(gathering, specs, metas, oracle):
    """My 2 rows share one execution (one ONNX Runtime run of bucket 4) with 2 rows 1e4 times too loud and labelled
    null, first behind them and then ahead of them; each time my rows are what they are run alone, one at a time.
    That they shared it is Triton's record: +2 requests, +1 execution, +1 batch of 4."""
    from concurrent.futures import ThreadPoolExecutor

    spec = specs[UNET]
    meta = metas[UNET]
    mine = valid_inputs(spec, meta, 2, seed=7)
    loud = valid_inputs(spec, meta, 2, seed=8)
    loud[[t.name for t in spec.inputs].index(image_like_input(spec).name)] *= 1e4
    loud[[t.name for t in spec.inputs].index(label_input(spec).name)][:] = meta["card"]["null_class"]
    alone = oracle(spec, mine)

    def counts() -> tuple[int, int, int]:
        with triton_client("http", gathering.http_url) as client:
            stats = client.get_inference_statistics(UNET)["model_stats"][0]
        fours = [b["compute_infer"]["count"] for b in stats["batch_stats"] if int(b["batch_size"]) == 4]
        return int(stats["inference_stats"]["success"]["count"]), int(stats["execution_count"]), int(sum(fours))

    with ThreadPoolExecutor(2) as pool:
        for order in (("loud", "mine"), ("mine", "loud")):
            before = counts()
            arrays = {"mine": mine, "loud": loud}
            first = pool.submit(infer, "grpc", gathering.grpc_url, spec, arrays[order[0]])
            # the second is sent once the first waits in the queue, so the batch holds them in this order
            assert settled(lambda: pending_requests(gathering, UNET), lambda n: n == 1, quiet_s=0.2) == 1, order
            second = pool.submit(infer, "http", gathering.http_url, spec, arrays[order[1]])
            results = dict(zip(order, (first.result(timeout=120), second.result(timeout=120))))
            assert_outputs_close(results["mine"], alone)
            after = settled(counts, lambda now: now[0] >= before[0] + 2)
            assert [a - b for a, b in zip(after, before)] == [2, 1, 1], (order, before, after)


def malformed_cases():
    """(graph, description, how to break valid model-side arrays, expected message part)."""

    def replace(role, value, wire=True):
        def apply(spec, arrays):
            index = [t.name for t in spec.inputs].index(role(spec).name)
            arrays[index] = value(arrays[index])
            return arrays, wire
        return apply

    def unwired_scalar(spec, arrays):  # a per-item scalar sent as (n,) instead of (n, 1)
        return [a if t.shape else a.reshape(-1) for t, a in zip(spec.inputs, arrays)], False

    def put(index, value):
        def set_value(a):
            a = a.copy()
            a.reshape(len(a), -1)[0, index] = value
            return a
        return set_value

    return [
        ("diffusion_unet", "wrong shape", replace(image_like_input, lambda a: a[..., :-1], wire=False), "unexpected shape"),
        ("diffusion_unet", "wrong dtype", replace(image_like_input, lambda a: a.astype(np.float64)),
         "expects 'FP32'"),
        ("diffusion_unet", "scalar without its [1] axis", unwired_scalar, "unexpected shape"),
        ("diffusion_unet", "class above null", replace(label_input, put(0, 11)), "must be in [0, 11)"),
        ("diffusion_unet", "negative class", replace(label_input, put(0, -1)), "must be in [0, 11)"),
        ("diffusion_unet", "timestep T", replace(timestep_input, put(0, 1000.0)), "must be in [0, 1000)"),
        ("diffusion_unet", "NaN timestep", replace(timestep_input, put(0, np.nan)), "NaN or Inf"),
        ("diffusion_unet", "Inf sample", replace(image_like_input, put(3, np.inf)), "NaN or Inf"),
        ("gan_generator", "null class on a GAN", replace(label_input, put(0, 10)), "must be in [0, 10)"),
        ("vae_decoder", "NaN latent", replace(image_like_input, put(0, np.nan)), "NaN or Inf"),
    ]


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_malformed_requests_get_error_and_server_keeps_serving_when_sent(served, specs, metas, oracle, protocol):
    from tritonclient.utils import InferenceServerException

    for graph, what, breaker, message in malformed_cases():
        spec = specs[graph]
        arrays, wire = breaker(spec, valid_inputs(spec, metas[graph], 2, seed=5))
        with pytest.raises(InferenceServerException) as raised:
            infer(protocol, url(served, protocol), spec, arrays, wire=wire)
        assert message in str(raised.value), (what, str(raised.value))
    assert served.server.is_alive()
    for graph in GRAPHS:
        arrays = valid_inputs(specs[graph], metas[graph], 2, seed=6)
        assert_outputs_close(infer(protocol, url(served, protocol), specs[graph], arrays),
                             oracle(specs[graph], arrays))


def test_build_keeps_a_readme_and_still_refuses_foreign_folders(export_dirs, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "README.md").write_text("notes")
    build_repository([export_dirs["vae"]], out)
    assert (out / "README.md").read_text() == "notes" and (out / MARKER).is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.md").write_text("x")
    (other / "data.csv").write_text("y")
    with pytest.raises(RepositoryError, match="refusing to replace"):
        build_repository([export_dirs["vae"]], other)

"""Export directories -> a Triton model repository.

`trident serve build --export DIR [DIR ...] --out model_repository [--flavour embedded|container] [--gpu] [--fp16]
                    [--bucket-backend onnxruntime|python]`

Two flavours of the same exported graphs:

embedded (default)  For the tritonserver bundled with nvidia-pytriton, which has the Python backend only. One model
                    per graph (diffusion_unet, gan_generator, vae_decoder, vae_encoder): `backend: "python"`,
                    dynamic batching up to the largest bucket, and `1/model.py` = a copy of serving/server/runtime/
                    graph_model.py that runs the static-batch ONNX files (copied next to it) in ONNX Runtime. With a
                    diffusion export, also `diffusion_sampler`: the whole sampling loop on the server (serving/server/
                    runtime/loop_model.py), one request per batch of images, and `diffusion_sampler_stream`, the same
                    loop streaming its progress over gRPC (`--no-server-loop` leaves both out). A distilled student's
                    export (`trident distill`) is served beside the teacher under its own names:
                    diffusion_student_unet (with its guidance input), diffusion_student_sampler and
                    diffusion_student_sampler_stream.
                    Self-contained: the repository also runs in a Triton container where trident is not installed.
container           For the official Triton container. Per graph: one native onnxruntime model per bucket
                    (diffusion_unet_b8, ...: `max_batch_size: 0` with the full static shape, `1/model.onnx`; `--gpu`
                    runs it on CUDA, `--gpu --fp16` adds the TensorRT FP16 accelerator), and a front model under the
                    graph's own name (serving/server/runtime/router_model.py, Python backend, numpy only) with
                    `max_batch_size` > 0 and the dynamic batcher: it gathers requests across clients, pads them to the
                    smallest bucket (or splits them over the largest) and runs them on the per-bucket models through
                    BLS. With a diffusion export, also `diffusion_sampler` and `diffusion_sampler_stream`, their U-Net
                    calls going through BLS too.
                    Clients see the same names, tensors and model cards as in the embedded flavour.
                    `--bucket-backend python` serves the per-bucket models with graph_model.py instead (a Triton with
                    only the Python backend, such as the one `trident serve` runs: how the tests serve this layout).

Every model a client calls carries the model card (serving/card.py) as one JSON parameter, `trident_card`, so a client
discovers everything from the server; what the model's own model.py runs is one more, `trident_runtime`: the graph's
GraphRuntime (serving/graph_runtime.py), made by the same function as the in-process backend's
(serving/manifest.py graph_runtime). The sampling loop models also say how many images a request may hold
(`trident_max_images`, read by clients). Keys: serving/server/runtime/protocol.py.

Three steps: BuildOptions (every option checked once), measure() (the timing trials `auto` asks for, on this
machine), plan() (pure: a ModelPlan per model, its configuration as a plain dict, the JSON form of Triton's
ModelConfig as pytriton's get_config builds it, and its files), then build_repository writes them (config.pbtxt by
serving/server/pbtxt.py) into a temporary folder next to `out`, swapped in only when complete, so a failed build
leaves the previous repository untouched.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from trident.serving import manifest, precision, toolchain
from trident.serving.errors import ExportMetadataError, TridentError
from trident.serving.files import atomic_directory
from trident.serving.graph_runtime import MEASURED, MEASURED_FILE, GraphRuntime
from trident.serving.manifest import Export, Measurement, RuntimeOptions
from trident.serving.server.pbtxt import to_pbtxt
from trident.serving.server.runtime import MODEL_FILES, RUNTIME_FILES
from trident.serving.server.request_limits import largest_request
from trident.serving.server.runtime import protocol as P
from trident.serving.spec import GRAPHS_OF_KIND, UNETS, TensorSpec, loop_spec

__all__ = [
    "BUCKET_BACKENDS",
    "FLAVOURS",
    "BuildOptions",
    "ModelPlan",
    "RepositoryError",
    "bucket_config",
    "build_options",
    "build_repository",
    "graph_config",
    "load_exports",
    "loop_config",
    "main",
    "measure",
    "plan",
    "stand_in_config",
    "to_pbtxt",
]

FLAVOURS = ("embedded", "container")
# The container flavour's per-bucket models: native onnxruntime (the official container), or graph_model.py on the
# Python backend standing in for it (a Triton with the Python backend only, e.g. the one `trident serve` runs).
BUCKET_BACKENDS = ("onnxruntime", "python")
DEFAULT_LOOP_MAX_IMAGES = 1024  # images per request of the sampling loop model
VERSION = "1"  # the one model version directory written
MARKER = "trident_repository.json"  # written at the root; Triton only looks at sub-directories
DEFAULT_MAX_QUEUE_DELAY_US = 500
DEFAULT_QUALITY_GATE = precision.DEFAULT_QUALITY_GATE  # beside the package, wherever the build runs


def default_precision(flavour: str = "embedded", gpu: bool = False) -> str:
    """What `trident serve build` and `trident demo` run when no --precision is given: "auto" where it chooses (the
    embedded flavour on the CPU; where it finds nothing faster that passed its gates, every bucket is simply
    onnxruntime-fp32), else "fp32" (the container flavour runs Triton's native backends; a GPU build takes fp32 or
    --fp16)."""
    return "auto" if flavour == "embedded" and not gpu else "fp32"


class RepositoryError(TridentError):
    """The repository cannot be built from these exports; nothing was written to the output directory."""


# ---------------------------------------------------------------------------------------------------------------------
# Options, checked once
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildOptions:
    """Every option of a build (build_options makes one from build_repository's keywords and checks it)."""

    flavour: str = "embedded"
    runtime: RuntimeOptions = field(default_factory=lambda: RuntimeOptions(shard_limit="auto"))
    fp16: bool = False  # embedded: the fp16 graphs (runtime.precision); container: TensorRT FP16
    max_batch_size: int | None = None  # the dynamically batched models' rows per execution (None: largest bucket)
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    server_loop: bool = True
    bucket_backend: str = "onnxruntime"
    max_images: int = DEFAULT_LOOP_MAX_IMAGES

    @property
    def gpu(self) -> bool:
        return self.runtime.gpu


def build_options(flavour: str = "embedded", *, gpu: bool = False, fp16: bool = False,
                  max_batch_size: int | None = None, max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
                  intra_op_threads: int = 0, row_shards: int = 0, server_loop: bool = True,
                  precision_choice: str = "fp32", quality_gate: Path | None = DEFAULT_QUALITY_GATE,
                  bucket_backend: str = "onnxruntime", shard_limit: int | str = "auto",
                  max_images: int = DEFAULT_LOOP_MAX_IMAGES) -> BuildOptions:
    """build_repository's keywords as one BuildOptions, or a RepositoryError naming what is wrong.

    precision_choice: "fp32" (onnxruntime-fp32), a variant of serving/precision.py for every bucket, or "auto":
    measured here per graph and bucket. shard_limit: embedded, CPU: the largest bucket a row shard runs; "auto"
    measures it here per graph (it goes into each model's version directory as MEASURED_FILE), 0 lets shards run
    every bucket. The rest: see the CLI's help."""
    if flavour not in FLAVOURS:
        raise RepositoryError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    if bucket_backend not in BUCKET_BACKENDS:
        raise RepositoryError(f"bucket_backend must be one of {BUCKET_BACKENDS}, got {bucket_backend!r}")
    if bucket_backend != "onnxruntime" and flavour != "container":
        raise RepositoryError("bucket_backend (--bucket-backend) is an option of the container flavour")
    if fp16 and not gpu:
        raise RepositoryError("fp16 graphs are for the GPU path: pass --gpu with --fp16")
    if max_batch_size is not None and int(max_batch_size) < 1:
        raise RepositoryError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if max_images < 1:
        raise RepositoryError(f"max_images must be >= 1, got {max_images}")
    try:
        runtime = RuntimeOptions("onnxruntime-fp16" if fp16 else precision_choice, int(intra_op_threads),
                                 int(row_shards), shard_limit, bool(gpu), quality_gate)
    except ValueError as e:
        raise RepositoryError(str(e)) from None
    if runtime.precision == "onnxruntime-fp16" and not gpu:
        raise RepositoryError("fp16 graphs are for the GPU path: pass --gpu with --fp16 (--precision fp16)")
    if flavour == "container" and runtime.precision not in (precision.REFERENCE, "onnxruntime-fp16"):
        raise RepositoryError("--precision chooses the runtimes of the embedded flavour; the container flavour runs "
                              "Triton's native backends (--gpu --fp16 for TensorRT FP16)")
    return BuildOptions(flavour, runtime, bool(fp16), None if max_batch_size is None else int(max_batch_size),
                        int(max_queue_delay_us), bool(server_loop), bucket_backend, int(max_images))


def load_exports(export_dirs) -> list[Export]:
    """Each export folder's metadata.json, parsed once (one export per model kind)."""
    if not export_dirs:
        raise RepositoryError("no export directories given; run `trident export CHECKPOINT --out DIR` first")
    exports, source_of = [], {}
    for directory in map(Path, export_dirs):
        try:
            export = manifest.load_export(directory)
        except ExportMetadataError as e:
            raise RepositoryError(str(e)) from None
        for graph in GRAPHS_OF_KIND[export.card.kind]:
            if graph in source_of:
                raise RepositoryError(f"graph {graph} is in both {source_of[graph]} and {directory}; "
                                      "give one export per model kind")
            if graph not in export.graphs:
                raise RepositoryError(f"the export {directory} has no graph {graph!r}; it holds "
                                      f"{sorted(export.graphs)}")
            source_of[graph] = directory
        exports.append(export)
    return exports


# ---------------------------------------------------------------------------------------------------------------------
# Trials on this machine (the only step that runs graphs)
# ---------------------------------------------------------------------------------------------------------------------


def measure(exports: list[Export], options: BuildOptions, log=None) -> dict[str, Measurement]:
    """{graph: what it runs per bucket and what was measured}: the embedded flavour's precision choice and shard
    limit trials (none for a fixed precision and shard limit); the container flavour runs Triton's own backends."""
    if options.flavour != "embedded":
        return {}
    found = {}
    for export in exports:
        for graph in GRAPHS_OF_KIND[export.card.kind]:
            _verify_graph_files(export, graph)  # before the trials load them
            prefixed = (lambda m, g=graph: log(f"{g} {m}")) if log else None
            try:
                found[graph] = manifest.measure(export, graph, options.runtime, log=prefixed)
            except ValueError as e:
                raise RepositoryError(str(e)) from None
            line = precision.not_offered_line(graph, found[graph].record) if options.runtime.precision == "auto" \
                else None
            if line and log:
                log(line)
    return found


# ---------------------------------------------------------------------------------------------------------------------
# Model configurations as plain data (pure)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPlan:
    """One model of the repository: its configuration, the export files copied into its version folder ({path
    there: (source, sha256)}), the files the build writes there ({path: text}: MEASURED_FILE) and the runtime file
    it runs as model.py (a MODEL_FILES key; None for a native backend), and the warm-up requests' input data files
    (warmup_data)."""

    config: dict
    files: dict[str, tuple[Path, str]] = field(default_factory=dict)
    written: dict[str, str] = field(default_factory=dict)
    runs: str | None = None
    warmup: dict[str, bytes] = field(default_factory=dict)  # {file in <model>/warmup/: raw input data} (warmup_data)

    @property
    def name(self) -> str:
        return self.config["name"]


def _batched_io(tensor: TensorSpec) -> dict:
    """An input/output of a model with max_batch_size > 0: dims are per item, Triton adds the batch axis.

    Triton refuses empty dims, so a per-item scalar (timestep, class_label) is declared as [1] and reshaped to []:
    clients send shape (B, 1), the graph and model.py see (B,).
    """
    entry = {"name": tensor.name, "data_type": tensor.config_dtype, "dims": list(tensor.shape) or [1]}
    if not tensor.shape:
        entry["reshape"] = {"shape": []}
    return entry


def _static_io(tensor: TensorSpec, batch: int) -> dict:
    """An input/output of a model with max_batch_size 0: dims are the graph's full static shape, batch included."""
    return {"name": tensor.name, "data_type": tensor.config_dtype, "dims": list(tensor.batched(batch))}


def _parameters(values: dict[str, str]) -> dict[str, dict]:
    return {key: {"string_value": value} for key, value in values.items()}


def _card(export: Export, graph: str) -> dict[str, str]:
    """The model card a client reads from the model configuration, with the buckets of this model's graph."""
    return {P.CARD: export.card.with_buckets({graph: export.graphs[graph].buckets}).to_json()}


def _warmup(name: str, batch_size: int, io: list[dict], values: dict[str, float] | None = None) -> dict:
    # zero_data, not random_data: Triton's random data is random bytes, which for FP32 includes NaN/Inf and
    # huge values that model.py rightly rejects (a failed warmup fails the model load). Zero is a valid value
    # for every input (timestep 0, class 0) but a student's guidance scale, whose range may exclude it: such an input
    # (values: warmup_values) reads its value from a file in the model's warmup/ folder (warmup_data writes it).
    def data(t: dict) -> dict:
        if t["name"] not in (values or {}):
            return {"zero_data": True}
        return {"input_data_file": f"{t['name']}_x{math.prod(t['dims'])}"}

    return {"name": name, "batch_size": batch_size,
            "inputs": {t["name"]: {"data_type": t["data_type"], "dims": t["dims"], **data(t)} for t in io}}


def warmup_values(export: Export, graph: str) -> dict[str, float]:
    """{input: value} of a graph's inputs for which zero is not valid (a student's guidance scale): their warm-up
    requests carry the low end of the input's range (manifest.input_ranges, what the models check)."""
    ranges = manifest.input_ranges(export.graphs[graph].spec, export.card)
    return {name: r.low for name, r in ranges.items() if r.outside(np.zeros(1))[0]}


def warmup_data(config: dict, values: dict[str, float]) -> dict[str, bytes]:
    """The files that a configuration's warm-up requests read (input_data_file: raw data, row-major, of one request;
    Triton repeats it for each of batch_size), from warmup_values."""
    out = {}
    for sample in config.get("model_warmup", []):
        for name, entry in sample["inputs"].items():
            if "input_data_file" in entry:
                dtype = np.dtype(TRITON_NUMPY[entry["data_type"]])
                out[entry["input_data_file"]] = np.full(math.prod(entry["dims"]), values[name], dtype).tobytes()
    return out


TRITON_NUMPY = {"TYPE_FP32": "float32", "TYPE_FP64": "float64", "TYPE_INT64": "int64", "TYPE_INT32": "int32"}


def graph_config(export: Export, runtime: GraphRuntime, options: BuildOptions) -> dict:
    """The model under a graph's own name, dynamically batched up to options.max_batch_size (default: the largest
    bucket; more lets one execution span several bucket runs). Embedded: graph_model.py runs every bucket in ONNX
    Runtime, warmed per bucket. Container (runtime.bucket_models): the front model, router_model.py over the
    per-bucket models through BLS, on the CPU (numpy only) and without model_warmup: a warm-up request would reach
    the per-bucket models before Triton has necessarily loaded them; they warm up on their own."""
    spec = export.graphs[runtime.graph].spec
    front = runtime.bucket_models is not None
    max_batch_size = options.max_batch_size or runtime.sizes[-1]
    inputs = [_batched_io(t) for t in spec.inputs]
    config = {
        "name": runtime.graph,
        "backend": "python",
        "max_batch_size": max_batch_size,
        "input": inputs,
        "output": [_batched_io(t) for t in spec.outputs],
        "dynamic_batching": {"preferred_batch_size": [n for n in runtime.sizes if n <= max_batch_size],
                             "max_queue_delay_microseconds": options.max_queue_delay_us},
        "instance_group": [{"kind": "KIND_GPU" if options.gpu and not front else "KIND_CPU", "count": 1}],
    }
    if not front:
        values = warmup_values(export, runtime.graph)
        config["model_warmup"] = [_warmup(f"zeros_b{n}", n, inputs, values) for n in runtime.sizes
                                  if n <= max_batch_size]
    config["parameters"] = _parameters({**_card(export, runtime.graph), P.RUNTIME: runtime.to_json()})
    return config


def loop_config(export: Export, runtime: GraphRuntime, options: BuildOptions, stream: bool = False) -> dict:
    """The sampling loop model (serving/server/runtime/loop_model.py) over the U-Net (runtime: its sessions, or in
    the container flavour its per-bucket models): not batched by Triton (max_batch_size 0, one request = one batch
    of images). stream: the decoupled variant (diffusion_sampler_stream, gRPC streaming: progress, then the images),
    which makes its sessions on its first request. A student's export gives the student's loop models
    (diffusion_student_sampler, ..._stream: spec.DIFFUSION_MODELS), over its own U-Net."""
    spec = loop_spec(export.card.image.shape, stream=stream, kind=export.card.kind)
    config = {
        "name": spec.name,
        "backend": "python",
        "max_batch_size": 0,
        "input": [{"name": t.name, "data_type": t.config_dtype, "dims": list(t.shape),
                   **({"optional": True} if t.optional else {})} for t in spec.inputs],
        "output": [{"name": t.name, "data_type": t.config_dtype, "dims": list(t.shape)} for t in spec.outputs],
        "instance_group": [{"kind": "KIND_GPU" if options.gpu and runtime.bucket_models is None else "KIND_CPU",
                            "count": 1}],
        "parameters": _parameters({**_card(export, runtime.graph), P.RUNTIME: runtime.to_json(),
                                   P.MAX_IMAGES: str(options.max_images)}),
    }
    if stream:
        config["model_transaction_policy"] = {"decoupled": True}
    return config


def container_model_name(graph: str, bucket: int) -> str:
    return f"{graph}_b{bucket}"


def bucket_config(export: Export, graph: str, bucket: int, options: BuildOptions) -> dict:
    """onnxruntime-backend model of one graph at one static batch size (the official Triton container): what the
    graph's front model calls through BLS. It carries no model card: clients read the front's."""
    spec = export.graphs[graph].spec
    if bucket not in export.graphs[graph].buckets:
        raise RepositoryError(f"{graph}: no bucket {bucket} in the export (it has {list(export.graphs[graph].buckets)})")
    inputs = [_static_io(t, bucket) for t in spec.inputs]
    config = {
        "name": container_model_name(graph, bucket),
        "backend": "onnxruntime",
        "max_batch_size": 0,
        "input": inputs,
        "output": [_static_io(t, bucket) for t in spec.outputs],
        "instance_group": [{"kind": "KIND_GPU" if options.gpu else "KIND_CPU", "count": 1}],
        "model_warmup": [_warmup("zeros", 1, inputs, warmup_values(export, graph))],  # a non-batching model: batch 1
        "parameters": _parameters({P.ORT_BACKEND_THREADS: str(options.runtime.threads)}),
    }
    if options.fp16:
        # TensorRT builds the FP16 engine from the fp32 graph (its own casts beat the fp16 graph's edge casts).
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [
            {"name": "tensorrt", "parameters": {"precision_mode": "FP16"}}]}}
    return config


def stand_in_config(export: Export, runtime: GraphRuntime, options: BuildOptions) -> dict:
    """A per-bucket model on the Python backend instead of the native onnxruntime one (`--bucket-backend python`):
    the same name, tensors and static shapes as bucket_config, run by graph_model.py over the bucket's one ONNX file
    (runtime: one bucket). The container layout then serves in a Triton with only the Python backend (the one
    `trident serve` runs), which is how the tests serve it."""
    (bucket,) = runtime.sizes
    config = bucket_config(export, runtime.graph, bucket, replace(options, fp16=False))
    return {**config, "backend": "python", "parameters": _parameters({P.RUNTIME: runtime.to_json()})}


# ---------------------------------------------------------------------------------------------------------------------
# Planning: what each model is and holds (pure; reads no file)
# ---------------------------------------------------------------------------------------------------------------------


def plan(exports: list[Export], options: BuildOptions, measurements: dict[str, Measurement]) -> list[ModelPlan]:
    """Every model of the repository. measurements: measure()'s (the embedded flavour needs one per graph)."""
    models = []
    for export in exports:
        for graph in GRAPHS_OF_KIND[export.card.kind]:
            try:
                if options.flavour == "embedded":
                    models += _plan_embedded(export, graph, options, measurements[graph])
                else:
                    models += _plan_container(export, graph, options)
            except ValueError as e:  # graph_runtime's: a choice the export cannot run
                raise RepositoryError(str(e)) from None
    return models


def _graph_files(export: Export, runtime: GraphRuntime) -> dict[str, tuple[Path, str]]:
    entry = export.graphs[runtime.graph]
    return {b.file: (export.directory / b.file, entry.file(b.variant, b.size).sha256) for b in runtime.buckets}


def _plan_embedded(export: Export, graph: str, options: BuildOptions, measurement: Measurement) -> list[ModelPlan]:
    """One graph in the embedded flavour: its model, and (U-Net) the two sampling loop models over the same files."""
    chosen = manifest.graph_runtime(export, graph, options.runtime, measurement.choice)
    runtime = manifest.graph_runtime(export, graph, options.runtime, measurement.choice, as_measured=True)
    files = _graph_files(export, chosen)
    # per machine: beside the graph files, not in config.pbtxt (a committed repository stays the same wherever it is
    # rebuilt): the measured shard limit, and the variant `auto` chose for each bucket
    written = {MEASURED_FILE: measurement.measured.to_json()} if runtime.measured else {}
    config = graph_config(export, runtime, options)
    models = [ModelPlan(config, files, written, "graph", warmup_data(config, warmup_values(export, graph)))]
    if graph in UNETS and options.server_loop:
        models += [ModelPlan(loop_config(export, runtime, options, stream), files, written, "loop")
                   for stream in (False, True)]
    return models


def _plan_container(export: Export, graph: str, options: BuildOptions) -> list[ModelPlan]:
    """One graph in the container flavour: a model per bucket, the front model over them, and (U-Net) the loops."""
    entry = export.graphs[graph]
    models, bucket_models = [], {}
    for n in entry.buckets:
        if options.bucket_backend == "onnxruntime":
            file = entry.file(precision.REFERENCE, n)  # TensorRT FP16 starts from the fp32 graph (see bucket_config)
            config = bucket_config(export, graph, n, options)
            model = ModelPlan(config, {"model.onnx": (export.directory / file.file, file.sha256)},
                              warmup=warmup_data(config, warmup_values(export, graph)))
        else:
            alone = replace(options.runtime, row_shards=1, shard_limit=0)
            # no input ranges, as the native model it stands in for: the front model checked every request's rows,
            # and the rows that pad a chunk to the bucket are zeros (outside a student's guidance range)
            runtime = replace(manifest.graph_runtime(export, graph, alone, {n: options.runtime.precision}), ranges={})
            config = stand_in_config(export, runtime, options)
            model = ModelPlan(config, _graph_files(export, runtime), runs="graph",
                              warmup=warmup_data(config, warmup_values(export, graph)))
        models.append(model)
        bucket_models[n] = model.name
    front = manifest.graph_runtime(export, graph, options.runtime, models=bucket_models)
    models.append(ModelPlan(graph_config(export, front, options), runs="router"))
    if graph in UNETS and options.server_loop:
        models += [ModelPlan(loop_config(export, front, options, stream), runs="loop") for stream in (False, True)]
    return models


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


def _verify_graph_files(export: Export, graph: str) -> None:
    """Every graph file of one graph (all precisions) is the file the export recorded."""
    for files in export.graphs[graph].files.values():
        for file in files.values():
            _copy_checked(export.directory / file.file, None, file.sha256)


def _copy_checked(source: Path, destination: Path | None, sha256: str) -> None:
    """Copy a graph file (destination None: only check it), refusing one that is not the file the export recorded."""
    digest = hashlib.sha256()
    try:
        with open(source, "rb") as src, (open(destination, "wb") if destination else nullcontext()) as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                if dst is not None:
                    dst.write(block)
    except FileNotFoundError:
        raise RepositoryError(f"{source} is listed in metadata.json but missing; re-export") from None
    if digest.hexdigest() != sha256:
        raise RepositoryError(f"{source} does not match the sha256 in metadata.json (changed after export?); "
                              "re-export the checkpoint")


KEPT = ("README.md",)  # a repository's own notes survive a rebuild


def _check_replaceable(out: Path) -> None:
    foreign = out.is_dir() and any(p.name not in KEPT for p in out.iterdir()) and not (out / MARKER).is_file()
    if out.exists() and (not out.is_dir() or foreign):
        raise RepositoryError(f"refusing to replace {out}: it is not empty and was not written by "
                              f"`trident serve build` (no {MARKER}); choose another --out or remove it")


def build_repository(export_dirs: list[Path], out: Path, flavour: str = "embedded", *, log=None, **options
                     ) -> list[str]:
    """Write a Triton model repository for these export directories into `out` (replaced atomically).

    options: build_options' keywords. Returns the model names, sorted. See the module docstring for the two
    flavours, serving/precision.py for precision_choice ("fp32", a variant, or "auto": measured on this machine,
    recorded in trident_repository.json).
    """
    out = Path(out)
    checked = build_options(flavour, **options)
    exports = load_exports(export_dirs)
    measurements = measure(exports, checked, log)
    models = plan(exports, checked, measurements)
    _check_replaceable(out)
    with atomic_directory(out) as tmp:  # the old repository is removed only once the new one is complete
        for name in KEPT:
            if (out / name).is_file():
                shutil.copyfile(out / name, tmp / name)
        for model in models:
            version = tmp / model.name / VERSION
            version.mkdir(parents=True)
            (tmp / model.name / "config.pbtxt").write_text(to_pbtxt(model.config))
            for name, (source, sha256) in model.files.items():
                (version / name).parent.mkdir(parents=True, exist_ok=True)
                _copy_checked(source, version / name, sha256)
            for name, text in model.written.items():
                (version / name).write_text(text)
            for name, data in model.warmup.items():
                (tmp / model.name / "warmup").mkdir(exist_ok=True)
                (tmp / model.name / "warmup" / name).write_bytes(data)
            if model.runs is not None:
                shutil.copyfile(MODEL_FILES[model.runs], version / "model.py")
                for name, source in RUNTIME_FILES.items():
                    shutil.copyfile(source, version / name)
        names = sorted(model.name for model in models)
        container = {"bucket_backend": checked.bucket_backend} if checked.flavour == "container" else {}
        (tmp / MARKER).write_text(json.dumps({
            "flavour": checked.flavour, "models": names, "gpu": checked.gpu, "fp16": checked.fp16, **container,
            "exports": sorted(Path(d).name for d in export_dirs),
            # under auto the choice and its trials are per machine: they are in each model's MEASURED_FILE
            "precision": {graph: "auto" if checked.runtime.precision == "auto" else m.record
                          for graph, m in measurements.items()},
            "largest_request": largest_request(model.config for model in models)}, indent=2) + "\n")
    return names


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="trident serve build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", nargs="+", type=Path, default=None, metavar="DIR",
                   help="export directories (from `trident export`); default: export the checkpoints under "
                        "--checkpoints (cached in .trident/exports)")
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"),
                   help="used without --export: folder holding {diffusion,gan,vae}/model.safetensors")
    p.add_argument("--out", type=Path, default=Path("model_repository"), help="repository folder (replaced atomically)")
    p.add_argument("--flavour", choices=FLAVOURS, default="embedded")
    p.add_argument("--gpu", action="store_true", help="KIND_GPU instances (CUDA ONNX Runtime / TensorRT)")
    p.add_argument("--fp16", action="store_true", help="with --gpu: fp16 graphs (embedded) or TensorRT FP16 (container)")
    p.add_argument("--precision", default=None, choices=("fp32", *precision.CHOICES),
                   help="embedded, CPU: auto (the default): per bucket the fastest variant that this CPU runs "
                        "natively, that passed the quality gate and the parity gate, measured here "
                        "(serving/precision.py; recorded in each model's trident_measured.json, so config.pbtxt is "
                        "the same on every machine); or one runtime and precision for every bucket (fp32 = "
                        "onnxruntime-fp32). --gpu builds take fp32 (or --fp16) whatever this says")
    p.add_argument("--quality-gate", type=Path, default=DEFAULT_QUALITY_GATE,
                   help="with --precision auto: the quality gate's verdicts (`trident evaluate --precision-gate`); "
                        f"default {DEFAULT_QUALITY_GATE}")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="the dynamically batched models (embedded: each graph's; container: each front model): rows "
                        "per execution, default the largest bucket")
    p.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_MAX_QUEUE_DELAY_US,
                   help="how long the dynamic batcher waits to fill a bucket")
    p.add_argument("--bucket-backend", choices=BUCKET_BACKENDS, default="onnxruntime",
                   help="container: the per-bucket models' backend; python runs them in graph_model.py, so the "
                        "container layout serves in a Triton with the Python backend only (trident serve)")
    p.add_argument("--intra-op-threads", type=int, default=0,
                   help="embedded: ONNX Runtime threads of a whole batch (0: its default, one per physical core); "
                        "container: each per-bucket model's (the onnxruntime backend's intra_op_thread_count)")
    p.add_argument("--no-server-loop", "--no-sampler", dest="server_loop", action="store_false",
                   help="leave out the sampling loop models (diffusion_sampler, diffusion_sampler_stream)")
    p.add_argument("--row-shards", type=int, default=0,
                   help="embedded, CPU: split a batch of 2+ rows into this many parts run concurrently on "
                        "single-threaded sessions (0: one per core the server may use; 1: off)")
    p.add_argument("--shard-limit", type=_shard_limit, default="auto", metavar="auto|N",
                   help="embedded, CPU: the largest bucket a row shard runs (a shard of more rows runs several "
                        "chunks); auto (default): per graph the smallest bucket whose time per row is within 2%% of the "
                        "fastest, measured here; 0: every bucket")
    return p


def _shard_limit(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected auto or a bucket size >= 0, got {text!r}")
    return value


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    options = dict(flavour=args.flavour, gpu=args.gpu, fp16=args.fp16, max_batch_size=args.max_batch_size,
                   max_queue_delay_us=args.max_queue_delay_us, intra_op_threads=args.intra_op_threads,
                   row_shards=args.row_shards, server_loop=args.server_loop,
                   precision_choice=args.precision or default_precision(args.flavour, args.gpu),
                   quality_gate=args.quality_gate, log=print, bucket_backend=args.bucket_backend,
                   shard_limit=args.shard_limit)
    try:
        if args.export is None:  # export the checkpoints first (torch): through the one seam to export/
            toolchain.resolve("default_build")(args.checkpoints, args.out, **options)
        else:
            names = build_repository(args.export, args.out, **options)
            print(f"wrote {args.out}: {', '.join(names)}")
    except TridentError as e:  # RepositoryError; ExportError and CheckpointError when it exported
        print(f"trident serve build: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

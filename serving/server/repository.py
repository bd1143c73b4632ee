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
                    loop streaming its progress over gRPC (`--no-server-loop` leaves both out).
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
discovers everything from the server; the other parameters are what the model's own model.py reads (keys in
serving/server/runtime/protocol.py).

Configurations are built as plain dicts (the JSON form of Triton's ModelConfig, as pytriton's get_config does) and
serialised by `to_pbtxt`; the whole repository is written to a temporary folder next to `out` and swapped in only
when complete, so a failed build leaves the previous repository untouched.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path

from trident.serving import precision, toolchain
from trident.serving.card import ModelCard
from trident.serving.errors import ExportMetadataError, TridentError
from trident.serving.files import atomic_directory
from trident.serving.server.runtime import MODEL_FILES, RUNTIME_FILES
from trident.serving.server.request_limits import largest_request
from trident.serving.server.runtime import protocol as P
from trident.serving.spec import (GRAPHS_OF_KIND, SAMPLING_LOOP, SAMPLING_LOOP_STREAM, UNET, GraphSpec, TensorSpec,
                                  export_card, graph_spec_of, load_export_metadata, loop_spec)

__all__ = [
    "BUCKET_BACKENDS",
    "FLAVOURS",
    "RepositoryError",
    "build_repository",
    "container_config",
    "container_loop_config",
    "card_parameters",
    "front_config",
    "embedded_config",
    "input_ranges",
    "loop_config",
    "main",
    "plan_repository",
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


class RepositoryError(TridentError):
    """The repository cannot be built from these exports; nothing was written to the output directory."""


# ---------------------------------------------------------------------------------------------------------------------
# Model configurations as plain data
# ---------------------------------------------------------------------------------------------------------------------


def _triton_type(tensor: TensorSpec) -> str:
    return tensor.config_dtype


def _batched_io(tensor: TensorSpec) -> dict:
    """An input/output of a model with max_batch_size > 0: dims are per item, Triton adds the batch axis.

    Triton refuses empty dims, so a per-item scalar (timestep, class_label) is declared as [1] and reshaped to []:
    clients send shape (B, 1), the graph and model.py see (B,).
    """
    entry = {"name": tensor.name, "data_type": _triton_type(tensor), "dims": list(tensor.shape) or [1]}
    if not tensor.shape:
        entry["reshape"] = {"shape": []}
    return entry


def _static_io(tensor: TensorSpec, batch: int) -> dict:
    """An input/output of a model with max_batch_size 0: dims are the graph's full static shape, batch included."""
    return {"name": tensor.name, "data_type": _triton_type(tensor), "dims": list(tensor.batched(batch))}


def _graph(meta: dict, graph: str) -> tuple[GraphSpec, dict]:
    """The graph's spec (rebuilt from the card, and checked against the one the export recorded) and its entry."""
    try:
        entry = meta["graphs"][graph]
    except KeyError:
        raise RepositoryError(f"the export has no graph {graph!r}; it holds {sorted(meta.get('graphs', {}))}") from None
    spec = graph_spec_of(graph, _card(meta))
    if spec.to_dict() != entry["spec"]:
        raise RepositoryError(f"{graph}: the export recorded tensors {entry['spec']} but this trident's spec is "
                              f"{spec.to_dict()}; re-export the checkpoint with this version")
    return spec, entry


def _card(meta: dict) -> ModelCard:
    try:
        return export_card(meta)
    except ExportMetadataError as e:
        raise RepositoryError(str(e)) from None


def input_ranges(spec: GraphSpec, card: ModelCard) -> dict[str, dict]:
    """Valid values of the graph's label and timestep inputs: {name: {"low", "high", "hint"}}, valid is low <= x < high.

    The roles come from the spec: the only integer input of any graph is a class label, and the only per-item float
    scalar is a diffusion timestep.
    """
    ranges = {}
    for tensor in spec.inputs:
        if tensor.np_dtype.kind in "iu":
            classes = len(card.class_names)
            if card.null_class is not None:  # diffusion: the extra row of the class embedding is the null class
                null = card.null_class
                ranges[tensor.name] = {"low": 0, "high": null + 1,
                                       "hint": f"a class id 0..{classes - 1}, or {null} for the null class "
                                               "(unconditional)"}
            else:
                ranges[tensor.name] = {"low": 0, "high": classes, "hint": f"a class id 0..{classes - 1}"}
        elif tensor.shape == ():
            steps = card.num_train_timesteps
            ranges[tensor.name] = {"low": 0, "high": steps,
                                   "hint": f"a diffusion timestep of the {steps}-step training schedule, "
                                           "fractions allowed"}
    return ranges


def card_parameters(meta: dict, graph: str) -> dict[str, str]:
    """The model card a client reads from the model configuration, with the buckets of this model's graph."""
    card = _card(meta)
    _, entry = _graph(meta, graph)
    return {P.CARD: card.with_buckets({graph: entry["buckets"]}).to_json()}


def _parameters(values: dict[str, str]) -> dict[str, dict]:
    return {key: {"string_value": value} for key, value in values.items()}


def _warmup(name: str, batch_size: int, io: list[dict]) -> dict:
    # zero_data, not random_data: Triton's random data is random bytes, which for FP32 includes NaN/Inf and
    # huge values that model.py rightly rejects (a failed warmup fails the model load). Zero is a valid value
    # for every input (timestep 0, class 0).
    return {"name": name, "batch_size": batch_size,
            "inputs": {t["name"]: {"data_type": t["data_type"], "dims": t["dims"], "zero_data": True} for t in io}}


def _choice(graph: str, entry: dict, choice: dict | None, fp16: bool) -> dict[int, str]:
    """{bucket: variant} (serving/precision.py), checked against what the export holds. Default: every bucket on
    onnxruntime at fp32 (fp16 with --fp16)."""
    buckets = sorted(int(b) for b in entry["buckets"])
    default = "onnxruntime-fp16" if fp16 else precision.REFERENCE
    choice = {int(b): v for b, v in (choice or {b: default for b in buckets}).items()}
    if sorted(choice) != buckets:
        raise RepositoryError(f"{graph}: a precision choice for buckets {sorted(choice)}, the export has {buckets}")
    for variant in set(choice.values()):
        files = precision.VARIANTS[variant][0]
        if not entry.get(files):
            raise RepositoryError(f"{graph}: the export has no {files} graphs for {variant}; re-export "
                                  + ("with --fp16" if files == "fp16" else "without --no-int8"))
    return choice


MEASURED = "measured"  # a trident_shard_limit the build measured (P.MEASURED_FILE holds it)


def _bucket_runner_parameters(graph: str, entry: dict, choice: dict[int, str], *, gpu: bool, intra_op_threads: int,
                              row_shards: int, shard_limit: int | str = 0) -> dict[str, str]:
    """The parameters of a Python-backend model that runs a graph's bucket files with ort_runner.BucketRunner: per
    bucket the file and engine of its variant, and the threads, row shards (and their bucket limit) and execution
    provider its model.py reads."""
    file_of = {b: entry[precision.VARIANTS[v][0]][str(b)]["file"] for b, v in choice.items()}
    return {
        P.FILES: json.dumps({str(b): Path(file).name for b, file in file_of.items()}),
        P.ENGINES: json.dumps({str(b): precision.VARIANTS[v][1] for b, v in choice.items()}),
        P.PRECISION: json.dumps({str(b): v for b, v in choice.items()}),
        P.THREADS: str(int(intra_op_threads)),
        P.SHARDS: str(int(row_shards)),
        P.SHARD_LIMIT: shard_limit if shard_limit == MEASURED else str(int(shard_limit)),
        P.PROVIDER: "cuda" if gpu else "cpu",
    }


def _model_files(directory: Path, entry: dict, choice: dict[int, str]) -> dict[str, tuple[Path, str]]:
    """{file name in the version dir: (source, sha256)}: each bucket's file of its chosen variant."""
    files = {}
    for b, variant in choice.items():
        file = entry[precision.VARIANTS[variant][0]][str(b)]
        files[Path(file["file"]).name] = (directory / file["file"], file["sha256"])
    return files


def embedded_config(graph: str, meta: dict, *, max_batch_size: int | None = None,
                    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US, gpu: bool = False, fp16: bool = False,
                    intra_op_threads: int = 0, row_shards: int = 0, choice: dict | None = None,
                    shard_limit: int | str = 0) -> dict:
    """Python-backend model serving every bucket of one graph (see serving/server/runtime/graph_model.py).

    max_batch_size defaults to the largest bucket; a larger value lets one request (or one dynamic batch) span
    several bucket runs. choice: {bucket: variant} (default onnxruntime-fp32, or -fp16 with fp16). shard_limit: the
    largest bucket a row shard runs (0: the largest bucket), or "measured": read from the version directory's
    protocol.MEASURED_FILE, which plan_repository writes from its trial on the building machine.
    """
    spec, entry = _graph(meta, graph)
    choice = _choice(graph, entry, choice, fp16)
    buckets = sorted(choice)
    runtime = _bucket_runner_parameters(graph, entry, choice, gpu=gpu, intra_op_threads=intra_op_threads,
                                        row_shards=row_shards, shard_limit=shard_limit)
    max_batch_size = buckets[-1] if max_batch_size is None else int(max_batch_size)
    if max_batch_size < 1:
        raise RepositoryError(f"max_batch_size must be >= 1, got {max_batch_size}")
    inputs = [_batched_io(t) for t in spec.inputs]
    runtime[P.RANGES] = json.dumps(input_ranges(spec, _card(meta)))
    return {
        "name": graph,
        "backend": "python",
        "max_batch_size": max_batch_size,
        "input": inputs,
        "output": [_batched_io(t) for t in spec.outputs],
        "dynamic_batching": {"preferred_batch_size": [n for n in buckets if n <= max_batch_size],
                             "max_queue_delay_microseconds": int(max_queue_delay_us)},
        "instance_group": [{"kind": "KIND_GPU" if gpu else "KIND_CPU", "count": 1}],
        "model_warmup": [_warmup(f"zeros_b{n}", n, inputs) for n in buckets if n <= max_batch_size],
        "parameters": _parameters({**card_parameters(meta, graph), **runtime}),
    }


def loop_config(meta: dict, *, gpu: bool = False, fp16: bool = False, intra_op_threads: int = 0,
                row_shards: int = 0, max_images: int = DEFAULT_LOOP_MAX_IMAGES, choice: dict | None = None,
                stream: bool = False, shard_limit: int | str = 0) -> dict:
    """The sampling loop model (serving/server/runtime/loop_model.py) over the export's U-Net graphs: not batched by
    Triton (max_batch_size 0, one request = one batch of images), its own sessions of the U-Net (choice: as the
    U-Net model's). stream: the decoupled variant (diffusion_sampler_stream, gRPC streaming: progress, then the
    images), which makes its sessions on its first request."""
    unet, entry = _graph(meta, UNET)
    spec = loop_spec(_card(meta).image.shape, stream=stream)
    runtime = _bucket_runner_parameters(UNET, entry, _choice(UNET, entry, choice, fp16), gpu=gpu,
                                        intra_op_threads=intra_op_threads, row_shards=row_shards,
                                        shard_limit=shard_limit)
    if max_images < 1:
        raise RepositoryError(f"max_images must be >= 1, got {max_images}")
    runtime[P.UNET_IO] = json.dumps([t.name for t in (*unet.inputs, *unet.outputs)])
    runtime[P.MAX_IMAGES] = str(int(max_images))
    config = {
        "name": spec.name,
        "backend": "python",
        "max_batch_size": 0,
        "input": [{"name": t.name, "data_type": _triton_type(t), "dims": list(t.shape),
                   **({"optional": True} if t.optional else {})} for t in spec.inputs],
        "output": [{"name": t.name, "data_type": _triton_type(t), "dims": list(t.shape)} for t in spec.outputs],
        "instance_group": [{"kind": "KIND_GPU" if gpu else "KIND_CPU", "count": 1}],
        "parameters": _parameters({**card_parameters(meta, UNET), **runtime}),
    }
    if stream:
        config["model_transaction_policy"] = {"decoupled": True}
    return config


def container_config(graph: str, meta: dict, bucket: int, *, gpu: bool = False, fp16: bool = False,
                     intra_op_threads: int = 0) -> dict:
    """onnxruntime-backend model of one graph at one static batch size (the official Triton container): what the
    graph's front model (front_config) calls through BLS. It carries no model card: clients read the front's."""
    spec, entry = _graph(meta, graph)
    buckets = sorted(int(b) for b in entry["buckets"])
    if bucket not in buckets:
        raise RepositoryError(f"{graph}: no bucket {bucket} in the export (it has {buckets})")
    if fp16 and not gpu:
        raise RepositoryError("fp16 serving runs TensorRT on the GPU: pass gpu=True (--gpu) with fp16")
    inputs = [_static_io(t, bucket) for t in spec.inputs]
    config = {
        "name": container_model_name(graph, bucket),
        "backend": "onnxruntime",
        "max_batch_size": 0,
        "input": inputs,
        "output": [_static_io(t, bucket) for t in spec.outputs],
        "instance_group": [{"kind": "KIND_GPU" if gpu else "KIND_CPU", "count": 1}],
        "model_warmup": [_warmup("zeros", 1, inputs)],  # a non-batching model warms up with batch_size 1
        "parameters": _parameters({P.ORT_BACKEND_THREADS: str(int(intra_op_threads))}),
    }
    if fp16:
        # TensorRT builds the FP16 engine from the fp32 graph (its own casts beat the fp16 graph's edge casts).
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [
            {"name": "tensorrt", "parameters": {"precision_mode": "FP16"}}]}}
    return config


def container_model_name(graph: str, bucket: int) -> str:
    return f"{graph}_b{bucket}"


def stand_in_config(graph: str, meta: dict, bucket: int, *, gpu: bool = False, fp16: bool = False,
                    intra_op_threads: int = 0) -> dict:
    """A per-bucket model on the Python backend instead of the native onnxruntime one (`--bucket-backend python`):
    the same name, tensors and static shapes as container_config, run by graph_model.py over the bucket's one ONNX
    file. The container layout then serves in a Triton with only the Python backend (the one `trident serve` runs),
    which is how the tests serve it."""
    _, entry = _graph(meta, graph)
    config = container_config(graph, meta, bucket, gpu=gpu, intra_op_threads=intra_op_threads)
    runtime = _bucket_runner_parameters(graph, entry, _choice(graph, {**entry, "buckets": [bucket]}, None, fp16),
                                        gpu=gpu, intra_op_threads=intra_op_threads, row_shards=1)
    return {**config, "backend": "python", "parameters": _parameters(runtime)}


def front_config(graph: str, meta: dict, bucket_models: dict[int, str], *, max_batch_size: int | None = None,
                 max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US) -> dict:
    """The container flavour's front model of one graph (serving/server/runtime/router_model.py): the graph's own name
    and tensors as the embedded flavour serves them, max_batch_size > 0 and the dynamic batcher, so requests from
    different clients meet in one execution, which runs them on the per-bucket models through BLS.

    It advertises what a client reads (the model card with this graph's buckets, as every trident model does) and
    what its model.py reads (the valid input ranges; trident_bucket_models: {bucket: model name}). No model_warmup:
    a warm-up request would reach the per-bucket models through BLS before Triton has necessarily loaded them; they
    warm up on their own. The instance runs numpy only, so it sits on the CPU whatever the per-bucket models use.
    """
    spec, entry = _graph(meta, graph)
    buckets = sorted(int(b) for b in entry["buckets"])
    if sorted(int(b) for b in bucket_models) != buckets:
        raise RepositoryError(f"{graph}: per-bucket models {sorted(bucket_models)} do not match the buckets {buckets}")
    max_batch_size = buckets[-1] if max_batch_size is None else int(max_batch_size)
    if max_batch_size < 1:
        raise RepositoryError(f"max_batch_size must be >= 1, got {max_batch_size}")
    return {
        "name": graph,
        "backend": "python",
        "max_batch_size": max_batch_size,
        "input": [_batched_io(t) for t in spec.inputs],
        "output": [_batched_io(t) for t in spec.outputs],
        "dynamic_batching": {"preferred_batch_size": [n for n in buckets if n <= max_batch_size],
                             "max_queue_delay_microseconds": int(max_queue_delay_us)},
        "instance_group": [{"kind": "KIND_CPU", "count": 1}],
        "parameters": _parameters({**card_parameters(meta, graph),
                                   P.RANGES: json.dumps(input_ranges(spec, _card(meta))),
                                   P.BUCKET_MODELS: json.dumps({str(n): bucket_models[n] for n in buckets})}),
    }


def container_loop_config(meta: dict, bucket_models: dict[int, str], *,
                          max_images: int = DEFAULT_LOOP_MAX_IMAGES, stream: bool = False) -> dict:
    """The sampling loop model of the container flavour: loop_model.py with the U-Net's per-bucket models (BLS)
    instead of its own ONNX Runtime sessions, so Triton's Python needs numpy only. On the CPU: the U-Net runs in
    the per-bucket models, wherever they are. stream: the streaming one (no sessions of its own either)."""
    config = loop_config(meta, max_images=max_images, stream=stream)
    keep = {P.CARD, P.UNET_IO, P.MAX_IMAGES}
    return {**config, "instance_group": [{"kind": "KIND_CPU", "count": 1}], "parameters": {
        **{key: value for key, value in config["parameters"].items() if key in keep},
        P.BUCKET_MODELS: {"string_value": json.dumps({str(n): name for n, name in sorted(bucket_models.items())})}}}


# ---------------------------------------------------------------------------------------------------------------------
# config.pbtxt text
# ---------------------------------------------------------------------------------------------------------------------

ENUM_FIELDS = {"data_type", "kind", "format"}  # written bare (TYPE_FP32), not quoted
MAP_FIELDS = {"parameters", "inputs"}  # map<string, ...>: written as repeated { key: ... value ... } entries


def to_pbtxt(config: dict) -> str:
    """Protobuf text format of a ModelConfig given as its JSON-style dict."""
    return "".join(_message_lines(config, 0))


def _scalar(key: str, value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if key in ENUM_FIELDS:
            return value
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    raise TypeError(f"cannot write {key}={value!r} ({type(value).__name__}) to config.pbtxt")


def _message_lines(message: dict, depth: int):
    pad = "  " * depth
    for key, value in message.items():
        if key in MAP_FIELDS:
            for map_key, map_value in value.items():
                yield f"{pad}{key} {{\n{pad}  key: {_scalar('key', map_key)}\n"
                if isinstance(map_value, dict):
                    yield f"{pad}  value {{\n"
                    yield from _message_lines(map_value, depth + 2)
                    yield f"{pad}  }}\n"
                else:
                    yield f"{pad}  value: {_scalar('value', map_value)}\n"
                yield f"{pad}}}\n"
        elif isinstance(value, dict):
            yield f"{pad}{key} {{\n"
            yield from _message_lines(value, depth + 1)
            yield f"{pad}}}\n"
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            yield f"{pad}{key} [\n"
            for i, item in enumerate(value):
                yield f"{pad}  {{\n"
                yield from _message_lines(item, depth + 2)
                yield f"{pad}  }}{',' if i < len(value) - 1 else ''}\n"
            yield f"{pad}]\n"
        elif isinstance(value, list):
            items = ", ".join(_scalar(key, v) for v in value)
            yield f"{pad}{key}: [ {items} ]\n" if items else f"{pad}{key}: [ ]\n"
        else:
            yield f"{pad}{key}: {_scalar(key, value)}\n"


# ---------------------------------------------------------------------------------------------------------------------
# Planning (reads metadata.json only) and writing
# ---------------------------------------------------------------------------------------------------------------------


def _load_meta(directory: Path) -> dict:
    """metadata.json of an export (spec.load_export_metadata: no torch, no onnx), as a RepositoryError if bad."""
    try:
        return load_export_metadata(directory)
    except ExportMetadataError as e:
        raise RepositoryError(str(e)) from None


def plan_repository(export_dirs: list[Path], flavour: str = "embedded", *, gpu: bool = False, fp16: bool = False,
                    max_batch_size: int | None = None, max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
                    intra_op_threads: int = 0, row_shards: int = 0, server_loop: bool = True,
                    precision_choice: str = "fp32", quality_gate: Path | None = DEFAULT_QUALITY_GATE, log=None,
                    records: dict | None = None, bucket_backend: str = "onnxruntime", shard_limit: int | str = "auto"
                    ) -> list[tuple[dict, dict[str, tuple[Path, str]]]]:
    """[(config, {file name in the version dir: (source path, sha256), or the bytes of a file the build writes})] for
    every model; writes nothing.

    precision_choice: "fp32" (onnxruntime-fp32, today's default), a variant of serving/precision.py for every bucket,
    or "auto": measured here per graph and bucket (the record of each graph's trial goes into `records`, and log gets
    one line per graph naming the variants not offered and why). quality_gate: the gate's verdicts file (None: no
    gate, so auto offers no reduced precision).
    shard_limit: embedded, CPU: the largest bucket a row shard runs; "auto" measures it here per graph
    (precision.shard_trial; the limit and the trial go into each model's version directory as P.MEASURED_FILE),
    0 lets shards run every bucket."""
    if flavour not in FLAVOURS:
        raise RepositoryError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    if bucket_backend not in BUCKET_BACKENDS:
        raise RepositoryError(f"bucket_backend must be one of {BUCKET_BACKENDS}, got {bucket_backend!r}")
    if bucket_backend != "onnxruntime" and flavour != "container":
        raise RepositoryError("bucket_backend (--bucket-backend) is an option of the container flavour")
    if fp16 and not gpu:
        raise RepositoryError("fp16 graphs are for the GPU path: pass --gpu with --fp16")
    precision_choice = {"fp32": precision.REFERENCE, "fp16": "onnxruntime-fp16"}.get(precision_choice,
                                                                                       precision_choice)
    if fp16:
        precision_choice = "onnxruntime-fp16"
    if precision_choice == "onnxruntime-fp16" and not gpu:
        raise RepositoryError("fp16 graphs are for the GPU path: pass --gpu with --fp16 (--precision fp16)")
    if precision_choice not in precision.CHOICES:
        raise RepositoryError(f"precision must be fp32, fp16 or one of {precision.CHOICES}, got {precision_choice!r}")
    if flavour == "container" and precision_choice not in (precision.REFERENCE, "onnxruntime-fp16"):
        raise RepositoryError("--precision chooses the runtimes of the embedded flavour; the container flavour runs "
                              "Triton's native backends (--gpu --fp16 for TensorRT FP16)")
    if gpu and precision_choice not in (precision.REFERENCE, "onnxruntime-fp16"):
        raise RepositoryError(f"--precision {precision_choice} runs on the CPU; with --gpu use fp32 or --fp16")
    try:
        precision.check_shard_limit(shard_limit)
    except ValueError as e:
        raise RepositoryError(str(e)) from None
    if intra_op_threads < 0 or row_shards < 0:
        raise RepositoryError(f"intra_op_threads and row_shards must be >= 0 (0: automatic), got {intra_op_threads} "
                              f"and {row_shards}")
    if not export_dirs:
        raise RepositoryError("no export directories given; run `trident export CHECKPOINT --out DIR` first")
    plan, source_of = [], {}
    for directory in map(Path, export_dirs):
        meta = _load_meta(directory)
        for graph in GRAPHS_OF_KIND[_card(meta).kind]:
            if graph in source_of:
                raise RepositoryError(f"graph {graph} is in both {source_of[graph]} and {directory}; "
                                      "give one export per model kind")
            source_of[graph] = directory
            _, entry = _graph(meta, graph)
            if flavour == "embedded":
                _verify_graph_files(directory, entry)  # before the trials below load them
                try:
                    record = precision.choose(directory, meta, graph, precision_choice, gate_file=quality_gate,
                                              threads=intra_op_threads, row_shards=row_shards,
                                              log=(lambda m, g=graph: log(f"{g} {m}")) if log else None)
                except ValueError as e:
                    raise RepositoryError(str(e)) from None
                if records is not None:
                    records[graph] = record
                line = precision.not_offered_line(graph, record) if precision_choice == "auto" else None
                if line and log:
                    log(line)
                choice = record["choice"]
                files = _model_files(directory, entry, _choice(graph, entry, choice, fp16))
                limit = shard_limit
                if limit == "auto" and gpu:
                    limit = 0  # one call at a time on the device: no row shards to limit
                elif limit == "auto":  # measured over the buckets that run on onnxruntime (the ones row shards run)
                    trial = precision.measure_shard_limit(
                        directory, entry, choice, threads=intra_op_threads, row_shards=row_shards,
                        log=(lambda m, g=graph: log(f"{g} {m}")) if log else None)
                    # per machine: beside the graph files, not in config.pbtxt (a committed repository stays the same
                    # wherever it is rebuilt)
                    files[P.MEASURED_FILE] = (json.dumps({"shard_limit": trial["limit"] if trial else 0,
                                                          "shard_trial": trial}, indent=2) + "\n").encode()
                    limit = MEASURED
                config = embedded_config(graph, meta, max_batch_size=max_batch_size,
                                         max_queue_delay_us=max_queue_delay_us, gpu=gpu, fp16=fp16,
                                         intra_op_threads=intra_op_threads, row_shards=row_shards, choice=choice,
                                         shard_limit=limit)
                plan.append((config, files))
                if graph == UNET and server_loop:  # the sampling loop models run the same graph files
                    for stream in (False, True):
                        plan.append((loop_config(meta, gpu=gpu, fp16=fp16, intra_op_threads=intra_op_threads,
                                                 row_shards=row_shards, choice=choice, stream=stream,
                                                 shard_limit=limit), dict(files)))
            else:
                plan += _plan_container(graph, meta, directory, gpu=gpu, fp16=fp16, max_batch_size=max_batch_size,
                                        max_queue_delay_us=max_queue_delay_us, intra_op_threads=intra_op_threads,
                                        server_loop=server_loop, bucket_backend=bucket_backend)
    return plan


def _plan_container(graph: str, meta: dict, directory: Path, *, gpu: bool, fp16: bool, max_batch_size: int | None,
                    max_queue_delay_us: int, intra_op_threads: int, server_loop: bool, bucket_backend: str
                    ) -> list[tuple[dict, dict[str, tuple[Path, str]]]]:
    """One graph in the container flavour: a model per bucket, the front model over them, and (U-Net) the loop."""
    _, entry = _graph(meta, graph)
    plan, bucket_models = [], {}
    for n in (int(b) for b in entry["buckets"]):
        if bucket_backend == "onnxruntime":
            file = entry["fp32"][str(n)]  # TensorRT FP16 starts from the fp32 graph (see container_config)
            config = container_config(graph, meta, n, gpu=gpu, fp16=fp16, intra_op_threads=intra_op_threads)
            files = {"model.onnx": (directory / file["file"], file["sha256"])}
        else:
            file = entry["fp16" if fp16 else "fp32"][str(n)]
            config = stand_in_config(graph, meta, n, gpu=gpu, fp16=fp16, intra_op_threads=intra_op_threads)
            files = {Path(file["file"]).name: (directory / file["file"], file["sha256"])}
        plan.append((config, files))
        bucket_models[n] = config["name"]
    plan.append((front_config(graph, meta, bucket_models, max_batch_size=max_batch_size,
                              max_queue_delay_us=max_queue_delay_us), {}))
    if graph == UNET and server_loop:
        plan += [(container_loop_config(meta, bucket_models, stream=stream), {}) for stream in (False, True)]
    return plan


def _verify_graph_files(directory: Path, entry: dict) -> None:
    """Every graph file of one graph's entry (all precisions) is the file the export recorded."""
    for files in (entry.get(p) or {} for p in ("fp32", "fp16", "int8")):
        for file in files.values():
            _copy_checked(directory / file["file"], None, file["sha256"])


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


def _model_file(config: dict) -> Path:
    """The runtime file a Python-backend model runs as its model.py."""
    if config["name"] in (SAMPLING_LOOP, SAMPLING_LOOP_STREAM):
        return MODEL_FILES["loop"]
    return MODEL_FILES["router" if P.BUCKET_MODELS in config["parameters"] else "graph"]


def _check_replaceable(out: Path) -> None:
    foreign = out.is_dir() and any(p.name not in KEPT for p in out.iterdir()) and not (out / MARKER).is_file()
    if out.exists() and (not out.is_dir() or foreign):
        raise RepositoryError(f"refusing to replace {out}: it is not empty and was not written by "
                              f"`trident serve build` (no {MARKER}); choose another --out or remove it")


def build_repository(export_dirs: list[Path], out: Path, flavour: str = "embedded", *, gpu: bool = False,
                     fp16: bool = False, max_batch_size: int | None = None,
                     max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US, intra_op_threads: int = 0,
                     row_shards: int = 0, server_loop: bool = True, precision_choice: str = "fp32",
                     quality_gate: Path | None = DEFAULT_QUALITY_GATE, log=None, bucket_backend: str = "onnxruntime",
                     shard_limit: int | str = "auto") -> list[str]:
    """Write a Triton model repository for these export directories into `out` (replaced atomically).

    Returns the model names, sorted. See the module docstring for the two flavours, serving/precision.py for
    precision_choice ("fp32", a variant, or "auto": measured on this machine, recorded in trident_repository.json).
    """
    out = Path(out)
    records = {}
    plan = plan_repository(export_dirs, flavour, gpu=gpu, fp16=fp16, max_batch_size=max_batch_size,
                           max_queue_delay_us=max_queue_delay_us, intra_op_threads=intra_op_threads,
                           row_shards=row_shards, server_loop=server_loop, precision_choice=precision_choice,
                           quality_gate=quality_gate, log=log, records=records, bucket_backend=bucket_backend,
                           shard_limit=shard_limit)
    _check_replaceable(out)
    with atomic_directory(out) as tmp:  # the old repository is removed only once the new one is complete
        for name in KEPT:
            if (out / name).is_file():
                shutil.copyfile(out / name, tmp / name)
        for config, files in plan:
            version = tmp / config["name"] / VERSION
            version.mkdir(parents=True)
            (tmp / config["name"] / "config.pbtxt").write_text(to_pbtxt(config))
            for name, item in files.items():
                if isinstance(item, bytes):  # written by the build itself (P.MEASURED_FILE)
                    (version / name).write_bytes(item)
                else:
                    _copy_checked(item[0], version / name, item[1])
            if config["backend"] == "python":
                shutil.copyfile(_model_file(config), version / "model.py")
                for name, source in RUNTIME_FILES.items():
                    shutil.copyfile(source, version / name)
        names = sorted(config["name"] for config, _ in plan)
        container = {"bucket_backend": bucket_backend} if flavour == "container" else {}
        (tmp / MARKER).write_text(json.dumps({
            "flavour": flavour, "models": names, "gpu": gpu, "fp16": fp16, **container,
            "exports": sorted(Path(d).name for d in export_dirs), "precision": records,
            "largest_request": largest_request(config for config, _ in plan)}, indent=2) + "\n")
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
    p.add_argument("--precision", default="fp32", choices=("fp32", *precision.CHOICES),
                   help="embedded, CPU: the runtime and precision of every bucket (fp32 = onnxruntime-fp32, today's "
                        "default), or auto: per bucket the fastest variant that this CPU runs natively, that passed "
                        "the quality gate and the parity gate, measured here (serving/precision.py)")
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
                   row_shards=args.row_shards, server_loop=args.server_loop, precision_choice=args.precision,
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

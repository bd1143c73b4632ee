"""Export directories -> a Triton model repository.

`trident serve build --export DIR [DIR ...] --out model_repository [--flavour embedded|container] [--gpu] [--fp16]`

Two flavours of the same exported graphs:

embedded (default)  For the tritonserver bundled with nvidia-pytriton, which has the Python backend only. One model
                    per graph (diffusion_unet, gan_generator, vae_decoder, vae_encoder): `backend: "python"`,
                    dynamic batching up to the largest bucket, and `1/model.py` = a copy of serving/triton_model.py
                    that runs the static-batch ONNX files (copied next to it) in ONNX Runtime. With a diffusion
                    export, also `diffusion_sampler`: the whole sampling loop on the server (serving/
                    triton_sampler.py), one request per batch of images (`--no-sampler` leaves it out).
                    Self-contained: the repository also runs in a Triton container where trident is not installed.
container           For the official Triton container's native onnxruntime backend. One model per (graph, bucket),
                    e.g. diffusion_unet_b8, `max_batch_size: 0` with the full static shape, `1/model.onnx`;
                    `--gpu --fp16` adds the TensorRT FP16 accelerator.

Every model's `parameters` carry the sampling metadata from the export, so a client discovers everything from the
server: `trident_metadata` holds the JSON of the client metadata (kind, class names, image shape and value range,
schedule, prediction type, null class, latent size, class centroids, graph spec, buckets), and a few flat
`trident_*` keys repeat the simple fields.

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
from pathlib import Path

from trident.serving.files import atomic_directory, file_sha256
from trident.serving.spec import (GRAPHS_OF_KIND, SAMPLER, UNET, ExportMetadataError, GraphSpec, TensorSpec,
                                  client_view, graph_spec_from_meta, sampler_spec,
                                  load_export_metadata)

__all__ = [
    "FLAVOURS",
    "RepositoryError",
    "build_repository",
    "container_config",
    "default_build",
    "embedded_config",
    "ensure_export",
    "input_ranges",
    "main",
    "metadata_parameters",
    "plan_repository",
    "sampler_config",
    "to_pbtxt",
]

FLAVOURS = ("embedded", "container")
MODEL_PY = Path(__file__).with_name("triton_model.py")
RUNNER_PY = Path(__file__).with_name("ort_runner.py")  # imported by model.py as its sibling `ort_runner`
SAMPLER_PY = Path(__file__).with_name("triton_sampler.py")  # model.py of the server-side sampling loop
SAMPLING_PY = Path(__file__).with_name("sampling.py")  # imported by the sampler's model.py as `sampling`
DEFAULT_SAMPLER_MAX_IMAGES = 1024  # images per request of the server-side sampling loop
VERSION = "1"  # the one model version directory written
MARKER = "trident_repository.json"  # written at the root; Triton only looks at sub-directories
METADATA_KEY = "trident_metadata"
DEFAULT_MAX_QUEUE_DELAY_US = 500
# Parameter keys read by triton_model.py (the copy in <model>/1/model.py cannot import this module).
P_FILES = "trident_onnx_files"
P_RANGES = "trident_input_ranges"
P_THREADS = "intra_op_num_threads"
P_SHARDS = "row_shards"
P_MAX_IMAGES = "trident_max_images"
P_UNET_IO = "trident_unet_io"
P_PROVIDER = "execution_provider"
ORT_BACKEND_THREADS = "intra_op_thread_count"  # the onnxruntime backend's own parameter


class RepositoryError(RuntimeError):
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
    """The graph's spec (rebuilt from the metadata, and checked against the one the export recorded) and its entry."""
    try:
        entry = meta["graphs"][graph]
    except KeyError:
        raise RepositoryError(f"the export has no graph {graph!r}; it holds {sorted(meta.get('graphs', {}))}") from None
    spec = graph_spec_from_meta(graph, meta)
    if spec.to_dict() != entry["spec"]:
        raise RepositoryError(f"{graph}: the export recorded tensors {entry['spec']} but this trident's spec is "
                              f"{spec.to_dict()}; re-export the checkpoint with this version")
    return spec, entry


def input_ranges(spec: GraphSpec, meta: dict) -> dict[str, dict]:
    """Valid values of the graph's label and timestep inputs: {name: {"low", "high", "hint"}}, valid is low <= x < high.

    The roles come from the spec: the only integer input of any graph is a class label, and the only per-item float
    scalar is a diffusion timestep.
    """
    ranges = {}
    for tensor in spec.inputs:
        if tensor.np_dtype.kind in "iu":
            classes = len(meta["class_names"])
            if meta.get("null_class") is not None:  # diffusion: the extra row of the class embedding is the null class
                null = int(meta["null_class"])
                ranges[tensor.name] = {"low": 0, "high": null + 1,
                                       "hint": f"a class id 0..{classes - 1}, or {null} for the null class "
                                               "(unconditional)"}
            else:
                ranges[tensor.name] = {"low": 0, "high": classes, "hint": f"a class id 0..{classes - 1}"}
        elif tensor.shape == ():
            steps = int(meta["schedule"]["num_train_timesteps"])
            ranges[tensor.name] = {"low": 0, "high": steps,
                                   "hint": f"a diffusion timestep of the {steps}-step training schedule, "
                                           "fractions allowed"}
    return ranges


def metadata_parameters(graph: str, meta: dict, buckets: list[int], /, **serving: str | int | dict) -> dict[str, str]:
    """The sampling metadata a client reads from the model configuration, as string parameters.

    `trident_metadata` is the export's metadata.json cut down to what a client needs and to this graph, in the same
    shape (client keys + graphs{graph: {spec, buckets}} + source_checkpoint), so one parser reads both.
    `serving` (flavour, precision, bucket, ...) becomes flat `trident_<key>` parameters.
    """
    spec, _ = _graph(meta, graph)
    client = client_view(meta)
    client["graphs"] = {graph: {"spec": spec.to_dict(), "buckets": list(buckets)}}
    if "source_checkpoint" in meta:
        client["source_checkpoint"] = meta["source_checkpoint"]
    image = meta["image"]
    flat = {
        "trident_kind": meta["kind"],
        "trident_graph": graph,
        "trident_buckets": json.dumps(list(buckets)),
        "trident_image_shape": json.dumps([image["channels"], image["height"], image["width"]]),
        "trident_value_range": json.dumps(image["value_range"]),
        "trident_class_names": json.dumps(meta["class_names"]),
    }
    if meta.get("null_class") is not None:
        flat["trident_null_class"] = str(meta["null_class"])
    if "schedule" in meta:
        flat["trident_num_train_timesteps"] = str(meta["schedule"]["num_train_timesteps"])
    if "prediction_type" in meta:
        flat["trident_prediction_type"] = meta["prediction_type"]
    if meta.get("latent_dim") is not None:
        flat["trident_latent_dim"] = str(meta["latent_dim"])
    for key, value in serving.items():
        flat[f"trident_{key}"] = value if isinstance(value, str) else json.dumps(value)
    return {METADATA_KEY: json.dumps(client), **flat}


def _parameters(values: dict[str, str]) -> dict[str, dict]:
    return {key: {"string_value": value} for key, value in values.items()}


def _warmup(name: str, batch_size: int, io: list[dict]) -> dict:
    # zero_data, not random_data: Triton's random data is random bytes, which for FP32 includes NaN/Inf and
    # huge values that model.py rightly rejects (a failed warmup fails the model load). Zero is a valid value
    # for every input (timestep 0, class 0).
    return {"name": name, "batch_size": batch_size,
            "inputs": {t["name"]: {"data_type": t["data_type"], "dims": t["dims"], "zero_data": True} for t in io}}


def _bucket_runner_parameters(graph: str, entry: dict, *, gpu: bool, fp16: bool, intra_op_threads: int,
                              row_shards: int) -> tuple[list[int], str, dict[str, str]]:
    """(buckets, precision, parameters) of a Python-backend model that runs a graph's bucket files with
    ort_runner.BucketRunner: the files, threads, row shards and execution provider its model.py reads."""
    buckets = sorted(int(b) for b in entry["buckets"])
    precision = "fp16" if fp16 else "fp32"
    if fp16 and not entry.get("fp16"):
        raise RepositoryError(f"{graph}: the export has no fp16 graphs; export with --fp16")
    return buckets, precision, {
        P_FILES: json.dumps({str(n): Path(entry[precision][str(n)]["file"]).name for n in buckets}),
        P_THREADS: str(int(intra_op_threads)),
        P_SHARDS: str(int(row_shards)),
        P_PROVIDER: "cuda" if gpu else "cpu",
    }


def embedded_config(graph: str, meta: dict, *, max_batch_size: int | None = None,
                    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US, gpu: bool = False, fp16: bool = False,
                    intra_op_threads: int = 0, row_shards: int = 0) -> dict:
    """Python-backend model serving every bucket of one graph (see serving/triton_model.py).

    max_batch_size defaults to the largest bucket; a larger value lets one request (or one dynamic batch) span
    several bucket runs.
    """
    spec, entry = _graph(meta, graph)
    buckets, precision, runtime = _bucket_runner_parameters(graph, entry, gpu=gpu, fp16=fp16,
                                                            intra_op_threads=intra_op_threads, row_shards=row_shards)
    max_batch_size = buckets[-1] if max_batch_size is None else int(max_batch_size)
    if max_batch_size < 1:
        raise RepositoryError(f"max_batch_size must be >= 1, got {max_batch_size}")
    inputs = [_batched_io(t) for t in spec.inputs]
    runtime[P_RANGES] = json.dumps(input_ranges(spec, meta))
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
        "parameters": _parameters({**metadata_parameters(graph, meta, buckets, flavour="embedded",
                                                         precision=precision), **runtime}),
    }


def sampler_config(meta: dict, *, gpu: bool = False, fp16: bool = False, intra_op_threads: int = 0,
                   row_shards: int = 0, max_images: int = DEFAULT_SAMPLER_MAX_IMAGES) -> dict:
    """The server-side sampling loop (serving/triton_sampler.py) over the export's U-Net graphs: not batched by
    Triton (max_batch_size 0, one request = one batch of images), its own ONNX Runtime sessions of the U-Net."""
    unet, entry = _graph(meta, UNET)
    spec = sampler_spec((meta["image"]["channels"], meta["image"]["height"], meta["image"]["width"]))
    buckets, precision, runtime = _bucket_runner_parameters(UNET, entry, gpu=gpu, fp16=fp16,
                                                            intra_op_threads=intra_op_threads, row_shards=row_shards)
    if max_images < 1:
        raise RepositoryError(f"max_images must be >= 1, got {max_images}")
    runtime[P_UNET_IO] = json.dumps([t.name for t in (*unet.inputs, *unet.outputs)])
    runtime[P_MAX_IMAGES] = str(int(max_images))
    return {
        "name": SAMPLER,
        "backend": "python",
        "max_batch_size": 0,
        "input": [{"name": t.name, "data_type": _triton_type(t), "dims": list(t.shape),
                   **({"optional": True} if t.optional else {})} for t in spec.inputs],
        "output": [{"name": t.name, "data_type": _triton_type(t), "dims": list(t.shape)} for t in spec.outputs],
        "instance_group": [{"kind": "KIND_GPU" if gpu else "KIND_CPU", "count": 1}],
        "parameters": _parameters({**metadata_parameters(UNET, meta, buckets, flavour="embedded", precision=precision,
                                                         graph=SAMPLER, loop="server"), **runtime}),
    }


def container_config(graph: str, meta: dict, bucket: int, *, gpu: bool = False, fp16: bool = False,
                     intra_op_threads: int = 0) -> dict:
    """onnxruntime-backend model of one graph at one static batch size (the official Triton container)."""
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
        "parameters": _parameters({
            **metadata_parameters(graph, meta, buckets, flavour="container", bucket=bucket,
                                  bucket_models={str(n): container_model_name(graph, n) for n in buckets},
                                  precision="fp16" if fp16 else "fp32"),
            ORT_BACKEND_THREADS: str(int(intra_op_threads)),
        }),
    }
    if fp16:
        # TensorRT builds the FP16 engine from the fp32 graph (its own casts beat the fp16 graph's edge casts).
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [
            {"name": "tensorrt", "parameters": {"precision_mode": "FP16"}}]}}
    return config


def container_model_name(graph: str, bucket: int) -> str:
    return f"{graph}_b{bucket}"


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
                    intra_op_threads: int = 0, row_shards: int = 0, sampler: bool = True
                    ) -> list[tuple[dict, dict[str, tuple[Path, str]]]]:
    """[(config, {file name in the version dir: (source path, sha256)})] for every model; writes nothing."""
    if flavour not in FLAVOURS:
        raise RepositoryError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    if fp16 and not gpu:
        raise RepositoryError("fp16 graphs are for the GPU path: pass --gpu with --fp16")
    if intra_op_threads < 0 or row_shards < 0:
        raise RepositoryError(f"intra_op_threads and row_shards must be >= 0 (0: automatic), got {intra_op_threads} "
                              f"and {row_shards}")
    if not export_dirs:
        raise RepositoryError("no export directories given; run `trident export CHECKPOINT --out DIR` first")
    plan, source_of = [], {}
    for directory in map(Path, export_dirs):
        meta = _load_meta(directory)
        for graph in GRAPHS_OF_KIND[meta["kind"]]:
            if graph in source_of:
                raise RepositoryError(f"graph {graph} is in both {source_of[graph]} and {directory}; "
                                      "give one export per model kind")
            source_of[graph] = directory
            _, entry = _graph(meta, graph)
            if flavour == "embedded":
                precision = "fp16" if fp16 else "fp32"
                config = embedded_config(graph, meta, max_batch_size=max_batch_size,
                                         max_queue_delay_us=max_queue_delay_us, gpu=gpu, fp16=fp16,
                                         intra_op_threads=intra_op_threads, row_shards=row_shards)
                files = {}
                for n in entry["buckets"]:
                    file = entry[precision][str(n)]
                    files[Path(file["file"]).name] = (directory / file["file"], file["sha256"])
                plan.append((config, files))
                if graph == UNET and sampler:  # the server-side loop runs the same graph files
                    plan.append((sampler_config(meta, gpu=gpu, fp16=fp16, intra_op_threads=intra_op_threads,
                                                row_shards=row_shards), dict(files)))
            else:
                for n in entry["buckets"]:
                    # TensorRT FP16 starts from the fp32 graph (see container_config).
                    file = entry["fp32"][str(n)]
                    config = container_config(graph, meta, int(n), gpu=gpu, fp16=fp16,
                                              intra_op_threads=intra_op_threads)
                    plan.append((config, {"model.onnx": (directory / file["file"], file["sha256"])}))
    return plan


def _copy_checked(source: Path, destination: Path, sha256: str) -> None:
    """Copy a graph file, refusing one that is not the file the export recorded."""
    digest = hashlib.sha256()
    try:
        with open(source, "rb") as src, open(destination, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
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


def build_repository(export_dirs: list[Path], out: Path, flavour: str = "embedded", *, gpu: bool = False,
                     fp16: bool = False, max_batch_size: int | None = None,
                     max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US, intra_op_threads: int = 0,
                     row_shards: int = 0, sampler: bool = True) -> list[str]:
    """Write a Triton model repository for these export directories into `out` (replaced atomically).

    Returns the model names, sorted. See the module docstring for the two flavours.
    """
    out = Path(out)
    plan = plan_repository(export_dirs, flavour, gpu=gpu, fp16=fp16, max_batch_size=max_batch_size,
                           max_queue_delay_us=max_queue_delay_us, intra_op_threads=intra_op_threads,
                           row_shards=row_shards, sampler=sampler)
    _check_replaceable(out)
    with atomic_directory(out) as tmp:  # the old repository is removed only once the new one is complete
        for name in KEPT:
            if (out / name).is_file():
                shutil.copyfile(out / name, tmp / name)
        for config, files in plan:
            version = tmp / config["name"] / VERSION
            version.mkdir(parents=True)
            (tmp / config["name"] / "config.pbtxt").write_text(to_pbtxt(config))
            for name, (source, sha256) in files.items():
                _copy_checked(source, version / name, sha256)
            if config["backend"] == "python":
                shutil.copyfile(SAMPLER_PY if config["name"] == SAMPLER else MODEL_PY, version / "model.py")
                shutil.copyfile(RUNNER_PY, version / "ort_runner.py")
                if config["name"] == SAMPLER:
                    shutil.copyfile(SAMPLING_PY, version / "sampling.py")
        names = sorted(config["name"] for config, _ in plan)
        (tmp / MARKER).write_text(json.dumps({
            "flavour": flavour, "models": names, "gpu": gpu, "fp16": fp16,
            "exports": sorted(Path(d).name for d in export_dirs)}, indent=2) + "\n")
    return names


# ---------------------------------------------------------------------------------------------------------------------
# Shipped checkpoints -> repository (the demo's one call)
# ---------------------------------------------------------------------------------------------------------------------


def ensure_export(checkpoint: Path, exports_root: Path, kind: str, buckets=None, fp16: bool = False,
                  log=print) -> Path:
    """The export directory of a checkpoint, exporting it only when no export of these exact bytes is cached.

    Cached as <exports_root>/<kind>-<sha256[:12]>[-b<buckets>][-fp16]/.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise RepositoryError(f"{checkpoint} not found: train it with `trident train {kind} --out "
                              f"{checkpoint.parent}` or put the shipped checkpoint there")
    digest = file_sha256(checkpoint)
    name = f"{kind}-{digest[:12]}"
    if buckets is not None:
        name += "-b" + "_".join(str(int(b)) for b in sorted(set(buckets)))
    if fp16:
        name += "-fp16"
    directory = Path(exports_root) / name
    if (directory / "metadata.json").is_file():
        meta = _load_meta(directory)
        if meta.get("source_checkpoint", {}).get("sha256") == digest:
            return directory
    from trident.export.onnx_export import export_checkpoint  # torch: only when there is something to export

    log(f"exporting {checkpoint} -> {directory}")
    export_checkpoint(checkpoint, directory, buckets=None if buckets is None else list(buckets), fp16=fp16, log=log)
    return directory


def default_build(checkpoints_root: Path = Path("checkpoints"), out: Path = Path("model_repository"),
                  work: Path = Path(".trident"), *, kinds: tuple[str, ...] = ("diffusion", "gan", "vae"),
                  buckets=None, log=print, **build_options) -> list[str]:
    """Export <checkpoints_root>/<kind>/model.safetensors for each kind (cached under <work>/exports) and build `out`.

    build_options go to build_repository (flavour, gpu, fp16, max_batch_size, max_queue_delay_us, intra_op_threads,
    row_shards, sampler).
    """
    fp16 = bool(build_options.get("fp16", False))
    dirs = [ensure_export(Path(checkpoints_root) / kind / "model.safetensors", Path(work) / "exports", kind,
                          buckets=buckets, fp16=fp16, log=log) for kind in kinds]
    names = build_repository(dirs, out, **build_options)
    log(f"wrote {out}: {', '.join(names)}")
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
    p.add_argument("--max-batch-size", type=int, default=None, help="embedded: default the largest bucket")
    p.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_MAX_QUEUE_DELAY_US,
                   help="embedded: how long the dynamic batcher waits to fill a bucket")
    p.add_argument("--intra-op-threads", type=int, default=0,
                   help="embedded: ONNX Runtime threads of a whole batch (0: its default, one per physical core); "
                        "container: the onnxruntime backend's intra_op_thread_count")
    p.add_argument("--no-sampler", dest="sampler", action="store_false",
                   help="embedded: leave out the server-side sampling loop model (diffusion_sampler)")
    p.add_argument("--row-shards", type=int, default=0,
                   help="embedded, CPU: split a batch of 2+ rows into this many parts run concurrently on "
                        "single-threaded sessions (0: one per core the server may use; 1: off)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    options = dict(flavour=args.flavour, gpu=args.gpu, fp16=args.fp16, max_batch_size=args.max_batch_size,
                   max_queue_delay_us=args.max_queue_delay_us, intra_op_threads=args.intra_op_threads,
                   row_shards=args.row_shards, sampler=args.sampler)
    try:
        if args.export is None:
            default_build(args.checkpoints, args.out, **options)
        else:
            names = build_repository(args.export, args.out, **options)
            print(f"wrote {args.out}: {', '.join(names)}")
    except RepositoryError as e:
        print(f"trident serve build: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

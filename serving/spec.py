"""The one tensor spec: names, dtypes and shapes of every served graph.

Export names the ONNX inputs and outputs from here, the Triton model configuration is generated from here, and the
client builds its requests from here. No tensor name is typed anywhere else.
Pure Python + numpy (the client imports it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .card import ModelCard
from .errors import ExportMetadataError
from .graph_runtime import (CLASS_LABEL, GUIDANCE, IMAGE, feed_by_role, LATENT, LOGVAR, MEAN, NOISY_SAMPLE, PREDICTION,
                            TIMESTEP)
from .sampling import LOOP_REQUEST, LOOP_STREAM_REQUEST

# Triton model names, one per exported graph family.
UNET = "diffusion_unet"
GENERATOR = "gan_generator"
DECODER = "vae_decoder"
ENCODER = "vae_encoder"
# The sampling loop model: a served model (not an exported graph) that runs the whole diffusion loop next to the U-Net
# graphs, one request per batch of images (serving/server/runtime/loop_model.py). Its Triton name predates the word
# "sampling loop" and stays for compatibility with deployed repositories and clients.
SAMPLING_LOOP = "diffusion_sampler"
# The same loop as a decoupled model: over a gRPC stream it answers each step (index, timestep, optionally the x_0
# preview) and then the images. Triton's HTTP /infer refuses decoupled models, so SAMPLING_LOOP keeps the
# one-response request that any HTTP client can send; this one loads its U-Net sessions on its first request.
SAMPLING_LOOP_STREAM = "diffusion_sampler_stream"
# The distilled student (card kind "diffusion_student"), served beside the teacher as a family of its own: its U-Net
# takes a fourth input, the guidance scale of each row, and its loop models pass it instead of a [cond; null] pair.
STUDENT_UNET = "diffusion_student_unet"
STUDENT_SAMPLING_LOOP = "diffusion_student_sampler"
STUDENT_SAMPLING_LOOP_STREAM = "diffusion_student_sampler_stream"


@dataclass(frozen=True)
class DiffusionModels:
    """The served names of one diffusion model family: its U-Net graph and its two sampling loop models."""

    unet: str
    loop: str
    stream: str


# card kind -> its served names (card.DIFFUSION_KINDS); the teacher's are the names deployed clients know
DIFFUSION_MODELS = {"diffusion": DiffusionModels(UNET, SAMPLING_LOOP, SAMPLING_LOOP_STREAM),
                    "diffusion_student": DiffusionModels(STUDENT_UNET, STUDENT_SAMPLING_LOOP,
                                                         STUDENT_SAMPLING_LOOP_STREAM)}
GRAPHS_OF_KIND = {"diffusion": (UNET,), "diffusion_student": (STUDENT_UNET,), "gan": (GENERATOR,),
                  "vae": (DECODER, ENCODER)}
KIND_OF_GRAPH = {g: k for k, gs in GRAPHS_OF_KIND.items() for g in gs}
UNETS = tuple(m.unet for m in DIFFUSION_MODELS.values())
# loop model name -> (card kind, streams)
LOOP_MODELS = {name: (kind, name == m.stream) for kind, m in DIFFUSION_MODELS.items() for name in (m.loop, m.stream)}

DEFAULT_BUCKETS = {UNET: (1, 2, 4, 8, 16, 32), STUDENT_UNET: (1, 2, 4, 8, 16, 32),
                   GENERATOR: (1, 8, 32), DECODER: (1, 8, 32), ENCODER: (1, 8, 32)}

_TRITON_DTYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
                  "uint8": "UINT8", "bytes": "BYTES"}


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor. `shape` is per item (without the batch axis); every served tensor is batched on axis 0."""

    name: str
    dtype: str            # numpy dtype name: "float32", "int64", ...
    shape: tuple[int, ...]
    optional: bool = False  # a request may leave it out (only inputs of the sampling loop model)
    role: str = ""  # what a graph's tensor is (graph_runtime.ROLES): models and clients bind graph tensors by role

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(object if self.dtype == "bytes" else self.dtype)

    @property
    def triton_dtype(self) -> str:
        """As tritonclient spells it ("FP32", "BYTES")."""
        return _TRITON_DTYPES[self.dtype]

    @property
    def config_dtype(self) -> str:
        """As config.pbtxt spells it ("TYPE_FP32"; strings are "TYPE_STRING")."""
        return "TYPE_STRING" if self.dtype == "bytes" else "TYPE_" + self.triton_dtype

    def batched(self, n: int) -> tuple[int, ...]:
        return (n, *self.shape)

    def to_dict(self) -> dict:
        out = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        return {**out, "optional": True} if self.optional else out


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def role(self, role: str) -> TensorSpec:
        """The input or output of this role (graph_runtime.ROLES)."""
        return next(t for t in (*self.inputs, *self.outputs) if t.role == role)

    def feed(self, values: dict) -> dict:
        """The graph's inputs from {role: array}, each in its dtype (graph_runtime.feed_by_role)."""
        return feed_by_role(self.name, self.inputs, values)

    def to_dict(self) -> dict:
        return {"name": self.name, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}


def graph_spec(graph: str, image_shape: tuple[int, int, int], latent_dim: int | None = None) -> GraphSpec:
    """The I/O of a graph family. image_shape is (C, H, W)."""
    img = tuple(int(s) for s in image_shape)
    if graph in UNETS:
        inputs = (TensorSpec("sample", "float32", img, role=NOISY_SAMPLE),      # x_t
                  TensorSpec("timestep", "float32", (), role=TIMESTEP),        # t (fractional allowed)
                  TensorSpec("class_label", "int64", (), role=CLASS_LABEL))    # y in [0, null]
        if graph == STUDENT_UNET:  # w in the card's guidance_range: the guided output in one row
            inputs += (TensorSpec("guidance", "float32", (), role=GUIDANCE),)
        return GraphSpec(graph, inputs=inputs,
                         outputs=(TensorSpec("noise_pred", "float32", img, role=PREDICTION),))  # eps (or v)
    if latent_dim is None:
        raise ValueError(f"{graph} needs latent_dim")
    z = TensorSpec("latent", "float32", (int(latent_dim),), role=LATENT)
    image = TensorSpec("image", "float32", img, role=IMAGE)
    if graph == GENERATOR:
        return GraphSpec(GENERATOR, inputs=(z, TensorSpec("class_label", "int64", (), role=CLASS_LABEL)),
                         outputs=(image,))
    if graph == DECODER:
        return GraphSpec(DECODER, inputs=(z,), outputs=(image,))
    if graph == ENCODER:
        return GraphSpec(ENCODER, inputs=(image,),
                         outputs=(TensorSpec("mean", "float32", (int(latent_dim),), role=MEAN),
                                  TensorSpec("logvar", "float32", (int(latent_dim),), role=LOGVAR)))
    raise ValueError(f"unknown graph {graph!r}; expected one of {sorted(KIND_OF_GRAPH)}")


def loop_spec(image_shape: tuple[int, int, int], stream: bool = False, kind: str = "diffusion") -> GraphSpec:
    """I/O of the server-side sampling loop. Triton does not batch it (max_batch_size 0), so shapes are whole
    tensors, -1 = any length. One request draws N images with the client's sampler arguments; class labels all equal
    to the null class mean unconditional. stream: the decoupled model (SAMPLING_LOOP_STREAM), whose progress
    responses carry the steps done since the previous one (step, timestep) and, every preview_every steps, the
    preview; its last response carries the image (and the steps not yet reported). kind: the diffusion model family
    (DIFFUSION_MODELS) whose loop it is: the same tensors under the family's names."""
    names = DIFFUSION_MODELS[kind]
    img = tuple(int(s) for s in image_shape)
    inputs = tuple(TensorSpec(name, dtype, shape, optional)  # sampling.LOOP_REQUEST: the one table of the request
                   for name, (dtype, shape, optional) in (LOOP_STREAM_REQUEST if stream else LOOP_REQUEST).items())
    outputs = (TensorSpec("image", "float32", (-1, *img)),)  # x_0 estimate, float in value_range
    if not stream:
        return GraphSpec(names.loop, inputs, outputs)
    return GraphSpec(names.stream, inputs,
                     outputs=(*outputs,
                              TensorSpec("step", "int64", (-1,)),             # 0-based indices of the steps done
                              TensorSpec("timestep", "int64", (-1,)),         # the timesteps they ran the U-Net at
                              TensorSpec("preview", "float32", (-1, *img))))  # the last step's x_0 estimate


def graph_spec_of(graph: str, card: ModelCard) -> GraphSpec:
    """The spec of a graph (or of the sampling loop model) of the model a card describes."""
    if graph in LOOP_MODELS:
        kind, stream = LOOP_MODELS[graph]
        return loop_spec(card.image.shape, stream=stream, kind=kind)
    return graph_spec(graph, card.image.shape, card.latent_dim)


# ----------------------------------------------------------------------------------------------------------------
# Export metadata (metadata.json beside the graphs), read by the repository builder and the in-process backend
# ----------------------------------------------------------------------------------------------------------------

EXPORT_FORMAT = "trident.export"
# 2: the model card under "card" (1 had its fields at the top level); 3: int8 graphs and the fixed parity batch
# (serving/precision.py). An export of another version is exported again.
EXPORT_VERSION = 3


def load_export_metadata(directory) -> dict:
    path = Path(directory) / "metadata.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportMetadataError(f"{path} not found: run `trident export CHECKPOINT --out {directory}` first") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ExportMetadataError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise ExportMetadataError(f"{path} is not a trident export metadata file (format {EXPORT_FORMAT!r})")
    if info.get("version") != EXPORT_VERSION:
        raise ExportMetadataError(f"{path} is export format version {info.get('version')!r}, this trident reads "
                                  f"{EXPORT_VERSION}: re-export the checkpoint with `trident export CHECKPOINT "
                                  f"--out {directory}`")
    export_card(info, path)  # a bad card fails here, naming the file
    return info


def export_card(info: dict, where="metadata.json") -> ModelCard:
    """The model card of an export's metadata."""
    try:
        return ModelCard.from_dict(info.get("card"))
    except ValueError as e:
        raise ExportMetadataError(f"{where}: {e}") from None

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

# Triton model names, one per exported graph family.
UNET = "diffusion_unet"
GENERATOR = "gan_generator"
DECODER = "vae_decoder"
ENCODER = "vae_encoder"
GRAPHS_OF_KIND = {"diffusion": (UNET,), "gan": (GENERATOR,), "vae": (DECODER, ENCODER)}
KIND_OF_GRAPH = {g: k for k, gs in GRAPHS_OF_KIND.items() for g in gs}

DEFAULT_BUCKETS = {UNET: (1, 2, 4, 8, 16, 32), GENERATOR: (1, 8, 32), DECODER: (1, 8, 32), ENCODER: (1, 8, 32)}

_TRITON_DTYPES = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "uint8": "UINT8"}


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor. `shape` is per item (without the batch axis); every served tensor is batched on axis 0."""

    name: str
    dtype: str            # numpy dtype name: "float32", "int64", ...
    shape: tuple[int, ...]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def triton_dtype(self) -> str:
        """As tritonclient spells it ("FP32"); config.pbtxt uses "TYPE_" + this."""
        return _TRITON_DTYPES[self.dtype]

    def batched(self, n: int) -> tuple[int, ...]:
        return (n, *self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def to_dict(self) -> dict:
        return {"name": self.name, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}


def graph_spec(graph: str, image_shape: tuple[int, int, int], latent_dim: int | None = None) -> GraphSpec:
    """The I/O of a graph family. image_shape is (C, H, W)."""
    img = tuple(int(s) for s in image_shape)
    if graph == UNET:
        return GraphSpec(UNET,
                         inputs=(TensorSpec("sample", "float32", img),        # x_t
                                 TensorSpec("timestep", "float32", ()),       # t (fractional allowed)
                                 TensorSpec("class_label", "int64", ())),     # y in [0, num_classes], num_classes = null
                         outputs=(TensorSpec("noise_pred", "float32", img),))  # eps_theta(x_t, t, y)
    if latent_dim is None:
        raise ValueError(f"{graph} needs latent_dim")
    z = TensorSpec("latent", "float32", (int(latent_dim),))
    if graph == GENERATOR:
        return GraphSpec(GENERATOR, inputs=(z, TensorSpec("class_label", "int64", ())),
                         outputs=(TensorSpec("image", "float32", img),))
    if graph == DECODER:
        return GraphSpec(DECODER, inputs=(z,), outputs=(TensorSpec("image", "float32", img),))
    if graph == ENCODER:
        return GraphSpec(ENCODER, inputs=(TensorSpec("image", "float32", img),),
                         outputs=(TensorSpec("mean", "float32", (int(latent_dim),)),
                                  TensorSpec("logvar", "float32", (int(latent_dim),))))
    raise ValueError(f"unknown graph {graph!r}; expected one of {sorted(KIND_OF_GRAPH)}")


def graph_spec_from_meta(graph: str, meta: dict) -> GraphSpec:
    """The spec of a graph from export metadata (or checkpoint metadata)."""
    im = meta["image"]
    return graph_spec(graph, (im["channels"], im["height"], im["width"]), meta.get("latent_dim"))


# ----------------------------------------------------------------------------------------------------------------
# Export metadata (metadata.json beside the graphs), read by the repository builder and the in-process backend
# ----------------------------------------------------------------------------------------------------------------

EXPORT_FORMAT = "trident.export"


class ExportMetadataError(RuntimeError):
    """An export folder is missing or malformed."""


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
    return info

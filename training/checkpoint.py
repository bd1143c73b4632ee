"""Checkpoints: safetensors tensors plus a JSON header (model kind, config, schedule, class names, training state).

One file, no pickle. The JSON lives in the safetensors metadata under the key "trident". Tensor names are prefixed
by role: "model." (weights to export; the EMA weights for diffusion), "train.<module>." (live weights for resuming),
"opt.<name>.<param index>.<state key>" (optimiser state).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from trident.serving.card import ModelCard
from trident.serving.errors import TridentError
from trident.serving.files import atomic_file

FORMAT = "trident.checkpoint"
VERSION = 1


class CheckpointError(TridentError):
    """A checkpoint is missing, corrupt, or not what the caller asked for."""


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write atomically: a temp file in the same folder, then rename, so a crash never leaves half a file."""
    path = Path(path)
    header = {"format": FORMAT, "version": VERSION, **meta}
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"trident": json.dumps(header)})
    return path


def read_meta(path: str | os.PathLike, expected_kind: str | tuple[str, ...] | None = None) -> dict:
    """The JSON header alone (cheap: reads no tensors). Raises CheckpointError with what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("trident")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (corrupt or truncated?): {e}") from e
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a trident checkpoint (no 'trident' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r} "
                              f"version {meta.get('version')!r} (expected {FORMAT} v{VERSION})")
    if expected_kind is not None:
        kinds = (expected_kind,) if isinstance(expected_kind, str) else tuple(expected_kind)
        if meta.get("kind") not in kinds:
            raise CheckpointError(f"{path} holds a {meta.get('kind')!r} model, expected {' or '.join(map(repr, kinds))}")
    return meta


# Header fields of checkpoints written before the model card existed (the shipped checkpoints among them).
_PRE_CARD_FIELDS = ("kind", "class_names", "image", "schedule", "prediction_type", "null_class", "class_centroids")


def card_of(meta: dict, path="checkpoint") -> ModelCard:
    """The model card in a checkpoint's header.

    `trident train` stores it under "card". A checkpoint written before the card existed kept the same fields at the
    top of its header (and the latent size only in the model config); it is read into the same card here, the one
    place that knows that older layout.
    """
    try:
        if "card" in meta:
            return ModelCard.from_dict(meta["card"])
        fields = {key: meta[key] for key in _PRE_CARD_FIELDS if key in meta}
        fields["conditional"] = meta.get("kind") in ("diffusion", "gan")
        if meta.get("kind") in ("gan", "vae"):
            fields["latent_dim"] = meta.get("config", {}).get("latent_dim")
        return ModelCard.from_dict(fields)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_checkpoint(path: str | os.PathLike, expected_kind: str | tuple[str, ...] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    meta = read_meta(path, expected_kind)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read tensors (corrupt or truncated?): {e}") from e
    return tensors, meta


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The sub-dict under `prefix.` with the prefix stripped (a module state_dict)."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path="checkpoint") -> None:
    state = prefixed(tensors, prefix)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights under {prefix!r} do not fit the model built from its config "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def optimizer_tensors(opt: torch.optim.Optimizer, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimiser state_dict into tensors + JSON-able param_groups (no pickle)."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"opt.{name}.{idx}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    return tensors, {"param_groups": sd["param_groups"]}


def restore_optimizer(opt: torch.optim.Optimizer, name: str, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict] = {}
    p = f"opt.{name}."
    for k, v in tensors.items():
        if k.startswith(p):
            idx, key = k[len(p):].split(".", 1)
            state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def load_model(path: str | os.PathLike, expected_kind: str | tuple[str, ...] | None = None):
    """Rebuild the exportable network from a checkpoint: (module in eval mode, meta).

    diffusion -> UNet (EMA weights), gan -> Generator, vae -> VAE (use .decoder / .encoder), classifier -> Classifier.
    """
    from .models import build_model

    tensors, meta = load_checkpoint(path, expected_kind)
    try:
        module = build_model(meta["kind"], meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the model from its config: {e}") from e
    load_state(module, tensors, "model", path)
    return module.eval(), meta

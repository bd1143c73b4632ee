"""The one seam between serving/ and the torch side of the project (training/, export/, benchmarks/).

serving/ never imports training/ or export/: they import serving/ (the sampler math, the tensor spec, the card, the
file helpers), and a test fails on any import the other way. The few places where a serving tool needs the torch
side (the `trident` command's train/export/evaluate subcommands, building a repository straight from checkpoints,
the PyTorch reference backend) name what they need here and get it on first use, so `trident sample` and the client
SDK run where torch is not installed.
"""
from __future__ import annotations

import importlib

from .errors import TridentError

# name -> "module:attribute" on the torch side
TORCH_SIDE = {
    "train": "trident.training.train:main",
    "distill": "trident.training.train:distill_main",
    "export": "trident.export.onnx_export:main",
    "evaluate": "trident.benchmarks.evaluate:main",
    "default_build": "trident.export.build:default_build",     # checkpoints -> exports (cached) -> repository
    "TorchBackend": "trident.export.torch_backend:TorchBackend",  # the PyTorch modules behind the Backend protocol
}
EXTRA = "train"  # the pip extra that installs the torch side


class MissingToolchain(TridentError, ImportError):
    """The torch side is not installed here."""


def resolve(name: str):
    """The object TORCH_SIDE[name] names, imported now. MissingToolchain says which extra to install."""
    module, attribute = TORCH_SIDE[name].split(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("trident."):
            raise
        raise MissingToolchain(f"{name} needs {e.name!r}: install the torch side with "
                               f"`pip install -e .[{EXTRA}]`") from e

"""The PyTorch reference backend: the modules of `trident train` checkpoints behind serving's Backend protocol.

Here, not in serving/client/, because it needs torch and the checkpoint code; TridentClient.from_torch reaches it
through serving/toolchain.py.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from trident.export.onnx_export import graph_module
from trident.serving.client.backends import InProcess, check_inputs
from trident.serving.spec import GRAPHS_OF_KIND, graph_spec_of
from trident.training.checkpoint import card_of, load_model


class TorchBackend(InProcess):
    """The PyTorch modules from `trident train` checkpoints, run eagerly in float32 on `device`."""

    name = "torch"

    def __init__(self, checkpoints, device: str = "cpu", threads: int | None = None):
        if isinstance(checkpoints, (str, os.PathLike)):
            checkpoints = [checkpoints]
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.cards, self.buckets, self.specs, self._modules = {}, {}, {}, {}
        for path in checkpoints:
            model, meta = load_model(path)
            card = card_of(meta, path)
            self.cards[card.kind] = card
            for graph in GRAPHS_OF_KIND.get(card.kind, ()):
                self.specs[graph] = graph_spec_of(graph, card)
                self.buckets[graph] = ()
                self._modules[graph] = graph_module(graph, model).to(self.device)

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[graph]
        check_inputs(spec, inputs)
        args = [torch.from_numpy(np.ascontiguousarray(inputs[t.name], dtype=t.np_dtype)).to(self.device)
                for t in spec.inputs]
        with torch.inference_mode():
            out = self._modules[graph](*args)
        out = [out] if torch.is_tensor(out) else list(out)
        return {t.name: o.cpu().numpy() for t, o in zip(spec.outputs, out)}

    def close(self):
        self._modules.clear()

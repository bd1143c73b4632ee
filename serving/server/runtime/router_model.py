"""Triton Python-backend model: the front of one graph in the container flavour, where requests meet across clients.

The official Triton container serves each exported graph at each static batch size as a native model
(`<graph>_b<N>`: onnxruntime, with CUDA or TensorRT FP16 on the GPU; max_batch_size 0, because the graph's shapes
are fixed). A model without batch dimension cannot be dynamically batched, so clients call this one instead, under
the graph's own name (`diffusion_unet`, ...): max_batch_size > 0 and the dynamic batcher, which gathers the waiting
requests of every client into one execute(). Then, as graph_model.py does in the embedded flavour (batching.py):
  1. each request is checked on its own (names, dtypes, shapes, NaN/Inf, label and timestep ranges);
  2. the good ones are concatenated and run on the per-bucket models through BLS (bls.BucketModels): the smallest
     bucket that holds the rows, zero-padded, or the largest while more rows remain (ort_runner.plan_chunks);
  3. each request gets its own rows back.

`trident serve build --flavour container` copies this file to ``<graph>/1/model.py`` with the runtime files; it
needs numpy, not onnxruntime. Its configuration carries the model card (trident_card: what clients read) and the
graph's GraphRuntime (trident_runtime: the tensors, the valid input ranges and the per-bucket models this file calls).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol as P  # noqa: E402  (siblings copied in by `trident serve build`)
from batching import BatchedInputs  # noqa: E402
from bls import BucketModels  # noqa: E402
from graph_runtime import GraphRuntime  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        runtime = GraphRuntime.from_json(P.parameters(config)[P.RUNTIME])
        self.batch = BatchedInputs(config["name"], runtime)
        self.graphs = BucketModels(runtime.bucket_models, [t.name for t in runtime.outputs])

    def execute(self, requests):
        return self.batch.execute(requests, self.graphs.run, "the per-bucket model")

    def finalize(self):
        self.graphs.close()

"""Triton Python-backend model: one exported graph served from static-batch ONNX Runtime sessions.

`trident serve build` copies this file to ``<model>/1/model.py`` next to the graph's ``<graph>_b<N>.onnx`` files and
the runtime files (serving/server/runtime: RUNTIME_FILES), so the repository runs in any Triton with the Python
backend, trident installed or not. It learns everything (tensor names, dtypes, buckets, files, engines, valid input
ranges, threads, row shards, execution provider) from one parameter of its model configuration, the graph's
GraphRuntime (graph_runtime.py).

execute() serves a dynamic batch of requests (batching.py):
  1. check each request on its own; a bad one gets an error response, the others go on;
  2. concatenate the good ones on axis 0 and run them with ort_runner.BucketRunner: bucket-sized chunks, the last
     one zero-padded (padding never changes a real row), split into concurrent row shards on the CPU;
  3. split the outputs back per request, in order.

The container flavour's stand-in per-bucket models (`--bucket-backend python`) run this file over one bucket file
with max_batch_size 0: the same code, one static shape.
"""

import json
import os
import sys

import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol as P  # noqa: E402  (siblings copied in by `trident serve build`)
from batching import BatchedInputs  # noqa: E402
from graph_runtime import GraphRuntime  # noqa: E402
from ort_runner import BucketRunner, execution_providers  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        runtime = GraphRuntime.from_json(P.parameters(config)[P.RUNTIME])
        # No CPU fallback: a GPU provider that is missing or does not load fails the model load, naming the library.
        providers = execution_providers(runtime.provider, int(args.get("model_instance_device_id", "0")))
        directory = os.path.join(args["model_repository"], args["model_version"])
        self.runner = BucketRunner(**runtime.runner_arguments(directory), providers=providers)
        if not config.get("model_warmup"):  # else Triton's warm-up requests warm the same sessions, on the thread
            self.runner.warm()              # that serves (ONNX Runtime keeps per-thread buffers: not twice)
        graphs_take = self.runner.input_shapes()
        manifest_says = {t.name: tuple(t.shape) for t in runtime.inputs}
        if graphs_take != manifest_says:
            raise pb_utils.TritonModelException(
                f"{self.name}: the ONNX graphs take {graphs_take} but the runtime manifest lists {manifest_says}; "
                "rebuild the repository from the same export."
            )
        self.batch = BatchedInputs(self.name, runtime)

    def execute(self, requests):
        return self.batch.execute(requests, self.runner.run, "ONNX Runtime")

    def finalize(self):
        self.runner.close()

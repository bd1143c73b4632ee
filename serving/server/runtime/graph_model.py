"""Triton Python-backend model: one exported graph served from static-batch ONNX Runtime sessions.

`trident serve build` copies this file to ``<model>/1/model.py`` next to the graph's ``<graph>_b<N>.onnx`` files and
the runtime files (serving/server/runtime: RUNTIME_FILES), so the repository runs in any Triton with the Python
backend, trident installed or not. It learns everything (tensor names, dtypes, buckets, files, valid input ranges,
threads, row shards, execution provider) from its own model configuration.

execute() serves a dynamic batch of requests:
  1. check each request on its own; a bad one gets an error response, the others go on;
  2. concatenate the good ones on axis 0 and run them with ort_runner.BucketRunner: bucket-sized chunks, the last
     one zero-padded (padding never changes a real row), split into concurrent row shards on the CPU;
  3. split the outputs back per request, in order.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol as P  # noqa: E402  (siblings copied in by `trident serve build`)
from ort_runner import BucketRunner, execution_providers  # noqa: E402
from protocol import InvalidRequest, error_response  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = P.parameters(config)
        self.ranges = json.loads(params.get(P.RANGES, "{}"))
        self.inputs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["input"]]
        self.outputs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["output"]]

        providers, warning = execution_providers(params.get(P.PROVIDER, "cpu"),
                                                 int(args.get("model_instance_device_id", "0")))
        if warning:
            pb_utils.Logger.log_warn(f"{self.name}: {warning}")

        directory = os.path.join(args["model_repository"], args["model_version"])
        files = {int(bucket): os.path.join(directory, file) for bucket, file in json.loads(params[P.FILES]).items()}
        self.runner = BucketRunner(files, threads=int(params.get(P.THREADS, "0")),
                                   row_shards=int(params.get(P.SHARDS, "0")), providers=providers,
                                   engines=json.loads(params.get(P.ENGINES, "{}")))
        self.runner.warm()  # the sessions calls of each bucket's size use, before the model reports ready
        self.buckets = self.runner.buckets
        # Per-item shapes as the graphs see them (after Triton's reshape: a [1] scalar in the config is () here).
        self.item_shapes = self.runner.input_shapes()
        expected = [name for name, _ in self.inputs]
        if sorted(self.item_shapes) != sorted(expected):
            raise pb_utils.TritonModelException(
                f"{self.name}: the ONNX graphs take {sorted(self.item_shapes)} but the configuration lists {expected}; "
                "rebuild the repository from the same export."
            )

    # -- one request ----------------------------------------------------------------------------------------------

    def _read(self, request):
        """The request's inputs as arrays of shape (rows, *item shape), or InvalidRequest saying what is wrong."""
        arrays, rows = {}, None
        for name, dtype in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise InvalidRequest(f"{self.name}: input '{name}' is missing")
            array = tensor.as_numpy()
            if array.dtype != dtype:
                raise InvalidRequest(f"{self.name}: input '{name}' must be {np.dtype(dtype).name}, got {array.dtype}")
            shape = self.item_shapes[name]
            if array.ndim != 1 + len(shape) or tuple(array.shape[1:]) != shape:
                raise InvalidRequest(f"{self.name}: input '{name}' must have per-item shape {list(shape)}, "
                                     f"got {list(array.shape)}")
            if rows is not None and array.shape[0] != rows:
                raise InvalidRequest(f"{self.name}: every input needs the same batch size; '{name}' has "
                                     f"{array.shape[0]}, the others {rows}")
            rows = array.shape[0]
            if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
                bad = np.argwhere(~np.isfinite(array))[0]
                raise InvalidRequest(f"{self.name}: input '{name}' holds NaN or Inf (first at index {bad.tolist()}); "
                                     "send finite values")
            valid = self.ranges.get(name)
            if valid is not None:
                outside = (array < valid["low"]) | (array >= valid["high"])
                if np.any(outside):
                    row = int(np.argwhere(outside)[0][0])
                    raise InvalidRequest(
                        f"{self.name}: input '{name}' must be in [{valid['low']}, {valid['high']}) "
                        f"({valid['hint']}); got {array[outside][0].item()} at row {row}"
                    )
            arrays[name] = array
        return arrays, rows

    def execute(self, requests):
        responses = [None] * len(requests)
        good = []  # (index, arrays, rows) of requests that passed their checks
        for index, request in enumerate(requests):
            try:
                arrays, rows = self._read(request)
            except InvalidRequest as invalid:
                responses[index] = error_response(str(invalid))
                continue
            good.append((index, arrays, rows))
        if not good:
            return responses

        batch = {name: np.concatenate([arrays[name] for _, arrays, _ in good]) for name, _ in self.inputs}
        try:
            results = self.runner.run(batch)
        except Exception as failure:  # ORT failed: every request of this batch learns why, the server stays up
            for index, _, _ in good:
                responses[index] = error_response(f"{self.name}: ONNX Runtime failed: {failure}",
                                                  invalid_argument=False)
            return responses

        offset = 0
        for index, _, rows in good:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(results[name][offset:offset + rows], dtype=dtype))
                       for name, dtype in self.outputs]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
            offset += rows
        return responses

    def finalize(self):
        self.runner.close()

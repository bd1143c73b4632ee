"""A batched model's execute(): check each request on its own, run the good ones as one batch, answer each its rows.

Shared by graph_model.py (the embedded flavour: the rows run in ONNX Runtime here) and router_model.py (the container
flavour's front model: the rows run on per-bucket models through BLS). Copied into every Python-backend model by
`trident serve build` (RUNTIME_FILES), so standard library, numpy and triton_python_backend_utils only.
"""

import numpy as np

from protocol import InvalidRequest, error_response


class BatchedInputs:
    """What a request must hold, from the model's GraphRuntime (serving/graph_runtime.py, built from spec.py): input
    names, dtypes and per-item shapes (as the model sees them: after Triton's reshape a per-item scalar declared [1]
    is (), and a per-bucket model's static first axis is the batch), the output names and dtypes, and the valid
    ranges of label, timestep and guidance inputs."""

    def __init__(self, name: str, runtime):
        self.name = name
        self.inputs = [(t.name, np.dtype(t.dtype)) for t in runtime.inputs]
        self.outputs = [(t.name, np.dtype(t.dtype)) for t in runtime.outputs]
        self.item_shapes = {t.name: tuple(t.shape) for t in runtime.inputs}
        self.ranges = runtime.ranges

    def read(self, request):
        """The request's inputs as arrays of shape (rows, *item shape), or InvalidRequest saying what is wrong."""
        import triton_python_backend_utils as pb_utils

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
            refusal = None if valid is None else valid.refusal(self.name, name, array)
            if refusal is not None:
                raise InvalidRequest(refusal)
            arrays[name] = array
        return arrays, rows

    def execute(self, requests, run, what: str):
        """Responses to a dynamic batch of requests: run({input: rows of every good request}) -> {output: rows} is
        called once; a bad request gets its own error, and a failed run is an error for each request it carried
        ("<model>: <what> failed: ...")."""
        import triton_python_backend_utils as pb_utils

        responses = [None] * len(requests)
        good = []  # (index, arrays, rows) of requests that passed their checks
        for index, request in enumerate(requests):
            try:
                arrays, rows = self.read(request)
            except InvalidRequest as invalid:
                responses[index] = error_response(str(invalid))
                continue
            good.append((index, arrays, rows))
        if not good:
            return responses

        batch = {name: np.concatenate([arrays[name] for _, arrays, _ in good]) for name, _ in self.inputs}
        try:
            results = run(batch)
        except Exception as failure:  # every request of this batch learns why; the server stays up
            for index, _, _ in good:
                responses[index] = error_response(f"{self.name}: {what} failed: {failure}", invalid_argument=False)
            return responses

        offset = 0
        for index, _, rows in good:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(results[name][offset:offset + rows], dtype=dtype))
                       for name, dtype in self.outputs]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
            offset += rows
        return responses

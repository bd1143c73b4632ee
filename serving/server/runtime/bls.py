"""The per-bucket models of one graph, called from a Python-backend model through BLS (Business Logic Scripting).

The container flavour serves each graph's fixed-shape files as their own models (`<graph>_b<N>`, native onnxruntime
or TensorRT, max_batch_size 0); its front model (router_model.py) and its sampling loop model (loop_model.py) run any
number of rows on them with BucketModels.run, which splits and pads the rows exactly as ort_runner.BucketRunner does
(ort_runner.run_in_buckets) and sends each chunk as one BLS request. Outputs are asked for in CPU memory, so a
front model on the CPU can read what a model on the GPU answered. Copied into every Python-backend model
(RUNTIME_FILES); BLS only works inside execute(), never in initialize().
"""

import numpy as np

from ort_runner import run_in_buckets


class BucketModels:
    """{bucket: Triton model name} of one graph; run() takes and returns any number of rows, like BucketRunner."""

    def __init__(self, models: dict, output_names: list):
        if not models:
            raise ValueError("no per-bucket models given")
        self.models = {int(bucket): str(name) for bucket, name in models.items()}
        self.buckets = sorted(self.models)
        self.output_names = list(output_names)

    def _call(self, bucket: int, part: dict) -> list:
        import triton_python_backend_utils as pb_utils

        model = self.models[bucket]
        request = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=self.output_names,
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(array)) for name, array in part.items()],
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0))
        response = request.exec()
        if response.has_error():  # this response, not another one's (the mistake a published tutorial made)
            raise RuntimeError(f"{model}: {response.error().message()}")
        outputs = []
        for name in self.output_names:
            tensor = pb_utils.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise RuntimeError(f"{model} answered without output '{name}'")
            outputs.append(tensor.as_numpy())
        return outputs

    def run(self, feed: dict) -> dict:
        """{input name: array (n, ...)} -> {output name: array (n, ...)}, n >= 1, one BLS request per chunk."""
        return dict(zip(self.output_names, run_in_buckets(feed, self.buckets, self._call)))

    def warm(self) -> None:
        """Nothing to warm here: each per-bucket model warms up on its own (model_warmup), and BLS cannot run in
        initialize()."""

    def close(self) -> None:
        pass

"""Triton Python-backend model: the whole diffusion sampling loop on the server, one request per batch of images.

`trident serve build` copies this file to ``diffusion_sampler/1/model.py`` and ``diffusion_sampler_stream/1/model.py``
with the runtime files (serving/server/runtime: RUNTIME_FILES, among them sampling.py and ort_runner.py) and the U-Net's
``diffusion_unet_b<N>.onnx`` files, so it runs in any Triton with the Python backend, trident installed or not.

A request carries what TridentClient.sample takes (class labels, seed, steps, guidance, eta, sampler, spacing; see
spec.loop_spec); the model runs sampling.sample_progressive with the U-Net called in-process through
ort_runner.BucketRunner (the same code as the diffusion_unet model and the client's in-process backend), and answers
the last step's x_0 estimate. The client loop pays one request per step; this pays one per batch of images.
In the container flavour the U-Net runs on its per-bucket models instead, through BLS (bls.BucketModels): no
onnxruntime needed in Triton's Python.
Requests of one execute() call run one after another; a bad one gets an error response, the others go on.

A distilled student's loop models (diffusion_student_sampler, diffusion_student_sampler_stream) run this file too,
over the student's U-Net: its card (guidance_range) makes each step one row per image with the guidance scale as
the U-Net's input, and a guidance outside the range an invalid request.

Two models run this file, told apart by their configuration:
  diffusion_sampler         one response per request (any HTTP client, gRPC unary); warmed at load.
  diffusion_sampler_stream  decoupled (gRPC streaming only: Triton's HTTP /infer refuses decoupled models): progress
                            responses (the steps done, their timesteps, and the x_0 preview every `preview_every`
                            steps), then the images with the final flag. It makes its sessions on its first request, so
                            a server whose clients never stream holds one set of U-Net sessions for loops, not two.
Both stop between steps when the client gives up (cancellation, max_seconds) or the server is shutting down
(protocol.shutting_down: the launcher's stop file).
"""

import json
import os
import sys
import time

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol as P  # noqa: E402  (siblings copied in by `trident serve build`)
import sampling  # noqa: E402
from bls import BucketModels  # noqa: E402
from card import ModelCard  # noqa: E402
from graph_runtime import CLASS_LABEL, GUIDANCE, NOISY_SAMPLE, PREDICTION, TIMESTEP, GraphRuntime  # noqa: E402
from ort_runner import BucketRunner, execution_providers  # noqa: E402
from protocol import InvalidRequest, error_response  # noqa: E402


PROGRESS_INTERVAL_S = 0.05  # the streaming model's progress responses: at most 20 a second (see _stream)
# Asking Triton whether a request was cancelled is a round trip to the server process, which a loop of few-ms steps
# notices when it asks at every step (benchmarks/results/optimizations.md, "Figures behind the code's comments"). So
# a loop asks at most this often, and a cancelled loop stops within this time plus one step.
CANCEL_CHECK_INTERVAL_S = 0.05


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = P.parameters(config)
        card = ModelCard.from_json(params[P.CARD])
        self.schedule = sampling.NoiseSchedule.from_dict(card.schedule)
        self.null_class = card.null_class
        self.prediction_type = card.prediction_type
        # a distilled student (diffusion_student_sampler): its U-Net takes the guidance scale, one row per image, and a
        # guidance outside its range is refused before any step; a step-distilled one samples on the trailing grid
        self.guidance_range, self.distilled_steps = card.guidance_range, card.distilled_steps
        self.image_shape = card.image.shape
        self.max_images = int(params[P.MAX_IMAGES])
        self.unet = GraphRuntime.from_json(params[P.RUNTIME])  # the U-Net's tensors, bound by role
        self.eps_name = self.unet.tensor(PREDICTION).name
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        # The request's tensors by name, from the one table (sampling.LOOP_REQUEST) that spec.loop_spec wrote the
        # configuration from; a configuration that lacks one was built by another trident.
        self.request_names = tuple(sampling.LOOP_STREAM_REQUEST if self.decoupled else sampling.LOOP_REQUEST)
        missing = sorted(set(self.request_names) - {t["name"] for t in config["input"]})
        if missing:
            raise ValueError(f"{self.name}: the model configuration lacks inputs {missing}: rebuild the repository "
                             f"with this trident (`trident serve build`)")
        self.output_name, *progress = [t["name"] for t in config["output"]]
        if self.decoupled:
            self.step_out, self.timestep_out, self.preview_out = progress
        if self.unet.bucket_models is not None:  # container flavour: the U-Net's per-bucket models, through BLS
            self.runner = BucketModels(self.unet.bucket_models, [self.eps_name])
        else:  # no CPU fallback: a GPU provider that is missing or does not load fails the load, naming the library
            providers = execution_providers(self.unet.provider, int(args.get("model_instance_device_id", "0")))
            directory = os.path.join(args["model_repository"], args["model_version"])
            self.runner = BucketRunner(**self.unet.runner_arguments(directory), providers=providers)
        if not self.decoupled:  # not batched by Triton, so no model_warmup in the config: warm the bucket sizes here
            self.runner.warm()
        # The streaming model is not warmed: its sessions are made on its first request (BucketRunner makes each on
        # first use; only the smallest bucket's at load, which checks the files and providers), so a server whose
        # clients never stream holds no second set of U-Net sessions (benchmarks/results/optimizations.md has the
        # memory each set holds).

    def _eps(self, x, t, y, w=None):
        """The U-Net on one step's rows: (x, t, y), or a student's (x, t, y, w) (sampling.SamplingLoop)."""
        values = {NOISY_SAMPLE: x, TIMESTEP: t, CLASS_LABEL: y}
        if w is not None:
            values[GUIDANCE] = w
        return self.runner.run(self.unet.feed(values))[self.eps_name]

    # -- one request ----------------------------------------------------------------------------------------------

    def _read(self, request):
        values = {}
        for name in self.request_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                values[name] = tensor.as_numpy()
        try:
            config, labels, seed, max_seconds = sampling.config_from_request(values)
        except ValueError as e:
            raise InvalidRequest(f"{self.name}: {e}") from None
        if not 1 <= labels.size <= self.max_images:
            raise InvalidRequest(f"{self.name}: input 'class_label' must hold 1 to {self.max_images} labels (one per "
                                 f"image), got {labels.size}")
        unconditional = bool(np.all(labels == self.null_class))
        return dict(count=int(labels.size), max_seconds=max_seconds, labels=None if unconditional else labels,
                    config=config, seed=seed)

    def _sample(self, a, is_cancelled, on_step=None):
        """The images of one checked request. Between steps: stop when the client gave up (gRPC cancels, and this
        Triton tells us; an HTTP client that times out does not, so the client also sends its timeout as
        max_seconds) or the server is shutting down; then report the step (streaming)."""
        shape = (a["count"], *self.image_shape)
        deadline = time.monotonic() + a["max_seconds"] if a["max_seconds"] > 0 else None
        next_cancel_check = [0.0]

        def cancelled():
            now = time.monotonic()
            if now < next_cancel_check[0]:
                return False
            next_cancel_check[0] = now + CANCEL_CHECK_INTERVAL_S
            return is_cancelled()

        def callback(i, t, x, x0):
            if deadline is not None and time.monotonic() > deadline:
                raise InvalidRequest(f"{self.name}: stopped after step {i + 1} of {a['config'].steps}: "
                                     f"{P.OUT_OF_TIME}={a['max_seconds']:g}")
            if P.shutting_down() or cancelled():
                return False  # SamplingCancelled; _answer tells the two apart
            if on_step is not None:
                every = a["config"].preview_every
                on_step(i, t, x0, preview=bool(every) and (i + 1) % every == 0)
            return True

        try:
            steps = sampling.sample_progressive(
                self._eps, shape, a["labels"], schedule=self.schedule, null_class=self.null_class, config=a["config"],
                seed=a["seed"], callback=callback, prediction_type=self.prediction_type,
                guidance_range=self.guidance_range, distilled_steps=self.distilled_steps)
        except ValueError as e:  # an argument out of range: sample_progressive checks before any U-Net call
            raise InvalidRequest(f"{self.name}: {e}") from None
        if P.shutting_down():  # a request that arrives while the server drains does not start
            raise sampling.SamplingCancelled(-1, -1)
        return sampling.last_estimate(steps)

    def _answer(self, request, is_cancelled, on_step=None):
        """(images, None) or (None, an error response) for one request."""
        try:
            return self._sample(self._read(request), is_cancelled, on_step), None
        except InvalidRequest as invalid:
            return None, error_response(str(invalid))
        except sampling.SamplingCancelled as stop:
            if P.shutting_down():  # UNAVAILABLE (HTTP 503): the client's ServerUnreachableError
                return None, error_response(f"{self.name}: {P.SHUTTING_DOWN}; stopped after step {stop.index + 1}",
                                            code_name="UNAVAILABLE")
            return None, error_response(f"{self.name}: the request was cancelled after step {stop.index + 1}")
        except Exception as failure:  # ONNX Runtime or numpy failed: this request learns why, the server stays up
            return None, error_response(f"{self.name}: sampling failed: {failure}", invalid_argument=False)

    def _stream(self, request):
        """Decoupled: progress responses, then the images (or the error) with the final flag.

        A progress response lists the steps done since the previous one (step, timestep: one entry each) and goes
        out at most every PROGRESS_INTERVAL_S, or at once for a step that carries a preview (its x_0 estimate, the
        response's last step): a response per step costs CPU time that a loop of few-ms steps notices
        (benchmarks/results/optimizations.md)."""
        sender = request.get_response_sender()
        pending, last_sent = [], [time.monotonic()]  # (index, timestep) not yet reported

        def on_step(i, t, x0, preview):
            pending.append((i, t))
            if preview or time.monotonic() - last_sent[0] >= PROGRESS_INTERVAL_S:
                tensors = [pb_utils.Tensor(self.step_out, np.array([p[0] for p in pending], np.int64)),
                           pb_utils.Tensor(self.timestep_out, np.array([p[1] for p in pending], np.int64))]
                if preview:
                    tensors.append(pb_utils.Tensor(self.preview_out, np.asarray(x0, dtype=np.float32)))
                sender.send(pb_utils.InferenceResponse(output_tensors=tensors))
                pending.clear()
                last_sent[0] = time.monotonic()

        images, error = self._answer(request, sender.is_cancelled, on_step)
        if error is None:  # the steps not yet reported travel with the images
            tensors = [pb_utils.Tensor(self.output_name, images),
                       pb_utils.Tensor(self.step_out, np.array([p[0] for p in pending], np.int64)),
                       pb_utils.Tensor(self.timestep_out, np.array([p[1] for p in pending], np.int64))]
            error = pb_utils.InferenceResponse(output_tensors=tensors)
        sender.send(error, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                self._stream(request)
            return None
        responses = []
        for request in requests:
            cancelled = getattr(request, "is_cancelled", None) or (lambda: False)
            images, error = self._answer(request, cancelled)
            responses.append(error if error is not None else
                             pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, images)]))
        return responses

    def finalize(self):
        self.runner.close()

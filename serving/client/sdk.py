"""The client SDK: sample the diffusion model (client-side loop with batched classifier-free guidance, or the
server-side loop), the GAN and the VAE, over any backend (Triton HTTP/gRPC, in-process ONNX Runtime, PyTorch).
numpy + tritonclient + Pillow; no torch.

    from trident.serving.client import TridentClient
    client = TridentClient.connect("127.0.0.1:8000", protocol="grpc")      # or TridentClient.from_onnx([...])
    images = client.sample(classes=["sneaker"] * 8, steps=20, guidance=3.0, seed=0)   # uint8 (8, 28, 28, 1)
    client.save_grid(images, "sneakers.png", nrow=8)

The checks and the requests are ClientBase's (base.py), shared with the asyncio client (aio.py); this module sends.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .. import sampling, toolchain
from ..errors import InvalidArgumentError, ModelNotReadyError, ServerUnreachableError, TridentError
from ..graph_runtime import IMAGE, MEAN, PREDICTION
from ..spec import DECODER, DIFFUSION_MODELS, ENCODER, GENERATOR, UNET
from .backends import OnnxRuntimeBackend, TritonBackend
from .base import LOOPS, MAX_IMAGES, ClientBase, SampleJob, SampleStats  # noqa: F401  (LOOPS: part of the API)

__all__ = ["TridentClient", "SampleStats", "TridentError", "ServerUnreachableError", "ModelNotReadyError",
           "InvalidArgumentError", "MAX_IMAGES"]


class TridentClient(ClientBase):
    """High-level sampling over any backend that fulfils the Backend protocol (serving/client/backends.py)."""

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def connect(cls, url="127.0.0.1:8000", protocol: str = "http", **kw) -> "TridentClient":
        """A client over a Triton server ("host:port"), or over several replicas of one (a list or "h1:p1,h2:p2";
        gRPC also "dns:///name:port"), its requests spread over them. kw: timeout_s, retries, backoff_s, models,
        sample_timeout_s, tls. Raises ServerUnreachableError / ModelNotReadyError."""
        return cls(TritonBackend(url, protocol, **kw))

    @classmethod
    def from_onnx(cls, export_dirs, **kw) -> "TridentClient":
        return cls(OnnxRuntimeBackend(export_dirs, **kw))

    @classmethod
    def from_torch(cls, checkpoints, **kw) -> "TridentClient":
        """The PyTorch modules of `trident train` checkpoints (needs torch: the reference for parity checks)."""
        return cls(toolchain.resolve("TorchBackend")(checkpoints, **kw))

    def close(self):
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- timing wrapper -----------------------------------------------------------------------------------------
    def _timed_run(self, graph: str, inputs: dict) -> dict:
        t0 = time.perf_counter()
        out = self.backend.run(graph, inputs)
        self.last_stats.add(time.perf_counter() - t0, len(next(iter(inputs.values()))))
        return out

    def eps_model(self, model: str = "diffusion") -> Callable[..., np.ndarray]:
        """The U-Net of a diffusion model ("diffusion", or "diffusion_student") as the sampler's callable eps(x, t, y),
        or the student's eps(x, t, y, w) (one backend call per sampler call)."""
        graph = DIFFUSION_MODELS[model].unet if model in DIFFUSION_MODELS else UNET
        if graph not in self.backend.specs:
            raise ModelNotReadyError(f"no {graph} on this backend (it has {sorted(self.backend.specs)})")
        out_name = self.backend.specs[graph].role(PREDICTION).name
        return lambda *args: self._timed_run(graph, self._unet_feed(*args, graph=graph))[out_name]

    # -- diffusion ----------------------------------------------------------------------------------------------
    def sample(self, classes=None, n: int | None = None, *, sampler: str | None = None, steps: int | None = None,
               guidance: float = 3.0, eta: float = 0.0, seed: int | None = 0, spacing: str | None = None,
               progress: bool = False, callback: Callable | None = None, raw: bool = False,
               loop: str = "client", preview_every: int = 0, sampler_options: dict | None = None,
               model: str = "diffusion", guidance_t_min: int = 0) -> np.ndarray:
        """Draw images from the diffusion model: uint8 (N, H, W, C), or float32 (N, C, H, W) in [-1, 1] with raw.

        classes: one id/name (repeated n times), a list of ids/names (one image each), or None (unconditional,
        n images). loop "client": this process runs the sampler and each step sends ONE request of 2N rows
        ([cond; null] stacked), combining the halves with uncond + guidance * (cond - uncond); guidance 1 or no
        classes sends N rows; callback(i, t, x, x0) sees every step. loop "server" (Triton only): one request to the
        server's sampling loop model, which runs the same loop next to the U-Net. With progress or a callback it
        streams (gRPC, the diffusion_sampler_stream model): the bar moves and callback(i, t, None, x0) runs at every
        step, x0 being the x_0 preview every `preview_every` steps and None between them. A callback returning False
        cancels the sampling (SamplingCancelled), on the server too. Deterministic in seed: both loops draw the
        same images for the same arguments (to float tolerance: the U-Net may run in different bucket layouts).
        sampler_options: further options of the sampler (sampling.sampler_options_of), e.g.
        {"use_clipped_model_output": False} for DDIM; they reach the server-side loop too. guidance_t_min: guidance
        only at the steps whose timestep is >= it (Kynkäänniemi et al. 2024); below, the conditional output alone,
        N rows per step instead of 2N (the student: w = 1). 0: guidance at every step.

        model: "diffusion" (the teacher) or "diffusion_student" (the student distilled from it, served beside it:
        its U-Net takes the guidance scale as an input, so every step sends one row per image at any guidance, and
        a guidance outside the card's guidance_range is refused). sampler, steps (and spacing) None: the model's
        defaults, DPM-Solver++(2M) with 20 steps, or for a step-distilled student DDIM with "trailing" spacing at
        the steps it was distilled for (card.distilled_steps); any steps may still be asked for.
        """
        job = self._sample_job(classes, n, sampler=sampler, steps=steps, guidance=guidance, eta=eta, seed=seed,
                               spacing=spacing, progress=progress, callback=callback, loop=loop,
                               preview_every=preview_every, sampler_options=sampler_options, model=model,
                               guidance_t_min=guidance_t_min)
        self.last_stats = SampleStats()
        t0 = time.perf_counter()
        x = self._run_loop_on_server(job) if job.loop is None else self._run_loop_here(job)
        self.last_stats.wall_s = time.perf_counter() - t0
        return self._finish(x, job.card, raw)

    def _run_loop_here(self, job: SampleJob) -> np.ndarray:
        return sampling.last_estimate(sampling.drive(self.eps_model(job.model), job.loop))

    def _run_loop_on_server(self, job: SampleJob) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            x = self.backend.run_loop(job.feed, on_step=job.on_step, model=job.model)
        finally:
            if job.on_step is not None:
                job.on_step.close()
        self.last_stats.add(time.perf_counter() - t0, job.count)
        return np.asarray(x, dtype=np.float32)

    # -- GAN ----------------------------------------------------------------------------------------------------
    def generate(self, classes=None, n: int | None = None, *, seed: int | None = 0, truncation: float | None = None,
                 raw: bool = False) -> np.ndarray:
        """GAN samples G(z, y), z ~ N(0, I) (optionally truncated to |z| <= truncation). classes as in sample();
        None draws uniformly random classes."""
        feed, card = self._generate_request(classes, n, seed, truncation)
        return self._images(GENERATOR, feed, card, raw)

    # -- VAE ----------------------------------------------------------------------------------------------------
    def decode(self, z: np.ndarray, raw: bool = False) -> np.ndarray:
        feed, card = self._decode_request(z)
        return self._images(DECODER, feed, card, raw)

    def generate_vae(self, n: int, *, seed: int | None = 0, temperature: float = 1.0, raw: bool = False) -> np.ndarray:
        """VAE samples: decode z ~ N(0, temperature^2 I)."""
        return self.decode(self._vae_latents(n, seed, temperature), raw)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Posterior means of images, uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1] -> (N, latent_dim)."""
        feed = self._encode_request(images)
        self.last_stats = SampleStats()
        return self._timed_run(ENCODER, feed)[self.backend.specs[ENCODER].role(MEAN).name]

    def interpolate(self, start, end, steps: int = 8, *, spherical: bool = True, raw: bool = False) -> np.ndarray:
        """Decode a path through the VAE latent space between two endpoints: class ids/names (the class's mean
        latent, stored with the model), images (encoded with the served encoder), or latent vectors."""
        card = self._check_interpolation(steps)
        ends = []
        for end_ in (start, end):
            latent, image = self._endpoint(end_, card)
            ends.append(latent if image is None else self.encode(image)[0].astype(np.float64))
        return self.decode(self._latent_path(*ends, steps, spherical), raw)

    # -- helpers ------------------------------------------------------------------------------------------------
    def _images(self, graph, inputs, card, raw):
        self.last_stats = SampleStats()
        t0 = time.perf_counter()
        out = self._timed_run(graph, inputs)[self.backend.specs[graph].role(IMAGE).name]
        self.last_stats.wall_s = time.perf_counter() - t0
        return self._finish(out, card, raw)

"""The client SDK: sample the diffusion model (client-side loop with batched classifier-free guidance, or the
server-side loop), the GAN and the VAE, over any backend (Triton HTTP/gRPC, in-process ONNX Runtime, PyTorch).
numpy + tritonclient + Pillow; no torch.

    from trident.serving.client import TridentClient
    client = TridentClient.connect("127.0.0.1:8000", protocol="grpc")      # or TridentClient.from_onnx([...])
    images = client.sample(classes=["sneaker"] * 8, steps=20, guidance=3.0, seed=0)   # uint8 (8, 28, 28, 1)
    client.save_grid(images, "sneakers.png", nrow=8)
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import sampling, toolchain
from ..card import ModelCard
from ..errors import InvalidArgumentError, ModelNotReadyError, ServerUnreachableError, TridentError
from ..images import labelled_grid, make_grid, save_png, to_uint8
from ..spec import DECODER, ENCODER, GENERATOR, SAMPLING_LOOP, UNET
from .backends import Backend, OnnxRuntimeBackend, TritonBackend

MAX_IMAGES = 4096  # per call; larger jobs belong in a loop of calls
LOOPS = ("client", "server")  # where the diffusion sampling loop runs

__all__ = ["TridentClient", "SampleStats", "TridentError", "ServerUnreachableError", "ModelNotReadyError",
           "InvalidArgumentError", "MAX_IMAGES"]


@dataclass
class SampleStats:
    """Timing of the last call: wall time, model calls, and the latency of each call (seconds)."""

    wall_s: float = 0.0
    calls: int = 0
    rows: int = 0
    call_s: list[float] = field(default_factory=list)

    @property
    def per_call_ms(self) -> float:
        return 1e3 * float(np.mean(self.call_s)) if self.call_s else 0.0


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


class TridentClient:
    """High-level sampling over any backend that fulfils the Backend protocol (serving/client/backends.py)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.last_stats = SampleStats()

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def connect(cls, url: str = "127.0.0.1:8000", protocol: str = "http", **kw) -> "TridentClient":
        """A client over a Triton server. Raises ServerUnreachableError / ModelNotReadyError."""
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

    # -- model cards --------------------------------------------------------------------------------------------
    def card(self, kind: str) -> ModelCard:
        """The model card of the backend's `kind` model ("diffusion", "gan", "vae")."""
        if kind not in self.backend.cards:
            raise ModelNotReadyError(f"no {kind} model on this backend (it has {sorted(self.backend.cards)})")
        return self.backend.cards[kind]

    def class_names(self, kind: str = "diffusion") -> list[str]:
        return list(self.card(kind).class_names)

    def resolve_classes(self, classes, kind: str = "diffusion") -> np.ndarray | None:
        """Class ids or names (case/punctuation-insensitive, unique prefixes allowed) -> int64 ids."""
        if classes is None:
            return None
        names = self.class_names(kind)
        if isinstance(classes, (str, int, np.integer)):
            classes = [classes]
        ids = []
        for c in classes:
            if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
                if not 0 <= int(c) < len(names):
                    raise InvalidArgumentError(f"class id {c} out of range [0, {len(names) - 1}]")
                ids.append(int(c))
                continue
            if not isinstance(c, str):
                raise InvalidArgumentError(f"classes must be ids or names, got {c!r}")
            key = _norm(c)
            exact = [i for i, n in enumerate(names) if _norm(n) == key]
            prefix = [i for i, n in enumerate(names) if key and _norm(n).startswith(key)]
            match = exact or prefix
            if len(match) != 1:
                raise InvalidArgumentError(f"unknown class name {c!r}; choose one of {names}")
            ids.append(match[0])
        return np.asarray(ids, dtype=np.int64)

    # -- timing wrapper -----------------------------------------------------------------------------------------
    def _timed_run(self, graph: str, inputs: dict) -> dict:
        t0 = time.perf_counter()
        out = self.backend.run(graph, inputs)
        self.last_stats.call_s.append(time.perf_counter() - t0)
        self.last_stats.calls += 1
        self.last_stats.rows += len(next(iter(inputs.values())))
        return out

    def eps_model(self) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
        """The U-Net as the sampler's callable eps(x, t, y) (one backend call per sampler call)."""
        spec = self.backend.specs[UNET]
        x_name, t_name, y_name = (t.name for t in spec.inputs)
        out_name = spec.outputs[0].name
        return lambda x, t, y: self._timed_run(UNET, {x_name: x, t_name: t, y_name: y})[out_name]

    # -- diffusion ----------------------------------------------------------------------------------------------
    def sample(self, classes=None, n: int | None = None, *, sampler: str = "dpmpp-2m", steps: int = 20,
               guidance: float = 3.0, eta: float = 0.0, seed: int | None = 0, spacing: str | None = None,
               progress: bool = False, callback: Callable | None = None, raw: bool = False,
               loop: str = "client") -> np.ndarray:
        """Draw images from the diffusion model: uint8 (N, H, W, C), or float32 (N, C, H, W) in [-1, 1] with raw.

        classes: one id/name (repeated n times), a list of ids/names (one image each), or None (unconditional,
        n images). loop "client": this process runs the sampler and each step sends ONE request of 2N rows
        ([cond; null] stacked), combining the halves with uncond + guidance * (cond - uncond); guidance 1 or no
        classes sends N rows. loop "server" (Triton only): one request to the server's sampling loop model
        (diffusion_sampler), which runs the same loop next to the U-Net; no progress bar or callback. Deterministic in seed: both loops draw the
        same images for the same arguments (to float tolerance: the U-Net may run in different bucket layouts).
        """
        card = self.card("diffusion")
        labels, count = self._labels_and_count(classes, n, "diffusion")
        T = card.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
            raise InvalidArgumentError(f"steps must be an integer in [1, {T}], got {steps!r}")
        if sampler not in sampling.SAMPLERS:
            raise InvalidArgumentError(f"sampler must be one of {sampling.SAMPLERS}, got {sampler!r}")
        if loop not in LOOPS:
            raise InvalidArgumentError(f"loop must be one of {LOOPS}, got {loop!r}")
        shape = (int(count), *card.image.shape)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2 ** 63)
        elif loop == "server" and not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2 ** 63):
            raise InvalidArgumentError(f"seed must be an integer in [0, 2**63) for loop='server', got {seed!r}")
        self.last_stats = SampleStats()
        t0 = time.perf_counter()
        try:  # sample_progressive checks every argument (guidance, eta, spacing, labels) before any model call
            gen = sampling.sample_progressive(
                self.eps_model(), shape, labels, schedule=sampling.NoiseSchedule.from_dict(card.schedule),
                sampler=sampler, steps=steps, guidance=guidance, null_class=card.null_class,
                eta=eta, spacing=spacing, seed=seed, callback=callback, progress=progress)
        except ValueError as e:
            raise InvalidArgumentError(str(e)) from None
        if loop == "server":
            gen.close()
            x = self._sample_on_server(labels, count, card, sampler=sampler, steps=steps, guidance=guidance, eta=eta,
                                       seed=seed, spacing=spacing, progress=progress, callback=callback)
        else:
            x = sampling.last_estimate(gen)
        self.last_stats.wall_s = time.perf_counter() - t0
        return x if raw else to_uint8(x, card.image.value_range)

    def _sample_on_server(self, labels, count, card, *, sampler, steps, guidance, eta, seed, spacing, progress,
                          callback) -> np.ndarray:
        loop = self.backend.require_server_loop()
        if progress or callback is not None:
            raise InvalidArgumentError("progress and callback need loop='client' (the sampling loop model reports "
                                       "nothing until it is done)")
        if count > loop.max_images:
            raise InvalidArgumentError(f"n={count} images is more than the server's {SAMPLING_LOOP} takes per "
                                       f"request ({loop.max_images}); split the job or use loop='client'")
        values = [np.full(count, card.null_class, np.int64) if labels is None else labels.astype(np.int64),
                  np.array([seed], np.int64), np.array([steps], np.int64),
                  np.array([guidance], np.float64), np.array([eta], np.float64),
                  np.array([sampler.encode()], dtype=object), np.array([(spacing or "").encode()], dtype=object),
                  # the server stops the loop when this client stops waiting (an HTTP timeout cancels nothing)
                  np.array([self.backend.sample_timeout_s], np.float64)]
        feed = {t.name: v for t, v in zip(loop.spec.inputs, values)}  # in spec.loop_spec's order
        t0 = time.perf_counter()
        x = self.backend.run_loop(feed)
        self.last_stats.call_s.append(time.perf_counter() - t0)
        self.last_stats.calls += 1
        self.last_stats.rows += count
        return np.asarray(x, dtype=np.float32)

    # -- GAN ----------------------------------------------------------------------------------------------------
    def generate(self, classes=None, n: int | None = None, *, seed: int | None = 0, truncation: float | None = None,
                 raw: bool = False) -> np.ndarray:
        """GAN samples G(z, y), z ~ N(0, I) (optionally truncated to |z| <= truncation). classes as in sample();
        None draws uniformly random classes."""
        card = self.card("gan")
        labels, count = self._labels_and_count(classes, n, "gan")
        rng = np.random.default_rng(seed)
        if labels is None:
            labels = rng.integers(0, len(card.class_names), count).astype(np.int64)
        z = rng.standard_normal((count, card.latent_dim)).astype(np.float32)
        if truncation is not None:
            if not truncation > 0:
                raise InvalidArgumentError(f"truncation must be > 0, got {truncation!r}")
            z = np.clip(z, -truncation, truncation)
        spec = self.backend.specs[GENERATOR]
        return self._images(GENERATOR, {spec.inputs[0].name: z, spec.inputs[1].name: labels}, card, raw)

    # -- VAE ----------------------------------------------------------------------------------------------------
    def decode(self, z: np.ndarray, raw: bool = False) -> np.ndarray:
        card = self.card("vae")
        z = np.asarray(z, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != card.latent_dim:
            raise InvalidArgumentError(f"z must have shape (N, {card.latent_dim}), got {z.shape}")
        self._check_count(len(z), None, None)
        spec = self.backend.specs[DECODER]
        return self._images(DECODER, {spec.inputs[0].name: z}, card, raw)

    def generate_vae(self, n: int, *, seed: int | None = 0, temperature: float = 1.0, raw: bool = False) -> np.ndarray:
        """VAE samples: decode z ~ N(0, temperature^2 I)."""
        card = self.card("vae")
        self._check_count(n, n, None)
        if not temperature > 0:
            raise InvalidArgumentError(f"temperature must be > 0, got {temperature!r}")
        z = np.random.default_rng(seed).standard_normal((n, card.latent_dim)) * temperature
        return self.decode(z, raw)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Posterior means of images, uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1] -> (N, latent_dim)."""
        card = self.card("vae")
        if ENCODER not in self.backend.specs:
            raise ModelNotReadyError(f"{ENCODER} is not served; interpolation between images needs it")
        x = np.asarray(images)
        if x.ndim != 4:
            raise InvalidArgumentError(f"images must be a batch: uint8 (N, H, W, C) or float (N, C, H, W), got {x.shape}")
        if x.dtype == np.uint8:
            lo, hi = card.image.value_range
            x = x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 * (hi - lo) + lo
        spec = self.backend.specs[ENCODER]
        self.last_stats = SampleStats()
        return self._timed_run(ENCODER, {spec.inputs[0].name: x.astype(np.float32)})[spec.outputs[0].name]

    def interpolate(self, start, end, steps: int = 8, *, spherical: bool = True, raw: bool = False) -> np.ndarray:
        """Decode a path through the VAE latent space between two endpoints: class ids/names (the class's mean
        latent, stored with the model), images (encoded with the served encoder), or latent vectors."""
        card = self.card("vae")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 2 <= steps <= MAX_IMAGES:
            raise InvalidArgumentError(f"steps must be an integer in [2, {MAX_IMAGES}], got {steps!r}")
        za, zb = self._latent(start, card), self._latent(end, card)
        w = np.linspace(0.0, 1.0, steps)[:, None]
        if spherical:
            cos = np.dot(za, zb) / (np.linalg.norm(za) * np.linalg.norm(zb) + 1e-12)
            omega = np.arccos(np.clip(cos, -1, 1))
            if omega < 1e-6:
                z = (1 - w) * za + w * zb
            else:  # slerp keeps the path at a typical norm of N(0, I) samples
                z = (np.sin((1 - w) * omega) * za + np.sin(w * omega) * zb) / np.sin(omega)
        else:
            z = (1 - w) * za + w * zb
        return self.decode(z, raw)

    def _latent(self, end, card: ModelCard) -> np.ndarray:
        d = card.latent_dim
        if isinstance(end, (str, int, np.integer)):
            centroids = card.class_centroids
            if not centroids:
                raise InvalidArgumentError("this VAE has no class centroids; interpolate between images instead")
            return np.asarray(centroids[int(self.resolve_classes(end, "vae")[0])], dtype=np.float64)
        a = np.asarray(end)
        if a.ndim == 1 and a.shape[0] == d:
            return a.astype(np.float64)
        if a.ndim in (2, 3):  # one image: (H, W[, C]) uint8 or (C, H, W) float
            a = a[None] if a.dtype != np.uint8 else (a[None, ..., None] if a.ndim == 2 else a[None])
            return self.encode(a)[0].astype(np.float64)
        raise InvalidArgumentError(f"an endpoint must be a class, a latent of size {d}, or one image; got shape {a.shape}")

    # -- helpers ------------------------------------------------------------------------------------------------
    def _labels_and_count(self, classes, n, kind) -> tuple[np.ndarray | None, int]:
        """Class ids (one given class repeats n times) and the image count, checked."""
        labels = self.resolve_classes(classes, kind)
        if labels is not None and n is not None and len(labels) == 1:
            labels = np.repeat(labels, n)
        count = len(labels) if labels is not None else n
        self._check_count(count, n, labels)
        return labels, int(count)

    def _check_count(self, count, n, labels):
        if count is None or isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise InvalidArgumentError(f"n must be an integer >= 1 (or give classes), got {n!r}")
        if labels is not None and n is not None and n != len(labels):
            raise InvalidArgumentError(f"n={n} does not match the {len(labels)} classes given")
        if count > MAX_IMAGES:
            raise InvalidArgumentError(f"n={count} images is more than allowed per call ({MAX_IMAGES})")

    def _images(self, graph, inputs, card: ModelCard, raw):
        self.last_stats = SampleStats()
        t0 = time.perf_counter()
        out = self._timed_run(graph, inputs)[self.backend.specs[graph].outputs[0].name]
        self.last_stats.wall_s = time.perf_counter() - t0
        return out if raw else to_uint8(out, card.image.value_range)

    def save_grid(self, images: np.ndarray, path, nrow: int = 8, row_labels: Sequence[str] | None = None) -> Path:
        """Write uint8 (N, H, W, C) images as a PNG grid (labelled rows if row_labels), atomically."""
        grid = labelled_grid(images, nrow, row_labels) if row_labels else make_grid(images, nrow)
        return save_png(path, grid)

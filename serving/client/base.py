"""What TridentClient (sdk.py) and AsyncTridentClient (aio.py) share: the model cards, class names, every argument
check, and the request each method sends; everything but the sending. The sync client sends with a blocking call,
the asyncio client awaits; so the two draw the same images for the same arguments by construction.

The diffusion client loop is sampling.SamplingLoop, which names the U-Net call each step needs and takes the answer
(the sans-I/O pattern): neither client has its own copy of the loop.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import sampling
from ..card import DIFFUSION_KINDS, ModelCard
from ..errors import InvalidArgumentError, ModelNotReadyError
from ..graph_runtime import CLASS_LABEL, GUIDANCE, IMAGE, LATENT, NOISY_SAMPLE, TIMESTEP
from ..images import labelled_grid, make_grid, save_png, to_uint8
from ..spec import DECODER, DIFFUSION_MODELS, ENCODER, GENERATOR, UNET

MAX_IMAGES = 4096  # per call; larger jobs belong in a loop of calls
LOOPS = ("client", "server")  # where the diffusion sampling loop runs


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

    def add(self, seconds: float, rows: int) -> None:
        self.call_s.append(seconds)
        self.calls += 1
        self.rows += rows


@dataclass
class SampleJob:
    """A checked sample() call, nothing sent yet: the client loop (a SamplingLoop whose U-Net calls the client makes),
    or one request to a sampling loop model (feed; on_step when its progress streams back)."""

    card: ModelCard
    count: int
    loop: sampling.SamplingLoop | None = None  # loop "client"
    model: str = "diffusion"                   # the diffusion model family (spec.DIFFUSION_MODELS): the teacher or
                                               # the student
    feed: dict | None = None                   # loop "server": the sampling loop model's inputs
    on_step: Callable | None = None            # loop "server" with progress or callback: fed each streamed step


class ServerProgress:
    """The client's side of a streamed server-side loop: each step message (index, timestep, optional x_0 preview)
    moves the progress bar and reaches the callback as callback(i, t, None, preview); x stays on the server, and the
    preview is None between the steps that carry one. A callback returning False raises SamplingCancelled, which
    the backend answers by cancelling the request."""

    def __init__(self, steps: int, sampler: str, progress: bool, callback: Callable | None):
        self.callback = callback
        self.bar = sampling._progress_bar(steps, sampler) if progress else None

    def __call__(self, index: int, t: int, preview: np.ndarray | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None and self.callback(index, t, None, preview) is False:
            raise sampling.SamplingCancelled(index, t)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


class ClientBase:
    """Cards, checks and requests over a backend's metadata (cards, specs); subclasses send the requests."""

    def __init__(self, backend):
        self.backend = backend
        self.last_stats = SampleStats()

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

    # -- diffusion ----------------------------------------------------------------------------------------------
    def _sample_job(self, classes, n, *, seed, progress, callback, loop, model="diffusion", **settings) -> SampleJob:
        """Every check of sample(), before any request; see TridentClient.sample for the arguments. settings: the
        SamplingConfig fields (sampler, steps, guidance, eta, spacing, preview_every, sampler_options,
        guidance_t_min); sampler, steps and spacing None: the model's defaults (sampling.default_settings: a
        step-distilled student's DDIM at the steps it was distilled for, else DPM-Solver++(2M), 20 steps)."""
        if model not in DIFFUSION_KINDS:
            raise InvalidArgumentError(f"model must be one of {DIFFUSION_KINDS} (the diffusion teacher, or the student "
                                       f"distilled from it), got {model!r}")
        card = self.card(model)
        labels, count = self._labels_and_count(classes, n, model)
        for key, value in sampling.default_settings(card.distilled_steps).items():
            if settings.get(key) is None:
                settings[key] = value
        if loop not in LOOPS:
            raise InvalidArgumentError(f"loop must be one of {LOOPS}, got {loop!r}")
        if callback is not None and not callable(callback):
            raise InvalidArgumentError("callback must be callable as callback(i, t, x, x0)")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2 ** 63)
        elif loop == "server" and not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2 ** 63):
            raise InvalidArgumentError(f"seed must be an integer in [0, 2**63) for loop='server', got {seed!r}")
        client_side = loop == "client"
        try:  # sampling_loop checks every setting (one SamplingConfig) and the rest, before any model call
            steps_loop = sampling.sampling_loop(
                (count, *card.image.shape), labels, schedule=sampling.NoiseSchedule.from_dict(card.schedule),
                null_class=card.null_class, seed=seed, callback=callback if client_side else None,
                progress=progress and client_side, prediction_type=card.prediction_type,
                guidance_range=card.guidance_range, distilled_steps=card.distilled_steps, **settings)
        except ValueError as e:
            raise InvalidArgumentError(str(e)) from None
        config = steps_loop.config
        if client_side:
            return SampleJob(card, count, loop=steps_loop, model=model)

        streamed = progress or callback is not None
        server = self.backend.require_server_loop(stream=streamed, model=model)
        if count > server.max_images:
            raise InvalidArgumentError(f"n={count} images is more than the server's {server.spec.name} takes per "
                                       f"request ({server.max_images}); split the job or use loop='client'")
        # the server stops the loop when this client stops waiting (an HTTP timeout cancels nothing)
        feed = sampling.loop_request(config, np.full(count, card.null_class, np.int64) if labels is None else labels,
                                     seed, self.backend.sample_timeout_s, stream=streamed)
        served = {t.name for t in server.spec.inputs}
        if config.options and "sampler_options" not in served:
            raise InvalidArgumentError(f"the server's {server.spec.name} predates sampler options; rebuild its "
                                       f"repository with this trident or use loop='client'")
        if config.guidance_t_min and "guidance_t_min" not in served:
            raise InvalidArgumentError(f"the server's {server.spec.name} predates guidance_t_min; rebuild its "
                                       f"repository with this trident or use loop='client'")
        feed = {name: value for name, value in feed.items() if name in served}
        on_step = ServerProgress(config.steps, config.sampler, progress, callback) if streamed else None
        return SampleJob(card, count, feed=feed, on_step=on_step, model=model)

    def _unet_feed(self, x, t, y, w=None, graph: str = UNET) -> dict[str, np.ndarray]:
        """A U-Net request from a SamplingLoop's model_input(): (x, t, y), or a student's (x, t, y, w)."""
        values = {NOISY_SAMPLE: x, TIMESTEP: t, CLASS_LABEL: y}
        if w is not None:
            values[GUIDANCE] = w
        return self.backend.specs[graph].feed(values)

    @staticmethod
    def _unet_of(job: SampleJob) -> str:
        return DIFFUSION_MODELS[job.model].unet

    # -- GAN ----------------------------------------------------------------------------------------------------
    def _generate_request(self, classes, n, seed, truncation) -> tuple[dict, ModelCard]:
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
        return self.backend.specs[GENERATOR].feed({LATENT: z, CLASS_LABEL: labels}), card

    # -- VAE ----------------------------------------------------------------------------------------------------
    def _decode_request(self, z) -> tuple[dict, ModelCard]:
        card = self.card("vae")
        z = np.asarray(z, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != card.latent_dim:
            raise InvalidArgumentError(f"z must have shape (N, {card.latent_dim}), got {z.shape}")
        self._check_count(len(z), None, None)
        return self.backend.specs[DECODER].feed({LATENT: z}), card

    def _vae_latents(self, n, seed, temperature) -> np.ndarray:
        card = self.card("vae")
        self._check_count(n, n, None)
        if not temperature > 0:
            raise InvalidArgumentError(f"temperature must be > 0, got {temperature!r}")
        return np.random.default_rng(seed).standard_normal((n, card.latent_dim)) * temperature

    def _encode_request(self, images) -> dict:
        card = self.card("vae")
        if ENCODER not in self.backend.specs:
            raise ModelNotReadyError(f"{ENCODER} is not served; interpolation between images needs it")
        x = np.asarray(images)
        if x.ndim != 4:
            raise InvalidArgumentError(f"images must be a batch: uint8 (N, H, W, C) or float (N, C, H, W), got {x.shape}")
        if x.dtype == np.uint8:
            lo, hi = card.image.value_range
            x = x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 * (hi - lo) + lo
        return self.backend.specs[ENCODER].feed({IMAGE: x})

    def _check_interpolation(self, steps) -> ModelCard:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 2 <= steps <= MAX_IMAGES:
            raise InvalidArgumentError(f"steps must be an integer in [2, {MAX_IMAGES}], got {steps!r}")
        return self.card("vae")

    def _endpoint(self, end, card: ModelCard) -> tuple[np.ndarray | None, np.ndarray | None]:
        """An interpolation endpoint as (latent, None), or (None, one image as a batch) that must be encoded."""
        d = card.latent_dim
        if isinstance(end, (str, int, np.integer)):
            centroids = card.class_centroids
            if not centroids:
                raise InvalidArgumentError("this VAE has no class centroids; interpolate between images instead")
            return np.asarray(centroids[int(self.resolve_classes(end, "vae")[0])], dtype=np.float64), None
        a = np.asarray(end)
        if a.ndim == 1 and a.shape[0] == d:
            return a.astype(np.float64), None
        if a.ndim in (2, 3):  # one image: (H, W[, C]) uint8 or (C, H, W) float
            return None, a[None] if a.dtype != np.uint8 else (a[None, ..., None] if a.ndim == 2 else a[None])
        raise InvalidArgumentError(f"an endpoint must be a class, a latent of size {d}, or one image; got shape {a.shape}")

    @staticmethod
    def _latent_path(za, zb, steps: int, spherical: bool) -> np.ndarray:
        w = np.linspace(0.0, 1.0, steps)[:, None]
        if spherical:
            cos = np.dot(za, zb) / (np.linalg.norm(za) * np.linalg.norm(zb) + 1e-12)
            omega = np.arccos(np.clip(cos, -1, 1))
            if omega >= 1e-6:  # slerp keeps the path at a typical norm of N(0, I) samples
                return (np.sin((1 - w) * omega) * za + np.sin(w * omega) * zb) / np.sin(omega)
        return (1 - w) * za + w * zb

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

    @staticmethod
    def _finish(x: np.ndarray, card: ModelCard, raw: bool) -> np.ndarray:
        return x if raw else to_uint8(x, card.image.value_range)

    def save_grid(self, images: np.ndarray, path, nrow: int = 8, row_labels: Sequence[str] | None = None) -> Path:
        """Write uint8 (N, H, W, C) images as a PNG grid (labelled rows if row_labels), atomically."""
        grid = labelled_grid(images, nrow, row_labels) if row_labels else make_grid(images, nrow)
        return save_png(path, grid)

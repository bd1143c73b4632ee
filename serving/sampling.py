"""Diffusion sampling math: noise schedules, the DDPM / DDIM / DPM-Solver++(2M) steps, classifier-free guidance and the
sampling loop.

Pure numpy on float64 schedule tables (no torch, no transport): the same code drives training previews, the in-process
ONNX Runtime session and the Triton client. The network is only a callable `eps(x, t, y)`; this module never sees how
it runs.

The samplers follow the diffusers scheduler contract: `set_timesteps(n)`, loop over `timesteps`, `step(eps, t, x)`
returns a small frozen result. They reproduce diffusers' DDPMScheduler, DDIMScheduler and DPMSolverMultistepScheduler
(dpmsolver++, order 2, midpoint) step by step; see tests/test_sampling.py. One deliberate difference: DDIM steps to the
next timestep in `timesteps`, where diffusers' DDIMScheduler steps to `t - T // n`, which is only right for "leading"
spacing (diffusers issue #12633).
"""
from __future__ import annotations

import math
import inspect
import json
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from typing import Callable, Iterator

import numpy as np

SPACINGS = ("leading", "trailing", "linspace", "logsnr")
LOGSNR_MIN = -5.1  # the lowest log-SNR a "logsnr" grid starts from (diffusers' lambda_min_clipped for cosine)
SCHEDULE_KINDS = ("linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the model callable returns (card.PREDICTION_TYPES)

# model(x float32 [N, C, H, W], t float32 [N], y int64 [N]) -> eps float32 [N, C, H, W]; a guidance-distilled
# student's also takes w float32 [N], its guidance scale per row: model(x, t, y, w) (see GuidedModel below)
EpsModel = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
GuidedModel = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------------------------------------------
# Noise schedule
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NoiseSchedule:
    """The forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), t in [0, T).

    kind "linear": DDPM betas linspace(beta_start, beta_end, T) (Ho et al. 2020).
    kind "cosine": abar(t) = cos((t/T + s) / (1 + s) * pi/2)^2, s = 0.008, betas capped at 0.999 (Nichol & Dhariwal
    2021; diffusers "squaredcos_cap_v2"). beta_start and beta_end are unused by it.
    """

    kind: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"NoiseSchedule.kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        T = self.num_train_timesteps
        if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
            raise ValueError(f"NoiseSchedule.num_train_timesteps must be an integer >= 1, got {T!r}")
        for name in ("beta_start", "beta_end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not 0.0 < v < 1.0:
                raise ValueError(f"NoiseSchedule.{name} must be a number in (0, 1), got {v!r}")
        if self.beta_start > self.beta_end:
            raise ValueError(f"NoiseSchedule.beta_start ({self.beta_start}) must be <= beta_end ({self.beta_end})")
        # plain Python numbers, so that to_dict() is JSON-able whatever numpy scalars came in
        object.__setattr__(self, "num_train_timesteps", int(T))
        object.__setattr__(self, "beta_start", float(self.beta_start))
        object.__setattr__(self, "beta_end", float(self.beta_end))

    @cached_property
    def betas(self) -> np.ndarray:
        """float64 [T], read-only."""
        T = self.num_train_timesteps
        if self.kind == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64)
        else:
            def abar(u: float) -> float:
                return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
            # beta_t = 1 - abar((t+1)/T) / abar(t/T) (Nichol & Dhariwal sec. 3.2), capped against the singularity at T
            betas = np.array([min(1.0 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=np.float64)
        betas.flags.writeable = False
        return betas

    @cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """abar_t = prod_{s<=t} (1 - beta_s), float64 [T], read-only."""
        abar = np.cumprod(1.0 - self.betas)
        abar.flags.writeable = False
        return abar

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> NoiseSchedule:
        """Inverse of to_dict. Values may also be strings (Triton config parameters are string_value)."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"NoiseSchedule: unknown keys {unknown}; allowed: {names}")
        casts = {"kind": str, "num_train_timesteps": int, "beta_start": float, "beta_end": float}
        try:
            kwargs = {k: casts[k](v) if isinstance(v, str) else v for k, v in d.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"NoiseSchedule.from_dict: bad value in {d!r}: {e}") from None
        return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Timestep spacing ("linspace", "leading", "trailing": Lin et al. 2023, table 2; the formulas are diffusers'.
# "logsnr": uniform in log-SNR, DPM-Solver's own step schedule, Lu et al. 2022, sec. 3.3 / app. D)
# ----------------------------------------------------------------------------------------------------------------

def log_snr(alphas_cumprod) -> np.ndarray:
    """lambda_t = log(alpha_t / sigma_t) = 0.5 log(abar_t / (1 - abar_t)), float64 [T], decreasing in t."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    return 0.5 * (np.log(abar) - np.log1p(-abar))


def spaced_timesteps(num_train_timesteps: int, steps: int, spacing: str, *, skip_zero: bool = False,
                     alphas_cumprod=None) -> np.ndarray:
    """Descending int64 [steps] timesteps in [0, T).

    skip_zero (DPM-Solver): lay out steps + 1 points and drop the last one (t = 0 for linspace/leading/logsnr),
    because that solver's final step lands on sigma = 0 instead of evaluating the model there.
    "logsnr" (needs the schedule's alphas_cumprod): points uniform in lambda = log(alpha / sigma) from t = T - 1 to
    t = 0, each the timestep nearest in lambda, as "linspace" is uniform in t. Its steps are short where lambda moves
    fast (low noise) and long where it barely moves (high noise), which is where a solver's error is made and where it
    is not: the shipped teacher's unguided DPM-Solver++-20 FD is 23.3 with linspace and 17.2 with logsnr (n=1000,
    checkpoints/diffusion/TRAINING.md). diffusers' use_lu_lambdas is the same idea with steps points and solver
    sigmas off the timestep grid; here every step's alpha and sigma are its timestep's, as for the other spacings.
    """
    T = num_train_timesteps
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"steps (num_inference_steps) must be an integer in [1, {T}] (num_train_timesteps), "
                         f"got {steps!r}")
    m = steps + 1 if skip_zero else steps
    if spacing == "logsnr":
        if alphas_cumprod is None or len(alphas_cumprod) != T:
            raise ValueError(f"spacing 'logsnr' needs the schedule's alphas_cumprod ({T} values)")
        if m > T:
            raise ValueError(f"steps={steps} with spacing='logsnr' needs {m} distinct timesteps, more than "
                             f"num_train_timesteps={T}; use fewer steps")
        lam = log_snr(alphas_cumprod)  # [T], decreasing
        # the grid starts at LOGSNR_MIN at the lowest: the cosine schedule's capped last beta drops lambda from -6.5 at
        # t=998 to -9.9 at t=999, and a grid from -9.9 would spend its first steps on 999, 998, 997, ... (diffusers'
        # lambda_min_clipped); the first point is still t = T - 1, where the loop starts from pure noise
        low = max(lam[T - 1], LOGSNR_MIN)
        targets = np.linspace(low, lam[0], m)  # m = 1: [low]
        # nearest timestep in lambda: lam is decreasing, so search the increasing -lam
        right = np.clip(np.searchsorted(-lam, -targets), 1, T - 1)
        left = right - 1
        ts = np.where(np.abs(lam[left] - targets) <= np.abs(lam[right] - targets), left, right)
        ts[0] = T - 1
        # where lambda moves fast between neighbouring timesteps (t near 0) several points share a nearest timestep:
        # each then takes the next free one, below its predecessor, then above its successor, so the steps stay
        # distinct and in [0, T). With skip_zero the dropped last point counts too: at 50+ steps the kept ones end
        # ..., 3, 2, 1 rather than at 0.
        for i in range(1, m):
            ts[i] = min(ts[i], ts[i - 1] - 1)
        ts[-1] = max(ts[-1], 0)
        for i in range(m - 2, -1, -1):
            ts[i] = max(ts[i], ts[i + 1] + 1)
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, m).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(m) * (T // m)).round()[::-1]
    else:
        # float arange can yield one extra point near 0 (e.g. T=1000, steps=61; diffusers then keeps t=-1): cut it.
        ts = np.round(np.arange(T, 0, -T / steps)) - 1
    ts = ts[:steps].astype(np.int64)
    if len(np.unique(ts)) != steps:
        raise ValueError(f"steps={steps} with spacing={spacing!r} repeats timesteps for num_train_timesteps={T}; "
                         f"use fewer steps or another spacing")
    return ts


def _timestep_index(timesteps: np.ndarray | None, t) -> int:
    if timesteps is None:
        raise ValueError("Number of inference steps is not set: call set_timesteps(num_inference_steps) "
                         "on the sampler before step()")
    hits = np.flatnonzero(timesteps == int(t))
    if len(hits) == 0:
        raise ValueError(f"timestep {int(t)} is not in this sampler's timesteps; pass values from .timesteps")
    return int(hits[0])


def _as_f64(a, name: str, shape=None) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape} (the sample's shape)")
    return a


# ----------------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepOutput:
    prev_sample: np.ndarray           # x_{t_prev}, float64 [B, C, H, W]
    pred_original_sample: np.ndarray  # x_0 estimate at t (clipped when the sampler clips), float64 [B, C, H, W]


class _Sampler:
    """Shared timestep bookkeeping. Subclasses implement step()."""

    name = ""
    default_spacing = "leading"
    _skip_zero = False

    def __init__(self, schedule: NoiseSchedule, rng: np.random.Generator | None = None):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.rng = rng
        self.timesteps: np.ndarray | None = None  # set by set_timesteps
        self.num_inference_steps: int | None = None
        self.spacing: str | None = None

    def set_timesteps(self, num_inference_steps: int, spacing: str | None = None) -> None:
        spacing = self.default_spacing if spacing is None else spacing
        self.timesteps = spaced_timesteps(self.schedule.num_train_timesteps, num_inference_steps, spacing,
                                          skip_zero=self._skip_zero, alphas_cumprod=self.schedule.alphas_cumprod)
        self.num_inference_steps = int(num_inference_steps)
        self.spacing = spacing

    def _noise(self, noise, shape) -> np.ndarray:
        if noise is not None:
            return _as_f64(noise, "noise", shape)
        if self.rng is None:
            self.rng = np.random.default_rng()  # unseeded: pass rng=np.random.default_rng(seed) to reproduce
        return self.rng.standard_normal(shape)

    def _abar_prev(self, i: int) -> tuple[int, float]:
        """The timestep after timesteps[i] and its abar; past the end, t = -1 with abar = 1 (x_0 itself)."""
        if i + 1 < len(self.timesteps):
            prev_t = int(self.timesteps[i + 1])
            return prev_t, float(self.schedule.alphas_cumprod[prev_t])
        return -1, 1.0

    def __repr__(self):
        return f"{type(self).__name__}(steps={self.num_inference_steps}, spacing={self.spacing!r})"


def _clip(x0: np.ndarray, clip: bool, limit: float) -> np.ndarray:
    return np.clip(x0, -limit, limit) if clip else x0


class DDPMSampler(_Sampler):
    """Ancestral sampling, Ho et al. 2020 (diffusers DDPMScheduler, variance "fixed_small" or "fixed_large")."""

    name = "ddpm"
    default_spacing = "leading"

    def __init__(self, schedule: NoiseSchedule, *, clip_sample: bool = True, clip_sample_range: float = 1.0,
                 variance: str = "fixed_small", rng: np.random.Generator | None = None):
        super().__init__(schedule, rng)
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance must be 'fixed_small' or 'fixed_large', got {variance!r}")
        if not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range!r}")
        self.clip_sample, self.clip_sample_range, self.variance = bool(clip_sample), float(clip_sample_range), variance

    def step(self, model_output, t, sample, noise=None) -> StepOutput:
        i = _timestep_index(self.timesteps, t)
        t = int(t)
        x = _as_f64(sample, "sample")
        eps = _as_f64(model_output, "model_output", x.shape)
        _, abar_prev = self._abar_prev(i)
        abar_t = float(self.schedule.alphas_cumprod[t])
        beta_t = 1.0 - abar_t / abar_prev  # the beta of the (possibly strided) step t -> prev

        # x_0 from eps: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. eq. 4, solved for x_0; eq. 15)
        x0 = _clip((x - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t), self.clip_sample, self.clip_sample_range)

        # posterior mean mu~_t(x_t, x_0) (Ho et al. eq. 7)
        mean = (math.sqrt(abar_prev) * beta_t / (1.0 - abar_t)) * x0 \
            + (math.sqrt(1.0 - beta_t) * (1.0 - abar_prev) / (1.0 - abar_t)) * x

        # x_{t-1} = mu~ + sigma_t z, sigma_t^2 = beta~_t (eq. 7, "fixed_small") or beta_t ("fixed_large"); no z at t=0
        if t > 0:
            if self.variance == "fixed_small":
                var = max((1.0 - abar_prev) / (1.0 - abar_t) * beta_t, 1e-20)
            else:
                var = beta_t
            mean = mean + math.sqrt(var) * self._noise(noise, x.shape)
        return StepOutput(prev_sample=mean, pred_original_sample=x0)


class DDIMSampler(_Sampler):
    """DDIM, Song et al. 2021 (diffusers DDIMScheduler; use_clipped_model_output=True by default, see step()).

    use_clipped_model_output (diffusers' name): after clipping x_0, re-derive eps from the clipped x_0, as
    guided-diffusion's DDIM does (`_predict_eps_from_xstart`). With False (diffusers' default) the step mixes the
    clipped x_0 with the model's unclipped eps; under classifier-free guidance eps is large, the two disagree, and
    every step drifts brighter: 1000 DDIM-20 samples at guidance 3 from the shipped U-Net had a mean pixel of ~119
    (real data ~73) and 46% were classified as their class, against ~89 and 99% with this default
    (benchmarks/results/quality.md).
    """

    name = "ddim"
    default_spacing = "leading"

    def __init__(self, schedule: NoiseSchedule, *, eta: float = 0.0, clip_sample: bool = True,
                 clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
                 use_clipped_model_output: bool = True, rng: np.random.Generator | None = None):
        super().__init__(schedule, rng)
        if not (isinstance(eta, (int, float, np.floating)) and math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta!r}")
        if not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range!r}")
        self.eta, self.clip_sample, self.clip_sample_range = float(eta), bool(clip_sample), float(clip_sample_range)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.use_clipped_model_output = bool(use_clipped_model_output)

    def step(self, model_output, t, sample, noise=None) -> StepOutput:
        i = _timestep_index(self.timesteps, t)
        x = _as_f64(sample, "sample")
        eps = _as_f64(model_output, "model_output", x.shape)
        prev_t, abar_prev = self._abar_prev(i)
        if prev_t < 0 and not self.set_alpha_to_one:
            abar_prev = float(self.schedule.alphas_cumprod[0])
        abar_t = float(self.schedule.alphas_cumprod[int(t)])

        # "predicted x_0" (Song et al. eq. 12, first term)
        x0 = _clip((x - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t), self.clip_sample, self.clip_sample_range)
        if self.clip_sample and self.use_clipped_model_output:
            # the eps that the clipped x_0 implies at x_t, so that both terms of eq. 12 describe the same x_0
            eps = (x - math.sqrt(abar_t) * x0) / math.sqrt(1.0 - abar_t)

        # sigma_t(eta) = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev) (eq. 16)
        std = self.eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))

        # x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z (eq. 12: "direction pointing to
        # x_t" plus random noise)
        prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - std ** 2, 0.0)) * eps
        if self.eta > 0:
            prev = prev + std * self._noise(noise, x.shape)
        return StepOutput(prev_sample=prev, pred_original_sample=x0)


class DPMSolverPP2MSampler(_Sampler):
    """DPM-Solver++(2M), Lu et al. 2022 alg. 2 (diffusers DPMSolverMultistepScheduler, algorithm_type="dpmsolver++",
    solver_order=2, solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero").

    Multistep: step() must see the timesteps in order; set_timesteps() restarts. clip_sample clips the x_0 estimate
    to [-clip_sample_range, clip_sample_range] (diffusers: thresholding=True with sample_max_value=range).

    Its default spacing is "logsnr" (steps uniform in log-SNR, the layout DPM-Solver was derived for), not diffusers'
    default "linspace": on the shipped teacher, 20 steps give FD 17.2 against 23.3 unguided (spaced_timesteps).
    spacing="linspace" gives diffusers' layout and its numbers step for step (tests/test_sampling.py).
    """

    name = "dpmpp-2m"
    default_spacing = "logsnr"
    _skip_zero = True

    # clip_sample defaults to True here although diffusers' thresholding defaults to False: our models are pixel-space
    # with data in [-1, 1], and the data prediction x_0 = (x - sigma eps) / alpha amplifies the eps error by
    # 1 / alpha (~158 at t=999 of the linear schedule). Unclipped, a small model's first steps overshoot to |x_0| >> 1
    # and some samples end as salt-and-pepper noise (seen on the shipped U-Net); diffusers recommends thresholding for
    # pixel-space models for the same reason.
    def __init__(self, schedule: NoiseSchedule, *, clip_sample: bool = True, clip_sample_range: float = 1.0,
                 rng: np.random.Generator | None = None):
        super().__init__(schedule, rng)
        if not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range!r}")
        self.clip_sample, self.clip_sample_range = bool(clip_sample), float(clip_sample_range)
        self._reset()

    def _reset(self):
        self._step_index: int | None = None
        self._prev_x0: np.ndarray | None = None  # data prediction from the previous step (the "2M" memory)

    def set_timesteps(self, num_inference_steps: int, spacing: str | None = None) -> None:
        super().set_timesteps(num_inference_steps, spacing)
        abar = self.schedule.alphas_cumprod[self.timesteps]
        # alpha_t, sigma_t of x_t = alpha_t x_0 + sigma_t eps at each timestep, then the final point sigma = 0
        self._alpha = np.append(np.sqrt(abar), 1.0)        # [n + 1]
        self._sigma = np.append(np.sqrt(1.0 - abar), 0.0)  # [n + 1]
        self._reset()

    def step(self, model_output, t, sample, noise=None) -> StepOutput:
        if self._step_index is None:
            self._step_index = _timestep_index(self.timesteps, t)  # may start mid-schedule (e.g. img2img)
        i = self._step_index
        if i >= len(self.timesteps):
            raise ValueError(f"all {len(self.timesteps)} steps are done; call set_timesteps() to sample again")
        if int(t) != int(self.timesteps[i]):
            raise ValueError(f"dpmpp-2m is multistep and expects timestep {int(self.timesteps[i])} at step {i}, "
                             f"got {int(t)}; call set_timesteps() to restart")
        x = _as_f64(sample, "sample")
        eps = _as_f64(model_output, "model_output", x.shape)
        alpha_s, sigma_s = self._alpha[i], self._sigma[i]
        alpha_t, sigma_t = self._alpha[i + 1], self._sigma[i + 1]

        # data prediction x_theta(x_s, s) = (x_s - sigma_s eps) / alpha_s (Lu et al. 2022, sec. 3)
        x0 = _clip((x - sigma_s * eps) / alpha_s, self.clip_sample, self.clip_sample_range)

        if sigma_t == 0.0:
            # last step onto sigma = 0 (lambda = +inf, always first order): x_t = alpha_t x0 with alpha_t = 1
            prev = x0
        else:
            lam_s, lam_t = math.log(alpha_s / sigma_s), math.log(alpha_t / sigma_t)  # lambda = log(alpha / sigma)
            h = lam_t - lam_s
            if self._prev_x0 is None:
                d = x0  # first step: DPM-Solver++(1), i.e. DDIM
            else:
                # D = (1 + 1/(2r)) x0_s - 1/(2r) x0_{s-1}, r = h_{prev} / h (alg. 2, line 6)
                a_p, s_p = self._alpha[i - 1], self._sigma[i - 1]
                r = (lam_s - math.log(a_p / s_p)) / h
                d = x0 + (0.5 / r) * (x0 - self._prev_x0)
            # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D (alg. 2, line 7)
            prev = (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * d
        self._prev_x0 = x0
        self._step_index = i + 1
        return StepOutput(prev_sample=prev, pred_original_sample=x0)


# The one sampler registry: name -> class. Its keys are the names every interface takes.
SAMPLER_CLASSES = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpmpp-2m": DPMSolverPP2MSampler}
SAMPLERS = tuple(SAMPLER_CLASSES)


def sampler_options_of(name: str) -> tuple[str, ...]:
    """The keyword options of a sampler's constructor (all but the schedule and rng)."""
    params = inspect.signature(SAMPLER_CLASSES[name].__init__).parameters
    return tuple(p for p in params if p not in ("self", "schedule", "rng"))


def make_sampler(name: str, schedule: NoiseSchedule, **options):
    """A fresh sampler. Options: ddpm: clip_sample, clip_sample_range, variance; ddim: eta, clip_sample,
    clip_sample_range, set_alpha_to_one, use_clipped_model_output; dpmpp-2m: clip_sample, clip_sample_range; all:
    rng (np.random.Generator)."""
    if name not in SAMPLER_CLASSES:
        raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
    return SAMPLER_CLASSES[name](schedule, **options)


def eps_from_prediction(model_output, x, t, schedule: NoiseSchedule, prediction_type: str) -> np.ndarray:
    """The noise eps that a U-Net's output stands for, float64, so every sampler works in eps alone.

    "epsilon": the output is eps. "v_prediction": v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022,
    sec. 4), and with x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t.
    The map is affine in the output with x_t fixed, so guidance on v equals guidance on eps: cfg_combine may run
    before or after it. t: one int timestep, or int [N] per row.
    """
    out = np.asarray(model_output, dtype=np.float64)
    if prediction_type == "epsilon":
        return out
    if prediction_type != "v_prediction":
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    abar = np.asarray(schedule.alphas_cumprod[np.asarray(t, dtype=np.int64)], dtype=np.float64)
    abar = abar.reshape(abar.shape + (1,) * (out.ndim - abar.ndim))  # scalar, or [N, 1, 1, 1]
    return np.sqrt(abar) * out + np.sqrt(1.0 - abar) * np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------

def cfg_model_input(x, t: int, labels, guidance: float, null_class: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one model call a guided step needs: (x float32 [N, C, H, W], t float32 [N], y int64 [N]).

    labels None: N = B rows with y = null_class (unconditional). guidance 1: the B conditional rows. Otherwise the
    stacked batch [x; x] with y = [labels; null], N = 2B, as diffusers' DiT pipeline; cfg_combine splits the answer.
    """
    x = np.asarray(x, dtype=np.float64)  # [B, C, H, W]
    b = x.shape[0]
    null = np.full((b,), null_class, dtype=np.int64)
    if labels is None:
        y = null
    elif guidance == 1:
        y = np.asarray(labels, dtype=np.int64).reshape(b)
    else:
        x, y = np.concatenate([x, x]), np.concatenate([np.asarray(labels, dtype=np.int64).reshape(b), null])
    return x.astype(np.float32), np.full((len(x),), t, dtype=np.float32), y


def cfg_combine(model_output, model_x: np.ndarray, labels, guidance: float) -> np.ndarray:
    """The guided eps from the answer to cfg_model_input's call: uncond + guidance * (cond - uncond), float64."""
    out = np.asarray(model_output, dtype=np.float64)
    if out.shape != model_x.shape:
        raise ValueError(f"model returned shape {out.shape} for input of shape {model_x.shape}; "
                         f"expected eps of the same shape")
    if labels is None or guidance == 1:
        return out
    b = len(out) // 2
    cond, uncond = out[:b], out[b:]  # [B, C, H, W] each
    return uncond + guidance * (cond - uncond)


def cfg_eps(model: EpsModel, x, t: int, labels, guidance: float, null_class: int) -> np.ndarray:
    """Guided eps = eps(x, null) + s * (eps(x, y) - eps(x, null)) (Ho & Salimans 2022), float64 [B, C, H, W].

    labels None: unconditional, one call with y = null_class. guidance 1: one call on the conditional batch.
    Otherwise one call on the stacked batch [x; x] with y = [labels; null], as diffusers' DiT pipeline.
    """
    xs, ts, ys = cfg_model_input(x, t, labels, guidance, null_class)  # [N, C, H, W], N = B or 2B
    return cfg_combine(model(xs, ts, ys), xs, labels, guidance)


def guidance_input(x, t: int, labels, guidance: float, null_class: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The one model call a step of a guidance-distilled student needs (Meng et al. 2023, stage one: the network
    learnt uncond + w * (cond - uncond) with w as an input): (x float32 [B, C, H, W], t float32 [B], y int64 [B],
    w float32 [B]). One row per image at any guidance, no [cond; null] pair; labels None: y = null_class (the
    student then gives the unconditional output whatever w is)."""
    x = np.asarray(x, dtype=np.float64)
    b = x.shape[0]
    y = np.full((b,), null_class, np.int64) if labels is None else np.asarray(labels, dtype=np.int64).reshape(b)
    return x.astype(np.float32), np.full((b,), t, np.float32), y, np.full((b,), guidance, np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Sampling loop
# ----------------------------------------------------------------------------------------------------------------

# How a step-distilled student draws by default: DDIM on the "trailing" grid at the steps it was distilled for, the
# grid whose 2N-step layout holds its N-step one (training/distill.py stage_timesteps), so 1, 2, 4, ... steps all walk
# timesteps it learnt. Other diffusion models default to DPM-Solver++(2M), 20 steps.
STUDENT_SPACING = "trailing"


def default_settings(distilled_steps: int | None = None) -> dict:
    """The sampler, steps (and spacing) a diffusion model draws with when the caller names none: the card's
    distilled_steps (a step-distilled student) or None (a teacher, a guidance-only student)."""
    if distilled_steps is None:
        return {"sampler": "dpmpp-2m", "steps": 20}
    return {"sampler": "ddim", "steps": int(distilled_steps), "spacing": STUDENT_SPACING}


def default_timesteps(schedule: NoiseSchedule, distilled_steps: int | None = None) -> list[int]:
    """The timesteps a diffusion model's default sampling (default_settings) walks on this schedule: what its quality
    gate verdicts were drawn at, recorded with them, so that a verdict judged before the default changed (DPM-Solver++
    moved from linspace to logsnr) is not taken for a current one (serving/precision.py gate_reasons)."""
    d = default_settings(distilled_steps)
    solver = make_sampler(d["sampler"], schedule)
    solver.set_timesteps(d["steps"], d.get("spacing"))
    return [int(t) for t in solver.timesteps]


# Bounds on the loop's numeric arguments, checked before any model call (the SDK, the CLI and the server-side loop
# all pass through sample_progressive). Guidance past ~10 only saturates the images (quality.md: FD rises from
# guidance 1.5 on); 50 leaves room to experiment and keeps a guided eps far from float overflow. DDIM's eta runs from
# 0 (deterministic) to 1 (DDPM-like variance).
MAX_GUIDANCE = 50.0
MAX_ETA = 1.0


def _check_int(name: str, v, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {rng}, got {v!r}")
    return int(v)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class SamplingConfig:
    """How one diffusion sampling run goes: the sampler and its settings, checked once here (ValueError naming the
    field) and serialisable, so the client's loop, the server-side loop and the CLI run the same settings.

    sampler: a SAMPLERS name. steps: model calls (checked against the schedule's T when the loop is made). guidance:
    1 = none, else uncond + guidance * (cond - uncond). eta: DDIM's noise (0 deterministic .. 1 DDPM-like).
    spacing: None = the sampler's default. clip_sample: None = the sampler's default. options: further keyword
    options of the sampler (sampler_options_of), e.g. DDIM's use_clipped_model_output. preview_every: the streaming
    server loop sends the x_0 estimate every this many steps (0: never). guidance_t_min: guidance only at the steps
    whose timestep t >= guidance_t_min, the conditional output alone below (guidance in a limited interval,
    Kynkäänniemi et al. 2024): a teacher's step there sends B rows instead of the [cond; null] 2B, a student's gets
    w = 1. 0 (the default): guidance at every step.
    """

    sampler: str = "dpmpp-2m"
    steps: int = 20
    guidance: float = 3.0
    eta: float = 0.0
    spacing: str | None = None
    clip_sample: bool | None = None
    options: dict = field(default_factory=dict)
    preview_every: int = 0
    guidance_t_min: int = 0

    def __post_init__(self):
        if self.sampler not in SAMPLER_CLASSES:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        object.__setattr__(self, "steps", _check_int("steps", self.steps, 1))
        if not (_is_number(self.guidance) and 0 <= self.guidance <= MAX_GUIDANCE):
            raise ValueError(f"guidance must be a finite number >= 0 and <= {MAX_GUIDANCE:g} (1 = no guidance), "
                             f"got {self.guidance!r}")
        if not (_is_number(self.eta) and 0 <= self.eta <= MAX_ETA):
            raise ValueError(f"eta must be a finite number >= 0 and <= {MAX_ETA:g}, got {self.eta!r}")
        if self.eta > 0 and self.sampler != "ddim":
            raise ValueError(f"eta={self.eta} applies to the 'ddim' sampler only, not {self.sampler!r}")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS} or None (the sampler's default), got {self.spacing!r}")
        if self.clip_sample is not None and not isinstance(self.clip_sample, bool):
            raise ValueError(f"clip_sample must be True, False or None, got {self.clip_sample!r}")
        if not isinstance(self.options, dict):
            raise ValueError(f"sampler options must be a dict, got {type(self.options).__name__}")
        allowed = [o for o in sampler_options_of(self.sampler) if o not in ("eta", "clip_sample")]
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ValueError(f"sampler options {unknown} do not fit sampler {self.sampler!r} (it takes {allowed}; "
                             f"eta and clip_sample are fields of their own)")
        bad = [k for k, v in self.options.items() if not (isinstance(v, (bool, str)) or _is_number(v))]
        if bad:
            raise ValueError(f"sampler options {bad} must be numbers, booleans or strings")
        object.__setattr__(self, "guidance", float(self.guidance))
        object.__setattr__(self, "eta", float(self.eta))
        p = self.preview_every
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= p <= self.steps:
            raise ValueError(f"preview_every must be an integer in [0, steps={self.steps}] (0: no previews), got {p!r}")
        object.__setattr__(self, "preview_every", int(p))
        m = self.guidance_t_min
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0:
            raise ValueError(f"guidance_t_min must be an integer timestep >= 0 (0: guidance at every step), got {m!r}")
        object.__setattr__(self, "guidance_t_min", int(m))

    def solver(self, schedule: NoiseSchedule, rng: np.random.Generator | None = None) -> _Sampler:
        """The sampler this config names, on the schedule, with its timesteps set (steps <= T checked there)."""
        options = dict(self.options)
        if self.clip_sample is not None:
            options["clip_sample"] = self.clip_sample
        if self.sampler == "ddim":
            options["eta"] = self.eta
        try:
            solver = make_sampler(self.sampler, schedule, rng=rng, **options)
        except TypeError as e:  # unreachable for checked options; kept as a named error, not a crash
            raise ValueError(f"sampler options {sorted(options)} do not fit sampler {self.sampler!r}: {e}") from None
        solver.set_timesteps(self.steps, spacing=self.spacing)  # validates steps against T and the spacing
        return solver

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> SamplingConfig:
        """Inverse of to_dict; unknown fields are refused (ValueError naming them)."""
        if not isinstance(data, dict):
            raise ValueError(f"a sampling config must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"sampling config: unknown fields {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> SamplingConfig:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"sampling config is not JSON: {e}") from None


def sampling_config(config: SamplingConfig | None = None, **settings) -> SamplingConfig:
    """A SamplingConfig, or one built from its fields given as keyword arguments (not both)."""
    if config is not None:
        if settings:
            raise ValueError(f"pass config or its fields {sorted(settings)}, not both")
        if not isinstance(config, SamplingConfig):
            raise ValueError(f"config must be a SamplingConfig, got {type(config).__name__}")
        return config
    names = {f.name for f in fields(SamplingConfig)}
    unknown = sorted(set(settings) - names - {"sampler_options"})
    if unknown:
        raise ValueError(f"unknown sampling arguments {unknown}; SamplingConfig has {sorted(names)}")
    if "sampler_options" in settings:  # the keyword of earlier versions
        settings = dict(settings)
        settings["options"] = settings.pop("sampler_options") or {}
    return SamplingConfig(**settings)


# ----------------------------------------------------------------------------------------------------------------
# The server-side loop's request: one table, read by name on both ends
# ----------------------------------------------------------------------------------------------------------------

# tensor name -> (numpy dtype name, shape, optional). A SamplingConfig travels field by field under the fields' own
# names (its options as JSON under "sampler_options"), next to the run's labels, seed and time limit. spec.loop_spec
# declares these tensors to Triton, loop_request fills them and config_from_request reads them back by name in the
# sampling loop model (serving/server/runtime/loop_model.py): the names are written here only.
LOOP_REQUEST = {
    "class_label": ("int64", (-1,), False),    # N labels in [0, null_class]; all null = unconditional
    "seed": ("int64", (1,), False),            # initial and step noise
    "steps": ("int64", (1,), False),
    "guidance": ("float64", (1,), False),      # float64, as the client loop uses
    "eta": ("float64", (1,), False),
    "sampler": ("bytes", (1,), False),
    "spacing": ("bytes", (1,), False),         # "" = the sampler's default
    # stop (with an error) once the loop has run this long: the client's timeout, since an HTTP client that gives up
    # does not cancel the request; left out or 0 = no limit
    "max_seconds": ("float64", (1,), True),
    "sampler_options": ("bytes", (1,), True),  # JSON object of SamplingConfig.options; left out = none
    "guidance_t_min": ("int64", (1,), True),   # left out or 0 = guidance at every step
}
LOOP_STREAM_REQUEST = {**LOOP_REQUEST, "preview_every": ("int64", (1,), True)}  # 0/absent: no previews


def loop_request(config: SamplingConfig, labels: np.ndarray, seed: int, max_seconds: float,
                 stream: bool) -> dict[str, np.ndarray]:
    """The sampling loop model's inputs for one run, by name."""
    values = {"class_label": np.asarray(labels, np.int64), "seed": np.array([seed], np.int64),
              "steps": np.array([config.steps], np.int64), "guidance": np.array([config.guidance], np.float64),
              "eta": np.array([config.eta], np.float64), "sampler": np.array([config.sampler.encode()], dtype=object),
              "spacing": np.array([(config.spacing or "").encode()], dtype=object),
              "max_seconds": np.array([max_seconds], np.float64),
              "sampler_options": np.array([json.dumps(config.options, sort_keys=True).encode()], dtype=object),
              "preview_every": np.array([config.preview_every], np.int64),
              "guidance_t_min": np.array([config.guidance_t_min], np.int64)}
    return {name: values[name] for name in (LOOP_STREAM_REQUEST if stream else LOOP_REQUEST)}


def config_from_request(values: dict[str, np.ndarray]) -> tuple[SamplingConfig, np.ndarray, int, float]:
    """(config, labels int64 [N], seed, max_seconds) from a loop request's tensors by name, the inverse of
    loop_request; a tensor the table marks optional may be missing. ValueError names the bad input."""
    def scalar(name, cast, default=None):
        if name not in values:
            if default is None:
                raise ValueError(f"input '{name}' is missing")
            return default
        a = np.asarray(values[name]).reshape(-1)
        if a.size != 1:
            raise ValueError(f"input '{name}' must hold one value, got {a.size}")
        v = a[0]
        return v.decode() if isinstance(v, bytes) else cast(v)

    if "class_label" not in values:
        raise ValueError("input 'class_label' is missing")
    labels = np.asarray(values["class_label"]).reshape(-1).astype(np.int64)
    options_text = scalar("sampler_options", str, "{}") or "{}"
    try:
        options = json.loads(options_text)
    except json.JSONDecodeError as e:
        raise ValueError(f"input 'sampler_options' is not JSON: {e}") from None
    seed = scalar("seed", int)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    max_seconds = scalar("max_seconds", float, 0.0)
    if not max_seconds >= 0:  # also NaN
        raise ValueError(f"max_seconds must be >= 0 (0 = no limit), got {max_seconds}")
    config = SamplingConfig(sampler=scalar("sampler", str), steps=scalar("steps", int),
                            guidance=scalar("guidance", float), eta=scalar("eta", float),
                            spacing=scalar("spacing", str) or None, options=options,
                            preview_every=scalar("preview_every", int, 0),
                            guidance_t_min=scalar("guidance_t_min", int, 0))
    return config, labels, seed, max_seconds


class SamplingCancelled(Exception):
    """Raised when a sampling callback returns False."""

    def __init__(self, index: int, t: int):
        super().__init__(f"sampling cancelled by the callback after step {index} (t={t})")
        self.index, self.t = index, t


@dataclass(frozen=True)
class SamplingStep:
    index: int                        # 0-based step number
    num_steps: int
    t: int                            # the timestep the model was evaluated at
    sample: np.ndarray                # x after this step, float64 [B, C, H, W]
    pred_original_sample: np.ndarray  # x_0 estimate at t, float64 [B, C, H, W]


class SamplingLoop:
    """One sampling run as a state machine without I/O: it names the model call the next step needs and takes the
    answer (the sans-I/O pattern). Every driver runs the same steps: sample_progressive calls a model function, the
    asyncio client awaits a Triton request per step (serving/client/aio.py).

        loop = sampling_loop(shape, labels, schedule=..., null_class=...)   # every argument checked here
        while not loop.done:
            args = loop.model_input()               # one call per step ([cond; null] stacked under guidance)
            step = loop.advance(model(*args))       # the SamplingStep; the callback may raise SamplingCancelled

    guidance_input (a guidance-distilled student): model_input() is (x, t, y, w), one row per image, and the answer
    is the guided output itself. guidance_t_min: the steps at t below it run unguided (SamplingConfig.guidance_t_min).
    """

    def __init__(self, shape, labels, solver, guidance: float, null_class: int, callback=None, progress=False,
                 prediction_type: str = "epsilon", config: SamplingConfig | None = None, guidance_input: bool = False,
                 guidance_t_min: int = 0):
        self.labels, self.solver, self.guidance, self.null_class = labels, solver, guidance, null_class
        self.guidance_input, self.guidance_t_min = guidance_input, guidance_t_min
        self.prediction_type = prediction_type
        self.config = config  # the settings this run was made from (sampling_loop)
        self.callback, self.progress = callback, progress
        self.x = solver.rng.standard_normal(shape)  # x_T ~ N(0, I), float64 [B, C, H, W]
        self.index = 0  # steps done
        self.num_steps = len(solver.timesteps)
        self._asked: np.ndarray | None = None  # the x of the model call asked for and not yet answered
        self._bar = None

    @property
    def done(self) -> bool:
        return self.index >= self.num_steps

    @property
    def t(self) -> int:
        """The timestep of the next step."""
        return int(self.solver.timesteps[self.index])

    @property
    def step_guidance(self) -> float:
        """The guidance scale of the next step: 1 (none) at t below guidance_t_min."""
        return self.guidance if self.t >= self.guidance_t_min else 1.0

    def model_input(self) -> tuple[np.ndarray, ...]:
        """(x float32 [N, C, H, W], t float32 [N], y int64 [N]) of the next step's one model call; with
        guidance_input, (x, t, y, w float32 [N]) with N = B (guidance_input())."""
        if self.done:
            raise ValueError(f"all {self.num_steps} steps are done")
        if self.progress and self._bar is None and self.index == 0:
            self._bar = _progress_bar(self.num_steps, self.solver.name)
        if self.guidance_input:
            args = guidance_input(self.x, self.t, self.labels, self.step_guidance, self.null_class)
        else:
            args = cfg_model_input(self.x, self.t, self.labels, self.step_guidance, self.null_class)
        self._asked = args[0]
        return args

    def advance(self, model_output) -> SamplingStep:
        """Take the answer to model_input()'s call and make the step."""
        if self._asked is None:
            raise ValueError("call model_input() before advance(): each step answers the call it asked for")
        # a student's one row is the guided output already: cfg_combine with guidance 1 checks the shape alone
        scale = 1.0 if self.guidance_input else self.step_guidance
        guided = cfg_combine(model_output, self._asked, self.labels, scale)
        self._asked = None
        i, t = self.index, self.t
        eps = eps_from_prediction(guided, self.x, t, self.solver.schedule, self.prediction_type)
        out = self.solver.step(eps, t, self.x)
        self.x = out.prev_sample
        self.index += 1
        if self._bar is not None:
            self._bar.update(1)
            if self.done:
                self.close()
        if self.callback is not None and self.callback(i, t, self.x, out.pred_original_sample) is False:
            self.close()
            raise SamplingCancelled(i, t)
        return SamplingStep(i, self.num_steps, t, self.x, out.pred_original_sample)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def sampling_loop(shape, labels=None, *, schedule: NoiseSchedule, null_class: int, config: SamplingConfig | None = None,
                  seed: int | None = None, rng: np.random.Generator | None = None, callback: Callable | None = None,
                  progress: bool = False, prediction_type: str = "epsilon",
                  guidance_range: tuple[float, float] | None = None, distilled_steps: int | None = None,
                  **settings) -> SamplingLoop:
    """A SamplingLoop for one run, every argument checked here (ValueError naming it) before any model call.

    config: a SamplingConfig, or its fields as keyword arguments (sampler="ddim", steps=10, guidance=2.0, eta,
    spacing, clip_sample, options or sampler_options, preview_every, guidance_t_min). labels: int [B] in
    [0, null_class], or None (unconditional). seed (or rng) fixes the initial and step noise. prediction_type: what the model returns (the
    card's): "epsilon" or "v_prediction". callback(i, t, x, x0) returning False raises SamplingCancelled.
    guidance_range (a guidance-distilled student's card): the model takes the guidance scale as its input, one row
    per image (SamplingLoop.guidance_input), and a guidance outside [min, max] is refused. distilled_steps (a
    step-distilled student's card): spacing None means STUDENT_SPACING, the grid it was distilled on.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if "steps" in settings:  # the range with this schedule's T, before the config's own check says ">= 1"
        _check_int("steps", settings["steps"], 1, schedule.num_train_timesteps)
    config = sampling_config(config, **settings)
    if distilled_steps is not None and config.spacing is None:
        config = replace(config, spacing=STUDENT_SPACING)
    if guidance_range is not None:
        low, high = guidance_range
        if not low <= config.guidance <= high:
            raise ValueError(f"guidance must be in [{low:g}, {high:g}] for this student (it takes the guidance scale "
                             f"as an input and was distilled on that range), got {config.guidance:g}")
        if config.guidance_t_min > 0 and low > 1:
            raise ValueError(f"guidance_t_min needs a student that takes w = 1 (no guidance) below it; this one was "
                             f"distilled on [{low:g}, {high:g}]")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if not (isinstance(shape, (tuple, list)) and len(shape) == 4
            and all(not isinstance(d, bool) and isinstance(d, (int, np.integer)) and d > 0 for d in shape)):
        raise ValueError(f"shape must be (batch, channels, height, width) of positive integers, got {shape!r}")
    shape = tuple(int(d) for d in shape)
    null_class = _check_int("null_class", null_class, 0)
    _check_int("steps", config.steps, 1, schedule.num_train_timesteps)
    _check_int("guidance_t_min", config.guidance_t_min, 0, schedule.num_train_timesteps)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.shape[0] != shape[0]:
            raise ValueError(f"labels must be a 1-D sequence of length shape[0]={shape[0]}, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() > null_class):
            raise ValueError(f"labels must lie in [0, {null_class}] (null_class={null_class} means unconditional), "
                             f"got min {labels.min()} max {labels.max()}")
        labels = labels.astype(np.int64)
    if seed is not None and rng is not None:
        raise ValueError("pass seed or rng, not both")
    if callback is not None and not callable(callback):
        raise ValueError("callback must be callable as callback(i, t, x, x0)")
    solver = config.solver(schedule, np.random.default_rng(seed) if rng is None else rng)
    return SamplingLoop(shape, labels, solver, config.guidance, null_class, callback, progress, prediction_type,
                        config, guidance_input=guidance_range is not None, guidance_t_min=config.guidance_t_min)


def sample_progressive(model: EpsModel, shape, labels=None, **arguments) -> Iterator[SamplingStep]:
    """Like `sample`, but yields a SamplingStep after every step (previews, progress), as guided-diffusion's
    p_sample_loop_progressive. The arguments are sampling_loop's, checked here, before the generator starts and
    before any model call; e.g. sampler_options={"use_clipped_model_output": False} runs DDIM as diffusers does by
    default."""
    return drive(model, sampling_loop(shape, labels, **arguments))


def drive(model: EpsModel, loop: SamplingLoop) -> Iterator[SamplingStep]:
    """Run a SamplingLoop with a model function, one call per step, yielding each step."""
    try:
        while not loop.done:
            yield loop.advance(model(*loop.model_input()))
    finally:
        loop.close()


def last_estimate(steps: Iterator[SamplingStep]) -> np.ndarray:
    """Run a sample_progressive iterator to its end: the x_0 estimate of the last step, float32 [B, C, H, W]. What
    TridentClient.sample returns for a client-side loop and the sampling loop model (serving/server/runtime/loop_model.py) sends."""
    last = None
    for last in steps:
        pass
    return np.asarray(last.pred_original_sample, dtype=np.float32)


def _progress_bar(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="step")


def sample(model: EpsModel, shape, labels=None, **arguments) -> np.ndarray:
    """Draw images from x_T ~ N(0, I): float32 [B, C, H, W], the x_0 estimate, roughly in [-1, 1].

    model(x float32 [N, C, H, W], t float32 [N], y int64 [N]) -> eps float32 [N, C, H, W] (v with
    prediction_type="v_prediction"); with guidance it is called once per step on 2B rows. With guidance_range (a
    guidance-distilled student) it is model(x, t, y, w), called once per step on B rows. The arguments are
    sampling_loop's: schedule, null_class, the SamplingConfig (or its fields: sampler, steps, guidance, eta, spacing,
    clip_sample, options), seed or rng, callback, progress, prediction_type. The same seed gives the same images.
    """
    x = None
    for info in sample_progressive(model, shape, labels, **arguments):
        x = info.sample
    return x.astype(np.float32)

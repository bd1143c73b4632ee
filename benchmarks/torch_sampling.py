"""DPM-Solver++(2M) with classifier-free guidance in torch: the whole sampling loop on the device.

For the GPU benchmark (benchmarks/gpu.py), which measures how much of a sampling call the host-side numpy loop costs
once the U-Net itself takes well under a millisecond. This is an oracle comparison, not a second sampler to serve
from: serving/sampling.py (numpy, float64) stays the reference, and tests/test_gpu_benchmark.py checks this loop equal
to it, step by step on a dummy model and end to end on the shipped U-Net.

Everything that varies per step (alpha, sigma, lambda and the 2M coefficients) is a Python float computed on the
host before the loop, in the order serving/sampling.py computes it; the loop body is tensor arithmetic only, with no
host synchronisation, so the whole loop can be captured as one CUDA graph and replayed (`LoopGraph`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from trident.serving import sampling

# model(x float32 [N, C, H, W], t float32 [N], y int64 [N]) -> eps [N, C, H, W] (any float dtype)
TorchEpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepCoefficients:
    """One DPM-Solver++(2M) step from timestep t_i (alpha_s, sigma_s) to the next point (alpha_t, sigma_t)."""

    t: int                   # the timestep the model is evaluated at
    alpha_s: float
    sigma_s: float
    final: bool              # sigma_t == 0: the step lands on x_0 itself
    x_scale: float           # sigma_t / sigma_s
    d_scale: float           # -alpha_t (e^{-h} - 1)
    correction: float | None  # 1 / (2r) of the second-order correction; None on the first (first-order) step


def dpmpp_2m_coefficients(schedule: sampling.NoiseSchedule, steps: int, spacing: str | None = None
                          ) -> list[StepCoefficients]:
    """The per-step constants of serving/sampling.py's DPMSolverPP2MSampler, computed the same way (float64)."""
    reference = sampling.DPMSolverPP2MSampler(schedule)
    reference.set_timesteps(steps, spacing)  # validates steps and spacing, and lays out the timesteps
    abar = schedule.alphas_cumprod[reference.timesteps]
    alpha = np.append(np.sqrt(abar), 1.0)        # [n + 1], as DPMSolverPP2MSampler.set_timesteps
    sigma = np.append(np.sqrt(1.0 - abar), 0.0)
    out = []
    for i, t in enumerate(reference.timesteps):
        alpha_s, sigma_s, alpha_t, sigma_t = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        if sigma_t == 0.0:
            out.append(StepCoefficients(int(t), float(alpha_s), float(sigma_s), True, 0.0, 0.0, None))
            continue
        lam_s, lam_t = math.log(alpha_s / sigma_s), math.log(alpha_t / sigma_t)
        h = lam_t - lam_s
        correction = None
        if i > 0:
            r = (lam_s - math.log(alpha[i - 1] / sigma[i - 1])) / h
            correction = 0.5 / r
        out.append(StepCoefficients(int(t), float(alpha_s), float(sigma_s), False, float(sigma_t / sigma_s),
                                    float(-(alpha_t * math.expm1(-h))), correction))
    return out


class TorchDPMSolverPP2M:
    """The loop of sampling.sample_progressive(sampler="dpmpp-2m") in torch, on x_T given by the caller.

    labels: int64 [B] on the device, or None (unconditional). guidance 1 runs the conditional batch only; otherwise
    one model call on [x; x] with [labels; null] per step, as sampling.cfg_eps. dtype: the loop state's dtype
    (float64 by default, as the numpy reference; the model always gets float32 inputs).
    """

    def __init__(self, model: TorchEpsModel, schedule: sampling.NoiseSchedule, *, steps: int = 20,
                 guidance: float = 3.0, null_class: int, spacing: str | None = None, clip_sample: bool = True,
                 clip_sample_range: float = 1.0, dtype: torch.dtype = torch.float64,
                 prediction_type: str = "epsilon"):
        if prediction_type not in sampling.PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {sampling.PREDICTION_TYPES}, got {prediction_type!r}")
        if not (math.isfinite(guidance) and 0 <= guidance <= sampling.MAX_GUIDANCE):
            raise ValueError(f"guidance must be in [0, {sampling.MAX_GUIDANCE:g}], got {guidance!r}")
        self.model, self.guidance, self.null_class = model, float(guidance), int(null_class)
        self.clip = float(clip_sample_range) if clip_sample else None
        self.dtype = dtype
        self.v_prediction = prediction_type == "v_prediction"
        self.steps = dpmpp_2m_coefficients(schedule, steps, spacing)

    def _eps(self, x: torch.Tensor, t: int, labels: torch.Tensor | None) -> torch.Tensor:
        """sampling.cfg_eps in torch: (x [B, ...] in self.dtype) -> guided eps [B, ...] in self.dtype."""
        b = x.shape[0]

        def call(xs, ys):
            ts = torch.full((xs.shape[0],), float(t), dtype=torch.float32, device=xs.device)
            return self.model(xs.to(torch.float32), ts, ys).to(self.dtype)

        if labels is None:
            return call(x, torch.full((b,), self.null_class, dtype=torch.int64, device=x.device))
        if self.guidance == 1:
            return call(x, labels)
        null = torch.full((b,), self.null_class, dtype=torch.int64, device=x.device)
        both = call(torch.cat([x, x]), torch.cat([labels, null]))  # [2B, C, H, W]
        cond, uncond = both[:b], both[b:]
        return uncond + self.guidance * (cond - uncond)

    def __call__(self, x_T: torch.Tensor, labels: torch.Tensor | None = None,
                 callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        """x_T [B, C, H, W] -> the last step's x_0 estimate [B, C, H, W] in self.dtype. callback(i, x, x0) sees every
        step (tests; it must not synchronise when the loop is captured)."""
        x = x_T.to(self.dtype)
        prev_x0 = None
        for i, c in enumerate(self.steps):
            eps = self._eps(x, c.t, labels)
            if self.v_prediction:  # sampling.eps_from_prediction: eps = alpha_s v + sigma_s x_s
                eps = c.alpha_s * eps + c.sigma_s * x
            # data prediction x_theta(x_s, s) = (x_s - sigma_s eps) / alpha_s, clipped (sampling.py's step)
            x0 = (x - c.sigma_s * eps) / c.alpha_s
            if self.clip is not None:
                x0 = x0.clamp(-self.clip, self.clip)
            if c.final:
                x = x0
            else:
                d = x0 if c.correction is None else x0 + c.correction * (x0 - prev_x0)
                x = c.x_scale * x + c.d_scale * d
            prev_x0 = x0
            if callback is not None:
                callback(i, x, x0)
        return prev_x0


class LoopGraph:
    """A whole TorchDPMSolverPP2M loop captured once as a CUDA graph; replay(x_T) runs all its steps in one launch.

    Shapes, labels and guidance are fixed at capture: one graph per (batch, labels) setting.
    """

    def __init__(self, loop: TorchDPMSolverPP2M, x_T: torch.Tensor, labels: torch.Tensor | None):
        if x_T.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.x_T = x_T.clone()
        self.labels = None if labels is None else labels.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (cuDNN plans, allocator pools)
            loop(self.x_T, self.labels)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = loop(self.x_T, self.labels)

    def replay(self, x_T: torch.Tensor) -> torch.Tensor:
        self.x_T.copy_(x_T)
        self.graph.replay()
        return self.out

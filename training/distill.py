"""Distilling the diffusion teacher into a student that draws in a few steps with one network row per step.

Two stages, each a `trident distill` run (Meng et al. 2023, "On Distillation of Guided Diffusion Models"):

1. guidance: a copy of the teacher that also takes the guidance scale w learns the teacher's guided output
   uncond + w * (cond - uncond) in one row (the teacher needs two, [cond; null]).
2. steps: progressive distillation (Salimans & Ho 2022, algorithm 2): a student learns to make in one DDIM step what
   its teacher makes in two; then it becomes the teacher of the next halving, until the student has `to_steps` steps.

Everything here is torch on the training side; the student is sampled as every other diffusion model is, by
serving/sampling.py (DDIM, "trailing" spacing, the steps it was distilled for).
"""
from __future__ import annotations

import numpy as np
import torch

from trident.serving.sampling import STUDENT_SPACING, spaced_timesteps

STAGES = ("guidance", "steps")
# STUDENT_SPACING ("trailing", serving/sampling.py): the grid whose 2N-step layout contains its N-step one (see
# stage_timesteps), so the serving side samples a student on the grid it learnt


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces: the x0 and eps a prediction stands for, one DDIM step
# ----------------------------------------------------------------------------------------------------------------

def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)) as (N, 1, 1, 1); t = -1 is the data itself (1, 0)."""
    abar = torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], torch.ones_like(alphas_cumprod[0]))
    abar = abar.to(torch.float64 if alphas_cumprod.dtype == torch.float64 else torch.float32)
    return abar.sqrt()[:, None, None, None], (1 - abar).sqrt()[:, None, None, None]


def x0_eps(out: torch.Tensor, z: torch.Tensor, alpha, sigma, prediction_type: str):
    """(x0, eps) that a network output stands for at z = alpha x0 + sigma eps."""
    if prediction_type == "v_prediction":  # v = alpha eps - sigma x0 (Salimans & Ho 2022, sec. 4)
        return alpha * z - sigma * out, sigma * z + alpha * out
    return (z - sigma * out) / alpha, out


def ddim_step(out, z, alpha, sigma, alpha_next, sigma_next, prediction_type: str, clip: float | None = 1.0):
    """One deterministic DDIM step, as sampling.DDIMSampler takes it by default (x0 clipped to [-clip, clip] and eps
    re-derived from the clipped x0): z_next = alpha_next x0 + sigma_next eps."""
    x0, eps = x0_eps(out, z, alpha, sigma, prediction_type)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        eps = (z - alpha * x0) / sigma
    return alpha_next * x0 + sigma_next * eps


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: guidance distillation
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def guided_output(teacher, x, t, y, w, null_class: int) -> torch.Tensor:
    """The teacher's classifier-free guided output uncond + w * (cond - uncond) (Ho & Salimans 2022), from one call on
    [x; x] with [y; null] as sampling.cfg_eps; rows whose y is the null class get the unconditional output."""
    n = x.shape[0]
    both = teacher(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))  # (2N, ...)
    cond, uncond = both[:n], both[n:]
    return uncond + w[:, None, None, None] * (cond - uncond)


def sample_guidance(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    """w ~ U[low, high] (N,)."""
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: progressive step distillation
# ----------------------------------------------------------------------------------------------------------------

def stage_timesteps(num_train_timesteps: int, student_steps: int) -> np.ndarray:
    """int64 [student_steps, 3]: for each student step, (t, t', t'') where the teacher's two steps go t -> t' -> t''
    and the student's one goes t -> t''; t'' = -1 is the data (the last step). The teacher's grid is the "trailing"
    layout of 2N steps, whose even entries are the N-step layout: so N-step DDIM with "trailing" spacing walks exactly
    the student's timesteps."""
    teacher = spaced_timesteps(num_train_timesteps, 2 * student_steps, STUDENT_SPACING)
    student = spaced_timesteps(num_train_timesteps, student_steps, STUDENT_SPACING)
    if not np.array_equal(teacher[::2], student):
        raise ValueError(f"{2 * student_steps} trailing steps do not contain the {student_steps}-step layout for "
                         f"T={num_train_timesteps}; choose step counts that divide T")
    ends = np.append(teacher, -1)
    return np.stack([ends[0:-1:2], ends[1::2], ends[2::2]], axis=1)


def halvings(from_steps: int, to_steps: int) -> list[int]:
    """The student step counts of each stage: from_steps/2, from_steps/4, ..., to_steps."""
    if to_steps < 1 or from_steps <= to_steps or from_steps % to_steps or (from_steps // to_steps) & (
            from_steps // to_steps - 1):
        raise ValueError(f"from_steps ({from_steps}) must be to_steps ({to_steps}) times a power of two >= 2")
    out, n = [], from_steps
    while n > to_steps:
        n //= 2
        out.append(n)
    return out


@torch.no_grad()
def two_step_target(teacher_fn, z, t, t_mid, t_next, alphas_cumprod, prediction_type: str, clip: float | None = 1.0):
    """Salimans & Ho 2022, algorithm 2: the x0 target x~ such that one DDIM step from z at t to t_next lands where the
    teacher's two steps t -> t_mid -> t_next land. teacher_fn(z, t) -> the teacher's (guided) output at t."""
    a, s = alpha_sigma(alphas_cumprod, t)
    a1, s1 = alpha_sigma(alphas_cumprod, t_mid)
    a2, s2 = alpha_sigma(alphas_cumprod, t_next)
    z1 = ddim_step(teacher_fn(z, t), z, a, s, a1, s1, prediction_type, clip)
    z2 = ddim_step(teacher_fn(z1, t_mid), z1, a1, s1, a2, s2, prediction_type, clip)
    # solve z2 = a2 x~ + s2 (z - a x~) / s for x~; at the last step (s2 = 0) x~ = z2
    ratio = s2 / s
    return (z2 - ratio * z) / (a2 - ratio * a)


def truncated_snr_weight(alpha, sigma) -> torch.Tensor:
    """max(SNR, 1) on an x0 loss (Salimans & Ho 2022, eq. 9, "truncated SNR"): x0 errors at high noise still count."""
    return torch.clamp(alpha ** 2 / sigma ** 2, min=1.0)


def stage_of(step: int, stage_steps: int, stages: list[int]) -> int:
    """The stage index that training step `step` (0-based) belongs to."""
    return min(step // stage_steps, len(stages) - 1)


def _noised_batch(x0, y, t, gen, alphas_cumprod, null_class: int, label_dropout: float,
                  guidance_range: tuple[float, float]):
    """What both stages train on: x_t = alpha_t x0 + sigma_t eps at the given t (N,), labels dropped to the null class
    with probability label_dropout, w ~ U[guidance_range]. Returns (x_t, alpha_t, sigma_t, y, w)."""
    n, dev = x0.shape[0], x0.device
    eps = torch.randn(x0.shape, generator=gen, device=dev)
    a, s = alpha_sigma(alphas_cumprod, t)
    drop = torch.rand(n, generator=gen, device=dev) < label_dropout
    y = torch.where(drop, torch.full_like(y, null_class), y)
    return a * x0 + s * eps, a, s, y, sample_guidance(n, *guidance_range, gen, dev)


def interval_guidance(w: torch.Tensor, t: torch.Tensor, guidance_t_min: int, max_w: float = 0.0) -> torch.Tensor:
    """The scale the teacher's pair is combined with at each row: w where t >= guidance_t_min, 1 (its conditional
    output alone) below. Guidance limited to an interval of noise levels (Kynkaennemi et al. 2024, "Applying guidance
    in a limited interval improves sample and distribution quality"): at low noise the guidance term is a few
    thousandths of the output's energy, costs one row the accuracy of the conditional output it starts from, and
    moves the images' distribution away from the data's (checkpoints/diffusion_student_guidance, session 13).
    max_w > 0: the interval applies only to rows whose w <= max_w, and the rows above it are guided at every t (the
    interval lowered FD at guidance 1.5 and cost class agreement at guidance 3 in session 13's run)."""
    if not guidance_t_min:
        return w
    unguided = t < guidance_t_min
    if max_w:
        unguided = unguided & (w <= max_w)
    return torch.where(unguided, torch.ones_like(w), w)


def guidance_distillation_loss(student, teacher, x0, y, gen, alphas_cumprod, *, null_class: int, label_dropout: float,
                               guidance_range: tuple[float, float], prediction_type: str,
                               guidance_weight_power: float = 0.0, guidance_t_min: int = 0,
                               guidance_interval_max_w: float = 0.0):
    """Stage 1: MSE between the student's one row at w and the teacher's guided pair, on x_t from the forward process
    at t ~ U[0, T), w ~ U[guidance_range], labels dropped to the null class with probability label_dropout. Each
    row's squared error is weighted by w ** -guidance_weight_power (0: plain MSE). The guided target
    cond + (w - 1)(cond - uncond) grows with w, so plain MSE spends the student's capacity on the largest scales;
    a power of 2 weighs each row's error relative to the target's scale (checkpoints/diffusion_student_guidance).
    guidance_t_min > 0: below that timestep the target is the teacher's conditional output whatever w the student is
    given (interval_guidance; with guidance_interval_max_w, only at w up to it). The row keeps the weight of the w it
    was drawn with, so the rows' shares of the loss are those of the run without the interval (a weight of 1 there
    tilted the loss towards the unguided rows and cost agreement at guidance 3)."""
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=gen, device=x0.device)
    x_t, _, _, y, w = _noised_batch(x0, y, t, gen, alphas_cumprod, null_class, label_dropout, guidance_range)
    w_target = interval_guidance(w, t, guidance_t_min, guidance_interval_max_w)
    target = guided_output(teacher, x_t, t.float(), y, w_target, null_class)
    err = (student(x_t, t.float(), y, w) - target).pow(2).flatten(1).mean(1)
    if guidance_weight_power:
        err = err * w.float().pow(-guidance_weight_power)
    return err.mean()


def step_distillation_loss(student, teacher, x0, y, gen, alphas_cumprod, *, null_class: int, label_dropout: float,
                           guidance_range: tuple[float, float], prediction_type: str, student_steps: int,
                           clip: float | None = 1.0):
    """Stage 2 for one halving: the student's x0 at a random step t of its N-step grid against the x0 target of the
    teacher's two steps (two_step_target), weighted by truncated SNR. Both take w (the teacher is a stage-1 or
    earlier stage-2 student)."""
    grid = torch.from_numpy(stage_timesteps(len(alphas_cumprod), student_steps)).to(x0.device)
    pick = grid[torch.randint(0, student_steps, (x0.shape[0],), generator=gen, device=x0.device)]  # (N, 3)
    t, t_mid, t_next = pick[:, 0], pick[:, 1], pick[:, 2]
    z, a, s, y, w = _noised_batch(x0, y, t, gen, alphas_cumprod, null_class, label_dropout, guidance_range)
    target = two_step_target(lambda zz, tt: teacher(zz, tt.float(), y, w), z, t, t_mid, t_next, alphas_cumprod,
                             prediction_type, clip)
    x0_hat, _ = x0_eps(student(z, t.float(), y, w), z, a, s, prediction_type)
    return (truncated_snr_weight(a, s) * (x0_hat - target).pow(2)).mean()


def check_teacher(stage: str, config, card: dict) -> None:
    """The teacher a stage needs: stage 1 a guided pair (no guidance input), stage 2 a stage-1 student; progressive
    distillation needs an output that stays well-posed at high noise (v, not eps)."""
    if stage == "guidance" and config.guidance_input:
        raise ValueError("distill guidance: the teacher already takes the guidance scale; pass the class-conditional "
                         "teacher trained by `trident train diffusion`")
    if stage == "steps":
        if not config.guidance_input:
            raise ValueError("distill steps: the teacher must take the guidance scale; run `trident distill guidance` "
                             "first and pass its model.safetensors")
        if card.get("prediction_type") != "v_prediction":
            raise ValueError("distill steps needs a v-prediction teacher (x0 from eps is ill-posed at high noise); "
                             f"this one predicts {card.get('prediction_type')!r}")

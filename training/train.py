"""Training loops for the four model kinds, in one process or under `torchrun` (DDP: gloo on CPU, nccl on GPU).

`trident train diffusion|gan|vae|classifier --steps N --batch-size B --lr LR --seed S --out DIR`
Writes into DIR: last.safetensors (resumable: live weights, EMA, optimiser state), model.safetensors (the weights to
export), log.csv (losses), samples/step_XXXXXXX.png (preview grids, one row per class for conditional models).
Re-running with the same DIR resumes from last.safetensors.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import csv
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trident.serving.card import PREDICTION_TYPES, ImageFormat, ModelCard
from trident.serving.files import file_sha256
from trident.serving.images import labelled_grid, save_png, to_uint8
from trident.serving.sampling import NoiseSchedule, default_settings, sample

from . import checkpoint as ckpt
from . import distill
from .data import CLASS_NAMES, load_fashion_mnist
from .models import CONFIGS, Discriminator, build_model

KINDS = ("diffusion", "gan", "vae", "classifier")
LR_SCHEDULES = ("constant", "cosine")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
DEFAULTS = {  # per-kind (lr, batch size) that trained well on Fashion-MNIST here
    "diffusion": (5e-4, 128), "gan": (2e-4, 128), "vae": (1e-3, 128), "classifier": (1e-3, 128),
}


@dataclass
class TrainConfig:
    kind: str
    out_dir: str
    steps: int = 1000
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    data_dir: str | None = None
    limit: int | None = None          # use only the first N training images (tests)
    model: dict = field(default_factory=dict)   # overrides of the model config dataclass
    schedule: dict = field(default_factory=dict)  # diffusion: NoiseSchedule overrides (kind, beta_start, ...)
    label_dropout: float = 0.1        # diffusion: P(label -> null class), for classifier-free guidance
    prediction_type: str = "epsilon"  # diffusion: what the U-Net learns to predict (card.PREDICTION_TYPES)
    min_snr_gamma: float = 0.0        # diffusion: Min-SNR-gamma loss weighting (Hang et al. 2023), 0 = off
    lr_schedule: str = "constant"     # after warm-up: "constant", or "cosine" decay to lr_min_ratio * lr at `steps`
    lr_min_ratio: float = 0.05
    precision: str = "fp32"           # "bf16": torch.autocast on the CPU; "auto": bf16 where the CPU has bf16 units
    snapshot_every: int = 0           # also keep model.safetensors as snapshots/step_N.safetensors (0 = never)
    # Distillation (`trident distill`, training/distill.py): the student is a diffusion model trained from `teacher`
    distill: str = ""                 # "" (plain training), "guidance" (stage 1) or "steps" (stage 2)
    teacher: str | None = None        # the teacher's model.safetensors
    guidance_min: float = 1.0         # w ~ U[guidance_min, guidance_max] for the student's guidance input
    guidance_max: float = 5.0
    guidance_weight_power: float = 0.0  # guidance stage: each row's loss x w ** -power (distill.guidance_distillation_loss)
    guidance_t_min: int = 0           # guidance stage: the teacher's pair guided only at t >= this (distill.interval_guidance)
    guidance_interval_max_w: float = 0.0  # ... only for rows with w <= this (0: every w)
    extra_top_blocks: int = 0         # guidance stage: the student gets this many more full-resolution res blocks
    distill_from_steps: int = 64      # steps: the first teacher's DDIM steps; each stage halves them ...
    distill_to_steps: int = 4         # ... down to the final student's
    ema_decay: float = 0.999            # diffusion and GAN: the exported weights are this EMA of the trained ones
    gan_augment: str = ""             # GAN: DiffAugment policies, comma-separated ("translation,cutout"), "" = off
    gan_r1: float = 0.0               # GAN: R1 penalty weight gamma (0 = off)
    gan_r1_every: int = 4             # GAN: lazy R1, applied every this many D turns
    disc_lr: float | None = None      # GAN: discriminator learning rate (TTUR); None = lr
    gan_mode_seeking: float = 0.0     # GAN: weight of the mode-seeking term (MSGAN), 0 = off
    warmup_steps: int = 200
    log_every: int = 50
    sample_every: int = 1000
    ckpt_every: int = 500
    time_limit_min: float | None = None  # stop (and save) once the run has trained this many minutes in all,
    # across resumes (the time its checkpoint records counts), so one recipe line stops a run at the same point
    progress: bool = True
    command: str | None = None        # the command line, recorded in the checkpoint

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"model kind must be one of {KINDS}, got {self.kind!r}")
        lr, bs = DEFAULTS[self.kind]
        self.lr = lr if self.lr is None else self.lr
        self.batch_size = bs if self.batch_size is None else self.batch_size
        for name in ("steps", "batch_size", "log_every", "sample_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if not (self.min_snr_gamma >= 0 and math.isfinite(self.min_snr_gamma)):
            raise ValueError(f"min_snr_gamma must be a finite number >= 0, got {self.min_snr_gamma}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ValueError(f"lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        if self.precision not in TRAIN_PRECISIONS:
            raise ValueError(f"precision must be one of {TRAIN_PRECISIONS}, got {self.precision!r}")
        if self.distill not in ("", *distill.STAGES):
            raise ValueError(f"distill must be one of {distill.STAGES}, got {self.distill!r}")
        if self.distill and (self.kind != "diffusion" or not self.teacher):
            raise ValueError("distillation trains a diffusion student and needs a teacher checkpoint")
        if self.distill and not (math.isfinite(self.guidance_min) and math.isfinite(self.guidance_max)
                                 and 0 <= self.guidance_min <= self.guidance_max):
            raise ValueError(f"guidance range must satisfy 0 <= min <= max, got [{self.guidance_min}, "
                             f"{self.guidance_max}]")
        if not (math.isfinite(self.guidance_weight_power) and self.guidance_weight_power >= 0):
            raise ValueError(f"guidance_weight_power must be >= 0, got {self.guidance_weight_power}")
        if self.guidance_weight_power and self.distill != "guidance":
            raise ValueError(f"guidance_weight_power {self.guidance_weight_power} weighs stage 1's rows "
                             f"(distill 'guidance') and would be ignored here (distill {self.distill or 'none'!r})")
        if not (isinstance(self.guidance_t_min, int) and not isinstance(self.guidance_t_min, bool)
                and self.guidance_t_min >= 0):
            raise ValueError(f"guidance_t_min must be an integer timestep >= 0, got {self.guidance_t_min!r}")
        if self.guidance_t_min and self.distill != "guidance":
            raise ValueError(f"guidance_t_min {self.guidance_t_min} limits stage 1's guided target (distill "
                             f"'guidance') and would be ignored here (distill {self.distill or 'none'!r})")
        m = self.guidance_interval_max_w
        if m and not (self.guidance_t_min and math.isfinite(m) and self.guidance_min <= m < self.guidance_max):
            raise ValueError(f"guidance_interval_max_w {m} limits guidance_t_min's interval to the rows with w up to "
                             f"it: it needs guidance_t_min > 0 (got {self.guidance_t_min}) and a value in "
                             f"[guidance_min, guidance_max) = [{self.guidance_min:g}, {self.guidance_max:g})")
        if self.extra_top_blocks < 0:
            raise ValueError(f"extra_top_blocks must be >= 0, got {self.extra_top_blocks}")
        if self.extra_top_blocks and self.distill != "guidance":
            raise ValueError(f"extra_top_blocks {self.extra_top_blocks} adds blocks to a stage-1 student; stage 2 "
                             "keeps its teacher's architecture, and plain training takes --model")
        if self.guidance_weight_power and self.guidance_min <= 0:
            raise ValueError(f"guidance_weight_power {self.guidance_weight_power} weighs rows by w ** -power and "
                             f"needs guidance_min > 0, got {self.guidance_min}")
        if self.distill == "steps":
            stages = distill.halvings(self.distill_from_steps, self.distill_to_steps)  # ValueError when not halvings
            if self.steps % len(stages):
                raise ValueError(f"steps ({self.steps}) must split evenly over the {len(stages)} stages {stages}")
        if self.snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0, got {self.snapshot_every}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        unknown = sorted(set(self.augment_policy) - set(AUGMENT_POLICIES))
        if unknown:
            raise ValueError(f"gan_augment: unknown policies {unknown}; choose from {list(AUGMENT_POLICIES)}")
        if not (self.gan_r1 >= 0 and math.isfinite(self.gan_r1)):
            raise ValueError(f"gan_r1 must be a finite number >= 0, got {self.gan_r1}")
        if self.gan_r1_every < 1:
            raise ValueError(f"gan_r1_every must be >= 1, got {self.gan_r1_every}")
        if not (self.gan_mode_seeking >= 0 and math.isfinite(self.gan_mode_seeking)):
            raise ValueError(f"gan_mode_seeking must be a finite number >= 0, got {self.gan_mode_seeking}")
        if self.disc_lr is not None and not self.disc_lr > 0:
            raise ValueError(f"disc_lr must be > 0, got {self.disc_lr}")

    @property
    def stages(self) -> list[int]:
        """distill "steps": the student's step count in each stage."""
        return distill.halvings(self.distill_from_steps, self.distill_to_steps) if self.distill == "steps" else []

    @property
    def stage_length(self) -> int:
        return self.steps // len(self.stages) if self.stages else self.steps

    @property
    def augment_policy(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.gan_augment.split(",") if p.strip())


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------------------------

def _setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _wrap(module, device, world):
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module


def _unwrap(module):
    return module.module if hasattr(module, "module") else module


# ----------------------------------------------------------------------------------------------------------------
# Per-kind pieces: build modules, one optimisation step, preview images
# ----------------------------------------------------------------------------------------------------------------

def _diffusion_tables(meta: dict, device) -> torch.Tensor:
    sched = NoiseSchedule.from_dict(meta["card"]["schedule"])
    return torch.tensor(sched.alphas_cumprod, dtype=torch.float32, device=device)


def diffusion_target(x0, eps, a, prediction_type: str):
    """What the U-Net learns to output for x_t = sqrt(a) x0 + sqrt(1 - a) eps: eps, or v = sqrt(a) eps - sqrt(1 - a) x0
    (Salimans & Ho 2022, sec. 4; steadier than eps where few sampling steps follow, e.g. distilled students)."""
    return eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0


def min_snr_weight(a: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): the x0-loss weight min(SNR, gamma), carried over to what the model predicts.
    An eps-loss equals SNR times the x0-loss and a v-loss (SNR + 1) times it, so the weights are
    min(SNR, gamma) / SNR and min(SNR, gamma) / (SNR + 1). It keeps the many nearly clean timesteps from dominating."""
    snr = a / (1 - a)
    return snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(fp32 or bf16, why). "auto" takes bf16 where the hardware computes it natively: a CUDA device that supports it,
    or a CPU with avx512_bf16 or amx_bf16; elsewhere autocast would emulate bf16, many times slower than fp32."""
    if requested != "auto":
        return requested, "asked for"
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ("bf16" if ok else "fp32"), f"CUDA device {'supports' if ok else 'lacks'} bf16"
    from trident.serving.precision import BF16_FLAGS, cpu_info
    cpu = cpu_info()
    native = [f for f in BF16_FLAGS if f in cpu["flags"]]
    if native:
        return "bf16", f"CPU {cpu['model']} has {', '.join(native)}"
    return "fp32", f"CPU {cpu['model']} has neither {' nor '.join(BF16_FLAGS)}"


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over warmup_steps, then constant or a cosine decay to lr_min_ratio at cfg.steps; a progressive
    distillation run restarts this in each stage."""
    if cfg.stages:
        return lr_factor(dataclasses.replace(cfg, distill="", steps=cfg.stage_length), step % cfg.stage_length)
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if cfg.lr_schedule == "constant" or step < cfg.warmup_steps:
        return warm
    progress = min(1.0, (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1))
    return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# What a resume may change: the length and the optimiser's settings (a run is often extended on purpose), each one
# named in a warning with what it does to the run; anything else would make the checkpoint a different run.
_RESUME_WARN = ("steps", "lr", "lr_schedule", "lr_min_ratio", "warmup_steps", "batch_size", "ema_decay", "seed",
                "min_snr_gamma", "label_dropout", "guidance_min", "guidance_max", "guidance_weight_power")
_RESUME_REFUSE = ("distill", "distill_from_steps", "distill_to_steps", "extra_top_blocks", "guidance_t_min",
                  "guidance_interval_max_w")


def resume_changes(old: dict, cfg: TrainConfig, step: int, old_teacher_sha: str | None = None,
                   teacher_sha: str | None = None) -> list[str]:
    """Compare the run recorded in a checkpoint (its `train_config`, at `step`) with the one asked for now.

    Raises CheckpointError where resuming would not continue the same run (another distillation stage, halvings or
    teacher, or a step-distillation length that puts the step in another halving than the teacher saved with it);
    returns one warning per schedule change that it can continue with, saying what the change does at this step.
    """
    def refuse(what):
        raise ckpt.CheckpointError(f"resuming at step {step}: {what}; use another --out directory or the same "
                                   "arguments")

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key in _RESUME_REFUSE:  # a record older than the field was trained with its default
        recorded = old.get(key, defaults[key])
        if recorded != getattr(cfg, key):
            refuse(f"the checkpoint was trained with {key}={recorded!r}, not {getattr(cfg, key)!r}")
    if old_teacher_sha and teacher_sha and old_teacher_sha != teacher_sha:
        refuse(f"the teacher {cfg.teacher} is not the one the checkpoint was distilled from "
               f"(sha256 {teacher_sha[:12]}, recorded {old_teacher_sha[:12]})")
    changed = [k for k in _RESUME_WARN if k in old and old[k] != getattr(cfg, k)]
    if not changed:
        return []
    try:
        before = dataclasses.replace(cfg, **{k: old[k] for k in changed})
    except (TypeError, ValueError):  # an older record that the config no longer accepts: name the changes only
        return [f"resuming at step {step} with changed {', '.join(changed)}"]
    notes = []
    if cfg.stages and before.stage_length != cfg.stage_length:
        # swaps done so far (the teacher saved with the checkpoint) against what the loop would assume
        done, now = (step - 1) // before.stage_length, (step - 1) // cfg.stage_length
        if step > 0 and done != now:
            refuse(f"{before.stage_length} steps per halving put it in halving {done + 1} of {len(cfg.stages)}, "
                   f"{cfg.stage_length} would put it in halving {now + 1}, with the teacher of halving {done + 1}")
        notes.append(f"halvings now {cfg.stage_length} steps each (were {before.stage_length}): "
                     f"this one ends at step {(now + 1) * cfg.stage_length} instead of {(done + 1) * before.stage_length}")
    # a step-distillation run's length is its halvings' (said above); any other change is named as it is
    notes += [f"{k} {old[k]!r} -> {getattr(cfg, k)!r}" for k in changed if not (k == "steps" and cfg.stages)]
    # against the recorded schedule at this step, or at its last step where the recorded run had ended
    ended = step >= before.steps
    lr0 = (before.lr or 0) * lr_factor(before, step - 1 if ended else step)
    lr1 = (cfg.lr or 0) * lr_factor(cfg, step)
    if abs(lr1 - lr0) > 1e-9 * max(abs(lr0), 1e-30):
        where = "at the recorded run's last step" if ended else "in the recorded schedule"
        notes.append(f"the learning rate at step {step} is {lr1:.3g} against {lr0:.3g} {where}")
    return [f"resuming at step {step} with a changed schedule: " + "; ".join(notes)]


def _autocast(cfg, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def _diffusion_step(cfg, mods, opts, x0, y, gen, alphas_cumprod, step):
    """Ho et al. 2020, Algorithm 1, with label dropout for classifier-free guidance (Ho & Salimans 2022), the target
    of cfg.prediction_type, and optionally Min-SNR weighting."""
    unet = mods["model"]
    null = _unwrap(unet).config.null_class
    n = x0.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (n,), generator=gen, device=x0.device)
    eps = torch.randn(x0.shape, generator=gen, device=x0.device)
    a = alphas_cumprod[t][:, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps                          # q(x_t | x_0)
    drop = torch.rand(n, generator=gen, device=x0.device) < cfg.label_dropout
    y = torch.where(drop, torch.full_like(y, null), y)
    with _autocast(cfg, x0.device):
        out = unet(x_t, t.float(), y)
    err = (out.float() - diffusion_target(x0, eps, a, cfg.prediction_type)).pow(2)  # (N, C, H, W)
    if cfg.min_snr_gamma > 0:
        err = err * min_snr_weight(a, cfg.min_snr_gamma, cfg.prediction_type)
    loss = err.mean()
    opts["model"].zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opts["model"].step()
    return {"loss": loss.item()}


def _distill_step(cfg, mods, opts, x0, y, gen, alphas_cumprod, step):
    """One step of either distillation stage (training/distill.py); the teacher is frozen."""
    student = mods["model"]
    kw = dict(null_class=_unwrap(student).config.null_class, label_dropout=cfg.label_dropout,
              guidance_range=(cfg.guidance_min, cfg.guidance_max), prediction_type=cfg.prediction_type)
    with _autocast(cfg, x0.device):
        if cfg.distill == "guidance":
            loss = distill.guidance_distillation_loss(student, mods["teacher"], x0, y, gen, alphas_cumprod,
                                                      guidance_weight_power=cfg.guidance_weight_power,
                                                      guidance_t_min=cfg.guidance_t_min,
                                                      guidance_interval_max_w=cfg.guidance_interval_max_w, **kw)
        else:
            n = cfg.stages[distill.stage_of(step, cfg.stage_length, cfg.stages)]
            loss = distill.step_distillation_loss(student, mods["teacher"], x0, y, gen, alphas_cumprod,
                                                  student_steps=n, **kw)
    opts["model"].zero_grad(set_to_none=True)
    loss.float().backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opts["model"].step()
    return {"loss": loss.item()}


def diff_augment(x: torch.Tensor, policy: tuple[str, ...], gen: torch.Generator) -> torch.Tensor:
    """Differentiable augmentation (Zhao et al. 2020, "DiffAugment"), applied alike to real and generated images
    before D sees them, so D cannot memorise the training set and G still gets gradients. Images are in [-1, 1] with
    a -1 background, so shifted-in and cut-out pixels are -1. Policies: "translation" (up to 1/8 of the side),
    "cutout" (a square of half the side)."""
    n, c, h, w = x.shape
    dev = x.device
    if "translation" in policy:
        s = max(1, h // 8)
        sy = torch.randint(-s, s + 1, (n, 1, 1), generator=gen, device=dev)
        sx = torch.randint(-s, s + 1, (n, 1, 1), generator=gen, device=dev)
        iy = torch.arange(h, device=dev)[None, :, None] + sy + s         # (N, H, 1) rows of the padded image
        ix = torch.arange(w, device=dev)[None, None, :] + sx + s         # (N, 1, W)
        padded = F.pad(x, [s, s, s, s], value=-1.0)
        x = padded[torch.arange(n, device=dev)[:, None, None], :, iy, ix].permute(0, 3, 1, 2)  # (N, C, H, W)
    if "cutout" in policy:
        size = h // 2
        cy = torch.randint(0, h - size + 1, (n, 1, 1), generator=gen, device=dev)
        cx = torch.randint(0, w - size + 1, (n, 1, 1), generator=gen, device=dev)
        yy = torch.arange(h, device=dev)[None, :, None]
        xx = torch.arange(w, device=dev)[None, None, :]
        hole = ((yy >= cy) & (yy < cy + size) & (xx >= cx) & (xx < cx + size))[:, None]  # (N, 1, H, W)
        x = torch.where(hole, torch.full_like(x, -1.0), x)
    return x


AUGMENT_POLICIES = ("translation", "cutout")


def _gan_step(cfg, mods, opts, x, y, gen, _, step):
    """One D turn then one G turn; non-saturating G loss -log D(G(z)) (Goodfellow et al. 2014, sec. 3).

    Remedies for mode collapse, each a TrainConfig option: DiffAugment on everything D sees (`gan_augment`), a lazy
    R1 penalty gamma/2 * E||grad_x D(x_real)||^2 every `gan_r1_every` D turns (Mescheder et al. 2018; lazy as in
    StyleGAN2, scaled by the interval), a separate D learning rate (TTUR, Heusel et al. 2017), a mode-seeking term
    (`gan_mode_seeking`) and an EMA of G's weights (the exported generator, see train()). The discriminator's
    class-wise minibatch-std channel is a model option (GANConfig.mbstd)."""
    G, D = mods["model"], mods["disc"]
    g = _unwrap(G)
    n = x.shape[0]
    policy = cfg.augment_policy
    aug = (lambda im: diff_augment(im, policy, gen)) if policy else (lambda im: im)
    z = torch.randn(n, g.config.latent_dim, generator=gen, device=x.device)
    y_fake = torch.randint(0, g.config.num_classes, (n,), generator=gen, device=x.device)
    half = n // 2
    if cfg.gan_mode_seeking > 0:  # pairs (i, i + half) share a class and differ in z
        y_fake[half:2 * half] = y_fake[:half]
    fake = G(z, y_fake)
    # D: maximise log D(x) + log(1 - D(G(z)))  ==  minimise softplus(-D(x)) + softplus(D(G(z)))
    r1_now = cfg.gan_r1 > 0 and step % cfg.gan_r1_every == 0
    if r1_now:
        x = x.detach().requires_grad_(True)
    d_real = D(aug(x), y)
    d_loss = F.softplus(-d_real).mean() + F.softplus(D(aug(fake.detach()), y_fake)).mean()
    losses = {}
    if r1_now:
        (grad,) = torch.autograd.grad(d_real.sum(), x, create_graph=True)
        r1 = grad.pow(2).sum(dim=(1, 2, 3)).mean()
        d_loss = d_loss + 0.5 * cfg.gan_r1 * cfg.gan_r1_every * r1
        losses["r1"] = r1.item()
    opts["disc"].zero_grad(set_to_none=True)
    d_loss.backward()
    opts["disc"].step()
    # G: maximise log D(G(z))  ==  minimise softplus(-D(G(z)))
    g_loss = F.softplus(-D(aug(fake), y_fake)).mean()
    if cfg.gan_mode_seeking > 0:
        # mode seeking (Mao et al. 2019, MSGAN): two z of one class should give images as far apart as the z are
        ratio = (fake[:half] - fake[half:2 * half]).abs().mean() / (z[:half] - z[half:2 * half]).abs().mean()
        g_loss = g_loss + cfg.gan_mode_seeking / (ratio + 1e-5)
        losses["mode_ratio"] = ratio.item()
    opts["model"].zero_grad(set_to_none=True)
    g_loss.backward()
    opts["model"].step()
    return {"loss_d": d_loss.item(), "loss_g": g_loss.item(), **losses}


def vae_loss(vae, x, beta):
    """Negative ELBO per image: Bernoulli reconstruction (summed over pixels) + beta * KL(q(z|x) || N(0, I)).
    For a plain autoencoder (config.variational False) the loss is the reconstruction alone; kl is reported as 0."""
    logits, mean, logvar = vae(x)
    target = (x + 1) / 2
    rec = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / x.shape[0]
    if not _unwrap(vae).config.variational:
        return rec, rec, torch.zeros(())
    kl = -0.5 * torch.sum(1 + logvar - mean.pow(2) - logvar.exp()) / x.shape[0]
    return rec + beta * kl, rec, kl


def _vae_step(cfg, mods, opts, x, y, gen, _, step):
    vae = mods["model"]
    loss, rec, kl = vae_loss(vae, x, _unwrap(vae).config.beta)
    opts["model"].zero_grad(set_to_none=True)
    loss.backward()
    opts["model"].step()
    return {"loss": loss.item(), "rec": rec.item(), "kl": kl.item()}


def _classifier_step(cfg, mods, opts, x, y, gen, _, step):
    clf = mods["model"]
    # light augmentation: random horizontal flips (Fashion-MNIST items are left-right symmetric in class)
    flip = torch.rand(x.shape[0], generator=gen, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    logits = clf(x)
    loss = F.cross_entropy(logits, y)
    opts["model"].zero_grad(set_to_none=True)
    loss.backward()
    opts["model"].step()
    return {"loss": loss.item(), "acc": (logits.argmax(1) == y).float().mean().item()}


STEPS = {"diffusion": _diffusion_step, "gan": _gan_step, "vae": _vae_step, "classifier": _classifier_step}


@torch.no_grad()
def preview(kind: str, module: torch.nn.Module, meta: dict, per_class: int = 8, seed: int = 0,
            student_steps: int | None = None) -> np.ndarray | None:
    """A uint8 grid drawn from the model: one row per class for conditional models, (H, W, 3). Diffusion: guidance 3,
    DPM-Solver++ 20 steps; a distilled student takes 3 (or the nearest scale of its range) as its guidance input, one
    row per step, and a step-distilled one draws with DDIM at its student_steps."""
    module.eval()
    names = meta["card"]["class_names"]
    k = len(names)
    labels = np.repeat(np.arange(k), per_class)
    g = torch.Generator().manual_seed(seed)
    if kind == "diffusion":
        c = module.config
        device = next(module.parameters()).device
        schedule = NoiseSchedule.from_dict(meta["card"]["schedule"])

        def net(*args):  # the torch module as the sampler's callable: (x, t, y), or a student's (x, t, y, w)
            return module(*[torch.from_numpy(a).to(device) for a in args]).cpu().numpy()

        how = default_settings(student_steps)  # what the SDK draws this model with by default
        guidance_range = meta["card"].get("guidance_range") if c.guidance_input else None
        w = 3.0 if guidance_range is None else min(max(3.0, guidance_range[0]), guidance_range[1])
        imgs = sample(net, (len(labels), c.in_channels, c.image_size, c.image_size), labels,
                      schedule=schedule, guidance=w, null_class=c.null_class, seed=seed,
                      prediction_type=meta["card"]["prediction_type"],
                      guidance_range=None if guidance_range is None else tuple(guidance_range), **how)
    elif kind == "gan":
        device = next(module.parameters()).device
        z = torch.randn(len(labels), module.config.latent_dim, generator=g).to(device)
        imgs = module(z, torch.from_numpy(labels).to(device)).cpu().numpy()
    elif kind == "vae":
        dec = module.decoder
        z = torch.randn(k * per_class, module.config.latent_dim, generator=g).to(next(dec.parameters()).device)
        imgs = dec(z).cpu().numpy()
        return labelled_grid(to_uint8(imgs), per_class)
    else:
        return None
    return labelled_grid(to_uint8(imgs), per_class, row_labels=names)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------

def model_card(cfg: TrainConfig, model_cfg) -> ModelCard:
    """The card of the model this run trains (the VAE's class centroids are added when it is saved). A distilled
    student's says so: kind "diffusion_student" (served beside its teacher under its own names), the guidance range
    it learnt, and the DDIM steps it was step-distilled for (None after the guidance stage alone)."""
    diffusion = cfg.kind == "diffusion"
    student = diffusion and bool(getattr(model_cfg, "guidance_input", False))
    return ModelCard(
        kind="diffusion_student" if student else cfg.kind, class_names=tuple(CLASS_NAMES),
        image=ImageFormat(model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size, (-1.0, 1.0)),
        conditional=cfg.kind in ("diffusion", "gan"),
        schedule=NoiseSchedule(**cfg.schedule).to_dict() if diffusion else None,
        prediction_type=cfg.prediction_type if diffusion else None,
        null_class=model_cfg.null_class if diffusion else None,
        latent_dim=getattr(model_cfg, "latent_dim", None) if cfg.kind in ("gan", "vae") else None,
        guidance_range=(cfg.guidance_min, cfg.guidance_max) if student else None,
        distilled_steps=cfg.distill_to_steps if student and cfg.distill == "steps" else None)


def _halving_done(cfg: TrainConfig, step: int) -> bool:
    """Whether `step` ends a halving of step distillation (its EMA then becomes the next halving's teacher)."""
    return bool(cfg.stages) and step > 0 and step % cfg.stage_length == 0


def _meta(cfg: TrainConfig, model_cfg) -> dict:
    meta = {"kind": cfg.kind, "config": model_cfg.to_dict(), "card": model_card(cfg, model_cfg).to_dict()}
    if cfg.kind == "diffusion":
        meta["label_dropout"] = cfg.label_dropout
    return meta


def _distill_setup(cfg: TrainConfig, device) -> tuple[torch.nn.Module, TrainConfig, object]:
    """The frozen teacher, the run's config with the teacher's schedule and prediction type, and the student's model
    config (the teacher's, with the guidance input)."""
    if cfg.model:
        raise ValueError("a distilled student has its teacher's architecture: drop --model")
    teacher, tmeta = ckpt.load_model(cfg.teacher, "diffusion")
    card = ckpt.card_of(tmeta, cfg.teacher).to_dict()
    distill.check_teacher(cfg.distill, teacher.config, card)
    if cfg.guidance_t_min >= card["schedule"]["num_train_timesteps"]:
        raise ValueError(f"guidance_t_min {cfg.guidance_t_min} would leave no timestep guided: the teacher's schedule "
                         f"has T={card['schedule']['num_train_timesteps']} (t in [0, T))")
    cfg = dataclasses.replace(cfg, schedule=card["schedule"], prediction_type=card["prediction_type"])
    student_cfg = dataclasses.replace(teacher.config, guidance_input=True,
                                      extra_top_blocks=teacher.config.extra_top_blocks + cfg.extra_top_blocks)
    return teacher.to(device).eval().requires_grad_(False), cfg, student_cfg


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the path of model.safetensors."""
    rank, world, device = _setup_distributed()
    torch.manual_seed(cfg.seed + rank)
    precision, why = resolve_precision(cfg.precision, device)
    if precision != "fp32" and cfg.kind != "diffusion":
        raise ValueError(f"--precision {cfg.precision}: reduced-precision training is offered for diffusion only")
    cfg = dataclasses.replace(cfg, precision=precision) if cfg.kind == "diffusion" else cfg
    if rank == 0 and cfg.kind == "diffusion":
        print(f"training precision: {precision} ({why})", flush=True)
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    teacher = None
    if cfg.distill:
        teacher, cfg, model_cfg = _distill_setup(cfg, device)
    else:
        model_cfg = CONFIGS[cfg.kind].from_dict(cfg.model)
    meta = _meta(cfg, model_cfg)
    mods = {"model": build_model(cfg.kind, model_cfg).to(device)}
    if teacher is not None:
        # the student starts as its teacher: a stage-1 student's new guidance embedding starts at zero, and its extra
        # full-resolution blocks (extra_top_blocks) as the identity
        missing, unexpected = mods["model"].load_state_dict(teacher.state_dict(), strict=False)
        new = ("guidance_mlp.", *(f"top.{i}." for i in range(len(teacher.top), len(mods["model"].top))))
        assert not unexpected and all(k.startswith(new) for k in missing), (missing, unexpected)
        meta["distill"] = {"stage": cfg.distill, "teacher": str(cfg.teacher),
                           "teacher_sha256": file_sha256(cfg.teacher),
                           "guidance_range": [cfg.guidance_min, cfg.guidance_max], "stages": cfg.stages,
                           "spacing": distill.STUDENT_SPACING if cfg.stages else None}
    if cfg.kind == "gan":
        mods["disc"] = Discriminator(model_cfg).to(device)
    betas = (0.5, 0.999) if cfg.kind == "gan" else (0.9, 0.999)
    base_lr = {"model": cfg.lr, "disc": cfg.disc_lr or cfg.lr}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=base_lr[name], betas=betas, weight_decay=0.0)
            for name, m in mods.items()}
    ema = copy.deepcopy(mods["model"]).eval().requires_grad_(False) if cfg.kind in ("diffusion", "gan") else None

    # Resume.
    step, elapsed, history = 0, 0.0, {}
    last = out / "last.safetensors"
    if last.exists():
        tensors, old = ckpt.load_checkpoint(last, cfg.kind)
        if CONFIGS[cfg.kind].from_dict(old["config"]) != model_cfg:  # JSON lists against the config's tuples
            raise ckpt.CheckpointError(f"{last} was trained with model config {old['config']}, not {meta['config']}; "
                                       "use another --out directory or the same config")
        old_card = ckpt.card_of(old).to_dict()
        for key in ("prediction_type", "schedule"):
            if old_card.get(key) != meta["card"].get(key):
                raise ckpt.CheckpointError(f"{last} was trained with {key} {old_card.get(key)!r}, not "
                                           f"{meta['card'].get(key)!r}; use another --out directory or the same {key}")
        warnings = resume_changes(old["train"].get("train_config", {}), cfg, old["train"]["step"],
                                  (old.get("distill") or {}).get("teacher_sha256"),
                                  (meta.get("distill") or {}).get("teacher_sha256"))
        for name, m in mods.items():
            ckpt.load_state(m, tensors, f"train.{name}", last)
            ckpt.restore_optimizer(opts[name], name, tensors, old["train"]["optim"][name])
        if ema is not None:
            ckpt.load_state(ema, tensors, "model", last)
        if cfg.stages:  # progressive distillation: the teacher of the stage it stopped in
            ckpt.load_state(teacher, tensors, "train.teacher", last)
        step, elapsed = old["train"]["step"], old["train"]["elapsed_s"]
        history = old["train"].get("last_losses", {})
        if rank == 0:
            print(f"resuming {cfg.kind} from {last} at step {step}", flush=True)
            if cfg.time_limit_min is not None:
                left = cfg.time_limit_min - elapsed / 60
                print(f"--time-limit {cfg.time_limit_min:g} min counts the run's training in all: {elapsed / 60:.1f} "
                      f"min recorded, " + (f"{left:.1f} min left" if left > 0 else
                                           "none left: one step, then stop (raise the limit to train on)"),
                      flush=True)
            for w in warnings:
                print(f"warning: {w}", file=sys.stderr, flush=True)
    if step >= cfg.steps:
        if rank == 0:
            print(f"{last} is already at step {step} >= --steps {cfg.steps}; nothing to do")
        return out / "model.safetensors"
    for name in mods:
        mods[name] = _wrap(mods[name], device, world)
        mods[name].train()

    data = load_fashion_mnist("train", cfg.data_dir, limit=cfg.limit)
    images = torch.from_numpy(data.images.copy()).float().div(127.5).sub(1).unsqueeze(1).to(device)  # (N, 1, 28, 28) in [-1, 1]
    labels = torch.from_numpy(data.labels).to(device)
    gen = torch.Generator(device=device)
    alphas_cumprod = _diffusion_tables(meta, device) if cfg.kind == "diffusion" else None
    step_fn = _distill_step if cfg.distill else STEPS[cfg.kind]
    if teacher is not None:
        mods["teacher"] = teacher  # frozen: no optimizer, never wrapped, saved only when stages change it
    local_bs = max(1, cfg.batch_size // world)

    def save(final: bool = False):
        if rank != 0:
            return
        tensors, optim_info = {}, {}
        for name, m in mods.items():
            if name == "teacher":
                if cfg.stages:
                    tensors.update(ckpt.with_prefix(m.state_dict(), "train.teacher"))
                continue
            tensors.update(ckpt.with_prefix(_unwrap(m).state_dict(), f"train.{name}"))
            t_opt, info = ckpt.optimizer_tensors(opts[name], name)
            tensors.update(t_opt)
            optim_info[name] = info
        export_module = ema if ema is not None else _unwrap(mods["model"])
        export_tensors = ckpt.with_prefix(export_module.state_dict(), "model")
        tensors.update(export_tensors)
        train_meta = {"step": step, "elapsed_s": round(elapsed, 1), "batch_size": cfg.batch_size, "lr": cfg.lr,
                      "seed": cfg.seed, "world_size": world, "last_losses": history,
                      "command": cfg.command or " ".join(shlex.quote(a) for a in sys.argv), "train_config": asdict(cfg)}
        ckpt.save_checkpoint(last, tensors, {**meta, "train": {**train_meta, "optim": optim_info}})
        card = meta["card"]
        if cfg.kind == "vae":
            card = {**card, "class_centroids": _vae_centroids(export_module, images, labels)}
        ckpt.save_checkpoint(out / "model.safetensors", export_tensors, {**meta, "card": card, "train": train_meta})
        if cfg.snapshot_every and (step % cfg.snapshot_every == 0):
            (out / "snapshots").mkdir(exist_ok=True)
            ckpt.save_checkpoint(out / "snapshots" / f"step_{step:07d}.safetensors", export_tensors,
                                 {**meta, "card": card, "train": train_meta})
        if _halving_done(cfg, step):  # each halving's student, servable at its own steps (the card says which)
            n = cfg.stages[distill.stage_of(step - 1, cfg.stage_length, cfg.stages)]  # the halving just ended
            (out / "stages").mkdir(exist_ok=True)
            ckpt.save_checkpoint(out / "stages" / f"steps_{n:04d}.safetensors", export_tensors,
                                 {**meta, "card": {**card, "distilled_steps": n}, "train": train_meta})

    log_path = out / "log.csv"
    log_file = None
    if rank == 0:
        new = not log_path.exists() or step == 0
        log_file = open(log_path, "w" if new else "a", newline="")
    writer = None
    bar = None
    if rank == 0 and cfg.progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.kind}", dynamic_ncols=True, mininterval=2.0)
        except ImportError:
            pass
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    t_start = time.time() - elapsed
    try:
        while step < cfg.steps:
            for name, o in opts.items():
                for group in o.param_groups:
                    group["lr"] = base_lr[name] * lr_factor(cfg, step)
            if cfg.stages and step > 0 and step % cfg.stage_length == 0:
                # a new halving: the student (its EMA) becomes the teacher and the next student starts from it
                # (Salimans & Ho 2022, algorithm 2), with fresh optimiser moments
                teacher.load_state_dict(ema.state_dict())
                _unwrap(mods["model"]).load_state_dict(ema.state_dict())
                opts["model"].state.clear()
                if rank == 0:
                    print(f"stage {step // cfg.stage_length + 1}/{len(cfg.stages)}: "
                          f"{cfg.stages[step // cfg.stage_length]} student steps", flush=True)
            # Randomness is a function of (seed, rank, step) alone, so a resumed run repeats an uninterrupted one.
            step_seed = (cfg.seed * 1_000_003 + rank) * 10_000_019 + step
            gen.manual_seed(step_seed)
            torch.manual_seed(step_seed)  # modules' own randomness (VAE reparameterisation, dropout)
            idx = torch.from_numpy(np.random.default_rng([cfg.seed, rank, step]).integers(0, len(labels), local_bs))
            idx = idx.to(device)
            losses = step_fn(cfg, mods, opts, images[idx], labels[idx], gen, alphas_cumprod, step)
            step += 1
            if ema is not None:  # EMA with warm-up of the decay (as in many DDPM codebases)
                decay = min(cfg.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), _unwrap(mods["model"]).parameters()):
                        pe.lerp_(pm, 1 - decay)
                    for be, bm in zip(ema.buffers(), _unwrap(mods["model"]).buffers()):
                        be.copy_(bm)  # BatchNorm running statistics (GAN generator): the live model's
            for k, v in losses.items():  # a loss logged only on some steps (lazy R1) is averaged over those
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            elapsed = time.time() - t_start
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()}, refresh=False)
            if step % cfg.log_every == 0 or step == cfg.steps:
                history = {k: round(v / counts[k], 5) for k, v in sums.items()}
                if rank == 0:
                    if writer is None:
                        writer = csv.DictWriter(log_file, fieldnames=["step", "elapsed_s", *history])
                        if log_file.tell() == 0:
                            writer.writeheader()
                    writer.writerow({"step": step, "elapsed_s": round(elapsed, 1), **history})
                    log_file.flush()
                sums, counts = {}, {}
            stop = cfg.time_limit_min is not None and elapsed > cfg.time_limit_min * 60
            if cfg.time_limit_min is not None and dist.is_initialized():
                # every rank must stop at the same step, or the next gradient all-reduce would hang
                flag = torch.tensor([float(stop)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            snapshot = (cfg.snapshot_every and step % cfg.snapshot_every == 0) or _halving_done(cfg, step)
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stop or snapshot:
                save()
            final = (step == cfg.steps or stop) and step >= cfg.sample_every  # no preview for tiny test runs
            if rank == 0 and (step % cfg.sample_every == 0 or final):
                n = cfg.stages[distill.stage_of(step - 1, cfg.stage_length, cfg.stages)] if cfg.stages else None
                grid = preview(cfg.kind, ema if ema is not None else _unwrap(mods["model"]), meta, student_steps=n)
                _unwrap(mods["model"]).train()
                if grid is not None:
                    save_png(out / "samples" / f"step_{step:07d}.png", grid)
            if stop:
                if rank == 0:
                    print(f"time limit of {cfg.time_limit_min} min reached at step {step}", flush=True)
                break
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
        if dist.is_initialized():
            dist.barrier()
    if cfg.kind == "classifier" and rank == 0:
        acc = evaluate_classifier(_unwrap(mods["model"]), cfg.data_dir)
        tensors, m = ckpt.load_checkpoint(out / "model.safetensors")
        m["test_accuracy"] = acc
        ckpt.save_checkpoint(out / "model.safetensors", tensors, m)
        print(f"classifier test accuracy: {acc:.4f}")
    return out / "model.safetensors"


@torch.no_grad()
def _vae_centroids(vae, images, labels) -> list[list[float]]:
    """Mean posterior mean per class: lets a client interpolate between classes with the decoder alone."""
    vae.eval()
    sums = torch.zeros(int(labels.max()) + 1, vae.config.latent_dim)
    counts = torch.zeros(int(labels.max()) + 1)
    for i in range(0, len(labels), 2048):
        mean, _ = vae.encoder(images[i:i + 2048])
        sums.index_add_(0, labels[i:i + 2048].cpu(), mean.cpu())
        counts.index_add_(0, labels[i:i + 2048].cpu(), torch.ones(len(mean)))
    vae.train()
    return (sums / counts.clamp(min=1)[:, None]).tolist()


@torch.no_grad()
def evaluate_classifier(clf, data_dir=None, split="test") -> float:
    clf.eval()
    data = load_fashion_mnist(split, data_dir)
    x = torch.from_numpy(data.images.copy()).float().div(127.5).sub(1).unsqueeze(1)
    pred = torch.cat([clf(x[i:i + 1000].to(next(clf.parameters()).device)).argmax(1).cpu() for i in range(0, len(x), 1000)])
    clf.train()
    return float((pred.numpy() == data.labels).mean())


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

TIME_LIMIT_HELP = ("stop and save once the run has trained this many minutes in all (a resume counts the minutes "
                   "its checkpoint records)")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="trident train", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--out", required=True, help="output directory (re-use it to resume)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (split across torchrun ranks)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: $TRIDENT_DATA_DIR or "
                                                    "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--model", default="{}", help='JSON overrides of the model config, e.g. \'{"base_channels": 16}\'')
    p.add_argument("--schedule", default="{}", help='diffusion: JSON noise schedule, e.g. \'{"kind": "cosine"}\'')
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--prediction", default="epsilon", choices=PREDICTION_TYPES,
                   help="diffusion: what the U-Net predicts (v_prediction: Salimans & Ho 2022)")
    p.add_argument("--min-snr-gamma", type=float, default=0.0, help="diffusion: Min-SNR-gamma loss weight (0 = off)")
    p.add_argument("--lr-schedule", default="constant", choices=LR_SCHEDULES,
                   help="after warm-up: constant, or cosine decay to --lr-min-ratio x lr at --steps")
    p.add_argument("--lr-min-ratio", type=float, default=0.05)
    p.add_argument("--precision", default="fp32", choices=TRAIN_PRECISIONS,
                   help="diffusion: bf16 autocast; auto = bf16 where the CPU/GPU computes bf16 natively, else fp32")
    p.add_argument("--snapshot-every", type=int, default=0,
                   help="also keep the exported weights as snapshots/step_N.safetensors every N steps (0 = never)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--gan-augment", default="", help="GAN: DiffAugment policies, e.g. translation,cutout")
    p.add_argument("--gan-r1", type=float, default=0.0, help="GAN: R1 penalty weight (0 = off)")
    p.add_argument("--gan-r1-every", type=int, default=4, help="GAN: apply R1 every N discriminator turns")
    p.add_argument("--disc-lr", type=float, default=None, help="GAN: discriminator learning rate (default: --lr)")
    p.add_argument("--gan-mode-seeking", type=float, default=0.0, help="GAN: mode-seeking weight (0 = off)")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sample-every", type=int, default=1000)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--time-limit", type=float, default=None, help=TIME_LIMIT_HELP)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _json_arg(text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} is not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text!r}")
    return value


def _run(prog: str, parser: argparse.ArgumentParser, argv, make_config) -> int:
    """Parse argv, build the TrainConfig (make_config(args, argv)), train, and turn a bad argument, dataset or
    checkpoint into exit 2 with one line naming it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        path = train(make_config(args, argv))
    except (ValueError, TypeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from .data import DatasetError
        if isinstance(e, (DatasetError, ckpt.CheckpointError)):
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    def config(args, argv):
        cfg = TrainConfig(kind=args.kind, out_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed, data_dir=args.data_dir, limit=args.limit,
                          model=_json_arg(args.model, "--model"), schedule=_json_arg(args.schedule, "--schedule"),
                          label_dropout=args.label_dropout, ema_decay=args.ema_decay, warmup_steps=args.warmup_steps,
                          prediction_type=args.prediction, min_snr_gamma=args.min_snr_gamma,
                          lr_schedule=args.lr_schedule, lr_min_ratio=args.lr_min_ratio, precision=args.precision,
                          snapshot_every=args.snapshot_every,
                          gan_augment=args.gan_augment, gan_r1=args.gan_r1, gan_r1_every=args.gan_r1_every,
                          disc_lr=args.disc_lr, gan_mode_seeking=args.gan_mode_seeking,
                          log_every=args.log_every, sample_every=args.sample_every, ckpt_every=args.ckpt_every,
                          time_limit_min=args.time_limit, progress=not args.no_progress,
                          command="trident train " + " ".join(shlex.quote(a) for a in argv))
        CONFIGS[cfg.kind].from_dict(cfg.model)
        return cfg

    return _run("trident train", build_parser(), argv, config)


DISTILL_HELP = """Distil the diffusion teacher into a student that draws with one network row per step, in a few steps.

  trident distill guidance TEACHER --out DIR [--steps N]                    stage 1 (Meng et al. 2023): the guidance
      scale becomes an input; the student learns the teacher's guided pair [cond; null] in one row
  trident distill steps STAGE1 --out DIR --from-steps 64 --to-steps 4 --steps-per-stage N
      stage 2 (Salimans & Ho 2022): progressive halvings of DDIM steps, each student the next one's teacher

Writes what `trident train` writes (last.safetensors to resume, model.safetensors, log.csv, preview grids) and the
student's model.safetensors exports like any diffusion checkpoint. Re-running with the same DIR resumes.
"""


def build_distill_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trident distill", description=DISTILL_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=distill.STAGES)
    p.add_argument("teacher", help="the teacher's model.safetensors (stage 1: `trident train diffusion`; stage 2: "
                                   "a stage-1 student)")
    p.add_argument("--out", required=True, help="output directory (re-use it to resume)")
    p.add_argument("--steps", type=int, default=2000, help="guidance: training steps")
    p.add_argument("--steps-per-stage", type=int, default=1000, help="steps: training steps per halving")
    p.add_argument("--from-steps", type=int, default=64, help="steps: the first teacher's DDIM steps")
    p.add_argument("--to-steps", type=int, default=4, help="steps: the final student's DDIM steps")
    p.add_argument("--guidance-min", type=float, default=1.0)
    p.add_argument("--guidance-max", type=float, default=5.0)
    p.add_argument("--guidance-weight-power", type=float, default=0.0,
                   help="guidance: weigh each row's loss by w ** -P (0: plain MSE; 2: error relative to the guided "
                        "target's scale)")
    p.add_argument("--guidance-t-min", type=int, default=0,
                   help="guidance: the teacher's pair is guided only at timesteps t >= T (below, the target is its "
                        "conditional output at any w: guidance limited to an interval of noise levels; 0 = everywhere)")
    p.add_argument("--guidance-interval-max-w", type=float, default=0.0, metavar="W",
                   help="guidance: --guidance-t-min's interval only for rows with w <= W; rows above W are guided "
                        "at every t (0 = every row)")
    p.add_argument("--snapshot-every", type=int, default=0,
                   help="also keep the exported weights as snapshots/step_N.safetensors every N steps (0 = never; "
                        "step distillation keeps each halving's as stages/steps_NNNN.safetensors anyway)")
    p.add_argument("--extra-top-blocks", type=int, default=0,
                   help="guidance: give the student this many more res blocks at full resolution than its teacher, "
                        "each starting as the identity (capacity where the image's detail is; ~7.6%% more FLOPs "
                        "each on the shipped U-Net)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--precision", default="auto", choices=TRAIN_PRECISIONS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sample-every", type=int, default=500)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--time-limit", type=float, default=None, help=TIME_LIMIT_HELP)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def distill_main(argv=None) -> int:
    def config(args, argv):
        n_stages = len(distill.halvings(args.from_steps, args.to_steps)) if args.stage == "steps" else 0
        return TrainConfig(kind="diffusion", out_dir=args.out, distill=args.stage, teacher=args.teacher,
                           steps=args.steps_per_stage * n_stages if n_stages else args.steps,
                           distill_from_steps=args.from_steps, distill_to_steps=args.to_steps,
                           guidance_min=args.guidance_min, guidance_max=args.guidance_max,
                           guidance_weight_power=args.guidance_weight_power, guidance_t_min=args.guidance_t_min,
                           guidance_interval_max_w=args.guidance_interval_max_w, extra_top_blocks=args.extra_top_blocks,
                           batch_size=args.batch_size, lr=args.lr, lr_schedule=args.lr_schedule,
                           warmup_steps=args.warmup_steps, ema_decay=args.ema_decay, label_dropout=args.label_dropout,
                           precision=args.precision, seed=args.seed, data_dir=args.data_dir, limit=args.limit,
                           log_every=args.log_every, sample_every=args.sample_every, ckpt_every=args.ckpt_every,
                           time_limit_min=args.time_limit, progress=not args.no_progress,
                           snapshot_every=args.snapshot_every,
                           command="trident distill " + " ".join(shlex.quote(a) for a in argv))

    return _run("trident distill", build_distill_parser(), argv, config)


if __name__ == "__main__":
    sys.exit(main())

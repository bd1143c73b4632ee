"""trident.serving.sampling against HuggingFace diffusers' schedulers (the oracle), plus the CFG and loop contracts.

diffusers is a test-only dependency and is imported here only. The oracle schedulers run on our float64 schedule
tables (tables are pinned against diffusers' own float32 ones separately), so the loop comparisons check the step
math; diffusers' DPM-Solver computes its update in float32, hence float32 tolerances throughout.
"""
from __future__ import annotations

import json
import re
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from trident.serving.sampling import (
    LOGSNR_MIN,
    SAMPLERS,
    NoiseSchedule,
    SamplingCancelled,
    StepOutput,
    cfg_eps,
    eps_from_prediction,
    make_sampler,
    sample,
    sample_progressive,
    sampling_loop,
    spaced_timesteps,
)

T = 1000
SHAPE = (2, 3, 4, 4)
NULL = 10
TOL = dict(rtol=1e-5, atol=1e-5)
LINEAR = NoiseSchedule()
COSINE = NoiseSchedule(kind="cosine")


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------

def dummy_eps(x, t):
    """Deterministic stand-in for a network (diffusers' scheduler tests use x * t / (t + 1)); numpy or torch."""
    cos = torch.cos if isinstance(x, torch.Tensor) else np.cos
    return 0.1 * x * t / (t + 1) + 0.05 * cos(x)


class RecordingModel:
    """eps(x, t, y) callable that records every call (shapes, dtypes, labels)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append({"x": x.copy(), "t": t.copy(), "y": y.copy()})
        # depends on y so that conditional and unconditional rows differ
        return (dummy_eps(x, t[:, None, None, None]) + 0.01 * y[:, None, None, None]).astype(np.float32)


def diffusers_scheduler(name, schedule, spacing, *, clip_sample=None, set_alpha_to_one=True,
                        variance="fixed_small", prediction_type="epsilon"):
    """The diffusers scheduler our sampler `name` claims to match, switched onto our float64 tables."""
    common = dict(num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start,
                  prediction_type=prediction_type,
                  beta_end=schedule.beta_end, timestep_spacing=spacing,
                  beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule.kind])
    if name == "ddpm":
        sched = DDPMScheduler(**common, clip_sample=True if clip_sample is None else clip_sample,
                              variance_type=variance)
    elif name == "ddim":
        sched = DDIMScheduler(**common, clip_sample=True if clip_sample is None else clip_sample,
                              set_alpha_to_one=set_alpha_to_one)
    else:
        # clipping x0 to [-1, 1] is diffusers' dynamic thresholding with sample_max_value=1 (s is clamped to [1, 1])
        sched = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                            solver_type="midpoint", lower_order_final=True,
                                            final_sigmas_type="zero", thresholding=True if clip_sample is None else clip_sample,
                                            sample_max_value=1.0)
    sched.betas = torch.from_numpy(schedule.betas.copy())
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod.copy())
    if name == "ddim":
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one \
            else sched.alphas_cumprod[0]
    return sched


def diffusers_oracle(name, schedule, spacing, steps, **options):
    """diffusers_scheduler with its timesteps set: diffusers' own layout of `spacing`, or for "logsnr", which diffusers
    has no name for (its use_lu_lambdas lays out another grid), ours handed over as custom timesteps."""
    if spacing != "logsnr":
        theirs = diffusers_scheduler(name, schedule, spacing, **options)
        return theirs, diffusers_set_timesteps(theirs, steps)
    custom = spaced_timesteps(schedule.num_train_timesteps, steps, spacing, skip_zero=name == "dpmpp-2m",
                              alphas_cumprod=schedule.alphas_cumprod)
    theirs = diffusers_scheduler(name, schedule, "linspace", **options)
    return theirs, diffusers_set_timesteps(theirs, steps, custom)


def diffusers_set_timesteps(sched, steps, timesteps=None):
    """diffusers' own layout of `steps`, or the given timesteps (a spacing diffusers has no name for)."""
    if timesteps is None:
        sched.set_timesteps(steps)
    else:
        sched.set_timesteps(timesteps=[int(t) for t in timesteps])
    ts = sched.timesteps.numpy()
    if isinstance(sched, DPMSolverMultistepScheduler):
        # set_timesteps rebuilds sigmas from alphas_cumprod and casts them to float32: redo it in float64
        abar = sched.alphas_cumprod.numpy()[ts]
        sched.sigmas = torch.from_numpy(np.append(np.sqrt((1 - abar) / abar), 0.0))
    if isinstance(sched, DDIMScheduler) and sched.config.timestep_spacing != "leading":
        # diffusers' DDIMScheduler.step steps to t - T // num_inference_steps, which is the next entry of .timesteps
        # only for "leading" spacing (diffusers issue #12633); ours steps to the next entry. Where the schedule has one
        # constant stride k, pick the num_inference_steps n' with T // n' == k so that diffusers' own step() walks the
        # same timesteps.
        strides = set((-np.diff(ts)).tolist())
        assert len(strides) == 1, f"oracle needs a constant stride, got {sorted(strides)}"
        k = strides.pop()
        n_alt = sched.config.num_train_timesteps // k
        assert sched.config.num_train_timesteps // n_alt == k
        sched.num_inference_steps = n_alt
    return ts


def compare_loops(name, schedule, spacing, steps, *, eta=0.0, **options):
    """Run our sampler and the diffusers oracle over a whole loop from the same x_T and the same step noise; assert
    equal timesteps and every step's prev_sample and x0 prediction to float32 tolerance. Returns the number of steps."""
    clipped_eps = options.pop("use_clipped_model_output", True)  # DDIM; ours defaults to True, diffusers to False
    theirs, their_ts = diffusers_oracle(name, schedule, spacing, steps, **options)
    our_options = {"clip_sample": options["clip_sample"]} if options.get("clip_sample") is not None else {}
    if name == "ddim":
        our_options.update(eta=eta, set_alpha_to_one=options.get("set_alpha_to_one", True))
        if clipped_eps is not True:
            our_options["use_clipped_model_output"] = clipped_eps
    if name == "ddpm" and "variance" in options:
        our_options["variance"] = options["variance"]
    ours = make_sampler(name, schedule, **our_options)
    ours.set_timesteps(steps, spacing=spacing)

    assert ours.timesteps.dtype == np.int64
    np.testing.assert_array_equal(ours.timesteps, their_ts)

    x_ours = np.random.default_rng(0).standard_normal(SHAPE)
    x_theirs = torch.from_numpy(x_ours.copy())
    gen_theirs = torch.Generator().manual_seed(1)  # DDPMScheduler draws its own noise with torch.randn(generator=)
    gen_ours = torch.Generator().manual_seed(1)
    noise_rng = np.random.default_rng(2)
    for i, t in enumerate(ours.timesteps):
        t = int(t)
        noise = None
        if name == "ddpm":
            their_out = theirs.step(dummy_eps(x_theirs, float(t)), torch.tensor(t), x_theirs, generator=gen_theirs)
            if t > 0:  # diffusers draws only when t > 0; reproduce the same draw
                noise = torch.randn(SHAPE, generator=gen_ours, dtype=torch.float64).numpy()
        elif name == "ddim":
            kwargs = {}
            if eta > 0:
                noise = noise_rng.standard_normal(SHAPE)
                kwargs["variance_noise"] = torch.from_numpy(noise)
            their_out = theirs.step(dummy_eps(x_theirs, float(t)), t, x_theirs, eta=eta,
                                    use_clipped_model_output=clipped_eps, **kwargs)
        else:
            their_out = theirs.step(dummy_eps(x_theirs, float(t)), torch.tensor(t), x_theirs)
        out = ours.step(dummy_eps(x_ours, float(t)), t, x_ours, noise=noise)

        assert isinstance(out, StepOutput)
        their_x0 = theirs.model_outputs[-1] if name == "dpmpp-2m" else their_out.pred_original_sample
        np.testing.assert_allclose(out.pred_original_sample, their_x0.double().numpy(), **TOL,
                                   err_msg=f"{name} {spacing}: x0 at step {i} (t={t})")
        np.testing.assert_allclose(out.prev_sample, their_out.prev_sample.double().numpy(), **TOL,
                                   err_msg=f"{name} {spacing}: prev_sample at step {i} (t={t})")
        x_ours, x_theirs = out.prev_sample, their_out.prev_sample.double()
    return len(ours.timesteps)


def model_kwargs(**overrides):
    kw = dict(schedule=LINEAR, sampler="ddim", steps=4, guidance=2.0, null_class=NULL, seed=0)
    kw.update(overrides)
    return kw


# ----------------------------------------------------------------------------------------------------------------
# Samplers vs diffusers
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_matches_diffusers_every_step_when_linear_schedule(name, spacing):
    assert compare_loops(name, LINEAR, spacing, 10) == 10


@pytest.mark.parametrize("name,spacing", [("ddpm", "leading"), ("ddim", "trailing"), ("dpmpp-2m", "linspace")])
def test_sampler_matches_diffusers_every_step_when_cosine_schedule(name, spacing):
    compare_loops(name, COSINE, spacing, 10)


@pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_matches_diffusers_every_step_when_eta_positive(spacing, schedule):
    compare_loops("ddim", schedule, spacing, 10, eta=0.7)


@pytest.mark.parametrize("name,spacing", [("ddpm", "trailing"), ("ddpm", "linspace"), ("dpmpp-2m", "trailing"),
                                          ("dpmpp-2m", "leading")])
def test_sampler_matches_diffusers_every_step_when_steps_do_not_divide_T(name, spacing):
    compare_loops(name, LINEAR, spacing, 7)


@pytest.mark.parametrize("name,options", [
    ("ddpm", {"clip_sample": False}),
    ("ddpm", {"variance": "fixed_large"}),
    ("ddim", {"clip_sample": False}),
    ("ddim", {"set_alpha_to_one": False}),
    ("ddim", {"use_clipped_model_output": False}),
    ("ddim", {"use_clipped_model_output": False, "clip_sample": False}),
    ("dpmpp-2m", {"clip_sample": True}),
    ("dpmpp-2m", {"clip_sample": False}),
])
def test_sampler_matches_diffusers_every_step_when_options_changed(name, options):
    compare_loops(name, LINEAR, "leading" if name != "dpmpp-2m" else "linspace", 10, **options)


def test_dpmpp_matches_diffusers_every_step_when_many_steps():
    # >= 15 steps: diffusers' lower_order_final then only lowers the last step (final sigma 0)
    compare_loops("dpmpp-2m", LINEAR, "linspace", 20)


@pytest.mark.parametrize("schedule,steps", [(LINEAR, 20), (LINEAR, 7), (COSINE, 20)], ids=["linear-20", "linear-7",
                                                                                      "cosine-20"])
def test_dpmpp_matches_diffusers_every_step_when_logsnr_spacing(schedule, steps):
    assert compare_loops("dpmpp-2m", schedule, "logsnr", steps) == steps


@pytest.mark.parametrize("skip_zero", [False, True], ids=["with-zero", "skip-zero"])
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50, 200, T - 1])
@pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_logsnr_spacing_gives_distinct_descending_timesteps_when_any_steps(schedule, steps, skip_zero):
    ts = spaced_timesteps(T, steps, "logsnr", skip_zero=skip_zero, alphas_cumprod=schedule.alphas_cumprod)
    assert ts.dtype == np.int64 and len(ts) == steps
    assert ts[0] == T - 1 and ts.min() >= 0 and np.all(np.diff(ts) < 0)
    if not skip_zero and steps > 1:
        assert ts[-1] == 0


def test_logsnr_spacing_takes_nearest_timestep_to_uniform_log_snr_when_linear_20_steps():
    lam = 0.5 * np.log(LINEAR.alphas_cumprod / (1 - LINEAR.alphas_cumprod))
    ts = spaced_timesteps(T, 20, "logsnr", skip_zero=True, alphas_cumprod=LINEAR.alphas_cumprod)
    targets = np.linspace(lam[-1], lam[0], 21)[:20]  # 21 points, t = 0 dropped (DPM-Solver's final step)
    nearest = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)
    np.testing.assert_array_equal(ts, nearest)
    h = (lam[0] - lam[-1]) / 20  # in log-SNR the steps are equal up to rounding to whole timesteps, which near
    assert np.abs(np.diff(lam[ts]) - h).max() < 0.1  # t = 0 (lambda 4.6 at t=0, 4.1 at t=1) costs up to ~0.1


def test_logsnr_spacing_starts_at_T_then_steps_evenly_from_clipped_log_snr_when_cosine_schedule():
    # the cosine schedule's capped last beta: lambda -6.5 at t=998, -9.9 at t=999. A grid from -9.9 spent 9 of 20 steps
    # on t >= 986 (999, 998, ..., 992, 986); from LOGSNR_MIN (-5.1) every step after the first is even in log-SNR
    lam = 0.5 * np.log(COSINE.alphas_cumprod / (1 - COSINE.alphas_cumprod))
    ts = spaced_timesteps(T, 20, "logsnr", skip_zero=True, alphas_cumprod=COSINE.alphas_cumprod)
    assert ts[0] == T - 1 and np.sum(ts >= 986) <= 3
    h = (lam[0] - LOGSNR_MIN) / 20
    assert np.abs(np.diff(lam[ts[1:]]) - h).max() < 0.1


def test_logsnr_spacing_raises_value_error_when_schedule_missing_or_steps_exceed_T():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        spaced_timesteps(T, 20, "logsnr")
    with pytest.raises(ValueError, match="distinct timesteps"):
        spaced_timesteps(T, T, "logsnr", skip_zero=True, alphas_cumprod=LINEAR.alphas_cumprod)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_sampler_default_spacing_equals_diffusers_default_when_spacing_omitted(name):
    theirs = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[name]()
    theirs.set_timesteps(10)
    ours = make_sampler(name, LINEAR)
    ours.set_timesteps(10)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())


def test_dpmpp_default_spacing_is_logsnr_and_linspace_is_diffusers_default_when_spacing_omitted():
    # DPM-Solver++ departs from diffusers' default layout on purpose (DPMSolverPP2MSampler); "linspace" is diffusers'
    theirs = DPMSolverMultistepScheduler()
    theirs.set_timesteps(10)
    ours, linspace = make_sampler("dpmpp-2m", LINEAR), make_sampler("dpmpp-2m", LINEAR)
    ours.set_timesteps(10)
    linspace.set_timesteps(10, spacing="linspace")
    assert ours.spacing == "logsnr"
    np.testing.assert_array_equal(ours.timesteps, spaced_timesteps(T, 10, "logsnr", skip_zero=True,
                                                                    alphas_cumprod=LINEAR.alphas_cumprod))
    np.testing.assert_array_equal(linspace.timesteps, theirs.timesteps.numpy())


@pytest.mark.parametrize("name", SAMPLERS)
def test_spaced_timesteps_cut_diffusers_extra_negative_step_when_trailing_61_steps(name):
    # float arange gives diffusers 62 trailing timesteps ending in t=-1 for T=1000, steps=61; we keep the first 61
    theirs = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmpp-2m": DPMSolverMultistepScheduler}[name](
        timestep_spacing="trailing")
    theirs.set_timesteps(61)
    ours = make_sampler(name, LINEAR)
    ours.set_timesteps(61, spacing="trailing")
    assert len(theirs.timesteps) == 62 and int(theirs.timesteps[-1]) == -1
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy()[:61])
    assert ours.timesteps.min() >= 0


# ----------------------------------------------------------------------------------------------------------------
# Noise schedule
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,diffusers_name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_noise_schedule_tables_match_diffusers_when_built(kind, diffusers_name):
    ours = NoiseSchedule(kind=kind)
    theirs = DDPMScheduler(beta_schedule=diffusers_name)  # float32 tables
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == np.float64
    np.testing.assert_allclose(ours.betas, theirs.betas.double().numpy(), rtol=2e-7)  # float32 rounding
    # float32 cumprod in diffusers; the cosine tail (1 - 0.999 in float32) is off by ~1.3e-5 relative
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.double().numpy(), rtol=2e-5)


def test_noise_schedule_linear_betas_equal_float64_linspace_when_linear():
    expected = torch.linspace(1e-4, 0.02, T, dtype=torch.float64).numpy()
    np.testing.assert_allclose(LINEAR.betas, expected, rtol=1e-15)


def test_noise_schedule_cosine_alphas_cumprod_equal_closed_form_when_betas_uncapped():
    def abar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    capped = np.flatnonzero(COSINE.betas >= 0.999)
    assert capped.tolist() == [T - 1]  # only the last beta is capped
    expected = np.array([abar((t + 1) / T) / abar(0) for t in range(T - 1)])  # the product telescopes
    np.testing.assert_allclose(COSINE.alphas_cumprod[:-1], expected, rtol=1e-12)


def test_noise_schedule_round_trips_through_json_when_to_dict_then_from_dict():
    s = NoiseSchedule(kind="cosine", num_train_timesteps=500, beta_start=2e-4, beta_end=0.03)
    assert NoiseSchedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    # Triton config parameters arrive as strings
    assert NoiseSchedule.from_dict({k: str(v) for k, v in s.to_dict().items()}) == s


def test_noise_schedule_tables_are_read_only_when_cached():
    with pytest.raises(ValueError):
        LINEAR.alphas_cumprod[0] = 0.5


@pytest.mark.parametrize("field,kwargs", [
    ("kind", {"kind": "quadratic"}),
    ("num_train_timesteps", {"num_train_timesteps": 0}),
    ("num_train_timesteps", {"num_train_timesteps": 10.5}),
    ("beta_start", {"beta_start": 0.0}),
    ("beta_end", {"beta_end": 1.5}),
    ("beta_start", {"beta_start": 0.05, "beta_end": 0.02}),
])
def test_noise_schedule_raises_value_error_naming_field_when_invalid(field, kwargs):
    with pytest.raises(ValueError, match=field):
        NoiseSchedule(**kwargs)


def test_noise_schedule_from_dict_raises_value_error_when_key_unknown_or_value_bad():
    with pytest.raises(ValueError, match="betastart"):
        NoiseSchedule.from_dict({"betastart": 1e-4})
    with pytest.raises(ValueError, match="num_train_timesteps"):
        NoiseSchedule.from_dict({"num_train_timesteps": 10.5})
    with pytest.raises(ValueError, match="num_train_timesteps"):
        NoiseSchedule.from_dict({"num_train_timesteps": "ten"})


# ----------------------------------------------------------------------------------------------------------------
# Sampler contract
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_step_raises_value_error_when_set_timesteps_not_called(name):
    sampler = make_sampler(name, LINEAR)
    x = np.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        sampler.step(x, 999, x)


@pytest.mark.parametrize("steps", [0, T + 1, -3, 2.5])
@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_set_timesteps_raises_value_error_naming_range_when_steps_out_of_range(name, steps):
    with pytest.raises(ValueError, match=rf"\[1, {T}\]"):
        make_sampler(name, LINEAR).set_timesteps(steps)


def test_sampler_set_timesteps_raises_value_error_when_spacing_unknown():
    with pytest.raises(ValueError, match="spacing"):
        make_sampler("ddim", LINEAR).set_timesteps(10, spacing="karras")


def test_make_sampler_raises_value_error_listing_samplers_when_name_unknown():
    with pytest.raises(ValueError, match="ddpm.*ddim.*dpmpp-2m"):
        make_sampler("euler", LINEAR)


def test_spaced_timesteps_raise_value_error_when_steps_repeat_timesteps():
    # dpm-solver's "leading" lays out steps + 1 points with stride T // (steps + 1) == 0 here
    with pytest.raises(ValueError, match="repeats timesteps"):
        spaced_timesteps(T, T, "leading", skip_zero=True)


def test_dpmpp_step_raises_value_error_when_timesteps_skipped():
    sampler = make_sampler("dpmpp-2m", LINEAR)
    sampler.set_timesteps(5)
    x = np.zeros(SHAPE)
    sampler.step(x, sampler.timesteps[0], x)
    with pytest.raises(ValueError, match="expects timestep"):
        sampler.step(x, sampler.timesteps[2], x)


@pytest.mark.parametrize("name,options", [("ddpm", {}), ("ddim", {"eta": 1.0})])
def test_sampler_step_draws_noise_from_rng_when_noise_not_given(name, options):
    outs = []
    for _ in range(2):
        sampler = make_sampler(name, LINEAR, rng=np.random.default_rng(5), **options)
        sampler.set_timesteps(10)
        x = np.ones(SHAPE)
        outs.append(sampler.step(np.zeros(SHAPE), sampler.timesteps[0], x).prev_sample)
    np.testing.assert_array_equal(outs[0], outs[1])
    sampler = make_sampler(name, LINEAR, rng=np.random.default_rng(6), **options)
    sampler.set_timesteps(10)
    assert not np.allclose(sampler.step(np.zeros(SHAPE), sampler.timesteps[0], np.ones(SHAPE)).prev_sample, outs[0])


# ----------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------

def test_cfg_eps_makes_one_call_of_2B_with_cond_then_null_labels_when_guided():
    model = RecordingModel()
    x = np.random.default_rng(0).standard_normal(SHAPE)
    cfg_eps(model, x, 500, np.array([3, 7]), 4.0, NULL)
    assert len(model.calls) == 1
    call = model.calls[0]
    assert call["x"].shape == (4, *SHAPE[1:]) and call["x"].dtype == np.float32
    assert call["t"].dtype == np.float32 and call["t"].tolist() == [500.0] * 4
    assert call["y"].dtype == np.int64 and call["y"].tolist() == [3, 7, NULL, NULL]
    np.testing.assert_array_equal(call["x"][:2], call["x"][2:])


def test_cfg_eps_makes_one_call_of_B_with_labels_when_guidance_scale_is_one():
    model = RecordingModel()
    cfg_eps(model, np.zeros(SHAPE), 10, [1, 2], 1.0, NULL)
    assert [c["y"].tolist() for c in model.calls] == [[1, 2]]


def test_cfg_eps_makes_one_call_with_null_class_when_labels_none():
    model = RecordingModel()
    cfg_eps(model, np.zeros(SHAPE), 10, None, 4.0, NULL)
    assert [c["y"].tolist() for c in model.calls] == [[NULL, NULL]]


def test_cfg_eps_equals_uncond_plus_scale_times_difference_when_guided():
    model = RecordingModel()
    x = np.random.default_rng(0).standard_normal(SHAPE)
    labels = np.array([3, 7])
    guided = cfg_eps(model, x, 250, labels, 3.5, NULL)
    cond = cfg_eps(model, x, 250, labels, 1.0, NULL)
    uncond = cfg_eps(model, x, 250, None, 3.5, NULL)
    np.testing.assert_allclose(guided, uncond + 3.5 * (cond - uncond), rtol=1e-12, atol=1e-12)


def test_cfg_eps_raises_value_error_when_model_returns_wrong_shape():
    def bad(x, t, y):
        return x[:1]
    with pytest.raises(ValueError, match="shape"):
        cfg_eps(bad, np.zeros(SHAPE), 1, [0, 1], 2.0, NULL)


# ----------------------------------------------------------------------------------------------------------------
# SamplingConfig: one check, one serialisation, the server-side loop's request
# ----------------------------------------------------------------------------------------------------------------

def test_sampling_config_round_trips_through_json_and_the_loop_request():
    from trident.serving.sampling import SamplingConfig, config_from_request, loop_request
    config = SamplingConfig(sampler="ddim", steps=7, guidance=2.5, eta=0.3, spacing="trailing",
                            options={"use_clipped_model_output": False}, preview_every=2, guidance_t_min=300)
    assert SamplingConfig.from_json(config.to_json()) == config
    for stream in (False, True):
        feed = loop_request(config, np.array([1, 10]), 9, 4.0, stream=stream)
        back, labels, seed, max_seconds = config_from_request(feed)
        assert back == (config if stream else SamplingConfig(**{**config.to_dict(), "preview_every": 0}))
        assert labels.tolist() == [1, 10] and seed == 9 and max_seconds == 4.0
    minimal = {k: v for k, v in loop_request(SamplingConfig(), np.array([0]), 1, 0.0, False).items()
               if k not in ("max_seconds", "sampler_options", "guidance_t_min")}  # the optional inputs left out
    assert config_from_request(minimal)[0] == SamplingConfig()


@pytest.mark.parametrize("fields,message", [
    ({"sampler": "euler"}, "sampler must be one of"),
    ({"steps": 0}, "steps must be an integer"),
    ({"guidance": float("nan")}, "guidance must be a finite number"),
    ({"eta": 0.5}, "eta=0.5 applies to the 'ddim' sampler only"),
    ({"spacing": "karras"}, "spacing must be one of"),
    ({"preview_every": 30}, "preview_every must be an integer in [0, steps=20]"),
    ({"sampler": "dpmpp-2m", "options": {"use_clipped_model_output": False}},
     "sampler options ['use_clipped_model_output'] do not fit sampler 'dpmpp-2m'"),
    ({"sampler": "ddim", "options": {"eta": 0.2}}, "eta and clip_sample are fields of their own"),
    ({"sampler": "ddim", "options": {"set_alpha_to_one": [1]}}, "must be numbers, booleans or strings"),
])
def test_sampling_config_refuses_a_bad_field_and_names_it(fields, message):
    from trident.serving.sampling import SamplingConfig
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingConfig(**fields)
    with pytest.raises(ValueError, match="unknown fields \\['colour'\\]"):
        SamplingConfig.from_dict({"colour": "red"})


def test_sample_takes_a_config_or_its_fields_and_draws_the_same():
    from trident.serving.sampling import SamplingConfig
    config = SamplingConfig(sampler="ddim", steps=4, guidance=2.0, options={"use_clipped_model_output": False})
    a = sample(RecordingModel(), SHAPE, [1, 2], schedule=LINEAR, null_class=NULL, seed=0, config=config)
    b = sample(RecordingModel(), SHAPE, [1, 2], schedule=LINEAR, null_class=NULL, seed=0, sampler="ddim", steps=4,
               guidance=2.0, sampler_options={"use_clipped_model_output": False})
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="not both"):
        sample(RecordingModel(), SHAPE, [1, 2], schedule=LINEAR, null_class=NULL, config=config, steps=3)
    with pytest.raises(ValueError, match="unknown sampling arguments \\['stepz'\\]"):
        sample(RecordingModel(), SHAPE, [1, 2], schedule=LINEAR, null_class=NULL, stepz=3)


# ----------------------------------------------------------------------------------------------------------------
# v-prediction
# ----------------------------------------------------------------------------------------------------------------

def test_eps_from_prediction_recovers_the_noise_when_given_the_v_target():
    rng = np.random.default_rng(0)
    x0, eps = rng.uniform(-1, 1, SHAPE), rng.standard_normal(SHAPE)
    t = np.array([0, 999])
    a = LINEAR.alphas_cumprod[t][:, None, None, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    v = np.sqrt(a) * eps - np.sqrt(1 - a) * x0  # Salimans & Ho 2022, sec. 4
    np.testing.assert_allclose(eps_from_prediction(v, x_t, t, LINEAR, "v_prediction"), eps, atol=1e-12)
    np.testing.assert_allclose(eps_from_prediction(v[:1], x_t[:1], 500, LINEAR, "v_prediction"),
                               eps_from_prediction(v[:1], x_t[:1], [500], LINEAR, "v_prediction"))
    assert eps_from_prediction(eps, x_t, t, LINEAR, "epsilon") is not None
    np.testing.assert_array_equal(eps_from_prediction(eps, x_t, t, LINEAR, "epsilon"), eps)
    with pytest.raises(ValueError, match="prediction_type"):
        eps_from_prediction(v, x_t, t, LINEAR, "sample")


@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m"])
def test_sample_matches_diffusers_loop_when_model_predicts_v(name):
    """A v-predicting model through our loop (prediction_type="v_prediction") against diffusers' scheduler told the
    same; unconditional, so each step is the model's output as it is."""
    steps = 8
    theirs, _ = diffusers_oracle(name, LINEAR, make_sampler(name, LINEAR).default_spacing, steps,
                                 prediction_type="v_prediction")
    x = torch.from_numpy(np.random.default_rng(3).standard_normal(SHAPE))  # what sample_progressive draws, seed 3
    for t in theirs.timesteps:
        kwargs = {"use_clipped_model_output": False} if name == "ddim" else {}
        x = theirs.step(dummy_eps(x, float(t)), t, x, **kwargs).prev_sample.double()
    options = {"use_clipped_model_output": False} if name == "ddim" else {}
    ours = list(sample_progressive(lambda x, t, y: dummy_eps(x.astype(np.float64), t[:, None, None, None]), SHAPE,
                                   None, schedule=LINEAR, sampler=name, steps=steps, null_class=NULL, seed=3,
                                   sampler_options=options, prediction_type="v_prediction"))[-1].sample
    np.testing.assert_allclose(ours, x.numpy(), **TOL)
    eps_run = list(sample_progressive(lambda x, t, y: dummy_eps(x.astype(np.float64), t[:, None, None, None]), SHAPE,
                                      None, schedule=LINEAR, sampler=name, steps=steps, null_class=NULL, seed=3,
                                      sampler_options=options))[-1].sample
    assert not np.allclose(ours, eps_run)  # the prediction type changes the loop


def test_sampling_loop_raises_value_error_naming_prediction_type_when_unknown():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        sampling_loop(SHAPE, None, **model_kwargs(prediction_type="x0"))


# ----------------------------------------------------------------------------------------------------------------
# Sampling loop
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SAMPLERS)
def test_sample_returns_identical_images_when_seed_repeats(name):
    kw = model_kwargs(sampler=name)
    a = sample(RecordingModel(), SHAPE, [1, 2], **kw)
    b = sample(RecordingModel(), SHAPE, [1, 2], **kw)
    assert a.dtype == np.float32 and a.shape == SHAPE
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sample_returns_different_images_when_seed_differs(name):
    a = sample(RecordingModel(), SHAPE, [1, 2], **model_kwargs(sampler=name, seed=0))
    b = sample(RecordingModel(), SHAPE, [1, 2], **model_kwargs(sampler=name, seed=1))
    assert not np.allclose(a, b)


def test_sample_starts_from_default_rng_standard_normal_when_seed_given():
    model = RecordingModel()
    sample(model, SHAPE, [1, 2], **model_kwargs(seed=42))
    x_T = np.random.default_rng(42).standard_normal(SHAPE).astype(np.float32)
    np.testing.assert_array_equal(model.calls[0]["x"][:2], x_T)


def test_sample_makes_one_2B_model_call_per_step_when_guided():
    model = RecordingModel()
    sample(model, SHAPE, [1, 2], **model_kwargs(steps=5))
    assert [c["x"].shape[0] for c in model.calls] == [4] * 5
    assert [c["t"][0] for c in model.calls] == [800, 600, 400, 200, 0]  # ddim "leading", T=1000, 5 steps


def test_sample_progressive_yields_each_step_and_ends_at_sample_when_iterated():
    kw = model_kwargs(sampler="dpmpp-2m", steps=6)
    infos = list(sample_progressive(RecordingModel(), SHAPE, [1, 2], **kw))
    assert [i.index for i in infos] == list(range(6))
    ts = make_sampler("dpmpp-2m", LINEAR)
    ts.set_timesteps(6)
    assert [i.t for i in infos] == ts.timesteps.tolist()
    np.testing.assert_array_equal(infos[-1].sample.astype(np.float32), sample(RecordingModel(), SHAPE, [1, 2], **kw))


def test_sampling_loop_driven_by_hand_takes_the_steps_sample_progressive_takes():
    """The sans-I/O loop the asyncio client drives: ask for the model call, answer it, step; the same steps as the
    generator, one call per step of the shape cfg_eps sends."""
    kw = model_kwargs(sampler="dpmpp-2m", steps=4)
    loop = sampling_loop(SHAPE, [1, 2], **kw)
    model, steps = RecordingModel(), []
    while not loop.done:
        x, t, y = loop.model_input()
        assert x.shape == (4, *SHAPE[1:]) and x.dtype == np.float32 and y.tolist() == [1, 2, NULL, NULL]
        steps.append(loop.advance(model(x, t, y)))
    reference = list(sample_progressive(RecordingModel(), SHAPE, [1, 2], **kw))
    assert [s.t for s in steps] == [s.t for s in reference]
    np.testing.assert_array_equal(steps[-1].pred_original_sample, reference[-1].pred_original_sample)
    with pytest.raises(ValueError, match="all 4 steps are done"):
        loop.model_input()


def test_guidance_t_min_sends_2B_rows_above_it_and_B_below_and_steps_with_that_guidance():
    """Guidance in a limited interval: the steps at t >= guidance_t_min send [cond; null] and combine them, the ones
    below send the conditional rows alone; the images are those of a loop written out with cfg_eps per step."""
    kw = model_kwargs(sampler="dpmpp-2m", steps=6, guidance=3.0)
    model = RecordingModel()
    got = sample(model, SHAPE, [1, 2], **kw, guidance_t_min=400)
    solver = make_sampler("dpmpp-2m", LINEAR)
    solver.set_timesteps(6)
    ts = solver.timesteps.tolist()
    assert [c["t"][0] for c in model.calls] == ts
    assert [len(c["x"]) for c in model.calls] == [4 if t >= 400 else 2 for t in ts]
    assert 2 in [len(c["x"]) for c in model.calls] and 4 in [len(c["x"]) for c in model.calls]
    x = np.random.default_rng(0).standard_normal(SHAPE)  # the loop's x_T for seed 0
    by_hand = RecordingModel()
    for t in ts:
        eps = cfg_eps(by_hand, x, t, np.array([1, 2]), 3.0 if t >= 400 else 1.0, NULL)
        x = solver.step(eps, t, x).prev_sample
    np.testing.assert_allclose(got, x.astype(np.float32), rtol=1e-6, atol=1e-6)
    full = sample(RecordingModel(), SHAPE, [1, 2], **kw)
    assert not np.allclose(got, full)  # the unguided steps changed the images
    np.testing.assert_array_equal(sample(RecordingModel(), SHAPE, [1, 2], **kw, guidance_t_min=0), full)


def test_guidance_t_min_gives_a_student_w_1_below_it():
    calls = []

    def student(x, t, y, w):
        calls.append((int(t[0]), w.tolist()))
        return (dummy_eps(x, t[:, None, None, None]) + 0.01 * w[:, None, None, None]).astype(np.float32)
    sample(student, SHAPE, [1, 2], **model_kwargs(sampler="ddim", steps=4, spacing="trailing", guidance=2.5),
           guidance_range=(1.0, 5.0), guidance_t_min=300)
    assert calls == [(999, [2.5, 2.5]), (749, [2.5, 2.5]), (499, [2.5, 2.5]), (249, [1.0, 1.0])]
    with pytest.raises(ValueError, match="guidance_t_min needs a student that takes w = 1"):
        sample(student, SHAPE, [1, 2], **model_kwargs(guidance=2.5), guidance_range=(2.0, 5.0), guidance_t_min=300)


@pytest.mark.parametrize("value,message", [(-1, "guidance_t_min must be an integer timestep >= 0"),
                                           (True, "guidance_t_min must be an integer timestep >= 0"),
                                           (2.5, "guidance_t_min must be an integer timestep >= 0"),
                                           (T + 1, "guidance_t_min must be an integer in [0, 1000]")])
def test_guidance_t_min_out_of_range_is_refused_before_any_model_call(value, message):
    model = RecordingModel()
    with pytest.raises(ValueError, match=re.escape(message)):
        sample(model, SHAPE, [1, 2], **model_kwargs(), guidance_t_min=value)
    assert model.calls == []


def test_sampling_loop_refuses_an_answer_it_did_not_ask_for():
    loop = sampling_loop(SHAPE, None, **model_kwargs(steps=2))
    with pytest.raises(ValueError, match="call model_input"):
        loop.advance(np.zeros(SHAPE))
    x, t, y = loop.model_input()
    with pytest.raises(ValueError, match="model returned shape"):
        loop.advance(np.zeros((3, *SHAPE[1:])))


def test_sample_raises_sampling_cancelled_after_that_step_when_callback_returns_false():
    model = RecordingModel()
    seen = []

    def callback(i, t, x, x0):
        seen.append((i, t, x.shape, x0.shape))
        return i < 2
    with pytest.raises(SamplingCancelled) as err:
        sample(model, SHAPE, [1, 2], **model_kwargs(steps=5), callback=callback)
    assert err.value.index == 2 and len(model.calls) == 3
    assert seen[0] == (0, 800, SHAPE, SHAPE)


def test_sample_runs_without_bar_error_when_progress_true():
    out = sample(RecordingModel(), SHAPE, None, **model_kwargs(steps=2), progress=True)
    assert out.shape == SHAPE


@pytest.mark.parametrize("arg,overrides", [
    ("steps", {"steps": 0}),
    ("steps", {"steps": T + 1}),
    ("guidance", {"guidance": -0.5}),
    ("sampler", {"sampler": "euler"}),
    ("labels", {"labels": [1, NULL + 1]}),
    ("labels", {"labels": [-1, 0]}),
    ("labels", {"labels": [1, 2, 3]}),
    ("eta", {"eta": -0.1}),
    ("spacing", {"spacing": "cosine"}),
    ("shape", {"shape": (2, 3, 4)}),
    ("eta", {"sampler": "dpmpp-2m", "eta": 0.5}),
    ("seed", {"rng": np.random.default_rng(0)}),
])
def test_sample_raises_value_error_before_model_call_when_argument_invalid(arg, overrides):
    model = RecordingModel()
    shape = overrides.pop("shape", SHAPE)
    labels = overrides.pop("labels", [1, 2])
    with pytest.raises(ValueError, match=arg):
        sample(model, shape, labels, **model_kwargs(**overrides))
    with pytest.raises(ValueError, match=arg):
        sample_progressive(model, shape, labels, **model_kwargs(**overrides))  # raises on the call, not on next()
    assert model.calls == []


def test_sampling_module_does_not_import_torch_when_imported():
    heavy = ("torch", "diffusers", "tritonclient", "onnxruntime", "tqdm")
    code = f"import sys, trident.serving.sampling; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_ddim_clipped_model_output_changes_the_step_when_x0_is_clipped():
    # the oracle tests above cover both settings; this one shows that clipping is active in them, so the two differ
    x = np.random.default_rng(0).standard_normal(SHAPE) * 3
    out = {}
    for flag in (True, False):
        s = make_sampler("ddim", LINEAR, use_clipped_model_output=flag)
        s.set_timesteps(10)
        t = int(s.timesteps[0])
        out[flag] = s.step(dummy_eps(x, float(t)), t, x)
    np.testing.assert_array_equal(out[True].pred_original_sample, out[False].pred_original_sample)
    assert np.abs(out[True].pred_original_sample).max() == 1.0  # x0 was clipped
    assert np.abs(out[True].prev_sample - out[False].prev_sample).max() > 0.1

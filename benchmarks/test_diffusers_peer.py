"""4. A peer: the same U-Net weights driven by HuggingFace diffusers' DPMSolverMultistepScheduler and a classifier-free
guidance loop in PyTorch, written as diffusers' pipelines write it (concatenate [cond; uncond], one U-Net call, chunk,
combine, scheduler.step), at the same steps and batch as our client over Triton. Our loop over in-process ONNX Runtime
and over the same torch module are measured alongside, to separate the loop from the backend."""
from __future__ import annotations

import numpy as np
import pytest

from trident.benchmarks.common import class_labels, cuda_sync, require, rounds
from trident.serving import sampling

SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # our NoiseSchedule.kind -> diffusers beta_schedule


def diffusers_dpmpp(unet, card, device: str):
    """A sampler(labels, steps, guidance, seed) -> x_0 (B, C, H, W) torch tensor, looping like diffusers' DiT pipeline.

    On cuda the U-Net runs under fp16 autocast, as diffusers pipelines run in torch_dtype=float16 (our served graphs
    are fp16 there too); on the CPU everything is fp32.
    """
    import contextlib

    import torch
    from diffusers import DPMSolverMultistepScheduler

    sched = card.schedule
    # Our DPM-Solver++ clips the x0 estimate to the data range by default (pixel-space data); in diffusers that is
    # dynamic thresholding with sample_max_value = 1 (the quantile is clamped to [1, 1]). Its default timesteps are
    # uniform in log-SNR, a layout diffusers has no name for: run() hands them over as custom timesteps.
    ours = sampling.make_sampler("dpmpp-2m", sampling.NoiseSchedule.from_dict(sched))
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=int(sched["num_train_timesteps"]), beta_start=float(sched["beta_start"]),
        beta_end=float(sched["beta_end"]), beta_schedule=SCHEDULES[sched["kind"]], prediction_type=card.prediction_type,
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
        final_sigmas_type="zero", timestep_spacing="linspace", thresholding=ours.clip_sample,
        sample_max_value=ours.clip_sample_range)
    shape, null = card.image.shape, card.null_class
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if device == "cuda" else contextlib.nullcontext

    @torch.inference_mode()
    def run(labels, steps: int, guidance: float, seed: int):
        b = len(labels)
        # x_T drawn as our sampler draws it, so both loops make the same images (checked in the test)
        x_t = np.random.default_rng(seed).standard_normal((b, *shape))
        latents = torch.from_numpy(x_t).to(device=device, dtype=torch.float32)
        class_labels = torch.tensor(labels, dtype=torch.int64, device=device)
        class_null = torch.full((b,), null, dtype=torch.int64, device=device)
        class_in = torch.cat([class_labels, class_null])
        ours.set_timesteps(steps)  # our default layout (DPM-Solver++: "logsnr"), which diffusers takes as timesteps=
        scheduler.set_timesteps(timesteps=ours.timesteps.tolist(), device=device)
        for t in scheduler.timesteps:
            latent_in = torch.cat([latents] * 2)
            latent_in = scheduler.scale_model_input(latent_in, t)
            timesteps = t.expand(latent_in.shape[0]).to(torch.float32)
            with autocast():
                noise_pred = unet(latent_in, timesteps, class_in).float()
            cond_eps, uncond_eps = noise_pred.chunk(2)
            noise_pred = uncond_eps + guidance * (cond_eps - uncond_eps)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
        return latents

    return run


@pytest.mark.parametrize("impl", ["diffusers-torch", "ours-triton", "ours-ort", "ours-torch"])
def test_peer_dpmpp(benchmark, request, settings, checkpoints, exports, impl):
    require(checkpoints, "diffusion")
    require(exports, "diffusion")
    n, steps = settings.sample_batch, settings.peer_steps
    labels = class_labels(n)
    if impl == "diffusers-torch":
        card = request.getfixturevalue("torch_client").card("diffusion")
        run = diffusers_dpmpp(request.getfixturevalue("unet_module"), card, settings.device)
        sync = cuda_sync(settings)

        def draw():
            out = run(labels, steps, settings.guidance, 0)
            sync()
            return out.float().cpu().numpy()
    else:
        client = request.getfixturevalue({"ours-triton": "triton", "ours-ort": "ort_client",
                                          "ours-torch": "torch_client"}[impl])

        def draw():
            return client.sample(classes=labels, sampler="dpmpp-2m", steps=steps, guidance=settings.guidance,
                                 seed=0, raw=True)

    draw()  # warm
    benchmark.group = f"peer-dpmpp-{steps:04d}-B{n:02d}"
    benchmark.extra_info.update(item="peer", impl=impl, sampler="dpmpp-2m", steps=steps, images=n,
                                protocol=settings.protocol if impl == "ours-triton" else None)
    images = benchmark.pedantic(draw, rounds=rounds(settings, settings.sample_rounds), iterations=1)
    assert images.shape[0] == n and np.all(np.isfinite(images))
    if impl == "diffusers-torch":  # the peer does the same work: same images as our loop (float32 vs float64 math)
        ours = request.getfixturevalue("ort_client").sample(classes=labels, sampler="dpmpp-2m", steps=steps,
                                                            guidance=settings.guidance, seed=0, raw=True)
        np.testing.assert_allclose(images, ours, atol=5e-2 if settings.fp16 else 2e-3)

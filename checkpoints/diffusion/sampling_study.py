"""The sampling-side study of the shipped teacher behind its TRAINING.md ("Sampling the teacher"): the same n=1000
draws and figures as `trident evaluate` (classes in equal shares, batch b of 100 with seed b, FD in the project
classifier's features), with the guidance, step layout and clipping varied outside the SDK.

    python checkpoints/diffusion/sampling_study.py                 # every experiment (~20 min on 2 cores)
    python checkpoints/diffusion/sampling_study.py "w1 logsnr" ...   # some of them

Prints one JSON line per experiment. Guidance is applied here, per step, so that it can vary with the timestep
(limited-interval guidance) or be rescaled; "w1" rows make one row per image per step, the others [cond; null].
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from trident.export.build import ensure_export
from trident.serving import sampling
from trident.serving.client import TridentClient
from trident.serving.spec import UNET
from trident.training.quality import FeatureNet, RealReference, evaluate_images

ROOT = Path(__file__).resolve().parents[2]


def teacher():
    export = ensure_export(ROOT / "checkpoints" / "diffusion" / "model.safetensors", ROOT / ".trident" / "exports",
                           "diffusion")
    client = TridentClient.from_onnx([export])
    card = client.card("diffusion")
    return client, card


def draw(model, card, w=1.0, interval=None, rescale=0.0, spacing="linspace", timesteps=None, clip=None, n=1000,
         seed=0):
    schedule = sampling.NoiseSchedule.from_dict(card.schedule)
    abar = schedule.alphas_cumprod
    labels = np.arange(n) % 10
    chunks = []
    for i in range(0, n, 100):
        lab = labels[i:i + 100]
        kw = dict(sampler="dpmpp-2m", steps=20, guidance=1.0, seed=seed + i, spacing=spacing,
                  prediction_type=card.prediction_type)
        if clip is not None:
            kw["clip_sample"] = clip
        loop = sampling.sampling_loop((len(lab), 1, 28, 28), lab, schedule=schedule, null_class=card.null_class, **kw)
        if timesteps is not None:  # a layout given as timesteps (DPM-Solver++ otherwise drops the zero step)
            s = loop.solver
            s.timesteps = np.asarray(timesteps, np.int64)
            a = abar[s.timesteps]
            s._alpha, s._sigma = np.append(np.sqrt(a), 1.0), np.append(np.sqrt(1 - a), 0.0)
            s._reset()
            loop.num_steps = len(s.timesteps)
        last = None
        while not loop.done:
            x, tt, y = loop.model_input()
            sigma = np.sqrt((1 - abar[loop.t]) / abar[loop.t])  # EDM's sigma of this timestep
            wt = w if interval is None or interval[0] <= sigma <= interval[1] else 1.0
            if wt == 1.0:
                out = model(x, tt, y)
            else:
                b = len(x)
                o = model(np.concatenate([x, x]), np.concatenate([tt, tt]),
                          np.concatenate([y, np.full(b, card.null_class, np.int64)])).astype(np.float64)
                cond, uncond = o[:b], o[b:]
                out = uncond + wt * (cond - uncond)
                if rescale:  # Lin et al. 2023, sec. 3.4: the guided output's std brought back toward the cond one's
                    ratio = cond.std(axis=(1, 2, 3), keepdims=True) / out.std(axis=(1, 2, 3), keepdims=True)
                    out = rescale * out * ratio + (1 - rescale) * out
            last = loop.advance(out)
        chunks.append(np.asarray(last.pred_original_sample, np.float32))
    return np.concatenate(chunks), labels


# the timesteps diffusers 0.42 lays out with use_lu_lambdas=True: logsnr without the zero step dropped (20 calls ending at
# t=0), which is spaced_timesteps(1000, 20, "logsnr"); run here with each timestep's own alpha and sigma, where
# diffusers would step with the unrounded sigmas
LU = [999, 947, 893, 834, 772, 704, 629, 546, 454, 353, 253, 166, 103, 61, 35, 19, 10, 4, 1, 0]
QUADRATIC = np.round(np.linspace(np.sqrt(999), 0, 21) ** 2).astype(np.int64)[:20]  # t = 999 (1 - i/20)^2, DPM-Solver's
# time-quadratic layout, the zero step dropped
EDM_INTERVAL = (0.28, 5.42)  # Kynkaanniemi et al. 2024's interval for EDM2 (sigma), here t in [82, 578]
EXPERIMENTS = {
    "w1": dict(),
    "w1 noclip": dict(clip=False),
    "w1 logsnr": dict(spacing="logsnr"),
    "w1 quadratic": dict(timesteps=QUADRATIC),
    "w1 diffusers-lu": dict(timesteps=LU),
    "w1.25": dict(w=1.25),
    "w1.5 interval": dict(w=1.5, interval=EDM_INTERVAL),
    "w2 interval": dict(w=2.0, interval=EDM_INTERVAL),
    "w3 interval": dict(w=3.0, interval=EDM_INTERVAL),
    "w1.5 rescale0.7": dict(w=1.5, rescale=0.7),
    "w3 rescale0.7": dict(w=3.0, rescale=0.7),
    "w1.5 logsnr": dict(w=1.5, spacing="logsnr"),
    "w3 logsnr": dict(w=3.0, spacing="logsnr"),
}


def main(names) -> None:
    client, card = teacher()

    def model(x, t, y):  # the U-Net through the SDK's in-process backend (its buckets and row shards)
        return next(iter(client.backend.run(UNET, client._unet_feed(x, t, y)).values()))
    net = FeatureNet(ROOT / "checkpoints" / "classifier" / "model.safetensors")
    ref = RealReference.build(net, None, cache_dir=ROOT / ".trident" / "quality")
    for name in names or list(EXPERIMENTS):
        t0 = time.time()
        images, labels = draw(model, card, **EXPERIMENTS[name])
        r = evaluate_images(images, ref, labels, 0)
        print(json.dumps({"experiment": name, "fd": round(r["fd"], 1), "agreement": round(r["agreement"], 3),
                          "recall": round(r["recall"], 3), "brightness": round(r["brightness"], 1),
                          "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

"""`trident evaluate [--model diffusion|gan]`: do conditional samples show their class?

Draws N class-conditional samples (classes in equal shares; diffusion with DPM-Solver++(2M)), asks the shipped
Fashion-MNIST classifier what it sees, and reports the fraction assigned to the requested class, overall and per
class. For the GAN it also reports the variety of the samples within a class.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trident.serving.client import TridentClient

from .checkpoint import load_model


@torch.no_grad()
def classify(classifier: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """float images (N, C, H, W) in [-1, 1] -> predicted class ids (N,)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return torch.cat([classifier(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)]).numpy()


def class_agreement(diffusion_ckpt, classifier_ckpt, n: int = 1000, steps: int = 20, guidance: float = 3.0,
                    sampler: str = "dpmpp-2m", seed: int = 0, batch: int = 100, progress: bool = False) -> dict:
    client = TridentClient.from_torch([diffusion_ckpt])
    classifier, cmeta = load_model(classifier_ckpt, "classifier")
    k = len(client.class_names())
    labels = np.arange(n) % k
    preds = []
    t0 = time.time()
    for i in range(0, n, batch):
        x = client.sample(labels[i:i + batch], sampler=sampler, steps=steps, guidance=guidance, seed=seed + i, raw=True)
        preds.append(classify(classifier, x))
        if progress:
            print(f"  {i + len(x)}/{n} samples, {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    pred = np.concatenate(preds)
    per_class = {name: float(np.mean(pred[labels == c] == c)) for c, name in enumerate(client.class_names())}
    return {"agreement": float(np.mean(pred == labels)), "per_class": per_class, "n": n, "steps": steps,
            "guidance": guidance, "sampler": sampler, "seed": seed,
            "classifier_test_accuracy": cmeta.get("test_accuracy"), "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def gan_agreement(gan_ckpt, classifier_ckpt, n: int = 1000, seed: int = 0, data_dir=None) -> dict:
    """Classifier agreement of class-conditional GAN samples, and their variety: the mean per-class pixel std over
    z, next to the same figure for real training images (a collapsed generator scores near 0)."""
    from .data import load_fashion_mnist

    generator, meta = load_model(gan_ckpt, "gan")
    classifier, cmeta = load_model(classifier_ckpt, "classifier")
    k = len(meta["class_names"])
    labels = np.arange(n) % k
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, meta["config"]["latent_dim"], generator=g)
    x = generator(z, torch.from_numpy(labels)).numpy()
    pred = classify(classifier, x)
    real = load_fashion_mnist("train", data_dir, limit=6000)
    r = real.images.astype(np.float32) / 127.5 - 1
    return {"agreement": float(np.mean(pred == labels)),
            "per_class": {name: float(np.mean(pred[labels == c] == c)) for c, name in enumerate(meta["class_names"])},
            "per_class_pixel_std": float(np.mean([x[labels == c].std(0).mean() for c in range(k)])),
            "real_per_class_pixel_std": float(np.mean([r[real.labels == c].std(0).mean() for c in range(k)])),
            "n": n, "seed": seed, "classifier_test_accuracy": cmeta.get("test_accuracy")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="trident evaluate", description=__doc__)
    p.add_argument("--model", choices=("diffusion", "gan"), default="diffusion")
    p.add_argument("--diffusion", default="checkpoints/diffusion/model.safetensors")
    p.add_argument("--gan", default="checkpoints/gan/model.safetensors")
    p.add_argument("--classifier", default="checkpoints/classifier/model.safetensors")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sampler", default="dpmpp-2m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "gan":
        result = gan_agreement(args.gan, args.classifier, args.n, args.seed)
    else:
        result = class_agreement(args.diffusion, args.classifier, args.n, args.steps, args.guidance, args.sampler,
                                 args.seed, progress=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

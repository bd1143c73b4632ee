"""`trident sample`: draw images from a running Triton server and write a PNG grid (no torch needed)."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from ..errors import TridentError
from .. import sampling
from ..sampling import SAMPLERS
from .sdk import TridentClient


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trident sample", description=__doc__)
    p.add_argument("--model", choices=("diffusion", "diffusion_student", "gan", "vae"), default="diffusion",
                   help="diffusion_student: the student distilled from the diffusion teacher, served beside it (one "
                        "network row per image per step; --guidance within its card's guidance_range)")
    p.add_argument("--class", dest="classes", action="append", default=None,
                   help="class name or id (repeatable; 'all' = one row per class); omit for unconditional")
    p.add_argument("--n", type=int, default=8, help="images per class (or in total when unconditional)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="default: dpmpp-2m; a step-distilled student: ddim (trailing spacing)")
    p.add_argument("--steps", type=int, default=None,
                   help="default: 20; a step-distilled student: the steps it was distilled for")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--guidance-t-min", type=int, default=0, metavar="T",
                   help="guidance only at the steps whose timestep is >= T, unguided below (one row per image "
                        "there); 0 = every step")
    p.add_argument("--sampler-option", dest="sampler_options", action="append", default=[], metavar="KEY=VALUE",
                   help="a further sampler option, VALUE as JSON (repeatable), e.g. use_clipped_model_output=false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    p.add_argument("--url", default="127.0.0.1:8000", help="Triton address host:port (HTTP port, or gRPC port with "
                                                            "--protocol grpc)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (client loop: per step)")
    p.add_argument("--sample-timeout", type=float, default=600.0,
                   help="--loop server: seconds the one request may take")
    p.add_argument("--progress", action="store_true",
                   help="show a progress bar over denoising steps (with --loop server: streamed, --protocol grpc)")
    p.add_argument("--loop", choices=("client", "server"), default="client",
                   help="diffusion: run the sampling loop here (one request per step) or on the server (one "
                        "request in all, the diffusion_sampler model)")
    return p


def _sampler_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TridentError(f"--sampler-option takes KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a bare string
    return options


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with TridentClient.connect(args.url, args.protocol, timeout_s=args.timeout,
                                   sample_timeout_s=args.sample_timeout) as client:
            rows = None
            classes = None
            if args.classes and args.model in ("diffusion", "diffusion_student", "gan"):
                names = client.class_names(args.model)
                wanted = names if args.classes == ["all"] else args.classes
                ids = client.resolve_classes(wanted, args.model)
                classes = np.repeat(ids, args.n)
                rows = [names[i] for i in ids]
            elif args.classes and args.model == "vae":
                raise TridentError("the VAE is unconditional: drop --class")
            diffusion = args.model in ("diffusion", "diffusion_student")
            if diffusion:
                images = client.sample(classes, None if classes is not None else args.n, sampler=args.sampler,
                                       steps=args.steps, guidance=args.guidance, eta=args.eta, seed=args.seed,
                                       progress=args.progress, loop=args.loop, model=args.model,
                                       sampler_options=_sampler_options(args.sampler_options),
                                       guidance_t_min=args.guidance_t_min)
                steps = (args.steps or sampling.default_settings(client.card(args.model).distilled_steps)["steps"])
            elif args.model == "gan":
                images = client.generate(classes, None if classes is not None else args.n, seed=args.seed)
            else:
                images = client.generate_vae(args.n, seed=args.seed)
            path = client.save_grid(images, args.out, nrow=args.n if rows else min(args.n, 8), row_labels=rows)
            s = client.last_stats
    except TridentError as e:
        print(f"trident sample: error: {e}", file=sys.stderr)
        return 2
    if diffusion and args.loop == "server":
        detail = f", one request to the server-side loop ({steps} steps)"
    elif diffusion:
        detail = f", {s.calls} model calls ({steps} steps), {s.per_call_ms:.1f} ms per call"
    else:
        detail = f", {s.per_call_ms:.1f} ms per call"
    print(f"wrote {path}: {len(images)} images in {s.wall_s:.2f} s{detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

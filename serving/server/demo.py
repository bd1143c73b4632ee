"""`trident demo`: the main job. From the shipped checkpoints to images, through a real Triton server.

1. builds (or reuses) the Triton model repository from checkpoints/ (export to ONNX once, cached by checkpoint hash),
2. starts the embedded Triton server on free loopback ports,
3. draws over gRPC: a diffusion grid (one row per class, DPM-Solver++ 20 steps, guidance 3), where the distilled
   student is served (checkpoints/diffusion_student/) the same grid from it at its distilled steps, timed against the
   teacher's, a guidance-scale comparison strip, a GAN grid (one row per class), VAE samples and VAE latent
   interpolations between classes,
4. writes the PNGs to the output folder, prints where they are and a latency summary, and stops the server.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .. import sampling, toolchain
from ..client import TridentClient
from ..errors import TridentError
from ..images import labelled_grid, save_png
from .launcher import ServerConfig, TritonServer

STUDENT = "diffusion_student"  # the distilled student's family (spec.DIFFUSION_MODELS), drawn where it is served


def run_demo(out: Path, repository: Path, checkpoints: Path, per_class: int = 8, steps: int = 20,
             guidance: float = 3.0, protocol: str = "grpc", seed: int = 0, work: Path = Path(".trident"),
             log=print) -> dict:
    default_build = toolchain.resolve("default_build")  # exports the checkpoints (torch) unless cached
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    default_build(checkpoints_root=checkpoints, out=repository, work=work, log=log)
    log(f"model repository: {repository} ({time.perf_counter() - t0:.1f} s)")
    summary = {}
    config = ServerConfig(model_repository=repository, http_port=0, grpc_port=0, metrics_port=0)
    with TritonServer(config) as server:
        log(f"Triton server up in {server.startup_s:.1f} s: HTTP {server.http_url}, gRPC {server.grpc_url}, "
            f"metrics {server.metrics_url}, log {server.log_path}")
        url = server.grpc_url if protocol == "grpc" else server.http_url
        with TridentClient.connect(url, protocol) as client:
            names = client.class_names("diffusion")
            k = len(names)
            labels = np.repeat(np.arange(k), per_class)

            imgs = client.sample(labels, steps=steps, guidance=guidance, seed=seed)
            s = client.last_stats
            path = save_png(out / "diffusion.png", labelled_grid(imgs, per_class, names))
            summary["diffusion"] = (path, s)
            log(f"diffusion: {len(imgs)} images, {steps} steps, {_requests(s)} in {s.wall_s:.2f} s "
                f"({s.per_call_ms:.1f} ms per step) -> {path}")
            teacher = s

            first = labels[:per_class]
            t_teacher_server = None
            if client.backend.server_loop is not None:  # the same draw with the loop on the server
                a = client.sample(first, steps=steps, guidance=guidance, seed=seed)
                t_client = client.last_stats.wall_s
                b = client.sample(first, steps=steps, guidance=guidance, seed=seed, loop="server")
                t_server = t_teacher_server = client.last_stats.wall_s
                diff = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
                log(f"server-side loop: {len(first)} images in 1 request, {t_server:.2f} s (client loop: {steps} "
                    f"requests, {t_client:.2f} s); " + ("same images" if diff == 0 else f"max pixel difference {diff}"))

            if STUDENT in client.backend.cards:  # the distilled student: the same grid at its own default steps
                card = client.card(STUDENT)
                low, high = card.guidance_range
                if not low <= guidance <= high:
                    log(f"{STUDENT}: not drawn: guidance {guidance:g} is outside the range it was distilled on "
                        f"[{low:g}, {high:g}]")
                else:
                    default = sampling.default_settings(card.distilled_steps)  # what sample() picks for it
                    imgs = client.sample(labels, guidance=guidance, seed=seed, model=STUDENT)
                    s = client.last_stats
                    path = save_png(out / f"{STUDENT}.png", labelled_grid(imgs, per_class, names))
                    summary[STUDENT] = (path, s)
                    log(f"{STUDENT}: {len(imgs)} images, {default['steps']} steps ({default['sampler']}), "
                        f"{_requests(s)} in {s.wall_s:.2f} s (teacher: {steps} steps, {_requests(teacher)} in "
                        f"{teacher.wall_s:.2f} s, {teacher.wall_s / max(s.wall_s, 1e-9):.1f}x the student's time "
                        f"and {teacher.rows / max(s.rows, 1):.1f}x its rows) -> {path}")
                    if t_teacher_server is not None and _serves_loop(client, STUDENT):
                        client.sample(first, guidance=guidance, seed=seed, model=STUDENT, loop="server")
                        t = client.last_stats.wall_s
                        log(f"{STUDENT} server-side loop: {len(first)} images in 1 request, {t:.2f} s (teacher's: "
                            f"{t_teacher_server:.2f} s, {t_teacher_server / max(t, 1e-9):.1f}x the student's time)")

            scales = (1.0, 2.0, 3.0, 5.0, 7.0)
            strip_classes = [names.index(c) for c in ("sneaker", "bag", "dress") if c in names] or [0]
            rows, row_labels = [], []
            for c in strip_classes:
                for w in scales:
                    rows.append(client.sample(np.full(per_class, c), steps=steps, guidance=w, seed=seed))
                    row_labels.append(f"{names[c][:9]} w={w:g}")
            path = save_png(out / "diffusion_guidance.png", labelled_grid(np.concatenate(rows), per_class, row_labels,
                                                                          label_width=110))
            log(f"guidance strip: scales {scales} for {[names[c] for c in strip_classes]} -> {path}")

            if "gan" in client.backend.cards:
                imgs = client.generate(labels, seed=seed)
                s = client.last_stats
                path = save_png(out / "gan.png", labelled_grid(imgs, per_class, client.class_names("gan")))
                summary["gan"] = (path, s)
                log(f"gan: {len(imgs)} images in {s.wall_s * 1e3:.1f} ms -> {path}")

            if "vae" in client.backend.cards:
                imgs = client.generate_vae(k * per_class, seed=seed)
                s = client.last_stats
                path = save_png(out / "vae.png", labelled_grid(imgs, per_class))
                summary["vae"] = (path, s)
                log(f"vae: {len(imgs)} images in {s.wall_s * 1e3:.1f} ms -> {path}")
                pairs = [("sneaker", "ankle boot"), ("t-shirt/top", "dress"), ("trouser", "bag"), ("sandal", "pullover")]
                strips = [client.interpolate(a, b, steps=per_class) for a, b in pairs]
                path = save_png(out / "vae_interpolation.png",
                                labelled_grid(np.concatenate(strips), per_class,
                                              [f"{a[:7]}>{b[:7]}" for a, b in pairs], label_width=110))
                log(f"vae interpolation: {', '.join(f'{a} -> {b}' for a, b in pairs)} -> {path}")
    log(f"demo done in {time.perf_counter() - t_all:.1f} s; images in {out}/")
    return summary


def _requests(s) -> str:
    """"20 requests of 160 rows": a client-side sampling loop's U-Net calls (one per step) and rows per call."""
    return f"{s.calls} requests of {s.rows // max(s.calls, 1)} rows"


def _serves_loop(client: TridentClient, model: str) -> bool:
    """Whether the server runs this diffusion model's sampling loop model."""
    try:
        client.backend.require_server_loop(model=model)
    except TridentError:
        return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="trident demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/demo", help="folder for the PNGs (default out/demo)")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--protocol", choices=("http", "grpc"), default="grpc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=".trident", help="cache of ONNX exports, keyed by checkpoint hash")
    args = p.parse_args(argv)
    try:
        run_demo(Path(args.out), Path(args.model_repository), Path(args.checkpoints), args.per_class, args.steps,
                 args.guidance, args.protocol, args.seed, Path(args.work))
    except TridentError as e:  # RepositoryError, TritonServerError, ExportError, CheckpointError, the SDK's errors
        print(f"trident demo: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

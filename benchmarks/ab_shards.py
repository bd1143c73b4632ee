"""A/B of row shards in the Triton models: served DPM-Solver++-20 with row_shards=1 (off) vs 0 (one per core).

    python -m trident.benchmarks.ab_shards [--rounds 3] [--reps 5]

Each round starts one embedded server per setting in turn (off, then on), so slow drifts of this shared machine hit
both; each server draws B=1 (2 U-Net rows per step with guidance) and B=8 (16 rows) over gRPC, `reps` times each,
and the round reports the medians. Results of the run that set the default are in
benchmarks/results/optimizations.md.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from trident.benchmarks.ab_threads import _median_s
from trident.serving.client import TridentClient
from trident.export.build import ensure_export
from trident.serving.server.repository import build_repository
from trident.serving.server.launcher import ServerConfig, TritonServer

SETTINGS = (("off", 1), ("on", 0))  # name, row_shards
BATCHES = (1, 8)


def run(checkpoint: Path, work: Path, rounds: int = 3, reps: int = 5, steps: int = 20) -> list[dict]:
    export = ensure_export(checkpoint, work / "exports", "diffusion", log=lambda *_: None)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        repos = {}
        for name, shards in SETTINGS:
            repos[name] = Path(tmp) / f"shards_{name}"
            build_repository([export], repos[name], row_shards=shards)
        for r in range(rounds):
            row = {"round": r + 1}
            for name, _ in SETTINGS:
                with TritonServer(ServerConfig(repos[name], http_port=0, grpc_port=0, metrics_port=0)) as server:
                    with TridentClient.connect(server.grpc_url, "grpc") as client:
                        for b in BATCHES:
                            row[(name, b)] = _median_s(client, np.arange(b) % 10, steps, reps)
            results.append(row)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trident.benchmarks.ab_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/diffusion/model.safetensors"))
    p.add_argument("--work", type=Path, default=Path(".trident"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    results = run(args.checkpoint, args.work, args.rounds, args.reps)
    head = " | ".join(f"B={b} off | B={b} on | speed-up" for b in BATCHES)
    print(f"| round | {head} |\n|---|" + "---:|---:|---:|" * len(BATCHES))
    for row in results:
        cells = " | ".join(f"{1e3 * row[('off', b)]:.0f} ms | {1e3 * row[('on', b)]:.0f} ms | "
                           f"{row[('off', b)] / row[('on', b)]:.2f}x" for b in BATCHES)
        print(f"| {row['round']} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

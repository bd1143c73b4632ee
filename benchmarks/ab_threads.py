"""A/B of the Triton models' ONNX Runtime settings: DPM-Solver++-20 at B=8 through the embedded server vs in-process.

    python -m trident.benchmarks.ab_threads [--reps 5]

Compares intra_op_num_threads=1 (the first default), 0 (ONNX Runtime's default: one thread per physical core) and 0
with ORT's spin-waiting turned off, each over gRPC and HTTP, against in-process ONNX Runtime on the same export.
Prints a table; results of the runs that set the defaults are in benchmarks/results/optimizations.md.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from trident.serving.client import TridentClient
from trident.export.build import ensure_export
from trident.serving.server.repository import build_repository
from trident.serving.server.launcher import ServerConfig, TritonServer

SPIN_OFF = 'options.add_session_config_entry("session.intra_op.allow_spinning", "0")'


def _median_s(client: TridentClient, labels: np.ndarray, steps: int, reps: int) -> float:
    client.sample(labels, steps=3, seed=0)  # warm-up
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        client.sample(labels, steps=steps, seed=r)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(checkpoint: Path, work: Path, reps: int = 5, batch: int = 8, steps: int = 20) -> dict[str, float]:
    export = ensure_export(checkpoint, work / "exports", "diffusion", log=lambda *_: None)
    labels = np.arange(batch) % 10
    results = {}
    with TridentClient.from_onnx([export]) as client:
        results["in-process ORT"] = _median_s(client, labels, steps, reps)
    with tempfile.TemporaryDirectory() as tmp:
        for name, threads, spin_off in (("intra_op=1", 1, False), ("intra_op=0", 0, False),
                                        ("intra_op=0, spinning off", 0, True)):
            repo = Path(tmp) / name.replace(" ", "").replace(",", "_").replace("=", "")
            build_repository([export], repo, intra_op_threads=threads)
            if spin_off:  # an experiment, so patched into this copy only
                model_py = repo / "diffusion_unet" / "1" / "model.py"
                model_py.write_text(model_py.read_text().replace(
                    "options.inter_op_num_threads = 1", "options.inter_op_num_threads = 1\n        " + SPIN_OFF))
            with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
                for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
                    with TridentClient.connect(url, protocol) as client:
                        results[f"Triton {name} [{protocol}]"] = _median_s(client, labels, steps, reps)
            shutil.rmtree(repo, ignore_errors=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trident.benchmarks.ab_threads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/diffusion/model.safetensors"))
    p.add_argument("--work", type=Path, default=Path(".trident"))
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    results = run(args.checkpoint, args.work, args.reps)
    base = results["in-process ORT"]
    print(f"| DPM-Solver++-20, B=8 | median s | images/s | vs in-process |\n|---|---:|---:|---:|")
    for name, s in results.items():
        print(f"| {name} | {s:.3f} | {8 / s:.2f} | {100 * (s / base - 1):+.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

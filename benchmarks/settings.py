"""What one benchmark run measures: sizes, buckets, threads and device, read from the environment once.

    TRIDENT_BENCH_SMOKE=1          tiny sizes (few sampler steps, one round): checks the suite runs, not the numbers.
                                   Also on when pytest is given --benchmark-max-time below 0.1 s (`make bench-smoke`).
    TRIDENT_BENCH_BUCKETS=1,4      U-Net/GAN/VAE export buckets (default: spec.DEFAULT_BUCKETS per graph)
    TRIDENT_BENCH_THREADS=N        intra-op threads of every backend (torch, in-process ONNX Runtime, Triton's model
                                   instances) and of the matmul peak (default: OMP_NUM_THREADS, else all cores)
    TRIDENT_BENCH_DEVICE=cuda      CUDA execution provider, fp16 graphs, torch on cuda (see benchmarks/gpu.sh)
    TRIDENT_BENCH_PROTOCOL=grpc    Triton protocol of the sampling, CFG, peer, concurrency and GAN/VAE items (default
                                   http, the SDK's default; the U-Net step item always measures both)
    TRIDENT_BENCH_CHECKPOINTS=DIR  folder holding {diffusion,gan,vae}/model.safetensors (default: ./checkpoints), and
                                   diffusion_student/model.safetensors where the distilled student is measured too
    TRIDENT_BENCH_EXPORTS=D1:D2    ready `trident export` folders to use instead of exporting the checkpoints
    TRIDENT_BENCH_WORK=DIR         export cache and repository folder (default: ./.trident)
    TRIDENT_BENCH_QUALITY_GATE=F   the quality gate's verdicts `--precision auto` reads (default:
                                   benchmarks/results/precision_gate.json)

Pure Python: no torch, no transport, so the report can import it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("diffusion", "gan", "vae")
STUDENT = "diffusion_student"  # the distilled student (issue 19): served beside the teacher by the session's server
STUDENT_STEPS = 4  # the student's network evaluations per image in item 9: the target is stated at 4

# (sampler, steps) of the end-to-end item, as named in the issue; smoke keeps the samplers and cuts the steps.
SAMPLER_RUNS = (("ddpm", 1000), ("ddim", 50), ("ddim", 20), ("dpmpp-2m", 20), ("dpmpp-2m", 10))
SMOKE_SAMPLER_RUNS = (("ddpm", 3), ("ddim", 2), ("dpmpp-2m", 2))
SAMPLER_LABELS = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp-2m": "DPM-Solver++"}


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError:
        raise ValueError(f"expected comma-separated integers such as 1,4, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers such as 1,4, got {text!r}")
    return values


@dataclass(frozen=True)
class BenchSettings:
    smoke: bool = False
    buckets: tuple[int, ...] | None = None  # None: each graph's default buckets
    threads: int = 1
    device: str = "cpu"
    protocol: str = "http"
    checkpoints: Path = ROOT / "checkpoints"
    exports: tuple[Path, ...] = ()
    work: Path = ROOT / ".trident"
    quality_gate: Path = ROOT / "benchmarks" / "results" / "precision_gate.json"
    guidance: float = 3.0
    # sizes of the numbered items
    cfg_batches: tuple[int, ...] = (1, 4, 16)
    sampler_runs: tuple[tuple[str, int], ...] = SAMPLER_RUNS
    sample_batch: int = 8
    sample_rounds: int = 3           # rounds of every sampler run but DDPM-1000, which gets one
    loop_batches: tuple[int, ...] = (1, 8)  # B of the client-loop vs server-loop item
    peer_steps: int = 20
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    concurrency_steps: int = 4       # DPM-Solver++ steps of each single-image request
    concurrency_images: int = 8      # images each client asks for, one after another
    scaling_clients: int = 8         # concurrent clients of the replica-scaling item (1 and 2 replicas alike)
    scaling_draws: int = 2           # sample() calls of B=sample_batch images per client per round
    oneshot_batches: tuple[int, ...] = (1, 8)
    student_steps: int = STUDENT_STEPS  # kept in a smoke run: 4 one-row-per-image steps are already small
    peak_sizes: tuple[int, ...] = (1024, 2048)
    peak_repeats: int = 5
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fp16(self) -> bool:
        return self.device == "cuda"

    @property
    def target_run(self) -> tuple[str, int]:
        """The end-to-end run the serving-overhead target reads: DPM-Solver++-20 (or the smoke stand-in)."""
        return ("dpmpp-2m", self.peer_steps)

    def to_dict(self) -> dict:
        return {"smoke": self.smoke, "buckets": list(self.buckets) if self.buckets else "default",
                "threads": self.threads, "device": self.device, "protocol": self.protocol,
                "guidance": self.guidance, "cfg_batches": list(self.cfg_batches),
                "sampler_runs": [list(r) for r in self.sampler_runs], "sample_batch": self.sample_batch,
                "peer_steps": self.peer_steps, "loop_batches": list(self.loop_batches),
                "concurrency": list(self.concurrency),
                "concurrency_steps": self.concurrency_steps, "concurrency_images": self.concurrency_images,
                "scaling_clients": self.scaling_clients, "scaling_draws": self.scaling_draws,
                "oneshot_batches": list(self.oneshot_batches), "student_steps": self.student_steps}


def from_env(env=None, *, smoke: bool | None = None) -> BenchSettings:
    """Settings from TRIDENT_BENCH_* variables; `smoke` overrides TRIDENT_BENCH_SMOKE when given."""
    env = os.environ if env is None else env
    if smoke is None:
        smoke = env.get("TRIDENT_BENCH_SMOKE", "") not in ("", "0", "false", "no")
    device = env.get("TRIDENT_BENCH_DEVICE", "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"TRIDENT_BENCH_DEVICE must be 'cpu' or 'cuda', got {device!r}")
    protocol = env.get("TRIDENT_BENCH_PROTOCOL", "http")
    if protocol not in ("http", "grpc"):
        raise ValueError(f"TRIDENT_BENCH_PROTOCOL must be 'http' or 'grpc', got {protocol!r}")
    threads = env.get("TRIDENT_BENCH_THREADS") or env.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1)
    buckets = _ints(env["TRIDENT_BENCH_BUCKETS"]) if env.get("TRIDENT_BENCH_BUCKETS") else None
    exports = tuple(Path(p) for p in env.get("TRIDENT_BENCH_EXPORTS", "").split(os.pathsep) if p)
    base = dict(smoke=smoke, buckets=buckets, threads=max(1, int(threads)), device=device, protocol=protocol,
                checkpoints=Path(env.get("TRIDENT_BENCH_CHECKPOINTS", ROOT / "checkpoints")), exports=exports,
                work=Path(env.get("TRIDENT_BENCH_WORK", ROOT / ".trident")),
                quality_gate=Path(env.get("TRIDENT_BENCH_QUALITY_GATE",
                                          ROOT / "benchmarks" / "results" / "precision_gate.json")))
    if not smoke:
        if device == "cuda":  # a GPU reaches its matmul peak only on large products
            return BenchSettings(**base, peak_sizes=(4096, 8192), peak_repeats=10)
        return BenchSettings(**base)
    # Smoke: every code path once, on the smallest sizes that still exercise them (CFG pads 2B rows into a bucket,
    # concurrency overlaps requests).
    return BenchSettings(**base, cfg_batches=(1, 2), sampler_runs=SMOKE_SAMPLER_RUNS, sample_batch=2, sample_rounds=1,
                         loop_batches=(1,),
                         peer_steps=2, concurrency=(1, 2), concurrency_steps=2, concurrency_images=1,
                         scaling_clients=2, scaling_draws=1,
                         oneshot_batches=(1,), peak_sizes=(256,), peak_repeats=2)

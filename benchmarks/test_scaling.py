"""8. Scaling over replicas (issue 22): images/s of DPM-Solver++-20 at B=8 from 1 and 2 Triton replicas, each
replica pinned to its own core (its tritonserver, model stubs and threads: the `taskset` of its start), so that the
cores stand in for machines; the client loop (one U-Net request per step) and the server-side loop (one request per
batch). The same concurrent clients (settings.scaling_clients, one SDK client per thread over the replicas' list of
addresses, as TridentClient.connect spreads them) draw in both configurations. The client process is pinned to the
replicas' cores too: on this 2-core machine there is no third core for it, so each "machine" also runs its share of
the clients, alike in both configurations.

What limits the ratio is measured alongside: per core, the busy fraction over the round (/proc/stat), split into the
replicas' CPU time (every process of each replica's group), the client process' and everything else (other work on the
machine), and Triton's per-replica request counts (how evenly the SDK spread the load).
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from trident.benchmarks import metrics
from trident.benchmarks.common import class_labels, require, rounds
from trident.serving.spec import SAMPLING_LOOP, UNET

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------------------------------
# Cores: pinning and accounting (Linux /proc)
# ----------------------------------------------------------------------------------------------------------------

@contextmanager
def pinned(cores: set[int]):
    """Every thread of this process on `cores` for the block (`taskset -a -p`); threads and processes started inside
    inherit the mask. The old masks are restored at the end."""
    old = {}
    for tid in map(int, os.listdir("/proc/self/task")):
        try:
            old[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cores)
        except OSError:  # a thread that ended meanwhile
            pass
    try:
        yield
    finally:
        for tid, mask in old.items():
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass


def group_pids(pgid: int) -> list[int]:
    """The processes of a process group (a replica: tritonserver and its Python-backend stubs)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:  # fields after the command: state, ppid, pgrp, ...
                out.append(int(entry))
    return out


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of a process group's live processes."""
    total = 0
    for pid in group_pids(pgid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total * TICK_S


def allowed_cpus(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return "?"


def core_times() -> dict[int, tuple[float, float]]:
    """Per core (busy, total) seconds since boot, from /proc/stat (busy: all but idle and iowait)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *values = line.split()
            ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            out[int(name[3:])] = ((sum(ticks) - ticks[3] - ticks[4]) * TICK_S, sum(ticks) * TICK_S)
    return out


def process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class Meter:
    """CPU accounting of the measured rounds: replicas, this (client) process, each core; and requests per replica."""

    def __init__(self, replicas, cores):
        self.replicas, self.cores = replicas, cores
        self.replica_s = [0.0] * len(replicas)
        self.client_s = self.wall_s = 0.0
        self.core_busy_s = {c: 0.0 for c in cores}
        self.requests = [0.0] * len(replicas)

    def _read(self):
        return ([group_cpu_s(r.pid) for r in self.replicas], process_cpu_s(), core_times(), time.perf_counter(),
                [metrics.scrape(r.metrics_url) for r in self.replicas])

    def start(self):
        self._before = self._read()

    def stop(self, model: str):
        (r0, c0, k0, t0, m0), (r1, c1, k1, t1, m1) = self._before, self._read()
        self.replica_s = [a + y - x for a, x, y in zip(self.replica_s, r0, r1)]
        self.client_s += c1 - c0
        self.wall_s += t1 - t0
        for c in self.cores:
            self.core_busy_s[c] += k1[c][0] - k0[c][0]
        self.requests = [a + metrics.delta(x, y, model)["nv_inference_request_success"]
                         for a, x, y in zip(self.requests, m0, m1)]

    def summary(self) -> dict:
        """Fractions of the measured cores' time (wall x cores)."""
        capacity = self.wall_s * len(self.cores)
        busy = sum(self.core_busy_s.values())
        replicas, client = sum(self.replica_s), self.client_s
        return {"core_busy": {str(c): s / self.wall_s for c, s in self.core_busy_s.items()},
                "replica_cpu": [s / self.wall_s for s in self.replica_s],
                "share": {"replicas": replicas / capacity, "clients": client / capacity,
                          "other": max(0.0, busy - replicas - client) / capacity,
                          "idle": max(0.0, 1 - busy / capacity)},
                "requests_per_replica": [int(n) for n in self.requests]}


# ----------------------------------------------------------------------------------------------------------------
# Two replicas, each on its own core
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cores():
    found = sorted(os.sched_getaffinity(0))
    if len(found) < 2:
        pytest.skip(f"scaling over replicas needs 2 cores to pin them to; this process may use {found}")
    return found[:2]


@pytest.fixture(scope="module")
def pinned_replicas(settings, exports, cores, tmp_path_factory):
    """Two replicas over one repository of the diffusion export (one intra-op thread per model instance: one core),
    replica i started pinned to cores[i]."""
    require(exports, "diffusion")
    from trident.serving.server.launcher import ServerConfig, TritonServer
    from trident.serving.server.repository import build_repository

    if settings.device != "cpu":
        pytest.skip("scaling over replicas pins CPU cores; on a GPU machine the replicas would share one device")
    root = tmp_path_factory.mktemp("scaling")
    repository = root / "model_repository"
    build_repository([exports["diffusion"]], repository, intra_op_threads=1, row_shards=1, shard_limit=0)
    servers = []
    try:
        for i, core in enumerate(cores):
            server = TritonServer(ServerConfig(repository, http_port=0, grpc_port=0, metrics_port=0,
                                               log_file=root / f"replica{i}.log", startup_timeout_s=300.0))
            with pinned({core}):
                server.start()
            servers.append(server)
        for server in servers:
            server.wait_ready()
        for server, core in zip(servers, cores):  # the stubs started after the server: each inherited its core
            masks = {allowed_cpus(pid) for pid in group_pids(server.pid)}
            assert masks == {str(core)}, f"replica on core {core}: its processes may run on {masks}"
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def scaling_reference(settings, ort_client):
    """The images every draw of the item must return (same classes, seed 0), from in-process ONNX Runtime."""
    return ort_client.sample(classes=class_labels(settings.sample_batch), steps=settings.peer_steps,
                             guidance=settings.guidance, seed=0, raw=True)


@pytest.mark.parametrize("replicas", [1, 2], ids=["1replica", "2replicas"])
@pytest.mark.parametrize("loop", ["client", "server"])
def test_replica_scaling(benchmark, settings, pinned_replicas, cores, scaling_reference, loop, replicas):
    from trident.serving.client import TridentClient

    servers, used = pinned_replicas[:replicas], set(cores[:replicas])
    protocol, clients, draws = settings.protocol, settings.scaling_clients, settings.scaling_draws
    urls = [s.http_url if protocol == "http" else s.grpc_url for s in servers]
    labels, steps, n = class_labels(settings.sample_batch), settings.peer_steps, settings.sample_batch
    n_rounds = rounds(settings, settings.sample_rounds)
    ready, start, end = (threading.Barrier(clients + 1) for _ in range(3))
    errors: list[str] = []

    def draw(client):
        images = client.sample(classes=labels, steps=steps, guidance=settings.guidance, seed=0, raw=True, loop=loop)
        np.testing.assert_allclose(images, scaling_reference, atol=1e-4)  # a fast wrong answer is no win

    def worker():
        # each thread its own client (tritonclient.http belongs to the thread that made it)
        try:
            with TridentClient.connect(urls, protocol) as client:
                draw(client)  # connections up, sessions warm, images checked
                ready.wait()
                for _ in range(n_rounds):
                    start.wait()
                    for _ in range(draws):
                        draw(client)
                    end.wait()
        except Exception as e:  # reported below; a silent failure would flatter the numbers
            errors.append(f"{type(e).__name__}: {e}")
            for barrier in (ready, start, end):
                barrier.abort()

    meter = Meter(servers, sorted(used))

    def one_round():
        meter.start()
        start.wait()
        end.wait()
        meter.stop(UNET if loop == "client" else SAMPLING_LOOP)

    benchmark.group = f"scaling-{loop}"
    benchmark.extra_info.update(item="scaling", loop=loop, replicas=replicas, cores=sorted(used), clients=clients,
                                draws_per_client=draws, images=clients * draws * n, batch=n, sampler="dpmpp-2m",
                                steps=steps, protocol=protocol)
    with pinned(used):  # the clients (and gRPC's own threads) share the replicas' cores: there is no core of their own
        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for t in threads:
            t.start()
        try:
            ready.wait()  # every client connected and warm
            benchmark.pedantic(one_round, rounds=n_rounds, iterations=1)
        except threading.BrokenBarrierError:  # a client failed: its error is asserted below
            pass
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    summary = meter.summary()
    benchmark.extra_info.update(images_per_s=clients * draws * n * n_rounds / meter.wall_s, **summary)
    # a replica that served nothing is a mis-wired list of addresses (a smoke run's 2 requests may meet on one)
    assert settings.smoke or min(summary["requests_per_replica"]) > 0, (
        f"a replica served nothing: {summary['requests_per_replica']}")

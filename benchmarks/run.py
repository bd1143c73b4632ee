"""`make bench`: run the latency benchmarks, keep the JSON, write the report and its plots.

    python -m trident.benchmarks.run [--smoke] [--merge] [--out DIR] [-- PYTEST ARGS...]

Runs `pytest benchmarks --benchmark-enable --benchmark-json=<out>/<stamp>.json`, copies the JSON to
<out>/latest.json, then writes <out>/report.md and <out>/*.png (trident.benchmarks.report). The default out is
benchmarks/results (benchmarks/results/gpu with TRIDENT_BENCH_DEVICE=cuda; a smoke/ folder inside it for --smoke).
Sizes and backends are set by the TRIDENT_BENCH_* variables (see trident.benchmarks.settings).

--merge re-measures a part of the suite into the last full run: the benchmarks of this run replace those of the same
name in <out>/latest.json (the others are kept, with that run's machine description), and the report says which
were merged in and when. E.g. `python -m trident.benchmarks.run --merge -- -k scaling`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from trident.benchmarks import report

BENCH_DIR = Path(__file__).resolve().parent
SMOKE_OPTIONS = ["--benchmark-min-rounds=1", "--benchmark-max-time=0.01"]


def pytest_command(json_path: Path, smoke: bool, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", str(BENCH_DIR), "-q", "-p", "no:cacheprovider", "--benchmark-enable",
            f"--benchmark-json={json_path}", "--benchmark-group-by=group", "--benchmark-sort=name",
            "--benchmark-columns=min,median,mean,stddev,rounds", *(SMOKE_OPTIONS if smoke else []), *extra]


def merge(latest: Path, new: Path, into: Path, selection: list[str]) -> None:
    """latest's benchmarks with new's replacing those of the same name (new's added), written to `into`; the
    merged run's time, commit and selection recorded under "merged"."""
    base, part = json.loads(latest.read_text()), json.loads(new.read_text())
    smoke = [d.get("machine_info", {}).get("trident", {}).get("settings", {}).get("smoke") for d in (base, part)]
    if smoke[0] != smoke[1]:
        kind = "a smoke" if smoke[1] else "a full"
        raise ValueError(f"{new} is {kind} run and {latest} is not: merge like into like")
    names = {b["fullname"] for b in part["benchmarks"]}
    base["benchmarks"] = [b for b in base["benchmarks"] if b["fullname"] not in names] + part["benchmarks"]
    # an earlier merge whose benchmarks this one all replaced no longer describes any figure in the report
    base["merged"] = [m for m in base.get("merged", []) if not set(m.get("benchmarks", [])) <= names]
    t = part.get("machine_info", {}).get("trident", {})
    base["merged"].append({
        "datetime": part.get("datetime"), "commit": part.get("commit_info", {}).get("id"),
        "dirty": bool(part.get("commit_info", {}).get("dirty")),
        # the merged figures may come from another machine than the run they join: the report names it
        "machine": f"{t['cpu_model']}, {t.get('logical_cpus', '?')} logical CPUs" if t.get("cpu_model") else None,
        "selection": " ".join(selection), "benchmarks": sorted(names),
        "load_average": [t.get(f"load_average_at_{w}") for w in ("start", "end")]})
    into.write_text(json.dumps(base, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trident.benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes and one round: checks the suite, not the numbers")
    p.add_argument("--merge", action="store_true",
                   help="merge this run's benchmarks into <out>/latest.json (replacing those of the same name)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results[/gpu][/smoke])")
    p.add_argument("pytest_args", nargs="*", help="after --: passed to pytest (e.g. -k unet_step)")
    args = p.parse_args(argv)

    env = dict(os.environ)
    if args.smoke:
        env["TRIDENT_BENCH_SMOKE"] = "1"
    if env.get("TRIDENT_BENCH_THREADS"):  # numpy's BLAS reads its thread count at import, from OMP_NUM_THREADS
        env["OMP_NUM_THREADS"] = env["TRIDENT_BENCH_THREADS"]
    gpu = env.get("TRIDENT_BENCH_DEVICE") == "cuda"
    out = args.out or BENCH_DIR / "results" / ("gpu" if gpu else "") / ("smoke" if args.smoke else "")
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{time.strftime('%Y%m%d-%H%M%S')}{'-smoke' if args.smoke else ''}.json"

    command = pytest_command(json_path, args.smoke, args.pytest_args)
    print("+ " + " ".join(command), flush=True)
    t0 = time.monotonic()
    process = subprocess.Popen(command, env=env)
    try:
        code = process.wait()
    except KeyboardInterrupt:  # Ctrl-C (or a timeout's SIGINT) reaches pytest too: it stops and writes what finished
        print("interrupted: waiting for pytest to write its results", flush=True)
        code = process.wait()
    print(f"pytest exited with {code} after {time.monotonic() - t0:.0f} s", flush=True)
    if not json_path.is_file():
        print(f"no results: pytest wrote no {json_path}", file=sys.stderr)
        return code or 1
    if args.merge and (out / "latest.json").is_file():
        merged = json_path.with_name(json_path.stem + "-merged.json")
        try:
            merge(out / "latest.json", json_path, merged, args.pytest_args)
        except ValueError as e:
            print(f"not merged: {e}", file=sys.stderr)
            return code or 2
        json_path = merged
    shutil.copyfile(json_path, out / "latest.json")
    path = report.write_report(json_path, out)
    print(f"wrote {json_path}, {out / 'latest.json'} and {path}")
    return code


if __name__ == "__main__":
    sys.exit(main())

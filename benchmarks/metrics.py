"""Triton's Prometheus metrics: parse the text, take deltas, turn them into batch size and queue/compute time.

Triton counts per model (labels model, version):
    nv_inference_request_success            requests answered
    nv_inference_count                      rows ("inferences") in them
    nv_inference_exec_count                 model executions (one per dynamic batch)
    nv_inference_queue_duration_us          summed over requests: time waiting in the scheduler queue
    nv_inference_compute_infer_duration_us  summed over requests: time in the model's execute() (a batch's time is
                                            counted once per request in it)
Model warm-up runs count too, so only deltas between two scrapes mean anything.
"""
from __future__ import annotations

import re
import time
import urllib.request

COUNTERS = ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
            "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
            "nv_inference_compute_input_duration_us", "nv_inference_compute_output_duration_us",
            "nv_inference_request_duration_us")

_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, str], float]:
    """{(metric name, model): value} for every per-model sample in a Prometheus text page (summed over versions)."""
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m["labels"] or ""))
        if "model" not in labels:
            continue
        key = (m["name"], labels["model"])
        out[key] = out.get(key, 0.0) + float(m["value"])
    return out


def scrape(url: str, timeout: float = 5.0) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse(response.read().decode("utf-8", errors="replace"))


def scrape_settled(url: str, before: dict, model: str, requests: int, timeout: float = 5.0) -> dict:
    """Scrape until `requests` more requests of `model` than in `before` are counted (Triton updates its statistics
    just after sending a response, so a scrape right after the last reply can miss it), or until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        after = scrape(url)
        done = delta(before, after, model)["nv_inference_request_success"] >= requests
        if done or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def delta(before: dict, after: dict, model: str) -> dict[str, float]:
    """Counter increases of one model between two scrapes."""
    return {name: after.get((name, model), 0.0) - before.get((name, model), 0.0) for name in COUNTERS}


def summarize(d: dict[str, float]) -> dict[str, float | None]:
    """Average dynamic-batch size (rows per execution) and queue/compute microseconds per request."""
    requests, execs = d["nv_inference_request_success"], d["nv_inference_exec_count"]
    return {
        "requests": requests,
        "rows": d["nv_inference_count"],
        "executions": execs,
        "avg_batch_rows": d["nv_inference_count"] / execs if execs else None,
        "avg_requests_per_execution": requests / execs if execs else None,
        "queue_us_per_request": d["nv_inference_queue_duration_us"] / requests if requests else None,
        "compute_us_per_request": d["nv_inference_compute_infer_duration_us"] / requests if requests else None,
        "request_us_per_request": d["nv_inference_request_duration_us"] / requests if requests else None,
    }

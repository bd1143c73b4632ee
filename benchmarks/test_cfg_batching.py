"""2. Batched classifier-free guidance vs two calls, per step, through Triton: one request of 2B rows
([cond; null] stacked, as the client sends) against two requests of B rows (cond, then null)."""
from __future__ import annotations

import numpy as np
import pytest

from trident.benchmarks.common import buckets_run, class_labels, require
from trident.serving import sampling
from trident.serving.spec import UNET


def _two_calls_cfg(model, x, t, labels, guidance, null_class):
    """The same guided eps as sampling.cfg_eps, with the conditional and unconditional halves sent separately."""
    cond = sampling.cfg_eps(model, x, t, labels, 1.0, null_class)  # guidance 1: one call of the B labelled rows
    uncond = sampling.cfg_eps(model, x, t, None, guidance, null_class)  # no labels: one call of B null-class rows
    return uncond + guidance * (cond - uncond)


@pytest.mark.parametrize("mode", ["batched", "two-calls"])
def test_cfg_step(benchmark, settings, exports, triton, mode, cfg_batch):
    require(exports, "diffusion")
    card = triton.card("diffusion")
    x = np.random.default_rng(0).standard_normal((cfg_batch, *card.image.shape))
    labels = np.asarray(class_labels(cfg_batch), dtype=np.int64)
    null = card.null_class
    model = triton.eps_model()
    fn = sampling.cfg_eps if mode == "batched" else _two_calls_cfg
    args = (model, x, 500, labels, settings.guidance, null)
    reference = fn(*args)  # warm, and the result to compare
    rows, calls = (2 * cfg_batch, 1) if mode == "batched" else (cfg_batch, 2)
    max_batch = triton.backend.max_batch[UNET]
    benchmark.group = f"cfg-B{cfg_batch:02d}"
    benchmark.extra_info.update(item="cfg", mode=mode, B=cfg_batch, protocol=settings.protocol,
                                calls_per_step=calls, rows_per_call=rows, max_batch=max_batch,
                                buckets_run=calls * buckets_run(rows, triton.backend.buckets[UNET], max_batch))
    out = benchmark(fn, *args)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)

"""The largest request a model repository takes, worked out from its model configurations.

It is the bound to put on request bodies, so that a body bigger than any valid request is refused before it is read:
`trident serve build` records it in trident_repository.json, and `trident serve` passes it to a tritonserver that has
`--http-max-input-size` (newer than the 2.51 bundled in nvidia-pytriton and the 24.10 container, which have no such
bound and read a body whole before they check it; a proxy in front then holds the bound, see README "Exposing the
server").

Per model: rows x the bytes of one row of every input (Triton's binary tensor extension, what tritonclient sends),
and the same elements as JSON text (a float written out takes up to JSON_BYTES_PER_ELEMENT characters), for the
largest batch the model takes: max_batch_size for the batched models; for a model that Triton does not batch
(max_batch_size 0: the sampling loop), its variable-length inputs at the most it accepts (`trident_max_images`
labels; a string input at MAX_STRING_BYTES).
"""
from __future__ import annotations

import math
from typing import Iterable

from trident.serving.server.runtime.protocol import MAX_IMAGES as MAX_IMAGES_KEY  # the loop model's images per request

JSON_BYTES_PER_ELEMENT = 24  # "-1.2345678901234567e-05, ": a float64 repr with its separator
MAX_STRING_BYTES = 4096      # one string element (a sampler name, sampler options as JSON)
HEADER_BYTES = 64 * 1024     # the request's JSON header: names, shapes, parameters
_ITEMSIZE = {"TYPE_FP32": 4, "TYPE_FP16": 2, "TYPE_FP64": 8, "TYPE_INT64": 8, "TYPE_INT32": 4, "TYPE_UINT8": 1,
             "TYPE_BOOL": 1}


def _parameter(config: dict, key: str) -> str | None:
    """A config parameter's value (the repository writes them as {key: {"string_value": value}})."""
    value = (config.get("parameters") or {}).get(key)
    return None if value is None else value["string_value"]


def model_request(config: dict) -> dict:
    """{"rows", "elements", "binary_bytes", "json_bytes"} of the largest request one model configuration takes."""
    batched = int(config.get("max_batch_size", 0)) > 0
    rows = int(config["max_batch_size"]) if batched else 1
    variable = int(_parameter(config, MAX_IMAGES_KEY) or 1)  # what a -1 dimension can be (the loop's labels)
    elements = binary = json_text = 0
    for tensor in config.get("input", []):
        dims = [variable if int(d) < 0 else int(d) for d in tensor.get("dims", [])]
        n = rows * math.prod(dims)
        dtype = tensor["data_type"]
        if dtype == "TYPE_STRING":
            binary += n * (4 + MAX_STRING_BYTES)  # 4-byte length prefix per element
            json_text += n * (MAX_STRING_BYTES + 3)
        else:
            binary += n * _ITEMSIZE[dtype]
            json_text += n * JSON_BYTES_PER_ELEMENT
        elements += n
    return {"rows": rows, "elements": elements, "binary_bytes": binary + HEADER_BYTES,
            "json_bytes": json_text + HEADER_BYTES}


def largest_request(configs: Iterable[dict]) -> dict:
    """The largest valid request over the models: {"model", "rows", "binary_bytes", "json_bytes", "limit_bytes"},
    limit_bytes being the larger of the two encodings rounded up to a whole MiB (the bound to set)."""
    best = None
    for config in configs:
        request = {"model": config["name"], **model_request(config)}
        if best is None or request["json_bytes"] > best["json_bytes"]:
            best = request
    if best is None:
        raise ValueError("no model configurations")
    mib = 1 << 20
    limit = math.ceil(max(best["json_bytes"], best["binary_bytes"]) / mib) * mib
    return {"model": best["model"], "rows": best["rows"], "binary_bytes": best["binary_bytes"],
            "json_bytes": best["json_bytes"], "limit_bytes": limit}

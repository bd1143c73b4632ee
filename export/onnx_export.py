"""Checkpoint -> fixed-shape ONNX graphs (one per batch bucket), verified against PyTorch every time.

`trident export CHECKPOINT --out DIR [--buckets 2,8,32] [--fp16] [--no-int8]` writes into DIR:
  <graph>_b<N>.onnx          fp32 graph, every dimension static (batch N included), for the CPU path
  int8/<graph>_b<N>.onnx     int8 QDQ graph calibrated on real inputs (export/quantize.py), unless --no-int8; a graph
                             whose int8 graph strays beyond INT8_TOLERANCE at any bucket has none (metadata.json
                             says why: "int8_refused", and `--precision auto` does not offer int8 for it)
  fp16/<graph>_b<N>.onnx     optional fp16 graph with float32 inputs/outputs, for the GPU path
  metadata.json              everything a client needs to sample with no other file (kind, image shape, class names,
                             null class, schedule, prediction type, latent size, buckets, tensor specs, parity figures)
DIR is built in a temporary folder next to it and renamed into place only after every graph passed its checks, so a
failed export never leaves half-written model files.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from trident.serving.files import atomic_directory, file_sha256
from trident.serving.card import ModelCard
from trident.serving.errors import TridentError
from trident.serving.graph_runtime import GUIDANCE
from trident.serving.spec import (DEFAULT_BUCKETS, ENCODER, EXPORT_FORMAT, EXPORT_VERSION, GRAPHS_OF_KIND, GraphSpec,
                                  graph_spec_of)
from trident.training import checkpoint as ckpt

from . import quantize

# Opset 17 with the legacy (TorchScript) exporter. GroupNorm exports as InstanceNormalization here; GroupNormalization
# at opset 21 breaks ORT and TensorRT. The dynamo exporter was measured once on the shipped U-Net at bucket 8: at
# opset 17 its down-converted graph fails onnx.checker (Split with num_outputs, an opset-18 attribute); at opset 18
# it gives 374 nodes against 694 but the same ONNX Runtime latency within noise (median 78.4 vs 79.4 ms, 20 runs on
# the busy 2-core CPU) and the same parity (7e-7 vs 8e-7), so legacy stays the default (`--exporter dynamo` exists).
OPSET = 17
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 2e-2  # measured max abs error of the fp16 graphs is stated in metadata.json
# int8 against PyTorch on held-out real inputs (calibration data of another seed; random inputs such as pure noise at
# t near 0 lie outside what the ranges were calibrated on and say nothing about serving): a guard against a broken
# quantization (every op quantized gave 1.6-2.6 on the U-Net), not the quality bar; whether int8 draws as well as
# fp32 is the quality gate's question (serving/precision.py, `trident evaluate --precision-gate`).
INT8_TOLERANCE = 0.5
EXPORTABLE = tuple(GRAPHS_OF_KIND)


class ExportError(TridentError):
    """The export cannot proceed or its checks failed; nothing was written to the output directory."""


# ----------------------------------------------------------------------------------------------------------------
# Graph wrappers: each one is exactly the served function, with the spec's argument order
# ----------------------------------------------------------------------------------------------------------------

class _Encoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder

    def forward(self, image):
        return self.encoder(image)


def graph_module(graph: str, model: torch.nn.Module) -> torch.nn.Module:
    """The torch module whose forward(*spec inputs) returns the spec outputs."""
    if graph == ENCODER:
        return _Encoder(model).eval()
    if graph == "vae_decoder":
        return model.decoder.eval()
    return model.eval()


def example_inputs(spec: GraphSpec, n: int, card: ModelCard, seed: int = 0) -> list[np.ndarray]:
    """Random but valid inputs for a graph at batch n (timesteps across [0, T), labels across [0, null], a student's
    guidance across its guidance_range)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in spec.inputs:
        if t.name == "timestep":
            T = card.num_train_timesteps
            out.append(rng.uniform(0, T - 1, size=n).astype(np.float32))
        elif t.name == "class_label":
            hi = card.null_class if card.null_class is not None else len(card.class_names) - 1
            out.append(rng.integers(0, hi + 1, size=n).astype(np.int64))
        elif t.role == GUIDANCE:  # a student's guidance scale, across the range it was distilled on
            out.append(rng.uniform(*card.guidance_range, size=n).astype(np.float32))
        else:
            out.append(rng.standard_normal(t.batched(n)).astype(np.float32))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------

def static_dims(model: onnx.ModelProto) -> dict[str, list]:
    """Every graph input/output's dims; a dim that is not a concrete positive integer shows as its dim_param or None."""
    dims = {}
    for v in list(model.graph.input) + list(model.graph.output):
        dims[v.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                        for d in v.type.tensor_type.shape.dim]
    return dims


def check_graph(model: onnx.ModelProto, spec: GraphSpec, n: int) -> None:
    onnx.checker.check_model(model)
    for name, dims in static_dims(model).items():
        if not all(isinstance(d, int) for d in dims):
            raise ExportError(f"{spec.name} b{n}: tensor {name!r} has non-static dims {dims}")
    names_in = [i.name for i in model.graph.input]
    names_out = [o.name for o in model.graph.output]
    if names_in != [t.name for t in spec.inputs] or names_out != [t.name for t in spec.outputs]:
        raise ExportError(f"{spec.name} b{n}: graph I/O {names_in} -> {names_out} does not match the spec")
    # Each input must feed some node: a timestep embedding constant-folded away would leave 'timestep' unused.
    consumed = {i for node in model.graph.node for i in node.input}
    unused = [name for name in names_in if name not in consumed]
    if unused:
        raise ExportError(f"{spec.name} b{n}: graph inputs {unused} are not used by any node (constant-folded?)")


def _session(model_bytes: bytes, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def parity(model_bytes: bytes, module: torch.nn.Module, spec: GraphSpec, n: int, card: ModelCard,
           seed: int = 0, inputs: list[np.ndarray] | None = None) -> float:
    """Max abs difference between ONNX Runtime and PyTorch on the same inputs (default: random valid ones), over all
    outputs."""
    inputs = example_inputs(spec, n, card, seed) if inputs is None else [a[:n] for a in inputs]
    with torch.no_grad():
        ref = module(*[torch.from_numpy(a) for a in inputs])
    ref = [ref] if torch.is_tensor(ref) else list(ref)
    got = _session(model_bytes).run(None, {t.name: a for t, a in zip(spec.inputs, inputs)})
    return max(float(np.max(np.abs(g.astype(np.float64) - r.numpy().astype(np.float64)))) for g, r in zip(got, ref))


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------

def export_graph(module: torch.nn.Module, spec: GraphSpec, n: int, card: ModelCard,
                 exporter: str = "legacy") -> onnx.ModelProto:
    args = tuple(torch.from_numpy(a) for a in example_inputs(spec, n, card))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(module, args, buf, input_names=[t.name for t in spec.inputs],
                              output_names=[t.name for t in spec.outputs], opset_version=OPSET,
                              do_constant_folding=True, dynamo=False)
            return onnx.load_from_string(buf.getvalue())
        if exporter == "dynamo":
            prog = torch.onnx.export(module, args, input_names=[t.name for t in spec.inputs],
                                     output_names=[t.name for t in spec.outputs], opset_version=18, dynamo=True,
                                     verbose=False)
            return prog.model_proto
    raise ValueError(f"exporter must be 'legacy' or 'dynamo', got {exporter!r}")


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and math, float32 inputs and outputs (casts at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True)
    return _toposort(half)


def _toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 converter appends its input casts at the end of the node list; onnx.checker wants topological order."""
    ready = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"fp16 graph has a cycle or dangling inputs at {rest[0].name}")
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


def parse_buckets(text: str | list | tuple | None, graph: str) -> tuple[int, ...]:
    if text is None:
        return DEFAULT_BUCKETS[graph]
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    if not items or items == [""]:
        raise ExportError("the bucket list is empty; give batch sizes such as --buckets 2,8,32")
    try:
        values = [int(s) for s in items]
    except ValueError:
        raise ExportError(f"bucket sizes must be integers, got {text!r}") from None
    bad = [v for v in values if v < 1]
    if bad:
        raise ExportError(f"bucket sizes must be positive, got {bad} in {text!r}")
    return tuple(sorted(set(values)))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _keep_reduced(tmp: Path, entry: dict, precision: str, graph: str, n: int, data: bytes, err: float) -> str:
    """One bucket's int8 or fp16 graph, within its tolerance (the caller checks: beyond it, int8 is left out and
    fp16 fails the export): written to tmp/<precision>/ and recorded in the graph's entry. Returns the log fragment."""
    name = f"{graph}_b{n}.onnx"
    (tmp / precision).mkdir(exist_ok=True)
    (tmp / precision / name).write_bytes(data)
    entry[precision][str(n)] = {"file": f"{precision}/{name}", "sha256": _sha256(data), "parity_max_abs_err": err}
    return f", {precision} parity {err:.2e}"


def _export_into(tmp: Path, checkpoint: Path, model, card: ModelCard, graphs, bucket_map, fp16: bool, exporter: str,
                 log, int8: bool = True) -> dict:
    """Export, check and write every graph and metadata.json (the card, with the buckets) into the folder tmp."""
    card = card.with_buckets({g: bucket_map[g] for g in graphs})
    info = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "card": card.to_dict(), "opset": OPSET,
            "exporter": exporter, "torch_version": torch.__version__, "onnx_version": onnx.__version__,
            "source_checkpoint": {"file": checkpoint.name, "sha256": file_sha256(checkpoint)},
            "graphs": {}}
    if int8:
        info["int8"] = {"method": quantize.METHOD}
    for graph in graphs:
        spec = graph_spec_of(graph, card)
        module = graph_module(graph, model)
        entry = {"spec": spec.to_dict(), "buckets": list(bucket_map[graph]), "fp32": {}, "fp16": {}, "int8": {}}
        calibration = quantize.calibration_inputs(graph, spec, module, card) if int8 else None
        # real inputs the calibration did not see: the int8 parity check here, and the fixed batch on which
        # `--precision auto` checks every runtime against fp32 on the serving machine (serving/precision.py)
        held_out = quantize.calibration_inputs(graph, spec, module, card, seed=1)
        rows = max(bucket_map[graph])
        (tmp / "parity").mkdir(exist_ok=True)
        np.savez(tmp / "parity" / f"{graph}.npz", **{t.name: a[:rows] for t, a in zip(spec.inputs, held_out)})
        entry["parity_inputs"] = f"parity/{graph}.npz"
        for n in bucket_map[graph]:
            t0 = time.time()
            proto = export_graph(module, spec, n, card, exporter)
            check_graph(proto, spec, n)
            data = proto.SerializeToString()
            err = parity(data, module, spec, n, card)
            if not err < FP32_TOLERANCE:
                raise ExportError(f"{graph} b{n}: ONNX Runtime vs PyTorch max abs error {err:.3g} "
                                  f"exceeds {FP32_TOLERANCE}")
            name = f"{graph}_b{n}.onnx"
            (tmp / name).write_bytes(data)
            entry["fp32"][str(n)] = {"file": name, "sha256": _sha256(data), "parity_max_abs_err": err}
            msg = f"{graph} b{n}: parity {err:.2e}"
            if int8 and "int8_refused" not in entry:
                qdata = quantize.quantize_graph(data, spec, calibration, n)
                qerr = parity(qdata, module, spec, n, card, inputs=held_out)  # on rows the calibration did not see
                if qerr < INT8_TOLERANCE:
                    msg += _keep_reduced(tmp, entry, "int8", graph, n, qdata, qerr)
                else:  # int8 is an offer, not the export's purpose: the graph is exported without it, and says why
                    entry["int8_refused"] = (f"its int8 graph at b{n} strays {qerr:.3g} from PyTorch (max abs, "
                                             f"held-out rows), beyond {INT8_TOLERANCE}")
                    for kept in entry["int8"].values():
                        (tmp / kept["file"]).unlink()
                    entry["int8"] = {}
                    msg += f", no int8 graphs: {entry['int8_refused']}"
            if fp16:
                half = to_fp16(proto)
                onnx.checker.check_model(half)
                hdata = half.SerializeToString()
                herr = parity(hdata, module, spec, n, card)
                if not herr < FP16_TOLERANCE:  # asked for by --fp16: a graph that cannot keep it fails the export
                    raise ExportError(f"{graph} b{n} fp16: max abs error {herr:.3g} exceeds {FP16_TOLERANCE}")
                msg += _keep_reduced(tmp, entry, "fp16", graph, n, hdata, herr)
            log(f"{msg} ({time.time() - t0:.1f}s)")
        info["graphs"][graph] = entry
    (tmp / "metadata.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, buckets=None, fp16: bool = False,
                      exporter: str = "legacy", log=print, int8: bool = True) -> dict:
    """Export every graph of a checkpoint at every bucket; returns the metadata written to out_dir/metadata.json."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    meta0 = ckpt.read_meta(checkpoint)
    if meta0.get("kind") not in EXPORTABLE:
        raise ExportError(f"{checkpoint} holds a {meta0.get('kind')!r} model; only {EXPORTABLE} checkpoints export")
    model, meta = ckpt.load_model(checkpoint)
    card = ckpt.card_of(meta, checkpoint)
    graphs = GRAPHS_OF_KIND[card.kind]
    bucket_map = {g: parse_buckets(buckets, g) for g in graphs}

    try:
        with atomic_directory(out_dir) as tmp:
            info = _export_into(tmp, checkpoint, model, card, graphs, bucket_map, fp16, exporter, log, int8)
    except OSError as e:
        raise ExportError(f"cannot write the output directory {out_dir}: {e}") from e
    return info


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="trident export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a model.safetensors written by `trident train` (diffusion, gan or vae) or "
                                      "`trident distill` (a diffusion student: diffusion_student_unet)")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--buckets", default=None,
                   help="comma-separated static batch sizes, e.g. 2,8,32 (default per graph: "
                        + "; ".join(f"{g}: {','.join(map(str, b))}" for g, b in DEFAULT_BUCKETS.items()) + ")")
    p.add_argument("--fp16", action="store_true", help="also write fp16 graphs (float32 I/O) for the GPU path")
    p.add_argument("--no-int8", dest="int8", action="store_false",
                   help="skip the int8 graphs (calibrated post-training quantization, export/quantize.py)")
    p.add_argument("--exporter", choices=("legacy", "dynamo"), default="legacy")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = export_checkpoint(args.checkpoint, args.out, args.buckets, args.fp16, args.exporter, int8=args.int8)
    except (ExportError, ckpt.CheckpointError) as e:
        print(f"trident export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/metadata.json ({', '.join(info['graphs'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

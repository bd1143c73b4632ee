"""int8 graphs: post-training static quantization of the exported fp32 graphs, calibrated on what they will see.

One int8 graph per bucket, in ONNX QDQ form (QuantizeLinear/DequantizeLinear pairs around each quantized op), which
both runtimes run with int8 kernels: ONNX Runtime directly, OpenVINO by folding the QDQ pairs into its own
low-precision ops. So one file serves `onnxruntime-int8` and `openvino-int8` (serving/precision.py).

What is quantized, and why: the weights of Conv, MatMul and Gemm per output channel, and their input activations
per tensor (symmetric int8, ranges from MinMax calibration). Everything else stays float32: quantizing every op of
the shipped U-Net (the timestep embedding's Sin/Cos/Mul, the norms, the attention softmax) gave a max abs error of
1.6-2.6 on eps (whose rms is 1), against 0.06-0.07 with these three ops only (measured on calibration batches).

Calibration data come from the model's real inputs:
  U-Net      the (x_t, t, y) of real DPM-Solver++ 20-step trajectories at guidance 3 (conditional rows and the null
             class), one image per class, run by the fp32 model: every timestep a sampler visits, every class; a
             distilled student's (x_t, t, y, w) of its own trajectories across its guidance range and step counts
  generator  z ~ N(0, I) with every class label
  decoder    z ~ N(0, I)
  encoder    real Fashion-MNIST test images
"""
from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from trident.serving import sampling
from trident.serving.card import ModelCard
from trident.serving.spec import DECODER, ENCODER, GENERATOR, STUDENT_UNET, UNET, GraphSpec

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
CALIBRATION_ROWS = 256  # per graph, except the U-Net, whose rows are its trajectories' (20 steps x 20 rows)
# Weights keep 7 bits (reduce_range): CPUs without VNNI (AVX2, AVX-512 before VNNI) multiply uint8 activations by int8
# weights with VPMADDUBSW, which adds each pair of products into a saturating int16; 255 * 127 * 2 overflows it and
# 255 * 63 * 2 does not. ONNX Runtime's and OpenVINO's quantization guides give this workaround. With 8-bit weights
# the same graph drew differently on an AVX2 CPU than on a VNNI one (the U-Net's parity error grew several-fold, the
# GAN's past the export's bound); one graph that computes alike on every CPU is worth the lost bit.
METHOD = ("onnxruntime.quantization.quantize_static, QDQ format; 7-bit int8 weights per output channel (reduce_range) "
          f"and symmetric int8 activations per tensor (MinMax) for {', '.join(QUANTIZED_OPS)}; every other op float32")


def calibration_inputs(graph: str, spec: GraphSpec, module: torch.nn.Module, card: ModelCard,
                       seed: int = 0) -> list[np.ndarray]:
    """Rows of real inputs for a graph, in the spec's input order, float32/int64 as the graph takes them."""
    rng = np.random.default_rng(seed)
    if graph in (UNET, STUDENT_UNET):
        rows = []

        @torch.inference_mode()
        def eps(*args):  # the fp32 model as the sampler's callable, recording what it is called with
            rows.append(tuple(np.ascontiguousarray(a, dtype=t.dtype) for a, t in zip(args, spec.inputs)))
            return module(*[torch.from_numpy(a) for a in rows[-1]]).numpy()

        labels = np.arange(len(card.class_names))
        for how in _unet_trajectories(card):
            sampling.sample(eps, (len(labels), *card.image.shape), labels,
                            schedule=sampling.NoiseSchedule.from_dict(card.schedule), null_class=card.null_class,
                            seed=seed, prediction_type=card.prediction_type, guidance_range=card.guidance_range,
                            distilled_steps=card.distilled_steps, **how)
        columns = [np.concatenate([r[k] for r in rows]) for k in range(len(spec.inputs))]
        if card.guidance_range is not None:  # mixed, so that any first rows (the export's parity batch) span the scales
            order = rng.permutation(len(columns[0]))
            columns = [c[order] for c in columns]
        return columns
    if graph == GENERATOR:
        z = rng.standard_normal((CALIBRATION_ROWS, card.latent_dim)).astype(np.float32)
        return [z, (np.arange(CALIBRATION_ROWS) % len(card.class_names)).astype(np.int64)]
    if graph == DECODER:
        return [rng.standard_normal((CALIBRATION_ROWS, card.latent_dim)).astype(np.float32)]
    if graph == ENCODER:
        from trident.training.data import load_fashion_mnist

        images = load_fashion_mnist("test", limit=(seed + 1) * CALIBRATION_ROWS).images[-CALIBRATION_ROWS:]
        images = images.astype(np.float32)
        lo, hi = card.image.value_range
        return [(images[:, None] / 255.0 * (hi - lo) + lo).astype(np.float32)]
    raise ValueError(f"no calibration data for graph {graph!r}")


def _unet_trajectories(card: ModelCard) -> list[dict]:
    """The sampling runs whose U-Net inputs calibrate it. The teacher: DPM-Solver++ 20 steps at guidance 3 on the
    linspace layout (rows of [cond; null]). A student, whose guidance is an input: its default sampler at the low end, the middle and the high
    end of its guidance range, and a step-distilled one at each step count the SDK offers (1, 2, 4, 8), so every
    timestep and scale it serves is seen."""
    if card.guidance_range is None:
        # linspace, pinned when DPM-Solver++'s default became logsnr: a fresh export then quantizes exactly as the
        # cached one the gate judged (the int8 export cache keys the method, not the calibration), and that graph
        # passed serving the logsnr sampler (precision_gate.json: FD 74.7 against fp32's 90.1, agreement 99.6%)
        return [{"sampler": "dpmpp-2m", "steps": 20, "guidance": 3.0, "spacing": "linspace"}]
    low, high = card.guidance_range
    scales = sorted({low, (low + high) / 2, high})
    default = sampling.default_settings(card.distilled_steps)
    steps = [default["steps"]] if card.distilled_steps is None else sorted({1, 2, 4, 8, card.distilled_steps})
    return [{**default, "steps": n, "guidance": w} for w in scales for n in steps]


class _Batches:
    """onnxruntime.quantization's CalibrationDataReader over rows cut into batches of the graph's static size."""

    def __init__(self, spec: GraphSpec, rows: list[np.ndarray], batch: int):
        n = len(rows[0]) // batch * batch
        self._items = iter([{t.name: a[i:i + batch] for t, a in zip(spec.inputs, rows)} for i in range(0, n, batch)])

    def get_next(self):
        return next(self._items, None)


def quantize_graph(fp32_bytes: bytes, spec: GraphSpec, rows: list[np.ndarray], batch: int) -> bytes:
    """The int8 QDQ graph of one fp32 bucket graph, calibrated on rows."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(rows[0]) < batch:
        raise ValueError(f"{spec.name} b{batch}: {len(rows[0])} calibration rows are fewer than one batch")
    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root.setLevel(logging.ERROR)  # the quantizer logs a warning per 1-d weight it leaves per-tensor
        source, prepared, out = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        source.write_bytes(fp32_bytes)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), _Batches(spec, rows, batch), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(QUANTIZED_OPS), calibrate_method=CalibrationMethod.MinMax,
                        reduce_range=True, extra_options={"ActivationSymmetric": True})
        root.setLevel(level)
        return out.read_bytes()

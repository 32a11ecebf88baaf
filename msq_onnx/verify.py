"""Stage 8: check the written model on ONNX Runtime and measure it.

Accuracy is measured on the real output model with ORT's full optimizations,
never on an instrumented copy (instrumentation blocks the integer fusions).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort

from .errors import BadData, one_line
from .instrument import padded_batches, progress

FUSED_INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger",
                     "MatMulInteger", "QLinearConvTranspose", "DynamicQuantizeMatMul")


def session(path: str, optimized_path: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def optimized_op_counts(path: str) -> Counter:
    """Op types of the graph ORT actually executes after its optimizations."""
    with tempfile.TemporaryDirectory(prefix="msq-verify-") as folder:
        optimized = os.path.join(folder, "optimized.onnx")
        session(path, optimized)
        model = onnx.load(optimized, load_external_data=False)
    return Counter(node.op_type for node in model.graph.node)


def fused_integer_kernels(counts: Counter) -> int:
    return sum(counts[op] for op in FUSED_INTEGER_OPS)


def predictions(path: str, loaded, samples, batch_size: int, quiet: bool, description: str) -> np.ndarray:
    """Top-1 class of each sample (argmax over the flattened class-score output)."""
    runner = session(path)
    output = loaded.output_name
    chunks = []
    with progress(samples.count, description, quiet) as bar:
        for feed, count in padded_batches(samples, loaded, batch_size):
            try:
                result = runner.run([output], feed)[0][:count]
            except Exception as exc:
                raise BadData(f"the model cannot run on '{samples.source}' ({one_line(exc)}); check the data's shape "
                              "and dtype against the model's input.") from None
            if not np.isfinite(result).all():
                raise BadData(f"{description}: the model produces NaN or Inf on '{samples.source}'; check the "
                              "samples' scale and preprocessing (--mean, --std).")
            chunks.append(result.reshape(count, -1).argmax(axis=1))
            bar.update(count)
    return np.concatenate(chunks)


def smoke_check(path: str, loaded, samples, batch_size: int) -> None:
    """The written model loads with full optimizations and gives finite outputs."""
    runner = session(path)
    feed, _ = next(padded_batches(samples, loaded, batch_size))
    for output in runner.run(None, feed):
        if np.issubdtype(output.dtype, np.floating) and not np.isfinite(output).all():
            raise RuntimeError("the quantized model produced NaN or Inf on calibration data")


def top1(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float((predicted == labels).mean() * 100.0)


def flips(fp32: np.ndarray, quant: np.ndarray, labels: np.ndarray | None) -> dict:
    """Predictions that changed: the noise floor for comparing two models on one set."""
    changed = fp32 != quant
    result = {"changed": int(changed.sum())}
    if labels is not None:
        result["fixed"] = int((changed & (quant == labels)).sum())
        result["broken"] = int((changed & (fp32 == labels)).sum())
    return result

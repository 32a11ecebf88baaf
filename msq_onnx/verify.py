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

from .instrument import padded_batches, progress

# Kernels that compute on the quantized weights (MatMulNBits: packed int2/int4/int8 weights).
FUSED_INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger",
                     "MatMulInteger", "QLinearConvTranspose", "DynamicQuantizeMatMul", "MatMulNBits",
                     "GatherBlockQuantized")


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


def smoke_check(path: str, loaded, samples, batch_size: int) -> None:
    """The written model loads with full optimizations and gives finite outputs."""
    runner = session(path)
    feed, _ = next(padded_batches(samples, loaded, batch_size))
    for output in runner.run(None, feed):
        if np.issubdtype(output.dtype, np.floating) and not np.isfinite(output).all():
            raise RuntimeError("the quantized model produced NaN or Inf on calibration data")

"""Stage: each layer's activation mode, chosen from measured damage.

Static uint8 activations are the fastest mode on CPU and harmless on ReLU
CNNs, but they wreck models whose activations have outliers (LayerNorm,
GELU, attention: MiniLM-L6 falls from 69.8% to 50%). So nothing is assumed:
one short pass over calibration samples runs, beside every layer, copies of
it whose input goes through each mode's quantizer (static: our calibrated
range, also quantizing the output as ORT does; dynamic: a per-tensor range
per batch, as DynamicQuantizeLinear computes it) and measures the relative
output error of each. The fastest mode whose error is below the tolerance
wins; weight-only (float activations) is the fallback that never loses
accuracy to activations. Weights stay FP32 in this pass: their error is
measured separately, per width, for the allocator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import BadModel, one_line
from .instrument import make_session, padded_batches, progress
from .ops import DYNAMIC, FLOAT, STATIC, WEIGHT_ONLY

# Relative output MSE a layer may take from its activation quantization: 30 dB
# SQNR. ReLU-CNN layers measure 1e-5..1e-3 with static uint8 (EfficientNet-Lite0,
# the digits CNN), the layers that break transformers 1e-2 and more.
TOLERANCE = 1e-3
DEFAULT_SAMPLES = 32


@dataclass
class ModeChoice:
    mode: str
    errors: dict  # mode -> measured relative output error of the layer with its input in that mode
    reason: str


def uint8_quantization(low: float, high: float) -> tuple[float, int]:
    """Scale and zero point of ORT's asymmetric uint8 range (which always holds 0)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0 if high > low else 1.0
    return scale, int(np.clip(round(-low / scale), 0, 255))


def build_measurement(loaded, ranges: dict) -> tuple[onnx.ModelProto, dict]:
    """The FP32 model plus, per layer and mode, a quantized-input copy of the layer and its error sums."""
    model = onnx.ModelProto()
    model.CopyFrom(loaded.model)
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    outputs: dict = {}
    extra_nodes, extra_inits = [], []

    def qdq(tensor: str, value_range, prefix: str) -> str:
        scale, zero = uint8_quantization(*value_range)
        extra_inits.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{prefix}_s"),
                            numpy_helper.from_array(np.array(zero, np.uint8), f"{prefix}_z")])
        extra_nodes.append(helper.make_node("QuantizeLinear", [tensor, f"{prefix}_s", f"{prefix}_z"], [f"{prefix}_q"]))
        extra_nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}_q", f"{prefix}_s", f"{prefix}_z"],
                                            [f"{prefix}_dq"]))
        return f"{prefix}_dq"

    for index, layer in enumerate(loaded.layers):
        node = nodes[layer.name]
        reference = node.output[0]
        signal = f"msq_m{index}_signal"
        extra_nodes.append(helper.make_node("ReduceSumSquare", [reference], [signal], keepdims=0))
        outputs[layer.name] = {"signal": signal}
        for mode in layer.kind.modes:
            prefix = f"msq_m{index}_{mode.replace('-', '_')}"
            if mode == STATIC:
                quantized_input = qdq(node.input[0], ranges.get(node.input[0], (0.0, 0.0)), prefix + "_in")
            elif mode == DYNAMIC:
                extra_nodes.append(helper.make_node("DynamicQuantizeLinear", [node.input[0]],
                                                    [f"{prefix}_q", f"{prefix}_s", f"{prefix}_z"]))
                extra_nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}_q", f"{prefix}_s", f"{prefix}_z"],
                                                    [f"{prefix}_dq"]))
                quantized_input = f"{prefix}_dq"
            else:
                continue  # weight-only keeps float activations: no activation error to measure
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{prefix}_node"
            copy.input[0] = quantized_input
            del copy.output[1:]
            copy.output[0] = f"{prefix}_y"
            extra_nodes.append(copy)
            result = copy.output[0]
            if mode == STATIC:  # ORT's static QDQ also quantizes the layer's output
                result = qdq(result, ranges.get(reference, (0.0, 0.0)), prefix + "_out")
            extra_nodes.append(helper.make_node("Sub", [result, reference], [f"{prefix}_d"]))
            extra_nodes.append(helper.make_node("ReduceSumSquare", [f"{prefix}_d"], [f"{prefix}_e"], keepdims=0))
            outputs[layer.name][mode] = f"{prefix}_e"
    graph.node.extend(extra_nodes)
    graph.initializer.extend(extra_inits)
    exposed = {o.name for o in graph.output}
    for names in outputs.values():
        for name in names.values():
            if name not in exposed:
                graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, []))
                exposed.add(name)
    return model, outputs


def measure(loaded, samples, ranges: dict, count: int = DEFAULT_SAMPLES, batch_size: int = 1,
            quiet: bool = False) -> dict:
    """{layer: {mode: relative output error}} over the first `count` samples."""
    model, outputs = build_measurement(loaded, ranges)
    try:
        session = make_session(model)
    except Exception as exc:
        raise BadModel(f"ONNX Runtime cannot run the activation-mode measurement ({one_line(exc)}); "
                       "re-export the model with standard ONNX ops.") from None
    wanted = sorted({name for table in outputs.values() for name in table.values()})
    sums = dict.fromkeys(wanted, 0.0)
    seen = 0
    with progress(min(count, samples.count), "activation modes", quiet) as bar:
        for feed, real in padded_batches(samples, loaded, batch_size):
            result = session.run(wanted, feed)
            for name, value in zip(wanted, result):
                sums[name] += float(value)
            seen += real
            bar.update(real)
            if seen >= count:
                break
    errors = {}
    for layer, table in outputs.items():
        signal = max(sums[table["signal"]], 1e-30)
        errors[layer] = {mode: sums[name] / signal for mode, name in table.items() if mode != "signal"}
        errors[layer][WEIGHT_ONLY] = 0.0
    return errors


def choose(loaded, errors: dict, tolerance: float = TOLERANCE, forced: str | None = None) -> dict:
    """Per layer: the fastest allowed mode whose measured error is within tolerance."""
    choices = {}
    for layer in loaded.layers:
        measured = errors.get(layer.name, {})
        allowed = layer.kind.modes
        if forced is not None:
            mode = forced if forced in allowed or forced == FLOAT else allowed[-1]
            reason = f"--activations {forced}" if mode == forced else f"{forced} not available for {layer.op_type}"
            choices[layer.name] = ModeChoice(mode, measured, reason)
            continue
        for mode in allowed:
            error = measured.get(mode, 0.0)
            if error <= tolerance:
                faster = [f"{m} {measured[m]:.2g}" for m in allowed[:allowed.index(mode)] if m in measured]
                reason = (f"fastest mode; output error {error:.2g} <= {tolerance:g}" if not faster else
                          f"output error {error:.2g} <= {tolerance:g}; faster modes too lossy ({', '.join(faster)})")
                choices[layer.name] = ModeChoice(mode, measured, reason)
                break
    return choices

"""The measured alternative to MSQ importance: per-layer output sensitivity.

For every layer and candidate width, only that layer's weight is quantized
(everything else FP32) and the change of the model's output on a few
calibration samples is measured, as Qualcomm AIMET's automatic mixed
precision does. It is usually a strong signal but costs one forward pass per
layer, width and sample, which is what MSQ's single pass avoids. Used by
``--allocator sensitivity`` and by the benchmark.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .instrument import make_session, padded_batches, progress
from .load import LoadedModel
from .weights import quantize_layer

DEFAULT_SAMPLES = 64


def _with_weight_inputs(loaded: LoadedModel, layer) -> onnx.ModelProto:
    """The FP32 model with this layer's weight (and bias) fed as inputs instead of initializers."""
    model = onnx.ModelProto()
    model.CopyFrom(loaded.model)
    fed = [layer.weight_name] + ([layer.bias_name] if layer.bias_name else [])
    kept = [t for t in model.graph.initializer if t.name not in fed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for name in fed:
        tensor = loaded.initializers[name]
        model.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    return model


def _feeds(loaded: LoadedModel, samples, count: int, batch_size: int) -> list[tuple[dict, int]]:
    feeds, total = [], 0
    for feed, real in padded_batches(samples, loaded, batch_size):
        feeds.append((feed, real))
        total += real
        if total >= count:
            break
    return feeds


def _relative_error(reference: list, outputs: list) -> float:
    signal = sum(float((r.astype(np.float64) ** 2).sum()) for r in reference)
    noise = sum(float(((o.astype(np.float64) - r) ** 2).sum()) for o, r in zip(outputs, reference))
    return noise / max(signal, 1e-30)


def measure(loaded: LoadedModel, samples, choices: dict, input_mean: dict, candidate_bits,
            count: int = DEFAULT_SAMPLES, batch_size: int = 16, bias_correction: bool = True,
            quiet: bool = False) -> tuple[dict, int]:
    """Return ({layer: {bits: relative output MSE}}, forward passes run)."""
    feeds = _feeds(loaded, samples, count, batch_size)
    reference_session = make_session(loaded.model)
    output = loaded.output_name
    reference = [reference_session.run([output], feed)[0][:real] for feed, real in feeds]
    damage, passes = {}, 0
    with progress(len(loaded.layers) * len(candidate_bits), "sensitivity", quiet) as bar:
        for layer in loaded.layers:
            session = make_session(_with_weight_inputs(loaded, layer))
            weight = loaded.weight(layer).astype(np.float32)
            bias = loaded.bias(layer)
            damage[layer.name] = {}
            for bits in candidate_bits:
                result = quantize_layer(layer, weight, bias, choices[layer.name][bits], input_mean.get(layer.name),
                                        bias_correction)
                extra = {layer.weight_name: result.weight}
                if bias is not None:
                    extra[layer.bias_name] = result.bias if result.bias is not None else bias
                outputs = [session.run([output], dict(feed, **extra))[0][:real] for feed, real in feeds]
                passes += sum(real for _, real in feeds)
                damage[layer.name][bits] = _relative_error(reference, outputs)
                bar.update(1)
    return damage, passes


def monotone(damage: dict) -> dict:
    """Wider never hurts more than narrower: removes measurement noise at the wide end."""
    result = {}
    for name, table in damage.items():
        widths = sorted(table)
        values = [table[b] for b in widths]
        for i in range(len(values) - 2, -1, -1):
            values[i] = max(values[i], values[i + 1])
        result[name] = dict(zip(widths, values))
    return result


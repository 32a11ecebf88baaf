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

from .fidelity import padded_alike
from .instrument import make_session, padded_batches, progress
from .load import LoadedModel
from .weights import quantize_layer

DEFAULT_SAMPLES = 64


def _with_weight_inputs(loaded: LoadedModel, layer) -> onnx.ModelProto:
    """The FP32 model with this layer's weight (and bias) fed as inputs instead of initializers."""
    model = loaded.judged_out(loaded.session_copy())
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
    batch_size = 1 if loaded.judged_by_run else batch_size  # LoadedModel.judged_samples
    for feed, real in padded_batches(samples, loaded, batch_size):
        feeds.append((feed, real))
        total += real
        if total >= count:
            break
    return feeds


def _relative_error(reference: list, outputs: list) -> float:
    # a selection's kept rows, judged as they are where the selection decides on no tensor of the graph's own
    pairs = [padded_alike(r, o) for r, o in zip(reference, outputs)]
    reference, outputs = [r for r, _ in pairs], [o for _, o in pairs]
    signal = sum(float((r.astype(np.float64) ** 2).sum()) for r in reference)
    noise = sum(float(((o.astype(np.float64) - r) ** 2).sum()) for o, r in zip(outputs, reference))
    return noise / max(signal, 1e-30)


def _with_layer_quantized(loaded, session, layer, weight, bias, choice, input_mean, bias_correction: bool, feeds,
                          output: str) -> list:
    """The task output per batch, with this layer's weight (and corrected bias) quantized as `choice` says."""
    result = quantize_layer(layer, weight, bias, choice, input_mean, bias_correction)
    extra = {layer.weight_name: result.weight}
    if bias is not None:
        extra[layer.bias_name] = result.bias if result.bias is not None else bias
    return [loaded.judged_samples(session.run([output], dict(feed, **extra))[0], real) for feed, real in feeds]


def measure(loaded: LoadedModel, samples, choices: dict, input_mean: dict, candidate_bits,
            count: int = DEFAULT_SAMPLES, batch_size: int = 16, bias_correction: bool = True,
            quiet: bool = False) -> tuple[dict, int]:
    """Return ({layer: {bits: relative output MSE}}, forward passes run)."""
    feeds = _feeds(loaded, samples, count, batch_size)
    reference_session = make_session(loaded.judged_out(loaded.session_copy()), weights=loaded.weights_folder)
    output = loaded.judged
    reference = [loaded.judged_samples(reference_session.run([output], feed)[0], real) for feed, real in feeds]
    damage, passes = {}, 0
    # a layer's table holds only the widths its budget can reach (allocate.reachable_widths)
    widths_of = {layer.name: [b for b in candidate_bits if b in choices[layer.name]] for layer in loaded.layers}
    with progress(sum(map(len, widths_of.values())), "sensitivity", quiet) as bar:
        for layer in loaded.layers:
            session = make_session(_with_weight_inputs(loaded, layer), weights=loaded.weights_folder)
            weight = loaded.weight(layer).astype(np.float32)
            bias = loaded.bias(layer)
            damage[layer.name] = {}
            for bits in widths_of[layer.name]:
                outputs = _with_layer_quantized(loaded, session, layer, weight, bias, choices[layer.name][bits],
                                                input_mean.get(layer.name), bias_correction, feeds, output)
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


def _predictor(reference: np.ndarray, labels: np.ndarray):
    """The task predictor MSQ imprints on the FP32 output: cosine to centered class means. Returns a scorer
    of output embeddings against the classes their FP32 twins are predicted as: its soft score (mean
    softmax probability of that class, the imprinting paper's scale) is the predictor's agreement."""
    from .imprint import SOFT_SCALE, normalize_rows

    center = reference.mean(axis=0)
    features = normalize_rows(reference - center)
    classes = int(labels.max()) + 1
    sums = np.zeros((classes, features.shape[1]))
    np.add.at(sums, labels, features)
    means = normalize_rows(sums)

    def soft_score(embeddings: np.ndarray, predicted: np.ndarray) -> float:
        logits = SOFT_SCALE * (normalize_rows(embeddings - center) @ means.T)
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return float(probabilities[np.arange(len(embeddings)), predicted].mean())

    def predict(embeddings: np.ndarray) -> np.ndarray:
        return (normalize_rows(embeddings - center) @ means.T).argmax(axis=1)

    return soft_score, predict


TASK_FLOOR = 1e-4  # a drop below this (about the soft score's noise on 64 samples) counts as this


def task_weights(loaded: LoadedModel, samples, choices: dict, input_mean: dict, reference: np.ndarray,
                 labels: np.ndarray, width: int, max_dim: int, seed: int = 0, count: int = DEFAULT_SAMPLES,
                 batch_size: int = 16, bias_correction: bool = True, quiet: bool = False) -> tuple[dict, dict]:
    """Per layer, how much the task predictor loses per unit of the layer's error: the drop of its soft
    score when that layer alone is quantized at `width` (everything else FP32, `count` samples), over the
    layer's relative output error at that width. One forward pass per layer and sample instead of one per
    width: MSQ's predictor, measured after quantizing the layer, weighs the error the knapsack reads.
    Returns ({layer: weight}, {layer: soft-score drop})."""
    from .instrument import output_embedding, stacked_outputs

    feeds = _feeds(loaded, samples, count, batch_size)
    output = loaded.judged
    fp32_session = make_session(loaded.judged_out(loaded.session_copy()), weights=loaded.weights_folder)
    fp32 = stacked_outputs([output_embedding(loaded.judged_samples(fp32_session.run([output], feed)[0], real),
                                             max_dim, seed)
                            for feed, real in feeds], max_dim, seed)
    del fp32_session
    soft_score, predict = _predictor(reference, labels)
    predicted = predict(fp32)
    baseline = soft_score(fp32, predicted)
    weights, drops = {}, {}
    with progress(len(loaded.layers), "task predictor per layer", quiet) as bar:
        for layer in loaded.layers:
            session = make_session(_with_weight_inputs(loaded, layer), weights=loaded.weights_folder)
            outputs = _with_layer_quantized(loaded, session, layer, loaded.weight(layer).astype(np.float32),
                                            loaded.bias(layer), choices[layer.name][width],
                                            input_mean.get(layer.name), bias_correction, feeds, output)
            quantized = stacked_outputs([output_embedding(o, max_dim, seed) for o in outputs], max_dim, seed)
            drops[layer.name] = baseline - soft_score(quantized, predicted)
            weights[layer.name] = max(drops[layer.name], TASK_FLOOR) / max(choices[layer.name][width].error, 1e-12)
            bar.update(1)
    return weights, drops

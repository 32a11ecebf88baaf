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

from .fidelity import ChannelSums, padded_alike
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


def _quantized_inputs(layer, weight, bias, choice, input_mean, bias_correction: bool) -> dict:
    """The feeds of _with_weight_inputs' model that quantize this layer as `choice` says (its bias corrected)."""
    result = quantize_layer(layer, weight, bias, choice, input_mean, bias_correction)
    extra = {layer.weight_name: result.weight}
    if bias is not None:
        extra[layer.bias_name] = result.bias if result.bias is not None else bias
    return extra


def _with_layer_quantized(loaded, session, layer, weight, bias, choice, input_mean, bias_correction: bool, feeds,
                          output: str) -> list:
    """The task output per batch, with this layer's weight (and corrected bias) quantized as `choice` says."""
    extra = _quantized_inputs(layer, weight, bias, choice, input_mean, bias_correction)
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


class OutputErrors:
    """Every float output's distance from FP32 over a set of runs, judged as the held-out check judges them: an
    output with a channel axis per live channel (fidelity.ChannelSums: a detector's class row beside its boxes in
    pixels), another as a whole; each relative to its own FP32 energy, so that a channel a whole-output error
    would drown counts as much as the largest (ddddocr's detector at 3.5 bits: one channel off by 0.42 under a
    whole-output cosine of 0.9996)."""

    def __init__(self):
        self.channels: dict = {}  # output -> fidelity.ChannelSums
        self.whole: dict = {}  # output -> [FP32 energy, noise energy]

    def add(self, name: str, reference: np.ndarray, quantized: np.ndarray) -> None:
        if not np.issubdtype(reference.dtype, np.floating):
            return  # labels and counts: a relative error of ids means nothing
        reference, quantized = padded_alike(reference, quantized)
        if reference.ndim >= 3:
            self.channels.setdefault(name, ChannelSums()).add(reference, quantized)
        x, y = reference.astype(np.float64), quantized.astype(np.float64)
        sums = self.whole.setdefault(name, [0.0, 0.0])
        sums[0] += float((x * x).sum())
        sums[1] += float(((y - x) ** 2).sum())

    def per_output(self) -> list[np.ndarray]:
        """Per output, its live channels' relative errors, or its whole one. An output FP32 left at zero on these
        samples (an NMS that kept nothing) has no error relative to anything: it is left out, where its noise over
        a floor would have outweighed every other output by thirty orders (a review's)."""
        errors = []
        for name, (signal, noise) in self.whole.items():
            if signal <= 0.0:
                continue
            channels = self.channels[name].relative_errors() if name in self.channels else None
            errors.append(channels if channels is not None else np.array([noise / max(signal, 1e-30)]))
        return errors

    def mean(self) -> float:
        """The mean over outputs of each one's mean error: every output counts alike, whatever its size."""
        errors = self.per_output()
        return float(np.mean([e.mean() for e in errors])) if errors else 0.0


# Samples the probe runs, one pass per layer and sample: as many as keep the passes near PROBE_PASSES, within
# these bounds (a count, not a time, so that a conversion stays deterministic). PicoDet's 102 layers at 800 x 608
# took 8 minutes at 32 samples.
PROBE_SAMPLES = 32
PROBE_FEWEST = 8
PROBE_PASSES = 768
PROBE_BYTES = 256 * 1024**2  # FP32 outputs kept for the probe's comparisons, at most


def probe_samples(layers: int) -> int:
    """How many samples OutputProbe runs for a model of this many layers."""
    return max(PROBE_FEWEST, min(PROBE_SAMPLES, PROBE_PASSES // max(layers, 1)))


class OutputProbe:
    """The FP32 outputs of a few calibration samples, run one at a time (no padding, no batch axis to find: every
    output is compared as the run gave it), kept to judge the model with one layer quantized alone against."""

    def __init__(self, loaded: LoadedModel, samples, count: int | None = None):
        self.loaded = loaded
        if count is None:
            count = probe_samples(len(loaded.layers))
        model = loaded.judged_out(loaded.session_copy())
        self.names = [value.name for value in model.graph.output]
        session = make_session(model, weights=loaded.weights_folder)
        self.feeds, self.reference, held = [], [], 0
        for feed, _ in padded_batches(samples, loaded, 1):
            outputs = session.run(self.names, feed)
            self.feeds.append(feed)
            self.reference.append(outputs)
            held += sum(np.asarray(o).nbytes for o in outputs)
            if len(self.feeds) >= count or held * (len(self.feeds) + 1) > PROBE_BYTES * len(self.feeds):
                break

    def errors(self, session, extra: dict) -> OutputErrors:
        errors = OutputErrors()
        for feed, reference in zip(self.feeds, self.reference):
            for name, ref, out in zip(self.names, reference, session.run(self.names, dict(feed, **extra))):
                errors.add(name, np.asarray(ref), np.asarray(out))
        return errors

    def layer_weights(self, choices: dict, input_mean: dict, bias_correction: bool = True,
                      quiet: bool = False) -> tuple[dict, dict]:
        """Per layer, how far the outputs move per unit of the layer's own error: OutputErrors.mean with that
        layer alone quantized at its narrowest width (everything else FP32), over the layer's relative output
        error there. One forward pass per layer and sample, as msq-task's; where MSQ's importance weighs a layer
        by its features' predictor, this weighs it by what the held-out check sees of it.
        Returns ({layer: weight}, {layer: the outputs' error})."""
        weights, moved = {}, {}
        with progress(len(self.loaded.layers), "each layer's effect on the outputs", quiet) as bar:
            for layer in self.loaded.layers:
                width = min(choices[layer.name])
                session = make_session(_with_weight_inputs(self.loaded, layer), weights=self.loaded.weights_folder)
                extra = _quantized_inputs(layer, self.loaded.weight(layer).astype(np.float32), self.loaded.bias(layer),
                                          choices[layer.name][width], input_mean.get(layer.name), bias_correction)
                moved[layer.name] = self.errors(session, extra).mean()
                weights[layer.name] = max(moved[layer.name], 1e-12) / max(choices[layer.name][width].error, 1e-12)
                bar.update(1)
        return weights, moved

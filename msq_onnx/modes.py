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

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import BadModel, one_line
from .fidelity import LIVE_CHANNEL, ChannelSums, output_masks, padded_alike
from .instrument import static_shapes, make_session, ordered_runs, padded_batches, progress, run_threads
from .latency import TIE, mode_costs, mode_order
from .ops import DYNAMIC, FLOAT, STATIC, WEIGHT_ONLY, range_sources

# Relative output MSE a layer may take from its activation quantization: 30 dB
# SQNR. ReLU-CNN layers measure 1e-5..1e-3 with static uint8 (EfficientNet-Lite0,
# the digits CNN), the layers that break transformers 1e-2 and more.
TOLERANCE = 1e-2
# Relative error of the task output with every layer's activations quantized
# as chosen (weights in FP32) that the modes may add up to.
END_TO_END_TOLERANCE = 1e-2
# The likeness to FP32 (fidelity.ChannelSums.weakest: its cosine, or what noise alone would leave of one at its
# relative error) every live channel of the task output keeps with the activations quantized, where its channels are
# judged: the whole output's relative error is its largest channels', and a detector's boxes in pixels hid its class
# scores (YOLOv8n, all static: whole 7e-4, a class at a cosine of 0.46, held out 0.78 after the weights; 6 detections
# over 0.25 became 2). 0.99 is a relative error of 0.02: the whole output's 1e-2, twice over for a noisier channel.
# Not by cosine alone: 36 layers left static kept every class at 0.99 and more, and shrank one's scores to 0.86x.
CHANNEL_LIKENESS = 0.99
MAX_DEMOTION_ROUNDS = 8
DEFAULT_SAMPLES = 32
# Fewer samples do when every layer's error is a sum over this many output values (real rows x output channels
# for token layers, else the output's static size): a convolution's map or a token sequence gives that in one
# sample, a 1000-class head in 9, a 2-class head keeps the 32 samples. EfficientNet-Lite0 on 9 samples instead of
# 32: every layer's static error within 1.25x, the same modes, the output byte-identical, the stage 1.76 -> 0.6 s.
ENOUGH_VALUES = 8192
# The floor where every layer has values enough in fewer: 4 instead of 8 wrote every model of bench/architectures.py (51
# conversions), bench/transformers_models.py (64: token sequences of 6-32 real tokens, where the floor binds),
# bench/unseen_models.py and MiniLM-L6 byte-identical or with the same scores; MiniLM-L6's modes stage 1.2 -> 0.8 s.
MIN_SAMPLES = 4
BLOCK_ACTIVATION = 32  # the block ORT's DQ -> MatMul to MatMulNBits fusion uses


def quantizes_activations(layer, mode: str) -> bool:
    """Static and dynamic do; so does weight-only on a dense layer (MatMulNBits at accuracy level 4), when its
    rows split into whole blocks; a weight-only Conv and a float layer see float inputs."""
    if mode in (STATIC, DYNAMIC):
        return True
    return mode == WEIGHT_ONLY and layer.kind.matmul_product and layer.fan_in % BLOCK_ACTIVATION == 0


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


class _Quantizers:
    """Adds the nodes that put a tensor through a mode's activation quantizer (as ORT will run it)."""

    def __init__(self, ranges: dict, model: onnx.ModelProto):
        self.ranges, self.nodes, self.inits = ranges, [], []
        self.output_ranges = range_sources(model)
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

    def static(self, tensor: str, range_of: str, prefix: str) -> str:
        scale, zero = uint8_quantization(*self.ranges.get(range_of, (0.0, 0.0)))
        self.inits.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{prefix}_s"),
                           numpy_helper.from_array(np.array(zero, np.uint8), f"{prefix}_z")])
        self.nodes.append(helper.make_node("QuantizeLinear", [tensor, f"{prefix}_s", f"{prefix}_z"], [f"{prefix}_q"]))
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}_q", f"{prefix}_s", f"{prefix}_z"],
                                           [f"{prefix}_dq"]))
        return f"{prefix}_dq"

    def dynamic(self, tensor: str, prefix: str) -> str:
        self.nodes.append(helper.make_node("DynamicQuantizeLinear", [tensor],
                                           [f"{prefix}_q", f"{prefix}_s", f"{prefix}_z"]))
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}_q", f"{prefix}_s", f"{prefix}_z"],
                                           [f"{prefix}_dq"]))
        return f"{prefix}_dq"

    def blockwise(self, tensor: str, fan_in: int, prefix: str) -> str:
        """What MatMulNBits does to its input at accuracy level 4 (the level ORT gives a DQ -> MatMul it fuses):
        symmetric int8 per block of 32 along K, for each row."""
        block = BLOCK_ACTIVATION
        shape, absolute, peak = f"{prefix}_shape", f"{prefix}_abs", f"{prefix}_peak"
        self.inits += [numpy_helper.from_array(np.array([-1, fan_in // block, block], np.int64), f"{prefix}_blocks"),
                       numpy_helper.from_array(np.array(127.0, np.float32), f"{prefix}_127"),
                       numpy_helper.from_array(np.array(1e-30, np.float32), f"{prefix}_tiny")]
        reduce_max = (helper.make_node("ReduceMax", [absolute], [peak], axes=[-1], keepdims=1) if self.opset < 18
                      else helper.make_node("ReduceMax", [absolute, self._axes()], [peak], keepdims=1))
        self.nodes += [
            helper.make_node("Shape", [tensor], [shape]),
            helper.make_node("Reshape", [tensor, f"{prefix}_blocks"], [f"{prefix}_x"]),
            helper.make_node("Abs", [f"{prefix}_x"], [absolute]),
            reduce_max,
            helper.make_node("Div", [peak, f"{prefix}_127"], [f"{prefix}_s0"]),
            helper.make_node("Max", [f"{prefix}_s0", f"{prefix}_tiny"], [f"{prefix}_s"]),
            helper.make_node("Div", [f"{prefix}_x", f"{prefix}_s"], [f"{prefix}_r"]),
            helper.make_node("Round", [f"{prefix}_r"], [f"{prefix}_q"]),
            helper.make_node("Mul", [f"{prefix}_q", f"{prefix}_s"], [f"{prefix}_y"]),
            helper.make_node("Reshape", [f"{prefix}_y", shape], [f"{prefix}_dq"])]
        return f"{prefix}_dq"

    def _axes(self, axes: tuple = (-1,)) -> str:
        name = "msq_axes_" + "_".join(str(a).replace("-", "m") for a in axes)
        if not any(t.name == name for t in self.inits):
            self.inits.append(numpy_helper.from_array(np.array(axes, np.int64), name))
        return name

    def sum_squares(self, tensor: str, output: str, axes: tuple | None = None) -> str:
        """ReduceSumSquare of tensor to a scalar, or over `axes` (a vector per the axis left)."""
        if axes is None:
            self.nodes.append(helper.make_node("ReduceSumSquare", [tensor], [output], keepdims=0))
        elif self.opset < 18:
            self.nodes.append(helper.make_node("ReduceSumSquare", [tensor], [output], axes=list(axes), keepdims=0))
        else:
            self.nodes.append(helper.make_node("ReduceSumSquare", [tensor, self._axes(axes)], [output], keepdims=0))
        return output

    def apply(self, node, mode: str, prefix: str, output: str, fan_in: int = 0) -> str:
        """Quantize node's input (and, static, its result) into a copy whose final tensor is `output`."""
        source = node.input[0]
        if mode == STATIC:
            quantized = self.static(source, source, prefix + "_in")
        elif mode == DYNAMIC:
            quantized = self.dynamic(source, prefix)
        else:
            quantized = self.blockwise(source, fan_in, prefix)
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}_node"
        copy.input[0] = quantized
        del copy.output[1:]
        if mode == STATIC:  # ORT's static QDQ also quantizes the layer's output, on the output's range
            copy.output[0] = f"{prefix}_y"
            self.nodes.append(copy)
            range_of = self.output_ranges.get(node.output[0], node.output[0])
            self.nodes.append(helper.make_node("Identity", [self.static(copy.output[0], range_of, prefix + "_out")],
                                               [output]))
        else:
            copy.output[0] = output
            self.nodes.append(copy)
        return output


def _expose(graph, names) -> None:
    exposed = {o.name for o in graph.output}
    for name in names:
        if name not in exposed:
            graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, []))
            exposed.add(name)


def dominated(layer, costs: dict, absorbed: bool = False) -> set:
    """The modes choose never takes for a layer, which are not measured: static where dynamic comes before it in
    the layer's order (faster than static by more than a tie). Dynamic quantizes each run's input on that run's own
    range, which the calibrated static range holds (the measured samples are calibration samples), and leaves the
    output float, where static quantizes both: a static slower than dynamic loses to it on time and does not gain
    on error (MiniLM-L6's 30 such layers: static 1.35-5.5x dynamic's error, 0.00045-0.0037). Its copy in the
    measurement is a layer's product run again for nothing. Not where a Relu or Clip absorbs the layer's output
    (`absorbed`): static's error is then measured on the activation's output, another signal than dynamic's."""
    order = mode_order(layer, costs)
    if not absorbed and DYNAMIC in order and STATIC in order and order.index(DYNAMIC) < order.index(STATIC):
        return {STATIC}
    return set()


def dominated_modes(loaded, costs: dict) -> dict:
    """layer -> its dominated modes (`costs`: layer -> {mode: cost})."""
    sources = range_sources(loaded.model)
    return {layer.name: _dominated_here(layer, costs[layer.name], sources) for layer in loaded.layers}


def _dominated_here(layer, costs: dict, sources: dict) -> set:
    return dominated(layer, costs, sources.get(layer.output_name, layer.output_name) != layer.output_name)


def static_candidates(loaded, rows: dict, forced: str | None = None) -> set:
    """The layers that may end static, whose inputs' and outputs' ranges the pass measures: with a forced mode,
    those that have it if it is static, else none; otherwise those whose static is not dominated at `rows`
    (layer -> rows a sample, instrument.estimated_rows; a layer timed on its rows without an estimate stays).
    MiniLM-L6: 6 of its 39 layers (the FFN-down projections), where the ranges of all were 8% of the pass's time
    (ReduceMin and ReduceMax of 65 tensors a text; 12 now)."""
    static = [layer for layer in loaded.layers if STATIC in layer.kind.modes]
    if forced is not None:
        return {layer.name for layer in static if forced == STATIC}
    sources = range_sources(loaded.model)
    return {layer.name for layer in static if (layer.kind.matmul_product and layer.name not in rows)
            or STATIC not in _dominated_here(layer, mode_costs(layer, rows.get(layer.name)), sources)}


def _all_but_channels(layer, shape) -> tuple:
    """The axes of a layer's output that are not its channel axis (the last for MatMul activations, else 1);
    () where its rank is not known."""
    if not shape or len(shape) < 2:
        return ()
    channel = len(shape) - 1 if layer.kind.channels_last else 1
    return tuple(a for a in range(len(shape)) if a != channel)


def build_measurement(loaded, ranges: dict, skip: dict | None = None) -> tuple[onnx.ModelProto, dict]:
    """The FP32 model plus, per layer and mode, a quantized-input copy of the layer and its error sums, of the
    whole output and (where its rank is known) per output channel; none for the modes in skip[layer] (dominated)."""
    model = loaded.session_copy()
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    quantizers = _Quantizers(ranges, model)
    shapes = static_shapes(model)
    outputs: dict = {}
    signals = {}  # (reference tensor, axes) -> its sums of squares: a layer's modes mostly compare with one output
    for index, layer in enumerate(loaded.layers):
        outputs[layer.name] = {}
        if not any(quantizes_activations(layer, mode) for mode in layer.kind.modes):
            continue  # float activations only (a layer inside a body among them, whose node is not the graph's)
        node = nodes[layer.nodes[0]]
        for mode in layer.kind.modes:
            if not quantizes_activations(layer, mode) or mode in (skip or {}).get(layer.name, ()):
                continue  # float activations: no activation error to measure
            prefix = f"msq_m{index}_{mode.replace('-', '_')}"
            result = quantizers.apply(node, mode, prefix, f"{prefix}_result", layer.fan_in)
            # A static output quantized on its absorbed activation's range is that activation's output.
            reference = quantizers.output_ranges[node.output[0]] if mode == STATIC else node.output[0]
            quantizers.nodes.append(helper.make_node("Sub", [result, reference], [f"{prefix}_d"]))
            names = []
            for axes in (None, _all_but_channels(layer, shapes.get(reference))):
                if axes == ():
                    continue  # no channel axis known: the whole output's error only
                suffix = "" if axes is None else "_c"
                names.append(quantizers.sum_squares(f"{prefix}_d", f"{prefix}_e{suffix}", axes))
                if (reference, axes) not in signals:
                    signals[reference, axes] = quantizers.sum_squares(reference, f"{prefix}_signal{suffix}", axes)
                names.append(signals[reference, axes])
            outputs[layer.name][mode] = tuple(names)
    graph.node.extend(quantizers.nodes)
    graph.initializer.extend(quantizers.inits)
    _expose(graph, [name for table in outputs.values() for pair in table.values() for name in pair])
    return loaded.judged_out(model), outputs


def build_simulation(loaded, ranges: dict, modes: dict) -> onnx.ModelProto:
    """The FP32 model with every layer's activations quantized as its mode runs them (weights FP32)."""
    model = loaded.session_copy()
    graph = model.graph
    quantizers = _Quantizers(ranges, model)
    rebuilt = []
    by_node = {n: layer for layer in loaded.layers for n in layer.nodes}
    for index, node in enumerate(graph.node):
        layer = by_node.get(node.name)
        mode = modes.get(layer.name) if layer is not None else None
        if mode is None or not quantizes_activations(layer, mode):
            rebuilt.append(node)
            continue
        quantizers.nodes = []
        quantizers.apply(node, mode, f"msq_s{index}", node.output[0], layer.fan_in)
        rebuilt.extend(quantizers.nodes)
    del graph.node[:]
    graph.node.extend(rebuilt)
    graph.initializer.extend(quantizers.inits)
    return loaded.judged_out(model)


@dataclass
class Measurement:
    errors: dict  # layer -> {mode: relative output error of the layer alone with its input in that mode}
    feeds: list  # the (feed, real count) batches measured on, kept for the end-to-end check
    reference: list  # the FP32 task output of each batch
    workers: int = 1  # runs at once (instrument.run_workers)
    channel_errors: dict = field(default_factory=dict)  # layer -> {mode: the worst live output channel's error}


def _session(model, workers: int, weights: str | None):
    try:
        # No arena: the stage's peak fell by 17 MB on EfficientNet-Lite0, at no cost in time (measure and the
        # first end-to-end check: 2.37 / 2.28 s with it, 1.97 / 2.08 s without).
        return make_session(model, optimize=False, arena=False, threads=run_threads(workers), weights=weights)
    except Exception as exc:
        raise BadModel(f"ONNX Runtime cannot run the activation-mode measurement ({one_line(exc)}); "
                       "re-export the model with standard ONNX ops.") from None


def measure(loaded, samples, ranges: dict, count: int = DEFAULT_SAMPLES, batch_size: int = 1,
            quiet: bool = False, rows: dict | None = None, workers: int = 1, skip: dict | None = None) -> Measurement:
    """Each layer's error in each mode but those in skip[layer] (dominated), alone, over the first `count` samples,
    or the first MIN_SAMPLES or more once every layer's error sums ENOUGH_VALUES output values (`rows`: layer ->
    rows per sample)."""
    shapes = static_shapes(loaded.model)

    def values(layer) -> int:
        """Output values a sample: rows x output channels where rows are counted (tokens: real ones only, a fixed
        sequence length counts padding too), else the output's static size."""
        channels = layer.weight_shape[layer.out_axis]
        if layer.kind.channels_last and rows and layer.name in rows:
            return int(rows[layer.name] * channels)
        dims = shapes.get(layer.output_name, [])[1:]
        return int(np.prod(dims)) if dims and all(dims) else (rows or {}).get(layer.name, 1) * channels

    # An embedding table's modes leave its input alone: nothing of it to measure.
    measured = [layer for layer in loaded.layers if any(quantizes_activations(layer, m) for m in layer.kind.modes)]
    fewest = min((values(layer) for layer in measured), default=ENOUGH_VALUES)
    count = min(count, max(MIN_SAMPLES, int(np.ceil(ENOUGH_VALUES / max(fewest, 1)))))
    model, outputs = build_measurement(loaded, ranges, skip)
    session = _session(model, workers, loaded.weights_folder)
    wanted = sorted({name for table in outputs.values() for pair in table.values() for name in pair})
    sums = dict.fromkeys(wanted, 0.0)
    feeds, reference = [], []
    fetched = wanted + [loaded.judged]

    def first_batches():  # up to the batch that reaches `count`: no run is started past it
        total = 0
        for feed, real in padded_batches(samples, loaded, batch_size):
            yield feed, real
            total += real
            if total >= count:
                return

    with progress(min(count, samples.count), "activation modes", quiet) as bar:
        for (feed, real), result in ordered_runs(lambda batch: session.run(fetched, batch[0]), first_batches(),
                                                 workers):
            for name, value in zip(wanted, result):
                sums[name] = sums[name] + value.astype(np.float64)  # a scalar, or a vector per channel
            feeds.append((feed, real))
            reference.append(loaded.judged_samples(result[-1], real))
            bar.update(real)
    errors, channel_errors = {}, {}
    for layer, table in outputs.items():
        errors[layer] = {mode: float(sums[names[0]] / max(sums[names[1]], 1e-30)) for mode, names in table.items()}
        errors[layer].setdefault(WEIGHT_ONLY, 0.0)
        errors[layer][FLOAT] = 0.0
        channel_errors[layer] = {mode: _worst_channel(sums[names[2]], sums[names[3]])
                                 for mode, names in table.items() if len(names) == 4}
    return Measurement(errors, feeds, reference, workers, channel_errors)


def _worst_channel(noise: np.ndarray, signal: np.ndarray) -> float:
    """The largest relative error of a live channel: one whose energy reaches LIVE_CHANNEL of the largest's, in
    amplitude (a channel that stays at zero has no error to speak of)."""
    live = signal >= LIVE_CHANNEL ** 2 * float(signal.max()) if signal.size and signal.max() > 0 else []
    return float((noise[live] / signal[live]).max()) if np.any(live) else 0.0


def end_to_end_error(loaded, ranges: dict, modes: dict, measurement: Measurement) -> tuple[float, dict | None]:
    """Relative error of the task output with every layer's activations in its mode: what the layers'
    errors add up to downstream; and its weakest live channel (fidelity.ChannelSums.weakest) where its
    channels are judged, else None."""
    session = _session(build_simulation(loaded, ranges, modes), measurement.workers, loaded.weights_folder)
    signal = noise = 0.0
    # A token output's padded positions are no channel a use sees (the held-out check masks them): not judged here.
    # Nor are a selection's rows, whose count moves from run to run.
    channels = None if loaded.judged in output_masks(loaded) or loaded.judged in loaded.selected else ChannelSums()
    runs = ordered_runs(lambda batch: session.run([loaded.judged], batch[0])[0], measurement.feeds,
                        measurement.workers)
    for ((feed, real), out), fp32 in zip(runs, measurement.reference):
        out = loaded.judged_samples(out, real)
        fp32, out = padded_alike(fp32, out)  # a selection's rows, where it selects from no float tensor
        signal += float((fp32.astype(np.float64) ** 2).sum())
        noise += float(((out.astype(np.float64) - fp32) ** 2).sum())
        if channels is not None and fp32.ndim >= 3 and np.issubdtype(fp32.dtype, np.floating):
            channels.add(fp32, out)
    weakest = channels.weakest() if channels is not None else None
    return noise / max(signal, 1e-30), weakest


def choose(loaded, measurement: Measurement, ranges: dict, costs: dict, tolerance: float = TOLERANCE,
           forced: str | None = None, end_to_end: float = END_TO_END_TOLERANCE,
           skip: dict | None = None, unranged=None, channel_likeness: float = CHANNEL_LIKENESS) -> tuple[dict, list]:
    """Per layer (`costs`: {mode: measured cost}; `skip`: layer -> the modes measure left out, dominated_modes;
    `unranged`: the layers among them whose static is left out only because the pass measured no ranges for it):
    the fastest mode whose own error is within `tolerance`;
    then, while the task output's end-to-end error exceeds `end_to_end` (or a live channel's likeness to FP32,
    fidelity.ChannelSums.weakest, falls under `channel_likeness`), up to a quarter of the layers
    with quantized activations move to their next mode that loses less, lossiest first: the moves that
    cost no time in rounds of their own, before any that does. Returns the choices and the log."""
    errors, channel_errors = measurement.errors, measurement.channel_errors
    # Float is the last resort of a layer no quantized mode keeps faithful alone: it costs its bits (32).
    orders = {layer.name: mode_order(layer, costs[layer.name]) + (FLOAT,) for layer in loaded.layers}
    skipped = skip if forced is None and skip is not None else {}
    # a mode not measured (dominated) is not taken
    orders = {name: tuple(m for m in order if m not in skipped.get(name, ())) for name, order in orders.items()}
    if forced is not None:
        choices = {}
        for layer in loaded.layers:
            mode = forced if forced in orders[layer.name] else WEIGHT_ONLY
            reason = f"--activations {forced}" if mode == forced else f"{forced} not available for {layer.op_type}"
            choices[layer.name] = ModeChoice(mode, errors[layer.name], reason)
        return choices, []
    chosen = {layer.name: next(m for m in orders[layer.name] if errors[layer.name].get(m, 0.0) <= tolerance)
              for layer in loaded.layers}

    def next_mode(name: str) -> str | None:
        # Never into float: a layer there leaves the budget (32 bits), and the move looked free (float runs
        # faster than a weight-only MatMul). A ViT's demotions put three weight-only projections (own error
        # 1.3e-4) and its classifier in float for an end-to-end error of 0.0125 -> 0.0083; --avg-bits 8 then
        # squeezed the rest to 2-3 bits (agreement 78.9%). Float stays where no quantized mode is faithful alone.
        order, current = orders[name], errors[name][chosen[name]]
        return next((m for m in order[order.index(chosen[name]) + 1:]
                     if m != FLOAT and errors[name].get(m, 0.0) < current), None)

    def slowdown(name: str) -> float:
        return costs[name][next_mode(name)] / costs[name][chosen[name]]

    log = []
    for round_ in range(MAX_DEMOTION_ROUNDS + 2):
        error, weakest = end_to_end_error(loaded, ranges, chosen, measurement)
        log.append({"end_to_end_error": float(f"{error:.6g}"),
                    "modes": {m: sum(1 for v in chosen.values() if v == m) for m in (STATIC, DYNAMIC, WEIGHT_ONLY, FLOAT)}})
        if weakest is not None:
            log[-1]["weakest_channel"] = {key: weakest[key] for key in ("index", "cosine", "relative_error", "likeness")}
        faithful = error <= end_to_end and (weakest is None or weakest["likeness"] >= channel_likeness)
        lossy = [name for name in chosen if next_mode(name) is not None]
        if faithful or not lossy or round_ > MAX_DEMOTION_ROUNDS:
            break
        if round_ == MAX_DEMOTION_ROUNDS:
            # The rounds are spent and the output is still over its tolerance: every lossy layer moves at once.
            # PicoDet's layout detector kept 9 of 102 layers static after 8 rounds, end-to-end error 0.098 against
            # 0.01, written cosine 0.949 at 8 bits; with them moved as well, 0.9998.
            for name in lossy:
                chosen[name] = next_mode(name)
            continue
        free = [name for name in lossy if slowdown(name) <= TIE]
        step = free if free else lossy  # a demotion that costs no time goes first, and alone
        # A channel lost under a whole that holds is a layer's channel lost (YOLOv8n: one early convolution's
        # static output, 0.002 over its whole, took a class's scores to 0.39 alone): its worst channel goes first.
        lost = channel_errors if error <= end_to_end else {}
        step.sort(key=lambda name: -lost.get(name, {}).get(chosen[name], errors[name][chosen[name]]))
        for name in step[:max(1, len(lossy) // 4)]:
            chosen[name] = next_mode(name)
    choices = {}
    for layer in loaded.layers:
        measured, mode, order = errors[layer.name], chosen[layer.name], orders[layer.name]
        faster = [f"{m} {measured[m]:.2g}" for m in order[:order.index(mode)] if m in measured]
        reason = (f"fastest mode; output error {measured.get(mode, 0.0):.2g}" if not faster else
                  f"output error {measured.get(mode, 0.0):.2g}; faster modes too lossy alone or downstream "
                  f"({', '.join(faster)})")
        if layer.name in (unranged or ()):
            reason += ("; static not measured (no ranges gathered: slower than dynamic at the rows a sample "
                       "estimated before the pass)")
        elif STATIC in skipped.get(layer.name, ()) and mode != DYNAMIC:
            reason += "; static not measured (slower than dynamic, no less error)"
        choices[layer.name] = ModeChoice(mode, measured, reason)
    return choices, log

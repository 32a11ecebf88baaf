"""Stage 7: write the QDQ model with onnxruntime.quantization.

The weights are first moved onto their k-bit grids (clipped, rounded, bias
corrected) in a private copy of the model; the static layers' int8 weights
are put in it already quantized (integers -> DequantizeLinear), and ORT's QDQ
quantizer then places the activations' Q/DQ nodes and the int32 biases, with
our activation ranges as its calibration cache, so it does not calibrate
again (int4 containers go to it as per-channel TensorQuantOverrides). The
integers use only the k-bit levels, and ORT keeps its fused int8 kernels.
The result is moved into place atomically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import sample_axes
from .errors import BadOption
from .load import (LoadedModel, all_names, consumers, external_data_files, hidden_file_name, is_large, producer_map,
                   save_model_file, subgraph_inputs, unique_name)
from .ops import (CONTAINER_BITS, DYNAMIC, FLOAT_BITS, INT2, INT4, INT8, STATIC, WEIGHT_ONLY, attribute,
                  kind_for, range_sources, shares_quantization, static_region)
from .weights import as_matrix, quantize_layer, steps



@dataclass
class QuantizedWeights:
    model: onnx.ModelProto  # FP32 model whose weights sit on their grids, but those in `integers`: references into
    # the loaded model's weights file until quantize_to_qdq makes it whole (LoadedModel.with_weights); no session
    # nor file takes the model before that
    scales: dict  # weight name -> per-channel scales
    integers: dict = field(default_factory=dict)  # weight name -> int8 [out, fan_in]: a layer rewrite_layers writes


ELSEWHERE = None  # tensor_readers' reader for a graph output or a subgraph (every node has a name: load)


def tensor_readers(model: onnx.ModelProto) -> dict:
    """Tensor -> the names of the nodes that read it, with ELSEWHERE for a graph output or a subgraph."""
    readers = {name: {node.name for node in nodes} for name, nodes in consumers(model.graph).items()}
    for name in subgraph_inputs(model.graph) | {o.name for o in model.graph.output}:
        readers.setdefault(name, set()).add(ELSEWHERE)
    return readers


def taken_names(model: onnx.ModelProto) -> set:
    """Every name a new tensor or node must not take: load.all_names, and node names and value_info too."""
    graph = model.graph
    return all_names(graph) | {v.name for v in graph.value_info} | {n.name for n in graph.node}


def quantize_weights(loaded: LoadedModel, bits: dict, choices: dict, input_mean: dict,
                     bias_correction: bool = True, rewritten=frozenset()) -> QuantizedWeights:
    """Copy of the model with every quantized layer's weight fake-quantized (and its bias corrected). Made from
    session_copy: the float weights the quantized ones replace are never copied (MiniLM-L6: 90 MB).

    rewritten: the layers rewrite_layers will write (dynamic, weight-only). Their integers are kept as rounded, and
    a weight only they read stays in the copy as its reference into the weights file (quantize_to_qdq makes it whole
    with its FP32 values where ORT's quantizer reads the copy for the static layers) instead of fake-quantized
    values that were serialized, read back and rounded again (MiniLM-L6: about 0.1 s of one core)."""
    model = loaded.session_copy()
    index = {t.name: i for i, t in enumerate(model.graph.initializer)}
    nodes = {n.name: n for n in model.graph.node}
    readers = tensor_readers(model)
    taken = taken_names(model)
    scales = {}
    for layer in loaded.layers:
        # left in float; any other width missing from the table is a bug upstream (allocate.reachable_widths)
        assert bits[layer.name] in choices[layer.name] or bits[layer.name] == FLOAT_BITS, (
            layer.name, bits[layer.name], sorted(choices[layer.name]))
    quantized_layers = [layer for layer in loaded.layers if bits[layer.name] in choices[layer.name]]

    kept = {layer.name for layer in quantized_layers if layer.name in rewritten
            and readers.get(layer.weight_name, set()) <= set(layer.nodes)}
    integers = {}

    def rounded(layer):
        result = quantize_layer(layer, loaded.weight(layer).astype(np.float32, copy=False), loaded.bias(layer),
                                choices[layer.name][bits[layer.name]], input_mean.get(layer.name), bias_correction,
                                keep_integers=layer.name in kept)
        if layer.name in kept:
            return result, None
        return result, numpy_helper.from_array(result.weight.astype(np.float32, copy=False), layer.weight_name)

    from .instrument import RUN_WORKERS, one_blas_thread, ordered_runs

    # Two layers round and serialize at once (numpy lets go of the GIL); the copy is edited here, in the layers'
    # order. None waits ahead: each result holds a whole weight twice (MiniLM-L6's embedding table: 2 x 47 MB).
    with one_blas_thread():
        for layer, (result, tensor) in ordered_runs(rounded, quantized_layers, RUN_WORKERS, ahead=0):
            if tensor is None:
                integers[layer.weight_name] = result.integers
            else:
                model.graph.initializer[index[layer.weight_name]].CopyFrom(tensor)
            _set_bias(model, layer, result, index, nodes, readers, taken)
            scales[layer.weight_name] = result.scale
    # A weight kept as integers stays a reference into the weights file: the rewrite replaces its readers and drops
    # it, and only ORT's quantizer, on a model with static layers, reads it (quantize_to_qdq makes it whole there).
    # MiniLM-L6: 90 MB of FP32 copies the write held for nothing.
    return QuantizedWeights(loaded.with_weights(model, leave=set(integers)), scales, integers)


def _set_bias(model: onnx.ModelProto, layer, result, index: dict, nodes: dict, readers: dict, taken: set) -> None:
    """Put one layer's corrected bias into the copy."""
    if result.bias is None:
        return
    if layer.bias_name is not None:
        # A MatMul's bias is the constant of the Add after it; the others' is their own input.
        own = {name for name in readers.get(layer.bias_name, ()) if name in layer.nodes or (
            layer.op_type == "MatMul" and name in nodes and layer.output_name in nodes[name].input)}
        if readers.get(layer.bias_name, set()) <= own:
            model.graph.initializer[index[layer.bias_name]].CopyFrom(
                numpy_helper.from_array(result.bias, layer.bias_name))
            return
        # Something else reads the bias too: the layer's readers get a corrected copy, the others the original.
        name = unique_name(f"{layer.bias_name}_{layer.name}_corrected", taken, "_msq")
        model.graph.initializer.append(numpy_helper.from_array(result.bias, name))
        for reader in own:
            nodes[reader].input[:] = [name if i == layer.bias_name else i for i in nodes[reader].input]
        return
    node = nodes[layer.nodes[0]]  # no bias yet (one computed in the graph has no bias_factor: load.find_layers)
    name = f"{layer.weight_name}_msq_bias"
    model.graph.initializer.append(numpy_helper.from_array(result.bias, name))
    if len(node.input) > 2:
        node.input[2] = name
    else:
        node.input.append(name)  # Conv and Gemm take an optional bias as their third input


def tensor_overrides(layers, scales: dict, wide_tensors=(), containers: dict | None = None) -> dict:
    """Per-channel weight scales in each layer's container, and uint16 for the activation tensors in
    wide_tensors (uint16_tensors)."""
    from onnxruntime.quantization import QuantType

    overrides = {name: [{"quant_type": QuantType.QUInt16}] for name in wide_tensors}
    for layer in layers:
        per_channel = [{"scale": np.float32(s), "zero_point": np.int8(0)} for s in scales[layer.weight_name]]
        four = (containers or {}).get(layer.name) == INT4
        per_channel[0].update({"quant_type": QuantType.QInt4 if four else QuantType.QInt8, "axis": layer.out_axis})
        overrides[layer.weight_name] = per_channel
    return overrides


def own_biases(model: onnx.ModelProto, names: set) -> None:
    """A copy of its constant bias for each Conv / ConvTranspose / Gemm in `names` (the static region) whose bias
    something else also reads, and for a Gemm with beta != 1, beta multiplied in (beta then 1). ORT's QDQ
    quantizer puts its int32 rounding of a bias in front of every reader of that tensor, and it sets a Gemm's
    beta to 1 but keeps the bias as it was (a beta of 0.5 added twice the bias)."""
    inits = {t.name: t for t in model.graph.initializer}
    readers = tensor_readers(model)
    taken = taken_names(model)
    for node in model.graph.node:
        if node.name not in names or node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3 \
                or node.input[2] not in inits:
            continue
        beta = float(attribute(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
        if beta == 1.0 and readers.get(node.input[2]) == {node.name}:
            continue
        original = numpy_helper.to_array(inits[node.input[2]])
        name = unique_name(f"{node.input[2]}_{node.name}", taken, "_msq")
        inits[name] = numpy_helper.from_array(original * original.dtype.type(beta), name)
        model.graph.initializer.append(inits[name])
        node.input[2] = name  # the original stays for its other readers; ORT's quantizer drops it if none is left
        for attr in node.attribute:
            if attr.name == "beta":
                attr.f = 1.0


BIAS_RANGE = float(np.iinfo(np.int32).max) - float(np.iinfo(np.int32).min + 1)  # ORT's int32 bias levels


def data_inputs(layer, nodes: dict) -> list[str]:
    """The activation input of each of the layer's nodes (`nodes`: name -> node): a weight several nodes share
    has one per node."""
    return [nodes[name].input[layer.kind.data_index] for name in layer.nodes if name in nodes]


def _passing_quantization(static_layers, model: onnx.ModelProto) -> set:
    """The nodes of the static region that ORT's quantizer gives their data input's quantization
    (ops.shares_quantization: a Flatten, a MaxPool, a Pad of zeros ...)."""
    region = set(static_region(model, {n for layer in static_layers for n in layer.nodes}))
    pads = {node.input[2] for node in model.graph.node if node.op_type == "Pad" and len(node.input) > 2}
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in pads}
    return {node.name for node in model.graph.node if node.name in region and shares_quantization(node, constants)}


def uint16_widenable(static_layers, model: onnx.ModelProto) -> set:
    """The static layers whose data inputs ORT's quantizer would write as uint16 when asked: not those that come
    through an op of the static region that passes its input's quantization on (_passing_quantization: a
    Flatten or MaxPool after another static layer). Such an input keeps its source's uint8 whatever the override
    says (the bundled digits CNN's fc1), and widening the source would take a second layer off its integer kernel."""
    nodes = {node.name: node for node in model.graph.node}
    passing = _passing_quantization(static_layers, model)
    producers = {out: node.name for node in model.graph.node for out in node.output}
    return {layer.name for layer in static_layers
            if not any(producers.get(t) in passing for t in data_inputs(layer, nodes))}


def uint16_kernels(static_layers, wide_inputs, model: onnx.ModelProto) -> set:
    """The static layers a uint16 tensor (uint16_tensors) takes off ORT's integer kernels: its readers, those
    reading it on through an op that passes its quantization on (a MaxPool, a Flatten: their outputs are
    uint16 too), and the layer whose output it is (directly, or through the Relu/Clip ORT folds into it: a
    QLinearConv writes no uint16). A review's model ran conv1, conv2 and conv3 as float Conv for --act16 1,
    and only conv3 was spared the reduce_range cap."""
    nodes = {node.name: node for node in model.graph.node}
    passing = _passing_quantization(static_layers, model)
    readers: dict = {}
    for node in model.graph.node:
        for name in node.input[:1]:
            readers.setdefault(name, []).append(node)
    wide = set(uint16_tensors(static_layers, wide_inputs, model))
    frontier = list(wide)
    while frontier:
        for node in readers.get(frontier.pop(), []):
            if node.name in passing:
                grown = [out for out in node.output if out and out not in wide]
                wide.update(grown)
                frontier.extend(grown)
    sources = range_sources(model)
    return {layer.name for layer in static_layers
            if any(t in wide for t in data_inputs(layer, nodes))
            or any(sources.get(out, out) in wide for n in layer.nodes if n in nodes for out in nodes[n].output)}


def uint16_tensors(static_layers, wide_inputs, model: onnx.ModelProto) -> set:
    """The activation tensors written as uint16: the data inputs of the static layers in wide_inputs (chosen
    among uint16_widenable). ORT's override is per tensor, so every static reader of one of them gets uint16."""
    nodes = {node.name: node for node in model.graph.node}
    return {name for layer in static_layers if layer.name in wide_inputs for name in data_inputs(layer, nodes)}


def dequantized_weights(model: onnx.ModelProto, layers, scales: dict, ranges: dict, containers: dict,
                        wide_tensors=()) -> set:
    """Put each int8-container static layer's weight in the model already quantized (integers -> DQ -> node),
    the form ORT's QDQ quantizer leaves alone (a tensor a DequantizeLinear makes) and reads the weight scale
    of the int32 bias from. ORT would otherwise round the weights again, in a Python loop per output channel,
    to the integers they already are: EfficientNet-Lite0's quantize_static 0.35 -> 0.10 s.

    Left to ORT's overrides: int4 containers (the opset they need is ORT's to raise) and biases that are not
    one value per channel.
    Returns the names of the layers written here."""
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    graph_inputs = {i.name for i in model.graph.input}
    by_name = {node.name: node for node in model.graph.node}
    position = {node.name: index for index, node in enumerate(model.graph.node)}
    readers = tensor_readers(model)
    taken = taken_names(model)
    inserted, done = {}, set()
    for layer in layers:
        scale = scales.get(layer.weight_name)
        if containers.get(layer.name, INT8) != INT8 or scale is None or np.ndim(scale) != 1 \
                or layer.weight_name not in inits or layer.weight_name in graph_inputs \
                or ELSEWHERE in readers.get(layer.weight_name, ()):  # a graph output: renamed, it would dangle
            continue
        nodes = [by_name[n] for n in layer.nodes]
        inputs = data_inputs(layer, by_name)
        if any(name not in ranges for name in inputs):
            continue
        biases = [(numpy_helper.to_array(model.graph.initializer[inits[node.input[2]]]), ranges[name],
                   name in wide_tensors) for node, name in zip(nodes, inputs)
                  if len(node.input) > 2 and node.input[2] in inits]
        scale = bias_safe_scale(scale, biases)
        if scale is None:
            continue
        weight = model.graph.initializer[inits[layer.weight_name]]
        integers = np.clip(_integer_weight(layer, numpy_helper.to_array(weight), scale), -127, 127)
        integers = layer.kind.from_matrix(layer, integers)
        name = layer.weight_name
        stored, scale_name, zero_name, output = (  # ORT's own names for them, unless the model has one
            unique_name(name + suffix, taken, "_msq")
            for suffix in ("_quantized", "_scale", "_zero_point", "_DequantizeLinear_Output"))
        weight.CopyFrom(numpy_helper.from_array(integers.astype(np.int8), stored))
        model.graph.initializer.extend([numpy_helper.from_array(scale.astype(np.float32), scale_name),
                                        numpy_helper.from_array(np.zeros(len(scale), np.int8), zero_name)])
        dq = helper.make_node("DequantizeLinear", [stored, scale_name, zero_name], [output],
                              name=unique_name(name + "_DequantizeLinear", taken, "_msq"), axis=layer.out_axis)
        users = sorted(position[reader] for reader in readers.get(name, ()))
        for index in users:
            node = model.graph.node[index]
            node.input[:] = [output if i == name else i for i in node.input]
        inserted.setdefault(users[0] if users else len(model.graph.node), []).append(dq)
        done.add(layer.name)
    _insert_nodes(model, list(model.graph.node), inserted)
    return done


def _insert_nodes(model: onnx.ModelProto, nodes: list, inserted: dict) -> None:
    """The graph's `nodes` again, each position's new nodes (`inserted`: position -> list) before it, and those
    at len(nodes) last: the order stays topological where each new node's readers come after its position."""
    if not inserted:
        return
    rebuilt = []
    for index, node in enumerate(nodes):
        rebuilt.extend(inserted.get(index, []))
        rebuilt.append(node)
    rebuilt.extend(inserted.get(len(nodes), []))
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)


def bias_safe_scale(scale: np.ndarray, biases: list) -> np.ndarray | None:
    """The weight scale, each channel widened where its int32 bias step (input scale x weight scale; ORT's
    asymmetric uint8 / uint16 grid over the range widened to hold 0) would be too fine for its bias, to what
    ORT's _adjust_weight_scale_for_int32_bias would make it, and 0.1% more. Only near-dead channels need it
    (in EfficientNet-Lite0 a weight step of 1e-11 against a bias of 7); their integers round to 0 either way.
    None: a bias that is not one value per channel (left to ORT)."""
    safe = scale.astype(np.float64)
    for bias, (lo, hi), wide in biases:  # each node's bias against that node's own input step
        input_scale = (max(float(hi), 0.0) - min(float(lo), 0.0)) / (65535.0 if wide else 255.0)
        input_scale = input_scale if input_scale >= np.finfo(np.float32).tiny else 1.0
        if np.shape(bias) != safe.shape:
            return None
        smallest = 1.0001 * 2.0 * np.abs(bias.astype(np.float64)) / BIAS_RANGE / input_scale * 1.001
        safe = np.where(safe < smallest, smallest, safe)
    return safe.astype(np.float32)


def write_calibration_cache(ranges: dict, path: str) -> None:
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

    data = {name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in ranges.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)


def check_output_path(input_path: str, output_path: str) -> None:
    same = os.path.abspath(output_path) == os.path.abspath(input_path) or (
        os.path.exists(output_path) and os.path.exists(input_path) and os.path.samefile(output_path, input_path))
    if same:
        raise BadOption(f"output path '{output_path}' is the input model; write the result to another file.")
    folder = os.path.dirname(os.path.abspath(output_path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise BadOption(f"output folder '{folder}' is a file, not a folder; choose another output path.")
    if not os.path.isdir(folder):
        raise BadOption(f"output folder '{folder}' does not exist; create it first.")
    if os.path.isdir(output_path):
        raise BadOption(f"output path '{output_path}' is a folder; give a file name such as model.qdq.onnx.")
    source_folder = os.path.realpath(os.path.dirname(os.path.abspath(input_path)))
    target = os.path.realpath(output_path)
    # an existing file beside the input, where its external data lives (load refuses any outside): one of them?
    if os.path.isfile(target) and os.path.isfile(input_path) and \
            os.path.commonpath([target, source_folder]) == source_folder and target in external_data_files(input_path):
        raise BadOption(f"output path '{output_path}' holds the input model's external data; write the result "
                        "to another file.")
    probe = hidden_file_name(folder, ".msq-probe-", "")
    try:  # os.access says yes to root and on read-only filesystems: really try
        create_empty(probe)
    except OSError as exc:
        raise BadOption(f"output folder '{folder}' is not writable ({exc.strerror}); choose another output path.") \
            from None
    finally:
        with contextlib.suppress(OSError):  # never made (a read-only folder), or gone
            os.unlink(probe)


def create_empty(path: str) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class _QuietOrtLogging:
    """ORT's quantizer warns through the root logger (its pre-processing advice): quiet while any thread is inside.
    The yardstick's thread and a write overlap; each saving and restoring the level on its own, the first out
    restored it under the other (the advice printed), and the last out left it quiet for good."""

    def __init__(self):
        self._lock = threading.Lock()
        self._inside = 0
        self._level = None

    @contextlib.contextmanager
    def __call__(self):
        logger = logging.getLogger()
        with self._lock:
            if not self._inside:
                self._level = logger.level
                logger.setLevel(logging.ERROR)
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if not self._inside:
                    logger.setLevel(self._level)


_quiet_ort_logging = _QuietOrtLogging()


def quantize_to_qdq(loaded: LoadedModel, quantized: QuantizedWeights, ranges: dict, work_dir: str,
                    wide_inputs=(), modes: dict | None = None, containers: dict | None = None,
                    fold: bool = True) -> str:
    """Write the model in work_dir: ORT's QDQ quantizer for the static layers, our rewrite for the others.
    It uses `quantized` up: its model is released or rewritten in place; build a new one for another write.
    fold: weight-only int8 weights are written to be folded at load where they can be (folds_at_load)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    modes = modes or {layer.name: STATIC for layer in loaded.layers}
    containers = containers or {layer.name: INT8 for layer in loaded.layers}
    result = os.path.join(work_dir, "quantized.onnx")
    static = [layer for layer in loaded.layers if modes[layer.name] == STATIC]
    unranged = [layer.name for layer in static if layer.input_name not in ranges]
    if unranged:  # ORT's quantizer would leave them float behind the report's back
        raise RuntimeError(f"no calibrated range for the input of static layer(s) {unranged}: the pass measured "
                           "ranges only for the layers that could end static")
    if static:
        loaded.with_weights(quantized.model)  # ORT's quantizer reads the file: every weight in it whole
        large = is_large(quantized.model)
        prepared = os.path.join(work_dir, "prepared.onnx")
        nodes = static_region(quantized.model, {n for layer in static for n in layer.nodes})
        own_biases(quantized.model, set(nodes))
        wide_tensors = uint16_tensors(static, wide_inputs, quantized.model)
        done = dequantized_weights(quantized.model, static, quantized.scales, ranges, containers, wide_tensors)
        save_model_file(quantized.model, prepared)
        quantized.model = None  # ORT's quantizer reads the file and holds its own copies; ours goes first
        cache = os.path.join(work_dir, "ranges.json")
        write_calibration_cache(ranges, cache)
        with _quiet_ort_logging():
            quantize_static(prepared, result, calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=cache,
                            use_external_data_format=large, nodes_to_quantize=nodes,
                            extra_options={"TensorQuantOverrides": tensor_overrides(
                                [layer for layer in static if layer.name not in done], quantized.scales,
                                wide_tensors, containers)})
        model = None  # read back only where other layers are rewritten in it
    else:
        # Without ORT's quantizer the copy is ours alone: rewritten in place, with no file round trip (MiniLM-L6:
        # the write's peak held the copy, its serialization and the model read back, 90 MB each).
        model = quantized.model
    others = [layer for layer in loaded.layers if modes[layer.name] in (DYNAMIC, WEIGHT_ONLY)
              and layer.weight_name in quantized.scales]
    # Conv / ConvTranspose / Gemm nodes beside static layers that ORT would round (shield_from_ort_rounding)
    static_nodes = {name for layer in static for name in layer.nodes}
    shielding = bool(static) and _rounded_by_ort(loaded, static_nodes)
    if others or loaded.default_inputs or not static or shielding:
        model = onnx.load(result) if model is None else model
        if others:
            for name in int2_behind_quantized_inputs(model, others, containers):
                containers[name] = INT4  # the caller's plan, which the report reads, says what is written
            rewrite_layers(model, others, quantized, modes, containers, fold)
        if shielding:
            shield_from_ort_rounding(model, static_nodes)
        restore_default_inputs(model, loaded.default_inputs)
        # a weight left a reference (quantize_weights) whose readers were not all rewritten would point at nothing
        loaded.with_weights(model)
        save_model_file(model, result)
    return result


# Ops ORT's QDQPropagationTransformer moves a DequantizeLinear past, so that the node after them reads it directly
_DQ_PROPAGATING = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "MaxPool", "Resize"}


def removed_by_ort(node: onnx.NodeProto, constants: dict) -> str | None:
    """The input ORT's optimizer hands on to the node after `node` where it removes `node` as a no-op before its
    QDQ fusions (Identity, Dropout, a Cast to the float it reads after a DequantizeLinear, an Expand to shape [1],
    adding or subtracting a one-value 0 and multiplying or dividing by a one-value 1, on either side where the op
    allows); None where it does not. constants: constant_tensors(). Torch exports leave such no-ops: a review's
    per-tensor DequantizeLinear -> Cast -> Conv with a float weight was fused into a QLinearConv with the weight
    rounded to one int8 scale (7 output steps off), and Add(0, x), Mul(x, Constant(value_float=1)) and
    Expand(x, [1]) the same."""
    if node.op_type in ("Identity", "Dropout"):
        return node.input[0]
    if node.op_type == "Cast":
        return node.input[0] if attribute(node, "to", None) == onnx.TensorProto.FLOAT else None
    if node.op_type == "Expand" and len(node.input) == 2:
        shape = constants.get(node.input[1])
        neutral = shape is not None and np.prod(shape.dims, dtype=np.int64) <= 1 and bool(
            np.all(numpy_helper.to_array(shape) == 1))
        return node.input[0] if neutral else None
    if node.op_type in ("Add", "Sub", "Mul", "Div") and len(node.input) == 2:
        neutral = 0.0 if node.op_type in ("Add", "Sub") else 1.0
        sides = ((1, 0), (0, 1)) if node.op_type in ("Add", "Mul") else ((1, 0),)
        for constant, data in sides:  # (the constant operand, the one handed on)
            operand = constants.get(node.input[constant])
            if operand is not None and np.prod(operand.dims, dtype=np.int64) == 1 \
                    and bool(np.all(numpy_helper.to_array(operand) == neutral)):
                return node.input[data]
    return None


def constant_tensors(model: onnx.ModelProto) -> dict:
    """name -> TensorProto of every value ORT takes as a constant: the initializers, and the Constant nodes' values
    in whichever attribute they hold them (ORT makes them initializers before it removes no-ops)."""
    found = {t.name: t for t in model.graph.initializer}
    kinds = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    for node in model.graph.node:
        if node.op_type != "Constant" or not node.output:
            continue
        for entry in node.attribute:
            if entry.name == "value":
                found[node.output[0]] = entry.t
            elif entry.name in kinds:
                found[node.output[0]] = numpy_helper.from_array(
                    np.array(helper.get_attribute_value(entry), kinds[entry.name]))
    return found


def int2_behind_quantized_inputs(model: onnx.ModelProto, layers: list, containers: dict) -> list[str]:
    """The int2 MatMul and Gemm layers (rewrite_layers writes a weight-only Gemm as a MatMul) whose input comes from
    a DequantizeLinear (a static neighbour quantized it), directly or past ops ORT propagates it through or removes.
    ONNX Runtime 1.31 fuses such a pair into a MatMulIntegerToFloat, which takes no int2 weight, and then refuses the
    whole model ("Type 'tensor(int2)' ... of operator (MatMulIntegerToFloat) is invalid": a review's MLP at
    --prefer size; a bias-less Gemm, and an Identity or Dropout in between, the same). Their 2-bit levels go in int4,
    as ops._Dense puts them where MatMulNBits would compute them wrong."""
    narrowest = [layer for layer in layers if containers.get(layer.name) == INT2 and layer.kind.matmul_product]
    if not narrowest:
        return []
    producers = producer_map(model.graph.node)
    by_name = {node.name: node for node in model.graph.node}
    constants = constant_tensors(model)
    found = []
    for layer in narrowest:
        for node in (by_name.get(name) for name in layer.nodes):
            if node is not None and dequantized_source(node.input[0], producers, _DQ_PROPAGATING | {"Expand"},
                                                       constants) is not None:
                found.append(layer.name)
                break
    return found


def dequantized_source(tensor: str, producers: dict, through, constants: dict) -> onnx.NodeProto | None:
    """The DequantizeLinear that makes `tensor`, directly or past ops of the types `through` (followed by their
    first input) and ops ORT removes (removed_by_ort, followed by the input they hand on), or None."""
    source = producers.get(tensor)
    while source is not None:
        passed = source.input[0] if source.op_type in through else removed_by_ort(source, constants)
        if passed is None:
            break
        source = producers.get(passed)
    return source if source is not None and source.op_type == "DequantizeLinear" else None


def _rounded_by_ort(loaded: LoadedModel, static_nodes: set) -> bool:
    """Whether a node written without quantized activations is of a kind ORT's WeightBiasQuantization rounds
    (shield_from_ort_rounding)."""
    shapes = {t.name: tuple(t.dims) for t in loaded.model.graph.initializer}
    for node in loaded.model.graph.node:
        kind = kind_for(node)
        weight = shapes.get(node.input[kind.weight_index]) if kind and len(node.input) > 1 else None
        if weight and node.name not in static_nodes and kind.float_input_channels(node, weight) is not None:
            return True
    return False


def _int32_bias_overflows(node, kind, inits: dict, dequantized, input_scale: float) -> bool:
    """Whether ORT's int32 bias for a node with a dequantized weight (bias / (input scale x weight scale),
    WeightBiasQuantization) leaves the int32 range in some channel."""
    bias = inits.get(node.input[kind.bias_index]) if kind.bias_index is not None and \
        len(node.input) > kind.bias_index else None
    if bias is None or bias.data_type != onnx.TensorProto.FLOAT or dequantized.input[1] not in inits:
        return False
    steps = np.float64(input_scale) * numpy_helper.to_array(inits[dequantized.input[1]]).astype(np.float64)
    values = np.abs(numpy_helper.to_array(bias).astype(np.float64))
    if steps.size not in (1, values.size):
        return False  # a block-wise weight scale: ORT leaves it alone (its block_size)
    with np.errstate(divide="ignore", invalid="ignore"):
        return bool(np.any(~(values / np.abs(steps.reshape(-1)) < BIAS_RANGE / 2)))


# Ops ORT's QDQPropagationTransformer moves a DequantizeLinear past (so the node after them reads it directly)
# that keep a Conv input's channel axis: a per-channel DequantizeLinear before them stays where it is.
_CHANNEL_KEEPING = {"MaxPool", "AveragePool", "Pad", "Resize"}


def shield_from_ort_rounding(model: onnx.ModelProto, static_nodes: set) -> int:
    """Each Conv, ConvTranspose or Gemm written with a float weight (a layer left in float, or a node that cannot
    be a layer) that reads a per-tensor DequantizeLinear (a static neighbour's output), directly or through
    _CHANNEL_KEEPING ops or ops ORT removes (removed_by_ort) only it reads, gets that DequantizeLinear with the same
    scale and zero point repeated per input channel: the same values, in a form ORT's WeightBiasQuantization and
    QDQ fusions leave alone (OpKind.float_input_channels), so the node runs in float as the report says. The
    DequantizeLinear is changed in place where nothing else reads it, else a copy is made. EfficientNet-Lite0's
    first block's projection left in float at --avg-bits 3.5 ran as a per-tensor int8 QLinearConv: task cosine
    0.939 -> 0.880.
    A weight-only layer there is left to ORT, which only puts its bias on int32 (and fuses an int8 one, faster, on
    the input it reads quantized anyway), unless a near-dead channel's step overflows that int32: then the
    channel's output was off by its whole bias, and the layer is shielded too.
    Not shielded: a node with one input channel (ORT reads a one-element scale as per tensor), and chains through
    ops that move the channel axis (Transpose, Reshape). Returns how many nodes were shielded."""
    nodes = list(model.graph.node)  # one wrapper per node, so that identities hold for the positions below
    producers = producer_map(nodes)
    position = {id(node): index for index, node in enumerate(nodes)}
    readers = tensor_readers(model)
    inits = {t.name: t for t in model.graph.initializer}
    constants = constant_tensors(model)
    taken = taken_names(model)
    inserted, shielded = {}, 0  # node position -> the DequantizeLinear copies its inputs get
    for node in nodes:
        kind = kind_for(node)
        if kind is None or node.name in static_nodes or len(node.input) < 2:
            continue
        target, slot = node, kind.data_index  # the node that reads the DequantizeLinear, and at which input
        source = producers.get(node.input[slot])
        while source is not None and readers.get(source.output[0], set()) == {target.name}:
            keeps = source.op_type in _CHANNEL_KEEPING and node.op_type != "Gemm"
            passed = source.input[0] if keeps else removed_by_ort(source, constants)
            if passed is None:
                break
            target, slot = source, list(source.input).index(passed)
            source = producers.get(passed)
        if source is None or source.op_type != "DequantizeLinear" or source.input[1] not in inits \
                or len(source.input) < 3 or source.input[2] not in inits:
            continue
        scale, zero = (numpy_helper.to_array(inits[name]) for name in source.input[1:3])
        if scale.size != 1:
            continue  # per channel already: ORT leaves the node alone
        weight = inits.get(node.input[kind.weight_index])
        dequantized = producers.get(node.input[kind.weight_index])
        if weight is None and dequantized is not None and dequantized.op_type == "DequantizeLinear":
            # A weight-only layer: ORT's int32 bias (and, for int8, its fusion) only rounds the bias, unless a
            # near-dead channel's step overflows the int32.
            weight = inits.get(dequantized.input[0])
            if not _int32_bias_overflows(node, kind, inits, dequantized, float(scale.ravel()[0])):
                continue
        channels = None if weight is None else kind.float_input_channels(node, tuple(weight.dims))
        if channels is None or channels[1] < 2:
            continue  # a kind ORT leaves as it is, or one channel (its scale reads as one for the whole tensor)
        axis, size = channels
        stem = unique_name((node.name or node.output[0]) + "_input_per_channel", taken, "_msq")
        names = [unique_name(stem + suffix, taken, "_msq") for suffix in ("_scale", "_zero_point", "_output")]
        model.graph.initializer.extend([
            numpy_helper.from_array(np.full(size, scale.reshape(()), scale.dtype), names[0]),
            numpy_helper.from_array(np.full(size, zero.reshape(()), zero.dtype), names[1])])
        shielded += 1
        if readers.get(source.output[0], set()) == {target.name}:  # only this chain reads it: no copy to run
            source.input[1], source.input[2] = names[0], names[1]
            kept = [a for a in source.attribute if a.name != "axis"]
            del source.attribute[:]
            source.attribute.extend(kept + [helper.make_attribute("axis", axis)])
            continue
        inserted.setdefault(position[id(target)], []).append(helper.make_node(
            "DequantizeLinear", [source.input[0], *names[:2]], [names[2]], name=stem, axis=axis, domain=source.domain))
        target.input[slot] = names[2]
    _insert_nodes(model, nodes, inserted)
    return shielded


def restore_default_inputs(model: onnx.ModelProto, defaults: list) -> None:
    """List again the inputs the input model gave a default initializer, where that initializer is still
    written as declared (the loader took them out of the inputs to read them as constants): a caller feeding
    one keeps doing so. A weight now quantized or folded cannot be (pipeline._warnings names it)."""
    listed = {value.name for value in model.graph.input}
    written = {t.name: t for t in model.graph.initializer}
    for value in defaults:
        tensor, declared = written.get(value.name), value.type.tensor_type
        if tensor is not None and value.name not in listed and tensor.data_type == declared.elem_type and (
                not declared.HasField("shape") or len(declared.shape.dim) == len(tensor.dims)):
            model.graph.input.append(value)


def _integer_weight(layer, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """[out, fan_in] integers of a weight that already sits on its grid (a scale per row or per block)."""
    matrix = as_matrix(layer, weight)
    return np.rint(matrix / steps(scale, matrix.shape[1])).astype(np.int8)


class _GraphEdit:
    """Collects the nodes and initializers a rewrite adds, with names that cannot clash."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}

    def constant(self, name: str, array: np.ndarray) -> str:
        tensor = numpy_helper.from_array(array, name)
        self.model.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def drop_unused(self) -> None:
        used = {i for node in self.model.graph.node for i in node.input}
        # and what an If/Loop body reads from the outer scope: a branch's own weights (a model written with a
        # dynamic layer lost them, and ORT refused it)
        used |= {o.name for o in self.model.graph.output} | subgraph_inputs(self.model.graph)
        kept = [t for t in self.model.graph.initializer if t.name in used]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(kept)


def packed_tensor(name: str, integers: np.ndarray, container: str) -> onnx.TensorProto:
    """int8, or int4/int2 packed low bits first into raw bytes (what the file stores: the bits show)."""
    if container == INT8:
        return numpy_helper.from_array(integers.astype(np.int8), name)
    bits = CONTAINER_BITS[container]
    per_byte = 8 // bits
    flat = (integers.astype(np.int16).ravel() & ((1 << bits) - 1)).astype(np.uint8)
    flat = np.concatenate([flat, np.zeros(-len(flat) % per_byte, np.uint8)]).reshape(-1, per_byte)
    packed = np.zeros(len(flat), np.uint8)
    for slot in range(per_byte):
        packed |= flat[:, slot] << (bits * slot)
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = onnx.TensorProto.INT4 if container == INT4 else onnx.TensorProto.INT2
    tensor.dims.extend(integers.shape)
    tensor.raw_data = packed.tobytes()
    return tensor


def _gather_nodes(node, layer, integers: np.ndarray, scale: np.ndarray, container: str, prefix: str,
                  edit: _GraphEdit) -> list:
    """GatherBlockQuantized on the table: uint8 data holding 4-bit (two per byte, zero point 8 as in
    MatMulNBits) or 8-bit values (explicit zero point 128), one scale per block of a row. Its rows come out in
    the scales' type: float16 scales get a Cast back to float."""
    # the zero point added in uint8's wrap-around arithmetic: -8..7 -> 0..15 (-128..127 -> 0..255) with no int16 copy
    # of the table (MiniLM-L6's: 23 MB)
    biased = layer.kind.from_matrix(layer, integers).astype(np.int8, copy=False).view(np.uint8)
    blocks = (layer.weight_shape[0], layer.weight_shape[1] // layer.block)
    inputs = [prefix + "_data", node.input[1], edit.constant(prefix + "_scale", scale.reshape(blocks))]
    if container == INT4:
        biased = biased + np.uint8(8)
        edit.constant(inputs[0], biased[:, 0::2] | (biased[:, 1::2] << 4))
    else:
        edit.constant(inputs[0], biased + np.uint8(128))
        inputs.append(edit.constant(prefix + "_zero", np.full(blocks, 128, np.uint8)))
    half = scale.dtype == np.float16
    rows = [prefix + "_rows"] if half else list(node.output)
    nodes = [helper.make_node("GatherBlockQuantized", inputs, rows, name=node.name, domain=MS_DOMAIN,
                              bits=CONTAINER_BITS[container], block_size=layer.block, gather_axis=0, quantize_axis=1)]
    if half:
        nodes.append(helper.make_node("Cast", rows, list(node.output), name=prefix + "_cast", to=onnx.TensorProto.FLOAT))
    return nodes


def rewrite_layers(model: onnx.ModelProto, layers, quantized: QuantizedWeights, modes: dict,
                   containers: dict, fold: bool = True) -> None:
    """Dynamic and weight-only layers, written as quantize_dynamic, MatMulNBits and GatherBlockQuantized
    expect them.

    Dense layers (MatMul, Gemm) become MatMul on a [K, N] weight
    (Gemm's transposed weight too: DQ -> Gemm is not fused, DQ -> MatMul is).
    """
    edit = _GraphEdit(model)
    position = {node.name: i for i, node in enumerate(model.graph.node)}
    producers = producer_map(model.graph.node)
    constants = constant_tensors(model)
    replacements: dict[int, list] = {}
    hoisted = []  # the int8 forms of the weights that bodies read by name: first in the graph
    for layer in layers:
        scale = quantized.scales[layer.weight_name]
        integers = quantized.integers.get(layer.weight_name)
        if integers is None:
            integers = _integer_weight(layer, numpy_helper.to_array(edit.inits[layer.weight_name]), scale)
        prefix = layer.weight_name + "_msq"
        container, mode = containers[layer.name], modes[layer.name]
        if layer.in_body:  # int8 x scale under the weight's own name, which its body reads: ORT folds it at load
            stored = layer.kind.from_matrix(layer, integers)
            model.graph.initializer.append(packed_tensor(prefix + "_q", stored, container))
            made = folded_weight_nodes(prefix + "_q", scale, layer.out_axis, stored.ndim, prefix, edit)
            made[-1].output[0] = layer.weight_name
            hoisted.extend(made)
            continue
        if layer.op_type == "Gather":
            for node_name in layer.nodes:
                node = model.graph.node[position[node_name]]
                replacements[position[node_name]] = _gather_nodes(node, layer, integers, scale, container,
                                                                  f"{prefix}_{position[node_name]}", edit)
            continue
        dense = layer.kind.matmul_product
        q_name = prefix + "_q"
        stored = integers.T.copy() if dense else layer.kind.from_matrix(layer, integers)
        model.graph.initializer.append(packed_tensor(q_name, stored, container))
        blocked = np.ndim(scale) == 2  # [out, blocks]: blocks along the stored [K, N] weight's axis 0
        folded = mode == WEIGHT_ONLY and fold and folds_at_load(
            layer, container, [model.graph.node[position[name]] for name in layer.nodes], producers, constants)
        s_name = None if folded else edit.constant(prefix + "_scale",
                                                   (scale.T.copy() if blocked else scale).astype(np.float32))
        z_name = edit.constant(prefix + "_zero", np.zeros(len(scale), np.int8)) if mode == DYNAMIC else ""
        shared_dq = []  # the weight-only layer's weight, made once for its nodes
        if folded:
            shared_dq = folded_weight_nodes(q_name, scale, layer.out_axis, stored.ndim, prefix, edit)
        elif mode == WEIGHT_ONLY:  # symmetric: no zero point, whatever the container
            block = {"axis": 0, "block_size": stored.shape[0] // scale.shape[1]} if blocked else \
                {"axis": 1 if dense else layer.out_axis}
            shared_dq = [helper.make_node("DequantizeLinear", [q_name, s_name], [prefix + "_dq"],
                                          name=prefix + "_dq", **block)]
        for node_name in layer.nodes:
            node = model.graph.node[position[node_name]]
            new_nodes = list(shared_dq) if node_name == layer.nodes[0] else []
            if dense:
                new_nodes += _dense_nodes(node, mode, prefix + "_" + str(position[node_name]),
                                          prefix + "_dq", q_name, s_name, z_name, edit)
                replacements[position[node_name]] = new_nodes
                continue
            # Conv, ConvTranspose, LSTM...: the float op on the dequantized weight. A node with two weights (an
            # LSTM's W and R) is rewritten once per weight, on the copy the first rewrite made.
            earlier = replacements.get(position[node_name])
            copy = earlier[-1] if earlier else onnx.NodeProto()
            if not earlier:
                copy.CopyFrom(node)
            copy.input[layer.weight_position] = prefix + "_dq"
            replacements[position[node_name]] = new_nodes + (earlier or [copy])
    rebuilt = list(hoisted)
    for index, node in enumerate(model.graph.node):
        rebuilt.extend(replacements.get(index, [node]))
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)
    floats = {layer.weight_name for layer in layers if layer.in_body}
    kept = [t for t in model.graph.initializer if t.name not in floats]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    edit.drop_unused()
    if any(layer.op_type == "Gather" for layer in layers) and not any(o.domain == MS_DOMAIN
                                                                       for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if any(containers[layer.name] == INT2 for layer in layers):
        raise_opset(model, INT2_OPSET)


# Where ORT's optimizer moves a DequantizeLinear to the node after: what makes that node's input quantized to it
# (an Expand where ORT removes it as keeping its input's shape, which the graph does not always tell)
_DQ_REACHES = _DQ_PROPAGATING | _CHANNEL_KEEPING | {"Expand"}


def folds_at_load(layer, container: str, nodes: list, producers: dict, constants: dict) -> bool:
    """Whether a weight-only layer's weight is written (pipeline.folds_weights) as int8 -> Cast -> Mul(scale)
    (folded_weight_nodes), not as a DequantizeLinear. ORT's optimizer keeps a DequantizeLinear of a constant as it
    is, for its QDQ fusions, and a float op with no weight-only kernel (Conv, ConvTranspose, LSTM/GRU/RNN,
    Attention) then dequantizes the whole weight in every run, and cannot prepack it: the orientation classifier
    of bench/more_models.py, 27 weight-only convolutions, ran at 2.6-3.0x FP32's batch-1 time. ORT folds Cast and
    Mul of constants into one float initializer when it loads the model: the same weights (Cast x scale is what
    DequantizeLinear computes with no zero point; a kernel ORT picks for a constant weight may sum in another
    order, 3e-7 relative on a review's Conv) at FP32's speed, the int8 bytes on disk, and FP32's memory for
    those weights (the PicoDet layout detector's running session 128 -> 141 MiB, FP32's 141), which is why
    --prefer size keeps the DequantizeLinear unless a latency bound is asked.
    Not for a kind ORT's WeightBiasQuantization rounds (OpKind.float_input_channels: Conv, ConvTranspose) whose
    input a DequantizeLinear may reach (a static neighbour's output): a float weight there would be rounded to
    one int8 scale by ORT (shield_from_ort_rounding), where the DequantizeLinear form is fused into an integer
    kernel, faster still, when a QuantizeLinear follows. Nor for int4/int2 containers."""
    if container != INT8 or layer.kind.weight_only_kernel:
        return False
    return not any(layer.kind.float_input_channels(node, layer.weight_shape) is not None and dequantized_source(
        node.input[layer.kind.data_index], producers, _DQ_REACHES, constants) is not None for node in nodes)


def folded_weight_nodes(q_name: str, scale: np.ndarray, axis: int, rank: int, prefix: str,
                        edit: _GraphEdit) -> list:
    """Cast(int8 -> float) x scale (one per channel along `axis`, shaped to broadcast), named prefix + "_dq" as
    the DequantizeLinear it replaces: constant-folded by ORT when it loads the model (folds_at_load)."""
    shape = [1] * rank
    shape[axis] = -1
    s_name = edit.constant(prefix + "_scale", np.asarray(scale, np.float32).reshape(shape))
    return [helper.make_node("Cast", [q_name], [prefix + "_float"], name=prefix + "_cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [prefix + "_float", s_name], [prefix + "_dq"], name=prefix + "_dq")]


MS_DOMAIN = "com.microsoft"
INT2_OPSET = 25  # the first opset with int2 DequantizeLinear; ONNX Runtime 1.31 loads <= 26


def raise_opset(model: onnx.ModelProto, opset: int) -> None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < opset:
            entry.version = opset
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(
        [o for o in model.opset_import if o.domain in ("", "ai.onnx")]))


def _dense_nodes(node, mode: str, prefix: str, dq_name: str, q_name: str, s_name: str, z_name: str,
                 edit: _GraphEdit) -> list:
    """x @ W (+ Gemm's alpha and bias) in the given mode; the node's output name is kept."""
    x, output = node.input[0], node.output[0]
    alpha = float(attribute(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
    beta = float(attribute(node, "beta", 1.0)) if node.op_type == "Gemm" else 0.0
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    tail = alpha != 1.0 or bias is not None
    product = prefix + "_mm" if tail else output
    nodes = []
    if mode == WEIGHT_ONLY:
        nodes.append(helper.make_node("MatMul", [x, dq_name], [product], name=prefix + "_matmul"))
    else:  # the graph quantize_dynamic writes; ORT fuses it into DynamicQuantizeMatMul
        nodes += [
            helper.make_node("DynamicQuantizeLinear", [x], [prefix + "_xq", prefix + "_xs", prefix + "_xz"],
                             name=prefix + "_dql"),
            helper.make_node("MatMulInteger", [prefix + "_xq", q_name, prefix + "_xz", z_name], [prefix + "_acc"],
                             name=prefix + "_mmi"),
            helper.make_node("Cast", [prefix + "_acc"], [prefix + "_accf"], name=prefix + "_cast",
                             to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [prefix + "_xs", s_name], [prefix + "_scales"], name=prefix + "_scales_mul"),
            helper.make_node("Mul", [prefix + "_accf", prefix + "_scales"], [product], name=prefix + "_out_mul"),
        ]
    if alpha != 1.0:
        scaled = prefix + "_alpha_out" if bias is not None else output
        nodes.append(helper.make_node("Mul", [product, edit.constant(prefix + "_alpha", np.array(alpha, np.float32))],
                                      [scaled], name=prefix + "_alpha"))
        product = scaled
    if bias is not None:
        term = bias
        if beta != 1.0:
            term = prefix + "_beta_bias"
            nodes.append(helper.make_node("Mul", [bias, edit.constant(prefix + "_beta", np.array(beta, np.float32))],
                                          [term], name=prefix + "_beta"))
        nodes.append(helper.make_node("Add", [product, term], [output], name=prefix + "_bias_add"))
    return nodes


def publish(model_path: str, output_path: str, axes: dict | None = None) -> bool:
    """Move a finished model into place: readers see the old file or the new one, never a part. True when
    the file published is model_path's bytes as they were (not split into model and external data, no sample
    axes taken off: `axes` is LoadedModel.sample_axes)."""
    model = onnx.load(model_path)
    if axes:
        sample_axes.strip(model, axes)
    large = is_large(model)
    folder = os.path.dirname(os.path.abspath(output_path))
    data_name = os.path.basename(output_path) + ".data"  # used only when the model is large
    temporary = hidden_file_name(folder, ".msq-", ".onnx.tmp")
    try:
        create_empty(temporary)
        if large:
            # Two renames (data, then model): unlike the single-file case, a kill
            # between them can pair new data with the old model (README: limits).
            onnx.save_model(model, temporary, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name + ".tmp", size_threshold=0)
            os.replace(os.path.join(folder, data_name + ".tmp"), os.path.join(folder, data_name))
            _rewrite_location(temporary, data_name + ".tmp", data_name)
        else:
            with open(temporary, "wb") as out:
                if axes:  # the model as written and verified, without the nodes that gave its sample axes
                    out.write(model.SerializeToString())
                else:  # the bytes as written and verified (and as report.GzipSize reads them, maybe meanwhile)
                    with open(model_path, "rb") as source:
                        shutil.copyfileobj(source, out, 1 << 22)
                out.flush()
                os.fsync(out.fileno())
        os.chmod(temporary, _default_mode())  # mkstemp makes 0600; a model is an ordinary file
        os.replace(temporary, output_path)
        return not large and not axes
    except BaseException as exc:
        for leftover in (temporary, os.path.join(folder, data_name + ".tmp")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        if isinstance(exc, OSError):
            raise BadOption(f"cannot write '{output_path}' ({exc.strerror}); free space or choose another "
                            "output path.") from None
        raise


def written_files(path: str) -> list[str]:
    """The model file and the external data files it names: what a deployment copies."""
    model = onnx.load(path, load_external_data=False)
    folder = os.path.dirname(os.path.abspath(path))
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return [path] + [os.path.join(folder, name) for name in sorted(locations)]


def _rewrite_location(path: str, old: str, new: str) -> None:
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    with open(path, "wb") as out:
        out.write(model.SerializeToString())

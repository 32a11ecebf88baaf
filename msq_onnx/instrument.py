"""Stage 2: one streamed pass of the FP32 model over the calibration set.

The model is copied with (a) the min and max of every float activation whose
range a static layer's quantization can read, of the layers that may end static
(ops.static_tensors, modes.static_candidates; ORT's MinMax calibrator reduces
every one; a tensor that only feeds a Relu/Clip takes the activation's range; a
Relu's output, never negative, its max only), so ranges
come out as scalars; (b) per-channel mean and mean square of every layer's
input, for output-aware weight errors and bias correction; (c) every layer's
probe tensor pyramid-pooled in the graph when its map has a fixed size, else
exposed and pooled in numpy right away. Each batch is reduced to mergeable
statistics and dropped."""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .data import axis_name
from .errors import BadData, BadModel, one_line
from .features import (DEFAULT_LEVELS, FeatureBank, embed, flat_pooling_matrix, grid_pyramid, pooling_matrices,
                       token_features)
from .load import Layer, LoadedModel, TemporaryFolder, consumers, is_large, save_model_file
from .ops import (SKIP_SUM_OUTPUT, nonnegative_tensors, range_sources, residual_joins, row_normalizer,
                  static_tensors, typed_values)

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}


@dataclass
class PassStatistics:
    ranges: dict  # tensor -> (min, max) over all samples
    input_mean: dict  # layer name -> per-channel mean of its input
    input_sq: dict  # layer name -> per-channel mean square of its input
    features: FeatureBank  # per layer: [N, D] pyramid-pooled embeddings
    input_features: FeatureBank  # the network input ("input"), pooled the same way
    outputs: np.ndarray  # FP32 model output per imprinted sample, [N, classes]
    imprinted: np.ndarray  # indices of the samples whose embeddings were kept
    samples: int = 0
    rows: dict = None  # layer -> median rows per sample its weight multiplies (tokens for a sequence)
    hessians: dict = None  # layer -> InputHessians, when asked for
    tokens: float | None = None  # mean real (unmasked) tokens per sample, for a model with an attention mask
    workers: int = 1  # runs of the model at once in the later stages (run_workers, from the first sample)
    residual_share: dict = None  # layer -> its branch's share of the power at its residual join (ops.residual_joins)
    branches: dict = None  # the graph's If nodes around layers -> the conditions (True, False) the samples gave


def float_tensors(model: onnx.ModelProto) -> list[str]:
    types = {v.name: v.type.tensor_type.elem_type for v in typed_values(model)}
    initializers = {t.name for t in model.graph.initializer}
    names, seen = [], set()
    for value in model.graph.input:
        if value.name not in initializers and types.get(value.name) in _FLOAT_TYPES:
            names.append(value.name)
            seen.add(value.name)
    for node in model.graph.node:
        for name in node.output:
            if name and name not in seen and types.get(name) in _FLOAT_TYPES:
                names.append(name)
                seen.add(name)
    return names


def static_shapes(model: onnx.ModelProto) -> dict:
    """tensor -> dims (None where symbolic), from shape inference."""
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in typed_values(model)}


def _rank(model: onnx.ModelProto, name: str) -> int | None:
    for value in typed_values(model):
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return len(value.type.tensor_type.shape.dim)
    return None


def _fixed_map(shape) -> bool:
    """[N, C, H, W] with H and W fixed (static_shapes' dims)."""
    return shape is not None and len(shape) == 4 and all(shape[2:])


def _float_maps(model: onnx.ModelProto, shapes: dict) -> set:
    """The float32 fixed-size maps: ORT runs a CNN's maps in its blocked NCHWc layout, where GlobalMaxPool,
    GlobalAveragePool, AveragePool and Mul read them as they are; a Reduce* or a MatMul reads NCHW, for which
    ORT copies the whole map back first. EfficientNet-Lite0's instrumented run on one thread: 21.7 ms with the
    maps' statistics as Reduce*/MatMul, 18.1 ms as pools (plain model: 9.5 ms); its pass 3.73-4.21 -> 3.23-3.55 s."""
    return {v.name for v in typed_values(model)
            if v.type.tensor_type.elem_type == TensorProto.FLOAT and _fixed_map(shapes.get(v.name))}


def _sequence_pyramid(probe: str, prefix: str, levels, shared: tuple[str, str] | None = None) -> tuple[
        list, list, tuple[str, str], tuple[str, str]]:
    """Nodes pooling a [N, T, C] probe over T as features.pyramid_pool does without a mask, into [N, C, bins],
    for a T known only when it runs: the bins' averaging matrix
    (features._bin_edges, floor(i T / b) to ceil((i + 1) T / b)) is computed from the probe's own shape, so no
    graph can be given a matrix of the wrong length. Returns the nodes, their constants, the names of the
    pyramid and of the probe's shape (its rows), and the (matrix, shape) another probe of this length can share.

    shared: (matrix, shape) of a probe whose T is the same tensor dimension (_length_keys): only the product is
    added. A matrix of another length fails the product ([bins, T] by [N, T', C]) instead of pooling wrongly.
    MiniLM-L6's 39 probes share 8 matrices: the matrices' 17 small ops a probe were 4.6 ms of a 63 ms run.

    A sequence pooled in numpy cost MiniLM-L6's pass 1.3 s of its main thread (39 probes x 240 texts of
    [T, 384] read back from ONNX Runtime), beside the two workers running the model."""
    n = lambda name: f"{prefix}_{name}"  # noqa: E731
    pooled = n("pyramid")
    product = [helper.make_node("MatMul", [shared[0] if shared else n("matrix"), probe], [n("bins")], name=n("bins")),
               helper.make_node("Transpose", [n("bins")], [pooled], perm=[0, 2, 1], name=pooled)]
    if shared is not None:
        return product, [], (pooled, shared[1]), shared
    bins = [(b, i) for b in levels for i in range(b)]
    first = numpy_helper.from_array(np.array([[i] for _, i in bins], np.float64), n("first"))
    last = numpy_helper.from_array(np.array([[i + 1] for _, i in bins], np.float64), n("last"))
    cuts = numpy_helper.from_array(np.array([[b] for b, _ in bins], np.float64), n("cuts"))
    axis = numpy_helper.from_array(np.array(1, np.int64), n("axis"))
    zero, one = (numpy_helper.from_array(np.array(v, np.int64), n(name)) for name, v in (("zero", 0), ("one", 1)))
    shape, length = n("shape"), n("length")
    nodes = [helper.make_node("Shape", [probe], [shape], name=shape),
             helper.make_node("Gather", [shape, axis.name], [length], axis=0, name=length),
             helper.make_node("Range", [zero.name, length, one.name], [n("positions")], name=n("positions")),
             helper.make_node("Cast", [n("positions")], [n("at")], to=TensorProto.DOUBLE, name=n("at")),
             helper.make_node("Cast", [length], [n("size")], to=TensorProto.DOUBLE, name=n("size")),
             # i T, then / b, in double: numpy's float64 edges exactly
             helper.make_node("Mul", [first.name, n("size")], [n("low_t")], name=n("low_t")),
             helper.make_node("Div", [n("low_t"), cuts.name], [n("low")], name=n("low")),
             helper.make_node("Floor", [n("low")], [n("start")], name=n("start")),
             helper.make_node("Mul", [last.name, n("size")], [n("high_t")], name=n("high_t")),
             helper.make_node("Div", [n("high_t"), cuts.name], [n("high")], name=n("high")),
             helper.make_node("Ceil", [n("high")], [n("stop")], name=n("stop")),
             helper.make_node("GreaterOrEqual", [n("at"), n("start")], [n("after")], name=n("after")),
             helper.make_node("Less", [n("at"), n("stop")], [n("before")], name=n("before")),
             helper.make_node("And", [n("after"), n("before")], [n("inside")], name=n("inside")),
             helper.make_node("Cast", [n("inside")], [n("ones")], to=TensorProto.FLOAT, name=n("ones")),
             helper.make_node("Sub", [n("stop"), n("start")], [n("width")], name=n("width")),
             helper.make_node("Cast", [n("width")], [n("count")], to=TensorProto.FLOAT, name=n("count")),
             helper.make_node("Div", [n("ones"), n("count")], [n("matrix")], name=n("matrix")), *product]
    return nodes, [first, last, cuts, axis, zero, one], (pooled, shape), (n("matrix"), shape)


def _length_keys(model: onnx.ModelProto) -> dict:
    """[N, T, C] tensor -> its T as shape inference named it: a symbol it carried through the ops that keep T
    (MiniLM-L6's query, key and value outputs share one; a Reshape or a Concat makes a new one) or a fixed
    size. Tensors with the same key have the same length in every run."""
    keys = {}
    for value in typed_values(model):
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 3:
            if dims[1].dim_param:
                keys[value.name] = ("symbol", dims[1].dim_param)
            elif dims[1].HasField("dim_value") and dims[1].dim_value > 0:
                keys[value.name] = ("size", dims[1].dim_value)
    return keys


def _moment_axes(layer: Layer, rank: int) -> list[int]:
    channel_axis = rank - 1 if layer.kind.channels_last else 1
    return [a for a in range(rank) if a != channel_axis]


def measured_layers(loaded: LoadedModel) -> list:
    """The layers the pass measures: those of the graph itself (a body's tensors cannot be fetched, ops._InBody)."""
    return [layer for layer in loaded.layers if not layer.in_body]


def build_instrumented(loaded: LoadedModel, hessians: bool = False, levels=(),
                       share_lengths: bool = True, static_layers=None) -> tuple[onnx.ModelProto, dict]:
    """Return the instrumented copy and a map of its extra outputs (with `hessians`, also each Hessian input's
    rows as [rows, K]; with pyramid `levels`, maps of a fixed size come out already pooled; share_lengths:
    sequences of one length, as shape inference tells, pooled by one matrix, outputs["shared_lengths"] True).
    static_layers: the names of the layers that may end static, whose ranges are measured (None: every layer)."""
    model = loaded.session_copy()
    graph = model.graph
    original_nodes = len(graph.node)
    outputs = {"range": {}, "borrowed": {}, "moments": {}, "probe": {}, "pyramid": {}, "grid": {}, "hessian": {},
               "rows": {}, "norms": {}, "hessian_only": set(), "sequence_pyramid": {}, "shared_lengths": False,
               "joins": {}, "candidates": [], "power": {}, "size": {}, "conditions": {}}
    exposed = {o.name for o in graph.output}

    def add_output(name: str, elem=TensorProto.FLOAT):
        if name not in exposed:
            graph.output.append(helper.make_tensor_value_info(name, elem, None))
            exposed.add(name)

    # The conditions of the graph's Ifs that hold layers: which branches the samples run (nothing in a branch is
    # measured, so a branch no sample takes is quantized unchecked: pipeline._warnings says so)
    branching = {branch[0] for layer in loaded.layers for branch in layer.branches if branch}
    fed = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "If" and node.name in branching:
            outputs["conditions"][node.name] = node.input[0]
            if node.input[0] not in fed:
                add_output(node.input[0], TensorProto.BOOL)

    sources = range_sources(model)
    # Only where a static layer can read them: MiniLM-L6's run measured 219 tensors, 29.0 ms a run, 65 of them
    # then, 25.0 ms (LayerNorm, GELU, attention scores and the like are never quantized statically); and only for
    # the layers that may end static: 12 (its six FFN-down projections; static is slower than dynamic elsewhere).
    readable = static_tensors(model, {node for layer in loaded.layers for node in layer.nodes
                                      if static_layers is None or layer.name in static_layers})
    ranged = [name for name in float_tensors(model) if name in readable]
    shapes = static_shapes(model)
    maps = _float_maps(model, shapes)
    nonnegative = nonnegative_tensors(model)
    measured = set(ranged)
    for index, tensor in enumerate(ranged):
        source = tensor
        while sources.get(source, source) != source:  # Conv -> Relu -> Clip: the last activation's range
            source = sources[source]
        if source != tensor and source in measured:
            outputs["borrowed"][tensor] = source
            continue  # its range is its activation's (a fetched map also stops ORT fusing Conv with Relu/Clip)
        lo, hi = (None if tensor in nonnegative else f"msq_min_{index}"), f"msq_max_{index}"
        if lo:
            graph.node.append(helper.make_node("ReduceMin", [tensor], [lo], keepdims=0, name=lo))
            add_output(lo)
        if tensor in maps:  # the channels' maxima first: the same maximum, read in the blocked layout
            graph.node.extend([helper.make_node("GlobalMaxPool", [tensor], [hi + "_g"], name=hi + "_g"),
                               helper.make_node("ReduceMax", [hi + "_g"], [hi], keepdims=0, name=hi)])
        else:
            graph.node.append(helper.make_node("ReduceMax", [tensor], [hi], keepdims=0, name=hi))
        add_output(hi)
        outputs["range"][tensor] = (lo, hi)  # lo None: never negative, its range starts at 0

    views = {}  # probe -> the tensor with its samples on axis 0 (ops.OpKind.batch_first)
    sequence_pyramids = {}  # view -> (its pyramid, its shape)
    length_keys = _length_keys(model) if share_lengths else {}
    matrices = {}  # length key -> (the averaging matrix, the shape it was computed from)
    shared_moments = {}  # (input, layout): its (mean, mean square) outputs
    measured = measured_layers(loaded)
    for index, layer in enumerate(measured):
        shape = shapes.get(layer.probe_name)
        fixed_map = levels and not layer.kind.channels_last and _fixed_map(shape)
        finest = max(levels) if levels else 1
        if fixed_map and layer.probe_name in maps and all(finest % b == 0 for b in levels) \
                and shape[2] % finest == 0 and shape[3] % finest == 0:
            # Equal bins: an AveragePool gives the finest level, whose bins the coarser levels' bins are unions
            # of; one small product then gives the pyramid in flat_pooling_matrix's order, as below.
            flat, pooled, grid = f"msq_flat_{index}", f"msq_pyramid_{index}", f"msq_avg_{index}"
            flat_shape, matrix = f"msq_flat_shape_{index}", f"msq_pyramid_matrix_{index}"
            graph.initializer.extend([
                numpy_helper.from_array(np.array([0, 0, -1], np.int64), flat_shape),
                numpy_helper.from_array(flat_pooling_matrix(finest, finest, levels), matrix)])
            kernel = [shape[2] // finest, shape[3] // finest]
            graph.node.extend([helper.make_node("AveragePool", [layer.probe_name], [grid], kernel_shape=kernel,
                                                strides=kernel, name=grid),
                               helper.make_node("Reshape", [grid, flat_shape], [flat], name=flat),
                               helper.make_node("MatMul", [flat, matrix], [pooled], name=pooled)])
            add_output(pooled)
            outputs["pyramid"][layer.name] = pooled
        elif fixed_map and shape[2] * shape[3] * sum(b * b for b in levels) <= FLAT_POOLING_MAX:
            # A map is pooled where it is made, in one product: [N, C, H*W] @ [H*W, sum(b*b)] gives every bin of
            # every level. ORT returns C x sum(b*b) values instead of the whole map (EfficientNet-Lite0: the
            # pooling took 2.8 s of numpy on copied maps; as two small products per channel, 15% of the pass).
            flat, pooled = f"msq_flat_{index}", f"msq_pyramid_{index}"
            flat_shape, matrix = f"msq_flat_shape_{index}", f"msq_pyramid_matrix_{index}"
            graph.initializer.extend([
                numpy_helper.from_array(np.array([0, 0, -1], np.int64), flat_shape),
                numpy_helper.from_array(flat_pooling_matrix(shape[2], shape[3], levels), matrix)])
            graph.node.extend([helper.make_node("Reshape", [layer.probe_name, flat_shape], [flat], name=flat),
                               helper.make_node("MatMul", [flat, matrix], [pooled], name=pooled)])
            add_output(pooled)
            outputs["pyramid"][layer.name] = pooled
        elif fixed_map:
            # A large map: the one product's matrix would grow with H*W (88 MB for 1024 x 1024), the rows and
            # the columns are pooled apart instead, rows @ map @ cols: every pair of levels, [N, C, L, L].
            rows, cols = pooling_matrices(shape[2], shape[3], levels)
            rows_name, cols_name, half, grid = (f"msq_pool_rows_{index}", f"msq_pool_cols_{index}",
                                                f"msq_pool_half_{index}", f"msq_grid_{index}")
            graph.initializer.extend([numpy_helper.from_array(rows, rows_name),
                                      numpy_helper.from_array(np.ascontiguousarray(cols), cols_name)])
            graph.node.extend([helper.make_node("MatMul", [layer.probe_name, cols_name], [half], name=half),
                               helper.make_node("MatMul", [rows_name, half], [grid], name=grid)])
            add_output(grid)
            outputs["grid"][layer.name] = grid
        else:
            if layer.probe_name not in views:  # the layers of one node (an LSTM's W and R) share one view
                added, constants, views[layer.probe_name] = layer.kind.batch_first(layer, f"msq_probe_{index}")
                graph.node.extend(added)
                graph.initializer.extend(constants)
            view = views[layer.probe_name]
            add_output(view)
            outputs["probe"][layer.name] = view
            if levels and layer.kind.channels_last and len(shapes.get(view) or ()) == 3:
                if view not in sequence_pyramids:
                    key = length_keys.get(view)
                    shared = matrices.get(key)
                    added, constants, sequence_pyramids[view], sharing = _sequence_pyramid(
                        view, f"msq_seq_{index}", levels, shared)
                    graph.node.extend(added)
                    graph.initializer.extend(constants)
                    if key is not None:
                        matrices.setdefault(key, sharing)
                    outputs["shared_lengths"] |= shared is not None
                    pooled, rows = sequence_pyramids[view]
                    add_output(pooled)
                    add_output(rows, TensorProto.INT64)
                outputs["sequence_pyramid"][layer.name] = sequence_pyramids[view]
        if not layer.kind.input_moments:
            continue  # token ids: no per-channel statistics
        key = (layer.input_name, layer.kind.channels_last, layer.op_type in ("Conv", "ConvTranspose"))
        if key in shared_moments:  # the layers that read one input (a query, key and value) share its moments
            outputs["moments"][layer.name] = shared_moments[key]
            continue
        x, rank = layer.input_name, _rank(model, layer.input_name)
        if rank is None and layer.kind.channels_last:
            # ONNX's shape inference stops at an op it does not know (ORT's SkipLayerNormalization, Attention):
            # the features on the last axis are the layer's input channels, every other index a row of them.
            channels = int(layer.kind.input_channel_index(layer).max()) + 1
            flat, flat_shape = f"msq_moment_rows_{index}", f"msq_moment_rows_shape_{index}"
            graph.initializer.append(numpy_helper.from_array(np.array([-1, channels], np.int64), flat_shape))
            graph.node.append(helper.make_node("Reshape", [x, flat_shape], [flat], name=flat))
            x, rank = flat, 2
        # a convolution's input has its weight's rank (silero-vad's 1-D ones, behind an If shape inference stops at)
        rank = rank or (len(layer.weight_shape) if layer.op_type in ("Conv", "ConvTranspose") else 2)
        axes = _moment_axes(layer, rank)
        mean, square, sq_mean = f"msq_mean_{index}", f"msq_sq_{index}", f"msq_sqmean_{index}"
        if loaded.opset >= 18:  # ReduceMean takes its axes as an input from opset 18 on
            axes_name = f"msq_axes_{index}"
            graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), axes_name))
            reduce_mean = lambda source, target: helper.make_node(  # noqa: E731
                "ReduceMean", [source, axes_name], [target], keepdims=0, name=target)
        else:
            reduce_mean = lambda source, target: helper.make_node(  # noqa: E731
                "ReduceMean", [source], [target], axes=axes, keepdims=0, name=target)
        if x in maps and not layer.kind.channels_last:  # per-channel means of the map and its square as pools
            graph.node.extend([helper.make_node("GlobalAveragePool", [x], [mean + "_g"], name=mean + "_g"),
                               reduce_mean(mean + "_g", mean),
                               helper.make_node("Mul", [x, x], [square], name=square),
                               helper.make_node("GlobalAveragePool", [square], [sq_mean + "_g"], name=sq_mean + "_g"),
                               reduce_mean(sq_mean + "_g", sq_mean)])
        else:
            graph.node.append(reduce_mean(x, mean))
            graph.node.append(helper.make_node("Mul", [x, x], [square], name=square))
            graph.node.append(reduce_mean(square, sq_mean))
        add_output(mean)
        add_output(sq_mean)
        outputs["moments"][layer.name] = shared_moments[key] = (mean, sq_mean)
    outputs["joins"] = residual_joins(loaded.model, measured, shapes, set(attention_mask_inputs(loaded)))
    outputs["candidates"] = list(dict.fromkeys(join for found in outputs["joins"].values() for join in found))
    for branch, skip, total in outputs["candidates"]:
        for tensor in (branch, total):
            if tensor not in outputs["power"]:
                power = outputs["power"][tensor] = f"msq_power_{len(outputs['power'])}"
                graph.node.append(helper.make_node("ReduceSumSquare", [tensor], [power], keepdims=0, name=power))
                add_output(power)
        for tensor in (branch, skip):
            if tensor not in outputs["size"]:
                size = outputs["size"][tensor] = f"msq_size_{len(outputs['size'])}"
                graph.node.append(helper.make_node("Size", [tensor], [size], name=size))
                add_output(size, TensorProto.INT64)
    if hessians:
        _add_hessians(loaded, model, outputs, add_output)
    _place_after_producers(graph, original_nodes)
    return loaded.judged_out(model), outputs


def _place_after_producers(graph: onnx.GraphProto, original_nodes: int) -> None:
    """Move each node added after the first `original_nodes` to just after the last node it reads from.

    Appended at the end, the reductions made ORT keep every activation they read alive until the end of a run:
    EfficientNet-Lite0's instrumented run held 43 MB over its session, 31 MB with each statistic taken where
    its tensor is made (two runs at once: 95 -> 74 MB, and 0.85 -> 0.69 s for 60 images)."""
    produced_at = {name: i for i, node in enumerate(graph.node[:original_nodes]) for name in node.output}
    after = [[] for _ in range(original_nodes + 1)]  # after[i + 1]: the added nodes that follow node i
    for node in graph.node[original_nodes:]:
        at = max((produced_at.get(name, -1) for name in node.input), default=-1)
        produced_at.update((name, at) for name in node.output)  # an added node's readers follow it in its slot
        after[at + 1].append(node)
    ordered = list(after[0])
    for i, node in enumerate(graph.node[:original_nodes]):
        ordered.append(node)
        ordered.extend(after[i + 1])
    del graph.node[:]
    graph.node.extend(ordered)


def row_dims(layer: Layer, probe_shape) -> list:
    """The dims of the layer's probe (samples first) whose product is its rows a sample: those between the
    samples' and the channels' axes where the kind has its channels last, else none (one row a sample: a map's
    channels come first, as for any Conv)."""
    return list(probe_shape[1:-1]) if layer.kind.channels_last and len(probe_shape) > 2 else []


def _hessian_candidates(loaded: LoadedModel, shapes: dict) -> dict:
    """layer -> ops.InputRows of the layers whose input Hessian can feed GPTQ. A layer whose input shape
    fixes too few rows per sample to ever fit it (a classifier's head: one row per sample) is left out
    before the pass; symbolic row counts are judged on the samples before the Hessian batches."""
    candidates = {}
    for index, layer in enumerate(loaded.layers):
        shape = shapes.get(layer.input_name)
        known = shape is not None and len(shape) >= 1 and all(d for d in shape[1:-1])
        rows_per_sample = int(np.prod(shape[1:-1])) if known else None
        if not layer.kind.input_moments or layer.fan_in > MAX_HESSIAN_FAN_IN or (
                rows_per_sample is not None
                and rows_per_sample * (HESSIAN_SAMPLES // 2) < MIN_ROWS_PER_INPUT * layer.fan_in):
            continue
        rows = layer.kind.input_rows(layer, f"msq_h{index}")
        if rows is not None:
            candidates[layer.name] = rows
    return candidates


def _add_hessians(loaded: LoadedModel, model: onnx.ModelProto, outputs: dict, add_output) -> None:
    """Per distinct input rows (ops.InputRows) of the candidates: the rows as [rows, K], an output the pass
    fetches only for the Hessian batches (HessianSums takes rows^T rows of them in numpy). A layer whose output
    reaches a LayerNorm or RMSNorm through Adds only (ops.row_normalizer) also has that norm's input fetched:
    each of its rows is weighed by the spread the norm divides it by (HessianSums)."""
    graph = model.graph
    readers = consumers(loaded.model.graph)  # the model's own readers, not the statistics added to this copy
    by_name = {layer.name: layer for layer in loaded.layers}
    for name, rows in _hessian_candidates(loaded, static_shapes(model)).items():
        layer = by_name[name]
        norm = row_normalizer(layer.output_name, readers) if layer.output_name else None
        key = rows.key if norm is None else f"{rows.key}|{norm.tensor}"  # the same rows, weighed apart
        if key not in outputs["hessian"]:
            if rows.output not in outputs["hessian"].values():
                graph.initializer.extend(rows.initializers)
                graph.node.extend(rows.nodes)
                add_output(rows.output)
            outputs["hessian"][key] = rows.output
            if norm is not None:
                if norm.exposed_by is not None:
                    _expose_skip_sum(graph, norm)
                if norm.tensor not in {output.name for output in graph.output}:
                    outputs["hessian_only"].add(norm.tensor)  # fetched with the rows, not on every run
                add_output(norm.tensor)
                outputs["norms"][key] = norm
        outputs["rows"][name] = key


def _expose_skip_sum(graph: onnx.GraphProto, norm) -> None:
    """Name the fused norm's optional sum output (ops.SKIP_SUM_OUTPUT) `norm.tensor`, once."""
    node = next(node for node in graph.node if node.output and node.output[0] == norm.exposed_by)
    if len(node.output) > SKIP_SUM_OUTPUT and node.output[SKIP_SUM_OUTPUT]:
        return
    while len(node.output) < SKIP_SUM_OUTPUT:
        node.output.append("")
    node.output.append(norm.tensor)


@contextmanager
def one_blas_thread():
    """numpy on one BLAS thread while it works between ONNX Runtime runs.

    Both ORT's and OpenBLAS's worker threads spin-wait after their work; on two cores the two pools took
    each other's cores: MiniLM-L6's calibration pass took 15.3 s with both pools, 8.7 s with one BLAS
    thread (ORT's spinning off instead: 10.5 s, and it slowed EfficientNet-Lite0's many small ops).
    """
    with blas_limit():
        yield


def blas_limit():
    """one_blas_thread's limit as an object, in force from now until its restore_original_limits(): for a limit
    that ends elsewhere than where it starts."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def make_session(model: onnx.ModelProto, optimize: bool = True, arena: bool = True,
                 pattern: bool = True, threads: int = 0, weights: str | None = None) -> ort.InferenceSession:
    """A CPU session for an in-memory model; one past protobuf's 2 GB goes through a file with external data.
    weights: the folder of the weights file a LoadedModel.session_copy() points into.

    optimize=False runs the graph as written: ORT's QDQ fusions assume a
    deployable QDQ model and change the numbers of a simulation graph (Q/DQ
    around a float-weight Conv measured 0.10 relative output error instead of
    0.001 with them on). arena=False returns each run's buffers to the system
    instead of keeping the largest set for the next run. pattern=False does
    without ORT's memory pattern, one pre-planned block for all of a run's
    tensors: an instrumented graph's many short-lived tensors make it large.
    threads: ORT's intra-op threads (0: its default, one per core).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failed run's reason is in the one line BadData gives, not in ORT's log lines
    options.enable_cpu_mem_arena = arena
    options.intra_op_num_threads = threads
    # The unoptimized simulation graphs hold many short-lived Q/DQ tensors: the plan set EfficientNet-Lite0's
    # peak (330 MB; 315 MB without it).
    options.enable_mem_pattern = pattern and optimize
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if weights is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", weights)
    if not is_large(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    if weights is not None:
        return _session_beside(model, options, weights)
    folder = TemporaryFolder("msq-session-")
    path = os.path.join(folder.name, "model.onnx")
    save_model_file(model, path)
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    session.msq_folder = folder  # removed when the session is
    return session


def _session_beside(model: onnx.ModelProto, options, weights: str) -> ort.InferenceSession:
    """A session of a session copy past 2 GB: saved in the weights' folder (its references are relative to the
    file), its own large tensors beside it; the caller's copy is left as it is (save_model_file would read the
    weights file back into it) and the files go with the session."""
    import weakref

    handle, path = tempfile.mkstemp(suffix=".onnx", prefix="session-", dir=weights)
    os.close(handle)
    throwaway = onnx.ModelProto()
    throwaway.CopyFrom(model)
    files = [path, path + ".data"]
    try:  # onnx moves the tensors still inline into the .data file; references without bytes stay as they are
        onnx.save_model(throwaway, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(files[1]))
        del throwaway
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except BaseException:
        _remove(files)
        raise
    session.msq_files = weakref.finalize(session, _remove, files)
    return session


def _remove(paths: list) -> None:
    for path in paths:
        try:
            os.remove(path)
        except OSError:
            pass


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


RUN_WORKERS = min(2, usable_cores())


PAIRED_RUN_LIMIT = 256 * 1024**2  # estimated tensor bytes of one run past which runs go one at a time
TENSORS_PER_INPUT = 100  # a run's tensors over its input's bytes, where shapes stay unknown (EfficientNet-Lite0: 88)


def _run_bytes(model: onnx.ModelProto, feed: dict) -> float:
    """The bytes of a run's tensors that shape inference sized, its symbolic dims read from the feed: an axis
    named 'sequence' in the inputs has the feed's length wherever it appears (a transformer's [N, T, T]); a
    first axis with neither size nor name is the batch."""
    batch = len(next(iter(feed.values())))
    named = {}
    for value in model.graph.input:
        if value.name in feed:
            for dim, size in zip(value.type.tensor_type.shape.dim, np.shape(feed[value.name])):
                if dim.dim_param:
                    named[dim.dim_param] = size
    total = 0.0
    for value in list(model.graph.value_info) + list(model.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else named.get(d.dim_param, batch if axis == 0 and not
                                                                      d.dim_param else None)
                for axis, d in enumerate(value.type.tensor_type.shape.dim)]
        if dims and all(dims):
            total += float(np.prod(dims, dtype=np.float64)) * 4
    return total


def run_workers(loaded: LoadedModel, feed: dict) -> int:
    """How many runs of this model ordered_runs puts in flight: RUN_WORKERS, or one where a run's tensors are
    large. Two runs hold two sets of tensors (EfficientNet-Lite0's pass: +40 MB); a segmentation network at
    1024 x 1024 or a large transformer at a long sequence would hold gigabytes. The estimate is the tensors
    shape inference sized on this feed (_run_bytes), or the input's bytes x TENSORS_PER_INPUT where fewer are
    known; the limit leaves room for the simulation graphs' Q/DQ copies and the results in flight (up to
    workers + QUEUED_AHEAD + 1 of them: a run's fetched outputs, a small part of its tensors)."""
    sized = _run_bytes(loaded.model, feed)
    given = sum(np.asarray(value).nbytes for value in feed.values()) * TENSORS_PER_INPUT
    return 1 if max(sized, given) > PAIRED_RUN_LIMIT else RUN_WORKERS


def run_threads(workers: int = RUN_WORKERS) -> int:
    """ORT's intra-op threads for a session that ordered_runs drives: the cores shared among two workers; one
    worker keeps ORT's own default (its count of physical cores, where the process's logical ones would
    double the threads on a host with hyper-threading)."""
    return 0 if workers <= 1 else max(1, usable_cores() // workers)


# Runs submitted beyond the ones running: a worker that finishes starts the next at once instead of waiting for
# the caller, which reads the samples and absorbs each result between its waits (MiniLM-L6's pass: 3.64-3.68 ->
# 3.46-3.54 s, both cores busy 1.76-1.79 -> 1.82-1.87 of its time; four ahead were no faster than two)
QUEUED_AHEAD = 2


def ordered_runs(run, items, workers: int, ahead: int = QUEUED_AHEAD):
    """Yield (item, run(item)) in the order of `items`, with up to `workers` runs at once, each on its own thread.

    One ORT session run from two threads, each on its own intra-op thread, instead of one run at a time on two:
    a transformer's small matrices and an instrumented graph's many reductions leave one of two threads idle
    inside a run (MiniLM-L6's instrumented graph, 120 texts: 2.43 s -> 1.96 s; EfficientNet-Lite0's 1.97 s ->
    1.51 s; outputs bit-identical). Results come back in order, so whatever sums them sums in the same order.
    While the caller holds one result, `workers` more runs go on and `ahead` more wait their turn:
    workers + ahead + 1 results can be alive at once.
    """
    if workers <= 1:
        for item in items:
            yield item, run(item)
        return
    pending = deque()
    with ThreadPoolExecutor(workers) as pool:
        try:
            for item in items:
                pending.append((item, pool.submit(run, item)))
                if len(pending) > workers + ahead:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            for _, future in pending:  # a consumer that stopped early (or failed) waits for no queued run
                future.cancel()


class BatchStream:
    """A stream of (feed, count) batches read in parts: `until(limit)` yields batches while their samples add up
    to at most `limit`, and keeps the batch that would pass it for the next part."""

    def __init__(self, batches):
        self.batches = iter(batches)
        self.held = None

    def more(self) -> bool:
        if self.held is None:
            self.held = next(self.batches, None)
        return self.held is not None

    def until(self, limit: float):
        total = 0
        while self.more():
            feed, count = self.held
            if total + count > limit:
                return
            self.held = None
            total += count
            yield feed, count


def padded_batches(samples, loaded: LoadedModel, batch_size: int):
    """Yield (feed, real_count) at the model's batch size: its own if fixed (the last batch padded), else ours."""
    fixed = any(spec.batch_fixed for spec in loaded.inputs)
    size = batch_of(loaded, batch_size)
    for feed in samples.batches(size):
        count = len(next(iter(feed.values())))
        if fixed and count < size:
            feed = {k: np.concatenate([v] + [v[-1:]] * (size - count)) for k, v in feed.items()}
        yield feed, count


@contextmanager
def progress(total: int, description: str, quiet: bool):
    """The progress bar of a loop of ONNX Runtime runs; numpy inside it runs on one BLAS thread."""
    from tqdm import tqdm

    with one_blas_thread(), tqdm(total=total, desc=description, unit="sample", leave=False, file=sys.stderr,
                                 disable=quiet or not sys.stderr.isatty()) as bar:
        yield bar


def imprint_selection(count: int, cap: int, seed: int) -> np.ndarray:
    """Which samples keep embeddings: all, or a seeded spread of `cap` of them.

    Not the first `cap`: an ImageFolder lists its samples class by class, and
    its first samples may hold one class only.
    """
    keep = np.zeros(count, bool)
    if count <= cap:
        keep[:] = True
    else:
        keep[np.random.default_rng(seed).choice(count, cap, replace=False)] = True
    return keep


def attention_mask_input(loaded: LoadedModel) -> str | None:
    """The integer [batch, sequence] input that marks real tokens, if the model takes one."""
    return next(iter(attention_mask_inputs(loaded)), None)


def attention_mask_inputs(loaded: LoadedModel) -> list:
    """Every integer or bool [batch, sequence] input named as a mask, in the model's order."""
    return [spec.name for spec in loaded.inputs
            if spec.dtype.kind in "iub" and len(spec.shape) == 2 and "mask" in spec.name.lower()]


def output_embedding(final: np.ndarray, max_dim: int, seed: int) -> np.ndarray:
    """[N, D] view of the FP32 task output for pseudo-labels: as is when [N, C], globally pooled when wider
    (a [N, T, C] or [N, C, H, W] output has no fixed flat size across batches)."""
    if final.ndim <= 2:
        return final.reshape(len(final), -1).astype(np.float32)
    return embed(final, (1,), max_dim, final.ndim == 3, seed)


def stacked_outputs(chunks: list, max_dim: int, seed: int) -> np.ndarray:
    """The output_embedding chunks of several batches as one [N, D] matrix. A flat output whose width varies
    between samples (a score per token, [N, T]: a token tagger's or a QA head's) is pooled over that width in
    segments, as a sequence's features are: it has no [N, C] of its own (np.concatenate failed on it)."""
    if len({chunk.shape[1:] for chunk in chunks}) <= 1:
        return np.concatenate(chunks)
    return np.concatenate([embed(chunk[:, None, :], DEFAULT_LEVELS, max_dim, False, seed) for chunk in chunks])


def _pass_session(model: onnx.ModelProto, workers: int, weights: str | None) -> ort.InferenceSession:
    try:
        # No memory pattern: EfficientNet-Lite0's pass peak 294 -> 253 MB at the same speed (6.76 / 6.68 s).
        return make_session(model, pattern=False, threads=run_threads(workers), weights=weights)
    except Exception as exc:
        raise BadModel(f"ONNX Runtime {ort.__version__} cannot load the model ({one_line(exc)}); "
                       "re-export it with standard ONNX ops.") from None


class _LengthsDiffer(Exception):
    """A run failed with sequences pooled by shared matrices: their lengths may not be what shape inference
    said (a model's own value_info can name them wrongly)."""


def run_pass(loaded: LoadedModel, samples, levels, max_dim: int, batch_size: int = 1,
             quiet: bool = False, seed: int = 0, hessians: bool = False, static_layers=None) -> PassStatistics:
    """_run_pass; again with a pooling matrix per sequence if a run fails with them shared."""
    try:
        return _run_pass(loaded, samples, levels, max_dim, batch_size, quiet, seed, hessians, share_lengths=True,
                         static_layers=static_layers)
    except _LengthsDiffer:
        pass  # retried past the handler, whose traceback would hold the failed attempt's session
    return _run_pass(loaded, samples, levels, max_dim, batch_size, quiet, seed, hessians, share_lengths=False,
                     static_layers=static_layers)


def _run_pass(loaded: LoadedModel, samples, levels, max_dim: int, batch_size: int, quiet: bool, seed: int,
              hessians: bool, share_lengths: bool, static_layers=None) -> PassStatistics:
    """The streamed pass; with `hessians`, each layer's input Hessians are summed over the last
    HESSIAN_SAMPLES samples in the same runs. Ranges only for the tensors the `static_layers` (None: all) read.

    The Hessians' rows are fetched for those samples only, and their products taken in numpy: one session
    for the whole pass. In the graph, the products needed a session of their own (ORT runs every node
    whatever is fetched), and their K x K outputs were copied out of every run (MiniLM-L6: 10.6 MB a run);
    the pass took 7.5 s without Hessians and 8.8 s with them that way. The samples before them tell how
    many rows each input has per sample, so only inputs that can reach GPTQ's rows are fetched (MiniLM-L6's
    four-times-wider FFN inputs never do)."""
    size = batch_of(loaded, batch_size)
    # A model's fixed batch pads the last one with copies of its last sample: they stay out of the Hessians.
    fixed_batch = any(spec.batch_fixed for spec in loaded.inputs)
    whole = samples.count - (samples.count % size if fixed_batch else 0)
    hessian_from = _hessian_start(whole, size) if hessians else samples.count
    model, outputs = build_instrumented(loaded, hessians and hessian_from < samples.count, levels, share_lengths,
                                        static_layers)
    mask_input = attention_mask_input(loaded)
    stream = BatchStream(padded_batches(samples, loaded, batch_size))
    workers = run_workers(loaded, stream.held[0]) if stream.more() else 1
    session = _pass_session(model, workers, loaded.weights_folder)
    del model
    hessian_only = set(outputs["hessian"].values()) | outputs["hessian_only"]
    # A sequence's pyramid comes pooled by the graph, but a padded batch pools its probes in numpy, over the
    # real tokens its mask marks (the graph's bins span the padding too)
    pooled = {name for pair in outputs["sequence_pyramid"].values() for name in pair}
    raw = {outputs["probe"][name] for name in outputs["sequence_pyramid"]} - {
        probe for name, probe in outputs["probe"].items() if name not in outputs["sequence_pyramid"]} - {
        output.name for output in loaded.model.graph.output}
    fetchable = [name for name in (o.name for o in session.get_outputs()) if name not in hessian_only]
    lean = {False: [name for name in fetchable if name not in raw],
            True: [name for name in fetchable if name not in pooled]}
    # the samples before the Hessian batches: no rows fetched
    gram = HessianSums(outputs["hessian"] if hessian_from == 0 else {}, outputs["norms"])
    measured = measured_layers(loaded)
    bank = FeatureBank([layer.name for layer in measured], levels, max_dim, seed)
    input_bank = FeatureBank(["input"], levels, max_dim, seed)
    imprinted = imprint_selection(samples.count, bank.max_samples, seed)
    # The input's features along the layout its first readers take: a sequence of feature vectors [N, T, F] read
    # by a MatMul is pooled over T (as channels first, its varying length made widths that would not stack).
    input_channels_last = any(layer.kind.channels_last for layer in measured
                              if layer.input_name == loaded.inputs[0].name)
    first_length_varies = len(loaded.inputs[0].shape) == 2 and loaded.inputs[0].shape[1] is None
    ranges: dict = {}
    # moment output -> its sum over the samples: the layers that read one input (a query, key and value) share it
    moment_sums: dict = {}
    moment_names = list(dict.fromkeys(name for pair in outputs["moments"].values() for name in pair))
    power_sum = dict.fromkeys(outputs["power"], 0.0)  # tensor -> its sum of squares over the pass
    broadcast = set()  # (branch, skip) of the Adds that broadcast their "skip" (an attention mask): no residual
    final_outputs = []
    rows: dict = {}
    tokens = []  # real tokens per sample, when an attention mask tells them from padding
    branches = {name: set() for name in outputs["conditions"]}  # If node -> the conditions its samples gave
    constant_conditions = {t.name: numpy_helper.to_array(t) for t in loaded.model.graph.initializer
                           if t.name in set(outputs["conditions"].values())}
    seen = 0

    def runner(session, gram):
        def run(batch):
            feed, count = batch
            gathered = gram.outputs() if count == len(next(iter(feed.values()))) else []  # padding stays out
            fetched = lean[bool(mask_input) and not np.all(feed[mask_input])]
            fetched = fetched + [name for name in gathered if name not in fetched]
            try:
                values = session.run(fetched, feed)
            except Exception as exc:
                if outputs["shared_lengths"]:
                    raise _LengthsDiffer from None
                raise BadData(f"the model cannot run on the calibration data ({one_line(exc)}); check the "
                              "data's shape, dtype and preprocessing against the model's input.") from None
            return dict(zip(fetched, values)), gathered
        return run

    # what the features read of each layer (its probe, or its pyramid pooled in the graph), by the layer's name
    layer_reads = [(layer.name, outputs[kind][layer.name]) for layer in measured
                   for kind in ("probe", "pyramid", "grid") if layer.name in outputs[kind]]
    layer_reads += [(layer, pooled[0]) for layer, pooled in outputs["sequence_pyramid"].items()]

    def absorb(feed, count, result, gathered):
        nonlocal seen
        for name, condition in outputs["conditions"].items():
            value = result.get(condition, feed.get(condition, constant_conditions.get(condition)))
            if value is not None:
                branches[name].update(bool(v) for v in np.unique(np.asarray(value)))
        if mask_input:
            tokens.extend(np.asarray(feed[mask_input][:count]).reshape(count, -1).sum(axis=1).tolist())
        final = loaded.judged_samples(result[loaded.judged], count)
        if count > 1:  # rows that are no samples (at 1 sample a run, a detector may keep 0 rows)
            rowless = [(name, value) for name, value in [(f"output '{loaded.judged}'", final)] + [
                (f"layer '{layer}'", result[name]) for layer, name in layer_reads if name in result]
                if value.ndim == 0 or len(value) < count]
            if rowless:
                raise BadData(_rows_text(loaded, *rowless[0], count))
        if np.issubdtype(final.dtype, np.floating) and not np.isfinite(final).all():
            broken = _nonfinite_weight(loaded)
            if broken is not None:
                raise BadModel(f"weight '{broken}' holds NaN or Inf values, and the FP32 model's outputs are NaN or "
                               "Inf; fix the weight or re-export the model.")
            raise BadData("the FP32 model produces NaN or Inf on the calibration data; check the samples' "
                          "scale and preprocessing (--mean, --std).")
        for tensor, name in outputs["power"].items():
            power_sum[tensor] += float(result[name])
        broadcast.update((branch, skip) for branch, skip, _ in outputs["candidates"]
                         if int(result[outputs["size"][branch]]) != int(result[outputs["size"][skip]]))
        for tensor, (lo, hi) in outputs["range"].items():
            low, high = 0.0 if lo is None else float(result[lo]), float(result[hi])
            if tensor in ranges:
                low, high = min(low, ranges[tensor][0]), max(high, ranges[tensor][1])
            ranges[tensor] = (low, high)
        for layer in measured:
            sequence = outputs["sequence_pyramid"].get(layer.name)
            if layer.name in outputs["pyramid"] or layer.name in outputs["grid"]:
                rows.setdefault(layer.name, []).append(1)  # a map: one row per sample, as for any Conv
            elif sequence and sequence[1] in result:
                rows.setdefault(layer.name, []).append(int(result[sequence[1]][1]))
            else:  # math.prod: np.prod of a tuple took 0.2 s of a MiniLM pass
                rows.setdefault(layer.name, []).append(math.prod(row_dims(layer,
                                                                          result[outputs["probe"][layer.name]].shape)))
        for name in moment_names:
            value = result[name] if count == 1 else result[name] * count  # x * 1 is x: the same sums
            if name in moment_sums:  # in place for an array; a 1-D input's 0-d moments are numpy scalars
                moment_sums[name] += value
            else:
                moment_sums[name] = 0 + value  # a new array (never ORT's), -0.0 made +0.0
        if gathered:
            gram.add({name: result[name] for name in gathered})
        chosen = imprinted[seen:seen + count]
        # A slice is a view; a mask copies every probe, so it is only used on batches that need one.
        pick = slice(0, count) if chosen.all() else np.flatnonzero(chosen)
        if chosen.any():
            mask = feed[mask_input][pick] if mask_input else None
            for layer in measured:
                if layer.name in outputs["pyramid"]:
                    bank.add_pyramid(layer.name, result[outputs["pyramid"][layer.name]][pick])
                    continue
                if layer.name in outputs["grid"]:
                    bank.add_pyramid(layer.name, grid_pyramid(result[outputs["grid"][layer.name]][pick], levels))
                    continue
                sequence = outputs["sequence_pyramid"].get(layer.name)
                if sequence and sequence[0] in result:
                    bank.add_pyramid(layer.name, result[sequence[0]][pick])
                    continue
                bank.add(layer.name, result[outputs["probe"][layer.name]][pick], layer.kind.channels_last, mask)
            first = feed[loaded.inputs[0].name][pick]
            if np.issubdtype(first.dtype, np.integer) and first.ndim == 2:
                input_bank.add_embedding("input", token_features(first, mask, max_dim, seed))
            elif first.ndim == 2 and first_length_varies:  # a waveform [N, T]: one channel pooled over T
                input_bank.add("input", first[:, None, :].astype(np.float32), False, mask)
            else:
                input_bank.add("input", first.astype(np.float32), input_channels_last, mask)
            final_outputs.append(output_embedding(final[pick], max_dim, seed))
        seen += count

    with progress(samples.count, "calibration pass", quiet) as bar:
        # Up to the batch that holds hessian_from (batches of differently shaped samples need not start on it),
        # then the rest, with the rows of the inputs worth a K x K product.
        for part in range(2):
            if part == 1 and hessian_from > 0 and stream.more():
                worth = {outputs["rows"][name] for name in _worth_gathering(loaded, rows, whole - seen)}
                gram = HessianSums({key: name for key, name in outputs["hessian"].items() if key in worth},
                                   outputs["norms"])
            batches = stream.until(hessian_from if part == 0 else float("inf"))
            for (feed, count), (result, gathered) in ordered_runs(runner(session, gram), batches, workers):
                absorb(feed, count, result, gathered)
                del result
                bar.update(count)
    for tensor, source in outputs["borrowed"].items():
        ranges[tensor] = ranges[source]
    joins = {name: next(((branch, total) for branch, skip, total in found if (branch, skip) not in broadcast), None)
             for name, found in outputs["joins"].items()}
    return PassStatistics(
        ranges=ranges,
        input_mean={k: moment_sums[mean] / seen for k, (mean, _) in outputs["moments"].items() if mean in moment_sums},
        input_sq={k: moment_sums[sq] / seen for k, (_, sq) in outputs["moments"].items() if sq in moment_sums},
        features=bank,
        input_features=input_bank,
        outputs=stacked_outputs(final_outputs, max_dim, seed),
        imprinted=np.flatnonzero(imprinted),
        samples=seen,
        rows={name: int(np.median(counts)) for name, counts in rows.items()},
        hessians=gram.by_layer(outputs["rows"]),
        tokens=float(np.mean(tokens)) if tokens else None,
        workers=workers,
        residual_share={name: power_sum[join[0]] / power_sum[join[1]] for name, join in joins.items()
                        if join is not None and power_sum[join[1]] > 0},
        branches=branches,
    )


# Sizes given the model's dynamic input dims, one per dim name, in two shape inferences: a tensor's dim that takes
# a name's size in both is that dim (small primes: within any position table, and no product of two is another)
_PROBE_SIZES = ((17, 23, 31, 41, 47, 59, 67, 73), (19, 29, 37, 43, 53, 61, 71, 79))


def estimated_rows(loaded: LoadedModel, samples, batch_size: int = 1) -> dict:
    """layer -> the rows a sample run_pass will count for it (its `rows`: the median over the batches), known
    before the pass, for the layers whose modes are timed on their rows (ops.OpKind.matmul_product). Shape
    inference, given sizes for the model's dynamic input dims (_PROBE_SIZES), tells which of them each probe's
    dims are: ONNX's symbols stop where a sequence's length goes through Shape, Slice or Range (MiniLM-L6's
    position embeddings), its data propagation does not. Those dims are read off the batches' shapes where the samples
    are held in memory (text, feeds) or share one shape their files' headers tell (.npz): nothing is read twice.
    A layer whose dims are not known so is left out."""
    layers = [layer for layer in loaded.layers if layer.kind.matmul_product]
    # (input, axis) -> its dim's name, or its axis where the model names none (or an exporter made the name up:
    # torch's list-form dynamic axes name each input's sequence apart)
    dynamic = {}
    for spec in loaded.inputs:
        named = spec.axis_names or []
        for axis, size in enumerate(spec.shape):
            if not size:
                dynamic[(spec.name, axis)] = axis_name(named[axis] if axis < len(named) else None) or ("axis", axis)
    names = list(dict.fromkeys(dynamic.values()))
    if not layers or len(names) > len(_PROBE_SIZES[0]):
        return {}
    sizes = [dict(zip(names, chosen)) for chosen in _PROBE_SIZES]
    runs = [_inferred_dims(loaded, {place: size[name] for place, name in dynamic.items()}) for size in sizes]
    name_of = {(sizes[0][name], sizes[1][name]): name for name in names}
    factors = {}  # layer -> its row dims: sizes, or the names of input dims to read
    for layer in layers:
        first, second = (run.get(layer.probe_name) for run in runs)
        if not first or not second or len(first) != len(second):
            continue
        found = [a if a is not None and a == b else name_of.get((a, b))
                 for a, b in zip(row_dims(layer, first), row_dims(layer, second))]
        if all(factor is not None for factor in found):
            factors[layer.name] = found
    read = {factor for found in factors.values() for factor in found if not isinstance(factor, int)}
    place = {name: where for where, name in reversed(list(dynamic.items()))}  # a dim name -> its first input dim
    uniform = samples.uniform_shapes() if read else None
    if uniform is not None and all(0 < place[name][1] <= len(uniform.get(place[name][0], ())) for name in read):
        # one shape every batch has (an .npz's)
        batches = [{name: uniform[place[name][0]][place[name][1] - 1] for name in read}]
    elif read and samples.held_in_memory:
        batches = [{name: feed[place[name][0]].shape[place[name][1]] for name in read}
                   for feed, _ in padded_batches(samples, loaded, batch_size)]
    else:
        factors = {name: found for name, found in factors.items() if not set(found) & read}
        batches = [{}]
    return {layer: int(np.median([math.prod(batch[f] if f in read else f for f in found) for batch in batches]))
            for layer, found in factors.items() if batches}


def _inferred_dims(loaded: LoadedModel, sizes: dict) -> dict:
    """tensor -> its dims (None: unknown) by ONNX's shape inference with data propagation, the model's inputs'
    dynamic dims given `sizes` ((input, axis) -> size); {} where the inference fails."""
    model = loaded.session_copy()  # its weights set aside: the inference reads no large tensor (MiniLM-L6: 2 ms)
    del model.graph.value_info[:]
    for value in model.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if (value.name, axis) in sizes:
                dim.Clear()
                dim.dim_value = sizes[(value.name, axis)]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - any failure only leaves the rows unknown
        return {}
    return {value.name: [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                         for d in value.type.tensor_type.shape.dim]
            for value in typed_values(inferred) if value.type.tensor_type.HasField("shape")}


def _nonfinite_weight(loaded: LoadedModel) -> str | None:
    """The first float initializer holding a NaN or an Inf: read only once the outputs are not finite."""
    return next((name for name, tensor in loaded.initializers.items() if tensor.data_type in _FLOAT_TYPES
                 and not np.isfinite(numpy_helper.to_array(tensor)).all()), None)


FLAT_POOLING_MAX = 1 << 21  # entries of a one-product pooling matrix (8 MB); larger maps pool rows and columns apart
HESSIAN_SAMPLES = 128  # split by parity: one half rounds (GPTQ), the other half judges the rounding
MAX_HESSIAN_FAN_IN = 4096  # a K x K matrix per distinct input: 64 MB at this size
MIN_ROWS_PER_INPUT = 4  # rows (tokens) per input feature in the fitting half, or GPTQ would overfit


def _rows_text(loaded: LoadedModel, name: str, value: np.ndarray, count: int) -> str:
    """Why a run's tensor holding fewer rows than its samples stops the pass, and the ways out: a model that takes
    one sample with no batch axis read along an axis that is none, or a layer whose rows are not samples (a
    time-major [T, N, E] product, a relative-position bias [T, T, H]) that only a run of one sample keeps apart."""
    ways = [] if any(spec.batch_fixed for spec in loaded.inputs) else ["run with --batch-size 1"]
    shapes = ", ".join(f"'{spec.name}' {spec.whole_text}" for spec in loaded.inputs)
    ways.append(f"if the model takes one sample a run with no batch axis, give each sample whole: {shapes}")
    return (f"{name} has {value.shape[0] if value.ndim else 0} row(s) in a run of {count} samples, not one a "
            f"sample along its first axis: {'; or, '.join(ways)}.")


def batch_of(loaded: LoadedModel, batch_size: int) -> int:
    fixed = [spec.shape[0] for spec in loaded.inputs if spec.batch_fixed]
    return fixed[0] if fixed else batch_size


def _hessian_start(count: int, batch: int) -> int:
    """The first sample of the Hessian batches: the last HESSIAN_SAMPLES, on a batch boundary, and at least
    two batches, one for each half, however large the batches."""
    start = count - max(HESSIAN_SAMPLES, 2 * batch)
    return max(0, start // batch * batch)


def _worth_gathering(loaded: LoadedModel, rows: dict, samples: int) -> set:
    """The Hessian candidates whose inputs, at their mean rows per sample so far, reach MIN_ROWS_PER_INPUT rows
    per input feature over the fitting half of `samples` (what HessianSums.by_layer checks on the rows
    gathered)."""
    candidates = _hessian_candidates(loaded, static_shapes(loaded.model))
    return {layer.name for layer in loaded.layers if layer.name in candidates and layer.name in rows
            and np.mean(rows[layer.name]) * (samples // 2) >= MIN_ROWS_PER_INPUT * layer.fan_in}


@dataclass
class InputHessians:
    fit: np.ndarray  # X^T X of the even samples' rows: what GPTQ rounds against
    check: np.ndarray  # X^T X of the odd samples' rows: what both roundings are judged on
    fit_sum: np.ndarray | None = None  # the rows' column sums and counts, to centre them
    check_sum: np.ndarray | None = None
    fit_rows: float = 0  # the rows, each counted at its weight (HessianSums: 1 unless a norm follows the layer)
    check_rows: float = 0

    def centred(self, mean: np.ndarray) -> "InputHessians":
        """sum (x - mean)(x - mean)^T per half: the error a rounding leaves once the bias correction (which
        subtracts the weight error times `mean`) has taken out its constant part. Without centring, an input
        with a large mean makes GPTQ spend itself on that one direction and the error look small: the
        120 x 6625 head of PP-OCRv4's recognizer measured 0.21% relative error at 2 bits, 1.04% centred."""
        mean = np.asarray(mean, np.float64)

        def centre(gram, total, rows):
            # G - s m^T - m s^T + n m m^T = G - u m^T - m u^T with u = s - n m / 2: two K x K float64 arrays at
            # a time, not five (a 4096-wide input's would be 320 MB)
            centred = gram.astype(np.float64)
            outer = np.outer(np.asarray(total, np.float64) - rows * mean / 2, mean)
            centred -= outer
            centred -= outer.T
            return centred.astype(np.float32)

        return InputHessians(centre(self.fit, self.fit_sum, self.fit_rows),
                             centre(self.check, self.check_sum, self.check_rows))


class HessianSums:
    """Running float32 sums of rows^T rows (and of the rows) per input, even and odd batches apart: memory
    stays flat in the number of samples. The rows of a few batches are stacked before their product: one
    product of 512 rows runs at 1.4x the speed of five of 93 (MiniLM-L6's texts). Added in the order of the
    batches, so the sums are the same on every run.

    Where a normalization follows the layer (`norms`: key -> ops.RowNormalizer), row r counts with weight
    1 / (spread_r + epsilon), the square of what the norm divides that row's error by: GPTQ then minimizes,
    and the table measures, the error the rest of the model sees. MiniLM-L6's residual rows spread up to 244x
    their median ([CLS] most): unweighed, their error counted as if the norm did not shrink it (docs/BENCHMARKS.md,
    round 19: --avg-bits 3 --prefer size on texts long enough for its FFN-down projections to reach GPTQ,
    cosine 0.9583 -> 0.9618 and 0.9582 -> 0.9619 on the two halves)."""

    STACKED_ROWS = 512

    def __init__(self, names: dict, norms: dict | None = None):
        self.names = names  # key -> the rows output, [rows, K]
        self.norms = {key: norm for key, norm in (norms or {}).items() if key in names}
        self.sums = {key: [None, None] for key in names}
        self.totals = {key: [None, None] for key in names}
        self.masses = {key: [0.0, 0.0] for key in names}  # the rows' weights summed (their count, unweighed)
        self.counts = {key: [0, 0] for key in names}
        self.pending = {key: [[], []] for key in names}  # (rows, each row's scale or None)
        self.misaligned = set()  # keys whose norm's rows are not the layer's
        self.batches = 0

    def outputs(self) -> list:
        return list(dict.fromkeys([*self.names.values(), *(norm.tensor for norm in self.norms.values())]))

    def add(self, values: dict) -> None:
        half = self.batches % 2  # whole batches alternate; at batch size 1, samples do
        self.batches += 1
        for key, name in self.names.items():
            if key in self.misaligned:
                continue
            rows = np.asarray(values[name], np.float32)
            scale = None
            if key in self.norms:
                scale = self._row_scales(self.norms[key], values[self.norms[key].tensor])
                if len(scale) != len(rows):  # row_normalizer follows Adds only: a broadcasting one lands here
                    self.misaligned.add(key)  # no Hessian then: the diagonal estimate serves
                    continue
                rows = rows * scale[:, None]
            self.pending[key][half].append((rows, scale))
            self.counts[key][half] += len(rows)
            if sum(len(block) for block, _ in self.pending[key][half]) >= self.STACKED_ROWS:
                self._take(key, half)

    @staticmethod
    def _row_scales(norm, normalized: np.ndarray) -> np.ndarray:
        """1 / sqrt(spread + epsilon) per row of the norm's input, the factor the norm multiplies it by."""
        normalized = np.asarray(normalized, np.float32)
        normalized = normalized.reshape(-1, normalized.shape[-1])
        spread = normalized.var(axis=1) if norm.centred else np.mean(np.square(normalized), axis=1)
        return (1.0 / np.sqrt(spread.astype(np.float64) + norm.epsilon)).astype(np.float32)

    def _take(self, key, half: int) -> None:
        blocks, self.pending[key][half] = self.pending[key][half], []
        if not blocks:
            return
        rows = blocks[0][0] if len(blocks) == 1 else np.concatenate([block for block, _ in blocks])
        gram, total = rows.T @ rows, self.sums[key][half]
        self.sums[key][half] = gram if total is None else np.add(total, gram, out=total)
        if blocks[0][1] is None:
            column_sums, mass = rows.sum(axis=0, dtype=np.float64), float(len(rows))
        else:  # the weighed rows' sums: sum w x = sum scale (scale x), and sum w = sum scale^2
            scales = np.concatenate([scale for _, scale in blocks]).astype(np.float64)
            column_sums, mass = scales @ rows.astype(np.float64), float(np.sum(scales ** 2))
        total = self.totals[key][half]
        self.totals[key][half] = column_sums if total is None else total + column_sums
        self.masses[key][half] += mass

    def by_layer(self, layer_keys: dict) -> dict:
        """{layer: InputHessians} for the inputs whose fitting half has MIN_ROWS_PER_INPUT rows per feature:
        GPTQ fitted on fewer rounds for those rows, not for the task."""
        for key in self.names:
            for half in range(2):
                self._take(key, half)
        result = {}
        for name, key in layer_keys.items():
            fit, check = self.sums.get(key, (None, None))
            if fit is not None and check is not None and key not in self.misaligned \
                    and self.counts[key][0] >= MIN_ROWS_PER_INPUT * fit.shape[0]:
                result[name] = InputHessians(fit, check, *self.totals[key], *self.masses[key])
        return result

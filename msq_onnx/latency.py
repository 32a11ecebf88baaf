"""Measured speed: how fast a dense layer runs in each activation mode, on this machine.

Which mode is fastest depends on the shape: for one row per sample (a CNN's
classifier) static QGemm/QLinearMatMul wins, for a transformer's 96 tokens
static QLinearMatMul measured 1.09x the time of dynamic int8 (MiniLM-L6,
1 thread). So the order is timed, not assumed: each distinct (rows, K, N)
becomes a one-node model in each mode, written the way write.py writes it,
and ONNX Runtime runs them interleaved on one thread; the median wins.
Conv has no dynamic kernel on CPU and its weight-only form is a float Conv
(1.8-3x static, ../shared/docs/ort-cpu-facts.md), so only dense layers are timed.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .ops import DYNAMIC, FLOAT, FLOAT_CONTAINER, INT2, INT4, INT8, STATIC, WEIGHT_ONLY

RUNS = 25
DENSE_MODES = (STATIC, DYNAMIC, WEIGHT_ONLY, FLOAT)
WARMUP = 3
OPSET = 21
IR_VERSION = 10  # what opset 21 needs; onnx 1.23 would stamp 14, which ORT 1.31 refuses


def _dense_model(rows: int, fan_in: int, fan_out: int, mode: str, bias: bool) -> onnx.ModelProto:
    from .write import _dense_nodes, _GraphEdit

    rng = np.random.default_rng(0)
    graph = helper.make_graph([], "timing", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, fan_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, fan_out])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    edit = _GraphEdit(model)
    q = edit.constant("w_q", rng.integers(-127, 128, (fan_in, fan_out)).astype(np.int8))
    s = edit.constant("w_s", np.full(fan_out, 0.01, np.float32))
    z = edit.constant("w_z", np.zeros(fan_out, np.int8))
    nodes = [] if mode in (DYNAMIC, FLOAT) else [helper.make_node("DequantizeLinear", [q, s, z], ["w_dq"], axis=1)]
    if mode == FLOAT:
        nodes = [helper.make_node("MatMul", ["x", edit.constant("w", rng.normal(size=(fan_in, fan_out))
                                                               .astype(np.float32))], ["y"])]
    elif mode == STATIC:  # the QDQ pattern ORT fuses into QLinearMatMul
        edit.constant("a_s", np.array(0.05, np.float32))
        edit.constant("a_z", np.array(128, np.uint8))
        nodes += [helper.make_node("QuantizeLinear", ["x", "a_s", "a_z"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "a_s", "a_z"], ["xdq"]),
                  helper.make_node("MatMul", ["xdq", "w_dq"], ["m"]),
                  helper.make_node("QuantizeLinear", ["m", "a_s", "a_z"], ["mq"]),
                  helper.make_node("DequantizeLinear", ["mq", "a_s", "a_z"], ["y"])]
    else:
        matmul = helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")
        nodes += _dense_nodes(matmul, mode, "t", "w_dq", q, s, z, edit)
    if bias:  # a float bias Add after the layer: dynamic and weight-only kernels absorb it, static cannot
        nodes[-1].output[0] = "pre_bias"
        nodes.append(helper.make_node("Add", ["pre_bias", edit.constant("b", np.zeros(fan_out, np.float32))], ["y"]))
    model.graph.node.extend(nodes)
    edit.drop_unused()
    return model


def cache_path() -> str:
    """Per machine and ONNX Runtime version: a timing is measured once, then every conversion on this
    machine makes the same choice (the output stays byte-identical from run to run). The machine is its CPU model
    and instruction sets too: a home folder that moves from an AVX512-VNNI host to an AVX2 one (where ORT's integer
    kernels run slower and saturate) must not reuse the other's timings."""
    import onnxruntime as ort

    root = os.environ.get("MSQ_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "msq-onnx")
    return os.path.join(root, f"latency-ort{ort.__version__}-{platform.machine()}-{os.cpu_count()}cpu-"
                              f"{cpu_signature()}.json")


_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimddp", "i8mm", "sve")


@functools.lru_cache(maxsize=None)
def cpu_signature(cpuinfo: str = "/proc/cpuinfo") -> str:
    """Eight hex digits of the CPU's model and the instruction sets ORT's kernels choose between; the platform's
    processor string where /proc/cpuinfo is missing (macOS, Windows)."""
    import hashlib

    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            text = handle.read(1 << 20)
    except OSError:
        text = ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.lower().startswith(("model name", "cpu model", "hardware"))), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.lower().startswith(("flags", "features"))), []))
    described = f"{model}|{','.join(f for f in _ISA_FLAGS if f in flags)}"
    return hashlib.sha256(described.encode()).hexdigest()[:8]


def _load_cache() -> dict:
    try:
        with open(cache_path(), encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store_cache(key: str, times: dict) -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _load_cache()
        data[key] = times
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".latency-")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError:
        pass  # an unwritable cache only costs a re-measurement


def row_bucket(rows: int) -> int:
    """Rows rounded up to a power of two: 90 and 96 tokens share one timing."""
    return 1 << max(0, int(rows) - 1).bit_length()


def dense_mode_times(rows: int, fan_in: int, fan_out: int, bias: bool = False) -> dict:
    """{mode: median seconds} of a [rows, fan_in] x [fan_in, fan_out] layer in each mode, cached."""
    key = f"dense {row_bucket(rows)}x{fan_in}x{fan_out}{' +bias' if bias else ''}"
    return _cached_times(key, DENSE_MODES, lambda: _time_dense(row_bucket(rows), fan_in, fan_out, bias))


@functools.lru_cache(maxsize=256)
def _time_dense(rows: int, fan_in: int, fan_out: int, bias: bool) -> dict:
    feed = {"x": np.random.default_rng(1).normal(size=(rows, fan_in)).astype(np.float32)}
    return dict(zip(DENSE_MODES, _time([_dense_model(rows, fan_in, fan_out, m, bias) for m in DENSE_MODES], feed)))


ABSOLUTE_TIE = 10e-6  # differences of microseconds, which no model's latency shows, are a tie
TIE = 1.05  # and so are timings within 5% on a noisy machine: the registry's order (static first) then holds
# Conv is not timed: on ResNet-18/MobileNetV2-like nets static QLinearConv measured 0.30-0.44x FP32
# (../shared/docs/ort-cpu-facts.md). Relative to static: FP32 Conv 1/0.30; a weight-only int8 weight is folded
# into a float one when ORT loads the model (write.folds_at_load), so it runs as FP32's does.
CONV_COSTS = {STATIC: 1.0, FLOAT: 3.3, WEIGHT_ONLY: 3.3}


def mode_costs(layer, rows: int | None) -> dict:
    """{mode: cost} for the layer's allowed modes; only ratios between one layer's modes are meaningful."""
    if not layer.kind.matmul_product or not rows:
        return {mode: CONV_COSTS.get(mode, 1.0 + index) for index, mode in enumerate(layer.kind.modes + (FLOAT,))}
    fan_out = layer.weight_shape[layer.out_axis]
    times = dense_mode_times(int(rows), layer.params // fan_out, fan_out, layer.bias_name is not None)
    return {mode: times[mode] for mode in layer.kind.modes + (FLOAT,)}


def mode_order(layer, costs: dict) -> tuple:
    """The layer's allowed modes, fastest first; near-ties keep the registry's order."""
    fastest = min(costs[m] for m in layer.kind.modes)
    tie = max(fastest * TIE, fastest + ABSOLUTE_TIE) if layer.kind.matmul_product else fastest * TIE
    return tuple(sorted(layer.kind.modes, key=lambda m: 0.0 if costs[m] <= tie else costs[m]))


def _conv_model(node, weight_shape: tuple, input_shape: list, mode: str) -> onnx.ModelProto:
    """The layer's own Conv (attributes and all) on a batch-1 input, written as the mode runs it: weight-only as
    write.py folds an int8 weight (pipeline.folds_weights), "int8" and "int4" as a DequantizeLinear of such a weight."""
    from .write import _GraphEdit, folded_weight_nodes, packed_tensor

    rng = np.random.default_rng(0)
    graph = helper.make_graph([], "timing", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    edit = _GraphEdit(model)
    out = weight_shape[0]
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bias = [edit.constant("b", np.zeros(out, np.float32))] if node.op_type == "Conv" else []
    if mode == FLOAT:
        weight = edit.constant("w", rng.normal(size=weight_shape).astype(np.float32) * 0.01)
        nodes = [helper.make_node(node.op_type, ["x", weight] + bias, ["y"], **attributes)]
    else:
        axis = 0 if node.op_type == "Conv" else 1
        scale = np.full(weight_shape[axis], 0.01, np.float32)
        if mode == INT4:
            model.graph.initializer.append(packed_tensor("w_q", rng.integers(-7, 8, weight_shape), INT4))
        else:
            edit.constant("w_q", rng.integers(-127, 128, weight_shape).astype(np.int8))
        if mode == WEIGHT_ONLY:
            nodes = folded_weight_nodes("w_q", scale, axis, len(weight_shape), "w", edit)
        else:
            nodes = [helper.make_node("DequantizeLinear", ["w_q", edit.constant("w_s", scale)], ["w_dq"], axis=axis)]
        if mode == STATIC:  # the QDQ pattern ORT fuses into QLinearConv
            edit.constant("a_s", np.array(0.05, np.float32))
            edit.constant("a_z", np.array(128, np.uint8))
            nodes += [helper.make_node("QuantizeLinear", ["x", "a_s", "a_z"], ["xq"]),
                      helper.make_node("DequantizeLinear", ["xq", "a_s", "a_z"], ["xdq"]),
                      helper.make_node(node.op_type, ["xdq", "w_dq"] + bias, ["m"], **attributes),
                      helper.make_node("QuantizeLinear", ["m", "a_s", "a_z"], ["mq"]),
                      helper.make_node("DequantizeLinear", ["mq", "a_s", "a_z"], ["y"])]
        else:
            nodes.append(helper.make_node(node.op_type, ["x", "w_dq"] + bias, ["y"], **attributes))
    model.graph.node.extend(nodes)
    return model


def _time(models: list, feed: dict) -> list[float]:
    from .verify import interleaved_medians, single_thread_sessions

    sessions = single_thread_sessions(models)
    interleaved_medians(sessions, feed, WARMUP)
    return interleaved_medians(sessions, feed, RUNS)


def _cached_times(key: str, modes: tuple, measure) -> dict:
    """{mode: seconds} from this machine's cache, else measured once and stored."""
    cached = _load_cache().get(key)
    if isinstance(cached, dict) and set(cached) == set(modes):
        return cached
    times = measure()
    _store_cache(key, times)
    return times


def dequantize_seconds(values: int, container: str = "int8") -> float:
    """Median seconds of a DequantizeLinear of `values` weights stored in `container` (int8, int4 or int2; its
    output read once, by a ReduceMax, as the op that takes it reads it once), on one thread; cached per size. An
    int4 weight takes about 3.5x an int8 one's time (a review's [2, 2048, 512] weight: 2.38 against 0.66 ms)."""
    from .write import INT2_OPSET, packed_tensor

    def measure() -> dict:
        integers = np.random.default_rng(2).integers(-1, 2, values).astype(np.int8)
        graph = helper.make_graph(
            [helper.make_node("DequantizeLinear", ["q", "s"], ["w"]),
             helper.make_node("ReduceMax", ["w"], ["y"], keepdims=0)], "dequantize",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
            [numpy_helper.from_array(np.array(0.01, np.float32), "s"), packed_tensor("q", integers, container)])
        opset = INT2_OPSET if container == "int2" else OPSET
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  ir_version=helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))
        return {WEIGHT_ONLY: _time([model], {"x": np.zeros(1, np.float32)})[0]}

    key = f"DequantizeLinear {container} initializer x {values}"
    return _cached_times(key, (WEIGHT_ONLY,), measure)[WEIGHT_ONLY]


def conv_mode_times(node, weight_shape: tuple, input_shape: list) -> dict:
    """{mode: median seconds} of one convolution at batch 1 in static, weight-only (int8, folded at load), float,
    and on an int8 and an int4 weight dequantized in every run, cached."""
    attributes = sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute)
    key = f"{node.op_type} {list(weight_shape)} on {input_shape} {attributes}"
    modes = (STATIC, WEIGHT_ONLY, FLOAT, INT8, INT4)

    def measure() -> dict:
        feed = {"x": np.random.default_rng(1).normal(size=input_shape).astype(np.float32)}
        return dict(zip(modes, _time([_conv_model(node, weight_shape, input_shape, m) for m in modes], feed)))

    return _cached_times(key, modes, measure)


def layer_seconds(loaded, rows: dict) -> dict | None:
    """{layer: {mode: seconds at batch 1}} for every layer, or None when a shape is not known."""
    shapes = {v.name: v.type.tensor_type.shape for v in list(loaded.model.graph.value_info) +
              list(loaded.model.graph.input)}
    nodes = {n.name: n for n in loaded.model.graph.node}
    result = {}
    for layer in loaded.layers:
        if not layer.kind.timed:
            # A lookup costs microseconds either way; an LSTM's or Attention's weight written as a DequantizeLinear
            # is dequantized every run, once for all the nodes that share it (weight-only: folded at load).
            result[layer.name] = {WEIGHT_ONLY: 0.0, FLOAT: 0.0}
            if layer.kind.dequantized_every_run:
                result[layer.name].update({container: dequantize_seconds(layer.params, container)
                                           for container in (INT8, INT4, INT2)})
            continue
        if layer.kind.matmul_product:
            fan_out = layer.weight_shape[layer.out_axis]
            times = dense_mode_times(int(rows.get(layer.name) or 1), layer.params // fan_out, fan_out,
                                     layer.bias_name is not None)
            result[layer.name] = {mode: times[mode] * len(layer.nodes) for mode in times}
            continue
        shape = shapes.get(layer.input_name)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim] if shape is not None else []
        if len(dims) < 3 or any(d is None or d <= 0 for d in dims[1:]):
            return None
        times = conv_mode_times(nodes[layer.name], layer.weight_shape, [1] + dims[1:])
        result[layer.name] = {mode: value * len(layer.nodes) for mode, value in times.items()}
    return result


def width_seconds(layer, seconds: dict, mode: str, container: str, folded: bool = True) -> float:
    """What one layer costs at batch 1 in the mode and container a width gives it. A weight-only int8 weight is
    folded at load where `folded` (pipeline.folds_weights; write.folds_at_load: taken as folded here, though a
    Conv behind a static neighbour keeps a DequantizeLinear that ORT fuses); any other weight-only weight (an int4
    Conv's, an LSTM's with --prefer size) is dequantized in every run, as timed per container where it was."""
    if container == FLOAT_CONTAINER:
        return seconds[FLOAT]
    if mode != WEIGHT_ONLY:
        return seconds.get(mode, seconds[FLOAT])
    if container == INT8 and folded:
        return seconds[WEIGHT_ONLY]
    return seconds.get(container, seconds[WEIGHT_ONLY])

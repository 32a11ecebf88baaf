"""What msq-onnx knows about each weighted op kind, in one place.

A new op kind is one entry here: how to recognise its weight and bias, the
weight's output-channel axis and its [out, fan_in] matrix view, where the
features of its activation input sit, and which activation modes ONNX
Runtime can run it in. load.py finds layers, weights.py quantizes them,
instrument.py measures them and write.py emits them through this registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

# Activation modes, the way each one runs on ONNX Runtime's CPU provider
# (../shared/docs/ort-cpu-facts.md, measured at batch 1):
STATIC = "static"  # uint8 Q/DQ from calibrated ranges -> QLinearConv / QGemm / QLinearMatMul (fastest)
DYNAMIC = "dynamic"  # DynamicQuantizeLinear + MatMulInteger -> DynamicQuantizeMatMul (0.43x FP32 on MiniLM)
WEIGHT_ONLY = "weight-only"  # float activations, DQ(weight) -> op; MatMul becomes MatMulNBits
FLOAT = "float"  # not quantized
MODES = (STATIC, DYNAMIC, WEIGHT_ONLY, FLOAT)
FLOAT_BITS = 32  # a float layer's width in budgets: leaving a layer out never meets a budget


# A Relu or Clip that is the only user of a tensor is removed by ORT's QDQ quantizer (its
# adjust_tensor_ranges): the tensor is quantized on the activation's output range, whose saturation is
# the activation. So that tensor's own range is never used, and the calibration pass does not measure it.
_ABSORBED = ("Relu", "Clip")


# Ops whose output is never negative. The uint8 range of such a tensor starts at 0 whatever its smallest value
# (ORT's quantizer and msq-onnx widen every activation range to hold 0), so the calibration pass measures only
# its maximum: on EfficientNet-Lite0 the ReduceMin of each ReLU6 map also made ORT copy the map out of its
# blocked layout (33 ReduceMins and 11 map copies fewer; an instrumented run 19.63 -> 18.81 ms on one thread).
_NONNEGATIVE = ("Relu", "Sigmoid", "HardSigmoid", "Softmax")


def nonnegative_tensors(model: onnx.ModelProto) -> set:
    """Outputs of _NONNEGATIVE ops, and of Clips whose lower bound is a constant >= 0 and whose upper bound, if
    any, is a constant >= 0 too (a Clip whose max is below its min returns its max)."""
    initializers = {t.name: t for t in model.graph.initializer}

    def bound(node, name: str, index: int, absent: float) -> float | None:
        """A Clip bound: its attribute (opset < 11), its constant input, `absent` without one, None if unknown."""
        attribute = next((a.f for a in node.attribute if a.name == name), None)
        if attribute is not None:
            return attribute
        if len(node.input) <= index or not node.input[index]:
            return absent
        if node.input[index] not in initializers:
            return None  # computed at run time
        values = onnx.numpy_helper.to_array(initializers[node.input[index]])
        return float(values.reshape(-1)[0]) if values.size == 1 else None

    names = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _NONNEGATIVE:
            names.add(node.output[0])
        elif node.op_type == "Clip":
            low, high = bound(node, "min", 1, -np.inf), bound(node, "max", 2, np.inf)
            if low is not None and high is not None and low >= 0 and high >= 0:
                names.add(node.output[0])
    return names


def bodies(node) -> list:
    """The subgraphs a node holds (If's branches, Loop's and Scan's bodies)."""
    return [body for attr in node.attribute
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs))]


def subgraph_inputs(graph) -> set:
    """Every tensor name read inside an If/Loop/Scan body (outer-scope values included)."""
    return set().union(*(body_reads(node) for node in graph.node))


def body_reads(node) -> set:
    """Every name read inside one node's If/Loop/Scan bodies, and the bodies inside them."""
    names = set()
    for body in bodies(node):
        names.update(name for inner in body.node for name in inner.input)
        names |= subgraph_inputs(body)
    return names


def range_sources(model: onnx.ModelProto) -> dict:
    """Node output -> the tensor whose range its static quantization uses (itself, or the Relu/Clip
    output that absorbs it)."""
    users: dict = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    result = {}
    for node in model.graph.node:
        for name in node.output:
            following = users.get(name, [])
            absorbed = (len(following) == 1 and following[0].op_type in _ABSORBED and following[0].input[0] == name
                        and name not in graph_outputs)  # its data input, not a Clip's min or max
            result[name] = following[0].output[0] if absorbed else name
    return result


# Ops that stay in the integer domain between static layers, as ORT's QDQ
# quantizer handles them on CNNs; "first": only the data input matters.
_STATIC_PASSTHROUGH = {"Relu": "all", "Clip": "first", "LeakyRelu": "all", "Sigmoid": "all", "HardSwish": "all",
                       "HardSigmoid": "all", "Add": "all", "Mul": "all", "Concat": "all", "MaxPool": "all",
                       "AveragePool": "all", "GlobalAveragePool": "all", "Reshape": "first", "Flatten": "all",
                       "Transpose": "all", "Squeeze": "first", "Unsqueeze": "first", "Resize": "first",
                       "Pad": "first", "Split": "first", "Slice": "first"}


def static_region(model: onnx.ModelProto, static_nodes: set) -> list[str]:
    """The nodes handed to ORT's static quantizer: the static layers and the ops fed only by them.

    Anything else (LayerNorm, Softmax, a Gather table, the layers in other
    modes) is never quantized by ORT behind the tool's back.
    """
    initializers = {t.name for t in model.graph.initializer}
    graph_outputs = {o.name for o in model.graph.output}
    inner = subgraph_inputs(model.graph)
    included = set(static_nodes)
    produced = {out for node in model.graph.node if node.name in included for out in node.output}
    for node in model.graph.node:  # graph order is topological
        rule = _STATIC_PASSTHROUGH.get(node.op_type)
        if node.name in included or rule is None:
            continue
        if node.op_type in _ABSORBED and (node.input[0] in graph_outputs or {node.input[0], node.output[0]} & inner):
            # ORT's quantizer would give a graph output the activation's range and clip it (>= 0), or drop the
            # activation and leave the If/Loop body that reads its input or output the other tensor
            continue
        data = [i for i in (node.input[:1] if rule == "first" else node.input) if i]
        if node.op_type in ("Add", "Mul") and any(i in initializers for i in data):
            continue  # a constant operand (a MatMul's bias) would be quantized as an activation
        activations = [i for i in data if i not in initializers]
        if activations and all(i in produced for i in activations):
            included.add(node.name)
            produced.update(node.output)
    return [node.name for node in model.graph.node if node.name in included]


# Ops whose output ORT's QDQ quantizer writes with its data input's quantization (quantize_output_same_as_input in
# onnxruntime/quantization/operators): a uint16 override on such an output is not read, the input's uint8 is.
_SHARED_QUANTIZATION = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "AveragePool", "Slice", "Split",
                        "MaxPool", "Resize", "Pad"}


def shares_quantization(node: onnx.NodeProto, constants: dict) -> bool:
    """Whether ORT's static quantizer gives node's outputs its data input's quantization (node in the static
    region). A Pad does where its padding holds input values or 0 (constants: name -> array, its pad value)."""
    if node.op_type not in _SHARED_QUANTIZATION:
        return False
    if node.op_type != "Pad":
        return True
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
    if mode != b"constant":
        return True
    value = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
    return value is not None and np.issubdtype(value.dtype, np.floating) and float(np.ravel(value)[0]) == 0.0


def static_tensors(model: onnx.ModelProto, static_nodes: set) -> set:
    """The tensors whose ranges a static quantization of any of `static_nodes` reads: the inputs and outputs
    of static_region with all of them static (a region only grows with its static set), and the activations
    whose ranges those take (range_sources)."""
    region = set(static_region(model, static_nodes))
    tensors = {name for node in model.graph.node if node.name in region
               for name in list(node.input) + list(node.output) if name}
    sources = range_sources(model)
    for name in list(tensors):
        while sources.get(name, name) != name:  # Conv -> Relu -> Clip: the last activation's range
            name = sources[name]
            tensors.add(name)
    return tensors


@dataclass
class Layer:
    """One allocation unit: a weight tensor and the node(s) that use it."""

    name: str
    op_type: str
    weight_name: str
    input_name: str  # activation input, for range and moment statistics
    probe_name: str  # tensor the next layer consumes
    weight_shape: tuple
    out_axis: int  # per-channel axis of the weight
    group: int = 1
    bias_name: str | None = None
    transposed_weight: bool = False  # Gemm transB=0 / MatMul: weight is [in, out]
    # How a weight-induced output shift maps onto the bias: Gemm adds beta*C
    # to alpha*A*B; None where a bias cannot absorb it exactly (ConvTranspose
    # with stride spreads each tap over several outputs).
    bias_factor: float | None = 1.0
    # Every node that reads this weight: a shared weight is one unit with one width.
    nodes: tuple = ()
    output_name: str = ""  # the node's own output (before bias, activation, residual)
    gemm_alpha: float = 1.0  # Gemm only: rewritten as MatMul for the dynamic and weight-only modes
    block: int = 0  # Gather only: scales per block of this many values along a table row
    weight_input: int = -1  # the node input the weight is (-1: the kind's weight_index); an LSTM has two
    # The If/Loop/Scan node whose body holds the layer's node(s) ("If 'If_0'"), "" for the graph's own: no tensor
    # of a body can be fetched, so such a layer is measured on its weights alone (in_body)
    in_body: str = ""
    # per node of an in_body layer, (the graph's own If node, the attribute of its branch) around it at any depth, or
    # () where none is: the pass records which branches the samples take
    branches: tuple = ()

    def __post_init__(self):
        if not self.nodes:
            self.nodes = (self.name,)

    @property
    def params(self) -> int:
        return int(np.prod(self.weight_shape))

    @property
    def fan_in(self) -> int:
        """Weights per output channel: the length of a row of the [out, fan_in] matrix view."""
        return self.params // self.weight_shape[self.out_axis]

    @property
    def kind(self) -> "OpKind":
        return in_body(REGISTRY[self.op_type]) if self.in_body else REGISTRY[self.op_type]

    @property
    def weight_position(self) -> int:
        return self.kind.weight_index if self.weight_input < 0 else self.weight_input


class Skip(Exception):
    """A node of a known kind that cannot be a layer; the message says why (it is reported)."""


def attribute(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# Containers: how a weight's integers are stored in the written file.
INT8, INT4, INT2, FLOAT_CONTAINER = "int8", "int4", "int2", "float"
CONTAINER_BITS = {INT8: 8, INT4: 4, INT2: 2, FLOAT_CONTAINER: 32}
PREFER = ("speed", "size")


@dataclass(frozen=True)
class OpKind:
    op_type: str
    modes: tuple  # allowed activation modes, in the registry's order (static first)
    channels_last: bool = False  # MatMul activations keep features on the last axis, Conv/Gemm on axis 1
    weight_index: int = 1  # which input is the weight; the activation input is the other of inputs 0 and 1
    input_moments: bool = True  # the activation input is a float tensor with per-channel statistics
    bias_index: int | None = 2  # the input a constant bias sits in (MatMul: its Add; recurrent ops: left float)
    timed: bool = True  # False: weight-only runs the float op on a looked-up or dequantized weight, as float does
    dequantized_every_run: bool = False  # ... and dequantizes the whole weight every run where it is written as a DQ
    read_where_gathered: bool = False  # an FP32 session reads the weight's rows only where the op gathers them
    # ORT runs its weight-only form on a kernel of its own that reads the quantized weight (MatMulNBits,
    # DynamicQuantizeMatMul, GatherBlockQuantized): nothing to fold into a float weight at load (write.folds_at_load)
    weight_only_kernel: bool = False
    # MatMul and Gemm, x @ W: their dynamic and weight-only forms are written as a MatMul on a [K, N] weight
    # (write._dense_nodes), which ORT runs as DynamicQuantizeMatMul and MatMulNBits; their modes are timed on the
    # layer's rows (latency.dense_mode_times)
    matmul_product: bool = False
    domain: str = ""  # the op's domain ("": ONNX's own)

    @property
    def data_index(self) -> int:
        return 1 - self.weight_index

    def weights(self, node) -> tuple:
        """(input position, the activation tensor it multiplies, suffix of the layer's name) per weight of the
        node: one layer each."""
        return ((self.weight_index, node.input[self.data_index], ""),)

    def constant_inputs(self, node) -> list:
        """Inputs that load.py folds into initializers where an exporter computes them from constants."""
        return [position for position, _, _ in self.weights(node)]

    def probe(self, node) -> str | None:
        """The tensor whose features the layer's predictor reads, where the kind fixes it (None: load.py
        follows the node's output through its bias, residual add and activation)."""
        return None

    def batch_first(self, layer: "Layer", prefix: str) -> tuple[list, list, str]:
        """Nodes and initializers giving the layer's probe with the samples on axis 0, as the features read
        it, and its name: the probe itself for every kind but the recurrent ones."""
        return [], [], layer.probe_name

    def float_input_channels(self, node, weight_shape) -> tuple[int, int] | None:
        """(axis, size) of the node's data input along which a DequantizeLinear may repeat its one scale, where
        ORT's optimizer would otherwise round this kind's weight or bias itself; None for the kinds it leaves
        alone. ORT's WeightBiasQuantization gives a float Conv, ConvTranspose or Gemm weight one symmetric int8
        scale for the whole tensor, and a float bias int32 on input scale x weight scale, when the node reads a
        per-tensor DequantizeLinear and feeds a QuantizeLinear (through at most a Relu or Clip), and then fuses
        it into an integer kernel: a float layer between two static ones ran so, and a weight-only one's
        near-dead channel overflowed its int32 bias (write.shield_from_ort_rounding)."""
        return None

    def container(self, layer, bits: int, mode: str, prefer: str) -> str:
        """The narrowest container ONNX Runtime runs for this layer, width, mode and objective.

        speed: int8 everywhere (the fused integer kernels take int8 and only use
        the k-bit levels); size: int4 where the runtime can run it.
        """
        if mode == FLOAT or bits >= FLOAT_BITS:
            return FLOAT_CONTAINER
        return INT4 if prefer == "size" and bits <= 4 else INT8

    def mode_for(self, container: str, mode: str) -> str:
        """The mode a container forces: int8 is the only one every mode takes."""
        return mode

    def stored_scale(self, scale: np.ndarray) -> np.ndarray:
        """The scales as the file stores them (the weights are simulated with exactly these)."""
        return scale.astype(np.float32)

    def has_room(self, layer, bits: int, mode: str, prefer: str) -> bool:
        """The width's container is wider than the width (3 bits in int4, 2-7 in int8): its grid's extra level
        may sit on either side (weights.search_clips' mirror)."""
        return CONTAINER_BITS[self.container(layer, bits, mode, prefer)] > bits

    def takes_level_set(self, layer, bits: int, mode: str, prefer: str) -> bool:
        """The width's container holds any 7-bit integers with one scale per row (an int8 container): the
        width's 2^k levels may be placed unevenly (weights.shared_levels), where a narrow container's integers
        are the levels themselves."""
        return self.container(layer, bits, mode, prefer) == INT8 and not self.scale_block(layer, bits, prefer)

    def container_bytes(self, layer: "Layer", container: str) -> int:
        """Bytes the written weight takes: packed integers and one float scale per channel."""
        if container == FLOAT_CONTAINER:
            return 4 * layer.params
        return -(-layer.params * CONTAINER_BITS[container] // 8) + 4 * layer.weight_shape[layer.out_axis]

    def scale_block(self, layer: "Layer", bits: int, prefer: str) -> int:
        """Inputs per scale along a row at this width and objective; 0: one scale per output channel."""
        return 0

    def describe(self, node, inits: dict) -> dict:
        """Layer fields of this node (weight, axis, bias...), or raise Skip."""
        raise NotImplementedError

    def matrix(self, layer: Layer, weight: np.ndarray) -> np.ndarray:
        """[out, fan_in] view: each row is one per-channel quantization group."""
        if layer.transposed_weight:
            weight = weight.T
        return weight.reshape(weight.shape[0], -1)

    def from_matrix(self, layer: Layer, matrix: np.ndarray) -> np.ndarray:
        if layer.transposed_weight:
            return matrix.T.reshape(layer.weight_shape)
        return matrix.reshape(layer.weight_shape)

    def input_channel_index(self, layer: Layer) -> np.ndarray:
        """[out, fan_in] index of the input channel each weight multiplies."""
        raise NotImplementedError

    def input_rows(self, layer: Layer, prefix: str) -> "InputRows | None":
        """Graph nodes turning the layer's activation input into the rows its weight multiplies, as
        [rows, fan_in], so that rows^T rows is its input Hessian; None: no exact
        rows for this kind (the diagonal estimate of weights.py serves). Convolutions have none: GPTQ on
        im2col rows made EfficientNet-Lite0 worse (docs/BENCHMARKS.md, "Rounding with the inputs")."""
        return None


@dataclass
class InputRows:
    nodes: list  # ONNX nodes from the layer's input to `output`
    initializers: list
    output: str  # [rows, fan_in]
    key: str  # layers with the same key read the same rows (q, k and v of one input): one Hessian serves


class _Conv(OpKind):
    def describe(self, node, inits):
        return {"out_axis": 0, "transposed_weight": False, "group": int(attribute(node, "group", 1))}

    def float_input_channels(self, node, weight_shape):
        return 1, int(weight_shape[1]) * int(attribute(node, "group", 1))

    def mode_for(self, container, mode):
        # ORT has no int4/int2 QLinearConv: such a weight is dequantized to a float Conv, and Q/DQ on its
        # activations would only add time and error (a ViT's patch Conv under --prefer size: 1.3x FP32's time).
        return WEIGHT_ONLY if container in (INT4, INT2) else mode

    def input_channel_index(self, layer):
        shape = layer.weight_shape
        out, in_per_group = shape[0], shape[1]
        kernel = int(np.prod(shape[2:]))
        group_of_out = np.arange(out) // max(1, out // layer.group)
        within = np.repeat(np.arange(in_per_group), kernel)
        return group_of_out[:, None] * in_per_group + within[None, :]


class _ConvTranspose(_Conv):  # its weight runs as Conv's does: mode_for
    def float_input_channels(self, node, weight_shape):
        return 1, int(weight_shape[0])

    def describe(self, node, inits):
        group = int(attribute(node, "group", 1))
        if group != 1:
            raise Skip("grouped ConvTranspose: ONNX Runtime's QDQ quantizer has no per-channel layout for it")
        return {"out_axis": 1, "transposed_weight": True, "group": group, "bias_factor": None}

    def matrix(self, layer, weight):
        weight = np.swapaxes(weight, 0, 1)
        return weight.reshape(weight.shape[0], -1)

    def from_matrix(self, layer, matrix):
        shape = layer.weight_shape
        return np.swapaxes(matrix.reshape((shape[1], shape[0]) + tuple(shape[2:])), 0, 1)

    def input_channel_index(self, layer):
        shape = layer.weight_shape
        out, in_channels = shape[1], shape[0]
        kernel = int(np.prod(shape[2:]))
        return np.broadcast_to(np.repeat(np.arange(in_channels), kernel), (out, in_channels * kernel))


def _dense_channel_index(layer: Layer) -> np.ndarray:
    shape = layer.weight_shape
    out, fan_in = (shape[1], shape[0]) if layer.transposed_weight else (shape[0], shape[1])
    return np.broadcast_to(np.arange(fan_in), (out, fan_in))


DENSE_BLOCK = 64  # inputs per scale of an int4/int2 MatMulNBits weight: 0.5 bit of float32 scale per weight


class _Dense(OpKind):
    """MatMul and Gemm: int4 and int2 weights only run as weight-only DQ -> MatMul (MatMulNBits), with one
    scale per block of DENSE_BLOCK inputs of each output channel, as MatMulNBits stores them."""

    def container(self, layer, bits, mode, prefer):
        chosen = super().container(layer, bits, mode, prefer)
        # ORT 1.31 fuses an int2 DequantizeLinear -> MatMul into a MatMulNBits that computes garbage unless the
        # output columns come in fours (measured: N = 1, 2, 3, 5, 6, 7, 10 wrong; 4, 8, 12, 16, 20 right): the
        # 2-bit levels go in an int4 container there.
        two_bit = bits <= 2 and layer.weight_shape[layer.out_axis] % 4 == 0
        return INT2 if chosen == INT4 and two_bit else chosen

    def scale_block(self, layer, bits, prefer):
        narrow = self.container(layer, bits, STATIC, prefer) in (INT4, INT2)
        return DENSE_BLOCK if narrow and layer.fan_in % DENSE_BLOCK == 0 else 0

    def container_bytes(self, layer, container):
        if container in (INT4, INT2) and layer.fan_in % DENSE_BLOCK == 0:
            scales = layer.weight_shape[layer.out_axis] * (layer.fan_in // DENSE_BLOCK)
            return -(-layer.params * CONTAINER_BITS[container] // 8) + 4 * scales
        return super().container_bytes(layer, container)

    def mode_for(self, container, mode):
        return WEIGHT_ONLY if container in (INT4, INT2) else mode

    def input_channel_index(self, layer):
        return _dense_channel_index(layer)

    def input_rows(self, layer, prefix):
        """Every leading index (batch, token) is a row of the features on the last axis."""
        shape = onnx.numpy_helper.from_array(np.array([-1, layer.fan_in], np.int64), prefix + "_shape")
        reshape = onnx.helper.make_node("Reshape", [layer.input_name, shape.name], [prefix + "_rows"])
        return InputRows([reshape], [shape], prefix + "_rows", f"{layer.input_name}/{layer.fan_in}")


class _Gemm(_Dense):
    def float_input_channels(self, node, weight_shape):
        features = int(weight_shape[1] if attribute(node, "transB", 0) else weight_shape[0])
        return (0 if attribute(node, "transA", 0) else 1), features

    def describe(self, node, inits):
        if attribute(node, "transA", 0):
            raise Skip("Gemm with transA=1: ONNX Runtime's quantizer cannot take its weight per channel")
        trans_b = bool(attribute(node, "transB", 0))
        alpha, beta = float(attribute(node, "alpha", 1.0)), float(attribute(node, "beta", 1.0))
        return {"out_axis": 0 if trans_b else 1, "transposed_weight": not trans_b,
                "bias_factor": alpha / beta if beta != 0 else None, "gemm_alpha": alpha}


class _MatMul(_Dense):
    def describe(self, node, inits):
        if len(inits[node.input[1]].dims) != 2:
            raise Skip("MatMul with a weight that is not 2-D: no per-channel axis to quantize along")
        return {"out_axis": 1, "transposed_weight": True, "bias_factor": 1.0}


class _Attention(_Dense):
    """ONNX Runtime's fused Attention (com.microsoft, what its transformer optimizer writes): x [N, T, hidden] times
    the packed Q, K, V weight [hidden, 3 x hidden] (input 1) plus the bias (input 2), then the attention. Weight-only:
    a DequantizeLinear feeds the float kernel (a 32-wide, 4-head one at 8 bits: cosine 0.99997); the rows are a
    MatMul's, so GPTQ and the bias correction (the bias is added right after the product) apply as to a MatMul."""

    def describe(self, node, inits):
        if len(inits[node.input[1]].dims) != 2:
            raise Skip("Attention with a weight that is not 2-D: no per-channel axis to quantize along")
        return {"out_axis": 1, "transposed_weight": True, "bias_factor": 1.0}


class _Recurrent(OpKind):
    """LSTM, GRU and RNN: the input weights W [directions, gates x hidden, inputs] (input 1) and the recurrence
    weights R [directions, gates x hidden, hidden] (input 2) are two layers. ONNX Runtime has no integer kernel
    for them, so both are weight-only: integers and one scale per gate row (shared by the directions: axis 1)
    turned back into the float weight the op reads (a GRU of 3 x 24 x 16 takes its dequantized weights at cosine
    0.99998 at 8 bits): once, at load, where write.folds_at_load folds an int8 one, else by a DequantizeLinear
    every run. The bytes shrink; the recurrence runs in float. The bias B stays float, as a Conv's does."""

    def weights(self, node):
        hidden = self.probe(node)  # what R multiplies: the hidden states, h_t of every step (Y) or the last
        return ((1, node.input[0], ""), (2, hidden, "/R"))

    def constant_inputs(self, node):
        # torch's dynamo export reorders the bias's gates as it does the weights' (Slice, Concat)
        return list(range(1, len(node.input)))

    def probe(self, node):
        return next((o for o in node.output[:2] if o), node.output[0])

    def describe(self, node, inits):
        if int(attribute(node, "layout", 0)) != 0:
            raise Skip(f"{node.op_type} with layout=1 (batch first): its hidden states are not read in that layout")
        if not any(node.output[:2]):
            raise Skip(f"{node.op_type} with neither Y nor Y_h as an output: no hidden states to measure it on")
        for weight in (inits[name] for name in node.input[1:3] if name in inits):
            if len(weight.dims) != 3:
                raise Skip(f"{node.op_type} weight of rank {len(weight.dims)}: ONNX's layout is [directions, gates "
                           "x hidden, inputs]")
        return {"out_axis": 1, "transposed_weight": False, "bias_factor": None}

    def matrix(self, layer, weight):
        return np.swapaxes(weight, 0, 1).reshape(weight.shape[1], -1)  # [gates x hidden, directions x inputs]

    def from_matrix(self, layer, matrix):
        directions, rows, columns = layer.weight_shape
        return np.swapaxes(matrix.reshape(rows, directions, columns), 0, 1)

    def input_channel_index(self, layer):
        directions, rows, columns = layer.weight_shape
        return np.broadcast_to(np.tile(np.arange(columns), directions), (rows, directions * columns))

    def batch_first(self, layer, prefix):
        # Y is [steps, directions, batch, hidden] and Y_h [directions, batch, hidden]: a sample's features are
        # its steps' hidden states, side by side over the directions ([batch, steps, directions x hidden]).
        tensor, steps = layer.probe_name, layer.probe_name == layer.output_name  # probe(): Y where there is one
        perm, shape = ([2, 0, 1, 3], [0, 0, -1]) if steps else ([1, 0, 2], [0, -1])
        shape_name, moved, view = prefix + "_shape", prefix + "_moved", prefix + "_view"
        nodes = [onnx.helper.make_node("Transpose", [tensor], [moved], perm=perm, name=moved),
                 onnx.helper.make_node("Reshape", [moved, shape_name], [view], name=view)]
        return nodes, [onnx.numpy_helper.from_array(np.array(shape, np.int64), shape_name)], view


FLOAT16_SCALE_LIMIT = 60000.0  # below float16's largest finite value, 65504
GATHER_BLOCKS = (32, 64, 128, 16)  # scale block along a table row: the first that divides the row


class _Gather(OpKind):
    """An embedding table: GatherBlockQuantized (com.microsoft) gathers 4- or 8-bit rows directly
    (42 us for a 30522x384 table at 4 bits, where DQ -> Gather dequantizes the whole table every run)."""

    def describe(self, node, inits):
        table = inits[node.input[0]]
        if len(table.dims) != 2 or int(attribute(node, "axis", 0)) != 0:
            raise Skip("Gather on a table that is not 2-D or not along axis 0: GatherBlockQuantized cannot take it")
        block = next((b for b in GATHER_BLOCKS if table.dims[1] % b == 0), None)
        if block is None:
            raise Skip(f"embedding rows of {table.dims[1]} values: no block size of {GATHER_BLOCKS} divides them")
        return {"out_axis": 0, "transposed_weight": False, "bias_factor": None, "block": block}

    def container(self, layer, bits, mode, prefer):
        if mode == FLOAT or bits >= FLOAT_BITS:
            return FLOAT_CONTAINER
        return INT4 if bits <= 4 else INT8

    def container_bytes(self, layer, container):
        if container == FLOAT_CONTAINER:
            return 4 * layer.params
        blocks = layer.params // layer.block
        zero_points = blocks if container == INT8 else 0  # 8-bit rows carry an explicit zero point
        return -(-layer.params * CONTAINER_BITS[container] // 8) + 2 * blocks + zero_points

    def stored_scale(self, scale):
        # float16 scales halve what they cost (MiniLM-L6's table: 1.46 -> 0.73 MB, a bit per weight -> half a
        # bit); GatherBlockQuantized then returns float16 rows, cast back to float. A scale float16 cannot
        # hold stays float32.
        return scale.astype(np.float16) if np.all(np.abs(scale) < FLOAT16_SCALE_LIMIT) else scale.astype(np.float32)

    def matrix(self, layer, weight):
        return weight.reshape(-1, layer.block)  # one row per scale block

    def from_matrix(self, layer, matrix):
        return matrix.reshape(layer.weight_shape)

    def input_channel_index(self, layer):
        return np.zeros((layer.params // layer.block, layer.block), np.int64)


REGISTRY = {kind.op_type: kind for kind in (
    _Conv("Conv", (STATIC, WEIGHT_ONLY)),
    # ORT 1.31's CPU optimizer fuses no QDQ ConvTranspose (measured: DQ -> ConvTranspose -> Q stays float between
    # Q/DQ pairs), so static activations there only add time and error.
    _ConvTranspose("ConvTranspose", (WEIGHT_ONLY,)),
    _Gemm("Gemm", (STATIC, DYNAMIC, WEIGHT_ONLY), weight_only_kernel=True, matmul_product=True),
    _MatMul("MatMul", (STATIC, DYNAMIC, WEIGHT_ONLY), channels_last=True, weight_only_kernel=True,
            matmul_product=True),
    _Gather("Gather", (WEIGHT_ONLY,), channels_last=True, weight_index=0, input_moments=False, timed=False,
            read_where_gathered=True, weight_only_kernel=True),
    _Attention("Attention", (WEIGHT_ONLY,), channels_last=True, timed=False, dequantized_every_run=True,
               domain="com.microsoft"),
    *(_Recurrent(op_type, (WEIGHT_ONLY,), channels_last=True, bias_index=None, timed=False,
                 dequantized_every_run=True) for op_type in ("LSTM", "GRU", "RNN")),
)}


# Kinds whose weight-only form is the float op on a float weight, which a body reads by name from the graph
# around it: a weight hoisted there (load.py) is written as int8 x scale beside it and folded by ORT at load
# (write.folds_at_load). MatMulNBits, GatherBlockQuantized and the static kernels would rewrite the body's nodes.
BODY_KINDS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN")
# Kinds whose weight inputs hold nothing but weights: such a node is weighted even where its weight is computed (a
# MatMul or Gemm may multiply two activations)
ALWAYS_WEIGHTED = ("Conv", "ConvTranspose", "LSTM", "GRU", "RNN")


@dataclass(frozen=True)
class _InBody(OpKind):
    """A kind's layer whose node sits inside an If/Loop/Scan body. Nothing inside a body can be fetched, so it has
    no activation statistics and no probe: its weight is rounded on its values alone (clipping search without
    input powers, no bias correction), weight-only in an int8 container, and the held-out comparison of the
    whole model's outputs is what measures it."""

    inner: OpKind | None = None

    def weights(self, node):
        return self.inner.weights(node)

    def describe(self, node, inits):
        fields = self.inner.describe(node, inits)
        fields["bias_factor"] = None  # no input mean to correct the bias with
        return fields

    def matrix(self, layer, weight):
        return self.inner.matrix(layer, weight)

    def from_matrix(self, layer, matrix):
        return self.inner.from_matrix(layer, matrix)

    def input_channel_index(self, layer):
        return self.inner.input_channel_index(layer)

    def container(self, layer, bits, mode, prefer):
        return FLOAT_CONTAINER if mode == FLOAT or bits >= FLOAT_BITS else INT8


_BODY_VARIANTS: dict = {}


def in_body(kind: OpKind) -> OpKind:
    """The variant of `kind` for a layer inside a control-flow body (_InBody)."""
    if kind.op_type not in _BODY_VARIANTS:
        _BODY_VARIANTS[kind.op_type] = _InBody(kind.op_type, (WEIGHT_ONLY,), channels_last=kind.channels_last,
                                               weight_index=kind.weight_index, input_moments=False,
                                               bias_index=kind.bias_index, timed=False, inner=kind)
    return _BODY_VARIANTS[kind.op_type]


def consumers(graph) -> dict:
    """tensor -> the nodes that read it."""
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def typed_values(model: onnx.ModelProto) -> list:
    """The graph's values that carry a type: shape inference's, then the inputs and outputs (later ones win)."""
    return list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)


@dataclass
class RowNormalizer:
    """A normalization that divides each row (the last axis) of `tensor` by its own spread: the error a layer
    adds to that row reaches the rest of the model divided by the same spread."""

    tensor: str  # the normalization's input
    epsilon: float
    centred: bool  # the spread is the row's variance (LayerNorm); else its mean square (RMSNorm)
    exposed_by: str | None = None  # a fused norm whose optional sum output (`tensor`) has to be added to it


# op type -> (whether it subtracts the row's mean first, its epsilon attribute's default); each normalizes over its
# last axis (axis -1)
_ROW_NORMALIZERS = {"LayerNormalization": (True, 1e-5), "SimplifiedLayerNormalization": (False, 1e-5),
                    "RMSNormalization": (False, 1e-5)}
# ONNX Runtime's transformer optimizer fuses the residual Add into the norm (com.microsoft): it normalizes the sum of
# its inputs 0 and 1 (and the bias, input 4), which its optional output 3 gives
_SKIP_NORMALIZERS = {"SkipLayerNormalization": (True, 1e-12), "SkipSimplifiedLayerNormalization": (False, 1e-12)}
SKIP_SUM_OUTPUT = 3
_RESIDUAL_STEPS = 3  # Adds between a layer and its normalization: its bias, the residual, a second branch's


def row_normalizer(output: str, consumers: dict) -> RowNormalizer | None:
    """The normalization a layer's output (`output`) reaches through Adds only (its bias, the residual): a
    transformer's attention-output and FFN-down projections. consumers: tensor -> the nodes that read it.
    None where the output is read by anything else first, or the normalization is not over the last axis."""
    tensor = output
    for _ in range(_RESIDUAL_STEPS + 1):
        readers = consumers.get(tensor, [])
        for node in readers:
            if node.op_type in _ROW_NORMALIZERS and node.input[0] == tensor:
                centred, epsilon = _ROW_NORMALIZERS[node.op_type]
                if int(attribute(node, "axis", -1)) != -1:
                    return None
                return RowNormalizer(tensor, float(attribute(node, "epsilon", epsilon)), centred)
            if node.op_type in _SKIP_NORMALIZERS and node.domain == "com.microsoft" and tensor in node.input[:2]:
                centred, epsilon = _SKIP_NORMALIZERS[node.op_type]
                summed = node.output[SKIP_SUM_OUTPUT] if len(node.output) > SKIP_SUM_OUTPUT else ""
                return RowNormalizer(summed or f"msq_norm_sum_{node.output[0]}",
                                     float(attribute(node, "epsilon", epsilon)), centred,
                                     None if summed else node.output[0])
        if len(readers) != 1 or readers[0].op_type != "Add":
            return None
        tensor = readers[0].output[0]
    return None


RESIDUAL_CANDIDATES = 3  # Adds per layer that pass as residual joins when built, the first that runs as one wins


def residual_joins(model: onnx.ModelProto, layers, shapes: dict, masks: set = frozenset()) -> dict:
    """layer -> [(branch, skip, sum), ...]: the Adds x + f(x) the layer's error reaches inside f, nearest first,
    up to RESIDUAL_CANDIDATES. At the first residual join the error joins a stream whose power is the sum's, not
    the branch's, and the rest of the model sees it relative to the sum. The skip x is an input the layer's error
    does not reach, taken from upstream of the layer's own input (or that input itself), with the branch's shape
    where shape inference knows it (`shapes`: tensor -> dims, None where symbolic). An additive attention mask
    passes that where its dims are symbolic: the pass tells it apart when it runs (its size is not the branch's),
    and the next candidate is the join. A layer whose error reaches the output without such a join (a stage's
    first block, a head, a classifier) has none. Nor has one whose join is read by a row normalization (a
    transformer's LayerNorm, after the join or before the next block): it divides each row by its own spread and
    each channel by its scale, so the stream's raw power is not what the rest of the model weighs the error
    against (MiniLM-L6 weighed by it: cosine up, top-1 down, docs/BENCHMARKS.md round 22). A fused
    SkipLayerNormalization is not followed either."""
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                        for o in n.output}
    producers = {o: n for n in graph.node for o in n.output if o}
    position = {id(n): i for i, n in enumerate(graph.node)}

    def upstream(start: str, wanted: str) -> bool:
        stack, seen = [start], set()
        while stack:
            tensor = stack.pop()
            if tensor == wanted:
                return True
            if tensor in seen or tensor not in producers:
                continue
            seen.add(tensor)
            stack.extend(i for i in producers[tensor].input if i and i not in constants)
        return False

    # float32 as shape inference types them: the Shape arithmetic an export leaves (an int64 Add of a layer's
    # Shape and its input's) is no stream, and an untyped or float16 tensor's sum of squares would not be a float
    floats = {v.name for v in typed_values(model) if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}

    def alike(a: str, b: str) -> bool:
        first, second = shapes.get(a), shapes.get(b)
        return a in floats and b in floats and first is not None and second is not None and \
            len(first) == len(second) and all(x == y or x is None or y is None for x, y in zip(first, second))

    # An additive attention mask, made from the `masks` inputs (instrument.attention_mask_inputs) by ops and the
    # stream's Shape, is no skip: what only the masks feed, and no other input or layer (a Shape or Size carries no
    # values), is left out (MiniLM-L6's pass measured its [N, 12, T, T] scores' power every run, and kept ORT from
    # adding the mask in place, to be told apart only by its size: 1.5-2 ms of a 35 ms 128-token run)
    masked = _fed_by(graph, set(masks), set())
    layer_nodes = {name for layer in layers for name in layer.nodes}
    inputs = {v.name for v in graph.input if v.name not in masks and v.name not in constants}
    streams = _fed_by(graph, inputs, layer_nodes) if masked else set()
    readers = consumers(graph)
    joins = {}
    for layer in layers:
        start = layer.output_name or layer.probe_name
        if start not in producers:
            continue
        reached, found = {start}, []
        for node in graph.node[position[id(producers[start])] + 1:]:  # a graph's nodes are in topological order
            if not any(i in reached for i in node.input):
                continue
            if node.op_type == "Add" and len(node.input) == 2 and not (set(node.input) & constants):
                branch, skip = node.input if node.input[0] in reached else node.input[::-1]
                if skip not in reached and (skip not in masked or skip in streams) and alike(branch, skip) and \
                        upstream(layer.input_name, skip):
                    if row_normalizer(node.output[0], readers) is not None:
                        break  # the nearest joins before it stay: a mask the pass tells apart comes first
                    found.append((branch, skip, node.output[0]))
                    if len(found) == RESIDUAL_CANDIDATES:
                        break
            reached.update(o for o in node.output if o)
        if found:
            joins[layer.name] = found
    return joins


def _fed_by(graph, sources: set, source_nodes: set) -> set:
    """The tensors computed from `sources` or by the nodes named `source_nodes`, through any op but Shape and Size."""
    fed = set(sources)
    for node in graph.node:  # in topological order
        if node.name in source_nodes or (node.op_type not in ("Shape", "Size") and any(i in fed for i in node.input)):
            fed.update(o for o in node.output if o)
    return fed


# Ops whose output's length the values they read decide, not their inputs' shapes: the boxes a detector's NMS keeps,
# the positions a mask selects. Each names the input its selection is decided on (a score or a condition).
_SELECTING = {"NonMaxSuppression": 1, "NonZero": 0, "Compress": 1, "Unique": 0}
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _selecting(node):
    """The selecting node that decides a node's output length: itself, or one inside its If/Loop/Scan bodies
    (torchvision's batched NMS is exported inside an If that skips it when no box is left)."""
    if node.op_type in _SELECTING:
        return node
    return next((found for body in bodies(node) for inner in body.node
                 for found in (_selecting(inner),) if found is not None), None)


def _reads(node) -> list:
    """The names a node reads: its inputs, and the outer names its If/Loop/Scan bodies read (a kept index used
    only inside a branch, a second review's: missed, its boxes were judged on their first row)."""
    return list(node.input) + sorted(body_reads(node))


def selected_outputs(graph) -> dict:
    """graph output -> the first selecting node (_selecting) it is computed from, where that can set its length:
    an axis of its shape neither fixed nor named as an input's (a sequence's T) is, or its shape is unknown. Not
    through Shape or Size, nor a tensor of fixed shape (a count of kept rows added back to logits leaves them as
    they were: a hunting review's classifier lost its collapse warning so); a selection that only indexes (a
    NonZero over a mask) leaves an [N, T, H] output alone."""
    named = {d.dim_param for value in graph.input for d in value.type.tensor_type.shape.dim if d.dim_param}
    # A tensor whose every axis shape inference fixed or named as an input's (a count of kept rows, summed; real
    # tokens gathered and scattered back to [batch, T], a second review's classifier) carries no selection's length
    fixed = {v.name for v in graph.value_info if v.type.tensor_type.HasField("shape")
             and all(d.HasField("dim_value") or d.dim_param in named for d in v.type.tensor_type.shape.dim)}
    origin = {}
    for node in graph.node:  # in topological order
        source = _selecting(node) or (None if node.op_type in ("Shape", "Size") else
                                      next((origin[i] for i in _reads(node) if i in origin), None))
        if source is not None:
            origin.update((o, source) for o in node.output if o and o not in fixed)

    def unsized(value) -> bool:
        tensor = value.type.tensor_type
        return not tensor.HasField("shape") or any(not d.HasField("dim_value") and d.dim_param not in named
                                                   for d in tensor.shape.dim)

    return {value.name: origin[value.name] for value in graph.output if value.name in origin and unsized(value)}


def earliest_selection(graph, output: str):
    """The first selecting node, in graph order, among those an output is computed from: what it selects from is
    dense. A later one reads what an earlier one kept (a two-stage detector's RoI pooling assigns a level to each
    kept proposal: a piecewise constant no quantization moved, judged so, the modes kept 72 layers static while the
    held-out boxes moved to a cosine of 0.805); the first is its region proposals' own."""
    producers = {out: (index, node) for index, node in enumerate(graph.node) for out in node.output if out}
    stack, seen, found = [output], set(), None
    while stack:
        name = stack.pop()
        if name in seen or name not in producers:
            continue
        seen.add(name)
        index, node = producers[name]
        selecting = _selecting(node)
        if selecting is not None and (found is None or index < found[0]):
            found = (index, selecting)
        stack.extend(_reads(node))
    return None if found is None else found[1]


def selection_text(graph, node) -> str:
    """How the report names a selecting node: as "op_type 'name'", and the If/Loop/Scan that holds it, if any."""
    holder = next((outer for outer in graph.node if outer is not node and _selecting(outer) is node), None)
    own = f"{node.op_type} '{node.name}'" if node.name else node.op_type
    return own if holder is None else f"{own} inside {holder.op_type} '{holder.name}'"


def selection_source(model: onnx.ModelProto, node) -> str | None:
    """The float tensor a selecting node decides on (NMS's scores; a condition's operands), found through the ops
    that turn it into a condition (Greater, Cast, Not...); None where it is a graph input or a constant."""
    producers = {out: n for n in model.graph.node for out in n.output}
    types = {v.name: v.type.tensor_type.elem_type for v in typed_values(model) if v.type.HasField("tensor_type")}
    constants = {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
    queue, seen = [node.input[_SELECTING[node.op_type]]], set()  # a body's node reads the outer scope's tensors
    while queue:
        name = queue.pop(0)
        if not name or name in seen or name in constants:
            continue
        seen.add(name)
        if types.get(name) in _FLOATS:
            return name
        producer = producers.get(name)
        if producer is not None and producer.op_type != "Constant":
            queue.extend(_reads(producer))
    return None


def kind_for(node) -> OpKind | None:
    """The registry's kind of a node, in its own domain only (ONNX's Attention-23 reads K, not a weight)."""
    kind = REGISTRY.get(node.op_type)
    if kind is None or (node.domain or "ai.onnx") != (kind.domain or "ai.onnx"):
        return None
    return kind


def kind_of(layer: Layer) -> OpKind:
    return layer.kind

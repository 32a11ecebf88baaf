"""What msq-onnx knows about each weighted op kind, in one place.

A new op kind is one entry here: how to recognise its weight and bias, the
weight's output-channel axis and its [out, fan_in] matrix view, where the
features of its activation input sit, and which activation modes ONNX
Runtime can run it in. load.py finds layers, weights.py quantizes them,
instrument.py measures them and write.py emits them through this registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def __post_init__(self):
        if not self.nodes:
            self.nodes = (self.name,)

    @property
    def params(self) -> int:
        return int(np.prod(self.weight_shape))

    @property
    def kind(self) -> "OpKind":
        return REGISTRY[self.op_type]


class Skip(Exception):
    """A node of a known kind that cannot be a layer; the message says why (it is reported)."""


def attribute(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


@dataclass(frozen=True)
class OpKind:
    op_type: str
    modes: tuple  # allowed activation modes, fastest first
    channels_last: bool = False  # MatMul activations keep features on the last axis, Conv/Gemm on axis 1
    containers: tuple = field(default=("int8",))

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


class _Conv(OpKind):
    def describe(self, node, inits):
        return {"out_axis": 0, "transposed_weight": False, "group": int(attribute(node, "group", 1))}

    def input_channel_index(self, layer):
        shape = layer.weight_shape
        out, in_per_group = shape[0], shape[1]
        kernel = int(np.prod(shape[2:]))
        group_of_out = np.arange(out) // max(1, out // layer.group)
        within = np.repeat(np.arange(in_per_group), kernel)
        return group_of_out[:, None] * in_per_group + within[None, :]


class _ConvTranspose(OpKind):
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


class _Gemm(OpKind):
    def describe(self, node, inits):
        if attribute(node, "transA", 0):
            raise Skip("Gemm with transA=1: ONNX Runtime's quantizer cannot take its weight per channel")
        trans_b = bool(attribute(node, "transB", 0))
        alpha, beta = float(attribute(node, "alpha", 1.0)), float(attribute(node, "beta", 1.0))
        return {"out_axis": 0 if trans_b else 1, "transposed_weight": not trans_b,
                "bias_factor": alpha / beta if beta != 0 else None, "gemm_alpha": alpha}

    def input_channel_index(self, layer):
        return _dense_channel_index(layer)


class _MatMul(OpKind):
    def describe(self, node, inits):
        if len(inits[node.input[1]].dims) != 2:
            raise Skip("MatMul with a weight that is not 2-D: no per-channel axis to quantize along")
        return {"out_axis": 1, "transposed_weight": True, "bias_factor": 1.0}

    def input_channel_index(self, layer):
        return _dense_channel_index(layer)


REGISTRY = {kind.op_type: kind for kind in (
    _Conv("Conv", (STATIC, WEIGHT_ONLY)),
    _ConvTranspose("ConvTranspose", (STATIC, WEIGHT_ONLY)),
    _Gemm("Gemm", (STATIC, DYNAMIC, WEIGHT_ONLY)),
    _MatMul("MatMul", (STATIC, DYNAMIC, WEIGHT_ONLY), channels_last=True),
)}


def kind_of(layer: Layer) -> OpKind:
    return REGISTRY[layer.op_type]

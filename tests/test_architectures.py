"""Structures real models have beyond the tiny CNN: unfused BatchNorm, residual adds, SiLU,
Conv1d, a transformer block on [N, T, C] with LayerNorm, attention (activation x activation
MatMul) and GELU. Each must convert, keep its layers fused where ORT can, and stay close to FP32.
"""

import numpy as np
import pytest
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from msq_onnx import Options, convert


def _init(rng, name, *shape, scale=0.3):
    return numpy_helper.from_array((rng.normal(0, scale, shape)).astype(np.float32), name)


def resnet_block_model(seed=0):
    rng = np.random.default_rng(seed)
    inits = [_init(rng, "w1", 8, 3, 3, 3), _init(rng, "w2", 8, 8, 3, 3), _init(rng, "w3", 8, 8, 3, 3),
             _init(rng, "wf", 5, 8),
             numpy_helper.from_array(np.ones(8, np.float32), "g"), numpy_helper.from_array(np.zeros(8, np.float32), "b"),
             numpy_helper.from_array(np.zeros(8, np.float32), "m"),
             numpy_helper.from_array(np.full(8, 2.0, np.float32), "v")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="stem"),
             helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["n1"], name="bn1"),
             helper.make_node("Sigmoid", ["n1"], ["s1"], name="sig1"),
             helper.make_node("Mul", ["n1", "s1"], ["a1"], name="silu1"),
             helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
             helper.make_node("Add", ["c3", "p1"], ["res"], name="residual"),
             helper.make_node("Relu", ["res"], ["r3"], name="relu3"),
             helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "wf"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "resnet_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def transformer_model(seed=0, tokens=6, width=16, classes=4):
    rng = np.random.default_rng(seed)
    inits = [_init(rng, "wq", width, width), _init(rng, "wk", width, width), _init(rng, "wv", width, width),
             _init(rng, "w1", width, 32), _init(rng, "w2", 32, width), _init(rng, "conv", width, width, 3),
             _init(rng, "head", width, classes),
             numpy_helper.from_array(np.ones(width, np.float32), "ln_g"),
             numpy_helper.from_array(np.zeros(width, np.float32), "ln_b"),
             numpy_helper.from_array(np.array([2], np.int64), "time_axis")]
    nodes = [helper.make_node("LayerNormalization", ["x", "ln_g", "ln_b"], ["ln"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["ln", "wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["ln", "wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["ln", "wv"], ["v"], name="v_proj"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="attention_scores"),  # activation x activation
             helper.make_node("Softmax", ["scores"], ["attn"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["attn", "v"], ["ctx"], name="attention_mix"),
             helper.make_node("Add", ["ctx", "x"], ["h"], name="residual"),
             helper.make_node("MatMul", ["h", "w1"], ["f1"], name="ffn_up"),
             helper.make_node("Gelu", ["f1"], ["g1"], name="gelu"),
             helper.make_node("MatMul", ["g1", "w2"], ["f2"], name="ffn_down"),
             helper.make_node("Transpose", ["f2"], ["ncl"], perm=[0, 2, 1], name="to_ncl"),
             helper.make_node("Conv", ["ncl", "conv"], ["c1d"], pads=[1, 1], name="conv1d"),
             helper.make_node("ReduceMean", ["c1d", "time_axis"], ["pooled"], keepdims=0, name="pool_time"),
             helper.make_node("MatMul", ["pooled", "head"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "transformer", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  ["N", tokens, width])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)  # Gelu: 20


def _convert_and_compare(tmp_path, model, shape, avg_bits=6):
    onnx.checker.check_model(model)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(1).normal(size=(48, *shape)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)  # no labels: the FP32 top-1 serves
    result = convert(str(path), str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"),
                     Options(avg_bits=avg_bits, quiet=True, eval_path=str(tmp_path / "calib.npz")))
    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    quant = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    relative = np.sqrt(((fp32 - quant) ** 2).mean() / (fp32 ** 2).mean())
    return result.report, relative


@pytest.mark.usefixtures("tied_dense_timings")
def test_resnet_block_with_batchnorm_silu_and_residual(tmp_path):
    report, relative = _convert_and_compare(tmp_path, resnet_block_model(), (3, 16, 16))
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert set(layers) == {"stem", "conv2", "conv3", "fc"}
    assert report["fused_integer_kernels"] == 4
    assert relative < 0.1 and report["agreement"] >= 85


def test_transformer_block_on_tokens(tmp_path):
    report, relative = _convert_and_compare(tmp_path, transformer_model(), (6, 16))
    names = [layer["name"] for layer in report["layers"]]
    # attention's activation x activation MatMuls have no weight to quantize
    assert names == ["q_proj", "k_proj", "v_proj", "ffn_up", "ffn_down", "conv1d", "head"]
    assert report["fused_integer_kernels"] >= 6
    assert relative < 0.15 and report["agreement"] >= 80


def _conv_bn_model(seed=0, second_user=False):
    """Conv (no bias) -> BatchNormalization with statistics far from identity, as PaddlePaddle exports leave them."""
    rng = np.random.default_rng(seed)
    inits = [_init(rng, "w", 6, 3, 3, 3),
             numpy_helper.from_array(rng.uniform(0.2, 3.0, 6).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.normal(0, 1, 6).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(0, 2, 6).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.01, 9.0, 6).astype(np.float32), "var"), _init(rng, "wf", 4, 6)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], epsilon=1e-3,
                              name="bn"),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf"], ["logits"], transB=1, name="fc")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])]
    if second_user:  # the convolution's own output is also read elsewhere: folding would change it there
        outputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 6, 8, 8]))
    graph = helper.make_graph(nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                              ["N", 3, 8, 8])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


@pytest.mark.usefixtures("tied_dense_timings")
def test_batch_normalization_is_folded_into_its_convolution(tmp_path):
    """A BN behind a Conv is folded as ORT's optimizer folds it: the same outputs, no BN left to run beside a
    quantized weight, and static quantization measures the rescaled output."""
    from msq_onnx.load import load_model

    x = np.random.default_rng(2).normal(size=(5, 3, 8, 8)).astype(np.float32)
    for second_user, expect_bn in ((False, 0), (True, 1)):
        model = _conv_bn_model(second_user=second_user)
        path = tmp_path / f"bn{second_user}.onnx"
        onnx.save(model, path)
        loaded = load_model(str(path))
        assert [n.op_type for n in loaded.model.graph.node].count("BatchNormalization") == expect_bn
        before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"x": x})[0]
        after = ort.InferenceSession(loaded.model.SerializeToString(),
                                     providers=["CPUExecutionProvider"]).run(["logits"], {"x": x})[0]
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)
        if not expect_bn:
            conv = next(n for n in loaded.model.graph.node if n.op_type == "Conv")
            assert len(conv.input) == 3 and conv.input[2] in loaded.initializers  # a bias made for the fold
            assert not {"gamma", "beta", "mean", "var"} & {t.name for t in loaded.model.graph.initializer}
    report, relative = _convert_and_compare(tmp_path, _conv_bn_model(), (3, 8, 8), avg_bits=8)
    assert report["fused_integer_kernels"] == 2 and relative < 0.05


def test_a_folded_bias_never_takes_the_name_of_a_graph_input(tmp_path):
    """The bias a fold creates gets a name no value of the graph has: an input of that name would otherwise be
    shadowed by the initializer and stop being fed."""
    from msq_onnx.load import load_model

    model = _conv_bn_model()
    model.graph.node[0].name = "conv"
    model.graph.input.append(helper.make_tensor_value_info("conv_folded_bias", TensorProto.FLOAT, ["N", 4]))
    model.graph.node.append(helper.make_node("Add", ["logits", "conv_folded_bias"], ["shifted"], name="shift"))
    model.graph.output.append(helper.make_tensor_value_info("shifted", TensorProto.FLOAT, ["N", 4]))
    path = tmp_path / "named.onnx"
    onnx.save(model, path)
    loaded = load_model(str(path))
    assert "conv_folded_bias" not in loaded.initializers
    feed = {"x": np.ones((2, 3, 8, 8), np.float32), "conv_folded_bias": np.full((2, 4), 3.0, np.float32)}
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["shifted"], feed)[0]
    after = ort.InferenceSession(loaded.model.SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(["shifted"], feed)[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)


def test_a_gemm_whose_bias_is_computed_in_the_graph_gets_no_correction_and_no_centred_error(tmp_path):
    """Nothing constant to put a correction in: the layer says so (bias_factor None), so its errors are measured
    uncentred, as the layer will be written."""
    from types import SimpleNamespace

    from msq_onnx.instrument import InputHessians
    from msq_onnx.load import load_model
    from msq_onnx.pipeline import error_statistics

    rng = np.random.default_rng(0)
    graph = helper.make_graph([helper.make_node("RandomUniformLike", ["b"], ["r"], low=1.0, high=1.0, name="random"),
                               helper.make_node("Mul", ["b", "r"], ["c"], name="computed_bias"),  # no constant
                               helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc")], "gemm_c",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
                              [_init(rng, "w", 8, 6), _init(rng, "b", 6)])
    path = tmp_path / "gemm_c.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    layer = load_model(str(path)).layers[0]
    assert layer.bias_name is None and layer.bias_factor is None
    x = rng.normal(size=(64, 8)) + 5.0
    hessians = InputHessians(x.T @ x, x.T @ x, x.sum(axis=0), x.sum(axis=0), 64, 64)
    stats = SimpleNamespace(input_sq={layer.name: (x ** 2).mean(axis=0)}, input_mean={layer.name: x.mean(axis=0)},
                            hessians={layer.name: hessians})
    assert error_statistics(layer, stats, bias_correction=True)[1] is hessians


def test_weights_behind_data_movement_ops_are_layers_or_count_in_the_budget(tmp_path):
    """torch's dynamo export feeds a GRU its weights through Slice/Concat/Unsqueeze and a transposed weight comes
    through Transpose: both are folded into initializers, so the GRU's weights and the MatMul's are layers, and
    the graph computes what it did."""
    from msq_onnx.load import load_model

    rng = np.random.default_rng(0)
    hidden, features = 8, 6
    gates = rng.normal(0, 0.3, (3 * hidden, features)).astype(np.float32)
    inits = [numpy_helper.from_array(gates, "w_ih"), _init(rng, "w_hh", 1, 3 * hidden, hidden),
             _init(rng, "proj_t", 4, hidden),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([hidden], np.int64), "h1"),
             numpy_helper.from_array(np.array([2 * hidden], np.int64), "h2"),
             numpy_helper.from_array(np.array([3 * hidden], np.int64), "h3")]
    nodes = [helper.make_node("Slice", ["w_ih", "h1", "h2", "zero"], ["z"], name="slice_z"),  # r,z,n -> z,r,n
             helper.make_node("Slice", ["w_ih", "zero", "h1", "zero"], ["r"], name="slice_r"),
             helper.make_node("Slice", ["w_ih", "h2", "h3", "zero"], ["n"], name="slice_n"),
             helper.make_node("Concat", ["z", "r", "n"], ["w_zrn"], axis=0, name="reorder"),
             helper.make_node("Unsqueeze", ["w_zrn", "zero"], ["w"], name="unsqueeze"),
             helper.make_node("GRU", ["x", "w", "w_hh"], ["all", "last"], hidden_size=hidden, name="gru"),
             helper.make_node("Squeeze", ["last", "zero"], ["state"], name="squeeze"),
             helper.make_node("Transpose", ["proj_t"], ["proj"], perm=[1, 0], name="transpose"),
             helper.make_node("MatMul", ["state", "proj"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "gru", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "N", features])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model)
    path = tmp_path / "gru.onnx"
    onnx.save(model, path)
    loaded = load_model(str(path))
    assert [layer.name for layer in loaded.layers] == ["gru", "gru/R", "head"]
    assert loaded.float_params == 0
    x = rng.normal(size=(5, 3, features)).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    after = ort.InferenceSession(loaded.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    assert not any(n.op_type in ("Slice", "Concat", "Unsqueeze", "Transpose") for n in loaded.model.graph.node)
    assert {t.name for t in loaded.model.graph.initializer} >= {"w", "proj"} and "w_ih" not in \
        {t.name for t in loaded.model.graph.initializer}


@pytest.mark.parametrize("opset", [13, 18])
def test_a_weight_normalised_conv_is_folded_into_a_layer(tmp_path, opset):
    """torch's weight_norm exported without constant folding computes a Conv's weight every run, g * v / ||v||
    (ReduceL2 with axes as an attribute before opset 18, as an input from 18): the load folds it into one
    initializer, so the Conv is a layer (it was float and counted nowhere) and the graph computes what it did."""
    from msq_onnx.load import load_model

    rng = np.random.default_rng(1)
    inits = [_init(rng, "v", 8, 3, 3, 3), numpy_helper.from_array(rng.uniform(0.5, 2, (8, 1, 1, 1)).astype(np.float32),
                                                                 "g"), _init(rng, "wf", 5, 8)]
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"))
        norm = helper.make_node("ReduceL2", ["v", "axes"], ["norm"], keepdims=1, name="norm")
    else:
        norm = helper.make_node("ReduceL2", ["v"], ["norm"], axes=[1, 2, 3], keepdims=1, name="norm")
    nodes = [norm, helper.make_node("Div", ["v", "norm"], ["direction"], name="direction"),
             helper.make_node("Mul", ["g", "direction"], ["w"], name="scaled"),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "wf"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "weight_norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    path = tmp_path / "wn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8), path)
    loaded = load_model(str(path))
    assert [layer.name for layer in loaded.layers] == ["conv", "fc"] and loaded.float_params == 0
    assert not any(n.op_type in ("ReduceL2", "Div", "Mul") for n in loaded.model.graph.node)
    x = rng.normal(size=(4, 3, 12, 12)).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    after = ort.InferenceSession(loaded.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)


def _matmul_on_computed_weight(tmp_path, name: str, nodes: list, inits: list, extra_outputs=(), opset: int = 18):
    """x [N, 6] @ W (computed by `nodes` from `inits`) + a second MatMul on a plain weight; saved, loaded, and the
    loaded model's outputs compared with the file's."""
    from msq_onnx.load import load_model

    rng = np.random.default_rng(3)
    graph = helper.make_graph(nodes + [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                                       helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")], name,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])]
                              + [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in extra_outputs],
                              inits + [_init(rng, "w2", 4, 3)])
    path = tmp_path / f"{name}.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10 if opset > 19 else 8)
    onnx.save(model, path)
    loaded = load_model(str(path))
    x = rng.normal(size=(5, 6)).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    after = ort.InferenceSession(loaded.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})
    for a, b in zip(before, after):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    return loaded


def test_constant_folding_keeps_onnx_semantics_a_review_found_broken(tmp_path):
    """A ReduceL2 with noop_with_empty_axes still squares and roots (it was taken as the identity); integer Div in a
    shape truncates, so such a chain is not folded in numpy (it wrote a [3, 4] weight for ONNX's [2, 6]); a chain
    deeper than Python's recursion is left as it is (it raised RecursionError; then, caught, a garbage collection
    at the limit raised it again inside a finalizer, unraisable, and failed this test now and then), as is one just
    over load.FOLD_DEPTH, and one at it is folded."""
    rng = np.random.default_rng(4)
    noop = _matmul_on_computed_weight(tmp_path, "noop", [
        helper.make_node("ReduceL2", ["v", "none"], ["n"], keepdims=1, noop_with_empty_axes=1),
        helper.make_node("Mul", ["v", "n"], ["W"])],
        [_init(rng, "v", 6, 4), numpy_helper.from_array(np.zeros(0, np.int64), "none")])
    assert [layer.name for layer in noop.layers] == ["mm", "mm2"]

    from msq_onnx.load import _computed_weight

    three, two = (numpy_helper.from_array(np.array([v], np.int64), n) for v, n in ((3, "three"), (2, "two")))
    divide = helper.make_node("Div", ["three", "two"], ["one"])  # 1 in ONNX, 1.5 in numpy
    assert _computed_weight("one", {"one": divide}, {"three": three, "two": two}, []) is None

    deep = [helper.make_node("Neg", ["v" if i == 0 else f"t{i}"], [f"t{i + 1}"]) for i in range(1500)]
    chain = _matmul_on_computed_weight(tmp_path, "deep", deep + [helper.make_node("Identity", ["t1500"], ["W"])],
                                       [_init(rng, "v", 6, 4)])
    assert [layer.name for layer in chain.layers] == ["mm2"]
    from msq_onnx.load import FOLD_DEPTH

    for steps, layers in ((FOLD_DEPTH, ["mm", "mm2"]), (FOLD_DEPTH + 1, ["mm2"])):
        negations = [helper.make_node("Neg", ["v" if i == 0 else f"t{i}"], [f"t{i + 1}"]) for i in range(steps)]
        loaded = _matmul_on_computed_weight(tmp_path, f"neg{steps}", negations + [
            helper.make_node("Identity", [f"t{steps}"], ["W"])], [_init(rng, "v", 6, 4)])
        assert [layer.name for layer in loaded.layers] == layers


def test_a_weight_any_standard_op_computes_from_constants_is_folded_into_a_layer(tmp_path):
    """Ops outside the numpy list (Abs, Clip with its bounds as inputs, Exp) and integer arithmetic in a shape are
    computed as ONNX's reference implementation does: the MatMul is a layer, quantized and counted. Before, its
    weight stayed float and counted nowhere: a model whose largest weight was float32 read "4.00 bits"."""
    rng = np.random.default_rng(7)
    i64 = lambda name, *values: numpy_helper.from_array(np.array(values, np.int64), name)  # noqa: E731
    f32 = lambda name, value: numpy_helper.from_array(np.array(value, np.float32), name)  # noqa: E731
    loaded = _matmul_on_computed_weight(tmp_path, "ops", [
        helper.make_node("Abs", ["v"], ["a"]),
        helper.make_node("Clip", ["a", "lo", "hi"], ["c"]),
        helper.make_node("Exp", ["c"], ["e"]),
        helper.make_node("Div", ["twelve", "two"], ["six"]),  # integer: 6 in ONNX as in numpy here, computed by ONNX
        helper.make_node("Concat", ["six", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["e", "shape"], ["W"])],
        [_init(rng, "v", 3, 8), f32("lo", 0.1), f32("hi", 0.5), i64("twelve", 12), i64("two", 2), i64("minus1", -1)])
    assert [layer.name for layer in loaded.layers] == ["mm", "mm2"] and loaded.float_params == 0
    source = next(t for t in onnx.load(tmp_path / "ops.onnx").graph.initializer if t.name == "v")
    expected = np.exp(np.clip(np.abs(numpy_helper.to_array(source)), 0.1, 0.5)).reshape(6, 4)
    np.testing.assert_allclose(loaded.weight(loaded.layers[0]), expected, rtol=1e-6)
    assert not any(n.op_type in ("Abs", "Clip", "Exp") for n in loaded.model.graph.node)


def test_folding_computes_as_onnx_runtime_and_never_grows_or_leaves_what_it_folded(tmp_path):
    """A review's cases. LpNormalization with p=1 folds to what ORT computes (ONNX's reference implementation divides
    by the plain sum); Dropout in training mode stays as it is (random every run); a Cast to float16 and back folds;
    a weight through Abs sliced into two MatMuls leaves neither the Abs nor its source behind; a low-rank product
    U @ V is not made dense (32x the stored parameters), its right factor stays a layer and the left one counts;
    a blockwise DequantizeLinear's scale is no float weight."""
    rng = np.random.default_rng(9)
    i64 = lambda name, *values: numpy_helper.from_array(np.array(values, np.int64), name)  # noqa: E731
    lp = _matmul_on_computed_weight(tmp_path, "lp", [helper.make_node("LpNormalization", ["v"], ["W"], p=1, axis=1)],
                                    [_init(rng, "v", 6, 4)])  # the helper compares ORT's outputs before and after
    assert [layer.name for layer in lp.layers] == ["mm", "mm2"] and lp.float_params == 0
    train = _matmul_on_computed_weight(tmp_path, "drop", [  # ratio 0: the outputs still compare equal
        helper.make_node("Dropout", ["v", "ratio", "training"], ["W"])], [
        _init(rng, "v", 6, 4), numpy_helper.from_array(np.array(0.0, np.float32), "ratio"),
        numpy_helper.from_array(np.array(True), "training")])
    assert [layer.name for layer in train.layers] == ["mm2"] and train.float_params == 24  # never folded
    half = _matmul_on_computed_weight(tmp_path, "half", [
        helper.make_node("Cast", ["v"], ["v16"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["v16"], ["W"], to=TensorProto.FLOAT)], [_init(rng, "v", 6, 4)])
    assert [layer.name for layer in half.layers] == ["mm", "mm2"] and half.float_params == 0
    fused = _matmul_on_computed_weight(tmp_path, "fused", [
        helper.make_node("Abs", ["v"], ["a"]),
        helper.make_node("Slice", ["a", "zero", "four", "one"], ["W"]),
        helper.make_node("Slice", ["a", "four", "eight", "one"], ["W_other"]),
        helper.make_node("MatMul", ["x", "W_other"], ["other"])], [
        _init(rng, "v", 6, 8), i64("zero", 0), i64("four", 4), i64("eight", 8), i64("one", 1)],
        extra_outputs=[("other", ["N", 4])])
    assert len(fused.layers) == 3 and fused.float_params == 0 and "v" not in fused.initializers
    assert not any(n.op_type in ("Abs", "Slice") for n in fused.model.graph.node)
    low = _matmul_on_computed_weight(tmp_path, "low", [helper.make_node("MatMul", ["u", "f"], ["W"], name="uf")],
                                     [_init(rng, "u", 6, 1), _init(rng, "f", 1, 4)])
    assert [layer.name for layer in low.layers] == ["uf", "mm2"] and low.float_params == 6  # u, 6 parameters
    assert sum(int(np.prod(t.dims)) for t in low.model.graph.initializer) == 6 + 4 + 12
    blocked = _matmul_on_computed_weight(tmp_path, "blocked", [
        helper.make_node("DequantizeLinear", ["q", "scale"], ["W"], axis=0, block_size=2)], [
        numpy_helper.from_array(rng.integers(-8, 8, (6, 4)).astype(np.int8), "q"),
        numpy_helper.from_array(np.full((3, 4), 0.05, np.float32), "scale")], opset=21)
    assert blocked.float_params == 0 and blocked.skipped == [] and blocked.fixed_weights == {8: 24}


def test_a_weight_computed_through_a_random_op_is_left_in_float_named_and_counted(tmp_path):
    """A weight scaled by a RandomUniformLike each run is no constant: it stays as it is, its float source counts at
    32 bits and the report names it, where it counted nowhere; a MatMul of two activations is no weight at all."""
    rng = np.random.default_rng(8)
    loaded = _matmul_on_computed_weight(tmp_path, "random", [
        helper.make_node("RandomUniformLike", ["v"], ["r"], low=1.0, high=1.0),
        helper.make_node("Mul", ["v", "r"], ["W"])], [_init(rng, "v", 6, 4)])
    assert [layer.name for layer in loaded.layers] == ["mm2"] and loaded.float_params == 24
    assert [(s["node"], s["weight"]) for s in loaded.skipped] == [("mm", "v")]
    assert "does not compute when it loads" in loaded.skipped[0]["reason"]
    scaled = _matmul_on_computed_weight(tmp_path, "scaled", [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=1), helper.make_node("Mul", ["u", "s"], ["W"])],
        [_init(rng, "u", 6, 4)])
    assert [layer.name for layer in scaled.layers] == ["mm2"] and scaled.skipped == [] and scaled.float_params == 0


@pytest.mark.parametrize("stored", [TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE])
def test_a_weight_stored_narrow_and_cast_to_float_is_a_layer(tmp_path, stored):
    """Weights kept in the file as float16 (or bfloat16, or double) and Cast to float32 before their MatMul: the cast
    is folded exactly, so the MatMul is a layer; the model was refused as having no quantizable layer. A Cast to an
    integer type is not a float weight and stays as it is."""
    rng = np.random.default_rng(6)
    values = rng.normal(0, 0.3, (6, 4)).astype(np.float32)
    narrow = helper.make_tensor("v", stored, [6, 4], values.astype(helper.tensor_dtype_to_np_dtype(stored)).ravel()
                                if stored != TensorProto.BFLOAT16 else values.ravel())
    loaded = _matmul_on_computed_weight(tmp_path, "cast", [helper.make_node("Cast", ["v"], ["W"], to=TensorProto.FLOAT)],
                                        [narrow])
    assert [layer.name for layer in loaded.layers] == ["mm", "mm2"] and loaded.float_params == 0
    assert not any(n.op_type == "Cast" for n in loaded.model.graph.node) and "v" not in loaded.initializers
    # --max-size takes the weight's own bytes in the input out of its size (2 a weight in float16), not 4
    from msq_onnx.pipeline import Options, size_budget

    itemsize = {TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.DOUBLE: 8}[stored]
    mm = next(layer for layer in loaded.layers if layer.name == "mm")
    assert loaded.input_bytes(mm) == 24 * itemsize
    budget = size_budget(loaded, Options(max_size=0.9), (2, 4, 8))
    rest = loaded.size_bytes - 24 * itemsize - 4 * 12  # mm2's weight is float32 in the file
    assert budget.limit == pytest.approx(0.9 * loaded.size_bytes - rest)
    like = _matmul_on_computed_weight(tmp_path, "castlike", [helper.make_node("CastLike", ["v", "like"], ["W"])],
                                      [narrow, numpy_helper.from_array(np.zeros(1, np.float32), "like")])
    assert [layer.name for layer in like.layers] == ["mm", "mm2"]

    from msq_onnx.load import _computed_weight

    to_int = helper.make_node("Cast", ["v"], ["W"], to=TensorProto.INT32)
    assert _computed_weight("W", {"W": to_int}, {"v": narrow}, []) is None


def test_a_float_weight_a_kept_chain_still_reads_counts_in_the_budget(tmp_path):
    """A weight-normalised weight whose direction something else also reads (here a graph output): the layer reads a
    folded copy, the chain stays for the other reader, and its float source, still in the file, counts at 32 bits
    (it counted nowhere, and the file could grow past the input at "4.00 bits")."""
    rng = np.random.default_rng(5)
    loaded = _matmul_on_computed_weight(tmp_path, "kept", [
        helper.make_node("ReduceL2", ["v", "axis1"], ["n"], keepdims=1),
        helper.make_node("Div", ["v", "n"], ["W"])],
        [_init(rng, "v", 6, 4), numpy_helper.from_array(np.array([1], np.int64), "axis1")],
        extra_outputs=[("n", [6, 1])])
    assert [layer.name for layer in loaded.layers] == ["mm", "mm2"]
    assert loaded.float_params == 24 and {s["weight"] for s in loaded.skipped} == {"v"}


def test_a_bias_shared_through_identity_nodes_is_folded_so_the_conv_fuses(tmp_path):
    """torch's legacy export shares an all-zero bias between layers through Identity nodes: a bias computed in the
    graph cannot be quantized, so ORT ran Whisper's conv2 in float while the report called it static."""
    from msq_onnx.load import load_model

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Identity", ["zeros"], ["b1"], name="share1"),
             helper.make_node("Identity", ["zeros"], ["b2"], name="share2"),
             helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    graph = helper.make_graph(nodes, "shared_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [_init(rng, "w1", 4, 3, 3, 3), _init(rng, "w2", 4, 4, 3, 3),
                               numpy_helper.from_array(np.zeros(4, np.float32), "zeros")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    loaded = load_model(str(tmp_path / "m.onnx"))
    assert [n.op_type for n in loaded.model.graph.node] == ["Conv", "Relu", "Conv"]
    assert all(layer.bias_name in loaded.initializers for layer in loaded.layers)
    report, relative = _convert_and_compare(tmp_path, loaded.model, (3, 8, 8), avg_bits=8)
    assert report["modes"] == {"static": 2} and report["fused_integer_kernels"] == 2 and relative < 0.05
    assert not any("optimized graph" in w for w in report["warnings"])


def test_a_tied_weight_read_through_a_transpose_stays_float_and_counts(tmp_path):
    """An embedding table also read transposed by the output projection: folding the Transpose would store the
    table twice, and quantizing the Gather alone would add a quantized copy beside the float one the Transpose
    needs (the file grew past FP32's). The table stays float, is reported and counts at 32 bits."""
    from msq_onnx.load import load_model

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["h"], name="mlp"),
             helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0], name="tie"),
             helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="lm_head")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 10])],
                              [_init(rng, "table", 10, 32), _init(rng, "w", 32, 32)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              tmp_path / "tied.onnx")
    loaded = load_model(str(tmp_path / "tied.onnx"))
    assert [n.op_type for n in loaded.model.graph.node] == ["Gather", "MatMul", "Transpose", "MatMul"]
    assert [layer.name for layer in loaded.layers] == ["mlp"]
    assert [(s["node"], s["weight"]) for s in loaded.skipped] == [("lm_head", "table"), ("embed", "table")]
    assert loaded.float_params == 320  # the table once
    assert "tied" in loaded.skipped[0]["reason"] and "Transpose 'tie'" in loaded.skipped[1]["reason"]


def test_a_conv_transpose_keeps_float_activations_as_ort_runs_it(tmp_path):
    """ORT's CPU optimizer fuses no QDQ ConvTranspose: written static, a U-Net's up-sampling layers ran as float
    between Q/DQ pairs (the unfused-kernel warning caught them). They are weight-only, and the Conv after stays
    static on its integer kernel."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("ConvTranspose", ["x", "wt", "bt"], ["u"], strides=[2, 2], pads=[1, 1, 1, 1], name="up"),
             helper.make_node("Relu", ["u"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wc"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    graph = helper.make_graph(nodes, "up", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 12, 12])],
                              [_init(rng, "wt", 8, 4, 4, 4), _init(rng, "bt", 4, scale=0.1), _init(rng, "wc", 4, 4, 3, 3)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    report, relative = _convert_and_compare(tmp_path, model, (8, 6, 6), avg_bits=8)
    modes = {layer["name"]: layer["mode"] for layer in report["layers"]}
    assert modes == {"up": "weight-only", "conv": "static"} and report["fused_integer_kernels"] == 1
    assert not any("optimized graph" in w for w in report["warnings"]) and relative < 0.05


def test_weight_chains_fold_as_onnx_computes_them(tmp_path):
    """The folded weight equals what ORT computes for the chain: a node reached twice (Concat(t, t)), Slice with
    its axes omitted but its steps given, Squeeze without axes; and a Transpose shared by three
    readers (a fused QKV weight sliced three ways) leaves no dead node or float weight behind."""
    from msq_onnx.load import load_model

    rng = np.random.default_rng(0)
    i64 = lambda name, *values: numpy_helper.from_array(np.array(values, np.int64), name)  # noqa: E731
    inits = [_init(rng, "base", 4, 1, 4), _init(rng, "qkv", 12, 4), i64("zero", 0), i64("two", 2), i64("one", 1),
             i64("four", 4), i64("eight", 8),
             i64("twelve", 12)]
    nodes = [helper.make_node("Squeeze", ["base"], ["sq"], name="squeeze"),  # [4, 1, 4] -> [4, 4]
             helper.make_node("Slice", ["sq", "zero", "two", "", "one"], ["half"], name="slice"),  # axis 0
             helper.make_node("Concat", ["half", "half"], ["w"], axis=0, name="twice"),
             helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
             helper.make_node("Transpose", ["qkv"], ["qkv_t"], perm=[1, 0], name="t"),
             helper.make_node("Slice", ["qkv_t", "zero", "four", "one"], ["q"], name="sq_q"),
             helper.make_node("Slice", ["qkv_t", "four", "eight", "one"], ["k"], name="sq_k"),
             helper.make_node("Slice", ["qkv_t", "eight", "twelve", "one"], ["v"], name="sq_v"),
             helper.make_node("MatMul", ["a", "q"], ["yq"], name="mq"), helper.make_node("MatMul", ["a", "k"], ["yk"], name="mk"),
             helper.make_node("MatMul", ["a", "v"], ["yv"], name="mv"), helper.make_node("Sum", ["yq", "yk", "yv"], ["y"], name="sum")]
    graph = helper.make_graph(nodes, "chains", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    path = tmp_path / "chains.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    loaded = load_model(str(path))
    assert [n.op_type for n in loaded.model.graph.node] == ["MatMul"] * 4 + ["Sum"]
    assert len(loaded.layers) == 4 and loaded.float_params == 0 and "qkv" not in loaded.initializers
    x = rng.normal(size=(3, 4)).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    after = ort.InferenceSession(loaded.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)

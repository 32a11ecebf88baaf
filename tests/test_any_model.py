"""Models as users have them, beyond ReLU CNNs: a tiny transformer encoder on token ids, shared weights,
nodes ONNX Runtime's quantizer cannot take (grouped ConvTranspose, Gemm transA=1, layers inside If),
MatMul + Add biases, several outputs, accuracy gates and collapse warnings, per-layer activation modes
and CalibrationDataReader input. Every model is built here with onnx.helper.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT, samples_for, tie_dense_timings, tiny_cnn
from msq_onnx import Options, convert
from msq_onnx.errors import BadOption, MsqError
from msq_onnx.load import load_model
from msq_onnx.report import SCHEMA_PATH
from msq_onnx.verify import optimized_op_counts

MODES = {"static", "dynamic", "weight-only", "float"}
N = helper.make_node


# --------------------------------------------------------------------------- helpers


def save(model: onnx.ModelProto, path) -> str:
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return str(path)


def run_model(path, feed: dict, names=None) -> list:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(names, feed)


def producers(model: onnx.ModelProto) -> dict:
    return {out: node for node in model.graph.node for out in node.output}


def initializers(model: onnx.ModelProto) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node_named(model: onnx.ModelProto, name: str):
    return next(node for node in model.graph.node if node.name == name)


def is_plain_float_weight(model: onnx.ModelProto, tensor: str) -> bool:
    """The tensor is a float32 initializer, not computed by any node (no DequantizeLinear in between)."""
    inits = initializers(model)
    return tensor in inits and inits[tensor].dtype == np.float32 and tensor not in producers(model)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(((a * b).sum(1) / norms).mean())


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env={k: v for k, v in os.environ.items()
                                                                   if k != "MSQ_DEBUG"})


# --------------------------------------------------------------------------- 1. a tiny transformer encoder

VOCAB, WIDTH, CLASSES = 32, 16, 3


def encoder(seed: int = 0, vocab: int = VOCAB, width: int = WIDTH, ffn: int = 32) -> onnx.ModelProto:
    """int64 input_ids + attention_mask [batch, sequence] -> Gather embedding -> LayerNorm -> Q/K/V MatMul + bias
    -> masked softmax attention -> output projection + residual -> LayerNorm -> Erf-GELU FFN + residual -> mean
    pooling over the mask -> L2 normalisation: an [batch, width] sentence embedding."""
    rng = np.random.default_rng(seed)
    inits = []

    def weight(name, *shape, scale=0.3):
        inits.append(numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name))

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))

    weight("emb", vocab, width, scale=1.0)
    for ln in ("ln1", "ln2"):
        const(f"{ln}_g", np.ones(width, np.float32))
        const(f"{ln}_b", np.zeros(width, np.float32))
    for name in ("q", "k", "v", "o"):
        weight(f"w{name}", width, width)
        weight(f"b{name}", width, scale=0.1)
    weight("w1", width, ffn)
    weight("b1", ffn, scale=0.1)
    weight("w2", ffn, width)
    weight("b2", width, scale=0.1)
    const("one", np.float32(1.0))
    const("neg", np.float32(-10000.0))
    const("half", np.float32(0.5))
    const("sqrt2", np.float32(np.sqrt(2.0)))
    const("scale", np.float32(1 / np.sqrt(width)))
    const("ax1", np.array([1], np.int64))
    const("axm1", np.array([-1], np.int64))
    nodes = [N("Gather", ["emb", "input_ids"], ["h0"], axis=0, name="embed"),
             N("LayerNormalization", ["h0", "ln1_g", "ln1_b"], ["ln1"], axis=-1, name="ln1")]
    for name in ("q", "k", "v"):
        nodes += [N("MatMul", ["ln1", f"w{name}"], [f"{name}_mm"], name=f"{name}_proj"),
                  N("Add", [f"{name}_mm", f"b{name}"], [name], name=f"{name}_bias")]
    nodes += [
        N("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        N("MatMul", ["q", "kt"], ["qk"], name="scores"),  # activation x activation: not a layer
        N("Mul", ["qk", "scale"], ["qk_scaled"], name="scores_scale"),
        N("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT, name="mask_float"),
        N("Sub", ["one", "maskf"], ["inverted"], name="mask_invert"),
        N("Mul", ["inverted", "neg"], ["mask_bias"], name="mask_bias"),
        N("Unsqueeze", ["mask_bias", "ax1"], ["mask_bias3"], name="mask_unsqueeze"),
        N("Add", ["qk_scaled", "mask_bias3"], ["masked"], name="mask_add"),
        N("Softmax", ["masked"], ["attn"], axis=-1, name="softmax"),
        N("MatMul", ["attn", "v"], ["ctx"], name="mix"),
        N("MatMul", ["ctx", "wo"], ["o_mm"], name="o_proj"),
        N("Add", ["o_mm", "bo"], ["o"], name="o_bias"),
        N("Add", ["h0", "o"], ["h1"], name="residual1"),
        N("LayerNormalization", ["h1", "ln2_g", "ln2_b"], ["ln2"], axis=-1, name="ln2"),
        N("MatMul", ["ln2", "w1"], ["f1_mm"], name="ffn_up"),
        N("Add", ["f1_mm", "b1"], ["f1"], name="ffn_up_bias"),
        N("Div", ["f1", "sqrt2"], ["f1_scaled"], name="gelu_div"),
        N("Erf", ["f1_scaled"], ["erf"], name="gelu_erf"),
        N("Add", ["erf", "one"], ["erf1"], name="gelu_add"),
        N("Mul", ["f1", "erf1"], ["gelu0"], name="gelu_mul"),
        N("Mul", ["gelu0", "half"], ["gelu"], name="gelu_half"),
        N("MatMul", ["gelu", "w2"], ["f2_mm"], name="ffn_down"),
        N("Add", ["f2_mm", "b2"], ["f2"], name="ffn_down_bias"),
        N("Add", ["h1", "f2"], ["h2"], name="residual2"),
        N("Unsqueeze", ["maskf", "axm1"], ["mask3"], name="pool_mask"),
        N("Mul", ["h2", "mask3"], ["masked_h"], name="pool_mul"),
        N("ReduceSum", ["masked_h", "ax1"], ["summed"], keepdims=0, name="pool_sum"),
        N("ReduceSum", ["maskf", "axm1"], ["count"], keepdims=1, name="pool_count"),
        N("Div", ["summed", "count"], ["pooled"], name="pool_div"),
        N("ReduceL2", ["pooled"], ["norm"], axes=[-1], keepdims=1, name="l2"),
        N("Div", ["pooled", "norm"], ["embedding"], name="normalize"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def token_sample(rng, label: int, length: int) -> np.ndarray:
    """Token ids mostly from the label's band of the vocabulary, so the classes are separable."""
    band = VOCAB // CLASSES
    ids = np.where(rng.random(length) < 0.8, rng.integers(label * band, (label + 1) * band, length),
                   rng.integers(0, VOCAB, length))
    return ids.astype(np.int64)


def token_folder(folder, count: int, seed: int = 0) -> str:
    """One .npz per sample, sequence lengths 4..12, with labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for index in range(count):
        ids = token_sample(rng, index % CLASSES, int(rng.integers(4, 13)))[None]
        np.savez(folder / f"{index:03d}.npz", input_ids=ids, attention_mask=np.ones_like(ids),
                 labels=np.array([index % CLASSES]))
    return str(folder)


def padded_batch(rng, lengths, total: int) -> dict:
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = token_sample(rng, row % CLASSES, length)
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoder")
    model_path = save(encoder(), folder / "encoder.onnx")
    calib = token_folder(folder / "calib", 40)
    with pytest.MonkeyPatch.context() as patch:
        tie_dense_timings(patch)  # test_encoder_report's static measurements
        result = convert(model_path, str(folder / "q.onnx"), calib, Options(quiet=True))
    return model_path, str(folder / "q.onnx"), result.report


def test_encoder_runs_with_dynamic_batch_and_sequence(encoder_run):
    model_path, out, _report = encoder_run
    written = onnx.load(out)
    for value in written.graph.input:
        dims = value.type.tensor_type.shape.dim
        assert value.type.tensor_type.elem_type == TensorProto.INT64
        assert [d.dim_param for d in dims] == ["batch", "sequence"], value  # still symbolic, not fixed
        assert not any(d.HasField("dim_value") for d in dims)
    rng = np.random.default_rng(5)
    for total in (5, 9):
        feed = padded_batch(rng, [total, total - 2], total)  # batch 2, the second row padded
        (fp32,) = run_model(model_path, feed)
        (quant,) = run_model(out, feed)
        assert quant.shape == (2, WIDTH)
        assert cosine(fp32, quant) > 0.98


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_the_latency_yardstick_leaves_embedding_lookups_float(encoder_run, tmp_path, kind):
    """ORT's own int8 model is written for its kernels' time: the embedding table stays a float Gather (its int8
    rows cost the same time, and quantizing a 30522-row table was most of the yardstick's writing), and every
    other weight is quantized as ORT's quantizer does."""
    from msq_onnx.modes import DYNAMIC, STATIC, ModeChoice
    from msq_onnx.pipeline import _yardstick

    model_path, _, _ = encoder_run
    loaded = load_model(model_path)
    mode = STATIC if kind == "static" else DYNAMIC
    ranges = {name: (-4.0, 4.0) for name in [t.name for t in loaded.model.graph.input] + [
        out for node in loaded.model.graph.node for out in node.output]}
    yardstick = _yardstick({layer.name: ModeChoice(mode, {}, "") for layer in loaded.layers}, ranges, loaded,
                           str(tmp_path))
    assert yardstick.failed is None and yardstick.kind == kind
    written = onnx.load(yardstick.path)
    tables = {t.name: t for t in written.graph.initializer}
    (gather,) = [n for n in written.graph.node if n.op_type == "Gather" and n.input[0] in tables]
    # ORT's quantizer wrote it around a one-row stand-in of the table, which the timed session has back
    assert tables[gather.input[0]].data_type == TensorProto.FLOAT and tuple(tables[gather.input[0]].dims) == (1, WIDTH)
    assert tuple(yardstick.tables[gather.input[0]].dims) == (VOCAB, WIDTH)
    integer_weights = [t for t in written.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(integer_weights) == sum(1 for layer in loaded.layers if not layer.kind.read_where_gathered)
    feed = padded_batch(np.random.default_rng(1), [6], 6)
    assert yardstick.session().run(None, feed)[0].shape == (1, WIDTH)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_the_timed_yardstick_is_the_model_ort_writes_from_the_whole_table(encoder_run, tmp_path, kind):
    """The stand-in only spares ORT's quantizer the table's bytes: the yardstick timed is, node for node and value
    for value, the one it writes from the model with its table, and it runs to the same outputs."""
    from msq_onnx.modes import DYNAMIC, STATIC, ModeChoice
    from msq_onnx.pipeline import _yardstick
    from msq_onnx.verify import reference_int8

    model_path, _, _ = encoder_run
    loaded = load_model(model_path)
    ranges = {name: (-4.0, 4.0) for name in [t.name for t in loaded.model.graph.input] + [
        out for node in loaded.model.graph.node for out in node.output]}
    modes = {layer.name: ModeChoice(STATIC if kind == "static" else DYNAMIC, {}, "") for layer in loaded.layers}
    (tmp_path / "stand-ins").mkdir()
    (tmp_path / "whole").mkdir()
    timed = _yardstick(modes, ranges, loaded, str(tmp_path / "stand-ins"))
    assert timed.tables  # the table was stood in for
    lookups = tuple(node for layer in loaded.layers if layer.kind.read_where_gathered for node in layer.nodes)
    whole = reference_int8(loaded.model_file(), str(tmp_path / "whole"), kind == "static", ranges,
                           float_nodes=lookups)
    assert not whole.tables
    assert sorted(os.listdir(loaded.weights_folder)) == ["model.onnx", "weights.bin"]  # no stand-in file left
    expected = onnx.load(whole.path)
    got = onnx.load(timed.path)
    assert [(n.op_type, list(n.input), list(n.output)) for n in got.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in expected.graph.node]
    expected_values = {t.name: numpy_helper.to_array(t) for t in expected.graph.initializer}
    got_values = {t.name: numpy_helper.to_array(t, base_dir=loaded.weights_folder) if t.name not in timed.tables
                  else numpy_helper.to_array(timed.tables[t.name], base_dir=loaded.weights_folder)
                  for t in got.graph.initializer}
    assert expected_values.keys() == got_values.keys()
    for name, value in expected_values.items():
        np.testing.assert_array_equal(got_values[name], value, err_msg=name)
    feed = padded_batch(np.random.default_rng(2), [6], 6)
    reference = ort.InferenceSession(whole.path, providers=["CPUExecutionProvider"]).run(None, feed)
    for a, b in zip(timed.session().run(None, feed), reference):
        np.testing.assert_array_equal(a, b)


def test_a_table_a_subgraph_reads_is_not_stood_in_for(tmp_path):
    """The stand-ins go only where the float lookups are a table's sole readers: one an If branch also reads
    (ORT's quantizer would see a one-row table there) is given to it whole."""
    from msq_onnx.verify import _with_stand_ins

    rng = np.random.default_rng(0)
    tables = [numpy_helper.from_array(rng.normal(size=(40, 16)).astype(np.float32), name)
              for name in ("alone", "branched")]
    branch = helper.make_graph([helper.make_node("ReduceSum", ["branched"], ["s"], keepdims=0)], "branch", [],
                               [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])])
    nodes = [helper.make_node("Gather", ["alone", "ids"], ["a"], name="look_a"),
             helper.make_node("Gather", ["branched", "ids"], ["b"], name="look_b"),
             helper.make_node("If", ["flag"], ["picked"], name="if", then_branch=branch, else_branch=branch),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "lookups", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6]),
                                                 helper.make_tensor_value_info("flag", TensorProto.BOOL, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 16]),
                               helper.make_tensor_value_info("picked", TensorProto.FLOAT, [])], tables)
    loaded = load_model(save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                             tmp_path / "lookups.onnx"))
    source, stood_in = _with_stand_ins(loaded.model_file(), ("look_a", "look_b"))
    assert set(stood_in) == {"alone"} and source != loaded.model_file()
    os.remove(source)


def test_a_yardstick_whose_stand_ins_cannot_be_written_is_written_whole(tmp_path, monkeypatch):
    """No room for the stand-ins' copy beside the weights (or any other failure there) costs the speed-up, not the
    yardstick."""
    from msq_onnx import verify
    from msq_onnx.modes import DYNAMIC, ModeChoice
    from msq_onnx.pipeline import _yardstick

    def no_room(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(verify, "_with_stand_ins", no_room)
    loaded = load_model(save(encoder(), tmp_path / "encoder.onnx"))
    yardstick = _yardstick({layer.name: ModeChoice(DYNAMIC, {}, "") for layer in loaded.layers}, {}, loaded,
                           str(tmp_path))
    assert yardstick.failed is None and yardstick.path and not yardstick.tables
    feed = padded_batch(np.random.default_rng(1), [6], 6)
    assert yardstick.session().run(None, feed)[0].shape == (1, WIDTH)


def test_the_yardstick_leaves_a_table_tied_to_a_matmul_float_too(tmp_path):
    """A table read by a Gather and, transposed, by a MatMul is left out of the allocation: the yardstick still
    keeps its lookups float."""
    from msq_onnx.modes import DYNAMIC, ModeChoice
    from msq_onnx.pipeline import _yardstick

    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.normal(size=(40, 16)).astype(np.float32), "table")
    dense = numpy_helper.from_array(rng.normal(size=(16, 16)).astype(np.float32), "dense")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "dense"], ["h"]),
             helper.make_node("Transpose", ["table"], ["tied"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "tied"], ["logits"])]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 6, 40])], [table, dense])
    loaded = load_model(save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                             tmp_path / "tied.onnx"))
    assert not any(layer.kind.read_where_gathered for layer in loaded.layers)  # the table is no layer of ours
    yardstick = _yardstick({layer.name: ModeChoice(DYNAMIC, {}, "") for layer in loaded.layers}, {}, loaded,
                           str(tmp_path))
    assert yardstick.failed is None
    assert not yardstick.tables  # a MatMul reads the table too: ORT's quantizer sees it whole
    written = onnx.load(yardstick.path)
    tables = {t.name: t for t in written.graph.initializer}
    (gather,) = [n for n in written.graph.node if n.op_type == "Gather"]
    assert tables[gather.input[0]].data_type == TensorProto.FLOAT


def test_encoder_keeps_ort_away_from_gather_and_layernorm(encoder_run):
    """ORT's static quantizer never puts Q/DQ on the embedding table, LayerNorm or Softmax: the table stays a
    plain float initializer unless msq-onnx itself made the Gather a layer (then GatherBlockQuantized reads it)."""
    _, out, report = encoder_run
    written = onnx.load(out)
    made_by = producers(written)
    for node in written.graph.node:
        if node.op_type in ("Gather", "LayerNormalization", "Softmax"):
            for name in node.input:
                assert name not in made_by or made_by[name].op_type != "DequantizeLinear", (node.name, name)
    gather_layers = [layer for layer in report["layers"] if layer["op_type"] == "Gather"]
    if gather_layers:
        assert not any(n.op_type == "Gather" and n.input[0] == "emb" for n in written.graph.node)
        assert any(n.op_type == "GatherBlockQuantized" for n in written.graph.node)
    else:
        (gather,) = [n for n in written.graph.node if n.op_type == "Gather"]
        assert is_plain_float_weight(written, gather.input[0])
        np.testing.assert_array_equal(initializers(written)[gather.input[0]],
                                      numpy_helper.to_array(encoder().graph.initializer[0]))
    assert len([n for n in written.graph.node if n.op_type == "LayerNormalization"]) == 2


@pytest.mark.parametrize("bits,level", [(4, -8), (3, 4)])
def test_embedding_table_levels_decode_as_written_in_ort(tmp_path, bits, level):
    """GatherBlockQuantized reads every level the grids use: -8 at 4 bits (the container's full range) and +4 at
    3 bits (a block whose extra level sits on the positive side): ORT's rows equal our decoding of the bytes."""
    model = encoder(vocab=64, width=32)
    path = save(model, tmp_path / "encoder.onnx")
    out = str(tmp_path / "q.onnx")
    convert(path, out, token_folder(tmp_path / "calib", 20), Options(bits=(bits,), prefer="size", quiet=True))
    written = onnx.load(out)
    (node,) = [n for n in written.graph.node if n.op_type == "GatherBlockQuantized"]
    inits = initializers(written)
    data, scale = inits[node.input[0]], inits[node.input[2]]
    nibbles = np.stack([data & 15, data >> 4], axis=-1).reshape(len(data), -1).astype(np.int16) - 8
    block = helper.get_attribute_value(next(a for a in node.attribute if a.name == "block_size"))
    expected = nibbles * np.repeat(scale, block, axis=1)
    assert level in nibbles and nibbles.min() >= -8 and nibbles.max() <= 7
    ids = np.arange(64, dtype=np.int64)[None, :]
    alone = helper.make_model(helper.make_graph(
        [helper.make_node("GatherBlockQuantized", [node.input[0], "ids", node.input[2]], ["rows"], domain="com.microsoft",
                          **{a.name: helper.get_attribute_value(a) for a in node.attribute})],
        "gather", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 64])],
        [helper.make_tensor_value_info("rows", helper.np_dtype_to_tensor_dtype(scale.dtype), None)],
        [numpy_helper.from_array(data, node.input[0]), numpy_helper.from_array(scale, node.input[2])]),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    alone.ir_version = 10
    rows = ort.InferenceSession(alone.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    assert scale.dtype == np.float16  # half a bit per weight of scales, not one
    np.testing.assert_allclose(rows[0].astype(np.float32), expected, rtol=2e-3, atol=1e-6)  # float16 rows
    table = numpy_helper.to_array(model.graph.initializer[0])
    assert np.sum((expected - table) ** 2) < 0.1 * np.sum(table ** 2)  # the table, not noise


def test_gather_that_is_not_a_layer_keeps_its_float_table(tmp_path):
    """Rows of 12 values: no GatherBlockQuantized block divides them, so the table must reach the written model
    exactly as it was: ORT's static quantizer is not given the Gather."""
    model = encoder(width=12)
    path = save(model, tmp_path / "encoder.onnx")
    report = convert(path, str(tmp_path / "q.onnx"), token_folder(tmp_path / "calib", 20),
                     Options(quiet=True)).report
    assert "embed" not in [layer["name"] for layer in report["layers"]]
    written = onnx.load(tmp_path / "q.onnx")
    (gather,) = [n for n in written.graph.node if n.op_type == "Gather"]
    assert is_plain_float_weight(written, gather.input[0])
    np.testing.assert_array_equal(initializers(written)[gather.input[0]],
                                  numpy_helper.to_array(model.graph.initializer[0]))
    assert all(producers(written).get(name) is None or producers(written)[name].op_type != "DequantizeLinear"
               for name in gather.input)
    assert report["evaluation"]["cosine"] > 0.98


def test_encoder_report(encoder_run):
    _, _, report = encoder_run
    names = [layer["name"] for layer in report["layers"] if layer["op_type"] == "MatMul"]
    assert names == ["q_proj", "k_proj", "v_proj", "o_proj", "ffn_up", "ffn_down"]  # not scores/mix
    assert {layer["op_type"] for layer in report["layers"]} <= {"MatMul", "Gather"}
    for layer in report["layers"]:
        assert layer["mode"] in MODES and layer["mode_reason"]
        if layer["op_type"] == "MatMul":
            assert set(layer["mode_errors"]) >= {"static", "dynamic", "weight-only"}
    assert sum(report["modes"].values()) == len(report["layers"])
    assert report["activation_modes"]["end_to_end"]
    evaluation = report["evaluation"]
    assert evaluation["task_output"] == "embedding" and evaluation["kind"] == "embedding"
    assert evaluation["samples"] == 8  # every 5th of 40
    assert evaluation["cosine"] > 0.98 and evaluation["outputs"]["embedding"]["cosine"] > 0.98
    assert evaluation["top1_method"].startswith("nearest class mean")
    assert evaluation["fp32_top1"] is not None and evaluation["quant_top1"] is not None
    assert report["left_in_float"] == []
    assert report["warnings"] == ["fidelity was measured on 8 held-out samples only, where one sample moves agreement "
                                  "and top-1 by 12.5 points: pass --eval with more samples to rely on it"]


# --------------------------------------------------------------------------- 2. a shared weight


def shared_weight_model(seed: int = 0, aliased: bool = False) -> onnx.ModelProto:
    """x @ ws -> Relu -> @ ws (the same initializer) -> @ head. aliased: the second product reads ws through two
    Identity nodes, as torch's legacy export gives each reuse of a module (ALBERT's one layer run N times)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 8)).astype(np.float32), "ws"),
             numpy_helper.from_array(rng.normal(0, 0.4, (8, 3)).astype(np.float32), "head")]
    aliases = [N("Identity", ["ws"], ["ws_1"], name="alias"), N("Identity", ["ws_1"], ["ws_2"], name="alias_1")]
    nodes = [N("MatMul", ["x", "ws"], ["a"], name="first"),
             N("Relu", ["a"], ["r"], name="relu"),
             *(aliases if aliased else []),
             N("MatMul", ["r", "ws_2" if aliased else "ws"], ["b"], name="second"),
             N("MatMul", ["b", "head"], ["y"], name="classifier")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def compute_users(model: onnx.ModelProto, tensor: str) -> list:
    """Nodes that compute with `tensor`, directly or through one DequantizeLinear."""
    found = []
    for node in model.graph.node:
        if tensor not in node.input:
            continue
        if node.op_type == "DequantizeLinear":
            found += [user for user in model.graph.node if node.output[0] in user.input]
        else:
            found.append(node)
    return found


@pytest.mark.parametrize("activations,aliased", [("static", False), ("dynamic", False), ("weight-only", False),
                                                 ("static", True), ("dynamic", True)])
def test_shared_weight_is_one_layer_with_one_width(tmp_path, activations, aliased):
    """Read directly or through Identity nodes (which left the second product float, a tied weight), one weight is
    one layer, written once as integers that both products read."""
    model = shared_weight_model(aliased=aliased)
    path = save(model, tmp_path / "shared.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).normal(size=(30, 8)).astype(np.float32))
    out = tmp_path / "q.onnx"
    report = convert(path, str(out), str(tmp_path / "calib.npz"),
                     Options(avg_bits=5, bits=(4, 8), activations=activations, quiet=True)).report
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert sorted(layers) == ["classifier", "first"]  # one layer per weight tensor
    assert report["left_in_float"] == []
    shared = layers["first"]
    assert shared["nodes"] == ["first", "second"] and isinstance(shared["bits"], int)
    assert shared["mode"] == activations
    written = onnx.load(out)
    inits = initializers(written)
    assert "ws" not in inits or inits["ws"].dtype != np.float32  # no float copy left for one of the users
    integer = [name for name, value in inits.items()
               if name.startswith("ws") and value.dtype == np.int8 and value.shape == (8, 8)]
    assert len(integer) == 1, integer  # one quantized weight ...
    users = compute_users(written, integer[0])
    assert len(users) == 2, [(n.op_type, n.name) for n in users]  # ... read by both consumers
    columns = inits[integer[0]].T  # one grid per output column, whatever reads it
    if shared["level_set"] is None:
        low, high, top = columns.min(axis=1), columns.max(axis=1), 2 ** (shared["bits"] - 1) - 1
        assert (((low >= -top - 1) & (high <= top)) | ((low >= -top) & (high <= top + 1))).all()
    else:
        allowed = set(shared["level_set"])
        assert all(set(c.tolist()) <= allowed or set((-c).tolist()) <= allowed for c in columns)
    assert all(len(np.unique(c)) <= 2 ** shared["bits"] for c in columns)
    x = np.random.default_rng(2).normal(size=(6, 8)).astype(np.float32)
    assert cosine(run_model(path, {"x": x})[0], run_model(out, {"x": x})[0]) > 0.95


# --------------------------------------------------------------------------- 3. nodes ORT's quantizer cannot take


def unquantizable_model(seed: int = 0) -> onnx.ModelProto:
    """Conv -> grouped (depthwise) ConvTranspose -> pool -> Gemm(transB) -> Transpose -> Gemm(transA=1)."""
    rng = np.random.default_rng(seed)

    def init(name, *shape):
        return numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name)

    inits = [init("wc", 32, 4, 3, 3), init("wt", 32, 1, 1, 1), init("wf", 8, 32), init("wa", 8, 3)]
    nodes = [N("Conv", ["x", "wc"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             N("Relu", ["c"], ["r"], name="relu"),
             N("ConvTranspose", ["r", "wt"], ["t"], group=32, name="up_grouped"),
             N("GlobalAveragePool", ["t"], ["g"], name="gap"),
             N("Flatten", ["g"], ["f"], name="flat"),
             N("Gemm", ["f", "wf"], ["h"], transB=1, name="fc"),
             N("Transpose", ["h"], ["ht"], perm=[1, 0], name="to_transposed"),
             N("Gemm", ["ht", "wa"], ["y"], transA=1, name="fc_transA")]
    graph = helper.make_graph(nodes, "unquantizable",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


FLOAT_PARAMS = 32 + 8 * 3  # wt and wa: 56 of 1,464 parameters


@pytest.fixture(scope="module")
def unquantizable_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unquantizable")
    path = save(unquantizable_model(), folder / "model.onnx")
    np.savez(folder / "calib.npz", x=np.random.default_rng(1).normal(size=(30, 4, 6, 6)).astype(np.float32))
    return folder, path, str(folder / "calib.npz")


def test_grouped_convtranspose_and_transA_gemm_stay_float(unquantizable_files):
    folder, path, calib = unquantizable_files
    out = folder / "q.onnx"
    report = convert(path, str(out), calib, Options(avg_bits=6, quiet=True)).report
    assert [layer["name"] for layer in report["layers"]] == ["conv", "fc"]
    left = {entry["node"]: entry for entry in report["left_in_float"]}
    assert set(left) == {"up_grouped", "fc_transA"}
    assert "grouped ConvTranspose" in left["up_grouped"]["reason"]
    assert "transA" in left["fc_transA"]["reason"]
    assert any("left in float" in warning for warning in report["warnings"])
    written = onnx.load(out)
    assert is_plain_float_weight(written, node_named(written, "up_grouped").input[1])
    assert node_named(written, "up_grouped").input[1] == "wt"
    assert is_plain_float_weight(written, node_named(written, "fc_transA").input[1])
    np.testing.assert_array_equal(initializers(written)["wt"],
                                  numpy_helper.to_array(unquantizable_model().graph.initializer[1]))
    # the float weights count at 32 bits: the model's average is above the quantized layers' own
    params = {layer["name"]: layer["params"] for layer in report["layers"]}
    own = sum(layer["bits"] * params[layer["name"]] for layer in report["layers"]) / sum(params.values())
    expected = (own * sum(params.values()) + 32 * FLOAT_PARAMS) / (sum(params.values()) + FLOAT_PARAMS)
    assert report["avg_weight_bits"] > own
    assert report["avg_weight_bits"] == pytest.approx(expected, abs=1e-5)
    assert report["avg_weight_bits"] <= 6 + 1e-9
    x = np.random.default_rng(3).normal(size=(5, 4, 6, 6)).astype(np.float32)
    assert cosine(run_model(path, {"x": x})[0], run_model(out, {"x": x})[0]) > 0.95


@pytest.mark.usefixtures("tied_dense_timings")
def test_a_float_node_between_static_layers_keeps_its_float_weight_in_orts_graph(tmp_path):
    """A node that cannot be a layer (a grouped ConvTranspose) between two static convolutions reads a per-tensor
    DequantizeLinear and feeds a QuantizeLinear through a Relu: ORT's optimizer gave its float weight one int8
    scale for the whole tensor (a QuantizeLinear -> DequantizeLinear on it in the optimized graph). With a
    DequantizeLinear of its own per channel on its input, ORT runs it on its own float weight."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name)

    inits = [init("wc", 16, 4, 3, 3), init("wt", 16, 1, 1, 1), init("bt", 16), init("w2", 16, 16, 1, 1),
             init("wf", 5, 16)]
    nodes = [N("Conv", ["x", "wc"], ["c"], pads=[1, 1, 1, 1], name="conv"), N("Relu", ["c"], ["r"], name="relu"),
             N("ConvTranspose", ["r", "wt", "bt"], ["t"], group=16, name="up_grouped"),
             N("Relu", ["t"], ["tr"], name="relu2"), N("Conv", ["tr", "w2"], ["c2"], name="conv2"),
             N("GlobalAveragePool", ["c2"], ["g"], name="gap"), N("Flatten", ["g"], ["f"], name="flat"),
             N("Gemm", ["f", "wf"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "float_between", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                      ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).normal(size=(30, 4, 6, 6)).astype(np.float32))
    report = convert(path, str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"),
                     Options(avg_bits=8, quiet=True)).report
    assert {layer["name"]: layer["mode"] for layer in report["layers"]} == dict.fromkeys(("conv", "conv2", "fc"),
                                                                                          "static")
    assert [entry["node"] for entry in report["left_in_float"]] == ["up_grouped"]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    producers = {output: node for node in optimized.graph.node for output in node.output}
    weight = node_named(optimized, "up_grouped").input[1]
    assert weight not in producers  # its own float initializer, not rounded by ORT
    np.testing.assert_array_equal(initializers(optimized)[weight], initializers(onnx.load(path))["wt"])


def test_unreachable_budget_with_float_nodes_is_bad_option(unquantizable_files):
    folder, path, calib = unquantizable_files
    out = folder / "unreachable.onnx"
    # 2 bits on every layer would average 2, but the float parameters at 32 bits lift the floor to 3.15
    with pytest.raises(BadOption) as info:
        convert(path, str(out), calib, Options(avg_bits=2.5, quiet=True))
    assert info.value.exit_code == 2 and "--avg-bits 2.5" in str(info.value)
    assert not out.exists()


# --------------------------------------------------------------------------- 4. a layer inside an If


def if_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def branch(name, scale):
        weight = numpy_helper.from_array((scale * rng.normal(0, 0.4, (6, 6))).astype(np.float32), f"{name}_w")
        body = helper.make_graph([N("MatMul", ["h", f"{name}_w"], [f"{name}_out"], name=f"{name}_matmul")], name,
                                 [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["N", 6])],
                                 [weight])
        return body

    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (6, 6)).astype(np.float32), "w_in"),
             numpy_helper.from_array(rng.normal(0, 0.4, (6, 3)).astype(np.float32), "w_out"),
             numpy_helper.from_array(np.float32(0.0), "zero")]
    nodes = [N("MatMul", ["x", "w_in"], ["h"], name="input_proj"),
             N("ReduceSum", ["x"], ["total"], keepdims=0, name="total"),
             N("Greater", ["total", "zero"], ["positive"], name="positive"),
             N("If", ["positive"], ["chosen"], then_branch=branch("then", 1.0), else_branch=branch("else", -1.0),
               name="branch"),
             N("Relu", ["chosen"], ["r"], name="relu"),
             N("MatMul", ["r", "w_out"], ["y"], name="output_proj")]
    graph = helper.make_graph(nodes, "with_if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_layers_inside_if_branches_are_quantized_on_their_weights(tmp_path):
    """A weight a body holds moves to the graph, where its int8 form and scale are written (ORT folds them at load):
    the body reads it by name. Nothing inside a body can be fetched, so the layer has no predictor and no input
    statistics, and the held-out check of the outputs is what measures it. The input file stays as it was."""
    path = save(if_model(), tmp_path / "if.onnx")
    before = open(path, "rb").read()
    x = np.random.default_rng(1).normal(size=(30, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "q.onnx"
    report = convert(path, str(out), str(tmp_path / "calib.npz"), Options(quiet=True, avg_bits=4)).report
    jsonschema.validate(report, json.load(open(SCHEMA_PATH)))
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert set(layers) == {"input_proj", "output_proj", "then_matmul", "else_matmul"}
    assert not report["left_in_float"] and open(path, "rb").read() == before
    for name in ("then_matmul", "else_matmul"):
        assert layers[name]["in_body"] == "If 'branch'" and layers[name]["predictor_accuracy"] is None
        assert layers[name]["mode"] == "weight-only" and layers[name]["container"] == "int8"
    assert layers["input_proj"]["in_body"] is None and layers["input_proj"]["predictor_accuracy"] is not None
    assert [w for w in report["warnings"] if "2 layer(s) inside the bodies of If 'branch'" in w
            and "checks only the branches" in w]
    assert not [w for w in report["warnings"] if "no calibration sample takes" in w]  # both branches ran
    params = sum(layer["params"] for layer in report["layers"])
    assert report["avg_weight_bits"] <= 4 and report["avg_weight_bits"] == pytest.approx(
        sum(layer["params"] * layer["bits"] for layer in report["layers"]) / params, abs=1e-4)
    written = onnx.load(out)
    inits = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    produced = {o: n for n in written.graph.node for o in n.output}
    for attribute in node_named(written, "branch").attribute:
        body = attribute.g
        assert not body.initializer  # the float weight left the body, and is nowhere in float
        (matmul,) = [n for n in body.node if n.op_type == "MatMul"]
        scaled = produced[matmul.input[1]]  # int8 x scale in the graph around it
        assert scaled.op_type == "Mul" and produced[scaled.input[0]].op_type == "Cast"
        integers = inits[produced[scaled.input[0]].input[0]]
        bits = layers[matmul.name]["bits"]
        assert integers.dtype == np.int8 and max(len(np.unique(column)) for column in integers.T) <= 2 ** bits
    assert not any(v.dtype == np.float32 and v.size == 36 for v in inits.values())
    # both branches still run, each near FP32
    for sample in (np.abs(x[:4]), -np.abs(x[:4])):
        assert cosine(run_model(path, {"x": sample})[0], run_model(out, {"x": sample})[0]) > 0.95
    # samples that all take the then-branch: the else-branch's layer is named as never run
    np.savez(tmp_path / "positive.npz", x=np.abs(x))
    report = convert(path, str(tmp_path / "p.onnx"), str(tmp_path / "positive.npz"), Options(quiet=True)).report
    assert [w for w in report["warnings"] if w.startswith("no calibration sample takes the else_branch of If "
                                                          "'branch': its 1 layer(s) (36 weights)")]
    assert not [w for w in report["warnings"] if "then_branch" in w]


def test_a_weight_a_body_computes_from_the_graphs_is_folded_into_one(tmp_path):
    """A body's weight computed from a tensor of the graph around it (silero-vad's LSTMs reorder their gates from
    their parent body's weight, in each branch that runs them) is folded: one initializer per value, read by both
    branches, one layer; the source and the computation nothing reads any more are gone."""
    model = if_model()
    shared = numpy_helper.from_array(np.random.default_rng(3).normal(0, 0.4, (6, 6)).astype(np.float32), "shared")
    model.graph.initializer.append(shared)
    for attribute in model.graph.node[3].attribute:
        body = attribute.g
        del body.initializer[:]
        body.node.insert(0, N("Transpose", ["shared"], [body.name + "_t"], name=body.name + "_t"))
        body.node[1].input[1] = body.name + "_t"
    path = save(model, tmp_path / "if.onnx")
    x = np.random.default_rng(1).normal(size=(30, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "q.onnx"
    # weight-only: the comparison below sees the weights' rounding, not the output's uint8 grid
    report = convert(path, str(out), str(tmp_path / "calib.npz"), Options(quiet=True, activations="weight-only")).report
    (folded,) = [layer for layer in report["layers"] if layer["in_body"]]  # one layer for the two readers
    assert len(report["layers"]) == 3 and not report["left_in_float"]
    assert folded["name"] in ("then_matmul", "else_matmul") and folded["in_body"] == "If 'branch'"
    assert folded["params"] == 36
    written = onnx.load(out)
    assert not any(t.data_type == TensorProto.FLOAT and np.prod(t.dims) == 36 for t in written.graph.initializer)
    for attribute in node_named(written, "branch").attribute:
        assert [n.op_type for n in attribute.g.node] == ["MatMul"]  # the Transpose went with the fold
    for sample in (np.abs(x[:4]), -np.abs(x[:4])):
        fp32, written = run_model(path, {"x": sample})[0], run_model(out, {"x": sample})[0]
        assert cosine(fp32.reshape(1, -1), written.reshape(1, -1)) > 0.999  # over the batch: a ReLU zeroes rows


def if_model_with_table(rows: int, named: bool = True) -> onnx.ModelProto:
    """if_model with each branch adding six rows of one [rows, 6] embedding table of the graph (Gather) to its
    product; named: its nodes are named after their branch, else not at all."""
    model = if_model()
    model.graph.initializer.extend([
        numpy_helper.from_array(np.random.default_rng(4).normal(size=(rows, 6)).astype(np.float32), "table"),
        numpy_helper.from_array(np.arange(6, dtype=np.int64), "rows")])
    for attribute in model.graph.node[3].attribute:
        body = attribute.g
        names = ({"name": body.name + "_gather"}, {"name": body.name + "_add"}) if named else ({}, {})
        body.node.extend([N("Gather", ["table", "rows"], [body.name + "_rows"], **names[0]),
                          N("Add", [body.node[0].output[0], body.name + "_rows"], [body.name + "_sum"], **names[1])])
        body.output[0].name = body.name + "_sum"
    return model


def test_an_embedding_table_inside_a_body_stays_float_and_counts(tmp_path):
    """A Gather table read inside a body stays float (GatherBlockQuantized would rewrite the body's node): named, and
    counted at 32 bits, so no budget is met on paper."""
    path = save(if_model_with_table(10), tmp_path / "if.onnx")
    x = np.random.default_rng(1).normal(size=(30, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    report = convert(path, str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"), Options(quiet=True)).report
    left = {entry["node"]: entry["reason"] for entry in report["left_in_float"]}
    assert set(left) == {"then_gather", "else_gather"} and all("If 'branch'" in r for r in left.values())
    quantized = sum(layer["params"] * layer["bits"] for layer in report["layers"])
    params = sum(layer["params"] for layer in report["layers"])
    assert report["avg_weight_bits"] == pytest.approx((quantized + 32 * 60) / (params + 60), abs=1e-4)
    with pytest.raises(MsqError, match="cannot be met"):
        convert(path, str(tmp_path / "q4.onnx"), str(tmp_path / "calib.npz"), Options(quiet=True, avg_bits=4))


def test_a_conv_inside_a_loop_body_is_quantized(tmp_path):
    """A Loop that applies one convolution (a Constant node of its body) a number of times the input decides: the
    weight is read at every iteration from the graph around the body."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), "loop_w")
    body = helper.make_graph(
        [N("Constant", [], ["w_body"], value=weight, name="w_const"),
         N("Conv", ["state", "w_body"], ["conv"], pads=[1, 1, 1, 1], name="loop_conv"),
         N("Tanh", ["conv"], ["next"], name="tanh"), N("Identity", ["cond_in"], ["cond_out"], name="keep")],
        "loop_body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                      helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                      helper.make_tensor_value_info("state", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("next", TensorProto.FLOAT, None)])
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "stem_w"),
             numpy_helper.from_array(np.array(3, np.int64), "steps"), numpy_helper.from_array(np.array(True), "go")]
    nodes = [N("Conv", ["x", "stem_w"], ["h"], pads=[1, 1, 1, 1], name="stem"),
             N("Loop", ["steps", "go", "h"], ["y"], body=body, name="repeat")]
    graph = helper.make_graph(nodes, "looped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                tmp_path / "loop.onnx")
    x = rng.normal(size=(24, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "q.onnx"
    report = convert(path, str(out), str(tmp_path / "calib.npz"), Options(quiet=True)).report
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["loop_conv"]["in_body"] == "Loop 'repeat'" and layers["loop_conv"]["bits"] == 8
    assert not report["left_in_float"]
    stored = [numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer if np.prod(t.dims) == 144]
    assert [a.dtype for a in stored] == [np.int8]  # the loop's weight, in int8 and nowhere in float
    fp32, written = run_model(path, {"x": x[:4]})[0], run_model(out, {"x": x[:4]})[0]
    assert cosine(fp32, written) > 0.999


# --------------------------------------------------------------------------- 5. MatMul + Add bias correction


def biased_mlp(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (12, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (16,)).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (16, 4)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b2")]
    nodes = [N("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             N("Add", ["m1", "b1"], ["a1"], name="add1"),
             N("Relu", ["a1"], ["r1"], name="relu1"),
             N("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
             N("Add", ["b2", "m2"], ["y"], name="add2")]  # the bias may come first
    graph = helper.make_graph(nodes, "biased_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_matmul_add_bias_is_found_and_corrected(tmp_path):
    path = save(biased_mlp(), tmp_path / "mlp.onnx")
    loaded = load_model(path)
    assert {layer.name: layer.bias_name for layer in loaded.layers} == {"mm1": "b1", "mm2": "b2"}
    # inputs with a large mean: a weight error then shifts every output the same way
    x = np.random.default_rng(1).normal(1.5, 0.5, size=(50, 12)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    (fp32,) = run_model(path, {"x": x})
    shifts = {}
    for corrected in (True, False):
        out = tmp_path / f"q_{corrected}.onnx"
        convert(path, str(out), str(tmp_path / "calib.npz"),
                Options(avg_bits=3, bits=(3,), bias_correction=corrected, quiet=True))
        (quant,) = run_model(out, {"x": x})
        shifts[corrected] = float(np.linalg.norm((quant - fp32).mean(axis=0)))
        biases = initializers(onnx.load(out))
        assert biases["b1"].dtype == np.float32  # still a float bias on the float Add
        changed = not np.allclose(biases["b2"], numpy_helper.to_array(biased_mlp().graph.initializer[3]))
        assert changed == corrected
    assert shifts[True] < 0.5 * shifts[False], shifts


# --------------------------------------------------------------------------- 6. two outputs


def two_output_cnn() -> onnx.ModelProto:
    """tiny_cnn with its last feature map [N, 16, 8, 8] as a second output 'aux'."""
    model = tiny_cnn()
    model.graph.node.append(N("Identity", ["r3"], ["aux"], name="aux_out"))
    model.graph.output.append(helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 16, 8, 8]))
    return model


@pytest.fixture(scope="module")
def two_output_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_outputs")
    model = two_output_cnn()
    path = save(model, folder / "model.onnx")
    np.savez(folder / "calib.npz", **samples_for(tiny_cnn(), 40, seed=1))
    return folder, path, str(folder / "calib.npz")


@pytest.fixture(scope="module")
def aux_task_report(two_output_files):
    folder, path, calib = two_output_files
    return convert(path, str(folder / "q_aux.onnx"), calib, Options(output="aux", quiet=True)).report


def test_every_output_is_measured_and_the_first_scores_are_the_task(two_output_files):
    folder, path, calib = two_output_files
    report = convert(path, str(folder / "q.onnx"), calib, Options(quiet=True)).report
    evaluation = report["evaluation"]
    assert set(evaluation["outputs"]) == {"logits", "aux"}
    for measured in evaluation["outputs"].values():
        assert 0.9 < measured["cosine"] <= 1.0 and measured["min_cosine"] <= measured["cosine"]
        assert measured["sqnr_db"] > 10
    assert evaluation["task_output"] == "logits" and report["options"]["output"] == "logits"
    assert evaluation["kind"] == "class-scores" and evaluation["fp32_top1"] is not None


def test_output_option_makes_aux_the_task(aux_task_report):
    evaluation = aux_task_report["evaluation"]
    assert evaluation["task_output"] == "aux" and aux_task_report["options"]["output"] == "aux"
    assert evaluation["cosine"] == evaluation["outputs"]["aux"]["cosine"]
    assert set(evaluation["outputs"]) == {"logits", "aux"}


def test_a_feature_map_task_output_is_a_tensor(aux_task_report):
    evaluation = aux_task_report["evaluation"]
    assert evaluation["kind"] == "tensor"
    assert evaluation.get("fp32_top1") is None and evaluation.get("agreement") is None


def test_max_drop_on_a_map_output_is_refused_not_silently_passed(two_output_files):
    folder, path, calib = two_output_files
    out = folder / "gated.onnx"
    with pytest.raises(MsqError, match="--min-cosine") as info:
        convert(path, str(out), calib, Options(output="aux", max_drop=1.0, quiet=True))
    assert info.value.exit_code == 2 and not out.exists()
    gated = convert(path, str(out), calib, Options(output="aux", min_cosine=0.5, quiet=True)).report
    assert gated["gate"]["passed"] and gated["gate"]["cosine"] == gated["evaluation"]["cosine"]


def test_unknown_output_name_is_bad_input(two_output_files):
    folder, path, calib = two_output_files
    out = folder / "nosuch.onnx"
    with pytest.raises(MsqError) as info:
        convert(path, str(out), calib, Options(output="nosuch", quiet=True))
    assert info.value.exit_code == 2 and "nosuch" in str(info.value) and "aux" in str(info.value)
    assert not out.exists()


# --------------------------------------------------------------------------- 7, 8. gates, collapse, activation modes


def outlier_mlp(seed: int = 0, outlier: float = 1000.0) -> onnx.ModelProto:
    """x @ w1 + b1 -> Relu -> @ w2: hidden channel 0 is `outlier` times larger than the others (as in
    transformers) and does not reach the output, so a per-tensor uint8 range spent on it rounds away the
    channels that matter."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (16, 32)).astype(np.float32)
    w1[:, 0] *= outlier
    b1 = rng.normal(0, 0.1, 32).astype(np.float32)
    b1[0] = 3.0 * outlier  # channel 0 is always active (and always huge)
    w2 = rng.normal(0, 0.3, (32, 4)).astype(np.float32)
    w2[0] = 0.0
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")]
    nodes = [N("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             N("Add", ["m1", "b1"], ["a1"], name="add1"),
             N("Relu", ["a1"], ["r1"], name="relu1"),
             N("MatMul", ["r1", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "outlier_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def outlier_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outliers")
    path = save(outlier_mlp(), folder / "model.onnx")
    np.savez(folder / "calib.npz", x=np.random.default_rng(1).normal(size=(40, 16)).astype(np.float32))
    np.savez(folder / "eval.npz", x=np.random.default_rng(2).normal(size=(24, 16)).astype(np.float32))
    return folder, path, str(folder / "calib.npz"), str(folder / "eval.npz")


@pytest.fixture(scope="module")
def outlier_auto_report(outlier_files):
    folder, path, calib, evaluation = outlier_files
    with pytest.MonkeyPatch.context() as patch:
        tie_dense_timings(patch)  # static measured beside the mode taken
        return convert(path, str(folder / "auto.onnx"), calib, Options(eval_path=evaluation, quiet=True)).report


def test_outlier_activations_are_not_quantized_statically(outlier_auto_report):
    layers = {layer["name"]: layer for layer in outlier_auto_report["layers"]}
    fed = layers["mm2"]  # its input is the activation with the outlier channel
    assert fed["mode"] != "static", fed
    assert fed["mode_errors"]["static"] > 0.1, fed  # measured: static uint8 rounds its input away
    assert "static" in fed["mode_reason"]  # the reason names the faster mode that was too lossy
    # the modes' simulated end-to-end error is small once the choice is made
    assert outlier_auto_report["activation_modes"]["end_to_end"][-1]["end_to_end_error"] < 0.01



def test_outlier_model_stays_faithful_in_auto_mode(outlier_auto_report):
    assert outlier_auto_report["evaluation"]["cosine"] > 0.99
    # no quantized mode keeps mm2's input faithful (MatMulNBits quantizes it to int8 per block too): it is
    # left in float, and that is said
    assert [w for w in outlier_auto_report["warnings"] if "collapsed" in w] == []
    assert any("float" in w and "mm2" in w for w in outlier_auto_report["warnings"])


def test_weight_only_activation_error_is_measured_not_assumed(outlier_files, tmp_path):
    """ORT fuses DQ -> MatMul into MatMulNBits at accuracy level 4, which quantizes the input to int8 per block of
    32: the measurement must see that (an outlier channel rounds its block away), and a forced mode that
    collapses the output must be said."""
    _, path, calib, evaluation = outlier_files
    out = tmp_path / "q.onnx"
    report = convert(path, str(out), calib, Options(activations="weight-only", eval_path=evaluation,
                                                   quiet=True)).report
    assert report["modes"] == {"weight-only": 2}
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["mm2"]["mode_errors"]["weight-only"] > 0.01
    x = np.load(evaluation)["x"]
    if cosine(run_model(path, {"x": x})[0], run_model(out, {"x": x})[0]) < 0.9:
        assert any("collapsed" in w for w in report["warnings"])


def test_relu_cnn_convs_are_static_in_auto_mode(cnn_files):
    report = convert(cnn_files["model"], str(cnn_files["dir"] / "q.onnx"), cnn_files["calib"],
                     Options(quiet=True, eval_path=cnn_files["eval"])).report
    modes = {layer["name"]: layer["mode"] for layer in report["layers"]}
    assert modes["conv1"] == modes["dw"] == modes["pw"] == "static", modes
    assert report["modes"].get("static", 0) >= 3


def test_forced_dynamic_falls_back_for_convs(cnn_files):
    report = convert(cnn_files["model"], str(cnn_files["dir"] / "q.onnx"), cnn_files["calib"],
                     Options(activations="dynamic", quiet=True, eval_path=cnn_files["eval"])).report
    layers = {layer["name"]: layer for layer in report["layers"]}
    for name in ("conv1", "dw", "pw"):
        assert layers[name]["mode"] == "weight-only", layers[name]
        assert "dynamic not available for Conv" in layers[name]["mode_reason"]
    assert layers["fc"]["mode"] == "dynamic" and "--activations dynamic" in layers["fc"]["mode_reason"]
    assert report["modes"] == {"dynamic": 1, "weight-only": 3}
    assert report["options"]["activations"] == "dynamic"


def test_cli_min_cosine_gate_fails_with_exit_3(cnn_files, tmp_path):
    eval_path = tmp_path / "unlabelled.npz"
    np.savez(eval_path, **samples_for(tiny_cnn(), 24, seed=2, with_labels=False))
    out, report_path = tmp_path / "q.onnx", tmp_path / "report.json"
    result = run_cli(cnn_files["model"], out, "--calib", cnn_files["calib"], "--eval", eval_path, "--bits", "2",
                     "--avg-bits", "2", "--min-cosine", "0.9999", "--quiet", "--report", report_path)
    assert result.returncode == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if "24 held-out samples only" not in line]
    assert len(lines) == 1 and lines[0].startswith("msq-onnx: error: accuracy gate failed"), result.stderr
    assert "cosine" in lines[0] and "--min-cosine 0.9999" in lines[0]
    assert out.exists() and onnx.load(out).graph.node  # written for inspection
    report = json.loads(report_path.read_text())
    assert report["gate"]["passed"] is False and report["gate"]["cosine"] < 0.9999
    assert report["evaluation"].get("fp32_top1") is None  # no labels: judged on cosine and agreement


def test_cli_warns_on_collapse_without_a_gate(outlier_files, tmp_path):
    _, path, calib, evaluation = outlier_files
    out, report_path = tmp_path / "q.onnx", tmp_path / "report.json"
    result = run_cli(path, out, "--calib", calib, "--eval", evaluation, "--activations", "static", "--quiet",
                     "--report", report_path)
    report = json.loads(report_path.read_text())
    assert report["evaluation"]["cosine"] < 0.9  # the construction really collapses
    assert result.returncode == 0, result.stderr
    assert out.exists()
    lines = result.stderr.splitlines()
    warnings = [line for line in lines if line.startswith("msq-onnx: warning:")]
    assert any("collapsed" in line and "'y'" in line for line in warnings), result.stderr
    assert not any("error" in line.split(":")[1] for line in lines), result.stderr
    assert any("collapsed" in warning for warning in report["warnings"])


# --------------------------------------------------------------------------- 9. CalibrationDataReader


def test_calibration_data_reader_is_accepted(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader

    rng = np.random.default_rng(3)
    feeds = []
    for batch, length in [(1, 5), (3, 7), (2, 4), (4, 9), (1, 12), (3, 6), (2, 8), (4, 5), (2, 10), (3, 4)]:
        feeds.append(padded_batch(rng, [length] * batch, length))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.pending = iter(feeds)

        def get_next(self):
            return next(self.pending, None)

    path = save(encoder(), tmp_path / "encoder.onnx")
    total = sum(len(feed["input_ids"]) for feed in feeds)
    report = convert(path, str(tmp_path / "q.onnx"), Reader(), Options(quiet=True)).report
    assert report["calibration"]["samples"] + report["evaluation"]["samples"] == total == 25
    assert report["evaluation"]["samples"] == 5  # every 5th sample held out
    assert report["evaluation"]["source"].startswith("CalibrationDataReader")
    assert report["evaluation"]["cosine"] > 0.98


def test_fixed_batch_model_converts_and_its_latency_uses_the_fixed_batch(tmp_path):
    """A model whose batch axis is fixed at 4 gets padded batches everywhere, the latency run included."""
    rng = np.random.default_rng(5)
    weight = rng.normal(size=(6, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "fixed.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(23, 6)).astype(np.float32))
    report = convert(str(tmp_path / "fixed.onnx"), str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"),
                     Options(quiet=True)).report
    assert report["latency_ms"]["batch"] == 4 and report["latency_ms"]["input_shapes"] == {"x": [4, 6]}
    assert report["latency_ms"]["output"] > 0 and report["evaluation"]["cosine"] > 0.99


def test_unhandled_weighted_ops_are_named_and_count_in_the_budget(tmp_path):
    """An Einsum's weight is not quantized: the report and stderr say so, and --avg-bits counts it at 32."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32) * 0.3, n)
             for n, s in (("we", (4, 6)), ("wo", (6, 3)))]
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["x", "we"], ["h"], equation="ni,ij->nj", name="einsum"),
         helper.make_node("MatMul", ["h", "wo"], ["out"], name="head")], "einsum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(12, 4)).astype(np.float32))
    report = convert(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), str(tmp_path / "c.npz"),
                     Options(quiet=True)).report
    assert [(s["node"], s["params"]) for s in report["left_in_float"]] == [("einsum", 24)]
    assert any("einsum" in w and "Einsum" in w for w in report["warnings"])
    head = report["layers"][0]  # the average, recomputed from the report alone: the Einsum's weight at 32 bits
    assert report["avg_weight_bits"] == pytest.approx((head["bits"] * head["params"] + 32 * 24) / (head["params"] + 24),
                                                      abs=1e-5)
    with pytest.raises(MsqError, match="einsum"):
        convert(str(tmp_path / "m.onnx"), str(tmp_path / "q2.onnx"), str(tmp_path / "c.npz"),
                Options(avg_bits=4, quiet=True))


def test_a_graph_output_before_a_relu_keeps_its_negative_values(tmp_path):
    """Gemm -> Relu where the Gemm's output is also a graph output: ORT's quantizer gives a lone Relu's input the
    Relu's range (adjust_tensor_ranges checks the consumers, not the graph outputs), which clipped that output at 0
    (cosine 0.73 at 8 bits, a hunting subagent's). The Relu stays out of ORT's region; every output is faithful."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32) * 0.3, n)
             for n, s in (("w1", (32, 16)), ("b1", (32,)), ("w2", (10, 32)), ("b2", (10,)))]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h0"], transB=1, name="fc1"),
         helper.make_node("Relu", ["h0"], ["h"], name="relu"),
         helper.make_node("Gemm", ["h", "w2", "b2"], ["logits"], transB=1, name="fc2")], "pre_activation_output",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["N", 32])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(64, 16)).astype(np.float32))
    report = convert(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), str(tmp_path / "c.npz"),
                     Options(avg_bits=8, quiet=True)).report
    assert report["evaluation"]["outputs"]["h0"]["cosine"] > 0.99


@pytest.mark.parametrize("activations", ["auto", "dynamic", "weight-only"])
def test_an_if_body_reading_a_relus_output_still_reads_it_after_the_relu(tmp_path, activations):
    """Gemm -> Relu -> h, and both If branches read h from the outer scope: ORT's quantizer dropped the Relu (h's only
    consumer inside the graph) and the branches got the Gemm's output, no Relu (cosine 0.68 at 8 bits, a hunting
    subagent's). The Relu stays out of ORT's region. With the Gemm rewritten by us (dynamic, which auto took where
    this machine timed it faster, or weight-only), the branches' own weights were dropped as unused: ORT refused the
    written model."""
    rng = np.random.default_rng(5)
    def weight(name, *shape):
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32) * 0.3, name)

    branch = lambda name, w: helper.make_graph(  # noqa: E731
        [helper.make_node("MatMul", ["h", w], [name + "_out"], name=name + "_mm")], name, [],
        [helper.make_tensor_value_info(name + "_out", TensorProto.FLOAT, ["N", 16])])
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h0"], transB=1, name="fc1"),
         helper.make_node("Relu", ["h0"], ["h"], name="relu"),
         helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0, name="total"),
         helper.make_node("Greater", ["total", "zero"], ["cond"], name="cond"),
         helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", "wt"), else_branch=branch("else", "we"),
                          name="branch")], "if_reads_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [weight("w1", 32, 16), weight("b1", 32), weight("wt", 32, 16), weight("we", 32, 16),
         numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(40, 16)).astype(np.float32))
    report = convert(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), str(tmp_path / "c.npz"),
                     Options(quiet=True, activations=activations)).report
    assert report["evaluation"]["outputs"]["y"]["cosine"] > 0.99


def test_a_weight_that_is_also_a_graph_output_stays_float(tmp_path):
    """A MatMul weight exposed as a graph output: quantizing the layer changed that output (cosine 0.997, a hunting
    subagent's); the layer keeps it in float, says why, and the output comes out exact."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in (("w1", (16, 8)),
                                                                                           ("w2", (8, 4)))]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("MatMul", ["h", "w2"], ["y"],
                                                                                      name="fc2")], "weight_out",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("w2", TensorProto.FLOAT, [8, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(40, 16)).astype(np.float32))
    report = convert(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), str(tmp_path / "c.npz"),
                     Options(quiet=True)).report
    assert [layer["name"] for layer in report["layers"]] == ["fc1"]
    assert [(s["node"], "graph output" in s["reason"]) for s in report["left_in_float"]] == [("fc2", True)]
    written = run_model(str(tmp_path / "q.onnx"), {"x": np.ones((1, 16), np.float32)})[1]
    assert np.array_equal(written, numpy_helper.to_array(inits[1]))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the 1e30 weight's squares, on purpose
@pytest.mark.parametrize("case", ["scalar-output", "sequence-output", "empty-weight", "huge-weight"])
def test_odd_models_convert_instead_of_an_internal_error(tmp_path, case):
    """A hunting subagent's: a rank-0 output (a mean over the batch), a sequence output, a [16, 0] weight and a weight
    of 1e30 each ended in "internal error" (IndexError, ValueError, ZeroDivisionError, scipy's "c must be finite").
    Now the rank-0 output is compared as one value a run, the sequence is left out of the comparison, the empty
    weight is no layer, and an error that overflowed counts as the worst measured."""
    rng = np.random.default_rng(6)
    w1 = rng.normal(size=(16, 8)).astype(np.float32) * (1e30 if case == "huge-weight" else 0.3)
    inits = [numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]
    if case == "scalar-output":
        nodes.append(helper.make_node("ReduceMean", ["y"], ["m"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, []))
    elif case == "sequence-output":
        nodes.append(helper.make_node("SequenceConstruct", ["y", "h"], ["seq"]))
        outputs.append(helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None))
    elif case == "empty-weight":
        inits.append(numpy_helper.from_array(np.zeros((16, 0), np.float32), "w0"))
        nodes += [helper.make_node("MatMul", ["x", "w0"], ["e"], name="empty"),
                  helper.make_node("ReduceSum", ["e", "one"], ["s"], keepdims=1),
                  helper.make_node("Add", ["y", "s"], ["z"])]
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
        outputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])]
    graph = helper.make_graph(nodes, case, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(40, 16)).astype(np.float32))
    report = convert(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), str(tmp_path / "c.npz"),
                     Options(avg_bits=4, quiet=True)).report
    assert sorted(layer["name"] for layer in report["layers"]) == ["fc1", "fc2"]
    if case == "scalar-output":
        assert report["evaluation"]["outputs"]["m"]["cosine"] > 0.5
    if case != "huge-weight":
        assert report["evaluation"]["cosine"] > 0.9


def test_weights_no_layer_takes_are_named_and_count_in_the_budget(tmp_path):
    """A MatMul whose weight is its left operand (W @ x) and a DeformConv's weight: float, named, counted at 32 bits.
    Both were float and counted nowhere: the report's average covered the other layers alone."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32) * 0.3, n)
             for n, s in (("wl", (4, 8)), ("wo", (5, 3)))]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["wl", "x"], ["h"], name="left"),
         helper.make_node("MatMul", ["h", "wo"], ["out"], name="head")], "left",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(12, 8, 5)).astype(np.float32))
    report = convert(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), str(tmp_path / "c.npz"),
                     Options(quiet=True)).report
    assert [s["node"] for s in report["left_in_float"]] == ["left"] and "'wl'" in report["left_in_float"][0]["reason"]
    assert any("left" in w and "W @ x" in w for w in report["warnings"])
    assert report["avg_weight_bits"] == pytest.approx((32 * 32 + 15 * report["layers"][0]["bits"]) / 47, abs=0.01)

    deform = helper.make_graph(
        [helper.make_node("Conv", ["x", "wo_conv"], ["o"], pads=[1, 1, 1, 1], name="offsets"),
         helper.make_node("DeformConv", ["x", "wd", "o"], ["y"], pads=[1, 1, 1, 1], name="deform")], "deform",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 6, 6])],
        [numpy_helper.from_array(rng.normal(size=(18, 4, 3, 3)).astype(np.float32), "wo_conv"),
         numpy_helper.from_array(rng.normal(size=(5, 4, 3, 3)).astype(np.float32), "wd")])
    onnx.save(helper.make_model(deform, opset_imports=[helper.make_opsetid("", 19)], ir_version=9), tmp_path / "d.onnx")
    loaded = load_model(str(tmp_path / "d.onnx"))
    assert [layer.name for layer in loaded.layers] == ["offsets"]
    assert [(s["node"], s["weight"]) for s in loaded.skipped] == [("deform", "wd")] and loaded.float_params == 180


def recurrent_model(op_type: str, directions: int, seed: int = 2, steps: int = 7, features: int = 8,
                    hidden: int = 16) -> onnx.ModelProto:
    """A batch-first sequence classifier as torch exports one: Transpose to [steps, N, features], the recurrent
    op, its last hidden state flattened over the directions, a MatMul head."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op_type]
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32) * 0.3, n)
             for n, s in (("W", (directions, gates * hidden, features)), ("R", (directions, gates * hidden, hidden)),
                          ("B", (directions, 2 * gates * hidden)), ("wo", (directions * hidden, 5)))]
    inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), "flat"))
    direction = "bidirectional" if directions == 2 else "forward"
    graph = helper.make_graph(
        [N("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="to_steps"),
         N(op_type, ["xt", "W", "R", "B"], ["Y", "Yh"], hidden_size=hidden, direction=direction, name="rnn"),
         N("Transpose", ["Yh"], ["ht"], perm=[1, 0, 2], name="to_batch"),
         N("Reshape", ["ht", "flat"], ["h"], name="flatten"),
         N("MatMul", ["h", "wo"], ["out"], name="head")], "recurrent",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", steps, features])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("op_type,directions", [("LSTM", 2), ("GRU", 1), ("RNN", 2)])
def test_recurrent_weights_are_two_weight_only_layers_dequantized_into_the_op(tmp_path, op_type, directions):
    """An LSTM's, GRU's or RNN's input weights W and recurrence weights R are two layers: stored as integers with
    a scale per gate row feeding the op's inputs 1 and 2: int8 through Cast x scale, which ORT folds into a float
    weight when it loads the model (no Cast left in its optimized graph), int4 through a DequantizeLinear. The
    written file is smaller, runs, and stays close to FP32; --prefer size stores 4-bit levels in int4 and is
    smaller again."""
    model = recurrent_model(op_type, directions)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(3).normal(size=(80, 7, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    sizes = {}
    for prefer in ("speed", "size"):
        out = tmp_path / f"q-{prefer}.onnx"
        report = convert(str(tmp_path / "m.onnx"), str(out), str(tmp_path / "c.npz"),
                         Options(avg_bits=4, prefer=prefer, quiet=True)).report
        layers = {layer["name"]: layer for layer in report["layers"]}
        assert {"rnn", "rnn/R"} <= set(layers) and report["left_in_float"] == []
        assert layers["rnn"]["mode"] == layers["rnn/R"]["mode"] == "weight-only"
        assert layers["rnn/R"]["importance"] == layers["rnn"]["importance"]  # one node, one predictor gain
        written = onnx.load(str(out))
        inits = {t.name: t for t in written.graph.initializer}
        producers = {o: n for n in written.graph.node for o in n.output}
        rnn = next(n for n in written.graph.node if n.op_type == op_type)
        for position, name in ((1, "rnn"), (2, "rnn/R")):
            made = producers[rnn.input[position]]
            if layers[name]["container"] == "int8" and prefer == "speed":
                cast = producers[made.input[0]]
                assert made.op_type == "Mul" and cast.op_type == "Cast"
                stored, scale = inits[cast.input[0]], numpy_helper.to_array(inits[made.input[1]])
                assert scale.shape == (1, stored.dims[1], 1)  # a scale per gate row
            else:
                assert made.op_type == "DequantizeLinear"
                stored, scale = inits[made.input[0]], numpy_helper.to_array(inits[made.input[1]])
                assert scale.shape == (stored.dims[1],)
            expected = onnx.TensorProto.INT4 if layers[name]["container"] == "int4" else onnx.TensorProto.INT8
            assert stored.data_type == expected and list(stored.dims) == list(
                numpy_helper.to_array(model.graph.initializer[position - 1]).shape)
        if prefer == "speed":
            assert layers["rnn"]["container"] == layers["rnn/R"]["container"] == "int8"
            assert optimized_op_counts(str(out)).get("Cast", 0) == 0  # folded: the op reads float initializers
        jsonschema.validate(report, json.load(open(SCHEMA_PATH)))
        if prefer == "size":
            assert "int4" in {layers["rnn"]["container"], layers["rnn/R"]["container"]}
        fp32 = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        cosine = np.sum(fp32 * got, 1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(got, axis=1))
        assert cosine.mean() > 0.95 and np.abs(got - fp32).max() > 0  # quantized, and close
        sizes[prefer] = os.path.getsize(out)
    assert sizes["size"] < sizes["speed"] < os.path.getsize(tmp_path / "m.onnx")


def test_fused_attention_weights_are_a_weight_only_layer(tmp_path):
    """ONNX Runtime's transformer optimizer packs Q, K and V into one com.microsoft Attention weight [hidden,
    3 x hidden]: it is a layer, written as int8 times a scale per column into the op (folded into a float weight
    when ORT loads the model), and the model stays close to FP32.
    ONNX's own Attention (opset 23) reads K as an input, not a weight, and is not taken for this kind."""
    from msq_onnx.ops import kind_for

    rng = np.random.default_rng(5)
    hidden, steps = 32, 6
    inits = [numpy_helper.from_array((rng.normal(size=(hidden, 3 * hidden)) * 0.2).astype(np.float32), "qkv"),
             numpy_helper.from_array((rng.normal(size=3 * hidden) * 0.1).astype(np.float32), "qkv_bias"),
             numpy_helper.from_array((rng.normal(size=(hidden, 4)) * 0.3).astype(np.float32), "wo"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    graph = helper.make_graph(
        [N("Attention", ["x", "qkv", "qkv_bias"], ["a"], num_heads=4, domain="com.microsoft", name="attention"),
         N("ReduceMean", ["a", "axis1"], ["pooled"], keepdims=0, name="pool"),
         N("MatMul", ["pooled", "wo"], ["out"], name="head")], "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", steps, hidden])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    onnx.save(model, tmp_path / "m.onnx")
    x = rng.normal(size=(64, steps, hidden)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    report = convert(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), str(tmp_path / "c.npz"),
                     Options(avg_bits=4, quiet=True)).report
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["attention"]["mode"] == "weight-only" and report["left_in_float"] == []
    jsonschema.validate(report, json.load(open(SCHEMA_PATH)))
    written = onnx.load(str(tmp_path / "q.onnx"))
    producers = {o: n for n in written.graph.node for o in n.output}
    attention = next(n for n in written.graph.node if n.op_type == "Attention")
    made = producers[attention.input[1]]
    stored = next(t for t in written.graph.initializer if t.name == producers[made.input[0]].input[0])
    assert made.op_type == "Mul" and stored.data_type == onnx.TensorProto.INT8 and list(stored.dims) == [32, 96]
    assert numpy_helper.to_array(next(t for t in written.graph.initializer if t.name == made.input[1])).shape == (1, 96)
    fp32 = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.sum(fp32 * got) / (np.linalg.norm(fp32) * np.linalg.norm(got)) > 0.98
    assert kind_for(N("Attention", ["q", "k", "v"], ["y"])) is None  # ONNX's own Attention


def test_ort_optimized_graphs_keep_their_moments_per_channel_and_name_their_float_tables(tmp_path):
    """A graph through ONNX Runtime's transformer optimizer: ONNX's shape inference stops at its com.microsoft ops,
    so a MatMul after one has an input of unknown rank; its moments are still one per input channel (they were
    per token and channel, and a pass over texts of two lengths crashed). The embedding tables an
    EmbedLayerNormalization reads stay float, are named and count in the budget (they were silently float)."""
    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.instrument import run_pass

    rng = np.random.default_rng(6)
    hidden, vocab = 8, 50
    inits = [numpy_helper.from_array((rng.normal(size=s) * 0.3).astype(np.float32), n)
             for n, s in (("words", (vocab, hidden)), ("positions", (16, hidden)), ("w", (hidden, 4)))]
    inits += [numpy_helper.from_array(np.ones(hidden, np.float32), "gamma"),
              numpy_helper.from_array(np.zeros(hidden, np.float32), "beta")]
    graph = helper.make_graph(
        [N("EmbedLayerNormalization", ["ids", "", "words", "positions", "", "gamma", "beta"], ["e", ""],
           domain="com.microsoft", name="embed"),
         N("FastGelu", ["e"], ["g"], domain="com.microsoft", name="gelu"),
         N("MatMul", ["g", "w"], ["out"], name="head")], "optimized",
        [helper.make_tensor_value_info("ids", TensorProto.INT32, ["N", "T"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", "T", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    onnx.save(model, tmp_path / "m.onnx")
    loaded = load_model(str(tmp_path / "m.onnx"))
    assert [layer.name for layer in loaded.layers] == ["head"]
    assert loaded.float_params == (vocab + 16) * hidden and {s["node"] for s in loaded.skipped} == {"embed"}
    np.savez(tmp_path / "c.npz", ids=rng.integers(0, vocab, size=(12, 7)).astype(np.int32))
    stats = run_pass(loaded, open_samples(str(tmp_path / "c.npz"), loaded.inputs, Preprocess()), (1, 2), 4096,
                     quiet=True)
    assert stats.input_sq["head"].shape == (hidden,) and stats.input_mean["head"].shape == (hidden,)


def test_a_batch_first_recurrent_op_is_left_in_float_and_named(tmp_path):
    """layout=1 puts the batch first in an LSTM's inputs and outputs, which the features do not read: its weights
    stay float and the report says why."""
    model = recurrent_model("LSTM", 1)
    rnn = next(node for node in model.graph.node if node.op_type == "LSTM")
    rnn.attribute.append(helper.make_attribute("layout", 1))
    onnx.save(model, tmp_path / "m.onnx")
    loaded = load_model(str(tmp_path / "m.onnx"))
    assert [layer.name for layer in loaded.layers] == ["head"]
    assert {s["weight"] for s in loaded.skipped if s["node"] == "rnn"} == {"W", "R"}
    assert all("layout=1" in s["reason"] for s in loaded.skipped if s["node"] == "rnn")


def test_recurrent_ops_that_review_found_broken(tmp_path):
    """Three LSTMs a review built: one whose only output is Y_c (no hidden states to read: float, named), one whose
    W is computed in the graph by an op the load does not fold, next to an initializer R (R alone is a layer; it
    was a KeyError), and one next to
    a node already named like its R layer (the layer gets another name; both were one layer's statistics)."""
    only_c = recurrent_model("LSTM", 1)
    rnn = next(node for node in only_c.graph.node if node.op_type == "LSTM")
    del rnn.output[:]
    rnn.output.extend(["", "", "Yc"])
    next(node for node in only_c.graph.node if node.name == "to_batch").input[0] = "Yc"
    onnx.save(only_c, tmp_path / "c.onnx")
    loaded = load_model(str(tmp_path / "c.onnx"))
    assert [layer.name for layer in loaded.layers] == ["head"]
    assert any("neither Y nor Y_h" in s["reason"] for s in loaded.skipped if s["node"] == "rnn")

    computed = recurrent_model("LSTM", 1)
    rnn = next(node for node in computed.graph.node if node.op_type == "LSTM")
    rnn.input[1] = "W_kept"  # what the load cannot fold: a random op's output is no constant
    computed.graph.node.insert(0, N("RandomUniformLike", ["W"], ["W_r"], low=1.0, high=1.0, name="random_w"))
    computed.graph.node.insert(1, N("Mul", ["W", "W_r"], ["W_kept"], name="scale_w"))
    onnx.save(computed, tmp_path / "w.onnx")
    kept = load_model(str(tmp_path / "w.onnx"))
    assert [layer.name for layer in kept.layers] == ["rnn/R", "head"]
    assert kept.float_params == kept.initializers["W"].dims[1] * kept.initializers["W"].dims[2]  # W counts at 32 bits

    clash = recurrent_model("LSTM", 1)
    next(node for node in clash.graph.node if node.op_type == "MatMul").name = "rnn/R"
    onnx.save(clash, tmp_path / "n.onnx")
    np.savez(tmp_path / "s.npz", x=np.random.default_rng(7).normal(size=(40, 7, 8)).astype(np.float32))
    report = convert(str(tmp_path / "n.onnx"), str(tmp_path / "q.onnx"), str(tmp_path / "s.npz"),
                     Options(avg_bits=4, quiet=True)).report
    names = [layer["name"] for layer in report["layers"]]
    assert len(set(names)) == 3 and "rnn/R" in names and "rnn" in names


def test_the_latency_budget_sees_a_recurrent_weights_dequantization(tmp_path):
    """Weight-only LSTM weights written as a DequantizeLinear (int4 or int2, and int8 with --prefer size) are
    dequantized in every run: --max-latency's per-layer costs charge that DequantizeLinear (measured on this
    machine, per container); int8 ones with --prefer speed are folded into a float weight when ORT loads the
    model, and cost what float does."""
    from msq_onnx.latency import layer_seconds, width_seconds

    onnx.save(recurrent_model("LSTM", 2), tmp_path / "m.onnx")
    loaded = load_model(str(tmp_path / "m.onnx"))
    seconds = layer_seconds(loaded, {})
    for layer in loaded.layers[:2]:
        assert seconds[layer.name]["float"] == 0.0
        assert width_seconds(layer, seconds[layer.name], "weight-only", "int8") == 0.0
        dequantized = width_seconds(layer, seconds[layer.name], "weight-only", "int8", folded=False)
        assert dequantized == seconds[layer.name]["int8"] > 0
        # --prefer size's int4 weights are timed as int4 (a review measured them 3.5x an int8 one's time)
        assert width_seconds(layer, seconds[layer.name], "weight-only", "int4") == seconds[layer.name]["int4"] > 0
        assert seconds[layer.name]["int2"] > 0


def test_the_report_schema_knows_every_op_kind_of_the_registry():
    """A layer of any kind the registry quantizes must pass the report's schema: its op_type list is the registry's."""
    from msq_onnx.ops import REGISTRY

    schema = json.load(open(SCHEMA_PATH))
    layer = schema["properties"]["layers"]["items"]["properties"]
    assert set(layer["op_type"]["enum"]) == set(REGISTRY)


def test_one_tensor_as_an_lstms_w_and_r_is_left_in_float_and_said_so(tmp_path):
    """W and R the same array (inputs as wide as the hidden state): one layer would be weighed for one of the two
    inputs it multiplies, so it stays float, and the reason names the two inputs, not "another layout"."""
    model = recurrent_model("LSTM", 1, features=16)
    rnn = next(node for node in model.graph.node if node.op_type == "LSTM")
    rnn.input[2] = "W"
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "R"))
    onnx.save(model, tmp_path / "m.onnx")
    loaded = load_model(str(tmp_path / "m.onnx"))
    assert [layer.name for layer in loaded.layers] == ["head"]
    reasons = {s["reason"] for s in loaded.skipped if s["node"] == "rnn"}
    assert reasons and all("inputs 1 and 2" in r and "another layout" not in r for r in reasons)


def test_a_recurrent_layers_features_are_one_row_per_sample(tmp_path):
    """The op's hidden states are [steps, directions, N, hidden]: the pass reads them with the samples first, so
    each layer's predictor sees one row per sample (its steps pooled), and R's input power is per hidden unit."""
    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.instrument import run_pass

    onnx.save(recurrent_model("LSTM", 2), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(4).normal(size=(30, 7, 8)).astype(np.float32))
    loaded = load_model(str(tmp_path / "m.onnx"))
    stats = run_pass(loaded, open_samples(str(tmp_path / "c.npz"), loaded.inputs, Preprocess()), (1, 2, 4), 4096,
                     quiet=True)
    assert stats.features.matrix("rnn").shape == stats.features.matrix("rnn/R").shape == (30, 2 * 16 * 7)
    assert stats.input_sq["rnn"].shape == (8,) and stats.input_sq["rnn/R"].shape == (16,)
    assert stats.rows["rnn"] == stats.rows["rnn/R"] == 7  # a sample's rows are its steps


def test_narrow_matmul_weights_get_one_scale_per_block_as_matmulnbits_stores_them(tmp_path):
    """--prefer size at 4 bits: a MatMul whose fan-in DENSE_BLOCK divides is written as a block-wise
    DequantizeLinear (one scale per 64 inputs of each column) that ORT fuses into MatMulNBits; the model
    computes x @ (integers x block scales), and the report's bytes count the block scales."""
    from conftest import tiny_mlp
    from msq_onnx.ops import DENSE_BLOCK

    model = tiny_mlp(features=2 * DENSE_BLOCK)
    path, out = str(tmp_path / "mlp.onnx"), str(tmp_path / "q.onnx")
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", **samples_for(model, 64, seed=1))
    result = convert(path, out, str(tmp_path / "calib.npz"),
                     Options(avg_bits=4, bits=(4, 8), prefer="size", rounding="nearest", quiet=True))
    written = onnx.load(out)
    inits = {t.name: t for t in written.graph.initializer}
    blocked = [n for n in written.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    assert len(blocked) == 1  # the first MatMul (fan-in 128); the second (fan-in 16) keeps a scale per column
    node = blocked[0]
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "block_size")) == DENSE_BLOCK
    scale = numpy_helper.to_array(inits[node.input[1]])
    assert scale.shape == (2, 16)  # [K / block, N]
    assert inits[node.input[0]].data_type == TensorProto.INT4
    assert optimized_op_counts(out)["MatMulNBits"] >= 1
    # the dequantized weight is the integers times their block's scale, and it is what runs
    integers = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)  # [K, N]
    dequantized = integers * np.repeat(scale, DENSE_BLOCK, axis=0)
    probe = onnx.ModelProto()
    probe.CopyFrom(written)
    probe.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
    got = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        [node.output[0]], {"x": np.zeros((1, 2 * DENSE_BLOCK), np.float32)})[0]
    np.testing.assert_allclose(got, dequantized, rtol=1e-6)
    assert integers.max() <= 7 and integers.min() >= -8
    layer = next(entry for entry in result.report["layers"] if entry["bits"] == 4 and entry["params"] == 128 * 16)
    assert layer["bytes"] == 128 * 16 // 2 + 4 * 16 * 2  # int4 values and one float scale per block


def test_two_bit_weights_take_four_levels_through_the_int2_container_and_the_fused_kernel(tmp_path):
    """The 2-bit grid is -2..1 times the step (four levels, where a symmetric grid has three): the -2 level
    survives int2 packing, ORT's DequantizeLinear reads it back, and the fused MatMulNBits computes what the
    unfused graph does."""
    from conftest import tiny_mlp
    from msq_onnx.ops import DENSE_BLOCK

    model = tiny_mlp(features=2 * DENSE_BLOCK)
    path, out = str(tmp_path / "mlp.onnx"), str(tmp_path / "q.onnx")
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", **samples_for(model, 64, seed=1))
    convert(path, out, str(tmp_path / "calib.npz"), Options(bits=(2,), prefer="size", quiet=True))
    written = onnx.load(out)
    blocked = [n for n in written.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    assert len(blocked) == 1 and {t.name: t for t in written.graph.initializer}[
        blocked[0].input[0]].data_type == TensorProto.INT2
    probe = onnx.ModelProto()
    probe.CopyFrom(written)
    probe.graph.output.append(helper.make_tensor_value_info(blocked[0].output[0], TensorProto.FLOAT, None))
    x = np.random.default_rng(5).normal(size=(8, 2 * DENSE_BLOCK)).astype(np.float32)
    dequantized = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        [blocked[0].output[0]], {"x": x[:1]})[0]  # [K, N]
    scale = numpy_helper.to_array({t.name: t for t in written.graph.initializer}[blocked[0].input[1]])
    integers = dequantized / np.repeat(scale, DENSE_BLOCK, axis=0)
    np.testing.assert_allclose(integers, np.rint(integers), atol=1e-4)
    assert set(np.unique(np.rint(integers))) == {-2.0, -1.0, 0.0, 1.0}
    original = numpy_helper.to_array(model.graph.initializer[0])
    assert np.sum((dequantized - original) ** 2) < 0.3 * np.sum(original ** 2)  # the weight, not noise
    assert optimized_op_counts(out)["MatMulNBits"] >= 1
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = ort.InferenceSession(out, plain, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    fused = ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert cosine(unfused, fused) > 0.999


def test_pass_counts_real_tokens_and_modes_need_fewer_samples_only_for_real_rows(tmp_path):
    """Padding is not a row: the pass records the real tokens per sample (from the attention mask), which the
    mode measurement's sample count reads instead of the padded length."""
    from msq_onnx import modes
    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.instrument import run_pass
    from msq_onnx.load import load_model

    model_path = save(encoder(), tmp_path / "encoder.onnx")
    loaded = load_model(model_path)
    rng = np.random.default_rng(3)
    feed = padded_batch(rng, [4, 6, 5, 7] * 5, 64)  # 20 samples of 4-7 real tokens padded to 64
    np.savez(tmp_path / "x.npz", **feed)
    samples = open_samples(str(tmp_path / "x.npz"), loaded.inputs, Preprocess())
    stats = run_pass(loaded, samples, (1, 2), 64, quiet=True)
    assert stats.tokens == pytest.approx(5.5)
    assert max(stats.rows.values()) == 64  # the padded length a run computes
    real = {name: min(r, stats.tokens) for name, r in stats.rows.items()}
    # 64 rows a sample of the narrowest layer's 16 outputs reach 8,192 values in 8 samples; 5.5 real rows need
    # all 20 there are
    narrowest = min(layer.weight_shape[layer.out_axis] for layer in loaded.layers)
    assert narrowest == 16 and modes.ENOUGH_VALUES == 8192
    assert sum(n for _, n in modes.measure(loaded, samples, stats.ranges, quiet=True, rows=real).feeds) == 20
    assert sum(n for _, n in modes.measure(loaded, samples, stats.ranges, quiet=True, rows=stats.rows).feeds) == 8
    # exported with a fixed sequence length of 64: the static sizes count padding, the real rows still rule
    fixed = encoder()
    for value in fixed.graph.input:
        value.type.tensor_type.shape.dim[1].dim_value = 64
    loaded = load_model(save(fixed, tmp_path / "fixed.onnx"))
    samples = open_samples(str(tmp_path / "x.npz"), loaded.inputs, Preprocess())
    assert sum(n for _, n in modes.measure(loaded, samples, stats.ranges, quiet=True, rows=real).feeds) == 20


def test_embedding_scales_are_stored_in_float16_unless_it_cannot_hold_them():
    from msq_onnx.ops import REGISTRY

    gather, dense = REGISTRY["Gather"], REGISTRY["MatMul"]
    assert gather.stored_scale(np.array([1e-3, 0.5], np.float32)).dtype == np.float16
    assert gather.stored_scale(np.array([1e-3, 7e4], np.float32)).dtype == np.float32  # past float16's range
    assert dense.stored_scale(np.array([1e-3, 0.5], np.float32)).dtype == np.float32


def test_a_classifier_that_outputs_only_its_predicted_label_is_judged_by_its_decisions(tmp_path):
    """scikit-learn's converted classifiers (skl2onnx) output an int64 label per sample (and a sequence of maps):
    the label is judged by agreement with FP32's and top-1 against the labels, not by a cosine of class ids."""
    from conftest import samples_for, tiny_mlp
    from msq_onnx import fidelity

    model = tiny_mlp(classes=4)
    model.graph.node.append(helper.make_node("ArgMax", ["y"], ["label"], axis=1, keepdims=0, name="argmax"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
    path = save(model, tmp_path / "labels.onnx")
    data = samples_for(tiny_mlp(classes=4), 120)
    np.savez(tmp_path / "calib.npz", x=data["x"][:80], labels=data["labels"][:80])
    np.savez(tmp_path / "eval.npz", x=data["x"][80:], labels=data["labels"][80:])
    result = convert(path, str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"),
                     Options(avg_bits=4, quiet=True, eval_path=str(tmp_path / "eval.npz")))
    evaluation = result.report["evaluation"]
    assert evaluation["kind"] == "labels" and evaluation["task_output"] == "label"
    assert evaluation["fp32_top1"] == 100.0  # samples_for labels the data with the model's own decisions
    quant = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(
        ["label"], {"x": data["x"][80:]})[0]
    assert evaluation["quant_top1"] == pytest.approx((quant == data["labels"][80:]).mean() * 100)
    assert evaluation["agreement"] == pytest.approx(evaluation["quant_top1"])
    assert fidelity.output_kind(np.array([[3.0], [1.0]]), None) == "tensor"  # one float a sample stays a tensor


def test_a_collapsed_output_beside_a_faithful_task_output_is_still_warned():
    """Every float output counts: a detector's boxes may break while its scores hold. Integer outputs (ids,
    labels) are judged by nothing of theirs here: a cosine of ids says little."""
    from msq_onnx.fidelity import collapse_warning

    measured = {"task_output": "scores", "kind": "tensor", "cosine": 0.99, "samples": 32,
                "outputs": {"scores": {"cosine": 0.99}, "boxes": {"cosine": 0.62}, "ids": {"cosine": 0.1, "integer": True}}}
    warning = collapse_warning(measured)
    assert warning is not None and "'boxes'" in warning and "0.620" in warning and "'ids'" not in warning
    assert "'scores'" not in warning
    gated = dict(measured, cosine=0.5, outputs=dict(measured["outputs"], scores={"cosine": 0.5}))
    warning = collapse_warning(gated, frozenset({"cosine"}))  # a gate judges the task output; the others are still said
    assert "'boxes'" in warning and "'scores'" not in warning
    warning = collapse_warning(gated, frozenset({"drop"}))  # a top-1 gate leaves the task output's cosine unjudged
    assert "'scores' collapsed (cosine to FP32 0.500" in warning
    measured["outputs"]["boxes"]["cosine"] = 0.95
    assert collapse_warning(measured) is None


def test_an_output_that_is_not_class_scores_is_not_judged_by_its_arg_max(cnn_files, tmp_path):
    """A mean-pooled embedding or a box regression is no class score though neither is unit-normalized: an
    arg-max over its dimensions flagged a 0.998-cosine embedding as collapsed. The name says what it holds, and
    --output-kind says it when the name does not; probability rows are class scores whatever their name."""
    from msq_onnx import fidelity
    from msq_onnx.errors import BadOption

    rows = np.random.default_rng(0).normal(size=(20, 6))
    assert fidelity.output_kind(rows, None, name="pooled") == "embedding"
    assert fidelity.output_kind(rows, None, name="boxes") == "tensor"
    assert fidelity.output_kind(rows, None, name="bbox_pred") == "tensor"
    assert fidelity.output_kind(rows, None, name="cls_logits") == "class-scores"
    assert fidelity.output_kind(rows, None, name="output") == "class-scores"  # nothing says otherwise
    assert fidelity.output_kind(rows, None, name="output", declared="embedding") == "embedding"
    probabilities = np.exp(rows) / np.exp(rows).sum(axis=1, keepdims=True)
    assert fidelity.output_kind(probabilities, None, name="pooled_features") == "class-scores"
    assert fidelity.output_kind(rows, np.array([0, 9]), name="logits") == "embedding"  # labels beyond C
    result = convert(cnn_files["model"], str(tmp_path / "q.onnx"), cnn_files["calib"],
                     Options(avg_bits=4, quiet=True, output_kind="tensor"))
    evaluation = result.report["evaluation"]
    assert evaluation["kind"] == "tensor" and "agreement" not in evaluation and evaluation["cosine"] > 0.9
    with pytest.raises(BadOption, match="--output-kind"):
        convert(cnn_files["model"], str(tmp_path / "q2.onnx"), cnn_files["calib"], Options(output_kind="logits"))


def test_a_sequence_of_class_scores_is_judged_position_by_position_on_real_tokens():
    """A language model's [N, T, V] logits: the report's cosine read padded positions and its kind was 'tensor',
    so a GPT-2 whose next-token arg-max agreed with FP32's at 78.8% of the real tokens passed on cosine 0.993. The
    arg-max agrees or not at each real position (the attention mask's), and padding counts in nothing."""
    from msq_onnx import fidelity

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(2, 5, 7)).astype(np.float32)
    quantized = reference.copy()
    quantized[0, 1] = -quantized[0, 1]  # one real position's decision changes
    quantized[1, 4] = rng.normal(size=7) * 50  # a padded position, wildly off
    real = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    sums = fidelity._OutputSums()
    sums.add(reference, quantized, keep=False, real=real)
    assert (sums.positions, sums.agreeing) == (8, 7)
    unmasked = fidelity._OutputSums()
    unmasked.add(reference, quantized, keep=False)
    assert unmasked.positions == 10
    # the second sample's only difference is padding: exactly faithful on its real tokens, far off with padding
    assert sums.cosine_sum - unmasked.cosine_sum > 0.5 and sums.noise < unmasked.noise / 10
    assert fidelity.sequence_kind("logits", None, False) == "class-scores"
    assert fidelity.sequence_kind("last_hidden_state", None, False) == "tensor"
    assert fidelity.sequence_kind("out", None, True) == "class-scores"  # probability rows
    assert fidelity.sequence_kind("logits", "tensor", False) == "tensor"
    # [N, C, 1] scores are no sequence (an arg-max over one value always agrees); a 4-D [N, T, heads, d] output
    # takes the mask too
    column = fidelity._OutputSums()
    column.add(reference[:, :, :1], quantized[:, :, :1], keep=False, real=real)
    assert column.positions == 0
    heads = fidelity._OutputSums()
    heads.add(reference.reshape(2, 5, 7, 1).repeat(2, 3), quantized.reshape(2, 5, 7, 1).repeat(2, 3), False, real)
    assert heads.masked and heads.noise == pytest.approx(2 * sums.noise)
    measured = {"kind": "class-scores", "task_output": "logits", "cosine": 0.993, "agreement": 78.8, "drop": 21.2,
                "agreement_unit": "positions (2,438)", "samples": 128, "outputs": {}}
    assert "78.8% over positions (2,438)" in fidelity.collapse_warning(measured)


def test_a_partly_quantized_input_counts_its_integer_weights_and_says_so(tmp_path):
    """ORT's quantize_static with the classifier excluded leaves the convolutions' weights int8 behind
    DequantizeLinear and the Gemm in float. The float layer is quantized; the int8 weights stay as they are, are
    named in the report and a warning, and count at 8 bits in the budget and the average (they counted nowhere, so
    "4.00 bits" described the Gemm alone)."""
    partly = _partly_quantized(tmp_path)
    loaded = load_model(str(partly))
    assert [layer.name for layer in loaded.layers] == ["fc"]
    conv_params = 8 * 1 * 9 + 8 * 9 + 16 * 8
    assert loaded.fixed_weights == {8: conv_params}
    assert sorted(e["weight"] for e in loaded.prequantized) == ["w1_quantized", "w2_quantized", "w3_quantized"]

    result = convert(str(partly), str(tmp_path / "out.onnx"), str(tmp_path / "calib.npz"),
                     Options(avg_bits=7, quiet=True))
    report = result.report
    jsonschema.validate(report, json.load(open(SCHEMA_PATH)))
    fc_bits = next(layer["bits"] for layer in report["layers"] if layer["name"] == "fc")
    expected = (fc_bits * 4 * 16 + 8 * conv_params) / (4 * 16 + conv_params)
    assert report["avg_weight_bits"] == pytest.approx(expected) and report["avg_weight_bits"] <= 7 + 1e-9
    assert fc_bits < 7  # the Gemm pays for the convolutions' 8 bits
    assert {e["node"] for e in report["already_quantized"]} == {e["node"] for e in loaded.prequantized}
    assert any("quantized in the input already" in w and "8 bits" in w for w in report["warnings"])
    with pytest.raises(BadOption, match="272 at 8 bits.*lowest reachable average 6.86"):
        convert(str(partly), str(tmp_path / "out2.onnx"), str(tmp_path / "calib.npz"), Options(avg_bits=4, quiet=True))


def test_packed_integer_weights_count_at_their_bits_and_a_tied_float16_table_is_not_copied(tmp_path):
    """A MatMulNBits weight is uint8 bytes of two 4-bit values: it counts as K x N parameters at 4 bits, not as its
    bytes at 8 (which shrank the average's denominator). A float16 table read by a Gather and, cast and transposed,
    by a MatMul is one tied weight: folding the cast stored a float32 copy beside it, counted nowhere."""
    rng = np.random.default_rng(0)
    k, n = 32, 8
    packed = numpy_helper.from_array(rng.integers(0, 255, (n, 1, k // 2), dtype=np.uint8), "nbits_B")
    scales = numpy_helper.from_array(np.full(n, 0.1, np.float32), "nbits_scales")
    nodes = [helper.make_node("MatMulNBits", ["x", "nbits_B", "nbits_scales"], ["h"], domain="com.microsoft", K=k, N=n,
                              bits=4, block_size=32, name="nbits"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [packed, scales, numpy_helper.from_array(rng.normal(size=(n, 3)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    onnx.save(model, tmp_path / "nbits.onnx")
    loaded = load_model(str(tmp_path / "nbits.onnx"))
    assert [layer.name for layer in loaded.layers] == ["mm"] and loaded.fixed_weights == {4: k * n}

    table = numpy_helper.from_array(rng.normal(size=(10, 4)).astype(np.float16), "table16")
    nodes = [helper.make_node("Gather", ["table16", "ids"], ["e16"], name="embed"),
             helper.make_node("Cast", ["e16"], ["e"], to=TensorProto.FLOAT, name="cast_e"),
             helper.make_node("Cast", ["table16"], ["table"], to=TensorProto.FLOAT, name="cast_t"),
             helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0], name="tie"),
             helper.make_node("MatMul", ["e", "table_t"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "tied16", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 10])], [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "t.onnx")
    with pytest.raises(MsqError):  # the table stays float16 and tied: refused in one line, never copied
        load_model(str(tmp_path / "t.onnx"))


def test_a_budget_search_starts_where_the_fixed_weights_allow(tmp_path):
    """--max-drop without a budget searches averages from every layer at the narrowest width; with weights no
    allocation changes (float, or int8 in a partly quantized input) that start can be out of reach, and the search
    stopped on "--avg-bits 2 cannot be met", a flag nobody passed (a review's)."""
    report = convert(_partly_quantized(tmp_path), str(tmp_path / "out.onnx"), str(tmp_path / "calib.npz"),
                     Options(max_drop=100.0, quiet=True)).report
    assert min(probe["budget"] for probe in report["search"]) >= 6.75 and report["avg_weight_bits"] <= 7.0 + 1e-9


def _partly_quantized(tmp_path) -> str:
    """The tiny CNN through ORT's quantize_static with only its convolutions quantized: their weights int8 behind
    DequantizeLinear, the Gemm float. Writes calib.npz beside it; returns the model's path."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    model = tiny_cnn()
    onnx.save(model, tmp_path / "cnn.onnx")
    calib = samples_for(model, 64, seed=1)
    np.savez(tmp_path / "calib.npz", **calib)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"x": calib["x"][i:i + 1]} for i in range(16)])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(tmp_path / "cnn.onnx"), str(tmp_path / "partly.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, op_types_to_quantize=["Conv"])
    return str(tmp_path / "partly.onnx")


@pytest.mark.parametrize("elem", [TensorProto.INT16, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64],
                         ids=["int16", "uint16", "uint32", "uint64"])
def test_integer_inputs_of_other_widths_are_fed_in_their_dtype(tmp_path, elem):
    """PCM audio (int16), depth maps (uint16), ...: Cast inside (was: fed as float32, and ORT refused the feed)."""
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [N("Cast", ["x"], ["xf"], to=TensorProto.FLOAT), N("MatMul", ["xf", "w1"], ["h"], name="fc1"),
         N("Relu", ["h"], ["r"]), N("MatMul", ["r", "w2"], ["logits"], name="fc2")], "wide_ints",
        [helper.make_tensor_value_info("x", elem, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(rng.normal(0, 0.01, (16, 32)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.normal(0, 0.3, (32, 4)).astype(np.float32), "w2")])
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                tmp_path / "m.onnx")
    assert load_model(path).inputs[0].dtype == dtype
    np.savez(tmp_path / "calib.npz", x=rng.integers(0, 3000, (40, 16)))  # int64 samples, cast like int32 ones
    report = convert(path, str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"), Options(quiet=True)).report
    assert report["evaluation"]["cosine"] > 0.98
    np.savez(tmp_path / "negative.npz", x=rng.integers(-3000, 3000, (40, 16)))
    if np.dtype(dtype).kind == "u":
        with pytest.raises(MsqError, match="beyond the range of the model's uint"):
            convert(path, str(tmp_path / "q2.onnx"), str(tmp_path / "negative.npz"), Options(quiet=True))


def test_inputs_with_independent_sequence_axes_convert(tmp_path):
    """Cross-attention: query [N, Q, 8] attends over memory [N, K, 8], Q != K (was: "sequence lengths differ
    between inputs"). The loader keeps the axes' names that tell them apart."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name)

    graph = helper.make_graph(
        [N("MatMul", ["query", "wq"], ["q"], name="q_proj"), N("MatMul", ["memory", "wk"], ["k"], name="k_proj"),
         N("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), N("MatMul", ["q", "kt"], ["scores"]),
         N("Softmax", ["scores"], ["attention"], axis=-1), N("MatMul", ["attention", "memory"], ["mixed"]),
         N("ReduceMean", ["mixed"], ["pooled"], axes=[1], keepdims=0),
         N("MatMul", ["pooled", "wo"], ["logits"], name="head")], "cross_attention",
        [helper.make_tensor_value_info("query", TensorProto.FLOAT, ["N", "Q", 8]),
         helper.make_tensor_value_info("memory", TensorProto.FLOAT, ["N", "K", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [weight("wq", 8, 8), weight("wk", 8, 8), weight("wo", 8, 4)])
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8),
                tmp_path / "m.onnx")
    assert [spec.axis_names for spec in load_model(path).inputs] == [["N", "Q", None], ["N", "K", None]]
    np.savez(tmp_path / "calib.npz", query=rng.normal(size=(40, 5, 8)).astype(np.float32),
             memory=rng.normal(size=(40, 9, 8)).astype(np.float32))
    report = convert(path, str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"), Options(quiet=True)).report
    assert report["evaluation"]["cosine"] > 0.98


@pytest.mark.parametrize("assumed", ["right", "wrong", "failed"])
def test_an_embedding_tables_error_table_is_made_before_the_modes_as_the_tables_stage_would(tmp_path, monkeypatch,
                                                                                              assumed):
    """A layer whose activation mode is known before the modes are measured (an embedding table: weight-only is its
    only mode) has its error table made on a thread of its own from the end of the pass, not on the main thread nor
    in the error tables' stage, and it is the table that stage makes. Where the mode assumed turns out wrong, or
    the thread failed, the stage makes it again."""
    import threading

    from msq_onnx import pipeline
    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.ops import STATIC

    loaded = load_model(save(encoder(), tmp_path / "encoder.onnx"))
    calib = open_samples(token_folder(tmp_path / "calib", 24), loaded.inputs, Preprocess())
    table = next(layer for layer in loaded.layers if layer.op_type == "Gather")
    if assumed == "wrong":
        monkeypatch.setattr(pipeline, "_known_mode", lambda layer, options: STATIC if layer is table else None)
    made = []  # (layer, mode, made on the tables stage's workers)
    real = pipeline._layer_table

    def spy(loaded, stats, options, layer, mode, widths):
        thread = threading.current_thread()
        made.append((layer.name, mode, thread.name.startswith("ThreadPoolExecutor")))
        assert thread is not threading.main_thread()
        if assumed == "failed" and not made[-1][2]:
            raise MemoryError("on the early thread")
        return real(loaded, stats, options, layer, mode, widths)

    monkeypatch.setattr(pipeline, "_layer_table", spy)
    options = Options(quiet=True, avg_bits=4)
    analysis = pipeline.analyse(loaded, calib, options, pipeline._Timer())
    mode = analysis.modes[table.name].mode
    assert mode == "weight-only"
    early = [entry for entry in made if entry[0] == table.name]
    if assumed == "right":
        assert early == [(table.name, mode, False)]
    else:  # made early (as static, or failing), then again in the stage as what it is
        assert early == [(table.name, STATIC if assumed == "wrong" else mode, False), (table.name, mode, True)]
    assert all(pool for name, _, pool in made if name != table.name)
    again = real(loaded, analysis.stats, options, table, mode, sorted(analysis.choices[table.name]))
    assert sorted(again) == sorted(analysis.choices[table.name])
    for bits, choice in again.items():
        kept = analysis.choices[table.name][bits]
        for field in ("clip", "integers", "flipped", "level_set"):
            np.testing.assert_array_equal(getattr(choice, field), getattr(kept, field), err_msg=field)
        assert choice.error == kept.error


def test_the_tables_stage_starts_beside_an_early_table_still_being_made(tmp_path, monkeypatch):
    """The error tables' stage does not wait for the early thread's table before it starts its own: the early
    thread counts as one of its workers, and the stage's other worker works beside it (MiniLM-L6: its embedding's
    table ended 0.4 s into the stage, one core idle until then). Never more tables at once than workers."""
    import threading

    from msq_onnx import pipeline
    from msq_onnx.data import Preprocess, open_samples

    loaded = load_model(save(encoder(), tmp_path / "encoder.onnx"))
    calib = open_samples(token_folder(tmp_path / "calib", 16), loaded.inputs, Preprocess())
    table = next(layer for layer in loaded.layers if layer.op_type == "Gather")
    monkeypatch.setattr(pipeline, "usable_cores", lambda: 2)
    pool_started, lock = threading.Event(), threading.Lock()
    running, most, overlapped = [0], [0], []
    real = pipeline._layer_table

    def spy(loaded, stats, options, layer, mode, widths):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            if layer is table:  # on the early thread: held until the stage has a table of its own under way
                assert isinstance(threading.current_thread(), pipeline._ResultThread)
                overlapped.append(pool_started.wait(timeout=60))
            else:
                pool_started.set()
            return real(loaded, stats, options, layer, mode, widths)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(pipeline, "_layer_table", spy)
    analysis = pipeline.analyse(loaded, calib, Options(quiet=True, avg_bits=4), pipeline._Timer())
    assert overlapped == [True]
    assert most[0] == pipeline.TABLE_WORKERS == 2
    assert set(analysis.choices) == {layer.name for layer in loaded.layers}


def test_a_failing_error_table_stops_the_tables_not_yet_started(monkeypatch):
    """One layer's table failing ends the stage: the tables queued behind it are not made (a failed or
    interrupted conversion does not pay for the rest of the stage)."""
    import time
    from types import SimpleNamespace

    from msq_onnx import pipeline

    layers = [SimpleNamespace(name=f"layer{index}") for index in range(20)]
    made = []

    def table(loaded, stats, options, layer, mode, widths):
        made.append(layer.name)
        if layer.name == "layer0":
            raise MemoryError("layer0")
        time.sleep(0.5)  # long beside the main thread's cancelling, even on a loaded machine
        return {}

    monkeypatch.setattr(pipeline, "_layer_table", table)
    monkeypatch.setattr(pipeline, "usable_cores", lambda: 2)
    modes = {layer.name: SimpleNamespace(mode="dynamic") for layer in layers}
    with pytest.raises(MemoryError):
        pipeline._error_tables(SimpleNamespace(layers=layers), None, Options(), modes)
    assert made[0] == "layer0" and len(made) <= 4  # of 20: the two workers' first, and at most one more each


def test_the_modes_costs_are_timed_before_the_early_tables_thread_starts(tmp_path, monkeypatch):
    """A layer's mode costs are timed where this machine's cache has none, and cached for every later conversion:
    they are taken before the early error tables' thread starts, so nothing runs beside the timing."""
    from msq_onnx import pipeline
    from msq_onnx.data import Preprocess, open_samples

    loaded = load_model(save(encoder(), tmp_path / "encoder.onnx"))
    calib = open_samples(token_folder(tmp_path / "calib", 16), loaded.inputs, Preprocess())
    events = []
    real_costs, real_init = pipeline.mode_costs, pipeline._EarlyTables.__init__

    def costs(layer, rows):
        events.append("costs")
        return real_costs(layer, rows)

    def started(self, *args, **kwargs):
        events.append("early tables")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(pipeline, "mode_costs", costs)
    monkeypatch.setattr(pipeline._EarlyTables, "__init__", started)
    pipeline.analyse(loaded, calib, Options(quiet=True, avg_bits=4), pipeline._Timer())
    assert events == ["costs"] * len(loaded.layers) + ["early tables"]


@pytest.mark.parametrize("static_first", [True, False])
def test_a_static_mode_slower_than_dynamic_is_neither_measured_nor_taken(tmp_path, monkeypatch, static_first):
    """Static quantizes a layer's input on the calibrated range, which holds every range dynamic computes on a
    calibration sample, and its output too: where it is also slower than dynamic it cannot be the mode to take,
    and its copy in the modes' measurement is not built. Forced (--activations static), it is measured."""
    from msq_onnx import pipeline
    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.ops import DYNAMIC, FLOAT, STATIC, WEIGHT_ONLY

    loaded = load_model(save(encoder(), tmp_path / "encoder.onnx"))
    calib = open_samples(token_folder(tmp_path / "calib", 16), loaded.inputs, Preprocess())
    times = {STATIC: 1.0, DYNAMIC: 2.0} if static_first else {STATIC: 2.0, DYNAMIC: 1.0}
    monkeypatch.setattr(pipeline, "mode_costs", lambda layer, rows: {
        mode: times.get(mode, 3.0 if mode == WEIGHT_ONLY else 4.0) for mode in layer.kind.modes + (FLOAT,)})
    dense = [layer.name for layer in loaded.layers if layer.op_type in ("MatMul", "Gemm")]
    assert dense
    for activations in ("auto", "static"):
        # no mode's error within a tolerance of 0: a static taken unmeasured (error 0 by default) would show
        analysis = pipeline.analyse(loaded, calib, Options(quiet=True, avg_bits=8, activations=activations,
                                                           mode_tolerance=0.0), pipeline._Timer())
        measured = {name: STATIC in analysis.modes[name].errors for name in dense}
        if activations == "auto" and not static_first:
            assert not any(measured.values())
            assert all(analysis.modes[name].mode != STATIC for name in dense)
        else:
            assert all(measured.values())



def test_a_static_mode_whose_output_an_activation_absorbs_is_not_dominated(tmp_path):
    """Where a Relu or Clip absorbs a layer's output, static's error is measured on the activation's output, another
    signal than dynamic's: static is then measured whatever the costs say."""
    from conftest import tiny_mlp
    from msq_onnx.modes import dominated, dominated_modes
    from msq_onnx.ops import DYNAMIC, FLOAT, STATIC, WEIGHT_ONLY

    loaded = load_model(save(tiny_mlp(), tmp_path / "mlp.onnx"))
    dense = next(layer for layer in loaded.layers if layer.op_type == "MatMul")
    costs = {STATIC: 2.0, DYNAMIC: 1.0, WEIGHT_ONLY: 3.0, FLOAT: 4.0}
    assert dominated(dense, costs) == {STATIC}
    assert dominated(dense, costs, absorbed=True) == set()
    assert dominated(dense, {**costs, STATIC: 0.5}) == set()  # static faster: measured
    # tiny_mlp's MatMuls feed an Add, which absorbs nothing: both dominated where dynamic is faster
    assert dominated_modes(loaded, {layer.name: costs for layer in loaded.layers}) == {
        layer.name: {STATIC} for layer in loaded.layers}


# --------------------------------------------------------------------------- ranges only where static can be taken

def with_positions(model: onnx.ModelProto, table: int = 16, seed: int = 1) -> onnx.ModelProto:
    """The encoder with learned position embeddings added to its token embeddings, the table sliced to each run's
    length through Shape, Gather and Slice as exported transformers do (ONNX's shape inference then loses the
    sequence's symbol for every tensor after the sum), and the query projection's input reshaped to a shape
    computed from its own (Shape, Gather, Concat, as exported head merges are), which only data propagation sizes."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    embed = node_named(model, "embed")
    embed.output[0] = "tokens"
    width = next(t for t in graph.initializer if t.name == "emb").dims[1]
    rng = np.random.default_rng(seed)
    graph.initializer.extend([
        numpy_helper.from_array(rng.normal(0, 0.5, (table, width)).astype(np.float32), "positions"),
        numpy_helper.from_array(np.array([1], np.int64), "seq_axis"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([0, 1], np.int64), "batch_and_length"),
        numpy_helper.from_array(np.array([width], np.int64), "width")])
    node_named(model, "q_proj").input[0] = "ln1_merged"
    merge = [N("Shape", ["ln1"], ["ln1_shape"], name="ln1_shape"),
             N("Gather", ["ln1_shape", "batch_and_length"], ["ln1_rows"], axis=0, name="ln1_rows"),
             N("Concat", ["ln1_rows", "width"], ["merged_shape"], axis=0, name="merged_shape"),
             N("Reshape", ["ln1", "merged_shape"], ["ln1_merged"], name="merge_heads")]
    at = list(graph.node).index(node_named(model, "q_proj"))
    for offset, node in enumerate(merge):
        graph.node.insert(at + offset, node)
    nodes = [N("Shape", ["input_ids"], ["ids_shape"], name="ids_shape"),
             N("Gather", ["ids_shape", "seq_axis"], ["length"], axis=0, name="length"),
             N("Slice", ["positions", "zero", "length", "zero"], ["position_rows"], name="position_rows"),
             N("Add", ["tokens", "position_rows"], ["h0"], name="add_positions")]
    at = list(graph.node).index(embed) + 1
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)
    return model


class _Feeds:
    def __init__(self, feeds):
        self.pending = iter(feeds)

    def get_next(self):
        return next(self.pending, None)


def test_the_rows_a_sample_are_known_before_the_pass_as_the_pass_counts_them(tmp_path, monkeypatch):
    """Which layers' ranges the pass measures is decided before it, on the rows a sample that each dense layer's
    modes are timed on. Where the position embeddings go through Shape and Slice, ONNX's symbols no longer say
    that a layer's rows are the text's tokens; its data propagation, given sizes for the input dims, does, and
    texts held in memory give their lengths, as .npz files of one length do in their headers. Samples read from
    files are not read twice for it."""
    from msq_onnx.data import ArraySamples, Preprocess, from_data_reader, open_samples, split_holdout
    from msq_onnx.instrument import estimated_rows, run_pass

    loaded = load_model(save(with_positions(encoder()), tmp_path / "encoder.onnx"))
    dense = {layer.name for layer in loaded.layers if layer.op_type == "MatMul"}
    assert len(dense) == 6
    symbols = {value.name: [d.dim_param for d in value.type.tensor_type.shape.dim]
               for value in loaded.model.graph.value_info}
    assert "sequence" not in symbols["q"] and "sequence" not in symbols["gelu"]
    rng = np.random.default_rng(4)
    lengths = [4, 11, 7, 12, 5, 9, 6, 10, 8, 12, 4, 7, 9]
    samples = from_data_reader(_Feeds([padded_batch(rng, [n], n) for n in lengths]), loaded.inputs)
    rows = estimated_rows(loaded, samples)
    stats = run_pass(loaded, samples, (1, 2), 64, quiet=True)
    assert rows == {name: stats.rows[name] for name in dense}
    assert set(rows.values()) == {int(np.median(lengths))}
    # in padded batches of 4, of the samples a held-out split leaves for calibration
    calib, _ = split_holdout(samples, 0.25)
    assert estimated_rows(loaded, calib, 4) == {
        name: run_pass(loaded, calib, (1, 2), 64, batch_size=4, quiet=True).rows[name] for name in dense}
    # .npz files of different lengths would be read twice to learn them; files of one length say it in their headers
    on_disk = open_samples(token_folder(tmp_path / "calib", 8), loaded.inputs, Preprocess())
    assert estimated_rows(loaded, on_disk) == {}
    np.savez(tmp_path / "one_length.npz", **padded_batch(rng, [9, 3, 7, 9, 5], 9))
    padded = open_samples(str(tmp_path / "one_length.npz"), loaded.inputs, Preprocess())
    reads = []
    real_array = ArraySamples._array
    monkeypatch.setattr(ArraySamples, "_array", staticmethod(lambda *args: reads.append(args) or real_array(*args)))
    rows = estimated_rows(loaded, padded)
    assert not reads
    assert rows == {name: 9 for name in dense} == {name: run_pass(loaded, padded, (1, 2), 64, quiet=True).rows[name]
                                                   for name in dense}
    assert reads  # the pass reads the arrays


def test_input_dims_an_exporter_names_apart_are_one_length_for_the_estimate(tmp_path):
    """torch's list-form dynamic axes name each input's sequence on its own (input_ids_dynamic_axes_1,
    attention_mask_dynamic_axes_1): given sizes of their own, the mask's broadcast fails shape inference and
    every layer after it had no estimate. Made-up names count as unnamed, one size per axis."""
    from msq_onnx.data import from_data_reader
    from msq_onnx.instrument import estimated_rows

    model = with_positions(encoder())
    for value in model.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            dim.dim_param = f"{value.name}_dynamic_axes_{axis + 1}"
    loaded = load_model(save(model, tmp_path / "encoder.onnx"))
    samples = from_data_reader(_Feeds([padded_batch(np.random.default_rng(6), [n], n) for n in (6, 7, 11)]),
                               loaded.inputs)
    assert estimated_rows(loaded, samples) == {layer.name: 7 for layer in loaded.layers if layer.op_type == "MatMul"}


def test_only_data_propagation_sizes_a_layer_after_a_reshape_to_a_computed_shape(tmp_path, monkeypatch):
    """The query projection reads its input through a Reshape to a shape computed from the input's own: ONNX's
    shape inference sizes its rows only with data propagation; without it the layer has no estimate (and keeps
    its ranges), the others still do."""
    import onnx.shape_inference
    from msq_onnx.data import from_data_reader
    from msq_onnx.instrument import estimated_rows

    loaded = load_model(save(with_positions(encoder()), tmp_path / "encoder.onnx"))
    samples = from_data_reader(_Feeds([padded_batch(np.random.default_rng(5), [n], n) for n in (5, 8, 9)]),
                               loaded.inputs)
    query = next(layer.name for layer in loaded.layers if layer.nodes == ("q_proj",))
    assert estimated_rows(loaded, samples)[query] == 8
    infer = onnx.shape_inference.infer_shapes
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", lambda model, **options: infer(model))
    rows = estimated_rows(loaded, samples)
    assert query not in rows and len(rows) == 5


def test_the_pass_measures_ranges_only_for_the_layers_that_may_end_static(tmp_path, monkeypatch):
    """A layer whose static is slower than dynamic (at the rows estimated before the pass) never ends static: the
    pass leaves out the ReduceMin and ReduceMax of the tensors only it would read (MiniLM-L6: 65 tensors a text,
    8% of the pass). Without an estimate, forced static, or where static is faster, they are measured."""
    from msq_onnx import modes
    from msq_onnx.instrument import build_instrumented
    from msq_onnx.ops import DYNAMIC, FLOAT, STATIC, WEIGHT_ONLY

    loaded = load_model(save(encoder(), tmp_path / "encoder.onnx"))
    dense = {layer.name for layer in loaded.layers if layer.op_type == "MatMul"}
    times = {STATIC: 2.0, DYNAMIC: 1.0, WEIGHT_ONLY: 3.0, FLOAT: 4.0}
    monkeypatch.setattr(modes, "mode_costs", lambda layer, rows: {m: times[m] for m in layer.kind.modes + (FLOAT,)})
    rows = {name: 8 for name in dense}
    assert modes.static_candidates(loaded, rows) == set()
    assert modes.static_candidates(loaded, {}) == dense  # no rows to time them on: kept
    assert modes.static_candidates(loaded, rows, forced=STATIC) == dense
    assert modes.static_candidates(loaded, {}, forced=DYNAMIC) == set()
    times[STATIC] = 0.5
    assert modes.static_candidates(loaded, rows) == dense

    down = next(layer.name for layer in loaded.layers if layer.nodes == ("ffn_down",))
    ranged = {name: set(build_instrumented(loaded, static_layers=chosen)[1]["range"])
              for name, chosen in (("all", None), ("none", set()), ("down", {down}))}
    assert ranged["none"] == set()
    assert "gelu" in ranged["down"] and "ln1" not in ranged["down"] and ranged["down"] < ranged["all"]
    assert {"ln1", "gelu"} <= ranged["all"]


def test_a_layer_whose_ranges_the_pass_did_not_measure_is_never_static_and_says_why(cnn_files, monkeypatch):
    """Should the rows after the pass make static worth measuring where the estimate before it did not, the layer
    has no ranges to be static on: its static is left out and its reason says so, and its report entry has no
    activation error. (The tiny CNN's convolutions are otherwise static, test_relu_cnn_convs_are_static_in_auto_mode.)"""
    from msq_onnx import pipeline

    monkeypatch.setattr(pipeline.mode_stage, "static_candidates", lambda loaded, rows, forced=None: set())
    out = cnn_files["dir"] / "q.onnx"
    report = convert(cnn_files["model"], str(out), cnn_files["calib"],
                     Options(quiet=True, eval_path=cnn_files["eval"])).report
    jsonschema.validate(report, json.load(open(SCHEMA_PATH)))
    layers = {layer["name"]: layer for layer in report["layers"]}
    for name in ("conv1", "dw", "pw"):
        assert layers[name]["mode"] != "static" and "static" not in layers[name]["mode_errors"], layers[name]
        assert "no ranges gathered" in layers[name]["mode_reason"]
    assert all(layer["activation_error"] is None for layer in layers.values())
    assert report["evaluation"]["cosine"] > 0.99
    assert "QuantizeLinear" not in {node.op_type for node in onnx.load(str(out)).graph.node}


def test_a_forced_mode_other_than_static_measures_no_static_without_its_ranges(cnn_files):
    """--activations weight-only: the pass measures no ranges, and the modes' measurement (kept for the report)
    leaves static out instead of simulating it on ranges it does not have."""
    report = convert(cnn_files["model"], str(cnn_files["dir"] / "q.onnx"), cnn_files["calib"],
                     Options(quiet=True, activations="weight-only", eval_path=cnn_files["eval"])).report
    for layer in report["layers"]:
        assert layer["mode"] == "weight-only" and "static" not in layer["mode_errors"], layer
        assert layer["activation_error"] is None


def test_body_nodes_that_share_a_name_or_have_none_are_layers_apart(tmp_path):
    """ONNX does not ask node names to be unique: sibling branches whose MatMuls are both named 'mm' got one layer
    name and one grid (a review's: the else weight on the then weight's scales, cosine 0.968 at 8 bits); an unnamed
    Gather table in a body was counted as no one's."""
    model = if_model()
    for attribute in model.graph.node[3].attribute:
        attribute.g.node[0].name = "mm"
    path = save(model, tmp_path / "if.onnx")
    x = np.random.default_rng(1).normal(size=(30, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "q.onnx"
    report = convert(path, str(out), str(tmp_path / "calib.npz"), Options(quiet=True, activations="weight-only")).report
    inside = [layer for layer in report["layers"] if layer["in_body"]]
    assert len(inside) == 2 and len({layer["name"] for layer in inside}) == 2
    for sample in (np.abs(x[:8]), -np.abs(x[:8])):
        fp32, written = run_model(path, {"x": sample})[0], run_model(out, {"x": sample})[0]
        assert cosine(fp32.reshape(1, -1), written.reshape(1, -1)) > 0.999
    # an unnamed embedding table in a body: named by the loader, left float and counted
    path = save(if_model_with_table(50, named=False), tmp_path / "gather.onnx")
    report = convert(path, str(tmp_path / "g.onnx"), str(tmp_path / "calib.npz"), Options(quiet=True)).report
    assert len(report["left_in_float"]) == 2 and all(entry["node"] for entry in report["left_in_float"])
    params = sum(layer["params"] for layer in report["layers"])
    assert report["avg_weight_bits"] == pytest.approx(
        (sum(layer["params"] * layer["bits"] for layer in report["layers"]) + 32 * 300) / (params + 300), abs=1e-4)


def test_a_body_weight_that_is_also_a_graph_output_stays_as_it_is(tmp_path):
    """Quantized, the weight would have come out of the model changed (a review's: by 0.021)."""
    model = if_model()
    shared = numpy_helper.from_array(np.random.default_rng(3).normal(0, 0.4, (6, 6)).astype(np.float32), "shared")
    model.graph.initializer.append(shared)
    model.graph.output.append(helper.make_tensor_value_info("shared", TensorProto.FLOAT, [6, 6]))
    for attribute in model.graph.node[3].attribute:
        del attribute.g.initializer[:]
        attribute.g.node[0].input[1] = "shared"
    path = save(model, tmp_path / "if.onnx")
    x = np.random.default_rng(1).normal(size=(30, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "q.onnx"
    report = convert(path, str(out), str(tmp_path / "calib.npz"), Options(quiet=True)).report
    assert not [layer for layer in report["layers"] if layer["in_body"]]
    assert {entry["node"] for entry in report["left_in_float"]} == {"then_matmul", "else_matmul"}
    params = sum(layer["params"] for layer in report["layers"])
    assert report["avg_weight_bits"] == pytest.approx(  # the weight counts once, at 32 bits
        (sum(layer["params"] * layer["bits"] for layer in report["layers"]) + 32 * 36) / (params + 36), abs=1e-4)
    np.testing.assert_array_equal(run_model(out, {"x": x[:2]}, ["shared"])[0], numpy_helper.to_array(shared))


def test_a_weight_both_branches_read_is_not_called_unrun_when_one_branch_runs(tmp_path):
    model = if_model()
    shared = numpy_helper.from_array(np.random.default_rng(3).normal(0, 0.4, (6, 6)).astype(np.float32), "shared")
    model.graph.initializer.append(shared)
    for attribute in model.graph.node[3].attribute:
        del attribute.g.initializer[:]
        attribute.g.node[0].input[1] = "shared"
    path = save(model, tmp_path / "if.onnx")
    np.savez(tmp_path / "positive.npz", x=np.abs(np.random.default_rng(1).normal(size=(30, 6))).astype(np.float32))
    report = convert(path, str(tmp_path / "q.onnx"), str(tmp_path / "positive.npz"), Options(quiet=True)).report
    (inside,) = [layer for layer in report["layers"] if layer["in_body"]]
    assert inside["in_body"] == "If 'branch'"
    assert not [w for w in report["warnings"] if "no calibration sample takes" in w]

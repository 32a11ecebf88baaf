"""Task outputs of every shape: a score or a tag per token, one value a sample, yes/no decisions, strings, and
inputs with a default. Each case was a crash, a wrong number or a changed signature (a hunting subagent's)."""

import json
import os

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import msq_onnx
from msq_onnx.cli import main
from msq_onnx.pipeline import Options, convert


def _save(tmp_path, nodes, inputs, outputs, inits, name="m.onnx", ir_version=8):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    path = str(tmp_path / name)
    onnx.save(model, path)
    return path


def _weights(rng, *shape, scale=0.5):
    return (rng.normal(size=shape) * scale).astype(np.float32)


def _tagger(tmp_path, tags_output=False):
    """ids, mask [N, T] -> a 3-class score per token [N, T, 3] (or its arg-max, int64 tags [N, T], first) and a
    start score per token [N, T] (a QA head's)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["logits"]),
             helper.make_node("MatMul", ["r", "w3"], ["s3"]),
             helper.make_node("Squeeze", ["s3", "last"], ["start_logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "T", 3]),
               helper.make_tensor_value_info("start_logits", TensorProto.FLOAT, ["N", "T"])]
    if tags_output:
        nodes.append(helper.make_node("ArgMax", ["logits"], ["tags"], axis=-1, keepdims=0))
        outputs.insert(0, helper.make_tensor_value_info("tags", TensorProto.INT64, ["N", "T"]))
    inits = [numpy_helper.from_array(_weights(rng, 50, 16), "table"),
             numpy_helper.from_array(_weights(rng, 16, 32), "w1"), numpy_helper.from_array(_weights(rng, 32, 3), "w2"),
             numpy_helper.from_array(_weights(rng, 32, 1), "w3"), numpy_helper.from_array(np.array([-1]), "last")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "T"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "T"])]
    return _save(tmp_path, nodes, inputs, outputs, inits)


def _token_samples(folder, count, seed):
    """One .npz a text, each of its own length."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    for i in range(count):
        length = int(rng.integers(3, 12))
        np.savez(os.path.join(folder, f"s{i:03d}.npz"), input_ids=rng.integers(0, 50, (1, length)),
                 attention_mask=np.ones((1, length), np.int64))
    return str(folder)


def _run_all(path, folder, output):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    results = []
    for name in sorted(os.listdir(folder)):
        with np.load(os.path.join(folder, name)) as feed:
            results.append(session.run([output], dict(feed))[0])
    return results


def test_a_score_per_token_of_varying_length_converts_and_is_judged_per_position(tmp_path):
    """Texts of different lengths give [1, T, 3] and [1, T] outputs of different widths: the pass's stacking and
    the comparison's kept arrays failed on them with an internal error (np.concatenate)."""
    model = _tagger(tmp_path)
    calib = _token_samples(tmp_path / "calib", 40, 1)
    evaluation = _token_samples(tmp_path / "eval", 30, 2)
    out = str(tmp_path / "q.onnx")
    measured = convert(model, out, calib, Options(quiet=True, eval_path=evaluation, avg_bits=4)).report["evaluation"]
    assert measured["kind"] == "class-scores" and measured["agreement_unit"].startswith("positions")
    fp32, quant = _run_all(model, evaluation, "logits"), _run_all(out, evaluation, "logits")
    same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(fp32, quant))
    positions = sum(a.shape[1] for a in fp32)
    assert measured["agreement"] == pytest.approx(100.0 * same / positions)
    report = convert(model, out, calib, Options(quiet=True, eval_path=evaluation, output="start_logits")).report
    assert report["evaluation"]["task_output"] == "start_logits" and report["evaluation"]["cosine"] > 0.9


def test_integer_tags_per_token_are_judged_position_by_position(tmp_path):
    """int64 tags [N, T] (an arg-max per token) were judged as [N, C] class scores: the arg-max over T of the tag
    ids. Their agreement is now the share of positions whose tag is FP32's."""
    model = _tagger(tmp_path, tags_output=True)
    calib = _token_samples(tmp_path / "calib", 40, 1)
    evaluation = _token_samples(tmp_path / "eval", 30, 2)
    out = str(tmp_path / "q.onnx")
    measured = convert(model, out, calib, Options(quiet=True, eval_path=evaluation, output="tags",
                                                  bits=(2,), avg_bits=2)).report["evaluation"]
    fp32, quant = _run_all(model, evaluation, "tags"), _run_all(out, evaluation, "tags")
    same = sum(int((a == b).sum()) for a, b in zip(fp32, quant))
    assert measured["kind"] == "labels"
    assert measured["agreement"] == pytest.approx(100.0 * same / sum(a.size for a in fp32))


def _regression(tmp_path, offset=50.0, sigmoid=False, name="price"):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y0"])]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["y0"], [name]))
    else:
        nodes.append(helper.make_node("Add", ["y0", "offset"], [name]))
    inits = [numpy_helper.from_array(_weights(rng, 8, 64), "w1"), numpy_helper.from_array(_weights(rng, 64, 1), "w2"),
             numpy_helper.from_array(np.array([offset], np.float32), "offset")]
    return _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                 [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 1])], inits[:2] + ([] if sigmoid else
                                                                                                inits[2:]))


def test_one_value_a_sample_is_judged_by_its_correlation_with_fp32(tmp_path):
    """A sample's own cosine of one value is its sign: a 2-bit regression with a +50 offset reported cosine 1.0000
    and passed --min-cosine 0.999. The cosine of such an output is now taken over the held-out samples, centred
    (their correlation), and so is its SQNR."""
    model = _regression(tmp_path)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(80, 8)).astype(np.float32))
    x = rng.normal(size=(60, 8)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    out = str(tmp_path / "q.onnx")
    options = Options(quiet=True, eval_path=str(tmp_path / "eval.npz"), bits=(2,), avg_bits=2)
    measured = convert(model, out, str(tmp_path / "calib.npz"), options).report["evaluation"]
    fp32 = ort.InferenceSession(model).run(None, {"x": x})[0][:, 0].astype(np.float64)
    quant = np.concatenate([ort.InferenceSession(out).run(None, {"x": x[i:i + 1]})[0][:, 0] for i in range(len(x))])
    assert measured["cosine"] == pytest.approx(np.corrcoef(fp32, quant)[0, 1], abs=1e-5)
    assert measured["cosine"] < 0.999
    assert main([model, out, "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"),
                 "--bits", "2", "--avg-bits", "2", "--min-cosine", "0.999", "--quiet"]) == 3


def test_a_sigmoid_head_takes_0_and_1_labels_and_is_judged_by_its_decisions(tmp_path):
    """One probability a sample is a binary classifier: its 0/1 labels were refused ('label 1 is out of range for
    a model with 1 outputs'); they now give top-1 at the 0.5 threshold."""
    model = _regression(tmp_path, sigmoid=True, name="prob")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    fp32 = ort.InferenceSession(model).run(None, {"x": x})[0][:, 0]
    labels = (fp32 > 0.5).astype(np.int64)
    labels[::7] ^= 1  # FP32 is not perfect on them
    np.savez(tmp_path / "calib.npz", x=x, labels=labels)
    measured = convert(model, str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"),
                       Options(quiet=True)).report["evaluation"]
    held = np.arange(len(x)) % 5 == 4
    assert measured["kind"] == "class-scores" and measured["decision"] == "score > 0.5"
    assert measured["fp32_top1"] == pytest.approx(100.0 * ((fp32[held] > 0.5) == labels[held]).mean())


def test_a_bool_or_string_output_is_never_the_silent_task_output(tmp_path, capsys):
    """A bool decision first made the default task output one the comparison skipped (KeyError); a string label
    chosen with --output failed converting strings to float. The default is now the first float output, a bool
    one is judged as 0/1 labels, and a string one is refused in one line."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Squeeze", ["y", "last"], ["score"]),
             helper.make_node("Greater", ["score", "zero"], ["is_pos"])]
    inits = [numpy_helper.from_array(_weights(rng, 8, 1), "w"), numpy_helper.from_array(np.array([-1]), "last"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    model = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("is_pos", TensorProto.BOOL, ["N"]),
                   helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])], inits)
    np.savez(tmp_path / "x.npz", x=rng.normal(size=(60, 8)).astype(np.float32))
    report = convert(model, str(tmp_path / "q.onnx"), str(tmp_path / "x.npz"), Options(quiet=True)).report
    assert report["evaluation"]["task_output"] == "score"
    report = convert(model, str(tmp_path / "q.onnx"), str(tmp_path / "x.npz"),
                     Options(quiet=True, output="is_pos")).report
    assert report["evaluation"]["kind"] == "labels" and report["evaluation"]["agreement"] >= 90

    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Squeeze", ["y", "last"], ["score"]),
             helper.make_node("Cast", ["score"], ["label"], to=TensorProto.STRING)]
    model = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("label", TensorProto.STRING, ["N"]),
                   helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])], inits[:2], name="s.onnx")
    capsys.readouterr()
    assert main([model, str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "x.npz"), "--output", "label"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'label' holds strings" in err[0] and "score" in err[0]


def test_an_input_with_a_default_initializer_stays_an_input(tmp_path):
    """From IR 4 on, an initializer listed among the inputs is a default the caller may feed instead: the written
    model dropped 'temperature' from its inputs ('Invalid input name'). It is listed again where its tensor is
    written as it was."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["d"]), helper.make_node("Div", ["d", "temperature"], ["logits"])]
    inits = [numpy_helper.from_array(_weights(rng, 16, 32), "w1"), numpy_helper.from_array(_weights(rng, 32, 10), "w2"),
             numpy_helper.from_array(np.array([1.0], np.float32), "temperature")]
    model = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
                                    helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [1])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    x = rng.normal(size=(60, 16)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    out = str(tmp_path / "q.onnx")
    report = convert(model, out, str(tmp_path / "x.npz"), Options(quiet=True)).report
    assert not any("can no longer be fed" in w for w in report["warnings"])
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT warns about any initializer listed as an input
    session = ort.InferenceSession(out, options, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_overridable_initializers()] == ["temperature"]
    plain = session.run(None, {"x": x[:4]})[0]
    halved = session.run(None, {"x": x[:4], "temperature": np.array([2.0], np.float32)})[0]
    np.testing.assert_allclose(halved, plain / 2, rtol=1e-5)


def test_a_weight_with_a_default_initializer_is_said_to_be_no_longer_feedable(tmp_path):
    """A weight listed among the inputs (an export that keeps initializers as inputs) is written quantized, as
    ORT's quantizer does: the report says it can no longer be fed."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["logits"])]
    inits = [numpy_helper.from_array(_weights(rng, 16, 32), "w1"), numpy_helper.from_array(_weights(rng, 32, 10), "w2")]
    model = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
                                    helper.make_tensor_value_info("w1", TensorProto.FLOAT, [16, 32])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    np.savez(tmp_path / "x.npz", x=rng.normal(size=(60, 16)).astype(np.float32))
    report = convert(model, str(tmp_path / "q.onnx"), str(tmp_path / "x.npz"), Options(quiet=True)).report
    assert any("can no longer be fed: w1" in w for w in report["warnings"])


def test_an_export_that_lists_every_initializer_as_an_input_gets_constants(tmp_path):
    """torch's keep_initializers_as_inputs lists every weight, bias and norm as an input, never meant to be fed: they
    stay constants in the written model (listed again, ORT could not fold or fuse them), and nothing is warned."""
    rng = np.random.default_rng(0)
    # a Constant node, as torch exports have (shapes): it joins the initializers at load, listed or not (a review's)
    nodes = [helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([-1, 16]), "shape")),
             helper.make_node("Reshape", ["x", "shape"], ["x2"]),
             helper.make_node("MatMul", ["x2", "w1"], ["a"]), helper.make_node("Add", ["a", "b1"], ["ab"]),
             helper.make_node("Relu", ["ab"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["logits"])]
    inits = [numpy_helper.from_array(_weights(rng, 16, 32), "w1"), numpy_helper.from_array(_weights(rng, 32), "b1"),
             numpy_helper.from_array(_weights(rng, 32, 10), "w2")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])] + [
        helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    model = _save(tmp_path, nodes, inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    np.savez(tmp_path / "x.npz", x=rng.normal(size=(60, 16)).astype(np.float32))
    out = str(tmp_path / "q.onnx")
    report = convert(model, out, str(tmp_path / "x.npz"), Options(quiet=True)).report
    assert [i.name for i in onnx.load(out).graph.input] == ["x"]
    assert not any("can no longer be fed" in w for w in report["warnings"])


def test_a_score_per_token_is_compared_on_real_tokens_only(tmp_path):
    """A [N, T] output (a QA head's start score) in padded batches was compared over its padding too; it now counts
    real tokens only, as [N, T, C] outputs did (its length axis is unnamed by torch's exports: any that is not a
    fixed width other than the mask's)."""
    model = onnx.load(_tagger(tmp_path))
    model.graph.output[1].type.tensor_type.shape.dim[1].dim_param = "Squeezestart_logits_dim_1"  # as torch names it
    onnx.save(model, str(tmp_path / "m.onnx"))
    model = str(tmp_path / "m.onnx")
    calib = _token_samples(tmp_path / "calib", 40, 1)
    evaluation = _token_samples(tmp_path / "eval", 30, 2)
    measured = convert(model, str(tmp_path / "q.onnx"), calib, Options(quiet=True, eval_path=evaluation, batch_size=4,
                                                                        output="start_logits")).report["evaluation"]
    assert measured["positions"] == "real tokens only ('attention_mask' != 0)"
    assert measured["outputs"]["start_logits"].get("real_tokens_only")


def test_a_score_per_token_decides_on_its_real_tokens(tmp_path):
    """A QA head's log-probabilities over a fixed length 8, padded: its kept rows were the masked ones, whose
    zeros beat every real (negative) score, so both models 'picked' a padded position: agreement 100% for 70%
    measured directly (a review's). Each sample's pick is now its arg-max over its real tokens."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(64, 32)).astype(np.float32), "E"),
             numpy_helper.from_array((rng.normal(size=(32, 32)) / 6).astype(np.float32), "W"),
             numpy_helper.from_array((rng.normal(size=(32, 1)) / 6).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array([2], np.int64), "ax2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(-1e4, np.float32), "big")]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"]), helper.make_node("MatMul", ["emb", "W"], ["h"]),
             helper.make_node("Relu", ["h"], ["hr"]), helper.make_node("MatMul", ["hr", "W2"], ["s3"]),
             helper.make_node("Squeeze", ["s3", "ax2"], ["s"]),
             helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one", "mf"], ["inv"]), helper.make_node("Mul", ["inv", "big"], ["bias"]),
             helper.make_node("Add", ["s", "bias"], ["masked"]),
             helper.make_node("LogSoftmax", ["masked"], ["start_log_probs"], axis=1)]
    model = _save(tmp_path, nodes, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", 8]),
                                    helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", 8])],
                  [helper.make_tensor_value_info("start_log_probs", TensorProto.FLOAT, ["N", 8])], inits)
    ids, mask = rng.integers(1, 64, size=(200, 8)), np.zeros((200, 8), np.int64)
    for i, length in enumerate(rng.integers(3, 7, size=200)):
        mask[i, :length] = 1
    ids[mask == 0] = 0
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=mask)
    out = str(tmp_path / "q.onnx")
    measured = convert(model, out, str(tmp_path / "calib.npz"),
                       Options(quiet=True, avg_bits=2, activations="static")).report["evaluation"]
    held = np.arange(200) % 5 == 4
    feed = {"input_ids": ids[held], "attention_mask": mask[held]}
    fp32 = ort.InferenceSession(model).run(None, feed)[0].argmax(1)
    quant = ort.InferenceSession(out).run(None, feed)[0].argmax(1)
    assert measured["agreement_unit"] == "samples (arg-max over real tokens)"
    assert measured["agreement"] == pytest.approx(100.0 * (fp32 == quant).mean()) and measured["agreement"] < 100


def test_a_constant_one_value_output_is_not_called_collapsed(tmp_path):
    """Where FP32's value is the same for every sample, there is no correlation to take: a 1e-4 relative error made
    cosine 0.0 and a 'do not deploy' warning (a review's). The uncentred measures stand for it."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Mul", ["x", "zero"], ["z"]), helper.make_node("Add", ["z", "one"], ["ones"]),
             helper.make_node("MatMul", ["ones", "w"], ["value"])]  # the same value for every sample, off once quantized
    inits = [numpy_helper.from_array(_weights(rng, 8, 1), "w"), numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    model = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["N", 1])], inits)
    np.savez(tmp_path / "x.npz", x=rng.normal(size=(60, 8)).astype(np.float32))
    report = convert(model, str(tmp_path / "q.onnx"), str(tmp_path / "x.npz"),
                     Options(quiet=True, bits=(4,), activations="weight-only")).report
    assert report["evaluation"]["sqnr_db"] is not None  # the 4-bit weight moved the value
    assert report["evaluation"]["cosine"] > 0.99 and not any("collapsed" in w for w in report["warnings"])


@pytest.mark.usefixtures("tied_dense_timings")
def test_a_one_value_output_that_varies_under_a_step_of_its_written_grid_is_warned_with_that_reason(tmp_path):
    """A detector head's objectness on near-identical inputs: FP32 varies by less than one step of the uint8 grid
    the written model puts it on, so its correlation with FP32 falls (0.72 here; bench/architectures.py's multiout at
    8 bits: 0.76) while every value stays within 0.5%. The correlation still judges it (an exemption tried in round
    25 also let a 1000 +- 3 regression that lost its variation pass, a review's), and the warning says why."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y0"]), helper.make_node("Sigmoid", ["y0"], ["objectness"])]
    inits = [numpy_helper.from_array(_weights(rng, 8, 64), "w1"),
             numpy_helper.from_array(_weights(rng, 64, 1, scale=0.05), "w2")]
    model = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("objectness", TensorProto.FLOAT, ["N", 1])], inits)
    x = (1 + 0.01 * rng.normal(size=(100, 8))).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:60])
    np.savez(tmp_path / "eval.npz", x=x[60:])
    out = str(tmp_path / "q.onnx")
    report = convert(model, out, str(tmp_path / "calib.npz"),
                     Options(quiet=True, eval_path=str(tmp_path / "eval.npz"))).report
    fp32 = ort.InferenceSession(model).run(None, {"x": x[60:]})[0][:, 0].astype(np.float64)
    quant = ort.InferenceSession(out).run(None, {"x": x[60:]})[0][:, 0].astype(np.float64)
    measured = report["evaluation"]["outputs"]["objectness"]
    assert measured["cosine"] == pytest.approx(np.corrcoef(fp32, quant)[0, 1], abs=1e-4) and measured["cosine"] < 0.9
    finer = measured["finer_than_its_grid"]
    assert finer["fp32_spread"] == pytest.approx(fp32.std(), rel=1e-3) and finer["fp32_spread"] < finer["step"]
    warning = next(w for w in report["warnings"] if "collapsed" in w)
    assert f"under one {finer['step']:.3g} step" in warning and "raise --avg-bits" not in warning
    assert "--activations dynamic" in warning  # which moves that grid (a review's: cosine 0.725 -> 0.967)


def test_act16_spares_every_layer_a_uint16_tensor_takes_off_its_integer_kernel(tmp_path):
    """--act16 on conv2's input r = Relu(conv1) makes r uint16 for conv2, for conv3 behind a MaxPool of r, and for
    conv1, whose output it is: ORT runs all three as float Conv. Only conv2 was spared the reduce_range cap (a
    review's); now the three are, and only fc (a QGemm) is capped."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), name) for name, a in (
        ("w1", rng.normal(size=(8, 4, 3, 3)) * 0.3), ("b1", np.full(8, -4.0)),
        ("w2", rng.normal(size=(8, 8, 1, 1)) * 0.3), ("b2", np.zeros(8)),
        ("w3", rng.normal(size=(8, 8, 1, 1)) * 0.3), ("b3", np.zeros(8)),
        ("wf", rng.normal(size=(4, 8)) * 0.3), ("bf", np.zeros(4)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Conv", ["p", "w3", "b3"], ["c3"], name="conv3"),
             helper.make_node("GlobalAveragePool", ["c2"], ["g2"], name="gap2"),
             helper.make_node("GlobalAveragePool", ["c3"], ["g3"], name="gap3"),
             helper.make_node("Add", ["g2", "g3"], ["g"], name="add"), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1, name="fc")]
    model = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    np.savez(tmp_path / "x.npz", x=rng.normal(size=(60, 4, 8, 8)).astype(np.float32))
    report = convert(model, str(tmp_path / "q.onnx"), str(tmp_path / "x.npz"),
                     Options(quiet=True, act16=1, activations="static", reduce_range="on")).report
    assert {layer["name"]: layer["activation_bits"] for layer in report["layers"]}["conv2"] == 16
    assert report["reduce_range"]["capped_layers"] == ["fc"]


def test_a_waveform_input_of_varying_length_converts(tmp_path):
    """A float [N, T] input (a waveform) read by no layer directly: its features were its raw rows, of a width
    that varied with T, and stacking them ended in an internal error (a review's). It is pooled over T."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Unsqueeze", ["wave", "one"], ["w3"]),
             helper.make_node("Conv", ["w3", "k", "b"], ["c"], kernel_shape=[5], strides=[2]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"])]
    inits = [numpy_helper.from_array(np.array([1]), "one"), numpy_helper.from_array(_weights(rng, 8, 1, 5), "k"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b"), numpy_helper.from_array(_weights(rng, 8, 3), "wf"),
             numpy_helper.from_array(np.zeros(3, np.float32), "bf")]
    model = _save(tmp_path, nodes, [helper.make_tensor_value_info("wave", TensorProto.FLOAT, ["N", "T"])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    os.makedirs(tmp_path / "calib")
    for i in range(30):
        np.savez(tmp_path / "calib" / f"{i:02d}.npz", wave=rng.normal(size=(1, int(rng.integers(40, 90)))).astype(
            np.float32))
    report = convert(model, str(tmp_path / "q.onnx"), str(tmp_path / "calib"), Options(quiet=True)).report
    assert report["evaluation"]["cosine"] > 0.99


def test_a_decoders_output_is_masked_by_the_decoders_mask(tmp_path):
    """A seq2seq model has an encoder mask [N, s] and a decoder mask [N, t]: its decoder logits [N, t, V] were masked
    by the first mask found, the encoder's, wherever a padded batch's lengths happened to match (a hunting subagent's
    T5: 600 positions counted for 480 real ones). Each output now takes the mask whose axis has its axis's name."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["enc"]),
             helper.make_node("ReduceMean", ["enc"], ["context"], axes=[1], keepdims=1),
             helper.make_node("Gather", ["table", "decoder_input_ids"], ["dec"]),
             helper.make_node("Add", ["dec", "context"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["logits"])]
    inits = [numpy_helper.from_array(_weights(rng, 50, 16), "table"), numpy_helper.from_array(_weights(rng, 16, 5), "w")]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["b", axis]) for name, axis in (
        ("input_ids", "s"), ("attention_mask", "s"), ("decoder_input_ids", "t"), ("decoder_attention_mask", "t"))]
    model = _save(tmp_path, nodes, inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", 5])],
                  inits)
    lengths = []
    for folder, count in (("calib", 30), ("eval", 20)):
        os.makedirs(tmp_path / folder)
        for i in range(count):
            s, t = (12, 3) if i % 2 else (4, 9)
            lengths.append(t)
            np.savez(tmp_path / folder / f"{i:02d}.npz", input_ids=rng.integers(0, 50, (1, s)),
                     attention_mask=np.ones((1, s), np.int64), decoder_input_ids=rng.integers(0, 50, (1, t)),
                     decoder_attention_mask=np.ones((1, t), np.int64))
    measured = convert(model, str(tmp_path / "q.onnx"), str(tmp_path / "calib"),
                       Options(quiet=True, eval_path=str(tmp_path / "eval"), batch_size=2,
                               output_kind="class-scores")).report["evaluation"]
    assert measured["agreement_unit"] == f"positions ({sum(lengths[30:])})"
    assert measured["positions"] == "real tokens only ('decoder_attention_mask' != 0)"


def test_a_detectors_scores_are_judged_beside_its_boxes():
    """Boxes in pixels and scores in [0, 1] in one [N, 4 + classes, anchors] output: its one cosine is the boxes',
    and a YOLOv8 whose scores were gone (1 detection of 89) reported 0.997 with no warning (a hunting subagent's:
    NudeNet's 320n at --avg-bits 3, where channel 21 now measures 0.276 and is warned). Each channel of such a short
    axis is now judged too; a class no sample scores is not."""
    from msq_onnx.fidelity import _OutputSums, collapse_warning

    rng = np.random.default_rng(0)
    fp32 = np.concatenate([rng.uniform(0, 320, (40, 4, 100)), rng.uniform(0, 1, (40, 3, 100)),
                           np.full((40, 1, 100), 1e-7)], axis=1).astype(np.float32)
    quant = fp32.copy()
    quant[:, :4] += rng.normal(0, 1, (40, 4, 100)).astype(np.float32)  # boxes off by a pixel
    quant[:, 5] = rng.uniform(0, 1, (40, 100))  # one class's scores gone
    quant[:, 7] = rng.uniform(0, 1e-6, (40, 100))  # a class never scored: noise at 1e-6
    sums = _OutputSums()
    for part in range(4):
        sums.add(fp32[part * 10:part * 10 + 10], quant[part * 10:part * 10 + 10], True)
    weakest = sums.weakest_channel()
    assert (weakest["axis"], weakest["index"]) == (1, 5) and weakest["cosine"] < 0.9
    whole = sums.cosine_sum / sums.samples
    measured = {"kind": "tensor", "task_output": "output0", "cosine": whole, "samples": 40,
                "outputs": {"output0": {"cosine": whole, "weakest_channel": weakest}}}
    assert whole > 0.9 and "channel 5 of axis 1" in collapse_warning(measured)



def _boxes_and_scores(tmp_path, shape=(8, 10), channel_axis=1):
    """x [N, 16] -> [N, *shape]: four channels (on channel_axis, of 8) in pixels (hundreds) beside four scores
    near 1, as a detector's [N, 4 + classes, anchors] or a segmentation's maps; one output grid for all eight
    (static activations) rounds the scores away."""
    rng = np.random.default_rng(0)
    weight = np.moveaxis(_weights(rng, 16, *shape), channel_axis, 1)
    weight[:, :4] *= 300
    weight = np.moveaxis(weight, 1, channel_axis)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Reshape", ["y", "shape"], ["out"])]
    inits = [numpy_helper.from_array(weight.reshape(16, -1), "w"),
             numpy_helper.from_array(np.array([-1, *shape]), "shape")]
    model = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", *shape])], inits)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(64, 16)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=rng.normal(size=(32, 16)).astype(np.float32))
    return model


@pytest.mark.parametrize("shape, channel_axis", [((8, 10, 10), 1), ((10, 10, 8), 3)])
def test_a_map_that_lost_a_channel_is_warned(tmp_path, shape, channel_axis):
    """Channels were judged on [N, A, B] outputs only: a segmentation-like [N, 8, H, W] map (or its NHWC
    layout) whose four small channels were rounded to nothing measured a whole-output cosine of 0.9999 and
    converted with exit 0 and no word."""
    model = _boxes_and_scores(tmp_path, shape, channel_axis)
    result = convert(model, str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"),
                     Options(quiet=True, eval_path=str(tmp_path / "eval.npz"), activations="static"))
    out = result.report["evaluation"]["outputs"]["out"]
    assert out["cosine"] > 0.99
    assert out["weakest_channel"]["axis"] == channel_axis and out["weakest_channel"]["index"] >= 4
    assert any(f"channel {out['weakest_channel']['index']} of axis {channel_axis}" in warning
               for warning in result.report["warnings"])


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_min_cosine_fails_on_a_collapsed_channel_its_mean_hides(tmp_path, capsys, activations):
    """--min-cosine judged the task output's mean cosine only, and a gate silenced the collapse warning for the
    task output: a detector whose scores were gone under boxes that held (YOLOv8n at 3 bits: 0.997 whole, one
    class at 0.49) passed the gate with exit 0 and no word. The weakest channel is now held to the lower of C and
    the collapse line; where the scores hold (dynamic: no output grid), the same gate passes."""
    import json

    model = _boxes_and_scores(tmp_path)
    report_path = tmp_path / "r.json"
    code = main([model, str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npz"), "--eval",
                 str(tmp_path / "eval.npz"), "--activations", activations, "--min-cosine", "0.95", "--quiet",
                 "--report", str(report_path)])
    gate = json.loads(report_path.read_text())["gate"]
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert gate["cosine"] >= 0.95 and gate["weakest_channel"]["axis"] == 1
    if activations == "static":
        assert gate["weakest_channel"]["index"] >= 4 and gate["weakest_channel"]["likeness"] < 0.9
        assert code == 3 and gate["passed"] is False
        assert len(errors) == 1 and f"channel {gate['weakest_channel']['index']} of axis 1" in errors[0]
    else:
        assert gate["weakest_channel"]["likeness"] >= 0.9
        assert code == 0 and gate["passed"] is True and not errors


def test_what_min_cosine_asks_of_the_weakest_channel():
    """The lower of the gate's C and the collapse line: a lenient gate stays lenient, a strict one does not hold
    every channel to the whole output's C."""
    from msq_onnx.pipeline import gate_passed

    def passed(min_cosine, channel, kind="tensor", max_drop=None):
        measured = {"kind": kind, "task_output": "out", "cosine": 0.99, "drop": 0.0,
                    "outputs": {"out": {"cosine": 0.99, "weakest_channel": {"axis": 1, "index": 2, "cosine": channel,
                                                                            "likeness": channel}}}}
        return gate_passed(measured, Options(min_cosine=min_cosine, max_drop=max_drop))

    assert passed(0.95, 0.92) and not passed(0.95, 0.85)
    assert passed(0.5, 0.6) and not passed(0.5, 0.4)
    assert passed(0.95, 0.1, kind="class-scores")  # judged by its decisions, not by a channel
    assert passed(None, 0.1, max_drop=1.0)  # a top-1 gate asks nothing of channels


@pytest.mark.parametrize("kind", ["zeros", "empty"])
def test_an_output_with_no_channel_to_judge_converts(tmp_path, kind):
    """An [N, A, B] output that is all zeros in FP32 (an additive mask without padding) or empty (a detector that
    found nothing) had no live channel, and the channel check ended the conversion in an internal error (a review's)."""
    rng = np.random.default_rng(0)
    extra = ([helper.make_node("Abs", ["y3"], ["ay"]), helper.make_node("Neg", ["ay"], ["ny"]),
              helper.make_node("Relu", ["ny"], ["extra"])] if kind == "zeros" else
             [helper.make_node("Slice", ["y3", "zero", "zero", "one"], ["extra"])])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Reshape", ["y", "shape"], ["y3"])] + extra
    inits = [numpy_helper.from_array(_weights(rng, 8, 16), "w"), numpy_helper.from_array(np.array([-1, 2, 8]), "shape"),
             numpy_helper.from_array(np.array([0]), "zero"), numpy_helper.from_array(np.array([1]), "one")]
    model = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16]),
                   helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["N", None, 8])], inits)
    np.savez(tmp_path / "x.npz", x=rng.normal(size=(60, 8)).astype(np.float32))
    report = convert(model, str(tmp_path / "q.onnx"), str(tmp_path / "x.npz"), Options(quiet=True)).report
    assert "weakest_channel" not in report["evaluation"]["outputs"].get("extra", {})


def _conv_weight(rng, cin, cout, k=3):
    return (rng.normal(size=(cout, cin, k, k)) * np.sqrt(2 / (cin * k * k))).astype(np.float32)


def _ocr_head(tmp_path, layout):
    """A CRNN-style recognizer: two strided convolutions over a [1, 32, 128] text line, 32 time steps, 37 classes
    (blank first), LogSoftmax, output named 'output' (no hint in the name) in torch's CTC layout [T, N, C]
    (layout 'TNC') or [N, T, C]."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(_conv_weight(rng, 1, 16), "w1"), numpy_helper.from_array(_conv_weight(rng, 16, 32), "w2"),
             numpy_helper.from_array((rng.normal(size=(256, 128)) * np.sqrt(2 / 256)).astype(np.float32), "w3"),
             numpy_helper.from_array((rng.normal(size=(128, 37)) * 3 / np.sqrt(128)).astype(np.float32), "w4"),
             numpy_helper.from_array(np.r_[2.0, np.zeros(36)].astype(np.float32), "b4"),
             numpy_helper.from_array(np.array([0, 256, 32]), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("Reshape", ["r2", "shape"], ["seq"]),
             helper.make_node("Transpose", ["seq"], ["ntc"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["ntc", "w3"], ["m3"]), helper.make_node("Relu", ["m3"], ["r3"]),
             helper.make_node("MatMul", ["r3", "w4"], ["m4"]), helper.make_node("Add", ["m4", "b4"], ["logits"]),
             helper.make_node("LogSoftmax", ["logits"], ["lp"], axis=-1),
             helper.make_node("Transpose", ["lp"], ["output"], perm=[1, 0, 2] if layout == "TNC" else [0, 1, 2])]
    shape = [32, "N", 37] if layout == "TNC" else ["N", 32, 37]
    model = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 32, 128])],
                  [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)], inits)
    lines = rng.uniform(0, 1, (80, 1, 32, 128)).astype(np.float32)
    lines[:, :, :, :8] = 0.0  # a text line's left margin: blank
    np.savez(tmp_path / "calib.npz", x=lines[:40])
    np.savez(tmp_path / "eval.npz", x=lines[40:])
    return model, lines[40:]


@pytest.mark.parametrize("layout", ["TNC", "NTC"])
def test_ctc_log_probabilities_are_judged_position_by_position(tmp_path, layout):
    """Two silent paths of one OCR head at 3 bits (a hunting subagent's): its log-probabilities, named 'output',
    were judged as a tensor, whose cosine their large negative values keep near 1 (0.9987 where 79.8% of the
    positions agreed); and in torch's CTC layout [T, N, C] only the first time step was compared (the batch
    assumed on axis 0). Both are now judged per position, as measured here with onnxruntime."""
    model, lines = _ocr_head(tmp_path, layout)
    result = convert(model, str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"),
                     Options(quiet=True, eval_path=str(tmp_path / "eval.npz"), avg_bits=3.0))
    evaluation = result.report["evaluation"]

    def best(path):
        out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["output"], {"x": lines})[0]
        return (out.transpose(1, 0, 2) if layout == "TNC" else out).argmax(-1)

    measured = 100.0 * (best(model) == best(str(tmp_path / "q.onnx"))).mean()
    assert measured < 90 and evaluation["cosine"] > 0.99  # the construction really loses positions
    assert evaluation["kind"] == "class-scores" and evaluation["agreement_unit"] == "positions (1,280)"
    assert evaluation["agreement"] == pytest.approx(measured)
    assert any("collapsed (top-1 agreement" in warning for warning in result.report["warnings"])


@pytest.mark.parametrize("beside_logits", [False, True])
def test_a_label_map_is_judged_pixel_by_pixel(tmp_path, beside_logits):
    """A segmenter's in-graph ArgMax, int64 [N, H, W]: a cosine of class ids said 0.99 where 67% of the pixels
    agreed (a hunting subagent's, at 2 bits), with no warning; its pixels are now its positions. Beside its
    logits (the task output then), it is judged the same way."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(_conv_weight(rng, 3, 16), "w1"), numpy_helper.from_array(_conv_weight(rng, 16, 32), "w2"),
             numpy_helper.from_array((rng.normal(size=(19, 32, 1, 1)) / np.sqrt(32)).astype(np.float32), "wc"),
             numpy_helper.from_array(np.r_[np.full(9, -1.0), np.full(10, 0.5)].astype(np.float32), "bc")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]), helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("Conv", ["r2", "wc", "bc"], ["scores"]),
             helper.make_node("ArgMax", ["scores"], ["labels"], axis=1, keepdims=0)]
    outputs = [helper.make_tensor_value_info("labels", TensorProto.INT64, ["N", 16, 16])]
    if beside_logits:
        outputs.insert(0, helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 19, 16, 16]))
    model = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                  outputs, inits)
    images = rng.uniform(0, 1, (80, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=images[:40])
    np.savez(tmp_path / "eval.npz", x=images[40:])
    result = convert(model, str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"),
                     Options(quiet=True, eval_path=str(tmp_path / "eval.npz"), avg_bits=2.0))
    labels = [ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["labels"], {"x": images[40:]})[0]
              for path in (model, str(tmp_path / "q.onnx"))]
    measured = 100.0 * (labels[0] == labels[1]).mean()
    evaluation = result.report["evaluation"]
    assert measured < 90
    if beside_logits:
        assert evaluation["task_output"] == "scores"
        assert evaluation["outputs"]["labels"]["agreement"] == pytest.approx(measured)
        assert any("'labels' (top-1 agreement" in warning for warning in result.report["warnings"])
        return
    assert evaluation["kind"] == "labels"
    assert evaluation["agreement"] == pytest.approx(measured) and evaluation["agreement_unit"] == "positions (10,240)"
    assert any("collapsed (top-1 agreement" in warning for warning in result.report["warnings"])


@pytest.mark.parametrize("shape, axis", [((19, 16, 16), 1), ((9, 9, 17), 3), ((84, 200), 1)])
def test_the_weakest_channel_is_found_on_the_axis_that_holds_it(shape, axis):
    """A segmentation's [N, 19, 16, 16] had its columns judged (16 < 19), a pose model's [N, 9, 9, 17] its rows;
    a COCO detector's [N, 4 + 80, anchors] nothing (over 64 channels), and its classes scoring under 1e-3 of the
    boxes' pixels were not judged (a hunting subagent's). One channel of each, scoring at most 0.3 beside
    values in the hundreds, is rounded away here."""
    from msq_onnx.fidelity import _OutputSums

    rng = np.random.default_rng(0)
    fp32 = rng.uniform(0, 0.3, (20, *shape)).astype(np.float32)
    big = [slice(None)] * fp32.ndim
    big[axis] = slice(0, 4)
    fp32[tuple(big)] *= 2000  # 'boxes' in the hundreds, four channels of them
    quant = fp32 + rng.normal(0, 1e-3, fp32.shape).astype(np.float32)
    lost = [slice(None)] * fp32.ndim
    lost[axis] = 6
    quant[tuple(lost)] = rng.uniform(0, 0.3, quant[tuple(lost)].shape)
    sums = _OutputSums()
    sums.add(fp32[:10], quant[:10], False)
    sums.add(fp32[10:], quant[10:], False)
    weakest = sums.weakest_channel()
    assert (weakest["axis"], weakest["index"]) == (axis, 6) and weakest["cosine"] < 0.9


@pytest.mark.parametrize("op, name, judged", [("LogSoftmax", "log_probs", True), ("LogSoftmax", "head", True),
                                              ("Softmax", "probs", True), ("Softmax", "weights", False)])
def test_another_output_of_class_scores_is_judged_by_its_decisions(tmp_path, op, name, judged):
    """An embedding (the task output) and a LogSoftmax classifier on it (a second output): at 4 bits the head's
    cosine held 0.945 while 48% of its decisions agreed with FP32's, and the tool said nothing of it (a hunting
    subagent's). Another output of log-probability rows, or of probability rows named as scores, is judged by its
    decisions too; softmax rows named otherwise (attention or pooling weights, whose near ties flip an arg-max)
    are not."""
    rng = np.random.default_rng(6)
    convs = [_conv_weight(rng, 3, 32), _conv_weight(rng, 32, 64), _conv_weight(rng, 64, 128)]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]), helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["embedding"]), helper.make_node("Gemm", ["embedding", "wf", "bf"], ["lg"]),
             helper.make_node(op, ["lg"], [name], axis=1)]
    images = rng.uniform(0, 1, (90, 3, 32, 32)).astype(np.float32)

    def build(head, bias):
        inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(convs)]
        inits += [numpy_helper.from_array(head.astype(np.float32), "wf"), numpy_helper.from_array(bias.astype(np.float32), "bf")]
        return _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                     [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 128]),
                      helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 10])], inits)

    model = build(rng.normal(size=(128, 10)), np.zeros(10))
    features = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(["embedding"], {"x": images[:40]})[0]
    head = rng.normal(size=(128, 10)) / (features.std(0) + 1e-6)[:, None] / np.sqrt(128) * 2.0  # classes on the spread
    model = build(head, -(features.mean(0) @ head))
    np.savez(tmp_path / "calib.npz", x=images[:40])
    np.savez(tmp_path / "eval.npz", x=images[40:])
    result = convert(model, str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"),
                     Options(quiet=True, eval_path=str(tmp_path / "eval.npz"), avg_bits=4.0))
    decisions = [ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run([name], {"x": images[40:]})[0]
                 .argmax(1) for path in (model, str(tmp_path / "q.onnx"))]
    measured = 100.0 * (decisions[0] == decisions[1]).mean()
    head_output = result.report["evaluation"]["outputs"][name]
    assert measured < 90
    assert "agreement" not in result.report["evaluation"]["outputs"]["embedding"]  # the task's is the evaluation's
    said = any(f"'{name}' (top-1 agreement with FP32" in warning for warning in result.report["warnings"])
    if judged:
        assert head_output["agreement"] == pytest.approx(measured)
        if op == "LogSoftmax":
            assert head_output["cosine"] > 0.9 and said  # its cosine alone would pass it
    else:
        assert "agreement" not in head_output and not said


@pytest.mark.parametrize("shape, axis", [((8, 10), 1), ((90, 10), 2), ((19, 16, 16), 1), ((150, 128, 128), 1),
                                         ((64, 64, 17), 3), ((480, 640, 21), 3), ((1, 32, 32), 1)])
def test_a_maps_channels_are_its_class_axis_not_its_columns(shape, axis):
    """Of a map, the channel axis (NCHW's axis 1; NHWC's last, told by a square before it or by an axis 1 past the
    cap), never a spatial one: judging columns too, a one-channel mask whose empty margin a uint8 output grid
    rounded to 0 was called collapsed at a cosine of 0.9994 (a review's)."""
    from msq_onnx.fidelity import _OutputSums, channel_axis

    assert channel_axis((4, *shape)) == axis
    rng = np.random.default_rng(1)
    mask = rng.uniform(0, 1, (6, 1, 32, 32)).astype(np.float32)
    mask[..., 28:] = 3e-4  # an empty margin
    quant = np.round(mask * 255) / 255  # a uint8 output grid
    sums = _OutputSums()
    sums.add(mask, quant.astype(np.float32), False)
    assert sums.weakest_channel() is None  # one channel: the whole output


def test_an_integer_image_is_judged_by_its_values(tmp_path):
    """A uint8 image output [N, 3, 8, 8] (Sigmoid x 255, Cast): judged as a label map, a grey level's move at
    8 bits counted as a wrong label (61% agreement, 'do not deploy'; a review's). Only an ArgMax's (or TopK's
    indices) make a label map."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(_conv_weight(rng, 3, 3), "w"), numpy_helper.from_array(np.float32(255), "k")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Sigmoid", ["c"], ["s"]),
             helper.make_node("Mul", ["s", "k"], ["m"]), helper.make_node("Cast", ["m"], ["image"], to=TensorProto.UINT8)]
    model = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                  [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 3, 8, 8])], inits)
    images = rng.uniform(0, 1, (60, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=images[:30])
    np.savez(tmp_path / "eval.npz", x=images[30:])
    result = convert(model, str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"),
                     Options(quiet=True, eval_path=str(tmp_path / "eval.npz"), avg_bits=8.0))
    evaluation = result.report["evaluation"]
    assert evaluation["kind"] == "tensor" and evaluation["cosine"] > 0.999 and "agreement" not in evaluation
    assert not any("collapsed" in warning for warning in result.report["warnings"])


def test_auto_modes_keep_a_channel_the_whole_outputs_error_hides(tmp_path, tied_dense_timings):
    """The modes' end-to-end check held the task output's whole relative error only, which a detector's boxes in
    pixels fill: YOLOv8n went all static and one class's detections over 0.25 went from 6 to 2 (warned, at 8
    bits). Each live channel now keeps a cosine of modes.CHANNEL_COSINE with the activations quantized: static,
    the fastest here, rounds the scores away and is left."""
    from msq_onnx import modes

    model = _boxes_and_scores(tmp_path)
    result = convert(model, str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"),
                     Options(quiet=True, eval_path=str(tmp_path / "eval.npz")))
    report = result.report
    log = report["activation_modes"]["end_to_end"]
    # static first (fastest), its whole error within tolerance and a channel far under the line ...
    assert log[0]["modes"]["static"] == 1 and log[0]["end_to_end_error"] <= modes.END_TO_END_TOLERANCE
    assert log[0]["weakest_channel"]["likeness"] < 0.9
    # ... so the layer moved, and the written model keeps every channel
    assert report["modes"].get("static", 0) == 0 and log[-1]["weakest_channel"]["likeness"] >= modes.CHANNEL_LIKENESS
    assert report["evaluation"]["outputs"]["out"]["weakest_channel"]["likeness"] >= 0.9
    assert not [w for w in report["warnings"] if "collapsed" in w]


def test_a_lost_channel_demotes_the_layer_that_loses_channels_first(monkeypatch):
    """Where the whole output holds and a channel of it does not, the layer to move is the one whose own output
    loses a channel (YOLOv8n: an early convolution, 0.002 over its whole output, 0.013 on its worst channel, took
    a class to 0.39 alone), not the lossiest over its whole output."""
    from types import SimpleNamespace

    from msq_onnx import modes
    from msq_onnx.ops import Layer

    layers = [Layer(name, "Conv", f"w{name}", f"x{name}", f"y{name}", (4, 4, 1, 1), 0) for name in ("a", "b")]
    errors = {"a": {modes.STATIC: 5e-3, modes.WEIGHT_ONLY: 0.0}, "b": {modes.STATIC: 1e-4, modes.WEIGHT_ONLY: 0.0}}
    channel_errors = {"a": {modes.STATIC: 5e-3}, "b": {modes.STATIC: 0.5}}
    monkeypatch.setattr(modes, "end_to_end_error", lambda loaded, ranges, chosen, measurement: (
        1e-3, {"index": 3, "cosine": 1.0, "relative_error": 0.0,
               "likeness": 0.5 if chosen["b"] == modes.STATIC else 0.999}))
    costs = {layer.name: {modes.STATIC: 1.0, modes.WEIGHT_ONLY: 6.3, modes.FLOAT: 3.3} for layer in layers}
    choices, log = modes.choose(SimpleNamespace(layers=layers),
                                modes.Measurement(errors, [], [], channel_errors=channel_errors), {}, costs)
    assert {name: c.mode for name, c in choices.items()} == {"a": modes.STATIC, "b": modes.WEIGHT_ONLY}
    assert [entry["weakest_channel"]["likeness"] for entry in log] == [0.5, 0.999]


def test_a_channel_whose_scale_moved_is_judged_by_its_error_not_its_cosine(capsys):
    """A cosine is blind to scale: YOLOv8n under a passing --min-cosine 0.95 at 4.5 bits kept its class channels at
    cosines of 0.908 and more, with their scores at 0.58-0.8x FP32's, and 26 of 29 detections over 0.25 were gone.
    A channel is judged by its likeness now: the lower of its cosine and the cosine noise alone leaves at its
    relative error; the warning and the gate name the error and the scale."""
    from msq_onnx.fidelity import _OutputSums, collapse_warning
    from msq_onnx.pipeline import gate_passed

    rng = np.random.default_rng(0)
    fp32 = np.concatenate([rng.uniform(0, 320, (20, 4, 50)), rng.uniform(0, 1, (20, 3, 50))], axis=1)
    quant = fp32.copy()
    quant[:, 5] *= 0.5  # one class's scores at half their scale: its cosine stays 1.0
    sums = _OutputSums()
    sums.add(fp32.astype(np.float32), quant.astype(np.float32), True)
    weakest = sums.weakest_channel()
    assert weakest["index"] == 5 and weakest["cosine"] > 0.9999 and weakest["scale"] == pytest.approx(0.5)
    assert weakest["relative_error"] == pytest.approx(0.25, rel=1e-4)
    assert weakest["likeness"] == pytest.approx(1 / np.sqrt(1.25), rel=1e-4) and weakest["likeness"] < 0.9
    whole = sums.cosine_sum / sums.samples
    measured = {"kind": "tensor", "task_output": "out", "cosine": whole, "drop": 0.0, "samples": 20,
                "outputs": {"out": {"cosine": whole, "weakest_channel": weakest}}}
    warning = collapse_warning(measured)
    assert whole > 0.999 and "channel 5 of axis 1 is off FP32 by a relative error of 0.250" in warning
    assert "its scale 0.50x" in warning
    assert not gate_passed(measured, Options(min_cosine=0.95))


def _landmarks(tmp_path, template=100.0, shape=(136,)):
    """x [N, 8] -> [N, 136] landmark coordinates: a mean shape of about `template` in the bias, and a small
    variation from the input that a 2-bit weight loses (or, `shape` [1, 8, 17], a depth map with its distance)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y0"]), helper.make_node("Add", ["y0", "mean"], ["y1"]),
             helper.make_node("Reshape", ["y1", "shape"], ["landmarks"])]
    inits = [numpy_helper.from_array(_weights(rng, 8, 64), "w1"), numpy_helper.from_array(_weights(rng, 64, 136), "w2"),
             numpy_helper.from_array((template * (1 + rng.uniform(size=136))).astype(np.float32), "mean"),
             numpy_helper.from_array(np.array([-1, *shape]), "shape")]
    model = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, ["N", *shape])], inits)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(80, 8)).astype(np.float32))
    x = rng.normal(size=(48, 8)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    return model, x


def _centred_correlation(fp32, quant):
    """Each value of a sample centred on its own mean over the samples, both models; one correlation over all."""
    fp32, quant = fp32 - fp32.mean(0), quant - quant.mean(0)
    return float((fp32 * quant).sum() / np.sqrt((fp32 * fp32).sum() * (quant * quant).sum()))


@pytest.mark.parametrize("shape", [(136,), (1, 8, 17)])
def test_an_output_whose_offset_holds_its_cosine_is_judged_by_its_variation_too(tmp_path, capsys, shape):
    """A landmark regressor with its mean shape in the bias, or a depth map with its distance: at 2 bits its cosine
    stayed 0.9999 and no word was said, while the variation that tells one input from another was mostly gone (round
    35's hunt: 0.879, 0.820). The variation's correlation is now measured and judged beside the cosine; --min-cosine
    still judges the cosine alone."""
    model, x = _landmarks(tmp_path, shape=shape)
    out = str(tmp_path / "q.onnx")
    code = main([model, out, "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"),
                 "--bits", "2", "--avg-bits", "2", "--activations", "weight-only", "--min-cosine", "0.99",
                 "--report", str(tmp_path / "r.json"), "--quiet"])
    report = json.load(open(tmp_path / "r.json"))
    measured = report["evaluation"]["outputs"]["landmarks"]
    fp32 = ort.InferenceSession(model).run(None, {"x": x})[0].reshape(len(x), -1).astype(np.float64)
    quant = ort.InferenceSession(out).run(None, {"x": x})[0].reshape(len(x), -1).astype(np.float64)
    assert measured["centred_cosine"] == pytest.approx(_centred_correlation(fp32, quant), abs=1e-5)
    assert measured["cosine"] > 0.999 and measured["centred_cosine"] < 0.9
    assert code == 0 and report["gate"]["passed"]  # the gate judges what it always judged
    warning = next(w for w in report["warnings"] if "collapsed" in w)
    assert "variation over the samples correlates with FP32's at" in warning
    assert "variation over the samples" in capsys.readouterr().err
    jsonschema.validate(report, json.load(open(os.path.join(os.path.dirname(msq_onnx.__file__),
                                                             "report.schema.json"))))


def test_an_output_whose_variation_holds_is_not_called_collapsed(tmp_path):
    """The same regressor at 8 bits keeps its variation: centred_cosine is reported, nothing is said."""
    model, _ = _landmarks(tmp_path)
    report = convert(model, str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"),
                     Options(quiet=True, eval_path=str(tmp_path / "eval.npz"), bits=(8,),
                             activations="weight-only")).report
    assert report["evaluation"]["outputs"]["landmarks"]["centred_cosine"] > 0.99
    assert not any("collapsed" in w for w in report["warnings"])


def test_centred_sums_fall_back_to_coarser_means_when_the_samples_shapes_differ():
    """Tokens [N, T, C] whose count T varies from batch to batch, and comes back: the mean per value of a sample
    cannot be shared, so each feature of the last axis gets one mean over every sample and real token; padding
    counts in nothing."""
    from msq_onnx.fidelity import CentredSums

    rng = np.random.default_rng(0)
    sums, fp32_rows, quant_rows = CentredSums(), [], []
    for length in (5, 7, 5):  # the first shape back: its means stay dropped (a review's: 0.9998 for 0.880)
        fp32 = rng.normal(size=(4, length, 6)) + np.arange(6) * 10
        quant = fp32 + rng.normal(size=fp32.shape) * 0.5
        real = np.ones((4, length, 1), bool)
        real[0, -2:] = False  # the first text of each batch is two tokens shorter: padding
        sums.add(fp32 * real, quant * real, real)
        fp32_rows.append(fp32[real[..., 0]])
        quant_rows.append(quant[real[..., 0]])
    assert sums.correlation() == pytest.approx(_centred_correlation(np.concatenate(fp32_rows),
                                                                    np.concatenate(quant_rows)), abs=1e-9)
    whole = CentredSums()  # and of one shape, each value of a sample its own mean
    fp32 = rng.normal(size=(20, 3, 4)) + rng.normal(size=(3, 4)) * 50
    quant = fp32 + rng.normal(size=fp32.shape)
    for part in range(0, 20, 8):
        whole.add(fp32[part:part + 8], quant[part:part + 8])
    assert whole.correlation() == pytest.approx(_centred_correlation(fp32.reshape(20, -1), quant.reshape(20, -1)))
    constant = CentredSums()
    constant.add(np.ones((8, 5)), np.ones((8, 5)) * 1.001)
    assert constant.correlation() is None  # no variation to correlate: the cosine stands


def test_a_lost_variation_is_warned_and_left_out_of_the_figure_two_allocations_are_compared_by():
    """The collapse warning names a variation lost under a cosine that holds; class scores are left to their
    decisions. A reallocation's comparison does not read it (its probe does not aim at it: round 40's PicoDet)."""
    from msq_onnx.fidelity import collapse_warning, weakest_figure

    measured = {"kind": "tensor", "task_output": "y", "cosine": 0.9999, "samples": 48,
                "outputs": {"y": {"cosine": 0.9999, "centred_cosine": 0.62}}}
    assert "correlates with FP32's at 0.620" in collapse_warning(measured)
    assert "correlates with FP32's" in collapse_warning(measured, frozenset({"cosine"}))  # no gate judges it
    assert weakest_figure(measured) == pytest.approx(0.9999)
    measured["kind"] = "class-scores"  # logits are judged by their decisions, not by their variation
    assert collapse_warning(measured) is None

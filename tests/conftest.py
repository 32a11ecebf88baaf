"""Small models and data built in-process: the tests never need ../shared."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BUNDLED_MODEL = os.path.join(ROOT, "models", "digits_cnn.onnx")
BUNDLED_CALIB = os.path.join(ROOT, "models", "digits_calib.npz")
BUNDLED_EVAL = os.path.join(ROOT, "models", "digits_eval.npz")


def tiny_cnn(opset: int = 17, batch=None, seed: int = 0, gemm_bias_2d: bool = False,
             classes: int = 4, channels: int = 1, size: int = 8) -> onnx.ModelProto:
    """Conv -> Relu -> depthwise Conv -> Clip -> Conv 1x1 -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)

    def init(name, *shape):
        return numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)

    inits = [init("w1", 8, channels, 3, 3), init("b1", 8), init("w2", 8, 1, 3, 3), init("b2", 8),
             init("w3", 16, 8, 1, 1), init("b3", 16), init("wf", classes, 16),
             ] + ([numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(6.0), "hi")]
                  if opset >= 11 else [])
    bias = rng.normal(0, 0.1, (1, classes) if gemm_bias_2d else (classes,)).astype(np.float32)
    inits.append(numpy_helper.from_array(bias, "bf"))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=8, name="dw"),
        (helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="clip2") if opset >= 11 else
         helper.make_node("Clip", ["c2"], ["r2"], min=0.0, max=6.0, name="clip2")),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="pw"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch or "N", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch or "N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_mlp(seed: int = 0, classes: int = 3, features: int = 12) -> onnx.ModelProto:
    """MatMul (constant weight) + Add -> Relu -> MatMul + Add: the transformer-style layer form."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (features, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (16,)).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (16, classes)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.1, (classes,)).astype(np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
             helper.make_node("Add", ["m2", "b2"], ["y"], name="add2")]
    graph = helper.make_graph(nodes, "tiny_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def samples_for(model: onnx.ModelProto, count: int, seed: int = 1, with_labels: bool = True) -> dict:
    """Inputs that spread over the model's classes, labelled by the model itself."""
    import onnxruntime as ort

    spec = model.graph.input[0]
    dims = [d.dim_value for d in spec.type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(seed).normal(0, 1, [count] + dims).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {spec.name: x})[0].argmax(axis=1).astype(np.int64)
    arrays = {spec.name: x}
    if with_labels:
        arrays["labels"] = y
    return arrays


@pytest.fixture
def cnn_files(tmp_path):
    """A tiny CNN on disk with calibration and evaluation .npz files."""
    model = tiny_cnn()
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", **samples_for(model, 64, seed=1))
    np.savez(tmp_path / "eval.npz", **samples_for(model, 48, seed=2))
    return {"model": str(path), "calib": str(tmp_path / "calib.npz"), "eval": str(tmp_path / "eval.npz"),
            "dir": tmp_path}


@pytest.fixture(autouse=True, scope="session")
def _latency_cache(tmp_path_factory):
    """Mode timings cached for this test session only: never the user's cache, one choice per shape."""
    os.environ["MSQ_CACHE"] = str(tmp_path_factory.mktemp("msq-cache"))
    yield


def tie_dense_timings(monkeypatch) -> None:
    """Every dense mode timed alike: a tie, which the registry's order (static first) settles, as it does on this
    machine for the small layers these tests build (their kernels within microseconds of each other). For the tests
    whose premise is such a layer's mode: a loaded machine had timed one dynamic faster beyond the tie, and the test
    failed on a premise it does not test."""
    from msq_onnx import latency

    monkeypatch.setattr(latency, "dense_mode_times",
                        lambda rows, fan_in, fan_out, bias=False: dict.fromkeys(latency.DENSE_MODES, 1e-5))


@pytest.fixture
def tied_dense_timings(monkeypatch):
    tie_dense_timings(monkeypatch)


def bad_data(call, *fragments) -> str:
    """The one-line BadData message `call` raises, holding every fragment."""
    from msq_onnx.errors import BadData

    with pytest.raises(BadData) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    for fragment in fragments:
        assert fragment in message, message
    return message


def tensors_of(model: onnx.ModelProto, names, feed: dict) -> list:
    """The model's inner tensors `names` on `feed`, from a copy with them as outputs (the model is left alone)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(list(names), feed)

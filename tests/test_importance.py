from onnx import TensorProto, helper

from msq_onnx.importance import IMPORTANCE_FLOOR, importance, upstream_layers
from msq_onnx.load import Layer


def test_upstream_follows_branches_through_unweighted_ops():
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="A"),
             helper.make_node("Relu", ["a"], ["ar"], name="r"),
             helper.make_node("Conv", ["ar", "w"], ["b"], name="B"),
             helper.make_node("Conv", ["ar", "w"], ["c"], name="C"),
             helper.make_node("Add", ["b", "c"], ["s"], name="add"),
             helper.make_node("Conv", ["s", "w"], ["d"], name="D")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)],
                              [helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])])
    model = helper.make_model(graph)
    layers = [Layer(n, "Conv", "w", i, i, (1, 1, 1, 1), 0) for n, i in
              (("A", "x"), ("B", "ar"), ("C", "ar"), ("D", "s"))]
    up = upstream_layers(model, layers)
    assert up == {"A": [], "B": ["A"], "C": ["A"], "D": ["B", "C"]}


def test_importance_is_gain_over_best_upstream_with_floor():
    accuracies = {"A": 0.3, "B": 0.5, "C": 0.4, "D": 0.45}
    upstream = {"A": [], "B": ["A"], "C": ["A"], "D": ["B", "C"]}
    gains = importance(accuracies, input_accuracy=0.1, upstream=upstream)
    assert abs(gains["A"] - 0.2) < 1e-12  # over the network input
    assert abs(gains["B"] - 0.2) < 1e-12
    assert abs(gains["C"] - 0.1) < 1e-12
    assert gains["D"] == IMPORTANCE_FLOOR  # lost accuracy vs B: floored, not negative

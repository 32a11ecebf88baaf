"""Stages 2, 7 and 8 on tiny models: the instrumented pass, the written QDQ model, its verification."""

import os
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import samples_for, tiny_cnn, tiny_mlp
from msq_onnx import Options, convert
from msq_onnx.data import Preprocess, open_samples
from msq_onnx.instrument import run_pass
from msq_onnx.load import load_model
from msq_onnx.verify import optimized_op_counts


def _dequantized_weights(path):
    """Weight name -> (integers as [channel, rest], scales) of every DequantizeLinear on an initializer."""
    model = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].dtype == np.int8:
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
            integers = np.moveaxis(inits[node.input[0]], axis, 0)
            found[node.output[0]] = (integers.reshape(len(integers), -1), inits[node.input[1]])
    return found


def _grid_width(rows: np.ndarray) -> int:
    """The narrowest k whose grid holds every row: -2^(k-1)..2^(k-1)-1 or its mirror below 8 bits, +-127 at 8."""
    low, high = rows.min(axis=1), rows.max(axis=1)
    for bits in range(2, 9):
        top = 2 ** (bits - 1) - 1
        if bits == 8:
            fits = (low >= -top) & (high <= top)
        else:
            fits = ((low >= -top - 1) & (high <= top)) | ((low >= -top) & (high <= top + 1))
        if fits.all():
            return bits
    raise AssertionError(f"integers {low.min()}..{high.max()} fit no grid")


def test_pass_collects_ranges_moments_and_features(cnn_files):
    loaded = load_model(cnn_files["model"])
    samples = open_samples(cnn_files["calib"], loaded.inputs, Preprocess())
    stats = run_pass(loaded, samples, (1, 2), max_dim=128, batch_size=5, quiet=True)
    assert stats.samples == 64 and stats.outputs.shape == (64, 4)
    x = np.load(cnn_files["calib"])["x"]
    assert stats.ranges["x"] == (float(x.min()), float(x.max()))
    np.testing.assert_allclose(stats.input_mean["conv1"], [x.mean()], rtol=1e-4)
    np.testing.assert_allclose(stats.input_sq["conv1"], [(x ** 2).mean()], rtol=1e-4)
    assert stats.features.matrix("pw").shape == (64, 16 * 5)  # 16 channels x (1 + 4) bins
    assert stats.features.matrix("fc").shape == (64, 4)


def test_batch_size_does_not_change_statistics(cnn_files):
    loaded = load_model(cnn_files["model"])
    samples = open_samples(cnn_files["calib"], loaded.inputs, Preprocess())
    one = run_pass(loaded, samples, (1, 2, 4), 64, batch_size=1, quiet=True)
    many = run_pass(loaded, samples, (1, 2, 4), 64, batch_size=16, quiet=True)
    assert one.ranges == many.ranges
    for name in one.features.names:
        np.testing.assert_allclose(one.features.matrix(name), many.features.matrix(name), atol=1e-3)


def test_ordered_runs_keep_the_order_and_run_two_at_once():
    import threading
    import time

    from msq_onnx.instrument import ordered_runs

    running, most = [0], [0]
    lock = threading.Lock()

    def run(item):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02 * (item % 3))  # later items can finish first
        with lock:
            running[0] -= 1
        return item * item

    assert list(ordered_runs(run, range(12), workers=2)) == [(i, i * i) for i in range(12)]
    assert most[0] == 2
    assert list(ordered_runs(run, range(5), workers=1)) == [(i, i * i) for i in range(5)]

    def failing(item):
        if item == 3:
            raise ValueError("sample 3")
        return item

    seen = []
    with pytest.raises(ValueError, match="sample 3"):
        for item, _ in ordered_runs(failing, range(10), workers=2):
            seen.append(item)
    assert seen == [0, 1, 2]


def test_ordered_runs_go_on_while_the_caller_holds_a_result():
    """The caller absorbs each result between its waits: runs beyond the two running are already submitted, so
    the workers do not wait for it."""
    import time

    from msq_onnx.instrument import QUEUED_AHEAD, ordered_runs

    started = []

    def run(item):
        started.append(item)
        return item

    results = ordered_runs(run, range(20), workers=2)
    assert next(results) == (0, 0)
    time.sleep(0.2)  # the caller busy with result 0
    assert QUEUED_AHEAD >= 1 and sorted(started) == list(range(2 + QUEUED_AHEAD + 1))
    assert [item for item, _ in results] == list(range(1, 20))


def test_batch_stream_reads_in_parts_without_losing_a_batch():
    from msq_onnx.instrument import BatchStream

    stream = BatchStream(iter([("a", 2), ("b", 2), ("c", 3), ("d", 1)]))
    assert list(stream.until(5)) == [("a", 2), ("b", 2)]  # c would pass 5 and is kept
    assert stream.more()
    assert list(stream.until(float("inf"))) == [("c", 3), ("d", 1)]
    assert not stream.more() and list(stream.until(10)) == []


def test_statistics_are_taken_where_their_tensor_is_made(cnn_files):
    """Appended at the end, every reduction kept its tensor alive for the whole run (ORT's peak memory)."""
    from msq_onnx.instrument import build_instrumented

    loaded = load_model(cnn_files["model"])
    instrumented, _ = build_instrumented(loaded, levels=(1, 2))
    original = {node.name for node in loaded.model.graph.node}
    nodes = list(instrumented.graph.node)
    made_at = {name: i for i, node in enumerate(nodes) for name in node.output}
    for i, node in enumerate(nodes):
        assert all(made_at.get(name, -1) < i for name in node.input)  # still in topological order
        if node.name in original:
            continue
        last_input = max((made_at.get(name, -1) for name in node.input), default=-1)
        assert all(nodes[j].name not in original for j in range(last_input + 1, i)), node.name


def test_added_nodes_reading_inputs_or_each_other_keep_a_valid_order():
    from msq_onnx.instrument import _place_after_producers

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"], name="a"), helper.make_node("Neg", ["a"], ["b"], name="b"),
         helper.make_node("ReduceMax", ["x"], ["x_max"], name="on_input"),  # added: reads the graph input
         helper.make_node("Mul", ["b", "b"], ["sq"], name="sq"),  # added: reads the last original node
         helper.make_node("ReduceMean", ["sq"], ["sq_mean"], name="sq_mean"),  # added: reads an added node
         helper.make_node("Add", ["a", "w"], ["aw"], name="aw")],  # added: an original tensor and an initializer
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "w")])
    _place_after_producers(graph, 2)
    assert [n.name for n in graph.node] == ["on_input", "a", "aw", "b", "sq", "sq_mean"]


def test_two_runs_at_once_give_the_statistics_of_one(cnn_files, monkeypatch):
    from msq_onnx import instrument

    monkeypatch.setattr(instrument, "MIN_ROWS_PER_INPUT", 0)
    monkeypatch.setattr(instrument, "HESSIAN_SAMPLES", 16)  # the pass switches sessions at sample 48 of 64
    loaded = load_model(cnn_files["model"])

    def pass_with(workers):
        monkeypatch.setattr(instrument, "RUN_WORKERS", workers)
        samples = open_samples(cnn_files["calib"], loaded.inputs, Preprocess())
        return run_pass(loaded, samples, (1, 2), 64, batch_size=3, quiet=True, hessians=True)

    one, two = pass_with(1), pass_with(2)
    assert one.ranges == two.ranges and one.samples == two.samples == 64 and one.rows == two.rows
    for name in one.input_mean:
        np.testing.assert_array_equal(one.input_mean[name], two.input_mean[name])
        np.testing.assert_array_equal(one.input_sq[name], two.input_sq[name])
    for name in one.features.names:
        np.testing.assert_array_equal(one.features.matrix(name), two.features.matrix(name))
    np.testing.assert_array_equal(one.outputs, two.outputs)
    assert one.hessians and one.hessians.keys() == two.hessians.keys()
    for name in one.hessians:
        np.testing.assert_array_equal(one.hessians[name].fit, two.hessians[name].fit)
        np.testing.assert_array_equal(one.hessians[name].check, two.hessians[name].check)


def test_large_runs_go_one_at_a_time(cnn_files, monkeypatch):
    """Two runs at once hold two sets of tensors: past PAIRED_RUN_LIMIT (estimated from the shapes, or from
    the input's size where they are symbolic) the runs go one at a time, every later stage too."""
    from msq_onnx import instrument

    monkeypatch.setattr(instrument, "RUN_WORKERS", 2)
    loaded = load_model(cnn_files["model"])
    feed = {"x": np.zeros((1, 1, 8, 8), np.float32)}
    assert instrument.run_workers(loaded, feed) == 2
    monkeypatch.setattr(instrument, "PAIRED_RUN_LIMIT", 256 * 100 - 1)  # the input's 256 bytes x 100
    assert instrument.run_workers(loaded, feed) == 1
    samples = open_samples(cnn_files["calib"], loaded.inputs, Preprocess())
    assert run_pass(loaded, samples, (1, 2), 64, quiet=True).workers == 1
    monkeypatch.setattr(instrument, "PAIRED_RUN_LIMIT", 10**9)
    assert run_pass(loaded, samples, (1, 2), 64, quiet=True).workers == 2


def test_hessian_batches_run_in_the_pass_session_two_at_once(cnn_files, monkeypatch):
    """The Hessians' rows are fetched from the pass's one session (no second session for the last samples),
    two runs at once like the others, and their products are exactly the rows' (taken in numpy)."""
    from msq_onnx import instrument

    loaded = load_model(cnn_files["model"])
    monkeypatch.setattr(instrument, "MIN_ROWS_PER_INPUT", 0)
    monkeypatch.setattr(instrument, "HESSIAN_SAMPLES", 16)
    monkeypatch.setattr(instrument, "RUN_WORKERS", 2)
    built, real = [], instrument._pass_session
    monkeypatch.setattr(instrument, "_pass_session", lambda *a: built.append(a[1]) or real(*a))
    samples = open_samples(cnn_files["calib"], loaded.inputs, Preprocess())
    stats = run_pass(loaded, samples, (1, 2), 64, quiet=True, hessians=True)
    assert built == [2] and stats.workers == 2 and stats.hessians
    for hessians in stats.hessians.values():
        assert hessians.fit_rows == hessians.check_rows == 8  # one row a sample: the head's input
        np.testing.assert_allclose(hessians.fit, hessians.fit.T)


def test_a_symbolic_sequence_is_sized_from_the_feed(tmp_path, monkeypatch):
    """Token ids are a few bytes a position, a transformer's tensors thousands: the run's size comes from the
    shapes shape inference gave in the input's named axes, read from the feed ([N, T, T] scores here)."""
    from msq_onnx import instrument

    monkeypatch.setattr(instrument, "RUN_WORKERS", 2)
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
             helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1], name="t"),
             helper.make_node("MatMul", ["h", "ht"], ["scores"], name="scores"),
             helper.make_node("MatMul", ["scores", "h"], ["mixed"], name="mix"),
             helper.make_node("MatMul", ["mixed", "w"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "tokens", [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", "T"])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", "T", 2])],
        [numpy_helper.from_array(rng.normal(size=(50, 16)).astype(np.float32), "table"),
         numpy_helper.from_array(rng.normal(size=(16, 2)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "t.onnx")
    loaded = load_model(str(tmp_path / "t.onnx"))
    feed = {"ids": np.zeros((4, 256), np.int64)}
    scores = 4 * 256 * 256 * 4  # the [N, T, T] tensor alone: 1 MB, where the input is 8 KB
    assert instrument._run_bytes(loaded.model, feed) >= scores
    monkeypatch.setattr(instrument, "PAIRED_RUN_LIMIT", scores)  # over the input's 8 KB x 100, under the run
    assert instrument.run_workers(loaded, feed) == 1
    assert instrument.run_workers(loaded, {"ids": np.zeros((4, 16), np.int64)}) == 2


def test_compared_runs_stay_two_when_the_reference_is_recomputed(cnn_files, tmp_path, monkeypatch):
    """Without a cache the FP32 runs repeat beside the compared ones: one of each at a time, not two of each."""
    import threading

    from msq_onnx import fidelity

    loaded = load_model(cnn_files["model"])
    samples = open_samples(cnn_files["calib"], loaded.inputs, Preprocess())
    monkeypatch.setattr(fidelity, "CACHE_LIMIT", 0)
    reference = fidelity.Reference(cnn_files["model"], loaded, samples, 1, True, workers=2)
    assert reference.cache is None and reference.workers == 1
    running, most, lock = [0], [0], threading.Lock()
    real_run = ort.InferenceSession.run

    def counted(self, *args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return real_run(self, *args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(ort.InferenceSession, "run", counted)
    measured = fidelity.compare(reference, cnn_files["model"], loaded.output_name, None, quiet=True)
    assert measured and most[0] <= 2


def test_written_weights_sit_on_their_k_bit_grids(cnn_files, tmp_path):
    out = tmp_path / "q.onnx"
    result = convert(cnn_files["model"], str(out), cnn_files["calib"],
                     Options(avg_bits=3.0, bits=(2, 3, 4, 8), quiet=True, activations="static", level_sets=False))
    assert not any(layer["level_set"] for layer in result.report["layers"])
    layers = {layer["name"]: layer["bits"] for layer in result.report["layers"]}
    assert abs(result.report["avg_weight_bits"] - 3.0) < 1.0 and result.report["avg_weight_bits"] <= 3.0
    weights = _dequantized_weights(str(out))
    assert len(weights) == len(layers)
    for _, scales in weights.values():
        assert scales.ndim == 1 and len(scales) > 1  # per-channel
    # every output channel of a weight sits on the grid of the width allocated to its layer, and uses it: the
    # narrowest grid holding each weight is that width
    assert sorted(_grid_width(integers) for integers, _ in weights.values()) == sorted(layers.values())
    # both orientations reach the file through ORT's quantizer: rows at -2^(k-1) and mirrored rows at +2^(k-1)
    ends = [(rows.min(axis=1), rows.max(axis=1), 2 ** (_grid_width(rows) - 1)) for rows, _ in weights.values()
            if _grid_width(rows) < 8]
    assert any((low == -top).any() for low, _, top in ends) and any((high == top).any() for _, high, top in ends)


def test_fitted_level_sets_are_what_the_file_holds_and_keep_each_width(cnn_files, tmp_path):
    """By default a 2-4-bit int8-container layer may take levels fitted to its weights: each row of the written
    weight then holds at most 2^k integers, all from the layer's reported set (or its negation) within +-63;
    the other layers sit on their uniform grids. The file runs and stays faithful."""
    out = tmp_path / "q.onnx"
    result = convert(cnn_files["model"], str(out), cnn_files["calib"],
                     Options(avg_bits=3.0, bits=(2, 3, 4, 8), quiet=True, activations="static"))
    assert result.report["options"]["level_sets"] is True
    written = _dequantized_weights(str(out))
    readers = {name: node.name for node in onnx.load(str(out)).graph.node for name in node.input}
    fitted = 0
    for layer in result.report["layers"]:
        integers, _ = next(rows for output, rows in written.items() if readers[output] in layer["nodes"])
        if layer["level_set"] is None:
            assert _grid_width(integers) == layer["bits"]
            continue
        fitted += 1
        allowed = set(layer["level_set"])
        assert len(allowed) <= 2 ** layer["bits"] and max(map(abs, allowed)) <= 63
        for row in integers:
            assert set(row.tolist()) <= allowed or set((-row).tolist()) <= allowed
        assert _grid_width(integers) > layer["bits"]  # not a uniform grid in disguise
    assert fitted >= 1
    assert min(out["cosine"] for out in result.report["evaluation"]["outputs"].values()) > 0.9
    # int4 containers hold the levels themselves: --prefer size keeps every grid uniform
    sized = convert(cnn_files["model"], str(tmp_path / "s.onnx"), cnn_files["calib"],
                    Options(avg_bits=3.0, bits=(2, 3, 4, 8), quiet=True, activations="static", prefer="size"))
    assert not any(layer["level_set"] for layer in sized.report["layers"])
    assert any(layer["container"] == "int4" for layer in sized.report["layers"])


def test_static_weights_reach_ort_already_quantized_and_a_dead_channels_bias_keeps_int32_room(tmp_path, monkeypatch):
    """The static layers' weights go to ORT's quantizer as int8 -> DequantizeLinear, which it leaves as they are
    (no second rounding, channel by channel). A channel whose weights are ~1e-9 (a weight step of ~1e-11)
    has a bias step of input step x weight step far below what its bias needs in int32: its weight step is
    widened, as ORT's own quantizer does, so the bias is written, not saturated."""
    import onnxruntime.quantization.quant_utils as quant_utils

    import msq_onnx.pipeline as pipeline

    model = tiny_cnn()
    inits = {t.name: t for t in model.graph.initializer}
    w1, b1 = numpy_helper.to_array(inits["w1"]).copy(), numpy_helper.to_array(inits["b1"]).copy()
    w1[0] *= 1e-9
    b1[0] = 5.0
    inits["w1"].CopyFrom(numpy_helper.from_array(w1, "w1"))
    inits["b1"].CopyFrom(numpy_helper.from_array(b1, "b1"))
    onnx.save(model, tmp_path / "dead.onnx")
    np.savez(tmp_path / "calib.npz", **samples_for(model, 64, seed=1))
    rounded, writing = [], []
    original, write = quant_utils.quantize_onnx_initializer, pipeline.quantize_to_qdq
    monkeypatch.setattr("onnxruntime.quantization.qdq_quantizer.quantize_onnx_initializer", lambda weight, *args, **kw:
                        (writing and rounded.append(weight.name)) or original(weight, *args, **kw))
    monkeypatch.setattr(pipeline, "quantize_to_qdq", lambda *args, **kw: writing.append(1) or write(*args, **kw))
    out = tmp_path / "dead.q.onnx"
    convert(str(tmp_path / "dead.onnx"), str(out), str(tmp_path / "calib.npz"),
            Options(quiet=True, activations="static"))
    assert writing and rounded == []  # ORT's quantizer rounded no weight of ours again (its yardstick does)
    written = onnx.load(str(out))
    values = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    conv1 = next(n for n in written.graph.node if n.name == "conv1")
    bias_dq = next(n for n in written.graph.node if n.output[0] == conv1.input[2])
    assert values[bias_dq.input[0]].dtype == np.int32
    bias = values[bias_dq.input[0]].astype(np.float64) * values[bias_dq.input[1]]
    assert abs(bias[0] - 5.0) < 1e-4  # the dead channel's output is its bias (the others are bias-corrected)
    assert np.abs(values[bias_dq.input[0]]).max() < np.iinfo(np.int32).max  # not saturated
    x = np.load(tmp_path / "calib.npz")["x"]
    fp32 = ort.InferenceSession(str(tmp_path / "dead.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    quant = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert (fp32.argmax(1) == quant.argmax(1)).mean() >= 0.9


def _graph_model(nodes, inits, inputs, classes=4):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT,
                                                                                  ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _static_corner_case(kind: str):
    """Models whose static layers ORT's quantizer writes from our integers, each with a trap: (model, options)."""
    rng = np.random.default_rng(0)
    if kind in ("shared weight, inputs 1000x apart", "weight also a graph output", "name taken"):
        w = rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32)
        b = rng.normal(0, 0.1, 8).astype(np.float32)
        w[0] *= 1e-9
        b[0] = 5.0  # a near-dead channel whose output is its bias
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
                 numpy_helper.from_array(np.float32(0.001), "small"),
                 numpy_helper.from_array(rng.normal(0, 0.5, (4, 16)).astype(np.float32), "wf"),
                 numpy_helper.from_array(np.zeros(4, np.float32), "bf")]
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["ya"], pads=[1, 1, 1, 1], name="conv_a"),
                 helper.make_node("Mul", ["x", "small"], ["xs"], name="shrink"),
                 helper.make_node("Conv", ["xs", "w", "b"], ["yb"], pads=[1, 1, 1, 1], name="conv_b"),
                 helper.make_node("Concat", ["ya", "yb"], ["y"], axis=1, name="cat"),
                 helper.make_node("GlobalAveragePool", ["y"], ["g"], name="gap"),
                 helper.make_node("Flatten", ["g"], ["f"], name="flat"),
                 helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1, name="fc")]
        if kind == "name taken":  # a tensor already named as ORT names the quantized weight and its scale
            nodes[-1].output[0] = "pre"
            inits.append(numpy_helper.from_array(np.float32(2.0), "wf_scale"))
            nodes += [helper.make_node("Mul", ["pre", "wf_scale"], ["wf_quantized"], name="double"),
                      helper.make_node("Identity", ["wf_quantized"], ["logits"], name="out")]
        model = _graph_model(nodes, inits, [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                          ["N", 1, 8, 8])])
        if kind == "weight also a graph output":
            model.graph.output.append(helper.make_tensor_value_info("wf", onnx.TensorProto.FLOAT, [4, 16]))
        return model, {}
    w1, w2 = rng.normal(0, 0.5, (2, 4, 16)).astype(np.float32)
    b1 = rng.normal(0, 0.5, 4).astype(np.float32)
    b2 = b1.copy()
    if kind == "one input, one of its readers wide":  # --act16 makes the tensor uint16 for both readers
        w2[0] *= 1e-9
        b2[0] = 5.0
        attrs = {}
    else:  # Gemm with beta 0.5 (one bias read by both): ORT sets beta to 1 and keeps the bias as it is
        attrs = {"beta": 0.5}
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["y1"], transB=1, name="g1", **attrs),
             helper.make_node("Gemm", ["x", "w2", "b1" if attrs else "b2"], ["y2"], transB=1, name="g2", **attrs),
             helper.make_node("Add", ["y1", "y2"], ["logits"], name="add")]
    model = _graph_model(nodes, inits, [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])])
    return model, {"act16": 1} if kind == "one input, one of its readers wide" else {}


@pytest.mark.parametrize("kind", ["shared weight, inputs 1000x apart", "weight also a graph output", "name taken",
                                  "one input, one of its readers wide", "gemm beta 0.5"])
def test_static_layers_written_from_our_integers_stay_faithful_in_corner_cases(kind, tmp_path):
    """Each trap broke the written model: an int32 bias saturated (a bias step from another node's input, or
    from a uint8 step where ORT writes uint16), an invalid graph (a renamed weight that was a graph output, a
    name taken twice), or ORT's Gemm writing the bias without its beta."""
    model, extra = _static_corner_case(kind)
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **samples_for(model, 64, seed=1, with_labels=False))
    out = tmp_path / "m.q.onnx"
    result = convert(str(tmp_path / "m.onnx"), str(out), str(tmp_path / "calib.npz"),
                     Options(quiet=True, activations="static", **extra))
    if extra.get("act16"):  # the report says what was written: both readers of the uint16 tensor at 16 bits
        assert {layer["name"]: layer["activation_bits"] for layer in result.report["layers"]} == {"g1": 16, "g2": 16}
    x = np.load(tmp_path / "calib.npz")["x"]
    fp32 = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(["logits"],
                                                                                                {"x": x})[0]
    quant = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["logits"], {"x": x})[0]
    assert np.abs(quant - fp32).max() <= 0.05 * np.abs(fp32).max(), np.abs(quant - fp32).max()


def test_act16_widens_the_input_of_every_node_of_a_layer_and_the_report_says_what_was_written(tmp_path):
    """A weight two Conv nodes share is one layer with two inputs: --act16 writes both as uint16."""
    model, _ = _static_corner_case("shared weight, inputs 1000x apart")
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **samples_for(model, 64, seed=1, with_labels=False))
    out = tmp_path / "m.q.onnx"
    result = convert(str(tmp_path / "m.onnx"), str(out), str(tmp_path / "calib.npz"),
                     Options(quiet=True, activations="static", act16=2))
    written = onnx.load(str(out))
    zero_types = {t.name: t.data_type for t in written.graph.initializer}
    quantized = {node.input[0]: zero_types[node.input[2]] for node in written.graph.node
                 if node.op_type == "QuantizeLinear" and len(node.input) > 2}
    assert quantized["x"] == quantized["xs"] == onnx.TensorProto.UINT16
    # fc's input comes through a Flatten, which ORT writes in its source's uint8 whatever was asked: the report said
    # 16 for it, and now says what the file holds
    assert {layer["name"]: layer["activation_bits"] for layer in result.report["layers"]} == \
        {"conv_a": 16, "fc": 8}


@pytest.mark.usefixtures("tied_dense_timings")
def test_act16_widens_layers_whose_inputs_ort_writes_as_uint16_and_caps_the_others(tmp_path):
    """The digits CNN's fc1 has the largest uint8 activation error, but its input comes through a MaxPool and a
    Flatten, which ORT's quantizer writes with their source's uint8 whatever --act16 asks. --act16 1 took fc1,
    widened nothing, and spared it the reduce_range cap as if it ran a float kernel: it kept 8-bit weights on a
    saturating u8s8 kernel. Now the layer widened is the next one ORT can give a uint16 input, and fc1 is capped."""
    import os

    models = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
    report = convert(os.path.join(models, "digits_cnn.onnx"), str(tmp_path / "d.onnx"),
                     os.path.join(models, "digits_calib.npz"), Options(quiet=True, act16=1, reduce_range="on")).report
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert max(layers, key=lambda name: layers[name]["activation_error"]) == "fc1"
    wide = [name for name, layer in layers.items() if layer["activation_bits"] == 16]  # read from the written file
    assert len(wide) == 1 and wide[0] != "fc1"
    assert "fc1" in report["reduce_range"]["capped_layers"] and layers["fc1"]["bits"] <= 7
    assert wide[0] not in report["reduce_range"]["capped_layers"] and layers[wide[0]]["bits"] == 8


def test_the_reported_activation_bits_are_those_of_the_written_file(tmp_path):
    """--act16 asks ORT for uint16 inputs, but a tensor that comes through a Flatten or a MaxPool keeps its source's
    uint8: the bundled digits CNN's fc1 was reported at 16 bits and written at 8 (a hunting subagent's). The report
    now reads each layer's input width from the written file."""
    import os

    models = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
    out = tmp_path / "d.onnx"
    # static forced: a layer the timings make dynamic is rewritten under another node name (a loaded machine's)
    report = convert(os.path.join(models, "digits_cnn.onnx"), str(out), os.path.join(models, "digits_calib.npz"),
                     Options(quiet=True, act16=100, activations="static")).report
    written = onnx.load(str(out))
    producers = {o: n for n in written.graph.node for o in n.output}
    zero_types = {t.name: t.data_type for t in written.graph.initializer}
    nodes = {n.name: n for n in written.graph.node}
    for layer in report["layers"]:
        sources = [producers.get(name) for name in nodes[layer["nodes"][0]].input]
        wide = any(s is not None and s.op_type == "DequantizeLinear" and len(s.input) > 2
                   and zero_types.get(s.input[2]) == onnx.TensorProto.UINT16 for s in sources)
        assert layer["activation_bits"] == (16 if wide else 8), layer["name"]
    assert {layer["activation_bits"] for layer in report["layers"]} == {8, 16}  # both kinds are checked


@pytest.mark.parametrize("reader", ["Identity", "graph output"])
def test_a_bias_something_else_also_reads_keeps_its_value_for_it(reader, tmp_path):
    """A layer's bias another node or the graph's outputs also read: the bias correction (large here: the inputs'
    mean is 3) and ORT's int32 rounding of it would move their values too; the layer gets a copy of its own."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(0, 0.5, (4, 16)).astype(np.float32), rng.normal(0, 0.5, 4).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["logits"], transB=1, name="fc")]
    outputs = [helper.make_tensor_value_info("bias_out" if reader == "Identity" else "b", onnx.TensorProto.FLOAT, [4])]
    if reader == "Identity":
        nodes.append(helper.make_node("Identity", ["b"], ["bias_out"], name="copy"))
    model = _graph_model(nodes, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
                         [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])])
    model.graph.output.extend(outputs)
    onnx.save(model, tmp_path / "m.onnx")
    x = (rng.normal(0, 1, (64, 16)) + 3).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "m.q.onnx"
    convert(str(tmp_path / "m.onnx"), str(out), str(tmp_path / "calib.npz"),
            Options(quiet=True, activations="static", bits=(2, 3), avg_bits=2.0, output="logits"))
    written = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run([outputs[0].name], {"x": x})[0]
    np.testing.assert_array_equal(written, b)


@pytest.mark.usefixtures("tied_dense_timings")
def test_output_runs_fused_and_matches_fp32_closely_at_8_bits(cnn_files, tmp_path):
    out = tmp_path / "q8.onnx"
    result = convert(cnn_files["model"], str(out), cnn_files["calib"], Options(quiet=True))
    assert result.report["fused_integer_kernels"] == result.report["quantized_layers"] == 4
    counts = optimized_op_counts(str(out))
    assert counts["QLinearConv"] == 3 and counts["QGemm"] == 1
    model = onnx.load(str(out))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {21}
    x = np.load(cnn_files["calib"])["x"]  # inside the calibrated ranges: only rounding error remains
    fp32 = ort.InferenceSession(cnn_files["model"], providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    quant = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert (fp32.argmax(1) == quant.argmax(1)).mean() >= 0.9
    assert np.sqrt(((fp32 - quant) ** 2).mean() / (fp32 ** 2).mean()) < 0.03


@pytest.mark.usefixtures("tied_dense_timings")
def test_matmul_layers_and_old_opset_with_2d_gemm_bias(tmp_path):
    mlp = tiny_mlp()
    onnx.save(mlp, tmp_path / "mlp.onnx")
    np.savez(tmp_path / "mlp.npz", **samples_for(mlp, 40))
    result = convert(str(tmp_path / "mlp.onnx"), str(tmp_path / "mlp.q.onnx"), str(tmp_path / "mlp.npz"),
                     Options(avg_bits=4, quiet=True))
    assert [layer["op_type"] for layer in result.report["layers"]] == ["MatMul", "MatMul"]
    assert result.report["fused_integer_kernels"] == 2

    old = tiny_cnn(opset=9, gemm_bias_2d=True, batch=1)  # opset 9, fixed batch 1, [1, N] Gemm bias
    onnx.save(old, tmp_path / "old.onnx")
    np.savez(tmp_path / "old.npz", **samples_for(tiny_cnn(opset=17), 12))
    result = convert(str(tmp_path / "old.onnx"), str(tmp_path / "old.q.onnx"), str(tmp_path / "old.npz"),
                     Options(avg_bits=5, quiet=True, eval_path=str(tmp_path / "old.npz")))
    assert result.report["opset"] == {"input": 9, "output": 21, "raised_for_int2": False}
    assert result.report["fused_integer_kernels"] == 4
    assert result.report["evaluation"]["samples"] == 12


def test_imprinting_keeps_a_spread_subset_when_the_set_is_larger_than_its_cap(tmp_path):
    from msq_onnx.instrument import imprint_selection

    model = tiny_cnn()
    onnx.save(model, tmp_path / "m.onnx")
    arrays = samples_for(model, 330)
    order = np.argsort(arrays["labels"], kind="stable")  # class by class, as an ImageFolder lists them
    np.savez(tmp_path / "c.npz", x=arrays["x"][order], labels=arrays["labels"][order])
    loaded = load_model(str(tmp_path / "m.onnx"))
    samples = open_samples(str(tmp_path / "c.npz"), loaded.inputs, Preprocess())
    stats = run_pass(loaded, samples, (1, 2), 64, batch_size=16, quiet=True)  # batches straddle the cap
    assert len(stats.imprinted) == len(stats.outputs) == stats.features.matrix("fc").shape[0] == 300
    assert stats.imprinted.max() > 300  # not just the first 300: the last class is represented
    keep = imprint_selection(1000, 300, seed=0)
    assert keep.sum() == 300 and keep[:500].sum() < 200 and np.array_equal(keep, imprint_selection(1000, 300, 0))


def test_a_written_model_slower_than_fp32_is_said_out_loud():
    """Measured latency over 1.1x FP32's, with no --max-latency asked: one warning naming the ratio, ORT's own int8
    time, the modes and the cause that fits (a MobileNetV3-style classifier whose depthwise layers went weight-only
    ran 2.3x slower than FP32; PP-OCR's classifier, all static, 1.44x, as ORT's own int8 model)."""
    from types import SimpleNamespace

    from msq_onnx.allocate import Budget, check_reachable
    from msq_onnx.errors import BadOption
    from msq_onnx.ops import Layer
    from msq_onnx.pipeline import Candidate, Options, _warnings

    layers = [Layer("a", "Conv", "wa", "x", "ya", (4, 3, 3, 3), 0), Layer("b", "Conv", "wb", "ya", "yb", (4, 4, 1, 1), 0),
              Layer("e", "Gather", "table", "ids", "h", (50, 32), 0)]
    chosen = Candidate({"a": 8, "b": 8, "e": 8}, 8.0, "q.onnx", None,
                       {"a": "static", "b": "weight-only", "e": "weight-only"}, {}, 100)
    loaded = SimpleNamespace(skipped=[], prequantized=[], layers=layers, default_inputs=[])
    options = Options(max_drop=1.0)  # a gate: the collapse check is the gate's, not a warning

    def warned(latency, opts=options):
        return [w for w in _warnings(loaded, chosen, None, opts, False, [], latency) if "slower than FP32" in w]

    failed = warned({"fp32": 4.0, "output": 9.0, "ort_static_int8_failed": "ONNX Runtime's own ... fails", "batch": 1})
    assert len(failed) == 1 and "own int8 model" not in failed[0]  # a yardstick that failed has no time to quote
    slow = warned({"fp32": 4.0, "output": 9.0, "ort_static_int8": 5.0, "batch": 1})
    assert len(slow) == 1 and "2.25x" in slow[0] and "2 weight-only" in slow[0] and "own int8 model 5 ms" in slow[0]
    assert "1 layer(s) that could run static" in slow[0] and "--activations static" in slow[0]  # not the table
    assert not warned({"fp32": 4.0, "output": 4.2})  # within this machine's drift
    assert not warned({"fp32": 0.02, "output": 0.03})  # a toy model: the session's overhead, not the model's
    assert not warned(None)
    bounded = Options(max_drop=1.0, max_latency=3.0)  # the bound's own check speaks instead
    assert not warned({"fp32": 4.0, "output": 9.0}, bounded)
    forced = Options(max_drop=1.0, activations="static")  # then the advice cannot be to go static
    assert "--activations static" not in warned({"fp32": 4.0, "output": 9.0}, forced)[0]
    chosen.modes = {"a": "static", "b": "static", "e": "weight-only"}  # an embedding table cannot be static
    slow = warned({"fp32": 4.0, "output": 9.0, "batch": 8})
    assert "between its layers" in slow[0] and "--activations static" not in slow[0] and "at batch 8" in slow[0]
    # without the static layers' Q/DQ pairs (PP-OCR's direction classifier: 1.76x -> 0.93x FP32's time)
    assert "--activations weight-only" in slow[0]
    chosen.modes = {"a": "dynamic", "b": "static", "e": "weight-only"}  # dynamic already runs integer kernels
    assert "--activations static" not in warned({"fp32": 4.0, "output": 9.0})[0]
    chosen.modes = {"a": "dynamic", "b": "dynamic", "e": "weight-only"}  # no static layer: no Q/DQ pairs to drop
    assert "--activations" not in warned({"fp32": 4.0, "output": 9.0})[0]
    sized = Options(max_drop=1.0, prefer="size")  # there the containers are why
    assert "--prefer speed" in warned({"fp32": 4.0, "output": 9.0}, sized)[0]
    # a latency bound that cannot be met says so in milliseconds, not in rounded seconds
    with pytest.raises(BadOption, match=r"3\.6 ms against 3\.5 ms"):
        check_reachable([Budget({"a": {8: 0.0036}}, 0.0035, "--max-latency 1", unit="seconds")], [8])


def test_an_unreachable_budget_names_the_float_layers_and_advises_only_what_can_help():
    """'add narrower --bits' when 2 bits, the narrowest there is, is already a candidate was advice nobody could
    follow, and the layers that made the budget unreachable (float: no quantized mode keeps them faithful) went
    unnamed."""
    from msq_onnx.allocate import Budget, check_reachable
    from msq_onnx.errors import BadOption
    from msq_onnx.ops import FLOAT_BITS

    costs = {"a": {2: 200, 4: 400, FLOAT_BITS: 3200}, "b": {FLOAT_BITS: 3200}}
    with pytest.raises(BadOption) as failed:
        check_reachable([Budget(costs, 1000, "--avg-bits 4")], [2, 4, FLOAT_BITS],
                        {"a": {2, 4, FLOAT_BITS}, "b": {FLOAT_BITS}})
    assert "1 layer(s) that no quantized mode keeps faithful stay float, at 32 bits (b)" in str(failed.value)
    assert "narrower --bits" not in str(failed.value)
    with pytest.raises(BadOption, match="or add narrower --bits"):
        check_reachable([Budget({"a": {4: 400, 8: 800}}, 100, "--avg-bits 1")], [4, 8])


def test_layers_written_static_that_orts_graph_runs_in_float_are_said():
    """A static layer whose Q/DQ ORT's optimizer cannot fuse (Whisper's conv2 took its bias through an Identity)
    runs in float between Q/DQ pairs while the report called it static: the count of integer kernels in the
    optimized graph is checked against the layers written with quantized activations."""
    from collections import Counter
    from types import SimpleNamespace

    from msq_onnx.ops import Layer
    from msq_onnx.pipeline import Candidate, Options, _warnings

    layers = [Layer(n, "Conv", "w" + n, "x", "y" + n, (4, 4, 1, 1), 0) for n in "abc"]
    chosen = Candidate(dict.fromkeys("abc", 8), 8.0, "q.onnx", None, {"a": "static", "b": "static", "c": "weight-only"},
                       {}, 100)
    loaded = SimpleNamespace(skipped=[], prequantized=[], layers=layers, default_inputs=[])

    def said(counts):
        return [w for w in _warnings(loaded, chosen, None, Options(max_drop=1.0), False, [], None, Counter(counts))
                if "optimized graph" in w]

    assert said({"QLinearConv": 1, "Conv": 2}) == ["1 of 2 layer node(s) written with quantized activations run in "
                                                   "float in ONNX Runtime's optimized graph (1 integer kernels): "
                                                   "their Q/DQ pairs cost time and save nothing"]
    assert said({"QLinearConv": 2, "Conv": 1}) == []


def test_a_yardstick_that_cannot_run_is_left_out_of_the_latency_and_said(cnn_files, tmp_path, capfd):
    import shutil
    from types import SimpleNamespace

    from msq_onnx.pipeline import measure_latency
    from msq_onnx.verify import Yardstick

    loaded = load_model(cnn_files["model"])
    samples = open_samples(cnn_files["calib"], loaded.inputs, Preprocess())
    shutil.copy(cnn_files["model"], tmp_path / "fp32.onnx")
    chosen = SimpleNamespace(path=str(tmp_path / "fp32.onnx"))
    broken = onnx.load(cnn_files["model"])
    broken.graph.node[0].op_type = "NoSuchOp"  # ORT refuses it when the session is built
    onnx.save(broken, tmp_path / "ort.onnx")
    for yardstick in (Yardstick(str(tmp_path / "ort.onnx"), "static"),
                      Yardstick(str(tmp_path / "ort.onnx"), "static").prepared()):  # built on its thread: raised later
        measured, counts = measure_latency(loaded, chosen, samples, yardstick, str(tmp_path))
        assert counts == optimized_op_counts(chosen.path)  # the timed session's graph is the one counted
        assert measured["fp32"] > 0 and measured["output"] > 0 and "ort_static_int8" not in measured
        assert "NoSuchOp" in measured["ort_static_int8_failed"]
    assert "NoSuchOp" not in capfd.readouterr().err  # said in the report, not on stderr
    measured, _ = measure_latency(loaded, chosen, samples, Yardstick(cnn_files["model"], "static"), str(tmp_path))
    assert measured["ort_static_int8"] > 0 and "ort_static_int8_failed" not in measured


def test_the_pass_measures_only_the_ranges_a_static_layer_can_read_and_the_yardstick_still_builds(tmp_path):
    """A GELU between two MatMuls (the transformer's FFN): its inner tensors are never quantized statically,
    so the pass spends no reductions on them; ORT's uniform static yardstick, which quantizes every tensor,
    gets stand-in ranges for them, exact through data movement."""
    from msq_onnx.verify import timing_ranges

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (16,)).astype(np.float32), "b1"),
             numpy_helper.from_array(np.array(2 ** 0.5, np.float32), "root2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(rng.normal(0, 0.5, (16, 4)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Div", ["a1", "root2"], ["d"], name="div"),
             helper.make_node("Erf", ["d"], ["e"], name="erf"),
             helper.make_node("Add", ["e", "one"], ["e1"], name="add_one"),
             helper.make_node("Mul", ["a1", "e1"], ["g0"], name="mul"),
             helper.make_node("Mul", ["g0", "half"], ["g"], name="mul_half"),
             helper.make_node("MatMul", ["g", "w2"], ["m2"], name="mm2"),
             helper.make_node("Transpose", ["m2"], ["t"], perm=[1, 0], name="transpose"),
             helper.make_node("Transpose", ["t"], ["t2"], perm=[1, 0], name="transpose_back"),
             helper.make_node("Reshape", ["t2", "shape"], ["y"], name="reshape")]
    graph = helper.make_graph(nodes, "gelu_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "gelu.onnx")
    np.savez(tmp_path / "calib.npz", **samples_for(model, 64, seed=1))
    loaded = load_model(str(tmp_path / "gelu.onnx"))
    stats = run_pass(loaded, open_samples(str(tmp_path / "calib.npz"), loaded.inputs, Preprocess()), (1,), 64,
                     quiet=True)
    assert {"x", "m1", "g", "m2", "t", "t2", "y"} <= set(stats.ranges)
    assert not {"a1", "d", "e", "e1", "g0"} & set(stats.ranges)
    x = np.load(tmp_path / "calib.npz")["x"]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, None))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip(["g", "y"], session.run(["g", "y"], {"x": x})))
    for name in ("g", "y"):
        assert stats.ranges[name] == pytest.approx((float(values[name].min()), float(values[name].max())), rel=1e-5)

    completed = timing_ranges(loaded.model, {"x": (-1.0, 1.0), "m2": (-2.0, 3.0)})
    assert {"m1", "a1", "d", "e", "e1", "g0", "g", "m2", "t", "t2", "y"} <= set(completed)
    assert completed["t"] == completed["t2"] == completed["y"] == (-2.0, 3.0)  # data movement: exact
    assert completed["a1"] == (-1.0, 1.0)  # a stand-in from the nearest measured input upstream
    result = convert(str(tmp_path / "gelu.onnx"), str(tmp_path / "gelu.q.onnx"), str(tmp_path / "calib.npz"),
                     Options(quiet=True, activations="static"))
    latency = result.report["latency_ms"]
    assert latency["ort_static_int8"] > 0 and "ort_static_int8_failed" not in latency


def test_a_graph_input_no_static_layer_reads_still_gets_the_yardstick_a_range(tmp_path):
    """x -> Mul by a constant (a Keras Rescaling) -> Conv: the Mul stays out of the static region, so the pass
    measures no range for x, which ORT's uniform static yardstick quantizes: it takes its reader's range."""
    from msq_onnx.verify import timing_ranges

    model = tiny_cnn()
    graph = model.graph
    first = next(n for n in graph.node if n.input[0] == "x")
    first.input[0] = "x_scaled"
    graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "rescale"))
    graph.node.insert(0, helper.make_node("Mul", ["x", "rescale"], ["x_scaled"], name="rescaling"))
    onnx.save(model, tmp_path / "rescaled.onnx")
    np.savez(tmp_path / "calib.npz", **samples_for(model, 64, seed=1))
    loaded = load_model(str(tmp_path / "rescaled.onnx"))
    stats = run_pass(loaded, open_samples(str(tmp_path / "calib.npz"), loaded.inputs, Preprocess()), (1,), 64,
                     quiet=True)
    assert "x" not in stats.ranges and "x_scaled" in stats.ranges
    assert timing_ranges(loaded.model, stats.ranges)["x"] == stats.ranges["x_scaled"]
    result = convert(str(tmp_path / "rescaled.onnx"), str(tmp_path / "rescaled.q.onnx"), str(tmp_path / "calib.npz"),
                     Options(quiet=True, activations="static"))
    assert result.report["latency_ms"]["ort_static_int8"] > 0


def test_a_yardstick_ort_cannot_write_is_said_with_its_reason(cnn_files, tmp_path):
    import shutil
    from types import SimpleNamespace

    from msq_onnx.pipeline import measure_latency
    from msq_onnx.verify import reference_int8

    yardstick = reference_int8(cnn_files["model"], str(tmp_path), True, {})  # no ranges at all: ORT refuses
    assert yardstick.path is None and yardstick.kind == "static" and yardstick.failed.startswith("cannot be written")
    loaded = load_model(cnn_files["model"])
    shutil.copy(cnn_files["model"], tmp_path / "fp32.onnx")
    measured, _ = measure_latency(loaded, SimpleNamespace(path=str(tmp_path / "fp32.onnx")),
                                  open_samples(cnn_files["calib"], loaded.inputs, Preprocess()), yardstick,
                                  str(tmp_path))
    assert "ort_static_int8" not in measured
    assert "cannot be written" in measured["ort_static_int8_failed"]


def _integer_weights(path: str) -> list:
    return [numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer
            if t.data_type == TensorProto.INT8 and len(t.dims) >= 2]


@pytest.mark.parametrize("setting", ["on", "off", "auto-saturating", "auto-vnni"])
@pytest.mark.usefixtures("tied_dense_timings")
def test_reduce_range_gives_integer_kernels_7_bit_weights_where_they_saturate(cnn_files, tmp_path, monkeypatch, setting):
    """ORT's u8s8 kernels on AVX2 (no VNNI) add pairs of uint8 x int8 products in int16: 8-bit weights saturate
    there (the tiny CNN at 8 bits: relative error 0.035 fused against 0.007 unfused on an AVX2 EPYC). With
    reduce_range the static and dynamic layers get at most 7 bits, |w| <= 64, and the fused model computes what
    the unfused one does on any machine; auto decides by the machine's probe, off keeps 8 bits."""
    import msq_onnx.pipeline as pipeline

    option = setting.split("-")[0]
    if option == "auto":
        monkeypatch.setattr(pipeline, "integer_kernels_saturate", lambda: setting == "auto-saturating")
    out = tmp_path / "q.onnx"
    report = convert(cnn_files["model"], str(out), cnn_files["calib"], Options(quiet=True, reduce_range=option)).report
    capped = setting in ("on", "auto-saturating")
    assert {layer["bits"] for layer in report["layers"]} == ({7} if capped else {8})
    assert report["reduce_range"]["setting"] == option
    assert report["reduce_range"]["capped_layers"] == (sorted(l["name"] for l in report["layers"]) if capped else [])
    assert max(int(np.abs(w).max()) for w in _integer_weights(str(out))) == (64 if capped else 127)
    from msq_onnx.verify import integer_kernels_saturate

    said = any("saturate" in w for w in report["warnings"])
    assert said == (option == "off" and integer_kernels_saturate())
    if capped:
        x = np.load(cnn_files["calib"])["x"]
        unfused = ort.SessionOptions()
        unfused.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        fused = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        plain = ort.InferenceSession(str(out), unfused, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert np.sqrt(((fused - plain) ** 2).mean() / (plain ** 2).mean()) < 0.01


@pytest.mark.usefixtures("tied_dense_timings")
def test_a_capped_layer_has_no_error_table_above_its_cap(cnn_files):
    """The widths reduce_range takes from a layer are never allocated, so their rounding is not measured: on an AVX2
    machine that was every dynamic layer's 8-bit table (MiniLM-L6: a ninth of the error tables' time)."""
    from msq_onnx.pipeline import _Timer, analyse

    loaded = load_model(cnn_files["model"])
    calib = open_samples(cnn_files["calib"], loaded.inputs, Preprocess())
    for setting, widest in (("on", 7), ("off", 8)):
        analysis = analyse(loaded, calib, Options(bits=(2, 4, 7, 8), reduce_range=setting, quiet=True), _Timer())
        assert {max(table) for table in analysis.choices.values()} == {widest}
        assert set(analysis.caps) == (set(analysis.choices) if setting == "on" else set())


def test_the_saturation_probe_matches_a_product_that_overflows_int16(tmp_path):
    """The probe's answer is what a bigger MatMulInteger shows: on a saturating machine a row of 255s times a column
    of 127s comes out short of the exact sum, elsewhere exact."""
    from msq_onnx.verify import integer_kernels_saturate, single_thread_session

    weight = numpy_helper.from_array(np.full((64, 8), 127, np.int8), "b")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "big",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    product = single_thread_session(model).run(None, {"a": np.full((1, 64), 255, np.uint8)})[0]
    assert bool((product != 64 * 255 * 127).any()) == integer_kernels_saturate()


def test_without_7_among_the_bits_nothing_is_capped_and_the_warning_says_to_add_it(cnn_files, tmp_path):
    """--bits 2,4,8 on a saturating target: capping at 7 would have dropped every static layer to 4 bits; the layers
    keep 8 and the warning names the remedy (a review's)."""
    report = convert(cnn_files["model"], str(tmp_path / "q.onnx"), cnn_files["calib"],
                     Options(quiet=True, bits=(2, 4, 8), reduce_range="on")).report
    assert {layer["bits"] for layer in report["layers"]} == {8} and report["reduce_range"]["capped_layers"] == []
    assert any("saturate" in w and "7 among --bits would write them in 7 bits" in w for w in report["warnings"])


@pytest.mark.usefixtures("tied_dense_timings")
def test_a_layer_with_a_uint16_input_keeps_8_bits_under_reduce_range(cnn_files, tmp_path):
    """--act16 gives a static layer a uint16 input, which ORT runs on a float kernel: no u8s8 product saturates
    there, so that layer is not capped at 7 bits, nor is the layer that writes the uint16 tensor (a QLinearConv
    writes no uint16, so it runs float too); the others are (two reviews')."""
    report = convert(cnn_files["model"], str(tmp_path / "q.onnx"), cnn_files["calib"],
                     Options(quiet=True, reduce_range="on", act16=1)).report
    wide = {layer["name"] for layer in report["layers"] if layer["activation_bits"] == 16}
    assert wide == {"pw"}
    spared = {"pw", "dw"}  # dw's output is pw's input
    assert {layer["name"]: layer["bits"] for layer in report["layers"]} == \
        {layer["name"]: 8 if layer["name"] in spared else 7 for layer in report["layers"]}
    assert set(report["reduce_range"]["capped_layers"]) == {layer["name"] for layer in report["layers"]} - spared
    assert not any("saturate" in w for w in report["warnings"])  # the 8-bit layer runs no u8s8 kernel


def test_the_budget_search_spans_what_each_layer_can_take_and_act16_spares_static_readers_only(tmp_path):
    """A layer that only float keeps faithful stays at 32 bits and a capped one stops at 7: the search's grid ends
    where the knapsack can reach (from --bits alone its low probes were unreachable, a BadOption on an --avg-bits
    nobody passed, and its top probe not the widest model). A dynamic layer reading a tensor --act16 makes uint16
    for a static one quantizes it to uint8 itself, so it runs a u8s8 kernel and is not spared (a review's)."""
    from types import SimpleNamespace

    from msq_onnx.ops import DYNAMIC, FLOAT_BITS, STATIC
    from msq_onnx.pipeline import search_reach, uint16_readers

    damage = {"a": {FLOAT_BITS: 0.0}, "b": {2: 0.3, 4: 0.1, 7: 0.01, FLOAT_BITS: 0.0},
              "c": {2: 0.3, 4: 0.1, 8: 0.0, FLOAT_BITS: 0.0}}
    params = {"a": 10, "b": 40, "c": 50}
    assert search_reach(damage, params, 0) == pytest.approx(((320 + 80 + 100) / 100, (320 + 280 + 400) / 100, 32))
    assert search_reach(damage, params, {8: 100}) == pytest.approx(((500 + 800) / 200, (1000 + 800) / 200,
                                                                    (3200 + 800) / 200))

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"), helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
         helper.make_node("Add", ["q", "k"], ["y"], name="add")], "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), name) for name in ("wq", "wk")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    loaded = load_model(str(tmp_path / "m.onnx"))
    by_node = {layer.nodes[0]: layer.name for layer in loaded.layers}
    analysis = SimpleNamespace(modes={by_node["q"]: SimpleNamespace(mode=STATIC),
                                      by_node["k"]: SimpleNamespace(mode=DYNAMIC)})
    assert uint16_readers(loaded, analysis.modes, {by_node["q"]}) == {by_node["q"]}


def test_mode_timings_are_cached_per_cpu_model_and_instruction_set(tmp_path):
    """The timings' cache was named by ORT's version, the architecture and the core count alone: a home folder moved
    from an AVX512-VNNI host to an AVX2 one of the same size reused timings of other kernels. The name now carries
    the CPU's model and the instruction sets ORT chooses between."""
    from msq_onnx.latency import cache_path, cpu_signature

    def cpuinfo(name, model, flags):
        path = tmp_path / name
        path.write_text(f"processor\t: 0\nmodel name\t: {model}\nflags\t\t: fpu sse2 {flags}\n\n"
                        f"processor\t: 1\nmodel name\t: {model}\nflags\t\t: fpu sse2 {flags}\n")
        return str(path)

    vnni = cpu_signature(cpuinfo("a", "Intel Xeon", "avx2 avx512f avx512_vnni"))
    avx2 = cpu_signature(cpuinfo("b", "Intel Xeon", "avx2"))
    epyc = cpu_signature(cpuinfo("c", "AMD EPYC", "avx2"))
    assert len({vnni, avx2, epyc}) == 3 and cpu_signature(cpuinfo("d", "Intel Xeon", "avx2 ht")) == avx2
    assert cache_path().endswith(f"-{cpu_signature()}.json")


def _blocked_runs(monkeypatch):
    """ORT runs that wait for the returned event before running (the first that waits 10 s in vain sets it)."""
    import threading

    release = threading.Event()
    real_run = ort.InferenceSession.run

    def waiting(self, *args, **kwargs):
        if not release.wait(10):
            release.set()
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", waiting)
    return release


def test_the_held_out_reference_runs_beside_the_caller_and_gives_the_same_outputs(cnn_files, monkeypatch):
    import time

    from msq_onnx.pipeline import _HeldOut

    loaded = load_model(cnn_files["model"])
    samples = open_samples(cnn_files["calib"], loaded.inputs, Preprocess())
    options = Options(quiet=True)
    before = _HeldOut(loaded, samples, options, 2).reference.cache
    release = _blocked_runs(monkeypatch)
    start = time.perf_counter()
    held_out = _HeldOut(loaded, samples, options, 2, background=True)
    held_out.start()
    assert time.perf_counter() - start < 5  # returned while its runs wait
    release.set()
    after = held_out.reference.cache
    assert len(after) == len(before) > 0
    for ours, theirs in zip(after, before):
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)


def test_a_background_reference_is_stopped_when_the_conversion_ends_without_it(cnn_files, monkeypatch):
    import threading

    from msq_onnx.pipeline import _HeldOut

    loaded = load_model(cnn_files["model"])
    samples = open_samples(cnn_files["calib"], loaded.inputs, Preprocess())
    runs = [0]
    release = _blocked_runs(monkeypatch)
    counted_run = ort.InferenceSession.run

    def counting(self, *args, **kwargs):
        runs[0] += 1
        return counted_run(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", counting)
    held_out = _HeldOut(loaded, samples, Options(quiet=True), 1, background=True)
    held_out.start()
    stopper = threading.Timer(0.2, release.set)  # the runs go on once close() has asked them to stop
    stopper.start()
    held_out.close()
    assert not held_out._thread.is_alive()
    assert runs[0] < samples.count  # ended early, not after every sample
    assert held_out._thread._error is None  # its Cancelled is dropped: its traceback would hold the model


@pytest.mark.parametrize("fits", [True, False])
def test_the_latency_timing_times_the_sessions_the_held_out_runs_used(cnn_files, tmp_path, monkeypatch, fits):
    """The FP32 session the held-out reference ran on one thread, and the written model's session that measured
    it, are the ones timed: no second build of either (MiniLM-L6: 0.2 s). Their two workers run on one intra-op
    thread each where the machine has two or three cores (as here). The yardstick's session is built where it is
    written, on its thread. Whether or not the reference ran beside the write (fits), and the graph ORT optimized
    the written model to is still the one counted."""
    from msq_onnx import fidelity, instrument, pipeline, verify

    monkeypatch.setattr(instrument, "usable_cores", lambda: 2)
    monkeypatch.setattr(pipeline, "_fits_beside_the_write", lambda loaded: fits)
    built, measured, timed = [], [], []
    real, real_session, real_timing = verify.single_thread_session, fidelity.session, verify.time_sessions

    def recorded(model, *args, **kwargs):
        built.append(model)
        return real(model, *args, **kwargs)

    def measuring(path, *args, **kwargs):
        measured.append(real_session(path, *args, **kwargs))
        return measured[-1]

    monkeypatch.setattr(verify, "single_thread_session", recorded)
    monkeypatch.setattr(fidelity, "session", measuring)
    monkeypatch.setattr(verify, "time_sessions", lambda sessions, feed: timed.extend(sessions) or real_timing(
        sessions, feed))
    out = tmp_path / "q.onnx"
    report = convert(cnn_files["model"], str(out), cnn_files["calib"], Options(quiet=True)).report
    assert report["latency_ms"]["fp32"] > 0 and report["latency_ms"]["output"] > 0 and report["latency_ms"][
        "ort_static_int8"] > 0
    files = [m for m in built if isinstance(m, str)]  # (the mode timings' one-node models are built in memory)
    assert len(files) == 1 and files[0].endswith("ort-static-int8.onnx")  # the yardstick's alone
    fp32, written = measured[0], measured[-1]  # the reference's, then the candidate's
    assert timed[0] is fp32 and timed[1] is written
    assert report["optimized_ops"] == dict(optimized_op_counts(str(out)))


def _slow_reference_runs(monkeypatch, seconds: float) -> None:
    from msq_onnx import fidelity

    real = fidelity._run_checked

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(fidelity, "_run_checked", slow)


def test_the_blas_limit_is_as_before_after_a_conversion_with_a_background_reference(tmp_path, monkeypatch):
    """The background runs and the main thread's write both enter threadpoolctl's process-wide limit; with the
    runs leaving theirs while the write was in its own, the write's exit left one BLAS thread after convert()
    (a review's timing: the first FP32 runs slowed, the write late and slow)."""
    from threadpoolctl import threadpool_info

    from conftest import BUNDLED_CALIB, BUNDLED_EVAL, BUNDLED_MODEL
    from msq_onnx import fidelity, pipeline, write

    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    if not blas or blas[0]["num_threads"] < 2:
        pytest.skip("needs a BLAS that threadpoolctl sees, on more than one thread")
    real_run, real_weights, real_layer = fidelity._run_checked, pipeline.quantize_weights, write.quantize_layer
    runs = [0]

    def run(*args, **kwargs):
        runs[0] += 1
        if runs[0] <= 4:
            time.sleep(0.4)
        return real_run(*args, **kwargs)

    def weights(*args, **kwargs):
        time.sleep(0.3)
        return real_weights(*args, **kwargs)

    def layer(*args, **kwargs):
        time.sleep(0.5)
        return real_layer(*args, **kwargs)

    monkeypatch.setattr(fidelity, "_run_checked", run)
    monkeypatch.setattr(pipeline, "quantize_weights", weights)
    monkeypatch.setattr(write, "quantize_layer", layer)
    def threads() -> dict:  # per library: scipy may load its own during the conversion
        return {pool["filepath"]: pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    before = threads()
    convert(BUNDLED_MODEL, str(tmp_path / "q.onnx"), BUNDLED_CALIB,
            Options(quiet=True, eval_path=BUNDLED_EVAL, avg_bits=4))
    after = threads()
    assert {path: after[path] for path in before} == before


def test_an_interrupted_write_stops_the_background_reference_and_leaves_no_folder(cnn_files, tmp_path, monkeypatch):
    """Its Cancelled error, kept by the thread, held the loaded model in a cycle: the weights folder stayed until
    the garbage collector ran (a review's)."""
    import gc
    import os
    import tempfile

    from msq_onnx import pipeline

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    _slow_reference_runs(monkeypatch, 0.2)

    def interrupted(*args, **kwargs):
        time.sleep(0.3)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "quantize_to_qdq", interrupted)
    gc.disable()
    try:
        with pytest.raises(KeyboardInterrupt):
            convert(cnn_files["model"], str(tmp_path / "q.onnx"), cnn_files["calib"], Options(quiet=True))
        assert os.listdir(folder) == []
    finally:
        gc.enable()


def test_a_conversion_that_fails_beside_the_yardstick_waits_for_it_and_leaves_no_file(cnn_files, tmp_path,
                                                                                    monkeypatch):
    """ORT's int8 yardstick is written on a thread beside the error tables: a failure there (here, an interrupt)
    waits for its writing to end before the temporary folders go, so nothing is left behind and no thread runs on."""
    import gc
    import tempfile
    import threading

    from msq_onnx import pipeline

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    started = threading.Event()
    yardstick = pipeline._yardstick

    def slow_yardstick(*args):
        started.set()
        time.sleep(0.3)  # still writing when the tables fail
        return yardstick(*args)

    def failing_tables(*args, **kwargs):
        assert started.wait(5)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_yardstick", slow_yardstick)
    monkeypatch.setattr(pipeline, "_error_tables", failing_tables)
    before = set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt):
        convert(cnn_files["model"], str(tmp_path / "q.onnx"), cnn_files["calib"], Options(quiet=True, avg_bits=4))
    assert not [t for t in set(threading.enumerate()) - before if isinstance(t, pipeline._ResultThread)]
    gc.collect()
    assert os.listdir(folder) == []


def test_a_thread_result_raises_its_error_every_time_it_is_asked():
    """Raised as it is once, then made anew (its traceback is not kept); a second call gave an AttributeError
    (a review's). An error whose constructor does not take its args back comes again as a RuntimeError."""
    from msq_onnx.errors import BadData
    from msq_onnx.pipeline import _ResultThread

    class Odd(Exception):
        def __init__(self, path, why):
            super().__init__(f"{path}: {why}")

    def bad():
        raise BadData("the data is bad; fix it.")

    def odd():
        raise Odd("a.npz", "unreadable")

    failed = _ResultThread(bad)
    for _ in range(2):
        with pytest.raises(BadData, match="the data is bad"):
            failed.result()
    failed = _ResultThread(odd)
    with pytest.raises(Odd):
        failed.result()
    with pytest.raises(RuntimeError, match="a.npz: unreadable"):
        failed.result()


def test_the_blas_limit_of_a_background_reference_ends_when_the_reference_is_taken(cnn_files):
    """One BLAS thread while the background runs go on; the caller's threads again once they are joined (the
    candidates' comparisons, neighbour_agreement's products, run after that: a review's)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from msq_onnx.pipeline import _HeldOut

    if not any(pool["user_api"] == "blas" for pool in threadpool_info()):
        pytest.skip("numpy without a BLAS threadpoolctl can see")
    loaded = load_model(cnn_files["model"])
    samples = open_samples(cnn_files["calib"], loaded.inputs, Preprocess())

    def threads() -> set:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    with threadpool_limits(limits=2, user_api="blas"):
        held_out = _HeldOut(loaded, samples, Options(quiet=True), 2, background=True)
        held_out.start()
        assert threads() == {1}
        assert held_out.reference.cache
        assert threads() == {2}
        stopped = _HeldOut(loaded, samples, Options(quiet=True), 2, background=True)
        stopped.start()
        stopped.close()
        assert threads() == {2}


def test_the_reference_runs_beside_the_write_only_where_its_session_fits_under_the_peak(cnn_files, tmp_path,
                                                                                       monkeypatch):
    """BERT-base's FP32 session beside its first write, running or kept for the latency timing, raised the
    conversion's peak above its yardstick's (1,704 -> 2,117 MB at the write); a model whose write and session do
    not fit below the peak reached so far gets its reference after the write. A small model always fits."""
    from types import SimpleNamespace

    from msq_onnx import pipeline
    from msq_onnx.ops import REGISTRY

    def layers(params: int):
        return SimpleNamespace(layers=[SimpleNamespace(params=params, op_type=op, kind=REGISTRY[op])
                                       for op in ("MatMul", "Gather")])

    assert pipeline._fits_beside_the_write(layers(1000))
    assert not pipeline._fits_beside_the_write(layers(10 ** 12))
    chosen = []
    real = pipeline._HeldOut.__init__

    def recorded(self, *args, background=False, keep_session=False, **kwargs):
        chosen.append((background, keep_session))
        real(self, *args, background=background, keep_session=keep_session, **kwargs)

    monkeypatch.setattr(pipeline._HeldOut, "__init__", recorded)
    convert(cnn_files["model"], str(tmp_path / "a.onnx"), cnn_files["calib"], Options(quiet=True))
    monkeypatch.setattr(pipeline, "_fits_beside_the_write", lambda loaded: False)
    convert(cnn_files["model"], str(tmp_path / "b.onnx"), cnn_files["calib"], Options(quiet=True))
    convert(cnn_files["model"], str(tmp_path / "c.onnx"), cnn_files["calib"], Options(quiet=True, max_drop=5.0))
    # Its reference then comes after the first write; its session is kept for the timing only where no other
    # write follows (one candidate), not through a gate's search
    assert chosen == [(True, True), (False, True), (False, False)]


def _written_at_8_bits(model_path, calib_path, folder, floats=(), modes_of=None, prefer="speed"):
    """The model written by the pipeline's own stages with every layer at 8 bits but `floats` (left in float) and
    `modes_of` (layer name -> mode) over the planned modes: (the loaded model, the written path, the modes)."""
    from msq_onnx.ops import FLOAT_BITS
    from msq_onnx.pipeline import _Timer, analyse, plan_layers
    from msq_onnx.write import quantize_to_qdq, quantize_weights

    from unittest import mock

    loaded = load_model(str(model_path))
    calib = open_samples(str(calib_path), loaded.inputs, Preprocess())
    # `modes_of` may make any layer static: the pass measures the ranges of every layer's
    with mock.patch("msq_onnx.modes.static_candidates", lambda loaded, rows, forced=None: {
            layer.name for layer in loaded.layers}):
        analysis = analyse(loaded, calib, Options(bits=(8,), quiet=True), _Timer())
    bits = {layer.name: FLOAT_BITS if layer.name in floats else 8 for layer in loaded.layers}
    modes, containers = plan_layers(loaded, analysis, bits, prefer)
    modes.update(modes_of or {})
    quantized = quantize_weights(loaded, bits, analysis.choices, analysis.stats.input_mean)
    return loaded, quantize_to_qdq(loaded, quantized, analysis.stats.ranges, str(folder), modes=modes,
                                   containers=containers, fold=prefer == "speed"), modes


def test_the_rewritten_layers_integers_are_the_ones_rounded_not_read_back(cnn_files, tmp_path, monkeypatch):
    """quantize_weights keeps the integers of the layers rewrite_layers writes (dynamic, weight-only) instead of
    serializing their fake-quantized floats to read them back and round them again: beside static layers (ORT's
    quantizer in between) and alone, the file is the same node for node and value for value."""
    from msq_onnx.load import references_weights_file
    from msq_onnx.ops import DYNAMIC, STATIC, WEIGHT_ONLY
    from msq_onnx.pipeline import _Timer, analyse, plan_layers
    from msq_onnx.write import quantize_to_qdq, quantize_weights

    monkeypatch.setattr("msq_onnx.load.SET_ASIDE_BYTES", 128)  # the tiny CNN's weights set aside as large ones are
    loaded = load_model(cnn_files["model"])
    calib = open_samples(cnn_files["calib"], loaded.inputs, Preprocess())
    analysis = analyse(loaded, calib, Options(bits=(4, 8), quiet=True), _Timer())
    bits = {layer.name: 4 for layer in loaded.layers}
    modes, containers = plan_layers(loaded, analysis, bits, "speed")
    dense = next(layer.name for layer in loaded.layers if layer.op_type in ("Gemm", "MatMul"))
    first = loaded.layers[0].name
    aside = {t.name for t in loaded.session_copy().graph.initializer if references_weights_file(t)}
    assert aside & {layer.weight_name for layer in loaded.layers if layer.name in (dense, first)}
    for planned in ({**modes, dense: DYNAMIC, first: WEIGHT_ONLY},
                    {name: DYNAMIC if name == dense else WEIGHT_ONLY for name in modes}):
        assert STATIC in planned.values() or planned[dense] == DYNAMIC
        written = []
        for rewritten in (frozenset(), {n for n, m in planned.items() if m in (DYNAMIC, WEIGHT_ONLY)}):
            folder = tmp_path / f"w{len(written)}_{len(rewritten)}_{STATIC in planned.values()}"
            folder.mkdir()
            quantized = quantize_weights(loaded, bits, analysis.choices, analysis.stats.input_mean,
                                         rewritten=rewritten)
            assert len(quantized.integers) == len(rewritten)  # kept, not serialized
            # nor copied: a kept weight the session copy set aside stays a reference in the write's model
            held = {t.name for t in quantized.model.graph.initializer if references_weights_file(t)}
            assert held == set(quantized.integers) & aside
            written.append(onnx.load(quantize_to_qdq(loaded, quantized, analysis.stats.ranges, str(folder),
                                                     modes=planned, containers=dict(containers))))
            assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in written[-1].graph.initializer)
        before, after = written
        assert [(n.op_type, list(n.input)) for n in after.graph.node] == [
            (n.op_type, list(n.input)) for n in before.graph.node]
        values = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
        assert {t.name for t in after.graph.initializer} == values.keys()
        for tensor in after.graph.initializer:
            np.testing.assert_array_equal(numpy_helper.to_array(tensor), values[tensor.name], err_msg=tensor.name)


def test_a_layer_left_in_float_between_static_layers_runs_in_float(cnn_files, tmp_path):
    """ORT's optimizer rounds a float Conv's weight to one int8 scale for the whole tensor when the Conv reads a
    per-tensor DequantizeLinear and feeds a QuantizeLinear (WeightBiasQuantization): the depthwise layer left in
    float between two static ones ran as a per-tensor QLinearConv. Its input now has a DequantizeLinear of its
    own, per channel with the same values, and ORT runs it as the float Conv it is."""
    loaded, path, modes = _written_at_8_bits(cnn_files["model"], cnn_files["calib"], tmp_path, floats=("dw",))
    depthwise = next(layer for layer in loaded.layers if layer.group > 1)
    assert depthwise.name == "dw" and modes["dw"] == "float" and list(modes.values()).count("static") >= 2
    written = onnx.load(path)
    node = next(n for n in written.graph.node if n.name in depthwise.nodes)
    weights = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert np.array_equal(weights[node.input[1]], loaded.weight(depthwise))  # float as written
    counts = optimized_op_counts(path)
    assert counts.get("Conv", 0) + counts.get("FusedConv", 0) == 1  # the depthwise layer, in float
    assert counts.get("QLinearConv", 0) == 2
    source = next(n for n in written.graph.node if node.input[0] in n.output)
    assert source.op_type == "DequantizeLinear" and weights[source.input[1]].shape == (8,)


@pytest.mark.usefixtures("tied_dense_timings")
def test_weight_only_convolutions_are_folded_into_float_weights_when_ort_loads_them(cnn_files, tmp_path):
    """A weight-only Conv's int8 weight is written as int8 -> Cast -> Mul(scale per output channel), which ORT's
    optimizer folds into a float initializer when it loads the model (no Cast is left in its optimized graph),
    where a DequantizeLinear of a constant is kept and run on the whole weight at every inference (the
    orientation classifier of bench/more_models.py: 8.7 -> 3.1 ms, FP32 3.2). The file keeps the int8 bytes,
    and ORT computes the very values the DequantizeLinear form gave. --prefer size keeps the DequantizeLinear,
    which holds less in memory than the folded float weights."""
    weight_only = {"conv1": "weight-only", "dw": "weight-only", "pw": "weight-only"}
    loaded, path, modes = _written_at_8_bits(cnn_files["model"], cnn_files["calib"], tmp_path, modes_of=weight_only)
    written = onnx.load(path)
    inits = {t.name: t for t in written.graph.initializer}
    producers = {o: n for n in written.graph.node for o in n.output}
    for node in (n for n in written.graph.node if n.op_type == "Conv"):
        made = producers[node.input[1]]
        cast = producers[made.input[0]]
        assert made.op_type == "Mul" and cast.op_type == "Cast" and inits[cast.input[0]].data_type == TensorProto.INT8
        scale = numpy_helper.to_array(inits[made.input[1]])
        assert scale.shape == (inits[cast.input[0]].dims[0], 1, 1, 1)
    assert "Cast" not in optimized_op_counts(path)

    # the same model with each Cast x scale as the DequantizeLinear it replaces
    dequantizing = onnx.load(path)
    casts = {n.output[0]: n for n in dequantizing.graph.node if n.op_type == "Cast"}
    rebuilt = []
    for node in dequantizing.graph.node:
        if node.op_type == "Cast" and node.output[0] in casts:
            continue
        if node.op_type == "Mul" and node.input[0] in casts:
            scale_name = node.input[1] + "_flat"
            dequantizing.graph.initializer.append(numpy_helper.from_array(
                numpy_helper.to_array(inits[node.input[1]]).reshape(-1), scale_name))
            node = helper.make_node("DequantizeLinear", [casts[node.input[0]].input[0], scale_name], node.output,
                                    axis=0)
        rebuilt.append(node)
    del dequantizing.graph.node[:]
    dequantizing.graph.node.extend(rebuilt)
    x = np.load(cnn_files["eval"])["x"]
    folded = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    per_run = ort.InferenceSession(dequantizing.SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # the same weights; a kernel ORT picks for a constant weight may sum in another order (3e-7 relative seen)
    assert np.allclose(folded, per_run, rtol=0, atol=1e-5 * np.abs(per_run).max())

    (tmp_path / "size").mkdir()
    _, small, _ = _written_at_8_bits(cnn_files["model"], cnn_files["calib"], tmp_path / "size", modes_of=weight_only,
                                     prefer="size")
    kept = onnx.load(small)
    producers = {o: n for n in kept.graph.node for o in n.output}
    assert {producers[n.input[1]].op_type for n in kept.graph.node if n.op_type == "Conv"} == {"DequantizeLinear"}
    smaller = ort.InferenceSession(small, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(smaller, folded, rtol=0, atol=1e-5 * np.abs(folded).max())


NO_OPS = {  # ops ORT removes before its QDQ fusions: (nodes from "r1" to "r1_out", initializers)
    "cast": ([helper.make_node("Cast", ["r1"], ["r1_out"], to=TensorProto.FLOAT, name="noop")], []),
    "zero plus": ([helper.make_node("Add", ["zero", "r1"], ["r1_out"], name="noop")],
                  [numpy_helper.from_array(np.array(0.0, np.float32), "zero")]),
    "times a Constant one": ([helper.make_node("Constant", [], ["one"], value_float=1.0, name="one"),
                              helper.make_node("Mul", ["r1", "one"], ["r1_out"], name="noop")], []),
    "expand to [1]": ([helper.make_node("Expand", ["r1", "shape"], ["r1_out"], name="noop")],
                      [numpy_helper.from_array(np.array([1], np.int64), "shape")]),
}


def _no_op_before_depthwise(folder, no_op):
    """tiny_cnn with a no-op ORT removes (NO_OPS: as torch exports leave them) before its depthwise Conv, whose first
    channel's weights are 50x the others' (one int8 scale for the whole weight then rounds the others to a few
    levels), on disk with calibration samples: (model path, calibration path)."""
    model = tiny_cnn()
    weight = next(t for t in model.graph.initializer if t.name == "w2")
    values = numpy_helper.to_array(weight).copy()
    values[0] *= 50.0
    weight.CopyFrom(numpy_helper.from_array(values, "w2"))
    nodes, constants = NO_OPS[no_op]
    next(n for n in model.graph.node if n.name == "dw").input[0] = "r1_out"
    position = next(i for i, n in enumerate(model.graph.node) if n.name == "dw")
    for offset, node in enumerate(nodes):
        model.graph.node.insert(position + offset, node)
    model.graph.initializer.extend(constants)
    onnx.save(model, folder / "m.onnx")
    np.savez(folder / "calib.npz", **samples_for(model, 64, seed=1))
    return folder / "m.onnx", folder / "calib.npz"


@pytest.mark.parametrize("no_op", list(NO_OPS))
@pytest.mark.parametrize("mode", ["float", "weight-only"])
def test_a_no_op_does_not_hide_a_static_neighbour_from_the_shield_or_the_fold(tmp_path, mode, no_op):
    """Reviews put a no-op ORT removes (a Cast to float, Add(0, x), Mul(x, Constant(value_float=1)), Expand(x, [1]))
    between a static layer's per-tensor DequantizeLinear and a depthwise Conv left in float or weight-only: ORT
    removed it, then its WeightBiasQuantization rounded the float weight (the float layer's, or a folded weight-only
    one's) to one int8 scale and fused a QLinearConv, 4-5% of the output off. The shield and the fold walk through
    such ops, past the input they hand on: ORT's optimized model computes what the file says (the same file run
    with ORT's optimizations off). In ORT's optimized graph the depthwise layer runs in float, or (weight-only) as
    a QLinearConv with its weight's scale per channel, not one for the whole tensor."""
    from msq_onnx.verify import integer_kernels_saturate, session

    model_path, calib_path = _no_op_before_depthwise(tmp_path, no_op)
    loaded, path, modes = _written_at_8_bits(model_path, calib_path, tmp_path, floats=("dw",) if mode == "float"
                                             else (), modes_of={"dw": "weight-only"} if mode != "float" else None)
    assert modes["dw"] == mode and modes["conv1"] == "static"
    written = onnx.load(path)
    producers = {o: n for n in written.graph.node for o in n.output}
    depthwise = next(n for n in written.graph.node if n.name == "dw")
    if mode == "weight-only":  # not folded: a QuantizeLinear follows, so ORT fuses the DequantizeLinear pair
        assert producers[depthwise.input[1]].op_type == "DequantizeLinear"
    session(path, str(tmp_path / "optimized.onnx"))
    optimized_graph = onnx.load(str(tmp_path / "optimized.onnx"))
    scales = {t.name: t for t in optimized_graph.graph.initializer}
    fused = [n for n in optimized_graph.graph.node if n.op_type == "QLinearConv"
             and any(a.name == "group" and a.i == 8 for a in n.attribute)]
    if mode == "float":
        assert fused == []  # the depthwise layer runs in float
    else:
        assert len(fused) == 1 and np.prod(scales[fused[0].input[4]].dims) == 8  # a weight scale per channel
    if not integer_kernels_saturate():  # where u8s8 kernels saturate, the fused layers differ from the file anyway
        x = np.load(calib_path)["x"][:16]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        as_written = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        optimized = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert np.abs(optimized - as_written).max() < 0.01 * np.abs(as_written).max()  # rounded: 4-5% off


def test_only_the_kinds_ort_rounds_keep_a_dequantize_linear_behind_a_static_neighbour():
    """write.folds_at_load: a weight-only int8 weight is folded unless ORT's WeightBiasQuantization could round it
    (a Conv or ConvTranspose whose input a DequantizeLinear reaches, also past a Reshape or a no-op Cast or Mul by
    1); an LSTM, which that transformer never touches, is folded behind one too."""
    from msq_onnx.ops import Layer, kind_for
    from msq_onnx.write import INT4, INT8, folds_at_load

    constants = {"one": numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                 "two": numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                 "ones": numpy_helper.from_array(np.array([1], np.int64), "ones")}
    chains = {"direct": [], "reshape": [("Reshape", ["shape"])], "cast": [("Cast", [])],
              "times one": [("Mul", ["one"])], "one times": [("Mul", ["one"], True)],
              "expand": [("Expand", ["ones"])], "times two": [("Mul", ["two"])], "relu": [("Relu", [])]}
    for op_type, weight_shape in (("Conv", (8, 4, 3, 3)), ("LSTM", (1, 32, 4))):
        for chain, steps in chains.items():
            nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["t0"], name="dq")]
            for index, (step, extra, *first) in enumerate(steps):  # first: the constant is the first operand
                inputs = extra + [f"t{index}"] if first else [f"t{index}"] + extra
                nodes.append(helper.make_node(step, inputs, [f"t{index + 1}"], name=f"n{index}",
                                              **({"to": TensorProto.FLOAT} if step == "Cast" else {})))
            node = helper.make_node(op_type, [f"t{len(steps)}", "w"], ["y"], name="layer")
            producers = {o: n for n in nodes + [node] for o in n.output}
            layer = Layer(name="layer", op_type=op_type, weight_name="w", input_name=node.input[0], probe_name="y",
                          weight_shape=weight_shape, out_axis=0 if op_type == "Conv" else 1, nodes=("layer",))
            assert layer.kind is kind_for(node)
            folded = folds_at_load(layer, INT8, [node], producers, constants)
            reached = chain not in ("times two", "relu")
            assert folded == (op_type == "LSTM" or not reached), (op_type, chain)
            assert not folds_at_load(layer, INT4, [node], producers, constants)


def test_a_weight_only_layer_between_static_layers_keeps_a_bias_ort_would_overflow(tmp_path):
    """A weight-only convolution between two static ones: ORT's optimizer puts its float bias on int32 (input scale
    x weight scale) and fuses the layer, which only rounds the bias, unless a near-dead channel's weight step
    overflows that int32: the channel's output was off by its whole bias (5 of a 5.3 output). Such a layer's input
    now has a per-channel DequantizeLinear of its own, and ORT runs it as written: integer weights, float bias."""
    for near_dead in (False, True):
        model = tiny_cnn()
        inits = {t.name: t for t in model.graph.initializer}
        weight, bias = numpy_helper.to_array(inits["w2"]).copy(), numpy_helper.to_array(inits["b2"]).copy()
        if near_dead:
            weight[0] *= 1e-9  # a depthwise channel whose bias carries it
            bias[0] = 5.0
        inits["w2"].CopyFrom(numpy_helper.from_array(weight, "w2"))
        inits["b2"].CopyFrom(numpy_helper.from_array(bias, "b2"))
        folder = tmp_path / str(near_dead)
        folder.mkdir()
        onnx.save(model, folder / "m.onnx")
        np.savez(folder / "calib.npz", **samples_for(model, 64, seed=1))
        loaded, path, modes = _written_at_8_bits(folder / "m.onnx", folder / "calib.npz", folder,
                                                 modes_of={"dw": "weight-only"})
        assert next(layer for layer in loaded.layers if layer.weight_name == "w2").name == "dw"
        counts = optimized_op_counts(path)
        # without the overflow ORT's fusion stays (the faster kernel, on an input quantized either way)
        assert counts.get("QLinearConv", 0) == (2 if near_dead else 3)
        x = np.load(folder / "calib.npz")["x"][:8]
        fp32 = ort.InferenceSession(str(folder / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        written = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert np.abs(written - fp32).max() < 0.1 * np.abs(fp32).max()


def test_float_input_channels_name_the_axis_ort_reads_per_channel():
    """The axis and size a float node's input DequantizeLinear repeats its scale along: Conv's channels are its
    weight's fan-in per group times the groups, ConvTranspose's its weight's first axis, Gemm's the K axis of A
    (axis 0 with transA), read from B by transB. A wrong size makes ORT refuse the model; a wrong axis too."""
    from msq_onnx.ops import kind_for

    def node(op, **attrs):
        return helper.make_node(op, ["x", "w"], ["y"], **attrs)

    assert kind_for(node("Conv")).float_input_channels(node("Conv"), (16, 3, 3, 3)) == (1, 3)
    assert kind_for(node("Conv")).float_input_channels(node("Conv", group=4), (16, 2, 3, 3)) == (1, 8)
    assert kind_for(node("ConvTranspose")).float_input_channels(node("ConvTranspose", group=2), (6, 4, 3, 3)) == (1, 6)
    for trans_a, trans_b, expected in ((0, 0, (1, 5)), (0, 1, (1, 7)), (1, 0, (0, 5)), (1, 1, (0, 7))):
        gemm = node("Gemm", transA=trans_a, transB=trans_b)
        assert kind_for(gemm).float_input_channels(gemm, (5, 7)) == expected
    assert kind_for(node("MatMul")).float_input_channels(node("MatMul"), (5, 7)) is None  # ORT leaves it float


def test_a_float_layer_behind_a_max_pool_is_shielded_where_orts_propagation_would_bring_the_dequantize(tmp_path):
    """ORT's QDQ propagation moves a DequantizeLinear past a MaxPool, so a float convolution reading
    DequantizeLinear -> MaxPool ends up reading the DequantizeLinear and was rounded per tensor all the same."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name)

    make = helper.make_node
    nodes = [make("Conv", ["x", "wa", "ba"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
             make("Relu", ["a"], ["ra"], name="relu_a"),
             make("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="pool"),
             make("Conv", ["p", "wb", "bb"], ["b"], pads=[1, 1, 1, 1], name="conv_b"),
             make("Relu", ["b"], ["rb"], name="relu_b"), make("Conv", ["rb", "wc", "bc"], ["c"], name="conv_c"),
             make("Relu", ["c"], ["rc"], name="relu_c"), make("Add", ["ra", "rc"], ["s"], name="add"),
             make("GlobalAveragePool", ["s"], ["g"], name="gap"), make("Flatten", ["g"], ["f"], name="flat"),
             make("Gemm", ["f", "wf"], ["y"], transB=1, name="fc")]
    inits = [init("wa", 8, 4, 3, 3), init("ba", 8), init("wb", 8, 4, 3, 3), init("bb", 8), init("wc", 8, 8, 1, 1),
             init("bc", 8), init("wf", 5, 8)]
    graph = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(32, 4, 8, 8)).astype(np.float32))
    _, path, _ = _written_at_8_bits(tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path, floats=("conv_b",),
                                    modes_of=dict.fromkeys(("conv_a", "conv_c", "fc"), "static"))
    counts = optimized_op_counts(path)
    assert counts.get("QLinearConv", 0) == 2 and counts.get("Conv", 0) + counts.get("FusedConv", 0) == 1


def test_prefer_speed_keeps_layers_on_their_integer_kernels_where_float_would_only_spend_spare_bits(tmp_path):
    """conv1's weights sit on the 2-bit grid (no error at 2 bits), which leaves the 4-bit budget room for one small
    layer in float: the knapsack took it (zero error), off its QLinear kernel (EfficientNet-Lite0 at 4 bits: two
    such layers, batch-1 latency 3.46 ms against ORT int8's 3.17 on an AVX512-VNNI machine). With --prefer speed a
    layer the modes put on an integer kernel keeps an integer width; --prefer size still weighs float by its bytes."""
    model = tiny_cnn(channels=16)
    weight = next(i for i in model.graph.initializer if i.name == "w1")
    rng = np.random.default_rng(3)
    weight.CopyFrom(numpy_helper.from_array((rng.integers(-1, 2, (8, 16, 3, 3)) * 0.2).astype(np.float32), "w1"))
    onnx.save(model, tmp_path / "cnn.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(64, 16, 8, 8)).astype(np.float32))
    reports = {prefer: convert(str(tmp_path / "cnn.onnx"), str(tmp_path / f"{prefer}.onnx"), str(tmp_path / "calib.npz"),
                               Options(quiet=True, bits=(2, 4), avg_bits=3.99, activations="static",
                                       prefer=prefer)).report for prefer in ("speed", "size")}
    speed = {layer["name"]: layer for layer in reports["speed"]["layers"]}
    assert speed["conv1"]["bits"] == 2 and all(layer["bits"] <= 4 and layer["mode"] == "static"
                                               for layer in speed.values())
    assert reports["speed"]["left_in_float"] == [] and reports["speed"]["fused_integer_kernels"] == 4
    assert [entry["node"] for entry in reports["size"]["left_in_float"]] == ["fc"]
    # A size bound that float does not help meet keeps it out too (any --max-size brought it back: a review's)
    loose = convert(str(tmp_path / "cnn.onnx"), str(tmp_path / "loose.onnx"), str(tmp_path / "calib.npz"),
                    Options(quiet=True, bits=(2, 4), avg_bits=3.99, activations="static", max_size=10 ** 7)).report
    assert loose["left_in_float"] == [] and loose["fused_integer_kernels"] == 4
    # A layer a uint16 input puts on a float kernel anyway (--act16) keeps float among its widths (a review's)
    wide = convert(str(tmp_path / "cnn.onnx"), str(tmp_path / "wide.onnx"), str(tmp_path / "calib.npz"),
                   Options(quiet=True, bits=(2, 4), avg_bits=3.99, activations="static", act16=2)).report
    assert [entry["node"] for entry in wide["left_in_float"]] == ["dw"]


@pytest.mark.parametrize("last", ["matmul", "identity", "gemm"])
@pytest.mark.usefixtures("tied_dense_timings")
def test_a_2_bit_matmul_reading_a_static_neighbours_output_is_written_in_int4(last, tmp_path):
    """MatMul -> Relu -> MatMul -> MatMul -> Relu -> MatMul at --prefer size: the last layer at 2 bits read the third
    one's quantized output, and ORT 1.31 fused that DequantizeLinear and the int2 weight into a MatMulIntegerToFloat,
    which takes no int2, then refused the model: an internal error (a review's). So did an Identity in between (ORT
    removes it before fusing) and a Gemm without a bias (written as a MatMul). Their 2-bit levels now go in int4."""
    rng = np.random.default_rng(0)
    weights = {"w1": (32, 128, 0.2), "w2": (128, 4, 0.2), "w3": (4, 128, 0.2), "w4": (128, 32, 0.1)}
    inits = [numpy_helper.from_array((rng.normal(size=shape[:2]) * shape[2]).astype(np.float32), name)
             for name, shape in weights.items()]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("MatMul", ["ar", "w2"], ["b"]), helper.make_node("MatMul", ["b", "w3"], ["c"]),
             helper.make_node("Relu", ["c"], ["cr"])]
    if last == "identity":
        nodes += [helper.make_node("Identity", ["cr"], ["ci"]), helper.make_node("MatMul", ["ci", "w4"], ["embedding"])]
    else:
        nodes.append(helper.make_node("Gemm" if last == "gemm" else "MatMul", ["cr", "w4"], ["embedding"]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "mlp.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(256, 32)).astype(np.float32))
    out = str(tmp_path / "q.onnx")
    report = convert(str(tmp_path / "mlp.onnx"), out, str(tmp_path / "calib.npz"),
                     Options(quiet=True, bits=(2, 8), avg_bits=4, prefer="size", bias_correction=last != "gemm")).report
    layers = {layer["name"]: layer for layer in report["layers"]}
    written = onnx.load(out)
    producers = {output: node for node in written.graph.node for output in node.output}
    types = {t.name: t.data_type for t in written.graph.initializer}
    moved = [name for name, layer in layers.items() if layer["bits"] == 2 and layer["container"] == "int4"]
    assert moved and all(layers[name]["mode"] == "weight-only" for name in moved)
    for node in written.graph.node:
        weight = producers.get(node.input[1]) if node.op_type in ("MatMul", "Gemm") else None
        if weight is not None and weight.op_type == "DequantizeLinear" and types.get(weight.input[0]) == TensorProto.INT2:
            source = producers.get(node.input[0])
            while source is not None and source.op_type == "Identity":
                source = producers.get(source.input[0])
            assert getattr(source, "op_type", None) != "DequantizeLinear"
    x = rng.normal(size=(4, 32)).astype(np.float32)
    reference = ort.InferenceSession(str(tmp_path / "mlp.onnx")).run(None, {"x": x})[0]
    written_output = ort.InferenceSession(out).run(None, {"x": x})[0]
    assert np.corrcoef(written_output.ravel(), reference.ravel())[0, 1] > 0.8 and report["evaluation"]["cosine"] > 0.8


def test_a_size_bound_still_offers_float_where_it_is_the_smallest_container(tmp_path):
    """A time-embedding MLP whose first layer reads one feature: its float weight (4 bytes a weight) is smaller
    than int8 (a byte a weight and a 4-byte scale per output channel). With float kept off static layers, --max-size
    0.35 said it could not be met (a review's); under a size bound float stays a width."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(1, 512)).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.normal(size=(512, 16)) * 0.05).astype(np.float32), "w2"),
             numpy_helper.from_array((rng.normal(size=(16, 10)) * 0.3).astype(np.float32), "w3")]
    nodes = [helper.make_node("MatMul", ["t", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["b"]), helper.make_node("Relu", ["b"], ["s"]),
             helper.make_node("MatMul", ["s", "w3"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    t = rng.uniform(0, 1, size=(300, 1)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", t=t[:200])
    np.savez(tmp_path / "eval.npz", t=t[200:])
    out = tmp_path / "q.onnx"
    report = convert(str(tmp_path / "m.onnx"), str(out), str(tmp_path / "calib.npz"),
                     Options(quiet=True, eval_path=str(tmp_path / "eval.npz"), activations="static",
                             max_size=0.35)).report
    assert os.path.getsize(out) <= 0.35 * os.path.getsize(tmp_path / "m.onnx")
    assert [entry["node"] for entry in report["left_in_float"]] == ["MatMul_0"]


@pytest.mark.parametrize("extra,fits", [({"max_latency": 10.0}, False), ({}, False), ({}, True),
                                        ({"max_drop": 50.0, "avg_bits": None}, False)])
def test_the_yardstick_is_written_before_any_candidate_or_latency_timing(cnn_files, tmp_path, monkeypatch, extra,
                                                                        fits):
    """The yardstick's writing (ORT's quantizer, mostly Python) is waited for before the memory read that decides
    the reference's place, before --max-latency times anything beside it, and before the first write; its timed
    session is built beside that write only where one candidate is written and timed and the FP32 reference does
    not run there (fits), and dropped, with the held-out sessions kept for the timing, before the output is
    published."""
    import gc
    import threading
    import weakref

    from msq_onnx import fidelity, pipeline, verify

    written, prepared, sessions, at_publish = threading.Event(), [], [], []
    real_yardstick, real_prepared, real_session = pipeline._yardstick, verify.Yardstick.prepared, fidelity.session
    real_publish = pipeline.publish

    def slow_yardstick(*args):
        time.sleep(0.3)
        result = real_yardstick(*args)
        written.set()
        return result

    def checked(name, real):
        def wrapper(*args, **kwargs):
            assert written.is_set(), f"{name} while the yardstick was being written"
            return real(*args, **kwargs)
        return wrapper

    def measuring(*args, **kwargs):
        made = real_session(*args, **kwargs)
        sessions.append(weakref.ref(made))
        return made

    def publishing(*args, **kwargs):
        gc.collect()
        at_publish.append([ref for ref in sessions if ref() is not None])
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_yardstick", slow_yardstick)
    monkeypatch.setattr(pipeline, "_fits_beside_the_write", checked("the memory read", lambda loaded: fits))
    monkeypatch.setattr(pipeline, "latency_budget", checked("the latency budget", pipeline.latency_budget))
    monkeypatch.setattr(pipeline, "quantize_weights", checked("a write", pipeline.quantize_weights))
    monkeypatch.setattr(verify.Yardstick, "prepared", lambda self: prepared.append(1) or real_prepared(self))
    monkeypatch.setattr(fidelity, "session", measuring)
    monkeypatch.setattr(pipeline, "publish", publishing)
    options = {"quiet": True, "avg_bits": 4, **extra}
    report = convert(cnn_files["model"], str(tmp_path / "q.onnx"), cnn_files["calib"], Options(**options)).report
    assert report["latency_ms"]["ort_static_int8"] > 0
    assert prepared == ([1] if not extra and not fits else [])
    assert at_publish == [[]]  # every held-out session gone


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_a_yardstick_large_beside_the_peak_is_written_alone_and_timed_without_a_prepared_session(
        cnn_files, tmp_path, monkeypatch, share):
    """ORT's quantizer's copies of a model whose dense weights are large against the peak so far (BERT-base) are
    not stacked on the error tables' working copies, nor is its timed session built beside the first write: the
    yardstick is written alone before the tables and its session built for the timing. A small one goes beside."""
    import threading

    from msq_onnx import pipeline, verify

    written, prepared, beside = threading.Event(), [], []
    real_yardstick, real_tables, real_prepared = pipeline._yardstick, pipeline._error_tables, verify.Yardstick.prepared

    def slow_yardstick(*args):
        time.sleep(0.3)
        result = real_yardstick(*args)
        written.set()
        return result

    monkeypatch.setattr(pipeline, "_yardstick", slow_yardstick)
    monkeypatch.setattr(pipeline, "_error_tables", lambda *a, **k: beside.append(not written.is_set()) or real_tables(
        *a, **k))
    monkeypatch.setattr(pipeline, "YARDSTICK_BESIDE_THE_TABLES", share)
    monkeypatch.setattr(pipeline, "YARDSTICK_BESIDE_THE_WRITE", share)
    monkeypatch.setattr(pipeline, "_fits_beside_the_write", lambda loaded: False)
    monkeypatch.setattr(verify.Yardstick, "prepared", lambda self: prepared.append(1) or real_prepared(self))
    report = convert(cnn_files["model"], str(tmp_path / "q.onnx"), cnn_files["calib"],
                     Options(quiet=True, avg_bits=4)).report
    assert report["latency_ms"]["ort_static_int8"] > 0
    assert beside == [share > 0] and prepared == ([1] if share > 0 else [])


def test_ort_logging_stays_quiet_while_any_thread_is_inside_and_is_restored_after():
    """The yardstick's thread and a write run ORT's quantizer at once: the first to leave the quiet block must not
    let the other's warnings through, and the last must put the root logger's level back."""
    import logging
    import threading

    from msq_onnx.write import _quiet_ort_logging

    root = logging.getLogger()
    before = root.level
    entered, leave, left = threading.Event(), threading.Event(), threading.Event()

    def first():  # in first, out first
        with _quiet_ort_logging():
            entered.set()
            assert leave.wait(5)
        left.set()

    thread = threading.Thread(target=first)
    thread.start()
    assert entered.wait(5)
    with _quiet_ort_logging():
        leave.set()
        assert left.wait(5)
        assert root.level == logging.ERROR  # still quiet: this thread is inside
    thread.join()
    assert root.level == before


def test_a_single_candidate_is_written_from_its_own_widths_alone(cnn_files, tmp_path, monkeypatch):
    """Where one candidate is written (no gate's search, no size or latency budget), the other widths' tables,
    GPTQ integers and all, are let go before its write (--on-collapse warn), or their integers set aside on disk,
    memory-mapped, for a reallocation after a collapse (the default); a gate's search keeps every width for the
    candidates it writes. The written model is the same every way."""
    from msq_onnx import pipeline

    tables, mapped = [], []
    real = pipeline.quantize_weights

    def spy(loaded, bits, choices, *args, **kwargs):
        tables.append({name: sorted(table) for name, table in choices.items()})
        mapped.append({(name, width): isinstance(choice.integers, np.memmap) for name, table in choices.items()
                       for width, choice in table.items() if choice.integers is not None})
        return real(loaded, bits, choices, *args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_weights", spy)
    options = dict(quiet=True, avg_bits=5, bits=(2, 4, 8))
    single = convert(cnn_files["model"], str(tmp_path / "a.onnx"), cnn_files["calib"],
                     Options(on_collapse="warn", **options)).report
    assert len(tables) == 1
    assert tables[0] == {layer["name"]: [layer["bits"]] if layer["bits"] != 32 else [] for layer in single["layers"]}
    convert(cnn_files["model"], str(tmp_path / "aside.onnx"), cnn_files["calib"], Options(**options))
    allocated = {(layer["name"], layer["bits"]) for layer in single["layers"]}
    assert len(tables[1]["fc"]) == 3 and mapped[1]
    assert all(aside == (key not in allocated) for key, aside in mapped[1].items())
    monkeypatch.setattr(pipeline, "_release_other_widths", lambda choices, bits: None)
    convert(cnn_files["model"], str(tmp_path / "kept.onnx"), cnn_files["calib"], Options(on_collapse="warn", **options))
    assert len(tables[2]["fc"]) == 3
    for other in ("kept.onnx", "aside.onnx"):
        with open(tmp_path / "a.onnx", "rb") as one, open(tmp_path / other, "rb") as written:
            assert one.read() == written.read()
    tables.clear()
    searched = convert(cnn_files["model"], str(tmp_path / "b.onnx"), cnn_files["calib"],
                       Options(quiet=True, max_drop=50.0, bits=(2, 4, 8))).report
    assert tables and all(widths == [2, 4, 8] for table in tables for widths in table.values())
    assert searched["layers"]


def test_a_static_layer_without_its_inputs_range_is_never_written_behind_the_reports_back(cnn_files, tmp_path):
    """The pass measures ranges only for the layers that may end static: a caller writing another layer static
    (a study, a test) gets an error naming it, not a model ORT's quantizer leaves partly float."""
    from msq_onnx.pipeline import _Timer, analyse
    from msq_onnx.write import quantize_to_qdq, quantize_weights

    loaded = load_model(cnn_files["model"])
    calib = open_samples(cnn_files["calib"], loaded.inputs, Preprocess())
    analysis = analyse(loaded, calib, Options(bits=(8,), quiet=True, activations="dynamic"), _Timer())
    assert not analysis.stats.ranges
    bits = {layer.name: 8 for layer in loaded.layers}
    with pytest.raises(RuntimeError, match="no calibrated range for the input of static layer"):
        quantize_to_qdq(loaded, quantize_weights(loaded, bits, analysis.choices, analysis.stats.input_mean),
                        analysis.stats.ranges, str(tmp_path))

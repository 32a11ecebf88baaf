"""Models whose inputs take no samples along their first axis: a scalar sample rate, an RNN state with its batch
axis second, an input fixed at [2, 1, H] (silero-vad's exports). Their samples come whole, the model runs one
sample at a time, and the written model takes and gives what the input model did."""

import json

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from msq_onnx import convert, fidelity, sample_axes
from msq_onnx.data import Preprocess, open_samples, split_holdout
from msq_onnx.cli import main
from msq_onnx.load import all_names, load_model
from msq_onnx.pipeline import Options
from msq_onnx.report import SCHEMA_PATH

HIDDEN = 8


def _stateful(tmp_path, fixed: bool = False) -> str:
    """x [batch, 16], state [2, batch, 8] and a scalar int64 sample rate -> out [batch, 4] and the next state:
    a recurrent cell in the layout silero-vad's exports have; fixed: x [1, 16], state [2, 1, 8], no rate (its
    OpenVINO export)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (16, HIDDEN)).astype(np.float32), "w_in"),
             numpy_helper.from_array(rng.normal(0, 0.4, (HIDDEN, HIDDEN)).astype(np.float32), "w_state"),
             numpy_helper.from_array(rng.normal(0, 0.4, (HIDDEN, 4)).astype(np.float32), "w_out"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(np.float32(1 / 16000), "per_rate")]
    batch = 1 if fixed else "batch"
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["from_x"]),
             helper.make_node("Gather", ["state", "zero"], ["h"], axis=0),
             helper.make_node("MatMul", ["h", "w_state"], ["from_h"]),
             helper.make_node("Add", ["from_x", "from_h"], ["pre"]),
             helper.make_node("Tanh", ["pre"], ["h_next"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, batch, HIDDEN])]
    if fixed:
        nodes.append(helper.make_node("Identity", ["h_next"], ["scaled"]))
    else:  # the rate scales the cell's output, as a sample-rate branch would
        nodes += [helper.make_node("Cast", ["sr"], ["sr_float"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["sr_float", "per_rate"], ["rate"]),
                  helper.make_node("Mul", ["h_next", "rate"], ["scaled"])]
        inputs.append(helper.make_tensor_value_info("sr", TensorProto.INT64, []))
    nodes += [helper.make_node("MatMul", ["scaled", "w_out"], ["out"]),
              helper.make_node("Unsqueeze", ["h_next", "axis0"], ["h_layer"]),
              helper.make_node("Concat", ["h_layer", "h_layer"], ["state_next"], axis=0)]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 4]),
               helper.make_tensor_value_info("state_next", TensorProto.FLOAT, [2, batch, HIDDEN])]
    model = helper.make_model(helper.make_graph(nodes, "cell", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = str(tmp_path / ("fixed.onnx" if fixed else "cell.onnx"))
    onnx.save(model, path)
    return path


def _streamed(path: str, count: int, seed: int, rate: bool = True) -> dict:
    """Whole samples: each run's x, the state the model carried to it from the runs before, the rate."""
    session, rng = ort.InferenceSession(path), np.random.default_rng(seed)
    xs = rng.normal(size=(count, 1, 16)).astype(np.float32)
    state, states = np.zeros((2, 1, HIDDEN), np.float32), []
    for x in xs:
        states.append(state)
        feed = {"x": x, "state": state, **({"sr": np.array(16000, np.int64)} if rate else {})}
        state = session.run(None, feed)[1]
    samples = {"x": xs[:, 0], "state": np.stack(states)}
    if rate:
        samples["sr"] = np.full(count, 16000, np.int64)
    return samples


def _signature(model: onnx.ModelProto) -> list:
    return [(v.name, v.type.SerializeToString()) for v in list(model.graph.input) + list(model.graph.output)]


def test_add_then_strip_gives_the_model_back(tmp_path):
    path = _stateful(tmp_path)
    model = onnx.load(path)
    axed = onnx.load(path)
    record = sample_axes.add(axed, {"state", "sr"}, all_names(axed.graph))
    dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in list(axed.graph.input) + list(axed.graph.output)}
    # the outputs whose first axis is not the batch x has first get one; 'out' keeps its own
    assert dims == {"x": ["batch", 16], "state": [1, 2, "batch", HIDDEN], "sr": [1], "out": ["batch", 4],
                    "state_next": [1, 2, "batch", HIDDEN]}
    onnx.checker.check_model(axed, full_check=True)
    feed = {"x": np.ones((1, 16), np.float32), "state": np.full((2, 1, HIDDEN), 0.1, np.float32),
            "sr": np.array(8000, np.int64)}
    want = ort.InferenceSession(path).run(None, feed)
    got = ort.InferenceSession(axed.SerializeToString()).run(
        None, {"x": feed["x"], "state": feed["state"][None], "sr": feed["sr"][None]})
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1][None])
    sample_axes.strip(axed, record)
    assert _signature(axed) == _signature(model)
    assert not [n.name for n in axed.graph.node if n.name.startswith(("msq_sample_axis", ))]
    assert [t.name for t in axed.graph.initializer] == [t.name for t in model.graph.initializer]
    onnx.checker.check_model(axed, full_check=True)
    assert all(np.array_equal(a, b) for a, b in zip(ort.InferenceSession(axed.SerializeToString()).run(None, feed),
                                                    want))


@pytest.mark.parametrize("fixed", [False, True])
def test_a_stateful_model_converts_on_whole_samples(tmp_path, fixed):
    path = _stateful(tmp_path, fixed)
    np.savez(tmp_path / "calib.npz", **_streamed(path, 48, 0, rate=not fixed))
    held_out = _streamed(path, 16, 1, rate=not fixed)
    np.savez(tmp_path / "eval.npz", **held_out)
    written, report = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main([path, str(written), "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"),
                 "--avg-bits", "8", "--report", str(report), "--quiet"]) == 0
    model = onnx.load(written)
    assert _signature(model) == _signature(onnx.load(path))  # as the input model declared them
    assert not [n.name for n in model.graph.node if n.name.startswith("msq_sample_axis")]
    assert {n.op_type for n in model.graph.node} & {"DequantizeLinear", "MatMulNBits", "DynamicQuantizeLinear"}
    session, reference = ort.InferenceSession(str(written)), ort.InferenceSession(path)
    got, want = [], []
    for index in range(16):  # the written model on the inputs as the input model takes them
        feed = {"x": held_out["x"][index:index + 1], "state": held_out["state"][index]}
        if not fixed:
            feed["sr"] = np.asarray(held_out["sr"][index])
        got.append(session.run(None, feed)[0])
        want.append(reference.run(None, feed)[0])
    got, want = np.concatenate(got).ravel(), np.concatenate(want).ravel()
    cosine = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
    written_report = json.loads(report.read_text())
    assert written_report["calibration"]["inputs_given_whole"] == (["state"] if fixed else ["state", "sr"])
    evaluation = written_report["evaluation"]
    assert evaluation["samples"] == 16 and cosine > 0.99
    assert evaluation["outputs"]["out"]["cosine"] == pytest.approx(cosine, abs=2e-3)  # what was measured is written
    assert evaluation["outputs"]["state_next"]["cosine"] > 0.99


def test_a_reader_feeds_whole_runs_as_the_model_takes_them(tmp_path):
    """An onnxruntime CalibrationDataReader gives each run's feed as the model takes it: the scalar as a scalar."""
    path = _stateful(tmp_path)
    samples = _streamed(path, 24, 0)

    class Reader:
        def __init__(self):
            self.runs = iter(range(24))

        def get_next(self):
            index = next(self.runs, None)
            return None if index is None else {"x": samples["x"][index:index + 1], "state": samples["state"][index],
                                               "sr": samples["sr"][index]}

    written = tmp_path / "q.onnx"
    result = convert(path, str(written), Reader(), Options(avg_bits=8, quiet=True))
    assert _signature(onnx.load(written)) == _signature(onnx.load(path))
    assert result.report["evaluation"]["outputs"]["out"]["cosine"] > 0.99


def test_a_state_given_along_its_batch_axis_is_refused_in_one_line(tmp_path, capsys):
    path = _stateful(tmp_path)
    samples = _streamed(path, 16, 0)
    samples["state"] = samples["state"][:, :, 0].transpose(1, 0, 2)  # [2, N, 8]: the samples on the batch axis
    np.savez(tmp_path / "calib.npz", **samples)
    assert main([path, str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npz"), "--avg-bits", "8"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "input 'state' has shape [2, 16, 8]; it has its batch axis 'batch' at position 1" \
        in error[0] and "give an array [N, 2, 1, 8]" in error[0]
    assert not (tmp_path / "q.onnx").exists()


def test_files_that_give_an_input_two_ways_are_refused(tmp_path, capsys):
    path = _stateful(tmp_path, fixed=True)
    (tmp_path / "calib").mkdir()
    samples = _streamed(path, 16, 0, rate=False)
    np.savez(tmp_path / "calib" / "a.npz", **samples)
    # state [2, 1, 8] fixed: [N, 2, 1, 8] gives it whole, [2, 1, 8] as two samples of [1, 8]... along axis 0
    np.savez(tmp_path / "calib" / "b.npz", x=samples["x"][:2], state=samples["state"][0])
    assert main([path, str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib"), "--avg-bits", "8"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "input 'state' is given whole" in error[0]


def test_a_model_fed_along_axis_0_is_read_without_sample_axes(tmp_path):
    loaded = load_model(_stateful(tmp_path))
    assert loaded.sample_axes == {} and [spec.unbatched for spec in loaded.inputs] == [
        "", "has its batch axis 'batch' at position 1, not first", "is a scalar (rank 0)"]


def _errors(capsys) -> list:
    return capsys.readouterr().err.strip().splitlines()


def _two_inputs(tmp_path, second) -> str:
    """x [batch, 16] -> MatMul, and a second input multiplied in: `second` is its value info."""
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.4, (16, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y0"]),
             helper.make_node("Cast", [second.name], ["g"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["g"], ["gm"], keepdims=0),
             helper.make_node("Mul", ["y0", "gm"], ["y"])]
    batch = "batch" if second.name != "g_fixed" else 4
    model = helper.make_model(helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16]), second],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], [weight]),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = str(tmp_path / "two.onnx")
    onnx.save(model, path)
    return path


def test_a_1d_input_on_the_batch_axis_is_not_read_whole(tmp_path, capsys):
    """s [batch] beside x [batch, 16]: [N, 5] is the samples' mistake, not five values a run (a review's)."""
    path = _two_inputs(tmp_path, helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch"]))
    x = np.random.default_rng(0).normal(size=(24, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x, s=np.ones((24, 5), np.float32))
    assert main([path, str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npz"), "--avg-bits", "8"]) == 2
    error = _errors(capsys)
    assert len(error) == 1 and "input 's' has shape [24, 5], the model takes ['N']; reshape the samples" in error[0]


def test_a_batch_axis_inside_a_whole_input_must_hold_one_sample(tmp_path, capsys):
    path = _stateful(tmp_path)
    samples = _streamed(path, 16, 0)
    samples["state"] = np.concatenate([samples["state"]] * 2, axis=2)  # [N, 2, 2, 8]: two samples a run
    np.savez(tmp_path / "calib.npz", **samples)
    assert main([path, str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npz"), "--avg-bits", "8"]) == 2
    error = _errors(capsys)
    assert len(error) == 1 and "input 'state' has shape [16, 2, 2, 8]: 2 on its axis 1, the batch the other " \
        "inputs have first" in error[0] and "give an array [N, 2, 1, 8]" in error[0]


def test_a_fixed_batch_beside_a_whole_input_is_refused_in_one_line(tmp_path, capsys):
    path = _two_inputs(tmp_path, helper.make_tensor_value_info("g_fixed", TensorProto.FLOAT, []))
    x = np.random.default_rng(0).normal(size=(48, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x, g_fixed=np.ones(48, np.float32))
    assert main([path, str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npz"), "--avg-bits", "8"]) == 2
    error = _errors(capsys)
    assert len(error) == 1 and "input 'x' takes a fixed batch of 4, while 'g_fixed' is given whole, one run a " \
        "sample: give 'x' whole too, an array [N, 4, 16]" in error[0]
    np.savez(tmp_path / "calib.npz", x=x.reshape(12, 4, 16), g_fixed=np.ones(12, np.float32))  # so it converts
    assert main([path, str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npz"), "--avg-bits", "8",
                 "--quiet"]) == 0
    assert _signature(onnx.load(tmp_path / "q.onnx")) == _signature(onnx.load(path))


def test_a_reader_of_a_fixed_state_beside_a_batch_of_one(tmp_path):
    """The OpenVINO export's layout, [1, 16] and [2, 1, 8], fed by a reader: the state is one run's, not two
    samples of [1, 8]."""
    path = _stateful(tmp_path, fixed=True)
    samples = _streamed(path, 24, 0, rate=False)

    class Reader:
        def __init__(self):
            self.runs = iter(range(24))

        def get_next(self):
            index = next(self.runs, None)
            return None if index is None else {"x": samples["x"][index:index + 1], "state": samples["state"][index]}

    written = tmp_path / "q.onnx"
    result = convert(path, str(written), Reader(), Options(avg_bits=8, quiet=True))
    assert _signature(onnx.load(written)) == _signature(onnx.load(path))
    assert result.report["evaluation"]["outputs"]["out"]["cosine"] > 0.99


def test_evaluation_data_given_another_way_is_refused_in_one_line(tmp_path, capsys):
    """A fixed batch of 4 fed along its first axis for calibration, whole ([N, 4, 16]) for evaluation (a review's:
    ORT's "Invalid rank for input" came out)."""
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.4, (16, 4)).astype(np.float32), "w")
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [weight]),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = str(tmp_path / "fixed.onnx")
    onnx.save(model, path)
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:48])
    np.savez(tmp_path / "eval.npz", x=x[48:].reshape(4, 4, 16))
    assert main([path, str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npz"), "--eval",
                 str(tmp_path / "eval.npz"), "--avg-bits", "8"]) == 2
    error = _errors(capsys)
    assert len(error) == 1 and "evaluation data gives input 'x' whole, [N, *its shape], and the calibration data " \
        "along its first axis" in error[0]


def test_max_size_holds_the_model_as_published(tmp_path):
    """--max-size reads the bytes publish writes, without the nodes that gave the sample axes (a review's: the
    bytes of the Squeeze, the Unsqueeze and their axes were counted)."""
    path = _stateful(tmp_path)
    np.savez(tmp_path / "calib.npz", **_streamed(path, 32, 0))
    assert main([path, str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npz"), "--avg-bits", "2",
                 "--prefer", "size", "--quiet"]) == 0
    published = (tmp_path / "q.onnx").stat().st_size
    assert main([path, str(tmp_path / "q2.onnx"), "--calib", str(tmp_path / "calib.npz"), "--max-size",
                 str(published + 8), "--prefer", "size", "--quiet"]) == 0
    assert (tmp_path / "q2.onnx").stat().st_size <= published + 8


def test_strip_leaves_no_shape_of_a_name_gone(tmp_path):
    """A model's own tensor named like the one add makes: add takes another name, strip drops only what is gone."""
    model = onnx.load(_stateful(tmp_path))
    model.graph.node[0].output[0] = "sr_unbatched"  # the MatMul's result, read by the Add
    model.graph.node[3].input[0] = "sr_unbatched"
    model.graph.value_info.append(helper.make_tensor_value_info("sr_unbatched", TensorProto.FLOAT, ["batch", 8]))
    record = sample_axes.add(model, {"sr", "state"}, all_names(model.graph))
    sample_axes.strip(model, record)
    made = {name for node in model.graph.node for name in node.output}
    assert {v.name for v in model.graph.value_info} == {"sr_unbatched"} <= made


def test_samples_along_an_axis_that_is_no_batch_are_refused_in_one_line(tmp_path, capsys):
    """A model of one image [3, H, W] given [N, 3, W] is read as a fixed batch of 3 whose layers see one
    sample: said in a line, not an IndexError from the predictors (a review's)."""
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Unsqueeze", ["image", "axis0"], ["x"]),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["out"])]
    model = helper.make_model(helper.make_graph(
        nodes, "image", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [3, "h", "w"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])],
        [weight, numpy_helper.from_array(np.array([0], np.int64), "axis0")]),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = str(tmp_path / "image.onnx")
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", image=np.random.default_rng(0).normal(size=(18, 3, 12)).astype(np.float32))
    assert main([path, str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npz"), "--avg-bits", "8"]) == 2
    error = _errors(capsys)
    assert len(error) == 1 and "row(s) in a run of 3 samples" in error[0] and "--batch-size 1" not in error[0] and "'image' [N, 3, ?, ?]" in error[0]


def test_a_time_major_layer_at_a_larger_batch_is_refused_in_one_line(tmp_path, capsys):
    """A product on [T, N, E] (torch's MultiheadAttention with batch_first=False) gives T rows a run, not N: an
    IndexError from the predictors at --batch-size 8 before (a review's); --batch-size 1 converts it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 8)).astype(np.float32), name) for name in ("w", "w2")]
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
             helper.make_node("MatMul", ["t", "w"], ["p"]), helper.make_node("Relu", ["p"], ["r"]),
             helper.make_node("Transpose", ["r"], ["b"], perm=[1, 0, 2]),
             helper.make_node("MatMul", ["b", "w2"], ["q"]),
             helper.make_node("ReduceMean", ["q"], ["y"], axes=[1], keepdims=0)]
    model = helper.make_model(helper.make_graph(
        nodes, "time_major", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits),
        opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = str(tmp_path / "time_major.onnx")
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(32, 4, 8)).astype(np.float32))
    args = [path, str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npz"), "--avg-bits", "8"]
    assert main(args + ["--batch-size", "8"]) == 2
    error = _errors(capsys)
    assert len(error) == 1 and "has 4 row(s) in a run of 8 samples" in error[0] and "--batch-size 1" in error[0]
    assert main(args + ["--batch-size", "1", "--quiet"]) == 0


def test_a_reader_feeds_a_waveform_and_its_rate_as_the_model_takes_them(tmp_path):
    """A 1-D waveform ['T'] and a scalar rate: each feed one run's [T] and []."""
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (4, 1, 9)).astype(np.float32), "w")
    nodes = [helper.make_node("Unsqueeze", ["wave", "axes01"], ["x"]),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[4, 4]),
             helper.make_node("Cast", ["sr"], ["rate"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["rate", "per_rate"], ["gain"]),
             helper.make_node("Mul", ["c", "gain"], ["scaled"]),
             helper.make_node("ReduceMean", ["scaled"], ["y"], axes=[2], keepdims=0)]
    model = helper.make_model(helper.make_graph(
        nodes, "wave", [helper.make_tensor_value_info("wave", TensorProto.FLOAT, ["T"]),
                        helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight, numpy_helper.from_array(np.array([0, 1], np.int64), "axes01"),
         numpy_helper.from_array(np.float32(1 / 16000), "per_rate")]), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = str(tmp_path / "wave.onnx")
    onnx.save(model, path)
    waves = np.random.default_rng(1).normal(size=(24, 64)).astype(np.float32)

    class Reader:
        def __init__(self):
            self.runs = iter(waves)

        def get_next(self):
            wave = next(self.runs, None)
            return None if wave is None else {"wave": wave, "sr": np.array(16000, np.int64)}

    result = convert(path, str(tmp_path / "q.onnx"), Reader(), Options(avg_bits=8, quiet=True))
    assert result.report["calibration"]["inputs_given_whole"] == ["wave", "sr"]
    assert _signature(onnx.load(tmp_path / "q.onnx")) == _signature(model)


def _per_sample_cosine(got: np.ndarray, want: np.ndarray) -> float:
    got, want = got.reshape(len(got), -1), want.reshape(len(want), -1)
    return float(np.mean(np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)))


def test_the_held_out_check_feeds_the_written_model_its_own_state(tmp_path):
    """Samples recorded by streaming FP32 carry FP32's state: sample k's is FP32's output of sample k - 1. The check
    finds that in the samples and feeds the written model its own state there, as it runs deployed; fed FP32's,
    an error that grows as the state is carried over goes unseen (silero-vad at 3 bits: 98.7% of decisions kept
    teacher-forced, 83.9% streamed). Two clips: the second starts from a zero state, as recorded."""
    path = _stateful(tmp_path)
    np.savez(tmp_path / "calib.npz", **_streamed(path, 48, 0))
    first, second = _streamed(path, 12, 1), _streamed(path, 9, 2)
    held_out = {name: np.concatenate([first[name], second[name]]) for name in first}
    np.savez(tmp_path / "eval.npz", **held_out)
    written, report = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main([path, str(written), "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"),
                 "--avg-bits", "2", "--report", str(report), "--quiet"]) in (0, 3)
    session, reference = ort.InferenceSession(str(written)), ort.InferenceSession(path)
    want, streamed, forced, state = [], [], [], None
    for index in range(21):
        feed = {"x": held_out["x"][index:index + 1], "state": held_out["state"][index],
                "sr": np.asarray(held_out["sr"][index])}
        want.append(reference.run(None, feed)[0])
        forced.append(session.run(None, feed)[0])
        if index not in (0, 12):  # a clip's first sample starts from the state given
            feed["state"] = state
        out, state = session.run(None, feed)
        streamed.append(out)
    want, streamed, forced = map(np.concatenate, (want, streamed, forced))
    written_report = json.loads(report.read_text())
    jsonschema.validate(written_report, json.load(open(SCHEMA_PATH)))
    evaluation = written_report["evaluation"]
    assert evaluation["streamed"] == {"states": {"state": "state_next"}, "samples_fed_back": 19, "chains": 2}
    assert abs(_per_sample_cosine(streamed, want) - _per_sample_cosine(forced, want)) > 1e-3  # the test tells them apart
    assert evaluation["outputs"]["out"]["cosine"] == pytest.approx(_per_sample_cosine(streamed, want), abs=1e-5)


def _batch_first_cell(tmp_path, twin: bool = False) -> str:
    """x [N, 16] and a state h [N, 8], both along the batch axis -> out [N, 4] and the next state [N, 8]; twin:
    the next state given first as `hidden` too (a one-step GRU's Y beside its Y_h)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name)
             for name, shape in (("w_in", (16, HIDDEN)), ("w_state", (HIDDEN, HIDDEN)), ("w_out", (HIDDEN, 4)))]
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["from_x"]),
             helper.make_node("MatMul", ["h", "w_state"], ["from_h"]),
             helper.make_node("Add", ["from_x", "from_h"], ["pre"]),
             helper.make_node("Tanh", ["pre"], ["h_next"]),
             helper.make_node("MatMul", ["h_next", "w_out"], ["out"])]
    value = lambda name, width: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width])  # noqa: E731
    outputs = [value("out", 4), value("h_next", HIDDEN)]
    if twin:
        nodes.append(helper.make_node("Identity", ["h_next"], ["hidden"]))
        outputs.insert(0, value("hidden", HIDDEN))
    model = helper.make_model(helper.make_graph(nodes, "cell", [value("x", 16), value("h", HIDDEN)], outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = str(tmp_path / "batch_first.onnx")
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("batch", [8, 1])
def test_a_state_in_runs_of_several_samples_is_said_and_streamed_at_batch_1(tmp_path, capsys, batch):
    """A state along the batch axis: runs of 8 samples hold a sample beside the one it continues, so the check
    feeds the states as recorded and says so; at --batch-size 1 it feeds the written model's own."""
    path = _batch_first_cell(tmp_path)
    session = ort.InferenceSession(path)
    for name, count, seed in (("calib", 64, 0), ("eval", 48, 1)):
        xs = np.random.default_rng(seed).normal(size=(count, 16)).astype(np.float32)
        h, states = np.zeros((1, HIDDEN), np.float32), []
        for x in xs:
            states.append(h[0])
            h = session.run(None, {"x": x[None], "h": h})[1]
        np.savez(tmp_path / f"{name}.npz", x=xs, h=np.stack(states))
    report = tmp_path / "r.json"
    assert main([path, str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npz"), "--eval",
                 str(tmp_path / "eval.npz"), "--avg-bits", "4", "--report", str(report), "--quiet", "--batch-size", str(batch)]) in (0, 3)
    written = json.loads(report.read_text())
    jsonschema.validate(written, json.load(open(SCHEMA_PATH)))
    said = [w for w in written["warnings"] if "carry a state" in w]
    if batch == 1:
        assert written["evaluation"]["streamed"]["states"] == {"h": "h_next"} and not said
    else:
        assert written["evaluation"]["states_fed_as_given"] == {"h": "h_next"}
        assert "streamed" not in written["evaluation"] and len(said) == 1 and "--batch-size 1" in said[0]
        assert "carry a state" in capsys.readouterr().err


def test_without_eval_the_samples_that_carry_a_state_are_held_out_in_one_stretch(tmp_path):
    """Without --eval, every 5th sample is held out: of a stream, none would continue the one before it. Where the
    first samples carry a state (FP32 run on them), the last fifth is held out instead, and checked streamed."""
    path = _stateful(tmp_path)
    np.savez(tmp_path / "calib.npz", **_streamed(path, 48, 0))
    result = convert(path, str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"), Options(avg_bits=4, quiet=True))
    evaluation = result.report["evaluation"]
    assert evaluation["samples"] == 9  # 48 // 5, the last ones
    assert evaluation["streamed"] == {"states": {"state": "state_next"}, "samples_fed_back": 8, "chains": 1}


def test_samples_that_carry_no_state_are_held_out_one_in_five(tmp_path):
    """The same model on states drawn apart from the runs before: no link is found, and every 5th sample is held
    out, as of any model."""
    path = _stateful(tmp_path)
    streamed = _streamed(path, 48, 0)
    drawn = dict(streamed, state=np.random.default_rng(3).normal(0, 0.5, streamed["state"].shape).astype(np.float32))
    for name, samples in (("streamed", streamed), ("drawn", drawn)):
        np.savez(tmp_path / f"{name}.npz", **samples)
    loaded = load_model(path)
    found = {}
    for name in ("streamed", "drawn"):
        given = open_samples(str(tmp_path / f"{name}.npz"), loaded.inputs, Preprocess(), "calibration")
        axed = load_model(path, None, given.whole)
        given.respec(axed.inputs)
        found[name] = fidelity.carries_state(axed.model_file(), axed, given)
        _, held = split_holdout(given, 0.2, found[name])
        assert held.mask.sum() == 9
        assert held.mask[-9:].all() if found[name] else held.mask[4::5].all()
    assert found == {"streamed": True, "drawn": False}
    result = convert(path, str(tmp_path / "q.onnx"), str(tmp_path / "drawn.npz"), Options(avg_bits=4, quiet=True))
    assert "streamed" not in result.report["evaluation"] and "states_fed_as_given" not in result.report["evaluation"]


def _recorded(path: str, count: int, seed: int) -> dict:
    """x and the state h FP32 carries to each run, one run a sample, along the batch axis."""
    session, h, states = ort.InferenceSession(path), np.zeros((1, HIDDEN), np.float32), []
    xs = np.random.default_rng(seed).normal(size=(count, 16)).astype(np.float32)
    for x in xs:
        states.append(h[0])
        h = session.run(["h_next"], {"x": x[None], "h": h})[0]
    return {"x": xs, "h": np.stack(states)}


def test_a_state_two_outputs_hold_is_fed_back_from_one(tmp_path):
    """An LSTM's Y of one step and its Y_h hold the same values: the state matches both. It was taken as two links
    for one input, no sample continued 'all' of them, and the check fed nothing back while the report said
    streamed (a review's: cosine 0.978 reported, 0.971 streamed)."""
    path = _batch_first_cell(tmp_path, twin=True)
    np.savez(tmp_path / "calib.npz", **_recorded(path, 64, 0))
    held_out = _recorded(path, 40, 1)
    np.savez(tmp_path / "eval.npz", **held_out)
    result = convert(path, str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"),
                     Options(avg_bits=2, eval_path=str(tmp_path / "eval.npz"), quiet=True))
    evaluation = result.report["evaluation"]
    assert evaluation["streamed"] == {"states": {"h": "hidden"}, "samples_fed_back": 39, "chains": 1}
    session, reference = ort.InferenceSession(str(tmp_path / "q.onnx")), ort.InferenceSession(path)
    got, want, h = [], [], held_out["h"][:1]
    for x, recorded in zip(held_out["x"], held_out["h"]):
        want.append(reference.run(["hidden"], {"x": x[None], "h": recorded[None]})[0])
        got.append(session.run(["hidden"], {"x": x[None], "h": h})[0])
        h = got[-1]
    assert evaluation["outputs"]["hidden"]["cosine"] == pytest.approx(
        _per_sample_cosine(np.concatenate(got), np.concatenate(want)), abs=1e-5)


def test_a_constant_input_an_output_equals_now_and_then_is_no_state(tmp_path):
    """A gain of 1.0 given to every sample, and a sigmoid that saturates at 1.0 on some: the gain 'continues' the
    output of the sample before there. A state varies, and continues on most samples: with no link, samples
    listed class by class are held out one in five, every class among them (a review's: the last fifth, one class,
    was held out and never calibrated on)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (16, 5)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 3, (16, 1)).astype(np.float32), "v")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Mul", ["xw", "gain"], ["logits"]),
             helper.make_node("MatMul", ["x", "v"], ["xv"]), helper.make_node("Sigmoid", ["xv"], ["p"])]
    value = lambda name, width: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", width])  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "g", [value("x", 16), value("gain", 1)],
                                                [value("logits", 5), value("p", 1)], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    labels = np.repeat(np.arange(5), 20)
    xs = (rng.normal(size=(100, 16)) + labels[:, None] * 0.3).astype(np.float32)
    gain = np.ones((100, 1), np.float32)
    saturated = ort.InferenceSession(path).run(None, {"x": xs, "gain": gain})[1][:8, 0] > 1 - 1e-3
    assert saturated[:7].any()  # the premise: some of the first runs' outputs equal the next run's gain
    np.savez(tmp_path / "calib.npz", x=xs, gain=gain, labels=labels)
    loaded = load_model(path)
    given = open_samples(str(tmp_path / "calib.npz"), loaded.inputs, Preprocess(), "calibration")
    assert not fidelity.carries_state(loaded.model_file(), loaded, given)
    result = convert(path, str(tmp_path / "q.onnx"), str(tmp_path / "calib.npz"), Options(avg_bits=4, quiet=True))
    assert "streamed" not in result.report["evaluation"] and "states_fed_as_given" not in result.report["evaluation"]


def test_state_links_skip_rows_a_selection_lacks_and_shapes_that_differ():
    """Outputs a selection decides the rows of are no state, and samples of other lengths are no match (a review's
    two crashes: a detector's [K, 4] boxes with K = 0 read at row 0; texts of 12 and 14 tokens subtracted)."""
    states = fidelity.StateLinks(["y"])
    for length in (12, 14, 14, 14):
        y = np.ones((1, length, 8), np.float32)
        states.add({"x": y, "other": np.zeros((1, 3), np.float32)}, 1, {"y": y})
    assert states.links == {}  # x equals y of the run before on two of three, but is y of its own run each time
    states = fidelity.StateLinks(["y"])
    states.add({"x": np.ones((1, 4), np.float32)}, 1, {"y": np.ones((1, 4), np.float32)})
    states.add({"x": np.ones((1, 4), np.float32)}, 1, {"y": np.zeros((0, 4), np.float32)})
    states.add({"x": np.ones((1, 4), np.float32)}, 1, {"y": np.ones((1, 4), np.float32)})
    assert states.links == {}


@pytest.mark.parametrize("count, stretches", [(48, 1), (50, 2), (125, 5), (1000, 5)])
def test_samples_that_carry_a_state_are_held_out_in_stretches_spread_over_them(tmp_path, count, stretches):
    """The last fifth of each of up to 5 stretches (one per 25 samples): streams, and spread over the recording
    (its speakers, its noise) rather than its end alone."""
    np.savez(tmp_path / "s.npz", x=np.zeros((count, 16), np.float32))
    given = open_samples(str(tmp_path / "s.npz"), load_model(_batch_first_cell(tmp_path)).inputs[:1], Preprocess(),
                         "calibration")
    _, held = split_holdout(given, 0.2, streams=True)
    runs = np.split(np.flatnonzero(held.mask), np.flatnonzero(np.diff(np.flatnonzero(held.mask)) > 1) + 1)
    assert len(runs) == stretches and held.mask[-1] and held.mask.sum() == pytest.approx(count / 5, abs=stretches)
    assert max(map(len, runs)) - min(map(len, runs)) <= 1

"""A default allocation whose written model collapsed is made again on each layer's measured effect on every
output (--on-collapse reallocate), and the one of the two nearer FP32 on calibration samples is kept."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from msq_onnx import Options, convert
from msq_onnx.data import Preprocess, open_samples
from msq_onnx.fidelity import COLLAPSE_COSINE
from msq_onnx.load import load_model
from msq_onnx.report import SCHEMA_PATH


def amplifying_model(eps: float = 0.05, seed: int = 0, classifier: bool = False) -> onnx.ModelProto:
    """Two outputs: an embedding from one large layer, and a 'state' h @ wc whose wc lies almost in the null
    space of h = x @ wb: FP32's state is small, and any error in wb or wc is not cancelled. Both product layers'
    own relative errors look like the embedding layer's, which is what the default allocation reads.
    classifier: ten class scores from two layers instead of the embedding, whose decisions break first."""
    rng = np.random.default_rng(seed)
    weights = {"wf": rng.normal(size=(16, 1024)).astype(np.float32) / 4}
    wb = weights["wb"] = rng.normal(size=(16, 256)).astype(np.float32) / 4
    null = np.linalg.svd(wb)[2][16:].T  # [256, 240]: wb @ null == 0
    weights["wc"] = (null @ rng.normal(size=(240, 4)) + eps * wb.T @ rng.normal(size=(16, 4))).astype(np.float32)
    if classifier:
        weights["wf"] = weights["wf"][:, :256]
        weights["wg"] = rng.normal(size=(256, 10)).astype(np.float32) / 16
        head = [helper.make_node("MatMul", ["x", "wf"], ["features"], name="embed"),
                helper.make_node("Relu", ["features"], ["relu"]),
                helper.make_node("MatMul", ["relu", "wg"], ["scores"], name="classify")]
    else:
        head = [helper.make_node("MatMul", ["x", "wf"], ["embedding"], name="embed")]
    nodes = head + [helper.make_node("MatMul", ["x", "wb"], ["h"], name="hidden"),
                    helper.make_node("MatMul", ["h", "wc"], ["state"], name="to_state")]
    graph = helper.make_graph(
        nodes, "amplifying", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10]) if classifier else
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 1024]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, name) for name, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def amplifying_files(tmp_path):
    onnx.save(amplifying_model(), tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(200, 16)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=rng.normal(size=(100, 16)).astype(np.float32))
    return {name: str(tmp_path / file) for name, file in
            (("model", "m.onnx"), ("calib", "calib.npz"), ("eval", "eval.npz"), ("dir", ""))}


def _convert(files, name, avg_bits=3.0, **options):
    return convert(files["model"], files["dir"] + name, files["calib"],
                   Options(avg_bits=avg_bits, eval_path=files["eval"], activations="weight-only", quiet=True, **options))


def _state_cosine(files, path) -> float:
    x = np.load(files["eval"])["x"]
    fp32 = ort.InferenceSession(files["model"]).run(["state"], {"x": x})[0]
    written = ort.InferenceSession(path).run(["state"], {"x": x})[0]
    cosines = (fp32 * written).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(written, axis=1)
    return float(cosines.mean())


def test_a_collapsed_allocation_is_made_again_and_the_nearer_one_written(amplifying_files):
    files = amplifying_files
    warned = _convert(files, "warned.onnx", on_collapse="warn").report
    collapse = [w for w in warned["warnings"] if "collapsed" in w]
    assert len(collapse) == 1 and "'state'" in collapse[0] and "reallocation" not in warned
    assert _state_cosine(files, files["dir"] + "warned.onnx") < COLLAPSE_COSINE

    report = _convert(files, "again.onnx").report
    again = report["reallocation"]
    assert again["because"] == collapse[0]  # what the first allocation's check said, word for word
    assert again["kept"] == "reallocated"
    assert again["weakest_figure"]["reallocated"] > COLLAPSE_COSINE > again["weakest_figure"]["first"]
    assert again["calibration_samples"] == 128
    assert report["avg_weight_bits"] <= 3.0 + 1e-9  # the same budget
    assert not any("collapsed" in w for w in report["warnings"])
    bits = {layer["name"]: layer["bits"] for layer in report["layers"]}
    first = {layer["name"]: layer["bits"] for layer in warned["layers"]}
    # the bits went to the layers the state amplifies, from the embedding's
    assert bits["hidden"] > first["hidden"] and bits["to_state"] > first["to_state"] and bits["embed"] < first["embed"]
    # what was published is the kept allocation, measured again here on the held-out samples
    assert _state_cosine(files, files["dir"] + "again.onnx") > COLLAPSE_COSINE
    assert report["evaluation"]["outputs"]["state"]["cosine"] == pytest.approx(
        _state_cosine(files, files["dir"] + "again.onnx"), abs=1e-4)
    import jsonschema

    jsonschema.validate(report, json.load(open(SCHEMA_PATH)))


def test_output_weights_see_the_error_an_output_amplifies(amplifying_files):
    """What one layer quantized alone does to every output, per unit of its own error: the two layers whose
    error the state does not cancel weigh far more than the embedding's, which the default cannot tell apart."""
    from msq_onnx import sensitivity
    from msq_onnx.pipeline import _Timer, analyse

    loaded = load_model(amplifying_files["model"])
    calib = open_samples(amplifying_files["calib"], loaded.inputs, Preprocess())
    analysis = analyse(loaded, calib, Options(avg_bits=3.0, quiet=True, activations="weight-only"), _Timer())
    probe = sensitivity.OutputProbe(loaded, calib)
    assert len(probe.feeds) == sensitivity.PROBE_SAMPLES == sensitivity.probe_samples(3)
    assert sensitivity.probe_samples(102) == sensitivity.PROBE_FEWEST < sensitivity.probe_samples(64) == 12
    weights, moved = probe.layer_weights(analysis.choices, analysis.stats.input_mean, quiet=True)
    assert min(weights["hidden"], weights["to_state"]) > 10 * weights["embed"]
    assert moved["hidden"] > moved["embed"] > 0


def test_the_first_allocation_is_kept_where_the_second_is_no_nearer(amplifying_files, tmp_path):
    """Ten class scores beside the state: weighing layers by their outputs' errors moves bits to the state, and
    the scores' decisions, which an error of that size breaks, collapse further. Judged by the collapse check's
    own figures on calibration samples, the first allocation stays, and so does its warning."""
    onnx.save(amplifying_model(classifier=True), tmp_path / "scores.onnx")
    files = dict(amplifying_files, model=str(tmp_path / "scores.onnx"))
    warned = _convert(files, "scores-warned.onnx", avg_bits=4.0, bits=(2, 4, 8), on_collapse="warn").report
    report = _convert(files, "scores-again.onnx", avg_bits=4.0, bits=(2, 4, 8)).report
    again = report["reallocation"]
    assert again["kept"] == "first" and again["weakest_figure"]["first"] > again["weakest_figure"]["reallocated"]
    assert [layer["bits"] for layer in report["layers"]] == [layer["bits"] for layer in warned["layers"]]
    assert report["warnings"][:-1] == warned["warnings"]
    assert "no nearer FP32 on 128 calibration samples" in report["warnings"][-1]


def test_the_same_allocation_again_is_not_measured_twice(amplifying_files, tmp_path):
    """Where the outputs' weights give the allocation the default gave, there is nothing to choose."""
    onnx.save(amplifying_model(eps=0.2, classifier=True), tmp_path / "same.onnx")
    files = dict(amplifying_files, model=str(tmp_path / "same.onnx"))
    report = _convert(files, "same-again.onnx", bits=(2, 4, 8)).report
    assert report["reallocation"]["kept"] == "first" and report["reallocation"]["weakest_figure"] == {}
    assert any("collapsed" in w for w in report["warnings"])
    assert report["warnings"][-1].endswith("gave the same allocation: the first allocation is written")


def test_no_reallocation_without_a_budget_or_when_told_to_warn(amplifying_files):
    files = amplifying_files
    for options in ({"on_collapse": "warn"}, {"allocator": "sensitivity"}):
        assert "reallocation" not in _convert(files, "x.onnx", **options).report


def test_output_errors_judge_each_channel_against_its_own_energy():
    """A [N, 6, 10] output whose one small channel is gone: the whole output's error hides it, its channels'
    errors do not; a one-value output counts as much as a wide one."""
    from msq_onnx.sensitivity import OutputErrors

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(4, 6, 10)).astype(np.float32)
    reference[:, 5] *= 0.01
    quantized = reference.copy()
    quantized[:, 5] = 0.0
    errors = OutputErrors()
    errors.add("boxes", reference, quantized)
    whole = float(((quantized - reference) ** 2).sum() / (reference ** 2).sum())
    assert whole < 1e-4 and max(e.max() for e in errors.per_output()) == pytest.approx(1.0)
    assert errors.mean() == pytest.approx(1.0 / 6)
    errors.add("score", np.ones((4, 1), np.float32), np.full((4, 1), 1.1, np.float32))
    assert errors.mean() == pytest.approx((1.0 / 6 + 0.01) / 2)
    errors.add("labels", np.arange(4), np.zeros(4, np.int64))  # ids: no relative error
    assert errors.mean() == pytest.approx((1.0 / 6 + 0.01) / 2)
    # what FP32 left at zero (an NMS that kept nothing) is error relative to nothing: left out, not 1e30
    errors.add("kept", np.zeros((0, 4), np.float32), np.ones((1, 4), np.float32))
    assert errors.mean() == pytest.approx((1.0 / 6 + 0.01) / 2) and len(errors.per_output()) == 2


def test_the_figure_compared_leaves_out_what_no_width_moves_and_what_a_gate_judges():
    """weakest_figure reads what collapse_warning reads: an output its own grid holds down, and the task output's
    cosine under --min-cosine or its drop under --max-drop, are no part of it."""
    from msq_onnx.fidelity import weakest_figure

    measured = {"kind": "embedding", "task_output": "e", "cosine": 0.95, "samples": 10,
                "outputs": {"e": {"cosine": 0.95}, "p": {"cosine": 0.3, "finer_than_its_grid": {"step": 1.0}},
                            "s": {"cosine": 0.8}}}
    assert weakest_figure(measured) == 0.8
    assert weakest_figure(dict(measured, outputs={"e": {"cosine": 0.95}})) == 0.95
    assert weakest_figure(dict(measured, outputs={"e": {"cosine": 0.95}}), frozenset({"cosine"})) == 1.0
    scores = {"kind": "class-scores", "task_output": "y", "cosine": 0.99, "drop": 20.0, "fp32_top1": 80.0,
              "samples": 10, "outputs": {"y": {"cosine": 0.99}}}
    assert weakest_figure(scores) == pytest.approx(0.8)
    assert weakest_figure(scores, frozenset({"drop"})) == 1.0


def test_labels_alone_leave_the_probe_blind_and_nothing_is_allocated_again(amplifying_files, tmp_path, monkeypatch):
    """A model whose every output is integers (an ArgMax's labels): the probe measures float outputs only."""
    from msq_onnx import pipeline, sensitivity

    model = amplifying_model(classifier=True)
    model.graph.node.append(helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
    onnx.save(model, tmp_path / "labels.onnx")
    files = dict(amplifying_files, model=str(tmp_path / "labels.onnx"))
    monkeypatch.setattr(pipeline.fidelity, "collapse_warning", lambda measured, gated: "output 'label' collapsed")

    def fail(*args, **kwargs):
        raise AssertionError("the probe ran")

    monkeypatch.setattr(sensitivity, "OutputProbe", fail)
    assert "reallocation" not in _convert(files, "labels-q.onnx", output="label").report


def test_a_second_allocation_over_max_size_is_not_written_where_the_first_fits(amplifying_files, monkeypatch):
    """--max-size met by the first model's file and not by the second's: the first is written, and said."""
    from msq_onnx import pipeline

    first = _convert(amplifying_files, "size-first.onnx", max_size=0.9, on_collapse="warn").report
    assert any("collapsed" in w for w in first["warnings"])
    real = pipeline.written_bytes
    sizes = []

    def second_is_larger(path, axes=None):
        sizes.append(real(path, axes) + (10 ** 9 if sizes else 0))  # every file after the first's: over the bound
        return sizes[-1]

    monkeypatch.setattr(pipeline, "written_bytes", second_is_larger)
    monkeypatch.setattr(pipeline, "SIZE_RETRIES", 0)
    report = _convert(amplifying_files, "size-again.onnx", max_size=0.9).report
    assert report["reallocation"]["kept"] == "first" and "over --max-size" in report["reallocation"]["refused"]
    assert [layer["bits"] for layer in report["layers"]] == [layer["bits"] for layer in first["layers"]]
    assert "gave no model to write instead" in report["warnings"][-1]


@pytest.mark.parametrize("gain, kept", [(0.5, "first"), (2.0, "reallocated")])
def test_a_second_allocation_must_be_nearer_by_more_than_one_samples_share(amplifying_files, monkeypatch, gain, kept):
    """A weakest figure (a channel's likeness over 84 classes, a share of decisions) moves by one sample's share
    between two near-equal models: the default's allocation is kept unless the other gains more than 1 / samples."""
    from msq_onnx import pipeline

    figures = iter([0.5, 0.5, 0.5 + gain / 128])  # the held-out check's (under the line: it starts), then the two
    monkeypatch.setattr(pipeline.fidelity, "weakest_figure", lambda measured, gated: next(figures))
    report = _convert(amplifying_files, "margin.onnx").report
    assert report["reallocation"]["kept"] == kept
    assert report["reallocation"]["weakest_figure"]["first"] == 0.5


def test_nothing_is_allocated_again_where_no_width_could_move(amplifying_files, monkeypatch):
    """A budget that leaves every layer at its widest width, or a collapse that is the output grid's alone (no
    width moves it): the first allocation is written as it is, with no probe run."""
    from msq_onnx import pipeline, sensitivity

    def fail(*args, **kwargs):
        raise AssertionError("the probe ran")

    monkeypatch.setattr(sensitivity, "OutputProbe", fail)
    report = _convert(amplifying_files, "wide.onnx", avg_bits=8.0, bits=(2, 3)).report
    assert "reallocation" not in report and any("collapsed" in w for w in report["warnings"])
    monkeypatch.setattr(pipeline.fidelity, "collapse_warning",
                        lambda measured, gated: f"output 'state' collapsed: {pipeline.fidelity.GRID_ADVICE}.")
    assert "reallocation" not in _convert(amplifying_files, "grid.onnx").report


def test_nothing_is_allocated_again_for_a_variation_the_comparison_does_not_read(amplifying_files, monkeypatch):
    """A collapse named by an output's variation alone (centred_cosine): the two allocations are compared by
    weakest_figure, which leaves it out, so a second try could only tie and keep the first; it is not made."""
    from msq_onnx import pipeline, sensitivity

    def fail(*args, **kwargs):
        raise AssertionError("the probe ran")

    monkeypatch.setattr(sensitivity, "OutputProbe", fail)
    monkeypatch.setattr(pipeline.fidelity, "weakest_figure", lambda measured, gated: 0.95)
    report = _convert(amplifying_files, "varied.onnx").report
    assert "reallocation" not in report and any("collapsed" in w for w in report["warnings"])

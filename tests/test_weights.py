import os
import tempfile

import numpy as np
import onnx
import pytest

from conftest import tensors_of
from msq_onnx.load import Layer
from msq_onnx.weights import (LEVEL_CODE_LIMIT, as_matrix, bias_shift, error_table, fake_quantize, from_matrix,
                              input_channel_index, input_weights, levels, lowest, quantize_layer, search_clips)


def conv_layer(shape, group=1):
    return Layer("c", "Conv", "w", "x", "y", shape, 0, group=group)


def test_grid_uses_at_most_the_k_bit_levels():
    """Below 8 bits the grid is the k-bit two's-complement range -2^(k-1)..2^(k-1)-1 (2 bits: four levels, not
    the three of a symmetric grid); 8 bits keep -127..127."""
    w = np.random.default_rng(0).normal(size=(4, 400)).astype(np.float32)
    for bits in range(2, 9):
        q, scale = fake_quantize(w, 0.6 * np.abs(w).max(axis=1), bits)
        integers = q / scale[:, None]
        assert np.allclose(integers, np.rint(integers), atol=1e-3)
        integers = np.rint(integers)
        assert integers.max() <= levels(bits) and integers.min() >= -(2 ** (bits - 1) if bits < 8 else 127)
        used = len(np.unique(integers))
        assert used == 2 ** bits if bits <= 5 else used <= (2 ** bits if bits < 8 else 255)  # all, where 1,600 fill them
        assert lowest(levels(bits)) == (2 ** (bits - 1) if bits < 8 else 127)


def test_the_full_two_bit_grid_halves_the_error_of_a_symmetric_one():
    """Four levels where the symmetric grid had three: the clipping search finds a much closer 2-bit weight."""
    w = np.random.default_rng(3).normal(size=(32, 256)).astype(np.float32)
    full = search_clips(w, None, 2).error
    clip = np.abs(w).max(axis=1)
    symmetric = min(float(((np.clip(np.rint(w / (r * clip)[:, None]), -1, 1) * (r * clip)[:, None] - w) ** 2).sum())
                    for r in np.linspace(0.2, 1.0, 17)) / float((w ** 2).sum())  # best ternary ratio for all rows
    assert full < 0.8 * symmetric


def test_clip_search_never_worse_than_min_max_and_better_at_low_bits():
    rng = np.random.default_rng(1)
    w = rng.standard_t(3, size=(16, 200)).astype(np.float32)  # heavy tails: clipping pays
    ones = np.ones_like(w)
    for bits in (2, 3, 4, 8):
        searched = search_clips(w, ones, bits)
        minmax = search_clips(w, ones, bits, search=False)
        assert searched.error <= minmax.error + 1e-12
    assert search_clips(w, ones, 3).error < 0.8 * search_clips(w, ones, 3, search=False).error


def test_error_falls_with_bits():
    layer = conv_layer((8, 4, 3, 3))
    w = np.random.default_rng(2).normal(size=layer.weight_shape).astype(np.float32)
    table = error_table(layer, w, None, range(2, 9))
    errors = [table[b].error for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_input_weighting_protects_weights_on_loud_channels():
    layer = Layer("g", "Gemm", "w", "x", "y", (6, 2), 0)
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 2)).astype(np.float32)
    loud_first = error_table(layer, w, np.array([100.0, 0.01]), [3])[3]
    # the error estimate is dominated by the loud channel's weights
    q, _ = fake_quantize(w, loud_first.clip, 3)
    err_loud = ((q - w)[:, 0] ** 2).sum()
    flat = error_table(layer, w, None, [3])[3]
    q_flat, _ = fake_quantize(w, flat.clip, 3)
    assert err_loud <= ((q_flat - w)[:, 0] ** 2).sum() + 1e-9


def test_grouped_conv_maps_weights_to_their_input_channels():
    layer = conv_layer((4, 1, 3, 3), group=4)  # depthwise
    index = input_channel_index(layer)
    assert index.shape == (4, 9)
    assert all((index[o] == o).all() for o in range(4))
    layer = conv_layer((4, 2, 1, 1), group=2)
    assert input_channel_index(layer).tolist() == [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_matrix_views_round_trip():
    rng = np.random.default_rng(4)
    for layer in (conv_layer((3, 2, 2, 2)), Layer("m", "MatMul", "w", "x", "y", (5, 3), 1, transposed_weight=True),
                  Layer("t", "ConvTranspose", "w", "x", "y", (2, 3, 2, 2), 1, transposed_weight=True)):
        w = rng.normal(size=layer.weight_shape).astype(np.float32)
        matrix = as_matrix(layer, w)
        out_channels = layer.weight_shape[layer.out_axis]
        assert matrix.shape[0] == out_channels
        np.testing.assert_array_equal(from_matrix(layer, matrix), w)


def test_bias_shift_is_expected_output_change():
    layer = Layer("g", "Gemm", "w", "x", "y", (2, 3), 0)
    w = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]], np.float32)
    q = w + np.array([[0.1, 0.0, -0.1], [0.2, 0.2, 0.2]], np.float32)
    mean = np.array([1.0, 5.0, 2.0], np.float32)
    np.testing.assert_allclose(bias_shift(layer, w, q, mean), [0.1 - 0.2, 0.2 * 8], atol=1e-6)


def test_bias_correction_follows_gemm_alpha_beta_and_skips_what_a_bias_cannot_absorb():
    from msq_onnx.weights import WidthChoice, quantize_layer

    w = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
    mean = np.array([1.0, 2.0, 0.5, 1.5], np.float32)
    choice = WidthChoice(2, np.abs(w).max(axis=1), 0.0)
    plain = quantize_layer(Layer("g", "Gemm", "w", "x", "y", (3, 4), 0), w, None, choice, mean)
    scaled = quantize_layer(Layer("g", "Gemm", "w", "x", "y", (3, 4), 0, bias_factor=2.0), w, None, choice, mean)
    np.testing.assert_allclose(scaled.bias, 2.0 * plain.bias, rtol=1e-6)  # alpha / beta = 2
    expected = -((plain.weight - w) * mean).sum(axis=1)
    np.testing.assert_allclose(plain.bias, expected, rtol=1e-5)
    matmul = Layer("m", "MatMul", "w", "x", "y", (4, 3), 1, transposed_weight=True, bias_factor=None)
    assert quantize_layer(matmul, w.T.copy(), None, choice, mean).bias is None


def test_gptq_rounds_better_than_nearest_on_correlated_inputs_and_reports_held_out_error():
    from msq_onnx.instrument import InputHessians
    from msq_onnx.weights import gptq_round

    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(32, 32)) * 0.3 + np.eye(32)
    rows = lambda n: rng.normal(size=(n, 32)) @ mixing  # noqa: E731 - correlated inputs, as real ones are
    fit, check = rows(2000), rows(2000)
    weight = rng.normal(size=(32, 16)).astype(np.float32)  # MatMul layout [in, out]
    layer = Layer("m", "MatMul", "w", "x", "y", (32, 16), 1, transposed_weight=True)
    hessians = InputHessians(fit.T @ fit, check.T @ check)
    with_gptq = error_table(layer, weight, None, (3, 8), hessians=hessians)
    nearest = error_table(layer, weight, None, (3, 8))
    matrix = as_matrix(layer, weight).astype(np.float64)
    for bits in (3, 8):
        choice = with_gptq[bits]
        scale = choice.clip / levels(bits)
        values = (choice.integers if choice.integers is not None else
                  np.clip(np.rint(matrix / scale[:, None]), -lowest(levels(bits)), levels(bits))) * scale[:, None]
        delta = values - matrix
        held_out = np.sum((delta @ hessians.check) * delta) / np.sum((matrix @ hessians.check) * matrix)
        assert choice.error == pytest.approx(held_out, rel=1e-6)  # the error is measured on the other half
    assert with_gptq[3].integers is not None and with_gptq[3].integers.max() <= levels(3)
    assert with_gptq[3].integers.min() >= -lowest(levels(3))
    # GPTQ beats nearest on the held-out rows at 3 bits (nearest's error under the same Hessian)
    scale = nearest[3].clip / levels(3)
    rtn = np.clip(np.rint(matrix / scale[:, None]), -lowest(levels(3)), levels(3)) * scale[:, None] - matrix
    assert with_gptq[3].error < 0.8 * np.sum((rtn @ hessians.check) * rtn) / np.sum((matrix @ hessians.check) * matrix)
    integers, losses = gptq_round(matrix, scale, np.full(16, levels(3)), hessians.fit)
    assert integers.shape == matrix.shape and losses.shape == (16,) and (losses >= 0).all()


def test_gptq_with_a_scale_per_row_rounds_as_with_that_scale_spread_over_every_weight():
    """A step and a flipped grid per row are kept as [rows] vectors through GPTQ's columns (no per-weight copies):
    the integers and losses are those of the same steps and flips given for every weight."""
    from msq_onnx.weights import gptq_round

    rng = np.random.default_rng(5)
    inputs = rng.normal(size=(500, 24)) @ (rng.normal(size=(24, 24)) * 0.3 + np.eye(24))
    matrix = rng.normal(size=(40, 24)).astype(np.float32)
    scale = (np.abs(matrix).max(axis=1) / 3.5).astype(np.float32)
    tops = np.full(40, levels(3))
    flipped = rng.random(40) < 0.5
    row = gptq_round(matrix, scale, tops, inputs.T @ inputs, flipped)
    spread = gptq_round(matrix, np.repeat(scale[:, None], 24, axis=1), tops, inputs.T @ inputs,
                        np.repeat(flipped[:, None], 24, axis=1))
    np.testing.assert_array_equal(row[0], spread[0])
    np.testing.assert_array_equal(row[1], spread[1])
    assert (row[0][flipped] == levels(3) + 1).any()  # the flipped rows use their extra level
    assert not np.array_equal(row[0], gptq_round(matrix, scale, tops, inputs.T @ inputs)[0])


def test_gptq_rounds_the_most_powerful_inputs_first():
    """Act order: inputs whose power is highest (the Hessian's diagonal) are rounded first, while the most
    columns remain to take up their error. Where those inputs come last in the weight's own order, that
    leaves less output error than rounding in the given order, on rows the rounding did not see."""
    from msq_onnx.weights import _gptq_in_order, damped, gptq_round

    gains = []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        power = np.concatenate([np.ones(28), np.full(4, 30.0)])  # the loud inputs last
        mixing = rng.normal(size=(32, 32)) * 0.3 + np.eye(32)
        rows = lambda n: (rng.normal(size=(n, 32)) @ mixing) * np.sqrt(power)  # noqa: E731
        fit, check = rows(3000), rows(3000)
        matrix = rng.normal(size=(24, 32)).astype(np.float32)
        scale = (np.abs(matrix).max(axis=1) / 3.0).astype(np.float32)
        tops = np.full(24, levels(3))
        hessian = fit.T @ fit

        def held_out(integers):
            delta = integers * scale[:, None] - matrix
            return float(np.sum((delta @ (check.T @ check)) * delta))

        ordered, ordered_losses = gptq_round(matrix, scale, tops, hessian)
        natural, _ = _gptq_in_order(matrix.copy(), scale, tops, hessian)
        gains.append(held_out(natural) / held_out(ordered))
        # the losses are the damped fitting error of the integers returned, in the weight's own column order
        delta = ordered * scale[:, None] - matrix
        np.testing.assert_allclose(ordered_losses, np.einsum("ij,jk,ik->i", delta, damped(hessian), delta),
                                   rtol=1e-3)
    assert min(gains) > 1.5, gains


def test_errors_are_measured_after_the_bias_correction_takes_out_their_constant_part():
    """An input with a large mean: the bias correction cancels the weight error times the mean, so the error a
    width leaves is the centred one, which the Hessians measure exactly. Measured on uncentred Hessians it
    looked several times smaller (GPTQ spent itself on the mean's direction, and the mean inflated the
    signal)."""
    from types import SimpleNamespace

    from msq_onnx.instrument import InputHessians
    from msq_onnx.pipeline import error_statistics
    from msq_onnx.weights import quantize_layer

    rng = np.random.default_rng(3)
    mixing = rng.normal(size=(24, 24)) * 0.3 + np.eye(24)
    rows = lambda n: rng.normal(size=(n, 24)) @ mixing + 4.0  # noqa: E731 - post-activation inputs sit far from 0
    fit, check = rows(3000), rows(3000)
    both = np.concatenate([fit, check])
    weight = rng.normal(size=(24, 40)).astype(np.float32)  # MatMul layout [in, out]
    bias = rng.normal(size=40).astype(np.float32)
    layer = Layer("m", "MatMul", "w", "x", "y", (24, 40), 1, transposed_weight=True, bias_name="b")
    stats = SimpleNamespace(input_sq={"m": (both ** 2).mean(axis=0)}, input_mean={"m": both.mean(axis=0)},
                            hessians={"m": InputHessians(fit.T @ fit, check.T @ check, fit.sum(axis=0),
                                                         check.sum(axis=0), len(fit), len(check))})
    centred_check = (check - both.mean(axis=0))
    for hessians in (True, False):
        if not hessians:
            stats.hessians = {}
        power, h = error_statistics(layer, stats, bias_correction=True)
        table = error_table(layer, weight, power, (2, 3), hessians=h)
        raw_power, raw_hessians = error_statistics(layer, stats, bias_correction=False)
        uncentred = error_table(layer, weight, raw_power, (2, 3), hessians=raw_hessians)
        for bits in (2, 3):
            q = quantize_layer(layer, weight, bias, table[bits], both.mean(axis=0))
            left = (check @ q.weight + q.bias) - (check @ weight + bias)  # what the written layer does
            written = np.sum(left ** 2) / np.sum((centred_check @ weight) ** 2)
            if hessians:
                assert table[bits].error == pytest.approx(written, rel=1e-3)
                assert uncentred[bits].error < 0.5 * written
            else:  # the diagonal estimate is an expectation over the rounding, its ratio unmoved by like means
                assert table[bits].error == pytest.approx(written, rel=0.35)


def test_calibration_pass_sums_each_dense_layers_input_hessian_even_and_odd_samples_apart(monkeypatch):
    """The Hessians come out of the calibration pass itself (no second pass over the data) and equal numpy's
    X^T X over the even and the odd samples."""
    import onnxruntime as ort

    from conftest import samples_for, tiny_mlp
    from msq_onnx import instrument
    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.load import load_model

    monkeypatch.setattr(instrument, "MIN_ROWS_PER_INPUT", 0)  # six samples: too few rows to fit otherwise
    model = tiny_mlp()
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "m.onnx")
    onnx.save(model, path)
    loaded = load_model(path)
    x = samples_for(model, 6, with_labels=False)["x"]
    np.savez(os.path.join(folder, "x.npz"), x=x)
    stats = instrument.run_pass(loaded, open_samples(os.path.join(folder, "x.npz"), loaded.inputs, Preprocess()),
                                (1, 2), 64, quiet=True, hessians=True)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info("r1", onnx.TensorProto.FLOAT, None))
    r1 = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(["r1"], {"x": x})[0]
    by_node = {layer.nodes[0]: layer.name for layer in loaded.layers}
    for node, inputs in (("mm1", x), ("mm2", r1)):
        got = stats.hessians[by_node[node]]
        np.testing.assert_allclose(got.fit, inputs[0::2].T @ inputs[0::2], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got.check, inputs[1::2].T @ inputs[1::2], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got.fit_sum, inputs[0::2].sum(axis=0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got.check_sum, inputs[1::2].sum(axis=0), rtol=1e-4, atol=1e-4)
        assert (got.fit_rows, got.check_rows) == (3, 3)
        mean = inputs.mean(axis=0)
        centred = got.centred(mean)
        np.testing.assert_allclose(centred.check, (inputs[1::2] - mean).T @ (inputs[1::2] - mean), rtol=1e-3,
                                   atol=1e-3)
    without = instrument.run_pass(loaded, open_samples(os.path.join(folder, "x.npz"), loaded.inputs, Preprocess()),
                                  (1, 2), 64, quiet=True)
    assert without.hessians == {}
    # in batches of two, whole batches alternate: samples 0, 1, 4, 5 fit and 2, 3 check
    batched = instrument.run_pass(loaded, open_samples(os.path.join(folder, "x.npz"), loaded.inputs, Preprocess()),
                                  (1, 2), 64, batch_size=2, quiet=True, hessians=True)
    got = batched.hessians[by_node["mm1"]]
    fit, check = x[[0, 1, 4, 5]], x[[2, 3]]
    np.testing.assert_allclose(got.fit, fit.T @ fit, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.check, check.T @ check, rtol=1e-4, atol=1e-4)
    # a batch as large as the Hessian sample count still leaves a second batch to judge on
    monkeypatch.setattr(instrument, "HESSIAN_SAMPLES", 2)
    large = instrument.run_pass(loaded, open_samples(os.path.join(folder, "x.npz"), loaded.inputs, Preprocess()),
                                (1, 2), 64, batch_size=4, quiet=True, hessians=True)
    np.testing.assert_allclose(large.hessians[by_node["mm1"]].check, x[4:].T @ x[4:], rtol=1e-4, atol=1e-4)


def test_hessians_come_from_the_last_samples_and_only_for_inputs_whose_rows_can_fit_gptq(monkeypatch, tmp_path):
    """The samples before the Hessian batches count each input's rows per sample: a narrow input with enough
    rows gets its K x K product, a wide one that could never fit GPTQ gets none (no product in the graph)."""
    from onnx import TensorProto, helper, numpy_helper

    from msq_onnx import instrument
    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.load import load_model

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="narrow"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="wide")], "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 3])],
        [numpy_helper.from_array(rng.normal(size=(4, 64)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.normal(size=(64, 3)).astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    loaded = load_model(str(tmp_path / "m.onnx"))
    x = rng.normal(size=(20, 5, 4)).astype(np.float32)  # 5 rows per sample
    np.savez(tmp_path / "x.npz", x=x)
    monkeypatch.setattr(instrument, "HESSIAN_SAMPLES", 8)  # samples 12..19: 12 14 16 18 fit, 13 15 17 19 check
    gathered = []
    original = instrument.HessianSums.add
    monkeypatch.setattr(instrument.HessianSums, "add", lambda self, values: gathered.append(set(values)) or
                        original(self, values))
    stats = instrument.run_pass(loaded, open_samples(str(tmp_path / "x.npz"), loaded.inputs, Preprocess()), (1, 2),
                                64, quiet=True, hessians=True)
    by_node = {layer.nodes[0]: layer.name for layer in loaded.layers}
    assert len(gathered) == 8 and all(len(names) == 1 for names in gathered)  # the last 8 samples, x's rows alone
    assert set(stats.hessians) == {by_node["narrow"]}  # 20 fitting rows >= 4 x 4; the 64-wide input: none
    fit, check = x[12::2].reshape(-1, 4), x[13::2].reshape(-1, 4)
    np.testing.assert_allclose(stats.hessians[by_node["narrow"]].fit, fit.T @ fit, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats.hessians[by_node["narrow"]].check, check.T @ check, rtol=1e-4, atol=1e-4)


def test_a_model_with_no_input_that_can_fit_gptq_keeps_one_calibration_session(monkeypatch, tmp_path):
    """Convolutions and a one-row head take no Hessians: no second session is built for the last samples
    (a rebuilt session cost EfficientNet-Lite0 50 MB of peak memory for nothing)."""
    from conftest import samples_for, tiny_cnn
    from msq_onnx import instrument
    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.load import load_model

    model = tiny_cnn()
    onnx.save(model, tmp_path / "m.onnx")
    loaded = load_model(str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "x.npz", x=samples_for(model, 100, with_labels=False)["x"])
    monkeypatch.setattr(instrument, "HESSIAN_SAMPLES", 72)  # 36 fitting samples: 4 rows per input of a 3x3 tap
    built = []
    original = instrument.build_instrumented
    monkeypatch.setattr(instrument, "build_instrumented", lambda *a, **k: built.append(1) or original(*a, **k))
    stats = instrument.run_pass(loaded, open_samples(str(tmp_path / "x.npz"), loaded.inputs, Preprocess()), (1, 2),
                                64, quiet=True, hessians=True)
    assert len(built) == 1 and stats.hessians == {} and stats.samples == 100


def _sequence_model(tmp_path, batch="N"):
    """x [batch, T, 4] -> MatMul 4x8 ("narrow") -> Relu -> MatMul 8x3."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="narrow"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="head")], "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, "T", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, "T", 3])],
        [numpy_helper.from_array(rng.normal(size=(4, 8)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    return str(tmp_path / "m.onnx")


def test_hessians_start_even_when_no_batch_begins_at_the_first_hessian_sample(monkeypatch, tmp_path):
    """Samples of different shapes regroup into batches that need not start on the computed first sample
    (here 12, with batches starting at 0, 5, 10, 15): the Hessians start with the batch that holds it
    (they were never gathered), so both halves get a batch: 10-14 fits, 15-19 checks."""
    from msq_onnx import instrument
    from msq_onnx.data import SampleSet
    from msq_onnx.load import load_model

    loaded = load_model(_sequence_model(tmp_path))
    x = np.random.default_rng(1).normal(size=(20, 6, 4)).astype(np.float32)

    class Fives(SampleSet):
        def batches(self, batch_size):
            for start in range(0, 20, 5):
                yield {"x": x[start:start + 5]}

    monkeypatch.setattr(instrument, "HESSIAN_SAMPLES", 8)
    monkeypatch.setattr(instrument, "MIN_ROWS_PER_INPUT", 1)
    stats = instrument.run_pass(loaded, Fives(20, None, "fives"), (1, 2), 64, batch_size=4, quiet=True,
                                hessians=True)
    narrow = next(layer.name for layer in loaded.layers if layer.nodes[0] == "narrow")
    assert instrument._hessian_start(20, 4) == 12
    fit, check = x[10:15].reshape(-1, 4), x[15:20].reshape(-1, 4)
    np.testing.assert_allclose(stats.hessians[narrow].fit, fit.T @ fit, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats.hessians[narrow].check, check.T @ check, rtol=1e-4, atol=1e-4)


def test_the_padded_last_batch_of_a_fixed_batch_model_stays_out_of_the_hessians(monkeypatch, tmp_path):
    """A fixed batch of 4 over 10 samples pads the third batch with copies of sample 9: the Hessians use the
    two whole batches, samples 0-3 to fit and 4-7 to check."""
    from msq_onnx import instrument
    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.load import load_model

    loaded = load_model(_sequence_model(tmp_path, batch=4))
    x = np.random.default_rng(2).normal(size=(10, 6, 4)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    monkeypatch.setattr(instrument, "HESSIAN_SAMPLES", 8)
    monkeypatch.setattr(instrument, "MIN_ROWS_PER_INPUT", 1)
    stats = instrument.run_pass(loaded, open_samples(str(tmp_path / "x.npz"), loaded.inputs, Preprocess()),
                                (1, 2), 64, quiet=True, hessians=True)
    narrow = next(layer.name for layer in loaded.layers if layer.nodes[0] == "narrow")
    fit, check = x[0:4].reshape(-1, 4), x[4:8].reshape(-1, 4)
    np.testing.assert_allclose(stats.hessians[narrow].fit, fit.T @ fit, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats.hessians[narrow].check, check.T @ check, rtol=1e-4, atol=1e-4)


def test_mirrored_rows_put_the_extra_level_on_their_larger_side_also_under_gptq():
    """Where the container holds +2^(k-1) too, a row whose positive extreme is the larger gets the grid
    -(2^(k-1)-1)..2^(k-1): lower error on skewed rows; GPTQ keeps every row on its own grid."""
    from msq_onnx.instrument import InputHessians

    rng = np.random.default_rng(4)
    skew = rng.exponential(1.0, size=(8, 300)).astype(np.float32) - 0.6
    w = np.concatenate([skew[:4], -skew[4:]])  # four rows with a long positive tail, four with a negative one
    plain, mirrored = search_clips(w, None, 3), search_clips(w, None, 3, mirror=True)
    assert plain.flipped is None and mirrored.flipped.tolist() == [True] * 4 + [False] * 4
    assert mirrored.error < 0.9 * plain.error
    q, scale = fake_quantize(w, mirrored.clip, 3, mirrored.flipped)
    integers = np.rint(q / scale[:, None])
    assert integers[:4].max() == 4 and integers[:4].min() >= -3
    assert integers[4:].min() == -4 and integers[4:].max() <= 3
    assert search_clips(w, None, 8, mirror=True).flipped is None  # 8 bits stay -127..127
    layer = Layer("m", "MatMul", "w", "x", "y", (300, 8), 1, transposed_weight=True)
    inputs = rng.normal(size=(4000, 300)) @ (rng.normal(size=(300, 300)) * 0.1 + np.eye(300))  # correlated
    hessians = InputHessians(inputs[::2].T @ inputs[::2], inputs[1::2].T @ inputs[1::2])
    choice = error_table(layer, w.T.copy(), None, (3,), hessians=hessians, mirrors={3: True})[3]
    assert choice.integers is not None
    assert choice.integers[:4].max() == 4 and choice.integers[:4].min() >= -3  # the extra level is used
    assert choice.integers[4:].min() >= -4 and choice.integers[4:].max() <= 3


def test_large_tables_refine_the_coarse_clipping_search_at_narrow_widths(monkeypatch):
    """A table past LARGE_LAYER searches every third ratio; below REFINED_BELOW_BITS the best one's neighbours
    are tried too, which finds lower errors than the coarse grid alone."""
    import msq_onnx.weights as weights_module

    w = np.random.default_rng(6).standard_t(4, size=(400, 32)).astype(np.float32)
    monkeypatch.setattr(weights_module, "LARGE_LAYER", 0)
    refined = {bits: search_clips(w, None, bits).error for bits in (2, 3, 8)}
    monkeypatch.setattr(weights_module, "REFINED_BELOW_BITS", 0)
    coarse = {bits: search_clips(w, None, bits).error for bits in (2, 3, 8)}
    assert refined[2] < coarse[2] and refined[3] < coarse[3]
    assert refined[8] == coarse[8]  # wide widths keep the coarse grid


def test_clip_search_in_blocks_finds_each_rows_best_ratio_on_the_full_grid(monkeypatch):
    """The search runs on blocks of rows and counts errors in grid units; every row still gets the ratio whose
    input-weighted squared error, computed directly, is lowest, and the reported error is that error's share."""
    from msq_onnx import weights as stage

    monkeypatch.setattr(stage, "SEARCH_BLOCK", 64)  # 40 columns: one row a block, 300 blocks
    rng = np.random.default_rng(3)
    matrix = (rng.standard_t(3, size=(300, 40)) * rng.uniform(0.1, 2.0, size=(300, 1))).astype(np.float32)
    weight = rng.uniform(0.1, 3.0, size=matrix.shape).astype(np.float32)
    choice = stage.search_clips(matrix, weight, 3)
    peak = np.abs(matrix).max(axis=1)
    direct = []
    for ratio in stage.CLIP_RATIOS:
        values, _ = stage.fake_quantize(matrix, peak * ratio, 3)
        direct.append((weight * (values - matrix) ** 2).sum(axis=1))
    direct = np.stack(direct, axis=1).astype(np.float64)
    best = direct[:, 0::2].argmin(axis=1) * 2  # every other ratio, then the best one's lower, then upper neighbour
    rows = np.arange(len(best))
    for offset in (-1, 1):
        near = np.clip(best + offset, 0, len(stage.CLIP_RATIOS) - 1)
        best = np.where(direct[rows, near] < direct[rows, best], near, best)
    np.testing.assert_allclose(choice.clip, peak * stage.CLIP_RATIOS[best], rtol=1e-6)
    chosen = direct[np.arange(len(best)), best]
    np.testing.assert_allclose(choice.error, chosen.sum() / (weight * matrix ** 2).sum(), rtol=1e-4)


def _residual_norm_block(norm: str = "LayerNormalization", axis: int = -1) -> onnx.ModelProto:
    """x [N, T, 8] -> MatMul + bias -> + x -> norm -> MatMul: a post-LN transformer block's output projection."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b1"),
             numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(8, np.float32), "beta"),
             numpy_helper.from_array(rng.normal(0, 0.5, (8, 3)).astype(np.float32), "w2")]
    norm_inputs = ["h", "gamma"] + (["beta"] if norm == "LayerNormalization" else [])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="bias1"),
             helper.make_node("Add", ["a1", "x"], ["h"], name="residual1"),
             helper.make_node(norm, norm_inputs, ["n"], name="norm1", axis=axis, epsilon=1e-5),
             helper.make_node("MatMul", ["n", "w2"], ["y"], name="mm2")]
    if norm == "SkipLayerNormalization":  # ONNX Runtime's fusion of the bias, the residual and the norm
        nodes[1:4] = [helper.make_node(norm, ["m1", "x", "gamma", "beta", "b1"], ["n"], name="norm1",
                                       domain="com.microsoft", epsilon=1e-5)]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("norm", ["LayerNormalization", "SkipLayerNormalization"])
def test_a_layer_whose_output_a_layer_norm_divides_has_each_hessian_row_weighed_by_that_rows_spread(monkeypatch, norm):
    """Its error reaches the model divided by the norm's per-row spread: row r of X^T X counts 1 / (var_r + eps)
    of the norm's input, in both halves and in the sums that centre them; the layer after the norm is unweighed.
    ONNX Runtime's fused SkipLayerNormalization normalizes the sum of the layer's output, the residual and the
    bias, which it gives as its optional fourth output."""
    from msq_onnx import instrument
    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.load import load_model

    monkeypatch.setattr(instrument, "MIN_ROWS_PER_INPUT", 0)
    model = _residual_norm_block(norm)
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "m.onnx")
    onnx.save(model, path)
    loaded = load_model(path)
    # rows of very different sizes: the weighing moves the Hessian far from the plain X^T X
    x = (np.random.default_rng(5).normal(0, 1, (6, 4, 8)) * np.array([0.1, 1.0, 30.0, 3.0])[None, :, None])
    x = x.astype(np.float32)
    np.savez(os.path.join(folder, "x.npz"), x=x)
    stats = instrument.run_pass(loaded, open_samples(os.path.join(folder, "x.npz"), loaded.inputs, Preprocess()),
                                (1, 2), 64, quiet=True, hessians=True)
    m1, n = tensors_of(model, ("m1", "n"), {"x": x})
    bias = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "b1"))
    h = m1 + bias + x  # the norm's input, fused or not
    by_node = {layer.nodes[0]: layer.name for layer in loaded.layers}
    weighed = stats.hessians[by_node["mm1"]]
    for half, gram, total, mass in ((slice(0, None, 2), weighed.fit, weighed.fit_sum, weighed.fit_rows),
                                    (slice(1, None, 2), weighed.check, weighed.check_sum, weighed.check_rows)):
        rows = x[half].reshape(-1, 8).astype(np.float64)
        w = 1.0 / (h[half].reshape(-1, 8).astype(np.float64).var(axis=1) + 1e-5)
        np.testing.assert_allclose(gram, (rows * w[:, None]).T @ rows, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(total, w @ rows, rtol=1e-4, atol=1e-6)
        assert mass == pytest.approx(w.sum(), rel=1e-5)
        assert not np.allclose(gram / mass, rows.T @ rows / len(rows), rtol=0.1)  # not the plain mean product
    plain = stats.hessians[by_node["mm2"]]
    fit_rows = n[0::2].reshape(-1, 8)
    np.testing.assert_allclose(plain.fit, fit_rows.T @ fit_rows, rtol=1e-4, atol=1e-4)
    assert plain.fit_rows == len(fit_rows)


def test_only_a_norm_over_the_last_axis_reached_through_adds_weighs_a_layers_rows():
    from msq_onnx.load import consumers
    from msq_onnx.ops import row_normalizer

    post = consumers(_residual_norm_block().graph)
    assert row_normalizer("m1", post).tensor == "h"
    assert row_normalizer("m1", post).centred and row_normalizer("m1", post).epsilon == pytest.approx(1e-5)
    assert not row_normalizer("m1", consumers(_residual_norm_block("RMSNormalization").graph)).centred
    assert row_normalizer("m1", consumers(_residual_norm_block(axis=1).graph)) is None  # not a row's spread
    assert row_normalizer("n", post) is None  # read by a MatMul, not an Add or a norm
    # pre-LN: the residual sum is read by the next block's norm and by the next residual Add
    pre = _residual_norm_block()
    pre.graph.node.append(onnx.helper.make_node("Add", ["h", "n"], ["h2"], name="residual2"))
    assert row_normalizer("m1", consumers(pre.graph)).tensor == "h"
    relu = _residual_norm_block()
    relu.graph.node[1].op_type = "Mul"  # a scale between the layer and the norm: its errors are not the row's
    assert row_normalizer("m1", consumers(relu.graph)) is None


def _heavy_tailed_conv(seed=5, shape=(24, 16, 3, 3)):
    rng = np.random.default_rng(seed)
    layer = conv_layer(shape)
    weight = (rng.laplace(size=shape) * rng.uniform(0.3, 2.0, (shape[0], 1, 1, 1))).astype(np.float32)
    power = rng.uniform(0.1, 3.0, shape[1]).astype(np.float32)  # E[x^2] per input channel
    return layer, weight, power


def test_level_sets_lower_the_weighted_error_and_keep_the_width():
    """A level set gives each row at most 2^k values, from one set of 7-bit integers for the whole layer (a row
    may mirror it), and its table error is the input-weighted error of exactly those values."""
    layer, weight, power = _heavy_tailed_conv()
    widths = (2, 3, 4, 5)
    uniform = error_table(layer, weight, power, widths, mirrors={b: True for b in widths})
    shared = error_table(layer, weight, power, widths, mirrors={b: True for b in widths},
                         level_sets={b: True for b in widths})
    matrix, importance = as_matrix(layer, weight), input_weights(layer, power)
    for bits in (2, 3, 4):
        choice = shared[bits]
        assert choice.level_set is not None and choice.error < 0.95 * uniform[bits].error
        integers = choice.integers.astype(np.int64)
        assert np.abs(integers).max() <= LEVEL_CODE_LIMIT
        assert len(choice.level_set) <= 2 ** bits
        assert set(np.unique(integers)) <= set(choice.level_set) | set(-choice.level_set)
        assert all(len(np.unique(row)) <= 2 ** bits for row in integers)
        assert all(set(row) <= set(choice.level_set) or set(row) <= set(-choice.level_set) for row in integers)
        step = choice.clip / levels(bits)
        measured = (importance * (matrix - integers * step[:, None]) ** 2).sum() / (importance * matrix ** 2).sum()
        assert measured == pytest.approx(choice.error, rel=1e-4)
        # the layer as written: exactly those values, and the bias correction of them
        written = quantize_layer(layer, weight, None, choice, np.zeros(16, np.float32))
        assert np.allclose(as_matrix(layer, written.weight), integers * written.scale[:, None], atol=1e-6)
    assert shared[5].level_set is None and shared[5].error == uniform[5].error  # past SHARED_LEVELS_MAX_BITS


def test_each_pass_over_the_rows_lowers_a_level_set_error(monkeypatch):
    """The passes after the fit (nearest level, then each row's least-squares step) only lower the error; the
    shipped number of them is past the first, so the layer's error is below what one pass leaves."""
    import msq_onnx.weights as weights_module

    layer, weight, power = _heavy_tailed_conv(seed=7, shape=(48, 32, 3, 3))
    errors = {}
    for rounds in (1, weights_module.LEVEL_STEP_ROUNDS):
        monkeypatch.setattr(weights_module, "LEVEL_STEP_ROUNDS", rounds)
        table = error_table(layer, weight, power, (2, 3), mirrors={2: True, 3: True}, level_sets={2: True, 3: True})
        errors[rounds] = [table[bits].error for bits in (2, 3)]
    assert weights_module.LEVEL_STEP_ROUNDS > 1
    assert all(later < first for later, first in zip(errors[weights_module.LEVEL_STEP_ROUNDS], errors[1]))


def test_level_sets_only_where_the_container_takes_them():
    """A narrow container's integers are the levels themselves: there the grid stays uniform."""
    layer, weight, power = _heavy_tailed_conv(seed=6)
    table = error_table(layer, weight, power, (3, 4), mirrors={3: True, 4: True}, level_sets={3: False, 4: True})
    assert table[3].level_set is None and table[3].integers is None
    assert table[4].level_set is not None


def test_consecutive_widths_walk_from_the_last_best_ratio_to_the_full_grids_best(monkeypatch):
    """A layer's widths share one SearchRows: from the third width on, each row's search walks from a start
    predicted from the widths before it, ends on the ratio the full grid finds best (these rows' errors are
    unimodal in the ratio), and passes over far fewer weights than the coarse-to-fine search does."""
    from msq_onnx import weights as stage

    rng = np.random.default_rng(8)
    matrix = (rng.standard_t(5, size=(200, 160)) * rng.uniform(0.2, 2.0, size=(200, 1))).astype(np.float32)
    weight = rng.uniform(0.5, 2.0, size=matrix.shape).astype(np.float32)
    peak = np.abs(matrix).max(axis=1)
    passed = {"weights": 0}
    original = stage._row_errors

    def counted(values, *rest):
        inner = original(values, *rest)

        def row_errors(ratio, rows=None):
            passed["weights"] += values.size if rows is None else len(rows) * values.shape[1]
            return inner(ratio, rows)
        return row_errors

    monkeypatch.setattr(stage, "_row_errors", counted)
    walked, apart = {}, {}
    prepared = stage.SearchRows(matrix, weight)
    for bits in range(2, 9):
        walked[bits] = stage.search_clips(prepared, None, bits)
    walked_cost, passed["weights"] = passed["weights"], 0
    for bits in range(2, 9):
        apart[bits] = stage.search_clips(matrix, weight, bits)
    assert walked_cost < 0.7 * passed["weights"]
    for bits in range(2, 9):
        direct = np.stack([(weight * (stage.fake_quantize(matrix, peak * ratio, bits)[0] - matrix) ** 2).sum(axis=1)
                           for ratio in stage.CLIP_RATIOS], axis=1)
        best = peak * stage.CLIP_RATIOS[direct.argmin(axis=1)]
        found = {name: np.mean(np.isclose(choice[bits].clip, best, rtol=1e-6))
                 for name, choice in (("walked", walked), ("apart", apart))}
        assert found["walked"] >= min(found["apart"], 0.97), bits
        assert walked[bits].error <= apart[bits].error * (1 + 1e-3)
    empty = stage.SearchRows(np.zeros((0, 160), np.float32), None)  # nothing to walk from: no error either
    assert all(stage.search_clips(empty, None, bits).clip.shape == (0,) for bits in range(2, 9))
    # Rows of a few weights (a depthwise convolution's 9) keep the coarse-to-fine search at every width
    short = rng.standard_t(3, size=(300, 9)).astype(np.float32)
    shared = stage.SearchRows(short, None)
    for bits in range(2, 9):
        np.testing.assert_array_equal(stage.search_clips(shared, None, bits).clip,
                                      stage.search_clips(short, None, bits).clip)


def test_hessian_errors_through_the_cholesky_factor_match_the_full_product():
    """The triangular product measures what (w - q) H (w - q)^T does, also on a LayerNorm's centred outputs,
    whose Hessian rounding leaves just short of positive definite (one direction of no variance)."""
    from msq_onnx.weights import hessian_errors, hessian_factor

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(2000, 48)).astype(np.float32)
    normed = rows - rows.mean(axis=1, keepdims=True)  # each row sums to zero: H has a null direction
    normed /= normed.std(axis=1, keepdims=True)
    matrix = rng.normal(size=(24, 48)).astype(np.float32)
    candidates = np.tile(np.round(matrix * 4) / 4, (3, 1)) + rng.normal(0, 0.01, (72, 48)).astype(np.float32)
    for inputs in (rows, normed):
        centred = inputs - inputs.mean(axis=0)
        hessian = (centred.T @ centred).astype(np.float32)
        factor = hessian_factor(hessian)
        assert factor is not None and np.allclose(np.triu(factor, 1), 0)
        exact = hessian_errors(matrix, candidates, hessian.astype(np.float64))
        np.testing.assert_allclose(hessian_errors(matrix, candidates, hessian, factor), exact, rtol=1e-4)
    dead = hessian.astype(np.float64)
    dead[:, 0] = dead[0, :] = 0.0  # an input that never fires: no factor, the full product serves
    dead[0, 0] = -1.0
    assert hessian_factor(dead) is None


def test_gptq_inverse_factor_is_the_upper_cholesky_factor_of_the_inverse():
    """inverse_factor gives the U of H^-1 = U^T U that GPTQ walks (upper, positive diagonal) without inverting H,
    and refuses a Hessian that is not positive definite, where GPTQ falls back to nearest rounding."""
    from msq_onnx.weights import inverse_factor

    rng = np.random.default_rng(1)
    rows = rng.normal(size=(500, 32))
    hessian = rows.T @ rows
    upper = inverse_factor(hessian)
    assert np.allclose(np.tril(upper, -1), 0) and (np.diag(upper) > 0).all()
    np.testing.assert_allclose(upper.T @ upper, np.linalg.inv(hessian), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(upper, np.linalg.cholesky(np.linalg.inv(hessian)).T, rtol=1e-9, atol=1e-12)
    indefinite = hessian.copy()
    indefinite[0, 0] = -1.0
    with pytest.raises(np.linalg.LinAlgError):
        inverse_factor(indefinite)


def test_transposed_copies_match_numpys_in_every_order_dtype_and_shape():
    from msq_onnx.weights import TRANSPOSE_TILE, contiguous, transposed

    rng = np.random.default_rng(3)
    for rows, columns in ((1, 5), (TRANSPOSE_TILE - 1, 7), (TRANSPOSE_TILE * 3 + 5, 33)):
        for dtype in (np.float32, np.int8):
            matrix = rng.integers(-100, 100, (rows, columns)).astype(dtype)
            order = rng.permutation(columns)
            assert np.array_equal(transposed(matrix), matrix.T) and transposed(matrix).flags.c_contiguous
            assert np.array_equal(transposed(matrix, order), matrix[:, order].T)
        view = matrix.astype(np.float32).T  # a MatMul's [in, out] weight as [out, in] rows
        copied = contiguous(view)
        assert copied.flags.c_contiguous and copied.dtype == np.float32 and np.array_equal(copied, view)
        strided = matrix.astype(np.float64)[::2]
        assert np.array_equal(contiguous(strided), strided.astype(np.float32))


@pytest.mark.parametrize("blocked", [False, True])
def test_a_layer_written_from_its_integers_without_a_bias_to_correct_gets_them_alone(monkeypatch, blocked):
    """quantize_layer(keep_integers=True) on a layer with no bias correction (an embedding table) rounds its int8
    integers a few rows at a time and makes no float copy of the weight: the integers and scales are the ones the
    float path makes, rows flipped or not, one scale per row or per block."""
    import msq_onnx.weights as weights_module

    rng = np.random.default_rng(3)
    weight = rng.standard_t(3, (40, 32)).astype(np.float32)
    layer = Layer("g", "Gemm", "w", "x", "y", weight.shape, 0)  # no bias factor: nothing to correct
    clip = np.abs(weight).max(axis=1) * 0.7
    if blocked:
        clip = np.abs(weight.reshape(40, 4, 8)).max(axis=2) * 0.7
    choice = weights_module.WidthChoice(3, clip, 0.0, flipped=rng.random(clip.shape) < 0.5)
    monkeypatch.setattr(weights_module, "SEARCH_BLOCK", 96)  # three rows a block: many blocks, one short
    alone = quantize_layer(layer, weight, None, choice, None, keep_integers=True)
    whole = quantize_layer(layer, weight, None, choice, None, keep_integers=False)
    assert alone.weight is None and alone.bias is None
    integers = np.rint(as_matrix(layer, whole.weight) / weights_module.steps(whole.scale, 32))
    np.testing.assert_array_equal(alone.integers, integers.astype(np.int8))
    np.testing.assert_array_equal(alone.scale, whole.scale)
    assert alone.integers.min() < -3 and alone.integers.max() > 3  # both sides' extra level used


def test_blas_routines_let_the_gil_go_and_equal_scipys():
    """The error tables' triangular product and inverse run through ctypes where scipy bundles OpenBLAS: a ctypes
    function without the Python-API flag releases the GIL for the call (scipy's wrappers hold it, stalling the
    other table worker); the results are scipy's own, bit for bit, in place or on a copy of a C-ordered input."""
    import ctypes

    from scipy.linalg import _fblas, lapack
    from scipy.linalg.blas import strmm

    from msq_onnx import weights

    rng = np.random.default_rng(3)
    lower = np.tril(rng.standard_normal((96, 96))).astype(np.float32)
    rows = rng.standard_normal((250, 96)).astype(np.float32)
    expected = strmm(1.0, lower, rows.T.copy(order="F"), side=0, lower=1, trans_a=1)
    in_place = rows.copy()
    product = weights.lower_transposed_product(lower, in_place.T)
    np.testing.assert_array_equal(product, expected)
    np.testing.assert_array_equal(weights.lower_transposed_product(lower, np.ascontiguousarray(rows.T)), expected)
    square = np.tril(rng.standard_normal((64, 64))) + 8 * np.eye(64)
    inverse, info = weights.lower_inverse(square)
    expected_inverse, expected_info = lapack.dtrtri(square, lower=1)
    assert info == expected_info == 0
    np.testing.assert_array_equal(inverse, expected_inverse)
    singular = square.copy()
    singular[5, 5] = 0.0
    assert weights.lower_inverse(singular)[1] == lapack.dtrtri(singular, lower=1)[1] == 6
    if hasattr(ctypes.CDLL(_fblas.__file__), "scipy_strmm_"):  # scipy's wheels
        for routine in ("strmm", "dtrtri"):
            function = weights.without_gil(routine)
            assert function is not None
            assert not function._flags_ & ctypes._FUNCFLAG_PYTHONAPI
        assert np.shares_memory(product, in_place)  # computed in place, as scipy's overwrite_b


def test_blas_routines_copy_what_they_may_not_write_and_refuse_mismatched_shapes():
    """A read-only Fortran-ordered input is copied, never written through (ctypes would write into it); empty
    inputs give scipy's answers; shapes that do not match raise instead of reading past an array."""
    from scipy.linalg import lapack
    from scipy.linalg.blas import strmm

    from msq_onnx import weights

    rng = np.random.default_rng(5)
    lower = np.tril(rng.standard_normal((6, 6))).astype(np.float32)
    frozen = np.asfortranarray(rng.standard_normal((6, 4)), np.float32)
    before = frozen.copy()
    frozen.flags.writeable = False
    product = weights.lower_transposed_product(lower, frozen)
    np.testing.assert_array_equal(frozen, before)
    np.testing.assert_array_equal(product, strmm(1.0, lower, before.copy(order="F"), side=0, lower=1, trans_a=1))
    for columns in (np.zeros((6, 0), np.float32, order="F"), np.zeros((0, 3), np.float32, order="F")):
        square = np.zeros((len(columns),) * 2, np.float32)
        assert weights.lower_transposed_product(square, columns).shape == columns.shape
    with pytest.raises(ValueError):
        weights.lower_transposed_product(lower[:3, :3], np.zeros((4, 2), np.float32, order="F"))
    empty = np.zeros((0, 0))
    assert weights.lower_inverse(empty)[1] == lapack.dtrtri(empty, lower=1)[1]
    with pytest.raises(ValueError):
        weights._call_dtrtri(weights.without_gil("dtrtri") or (lambda *args: None), np.zeros((3, 2)))


def test_blas_routines_fall_back_to_scipy(monkeypatch):
    from scipy.linalg import lapack
    from scipy.linalg.blas import strmm

    from msq_onnx import weights

    monkeypatch.setattr(weights, "without_gil", lambda routine: None)
    rng = np.random.default_rng(4)
    lower = np.tril(rng.standard_normal((40, 40))).astype(np.float32)
    columns = rng.standard_normal((40, 30)).astype(np.float32).copy(order="F")
    expected = strmm(1.0, lower, columns.copy(order="F"), side=0, lower=1, trans_a=1)
    np.testing.assert_array_equal(weights.lower_transposed_product(lower, columns), expected)
    square = lower.astype(np.float64) + 6 * np.eye(40)
    np.testing.assert_array_equal(weights.lower_inverse(square)[0], lapack.dtrtri(square, lower=1)[0])

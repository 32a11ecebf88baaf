import numpy as np
import pytest

from msq_onnx.features import FeatureBank, _bin_edges, cap_dimension, embed, pyramid_pool


def naive_pool(x, levels):
    out = []
    for b in levels:
        for top, bottom in _bin_edges(x.shape[2], b):
            for left, right in _bin_edges(x.shape[3], b):
                out.append(x[:, :, top:bottom, left:right].mean(axis=(2, 3)))
    return np.stack(out, axis=2)


def test_pyramid_matches_adaptive_average_pooling_on_odd_sizes():
    x = np.random.default_rng(0).normal(size=(3, 5, 7, 9)).astype(np.float32)
    pooled = pyramid_pool(x, (1, 2, 4))
    assert pooled.shape == (3, 5, 21)
    np.testing.assert_allclose(pooled, naive_pool(x, (1, 2, 4)), atol=1e-5)


def test_level_one_is_global_average():
    x = np.random.default_rng(1).normal(size=(2, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(pyramid_pool(x, (1,))[:, :, 0], x.mean(axis=(2, 3)), atol=1e-5)


def test_bins_larger_than_the_map_are_never_empty():
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    pooled = pyramid_pool(x, (4,))
    assert np.isfinite(pooled).all() and pooled.shape == (2, 3, 16)


def test_sequences_pool_along_time_and_channels_last_is_respected():
    x = np.random.default_rng(2).normal(size=(2, 8, 5)).astype(np.float32)  # [N, T, C]
    pooled = pyramid_pool(x, (1, 2), channels_last=True)
    assert pooled.shape == (2, 5, 3)
    np.testing.assert_allclose(pooled[:, :, 0], x.mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(pooled[:, :, 1], x[:, :4].mean(axis=1), atol=1e-5)


def test_flat_features_pass_through():
    x = np.random.default_rng(3).normal(size=(4, 10)).astype(np.float32)
    np.testing.assert_array_equal(embed(x, max_dim=100), x)


def test_cap_hashes_wide_embeddings_keeping_their_geometry():
    rng = np.random.default_rng(4)
    pooled = rng.normal(size=(40, 300, 21)).astype(np.float32)  # 6,300 values per sample
    capped = cap_dimension(pooled, max_dim=1024, seed=0)
    assert capped.shape == (40, 1024)
    flat = pooled.reshape(40, -1)
    exact, hashed = flat @ flat.T, capped @ capped.T
    # norms (diagonal) survive (about 5% spread at 1,024 buckets); cross terms stay near zero
    np.testing.assert_allclose(np.diag(hashed), np.diag(exact), rtol=0.25)
    assert np.abs(hashed - np.diag(np.diag(hashed))).max() < 0.2 * np.diag(exact).min()
    np.testing.assert_array_equal(capped, cap_dimension(pooled, 1024, seed=0))
    assert not np.array_equal(capped, cap_dimension(pooled, 1024, seed=1))


def test_narrow_embeddings_are_not_touched():
    pooled = np.random.default_rng(5).normal(size=(2, 10, 3)).astype(np.float32)
    np.testing.assert_array_equal(cap_dimension(pooled, max_dim=30), pooled.reshape(2, 30))


def test_bank_concatenates_batches_in_order():
    bank = FeatureBank(["a"], levels=(1,), max_dim=64)
    first, second = np.ones((2, 3, 4, 4), np.float32), np.zeros((1, 3, 4, 4), np.float32)
    bank.add("a", first)
    bank.add("a", second)
    matrix = bank.matrix("a")
    assert matrix.shape == (3, 3)
    assert matrix[:2].sum() == 6 and matrix[2].sum() == 0


def test_bank_stops_growing_at_its_sample_cap():
    bank = FeatureBank(["a"], levels=(1,), max_dim=64, max_samples=5)
    for _ in range(4):
        bank.add("a", np.full((2, 3, 4, 4), 70000.0, np.float32))  # beyond float16's range: clipped, not inf
    matrix = bank.take("a")
    assert matrix.shape == (5, 3) and bank.names == []
    assert np.isfinite(matrix).all()


def test_bank_hashes_pyramids_in_chunks_exactly_as_one_sample_at_a_time():
    """Pyramids wait to be hashed HASH_CHUNK samples at a time: the embeddings equal embed()'s of each sample,
    bit for bit, through chunk boundaries, a direct embedding between them, and the sample cap."""
    from msq_onnx.features import HASH_CHUNK

    rng = np.random.default_rng(7)
    bank = FeatureBank(["a", "b"], levels=(1, 2, 4), max_dim=64, max_samples=HASH_CHUNK * 2 + 5)
    expected = {"a": [], "b": []}
    for i in range(HASH_CHUNK * 2 + 9):
        probe = rng.normal(size=(1, 17 + i % 5, 24)).astype(np.float32)  # [1, T, C]: 168 pooled values, hashed
        mask = np.ones((1, probe.shape[1]), np.int64)
        bank.add("a", probe, channels_last=True, mask=mask)
        expected["a"].append(embed(probe, (1, 2, 4), 64, True, 0, mask))
        if i == HASH_CHUNK + 3:
            direct = rng.normal(size=(1, 64)).astype(np.float32)
            bank.add_embedding("b", direct)
            expected["b"].append(direct)
        else:
            bank.add("b", probe, channels_last=True, mask=mask)
            expected["b"].append(embed(probe, (1, 2, 4), 64, True, 0, mask))
    for name in ("a", "b"):
        wanted = np.concatenate(expected[name])[:HASH_CHUNK * 2 + 5].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(bank.matrix(name), wanted)


def test_bank_holds_few_wide_pyramids_before_hashing_them():
    """A map's pyramid of 1,280 channels x 21 bins is 107 KB a sample: 32 of them per layer held EfficientNet-Lite0's
    pass 64 MB above its peak. Such samples are hashed one or two at a time."""
    bank = FeatureBank(["a"], levels=(1, 2, 4), max_dim=1024)
    pooled = np.ones((1, 1280, 21), np.float32)
    for _ in range(10):
        bank.add_pyramid("a", pooled)
        assert sum(part.nbytes for part in bank._waiting["a"]) < 2 * pooled.nbytes
    assert bank.matrix("a").shape == (10, 1024)


def test_a_waiting_pyramid_does_not_keep_the_batch_it_was_cut_from():
    """One sample's pyramid cut from a batch's output would keep the whole output while it waits (a review's)."""
    bank = FeatureBank(["a"], levels=(1,), max_dim=1024)
    batch = np.ones((64, 10, 1), np.float32)
    bank.add_pyramid("a", batch[:1])
    waiting = bank._waiting["a"][0]
    assert waiting.base is None or waiting.base.nbytes <= 2 * waiting.nbytes


def test_sequence_pyramid_pools_real_tokens_only():
    """Level b cuts the real tokens into b segments; padding (mask 0) never enters, whatever it holds."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 9, 5)).astype(np.float32)  # [N, T, C], channels last as a MatMul's output
    mask = np.ones((2, 9), np.int64)
    mask[1, 6:] = 0
    pooled = pyramid_pool(x, (1, 2), channels_last=True, mask=mask)
    assert pooled.shape == (2, 5, 3)
    np.testing.assert_allclose(pooled[1, :, 0], x[1, :6].mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(pooled[1, :, 1], x[1, :3].mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(pooled[1, :, 2], x[1, 3:6].mean(axis=0), atol=1e-5)
    noisy = x.copy()
    noisy[1, 6:] = 1e6  # padding content must not matter
    np.testing.assert_allclose(pyramid_pool(noisy, (1, 2), channels_last=True, mask=mask), pooled, atol=1e-4)
    channels_first = pyramid_pool(np.swapaxes(x, 1, 2), (1, 2), channels_last=False, mask=mask)
    np.testing.assert_allclose(channels_first, pooled, atol=1e-5)


@pytest.mark.parametrize("levels", [(1, 2, 4), (1, 3)])
def test_the_graphs_sequence_pyramid_cuts_any_length_as_numpy_does(levels):
    """The pass pools a [N, T, C] probe in the graph over a T it learns at run time: every length, those
    shorter than the finest level and those the bins overlap on, gives numpy's pyramid and the probe's shape."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from msq_onnx.instrument import _sequence_pyramid

    nodes, constants, (pooled, shape), _ = _sequence_pyramid("x", "seq", levels)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "t", 5])],
                              [helper.make_tensor_value_info(pooled, TensorProto.FLOAT, None),
                               helper.make_tensor_value_info(shape, TensorProto.INT64, None)], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for length in (1, 2, 3, 5, 8, 9, 13, 100):
        x = rng.normal(size=(2, length, 5)).astype(np.float32)
        got, got_shape = session.run(None, {"x": x})
        np.testing.assert_allclose(got, pyramid_pool(x, levels, channels_last=True), rtol=1e-5, atol=1e-6)
        assert got_shape.tolist() == [2, length, 5]


def test_the_pass_pools_sequences_in_the_graph_and_padded_batches_over_their_real_tokens(tmp_path):
    """Unpadded texts of any length come pooled by the graph, a padded batch pools its probes in numpy over the
    tokens its mask marks: either way the bank holds numpy's pyramid of the probe, and a sample's rows are its
    sequence length."""
    import onnx
    import onnxruntime as ort

    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.instrument import attention_mask_input, build_instrumented, run_pass
    from msq_onnx.load import load_model
    from test_any_model import encoder, padded_batch, save, token_folder

    loaded = load_model(save(encoder(), tmp_path / "encoder.onnx"))
    instrumented, outputs = build_instrumented(loaded, levels=(1, 2, 4))
    dense = [layer for layer in loaded.layers if layer.op_type == "MatMul"]
    assert dense and all(layer.name in outputs["sequence_pyramid"] for layer in dense)
    # the query, key and value outputs have one length: one averaging matrix serves them
    assert outputs["shared_lengths"]
    matrices = [node for node in instrumented.graph.node if node.name.endswith("_matrix")]
    assert 0 < len(matrices) < len({outputs["sequence_pyramid"][layer.name] for layer in dense})
    probes = onnx.ModelProto()
    probes.CopyFrom(loaded.model)
    probes.graph.output.extend([onnx.helper.make_tensor_value_info(layer.probe_name, onnx.TensorProto.FLOAT, None)
                                for layer in loaded.layers])
    session = ort.InferenceSession(probes.SerializeToString(), providers=["CPUExecutionProvider"])
    assert attention_mask_input(loaded) == "attention_mask"

    unpadded = token_folder(tmp_path / "texts", 9)  # one text a sample, 4-12 tokens
    np.savez(tmp_path / "padded.npz", **padded_batch(np.random.default_rng(3), [4, 6, 5, 7, 9, 3], 10))
    for source, batch_size in ((unpadded, 1), (str(tmp_path / "padded.npz"), 3)):
        samples = open_samples(source, loaded.inputs, Preprocess())
        stats = run_pass(loaded, samples, (1, 2, 4), 4096, quiet=True, batch_size=batch_size)
        feeds = list(samples.batches(1))
        for layer in loaded.layers:
            expected = np.concatenate([embed(session.run([layer.probe_name], feed)[0], (1, 2, 4), 4096,
                                             channels_last=True, mask=feed["attention_mask"])
                                       if batch_size > 1 else
                                       embed(session.run([layer.probe_name], feed)[0], (1, 2, 4), 4096,
                                             channels_last=True) for feed in feeds])
            np.testing.assert_allclose(stats.features.matrix(layer.name), expected, rtol=2e-3, atol=2e-3)
        lengths = [feed["input_ids"].shape[1] for feed in feeds]
        assert stats.rows[dense[0].name] == (int(np.median(lengths)) if batch_size == 1 else 10)


def test_sequences_a_model_says_are_one_length_and_are_not_still_pool_over_their_own(tmp_path):
    """Sequences whose declared symbol says they have one length share an averaging matrix. A model's value_info
    that names a shorter sequence with the longer one's symbol makes the shared product fail: the pass runs
    again with a matrix per sequence, and its features are those of the pass that never shared."""
    from onnx import TensorProto, helper, numpy_helper

    from msq_onnx import instrument
    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.load import load_model

    rng = np.random.default_rng(0)
    constants = [numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "w1"),
                 numpy_helper.from_array(rng.normal(size=(6, 5)).astype(np.float32), "w2"),
                 numpy_helper.from_array(np.array([1], np.int64), "start"),
                 numpy_helper.from_array(np.array([1 << 62], np.int64), "end"),
                 numpy_helper.from_array(np.array([1], np.int64), "axis")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="first"),
             helper.make_node("Slice", ["a", "start", "end", "axis"], ["b"], name="drop_first_token"),
             helper.make_node("MatMul", ["b", "w2"], ["c"], name="second")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "t", 4])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n", None, 5])], constants,
                              value_info=[helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", "t", 6])])
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                            ir_version=8).SerializeToString())
    loaded = load_model(str(onnx_path))
    _, outputs = instrument.build_instrumented(loaded, levels=(1, 2, 4))
    assert outputs["shared_lengths"]  # the declared symbol is believed when the graph is built
    np.savez(tmp_path / "x.npz", x=rng.normal(size=(12, 7, 4)).astype(np.float32))
    samples = open_samples(str(tmp_path / "x.npz"), loaded.inputs, Preprocess())
    stats = instrument.run_pass(loaded, samples, (1, 2, 4), 4096, quiet=True)
    unshared = instrument._run_pass(loaded, samples, (1, 2, 4), 4096, 1, True, 0, False, share_lengths=False)
    for layer in loaded.layers:
        np.testing.assert_array_equal(stats.features.matrix(layer.name), unshared.features.matrix(layer.name))
    assert stats.rows == unshared.rows == {"first": 7, "second": 6}


@pytest.mark.parametrize("one_product,size", [(True, 9), (False, 9), (True, 8)])
def test_maps_of_a_fixed_size_are_pooled_in_the_graph_exactly_as_numpy_pools_them(tmp_path, monkeypatch, one_product,
                                                                                   size):
    """The calibration pass returns the bin averages of fixed-size maps instead of the maps (in one product,
    rows and columns apart for a map too large for one, or from an AveragePool's equal bins where the finest
    level divides the map); the embeddings equal numpy's pyramid pooling of the maps themselves."""
    from msq_onnx import instrument

    if not one_product:
        monkeypatch.setattr(instrument, "FLAT_POOLING_MAX", 0)
    import onnx
    import onnxruntime as ort

    from conftest import samples_for, tiny_cnn
    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.features import embed
    from msq_onnx.instrument import build_instrumented, run_pass
    from msq_onnx.load import load_model

    model = tiny_cnn(channels=2, size=size)  # 9 x 9: bins of a level overlap, as in adaptive pooling
    onnx.save(model, tmp_path / "m.onnx")
    loaded = load_model(str(tmp_path / "m.onnx"))
    x = samples_for(model, 5, with_labels=False)["x"]
    np.savez(tmp_path / "x.npz", x=x)
    instrumented, outputs = build_instrumented(loaded, levels=(1, 2, 4))
    convs = [layer for layer in loaded.layers if layer.op_type == "Conv"]
    assert all(layer.name in outputs["pyramid" if one_product else "grid"] for layer in convs) and convs
    pooled = {node.input[0] for node in instrumented.graph.node if node.op_type == "AveragePool"}
    assert pooled == ({layer.probe_name for layer in convs} if size % 4 == 0 else set())
    stats = run_pass(loaded, open_samples(str(tmp_path / "x.npz"), loaded.inputs, Preprocess()), (1, 2, 4), 4096,
                     quiet=True)
    probe = onnx.ModelProto()
    probe.CopyFrom(loaded.model)
    probe.graph.output.extend([onnx.helper.make_tensor_value_info(layer.probe_name, onnx.TensorProto.FLOAT, None)
                               for layer in convs])
    maps = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        [layer.probe_name for layer in convs], {"x": x})
    for layer, values in zip(convs, maps):
        np.testing.assert_allclose(stats.features.matrix(layer.name), embed(values, (1, 2, 4), 4096),
                                   rtol=2e-3, atol=2e-3)  # the bank keeps float16


def test_a_tensor_feeding_only_a_relu_or_clip_takes_the_activations_range_unmeasured(tmp_path):
    """ORT's QDQ quantizer quantizes such a tensor on its activation's output range, so the pass does not
    reduce it (which also lets ORT fuse the Conv with its activation); a graph output is still measured."""
    import onnx

    from conftest import samples_for, tiny_cnn
    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.instrument import build_instrumented, run_pass
    from msq_onnx.load import load_model

    model = tiny_cnn()
    model.graph.output.append(onnx.helper.make_tensor_value_info("c3", onnx.TensorProto.FLOAT, ["N", 16, 8, 8]))
    onnx.save(model, tmp_path / "m.onnx")
    loaded = load_model(str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "x.npz", x=samples_for(model, 6, with_labels=False)["x"])
    instrumented, outputs = build_instrumented(loaded, levels=(1, 2))
    reduced = {node.input[0] for node in instrumented.graph.node
               if node.op_type in ("ReduceMin", "ReduceMax", "GlobalMaxPool")}
    # c3 is a graph output: its Relu stays out of ORT's region (its quantizer would clip c3 at 0), so nothing static
    # reads r3, and the next layer's input (the Flatten's) is what is measured
    assert {"c1", "c2"}.isdisjoint(reduced) and {"x", "r1", "r2", "c3"} <= reduced and "r3" not in reduced
    # A Relu's or Clip(0, 6)'s output is never negative: only its maximum is measured, and its range starts at 0
    minimum = {node.input[0] for node in instrumented.graph.node if node.op_type == "ReduceMin"}
    assert {"x", "c3"} <= minimum and minimum.isdisjoint({"r1", "r2"})
    stats = run_pass(loaded, open_samples(str(tmp_path / "x.npz"), loaded.inputs, Preprocess()), (1, 2), 64,
                     quiet=True)
    assert stats.ranges["c1"] == stats.ranges["r1"] and stats.ranges["c2"] == stats.ranges["r2"]
    assert stats.ranges["r2"][1] <= 6.0 and stats.ranges["c3"][0] < 0.0 <= stats.ranges["r1"][0]


def test_only_ops_that_cannot_go_negative_skip_their_minimum():
    """A Relu, and a Clip whose lower bound is a constant >= 0 (an input from opset 11, an attribute before);
    not a Clip with no lower bound, a negative one, one computed at run time, or one above a negative max
    (the output is then the max); nor an op of another domain that shares a name."""
    from onnx import TensorProto, helper, numpy_helper

    from msq_onnx.ops import nonnegative_tensors

    def model(nodes, inits, opset):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, [2]) for n in nodes],
                                  inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])

    scalars = [numpy_helper.from_array(np.float32(v), name) for name, v in (("zero", 0.0), ("minus", -1.0),
                                                                          ("six", 6.0))]
    scalars.append(numpy_helper.from_array(np.zeros(0, np.float32), "empty"))
    new = model([helper.make_node("Relu", ["x"], ["relu"]),
                 helper.make_node("Clip", ["x", "zero", "six"], ["c06"]),
                 helper.make_node("Clip", ["x", "minus", "six"], ["cm16"]),
                 helper.make_node("Clip", ["x", "", "six"], ["c6"]),
                 helper.make_node("Clip", ["x", "relu"], ["cdyn"]),
                 helper.make_node("Clip", ["x", "zero", "minus"], ["upside"]),
                 helper.make_node("Clip", ["x", "zero", "relu"], ["cdynmax"]),
                 helper.make_node("Clip", ["x", "empty"], ["cempty"]),
                 helper.make_node("Relu", ["x"], ["custom"], domain="com.example"),
                 helper.make_node("Tanh", ["x"], ["tanh"])], scalars, 13)
    assert nonnegative_tensors(new) == {"relu", "c06"}
    old = model([helper.make_node("Clip", ["x"], ["a"], min=0.0, max=6.0),
                 helper.make_node("Clip", ["x"], ["b"], max=6.0),
                 helper.make_node("Clip", ["x"], ["c"], min=-0.5),
                 helper.make_node("Clip", ["x"], ["d"], min=1.0, max=-2.0)], [], 10)
    assert nonnegative_tensors(old) == {"a"}


def test_a_chain_of_activations_lends_the_last_ones_range_to_every_tensor_before_it(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.instrument import build_instrumented, run_pass
    from msq_onnx.load import load_model

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Clip", ["r", "lo", "hi"], ["y"])], "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [numpy_helper.from_array(rng.normal(size=(4, 2, 1, 1)).astype(np.float32), "w"),
         numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(0.5), "hi")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    loaded = load_model(str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "x.npz", x=rng.normal(size=(5, 2, 6, 6)).astype(np.float32))
    _, outputs = build_instrumented(loaded)
    assert outputs["borrowed"] == {"c": "y", "r": "y"}
    stats = run_pass(loaded, open_samples(str(tmp_path / "x.npz"), loaded.inputs, Preprocess()), (1, 2), 64,
                     quiet=True)
    assert stats.ranges["c"] == stats.ranges["r"] == stats.ranges["y"] and stats.ranges["y"][1] <= 0.5


def test_only_a_clips_data_input_borrows_its_range_not_its_bounds():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from msq_onnx.ops import range_sources

    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["hi"], value=numpy_helper.from_array(np.float32(6.0))),
         helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Clip", ["c", "", "hi"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])],
        [numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")])
    sources = range_sources(onnx.helper.make_model(graph))
    assert sources["c"] == "y" and sources["hi"] == "hi"


def test_a_layer_on_a_vector_sums_its_moments_over_every_batch(tmp_path):
    """A MatMul fed a 1-D vector (pooled over the batch) has 0-d moments: they add up like any other."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.instrument import run_pass
    from msq_onnx.load import load_model

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["v"], axes=[0], keepdims=0, name="pool"),
         helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
         helper.make_node("MatMul", ["v", "W2"], ["b"], name="mm2"),
         helper.make_node("Add", ["a", "b"], ["y"], name="add")], "vector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), name) for name in ("W1", "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    loaded = load_model(str(tmp_path / "m.onnx"))
    x = rng.standard_normal((40, 4)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    stats = run_pass(loaded, open_samples(str(tmp_path / "x.npz"), loaded.inputs, Preprocess()), (1, 2), 64,
                     quiet=True)
    vector = next(layer.name for layer in loaded.layers if layer.nodes[0] == "mm2")
    assert np.ndim(stats.input_mean[vector]) == 0
    np.testing.assert_allclose(stats.input_mean[vector], x.mean(), rtol=1e-5)  # each sample's own mean, averaged
    np.testing.assert_allclose(stats.input_sq[vector], (x ** 2).mean(), rtol=1e-5)


def test_layers_reading_one_input_share_its_moments_in_the_pass(tmp_path):
    """A query, key and value read one input: the instrumented graph takes its moments once, and each layer
    still gets them, equal to numpy's."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.instrument import build_instrumented, run_pass
    from msq_onnx.load import load_model

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", f"W{i}"], [f"a{i}"], name=f"mm{i}") for i in range(3)]
        + [helper.make_node("Relu", ["a0"], ["r"], name="relu"),
           helper.make_node("MatMul", ["r", "W3"], ["b"], name="mm3"),
           helper.make_node("Sum", ["a1", "a2", "b"], ["y"], name="sum")], "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(rng.standard_normal((6, 6)).astype(np.float32), f"W{i}") for i in range(4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    loaded = load_model(str(tmp_path / "m.onnx"))
    instrumented, outputs = build_instrumented(loaded)
    assert len(set(outputs["moments"].values())) == 2  # x's, shared by three layers, and r's
    assert sum(node.op_type == "ReduceMean" for node in instrumented.graph.node) == 4
    x = rng.standard_normal((30, 6)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    stats = run_pass(loaded, open_samples(str(tmp_path / "x.npz"), loaded.inputs, Preprocess()), (1, 2), 64,
                     quiet=True)
    relu = np.maximum(x @ numpy_helper.to_array(graph.initializer[0]), 0)
    for layer in loaded.layers:
        source = relu if layer.nodes[0] == "mm3" else x
        np.testing.assert_allclose(stats.input_mean[layer.name], source.mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.input_sq[layer.name], (source ** 2).mean(axis=0), rtol=1e-5, atol=1e-6)


def test_token_features_are_a_signed_bag_of_the_real_tokens():
    """The input's features for token ids: each real token adds +-1 / (real tokens) at its hashed bucket, so a
    text's order and its padding do not matter and a repeated token counts as often as it appears."""
    from msq_onnx.features import token_features

    rng = np.random.default_rng(5)
    ids = rng.integers(0, 30000, size=(1, 12))
    bag = token_features(ids, None, 256)
    assert bag.shape == (1, 256)
    np.testing.assert_array_equal(token_features(ids[:, ::-1], None, 256), bag)
    padded = np.concatenate([ids, rng.integers(0, 30000, size=(1, 5))], axis=1)
    mask = np.concatenate([np.ones((1, 12), np.int64), np.zeros((1, 5), np.int64)], axis=1)
    np.testing.assert_array_equal(token_features(padded, mask, 256), bag)
    repeated = token_features(np.full((1, 5), 1234), None, 256)
    assert np.count_nonzero(repeated) == 1 and abs(repeated.sum()) == 1.0
    assert np.all(np.isin(np.abs(bag[bag != 0]) * 12, np.arange(1, 13)))
    np.testing.assert_array_equal(token_features(padded, np.zeros_like(mask), 256), np.zeros((1, 256)))


def _residual_block(norm: bool = False):
    """x [N, 4, h, w] -> x2 = x * mean(x) -> c1 -> Relu -> c2, + mean(x) (a broadcast offset, like an additive
    attention mask), + x2 (the residual) -> s [-> LayerNorm] -> c3 -> GlobalAveragePool -> y."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    weights = {name: numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)
               for name, shape in (("w1", (4, 4, 1, 1)), ("w2", (4, 4, 1, 1)), ("w3", (3, 4, 1, 1)))}
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=1, name="mean"),
             helper.make_node("Mul", ["x", "m"], ["x2"], name="gate"),
             helper.make_node("Conv", ["x2", "w1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("Add", ["c2", "m"], ["a1"], name="offset"),
             helper.make_node("Add", ["a1", "x2"], ["s"], name="residual")]
    last = "s"
    if norm:  # over the last axis: a row normalization, as a transformer's
        weights["g"] = numpy_helper.from_array(np.ones(8, np.float32), "g")
        nodes.append(helper.make_node("LayerNormalization", ["s", "g"], ["n"], axis=-1, name="norm"))
        last = "n"
    nodes += [helper.make_node("Conv", [last, "w3"], ["c3"], name="conv3"),
              helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                ["N", 4, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              list(weights.values()))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_residual_branchs_error_is_weighed_by_its_share_of_the_stream_it_joins(tmp_path):
    import onnx
    from conftest import tensors_of

    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.instrument import run_pass
    from msq_onnx.load import load_model

    model = _residual_block()
    onnx.save(model, str(tmp_path / "m.onnx"))
    loaded = load_model(str(tmp_path / "m.onnx"))
    x = np.random.default_rng(3).normal(1.0, 1.0, (10, 4, 6, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    stats = run_pass(loaded, open_samples(str(tmp_path / "x.npz"), loaded.inputs, Preprocess()), (1, 2), 64,
                     quiet=True)
    a1, s = tensors_of(model, ("a1", "s"), {"x": x})
    by_node = {layer.nodes[0]: layer.name for layer in loaded.layers}
    share = float(np.mean(a1.astype(np.float64) ** 2) / np.mean(s.astype(np.float64) ** 2))
    assert 0.05 < share < 0.95
    # Both layers inside the block join the stream at the residual Add, not at the broadcast offset before it
    for name in ("conv1", "conv2"):
        assert stats.residual_share[by_node[name]] == pytest.approx(share, rel=1e-4)
    assert by_node["conv3"] not in stats.residual_share  # its error reaches the output whole


def test_no_residual_join_where_the_shape_says_broadcast_or_a_row_norm_reads_the_sum():
    from types import SimpleNamespace

    import onnx

    from msq_onnx.instrument import static_shapes
    from msq_onnx.ops import residual_joins

    def convolutions(model):  # the fields residual_joins reads
        return [SimpleNamespace(name=n.name, output_name=n.output[0], probe_name=n.output[0], input_name=n.input[0],
                                nodes=[n.name]) for n in model.graph.node if n.op_type == "Conv"]

    for norm in (False, True):
        model = onnx.shape_inference.infer_shapes(_residual_block(norm))
        joins = residual_joins(model, convolutions(model), static_shapes(model))
        if norm:
            # the LayerNorm divides each row by its own spread: the stream's raw power is not the error's yardstick
            assert all(all(join[2] != "s" for join in found) for found in joins.values())
        else:
            # symbolic dims let the broadcast offset through when built; the pass tells it apart when it runs
            assert joins["conv1"] == joins["conv2"] == [("c2", "m", "a1"), ("a1", "x2", "s")]
        assert "conv3" not in joins
    fixed = _residual_block()
    for axis, size in ((2, 6), (3, 8)):  # all dims known: m's [N, 4, 1, 1] is no skip
        fixed.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = size
    model = onnx.shape_inference.infer_shapes(fixed)
    assert residual_joins(model, convolutions(model), static_shapes(model))["conv1"] == [("a1", "x2", "s")]


def test_an_additive_mask_made_from_the_mask_input_is_no_residual_join():
    """A transformer's attention mask reaches its scores' Add through ops alone (its shape from the stream's Shape),
    with every dim symbolic: no join to measure the power of. What token ids feed through a lookup that is no layer
    (a tied table), and a stream through a quantize / dequantize pair, stay streams."""
    from types import SimpleNamespace

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from msq_onnx.instrument import static_shapes
    from msq_onnx.ops import residual_joins

    # ids -> a lookup (no layer) -> h -> two blocks, the second's input depending on the mask through the first's
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="lookup"),
             helper.make_node("MatMul", ["h", "w"], ["h0"], name="dense0"),
             helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Sub", ["one", "mf"], ["inverse"], name="invert"),
             helper.make_node("Unsqueeze", ["inverse", "last"], ["column"], name="column"),
             helper.make_node("Shape", ["h0"], ["shape"], name="shape"),  # the stream's, as an export's Reshape takes
             helper.make_node("Expand", ["column", "shape"], ["offset"], name="expand"),
             helper.make_node("Add", ["h0", "offset"], ["masked0"], name="masked0"),
             # a second mask input (a cross-attention's), made the same way
             helper.make_node("Cast", ["mask2"], ["mf2"], to=TensorProto.FLOAT, name="cast2"),
             helper.make_node("Sub", ["one", "mf2"], ["inverse2"], name="invert2"),
             helper.make_node("Unsqueeze", ["inverse2", "last"], ["column2"], name="column2"),
             helper.make_node("Expand", ["column2", "shape"], ["offset2"], name="expand2"),
             helper.make_node("Add", ["masked0", "offset2"], ["masked0b"], name="masked0b"),
             helper.make_node("Add", ["masked0b", "h"], ["x1"], name="residual0"),
             helper.make_node("QuantizeLinear", ["x1", "step"], ["x1_q"], name="q"),
             helper.make_node("DequantizeLinear", ["x1_q", "step"], ["x1_dq"], name="dq"),
             helper.make_node("MatMul", ["x1_dq", "w"], ["h1"], name="dense1"),
             helper.make_node("Add", ["h1", "offset2"], ["masked1"], name="masked1"),
             helper.make_node("Add", ["masked1", "x1_dq"], ["y"], name="residual1")]
    graph = helper.make_graph(
        nodes, "masked", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"]),
                          helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", "T"]),
                          helper.make_tensor_value_info("mask2", TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((10, 4), np.float32), "table"),
         numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"),
         numpy_helper.from_array(np.array(1.0, np.float32), "one"),
         numpy_helper.from_array(np.array(0.1, np.float32), "step"),
         numpy_helper.from_array(np.array([-1], np.int64), "last")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    layers = [SimpleNamespace(name=f"dense{i}", output_name=f"h{i}", probe_name=f"h{i}", input_name=source,
                              nodes=[f"dense{i}"]) for i, source in enumerate(("h", "x1_dq"))]
    joins = residual_joins(model, layers, static_shapes(model), {"mask", "mask2"})
    assert joins["dense1"] == [("masked1", "x1_dq", "y")]
    assert joins["dense0"][0] == ("masked0b", "h", "x1")
    # without a mask input named, its offset passes as a skip when built (the pass tells it apart by its size)
    assert residual_joins(model, layers, static_shapes(model), {"mask"})["dense1"][0] == ("h1", "offset2", "masked1")
    assert residual_joins(model, layers, static_shapes(model))["dense1"][0] == ("h1", "offset2", "masked1")


def test_the_report_says_what_each_layers_error_was_weighed_by_and_the_flag_turns_it_off(tmp_path):
    import json

    import jsonschema
    import onnx

    from msq_onnx.pipeline import Options, convert
    from msq_onnx.report import SCHEMA_PATH

    onnx.save(_residual_block(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(4).normal(1.0, 1.0, (40, 4, 6, 8)).astype(np.float32))
    layers = {}
    for weighed in (True, False):
        report = convert(str(tmp_path / "m.onnx"), str(tmp_path / f"out{weighed}.onnx"), str(tmp_path / "x.npz"),
                         Options(avg_bits=4, quiet=True, residual_weights=weighed)).report
        jsonschema.validate(report, json.load(open(SCHEMA_PATH)))
        assert report["options"]["residual_weights"] is weighed
        layers[weighed] = {layer["nodes"][0]: layer for layer in report["layers"]}
    for name in ("conv1", "conv2"):
        share = layers[True][name]["residual_share"]
        assert 0 < share < 1 and layers[True][name]["residual_weight"] == pytest.approx(share, abs=1e-6)
        assert layers[False][name]["residual_share"] == share and layers[False][name]["residual_weight"] == 1.0
    assert layers[True]["conv3"]["residual_share"] is None and layers[True]["conv3"]["residual_weight"] == 1.0


def test_shape_arithmetic_downstream_of_a_layer_is_no_residual_join(tmp_path):
    """An export's int64 Add of a layer's Shape and its input's passes every structural test of a join; its sum of
    squares, declared float, made ONNX Runtime refuse the calibration graph."""
    import onnx
    from onnx import TensorProto, helper

    from msq_onnx.pipeline import Options, convert

    model = _residual_block()
    nodes = list(model.graph.node)
    gate = next(n for n in nodes if n.name == "gate")
    gate.output[0] = "x2_flat"
    at = nodes.index(gate) + 1
    nodes[at:at] = [helper.make_node("Shape", ["x"], ["x_shape"], name="x_shape"),
                    helper.make_node("Reshape", ["x2_flat", "x_shape"], ["x2"], name="same_shape")]
    at = nodes.index(next(n for n in nodes if n.name == "conv2")) + 1
    nodes[at:at] = [helper.make_node("Shape", ["c2"], ["c2_shape"], name="c2_shape"),
                    helper.make_node("Add", ["c2_shape", "x_shape"], ["shapes"], name="shape_sum")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.output.append(helper.make_tensor_value_info("shapes", TensorProto.INT64, [4]))
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(4).normal(1.0, 1.0, (40, 4, 6, 8)).astype(np.float32))
    report = convert(str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx"), str(tmp_path / "x.npz"),
                     Options(avg_bits=4, quiet=True, output="y")).report
    shares = {layer["nodes"][0]: layer["residual_share"] for layer in report["layers"]}
    assert 0 < shares["conv1"] == shares["conv2"] < 1 and shares["conv3"] is None  # the float join still found

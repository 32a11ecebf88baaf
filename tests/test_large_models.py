"""The code paths of models past protobuf's 2 GB, exercised on a tiny model by lowering the limit.

A real >2 GB model cannot be built in a unit test; what changes for one is
how it is read (external data, path-based shape inference), how sessions are
made (through a file) and how the output is written (external data beside it).
"""

import gzip
import os

import numpy as np
import onnx
import onnxruntime as ort

from conftest import samples_for, tiny_cnn
from msq_onnx import Options, convert, load


def test_external_data_model_converts_through_the_large_model_paths(tmp_path, monkeypatch):
    model = tiny_cnn()
    np.savez(tmp_path / "calib.npz", **samples_for(model, 24))
    source = tmp_path / "src"
    source.mkdir()
    onnx.save_model(model, source / "big.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="big.onnx.data", size_threshold=0)
    before = {p: (source / p).read_bytes() for p in os.listdir(source)}

    calls = []
    real = onnx.shape_inference.infer_shapes_path
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(load, "PROTOBUF_LIMIT", 1000)  # every model here now counts as large

    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    result = convert(str(source / "big.onnx"), str(out), str(tmp_path / "calib.npz"),
                     Options(avg_bits=4, quiet=True, eval_path=str(tmp_path / "calib.npz")))
    assert result.report["evaluation"]["agreement"] > 80  # the FP32 copy saved for evaluation kept its weights
    sensitive = convert(str(source / "big.onnx"), str(tmp_path / "s.onnx"), str(tmp_path / "calib.npz"),
                        Options(avg_bits=4, quiet=True, allocator="sensitivity"))
    assert sensitive.report["avg_weight_bits"] <= 4

    assert calls and calls[0][0] == str(source / "big.onnx")  # shapes inferred from the file, not a 2nd copy
    assert result.report["size_bytes"]["input"] == sum(len(b) for b in before.values())
    assert result.report["opset"]["output"] == 17  # the converter cannot take >2 GB: opset >= 13 is kept
    assert sorted(os.listdir(out.parent)) == ["q.onnx", "q.onnx.data"]
    assert result.report["size_bytes"]["gzip"] == sum(len(gzip.compress((out.parent / p).read_bytes(), 9))
                                                      for p in ("q.onnx", "q.onnx.data"))
    assert {p: (source / p).read_bytes() for p in os.listdir(source)} == before  # input untouched
    x = np.load(tmp_path / "calib.npz")["x"]
    fp32 = ort.InferenceSession(str(source / "big.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    quant = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert (fp32.argmax(1) == quant.argmax(1)).mean() > 0.8


def test_sessions_read_the_weights_from_one_file_written_once(tmp_path, monkeypatch):
    """The graphs the analysis runs (instrumented, simulated) point into one weights file instead of carrying
    a copy of every weight into each session: the same outputs as with the weights inline, one file however
    many copies are made, removed with the loaded model."""
    import gc

    from msq_onnx.instrument import build_instrumented, make_session

    monkeypatch.setattr(load, "SET_ASIDE_BYTES", 100)  # the tiny model's weights count as weights
    model = tiny_cnn()
    onnx.save(model, tmp_path / "m.onnx")
    loaded = load.load_model(str(tmp_path / "m.onnx"))
    instrumented, _ = build_instrumented(loaded, levels=(1, 2))
    external = {t.name for t in instrumented.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert external == {"w1", "w2", "w3", "wf"}
    assert not any(t.HasField("raw_data") for t in instrumented.graph.initializer if t.name in external)
    folder = loaded.weights_folder
    inline = onnx.ModelProto()
    inline.CopyFrom(instrumented)
    onnx.load_external_data_for_model(inline, folder)
    x = samples_for(model, 4)["x"]
    shared = make_session(instrumented, weights=folder).run(None, {"x": x})
    whole = make_session(inline).run(None, {"x": x})
    assert len(shared) == len(whole) > 10 and all(np.array_equal(a, b) for a, b in zip(shared, whole))
    written = os.path.getmtime(os.path.join(folder, "weights.bin"))
    loaded.session_copy()
    assert os.listdir(folder) == ["weights.bin"] and os.path.getmtime(os.path.join(folder, "weights.bin")) == written
    del loaded, instrumented
    gc.collect()
    assert not os.path.exists(folder)


def test_the_weights_file_is_one_and_absolute_whoever_asks_first(tmp_path, monkeypatch):
    """Threads making their first session copies at once share one weights file (each would have written its own,
    and removed it under the others); a relative temporary folder still gives an absolute path, which ORT needs
    after the process changes directory."""
    import tempfile
    import threading

    monkeypatch.setattr(load, "SET_ASIDE_BYTES", 100)
    onnx.save(tiny_cnn(), tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", "tmp")
    loaded = load.load_model("m.onnx")
    barrier, folders = threading.Barrier(4), []

    def first_copy():
        barrier.wait()
        loaded.model_file()
        folders.append(loaded.weights_folder)

    threads = [threading.Thread(target=first_copy) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(folders)) == 1 and os.path.isabs(folders[0])
    assert sorted(os.listdir(tmp_path / "tmp")) == [os.path.basename(folders[0])]
    assert sorted(os.listdir(folders[0])) == ["model.onnx", "weights.bin"]


def test_a_model_whose_only_external_data_is_in_a_subgraph_is_read_from_anywhere(tmp_path, monkeypatch):
    """The checker finds a subgraph's external data from the model's path only: read_model gives it the path there,
    the bytes it already read elsewhere (a review's: an If branch's weight, read from another directory, failed)."""
    from onnx import TensorProto, helper, numpy_helper

    from msq_onnx.load import read_model

    branch = helper.make_graph([helper.make_node("Identity", ["t"], ["then_out"])], "then", [],
                               [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [1024])],
                               [numpy_helper.from_array(np.arange(1024, dtype=np.float32), "t")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["else_out"])], "else", [],
                              [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [1024])])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)], "g",
                              [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("x", TensorProto.FLOAT, [1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, location="w.bin",
                    size_threshold=0, all_tensors_to_one_file=True)
    assert (folder / "w.bin").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded, _, _ = read_model(str(folder / "m.onnx"))
    assert [node.op_type for node in loaded.graph.node] == ["If"]


def test_a_subgraphs_external_weight_is_loaded_and_the_model_converts(tmp_path, monkeypatch, capsys):
    """An If branch's MatMul weight in external data, converted from another directory: its data is read with the
    rest (a review's: it passed the checker and then failed in ONNX Runtime)."""
    from onnx import TensorProto, helper, numpy_helper

    from msq_onnx.cli import main

    def branch(name, scale):
        weight = numpy_helper.from_array((np.eye(16) * scale).astype(np.float32), f"w_{name}")
        return helper.make_graph([helper.make_node("MatMul", ["x", f"w_{name}"], [f"{name}_out"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [None, 16])],
                                 [weight])

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
         helper.make_node("Greater", ["m", "zero"], ["c"]),
         helper.make_node("If", ["c"], ["h"], then_branch=branch("then", 2.0), else_branch=branch("else", 3.0)),
         helper.make_node("MatMul", ["h", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
         numpy_helper.from_array(np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32), "w")])
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                    str(folder / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=512,
                    all_tensors_to_one_file=True)
    assert onnx.load(str(folder / "m.onnx"), load_external_data=False).graph.initializer[1].HasField("raw_data")
    np.savez(folder / "x.npz", x=np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = main([str(folder / "m.onnx"), str(tmp_path / "out.onnx"), "--calib", str(folder / "x.npz"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out.onnx").exists()

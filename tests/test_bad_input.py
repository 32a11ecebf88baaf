"""Every bad input: one line on stderr, exit code 2, no traceback, no output.

The promised cases run the real CLI (``python cli.py ...``) in a subprocess
with no output file yet; cases marked ``over_existing`` (one or more per
failure stage) run a second time, concurrently, over an existing output that
must stay byte-identical. Every run gets its own output folder and its own
TMPDIR, and neither may gain a file (no output, no ``.msq-*`` temporary, no
left-over work directory). A subprocess costs ~0.4 s (imports), so further
regression cases (bugs found while writing these) call ``msq_onnx.cli.main``
in-process with the same checks.

Cases marked xfail(strict=True) are bugs outside data.py/load.py, reported
with a proposed patch; they turn into failures (XPASS) once fixed, so the
marker is removed then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT, samples_for, tiny_cnn, tiny_mlp

CLI = os.path.join(ROOT, "cli.py")
TIMEOUT = 120
PREVIOUS_OUTPUT = tiny_mlp(seed=7).SerializeToString()  # what an earlier successful run left

# onnxruntime's native library keeps one fixed-name session file in TMPDIR on import; it is
# not ours and does not grow per run. Anything else there is a left-over of ours.
FOREIGN_TMP_FILES = {".ses"}


# --------------------------------------------------------------------------- running and checking


def _launch(args, tmpdir: Path) -> subprocess.Popen:
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONDONTWRITEBYTECODE="1")
    env.pop("MSQ_DEBUG", None)
    return subprocess.Popen([sys.executable, CLI, *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen):
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, stdout, stderr


def listing(folder: Path) -> dict:
    """Every file and folder below `folder` (hidden ones too), with file bytes."""
    found = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(top, name), folder)] = None
        for name in files:
            full = os.path.join(top, name)
            found[os.path.relpath(full, folder)] = Path(full).read_bytes() if os.path.isfile(full) else "link"
    return found


def leftovers(tmp_dir: Path) -> list:
    return sorted(name for name in listing(tmp_dir) if name not in FOREIGN_TMP_FILES)


def assert_one_line_error(code: int, stdout: str, stderr: str, expect: tuple = ()) -> str:
    context = f"exit {code}\nstdout: {stdout!r}\nstderr: {stderr!r}"
    assert "Traceback" not in stderr and "Traceback" not in stdout, context
    assert code == 2, context
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line; {context}"
    line = lines[0]
    assert line.startswith("msq-onnx: error:"), context
    assert line[len("msq-onnx: error:"):].strip(), f"empty message; {context}"
    for word in expect:  # the line names the actual problem
        assert word.lower() in line.lower(), f"expected {word!r} in the message; {context}"
    return line


def _prepare(tmp_path: Path, variants):
    runs = []
    for variant in variants:
        out_dir, tmp_dir = tmp_path / f"out_{variant}", tmp_path / f"tmp_{variant}"
        out_dir.mkdir()
        tmp_dir.mkdir()
        output = out_dir / "model.qdq.onnx"
        if variant == "existing":
            output.write_bytes(PREVIOUS_OUTPUT)
        runs.append((variant, output, out_dir, tmp_dir, listing(out_dir)))
    return runs


def _check_after(run, result) -> None:
    variant, output, out_dir, tmp_dir, before = run
    line = assert_one_line_error(*result)
    if variant == "fresh":
        assert not output.exists(), f"output written despite the error: {line}"
    else:
        assert output.read_bytes() == PREVIOUS_OUTPUT, "the existing output was changed"
    assert listing(out_dir) == before, f"output folder changed ({variant}): {sorted(listing(out_dir))}"
    assert leftovers(tmp_dir) == [], f"left-over temporary files ({variant})"


def run_case(tmp_path: Path, model, rest, expect=(), over_existing: bool = False) -> None:
    """Run a failing conversion with no output yet (and, if asked, at the same time over an
    existing output); check the error line, the output, the output folder and TMPDIR."""
    runs = _prepare(tmp_path, ("fresh", "existing") if over_existing else ("fresh",))
    inputs_before = listing(tmp_path / "in")
    procs = [_launch([model, output, *rest], tmp_dir) for _, output, _, tmp_dir, _ in runs]
    results = [_finish(p) for p in procs]
    for run, result in zip(runs, results):
        assert_one_line_error(*result, expect=expect)
        _check_after(run, result)
    assert listing(tmp_path / "in") == inputs_before, "the inputs were modified"


def run_in_process(tmp_path: Path, model, rest, expect, capsys, monkeypatch) -> None:
    """The same checks, calling msq_onnx.cli.main in this process (no import cost per case)."""
    from msq_onnx import cli

    (run,) = _prepare(tmp_path, ("fresh",))
    _, output, _, tmp_dir, _ = run
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_dir))
    monkeypatch.delenv("MSQ_DEBUG", raising=False)
    inputs_before = listing(tmp_path / "in")
    previous_handler = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:  # a CLI run would print these on stderr
        warnings.simplefilter("always")
        try:
            code = cli.main([str(model), str(output), *map(str, rest)])
        except SystemExit as exit_:
            code = exit_.code
        finally:
            signal.signal(signal.SIGTERM, previous_handler)  # main() installs its own
    captured = capsys.readouterr()
    printed = [f"{w.category.__name__}: {w.message}" for w in caught
               if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                                              ResourceWarning))]  # ignored by Python's default filters
    result = (code, captured.out, captured.err + "".join(line + "\n" for line in printed))
    assert_one_line_error(*result, expect=expect)
    _check_after(run, result)
    assert listing(tmp_path / "in") == inputs_before, "the inputs were modified"


# --------------------------------------------------------------------------- building inputs


def save_unchecked(model: onnx.ModelProto, path: Path) -> str:
    path.write_bytes(model.SerializeToString())
    return str(path)


def graph_case(d: Path, name: str, nodes, inputs, outputs, initializers, calib: dict, expect: tuple):
    """A hand-built opset-17 graph, written unchecked, with its calibration arrays: a case's three parts."""
    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    np.savez(d / "calib.npz", **calib)
    return save_unchecked(model, d / f"{name}.onnx"), ["--calib", str(d / "calib.npz")], expect


def _x(*shape):
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))


def _w():
    return numpy_helper.from_array(np.ones((4, 3), np.float32), "w")


def good_cnn(folder: Path, **kwargs) -> tuple[str, onnx.ModelProto]:
    model = tiny_cnn(**kwargs)
    return save_unchecked(model, folder / "cnn.onnx"), model


def good_calib(folder: Path, model: onnx.ModelProto, count: int = 16) -> str:
    path = folder / "calib.npz"
    np.savez(path, **samples_for(model, count))
    return str(path)


def two_input_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 0.5, (3, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("Add", ["x", "z"], ["s"], name="add"),
             helper.make_node("Gemm", ["s", "w"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "two_inputs",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def png_bytes(seed: int = 0, size: int = 8) -> bytes:
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def image_folder(folder: Path, broken: bytes | None = None) -> str:
    """ImageFolder layout, two classes of 8x8 RGB PNGs; `broken` is added last as dog/zz_broken.jpg."""
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for index in range(3):
            (folder / cls / f"{index}.png").write_bytes(png_bytes(seed=index + (10 if cls == "dog" else 0)))
    if broken is not None:
        (folder / "dog" / "zz_broken.jpg").write_bytes(broken)
    return str(folder)


def with_external_data(folder: Path, one_file: bool = True) -> tuple[str, onnx.ModelProto]:
    model = tiny_cnn()
    path = folder / "cnn.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=one_file,
                    location="cnn.onnx.data" if one_file else None, size_threshold=0)
    return str(path), tiny_cnn()  # save_model moved `model`'s weights out of the proto


def relocate_external(path: str, location: str) -> None:
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    Path(path).write_bytes(model.SerializeToString())


class SideEffect:
    """Unpickling this creates the folder `marker`: proof that a payload ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def object_array(marker: Path) -> np.ndarray:
    array = np.empty(2, dtype=object)
    array[0] = SideEffect(str(marker))
    array[1] = "x"
    return array


# --------------------------------------------------------------------------- the cases
# Each builder gets the inputs folder and returns (model, [--calib ... options], expected words).

CASES = {}  # run through the real CLI in a subprocess
OVER_EXISTING = set()  # ... and also over an existing output
EXTRA_CASES = {}  # regressions: run in-process


def case(name, over_existing=False, extra=False):
    def register(builder):
        (EXTRA_CASES if extra else CASES)[name] = builder
        if over_existing:
            OVER_EXISTING.add(name)
        return builder
    return register


# ---- model


@case("model-missing")
def _(d):
    return str(d / "nope.onnx"), ["--calib", good_calib(d, tiny_cnn())], ("does not exist",)


@case("model-empty")
def _(d):
    (d / "cnn.onnx").write_bytes(b"")
    return str(d / "cnn.onnx"), ["--calib", good_calib(d, tiny_cnn())], ("empty",)


@case("model-truncated", over_existing=True)
def _(d):
    model = tiny_cnn()
    data = model.SerializeToString()
    (d / "cnn.onnx").write_bytes(data[:len(data) // 2])
    return str(d / "cnn.onnx"), ["--calib", good_calib(d, model)], ("onnx",)


@case("model-random-bytes")
def _(d):
    (d / "cnn.onnx").write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return str(d / "cnn.onnx"), ["--calib", good_calib(d, tiny_cnn())], ("onnx",)


@case("model-text-file")
def _(d):
    (d / "cnn.onnx").write_text("this is a text file, not an ONNX model\n" * 20)
    return str(d / "cnn.onnx"), ["--calib", good_calib(d, tiny_cnn())], ("onnx",)


@case("model-png")
def _(d):
    (d / "cnn.onnx").write_bytes(png_bytes(size=64))
    return str(d / "cnn.onnx"), ["--calib", good_calib(d, tiny_cnn())], ("onnx",)


@case("model-fails-checker")
def _(d):
    model = tiny_cnn()
    model.graph.node[1].input[0] = "undefined_tensor"  # Relu reads a tensor nothing produces
    return save_unchecked(model, d / "cnn.onnx"), ["--calib", good_calib(d, tiny_cnn())], \
        ("checker", "undefined_tensor", "relu1")


@case("model-external-data-missing")
def _(d):
    path, model = with_external_data(d)
    os.unlink(d / "cnn.onnx.data")  # also: an ONNX over 2 GB copied without its weights file
    return path, ["--calib", good_calib(d, model)], ("missing", "cnn.onnx.data")


@case("model-one-of-several-external-files-missing")
def _(d):
    path, model = with_external_data(d, one_file=False)
    os.unlink(d / "w3")
    return path, ["--calib", good_calib(d, model)], ("missing", "w3")


@case("model-external-data-parent-traversal", over_existing=True)
def _(d):
    path, model = with_external_data(d)
    os.replace(d / "cnn.onnx.data", d.parent / "secret.bin")  # the file exists, outside the folder
    relocate_external(path, "../secret.bin")
    return path, ["--calib", good_calib(d, model)], ("traversal", "../secret.bin")


@case("model-external-data-absolute-path")
def _(d):
    path, model = with_external_data(d)
    os.replace(d / "cnn.onnx.data", d.parent / "secret.bin")
    relocate_external(path, str(d.parent / "secret.bin"))
    return path, ["--calib", good_calib(d, model)], ("traversal",)


@case("model-no-quantizable-layer")
def _(d):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "relu_only",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    calib = d / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))
    return save_unchecked(model, d / "relu.onnx"), ["--calib", str(calib)], ("no quantizable layer",)


@case("model-scalar-input")
def _(d):
    """A sample-rate-like scalar input given two values a sample: it takes one (given one, it converts:
    tests/test_sample_axes.py)."""
    return graph_case(d, "scalar_input", [helper.make_node("Mul", ["x", "sr"], ["xs"], name="scale"),
                                          helper.make_node("MatMul", ["xs", "w"], ["y"], name="mm")],
                      [_x("N", 4), helper.make_tensor_value_info("sr", TensorProto.FLOAT, [])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [_w()],
                      {"x": np.ones((8, 4), np.float32), "sr": np.ones((8, 2), np.float32)}, ("'sr'", "scalar"))


@case("model-state-batch-not-first")
def _(d):
    """An RNN-style state [layers, batch, hidden] given with its samples along its batch axis: they cannot be
    stacked there, and the line says to give each whole."""
    return graph_case(d, "state_input", [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
                                         helper.make_node("Identity", ["state"], ["state_out"], name="keep")],
                      [_x("batch", 4), helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
                       helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "batch", 8])], [_w()],
                      {"x": np.ones((8, 4), np.float32), "state": np.zeros((2, 8, 8), np.float32)},
                      ("'state'", "position 1"))


@case("model-sequence-input")
def _(d):
    """A graph input that is a sequence of tensors: one line naming it, no traceback."""
    return graph_case(d, "sequence_input", [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
                                            helper.make_node("SequenceLength", ["s"], ["n"], name="count")],
                      [_x("N", 4), helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
                       helper.make_tensor_value_info("n", TensorProto.INT64, [])], [_w()],
                      {"x": np.ones((8, 4), np.float32)}, ("'s'", "not a tensor"))


@case("model-layers-only-inside-if")
def _(d):
    """Every weighted node inside an If body, of a kind not quantized there (an embedding table): nothing to
    allocate, and the message says where they are."""
    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("Gather", ["w", "rows"], [name + "_y"], name=name + "_rows")], name, [],
        [helper.make_tensor_value_info(name + "_y", TensorProto.FLOAT, ["N", 3])])
    return graph_case(d, "if_only", [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
                                     helper.make_node("ArgMax", ["x"], ["rows"], axis=1, keepdims=0, name="rows"),
                                     helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
                                     helper.make_node("If", ["c"], ["y"], name="branch", then_branch=branch("a"),
                                                      else_branch=branch("b"))],
                      [_x("N", 4)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                      [_w(), numpy_helper.from_array(np.array(0, np.float32), "zero")],
                      {"x": np.ones((8, 4), np.float32)}, ("no quantizable layer", "If"))


@case("model-opset-27")
def _(d):
    model = tiny_cnn()
    model.opset_import[0].version = 27
    return save_unchecked(model, d / "cnn.onnx"), ["--calib", good_calib(d, tiny_cnn())], ("opset 27", "26")


# ---- data


@case("data-two-inputs-npz-names-one")
def _(d):
    calib = d / "calib.npz"
    np.savez(calib, x=np.ones((8, 4), np.float32))
    return save_unchecked(two_input_model(), d / "two.onnx"), ["--calib", str(calib)], ("'z'",)


@case("data-two-inputs-unknown-array-name")
def _(d):
    calib = d / "calib.npz"
    np.savez(calib, x=np.ones((8, 4), np.float32), bogus=np.ones((8, 4), np.float32))
    return save_unchecked(two_input_model(), d / "two.onnx"), ["--calib", str(calib)], ("bogus",)


@case("data-extra-array")
def _(d):
    model_path, model = good_cnn(d)
    np.savez(d / "calib.npz", **samples_for(model, 8), extra=np.zeros(8, np.float32))
    return model_path, ["--calib", str(d / "calib.npz")], ("extra",)


@case("data-wrong-shape")
def _(d):
    model_path, _model = good_cnn(d)
    np.savez(d / "calib.npz", x=np.ones((8, 1, 7, 7), np.float32))
    return model_path, ["--calib", str(d / "calib.npz")], ("shape", "[8, 1, 7, 7]")


def _wrong_dtype(dtype):
    def build(d):
        model_path, _model = good_cnn(d)
        values = np.ones((8, 1, 8, 8))
        np.savez(d / "calib.npz", x=values.astype("U3") if dtype == "str" else values.astype(dtype))
        return model_path, ["--calib", str(d / "calib.npz")], ("dtype",)
    return build


for _dtype in ("complex64", "bool", "str"):
    CASES[f"data-dtype-{_dtype}"] = _wrong_dtype(_dtype)


@case("data-nan")
def _(d):
    model_path, model = good_cnn(d)
    arrays = samples_for(model, 8)
    arrays["x"][3, 0, 2, 2] = np.nan
    np.savez(d / "calib.npz", **arrays)
    return model_path, ["--calib", str(d / "calib.npz")], ("NaN",)


@case("data-inf")
def _(d):
    model_path, model = good_cnn(d)
    arrays = samples_for(model, 8)
    arrays["x"][5, 0, 0, 0] = -np.inf
    np.savez(d / "calib.npz", **arrays)
    return model_path, ["--calib", str(d / "calib.npz")], ("Inf",)


@case("data-nan-in-eval", over_existing=True)
def _(d):
    model_path, model = good_cnn(d)
    arrays = samples_for(model, 8)
    arrays["x"][0, 0, 0, 0] = np.nan
    np.savez(d / "eval.npz", **arrays)
    return model_path, ["--calib", good_calib(d, model), "--eval", str(d / "eval.npz")], ("NaN", "eval.npz")


@case("data-empty-folder")
def _(d):
    model_path, _model = good_cnn(d)
    (d / "calib").mkdir()
    return model_path, ["--calib", str(d / "calib")], ("holds no",)


@case("data-corrupt-jpg-in-image-folder", over_existing=True)  # fails mid-stream, after the model loaded
def _(d):
    model_path, _model = good_cnn(d, channels=3)
    calib = image_folder(d / "calib", broken=b"\xff\xd8\xff\xe0 definitely not a jpeg" + bytes(200))
    return model_path, ["--calib", calib], ("zz_broken.jpg",)


@case("data-labels-csv-missing-file")
def _(d):
    model_path, _model = good_cnn(d, channels=3)
    (d / "calib").mkdir()
    (d / "calib" / "a.png").write_bytes(png_bytes(1))
    (d / "calib" / "labels.csv").write_text("file,label\na.png,0\nb.png,1\n")
    return model_path, ["--calib", str(d / "calib")], ("b.png", "does not exist")


@case("data-label-out-of-range")
def _(d):
    model_path, model = good_cnn(d)
    arrays = samples_for(model, 8)
    arrays["labels"][:] = [0, 1, 2, 3, 99, 0, 1, 2]
    np.savez(d / "calib.npz", **arrays)
    return model_path, ["--calib", str(d / "calib.npz")], ("99", "out of range")


@case("data-one-class")
def _(d):
    model_path, model = good_cnn(d)
    arrays = samples_for(model, 8)
    arrays["labels"][:] = 2
    np.savez(d / "calib.npz", **arrays)
    return model_path, ["--calib", str(d / "calib.npz")], ("one class",)


@case("data-npz-object-input", over_existing=True)
def _(d):
    model_path, _model = good_cnn(d)
    np.savez(d / "calib.npz", x=object_array(d.parent / "PWNED"))
    return model_path, ["--calib", str(d / "calib.npz")], ("Python objects",)


@case("data-npz-object-labels")
def _(d):
    model_path, model = good_cnn(d)
    np.savez(d / "calib.npz", x=samples_for(model, 2)["x"], labels=object_array(d.parent / "PWNED"))
    return model_path, ["--calib", str(d / "calib.npz")], ("Python objects",)


@case("data-npy-object-given-directly")
def _(d):
    model_path, _model = good_cnn(d)
    np.save(d / "calib.npy", object_array(d.parent / "PWNED"), allow_pickle=True)
    return model_path, ["--calib", str(d / "calib.npy")], (".npz",)


@case("data-npy-given-directly")
def _(d):
    model_path, model = good_cnn(d)
    np.save(d / "calib.npy", samples_for(model, 8)["x"])
    return model_path, ["--calib", str(d / "calib.npy")], (".npy", "savez")


@case("data-text-file")
def _(d):
    model_path, _model = good_cnn(d)
    (d / "calib.txt").write_text("1,2,3\n")
    return model_path, ["--calib", str(d / "calib.txt")], ("not .npz",)


# ---- options (valid model and data)


def _option_case(*options, expect=()):
    def build(d):
        model_path, model = good_cnn(d)
        return model_path, ["--calib", good_calib(d, model), *options], expect
    return build


CASES["opt-avg-bits-below-2"] = _option_case("--avg-bits", "1.5", expect=("--avg-bits",))
CASES["opt-avg-bits-below-narrowest-bits"] = _option_case("--bits", "4,8", "--avg-bits", "3", expect=("--avg-bits",))
CASES["opt-bits-empty"] = _option_case("--bits", "", expect=("--bits",))
CASES["opt-bits-letters"] = _option_case("--bits", "a,b", expect=("--bits",))
CASES["opt-bits-1"] = _option_case("--bits", "1", expect=("--bits",))
CASES["opt-bits-9"] = _option_case("--bits", "9", expect=("--bits",))
CASES["opt-max-drop-negative"] = _option_case("--max-drop=-1", expect=("--max-drop",))


@case("opt-max-drop-without-eval-too-few-samples")  # without --eval the gate holds out part of --calib
def _(d):
    model_path, model = good_cnn(d)
    return model_path, ["--calib", good_calib(d, model, count=2), "--max-drop", "1"], ("too few", "--eval")


OVER_EXISTING.add("opt-bits-letters")


# ---- regressions and extras (in-process)


@case("model-is-folder", extra=True)
def _(d):
    (d / "cnn.onnx").mkdir()
    return str(d / "cnn.onnx"), ["--calib", good_calib(d, tiny_cnn())], ("not a file",)


@case("model-external-data-symlink-outside", extra=True)
def _(d):
    path, model = with_external_data(d)
    os.replace(d / "cnn.onnx.data", d.parent / "secret.bin")
    os.symlink(d.parent / "secret.bin", d / "cnn.onnx.data")
    return path, ["--calib", good_calib(d, model)], ("traversal",)


@case("model-external-data-truncated", extra=True)  # was: internal ValueError from onnx
def _(d):
    path, model = with_external_data(d)
    data = (d / "cnn.onnx.data").read_bytes()
    (d / "cnn.onnx.data").write_bytes(data[:len(data) // 2])
    return path, ["--calib", good_calib(d, model)], ("too short", "cnn.onnx.data")


@case("model-onnx-runtime-cannot-run")  # in a subprocess: ORT's own "[E:onnxruntime:...]" lines went to stderr
def _(d):
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
               for n, s in (("w1", (8, 2, 3, 3)), ("b1", (8,)), ("wf", (10, 8)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], group=2, dilations=[2, 2], auto_pad="SAME_UPPER",
                              strides=[2, 2], name="conv1"),  # dilations with SAME_UPPER: ORT refuses at run time
             helper.make_node("GlobalAveragePool", ["c1"], ["gp"]), helper.make_node("Flatten", ["gp"], ["f"]),
             helper.make_node("Gemm", ["f", "wf"], ["y"], transB=1, name="fc")]
    return graph_case(d, "dilated", nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 9, 9])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], weights,
                      {"x": rng.normal(size=(12, 4, 9, 9)).astype(np.float32)}, ("cannot run", "Dilation"))


@case("report-is-the-input-model", extra=True)  # was: the input model overwritten with the JSON report, exit 0
def _(d):
    path = save_unchecked(tiny_cnn(), d / "cnn.onnx")
    return path, ["--calib", good_calib(d, tiny_cnn()), "--report", path], ("--report", "is the model")


@case("report-markdown-is-a-folder", extra=True)  # was: internal IsADirectoryError after the model was written
def _(d):
    (d / "r.md").mkdir()
    return save_unchecked(tiny_cnn(), d / "cnn.onnx"), ["--calib", good_calib(d, tiny_cnn()), "--report",
                                                        str(d / "r.json")], ("r.md", "is a folder")


@case("min-cosine-on-integer-ids", extra=True)  # was: a gate passed at cosine 1.0 with two class ids changed
def _(d):
    model = tiny_cnn()
    model.graph.node.append(helper.make_node("ArgMax", [model.graph.output[0].name], ["ids"], axis=1, keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]))
    return save_unchecked(model, d / "cnn.onnx"), ["--calib", good_calib(d, tiny_cnn(), 40), "--output", "ids",
                                                   "--min-cosine", "0.99"], ("--min-cosine", "'ids'", "--max-drop")


@case("model-nan-weight", extra=True)  # was: "check the samples' scale and preprocessing", blaming clean data
def _(d):
    model = tiny_cnn()
    weight = next(t for t in model.graph.initializer if t.name == "w1")
    values = numpy_helper.to_array(weight).copy()
    values.flat[3] = np.nan
    weight.CopyFrom(numpy_helper.from_array(values, "w1"))
    return save_unchecked(model, d / "cnn.onnx"), ["--calib", good_calib(d, tiny_cnn())], ("'w1'", "NaN or Inf")


@case("model-output-is-an-input", extra=True)  # was: internal AssertionError "Graph is not a DAG" in ORT's quantizer
def _(d):
    model = tiny_cnn()
    model.graph.output.append(next(value for value in model.graph.input if value.name == "x"))
    return save_unchecked(model, d / "cnn.onnx"), ["--calib", good_calib(d, tiny_cnn())], ("'x'", "passed through")


def _edit_external(path: str, tensor_name: str, key: str, value: str | None) -> None:
    model = onnx.load(path, load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == tensor_name)
    entries = [(e.key, e.value) for e in tensor.external_data if e.key != key]
    if value is not None:
        entries.append((key, value))
    del tensor.external_data[:]
    for k, v in entries:
        tensor.external_data.add(key=k, value=v)
    Path(path).write_bytes(model.SerializeToString())


@case("model-external-data-wrong-length", extra=True)  # was: internal reshape ValueError later on
def _(d):
    path, model = with_external_data(d)
    _edit_external(path, "w1", "length", "300")
    return path, ["--calib", good_calib(d, model)], ("'w1'", "300")


@case("model-external-data-no-length", extra=True)  # onnx then reads to the end of the file
def _(d):
    path, model = with_external_data(d)
    _edit_external(path, "w1", "length", None)
    return path, ["--calib", good_calib(d, model)], ("'w1'", "do not match")


@case("model-external-data-location-with-nul", extra=True)  # was: internal ValueError (embedded null byte)
def _(d):
    path, model = with_external_data(d)
    relocate_external(path, "cnn\x00.onnx.data")
    return path, ["--calib", good_calib(d, model)], ("invalid external data path",)


@case("model-no-outputs", extra=True)  # was: internal IndexError
def _(d):
    model = tiny_cnn()
    del model.graph.output[:]
    return save_unchecked(model, d / "cnn.onnx"), ["--calib", good_calib(d, tiny_cnn())], ("no graph outputs",)


@case("data-missing-path", extra=True)
def _(d):
    model_path, _model = good_cnn(d)
    return model_path, ["--calib", str(d / "nothing_here")], ("does not exist",)


@case("data-not-a-regular-file", extra=True)  # was: internal NotADirectoryError
def _(d):
    model_path, _model = good_cnn(d)
    return model_path, ["--calib", os.devnull], ("neither a regular file nor a folder",)


@case("data-empty-arrays", extra=True)
def _(d):
    model_path, _model = good_cnn(d)
    np.savez(d / "calib.npz", x=np.zeros((0, 1, 8, 8), np.float32))
    return model_path, ["--calib", str(d / "calib.npz")], ("no samples",)


@case("data-one-sample", extra=True)  # was: scipy k-means warnings on stderr, then a meaningless "success"
def _(d):
    model_path, model = good_cnn(d)
    np.savez(d / "calib.npz", x=samples_for(model, 1)["x"])
    return model_path, ["--calib", str(d / "calib.npz")], ("1 sample",)


@case("data-npy-renamed-npz", extra=True)  # was: internal AttributeError
def _(d):
    model_path, model = good_cnn(d)
    with open(d / "calib.npz", "wb") as handle:
        np.save(handle, samples_for(model, 8)["x"])
    return model_path, ["--calib", str(d / "calib.npz")], ("single .npy array",)


@case("data-corrupt-npz", extra=True)
def _(d):
    model_path, _model = good_cnn(d)
    (d / "calib.npz").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    return model_path, ["--calib", str(d / "calib.npz")], ("npz",)


@case("data-npz-member-corrupt", extra=True)  # was: reported as "holds Python objects"
def _(d):
    import zipfile

    model_path, model = good_cnn(d)
    with zipfile.ZipFile(d / "calib.npz", "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, "
                                  b"'shape': (8, 1, 8, 8), }" + b" " * 53 + b"\n" + bytes(40))
    return model_path, ["--calib", str(d / "calib.npz")], ("corrupt",)


@case("data-float64-beyond-float32", extra=True)  # was: internal AssertionError after an overflow warning
def _(d):
    model_path, _model = good_cnn(d)
    np.savez(d / "calib.npz", x=np.full((8, 1, 8, 8), 1e300))
    return model_path, ["--calib", str(d / "calib.npz")], ("beyond the range",)


@case("data-float-labels", extra=True)
def _(d):
    model_path, model = good_cnn(d)
    arrays = samples_for(model, 8)
    np.savez(d / "calib.npz", x=arrays["x"], labels=arrays["labels"].astype(np.float32))
    return model_path, ["--calib", str(d / "calib.npz")], ("labels",)


@case("data-uint64-labels-beyond-int64", extra=True)
def _(d):
    model_path, model = good_cnn(d)
    arrays = samples_for(model, 4)
    np.savez(d / "calib.npz", x=arrays["x"], labels=np.array([0, 1, 2, 2**64 - 1], np.uint64))
    return model_path, ["--calib", str(d / "calib.npz")], ("out of range",)


@case("data-label-negative", extra=True)
def _(d):
    model_path, model = good_cnn(d)
    arrays = samples_for(model, 8)
    arrays["labels"][:] = [0, 1, 2, 3, -1, 0, 1, 2]
    np.savez(d / "calib.npz", **arrays)
    return model_path, ["--calib", str(d / "calib.npz")], ("-1", "out of range")


@case("data-labels-csv-given-directly", extra=True)
def _(d):
    model_path, _model = good_cnn(d, channels=3)
    (d / "a.png").write_bytes(png_bytes(1))
    (d / "labels.csv").write_text("a.png,0\nimages/missing.png,1\n")
    return model_path, ["--calib", str(d / "labels.csv")], ("missing.png",)


def _csv_labels(*labels, names=None, expect=("labels.csv",)):
    def build(d):
        model_path, _model = good_cnn(d, channels=3)
        (d / "calib").mkdir()
        rows = []
        for index, label in enumerate(labels):
            (d / "calib" / f"{index}.png").write_bytes(png_bytes(index))
            rows.append(f"{(names or {}).get(index, f'{index}.png')},{label}")
        (d / "calib" / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        return model_path, ["--calib", str(d / "calib")], expect
    return build


EXTRA_CASES["data-csv-label-not-integer"] = _csv_labels("0", "cat")
EXTRA_CASES["data-csv-label-double-minus"] = _csv_labels("0", "--1")  # was: internal StopIteration
EXTRA_CASES["data-csv-label-superscript"] = _csv_labels("0", "\u00b2")  # was: internal StopIteration
EXTRA_CASES["data-csv-label-huge"] = _csv_labels("0", "9" * 30)  # was: internal OverflowError
EXTRA_CASES["data-csv-label-99"] = _csv_labels("0", "1", "99", expect=("label 99", "out of range"))
EXTRA_CASES["data-csv-field-too-long"] = _csv_labels("0", "1", names={1: "x" * 200_000})  # was: csv.Error
# a file name read from the CSV is shown escaped: a newline in it must not split the error line
EXTRA_CASES["data-csv-name-with-newline"] = _csv_labels("0", "1", names={1: '"missing\nfile.png"'})


@case("data-image-truncated-png", extra=True)
def _(d):
    model_path, _model = good_cnn(d, channels=3)
    return model_path, ["--calib", image_folder(d / "calib", broken=png_bytes(5, size=32)[:60])], ("zz_broken",)


@case("data-negative-crop", extra=True)  # was: blamed the first image ("cannot read image")
def _(d):
    model_path, _model = good_cnn(d, channels=3)
    return model_path, ["--calib", image_folder(d / "calib"), "--crop", "-5"], ("--crop",)


@case("data-resize-zero", extra=True)  # was: silently taken as "not given"
def _(d):
    model_path, _model = good_cnn(d, channels=3)
    return model_path, ["--calib", image_folder(d / "calib"), "--resize", "0"], ("--resize",)


@case("data-images-for-a-two-input-model", extra=True)
def _(d):
    return save_unchecked(two_input_model(), d / "two.onnx"), ["--calib", image_folder(d / "calib")], \
        ("2 inputs",)


@case("data-eval-class-not-in-calibration", extra=True)  # was: numbered on its own, scored against other outputs
def _(d):
    model_path, _model = good_cnn(d, channels=3)
    (d / "eval" / "bird").mkdir(parents=True)
    (d / "eval" / "bird" / "0.png").write_bytes(png_bytes(3))
    return model_path, ["--calib", image_folder(d / "calib"), "--eval", str(d / "eval")], \
        ("'bird'", "calibration data")


@case("data-folder-of-npy", extra=True)
def _(d):
    model_path, model = good_cnn(d)
    (d / "calib").mkdir()
    np.save(d / "calib" / "part0.npy", samples_for(model, 8)["x"])
    return model_path, ["--calib", str(d / "calib")], ("holds no",)


@case("data-npz-folder-mixed-naming", extra=True)
def _(d):
    model_path, model = good_cnn(d)
    (d / "calib").mkdir()
    arrays = samples_for(model, 4)
    np.savez(d / "calib" / "a.npz", **arrays)
    np.savez(d / "calib" / "b.npz", arr_0=arrays["x"], labels=arrays["labels"])
    return model_path, ["--calib", str(d / "calib")], ("named differently",)


@case("data-npz-folder-labels-in-some", extra=True)
def _(d):
    model_path, model = good_cnn(d)
    (d / "calib").mkdir()
    arrays = samples_for(model, 4)
    np.savez(d / "calib" / "a.npz", **arrays)
    np.savez(d / "calib" / "b.npz", x=arrays["x"])
    return model_path, ["--calib", str(d / "calib")], ("label all or none",)


@case("opt-unknown-flag", extra=True)
def _(d):
    return _option_case("--frobnicate", expect=("--frobnicate",))(d)


# ---- token models: text through a tokenizer, sequence .npz, task output, gates and modes


def token_model(length=None, mask: bool = False) -> onnx.ModelProto:
    """int64 input_ids [N, length] (+ attention_mask) -> Gather embedding -> mean over tokens -> MatMul."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (12, 8)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.normal(0, 0.5, (8, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
             helper.make_node("ReduceMean", ["h"], ["pooled"], axes=[1], keepdims=0, name="pool"),
             helper.make_node("MatMul", ["pooled", "w"], ["logits"], name="head")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", length or "T"])]
    if mask:  # read, so that it is a real input: scales the embedding by the mask
        nodes[0:1] = [helper.make_node("Gather", ["emb", "input_ids"], ["h0"], name="embed"),
                      helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT, name="mask_float"),
                      helper.make_node("Unsqueeze", ["m", "last"], ["m3"], name="mask_unsqueeze"),
                      helper.make_node("Mul", ["h0", "m3"], ["h"], name="mask_mul")]
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "last"))
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", length or "T"]))
    graph = helper.make_graph(nodes, "token_model", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def word_tokenizer(path: Path) -> str:
    """A real tokenizer.json: [CLS] words [SEP] over a ten-word vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "[PAD]": 1, "[CLS]": 2, "[SEP]": 3, "good": 4, "bad": 5, "movie": 6, "film": 7,
             "very": 8, "a": 9}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.save(str(path))
    return str(path)


def texts_tsv(path: Path, header=("id", "text", "label"), rows=None) -> str:
    rows = rows or [("good movie", "0"), ("bad film", "1"), ("a good film", "0"), ("very bad", "1")]
    lines = ["\t".join(header)] + ["\t".join((str(i), text, label)) for i, (text, label) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@case("text-csv-without-tokenizer", extra=True)  # was: "image 'text' does not exist"
def _(d):
    (d / "calib.csv").write_text("text,label\ngood movie,0\nbad film,1\n")
    return save_unchecked(token_model(), d / "tokens.onnx"), ["--calib", str(d / "calib.csv")], \
        ("'text' column", "--tokenizer")


@case("text-tokenizer-does-not-load", over_existing=True)
def _(d):
    (d / "tokenizer.json").write_text('{"model": 3}')
    return save_unchecked(token_model(), d / "tokens.onnx"), \
        ["--calib", texts_tsv(d / "calib.tsv"), "--tokenizer", str(d / "tokenizer.json")], \
        ("tokenizer.json", "does not load")


@case("text-tsv-without-text-column")
def _(d):
    return save_unchecked(token_model(), d / "tokens.onnx"), \
        ["--calib", texts_tsv(d / "calib.tsv", header=("id", "sentence", "label")),
         "--tokenizer", word_tokenizer(d / "tokenizer.json")], ("'text'", "sentence", "--text-column")


@case("text-longer-than-fixed-sequence")
def _(d):
    rows = [("good movie", "0"), ("a very good film", "1"), ("bad", "0")]  # row 2: 6 tokens with [CLS] [SEP]
    return save_unchecked(token_model(length=5), d / "tokens.onnx"), \
        ["--calib", texts_tsv(d / "calib.tsv", rows=rows), "--tokenizer", word_tokenizer(d / "tokenizer.json")], \
        ("calib.tsv:3", "6 tokens", "fixed sequence length 5")


@case("data-npz-inputs-differ-in-sequence-length")
def _(d):
    np.savez(d / "calib.npz", input_ids=np.ones((8, 12), np.int64), attention_mask=np.ones((8, 10), np.int64))
    return save_unchecked(token_model(mask=True), d / "tokens.onnx"), ["--calib", str(d / "calib.npz")], \
        ("sequence lengths differ", "input_ids 12", "attention_mask 10")


CASES["opt-output-nosuch"] = _option_case("--output", "nosuch", expect=("--output", "nosuch", "logits"))
CASES["opt-min-cosine-0"] = _option_case("--min-cosine", "0", expect=("--min-cosine",))
CASES["opt-min-cosine-1.5"] = _option_case("--min-cosine", "1.5", expect=("--min-cosine", "1.5"))
CASES["opt-activations-bogus"] = _option_case("--activations", "bogus", expect=("--activations", "bogus"))
OVER_EXISTING.add("opt-output-nosuch")


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(tmp_path, name):
    inputs = tmp_path / "in"
    inputs.mkdir()
    model, rest, expect = CASES[name](inputs)
    run_case(tmp_path, model, rest, expect, over_existing=name in OVER_EXISTING)
    assert not (tmp_path / "PWNED").exists(), "a pickled payload in the samples was executed"


@pytest.mark.parametrize("name", sorted(EXTRA_CASES))
def test_bad_input_in_process(tmp_path, name, capsys, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    model, rest, expect = EXTRA_CASES[name](inputs)
    run_in_process(tmp_path, model, rest, expect, capsys, monkeypatch)


def test_pickle_payload_is_live(tmp_path):
    """The object-array cases mean something: unpickling that payload does create the marker."""
    marker = tmp_path / "marker"
    np.savez(tmp_path / "payload.npz", x=object_array(marker))
    assert not marker.exists()
    with np.load(tmp_path / "payload.npz", allow_pickle=True) as arrays:
        arrays["x"]
    assert marker.is_dir()


# --------------------------------------------------------------------------- known bugs elsewhere


def test_missing_model_over_existing_output(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    model, rest, expect = CASES["model-missing"](inputs)
    run_case(tmp_path, model, rest, expect, over_existing=True)


def test_model_onnx_runtime_cannot_load(tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    model = tiny_cnn()
    model.graph.node[1].op_type, model.graph.node[1].domain = "Frob", "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    path = save_unchecked(model, inputs / "cnn.onnx")
    run_in_process(tmp_path, path, ["--calib", good_calib(inputs, tiny_cnn())], ("onnx runtime",),
                   capsys, monkeypatch)


def test_newline_in_a_path_keeps_one_line(tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    model_path, _model = good_cnn(inputs)
    run_in_process(tmp_path, model_path, ["--calib", str(inputs / "no\nsuch")], ("does not exist",),
                   capsys, monkeypatch)


def test_samples_that_overflow_the_model(tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    model_path, _model = good_cnn(inputs)
    np.savez(inputs / "calib.npz", x=np.full((8, 1, 8, 8), 3e38, np.float32))
    run_in_process(tmp_path, model_path, ["--calib", str(inputs / "calib.npz")], ("NaN or Inf",), capsys, monkeypatch)


# --------------------------------------------------------------------------- the output path itself


def _run_output_case(tmp_path: Path, output: str, expect=()) -> None:
    model_path, model = good_cnn(tmp_path)
    calib = good_calib(tmp_path, model)
    tmp_dir = tmp_path.parent / (tmp_path.name + "_tmp")
    tmp_dir.mkdir()
    before = listing(tmp_path)
    code, stdout, stderr = _finish(_launch([model_path, output, "--calib", calib], tmp_dir))
    assert_one_line_error(code, stdout, stderr, expect)
    assert listing(tmp_path) == before, "files in the model/output folder changed (the input included)"
    assert leftovers(tmp_dir) == [], "left-over temporary files"


@pytest.mark.parametrize("spelling", ["same", "dot-dot", "symlink"])
def test_output_is_the_input(tmp_path, spelling):
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        os.symlink(tmp_path / "cnn.onnx", tmp_path / "sub" / "link.onnx")  # resolves once the model is written
    output = {"same": str(tmp_path / "cnn.onnx"),
              "dot-dot": f"{tmp_path}/./sub/../cnn.onnx",
              "symlink": str(tmp_path / "sub" / "link.onnx")}[spelling]
    _run_output_case(tmp_path, output, expect=("input model",))


def test_output_folder_missing(tmp_path):
    _run_output_case(tmp_path, str(tmp_path / "no_such_folder" / "out.onnx"), expect=("does not exist",))


def test_output_parent_is_a_file(tmp_path):
    """Stands in for an unwritable folder (the tests run as root, so chmod would not block writes)."""
    (tmp_path / "afile").write_text("a regular file\n")
    _run_output_case(tmp_path, str(tmp_path / "afile" / "out.onnx"), expect=("afile",))


def test_output_is_a_folder(tmp_path):
    (tmp_path / "out.onnx").mkdir()
    _run_output_case(tmp_path, str(tmp_path / "out.onnx"), expect=("folder",))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc as a folder nobody can write to")
def test_output_folder_not_writable_even_for_root(tmp_path):
    """/proc refuses new files even to root: a real unwritable folder, unlike a chmod-ed one."""
    _run_output_case(tmp_path, "/proc/msq-out.onnx", expect=("writable",))


def test_an_already_quantized_model_is_named_as_such(tmp_path, capsys, monkeypatch):
    """A model msq-onnx (or ORT's quantizer) already quantized has no float layer left: the one line says what it
    is and asks for the FP32 model, instead of listing the layer kinds it looked for."""
    from msq_onnx import Options, convert

    inputs = tmp_path / "in"
    inputs.mkdir()
    model_path, model = good_cnn(inputs)
    calib = good_calib(inputs, model)
    convert(model_path, str(inputs / "int8.onnx"), calib, Options(quiet=True))
    run_in_process(tmp_path, str(inputs / "int8.onnx"), ["--calib", calib], ("already quantized", "FP32 model"),
                   capsys, monkeypatch)


def test_the_integer_weight_inputs_cover_every_integer_kernel_a_written_model_is_counted_by():
    """load's one list of integer-weight kernels (where each reads its weight) serves both the "already quantized"
    refusal and the partly quantized input's count: it must hold every kernel verify counts, and quantize_dynamic's
    two more."""
    from msq_onnx.load import _INTEGER_WEIGHT_INPUTS
    from msq_onnx.verify import FUSED_INTEGER_OPS

    assert set(FUSED_INTEGER_OPS) | {"DynamicQuantizeLSTM", "QAttention", "DequantizeLinear"} == set(_INTEGER_WEIGHT_INPUTS)


def test_fake_quantized_activations_do_not_make_a_model_already_quantized(tmp_path):
    """Q/DQ pairs on activations alone (fake quantization) and an embedding table read inside an If body: the refusal
    says
    the layers are inside control flow, not that the model was quantized already (a review found it did)."""
    from msq_onnx.errors import BadModel
    from msq_onnx.load import load_model

    rng = np.random.default_rng(0)

    def branch(name):  # an embedding table: left in float inside a body
        return helper.make_graph([helper.make_node("Gather", ["W", "rows"], [name])], name, [],
                                 [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4])])

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
             helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0),
             helper.make_node("ArgMax", ["xd"], ["rows"], axis=1, keepdims=0),
             helper.make_node("Greater", ["top", "zero"], ["positive"]),
             helper.make_node("If", ["positive"], ["y"], then_branch=branch("a"), else_branch=branch("b"))]
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "zp"),
             numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array(0, np.float32), "zero")]
    graph = helper.make_graph(nodes, "fake_quant", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    with pytest.raises(BadModel, match="If/Loop/Scan") as raised:
        load_model(str(tmp_path / "m.onnx"))
    assert "already quantized" not in str(raised.value)


def test_an_output_path_on_the_input_models_external_data_is_refused(tmp_path, capsys):
    """The output written over the input's own data file destroyed the input, exit 0 (a hunting subagent's)."""
    from msq_onnx import cli

    path, model = with_external_data(tmp_path)
    data = tmp_path / "cnn.onnx.data"
    before = data.read_bytes()
    code = cli.main([path, str(data), "--calib", good_calib(tmp_path, model)])
    assert code == 2 and "external data" in capsys.readouterr().err and data.read_bytes() == before


@pytest.mark.parametrize("member", ["x", "labels"])
def test_an_npz_member_of_raw_bytes_is_named(tmp_path, member, capsys, monkeypatch):
    """A member written with ndarray.tofile and zipped by hand (was: internal AttributeError, 'bytes' object has
    no attribute 'dtype')."""
    import zipfile

    inputs = tmp_path / "in"
    inputs.mkdir()
    model_path, model = good_cnn(inputs)
    arrays = samples_for(model, 8)
    with zipfile.ZipFile(inputs / "calib.npz", "w") as archive:
        for name, array in arrays.items():
            archive.writestr(f"{name}.npy", array.tobytes() if name == member else _npy_bytes(array))
    run_in_process(tmp_path, model_path, ["--calib", str(inputs / "calib.npz")], (f"'{member}'", "not a .npy"),
                   capsys, monkeypatch)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()

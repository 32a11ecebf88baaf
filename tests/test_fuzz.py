"""Fuzzing the input readers, and interrupting a conversion.

Property: whatever bytes a user hands over, ``load_model`` and the sample
readers either succeed or raise ``MsqError`` (which the CLI turns into one
line and exit code 2); any other exception would be an internal error. The
Hypothesis runs are bounded and derandomized, so CI sees the same examples
every time.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import BUNDLED_CALIB, BUNDLED_MODEL, ROOT, tiny_cnn, tiny_mlp
from msq_onnx.data import Preprocess, check_labels, open_samples
from msq_onnx.errors import MsqError
from msq_onnx.load import InputSpec, load_model

FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def expect_ok_or_msq_error(call):
    """Run `call`; an MsqError is a fine answer, any other exception is the bug."""
    try:
        return call()
    except MsqError as error:
        text = str(error)
        assert text.strip() and "\n" not in text, f"MsqError message must be one non-empty line: {text!r}"
        return None


# --------------------------------------------------------------------------- (1) load_model


MODEL_BYTES = [tiny_cnn().SerializeToString(),  # opset 17: goes through the version converter
               tiny_cnn(opset=21).SerializeToString(),
               tiny_mlp().SerializeToString()]


@st.composite
def mutated(draw, originals):
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(0, 8))):  # byte flips and overwrites, anywhere
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):  # a hole or an insertion
        start = draw(st.integers(0, len(data)))
        end = draw(st.integers(start, min(len(data), start + 64)))
        data[start:end] = draw(st.binary(max_size=16))
    if draw(st.booleans()):  # truncation
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


def _load_bytes(work, data: bytes, name: str = "model.onnx"):
    path = work / name
    path.write_bytes(data)
    loaded = expect_ok_or_msq_error(lambda: load_model(str(path)))
    if loaded is not None:  # what load_model hands on is usable by the later stages
        assert loaded.inputs and loaded.layers and loaded.output_name
        for layer in loaded.layers:
            assert loaded.weight(layer).shape == layer.weight_shape


@FUZZ
@given(data=st.binary(max_size=4096))
def test_load_model_random_bytes(work, data):
    _load_bytes(work, data)


@FUZZ
@given(data=mutated(MODEL_BYTES))
def test_load_model_mutated_model(work, data):
    _load_bytes(work, data)


class _External:
    """A model saved with external data (short repr: Hypothesis prints fixtures of failing examples)."""

    def __init__(self, folder):
        onnx.save_model(tiny_cnn(), folder / "cnn.onnx", save_as_external_data=True, location="cnn.onnx.data",
                        size_threshold=0)
        self.folder = folder
        self.model = (folder / "cnn.onnx").read_bytes()
        self.data = (folder / "cnn.onnx.data").read_bytes()

    def __repr__(self):
        return f"<tiny_cnn with external data in {self.folder}>"


@pytest.fixture(scope="module")
def external_model(tmp_path_factory):
    return _External(tmp_path_factory.mktemp("external"))


@settings(FUZZ, max_examples=60)
@given(which=st.sampled_from(["model", "data"]), seed=st.data())
def test_load_model_mutated_external_data(external_model, which, seed):
    """Mutated locations/offsets/lengths in the model, or a mutated/truncated data file."""
    folder, model_bytes, data_bytes = external_model.folder, external_model.model, external_model.data
    model_out, data_out = model_bytes, data_bytes
    if which == "model":
        model_out = seed.draw(mutated([model_bytes]))
    else:
        data_out = seed.draw(mutated([data_bytes]))
    (folder / "cnn.onnx").write_bytes(model_out)
    (folder / "cnn.onnx.data").write_bytes(data_out)
    loaded = expect_ok_or_msq_error(lambda: load_model(str(folder / "cnn.onnx")))
    if loaded is not None:
        for layer in loaded.layers:
            assert loaded.weight(layer).shape == layer.weight_shape
    assert sorted(os.listdir(folder)) == ["cnn.onnx", "cnn.onnx.data"]  # nothing written beside the model


# --------------------------------------------------------------------------- (2) sample readers


SPECS = {
    "image": [InputSpec("x", [None, 1, 4, 4], np.dtype(np.float32))],  # also takes [N, 4, 4]
    "vector": [InputSpec("x", [None, 3], np.dtype(np.float32))],
    "two": [InputSpec("x", [None, 3], np.dtype(np.float32)), InputSpec("z", [None, 2], np.dtype(np.int64))],
}
NAMES = st.one_of(st.sampled_from(["x", "z", "labels", "arr_0", "extra"]),
                  st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=6))
DTYPES = st.sampled_from(["float16", "float32", "float64", "int8", "uint8", "int32", "int64", "uint64", "bool",
                          "complex64", "U3", "S2", "datetime64[s]", "object"])
SHAPES = st.one_of(st.sampled_from([(0,), (0, 3), (5, 3), (2, 1, 4, 4), (3, 4, 4), (4,), (), (2, 2)]),
                   hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))


class SideEffect:
    """Unpickling this creates the folder `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@st.composite
def random_array(draw, marker: str):
    dtype, shape = draw(DTYPES), draw(SHAPES)
    if dtype == "object":
        array = np.empty(shape, dtype=object)
        array.reshape(-1)[:] = [SideEffect(marker)] * array.size
        return array
    if dtype.startswith("datetime"):
        return draw(hnp.arrays(np.int64, shape)).astype(dtype)
    array = draw(hnp.arrays(np.dtype(dtype), shape))
    if array.dtype.kind in "iu" and array.size and draw(st.booleans()):  # plausible labels now and then
        array = np.abs(array.astype(np.int64) % 12).astype(dtype)
    return array


@st.composite
def npz_files(draw, marker: str):
    spec_name = draw(st.sampled_from(sorted(SPECS)))
    arrays = {}
    count = draw(st.integers(0, 6))
    for spec in SPECS[spec_name]:  # mostly well-formed inputs, so the later checks get exercised
        if draw(st.integers(0, 3)):
            shape = [count] + [d for d in spec.shape[1:]]
            if spec.name == "x" and len(shape) == 4 and draw(st.booleans()):
                shape = [count, 4, 4]
            dtype = spec.dtype if draw(st.integers(0, 2)) else np.dtype(draw(st.sampled_from(["float64", "uint8",
                                                                                               "int64"])))
            tame = dtype.kind == "f" and draw(st.integers(0, 3))  # mostly ordinary values, sometimes any
            elements = st.floats(-1e6, 1e6, width=32) if tame else None
            arrays[spec.name] = draw(hnp.arrays(dtype, shape, elements=elements))
    if draw(st.booleans()):
        arrays["labels"] = draw(hnp.arrays(np.int64, count, elements=st.integers(-2, 12)))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):  # and anything else under any name
        arrays[draw(NAMES)] = draw(random_array(marker))
    if draw(st.booleans()):  # a non-finite value somewhere
        floats = [a for a in arrays.values() if a.dtype.kind == "f" and a.size]
        if floats:
            target = draw(st.sampled_from(floats))
            target.reshape(-1)[draw(st.integers(0, target.size - 1))] = draw(st.sampled_from([np.nan, np.inf,
                                                                                              -np.inf]))
    return spec_name, arrays


def read_all(path: str, specs, num_classes):
    """What convert() does with a sample set: open, check labels, stream every batch."""
    samples = open_samples(path, specs, Preprocess(), "calibration")
    check_labels(samples, num_classes, "calibration")
    rows = 0
    for batch in samples.batches(4):
        assert sorted(batch) == sorted(s.name for s in specs)
        sizes = {len(v) for v in batch.values()}
        assert len(sizes) == 1 and 1 <= sizes.pop() <= 4
        for spec in specs:
            value = batch[spec.name]
            assert value.dtype == spec.dtype and value.ndim == len(spec.shape)
            assert all(want is None or want == got for want, got in zip(spec.shape[1:], value.shape[1:]))
            if value.dtype.kind == "f":
                assert np.isfinite(value).all(), "accepted samples must be finite in the model's dtype"
        rows += len(batch[specs[0].name])
    assert rows == samples.count > 0
    if samples.labels is not None:
        assert len(samples.labels) == samples.count and samples.labels.min() >= 0
        if num_classes:
            assert samples.labels.max() < num_classes
    return samples


@FUZZ
@given(case=npz_files(marker="MARKER"), num_classes=st.sampled_from([None, 4, 12]),
       compressed=st.booleans())
def test_npz_random_arrays(work, case, num_classes, compressed):
    spec_name, arrays = case
    marker = work / "MARKER"
    path = work / "samples.npz"
    arrays = {name: value for name, value in arrays.items()}
    for value in arrays.values():  # point the payloads at this run's marker
        if value.dtype == object:
            value.reshape(-1)[:] = [SideEffect(str(marker))] * value.size
    try:
        (np.savez_compressed if compressed else np.savez)(path, **arrays)
    except Exception:  # a name numpy itself cannot store
        assume(False)
    expect_ok_or_msq_error(lambda: read_all(str(path), SPECS[spec_name], num_classes))
    assert not marker.exists(), "a pickled payload was executed"


def _valid_npz(compressed: bool) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(
        buffer, x=rng.normal(size=(6, 1, 4, 4)).astype(np.float32), labels=np.arange(6) % 3)
    return buffer.getvalue()


VALID_NPZ = [_valid_npz(False), _valid_npz(True)]


@FUZZ
@given(data=mutated(VALID_NPZ))
def test_npz_mutated_bytes(work, data):
    path = work / "mutated.npz"
    path.write_bytes(data)
    expect_ok_or_msq_error(lambda: read_all(str(path), SPECS["image"], 3))


# ---- images and labels.csv (the other formats, same property)


def _png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


IMAGES = [_png(0), _jpeg(1)]
IMAGE_SPEC = [InputSpec("x", [None, 3, 4, 4], np.dtype(np.float32))]


@FUZZ
@given(broken=mutated(IMAGES), suffix=st.sampled_from([".png", ".jpg"]))
def test_image_folder_mutated_image(tmp_path_factory, broken, suffix):
    folder = tmp_path_factory.mktemp("images")
    for cls, payload in (("a", IMAGES[0]), ("b", broken)):
        (folder / cls).mkdir()
        (folder / cls / f"0{suffix}").write_bytes(payload)
        (folder / cls / f"1{suffix}").write_bytes(IMAGES[1])
    expect_ok_or_msq_error(lambda: read_all(str(folder), IMAGE_SPEC, 2))


CSV_CELLS = st.one_of(st.sampled_from(["0", "1", "2", "-1", "99", "--1", "1.5", "", " 1 ", "\u00b2", "9" * 25,
                                       "a.png", "b.png", "missing.png", "/etc/passwd", "images/a.png", "file",
                                       "\x00", '"q"', "a.png,1"]),
                      st.text(max_size=8))


@FUZZ
@given(rows=st.lists(st.lists(CSV_CELLS, max_size=3), max_size=6), header=st.booleans())
def test_labels_csv_random_rows(tmp_path_factory, rows, header):
    import csv

    folder = tmp_path_factory.mktemp("csv")
    (folder / "a.png").write_bytes(IMAGES[0])
    (folder / "b.png").write_bytes(_png(5))
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8", errors="surrogatepass") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(["file", "label"])
        writer.writerows(rows)
    expect_ok_or_msq_error(lambda: read_all(str(folder), IMAGE_SPEC, 3))


# --------------------------------------------------------------------------- (3) interrupting a conversion


def _convert(output, tmpdir, extra=()):
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONDONTWRITEBYTECODE="1")
    env.pop("MSQ_DEBUG", None)
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "cli.py"), BUNDLED_MODEL, str(output),
                             "--calib", BUNDLED_CALIB, "--avg-bits", "4", "--quiet", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_interrupted_conversion_leaves_old_or_complete_output(tmp_path):
    """SIGINT / SIGTERM at several moments: the output is the old file or the complete new model."""
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    started = time.monotonic()
    proc = _convert(reference_dir / "out.onnx", reference_dir)
    _, stderr = proc.communicate(timeout=300)
    full = time.monotonic() - started
    assert proc.returncode == 0, stderr
    new_bytes = (reference_dir / "out.onnx").read_bytes()  # the conversion is deterministic (seed 0)

    old_bytes = tiny_mlp(seed=3).SerializeToString()
    outcomes = []
    for index, fraction in enumerate([0.1, 0.3, 0.5, 0.65, 0.8, 0.9, 0.97, 1.05]):
        folder, tmpdir = tmp_path / f"run{index}", tmp_path / f"tmp{index}"
        folder.mkdir()
        tmpdir.mkdir()
        output = folder / "out.onnx"
        output.write_bytes(old_bytes)
        sig = signal.SIGINT if index % 2 == 0 else signal.SIGTERM
        proc = _convert(output, tmpdir)
        time.sleep(full * fraction)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=300)
        outcomes.append(proc.returncode)
        context = f"{sig.name} after {full * fraction:.2f}s: exit {proc.returncode}, stderr {stderr[-500:]!r}"

        # A signal in the first half second lands while numpy and onnxruntime are imported; about 1 in 80 such
        # signals has crashed the interpreter (exit -11) even with them held until main() (cli.py): an open
        # defect, said in the docs. The output must still be the old file.
        early_crash = proc.returncode == -signal.SIGSEGV and full * fraction < 0.5
        assert proc.returncode in (0, 130, -sig) or early_crash, context
        if proc.returncode == 130:  # interrupted inside main(): said so, in one line
            assert stderr.strip().splitlines()[-1].startswith("msq-onnx: interrupted"), context
            assert "Traceback" not in stderr, context
        final = output.read_bytes()
        assert final in (old_bytes, new_bytes), context
        onnx.checker.check_model(onnx.load_from_string(final))
        if proc.returncode == 0:
            assert final == new_bytes, context
        names = os.listdir(folder)
        assert names == ["out.onnx"], f"left beside the output: {names}; {context}"
        left = [n for n in os.listdir(tmpdir) if n.startswith("msq") or n.startswith(".msq")]
        assert not left, f"left in TMPDIR: {left}; {context}"
    print("exit codes by delay:", outcomes)  # shown with -s / on failure
    assert any(code != 0 for code in outcomes), f"no run was actually interrupted: {outcomes}"



def test_an_interrupt_while_the_weights_folder_goes_still_removes_it(tmp_path, monkeypatch):
    """A SIGTERM at the end of a conversion landed in the weights folder's finalizer: its KeyboardInterrupt was
    printed and dropped, and the folder stayed in TMPDIR (a run of the interrupt test above)."""
    import shutil

    from msq_onnx import load

    folder = tmp_path / "msq-weights-x"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"0" * 10)
    real, calls = shutil.rmtree, []

    def interrupted_once(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted_once)
    load._remove_folder(str(folder))
    assert not folder.exists() and len(calls) == 2


@pytest.mark.parametrize("step", ["publish", "probe", "report"])
def test_an_interrupt_as_a_hidden_file_is_made_leaves_nothing_beside_the_output(step, tmp_path, monkeypatch):
    """The fuzz test's SIGINT at 0.76 s once left '.msq-*.onnx.tmp' beside the output: tempfile.mkstemp had made
    the file, and the interrupt landed before the code that removes it on one knew its name. The names are now
    known before the files exist; an interrupt as the file is made (here: as its descriptor closes) leaves none."""
    from msq_onnx import write

    onnx.save(tiny_mlp(seed=3), tmp_path / "source.onnx")
    (tmp_path / "out").mkdir()
    real_close = os.close

    def interrupted(fd):
        real_close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(write.os, "close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        if step == "publish":
            write.publish(str(tmp_path / "source.onnx"), str(tmp_path / "out" / "out.onnx"))
        elif step == "report":
            from msq_onnx import report

            report._atomic_write(str(tmp_path / "out" / "r.json"), b"{}")
        else:
            write.check_output_path(str(tmp_path / "source.onnx"), str(tmp_path / "out" / "out.onnx"))
    assert os.listdir(tmp_path / "out") == []


def test_an_interrupt_as_a_temporary_folder_is_made_leaves_none(tmp_path, monkeypatch):
    """Full-suite runs of the interrupt test above twice left 'msq-*' in TMPDIR after a SIGINT at 0.79 s:
    tempfile.TemporaryDirectory registers the folder's removal after mkdtemp has made it. TemporaryFolder registers
    it first: an interrupt as the folder is made (here: as mkdir returns) still has it removed, when the half-made
    object goes or at the interpreter's exit."""
    import gc
    import tempfile

    from msq_onnx import load

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    real_mkdir = os.mkdir

    def interrupted(path, mode=0o777):
        real_mkdir(path, mode)
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(load.os, "mkdir", interrupted)
        with pytest.raises(KeyboardInterrupt):
            load.TemporaryFolder("msq-")
    gc.collect()
    assert os.listdir(tmp_path / "tmp") == []
    with load.TemporaryFolder("msq-") as name:  # and an uninterrupted one is there until the block ends
        assert os.path.isdir(name) and os.path.dirname(name) == str(tmp_path / "tmp")
    assert os.listdir(tmp_path / "tmp") == []


def test_an_interrupt_as_a_temporary_folder_goes_leaves_its_removal_registered(tmp_path, monkeypatch):
    """A second review interrupted TemporaryFolder's removal as it began (the finalizer's own call unregisters it
    before it removes): the folder stayed, with nothing left to retry. cleanup() now removes first and unregisters
    after: the interrupted folder is still removed when the object goes or at the interpreter's exit."""
    import gc
    import tempfile

    from msq_onnx import load

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = load.TemporaryFolder("msq-")

    def interrupted(name):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(load, "_remove_folder", interrupted)
        with pytest.raises(KeyboardInterrupt):
            with folder:
                pass
    assert os.path.isdir(folder.name) and folder._finalizer.alive  # still to be removed
    del folder
    gc.collect()
    assert os.listdir(tmp_path) == []

"""Stage 1: read a user's ONNX model and bring it to one normal form.

Every later stage works on the normalized model, so the quirks of models "as
users have them" (old opsets, Constant nodes, initializers listed as inputs,
2-D Gemm biases, unnamed nodes, batch normalizations left beside their convolutions) are handled once, here.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from . import sample_axes
from .errors import BadModel, one_line
from .ops import (ALWAYS_WEIGHTED, BODY_KINDS, FLOAT_BITS, Layer, Skip, attribute, bodies,  # noqa: F401
                  consumers, in_body, kind_for,  # (re-exported)
                  earliest_selection, selected_outputs, selection_source, selection_text, subgraph_inputs)

# Written opset: the first with int4/uint4 Q/DQ and per-axis DQ everywhere, and
# one that ONNX Runtime 1.31 (<= 26) loads. Newer models keep their own opset.
TARGET_OPSET = 21
MAX_OPSET = 26
MIN_OPSET = 7

# Elementwise ops that follow a layer and belong to its output: the probe is
# the tensor the next layer actually consumes.
_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh",
                "Elu", "Selu", "Gelu", "Softplus", "Mish", "PRelu", "BatchNormalization"}
PROTOBUF_LIMIT = 2 * 1024**3  # a ModelProto past this cannot be serialized in one piece


@dataclass
class InputSpec:
    name: str
    shape: list  # ints, or None for symbolic dims
    dtype: np.dtype
    axis_names: list | None = None  # each axis's dim_param, None where the model names none
    # why its samples cannot be stacked along its first axis (sample_axes.input_axes): they must come whole
    unbatched: str = ""
    # its axes past the first named as the batch the inputs have first: 1 where a sample comes whole, a run's
    batch_axes: tuple = ()
    own_first_axis: bool = False  # 1-D, its axis no other input's first (a waveform [T]): [N, T] comes whole

    @property
    def batch_fixed(self) -> bool:
        return bool(self.shape) and self.shape[0] is not None

    @property
    def whole_text(self) -> str:
        """Its samples given whole, as the messages ask for them: [N, *its shape], '?' for a free dimension."""
        return "[" + ", ".join(["N"] + [str(d) if d is not None else "?" for d in self.shape]) + "]"


@dataclass
class LoadedModel:
    model: onnx.ModelProto  # normalized, weights loaded in memory
    source_path: str
    source_opset: int
    opset: int
    inputs: list[InputSpec]
    output_name: str
    layers: list[Layer]
    size_bytes: int
    initializers: dict = field(default_factory=dict)
    # Weighted nodes that are not layers, and why: they stay in float and the report names them.
    skipped: list = field(default_factory=list)

    # Integer weights the input already held (a partly quantized model): kept as they are, and named.
    prequantized: list = field(default_factory=list)
    # A weight the load computed from others (weight_norm, a float16 source and a Cast) -> its sources' bytes in
    # the input file: what --max-size takes out of the input's size for it, instead of 4 bytes a weight.
    folded_bytes: dict = field(default_factory=dict)
    # Inputs the input model gave a default initializer (IR >= 4), as they were declared.
    default_inputs: list = field(default_factory=list)
    # graph output -> the selecting node (NMS, NonZero...) whose choice its length follows (ops.selected_outputs)
    selected: dict = field(default_factory=dict)
    # What the calibration-time stages (pseudo-labels, modes, sensitivity) judge the task on: the task output, or,
    # where a selection decides its length, the float tensor the selection is made from (a detector's scores
    # before NMS: the boxes it keeps are a decision on them, as a class id is on its logits).
    judged_name: str = ""
    judged_text: str = ""  # the report's words for it
    # input or output -> its declared value in the input model, where the samples gave an input whole and the
    # model is read with a sample axis added (sample_axes.add); the written model is published without it
    sample_axes: dict = field(default_factory=dict)

    @property
    def judged(self) -> str:
        return self.judged_name or self.output_name

    @property
    def judged_by_run(self) -> bool:
        """Whether the judged tensor may have no axis per sample: a selection's source or output (torchvision's
        scores [A] before their threshold, its kept boxes [K, 4]); it is then read a run, of one sample, at a time."""
        return self.output_name in self.selected

    def judged_samples(self, value: np.ndarray, count: int) -> np.ndarray:
        """One run's judged tensor with its `count` samples first. Read as [A] scores with their first axis the
        batch, a detector's scores were judged on their first anchor alone (a review's: end-to-end error 0.0)."""
        if self.judged_by_run and count == 1 and (value.ndim == 0 or value.shape[0] != 1):
            return value[None]
        return value[:count]

    def input_bytes(self, layer: Layer) -> int:
        """The bytes the layer's weight took in the input file."""
        return self.folded_bytes.get(layer.weight_name, 4 * layer.params)

    def skipped_params(self, entry: dict) -> int:
        """The parameters of a `skipped` entry's float weight: the graph's initializer, or a body's own ("params")."""
        weight = entry.get("weight")
        return math.prod(self.initializers[weight].dims) if weight in self.initializers else entry.get("params", 0)

    @property
    def float_params(self) -> int:
        """Parameters of the weighted nodes that cannot be quantized: they count at 32 bits in every budget."""
        by_weight = {s["weight"]: s for s in self.skipped if s.get("weight")}  # a weight counts once
        return sum(self.skipped_params(entry) for entry in by_weight.values())

    @property
    def fixed_weights(self) -> dict:
        """width -> parameters no allocation can change: the float ones at 32 bits, the input's integer ones at
        their stored width. Every budget and average counts them."""
        fixed = {FLOAT_BITS: self.float_params} if self.float_params else {}
        for bits, params in {e["weight"]: (e["bits"], e["params"]) for e in self.prequantized}.values():
            fixed[bits] = fixed.get(bits, 0) + params
        return fixed

    shared_weights: "SharedWeights | None" = field(default=None, repr=False, compare=False)

    def session_copy(self) -> onnx.ModelProto:
        """A copy of the model for a graph ORT will run (instrumented, simulated): its weights past
        SET_ASIDE_BYTES are references into one file, written on the first call, so that a session reads them
        from there (make_session's `weights`) instead of from a serialized copy of every weight. MiniLM-L6
        (90 MB): copy, serialization and session 0.33-0.38 s -> 0.08 s, the same outputs. The file holds the
        weights as they were at the first call: the loaded model is not changed after load_model."""
        return _without_weights(self.model, self._shared().places)[0]

    def judged_out(self, copy: onnx.ModelProto) -> onnx.ModelProto:
        """A copy with the judged tensor among its outputs, where it is no output of the model's own: added last,
        as an output changes what ORT's quantizer does around it (a Relu it would absorb, a static region's end),
        which a graph that simulates the written model must not see."""
        if self.judged not in {o.name for o in copy.graph.output}:
            copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(self.judged))
        return copy

    def _shared(self) -> "SharedWeights":
        with _SHARING:  # two threads' first copies would write two files, and one folder would go
            if self.shared_weights is None:
                self.shared_weights = SharedWeights(self.model)
            return self.shared_weights

    def with_weights(self, copy: onnx.ModelProto, leave=frozenset()) -> onnx.ModelProto:
        """A session_copy made whole: each reference into the weights file still in it becomes its weight again,
        as loaded (copied in memory), but those named in `leave`, which stay references."""
        for tensor in copy.graph.initializer:
            if tensor.name not in leave and references_weights_file(tensor):
                tensor.CopyFrom(self.initializers[tensor.name])
        return copy

    def model_file(self) -> str:
        """The model as a file ORT and its quantizer read: its graph, written once beside the weights file
        session_copy points into, so the weights are not serialized again (MiniLM-L6: 90 MB saved, and each
        session built from the file in 0.08 s instead of 0.17)."""
        path = os.path.join(self.weights_folder, MODEL_FILE)
        with _SHARING:
            if not os.path.exists(path):
                save_model_file(self.session_copy(), path + ".part")
                os.replace(path + ".part", path)  # whole or absent for a reader in another thread
        return path

    @property
    def weights_folder(self) -> str:
        """The folder of the file session_copy's references point into (the file is written on first use, so a
        caller need not have made a copy before asking)."""
        return self._shared().folder

    def weight(self, layer: Layer) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[layer.weight_name])

    def bias(self, layer: Layer) -> np.ndarray | None:
        if layer.bias_name is None:
            return None
        return numpy_helper.to_array(self.initializers[layer.bias_name])


def references_weights_file(tensor: onnx.TensorProto) -> bool:
    """Whether a tensor of a session_copy is still a reference into the weights file (LoadedModel.with_weights)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == WEIGHTS_FILE for e in tensor.external_data)


def _model_size(path: str, model: onnx.ModelProto) -> int:
    size = os.path.getsize(path)
    base = os.path.dirname(os.path.abspath(path))
    seen = set()
    for tensor in _external_tensors(model):
        location = _external_location(tensor)
        if location not in seen:
            seen.add(location)
            full = os.path.join(base, location)
            if os.path.exists(full):
                size += os.path.getsize(full)
    return size


def _external_tensors(model: onnx.ModelProto):
    return (tensor for tensor in _all_tensors(model.graph) if tensor.data_location == onnx.TensorProto.EXTERNAL)


def _all_tensors(graph):
    """Every TensorProto of a graph: its initializers, its sparse ones' values and indices, its nodes' attribute
    tensors (a Constant's value), and its subgraphs', recursively (an If branch's weight may live in external data)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sparse in list(attr.sparse_tensors) + ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []):
                yield from (sparse.values, sparse.indices)
        for body in bodies(node):
            yield from _all_tensors(body)


def _external_location(tensor) -> str:
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def _external_entry(tensor, key: str) -> str | None:
    return next((e.value for e in tensor.external_data if e.key == key), None)


def external_data_files(path: str) -> set:
    """The real paths of the files the model at `path` keeps its external data in (its graph read, not its weights);
    none for a file that does not parse, which read_model then refuses in its own words."""
    base = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001  protobuf raises several unrelated types
        return set()
    return {os.path.realpath(os.path.join(base, _external_location(tensor))) for tensor in _external_tensors(model)}


def _check_external_paths(path: str, model: onnx.ModelProto) -> None:
    """Refuse external data outside the model's folder, missing or too short (before reading any)."""
    base = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    for tensor in _external_tensors(model):
        location = _external_location(tensor)
        try:
            full = os.path.realpath(os.path.join(base, location))
            outside = os.path.isabs(location) or os.path.commonpath([base, full]) != base
        except (ValueError, TypeError):  # NUL byte, not UTF-8 (protobuf gives bytes), another drive on Windows
            raise BadModel(f"{path}: tensor '{tensor.name}' names an invalid external data path {location!r}; "
                           "re-export the model.") from None
        if outside:
            raise BadModel(f"{path}: external data path '{location}' points outside the model's folder; "
                           "refusing it (path traversal). Keep external data files beside the model.")
        if not location or not os.path.isfile(full):
            raise BadModel(f"{path}: external data file '{location}' is missing; copy it beside the model.")
        needed = _tensor_nbytes(tensor)
        try:
            offset = int(_external_entry(tensor, "offset") or 0)
            length = _external_entry(tensor, "length")
            length = int(length) if length is not None else needed
        except ValueError:
            raise BadModel(f"{path}: tensor '{tensor.name}' has an invalid external data offset or length; "
                           "re-export the model.") from None
        if needed is not None and length != needed:
            raise BadModel(f"{path}: tensor '{tensor.name}' has {length} bytes of external data but its shape and "
                           f"type need {needed}; the model and its data do not match: re-export the model.")
        available = os.path.getsize(full)
        if offset < 0 or (length is not None and (length < 0 or offset + length > available)):
            raise BadModel(f"{path}: external data file '{location}' is too short for tensor '{tensor.name}' "
                           f"(needs bytes {offset}..{offset + (length or 0)}, has {available}): it is truncated "
                           "or from another export; copy the complete file beside the model.")


_ITEMSIZE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2,
             onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1,
             onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT32: 4,
             onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
             onnx.TensorProto.BOOL: 1, onnx.TensorProto.COMPLEX64: 8, onnx.TensorProto.COMPLEX128: 16,
             onnx.TensorProto.FLOAT8E4M3FN: 1, onnx.TensorProto.FLOAT8E4M3FNUZ: 1, onnx.TensorProto.FLOAT8E5M2: 1,
             onnx.TensorProto.FLOAT8E5M2FNUZ: 1, onnx.TensorProto.FLOAT8E8M0: 1}
_PER_BYTE = {onnx.TensorProto.INT4: 2, onnx.TensorProto.UINT4: 2, onnx.TensorProto.FLOAT4E2M1: 2,
             onnx.TensorProto.INT2: 4, onnx.TensorProto.UINT2: 4}  # packed low bits first, the last byte padded


def _tensor_nbytes(tensor) -> int | None:
    """Bytes a tensor's raw data needs; None for strings and unknown types (the checker decides)."""
    if any(d < 0 for d in tensor.dims):
        return None
    if tensor.data_type in _PER_BYTE:
        return -(-math.prod(tensor.dims) // _PER_BYTE[tensor.data_type])
    itemsize = _ITEMSIZE.get(tensor.data_type)
    return None if itemsize is None else math.prod(tensor.dims) * itemsize


def read_model(path: str) -> tuple[onnx.ModelProto, int, bool]:
    """Parse and check the file without trusting it; never writes to it.

    Returns the model with its weights in memory, its size on disk (external
    data included) and whether it kept weights in external data.
    """
    if not os.path.exists(path):
        raise BadModel(f"model file '{path}' does not exist; give the path of an .onnx file.")
    if not os.path.isfile(path):
        raise BadModel(f"model path '{path}' is not a file; give the path of an .onnx file.")
    if os.path.getsize(path) == 0:
        raise BadModel(f"model file '{path}' is empty; re-export the model.")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises several unrelated types
        raise BadModel(f"'{path}' is not a readable ONNX model ({type(exc).__name__}); "
                       "check that the file is complete and really ONNX.") from None
    if not model.graph.node:
        raise BadModel(f"'{path}' holds no graph nodes: it is not an ONNX model or it is truncated.")
    _check_external_paths(path, model)
    external = any(True for _ in _external_tensors(model))
    try:
        # The bytes already read, not serialized again (0.20 s on MiniLM-L6) nor read again from the path (the
        # load 0.17-0.21 -> 0.11-0.13 s); a model with external data by its path, where the checker finds them
        onnx.checker.check_model(path if external else data)
    except Exception as exc:
        raise BadModel(f"'{path}' fails the ONNX checker: {one_line(exc).rstrip('.')}; "
                       "re-export the model.") from None
    del data
    size = _model_size(path, model)
    if external:
        try:
            onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        except Exception as exc:
            raise BadModel(f"'{path}': cannot read its external data ({one_line(exc)}); copy the "
                           "complete data file(s) beside the model.") from None
        for tensor in _all_tensors(model.graph):  # onnx reads to the end of the file when no length is given
            needed = _tensor_nbytes(tensor)
            if tensor.HasField("raw_data") and needed is not None and len(tensor.raw_data) != needed:
                raise BadModel(f"{path}: tensor '{tensor.name}' has {len(tensor.raw_data)} bytes of external data "
                               f"but its shape and type need {needed}; the model and its data do not match: "
                               "re-export the model.")
    return model, size, external


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise BadModel("the model imports no default ONNX opset; re-export it with a standard opset.")


LARGE_MARGIN = 64 << 20  # the graph's own protobuf (names, attributes) above the weights' bytes


def is_large(model: onnx.ModelProto) -> bool:
    """Over protobuf's 2 GB limit, judged from the initializers' shapes: ByteSize() walks the whole message
    (0.14 s per call on a 90 MB model, called at every save and session)."""
    weights = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize \
            if tensor.data_type != onnx.TensorProto.STRING else 0
        weights += int(np.prod(tensor.dims, dtype=np.int64)) * max(itemsize, 1)
    return weights + LARGE_MARGIN > PROTOBUF_LIMIT or (weights + LARGE_MARGIN > PROTOBUF_LIMIT // 2
                                                       and model.ByteSize() > PROTOBUF_LIMIT)


def save_model_file(model: onnx.ModelProto, path: str) -> None:
    """Save a model; one past 2 GB gets its weights in PATH.data beside it.

    onnx's external-data save empties the tensors it moves out, so their data
    is read back at once: the caller's model stays whole (without a second
    in-memory copy at any moment).
    """
    if not is_large(model):
        onnx.save_model(model, path)
        return
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data")
    onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))


SET_ASIDE_BYTES = 1024  # initializers past this are weights: no graph tool reads their values
SET_ASIDE = "msq-set-aside"  # the external-data location marking a weight set aside
WEIGHTS_FILE = "weights.bin"
_SHARING = threading.RLock()  # LoadedModel's lazy weights file and model file
MODEL_FILE = "model.onnx"  # the normalized FP32 model's graph beside WEIGHTS_FILE (LoadedModel.model_file)
WEIGHT_ALIGNMENT = 4096  # each weight starts on a page: ORT maps such external data from the file


def _remove_folder(folder: str) -> None:
    """Remove a folder of ours even when an interrupt lands while it goes: a finalizer's KeyboardInterrupt is
    printed and dropped, and the folder stayed (a SIGTERM at the end of a conversion, whose output was complete).
    Its modules are imported with this one's: an interrupt during an import here, before the try, left the folder."""
    for _ in range(100):
        try:
            shutil.rmtree(folder, True)
            if not os.path.exists(folder):
                return
            # still there: rmtree met something it could not remove yet (ignored), e.g. a file another thread was
            # closing; a full-suite run left one such folder in test_fuzz's interrupt test
            time.sleep(0.01)
        except KeyboardInterrupt:
            continue


def hidden_file_name(folder: str, prefix: str, suffix: str) -> str:
    """A new file's or folder's name, known before it exists: an interrupt that lands while it is created still
    finds it to remove (one between tempfile.mkstemp's open and its return left a file beside the output: the fuzz
    test's SIGINT)."""
    return os.path.join(folder, f"{prefix}{os.urandom(6).hex()}{suffix}")


class TemporaryFolder:
    """A folder of ours in the temporary directory, removed on leaving a with block, when this object goes, or at
    the interpreter's exit, whichever comes first. Its removal is registered before the folder is made:
    tempfile.TemporaryDirectory registers it after mkdtemp's mkdir, and a SIGINT between the two left the folder
    behind (the fuzz test's interrupt, in full-suite runs)."""

    def __init__(self, prefix: str):
        while True:  # TMPDIR may be relative
            self.name = hidden_file_name(os.path.abspath(tempfile.gettempdir()), prefix, "")
            self._finalizer = weakref.finalize(self, _remove_folder, self.name)
            try:
                os.mkdir(self.name, 0o700)
                return
            except FileExistsError:  # not ours: left alone
                self._finalizer.detach()

    def __enter__(self) -> str:
        return self.name

    def __exit__(self, *failed) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        # removed first, unregistered after: an interrupt between the two leaves the exit's removal to run again
        # (the finalizer's own call unregisters before it removes)
        _remove_folder(self.name)
        self._finalizer.detach()


class SharedWeights:
    """A model's initializers past SET_ASIDE_BYTES, in one file of a folder of their own (removed when this
    object is): places[name] = (offset, length)."""

    def __init__(self, model: onnx.ModelProto):
        self._folder = TemporaryFolder("msq-weights-")
        self.folder = self._folder.name
        self.places = {}
        with open(os.path.join(self.folder, WEIGHTS_FILE), "wb") as out:
            for tensor in model.graph.initializer:
                if _set_aside(tensor):
                    out.write(b"\0" * (-out.tell() % WEIGHT_ALIGNMENT))
                    start = out.tell()
                    out.write(tensor.raw_data)
                    self.places[tensor.name] = (start, out.tell() - start)


def _set_aside(tensor) -> bool:
    """A weight past SET_ASIDE_BYTES held in raw_data. Sizes come from the shapes: reading raw_data would copy
    the bytes (the checker has held them to their shapes)."""
    return tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.HasField("raw_data") \
        and (_tensor_nbytes(tensor) or 0) > SET_ASIDE_BYTES


def _graph_only(transform, model: onnx.ModelProto) -> onnx.ModelProto:
    """transform(model) run on a copy without the weights' bytes (marked external), its result grafted onto
    `model`, whose weights never move: returns `model`. The opset converter and shape inference serialize the
    whole model and parse it again in C++: with the weights inside, loading MiniLM-L6 (90 MB) peaked at 674 MB;
    setting the bytes aside and putting them back into both models copied each weight five times (the
    load stage 0.84 s, 280,000 page faults, for a 90 MB file)."""
    light, aside = _without_weights(model)
    result = transform(light)
    stubs = {t.name: t for t in result.graph.initializer
             if any(e.value == SET_ASIDE for e in t.external_data)}
    originals = {t.name: t for t in model.graph.initializer if t.name in aside}
    if set(stubs) != aside or any(list(stubs[n].dims) != list(originals[n].dims)
                                  or stubs[n].data_type != originals[n].data_type for n in aside):
        return transform(model)  # a weight came back renamed, reshaped or moved: run on the whole model instead
    _graft(result, model, aside)
    return model


def _copy_fields(source, target, skip=()) -> None:
    for descriptor, value in source.ListFields():
        if descriptor.name in skip:
            continue
        if getattr(descriptor, "is_repeated", None) or (  # protobuf 6 dropped FieldDescriptor.label for is_repeated
                not hasattr(descriptor, "is_repeated") and descriptor.label == descriptor.LABEL_REPEATED):
            getattr(target, descriptor.name).extend(value)
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


def _without_weights(model: onnx.ModelProto, places: dict | None = None) -> tuple[onnx.ModelProto, set]:
    """A copy of the model whose weights (_set_aside) are stubs marked external (name, type and shape), and
    their names. With `places` (SharedWeights), a stub points at its weight's bytes in the weights file; without,
    it is marked SET_ASIDE, for graph tools that never read weights."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip=("graph",))
    _copy_fields(model.graph, light.graph, skip=("initializer",))
    aside = set()
    for tensor in model.graph.initializer:
        if not _set_aside(tensor) or (places is not None and tensor.name not in places):
            light.graph.initializer.append(tensor)
            continue
        stub = light.graph.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        if places is None:
            stub.external_data.add(key="location", value=SET_ASIDE)
        else:
            offset, length = places[tensor.name]
            for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
                stub.external_data.add(key=key, value=value)
        aside.add(tensor.name)
    return light, aside


def _graft(result: onnx.ModelProto, model: onnx.ModelProto, aside: set) -> None:
    """Everything of `result` into `model` except the set-aside weights, which stay in place in `model` (the
    small initializers follow them, as `result` has them)."""
    for descriptor in onnx.ModelProto.DESCRIPTOR.fields:
        if descriptor.name != "graph":
            model.ClearField(descriptor.name)
    _copy_fields(result, model, skip=("graph",))
    for descriptor in onnx.GraphProto.DESCRIPTOR.fields:
        if descriptor.name != "initializer":
            model.graph.ClearField(descriptor.name)
    _copy_fields(result.graph, model.graph, skip=("initializer",))
    initializers = model.graph.initializer
    for index in reversed([i for i, t in enumerate(initializers) if t.name not in aside]):
        del initializers[index]
    initializers.extend(t for t in result.graph.initializer if t.name not in aside)


def _infer_shapes(model: onnx.ModelProto, path: str, external: bool) -> onnx.ModelProto:
    """Shape inference; path-based for models kept in external data, so no second in-memory copy is made."""
    if not external and not is_large(model):
        try:
            return _graph_only(onnx.shape_inference.infer_shapes, model)
        except Exception:
            return model  # shapes only help; ORT infers what it needs again
    with TemporaryFolder("msq-shapes-") as folder:
        inferred_path = os.path.join(folder, "inferred.onnx")
        try:
            onnx.shape_inference.infer_shapes_path(path, inferred_path)
            inferred = onnx.load(inferred_path, load_external_data=False)
        except Exception:
            return model
    known = {v.name for v in model.graph.value_info}
    present = {name for node in model.graph.node for name in node.output}  # folded-away tensors stay out
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known and v.name in present)
    return model


def _upgrade_opset(model: onnx.ModelProto, opset: int, path: str) -> onnx.ModelProto:
    if opset > MAX_OPSET:
        raise BadModel(f"'{path}' uses opset {opset}; ONNX Runtime 1.31 loads at most {MAX_OPSET}: "
                       f"re-export with opset <= {MAX_OPSET}.")
    if opset < MIN_OPSET:
        raise BadModel(f"'{path}' uses opset {opset}; convert it to opset >= {MIN_OPSET} first.")
    if opset >= TARGET_OPSET:
        return model
    if is_large(model):
        if opset >= 13:  # per-channel Q/DQ exists from 13; the converter cannot take a model this size
            return model
        raise BadModel(f"'{path}' is over 2 GB at opset {opset}; the opset converter cannot take it: re-export it "
                       "with opset >= 13.")
    try:
        return _graph_only(lambda m: version_converter.convert_version(m, TARGET_OPSET), model)
    except Exception as exc:
        raise BadModel(f"'{path}': cannot convert opset {opset} to {TARGET_OPSET} ({str(exc)[:200]}); "
                       f"re-export the model with opset {TARGET_OPSET}.") from None


def _constants_to_initializers(graph: onnx.GraphProto, keep=frozenset()) -> None:
    """Constant nodes holding a tensor become initializers, but for the outputs in `keep`."""
    kept = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and value.type == onnx.AttributeProto.TENSOR \
                and node.output[0] not in keep:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _name_nodes(graph: onnx.GraphProto) -> None:
    used = {n.name for n in graph.node if n.name}
    for index, node in enumerate(graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{index}"
            while candidate in used:
                candidate += "_"
            node.name = candidate
            used.add(candidate)


def _flatten_gemm_bias(graph: onnx.GraphProto, inits: dict) -> None:
    # A [1, N] Gemm bias is legal ONNX but breaks per-channel quantization in
    # onnxruntime.quantization; [N] broadcasts identically.
    for node in graph.node:
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in inits:
            bias = numpy_helper.to_array(inits[node.input[2]])
            if bias.ndim == 2 and bias.shape[0] == 1:
                _replace_initializer(graph, inits, node.input[2], bias.reshape(-1))


def unique_name(name: str, taken: set, suffix: str = "_") -> str:
    """`name`, or it with `suffix` appended until `taken` does not hold it; `taken` gets it."""
    while name in taken:
        name += suffix
    taken.add(name)
    return name


def all_names(graph) -> set:
    """Every value name of the graph and of its subgraphs: inputs, outputs, initializers and node ends."""
    names = {v.name for v in list(graph.input) + list(graph.output)} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for body in bodies(node):
            names |= all_names(body)
    return names


def _fold_batch_norms(graph: onnx.GraphProto, inits: dict) -> None:
    """Conv -> BatchNormalization (inference form, constant statistics) folded into the Conv's weight and bias,
    as ONNX Runtime does when it optimizes the FP32 model. Left apart, the runtime cannot fold it behind a
    quantized weight (an extra op per convolution), and static quantization measures the convolution's output
    before BN's per-channel rescaling: PaddlePaddle exports keep every BN, and PaddleClas's orientation
    classifier, all static uint8 at 8 bits, fell to cosine 0.89."""
    producer = producer_map(graph.node)
    users = consumers(graph)
    outputs = {o.name for o in graph.output}
    shared = subgraph_inputs(graph) | outputs
    taken = all_names(graph)  # a new bias must not shadow any of them (an input of that name would stop being fed)
    folded = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or any(bn.output[1:]) or attribute(bn, "training_mode", 0):
            continue
        x, scale, beta, mean, var = bn.input[:5]
        conv = producer.get(x)
        if conv is None or conv.op_type != "Conv" or x in shared or len(users.get(x, [])) != 1:
            continue
        weight = conv.input[1]
        bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        if not all(n in inits for n in (weight, scale, beta, mean, var) + ((bias,) if bias else ())) or any(
                len(users.get(n, [])) != 1 or n in shared for n in (weight, bias) if n) or \
                inits[weight].data_type != onnx.TensorProto.FLOAT:
            continue
        w = numpy_helper.to_array(inits[weight]).astype(np.float64)
        stats = [numpy_helper.to_array(inits[n]).astype(np.float64).reshape(-1) for n in (scale, beta, mean, var)]
        if any(len(v) != w.shape[0] for v in stats):
            continue
        gamma, shift, average, variance = stats
        factor = gamma / np.sqrt(variance + float(attribute(bn, "epsilon", 1e-5)))
        old_bias = numpy_helper.to_array(inits[bias]).astype(np.float64) if bias else np.zeros(w.shape[0])
        _replace_initializer(graph, inits, weight, (w * factor.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32))
        new_bias = ((old_bias - average) * factor + shift).astype(np.float32)
        if bias:
            _replace_initializer(graph, inits, bias, new_bias)
        else:
            bias = unique_name(f"{conv.name or weight}_folded_bias", taken)
            tensor = numpy_helper.from_array(new_bias, bias)
            graph.initializer.append(tensor)
            inits[bias] = tensor
            while len(conv.input) < 3:
                conv.input.append("")
            conv.input[2] = bias
        conv.output[0] = bn.output[0]
        folded.append(bn)
    gone = {bn.input[0] for bn in folded}  # the convolutions' former outputs: no tensor of that name is left
    stale_info = [v for v in graph.value_info if v.name in gone]
    for value in stale_info:
        graph.value_info.remove(value)
    for bn in folded:
        graph.node.remove(bn)
    if folded:
        used = {name for node in graph.node for name in node.input} | subgraph_inputs(graph) | outputs
        parameters = {name for bn in folded for name in bn.input[1:5]}
        stale = [t for t in graph.initializer if t.name in parameters and t.name not in used]
        for tensor in stale:
            graph.initializer.remove(tensor)
            inits.pop(tensor.name, None)


def _reshaped(data: np.ndarray, shape: np.ndarray, allow_zero: int) -> np.ndarray:
    shape = [data.shape[i] if size == 0 and not allow_zero else int(size) for i, size in enumerate(shape)]
    return data.reshape(shape)


def _unsqueezed(data: np.ndarray, axes) -> np.ndarray:
    for axis in sorted(a % (data.ndim + len(axes)) for a in axes):
        data = np.expand_dims(data, axis)
    return data


def _sliced(data: np.ndarray, starts, ends, axes=None, slice_steps=None) -> np.ndarray:  # None: input omitted
    index = [slice(None)] * data.ndim
    axes = range(len(starts)) if axes is None else axes
    slice_steps = [1] * len(starts) if slice_steps is None else slice_steps
    for start, end, axis, step in zip(starts, ends, axes, slice_steps):
        index[int(axis)] = slice(int(start), int(end), int(step))  # numpy clamps as ONNX does
    return data[tuple(index)]


# Data-movement ops an exporter leaves between a weight and its user (torch's dynamo export feeds a GRU its
# weights through Slice, Concat and Unsqueeze; a transposed weight comes through Transpose): computed in numpy.
_MOVES = {
    "Identity": lambda node, x: x[0],
    "Transpose": lambda node, x: np.transpose(x[0], attribute(node, "perm", None)),
    "Unsqueeze": lambda node, x: _unsqueezed(x[0], [int(a) for a in x[1]]),
    "Squeeze": lambda node, x: np.squeeze(x[0]) if len(x) < 2 or x[1] is None or not np.size(x[1])
    else np.squeeze(x[0], tuple(int(a) for a in x[1])),
    "Reshape": lambda node, x: _reshaped(x[0], x[1], attribute(node, "allowzero", 0)),
    "Flatten": lambda node, x: x[0].reshape(int(np.prod(x[0].shape[:attribute(node, "axis", 1)])), -1),
    "Concat": lambda node, x: np.concatenate(x, axis=attribute(node, "axis", 0)),
    "Slice": lambda node, x: _sliced(*x),  # torch's GRU/LSTM gate reordering
    # Weights stored narrower than they run (float16 or bfloat16 in the file, Cast to float32 before the layer):
    # exact, and then quantized like any float weight rather than taken for a model without layers.
    "Cast": lambda node, x: _cast_to_float(x[0], attribute(node, "to", 0)),
    "CastLike": lambda node, x: _cast_to_float(x[0], onnx.TensorProto.FLOAT if x[1].dtype == np.float32 else 0),
}


def _cast_to_float(data: np.ndarray, to: int) -> np.ndarray:
    """A float tensor of any width cast to float32; anything else is not a weight this folding computes."""
    narrow_float = data.dtype.name.startswith(("bfloat16", "float8"))  # ml_dtypes: not numpy floating subtypes
    if to != onnx.TensorProto.FLOAT or not (np.issubdtype(data.dtype, np.floating) or narrow_float):
        raise TypeError("not a float-to-float32 cast")
    return data.astype(np.float32)


def _reduced(node, x: list, reduce) -> np.ndarray:
    """A Reduce* node on a constant: its axes from the attribute (opset < 18) or the second input."""
    axes = x[1] if len(x) > 1 and x[1] is not None else attribute(node, "axes", None)
    axes = None if axes is None or not np.size(axes) else tuple(int(a) for a in np.ravel(axes))
    if axes is None and attribute(node, "noop_with_empty_axes", 0):
        return reduce(x[0], (), True)  # no axis reduced; the element-wise part (square, root) still applies
    return reduce(x[0], axes, bool(attribute(node, "keepdims", 1)))


# Arithmetic on constants, as torch's weight normalisation (weight_norm: g * v / ||v||) leaves it in an export that
# was not constant-folded: the weight is computed every run from two initializers, and was float and uncounted.
_ARITHMETIC = {
    "Mul": lambda node, x: np.multiply(x[0], x[1]),
    "Div": lambda node, x: np.divide(x[0], x[1]),
    "Add": lambda node, x: np.add(x[0], x[1]),
    "Sub": lambda node, x: np.subtract(x[0], x[1]),
    "Neg": lambda node, x: np.negative(x[0]),
    "Sqrt": lambda node, x: np.sqrt(x[0]),
    "Pow": lambda node, x: np.power(x[0], x[1]).astype(x[0].dtype),
    "ReduceL2": lambda node, x: _reduced(node, x, lambda a, axes, keep: np.sqrt(
        np.sum(np.square(a), axis=axes, keepdims=keep))),
    "ReduceSumSquare": lambda node, x: _reduced(node, x, lambda a, axes, keep: np.sum(
        np.square(a), axis=axes, keepdims=keep)),
}
_CONSTANT_OPS = {**_MOVES, **_ARITHMETIC}  # what _computed_weight evaluates in numpy
_ELEMENTWISE_PAIRS = ("Mul", "Div", "Add", "Sub")
# Standard ops never computed at load: those whose output need not be a function of their inputs (Dropout in
# training mode), those that run a subgraph, and the quantization ops, whose integer weights count at their stored
# width (_prequantized_weights).
_QUANTIZED_SOURCES = frozenset({"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"})
_NOT_FOLDED = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                         "Bernoulli", "Dropout", "If", "Loop", "Scan", "SequenceMap"}) | _QUANTIZED_SOURCES


def _computed_weight(name: str, producers: dict, inits: dict, chain: list, opset: int | None = None
                     ) -> np.ndarray | None:
    """The value of a tensor computed from initializers (the nodes passed appended to chain), or None if it depends
    on anything else (or on a chain too deep to follow). _CONSTANT_OPS run in numpy; with the model's `opset`, any
    other standard op runs in ONNX Runtime, as it would every run (an Abs, Exp or Clip on a weight left in an export
    that was not constant-folded was float and counted nowhere), unless its result is larger than its inputs (a
    mask built from a shape, a low-rank product): stored, that would grow the file."""
    if opset is not None and _constant_sources(name, producers, inits) is None:
        return None  # an activation: found without converting the weights on its way to a graph input
    try:
        return _evaluated(name, producers, inits, chain, {}, opset)
    except RecursionError:  # a caller already deep in the stack: FOLD_DEPTH alone would not keep it off the limit
        return None


# A weight is computed in a few steps; a longer chain is left to run as it is. The bound keeps the recursion far from
# Python's limit: near it, a garbage collection that runs a finalizer raised RecursionError inside it, unraisable.
FOLD_DEPTH = 200


def _runtime_value(node, values: list, opset: int) -> np.ndarray:
    """One standard node on constant inputs (None: an omitted optional input), as ONNX Runtime computes it (ONNX's
    reference implementation differs from it on some ops: LpNormalization with p=1 divides by the plain sum)."""
    from .verify import single_thread_session  # imported here: verify reads load's models

    names = [f"x{index}" if value is not None else "" for index, value in enumerate(values)]
    step = onnx.helper.make_node(node.op_type, names, ["y"])
    step.attribute.extend(node.attribute)
    graph = onnx.helper.make_graph(
        [step], "constant",
        [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
         for name, value in zip(names, values) if name],
        [onnx.helper.make_value_info("y", onnx.TypeProto())])
    imports = [onnx.helper.make_opsetid("", opset)]
    model = onnx.helper.make_model(graph, opset_imports=imports,
                                   ir_version=onnx.helper.find_min_ir_version_for(imports))
    model = onnx.shape_inference.infer_shapes(model)  # ORT wants the output's type
    if not model.graph.output[0].type.tensor_type.elem_type:
        raise TypeError("the output's type is not inferred")
    runner = single_thread_session(model, silent=True)  # a refusal is an answer (not folded), not a message
    return np.asarray(runner.run(None, {n: v for n, v in zip(names, values) if n})[0])


def _evaluated(name: str, producers: dict, inits: dict, chain: list, memo: dict,
               opset: int | None = None, depth: int = 0) -> np.ndarray | None:
    """_computed_weight, each value computed once (memo: name -> value): a value read twice, as in
    t1 = Add(t0, t0), would otherwise double the work at every level."""
    if name in memo:
        return memo[name]
    if name in inits:
        memo[name] = numpy_helper.to_array(inits[name])
        return memo[name]
    memo[name] = None  # until computed: nothing depends on itself in a valid graph
    node = producers.get(name)
    if depth > FOLD_DEPTH or node is None or len(node.output) != 1 or node.domain not in ("", "ai.onnx") \
            or node.op_type in _NOT_FOLDED or (node.op_type not in _CONSTANT_OPS and opset is None):
        return None
    values = []  # by position: an omitted optional input (Slice's axes before its steps) stays a None
    for source in node.input:
        value = _evaluated(source, producers, inits, chain, memo, opset, depth + 1) if source else None
        if source and value is None:
            return None
        values.append(value)
    operands = values[:2] if node.op_type in _ELEMENTWISE_PAIRS else values[:1]  # not a Reduce's axes, Pow's power
    # integer arithmetic (a shape's, say) truncates in ONNX where numpy would not: the runtime computes that
    result = None
    if node.op_type in _CONSTANT_OPS and not (
            node.op_type in _ARITHMETIC and not all(np.issubdtype(v.dtype, np.floating) for v in operands)):
        try:
            with np.errstate(all="ignore"):  # a zero norm gives inf or nan here as it would in the runtime
                result = _CONSTANT_OPS[node.op_type](node, values)
        except (ValueError, IndexError, TypeError):  # and a cast numpy's list refuses (to float16) the runtime does
            pass
    if result is None:
        if opset is None:
            return None
        try:
            result = _runtime_value(node, values, opset)
        except Exception:  # noqa: BLE001  the runtime's own refusals: a type or an attribute it does not take
            return None
        if result.size > sum(np.size(v) for v in values if v is not None):
            return None  # a mask from a shape, a broadcast or a low-rank product: smaller computed than stored
    if not any(step is node for step in chain):  # a node reached by two paths (Concat(t, t)) is one step
        chain.append(node)
    memo[name] = result
    return result


def _constant_sources(name: str, producers: dict, inits: dict) -> set | None:
    """The float weights a tensor is computed from when no graph input feeds it (None: one does, so it is an
    activation)."""
    seen, pending, sources = set(), [name], set()
    while pending:
        current = pending.pop()
        if not current or current in seen:
            continue
        seen.add(current)
        if current in inits:
            if _float_weight(current, inits):
                sources.add(current)
            continue
        node = producers.get(current)
        if node is None or node.op_type in _QUANTIZED_SOURCES:
            return None  # a graph input: an activation; or a weight stored quantized, counted at its own width
        pending.extend(node.input)
    return sources


_BIASED = ("Conv", "ConvTranspose", "Gemm")  # a constant bias in input 2: ORT quantizes it with the layer


def _fold_weight_chains(graph: onnx.GraphProto, inits: dict, opset: int | None = None) -> tuple[list[dict], dict]:
    """A weighted node's weight computed from initializers (find_layers' kinds and _UNHANDLED_WEIGHTED) becomes
    an initializer itself, so the layer is quantized, or an unhandled op's float weights count in the budget.
    A chain whose float weights something else also reads (a tied embedding) is left as it is: folding it would
    store the weight twice; find_layers then reports the node. Returns, as find_layers' skipped entries, the float
    weights a kept chain still reads once every reader has its copy (an intermediate read by something else): they
    stay in the file beside the copies, and count at 32 bits; and, per folded weight, the bytes its sources took in
    the input file."""
    producers = producer_map(graph.node)
    users = consumers(graph)
    keep = subgraph_inputs(graph) | {o.name for o in graph.output}
    taken = all_names(graph)
    copies = {}  # a kept chain's output -> its folded initializer: two readers share one copy
    beside = {}  # a float weight a kept chain reads -> the node given a copy of what the chain computes
    stored = {}  # a folded weight -> the bytes its sources took in the input (a float16 source: half of float32's)
    aliased = False  # a weight input now reads the initializer an Identity chain passed on
    for node in list(graph.node):  # chains are removed from graph.node as they fold
        kind = kind_for(node)
        if kind is not None:
            positions = [position for position in kind.constant_inputs(node) if len(node.input) > position]
            if node.op_type in _BIASED and len(node.input) > 2:
                positions.append(2)  # torch's legacy export shares an all-zero bias through Identity nodes
        elif node.op_type in _UNHANDLED_WEIGHTED:
            positions = range(1, len(node.input))
        else:
            continue
        weights = {position for position, _, _ in kind.weights(node)} if kind is not None else set()
        for position in positions:
            name, chain = node.input[position], []
            if name in copies:
                node.input[position] = copies[name]
                continue
            source = _aliased_initializer(name, producers, inits) if position in weights else None
            if source is not None:
                # torch's legacy export gives each reuse of a module's weight (ALBERT's one layer run N times) an
                # Identity of it: read as what it is, the weight shared by its readers, one layer with one width
                # (a copy each would store it N times; computed, it stayed float)
                node.input[position] = source
                aliased = True
                continue
            # an unhandled op's inputs (a mask, a bias) are folded only as far as numpy's list goes: they are
            # counted, not quantized, and a runtime-computed one could be larger than what it is computed from
            value = None if not name or name in inits else _computed_weight(
                name, producers, inits, chain, opset if kind is not None else None)
            if value is None or value.dtype != np.float32 or value.ndim < (1 if position == 2 else 2):
                continue
            inner = {i for step in chain for i in step.input if i}  # its initializers and intermediate values
            outside = {n for n in inner if any(u not in chain for u in users.get(n, []))} | (inner & keep)
            if any(_float_weight(n, inits) for n in outside):
                continue  # a weight read elsewhere too
            if outside - set(inits) or name in keep:  # an intermediate value is read elsewhere: the chain stays
                folded = unique_name(f"{name}_folded", taken)
                node.input[position] = copies[name] = folded
                beside.update((source, node) for source in inner if _float_weight(source, inits))
                stored[folded] = 0  # its sources stay in the file, for the other reader
            else:
                folded = name
                for step in chain:
                    graph.node.remove(step)
                stored[folded] = sum(_tensor_nbytes(inits[source]) or 0 for source in inner & set(inits) - outside)
                for source in inner & set(inits) - outside:
                    graph.initializer.remove(inits.pop(source))
            tensor = numpy_helper.from_array(value, folded)
            graph.initializer.append(tensor)
            inits[folded] = tensor
            users = consumers(graph)
    if copies or aliased:
        _drop_dead_constant_ops(graph, inits, keep)
    return [{"node": node.name, "op_type": node.op_type, "weight": source,
             "reason": f"its weight is computed from '{source}', which stays in the file for another reader of the "
                       "computation: the layer reads a folded copy, and the float original counts at 32 bits"}
            for source, node in beside.items() if source in inits], stored


def _aliased_initializer(name: str, producers: dict, inits: dict) -> str | None:
    """The initializer `name` is through Identity nodes alone, or None (not an Identity's output, or not one of an
    initializer)."""
    seen = set()
    while name not in inits:
        node = producers.get(name)
        if node is None or node.op_type != "Identity" or name in seen:
            return None
        seen.add(name)
        name = node.input[0]
    return name if seen else None


def _drop_dead_constant_ops(graph: onnx.GraphProto, inits: dict, keep: set) -> None:
    """Nodes computed from constants alone that nothing reads any more (a fused QKV weight's Transpose, or Abs, and
    Slices once each reader has its folded copy) and the initializers only they read: left, they kept a float weight
    in the file that no budget counted."""
    producers = producer_map(graph.node)
    while True:
        users = consumers(graph)
        dead = [n for n in graph.node if not any(users.get(o) or o in keep for o in n.output)
                and (n.op_type in _CONSTANT_OPS or all(_constant_sources(o, producers, inits) is not None
                                                       for o in n.output if o))]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    users = consumers(graph)
    for name in [n for n in inits if n not in users and n not in keep]:
        graph.initializer.remove(inits.pop(name))


def _replace_initializer(graph, inits: dict, name: str, array: np.ndarray) -> None:
    tensor = numpy_helper.from_array(array, name)
    for index, existing in enumerate(graph.initializer):
        if existing.name == name:
            graph.initializer[index].CopyFrom(tensor)
    inits[name] = tensor


def producer_map(nodes) -> dict:
    """tensor -> the node (of `nodes`, a graph's or a list of them) whose output it is."""
    return {out: node for node in nodes for out in node.output}


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


def _float_weight(name: str, inits: dict) -> bool:
    """A float initializer of rank >= 2 (of any width: a float16 table cast to float is still a weight): a weight,
    not a bias, a shape or an index."""
    return name in inits and inits[name].data_type in _FLOAT_TYPES and len(inits[name].dims) >= 2


def _probe_of(node, users, inits, graph_outputs) -> str:
    """Follow a layer's output through its bias add, residual add and activation.

    A residual block's last layer feeds the next block only through the skip
    Add, so the sum is what the next layer consumes (and what its predictor
    should see); measured on EfficientNet-Lite0 this makes the predictor
    accuracies rise steadily along the network instead of dipping at every
    projection.
    """
    tensor = node.output[0]
    joined = False
    while tensor not in graph_outputs:
        nexts = users.get(tensor, [])
        if len(nexts) == 1:
            nxt = nexts[0]
            other = [i for i in nxt.input if i != tensor]
            const_operand = nxt.op_type in ("Add", "Mul", "Div", "Sub") and all(i in inits for i in other)
            residual = nxt.op_type == "Add" and not const_operand and not joined
            if nxt.op_type in _ACTIVATIONS or const_operand or residual:
                joined = joined or residual
                tensor = nxt.output[0]
                continue
        elif len(nexts) == 2:  # x * sigmoid(x): SiLU / Swish
            ops = {n.op_type: n for n in nexts}
            if set(ops) == {"Sigmoid", "Mul"} and ops["Sigmoid"].output[0] in ops["Mul"].input:
                tensor = ops["Mul"].output[0]
                continue
        break
    return tensor


def _bias_add(node, users, inits) -> str | None:
    """The constant of an Add that directly follows a MatMul: its bias, for bias correction."""
    nexts = users.get(node.output[0], [])
    if len(nexts) != 1 or nexts[0].op_type != "Add":
        return None
    other = [i for i in nexts[0].input if i != node.output[0]]
    if len(other) != 1 or other[0] not in inits or len(users.get(other[0], [])) != 1:
        return None
    columns = inits[node.input[1]].dims[-1]
    dims = [d for d in inits[other[0]].dims if d != 1]
    return other[0] if dims == [columns] and inits[other[0]].data_type == onnx.TensorProto.FLOAT else None


def _hoist_body_weights(graph: onnx.GraphProto, opset: int, defaults=frozenset()) -> list[dict]:
    """The weights of the nodes of ops.BODY_KINDS inside If/Loop/Scan bodies move to this graph's initializers, under
    names no scope uses: a body reads the names of the graphs around it, so the write can put a weight's int8 form and
    scale beside it, where ORT folds them at load (ops._InBody). A weight moves where it is a constant of its body (an
    initializer, a Constant node, or computed from them: _fold_weight_chains, as in the graph) that nothing else
    there reads, or where the body computes it from constants of the scopes around it (silero-vad's LSTMs reorder
    their gates from their parent body's weight, once in each branch that runs them): one initializer per value, the
    computation and the sources nothing reads any more removed. Bodies without such a node are left as they are.
    Every body node gets a name no other node has (layers and their nodes are looked up by name). `defaults`: the
    graph's initializers a caller may feed, which no weight is computed from. Returns, as find_layers' skipped
    entries, the float sources a fold left for another reader: they count at 32 bits."""
    _name_body_nodes(graph)
    taken = all_names(graph)
    left: list = []
    by_value: dict = {}  # a folded value's bytes -> the initializer of this graph that holds it
    sources: set = set()  # constants folded chains read, removed below where nothing reads them any more

    def holds_layers(body) -> bool:
        return any((kind_for(node) is not None and node.op_type in BODY_KINDS)
                   or any(holds_layers(inner) for inner in bodies(node)) for node in body.node)

    def hoisted(value: np.ndarray, name: str) -> str:
        key = (value.dtype.str, value.shape, hashlib.sha256(value.tobytes()).digest())
        if key not in by_value:
            by_value[key] = unique_name(name, taken, "_msq")
            graph.initializer.append(numpy_helper.from_array(value, by_value[key]))
        return by_value[key]

    def visit(body, outer: dict) -> None:
        if not holds_layers(body):
            return
        _constants_to_initializers(body, {o.name for o in body.output})
        own = {t.name: t for t in body.initializer}
        beside, _ = _fold_weight_chains(body, own, opset)  # its bodies' reads stay: `keep`
        left.extend({**entry, "params": math.prod(own[entry["weight"]].dims)} for entry in beside)
        own = {t.name: t for t in body.initializer}
        visible = {**outer, **own}
        for node in body.node:
            for inner in bodies(node):
                visit(inner, visible)
        readers, producers = consumers(body), producer_map(body.node)
        fixed = {o.name for o in body.output} | subgraph_inputs(body)
        moved = {}
        for node in body.node:
            kind = kind_for(node)
            if kind is None or kind.op_type not in BODY_KINDS:
                continue
            weights = {position for position, _, _ in kind.weights(node)}
            for position in kind.constant_inputs(node):
                name = node.input[position] if len(node.input) > position else ""
                if not name or name in moved or name in fixed:
                    continue
                if name in own:
                    if position in weights and _float_weight(name, own) and all(
                            kind_for(r) is kind and list(r.input).index(name) == position for r in readers[name]):
                        moved[name] = hoisted(numpy_helper.to_array(own[name]), name)
                    continue
                chain = []
                value = None if name in visible else _computed_weight(name, producers, visible, chain, opset)
                if value is not None and value.dtype == np.float32 and value.ndim >= (2 if position in weights else 1):
                    node.input[position] = hoisted(value, name)
                    sources.update(i for step in chain for i in step.input if i in visible)
        for node in body.node:
            node.input[:] = [moved.get(name, name) for name in node.input]
        kept = [t for t in body.initializer if t.name not in moved]
        del body.initializer[:]
        body.initializer.extend(kept)
        _drop_unread_computations(body, visible)

    for node in graph.node:
        for body in bodies(node):
            visit(body, {t.name: t for t in graph.initializer if t.name not in defaults})
    if sources:
        read = _all_reads(graph)
        _drop_unread(graph, sources, read)
        # a source another node still reads stays in float beside the folded copy
        still = {t.name: t for scope in _scopes(graph) for t in scope.initializer
                 if t.name in sources and t.name in read}
        left.extend({"node": name, "op_type": "", "weight": name, "params": math.prod(tensor.dims),
                     "reason": "a weight a body computes from it was folded into a copy, and another node still reads "
                               "it in float: it counts at 32 bits"}
                    for name, tensor in still.items() if _float_weight(name, still))
    return left


def _name_body_nodes(graph) -> None:
    """A name no other node of the model has for every body node without one or with another's."""
    taken = {node.name for node in graph.node}

    def visit(body) -> None:
        for index, node in enumerate(body.node):
            if not node.name or node.name in taken:
                node.name = unique_name(node.name or f"{body.name}/{node.op_type}_{index}", taken, "_")
            taken.add(node.name)
            for inner in bodies(node):
                visit(inner)

    for node in graph.node:
        for body in bodies(node):
            visit(body)


def _scopes(graph):
    """The graph and every body in it, nested ones included."""
    yield graph
    for node in graph.node:
        for body in bodies(node):
            yield from _scopes(body)


def _drop_unread_computations(body, constants: dict) -> None:
    """Nodes of a body computed from constants alone whose outputs nothing reads (a folded chain)."""
    while True:
        read = {name for node in body.node for name in node.input} | subgraph_inputs(body) | {
            o.name for o in body.output}
        producers = producer_map(body.node)
        dead = [node for node in body.node if not any(o in read for o in node.output if o)
                and all(_constant_sources(o, producers, constants) is not None for o in node.output if o)]
        if not dead:
            return
        for node in dead:
            body.node.remove(node)


def _all_outputs(graph) -> set:
    """The outputs of the graph and of every body in it."""
    return {o.name for scope in _scopes(graph) for o in scope.output}


def _all_reads(graph) -> set:
    """Every name read in the graph and its bodies: node inputs and each scope's outputs."""
    return _all_outputs(graph) | {name for scope in _scopes(graph) for node in scope.node for name in node.input}


def _drop_unread(graph, names: set, read: set) -> None:
    """The initializers among `names`, in the graph or any body, that nothing reads."""
    for scope in _scopes(graph):
        for tensor in [t for t in scope.initializer if t.name in names and t.name not in read]:
            scope.initializer.remove(tensor)


def _all_readers(graph, owner: str = "", branch: tuple = ()) -> list:
    """(node, the If/Loop/Scan node whose body holds it: "If 'name'", "" in the graph itself, and (the graph's own
    If node, its branch's attribute) around it at any depth, () elsewhere) for every node of the graph and of its
    bodies, nested ones included."""
    found = []
    for node in graph.node:
        found.append((node, owner, branch))
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                found.extend(_all_readers(body, f"{node.op_type} '{node.name}'", branch or (
                    (node.name, attr.name) if node.op_type == "If" and not owner else ())))
    return found


def _subgraph_layers(graph, inits: dict, names: set) -> tuple[list[Layer], list[dict]]:
    """Weighted nodes inside If/Loop/Scan bodies. A node of ops.BODY_KINDS whose weight is an initializer of the
    graph (_hoist_body_weights) that only such nodes read, at that input, is a layer measured on its weight alone
    (ops._InBody); every other one stays in float, said so, its float weights counted at 32 bits: uncounted, a
    budget would be met by leaving them float."""
    every = _all_readers(graph)
    producers = {name: node for node, _, _ in every for name in node.output if name and node.op_type != "Constant"}
    constants = {**{t.name: t for scope in _scopes(graph) for t in scope.initializer}, **{  # a Constant kept as a body's output too
        node.output[0]: a.t for node, _, _ in every if node.op_type == "Constant" for a in node.attribute
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR}, **inits}
    outputs = _all_outputs(graph)
    reads: dict = {}
    for node, owner, branch in every:
        for position, name in enumerate(node.input):
            reads.setdefault(name, []).append((node, owner, position, branch))
    layers: dict = {}
    skipped = []
    for node, owner, _ in every:
        kind = kind_for(node)
        if not owner or kind is None:
            continue
        entry = {"node": node.name or node.output[0], "op_type": node.op_type}
        candidates = kind.weights(node) if kind.op_type in BODY_KINDS else ()
        refused = False
        for position, _, suffix in candidates:
            name = node.input[position] if len(node.input) > position else ""
            if name in layers or name in outputs or not _float_weight(name, inits) \
                    or inits[name].data_type != onnx.TensorProto.FLOAT:
                continue
            readers = reads[name]
            if not all(kind_for(r) is kind and p == position and o for r, o, p, _ in readers):
                continue
            try:
                fields = in_body(kind).describe(node, inits)
            except Skip as reason:
                skipped.append({**entry, "weight": name, "reason": f"inside the body of {owner}: {reason}"})
                refused = True
                continue
            owners = ", ".join(dict.fromkeys(o for _, o, _, _ in readers))
            layers[name] = Layer(name=unique_name(node.name + suffix, names, "_msq") if suffix else node.name,
                                 op_type=node.op_type, weight_name=name, input_name=node.input[kind.data_index],
                                 probe_name="", weight_shape=tuple(inits[name].dims), weight_input=position,
                                 nodes=tuple(r.name for r, _, _, _ in readers), output_name=node.output[0],
                                 in_body=owners, branches=tuple(dict.fromkeys(b for _, _, _, b in readers)), **fields)
        if refused:
            continue
        made = any(node.name in layer.nodes for layer in layers.values())
        # the float constants its weights are (or are computed from, in its body or around it), but a layer's: 32
        # bits each. A layer's node counts only its other weights (an LSTM's R beside its W), not its bias.
        inputs = [node.input[p] for p, _, _ in candidates if len(node.input) > p] if made else node.input
        weights = sorted(set().union(*(_constant_sources(name, producers, constants) or set()
                                       for name in inputs if name and name not in layers)))
        why = (f"{node.op_type} is not quantized inside a body (its kernel would rewrite the body's node)"
               if node.op_type not in BODY_KINDS else
               "its weight is also read by another node, or computed from a value that is not a constant")
        reason = f"inside the body of {owner}: {why}: left in float"
        skipped.extend({**entry, "weight": name, "params": math.prod(constants[name].dims), "reason": reason}
                       for name in weights)
        if not weights and not made and node.op_type in ALWAYS_WEIGHTED:  # two activations' product is no layer
            skipped.append({**entry, "reason": reason})
    return list(layers.values()), skipped


# Weighted ops msq-onnx does not quantize: named in the report and counted at 32 bits, never silently float. Besides
# ONNX's Einsum, the float-weight ops ONNX Runtime's own optimizers write (com.microsoft): the embedding tables an
# EmbedLayerNormalization reads (MiniLM-L6 through its transformer optimizer: 12.3 M of 22.9 M parameters), and
# the fused convolutions and products of a graph saved after ORT's session optimizations.
_UNHANDLED_WEIGHTED = ("Einsum", "DeformConv", "MultiHeadAttention", "EmbedLayerNormalization", "FusedConv",
                       "FusedGemm", "FusedMatMul", "DecoderAttention")


def _add_layer(node, kind, position: int, activation: str, suffix: str, inits: dict, users: dict, producers: dict,
               outputs: set, by_weight: dict, refused: set, skipped: list, names: set,
               opset: int | None = None) -> None:
    """find_layers for one weight of a node (input `position`, multiplying `activation`): a new layer in
    by_weight, one more node of a layer that shares the weight, or the reason it is neither in skipped.
    names: the node and layer names taken, which a second layer of a node (an LSTM's R) must not reuse."""
    if len(node.input) <= position or not node.input[position]:
        return
    weight_name = node.input[position]
    if weight_name not in inits:
        chain = []  # a weight computed from initializers _fold_weight_chains left alone (one read elsewhere)
        if _computed_weight(weight_name, producers, inits, chain, opset) is not None:
            sources = sorted({i for step in chain for i in step.input if _float_weight(i, inits)})
            skipped.extend({"node": node.name, "op_type": node.op_type, "weight": w,
                            "reason": f"its weight is computed from '{w}', which another node also reads (a "
                                      "tied weight): left in float"} for w in sources)
        else:  # from initializers through what cannot be computed once (another domain's op, a random one)
            skipped.extend({"node": node.name, "op_type": node.op_type, "weight": w,
                            "reason": f"its weight is computed from '{w}' through what msq-onnx does not compute "
                                      "when it loads (another domain's op, a random one, or a chain too deep to "
                                      "follow): left in float"}
                           for w in sorted((_constant_sources(weight_name, producers, inits) or set())
                                           - set(by_weight)))
        return
    if not math.prod(inits[weight_name].dims):
        return  # an empty weight: nothing to give bits to (its fan-in of 0 divided the mode costs by zero)
    if node.op_type == "Gather" and inits[weight_name].data_type != onnx.TensorProto.FLOAT:
        return  # an index or shape table, not an embedding
    if weight_name in refused:
        skipped.append({"node": node.name, "op_type": node.op_type, "reason": f"shares weight '{weight_name}' "
                        "with a node that cannot be quantized"})
        return
    if inits[weight_name].data_type != onnx.TensorProto.FLOAT:
        raise BadModel(f"layer '{node.name}' has {onnx.TensorProto.DataType.Name(inits[weight_name].data_type)} "
                       "weights; msq-onnx quantizes FP32 models: export the model in float32.")
    try:
        fields = kind.describe(node, inits)
    except Skip as reason:
        refused.add(weight_name)
        skipped.append({"node": node.name, "op_type": node.op_type, "reason": str(reason), "weight": weight_name})
        if weight_name in by_weight:
            dropped = by_weight.pop(weight_name)
            skipped.extend({"node": n, "op_type": dropped.op_type, "reason": f"shares weight '{weight_name}' "
                            "with a node that cannot be quantized"} for n in dropped.nodes)
        return
    shared = by_weight.get(weight_name)
    if shared is not None:
        if shared.op_type != node.op_type or fields.get("out_axis") != shared.out_axis \
                or shared.weight_position != position:
            # e.g. tied input and output embeddings: one width would need one layout
            refused.add(weight_name)
            del by_weight[weight_name]
            if shared.op_type == node.op_type and fields.get("out_axis") == shared.out_axis:
                other = (f"is {node.op_type} inputs {shared.weight_position} and {position}, which multiply "
                         "different values")  # an LSTM's W and R: one layer would be weighed for one of them
            else:
                other = f"with a node of another layout ({shared.op_type} and {node.op_type})"
            reason = f"shares weight '{weight_name}' {other}: left in float"
            skipped.append({"node": node.name, "op_type": node.op_type, "reason": reason, "weight": weight_name})
            skipped.extend({"node": n, "op_type": shared.op_type, "reason": reason} for n in shared.nodes)
            return
        # One width for all users; a bias correction would only fit one of them.
        shared.nodes += (node.name,)
        shared.bias_name, shared.bias_factor = None, None
        return
    at = kind.bias_index
    bias = node.input[at] if at is not None and len(node.input) > at and node.input[at] in inits else None
    if at is not None and len(node.input) > at and node.input[at] and bias is None:
        fields["bias_factor"] = None  # a bias computed in the graph: nothing constant to put a correction in
    if node.op_type == "MatMul":
        bias = _bias_add(node, users, inits)
        if bias is None:
            fields["bias_factor"] = None  # MatMul has no bias input to put a correction in
    name = unique_name(node.name + suffix, names, "_msq") if suffix else node.name
    by_weight[weight_name] = Layer(name=name, op_type=node.op_type, weight_name=weight_name,
                                   input_name=activation, nodes=(node.name,), weight_input=position,
                                   probe_name=kind.probe(node) or _probe_of(node, users, inits, outputs),
                                   weight_shape=tuple(inits[weight_name].dims), bias_name=bias,
                                   output_name=node.output[0], **fields)


def find_layers(model: onnx.ModelProto, inits: dict) -> tuple[list[Layer], list[dict]]:
    """The layers (one per weight tensor) and the weighted nodes that cannot be layers, with the reason."""
    graph = model.graph
    users = consumers(graph)
    producers = producer_map(graph.node)
    outputs = {o.name for o in graph.output}
    by_weight: dict[str, Layer] = {}
    refused = set()
    names = {node.name for node, _, _ in _all_readers(graph)}
    in_bodies, skipped = _subgraph_layers(graph, inits, names)
    opset = _default_opset(model)
    for node in graph.node:
        kind = kind_for(node)
        if kind is None and node.op_type in _UNHANDLED_WEIGHTED:
            weights = [i for i in node.input if _float_weight(i, inits)]
            skipped.extend({"node": node.name, "op_type": node.op_type, "weight": w,
                            "reason": f"{node.op_type} weights are not quantized by msq-onnx"} for w in weights)
            continue
        if kind is None or len(node.input) < 2:
            continue  # activation x activation: nothing to give bits to
        for position, activation, suffix in kind.weights(node):
            _add_layer(node, kind, position, activation, suffix, inits, users, producers, outputs, by_weight,
                       refused, skipped, names, opset)
    named = set(by_weight) | {s.get("weight") for s in skipped}
    for node in graph.node:  # a weight on the left (W @ x): ORT's quantizer and ops.py take a product's on the right
        if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx") and node.input \
                and _float_weight(node.input[0], inits) and node.input[0] not in named:
            skipped.append({"node": node.name, "op_type": node.op_type, "weight": node.input[0],
                            "reason": f"its weight '{node.input[0]}' is the left operand (W @ x), which msq-onnx "
                                      "does not quantize: left in float"})
    inner = subgraph_inputs(graph)
    for weight_name, layer in list(by_weight.items()):
        # A weight something else also reads (a tied output projection through a Transpose) keeps its float
        # copy in the model whatever the layer is given: quantizing the layer would add bytes, not save them.
        others = [u for u in users.get(weight_name, []) if u.name not in layer.nodes and u.op_type not in ("Shape", "Size")]
        if others or weight_name in inner or weight_name in outputs:
            # a graph output that is the weight itself would come out quantized (a hunting subagent's)
            reader = f"{others[0].op_type} '{others[0].name}'" if others else \
                "a subgraph" if weight_name in inner else "the graph output of that name"
            del by_weight[weight_name]
            skipped.extend({"node": n, "op_type": layer.op_type, "weight": weight_name,
                            "reason": f"its weight is also read by {reader}, which needs it in float"}
                           for n in layer.nodes)
    return list(by_weight.values()) + in_bodies, skipped


_NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
             onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
             onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT8: np.uint8,
             onnx.TensorProto.INT8: np.int8, onnx.TensorProto.BOOL: np.bool_,
             # PCM audio (int16), depth maps (uint16), ...: a missing type was fed as float32 and ORT refused it
             onnx.TensorProto.INT16: np.int16, onnx.TensorProto.UINT16: np.uint16,
             onnx.TensorProto.UINT32: np.uint32, onnx.TensorProto.UINT64: np.uint64}


def _input_specs(graph, inits) -> list[InputSpec]:
    specs = []
    for value in graph.input:
        if value.name in inits:
            continue
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in tensor_type.shape.dim]
        specs.append(InputSpec(value.name, dims, np.dtype(_NP_TYPES.get(tensor_type.elem_type, np.float32)),
                               [d.dim_param or None for d in tensor_type.shape.dim]))
    return specs


def _check_tensor_inputs(path: str, graph, inits) -> None:
    for value in graph.input:
        if value.name not in inits and not value.type.HasField("tensor_type"):
            raise BadModel(f"'{path}': input '{value.name}' is a {value.type.WhichOneof('value')}, not a tensor; "
                           "msq-onnx feeds tensors only: re-export the model with tensor inputs.")


def task_output(model: onnx.ModelProto, requested: str | None = None) -> str:
    """The output the task is judged on: --output, else the first float output of rank >= 2 (converters such
    as skl2onnx put an int64 label first), else the first float output, else the first numeric one (ids, a
    bool decision). Strings, sequences and maps hold nothing to compare number by number."""
    names = [value.name for value in model.graph.output]

    def numeric(value) -> bool:
        return value.type.HasField("tensor_type") and value.type.tensor_type.elem_type not in (
            onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED)

    usable = [value.name for value in model.graph.output if numeric(value)]
    if requested is not None:
        if requested not in names:
            raise BadModel(f"--output '{requested}' is not an output of the model; its outputs are {names}.")
        if requested not in usable:
            raise BadModel(f"--output '{requested}' holds strings, a sequence or a map, which cannot be compared with "
                           f"FP32 number by number; choose a numeric output ({', '.join(usable) or 'none'}).")
        return requested
    if not usable:
        raise BadModel(f"the model's outputs ({', '.join(names)}) hold strings, sequences or maps only: nothing to "
                       "compare with FP32 number by number; export a numeric output (scores, probabilities).")
    for value in model.graph.output:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type == onnx.TensorProto.FLOAT and len(tensor_type.shape.dim) >= 2:
            return value.name
    floats = [value.name for value in model.graph.output if value.name in usable and
              value.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                   onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)]
    return (floats or usable)[0]


_STORED_BITS = {onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT16: 16,
                onnx.TensorProto.UINT16: 16, onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4,
                onnx.TensorProto.INT2: 2, onnx.TensorProto.UINT2: 2}  # int32 is a quantized bias, not a weight


# Where an integer kernel (or a DequantizeLinear) reads its weight; zero points and packed scales are not weights.
_INTEGER_WEIGHT_INPUTS = {"DequantizeLinear": (0,), "QLinearConv": (3,), "QLinearConvTranspose": (3,), "QGemm": (3,),
                          "QLinearMatMul": (3,), "MatMulInteger": (1,), "ConvInteger": (1,),
                          "MatMulIntegerToFloat": (1,), "DynamicQuantizeMatMul": (1,), "QAttention": (1,),
                          "DynamicQuantizeLSTM": (1, 2), "MatMulNBits": (1,), "GatherBlockQuantized": (0,)}
_PACKED = ("MatMulNBits", "GatherBlockQuantized")  # uint8 bytes holding 8 / bits values each (their `bits` attribute)


def _integer_weight_ops(graph, inits: dict) -> list[str]:
    """The op types in the graph that hold integer weights (_INTEGER_WEIGHT_INPUTS: the kernels verify counts in a
    written model, and the two only quantize_dynamic writes), sorted: a model with any of them (or a
    DequantizeLinear of an integer initializer) and no float layer was quantized already. A Q/DQ pair on
    activations alone (fake quantization) does not make it so."""
    found = {n.op_type for n in graph.node if n.op_type in _INTEGER_WEIGHT_INPUTS and n.op_type != "DequantizeLinear"}
    if any(n.op_type == "DequantizeLinear" and n.input[0] in inits
           and inits[n.input[0]].data_type != onnx.TensorProto.FLOAT for n in graph.node):
        found.add("DequantizeLinear")
    return sorted(found)


def _prequantized_weights(graph, inits: dict) -> list[dict]:
    """The integer weights a partly quantized input already holds, read by a DequantizeLinear or an integer kernel
    (QLinearConv, MatMulInteger, MatMulNBits, ...). They stay as they are; each budget counts them at their stored
    width, where they had counted nowhere ("4.00 bits" over the float layers alone)."""
    found = []
    for node in graph.node:
        for position in _INTEGER_WEIGHT_INPUTS.get(node.op_type, ()):
            tensor = inits.get(node.input[position]) if position < len(node.input) else None
            if tensor is None or tensor.data_type not in _STORED_BITS or len(tensor.dims) < 2:
                continue
            bits, params = _STORED_BITS[tensor.data_type], math.prod(tensor.dims)
            if node.op_type in _PACKED and tensor.data_type == onnx.TensorProto.UINT8:
                bits = int(attribute(node, "bits", 4))
                logical = int(attribute(node, "K", 0)) * int(attribute(node, "N", 0)) if node.op_type == "MatMulNBits" else 0
                params = logical or params * 8 // bits  # K x N where given (its blocks are padded), else the bytes
            found.append({"node": node.name, "op_type": node.op_type, "weight": tensor.name, "bits": bits,
                          "params": params})
    return found


def _copied(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    return copy


def load_model(path: str, output: str | None = None, whole: frozenset = frozenset()) -> LoadedModel:
    """Read, check and normalize; raise BadModel with a one-line reason. `whole`: the inputs whose samples come
    whole (data.SampleSet.whole), which the model is read with a sample axis for."""
    model, size, external = read_model(path)
    source_ir = model.ir_version
    source_opset = _default_opset(model)
    model = _upgrade_opset(model, source_opset, path)
    graph = model.graph
    declared = {t.name for t in graph.initializer}  # before Constant nodes join them
    _constants_to_initializers(graph)
    inits = {t.name: t for t in graph.initializer}
    # From IR 4 on, an initializer listed among the inputs is a default the caller may feed instead (a
    # temperature, a threshold): the written model lists it again where its tensor is written as it was
    # (write.restore_default_inputs). IR 3 files listed every initializer there, never meant to be fed, and so do
    # exports that keep every initializer as an input (torch's keep_initializers_as_inputs): listed again, their
    # biases and norms would keep ORT from folding and fusing them, as its own preprocessing removes them.
    listed = [i for i in graph.input if i.name in inits]
    default_inputs = [_copied(i) for i in listed] if source_ir >= 4 and len(listed) < len(declared) else []
    kept_inputs = [i for i in graph.input if i.name not in inits]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    # a default the caller may feed is no constant: a body's weight computed from it stays as it is
    kept_in_bodies = _hoist_body_weights(graph, _default_opset(model), {i.name for i in default_inputs})
    inits = {t.name: t for t in graph.initializer}
    # Old files (IR 3) must list initializers as inputs; the upgraded opset
    # needs a newer IR anyway, and the written model must pass the checker.
    standard = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(standard))
    _name_nodes(graph)
    kept_beside_copies, folded_bytes = _fold_weight_chains(graph, inits, _default_opset(model))
    _flatten_gemm_bias(graph, inits)
    _fold_batch_norms(graph, inits)
    model = _infer_shapes(model, path, external)
    inits = {t.name: t for t in model.graph.initializer}
    _check_tensor_inputs(path, model.graph, inits)
    axes = sample_axes.input_axes(model.graph, inits)
    record = sample_axes.add(model, set(whole), all_names(model.graph)) if whole else {}
    inits = {t.name: t for t in model.graph.initializer}
    inputs = _input_specs(model.graph, inits)
    if not inputs:
        raise BadModel(f"'{path}' has no graph inputs to feed; re-export it with its input tensor(s).")
    for spec in inputs:  # read before the sample axes were added
        spec.unbatched, spec.batch_axes, spec.own_first_axis = ("", (), False) if spec.name in whole else \
            axes.get(spec.name, ("", (), False))
    if not model.graph.output:
        raise BadModel(f"'{path}' has no graph outputs, so there is no prediction to calibrate against; "
                       "re-export it with its output tensor(s).")
    passed = [o.name for o in model.graph.output if o.name in {i.name for i in model.graph.input}]
    if passed:
        raise BadModel(f"'{path}': output '{passed[0]}' is a graph input passed through unchanged, which ONNX "
                       "Runtime's quantizer cannot take; drop it from the outputs (the caller has it already).")
    layers, skipped = find_layers(model, inits)
    skipped.extend(kept_beside_copies + kept_in_bodies)
    if not layers:
        inside = sum(entry["reason"].startswith("inside the body of") for entry in skipped)
        quantized = _integer_weight_ops(model.graph, inits)
        if quantized and not inside:
            raise BadModel(f"'{path}' is already quantized ({', '.join(quantized)}): give msq-onnx the FP32 model "
                           "it was made from.")
        where = (f" outside control flow: its {inside} weighted node(s) sit inside If/Loop/Scan bodies, where their "
                 "weights are read by other nodes too or their kind is not quantized" if inside else "")
        raise BadModel(f"'{path}' has no quantizable layer (Conv, ConvTranspose, Gemm or MatMul with a "
                       f"constant weight, an embedding table, LSTM/GRU/RNN or ORT's Attention){where}; there is "
                       "nothing to allocate bits to.")
    task = task_output(model, output)
    selected = selected_outputs(model.graph)
    first = earliest_selection(model.graph, task) if task in selected else None
    source = selection_source(model, first) if first is not None else None
    return LoadedModel(model=model, source_path=path, source_opset=source_opset, opset=_default_opset(model),
                       inputs=inputs, output_name=task, layers=layers,
                       size_bytes=size, initializers=inits, skipped=skipped,
                       prequantized=_prequantized_weights(model.graph, inits), folded_bytes=folded_bytes,
                       default_inputs=default_inputs,
                       selected={name: selection_text(model.graph, node) for name, node in selected.items()},
                       judged_name=source or "", sample_axes=record,
                       judged_text=f"'{source}', what {selection_text(model.graph, first)} selects from: '{task}' has "
                                   "a length that selections decide" if source else "")

"""Stage 8: check the written model on ONNX Runtime and measure it.

Accuracy is measured on the real output model with ORT's full optimizations,
never on an instrumented copy (instrumentation blocks the integer fusions).
"""

from __future__ import annotations

import functools
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from .errors import one_line
from .instrument import float_tensors, padded_batches
from .load import TemporaryFolder
from .ops import nonnegative_tensors

# Kernels that take integer activations as well as integer weights: one per static or dynamic layer node.
INTEGER_ACTIVATION_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger",
                          "MatMulInteger", "QLinearConvTranspose", "DynamicQuantizeMatMul")
# Kernels that compute on the quantized weights (MatMulNBits: packed int2/int4/int8 weights).
FUSED_INTEGER_OPS = INTEGER_ACTIVATION_OPS + ("MatMulNBits", "GatherBlockQuantized")


def session(path: str, optimized_path: str | None = None, silent: bool = False,
            threads: int = 0) -> ort.InferenceSession:
    """silent: not even ORT's error lines on stderr (a run whose failure the caller reports itself);
    threads: ORT's intra-op threads (0: its default, one per core)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4 if silent else 3
    options.intra_op_num_threads = threads
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def optimized_op_counts(path: str) -> Counter:
    """Op types of the graph ORT actually executes after its optimizations."""
    with TemporaryFolder("msq-verify-") as folder:
        optimized = os.path.join(folder, "optimized.onnx")
        session(path, optimized)
        return op_counts(optimized)


def op_counts(optimized_path: str) -> Counter:
    """Op types of a graph ORT wrote after optimizing it (a session's optimized_model_filepath)."""
    return Counter(node.op_type for node in onnx.load(optimized_path, load_external_data=False).graph.node)


def fused_integer_kernels(counts: Counter, ops=FUSED_INTEGER_OPS) -> int:
    return sum(counts[op] for op in ops)


def smoke_check(path: str, loaded, samples, batch_size: int) -> None:
    """The written model loads with full optimizations and gives finite outputs."""
    runner = session(path)
    feed, _ = next(padded_batches(samples, loaded, batch_size))
    for output in runner.run(None, feed):
        if np.issubdtype(output.dtype, np.floating) and not np.isfinite(output).all():
            raise RuntimeError("the quantized model produced NaN or Inf on calibration data")


def timing_ranges(model: onnx.ModelProto, ranges: dict) -> dict:
    """`ranges`, completed for ORT's uniform quantize_static, which needs a range for every float tensor it
    quantizes, where the pass measures only those a static layer of ours can read (instrument). A tensor
    without one takes the range of the first input it is computed from that has one, or (0, 1): exact through
    data movement (Reshape, Transpose), where ORT drops the Q/DQ pair only on equal scales; elsewhere a
    stand-in that changes the numbers in the yardstick's scales, not its kernels. The yardstick is only timed
    and its bytes counted, never evaluated. A graph input without one (read only by an op no static layer
    follows: a Rescaling Mul) takes its first reader's output range."""
    complete = dict(ranges)
    first_reader_output = {name: node.output[0] for node in reversed(model.graph.node) for name in node.input
                           if node.output}
    for value in model.graph.input:
        if value.name not in complete:
            complete[value.name] = ranges.get(first_reader_output.get(value.name), (0.0, 1.0))
    nonnegative = nonnegative_tensors(model)  # a Relu's stand-in never below 0: ORT drops a Relu on such a range
    for node in model.graph.node:
        found = next((complete[name] for name in node.input if name in complete), (0.0, 1.0))
        complete.update((name, (max(found[0], 0.0), max(found[1], 0.0)) if name in nonnegative else found)
                        for name in node.output if name not in complete)
    wanted = set(float_tensors(model))
    return {name: value for name, value in complete.items() if name in wanted or name in ranges}


SATURATION_FREE_BITS = 7  # |w| <= 64 on the full-range grid: 255 x 64 x 2 = 32,640 fits int16


@functools.lru_cache(maxsize=None)
def integer_kernels_saturate() -> bool:
    """Whether this machine's u8s8 integer kernels (QLinearConv, QGemm, MatMulInteger: every static and dynamic
    layer) add pairs of uint8 x int8 products in int16 and saturate: AVX2 and AVX512 without VNNI (vpmaddubsw).
    8-bit weights then lose accuracy where activations are large (EfficientNet-Lite0 at 8 bits, 1,000 images: 80.3%
    against FP32's 82.0% on an AVX2 EPYC); ONNX Runtime's remedy is reduce_range, 7-bit weights. Probed with
    255 x 127 + 255 x 127, which is 64,770 exact and 32,767 saturated."""
    weight = numpy_helper.from_array(np.full((2, 1), 127, np.int8), "b")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "saturation",
                              [helper.make_tensor_value_info("a", onnx.TensorProto.UINT8, [1, 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [1, 1])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    try:
        product = single_thread_session(model, silent=True).run(None, {"a": np.full((1, 2), 255, np.uint8)})[0]
    except Exception:  # a build without the kernel runs no u8s8 layer either: nothing to cap
        return False
    return int(product.ravel()[0]) != 2 * 255 * 127


@dataclass
class Yardstick:
    """ONNX Runtime's own uniform int8 model (reference_int8): `path` None where its quantizer refused the model
    (`failed` says why), `kind` static or dynamic. tables: initializer -> the FP32 lookup table a one-row stand-in
    replaced while the quantizer wrote `path` (its external data in `folder`); session() puts them back."""

    path: str | None
    kind: str
    failed: str | None = None
    tables: dict = field(default_factory=dict)
    folder: str | None = None
    _built: object = field(default=None, init=False, repr=False, compare=False)  # prepared()'s session, or error

    def prepared(self) -> "Yardstick":
        """Itself, its session built now (where it was written: on a thread, while the main one has other work);
        session() hands it over, or raises what building it raised."""
        if self.path is not None:
            try:
                self._built = self.session()
            except Exception as exc:
                self._built = exc
        return self

    def session(self) -> ort.InferenceSession:
        """A one-thread session of the yardstick as ORT's quantizer wrote it from the whole model."""
        built, self._built = self._built, None
        if isinstance(built, Exception):
            raise built
        if built is not None:
            return built
        if not self.tables:
            return single_thread_session(self.path, silent=True)
        model = onnx.load(self.path)
        for tensor in model.graph.initializer:
            if tensor.name in self.tables:
                tensor.CopyFrom(self.tables[tensor.name])
        return single_thread_session(model, silent=True, weights=self.folder)


def reference_int8(fp32_path: str, work_dir: str, static: bool, ranges: dict, per_channel: bool = False,
                   float_nodes: tuple = (), stand_ins: bool = False) -> Yardstick:
    """ONNX Runtime's own uniform int8 model, the latency yardstick a user would build: quantize_static (our
    ranges, completed by timing_ranges, as its calibration cache) for a model we run mostly static,
    quantize_dynamic otherwise.

    When only its speed is measured its weights are quantized per tensor: the same kernels run (batch-1
    latency per tensor / per channel: EfficientNet-Lite0 4.42 / 4.47 ms, MiniLM-L6 4.45 / 4.55 ms) and
    ORT's quantizer writes it 10x (static) and 3x (dynamic) faster: its per-channel loop is Python. Its bytes
    or accuracy as a user's file need per_channel=True. float_nodes: names of nodes ORT's quantizer leaves in float.

    stand_ins (a model written by LoadedModel.model_file, timed only): the float nodes' lookup tables that nothing
    else reads are one-row stand-ins while the quantizer works, which copies, saves and reloads the whole model
    twice (MiniLM-L6: 0.45-0.55 -> 0.18-0.23 s without its 47 MB of tables); Yardstick.session puts them back."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from .write import _quiet_ort_logging, write_calibration_cache

    kind = "static" if static else "dynamic"
    path = os.path.join(work_dir, f"ort-{kind}-int8.onnx")
    source, tables = fp32_path, {}
    if stand_ins:
        try:
            source, tables = _with_stand_ins(fp32_path, float_nodes)
        except Exception:  # e.g. no room for the copy: the quantizer reads the whole model instead
            pass
    try:
        with _quiet_ort_logging():
            if static:
                cache = os.path.join(work_dir, "reference-ranges.json")
                graph = onnx.load(fp32_path, load_external_data=False)  # the tensors, not the weights
                write_calibration_cache(timing_ranges(graph, ranges), cache)
                quantize_static(source, path, calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                                per_channel=per_channel, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, nodes_to_exclude=list(float_nodes),
                                calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=cache)
            else:
                quantize_dynamic(source, path, per_channel=per_channel, weight_type=QuantType.QInt8,
                                 nodes_to_exclude=list(float_nodes))
    except Exception as exc:  # the yardstick is optional: ORT's quantizer refuses some models that we convert
        return Yardstick(None, kind, f"cannot be written: {one_line(exc)}"[:300])
    finally:
        if source != fp32_path:
            os.remove(source)
    if tables and not _stand_ins_kept(path, tables):  # the quantizer touched a table after all (or the file it
        # wrote cannot be read back): write it whole
        return reference_int8(fp32_path, work_dir, static, ranges, per_channel, float_nodes)
    return Yardstick(path, kind, None, tables, os.path.dirname(fp32_path))


STAND_IN_SUFFIX = ".stand-ins.onnx"


def _with_stand_ins(fp32_path: str, float_nodes: tuple) -> tuple[str, dict]:
    """A copy of the model file (beside it: its other weights stay references into the same file) whose
    externally stored tables read only by `float_nodes` (as their first input) are one-row stand-ins, and the
    tables it stood in for."""
    from .write import tensor_readers

    model = onnx.load(fp32_path, load_external_data=False)
    names = set(float_nodes)
    # a graph output or a subgraph's reader is ELSEWHERE, never one of `names`
    readers, nodes = tensor_readers(model), {node.name: node for node in model.graph.node}

    def only_looked_up(name: str) -> bool:
        return bool(readers.get(name)) and all(reader in names and nodes[reader].input[0] == name
                                               and list(nodes[reader].input).count(name) == 1
                                               for reader in readers[name])

    tables = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and len(tensor.dims) >= 2 and only_looked_up(tensor.name):
            tables[tensor.name] = onnx.TensorProto()
            tables[tensor.name].CopyFrom(tensor)
            tensor.CopyFrom(numpy_helper.from_array(
                np.zeros((1, *tensor.dims[1:]), helper.tensor_dtype_to_np_dtype(tensor.data_type)), tensor.name))
    if not tables:
        return fp32_path, {}
    source = fp32_path + STAND_IN_SUFFIX
    onnx.save(model, source)
    return source, tables


def _stand_ins_kept(path: str, tables: dict) -> bool:
    """Whether the written yardstick holds every stand-in as it was given: a one-row float initializer."""
    try:
        written = {t.name: t for t in onnx.load(path, load_external_data=False).graph.initializer}
    except Exception:
        return False
    return all(name in written and written[name].data_type == table.data_type
               and list(written[name].dims) == [1, *table.dims[1:]] for name, table in tables.items())


# Per model, spent in timed runs after warm-up. EfficientNet-Lite0's output / FP32 latency over three
# repeats: 0.485, 0.501, 0.484 at 0.5 s; 0.490, 0.472, 0.488 at 0.25 s: the machine's drift, not the
# number of runs, sets the spread. 0.15 s (MiniLM-L6's held-out text: 5 rounds instead of 9) spread its FP32 ratio
# more (s.d. 0.0048 against 0.0035 over 16 repeats) for 0.03 s of its conversion: the gzip beside the timing then
# becomes the tail (docs/BENCHMARKS.md, round 31).
LATENCY_SECONDS = 0.25


def single_thread_session(model, silent: bool = False, optimized_path: str | None = None,
                          weights: str | None = None) -> ort.InferenceSession:
    """A CPU session on one intra-op and one inter-op thread, from a path or an in-memory model (silent: as
    session's). optimized_path: where ORT writes the graph as it optimized it (op_counts reads it: the same graph
    as with more threads, on EfficientNet-Lite0's and MiniLM-L6's outputs). weights: the folder an in-memory
    model's external data lies in."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 4 if silent else 3
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    if weights is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", weights)
    return ort.InferenceSession(model if isinstance(model, str) else model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def single_thread_sessions(models: list) -> list:
    return [single_thread_session(model) for model in models]


def interleaved_medians(sessions: list, feed: dict, runs: int) -> list[float]:
    """Median seconds per session over `runs` rounds, one run of each per round so drift hits all alike."""
    times = [[] for _ in sessions]
    for _ in range(runs):
        for index, runner in enumerate(sessions):
            start = time.perf_counter()
            runner.run(None, feed)
            times[index].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def time_models(paths: list[str], feed: dict) -> list[float]:
    """Median batch-1 latency (ms) of each model on one thread, the number of runs fitted to LATENCY_SECONDS."""
    return time_sessions(single_thread_sessions(paths), feed)


def time_sessions(sessions: list, feed: dict) -> list[float]:
    """time_models on sessions already built (single_thread_sessions)."""
    first = interleaved_medians(sessions, feed, 2)  # warm-up, and a first timing to choose the number of runs
    runs = int(np.clip(LATENCY_SECONDS / max(max(first), 1e-6), 5, 200))
    return [round(t * 1000.0, 4) for t in interleaved_medians(sessions, feed, runs)]

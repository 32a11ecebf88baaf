"""The pipeline: load -> instrument -> features -> imprint -> importance ->
allocate -> write -> verify -> report. Each stage is its own module; this one
only moves data between them and times them.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import allocate as allocate_stage
from . import sample_axes
from . import fidelity
from . import modes as mode_stage
from .data import Preprocess, check_labels, first_samples, number_classes_like, open_samples, split_holdout
from .errors import BadData, BadOption, GateFailed, one_line
from .features import DEFAULT_LEVELS, DEFAULT_MAX_DIM
from .imprint import imprint_labels, layer_scores
from .importance import importance as layer_importance
from .importance import upstream_layers
from .instrument import batch_of, blas_limit, estimated_rows, one_blas_thread, run_pass, usable_cores
from .latency import mode_costs
from .load import TemporaryFolder, is_large, load_model
from .ops import DYNAMIC, FLOAT, FLOAT_BITS, FLOAT_CONTAINER, MODES, PREFER, REGISTRY, STATIC, WEIGHT_ONLY
from .report import GzipSize, gzip_size
from .verify import (INTEGER_ACTIVATION_OPS, SATURATION_FREE_BITS, fused_integer_kernels, integer_kernels_saturate,
                     smoke_check)
from .weights import error_table
from .write import (check_output_path, publish, quantize_to_qdq, quantize_weights, uint16_kernels,
                    uint16_widenable, written_files)

HOLDOUT_FRACTION = 0.2  # of the calibration set held out (every 5th sample) when there is no --eval
MIN_SPLIT = 10  # fewer calibration samples than this are not split: fidelity is then measured on them
FEW_HELD_OUT = 30  # below this, one sample moves agreement and top-1 by over 3 points: the report says so
REDUCE_RANGE = ("auto", "on", "off")
ACTIVATION_CHOICES = ("auto",) + tuple(m for m in MODES if m != FLOAT)


@dataclass
class Options:
    avg_bits: float | None = None
    bits: tuple = allocate_stage.DEFAULT_BITS
    allocator: str = "ilp"
    importance_exponent: float = allocate_stage.IMPORTANCE_EXPONENT
    levels: tuple = DEFAULT_LEVELS
    max_dim: int = DEFAULT_MAX_DIM
    eval_path: str | None = None
    max_drop: float | None = None
    max_size: float | None = None  # bytes, or a fraction (<= 1) of the input model's size
    min_cosine: float | None = None  # gate on the task output's mean cosine to FP32
    output: str | None = None  # the task output; None: the first float output of rank >= 2
    output_kind: str | None = None  # what an [N, C] task output holds (fidelity.OUTPUT_KINDS); None: inferred
    activations: str = "auto"  # per-layer mode from measured damage, or one mode for every layer
    prefer: str = "speed"  # speed: int8 containers on fused kernels; size: the narrowest container that runs
    rounding: str = "gptq"  # gptq: rounding with the layer's input Hessian where it is known; nearest
    max_latency: float | None = None  # batch-1 latency at most this many times FP32's (a second knapsack bound)
    mode_tolerance: float = mode_stage.TOLERANCE
    # 7-bit weights for layers on u8s8 integer kernels: auto where this machine's kernels saturate (verify.
    # integer_kernels_saturate), on for a target that does (AVX2 or AVX512 without VNNI), off: never
    reduce_range: str = "auto"
    act16: int = 0  # inputs of this many layers (largest uint8 error) kept in uint16
    preprocess: Preprocess = field(default_factory=Preprocess)
    batch_size: int = 1
    seed: int = 0
    quiet: bool = False
    # reallocate: a default allocation whose written model collapsed is made again on each layer's measured
    # effect on the outputs (_reallocate); warn: it is only said
    on_collapse: str = "reallocate"
    bias_correction: bool = True
    residual_weights: bool = True  # ilp: each layer's error weighed by the share a residual stream keeps
    level_sets: bool = True  # 2-4-bit int8-container weights may place their 2^k levels unevenly (weights.shared_levels)
    clip_search: bool = True


@dataclass
class Result:
    report: dict
    gate_passed: bool | None


class _ResultThread(threading.Thread):
    """A function run on its own thread; result() waits for it and returns its value or raises its exception."""

    def __init__(self, function):
        super().__init__(daemon=True)  # an interrupted conversion's process does not wait for it
        self._function, self._value, self._error = function, None, None
        self.start()

    def run(self) -> None:
        try:
            self._value = self._function()
        except BaseException as exc:  # raised where the value is asked for
            self._error = exc
        finally:
            self._function = None  # what it referenced (a loaded model and its weights folder) goes with the caller

    def result(self):
        self.join()
        error = self._error
        if isinstance(error, tuple):  # raised before: again, made anew
            kind, args, text = error
            try:
                error = kind(*args)
            except Exception:  # a constructor that does not take its args back
                error = RuntimeError(text)
            raise error
        if error is not None:
            # Raised as it is once; its traceback then holds the caller's frames, so only what it said is kept (a
            # cycle through us would keep the loaded model and its weights folder until the garbage collector ran)
            self._error = (type(error), error.args, str(error))
            raise error
        return self._value

    def discard(self) -> None:
        """Wait for the thread and drop what it made or raised, unread (a stopped run's Cancelled)."""
        self.join()
        self._value = self._error = None


class _Timer:
    def __init__(self):
        self.seconds = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)
            _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the heap a finished stage freed back to the system. glibc keeps freed blocks of ORT sessions
    and numpy arrays mapped, so each stage started on the last one's high-water mark (EfficientNet-Lite0:
    resident 300 MB between stages instead of 150 MB, and a 330 MB peak instead of 305 MB)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): nothing to trim


def _num_classes(loaded) -> int | None:
    """Outputs per sample of the task output, when fixed: the class count labels are checked against. One
    score a sample is a binary classifier's (a sigmoid head): its labels are 0 and 1."""
    value = next(v for v in loaded.model.graph.output if v.name == loaded.output_name)
    dims = value.type.tensor_type.shape.dim
    if len(dims) >= 2 and all(d.HasField("dim_value") for d in dims[1:]):
        return max(int(np.prod([d.dim_value for d in dims[1:]])), 2)
    return None


def check_options(options: Options) -> None:
    for flag, value in (("--avg-bits", options.avg_bits), ("--max-size", options.max_size),
                        ("--max-drop", options.max_drop), ("--importance-exponent", options.importance_exponent)):
        if value is not None and not math.isfinite(value):
            raise BadOption(f"{flag} {value} is not a finite number.")
    if options.output_kind is not None and options.output_kind not in fidelity.OUTPUT_KINDS:
        raise BadOption(f"--output-kind {options.output_kind} is not one of {', '.join(fidelity.OUTPUT_KINDS)}.")
    if options.reduce_range not in REDUCE_RANGE:
        raise BadOption(f"--reduce-range {options.reduce_range} is not one of {', '.join(REDUCE_RANGE)}.")
    if options.act16 < 0:
        raise BadOption(f"--act16 {options.act16} must be zero or positive.")
    if options.seed < 0:
        raise BadOption(f"--seed {options.seed} must be zero or positive.")
    allocate_stage.check_budget(options.avg_bits, options.bits)
    if options.allocator not in allocate_stage.ALLOCATORS:
        raise BadOption(f"unknown allocator '{options.allocator}'; choose one of "
                        f"{', '.join(allocate_stage.ALLOCATORS)}.")
    if not options.levels or any(level < 1 for level in options.levels):
        raise BadOption("--levels must list positive pyramid sizes such as 1,2,4.")
    if options.batch_size < 1:
        raise BadOption(f"--batch-size {options.batch_size} must be at least 1.")
    if options.max_dim < 1:
        raise BadOption(f"--max-dim {options.max_dim} must be at least 1.")
    if options.max_size is not None and options.max_size <= 0:
        raise BadOption("--max-size must be positive: bytes, or a fraction (<= 1) of the input model's size.")
    if options.max_drop is not None and options.max_drop < 0:
        raise BadOption("--max-drop must be zero or positive (top-1 points).")
    if options.min_cosine is not None and not (0.0 < options.min_cosine <= 1.0):
        raise BadOption(f"--min-cosine {options.min_cosine} is outside (0, 1]; give a cosine such as 0.99.")
    if options.max_latency is not None and not (math.isfinite(options.max_latency) and options.max_latency > 0):
        raise BadOption(f"--max-latency {options.max_latency} must be a positive ratio to FP32's latency, "
                        "such as 0.8.")
    if options.rounding not in ("gptq", "nearest"):
        raise BadOption(f"--rounding {options.rounding!r} is not one of gptq, nearest.")
    if options.prefer not in PREFER:
        raise BadOption(f"--prefer {options.prefer!r} is not one of {', '.join(PREFER)}.")
    if options.activations not in ACTIVATION_CHOICES:
        raise BadOption(f"--activations {options.activations!r} is not one of {', '.join(ACTIVATION_CHOICES)}.")


@dataclass
class Analysis:
    """The MSQ measurements that the allocation and the report draw on."""

    stats: object  # instrument.PassStatistics
    labels: object  # imprint.Labels
    scores: dict  # layer -> imprint.PredictorScores
    input_score: object  # the network input's PredictorScores
    upstream: dict  # layer -> nearest upstream layers
    importance: dict  # layer -> soft-score gain over upstream
    choices: dict  # layer -> {bits: weights.WidthChoice}
    modes: dict  # layer -> modes.ModeChoice: its activation mode, measured
    mode_log: list  # end-to-end error of the task output after each round of mode choices
    activation_errors: dict  # layer -> relative error of its input at 8 bits (allocate.activation_errors)
    wide_inputs: set  # the layers whose static input --act16 writes at 16 bits
    caps: dict  # layer -> its widest width where the machine's integer kernels saturate (saturation_caps)


def analyse(loaded, calib, options: Options, timer: _Timer, before_tables=None, widths_of=None) -> Analysis:
    """The MSQ measurements. before_tables(stats, modes) is called between the activation modes and the error
    tables, when the process holds the least (the error tables' GPTQ roundings stay until the writing): convert
    starts the yardstick's writing there.
    widths_of: the widths each layer's error table measures (allocate.reachable_widths; None: options.bits)."""
    # Without a budget every layer keeps the widest width, which rounds to nearest: no Hessians then.
    narrowed = (options.avg_bits is not None and options.avg_bits < max(options.bits)) or any(
        v is not None for v in (options.max_size, options.max_drop, options.min_cosine))
    forced = None if options.activations == "auto" else options.activations
    with timer.stage("activation-modes"):
        # the layers whose static the modes could take, timed on the rows their samples will have: the pass
        # measures ranges for them only
        static_layers = mode_stage.static_candidates(
            loaded, estimated_rows(loaded, calib, options.batch_size) if forced is None else {}, forced)
    with timer.stage("instrument+features"):
        stats = run_pass(loaded, calib, options.levels, options.max_dim, options.batch_size, options.quiet,
                         options.seed, hessians=options.rounding == "gptq" and narrowed, static_layers=static_layers)
    with timer.stage("activation-modes"):
        # timed where this machine's cache has no timing (and cached for its later conversions): before any thread
        # starts beside the timing
        costs = {layer.name: mode_costs(layer, stats.rows.get(layer.name)) for layer in loaded.layers}
    early = None
    try:
        early = _EarlyTables(loaded, stats, options, widths_of)
        return _analyse_after_pass(loaded, calib, options, timer, stats, costs, early, before_tables, widths_of,
                                   narrowed, static_layers)
    finally:
        if early is not None:
            early.close()


def _analyse_after_pass(loaded, calib, options: Options, timer: _Timer, stats, costs: dict, early: "_EarlyTables",
                        before_tables, widths_of, narrowed: bool, static_layers: set) -> Analysis:
    with timer.stage("imprint"):
        labels = imprint_labels(None if calib.labels is None else calib.labels[stats.imprinted], stats.outputs,
                                options.seed, fidelity.output_kind(stats.outputs, None, name=loaded.judged,
                                                                   declared=options.output_kind) == "class-scores")
        scores, input_score = layer_scores(stats.features, stats.input_features, labels)
    with timer.stage("importance"):
        upstream = upstream_layers(loaded.model, loaded.layers)
        gains = layer_importance({name: s.soft for name, s in scores.items()}, input_score.soft, upstream)
        # A layer inside a control-flow body has no predictor (none of its tensors can be fetched): it takes the
        # measured layers' mean, which weighs its error as it is in the knapsack whatever the exponent
        neutral = float(np.mean(list(gains.values()))) if gains else 1.0
        gains.update({layer.name: neutral for layer in loaded.layers if layer.name not in gains})
    with timer.stage("activation-modes"):
        solver = allocate_stage.import_solver_in_background() if (
            narrowed or options.max_latency is not None) and options.allocator not in allocate_stage.GREEDY else None
        # Rows that are padding do not count towards the samples the modes need: real tokens only.
        real_rows = {name: min(r, stats.tokens) if stats.tokens else r for name, r in stats.rows.items()}
        # static cannot be measured without the ranges the pass took only for static_layers
        unmeasured = {layer.name for layer in loaded.layers
                      if STATIC in layer.kind.modes and layer.name not in static_layers}
        unranged = None
        if options.activations == "auto":
            dominated = mode_stage.dominated_modes(loaded, costs)
            # rows a sample other than estimated before the pass: a static not dominated after all has no ranges
            unranged = {name for name in unmeasured if STATIC not in dominated[name]}
            skip = {name: modes | ({STATIC} if name in unranged else set()) for name, modes in dominated.items()}
        else:  # forced: every mode is measured for the report, static where the pass measured its ranges
            skip = {name: {STATIC} for name in unmeasured}
        measurement = mode_stage.measure(loaded, calib, stats.ranges, batch_size=options.batch_size,
                                         quiet=options.quiet, rows=real_rows, workers=stats.workers, skip=skip)
        if solver is not None:
            # the import holds the GIL while it runs (a 0.14 ms model's timing beside it measured 1.8x FP32's time):
            # nothing that times comes before its end
            solver.join()
        modes, mode_log = mode_stage.choose(loaded, measurement, stats.ranges, costs, options.mode_tolerance,
                                            None if options.activations == "auto" else options.activations,
                                            skip=skip, unranged=unranged)
    activation_errors = allocate_stage.activation_errors(loaded.layers, stats.ranges, stats.input_sq)
    static = {name for name, choice in modes.items() if choice.mode == STATIC}
    # --act16's layers are taken among those whose inputs ORT would really write as uint16
    widenable = uint16_widenable([layer for layer in loaded.layers if layer.name in static], loaded.model)
    wide_inputs = allocate_stage.wide_activations(activation_errors, options.act16, widenable)
    caps = saturation_caps(loaded, modes, options, wide_inputs)
    # a capped layer's wider widths are never allocated: their error tables are not measured (MiniLM-L6 on an AVX2
    # machine: every dynamic layer's 8 bits)
    widths_of = {layer.name: [b for b in (options.bits if widths_of is None else widths_of[layer.name])
                              if b <= caps.get(layer.name, b)] for layer in loaded.layers}
    if before_tables is not None:
        before_tables(stats, modes)
    # After the modes: the threads' heaps keep some of what they freed, and the modes' simulation sessions
    # set the peak (EfficientNet-Lite0: 331 MB with the tables before them, 301 MB after).
    with timer.stage("weight-errors"):
        choices = _error_tables(loaded, stats, options, modes, widths_of, early)
        stats.hessians = {}  # released: tens of MB per wide layer
    return Analysis(stats, labels, scores, input_score, upstream, gains, choices, modes, mode_log,
                    activation_errors, wide_inputs, caps)


def error_statistics(layer, stats, bias_correction: bool) -> tuple:
    """The input statistics a layer's rounding error is measured against: per input channel, its power, and
    its Hessians when GPTQ can use them. Where the bias correction will take the error's constant part out
    (weights.quantize_layer), the Hessians are centred on the input's mean: the error they measure on the
    held-out rows is then exactly the one written, relative to the part of the output that varies.
    The per-channel powers stay uncentred: on EfficientNet-Lite0's convolutions (no Hessians) centring them
    measured worse on the tuning half (3.0 bits 78.2 -> 77.0%, 2.5 bits 70.4 -> 68.0%); a convolution's
    per-channel correction does not take out a mean that varies over the map (its padded borders)."""
    power, hessians = stats.input_sq.get(layer.name), stats.hessians.get(layer.name)
    mean = stats.input_mean.get(layer.name)
    if bias_correction and layer.bias_factor is not None and hessians is not None and mean is not None \
            and hessians.fit_sum is not None and np.ndim(mean) == 1 and len(mean) == len(hessians.fit):
        hessians = hessians.centred(mean)
    return power, hessians


TABLE_WORKERS = 2  # layers whose error tables are computed at once; each holds its own working copies


def _layer_table(loaded, stats, options, layer, mode: str, widths) -> dict:
    """One layer's error table, in the activation mode it will be written in."""
    room = {b: layer.kind.has_room(layer, b, mode, options.prefer) for b in widths}
    input_power, hessians = error_statistics(layer, stats, options.bias_correction)
    level_sets = {b: options.level_sets and layer.kind.takes_level_set(layer, b, mode, options.prefer) for b in widths}
    return error_table(layer, loaded.weight(layer), input_power, widths, options.clip_search, hessians,
                       {b: layer.kind.scale_block(layer, b, options.prefer) for b in widths}, room, level_sets)


def _error_tables(loaded, stats, options, modes: dict, widths_of=None, early: "_EarlyTables | None" = None) -> dict:
    """Every layer's error per width, two layers at a time: the clipping search's element-wise passes and
    GPTQ's products release the GIL, so the second core works too (MiniLM-L6: 5.8 s -> 3.5 s, the same
    model written). The tables `early` already made, in the mode and widths the layer has, are taken as made."""

    workers = max(1, min(TABLE_WORKERS, usable_cores()))
    # A thread making tables early still at it is one of the workers: the pool's last starts when it ends, where
    # before the pool waited for it (MiniLM-L6: its embedding table ended 0.4 s into the stage, one core idle)
    slots = threading.Semaphore(workers)
    if early is not None:
        slots.acquire()
        early.when_done(slots.release)

    def table(layer):
        with slots:
            return _layer_table(loaded, stats, options, layer, modes[layer.name].mode,
                                options.bits if widths_of is None else widths_of[layer.name])

    with one_blas_thread(), ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            futures = {layer.name: pool.submit(table, layer) for layer in loaded.layers
                       if early is None or not early.making(layer.name)}
            made = early.tables(modes, widths_of) if early is not None else {}
            futures.update({layer.name: pool.submit(table, layer) for layer in loaded.layers
                            if layer.name not in made and layer.name not in futures})
            made.update({name: future.result() for name, future in futures.items()})
        except BaseException:  # a table that failed, or an interrupt: the tables not started are not made
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return {layer.name: made[layer.name] for layer in loaded.layers}


class _EarlyTables:
    """The error tables of the layers whose activation mode is known before the modes are measured (a kind with
    one mode: an embedding table's weight-only lookup), made on a thread from the end of the pass, beside the
    imprinting and the modes' measurement, whose session builds leave a core idle (MiniLM-L6: its 11.7 M-value
    embedding table, 0.85 s of one core, out of the error tables' stage, where it held one of its two workers).
    Taken only where the mode and the widths turn out as assumed; made again otherwise."""

    def __init__(self, loaded, stats, options, widths_of):
        self.layers = {layer.name: (layer, _known_mode(layer, options)) for layer in loaded.layers}
        self.layers = {name: known for name, known in self.layers.items() if known[1] is not None}
        self.bits = options.bits
        self.widths = {name: self._wanted(widths_of, name) for name in self.layers}
        self._thread, self._blas, self._stop = None, None, threading.Event()
        # done when the thread's work has ended (at once where there is none): when_done's callbacks run then
        self._ended = ended = Future()
        if not self.layers:
            ended.set_result(None)
        else:
            # Held until close(): the thread's numpy on one BLAS thread, as the tables'. The limit is the process's:
            # the imprinting's and the modes' numpy beside the thread take one BLAS thread too.
            self._blas = blas_limit()
            stop, layers, widths = self._stop, self.layers, self.widths

            def make():
                made = {}
                try:
                    for name, (layer, mode) in layers.items():
                        if stop.is_set():  # the analysis failed: no more work on its behalf
                            break
                        made[name] = _layer_table(loaded, stats, options, layer, mode, widths[name])
                finally:
                    ended.set_result(None)
                return made

            try:
                self._thread = _ResultThread(make)
            except BaseException:
                self.close()
                raise

    def making(self, name: str) -> bool:
        """Whether the thread makes (or made) this layer's table: one the tables' stage need not start."""
        return self._thread is not None and name in self.layers

    def when_done(self, callback) -> None:
        """Call `callback` once the thread's work has ended (at once where it has, or where there is none)."""
        self._ended.add_done_callback(lambda _: callback())

    def tables(self, modes: dict, widths_of) -> dict:
        """The tables made early whose layer has the mode assumed and the widths now wanted (a cap may narrow them).
        A failure on the thread makes none: the tables' stage makes them again (and meets the failure itself, where
        it is the layer's)."""
        if self._thread is None:
            return {}
        thread, self._thread = self._thread, None  # what it made goes with the tables taken
        try:
            made = thread.result()
        except Exception:
            return {}
        return {name: table for name, table in made.items() if modes[name].mode == self.layers[name][1]
                and self.widths[name] == self._wanted(widths_of, name)}

    def _wanted(self, widths_of, name: str) -> tuple:
        return tuple(self.bits if widths_of is None else widths_of[name])

    def close(self) -> None:
        """Lift the BLAS limit; a thread still running (the analysis failed) ends after its current layer."""
        self._stop.set()
        if self._blas is not None:
            self._blas.restore_original_limits()
            self._blas = None


def _known_mode(layer, options) -> str | None:
    """The mode mode_stage.choose gives a layer whatever is measured: a kind's only mode (its activations are not
    quantized, so nothing can make it lossy), or the one --activations forces; None where it depends on the
    measurement."""
    if len(layer.kind.modes) != 1:
        return None
    if options.activations == "auto":
        return layer.kind.modes[0]
    return options.activations if options.activations in (*layer.kind.modes, FLOAT) else layer.kind.modes[0]


@dataclass
class Candidate:
    """One written model: its allocation, its file in the work folder, its held-out measurement."""

    bits: dict
    avg_bits: float
    path: str
    measured: dict | None
    modes: dict  # layer -> activation mode as written
    containers: dict  # layer -> weight container as written
    file_bytes: int  # the model file and its external data, as written


WRITE_GROWTH = 2.0  # what the first write adds to the process, in model-weight bytes (MiniLM-L6: 170-240 MB for its
# 90 MB; BERT-base: 750 MB for 440 MB)
ALWAYS_FITS = 64 << 20  # bytes: a small model's reference session and write fit whatever the headroom


def _peak_and_resident() -> tuple:
    """(peak, resident) bytes of this process; (None, None) where it cannot tell (not Linux)."""
    import resource
    import sys

    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        with open("/proc/self/statm") as handle:
            return peak, int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None, None


# ORT's quantizer writes the yardstick beside the error tables where its copies of the model (about twice its dense
# weights, the lookup tables stood in for) are at most this share of the peak reached, else alone before them:
# MiniLM-L6's 86 MB against its pass's 446 MB, beside; BERT-base's 680 MB against 1,640, beside the tables took the
# conversion's peak 2,260 -> 2,340 MB (its tables' working copies and ORT's at once).
YARDSTICK_BESIDE_THE_TABLES = 0.25
# The yardstick's timed session is built beside the first write where what building it holds at once (the file
# read, the model serialized for ORT, ORT's own copy: about three times the file) is at most this share of the peak
# reached: MiniLM-L6's 11 MB file, yes; BERT-base's 110 MB beside its write took the peak 2,260 -> 2,696 MB.
YARDSTICK_BESIDE_THE_WRITE = 0.1


def _dense_bytes(loaded) -> int:
    """FP32 bytes of the layers' weights a session holds whole (an embedding table's rows are read where gathered)."""
    return 4 * sum(layer.params for layer in loaded.layers if not layer.kind.read_where_gathered)


def _fits_beside_the_write(loaded) -> bool:
    """Whether the held-out reference's FP32 session fits beside the first write below the peak the process has
    already reached (the pass's or the error tables'), run there or kept for the latency timing: the write adds about
    WRITE_GROWTH x the model's weights, the session its dense weights (an embedding table's rows are read only
    where gathered: MiniLM-L6's session holds about 55 MB of its 90). BERT-base, where it does not fit (1,161 MB
    needed, 1,153 MB below the peak): the write's peak 1,704 -> 2,117 MB beside the session, running or kept,
    over its yardstick's 2,058. MiniLM-L6 needs 212 MB of 370, EfficientNet-Lite0 53 of 111. Unknown (not
    Linux): no."""
    peak, resident = _peak_and_resident()
    if peak is None:
        return False
    weights = 4 * sum(layer.params for layer in loaded.layers)
    dense = _dense_bytes(loaded)
    # a tenth of the peak to spare: BERT-base's estimate, 1,161 MB, was within 8 MB of its headroom
    return WRITE_GROWTH * weights + dense <= max(peak - resident - peak / 10, ALWAYS_FITS)


class _HeldOut:
    """FP32 outputs on the held-out samples, computed once, against which candidates are compared.

    background: computed on a thread while the caller allocates and writes the first candidate. Those run on one
    core, mostly holding the GIL; ONNX Runtime's runs do not need it (MiniLM-L6: the reference's 1.3 s and the
    write's 0.8 s one after the other). Only where its session fits there (_fits_beside_the_write), and not
    where the next thing is a latency timing, which the runs would disturb. Otherwise computed when the first
    candidate is measured, after its write: a session kept for the latency timing (keep_session) is not held
    through that write.

    keep: measure() keeps the candidate's session (one intra-op thread) for the latency timing, with the graph
    ORT optimized it to written beside the candidate (kept_session)."""

    def __init__(self, loaded, samples, options: Options, workers: int, background: bool = False,
                 keep_session: bool = False, keep: bool = False):
        from .instrument import padded_batches, run_workers

        self.loaded, self.samples, self.options = loaded, samples, options
        fp32_model = loaded.model_file()
        # --eval's samples can be larger than the calibration's, from which `workers` was decided
        workers = min(workers, run_workers(loaded, next(padded_batches(samples, loaded, options.batch_size))[0]))
        self._stop = stop = threading.Event()  # not self in the closure: a cycle would keep the model's folder

        def reference() -> fidelity.Reference:
            return fidelity.Reference(fp32_model, loaded, samples, options.batch_size, options.quiet, workers, stop,
                                      keep_session)

        self._reference, self._thread, self._blas = None, None, None
        self._make, self._background = reference, background
        self._keep, self._kept = keep, None

    def start(self) -> None:
        """Start the background runs: after the caller has arranged for close() (no interrupt between the two
        can leave them running)."""
        if self._background and self._make is not None and self._thread is None:
            # The background runs enter and leave threadpoolctl's process-wide BLAS limit beside the main thread's
            # own entries (the write's): under one limit held until they end, no exit restores two threads while
            # the other is in, or leaves one behind (a review's)
            self._blas = blas_limit()
            self._thread = _ResultThread(self._make)
            self._make = None

    @property
    def reference(self) -> fidelity.Reference:
        if self._reference is None and self._thread is None:
            self._reference, self._make = self._make(), None
        if self._reference is None:
            try:
                self._reference = self._thread.result()
            finally:
                self._release()
        return self._reference

    def kept_session(self, path: str):
        """(session, optimized graph's path) of the candidate last measured, if it is `path` and ran on one
        intra-op thread; else None."""
        return self._kept[1:] if self._kept is not None and self._kept[0] == path else None

    def release_sessions(self) -> None:
        """Drop the sessions kept for the latency timing, once it is done (the FP32 outputs stay)."""
        self._kept = None
        if self._reference is not None:
            self._reference.single_thread_session = None

    def close(self) -> None:
        """Ends the background runs early (a conversion that failed or was interrupted before it was needed)."""
        if self._thread is not None and self._reference is None:
            self._stop.set()
            self._thread.discard()
        self._release()

    def _release(self) -> None:
        if self._blas is not None:
            self._blas.restore_original_limits()
            self._blas = None

    def measure(self, path: str) -> dict:
        reference = self.reference
        optimized = os.path.join(os.path.dirname(path), "optimized.onnx") if self._keep else None
        sessions = {} if self._keep else None
        measured = fidelity.compare(reference, path, self.loaded.output_name, self.samples.labels,
                                    self.options.quiet, self.options.output_kind, optimized, sessions)
        self._kept = (path, sessions[path], optimized) if sessions else None
        task = measured["task_output"]
        if self.options.min_cosine is not None and measured["outputs"].get(task, {}).get("integer"):
            raise BadOption(f"--min-cosine needs a float task output; '{task}' holds integers (ids or labels), whose "
                            "cosine passes whenever both are non-zero: gate it with --max-drop, or choose another "
                            "--output.")
        if self.options.max_drop is not None and measured.get("drop") is None:
            raise BadOption(f"--max-drop needs a task output with decisions (class scores, or embeddings); "
                            f"'{measured['task_output']}' is a {measured['kind']}: gate it with --min-cosine, or "
                            "choose another --output.")
        return measured


def gate_passed(measured: dict, options: Options) -> bool:
    drop_ok = options.max_drop is None or measured["drop"] <= options.max_drop + 1e-9
    cosine_ok = options.min_cosine is None or measured["cosine"] >= options.min_cosine - 1e-12
    return drop_ok and cosine_ok and _channel_passed(measured, options)


def _channel_passed(measured: dict, options: Options) -> bool:
    weakest = fidelity.judged_channel(measured) if options.min_cosine is not None else None
    return weakest is None or weakest["likeness"] >= fidelity.channel_floor(options.min_cosine) - 1e-12


def size_budget(loaded, options: Options, widths) -> allocate_stage.Budget | None:
    """--max-size in the bytes each width's container really takes in the written file."""
    if options.max_size is None:
        return None
    limit = options.max_size * loaded.size_bytes if options.max_size <= 1.0 else options.max_size
    rest = loaded.size_bytes - sum(loaded.input_bytes(layer) for layer in loaded.layers)  # not a layer's weight

    def costs(prefer: str) -> dict:
        return {layer.name: {b: layer.kind.container_bytes(layer, layer.kind.container(layer, b, STATIC, prefer))
                             for b in set(widths) | {FLOAT_BITS}} for layer in loaded.layers}

    def smallest(prefer: str) -> float:
        return rest + sum(min(table[b] for b in widths) for table in costs(prefer).values())

    if smallest(options.prefer) > limit:
        hint = (f"; --prefer size writes int4 containers and reaches {smallest('size'):,.0f}"
                if options.prefer == "speed" and smallest("size") < smallest("speed") else
                "; raise it or add narrower --bits")
        raise BadOption(f"--max-size {options.max_size:g} ({limit:,.0f} bytes) is below the smallest model "
                        f"--prefer {options.prefer} can write ({smallest(options.prefer):,.0f} bytes){hint}.")
    return allocate_stage.Budget(costs(options.prefer), limit - rest, f"--max-size {options.max_size:g}", limit,
                                 "bytes")


def latency_budget(loaded, analysis: Analysis, options: Options, widths, samples):
    """--max-latency R: the layers' batch-1 times (each layer timed alone in each mode, on this machine) plus
    the rest of the FP32 model must stay within R x the FP32 model's measured latency."""
    from .instrument import padded_batches
    from .latency import layer_seconds, width_seconds
    from .verify import time_models

    seconds = layer_seconds(loaded, analysis.stats.rows)
    if seconds is None:
        raise BadOption("--max-latency needs every layer's input shape (besides the batch) fixed in the model; "
                        "this one has symbolic sizes: use --max-size or --avg-bits.")
    feed, _ = next(padded_batches(samples, loaded, 1))
    fp32 = time_models([loaded.model_file()], feed)[0] / 1000.0
    layers_fp32 = sum(s[FLOAT] for s in seconds.values())
    rest = max(fp32 - layers_fp32, 0.0)
    # A layer timed alone carries a session run's own overhead: where the layers' float times add up to more than
    # the whole FP32 model's, each time is scaled to fit it. The orientation classifier's 33 layers summed to 3.39
    # ms against its 2.73, and --max-latency 1 was refused as unreachable while its --avg-bits 4 model ran at 0.97x.
    scale = fp32 / layers_fp32 if layers_fp32 > fp32 else 1.0
    folded = folds_weights(options)
    costs = {}
    for layer in loaded.layers:
        costs[layer.name] = {}
        for bits in set(widths) | {FLOAT_BITS}:
            mode = FLOAT if bits == FLOAT_BITS else analysis.modes[layer.name].mode
            container = layer.kind.container(layer, bits, mode, options.prefer)
            costs[layer.name][bits] = scale * width_seconds(layer, seconds[layer.name],
                                                            layer.kind.mode_for(container, mode), container, folded)
    return allocate_stage.Budget(costs, options.max_latency * fp32 - rest, f"--max-latency {options.max_latency:g}",
                                 unit="seconds")


def folds_weights(options: Options) -> bool:
    """Whether weight-only int8 weights are written to be folded into float ones at load (write.folds_at_load):
    FP32's speed for FP32's memory. With --prefer speed, and with a latency bound: the file is as small either
    way, and --prefer size with --max-latency 1 otherwise kept the orientation classifier's layers in float (the
    DequantizeLinear form ran at 2.9x FP32's time). --prefer size alone keeps the smaller DequantizeLinear form."""
    return options.prefer == "speed" or options.max_latency is not None


def plan_layers(loaded, analysis: Analysis, bits: dict, prefer: str) -> tuple[dict, dict]:
    """Each layer's final activation mode and weight container, from its width and the objective."""
    modes, containers = {}, {}
    for layer in loaded.layers:
        mode = FLOAT if bits[layer.name] == FLOAT_BITS else analysis.modes[layer.name].mode
        containers[layer.name] = layer.kind.container(layer, bits[layer.name], mode, prefer)
        modes[layer.name] = layer.kind.mode_for(containers[layer.name], mode)
    return modes, containers


def _open_calibration(calib, loaded, options: Options):
    """A path in any supported format, or an onnxruntime CalibrationDataReader (from Python)."""
    if isinstance(calib, (str, os.PathLike)):
        return open_samples(os.fspath(calib), loaded.inputs, options.preprocess, "calibration")
    from .data import from_data_reader

    return from_data_reader(calib, loaded.inputs)


def _check_runs_of_one(loaded, whole: frozenset) -> None:
    """An input given whole makes every run one sample: an input fixed at a batch over 1 beside it cannot be fed
    along its first axis then (4 of its samples a run would meet one of the other's)."""
    names = ", ".join(f"'{name}'" for name in sorted(whole))
    for spec in loaded.inputs:
        if spec.name not in whole and spec.batch_fixed and spec.shape[0] != 1:
            raise BadData(f"input '{spec.name}' takes a fixed batch of {spec.shape[0]}, while {names} is given whole, "
                          f"one run a sample: give '{spec.name}' whole too, an array {spec.whole_text}.")


def _held_out(calib, loaded, options: Options):
    """(calibration, held-out) samples: --eval, else every 5th calibration sample (not calibrated on)."""
    classes = _num_classes(loaded)
    if options.eval_path:
        evaluation = open_samples(options.eval_path, loaded.inputs, options.preprocess, "evaluation")
        if evaluation.whole:  # the calibration set gave them along their first axis, or they have one now
            raise BadData(f"evaluation data gives input '{sorted(evaluation.whole)[0]}' whole, [N, *its shape], and "
                          "the calibration data along its first axis: give both sets one way.")
        number_classes_like(evaluation, calib)
        check_labels(evaluation, classes, "evaluation")
    elif calib.count >= MIN_SPLIT or options.max_drop is not None or options.min_cosine is not None:
        calib, evaluation = split_holdout(calib, HOLDOUT_FRACTION,
                                          fidelity.carries_state(loaded.model_file(), loaded, calib))
    else:
        evaluation = calib  # too few to split; the report says these were calibrated on
    check_labels(calib, classes, "calibration")
    evaluation.keep_decoded()  # read for the FP32 reference, then for each candidate
    return calib, evaluation


def convert(model_path: str, output_path: str, calib, options: Options | None = None) -> Result:
    """Quantize model_path into output_path; calib is a sample path or a CalibrationDataReader."""
    options = options or Options()
    timer = _Timer()
    started = time.perf_counter()
    check_options(options)
    check_output_path(model_path, output_path)
    with timer.stage("load"):
        loaded = load_model(model_path, options.output)
        samples = _open_calibration(calib, loaded, options)
        if samples.whole:  # one sample a run: read again with the sample axes the samples lack (sample_axes)
            _check_runs_of_one(loaded, samples.whole)
            loaded = load_model(model_path, options.output, samples.whole)
            samples.respec(loaded.inputs)
        calib, evaluation = _held_out(samples, loaded, options)
        if loaded.judged_by_run and batch_of(loaded, options.batch_size) > 1:
            fixed = any(spec.batch_fixed for spec in loaded.inputs)
            raise BadOption(f"output '{loaded.output_name}' has the length {loaded.selected[loaded.output_name]} "
                            "decides, and is compared a run of one sample at a time: "
                            + ("re-export the model with batch 1." if fixed else "run with --batch-size 1."))
    params = {layer.name: layer.params for layer in loaded.layers}
    fixed = loaded.fixed_weights
    widths = candidate_widths(options)
    budgets = [b for b in (size_budget(loaded, options, widths),) if b is not None]
    if options.avg_bits is not None:
        lowest = allocate_stage.average_bits({name: min(options.bits) for name in params}, params, fixed)
        if lowest > options.avg_bits + 1e-9:
            names = sorted({s["node"] for s in loaded.skipped + loaded.prequantized if s.get("weight")})
            counted = ", ".join(f"{count:,} at {width} bits" for width, count in sorted(fixed.items(), reverse=True))
            raise BadOption(f"--avg-bits {options.avg_bits:g} cannot be met: the parameters no allocation changes "
                            f"({counted}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}, left in float "
                            f"or quantized in the input) make the lowest reachable average {lowest:.2f}; raise "
                            "--avg-bits.")
        budgets.append(allocate_stage.bits_budget(params, widths, options.avg_bits, fixed))
    # ORT's quantizer holds copies of the model while it writes its int8 yardstick: written beside the error tables
    # (waited for before the first candidate, so its peak never meets a write's), mostly Python on one core, it takes
    # the time the tables' two workers leave (MiniLM-L6: 0.25 s of its own, 0.1 s more for the tables).
    workspace = TemporaryFolder("msq-")
    yardstick = []  # its thread, then the thread building its timed session

    def build_yardstick(stats, modes):
        yardstick.append(_ResultThread(lambda: _yardstick(modes, stats.ranges, loaded, workspace.name)))
        peak, _ = _peak_and_resident()
        if peak is None or 2 * _dense_bytes(loaded) > YARDSTICK_BESIDE_THE_TABLES * peak:
            with timer.stage("latency"):  # alone, as before the tables: its copies on top of theirs would be the peak
                yardstick[0].join()

    def prepare_yardstick():  # its timed session, built beside the first write (one core busy there), if small
        if len(yardstick) == 1:
            written = yardstick[0].result()
            peak, _ = _peak_and_resident()
            if written.path is not None and peak is not None and \
                    3 * os.path.getsize(written.path) <= YARDSTICK_BESIDE_THE_WRITE * peak:
                yardstick.append(_ResultThread(written.prepared))

    def stop_yardstick():  # before its folder goes: its writing ends first
        for thread in yardstick:
            thread.discard()

    try:
        analysis = analyse(loaded, calib, options, timer, build_yardstick,
                           allocate_stage.reachable_widths(budgets, options.bits))
        activation_errors, wide_inputs, caps = analysis.activation_errors, analysis.wide_inputs, analysis.caps
        with timer.stage("allocate"):
            every_width = _damage(loaded, calib, analysis, options, caps)
            damage = without_float_on_kernels(every_width, loaded, analysis, options)
    except BaseException:
        stop_yardstick()
        raise
    with workspace as work_dir, ExitStack() as stack:
        stack.callback(stop_yardstick)
        searching = (options.max_drop is not None or options.min_cosine is not None) and options.avg_bits is None \
            and options.max_size is None
        # one candidate written, then timed: its sessions and the FP32 one serve the timing, held past no other write
        single = not searching and options.max_size is None and options.max_latency is None
        first = None  # the one allocation of a single candidate, made before the memory is read below
        if single:
            with timer.stage("allocate"):
                first = allocate_stage.allocate(options.allocator, analysis.importance, damage, widths, budgets)
                if _may_reallocate(options):
                    _set_aside_other_widths(analysis.choices, first, work_dir)
                else:
                    _release_other_widths(analysis.choices, first)
        with timer.stage("verify"):  # the FP32 outputs every candidate is compared with
            # the yardstick written first: the memory read below is not its, and --max-latency times nothing beside it
            yardstick[0].join()
            fits = _fits_beside_the_write(loaded)
            background = fits and options.max_latency is None
            held_out = _HeldOut(loaded, evaluation, options, analysis.stats.workers, background=background,
                                keep_session=fits or single, keep=single)
            stack.callback(held_out.close)
            held_out.start()
        if options.max_latency is not None:
            with timer.stage("latency"):
                budgets.append(latency_budget(loaded, analysis, options, widths, evaluation))

        built = {}  # allocation -> its candidate: the gate's search meets one allocation at several budgets

        def build(budgets: list, beyond_widest: bool = False, bits: dict | None = None,
                  tables: dict | None = None) -> Candidate:
            """tables: the damage to allocate on, where not the allocator's (a reallocation's)."""
            with timer.stage("allocate"):
                if bits is None:
                    bits = allocate_stage.allocate(
                        options.allocator if tables is None else "ilp", analysis.importance,
                        tables if tables is not None else every_width if beyond_widest else damage, widths, budgets,
                        beyond_widest)
                allocation = tuple(bits.items())
                if allocation in built:
                    return built[allocation]
                modes, containers = plan_layers(loaded, analysis, bits, options.prefer)
            with timer.stage("write"):
                if single and not background:  # beside the reference's runs it would only add to the write's peak
                    prepare_yardstick()
                folder = tempfile.mkdtemp(dir=work_dir)
                quantized = quantize_weights(loaded, bits, analysis.choices, analysis.stats.input_mean,
                                             options.bias_correction, rewritten={
                                                 name for name, mode in modes.items() if mode in (DYNAMIC, WEIGHT_ONLY)})
                path = quantize_to_qdq(loaded, quantized, analysis.stats.ranges, folder, wide_inputs, modes,
                                       containers, folds_weights(options))
                del quantized  # the model copy it held (rewritten in place), not through the measurement below
            with timer.stage("verify"):
                built[allocation] = Candidate(bits, allocate_stage.average_bits(bits, params, fixed), path,
                                              held_out.measure(path), modes, containers,
                                              written_bytes(path, loaded.sample_axes))
                return built[allocation]

        search = reallocation = None
        if searching:
            narrowest, widest, floated = search_reach(every_width, params, fixed)
            chosen, search = search_budget(
                lambda avg, beyond=False: build(budgets + [allocate_stage.bits_budget(params, widths, avg, fixed)],
                                                beyond), options,
                (narrowest, widest, widest if options.allocator in allocate_stage.GREEDY else floated))
        else:
            def within_budgets(chosen: Candidate, build) -> Candidate:
                chosen = _meet_size(chosen, budgets, build, options.prefer)
                if options.max_latency is not None:
                    with timer.stage("latency"):
                        chosen = _meet_latency(loaded, chosen, budgets, build, evaluation)
                return chosen

            chosen = within_budgets(build(budgets, bits=first), build)
            collapsed = _reallocates(chosen, options, damage)
            if collapsed:
                chosen, reallocation = _reallocate(loaded, calib, analysis, options, caps, chosen, collapsed, timer,
                                                   budgets, lambda tables: within_budgets(
                                                       build(budgets, tables=tables),
                                                       lambda limits: build(limits, tables=tables)))
        if evaluation is calib:
            with timer.stage("verify"):
                smoke_check(chosen.path, loaded, calib, options.batch_size)
        # gzip -9 (0.6 s on EfficientNet-Lite0) runs on the core the single-threaded latency timing leaves
        # idle (on one core, after it), on the bytes publish copies as they are (a model past 2 GB is split, and
        # measured after); every core once the timing is done
        cores = usable_cores()
        with GzipSize([] if is_large(loaded.model) else [chosen.path], cores, int(cores > 1)) as packed:
            with timer.stage("latency"):
                latency, op_counts = measure_latency(loaded, chosen, evaluation, yardstick[-1].result(), work_dir,
                                                     held_out.reference.single_thread_session,
                                                     held_out.kept_session(chosen.path))
                held_out.release_sessions()  # not held through the publishing, gzip and the report
            packed.widen()
            with timer.stage("write"):
                as_is = publish(chosen.path, output_path, loaded.sample_axes)
            with timer.stage("gzip"):  # past the latency timing (BERT-base's 100 MB: 4.5 s more on one thread)
                if packed.paths and as_is:
                    gzip_bytes = packed.result()
                else:
                    packed.cancel()
                    gzip_bytes = gzip_size(written_files(output_path))
    from .report import build_report

    warnings = _warnings(loaded, chosen, analysis, options, evaluation is calib, budgets, latency, op_counts,
                         uint16_readers(loaded, analysis.modes, wide_inputs), output_path, search)
    if reallocation and reallocation["kept"] == "first":
        figure = reallocation["weakest_figure"]
        warnings.append("allocating again on each layer's measured effect on the outputs (output-weighted) " + (
            f"brought the model no nearer FP32 on {reallocation['calibration_samples']} calibration samples (weakest "
            f"figure {figure['first']:.3f} first, {figure['reallocated']:.3f} again)" if figure else
            f"gave no model to write instead ({reallocation['refused']})" if "refused" in reallocation else
            "gave the same allocation") + ": the first allocation is written")
    report = build_report(model_path, output_path, loaded, options, chosen, params, analysis, op_counts,
                          fused_integer_kernels(op_counts), timer.seconds, time.perf_counter() - started,
                          activation_errors=activation_errors, residual=residual_weights(analysis, options),
                          search=search, reallocation=reallocation, warnings=warnings, fixed_params=fixed,
                          latency=latency, gzip_bytes=gzip_bytes,
                          reduce_range={"setting": options.reduce_range, "capped_layers": sorted(caps),
                                        "saturating_kernels": integer_kernels_saturate()})
    gate = report.get("gate")
    return Result(report=report, gate_passed=None if gate is None else gate["passed"])


def _release_other_widths(choices: dict, bits: dict) -> None:
    """Keep each layer's table at its allocated width only, where no other allocation will be written (one
    candidate): the other widths' GPTQ integers are let go before the write (MiniLM-L6: 33 of their 41 MB)."""
    for name, table in choices.items():
        choices[name] = {width: choice for width, choice in table.items() if width == bits.get(name)}


def _set_aside_other_widths(choices: dict, bits: dict, folder: str) -> None:
    """_release_other_widths where a reallocation may need them back: the other widths' GPTQ integers go to
    files in `folder`, read back from there (memory-mapped) only if an allocation takes them."""
    aside = (choice for name, table in choices.items() for width, choice in table.items()
             if width != bits.get(name) and choice.integers is not None and choice.integers.size)
    for number, choice in enumerate(aside):
        path = os.path.join(folder, f"set-aside-{number}.npy")
        np.save(path, choice.integers)
        choice.integers = np.load(path, mmap_mode="r")


def _may_reallocate(options: Options) -> bool:
    """Whether a collapsed allocation is made again (--on-collapse reallocate): the default allocator's only,
    under a width budget (an accuracy gate's search has its own way out: float)."""
    return options.on_collapse == "reallocate" and options.allocator == "ilp" and (
        options.avg_bits is not None or options.max_size is not None or options.max_latency is not None)


def _reallocates(chosen: Candidate, options: Options, damage: dict) -> str | None:
    """The collapse a reallocation answers: what the check says of the written model, where it may, and where
    widths could move: not where the budget left every layer at its widest (damage: the tables allocated on), nor
    where every output named is off for its output grid alone, which no width moves, nor where only an output's
    variation is (fidelity.weakest_figure, which the two allocations are compared by, leaves it out)."""
    if not _may_reallocate(options) or not chosen.measured:
        return None
    if all(chosen.bits[name] >= allocate_stage.widest_width(table) for name, table in damage.items()):
        return None
    # the probe measures float outputs only: a model that gives labels alone (an ArgMax) leaves it blind
    if all(out.get("integer") for out in chosen.measured.get("outputs", {}).values()):
        return None
    gated = _gated(options)
    collapsed = fidelity.collapse_warning(chosen.measured, gated)
    if collapsed is None or fidelity.GRID_ADVICE in collapsed:
        return None
    # a collapse the comparison cannot see (an output's variation alone) would keep the first after a second try
    return collapsed if fidelity.weakest_figure(chosen.measured, gated) < fidelity.COLLAPSE_COSINE else None


def _gated(options: Options) -> frozenset:
    """What an accuracy gate judges of the task output (fidelity.collapse_warning's `gated`)."""
    return frozenset(name for name, bound in (("cosine", options.min_cosine), ("drop", options.max_drop))
                     if bound is not None)


REALLOCATION_JUDGED = 128  # calibration samples the two allocations are compared on


def _reallocate(loaded, calib, analysis: Analysis, options: Options, caps: dict, first: Candidate, collapsed: str,
                timer: "_Timer", budgets: list, build) -> tuple[Candidate, dict]:
    """Where the default allocation's written model collapsed on the held-out samples, allocate again with each
    layer's error weighed by what it alone does to every output (output-weighted: what the check judges, where
    the default's layer errors and importance cannot see a state fed back or a detector's class row), and keep
    the second only where its weakest figure (fidelity.weakest_figure) on the first calibration samples is higher
    than the first's by more than one sample's share: the held-out ones only said there was something to do, and
    stay for judging what is kept. No second allocation within the budgets, or a second file over --max-size
    where the first's is not, leaves the first (`refused`). build(tables) writes and measures an allocation within
    the budgets."""
    started = time.perf_counter()
    with timer.stage("reallocate"):
        tables = without_float_on_kernels(_damage(loaded, calib, analysis, options, caps, "output-weighted"),
                                          loaded, analysis, options)
    figures, refused = {}, None
    judged = first_samples(calib, REALLOCATION_JUDGED)
    try:
        again = build(tables)
    except BadOption as error:  # no second allocation within the budgets: the first stands
        again, refused = first, one_line(error)
    size = next((b.total for b in budgets if b.total is not None), None)
    if size is not None and again.file_bytes > size >= first.file_bytes:
        refused = f"the second allocation's file ({again.file_bytes:,} bytes) is over --max-size; the first's is not"
    if again is not first and refused is None:  # the same allocation again: nothing to choose
        with timer.stage("reallocate"):
            judge = _HeldOut(loaded, judged, options, analysis.stats.workers)
            for name, candidate in (("first", first), ("reallocated", again)):
                figures[name] = round(fidelity.weakest_figure(judge.measure(candidate.path), _gated(options)), 6)
            judge.close()
    # nearer by more than one calibration sample's decision: a tie keeps the default's allocation (YOLOv8n at 3.5
    # bits: its weakest class channel 0.4605 first, 0.4619 again on the calibration images; 0.674 and 0.512 held out)
    better = bool(figures) and figures["reallocated"] > figures["first"] + 1.0 / judged.count
    record = {
        "allocator": "output-weighted",
        "because": collapsed,
        "calibration_samples": judged.count,
        "weakest_figure": figures,
        "avg_bits": {"first": round(first.avg_bits, 4), "reallocated": round(again.avg_bits, 4)},
        "kept": "reallocated" if better else "first",
        "seconds": round(time.perf_counter() - started, 3),
    }
    if refused:
        record["refused"] = refused
    return again if better else first, record


SIZE_RETRIES = 3


def _meet_size(chosen: Candidate, budgets: list, build, prefer: str) -> Candidate:
    """The written file must meet --max-size, not just its weights: what the allocator does not see (Q/DQ
    nodes, zero points, names) comes off the weights' allowance and the allocation is made again."""
    size = next((b for b in budgets if b.total is not None), None)
    for _ in range(SIZE_RETRIES):
        if size is None or chosen.file_bytes <= size.total:
            break
        used = sum(size.costs[name][bits] for name, bits in chosen.bits.items())
        lowest = sum(min(table.values()) for table in size.costs.values())
        if used <= lowest:
            hint = ("; --prefer size writes int4/int2 containers" if prefer == "speed" else
                    "; raise it or add narrower --bits")
            raise BadOption(f"{size.name} cannot be met: the smallest model --prefer {prefer} writes is "
                            f"{chosen.file_bytes:,} bytes (written and measured){hint}.")
        limit = max(used - (chosen.file_bytes - size.total), lowest)
        size = allocate_stage.Budget(size.costs, limit, size.name, size.total, size.unit)
        budgets = [size if b.total is not None else b for b in budgets]
        chosen = build(budgets)
    return chosen


LATENCY_RETRIES = 2


def _meet_latency(loaded, chosen: Candidate, budgets: list, build, samples) -> Candidate:
    """Layers timed alone miss what joins them (Q/DQ at the borders of a static region, layout changes): the
    written model is timed against FP32 and, while it is over, the layers' allowance shrinks by the overshoot."""
    from .instrument import padded_batches
    from .verify import time_models

    bound = next(b for b in budgets if b.name.startswith("--max-latency"))
    ratio = float(bound.name.split()[-1])
    feed, _ = next(padded_batches(samples, loaded, 1))
    for _ in range(LATENCY_RETRIES):
        fp32, output = time_models([loaded.model_file(), chosen.path], feed)
        if output <= ratio * fp32:
            break
        tighter = allocate_stage.Budget(bound.costs, bound.limit * ratio * fp32 / output, bound.name, unit=bound.unit)
        budgets = [tighter if b is bound else b for b in budgets]
        bound = tighter
        try:
            chosen = build(budgets)
        except BadOption:
            break  # no allocation is that fast: the warning says the bound was not met
    return chosen


def candidate_widths(options: Options) -> tuple:
    """The integer widths, plus float for the knapsack allocators (the greedy rule only moves between widths)."""
    return tuple(options.bits) + ((FLOAT_BITS,) if options.allocator not in allocate_stage.GREEDY else ())


def written_bytes(path: str, axes: dict | None = None) -> int:
    """The model file and its external data; with `axes` (LoadedModel.sample_axes), the file as published."""
    files = written_files(path)
    return sum(os.path.getsize(name) for name in files[1:]) + (
        sample_axes.stripped_size(path, axes) if axes else os.path.getsize(path))


def _yardstick(modes: dict, ranges: dict, loaded, work_dir: str):
    """ORT's own uniform int8 model of the FP32 model (verify.Yardstick): quantize_static with our ranges when
    most layers measured static (`modes`: layer -> ModeChoice), quantize_dynamic otherwise.

    Its embedding lookups stay float, ours and those left out of the allocation (a table tied to a MatMul, rows no
    block size divides): their int8 tables change the file's bytes, not the kernels timed (a Gather, then a
    DequantizeLinear of the rows it took), and quantizing them was most of the writing: MiniLM-L6's yardstick ran
    3.76 / 3.69 ms with / without (FP32 9.6), written in 0.55-0.75 / 0.34 s."""
    from .verify import reference_int8

    measured = [choice.mode for choice in modes.values()]
    static = sum(1 for m in measured if m == STATIC) * 2 >= len(measured)
    lookups = tuple(node for layer in loaded.layers if layer.kind.read_where_gathered for node in layer.nodes) + tuple(
        entry["node"] for entry in loaded.skipped if getattr(REGISTRY.get(entry["op_type"]), "read_where_gathered", False))
    _return_freed_memory()  # the modes' sessions: ORT's quantizer starts from the lowest base
    reference = reference_int8(loaded.model_file(), work_dir, static, ranges, float_nodes=lookups, stand_ins=True)
    _return_freed_memory()
    return reference


def measure_latency(loaded, chosen: Candidate, samples, yardstick, work_dir: str,
                    fp32_session=None, chosen_session=None) -> tuple[dict, Counter]:
    """Latency of FP32, the written model and ORT's own int8 model (`yardstick`: a verify.Yardstick) on one
    held-out sample (batch 1, or the model's fixed batch); and the op
    types of the written model's graph as ORT optimized it for its timed session (no session of its own for
    the kernel count). fp32_session: an FP32 session on one intra-op thread already built (fidelity.Reference's);
    chosen_session: the written model's, and the path of its optimized graph (_HeldOut.kept_session). Built
    sessions save the timing their builds (MiniLM-L6: 0.2 s, one core)."""
    from .instrument import padded_batches
    from .verify import op_counts, single_thread_session, time_sessions

    feed, _ = next(padded_batches(samples, loaded, 1))
    fp32 = loaded.model_file()
    reference, kind, failed = yardstick.path, yardstick.kind, yardstick.failed
    optimized = os.path.join(tempfile.mkdtemp(dir=work_dir), "optimized.onnx") if chosen_session is None else \
        chosen_session[1]
    # ORT builds a session without the GIL: the three at once on two cores (MiniLM-L6's two FP32 ones: 0.50 -> 0.33 s)
    with ThreadPoolExecutor(max_workers=max(1, min(3, usable_cores()))) as builders:
        built = [builders.submit(single_thread_session, fp32) if fp32_session is None else _done(fp32_session),
                 builders.submit(single_thread_session, chosen.path, optimized_path=optimized)
                 if chosen_session is None else _done(chosen_session[0])]
        if reference is not None:
            built.append(builders.submit(yardstick.session))
        sessions = [future.result() for future in built[:2]]
        if reference is not None:
            try:  # the yardstick is optional: a model ORT's quantizer writes but cannot run is left out, and said
                timed = built[2].result()
                timed.run(None, feed)  # the session it is timed with, checked first: one build, not two
                sessions.append(timed)
            except Exception as exc:
                reference, failed = None, f"fails: {one_line(exc)}"[:300]
    times = time_sessions(sessions, feed)
    result = {"fp32": times[0], "output": times[1], "input_shapes": {k: list(v.shape) for k, v in feed.items()},
              "threads": 1, "batch": len(next(iter(feed.values())))}
    if reference:
        result[f"ort_{kind}_int8"] = times[2]
    elif failed:
        result[f"ort_{kind}_int8_failed"] = f"ONNX Runtime's own {kind} int8 model of this FP32 model {failed}"
    return result, op_counts(optimized)


def _done(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


SLOWER_THAN_FP32 = 1.1  # beyond the drift between this machine's interleaved timings (a few percent) ...
SLOWER_BY_MS = 0.1  # ... and beyond a run's own overhead: a 0.02 ms toy model's ratio is the session's, not the model's


def _slower_than_fp32(chosen: Candidate, measured: dict, options: Options, layers) -> str:
    counts = {mode: list(chosen.modes.values()).count(mode) for mode in sorted(set(chosen.modes.values()))}
    yardstick = next((f"; ONNX Runtime's own int8 model {value:.3g} ms" for key, value in measured.items()
                      if key.startswith("ort_") and isinstance(value, (int, float))), "")
    could_be_static = [layer for layer in layers if chosen.modes.get(layer.name) in (WEIGHT_ONLY, FLOAT)
                       and STATIC in layer.kind.modes]  # dynamic layers already run integer kernels
    if options.prefer == "size":
        why = ("--prefer size stores weights in the narrowest containers ORT runs, some slower than int8 (int4 Conv "
               "weights run as float convolutions, on float copies made at every run that the process holds while "
               "it runs): --prefer speed keeps int8 on the fused integer kernels")
    elif could_be_static and options.activations == "auto":
        why = (f"{len(could_be_static)} layer(s) that could run static pay for Q/DQ conversions instead: "
               "--activations static puts them on the fused integer kernels (check the fidelity it then reports)")
    else:
        why = ("the Q/DQ pairs around the float ops between its layers cost more than the integer kernels save on "
               "this model at this batch size")
        if STATIC in chosen.modes.values() and options.activations != WEIGHT_ONLY:
            # measured: PP-OCR's direction classifier, 54 static layers, 1.76x FP32's time; weight-only 0.93x
            # (its Conv weights folded at load), task cosine 0.989 -> 0.994, the file 314 -> 220 KB
            why += ("; --activations weight-only keeps the quantized weights without those pairs (float "
                    "activations, a Conv's int8 weight folded into a float one when ORT loads the model)")
    return (f"the written model runs {measured['output'] / measured['fp32']:.2f}x slower than FP32 at batch "
            f"{measured.get('batch', 1)} on this machine ({measured['output']:.3g} vs {measured['fp32']:.3g} ms"
            f"{yardstick}; layers: {', '.join(f'{count} {mode}' for mode, count in counts.items())}): {why}")


def _unfused(loaded, chosen: Candidate, op_counts) -> str | None:
    """Layers written with integer activations that ORT's optimized graph does not run on an integer kernel (a
    bias it could not quantize, a pattern its fusions miss): they run in float between Q/DQ pairs, and the
    report's modes would otherwise claim what the runtime does not do."""
    nodes = sum(len(layer.nodes) for layer in loaded.layers if chosen.modes.get(layer.name) in (STATIC, DYNAMIC))
    fused = fused_integer_kernels(op_counts, INTEGER_ACTIVATION_OPS) if op_counts is not None else nodes
    if fused >= nodes:
        return None
    return (f"{nodes - fused} of {nodes} layer node(s) written with quantized activations run in float in ONNX "
            f"Runtime's optimized graph ({fused} integer kernels): their Q/DQ pairs cost time and save nothing")


def _warnings(loaded, chosen: Candidate, analysis: Analysis, options: Options, not_held_out: bool,
              budgets: list, measured_latency: dict | None = None, op_counts=None,
              float_kernels=frozenset(), written: str | None = None, search: list | None = None) -> list[str]:
    """What the tool cannot stand behind, said in one line each. written: the published model; search: the gate's
    budget search log."""
    warnings = [w for w in (_unfused(loaded, chosen, op_counts),) if w]
    latency = chosen_latency = None
    if options.max_latency is not None and measured_latency:
        latency, chosen_latency = options.max_latency, measured_latency["output"] / measured_latency["fp32"]
    if latency is not None and chosen_latency > latency:
        warnings.append(f"measured latency is {chosen_latency:.2f}x FP32's, over --max-latency {latency:g}: the "
                        "bound was met on the layers' separate timings only (this machine's timings drift)")
    elif latency is None and measured_latency and measured_latency["output"] > max(
            SLOWER_THAN_FP32 * measured_latency["fp32"], measured_latency["fp32"] + SLOWER_BY_MS):
        warnings.append(_slower_than_fp32(chosen, measured_latency, options, loaded.layers))
    size = next((b for b in budgets if b.total is not None), None)
    if size is not None and chosen.file_bytes > size.total:
        warnings.append(f"the written model is {chosen.file_bytes:,} bytes, over --max-size ({size.total:,.0f}): "
                        "the budget is met by the weights only, not by the file")
    collapsed = chosen.measured and fidelity.collapse_warning(chosen.measured, _gated(options))
    if collapsed:
        warnings.append(collapsed)
    carried = chosen.measured and chosen.measured.get("states_fed_as_given")
    if carried:
        pairs = ", ".join(f"'{name}' (output '{output}' of the sample before)" for name, output in carried.items())
        batch = batch_of(loaded, options.batch_size)
        if batch == 1:
            why, remedy = ("found no sample that continues the one before in all of them",
                           "give --eval samples in the order they were recorded")
        elif any(spec.batch_fixed for spec in loaded.inputs):
            why = "ran several samples a run"
            remedy = f"export the model with a batch of 1 (its batch is fixed at {batch})"
        else:
            why, remedy = "ran several samples a run", "run with --batch-size 1"
        warnings.append(f"input(s) {pairs} carry a state from sample to sample, and the held-out check {why}, so it "
                        "fed them as recorded (FP32's states): an error that grows as the written model carries its "
                        f"own is not measured; {remedy} to check it streamed")
    floated = [name for name, bits in chosen.bits.items() if bits == FLOAT_BITS]
    if floated:
        share = sum(layer.params for layer in loaded.layers if layer.name in floated) / max(
            sum(layer.params for layer in loaded.layers), 1)
        # past the widest widths, only what the gate asked for put them there; narrower --bits may be why
        why = ("; the accuracy gate was met only so" + ("" if max(options.bits) >= 8 else
                                                         ", and wider --bits may meet it with integers")
               if any(probe.get("float_fallback") for probe in (search or [])) else "")
        warnings.append(f"{len(floated)} layer(s) kept in float by the allocator (counted at 32 bits, "
                        f"{share:.0%} of the weights): {', '.join(floated[:5])}{' ...' if len(floated) > 5 else ''}"
                        f"{why}")
    in_bodies = [layer for layer in loaded.layers if layer.in_body and chosen.bits[layer.name] != FLOAT_BITS]
    if in_bodies:
        owners = list(dict.fromkeys(layer.in_body for layer in in_bodies))
        warnings.append(f"{len(in_bodies)} layer(s) inside the bodies of {', '.join(owners[:3])}"
                        f"{' ...' if len(owners) > 3 else ''} were quantized on their weights alone (no tensor of a "
                        "body can be measured): the held-out comparison checks only the branches and iterations "
                        "its samples run")
        taken = getattr(analysis.stats, "branches", None) or {}

        def unrun_branch(branch: tuple) -> bool:  # () or a condition never read: it may run
            return bool(branch) and bool(taken.get(branch[0])) and (branch[1] == "then_branch") not in taken[branch[0]]

        unrun: dict = {}  # (If node, branch attribute) -> the layers none of whose nodes any sample runs
        for layer in in_bodies:
            if layer.branches and all(map(unrun_branch, layer.branches)):
                unrun.setdefault(layer.branches[0], []).append(layer)
        warnings.extend(f"no calibration sample takes the {attribute} of If '{node}': its {len(layers)} layer(s) "
                        f"({sum(layer.params for layer in layers):,} weights) are quantized, counted in the budget, "
                        "and never run by any check" for (node, attribute), layers in unrun.items())
    if loaded.skipped:
        reasons = {s["node"]: s["reason"] for s in loaded.skipped}
        names = [f"{node} ({reason})" for node, reason in list(reasons.items())[:3]]
        warnings.append(f"{len(reasons)} weighted node(s) left in float: {'; '.join(names)}"
                        f"{' ...' if len(reasons) > 3 else ''}")
    wide = [n for n, b in chosen.bits.items() if b != FLOAT_BITS and b > SATURATION_FREE_BITS
            and chosen.modes[n] in (STATIC, DYNAMIC) and n not in float_kernels]
    if wide and (integer_kernels_saturate() or options.reduce_range == "on"):
        where = "this machine's" if integer_kernels_saturate() else "the target's (--reduce-range on)"
        remedy = " and ".join(([] if options.reduce_range != "off" else ["--reduce-range auto or on"])
                              + ([] if SATURATION_FREE_BITS in options.bits else [f"{SATURATION_FREE_BITS} among --bits"]))
        remedy = f"{remedy} would write them in {SATURATION_FREE_BITS} bits"
        warnings.append(f"{len(wide)} layer(s) run 8-bit weights on {where} u8s8 integer kernels, which saturate (AVX2 "
                        f"or AVX512 without VNNI): their accuracy there is below what a VNNI machine gets; {remedy}")
    if loaded.prequantized:
        nodes = list(dict.fromkeys(entry["node"] for entry in loaded.prequantized))
        widths = sorted({entry["bits"] for entry in loaded.prequantized})
        warnings.append(f"{len(nodes)} node(s) were quantized in the input already and are kept as they are, counted "
                        f"at their stored {'/'.join(map(str, widths))} bits: {', '.join(nodes[:5])}"
                        f"{' ...' if len(nodes) > 5 else ''}")
    if loaded.default_inputs and written:
        listed = {value.name for value in onnx.load(written, load_external_data=False).graph.input}
        lost = [value.name for value in loaded.default_inputs if value.name not in listed]
        if lost:
            warnings.append(f"{len(lost)} input(s) with a default initializer the caller could feed instead are weights "
                            f"written quantized or folded now, and can no longer be fed: {', '.join(lost[:5])}"
                            f"{' ...' if len(lost) > 5 else ''}")
    if not_held_out:
        warnings.append(f"only {chosen.measured['samples']} calibration samples and no --eval: fidelity was measured "
                        "on the samples calibrated on")
    elif chosen.measured and chosen.measured["samples"] < FEW_HELD_OUT:
        count = chosen.measured["samples"]
        warnings.append(f"fidelity was measured on {count} held-out samples only, where one sample moves agreement "
                        f"and top-1 by {100 / count:.1f} points: pass --eval with more samples to rely on it")
    return warnings


def _damage(loaded, calib, analysis: Analysis, options: Options, caps: dict, allocator: str | None = None) -> dict:
    """Per layer and width, the damage the allocator (options.allocator unless given) minimises; float costs none
    (and 32 bits). caps: layer -> its widest width (saturation_caps)."""
    allocator = allocator or options.allocator
    activation = {name: choice.errors.get(choice.mode, 0.0) for name, choice in analysis.modes.items()}
    if allocator == "output-weighted":
        from . import sensitivity

        weights, _ = sensitivity.OutputProbe(loaded, calib).layer_weights(
            analysis.choices, analysis.stats.input_mean, options.bias_correction, options.quiet)
        damage = allocate_stage.expected_damage(weights, analysis.choices, 1.0, activation)
    elif allocator == "sensitivity":
        from . import sensitivity

        measured, _ = sensitivity.measure(loaded, calib, analysis.choices, analysis.stats.input_mean, options.bits,
                                          bias_correction=options.bias_correction, quiet=options.quiet)
        damage = sensitivity.monotone(measured)
    elif allocator == "msq-task":
        from . import sensitivity

        weights, _ = sensitivity.task_weights(loaded, calib, analysis.choices, analysis.stats.input_mean,
                                              analysis.stats.outputs, analysis.labels.values, min(options.bits),
                                              options.max_dim, options.seed, bias_correction=options.bias_correction,
                                              quiet=options.quiet)
        # exponent 1: the measured weight itself (scaled by its mean, which moves no allocation)
        damage = allocate_stage.expected_damage(weights, analysis.choices, 1.0, activation)
    else:
        damage = allocate_stage.expected_damage(analysis.importance, analysis.choices, options.importance_exponent,
                                                activation, residual_weights(analysis, options))
    # A layer whose activations only float keeps faithful (the end-to-end check) has float as its one width.
    return {name: {FLOAT_BITS: 0.0} if analysis.modes[name].mode == FLOAT else
            {**{b: d for b, d in table.items() if b <= caps.get(name, b)}, FLOAT_BITS: 0.0}
            for name, table in damage.items()}


def without_float_on_kernels(damage: dict, loaded, analysis: Analysis, options: Options) -> dict:
    """The damage tables the allocator reads: with --prefer speed and neither a latency nor a size bound, a layer the
    modes put on a fused integer kernel (static, dynamic) keeps an integer width. Float's zero error there took it
    off that kernel for nothing a user sees (EfficientNet-Lite0 at 4 bits: two 8-bit-error-5e-5 layers on its
    largest maps, cosine 0.9622 against 0.9618, batch-1 latency 3.46 against 3.20 ms on an AVX512-VNNI machine, where
    ORT's own int8 model takes 3.17). Under --max-size float stays where it is the smallest container (a one-input
    layer's float weight is smaller than its int8 one and its scales: a review's), and so it does for a layer a
    uint16 input (--act16) puts on a float kernel anyway. An accuracy gate's search reads the full tables only past
    the widest widths (search_budget's float fallback)."""
    if options.prefer != "speed" or options.max_latency is not None:
        return damage
    on_float_kernels = uint16_readers(loaded, analysis.modes, analysis.wide_inputs)
    kept = {layer.name for layer in loaded.layers if analysis.modes[layer.name].mode in (STATIC, DYNAMIC)
            and layer.name not in on_float_kernels
            and not (options.max_size is not None and _float_is_smallest(layer, analysis, options))}
    return {name: {b: d for b, d in table.items() if not (name in kept and b == FLOAT_BITS)}
            for name, table in damage.items()}


def _float_is_smallest(layer, analysis: Analysis, options: Options) -> bool:
    """Whether the layer's float weight takes no more bytes than its narrowest integer container."""
    mode = analysis.modes[layer.name].mode
    narrowest = min(layer.kind.container_bytes(layer, layer.kind.container(layer, bits, mode, options.prefer))
                    for bits in options.bits)
    return layer.kind.container_bytes(layer, FLOAT_CONTAINER) <= narrowest


def residual_weights(analysis: Analysis, options: Options) -> dict:
    """layer -> what the ilp knapsack weighs its error by besides importance (allocate.residual_weights); none
    with --no-residual-weights or another allocator."""
    if options.allocator != "ilp" or not options.residual_weights:
        return {}
    return allocate_stage.residual_weights(analysis.stats.residual_share)


def saturates(options: Options) -> bool:
    return options.reduce_range == "on" or (options.reduce_range == "auto" and integer_kernels_saturate())


def uint16_readers(loaded, modes: dict, wide_inputs) -> set:
    """The layers a uint16 input (--act16) puts on a float kernel (write.uint16_kernels: its readers and its
    producer). modes: layer -> modes.ModeChoice. A dynamic reader of the same tensor quantizes it itself, to
    uint8 for a u8s8 kernel."""
    static = [layer for layer in loaded.layers if modes[layer.name].mode == STATIC]
    return uint16_kernels(static, wide_inputs, loaded.model)


def saturation_caps(loaded, modes: dict, options: Options, wide_inputs=frozenset()) -> dict:
    """layer -> its widest width, for the layers an integer kernel runs at their wider widths where those kernels
    saturate (`saturates`): ONNX Runtime's reduce_range, per layer. A layer that weight-only or float runs keeps
    every width, and so does one reading a uint16 input (wide_inputs, --act16: a float kernel runs it); without 7
    among --bits nothing is capped (and a warning says so)."""
    if not saturates(options) or SATURATION_FREE_BITS not in options.bits:
        return {}  # without 7 among --bits a cap would drop a layer to 4 or 2 bits: the warning says to add it
    float_kernels = uint16_readers(loaded, modes, wide_inputs)
    wider = [b for b in options.bits if b > SATURATION_FREE_BITS]
    caps = {}
    for layer in loaded.layers:
        if layer.name in float_kernels:
            continue
        mode = modes[layer.name].mode
        if mode != FLOAT and any(layer.kind.mode_for(layer.kind.container(layer, b, mode, options.prefer), mode)
                                 in (STATIC, DYNAMIC) for b in wider):
            caps[layer.name] = SATURATION_FREE_BITS
    return caps


SEARCH_STEP = 0.25


def search_reach(damage: dict, params: dict, fixed) -> tuple[float, float, float]:
    """The averages of every layer at its narrowest and at its widest allowed integer width (a float-only layer
    stays at 32 bits, a capped one stops at 7), and with every layer that may be float in float, the fixed weights
    included: the ends of search_budget's grids are then allocations the knapsack can reach."""
    allowed = {name: [b for b in damage[name] if b != FLOAT_BITS] or [FLOAT_BITS] for name in params}
    narrowest, widest = (allocate_stage.average_bits({name: width(allowed[name]) for name in params}, params, fixed)
                         for width in (min, max))
    floated = allocate_stage.average_bits({name: max(damage[name]) for name in params}, params, fixed)
    return narrowest, widest, floated


def search_budget(build, options: Options, reach=None) -> tuple[Candidate, list]:
    """Smallest average-bits budget (on a 0.25 grid) that passes the gates (--max-drop, --min-cosine). reach: the
    averages of every layer at the narrowest and at the widest width, the fixed weights (float, or quantized in the
    input) included: the grid spans them (from --bits alone it reached under what any allocation can meet).

    Binary search: the MSQ allocation orders which layers lose bits at each
    budget, so accuracy falls with the budget and about log2(grid) models are
    evaluated (5 for widths 2..8), not one per layer.
    """
    low_end, high_end, float_end = reach or (min(options.bits), max(options.bits), max(options.bits))
    grid = list(np.arange(math.ceil(low_end / SEARCH_STEP - 1e-9) * SEARCH_STEP,
                          max(high_end, min(options.bits)) + SEARCH_STEP - 1e-9, SEARCH_STEP))
    # Past every layer's widest width, the budget buys float, most damaged layers first (the knapsack's order): as
    # Intel Neural Compressor falls back to FP32 op by op, a gate the widest widths miss (the digits CNN at
    # --max-drop 0.5: 0.60 points at 8 bits) is met with the fewest float weights the grid finds.
    # Below the top, where every layer that may be float is: a gate met only by the FP32 model is not met.
    fallback = [float(b) for b in np.arange(grid[-1] + SEARCH_STEP, float_end - 1e-9, SEARCH_STEP)]
    log = []
    beyond = False  # probing the fallback grid
    seen = []  # the candidates probed: build gives one allocation's candidate again, not written anew

    def probe(index: int) -> Candidate:
        candidate = build(float(grid[index]), beyond)
        log.append({"budget": float(grid[index]), "avg_bits": round(candidate.avg_bits, 4),
                    "bytes": candidate.file_bytes, "float_fallback": beyond,
                    "reused": any(candidate is earlier for earlier in seen),
                    "drop": _rounded(candidate.measured.get("drop")), "cosine": candidate.measured["cosine"]})
        seen.append(candidate)
        return candidate

    def passes(candidate: Candidate) -> bool:
        return gate_passed(candidate.measured, options) and any(b != FLOAT_BITS for b in candidate.bits.values())

    best = probe(len(grid) - 1)
    if not passes(best):
        if not fallback:
            return best, log  # even the widest fails: the gate reports it
        widest, grid, beyond = best, fallback, True
        best = probe(len(grid) - 1)
        if not passes(best):
            return widest, log  # even the most float short of all fails: the gate reports the widest widths
    low, high = 0, len(grid) - 1
    while low < high:
        middle = (low + high) // 2
        candidate = probe(middle)
        if passes(candidate):
            best, high = candidate, middle
        else:
            low = middle + 1
    return best, log


def _rounded(value):
    return None if value is None else round(value, 4)


def enforce_gate(result: Result) -> None:
    if result.gate_passed is False:
        gate = result.report["gate"]
        failed = []
        if gate.get("max_drop") is not None and gate["drop"] > gate["max_drop"]:
            failed.append(f"top-1 drop {gate['drop']:.2f} points exceeds --max-drop {gate['max_drop']}")
        if gate.get("min_cosine") is not None and gate["cosine"] < gate["min_cosine"]:
            failed.append(f"cosine to FP32 {gate['cosine']:.4f} is below --min-cosine {gate['min_cosine']}")
        weakest = gate.get("weakest_channel")
        if gate.get("min_cosine") is not None and gate["cosine"] >= gate["min_cosine"] and weakest and \
                weakest["likeness"] < fidelity.channel_floor(gate["min_cosine"]):
            failed.append(f"{fidelity.channel_text(weakest, fidelity.channel_floor(gate['min_cosine']), 4)} (what "
                          "--min-cosine asks of every channel), under a whole-output cosine that passes")
        raise GateFailed(f"accuracy gate failed: {'; '.join(failed)}; the model and report were written for "
                         "inspection.")

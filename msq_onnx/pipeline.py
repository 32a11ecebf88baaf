"""The pipeline: load -> instrument -> features -> imprint -> importance ->
allocate -> write -> verify -> report. Each stage is its own module; this one
only moves data between them and times them.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from . import allocate as allocate_stage
from .data import Preprocess, check_labels, open_samples, split_holdout
from .errors import BadOption, GateFailed
from .features import DEFAULT_LEVELS, DEFAULT_MAX_DIM
from .imprint import imprint_labels, layer_scores
from .importance import importance as layer_importance
from .importance import upstream_layers
from .instrument import run_pass
from .load import load_model, save_model_file
from .verify import flips, fused_integer_kernels, optimized_op_counts, predictions, smoke_check, top1
from .weights import error_table
from .write import check_output_path, publish, quantize_to_qdq, quantize_weights

HOLDOUT_FRACTION = 0.2  # of the calibration set, for --max-drop without --eval


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
    act16: int = 0  # inputs of this many layers (largest uint8 error) kept in uint16
    preprocess: Preprocess = field(default_factory=Preprocess)
    batch_size: int = 1
    seed: int = 0
    quiet: bool = False
    bias_correction: bool = True
    clip_search: bool = True


@dataclass
class Result:
    report: dict
    gate_passed: bool | None


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


def _num_classes(loaded) -> int | None:
    value = next(v for v in loaded.model.graph.output if v.name == loaded.output_name)
    dims = value.type.tensor_type.shape.dim
    if len(dims) >= 2 and all(d.HasField("dim_value") for d in dims[1:]):
        return int(np.prod([d.dim_value for d in dims[1:]]))
    return None


def check_options(options: Options) -> None:
    for flag, value in (("--avg-bits", options.avg_bits), ("--max-size", options.max_size),
                        ("--max-drop", options.max_drop), ("--importance-exponent", options.importance_exponent)):
        if value is not None and not math.isfinite(value):
            raise BadOption(f"{flag} {value} is not a finite number.")
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


def analyse(loaded, calib, options: Options, timer: _Timer) -> Analysis:
    with timer.stage("instrument+features"):
        stats = run_pass(loaded, calib, options.levels, options.max_dim, options.batch_size, options.quiet,
                         options.seed)
    with timer.stage("imprint"):
        labels = imprint_labels(None if calib.labels is None else calib.labels[stats.imprinted], stats.outputs,
                                options.seed)
        scores, input_score = layer_scores(stats.features, stats.input_features, labels)
    with timer.stage("importance"):
        upstream = upstream_layers(loaded.model, loaded.layers)
        gains = layer_importance({name: s.soft for name, s in scores.items()}, input_score.soft, upstream)
    with timer.stage("weight-errors"):
        choices = {layer.name: error_table(layer, loaded.weight(layer), stats.input_sq.get(layer.name),
                                           options.bits, options.clip_search) for layer in loaded.layers}
    return Analysis(stats, labels, scores, input_score, upstream, gains, choices)


@dataclass
class Candidate:
    """One written model: its allocation, its file in the work folder, its held-out measurement."""

    bits: dict
    avg_bits: float
    path: str
    measured: dict | None


class _HeldOut:
    """FP32 predictions on the held-out samples, computed once, against which candidates are scored."""

    def __init__(self, loaded, samples, options: Options, work_dir: str):
        self.loaded, self.samples, self.options = loaded, samples, options
        fp32_model = os.path.join(work_dir, "fp32.onnx")
        save_model_file(loaded.model, fp32_model)
        self.fp32 = predictions(fp32_model, loaded, samples, options.batch_size, options.quiet, "FP32 evaluation")

    def measure(self, path: str) -> dict:
        quant = predictions(path, self.loaded, self.samples, self.options.batch_size, self.options.quiet,
                            "QDQ evaluation")
        labels = self.samples.labels
        result = {"samples": int(self.samples.count), "source": self.samples.source,
                  "agreement": float((self.fp32 == quant).mean() * 100.0), "flips": flips(self.fp32, quant, labels)}
        if labels is not None:
            result["fp32_top1"] = top1(self.fp32, labels)
            result["quant_top1"] = top1(quant, labels)
            result["drop"] = result["fp32_top1"] - result["quant_top1"]
        else:
            result["drop"] = 100.0 - result["agreement"]
        return result


def budget_bits(loaded, options: Options, params: dict) -> float | None:
    """The average-bits budget implied by --avg-bits and --max-size (the tighter one)."""
    budgets = [options.avg_bits] if options.avg_bits is not None else []
    if options.max_size is not None:
        total = sum(params.values())
        limit = options.max_size * loaded.size_bytes if options.max_size <= 1.0 else options.max_size
        rest = _unweighted_bytes(loaded, params)
        bits = (limit - rest) * 8.0 / total
        if bits < min(options.bits):
            smallest = rest + total * min(options.bits) / 8.0
            raise BadOption(f"--max-size {options.max_size:g} is below the smallest model these widths allow "
                            f"({smallest:,.0f} bytes packed); raise it or add narrower --bits.")
        budgets.append(bits)
    return min(budgets) if budgets else None


def packed_size(loaded, bits: dict, params: dict) -> int:
    """Bytes of the model with each layer's weights packed at its width (what a k-bit container stores)."""
    return int(round(_unweighted_bytes(loaded, params) + sum(params[n] * bits[n] for n in bits) / 8.0))


def _unweighted_bytes(loaded, params: dict) -> int:
    """Everything but the layers' FP32 weights, which keeps its size when quantized."""
    return loaded.size_bytes - 4 * sum(params.values())


def convert(model_path: str, output_path: str, calib_path: str, options: Options | None = None) -> Result:
    options = options or Options()
    timer = _Timer()
    started = time.perf_counter()
    check_options(options)
    check_output_path(model_path, output_path)
    with timer.stage("load"):
        loaded = load_model(model_path)
        calib = open_samples(calib_path, loaded.inputs, options.preprocess, "calibration")
        classes = _num_classes(loaded)
        evaluation = None
        if options.eval_path:
            evaluation = open_samples(options.eval_path, loaded.inputs, options.preprocess, "evaluation")
            check_labels(evaluation, classes, "evaluation")
        elif options.max_drop is not None:
            calib, evaluation = split_holdout(calib, HOLDOUT_FRACTION)
        check_labels(calib, classes, "calibration")
    params = {layer.name: layer.params for layer in loaded.layers}
    budget = budget_bits(loaded, options, params)
    analysis = analyse(loaded, calib, options, timer)
    with timer.stage("allocate"):
        damage = _damage(loaded, calib, analysis, options)
        activation_errors = allocate_stage.activation_errors(loaded.layers, analysis.stats.ranges,
                                                             analysis.stats.input_sq)
        wide_inputs = allocate_stage.wide_activations(activation_errors, options.act16)
    with tempfile.TemporaryDirectory(prefix="msq-") as work_dir:
        held_out = _HeldOut(loaded, evaluation, options, work_dir) if evaluation is not None else None

        def build(avg_bits: float | None) -> Candidate:
            with timer.stage("allocate"):
                bits = allocate_stage.allocate(options.allocator, analysis.importance, damage, params, options.bits,
                                               avg_bits)
            with timer.stage("write"):
                folder = tempfile.mkdtemp(dir=work_dir)
                quantized = quantize_weights(loaded, bits, analysis.choices, analysis.stats.input_mean,
                                             options.bias_correction)
                path = quantize_to_qdq(loaded, quantized, analysis.stats.ranges, folder, wide_inputs)
            with timer.stage("verify"):
                return Candidate(bits, allocate_stage.average_bits(bits, params), path,
                                 held_out.measure(path) if held_out else None)

        search = None
        if options.max_drop is not None and budget is None:
            chosen, search = search_budget(build, options)
        else:
            chosen = build(budget)
        with timer.stage("verify"):
            op_counts = optimized_op_counts(chosen.path)
            if held_out is None:
                smoke_check(chosen.path, loaded, calib, options.batch_size)
        with timer.stage("write"):
            publish(chosen.path, output_path)
    output_size = os.path.getsize(output_path)
    from .report import build_report

    report = build_report(model_path, output_path, loaded, options, chosen.bits, params, analysis, chosen.measured,
                          op_counts, fused_integer_kernels(op_counts), output_size, timer.seconds,
                          time.perf_counter() - started, packed_bytes=packed_size(loaded, chosen.bits, params),
                          activation_errors=activation_errors, wide_inputs=wide_inputs, search=search)
    gate = report.get("gate")
    return Result(report=report, gate_passed=None if gate is None else gate["passed"])


def _damage(loaded, calib, analysis: Analysis, options: Options) -> dict:
    if options.allocator == "sensitivity":
        from . import sensitivity

        measured, _ = sensitivity.measure(loaded, calib, analysis.choices, analysis.stats.input_mean, options.bits,
                                          bias_correction=options.bias_correction, quiet=options.quiet)
        return sensitivity.monotone(measured)
    return allocate_stage.expected_damage(analysis.importance, analysis.choices, options.importance_exponent)


SEARCH_STEP = 0.25


def search_budget(build, options: Options) -> tuple[Candidate, list]:
    """Smallest average-bits budget (on a 0.25 grid) whose held-out drop stays within --max-drop.

    Binary search: the MSQ allocation orders which layers lose bits at each
    budget, so accuracy falls with the budget and about log2(grid) models are
    evaluated (5 for widths 2..8), not one per layer.
    """
    grid = list(np.arange(min(options.bits), max(options.bits) + 1e-9, SEARCH_STEP))
    log = []

    def probe(index: int) -> Candidate:
        candidate = build(float(grid[index]))
        log.append({"budget": float(grid[index]), "avg_bits": round(candidate.avg_bits, 4),
                    "drop": round(candidate.measured["drop"], 4)})
        return candidate

    best = probe(len(grid) - 1)
    if best.measured["drop"] > options.max_drop:
        return best, log  # even the widest fails: the gate reports it
    low, high = 0, len(grid) - 1
    while low < high:
        middle = (low + high) // 2
        candidate = probe(middle)
        if candidate.measured["drop"] <= options.max_drop:
            best, high = candidate, middle
        else:
            low = middle + 1
    return best, log


def enforce_gate(result: Result) -> None:
    if result.gate_passed is False:
        gate = result.report["gate"]
        raise GateFailed(f"accuracy gate failed: top-1 drop {gate['drop']:.2f} points exceeds --max-drop "
                         f"{gate['max_drop']}; the model and report were written for inspection.")

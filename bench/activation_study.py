"""Does keeping some layers' inputs in 16 bits pay?

The layers whose uint8 input error is largest (a range dominated by outliers)
get uint16 inputs (`--act16 N`); top-1 on the held-out samples and batch-1
latency (1 thread, interleaved, median) against the all-uint8 model, at the
same weight allocation.

    python bench/activation_study.py [--model efficientnet|mnist|digits]
Writes docs/bench/activation-<model>.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import compare_ort  # noqa: E402
import run_bench  # noqa: E402
from msq_onnx import allocate as alloc  # noqa: E402
from msq_onnx.pipeline import Options, _Timer, analyse  # noqa: E402
from msq_onnx.verify import fused_integer_kernels, optimized_op_counts  # noqa: E402
from msq_onnx.write import quantize_to_qdq, quantize_weights  # noqa: E402


def main() -> int:
    args, spec, loaded, calib, evaluator = run_bench.study_setup(__doc__)
    # every layer is written static below: its ranges measured for every layer
    analysis = analyse(loaded, calib, Options(quiet=True, activations="static"), _Timer())
    params = {layer.name: layer.params for layer in loaded.layers}
    errors = alloc.activation_errors(loaded.layers, analysis.stats.ranges, analysis.stats.input_sq)
    worst = sorted(errors, key=lambda n: -errors[n])[:5]
    print("largest uint8 input errors:", {n: f"{errors[n]:.2e}" for n in worst}, flush=True)
    damage = alloc.expected_damage(analysis.importance, analysis.choices)
    rows = []
    shape = [d.dim_value or 1 for d in loaded.model.graph.input[0].type.tensor_type.shape.dim]
    feed = {loaded.inputs[0].name: np.random.default_rng(0).normal(size=shape).astype(np.float32)}
    with tempfile.TemporaryDirectory(prefix="msq-act16-") as folder:
        for budget in (3.5, 4.0):
            bits = alloc.allocate_avg_bits("ilp", analysis.importance, damage, params, (2, 3, 4, 5, 6, 7, 8), budget)
            paths = {}
            for count in (0, 1, 3, 5):
                target = tempfile.mkdtemp(dir=folder)
                weights = quantize_weights(loaded, bits, analysis.choices, analysis.stats.input_mean)  # used up
                paths[count] = quantize_to_qdq(loaded, weights, analysis.stats.ranges, target,
                                               alloc.wide_activations(errors, count))
            latency = compare_ort.latency_ms({str(k): v for k, v in paths.items()}, feed, 100)
            for count, path in paths.items():
                row = {"budget": budget, "act16_layers": count,
                       "top1": round(evaluator.top1(evaluator.predictions(path)), 2),
                       "fused_integer_kernels": fused_integer_kernels(optimized_op_counts(path)),
                       "latency_vs_all_uint8": round(latency[str(count)] / latency["0"], 3)}
                rows.append(row)
                print(row, flush=True)
    with open(os.path.join(args.out, f"activation-{spec['name']}.json"), "w") as handle:
        json.dump({"model": spec["name"], "largest_input_errors": {n: errors[n] for n in worst}, "rows": rows},
                  handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A width per output channel instead of per layer, measured, not shipped (issue "three bits and below").

Each row of a layer's [out, fan_in] weight takes its own width from 2-8 bits, chosen by one knapsack over every row
of the model on the same measured errors the tool's allocator reads (each row's input-weighted squared error at the
clipping its width's search found, over the layer's signal, times the layer's residual weight), solved by Lagrange
relaxation; against it, the tool's own knapsack (one width per layer, HiGHS) on the sums of the same errors. Both are
simulated the same way, in float: every weight on its grid (uniform levels: a level set is fitted per layer and
width, not per row), each layer's bias corrected, activations float (on this model their rounding costs nothing at
3 bits: docs/bench/loss-breakdown.md). EfficientNet-Lite0, 300 calibration / 1,000 evaluation images.

    python bench/channel_widths.py [--budgets 3 2.5 3.5] [--shared ../shared]
Prints one line per allocation. Reads ../shared (or MSQ_SHARED) and skips cleanly without it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import datasets  # noqa: E402

WIDTHS = tuple(range(2, 9))


def row_errors(loaded, analysis) -> dict:
    """layer -> bits -> (each row's relative error, the width's WidthChoice)."""
    from msq_onnx import weights as W

    tables = {}
    for layer in loaded.layers:
        matrix = W.contiguous(W.as_matrix(layer, loaded.weight(layer)))
        power = W.input_weights(layer, analysis.stats.input_sq.get(layer.name))
        signal = float((power * matrix * matrix).sum())
        tables[layer.name] = {}
        for bits, choice in analysis.choices[layer.name].items():
            rounded, _ = W.fake_quantize(matrix, choice.clip, bits, choice.flipped)
            tables[layer.name][bits] = ((power * (matrix - rounded) ** 2).sum(axis=1) / signal, choice)
    return tables


def rows_knapsack(sizes: np.ndarray, damage: np.ndarray, budget_bits: float) -> np.ndarray:
    """sizes: the weights in each row; damage: [rows, WIDTHS] each row's damage at each width. Each row's width, the
    largest Lagrange multiplier's whose total bits stay within budget_bits (a bisection: 2 x 10^4 rows make the exact
    knapsack slow, and so many small items leave the relaxation's gap negligible)."""
    cost = sizes[:, None].astype(np.float64) * np.array(WIDTHS, np.float64)[None, :]

    def pick(multiplier):
        return np.argmin(damage + multiplier * cost, axis=1)

    def spent(choice):
        return float(cost[np.arange(len(sizes)), choice].sum())

    low, high = 0.0, 1.0
    while spent(pick(high)) > budget_bits:
        high *= 4
    for _ in range(80):
        middle = (low + high) / 2
        low, high = (middle, high) if spent(pick(middle)) > budget_bits else (low, middle)
    return np.array(WIDTHS)[pick(high)]


def simulated(loaded, tables: dict, widths: dict, input_mean: dict):
    """The FP32 model with every layer's rows on the grids of their widths and its bias corrected."""
    import onnx
    from onnx import numpy_helper

    from msq_onnx import weights as W

    model = onnx.ModelProto()
    model.CopyFrom(loaded.model)
    initializers = {t.name: t for t in model.graph.initializer}
    nodes = {node.name: node for node in model.graph.node}
    for layer in loaded.layers:
        weight = loaded.weight(layer)
        matrix = W.contiguous(W.as_matrix(layer, weight))
        rounded = np.empty_like(matrix)
        for bits in np.unique(widths[layer.name]):
            rows = widths[layer.name] == bits
            choice = tables[layer.name][int(bits)][1]
            rounded[rows], _ = W.fake_quantize(matrix[rows], choice.clip[rows], int(bits),
                                               None if choice.flipped is None else choice.flipped[rows])
        quantized = W.from_matrix(layer, rounded).astype(np.float32)
        shift = W.bias_shift(layer, weight, quantized, input_mean.get(layer.name)) * (layer.bias_factor or 0.0)
        initializers[layer.weight_name].CopyFrom(numpy_helper.from_array(quantized, layer.weight_name))
        bias = loaded.bias(layer)
        name = f"{layer.weight_name}_msq_corrected_bias"
        model.graph.initializer.append(numpy_helper.from_array(
            ((bias if bias is not None else 0.0) - shift).astype(np.float32), name))
        node = nodes[layer.nodes[0]]
        if layer.op_type not in ("Conv", "Gemm"):
            raise SystemExit(f"{layer.name}: {layer.op_type} is not simulated here (Conv and Gemm only)")
        node.input.extend([""] * (3 - len(node.input)))
        node.input[2] = name
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=datasets.DEFAULT_SHARED)
    parser.add_argument("--budgets", nargs="+", type=float, default=[3.0, 2.5, 3.5])
    args = parser.parse_args(argv)
    fp32 = datasets.shared_model(args.shared, "efficientnet-lite0.onnx")
    if fp32 is None:
        return 0
    import onnx

    from msq_onnx import allocate, pipeline
    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.load import load_model
    from run_bench import Evaluator, compare, cosines

    loaded = load_model(fp32)
    pre = Preprocess(**datasets.efficientnet_preprocess())
    with tempfile.TemporaryDirectory(prefix="msq-widths-") as work:
        calib_path, eval_path = datasets.imagenet_split(args.shared, work)
        options = pipeline.Options(avg_bits=min(args.budgets), preprocess=pre, level_sets=False, quiet=True)
        analysis = pipeline.analyse(loaded, open_samples(calib_path, loaded.inputs, pre), options, pipeline._Timer())
        tables, residual = row_errors(loaded, analysis), pipeline.residual_weights(analysis, options)
        evaluator = Evaluator(loaded, open_samples(eval_path, loaded.inputs, pre, "evaluation"))
        reference = evaluator.outputs(fp32)
        labels = np.asarray(evaluator.labels)
        params = {layer.name: layer.params for layer in loaded.layers}
        # [rows, WIDTHS] per layer: what the knapsacks minimise, each row's error times its layer's residual weight
        row_damage = {name: residual.get(name, 1.0) * np.stack([table[b][0] for b in WIDTHS], axis=1).astype(np.float64)
                      for name, table in tables.items()}
        per_layer = {name: dict(zip(WIDTHS, damage.sum(axis=0).tolist())) for name, damage in row_damage.items()}
        sizes = np.concatenate([np.full(len(row_damage[layer.name]), layer.fan_in) for layer in loaded.layers])
        owners = np.concatenate([np.full(len(row_damage[layer.name]), layer.name) for layer in loaded.layers])
        all_rows = np.concatenate([row_damage[layer.name] for layer in loaded.layers])
        for budget in args.budgets:
            chosen = allocate.allocate_ilp(per_layer, WIDTHS, [allocate.bits_budget(params, WIDTHS, budget)])
            row_widths = rows_knapsack(sizes, all_rows, budget * sum(params.values()))
            allocations = {
                "a width per layer": {name: np.full(len(row_damage[name]), b) for name, b in chosen.items()},
                "a width per row": {name: row_widths[owners == name] for name in params}}
            predictions = {}
            for label, widths in allocations.items():
                path = os.path.join(work, "simulated.onnx")
                onnx.save(simulated(loaded, tables, widths, analysis.stats.input_mean), path)
                outputs = evaluator.outputs(path)
                predictions[label] = outputs.argmax(axis=1)
                bits = sum(float(widths[layer.name].sum()) * layer.fan_in
                           for layer in loaded.layers) / sum(params.values())
                damage = sum(float(row_damage[name][np.arange(len(w)), np.asarray(w) - WIDTHS[0]].sum())
                             for name, w in widths.items())
                cosine = float(np.mean(cosines(outputs, reference)))
                print(f"{budget:g} bits, {label}: average {bits:.3f}, damage {damage:.4f}, top-1 "
                      f"{evaluator.top1(predictions[label]):.1f}, cosine {cosine:.4f}, "
                      f"mean width per layer {[round(float(w.mean()), 2) for w in widths.values()]}", flush=True)
            print(f"{budget:g} bits, per row against per layer: "
                  f"{compare(predictions['a width per row'], predictions['a width per layer'], labels)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Corrections that see the quantized network's own inputs (issue "three bits and below"; measured, not shipped).

Every shipped rounding and bias correction looks at one layer on FP32 inputs. The error EfficientNet-Lite0 loses at
3 bits is what the layers' errors do to each other, so this study tries the two cheap ways the literature corrects
for it, on a fixed allocation (the shipped one at --avg-bits --budget), after the shipped rounding:

  bias-once     AIMET-style empirical bias correction, every layer at once: run the fake-quantized and the FP32
                model on calibration samples, subtract each layer's per-channel output-mean difference from its bias
                (--rounds times, cumulative)
  bias-own      each layer's own shift on the quantized network's inputs, E[(W_q - W) x_q], for all layers at once
  bias-sequential  the empirical correction layer by layer in graph order, each on the already corrected network
  gptq-sequential  1x1 convolutions at <= --max-bits, in graph order: GPTQ (the shipped grids and clips) on the
                centred Hessian of the quantized network's input; --asymmetric rounds W C H^-1 instead of W
                (C = sum x_fp x_q^T: the FP32 output as the target, GPTAQ-style), bias b + W mean_fp - Q mean_q

    python bench/quantized_inputs.py [--methods none bias-once ...] [--budget 3] [--samples 64] [--shared ../shared]

Evaluates on the tuning half (even rows) of the 1,000 ImageNet evaluation images; writes
docs/bench/quantized-inputs.json and .md. Each conversion is `cli.py` in its own process with the method patched
into the pipeline's weight stage (`--child`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import datasets  # noqa: E402

METHODS = ("none", "bias-once", "bias-own", "bias-sequential", "gptq-sequential")


def _with_outputs(model, names):
    import onnx
    from onnx import helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in present)
    return copy


def _means(model, names: list, feeds: list) -> dict:
    """Per-channel output means: axis 1 of a Conv output, the last axis otherwise (names: tensor -> is_conv)."""
    from msq_onnx.instrument import make_session

    session = make_session(_with_outputs(model, list(names)))
    sums = dict.fromkeys(names, 0.0)
    for feed in feeds:
        for name, value in zip(names, session.run(list(names), feed)):
            axes = tuple(i for i in range(value.ndim) if i != (1 if names[name] else value.ndim - 1))
            sums[name] = sums[name] + value.mean(axis=axes) * len(value)
    count = sum(len(next(iter(f.values()))) for f in feeds)
    return {name: total / count for name, total in sums.items()}


def _child(method: str, rounds: int, samples: int, max_bits: int, asymmetric: bool, argv: list) -> int:
    import onnx
    from onnx import numpy_helper

    import msq_onnx.pipeline as pipeline
    from msq_onnx.cli import main
    from msq_onnx.instrument import make_session, padded_batches
    from msq_onnx.weights import as_matrix, damped, from_matrix, gptq_round, levels, steps

    held = {}
    split = pipeline._held_out
    pipeline._held_out = lambda calib, loaded, options: held.setdefault("sets", split(calib, loaded, options))
    shipped = pipeline.quantize_weights

    def patched(loaded, bits, choices, input_mean, bias_correction=True, rewritten=frozenset()):
        # every weight as fake-quantized floats in the copy (no integers kept, none left a reference into the
        # weights file): the sessions below run it, and the write rounds the rewritten layers' floats again
        written = shipped(loaded, bits, choices, input_mean, bias_correction)
        feeds = []
        for feed, _ in padded_batches(held["sets"][0], loaded, 16):
            feeds.append(feed)
            if len(feeds) * 16 >= samples:
                break
        nodes = {n.name: n for n in written.model.graph.node}
        inits = {t.name: t for t in written.model.graph.initializer}
        order = [n.name for n in written.model.graph.node]
        layers = sorted((l for l in loaded.layers if bits[l.name] in choices[l.name]), key=lambda l: order.index(l.name))

        def bias_of(layer):
            node = nodes[layer.name]
            name = node.input[2] if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 else layer.bias_name
            return name if name in inits else None

        def original_bias(layer, size):
            value = loaded.bias(layer)
            return np.zeros(size) if value is None else value.astype(np.float64)

        def add_to_bias(name, shift):
            inits[name].CopyFrom(numpy_helper.from_array(
                (numpy_helper.to_array(inits[name]) - shift).astype(np.float32), name))

        targets = {nodes[l.name].output[0]: l for l in layers if l.bias_factor is not None and bias_of(l)}
        is_conv = {name: nodes[l.name].op_type == "Conv" for name, l in targets.items()}
        if method == "bias-once":
            reference = _means(loaded.model, is_conv, feeds)
            for _ in range(rounds):
                got = _means(written.model, is_conv, feeds)
                for name, layer in targets.items():
                    add_to_bias(bias_of(layer), got[name] - reference[name])
        elif method == "bias-sequential":
            reference = _means(loaded.model, is_conv, feeds)
            for name, layer in targets.items():
                add_to_bias(bias_of(layer), _means(written.model, {name: is_conv[name]}, feeds)[name] - reference[name])
        elif method == "bias-own":  # a twin of each layer with its FP32 weight, on the same (quantized) input
            twin_model = onnx.ModelProto()
            twin_model.CopyFrom(written.model)
            del twin_model.graph.node[:]
            twins = {}
            for node in written.model.graph.node:
                twin_model.graph.node.append(node)
                if node.output[0] in targets:
                    layer = targets[node.output[0]]
                    twin = onnx.NodeProto()
                    twin.CopyFrom(node)
                    twin.name, twin.output[0], twin.input[1] = node.name + "_fp", node.output[0] + "_fp", \
                        layer.weight_name + "_fp"
                    twin_model.graph.initializer.append(numpy_helper.from_array(loaded.weight(layer), twin.input[1]))
                    twin_model.graph.node.append(twin)
                    twins[twin.output[0]] = is_conv[node.output[0]]
            means = _means(twin_model, {**is_conv, **twins}, feeds)
            for name, layer in targets.items():
                bias = numpy_helper.to_array(inits[bias_of(layer)])
                add_to_bias(bias_of(layer), bias - original_bias(layer, len(bias)) + means[name] - means[name + "_fp"])
        elif method == "gptq-sequential":
            for layer in layers:
                node = nodes[layer.name]
                weight = loaded.weight(layer)
                attributes = {a.name: (a.i if a.type == a.INT else list(a.ints)) for a in node.attribute}
                if node.op_type != "Conv" or weight.shape[2:] != (1, 1) or attributes.get("group", 1) != 1 or \
                        any(s != 1 for s in attributes.get("strides", [1])) or bits[layer.name] > max_bits:
                    continue
                source = node.input[0]
                quantized = make_session(_with_outputs(written.model, [source]))
                floating = make_session(_with_outputs(loaded.model, [source]))
                fan_in = weight.shape[1]
                hessian, cross = np.zeros((fan_in, fan_in)), np.zeros((fan_in, fan_in))
                mean_q, mean_fp, rows = np.zeros(fan_in), np.zeros(fan_in), 0
                for feed in feeds:
                    xq = quantized.run([source], feed)[0].swapaxes(0, 1).reshape(fan_in, -1).astype(np.float64)
                    xf = floating.run([source], feed)[0].swapaxes(0, 1).reshape(fan_in, -1).astype(np.float64)
                    hessian += xq @ xq.T
                    cross += xf @ xq.T
                    mean_q, mean_fp, rows = mean_q + xq.sum(1), mean_fp + xf.sum(1), rows + xq.shape[1]
                mean_q, mean_fp = mean_q / rows, mean_fp / rows
                hessian -= rows * np.outer(mean_q, mean_q)
                cross -= rows * np.outer(mean_fp, mean_q)
                matrix = as_matrix(layer, weight).astype(np.float64)
                target = matrix @ cross @ np.linalg.inv(damped(hessian)) if asymmetric else matrix
                choice = choices[layer.name][bits[layer.name]]
                scale = (np.maximum(choice.clip, 1e-12) / levels(choice.bits)).astype(np.float32)
                integers, _ = gptq_round(target.astype(np.float32), scale, np.full(len(matrix), levels(choice.bits)),
                                         hessian, choice.flipped)
                rounded = integers * steps(scale, fan_in)
                inits[layer.weight_name].CopyFrom(numpy_helper.from_array(
                    from_matrix(layer, rounded.astype(np.float32)), layer.weight_name))
                if bias_of(layer):
                    new = original_bias(layer, len(matrix)) + matrix @ mean_fp - rounded @ mean_q
                    inits[bias_of(layer)].CopyFrom(numpy_helper.from_array(new.astype(np.float32), bias_of(layer)))
        return written

    pipeline.quantize_weights = patched
    return main(argv)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--budget", type=float, default=3.0, help="--avg-bits of the conversions")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples the corrections run on")
    parser.add_argument("--rounds", type=int, default=1, help="bias-once: corrections applied in turn")
    parser.add_argument("--max-bits", type=int, default=3, help="gptq-sequential: layers at or below this width")
    parser.add_argument("--asymmetric", action="store_true", help="gptq-sequential: the FP32 output as target")
    parser.add_argument("--shared", default=datasets.DEFAULT_SHARED)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.child:
        return _child(args.child, args.rounds, args.samples, args.max_bits, args.asymmetric, rest)
    if not os.path.isdir(args.shared):
        print(f"skipped: shared data folder '{args.shared}' not found (set --shared or MSQ_SHARED)")
        return 0
    work = tempfile.mkdtemp(prefix="msq-qinputs-")
    calib, evaluation = datasets.imagenet_split(args.shared, work)
    with open(evaluation) as handle:
        rows = list(csv.reader(handle))
    tuning = os.path.join(work, "tuning-half.csv")
    with open(tuning, "w", newline="") as handle:
        csv.writer(handle).writerows([rows[0]] + rows[1::2])  # even evaluation rows (0, 2, ...)
    model = os.path.join(args.shared, "models", "efficientnet-lite0.onnx")
    results = []
    for method in args.methods:
        name = method if method != "gptq-sequential" else \
            f"{method}{'-asymmetric' if args.asymmetric else ''} (layers <= {args.max_bits} bits)"
        out, report = os.path.join(work, name + ".onnx"), os.path.join(work, name + ".json")
        flags = ["--samples", str(args.samples), "--rounds", str(args.rounds), "--max-bits", str(args.max_bits)] + \
            (["--asymmetric"] if args.asymmetric else [])
        command = [sys.executable, os.path.abspath(__file__), "--child", method, *flags, model, out, "--calib", calib,
                   "--eval", tuning, "--avg-bits", str(args.budget), *datasets.EFFICIENTNET_ARGS,
                   "--report", report, "--quiet",
                   "--uniform-levels"]  # the study's corrections round on the width's uniform grid (round 6)
        subprocess.run(command, capture_output=True, text=True, check=True)

        with open(report) as handle:
            measured = json.load(handle)["evaluation"]
        results.append({"method": name, "avg_bits": args.budget, "samples": args.samples, "rounds": args.rounds,
                        "top1": measured["quant_top1"], "fp32_top1": measured["fp32_top1"],
                        "cosine": measured["cosine"]})
    previous = os.path.join(args.out, "quantized-inputs.json")
    if os.path.exists(previous):  # a rerun of some methods replaces only their rows
        with open(previous) as handle:
            kept = [r for r in json.load(handle) if (r["method"], r["samples"]) not in
                    {(n["method"], n["samples"]) for n in results}]
        results = kept + results
    datasets.save_table(args.out, "quantized-inputs", results,
                        ["| method (EfficientNet-Lite0, tuning half) | avg bits | samples | top-1 | cosine |",
                         "|---|---:|---:|---:|---:|"],
                        lambda r: f"| {r['method']} | {r['avg_bits']} | {r['samples']} | {r['top1']:.1f} | "
                                  f"{r['cosine']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

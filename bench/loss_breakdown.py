"""Where a low-bit EfficientNet-Lite0 loses its top-1: the written model, and the same model with one source of error
taken out at a time.

Each budget is one CLI conversion (300 calibration / 1,000 evaluation ImageNet images, the split of
bench/datasets.py). Its written QDQ file is then evaluated with ONNX Runtime on the 1,000 images four ways:
- as written;
- activations unrounded: every activation QuantizeLinear -> DequantizeLinear pair becomes a Clip to the pair's
  representable range, so the activations are clipped as written but not rounded;
- classifier in float: the last layer's weight and bias are the FP32 model's again (the bias without its
  correction, which belongs to the quantized weight);
- both.

What is left when both are taken out is the other layers' weight rounding.

    python bench/loss_breakdown.py [--budgets 3 2.5] [--shared ../shared]
Writes docs/bench/loss-breakdown.json and .md. Reads ../shared (or MSQ_SHARED) and skips cleanly without it.
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



def unrounded_activations(model):
    """Each activation Q -> DQ pair (its Q reads a tensor, not a weight) as a Clip to the range the pair
    represents: the saturation stays, the rounding goes. Returns how many pairs were replaced."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {name: node for node in graph.node for name in node.output}
    replaced, dropped, added = {}, set(), []
    for node in graph.node:
        quantize = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.input[0] in constants:
            continue
        scale, zero = float(constants[quantize.input[1]]), constants[quantize.input[2]]
        info = np.iinfo(zero.dtype)
        low, high = (info.min - int(zero)) * scale, (info.max - int(zero)) * scale
        bounds = [f"{node.output[0]}_msq_low", f"{node.output[0]}_msq_high"]
        added += [numpy_helper.from_array(np.array(low, np.float32), bounds[0]),
                  numpy_helper.from_array(np.array(high, np.float32), bounds[1])]
        replaced[id(node)] = helper.make_node("Clip", [quantize.input[0], *bounds], [node.output[0]])
        dropped.add(id(quantize))
    nodes = [replaced.get(id(node), node) for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    return len(replaced)


def float_layer(model, loaded, layer_name: str) -> bool:
    """The layer's node reads the FP32 weight and bias again (a Conv or Gemm whose bias is its third input)."""
    from onnx import numpy_helper

    layer = next(layer for layer in loaded.layers if layer.name == layer_name)
    node = next((n for n in model.graph.node if n.name == layer.nodes[0]), None)
    if node is None or layer.op_type not in ("Conv", "Gemm"):
        return False
    weight = f"{layer.weight_name}_msq_fp32"
    model.graph.initializer.append(numpy_helper.from_array(loaded.weight(layer), weight))
    node.input[1] = weight
    if len(node.input) > 2 and node.input[2]:
        original = loaded.bias(layer)
        if original is None:
            del node.input[2]  # the written bias was all correction
        else:
            node.input[2] = f"{layer.weight_name}_msq_fp32_bias"
            model.graph.initializer.append(numpy_helper.from_array(original, node.input[2]))
    return True


def evaluate(model_or_path, feeds: list, labels: np.ndarray, reference: np.ndarray | None) -> dict:
    import onnxruntime as ort

    source = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    runner = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    outputs = np.concatenate([runner.run(None, feed)[0][:count] for feed, count in feeds])
    result = {"top1": round(100.0 * float(np.mean(outputs.argmax(1) == labels)), 2), "outputs": outputs}
    if reference is not None:
        from run_bench import cosines

        cosine = cosines(outputs, reference)
        result.update(agreement=round(100.0 * float(np.mean(outputs.argmax(1) == reference.argmax(1))), 2),
                      cosine=round(float(np.mean(cosine)), 6))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=datasets.DEFAULT_SHARED)
    parser.add_argument("--budgets", nargs="+", type=float, default=[3.0, 2.5])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    args = parser.parse_args(argv)
    fp32 = datasets.shared_model(args.shared, "efficientnet-lite0.onnx")
    if fp32 is None:
        return 0
    import onnx

    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.instrument import padded_batches
    from msq_onnx.load import load_model

    loaded = load_model(fp32)
    rows = []
    with tempfile.TemporaryDirectory(prefix="msq-loss-") as work:
        calib, evaluation = datasets.imagenet_split(args.shared, work)
        samples = open_samples(evaluation, loaded.inputs, Preprocess(**datasets.efficientnet_preprocess()))
        feeds = list(padded_batches(samples, loaded, 50))
        labels = np.asarray(samples.labels)
        reference = evaluate(fp32, feeds, labels, None)
        for budget in args.budgets:
            name = f"avg{budget:g}"
            report = datasets.run_cli(fp32, work, calib, evaluation, name,
                                      [*datasets.EFFICIENTNET_ARGS, "--avg-bits", str(budget)])
            written = os.path.join(work, name + ".onnx")
            classifier = report["layers"][-1]
            variants = {}
            for variant in ("as written", "activations unrounded", "classifier in float", "both"):
                model = onnx.load(written)
                pairs = unrounded_activations(model) if variant in ("activations unrounded", "both") else 0
                if variant in ("classifier in float", "both") and not float_layer(model, loaded, classifier["name"]):
                    continue
                measured = evaluate(model, feeds, labels, reference["outputs"])
                measured.pop("outputs")
                variants[variant] = {**measured, **({"pairs_unrounded": pairs} if pairs else {})}
            for variant, values in variants.items():
                rows.append({"budget": budget, "variant": variant, **values, "fp32_top1": reference["top1"],
                             "report_top1": report["quant_top1"], "classifier": classifier["name"],
                             "classifier_bits": classifier["bits"]})
                print(rows[-1], flush=True)
    header = ["| budget | variant | top-1 | agreement | cosine |", "|---:|---|---:|---:|---:|"]
    datasets.save_table(args.out, "loss-breakdown", rows, header,
                        lambda r: f"| {r['budget']:g} | {r['variant']} | {r['top1']:.1f} | {r['agreement']:.1f} | "
                                  f"{r['cosine']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

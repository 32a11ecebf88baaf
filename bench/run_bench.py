"""Allocator benchmark: MSQ against the alternatives on real models.

For one model and a fixed-seed calibration/evaluation split, every allocator
picks bit-widths at each budget, the real QDQ model is written with the same
writer the CLI uses, and its top-1 is measured with ONNX Runtime on the
evaluation samples (never the calibration ones). Results go to
docs/bench/<model>.json, a Markdown table and a top-1 vs size plot.

    python bench/run_bench.py --model efficientnet   # ../shared or MSQ_SHARED
    python bench/run_bench.py --model mnist
    python bench/run_bench.py --model digits         # bundled, no ../shared
    python bench/run_bench.py --model path/to.onnx --calib C --eval E [image options as the CLI]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import datasets  # noqa: E402
from msq_onnx import allocate as alloc  # noqa: E402
from msq_onnx import sensitivity  # noqa: E402
from msq_onnx.pipeline import Analysis, Options, _Timer, analyse, plan_layers, residual_weights  # noqa: E402
from msq_onnx.data import Preprocess, open_samples  # noqa: E402
from msq_onnx.instrument import padded_batches  # noqa: E402
from msq_onnx.load import load_model  # noqa: E402
from msq_onnx.ops import FLOAT_BITS  # noqa: E402
from msq_onnx.report import plot_accuracy_vs_size  # noqa: E402
from msq_onnx.verify import session  # noqa: E402
from msq_onnx.weights import error_table  # noqa: E402
from msq_onnx.write import quantize_to_qdq, quantize_weights  # noqa: E402

BUDGETS = (3.0, 3.5, 4.0, 5.0, 6.0)
UNIFORM = (8, 6, 5, 4, 3)
RANDOM_SEEDS = 5


def _work_folder() -> str:
    """Split files for this run, removed when the process exits."""
    import atexit
    import shutil

    folder = tempfile.mkdtemp(prefix="msq-bench-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def prepare(args) -> dict:
    """Model path, calibration and evaluation paths, preprocessing, for a named model."""
    if args.model == "digits":
        return {"name": "digits-cnn", "model": os.path.join(ROOT, "models", "digits_cnn.onnx"),
                "calib": os.path.join(ROOT, "models", "digits_calib.npz"),
                "eval": os.path.join(ROOT, "models", "digits_eval.npz"), "pre": Preprocess()}
    if args.model in ("efficientnet", "mnist") and not os.path.isdir(args.shared):
        print(f"skipped: shared data folder '{args.shared}' not found (set --shared or MSQ_SHARED)")
        sys.exit(0)
    work = _work_folder()
    if args.model == "efficientnet":
        calib, evaluation = datasets.imagenet_split(args.shared, work)
        return {"name": "efficientnet-lite0", "model": os.path.join(args.shared, "models", "efficientnet-lite0.onnx"),
                "calib": calib, "eval": evaluation,
                "pre": Preprocess(**datasets.efficientnet_preprocess())}
    if args.model == "mnist":
        calib, evaluation = datasets.mnist_split(args.shared, work)
        return {"name": "mnist-8", "model": os.path.join(args.shared, "models", "mnist-8.onnx"), "calib": calib,
                "eval": evaluation, "pre": Preprocess()}
    pre = Preprocess(resize=args.resize, crop=args.crop, mean=tuple(args.mean), std=tuple(args.std),
                     interpolation=args.interpolation, channel_order=args.channel_order)
    return {"name": os.path.splitext(os.path.basename(args.model))[0], "model": args.model, "calib": args.calib,
            "eval": args.eval, "pre": pre}


def study_setup(description: str):
    """Shared start of the study scripts: (args, spec, loaded model, calibration samples, evaluator)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet", help="efficientnet, mnist or digits")
    parser.add_argument("--shared", default=datasets.DEFAULT_SHARED)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    args = parser.parse_args()
    args.calib = args.eval = None
    spec = prepare(args)
    loaded = load_model(spec["model"])
    calib = open_samples(spec["calib"], loaded.inputs, spec["pre"])
    evaluator = Evaluator(loaded, open_samples(spec["eval"], loaded.inputs, spec["pre"], "evaluation"))
    return args, spec, loaded, calib, evaluator


class Evaluator:
    """Decodes the evaluation set once and scores written models on it."""

    def __init__(self, loaded, samples, batch: int = 50):
        self.feeds = list(padded_batches(samples, loaded, batch))  # a fixed-batch model gets its own size
        self.labels = samples.labels
        self.output = loaded.output_name

    def outputs(self, path: str) -> np.ndarray:
        """[samples, scores] of the task output."""
        runner = session(path)
        return np.concatenate([runner.run([self.output], feed)[0][:count].reshape(count, -1)
                               for feed, count in self.feeds])

    def predictions(self, path: str) -> np.ndarray:
        return self.outputs(path).argmax(axis=1)

    def top1(self, predicted: np.ndarray) -> float:
        return float((predicted == self.labels).mean() * 100)


def score(loaded, analysis, evaluator: "Evaluator", bits: dict, choices=None, bias_correction: bool = True,
          keep: dict | None = None) -> float:
    """Write the real QDQ model for this allocation and return its held-out top-1."""
    with tempfile.TemporaryDirectory(prefix="msq-bench-") as folder:
        weights = quantize_weights(loaded, bits, choices or analysis.choices, analysis.stats.input_mean,
                                   bias_correction)
        modes, containers = plan_layers(loaded, analysis, bits, "speed")  # as the CLI writes it: float stays float
        path = quantize_to_qdq(loaded, weights, analysis.stats.ranges, folder, modes=modes, containers=containers)
        outputs = evaluator.outputs(path)
        predicted = outputs.argmax(axis=1)
        if keep is not None:
            keep["predictions"], keep["outputs"], keep["bytes"] = predicted, outputs, os.path.getsize(path)
    return evaluator.top1(predicted)


def cosines(outputs: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each sample's cosine between its [samples, scores] outputs and the reference's."""
    return np.sum(outputs * reference, axis=1) / np.maximum(
        np.linalg.norm(outputs, axis=1) * np.linalg.norm(reference, axis=1), 1e-30)


def compare(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> str:
    """win / loss / tie of a against b from the samples only one of them gets right (McNemar, ~95%)."""
    only_a = int(((a == labels) & (b != labels)).sum())
    only_b = int(((b == labels) & (a != labels)).sum())
    if abs(only_a - only_b) <= 2 * np.sqrt(max(only_a + only_b, 1)):
        return f"tie ({only_a}/{only_b})"
    return f"{'win' if only_a > only_b else 'loss'} ({only_a}/{only_b})"


def within_tables(bits: dict, choices: dict) -> dict:
    """Each layer's width, or the widest its error table holds below it: where the machine's integer kernels
    saturate, reduce_range leaves a static or dynamic layer no table above 7 bits (pipeline.saturation_caps), and
    the tool never writes it wider; a uniform-8 or random row gets what the tool would write."""
    return {name: b if b >= FLOAT_BITS or b in choices[name] else max(w for w in choices[name] if w <= b)
            for name, b in bits.items()}


def random_allocation(params: dict, widths, budget: float, seed: int) -> dict:
    """A random maximal allocation: widths raised one step at a time in random order while the budget holds."""
    rng = np.random.default_rng(seed)
    widths = sorted(widths)
    bits = {name: widths[0] for name in params}
    names = list(params)
    while True:
        movable = [n for n in names if bits[n] < widths[-1] and alloc.average_bits(
            {**bits, n: widths[widths.index(bits[n]) + 1]}, params) <= budget + 1e-9]
        if not movable:
            return bits
        name = movable[rng.integers(len(movable))]
        bits[name] = widths[widths.index(bits[name]) + 1]


def first_last_8(layers, params: dict, widths, budget: float) -> dict:
    ends = {layers[0].name, layers[-1].name}
    for low in sorted(widths, reverse=True):
        bits = {name: 8 if name in ends else low for name in params}
        if alloc.average_bits(bits, params) <= budget + 1e-9:
            return bits
    return {name: 8 if name in ends else min(widths) for name in params}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="efficientnet, mnist, digits, or a path to an .onnx model")
    parser.add_argument("--shared", default=datasets.DEFAULT_SHARED)
    parser.add_argument("--calib")
    parser.add_argument("--eval")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--bits", default="2,3,4,5,6,7,8")
    parser.add_argument("--sensitivity-samples", type=int, default=sensitivity.DEFAULT_SAMPLES)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    parser.add_argument("--resize", type=int)
    parser.add_argument("--crop", type=int)
    parser.add_argument("--mean", type=float, nargs="+", default=[0.0])
    parser.add_argument("--std", type=float, nargs="+", default=[1.0])
    parser.add_argument("--interpolation", default="bilinear")
    parser.add_argument("--channel-order", default="rgb")
    args = parser.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    widths = tuple(int(b) for b in args.bits.split(","))
    spec = prepare(args)
    os.makedirs(args.out, exist_ok=True)

    loaded = load_model(spec["model"])
    calib = open_samples(spec["calib"], loaded.inputs, spec["pre"])
    evaluator = Evaluator(loaded, open_samples(spec["eval"], loaded.inputs, spec["pre"], "evaluation"))
    params = {layer.name: layer.params for layer in loaded.layers}
    fp32 = evaluator.predictions(spec["model"])
    fp32_top1 = evaluator.top1(fp32)
    print(f"{spec['name']}: {len(loaded.layers)} layers, FP32 top-1 {fp32_top1:.2f}% on {len(fp32)} held-out "
          f"samples, {calib.count} calibration samples", flush=True)

    analyses, seconds, passes = {}, {}, {}
    for name, levels in (("msq", (1, 2, 4)), ("msq-single", (1,))):
        start = time.perf_counter()
        analyses[name] = analyse(loaded, calib, Options(bits=widths, levels=levels, quiet=True), _Timer())
        seconds[name] = time.perf_counter() - start
        passes[name] = calib.count
    msq: Analysis = analyses["msq"]
    start = time.perf_counter()
    measured, sensitivity_passes = sensitivity.measure(loaded, calib, msq.choices, msq.stats.input_mean, widths,
                                                       count=args.sensitivity_samples, quiet=True)
    seconds["sensitivity"] = time.perf_counter() - start + seconds["msq"]  # it needs the pass's statistics too
    passes["sensitivity"] = sensitivity_passes + calib.count
    minmax_choices = {layer.name: error_table(  # the same grids as msq's, only the clipping search left out
        layer, loaded.weight(layer), msq.stats.input_sq.get(layer.name), widths, search=False,
        mirrors={b: layer.kind.has_room(layer, b, msq.modes[layer.name].mode, "speed") for b in widths})
        for layer in loaded.layers}
    print("analysis seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), flush=True)

    def damage(analysis, exponent=alloc.IMPORTANCE_EXPONENT, residual=True):
        """The default's damage (pipeline._damage's ilp branch, without the activation modes' errors)."""
        return alloc.expected_damage(analysis.importance, analysis.choices, exponent, None,
                                     residual_weights(analysis, Options(residual_weights=residual)))

    rows, predictions = [], {}

    def evaluate(label, budget, bits, choices=None, bias_correction=True, analysis_key="msq", seed=None):
        bits = within_tables(bits, msq.choices)
        kept = {}
        top1 = score(loaded, msq, evaluator, bits, choices, bias_correction, kept)
        predicted, size = kept["predictions"], kept["bytes"]
        predictions[(label, budget, seed)] = predicted
        row = {"allocator": label, "budget": budget, "avg_bits": round(alloc.average_bits(bits, params), 4),
               "top1": round(top1, 2), "drop": round(fp32_top1 - top1, 2),
               "changed_vs_fp32": int((predicted != fp32).sum()), "bytes": size,
               "analysis_s": round(seconds.get(analysis_key, 0.0), 1), "forward_passes": passes.get(analysis_key, 0),
               "seed": seed, "bits": bits}
        rows.append(row)
        print(f"  {label:22s} budget {budget:<4} avg {row['avg_bits']:.3f} top-1 {top1:6.2f} "
              f"(drop {row['drop']:+.2f})", flush=True)

    for k in UNIFORM:
        if k in widths:
            evaluate(f"uniform-{k}", float(k), {name: k for name in params}, analysis_key="none")
    for budget in budgets:
        msq_bits = alloc.allocate_avg_bits("ilp", msq.importance, damage(msq), params, widths, budget)
        evaluate("msq", budget, msq_bits)
        single = analyses["msq-single"]
        evaluate("msq-single", budget, alloc.allocate_avg_bits("ilp", single.importance, damage(single), params, widths,
                                                      budget), analysis_key="msq-single")
        evaluate("msq-greedy", budget, alloc.allocate_avg_bits("greedy", msq.importance, None, params, widths, budget))
        evaluate("error-only", budget, alloc.allocate_avg_bits("ilp", msq.importance, damage(msq, 0.0), params, widths,
                                                      budget))
        evaluate("errors alike", budget, alloc.allocate_avg_bits("ilp", msq.importance, damage(msq, residual=False),
                                                        params, widths, budget))
        evaluate("sensitivity", budget, alloc.allocate_avg_bits("sensitivity", msq.importance,
                                                       sensitivity.monotone(measured), params, widths, budget),
                 analysis_key="sensitivity")
        minmax_damage = alloc.expected_damage(msq.importance, minmax_choices, alloc.IMPORTANCE_EXPONENT, None,
                                              alloc.residual_weights(msq.stats.residual_share))
        evaluate("msq min-max clip", budget, alloc.allocate_avg_bits("ilp", msq.importance, minmax_damage, params, widths,
                                                            budget), choices=minmax_choices)
        evaluate("msq no bias corr.", budget, msq_bits, bias_correction=False)
        evaluate("first-last-8", budget, first_last_8(loaded.layers, params, widths, budget), analysis_key="none")
        for seed in range(RANDOM_SEEDS):
            evaluate("random", budget, random_allocation(params, widths, budget, seed), analysis_key="none",
                     seed=seed)

    for row in rows:
        key = (row["allocator"], row["budget"], row["seed"])
        if row["allocator"] in ("msq", "error-only", "errors alike", "msq-single") and \
                ("sensitivity", row["budget"], None) in predictions:
            row["vs_sensitivity"] = compare(predictions[key], predictions[("sensitivity", row["budget"], None)],
                                            evaluator.labels)
    result = {"model": spec["name"], "fp32_top1": fp32_top1, "eval_samples": int(len(fp32)),
              "calib_samples": calib.count, "layers": len(loaded.layers), "widths": list(widths),
              "analysis_seconds": {k: round(v, 1) for k, v in seconds.items()}, "forward_passes": passes,
              "rows": rows}
    stem = os.path.join(args.out, spec["name"])
    with open(stem + ".json", "w") as handle:
        json.dump(result, handle, indent=1)
    write_markdown(result, stem + ".md")
    points = [{"label": r["allocator"], "avg_bits": r["avg_bits"], "top1": r["top1"]}
              for r in aggregate_random(rows) if not r["allocator"].startswith("uniform")]
    points += [{"label": "uniform", "avg_bits": r["avg_bits"], "top1": r["top1"]}
               for r in rows if r["allocator"].startswith("uniform")]
    plot_accuracy_vs_size(points, stem + ".png", f"{spec['name']}: top-1 on {len(fp32)} held-out samples "
                                                 f"(FP32 {fp32_top1:.1f}%)")
    print(f"wrote {stem}.json, .md, .png")
    return 0


def aggregate_random(rows: list) -> list:
    """Random rows folded into one per budget (mean, with the spread kept)."""
    out = [r for r in rows if r["allocator"] != "random"]
    for budget in sorted({r["budget"] for r in rows if r["allocator"] == "random"}):
        group = [r for r in rows if r["allocator"] == "random" and r["budget"] == budget]
        tops = np.array([r["top1"] for r in group])
        out.append({**group[0], "seed": None, "top1": round(float(tops.mean()), 2),
                    "top1_sd": round(float(tops.std()), 2), "avg_bits": round(float(np.mean([r["avg_bits"] for r in group])), 4),
                    "drop": round(float(np.mean([r["drop"] for r in group])), 2)})
    return out


def write_markdown(result: dict, path: str) -> None:
    lines = [f"### {result['model']}: FP32 top-1 {result['fp32_top1']:.2f}% on {result['eval_samples']} held-out "
             f"samples ({result['calib_samples']} for calibration)", "",
             "| allocator | budget | avg bits | top-1 | drop | changed vs FP32 | vs sensitivity | analysis s | "
             "forward passes |", "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for row in sorted(aggregate_random(result["rows"]), key=lambda r: (r["allocator"].startswith("uniform"),
                                                                      r["budget"], r["allocator"])):
        top1 = f"{row['top1']:.2f}" + (f" ± {row['top1_sd']:.2f}" if "top1_sd" in row else "")
        lines.append(f"| {row['allocator']} | {row['budget']} | {row['avg_bits']:.3f} | {top1} | {row['drop']:.2f} | "
                     f"{row['changed_vs_fp32']} | {row.get('vs_sensitivity', '')} | {row['analysis_s']} | "
                     f"{row['forward_passes']} |")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

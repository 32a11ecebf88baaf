"""Accuracy against the bytes really written, EfficientNet-Lite0: --prefer speed and size at several budgets.

Each point is one CLI conversion (300 calibration / 1,000 evaluation ImageNet images, the split of
bench/datasets.py); its held-out top-1, bytes written, gzip -9 bytes and batch-1 latency (1 thread,
interleaved with FP32 and ORT's own uniform int8 QDQ model in the same run) come from the conversion's
own report, whose numbers are measured on the written file. ORT's int8 file (quantize_static with the
same ranges) is built and gzipped here as the anchor (its top-1 is in the allocator benchmark). With docs/bench/minilm-l6.json from
bench/text_bench.py present, its rows are plotted beside.

    python bench/real_bytes.py [--budgets 3 3.5 4 5] [--shared ../shared]
Writes docs/bench/bytes-efficientnet.json, .md and docs/bench/bytes.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import datasets  # noqa: E402


def convert(model: str, work: str, calib: str, evaluation: str, name: str, flags: list[str]) -> dict:
    data = datasets.run_cli(model, work, calib, evaluation, name, [*datasets.EFFICIENTNET_ARGS, *flags])
    evaluation_ = data["evaluation"]
    return {"name": name, "flags": " ".join(flags), "top1": evaluation_["quant_top1"], "fp32_top1": evaluation_["fp32_top1"],
            "avg_bits": data["avg_weight_bits"], "bytes": data["size_bytes"]["file"],
            "gzip": data["size_bytes"]["gzip"], "latency_ms": data["latency_ms"], "modes": data["modes"],
            "containers": sorted({layer["container"] for layer in data["layers"]})}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=datasets.DEFAULT_SHARED)
    parser.add_argument("--budgets", nargs="+", type=float, default=[3.0, 3.5, 4.0, 5.0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    parser.add_argument("--replot", action="store_true", help="only redraw bytes.png from the saved JSON files")
    args = parser.parse_args(argv)
    if args.replot:
        replot(args.out)
        return 0
    model = os.path.join(args.shared, "models", "efficientnet-lite0.onnx")
    if not os.path.exists(model):
        print(f"skipped: {model} not found (set --shared or MSQ_SHARED)")
        return 0
    from msq_onnx.report import gzip_size

    rows = []
    with tempfile.TemporaryDirectory(prefix="msq-bytes-") as work:
        calib, evaluation = datasets.imagenet_split(args.shared, work)
        for budget in args.budgets:
            for prefer in ("speed", "size"):
                rows.append(convert(model, work, calib, evaluation, f"{prefer}-{budget:g}",
                                    ["--avg-bits", f"{budget:g}", "--prefer", prefer]))
                print(json.dumps(rows[-1]), flush=True)
        # ORT's uniform int8 QDQ file, built from the same ranges (each report timed it beside ours)
        from msq_onnx.data import Preprocess, open_samples
        from msq_onnx.instrument import run_pass
        from msq_onnx.load import load_model, save_model_file
        from msq_onnx.verify import reference_int8

        loaded = load_model(model)
        pre = Preprocess(**datasets.efficientnet_preprocess())
        stats = run_pass(loaded, open_samples(calib, loaded.inputs, pre), (1,), 64, quiet=True)
        fp32 = os.path.join(work, "fp32.onnx")
        save_model_file(loaded.model, fp32)
        yardstick = reference_int8(fp32, work, True, stats.ranges, per_channel=True)  # a user's file
        reference, failed = yardstick.path, yardstick.failed
        if reference is None:
            raise SystemExit(f"ORT's int8 model of EfficientNet-Lite0 {failed}")
        anchor = {"name": "ORT quantize_static int8 (same ranges)", "bytes": os.path.getsize(reference),
                  "gzip": gzip_size([reference])}
    result = {"model": "efficientnet-lite0", "rows": rows, "ort_int8": anchor,
              "command": "python bench/real_bytes.py " + " ".join(f"{b:g}" for b in args.budgets)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bytes-efficientnet.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    lines = ["| config | avg bits | top-1 | bytes | / ORT int8 | gzip -9 | / ORT int8 gzip | latency ms | "
             "/ ORT int8 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ort_ms = row["latency_ms"].get("ort_static_int8")
        lines.append(f"| {row['name']} | {row['avg_bits']:.2f} | {row['top1']:.1f} | {row['bytes']:,} | "
                     f"{row['bytes'] / anchor['bytes']:.3f} | {row['gzip']:,} | {row['gzip'] / anchor['gzip']:.3f} | "
                     f"{row['latency_ms']['output']:.2f} | {row['latency_ms']['output'] / ort_ms:.2f} |")
    lines.append(f"| ORT int8 | 8 | - | {anchor['bytes']:,} | 1 | {anchor['gzip']:,} | 1 | | |")
    with open(os.path.join(args.out, "bytes-efficientnet.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(result, os.path.join(args.out, "minilm-l6.json"), os.path.join(args.out, "bytes.png"))
    return 0


def replot(out: str) -> None:
    """Redraw docs/bench/bytes.png from the saved JSON files, without converting again."""
    with open(os.path.join(out, "bytes-efficientnet.json")) as handle:
        plot(json.load(handle), os.path.join(out, "minilm-l6.json"), os.path.join(out, "bytes.png"))


def plot(result: dict, minilm_json: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if os.path.exists(minilm_json) else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    axis = axes[0][0]
    for prefer, marker in (("speed", "o"), ("size", "s")):
        points = sorted((r["bytes"] / 1e6, r["top1"]) for r in result["rows"] if r["name"].startswith(prefer))
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=f"msq-onnx --prefer {prefer}")
    axis.axvline(result["ort_int8"]["bytes"] / 1e6, color="gray", linestyle="--", label="ORT int8 file")
    axis.axhline(result["rows"][0]["fp32_top1"], color="black", linewidth=0.8, label="FP32")
    axis.set(xlabel="bytes written (MB)", ylabel="top-1 (%)", title="EfficientNet-Lite0")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    if panels == 2:
        minilm = json.load(open(minilm_json))
        axis = axes[0][1]
        for row in minilm.get("models", []):
            if row.get("top1") is None or row.get("bytes") is None:
                continue
            axis.scatter(row["bytes"] / 1e6, row["top1"], label=row.get("name"))
        axis.set(xlabel="bytes written (MB)", ylabel="nearest-class-mean top-1 (%)", title="MiniLM-L6")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())

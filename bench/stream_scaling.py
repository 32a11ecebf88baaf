"""AWQ-style scaling of EfficientNet-Lite0's 1x1 convolutions' input channels (issue "three bits and below";
measured on the layers, not built).

A residual stream is linear between a block's project convolution and the expand convolutions that read it, so a
channel could be divided by s_c at its producers (free: their grids are per output channel) and multiplied by s_c in
its readers' weights, favouring the input channels with large activations as AWQ does for weight-only layers. Before
building it, this measures what the allocator would read: each 1x1 convolution's input-weighted relative error
(`weights.search_clips`, the shipped clipping search) at 2, 3 and 4 bits, unscaled against the best of
s = E[x_c^2]^(alpha/2) over alpha in ALPHAS (geometric mean 1), from one calibration pass's input moments.

    python bench/stream_scaling.py [--shared ../shared]
Writes docs/bench/stream-scaling.json and .md; skips without ../shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import datasets  # noqa: E402

ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
WIDTHS = (2, 3, 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=datasets.DEFAULT_SHARED)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    args = parser.parse_args(argv)
    model = os.path.join(args.shared, "models", "efficientnet-lite0.onnx")
    if not os.path.exists(model):
        print(f"skipped: {model} not found (set --shared or MSQ_SHARED)")
        return 0
    from msq_onnx.data import Preprocess, open_samples
    from msq_onnx.instrument import run_pass
    from msq_onnx.load import load_model
    from msq_onnx.pipeline import Options
    from msq_onnx.weights import as_matrix, input_weights, search_clips

    calib, _ = datasets.imagenet_split(args.shared, tempfile.mkdtemp(prefix="msq-streams-"))
    loaded = load_model(model)
    samples = open_samples(calib, loaded.inputs, Preprocess(**datasets.efficientnet_preprocess()))
    stats = run_pass(loaded, samples, Options.levels, 1024, quiet=True)
    rows = []
    for layer in loaded.layers:
        if layer.op_type != "Conv" or layer.weight_shape[2:] != (1, 1):
            continue
        weight = as_matrix(layer, loaded.weight(layer).astype(np.float32))
        power = np.asarray(stats.input_sq[layer.name], np.float64)
        row = {"layer": layer.name, "shape": list(weight.shape),
               "rms_spread": float(np.sqrt(power.max() / np.median(power)))}
        for bits in WIDTHS:
            plain = search_clips(weight, input_weights(layer, power), bits, mirror=True).error
            best, best_alpha = plain, 0.0
            for alpha in ALPHAS:
                scale = np.power(np.maximum(power, 1e-12), alpha / 2)
                scale = scale / np.exp(np.mean(np.log(scale)))
                error = search_clips(weight * scale[None, :], input_weights(layer, power / scale ** 2), bits,
                                     mirror=True).error
                if error < best:
                    best, best_alpha = error, alpha
            row[f"{bits}"] = {"unscaled": plain, "scaled": best, "alpha": best_alpha}
        rows.append(row)
    columns = ["layer", "input RMS, largest channel / median"] + [f"{b} bits: unscaled -> best scaled (alpha)"
                                                                   for b in WIDTHS]
    header = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]

    def line(row):
        cells = [row["layer"], f"{row['rms_spread']:.1f}"] + [
            f"{row[str(b)]['unscaled']:.4f} -> {row[str(b)]['scaled']:.4f} ({row[str(b)]['alpha']:g})" for b in WIDTHS]
        return "| " + " | ".join(cells) + " |"

    datasets.save_table(args.out, "stream-scaling", rows, header, line)
    improved = [row["layer"] for row in rows if row["3"]["scaled"] < 0.97 * row["3"]["unscaled"]]
    print(json.dumps({"layers": len(rows), "3-bit error down by over 3%": improved}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

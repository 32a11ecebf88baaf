"""Issue "conversion faster than ORT's quantize_static" beyond its two models: a ResNet-50 and a BERT-base, random-init.

Both come from transformers' configs with their default sizes (ResNetConfig: ResNet-50, here with ImageNet's
1,000-class head, 25.6 M parameters; BertConfig: 12 layers x 768, vocabulary 30,522, 110 M), weights from a fixed
seed, nothing downloaded, exported with torch's legacy exporter at opset 17. Speed and memory do not depend on
what the weights learned, so random weights measure them as trained ones would. Calibration: 300 samples in a .npz, standard-normal 224 x 224 images for
the ResNet; for the BERT token ids with 16..128 real tokens right-padded to 128 (attention_mask 0 on the padding),
as a tokenizer's fixed-length export would give them. Each model then goes through `bench/compare_ort.py --onnx`
(best of --repeats alternating conversions, --avg-bits 4, and the batch-1 latencies).

    python bench/larger_models.py [--models resnet50 bert-base] [--repeats 2]

Writes docs/bench/timing-<model>.json and docs/bench/larger-models.md. Skips when torch or transformers is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import compare_ort  # noqa: E402
import run_bench  # noqa: E402

SAMPLES = 300
SEQUENCE = 128


def export(name: str, work: str) -> None:
    """Write work/<name>.onnx and its calibration work/<name>.npz."""
    import torch
    import transformers as hf

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model_path, calib = os.path.join(work, f"{name}.onnx"), os.path.join(work, f"{name}.npz")
    if name == "resnet50":
        model = hf.ResNetForImageClassification(hf.ResNetConfig(num_labels=1000)).eval()  # ImageNet's head

        class Logits(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, pixels):
                return self.inner(pixel_values=pixels).logits

        torch.onnx.export(Logits(model).eval(), (torch.randn(1, 3, 224, 224),), model_path,
                          input_names=["pixel_values"], output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
        np.savez(calib, pixel_values=rng.standard_normal((SAMPLES, 3, 224, 224)).astype(np.float32))
    else:
        model = hf.BertModel(hf.BertConfig()).eval()

        class Hidden(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, ids, mask):
                out = self.inner(input_ids=ids, attention_mask=mask)
                return out.last_hidden_state, out.pooler_output

        sequence = {0: "batch", 1: "sequence"}
        torch.onnx.export(Hidden(model).eval(), (torch.randint(1000, 30000, (1, SEQUENCE)),
                                                 torch.ones(1, SEQUENCE, dtype=torch.long)), model_path,
                          input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state", "pooler_output"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": sequence, "attention_mask": sequence,
                                        "last_hidden_state": sequence, "pooler_output": {0: "batch"}})
        ids = np.zeros((SAMPLES, SEQUENCE), np.int64)
        mask = np.zeros((SAMPLES, SEQUENCE), np.int64)
        for row, length in enumerate(rng.integers(16, SEQUENCE + 1, SAMPLES)):
            ids[row, :length] = rng.integers(1000, 30000, length)
            mask[row, :length] = 1
        np.savez(calib, input_ids=ids, attention_mask=mask)


def write_table(out: str) -> list[str]:
    """docs/bench/larger-models.md from every model measured so far (this run's, and an earlier run's of the other)."""
    lines = ["| model | ours / ORT wall | ratio | ours / ORT peak MiB | ratio | batch-1 latency vs ORT int8 |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in ("resnet50", "bert-base"):
        path = os.path.join(out, f"timing-{name}.json")
        if not os.path.exists(path):
            continue
        with open(path) as handle:
            r = json.load(handle)
        c = r["conversion"]
        lines.append(f"| {name} | {c['msq']['wall_s']} / {c['ort']['wall_s']} s | {r['wall_ratio']}x | "
                     f"{c['msq']['peak_mib']} / {c['ort']['peak_mib']} | {r['memory_ratio']}x | "
                     f"{r.get('latency_vs_ort_int8', '')}x |")
    with open(os.path.join(out, "larger-models.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=("resnet50", "bert-base"), default=["resnet50", "bert-base"])
    parser.add_argument("--repeats", type=int, default=2, help="conversions of each kind; the fastest counts")
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    parser.add_argument("--export", nargs=2, metavar=("MODEL", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.export:
        export(*args.export)
        return 0
    import importlib.util

    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"skipped: {', '.join(missing)} not installed (pip install torch==2.13.0 transformers)")
        return 0
    work = run_bench._work_folder()
    for name in args.models:
        # Exported in a child: a child's peak RSS counts what it inherits at fork, so the process that starts the
        # measured conversions must stay small (with torch loaded here both tools measured 1,121 MiB).
        subprocess.run([sys.executable, os.path.abspath(__file__), "--export", name, work], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        model, calib = os.path.join(work, f"{name}.onnx"), os.path.join(work, f"{name}.npz")
        compare_ort.compare_model(name, model, calib, {}, [], args, work)
    lines = write_table(args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

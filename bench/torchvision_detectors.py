"""Any model in: torchvision's detectors as torchvision exports them, their NMS inside If nodes and their outputs
boxes [K, 4], labels [K], scores [K] of a length the selections decide; SSDlite also exported on one image [3, H, W]
with no batch axis (its input given whole: sample_axes). Random weights (no download), so the
runs show what the tool does with the graph (no crash; every kept row judged; what it says), not accuracy.

torchvision fails to import beside torch==2.13.0, so the export runs in another Python that has it, e.g. a venv
with `pip install torch==2.14.1 torchvision==0.29.1 onnx` (a CUDA build of several GB, from the machine's disk):

    python bench/torchvision_detectors.py --python /tmp/tv/bin/python [--shared ../shared] [--budgets 8 4]

Calibration: the first 64 ImageNet images of ../shared at 320 x 320 in [0, 1] (the detectors normalize inside);
held out: 32 from the 601st on. Writes docs/bench/torchvision-detectors.json and .md; skips without ../shared or
without a Python that imports torchvision.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import datasets  # noqa: E402
from more_models import image_arrays  # noqa: E402

EXPORT = """
import sys, torch, torchvision
torch.manual_seed(0)
name, path = sys.argv[1], sys.argv[2]
unbatched = name.endswith("-unbatched")  # exported on one image [3, H, W], the list torchvision's forward takes
name = name.removesuffix("-unbatched")
detection = torchvision.models.detection
# each model's own order of its output dict
build, names = {"ssdlite320": (detection.ssdlite320_mobilenet_v3_large, ["boxes", "scores", "labels"]),
                "fasterrcnn-mobilenet320": (detection.fasterrcnn_mobilenet_v3_large_320_fpn,
                                            ["boxes", "labels", "scores"])}[name]
model = build(weights=None, weights_backbone=None, num_classes=5).eval()
image = [torch.rand(3, 320, 320)] if unbatched else torch.rand(1, 3, 320, 320)
torch.onnx.export(model, (image,), path, opset_version=17, input_names=["images"],
                  output_names=names, dynamo=False)
"""
MODELS = ("ssdlite320", "fasterrcnn-mobilenet320", "ssdlite320-unbatched")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", required=True, help="a Python that imports torch and torchvision")
    parser.add_argument("--shared", default=datasets.DEFAULT_SHARED)
    parser.add_argument("--budgets", nargs="+", default=["8", "4"])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="msq-tv-") as work:
        data = image_arrays(args.shared, work, "images", "images", 320, 320, "unit", (64, 32))
        if data is None:
            print("skipped: no ImageNet images in --shared")
            return 0
        for name in MODELS:
            path = os.path.join(work, name + ".onnx")
            done = subprocess.run([args.python, "-c", EXPORT, name, path], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"skipped {name}: the export failed: {done.stderr.strip()[-300:]}")
                continue
            for budget in args.budgets:
                report = datasets.run_cli(path, work, *data, f"{name}-{budget}", ["--avg-bits", budget])
                outputs = report["evaluation"]["outputs"]
                results.append({"model": name, "budget": budget, "judged": report["activation_modes"].get("judged"),
                                "outputs": {k: {key: v.get(key) for key in ("cosine", "length_agreement",
                                                                             "selected_by")}
                                            for k, v in outputs.items()},
                                "modes": report["modes"], "warnings": report["warnings"]})
                print(json.dumps(results[-1]), flush=True)
    if not results:
        return 0

    def row(r) -> str:
        outputs = "; ".join(f"{k} {v['cosine']:.4f}, lengths {v['length_agreement']:.1f}%"
                            for k, v in r["outputs"].items() if v.get("length_agreement") is not None)
        modes = datasets.modes_text(r["modes"])
        return f"| {r['model']} | {r['budget']} | {outputs} | {modes} | {len(r['warnings'])} |"

    datasets.save_table(args.out, "torchvision-detectors", results,
                        ["| model (random weights) | budget | outputs: pooled cosine, runs of FP32's length | modes "
                         "| warnings |", "|---|---:|---|---|---:|"], row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

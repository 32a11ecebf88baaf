"""Fixed-seed calibration/evaluation splits of the real data in ../shared.

Benchmarks only: the package and its tests never need ../shared. The folder
comes from --shared or MSQ_SHARED (default ../shared beside the checkout).
"""

from __future__ import annotations

import csv
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SHARED = os.environ.get("MSQ_SHARED", os.path.join(HERE, "..", "..", "shared"))

# The preprocessing ../shared/README.md gives for EfficientNet-Lite0.
EFFICIENTNET_ARGS = ["--resize", "256", "--crop", "224", "--interpolation", "bicubic",
                     "--mean", "127", "--std", "128"]


def imagenet_split(shared: str, work: str, calib: int = 300, seed: int = 0) -> tuple[str, str]:
    """Write calib.csv / eval.csv (absolute paths) for the 1,300 ImageNet images."""
    root = os.path.abspath(os.path.join(shared, "data", "imagenet-val-1300"))
    with open(os.path.join(root, "labels.csv"), newline="") as handle:
        rows = [r for r in csv.DictReader(handle)]
    order = np.random.default_rng(seed).permutation(len(rows))
    paths = []
    for name, part in (("imagenet-calib.csv", order[:calib]), ("imagenet-eval.csv", order[calib:])):
        path = os.path.join(work, name)
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "label"])
            for i in sorted(part):
                writer.writerow([os.path.join(root, "images", rows[i]["file"]), rows[i]["label"]])
        paths.append(path)
    return paths[0], paths[1]


def mnist_split(shared: str, work: str, calib: int = 500, seed: int = 0) -> tuple[str, str]:
    """Write mnist-calib.npz / mnist-eval.npz with the input named as mnist-8's (Input3)."""
    data = np.load(os.path.join(shared, "data", "mnist-t10k", "mnist-t10k.npz"), allow_pickle=False)
    order = np.random.default_rng(seed).permutation(len(data["labels"]))
    paths = []
    for name, part in (("mnist-calib.npz", order[:calib]), ("mnist-eval.npz", order[calib:])):
        path = os.path.join(work, name)
        part = np.sort(part)
        np.savez(path, Input3=data["images"][part][:, None].astype(np.float32), labels=data["labels"][part])
        paths.append(path)
    return paths[0], paths[1]

"""Stage 4: weight-imprinted classifiers on each layer's embeddings.

Class weights are normalized class means (Qi et al. 2018); the accuracy is
leave-one-out: each sample is scored against its own class mean computed
without it, so no sample helps predict itself. With a few samples per class
(300 ImageNet images over ~1,000 classes) LOO on the true classes is mostly
noise, so such label sets are replaced by pseudo-classes: k-means clusters
of the FP32 model's outputs, several samples each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_PER_CLASS = 3  # median class size below which labels are clustered
SAMPLES_PER_CLUSTER = 10


@dataclass
class Labels:
    values: np.ndarray
    source: str  # "labels", "fp32-top1", or "clusters(<from>)"
    classes: int


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64, copy=False)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _cluster(outputs: np.ndarray, seed: int) -> np.ndarray:
    from scipy.cluster.vq import kmeans2

    k = max(2, int(round(len(outputs) / SAMPLES_PER_CLUSTER)))
    points = normalize_rows(outputs - outputs.mean(axis=0))
    _, assignment = kmeans2(points, k, minit="++", seed=np.random.default_rng(seed))
    return np.unique(assignment, return_inverse=True)[1]


def imprint_labels(labels: np.ndarray | None, fp32_outputs: np.ndarray, seed: int = 0) -> Labels:
    """Ground truth when given, else FP32 top-1; clustered when classes are too small."""
    if labels is not None:
        values, source = labels, "labels"
    else:
        values, source = fp32_outputs.argmax(axis=1), "fp32-top1"
    _, counts = np.unique(values, return_counts=True)
    if np.median(counts[np.searchsorted(np.unique(values), values)]) < MIN_PER_CLASS:
        values, source = _cluster(fp32_outputs, seed), f"clusters({source})"
    values = np.unique(values, return_inverse=True)[1]
    return Labels(values=values, source=source, classes=int(values.max()) + 1)


def loo_accuracy(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out top-1 of a cosine classifier with imprinted (class-mean) weights.

    Embeddings are centered on the set's mean before L2 normalization: after a
    ReLU every embedding lies in the positive orthant and raw cosines barely
    separate classes. Samples alone in their class cannot be scored and are
    skipped.
    """
    f = normalize_rows(embeddings - embeddings.mean(axis=0))
    classes = int(labels.max()) + 1
    sums = np.zeros((classes, f.shape[1]))
    np.add.at(sums, labels, f)
    counts = np.bincount(labels, minlength=classes)
    sum_norms = np.linalg.norm(sums, axis=1)
    scores = f @ (sums / np.maximum(sum_norms, 1e-12)[:, None]).T
    own_dot = scores[np.arange(len(f)), labels] * sum_norms[labels]  # f_i . S_c
    rest_norm = np.sqrt(np.maximum(sum_norms[labels] ** 2 - 2 * own_dot + 1.0, 0.0))
    scores[np.arange(len(f)), labels] = np.where(rest_norm > 1e-9, (own_dot - 1.0) / np.maximum(rest_norm, 1e-12),
                                                 -np.inf)
    scored = counts[labels] >= 2
    if not scored.any():
        return 0.0
    return float((scores.argmax(axis=1) == labels)[scored].mean())


def layer_accuracies(features: dict, input_features: np.ndarray, labels: Labels) -> tuple[dict, float]:
    accuracies = {name: loo_accuracy(matrix, labels.values) for name, matrix in features.items()}
    return accuracies, loo_accuracy(input_features, labels.values)

import numpy as np
import pytest

from msq_onnx.imprint import imprint_labels, loo_scores


def loo_accuracy(embeddings, labels):
    return loo_scores(embeddings, labels).top1


def clustered(classes=5, per_class=8, dim=16, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def test_separable_classes_score_perfectly():
    x, y = clustered()
    assert loo_accuracy(x, y) == 1.0


def test_random_embeddings_score_near_chance():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(10), 30)
    accuracy = loo_accuracy(rng.normal(size=(300, 64)), y)
    assert accuracy < 0.25


def test_leave_one_out_never_lets_a_sample_predict_itself():
    # Two samples per class, each far from its class mate: with the sample in
    # its own class mean it would always win; left out it must not.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 50))
    y = np.repeat(np.arange(10), 2)
    assert loo_accuracy(x, y) < 0.5


def test_singleton_classes_are_not_scored():
    x, y = clustered(classes=3, per_class=5)
    x = np.vstack([x, np.random.default_rng(3).normal(size=(1, x.shape[1]))])
    y = np.append(y, 3)  # a class with one sample cannot be held out
    assert loo_accuracy(x, y) == 1.0


def test_labels_kept_when_classes_have_samples():
    x, y = clustered()
    labels = imprint_labels(y, x, seed=0)
    assert labels.source == "labels" and labels.classes == 5


def test_few_samples_per_class_become_clusters_of_the_outputs():
    outputs, _ = clustered(classes=4, per_class=20, spread=0.01)
    labels = imprint_labels(np.arange(80), outputs, seed=0)  # one sample per class
    assert labels.source.startswith("clusters")
    assert 2 <= labels.classes <= 8
    _, counts = np.unique(labels.values, return_counts=True)
    assert counts.min() >= 2


def test_no_labels_uses_fp32_top1():
    outputs = np.eye(3)[np.repeat(np.arange(3), 6)] + 0.01
    labels = imprint_labels(None, outputs, seed=0)
    assert labels.source == "fp32-top1"
    assert np.array_equal(labels.values, np.repeat(np.arange(3), 6))


def test_clustering_is_seeded():
    outputs, _ = clustered(classes=6, per_class=10, spread=0.5)
    a = imprint_labels(np.arange(60), outputs, seed=7).values
    b = imprint_labels(np.arange(60), outputs, seed=7).values
    assert np.array_equal(a, b)


def test_a_dead_layer_scores_at_chance_not_below():
    from msq_onnx.imprint import loo_scores

    y = np.repeat(np.arange(4), 5)
    scores = loo_scores(np.ones((20, 8)), y)  # every embedding equal: nothing to separate
    assert scores.soft == pytest.approx(0.25)


def test_one_value_outputs_are_binned_by_value_without_warnings():
    """A voice detector's probability [N, 1]: its centred rows normalized are only +-1, which k-means could not
    split (empty clusters, scipy's warnings on the user's terminal)."""
    import warnings

    from msq_onnx.imprint import SAMPLES_PER_CLUSTER, imprint_labels

    values = np.random.default_rng(0).uniform(0, 1, (6 * SAMPLES_PER_CLUSTER, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = imprint_labels(None, values, class_scores=False)
    assert labels.classes == 6 and labels.source == "clusters(fp32-outputs)"
    order = labels.values[np.argsort(values[:, 0])]
    assert np.all(np.diff(order) >= 0) and np.bincount(labels.values).min() >= SAMPLES_PER_CLUSTER - 1

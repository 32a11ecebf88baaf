import numpy as np

from msq_onnx.features import FeatureBank, _bin_edges, cap_channels, embed, pyramid_pool


def naive_pool(x, levels):
    out = []
    for b in levels:
        for top, bottom in _bin_edges(x.shape[2], b):
            for left, right in _bin_edges(x.shape[3], b):
                out.append(x[:, :, top:bottom, left:right].mean(axis=(2, 3)))
    return np.stack(out, axis=2)


def test_pyramid_matches_adaptive_average_pooling_on_odd_sizes():
    x = np.random.default_rng(0).normal(size=(3, 5, 7, 9)).astype(np.float32)
    pooled = pyramid_pool(x, (1, 2, 4))
    assert pooled.shape == (3, 5, 21)
    np.testing.assert_allclose(pooled, naive_pool(x, (1, 2, 4)), atol=1e-5)


def test_level_one_is_global_average():
    x = np.random.default_rng(1).normal(size=(2, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(pyramid_pool(x, (1,))[:, :, 0], x.mean(axis=(2, 3)), atol=1e-5)


def test_bins_larger_than_the_map_are_never_empty():
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    pooled = pyramid_pool(x, (4,))
    assert np.isfinite(pooled).all() and pooled.shape == (2, 3, 16)


def test_sequences_pool_along_time_and_channels_last_is_respected():
    x = np.random.default_rng(2).normal(size=(2, 8, 5)).astype(np.float32)  # [N, T, C]
    pooled = pyramid_pool(x, (1, 2), channels_last=True)
    assert pooled.shape == (2, 5, 3)
    np.testing.assert_allclose(pooled[:, :, 0], x.mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(pooled[:, :, 1], x[:, :4].mean(axis=1), atol=1e-5)


def test_flat_features_pass_through():
    x = np.random.default_rng(3).normal(size=(4, 10)).astype(np.float32)
    np.testing.assert_array_equal(embed(x, max_dim=100), x)


def test_cap_averages_channel_groups_within_the_limit():
    pooled = np.random.default_rng(4).normal(size=(2, 10, 3)).astype(np.float32)
    capped = cap_channels(pooled, max_dim=15)
    assert capped.shape[1] <= 15
    # groups of 2 neighbouring channels
    np.testing.assert_allclose(capped.reshape(2, -1, 3)[:, 0], pooled[:, :2].mean(axis=1), atol=1e-6)


def test_bank_concatenates_batches_in_order():
    bank = FeatureBank(["a"], levels=(1,), max_dim=64)
    first, second = np.ones((2, 3, 4, 4), np.float32), np.zeros((1, 3, 4, 4), np.float32)
    bank.add("a", first)
    bank.add("a", second)
    matrix = bank.matrices()["a"]
    assert matrix.shape == (3, 3)
    assert matrix[:2].sum() == 6 and matrix[2].sum() == 0

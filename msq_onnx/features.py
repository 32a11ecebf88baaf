"""Stage 3: pyramid pooling of probe tensors into small per-sample embeddings.

Each batch of a probe tensor is reduced at once to C x (sum of b^2) values per
sample, so the calibration pass never keeps a full activation.
"""

from __future__ import annotations

import functools

import numpy as np

DEFAULT_LEVELS = (1, 2, 4)
DEFAULT_MAX_DIM = 1024
DEFAULT_MAX_SAMPLES = 300  # embeddings kept for imprinting; calibration beyond this only refines ranges
_F16_MAX = float(np.finfo(np.float16).max)


def _bin_edges(size: int, bins: int):
    # Adaptive average pooling's bins (as in torch): they overlap when size is
    # not a multiple of bins and are never empty, even when bins > size.
    return [(int(np.floor(i * size / bins)), int(np.ceil((i + 1) * size / bins))) for i in range(bins)]


@functools.lru_cache(maxsize=512)
def _pooling_matrix(size: int, levels: tuple) -> np.ndarray:
    """Rows average the bins of every level along one axis: [sum(levels), size]."""
    rows = []
    for b in levels:
        for start, stop in _bin_edges(size, b):
            row = np.zeros(size, np.float32)
            row[start:stop] = 1.0 / max(stop - start, 1)  # an empty axis (a run that kept no box) pools to zeros
            rows.append(row)
    return np.stack(rows)


def _channels_first(probe: np.ndarray, channels_last: bool) -> np.ndarray:
    """View any probe as [N, C, *spatial]."""
    if probe.ndim == 1:
        return probe.reshape(-1, 1)
    if channels_last and probe.ndim >= 3:
        probe = np.moveaxis(probe, -1, 1)
    return probe


def _masked_pooling(mask: np.ndarray, levels: tuple) -> np.ndarray:
    """[N, sum(levels), T]: per sample, the pyramid's segments over its real tokens only.

    The sequence analogue of the image pyramid: level b cuts the sample's
    unpadded tokens (wherever the mask puts them) into b consecutive segments
    of equal length and averages each; padding never enters a feature.
    Every layer of a batch pools with the same mask: the matrices are kept.
    """
    return _masked_pooling_cached(mask.shape, np.asarray(mask).astype(bool).tobytes(), tuple(levels))


@functools.lru_cache(maxsize=4)
def _masked_pooling_cached(shape: tuple, mask_bytes: bytes, levels: tuple) -> np.ndarray:
    mask = np.frombuffer(mask_bytes, bool).reshape(shape)
    matrices = np.zeros((mask.shape[0], sum(levels), mask.shape[1]), np.float32)
    for i, row in enumerate(mask):
        positions = np.flatnonzero(row)
        if len(positions):
            matrices[i][:, positions] = _pooling_matrix(len(positions), levels)
    matrices.flags.writeable = False  # shared by every layer of the batch
    return matrices


def pyramid_pool(probe: np.ndarray, levels=DEFAULT_LEVELS, channels_last: bool = False,
                 mask: np.ndarray | None = None) -> np.ndarray:
    """[N, C, H, W] -> [N, C, sum(b*b)]; [N, C, T] -> [N, C, sum(b)]; [N, C] -> [N, C, 1].

    Bin averages are two small matrix products (all levels at once), which is
    an order of magnitude faster than slicing the bins one by one. A sequence
    with its attention mask [N, T] is pooled over its real tokens only.
    """
    levels = tuple(levels)
    probe = np.asarray(probe, dtype=np.float32)
    if channels_last and probe.ndim == 3 and mask is not None and mask.shape == probe.shape[:2]:
        # [N, b, T] @ [N, T, C] on the probe as it comes: a batched product, no transposed copy
        return np.swapaxes(np.matmul(_masked_pooling(mask, levels), probe), 1, 2)
    x = _channels_first(probe, channels_last)
    if x.ndim == 2:
        return x[:, :, None]
    if x.ndim > 4:
        x = x.reshape(x.shape[0], x.shape[1], -1)
    if x.ndim == 3:
        if mask is not None and mask.shape == (x.shape[0], x.shape[2]):
            return np.matmul(x, np.swapaxes(_masked_pooling(mask, levels), 1, 2))
        return x @ _pooling_matrix(x.shape[2], levels).T
    rows, cols = pooling_matrices(x.shape[2], x.shape[3], levels)
    return grid_pyramid(rows @ (x @ cols), levels)


def pooling_matrices(height: int, width: int, levels) -> tuple[np.ndarray, np.ndarray]:
    """([L, H], [W, L]) with L = sum(levels): rows @ map @ cols averages every bin of every level."""
    levels = tuple(levels)
    return _pooling_matrix(height, levels), _pooling_matrix(width, levels).T


def flat_pooling_matrix(height: int, width: int, levels) -> np.ndarray:
    """[H*W, sum(b*b)]: a flattened map times it gives the pyramid in pyramid_pool's order, every bin of every
    level in one product."""
    rows, cols = pooling_matrices(height, width, levels)
    columns, offset = [], 0
    for b in levels:
        for i in range(b):
            for j in range(b):
                columns.append(np.outer(rows[offset + i], cols[:, offset + j]).ravel())
        offset += b
    return np.stack(columns, axis=1).astype(np.float32)


def grid_pyramid(grid: np.ndarray, levels) -> np.ndarray:
    """[N, C, L, L] bin averages of all level pairs -> [N, C, sum(b*b)]: the level blocks on the diagonal."""
    blocks, offset = [], 0
    for b in levels:
        blocks.append(grid[:, :, offset:offset + b, offset:offset + b].reshape(grid.shape[0], grid.shape[1], b * b))
        offset += b
    return np.concatenate(blocks, axis=2)


@functools.lru_cache(maxsize=256)
def _hashing(dim: int, max_dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed feature hashing: input j goes to bucket columns[j] with sign signs[j], fixed by the seed."""
    rng = np.random.default_rng([seed, dim, max_dim])
    return rng.integers(0, max_dim, dim), rng.choice(np.array([-1.0, 1.0], np.float32), dim)


@functools.lru_cache(maxsize=256)
def _hashing_matrix(dim: int, max_dim: int, seed: int):
    """[max_dim, dim] CSR: row b sums, signed, the inputs hashed to bucket b."""
    from scipy import sparse

    columns, signs = _hashing(dim, max_dim, seed)
    return sparse.csr_matrix((signs, (columns, np.arange(dim))), shape=(max_dim, dim), dtype=np.float32)


def cap_dimension(pooled: np.ndarray, max_dim: int, seed: int = 0) -> np.ndarray:
    """Flatten to [N, C x bins]; wider embeddings are signed-hashed down to max_dim.

    Hashing keeps inner products (and so the cosine classifier) unbiased. The
    alternative tried first, averaging neighbouring channels, cost wide layers
    most of their predictor accuracy (EfficientNet-Lite0's 1280-channel head,
    predictor top-1 in the --report of commit cd4b93e vs now: 0.16 vs 0.54).
    """
    flat = pooled.reshape(pooled.shape[0], -1)
    if flat.shape[1] <= max_dim:
        return flat
    # One sparse product, the hashing matrix stored transposed: 22 us a sample for a 26,880-wide pyramid,
    # against 45 us for a bincount per sample (and several times that for the product the other way round).
    return np.asarray((_hashing_matrix(flat.shape[1], max_dim, seed) @ flat.T).T, dtype=np.float32)


def embed(probe: np.ndarray, levels=DEFAULT_LEVELS, max_dim: int = DEFAULT_MAX_DIM,
          channels_last: bool = False, seed: int = 0, mask: np.ndarray | None = None) -> np.ndarray:
    return cap_dimension(pyramid_pool(probe, levels, channels_last, mask), max_dim, seed)


def token_features(ids: np.ndarray, mask: np.ndarray | None, max_dim: int = DEFAULT_MAX_DIM,
                   seed: int = 0) -> np.ndarray:
    """The network input's embedding for token ids [N, T]: a hashed bag of its real tokens, per token.

    What a predictor can read from the raw input before any layer, as the
    pooled pixels are for an image: the baseline of the first layer's gain.
    """
    ids = np.asarray(ids).reshape(len(ids), -1).astype(np.int64)
    real = np.ones(ids.shape, bool) if mask is None or mask.shape != ids.shape else mask.astype(bool)
    salt, sign_salt = _token_salts(seed, max_dim)
    bucket = (ids * salt + 12345) % max_dim
    sign = np.where(((ids * sign_salt) >> 7) % 2 == 0, 1.0, -1.0)
    # Sums of +-1 are whole numbers, exact in any order and precision: bincount gives np.add.at's bags, and with
    # the salts drawn once a text of 100 tokens takes 60 us instead of 145 (on the pass's main thread)
    bags = np.stack([np.bincount(bucket[i][real[i]], sign[i][real[i]], max_dim) for i in range(len(ids))])
    return bags.astype(np.float32) / np.maximum(real.sum(axis=1, keepdims=True), 1)


@functools.lru_cache(maxsize=None)
def _token_salts(seed: int, max_dim: int) -> tuple[int, int]:
    rng = np.random.default_rng([seed, max_dim, 7])
    return int(rng.integers(1, 2**31)), int(rng.integers(1, 2**31))


HASH_CHUNK = 32  # samples whose pyramids are hashed in one product ...
HASH_BYTES = 128 << 10  # ... or fewer, where they would hold more than this (EfficientNet-Lite0's 65 layers of up
# to 26,880 values a sample held 64 MB at 32 samples, and the pass's peak rose from 253 to 317 MB)


class FeatureBank:
    """Collects per-layer embeddings batch by batch; one array per layer at the end.

    Embeddings are kept in float16 (a cosine classifier does not need more)
    and for at most max_samples samples, so the bank stops growing with the
    calibration set: ranges and moments still use every sample.

    Pyramids wait for HASH_CHUNK samples (or HASH_BYTES) before they are hashed: one sparse product and one
    float16 copy a chunk instead of a sample (batch 1: MiniLM-L6's 39 layers x 240 texts were 9,360 of each,
    28-48 us apiece, on the pass's main thread). The same products, in the same order: the embeddings are
    bit-identical.
    """

    def __init__(self, names, levels=DEFAULT_LEVELS, max_dim: int = DEFAULT_MAX_DIM, seed: int = 0,
                 max_samples: int = DEFAULT_MAX_SAMPLES):
        self.levels = tuple(levels)
        self.max_dim = max_dim
        self.seed = seed
        self.max_samples = max_samples
        self._chunks = {name: [] for name in names}
        self._counts = {name: 0 for name in names}  # samples taken, waiting ones included
        self._waiting = {name: [] for name in names}  # flat pyramids [n, D] not hashed yet

    def add(self, name: str, probe: np.ndarray, channels_last: bool = False, mask: np.ndarray | None = None) -> None:
        room = self.max_samples - self._counts[name]
        if room <= 0:
            return
        self._wait(name, pyramid_pool(probe[:room], self.levels, channels_last, None if mask is None else mask[:room]))

    def add_pyramid(self, name: str, pooled: np.ndarray) -> None:
        """A map's bin averages computed in the graph ([N, C, sum(b*b)], see flat_pooling_matrix)."""
        room = self.max_samples - self._counts[name]
        if room > 0:
            self._wait(name, pooled[:room])

    def _wait(self, name: str, pooled: np.ndarray) -> None:
        flat = pooled.reshape(len(pooled), -1)
        if flat.base is not None and flat.base.nbytes > 2 * flat.nbytes:
            flat = flat.copy()  # a view would keep what it was cut from (a whole batch's output) while it waits
        waiting = self._waiting[name]
        if waiting and waiting[0].shape[1] != flat.shape[1]:
            self._hash(name)
        waiting.append(flat)
        self._counts[name] += len(flat)
        if sum(len(part) for part in waiting) >= HASH_CHUNK or sum(part.nbytes for part in waiting) >= HASH_BYTES:
            self._hash(name)

    def _hash(self, name: str) -> None:
        waiting = self._waiting[name]
        if waiting:
            self._store(name, cap_dimension(np.concatenate(waiting), self.max_dim, self.seed))
            waiting.clear()

    def add_embedding(self, name: str, embedded: np.ndarray) -> None:
        self._hash(name)  # in sample order
        embedded = embedded[:self.max_samples - self._counts[name]]
        self._store(name, embedded)
        self._counts[name] += len(embedded)

    def _store(self, name: str, embedded: np.ndarray) -> None:
        self._chunks[name].append(np.clip(embedded, -_F16_MAX, _F16_MAX).astype(np.float16))

    @property
    def names(self) -> list[str]:
        for name in self._waiting:
            self._hash(name)
        return [name for name, chunks in self._chunks.items() if chunks]

    def matrix(self, name: str) -> np.ndarray:
        self._hash(name)
        return np.concatenate(self._chunks[name]).astype(np.float32)

    def take(self, name: str) -> np.ndarray:
        """The layer's [N, D] float32 matrix, releasing the bank's copy: one layer at a time in memory."""
        matrix = self.matrix(name)
        self._chunks[name] = []
        return matrix

"""Issue "three bits and below": what one AdaRound step of EfficientNet-Lite0's last two layers would cost in numpy.

Round 34 (bench/learned_rounding.py --from-block 16) found the learnable gain in the head 1x1 convolution (320 -> 1280
channels on 7 x 7 positions, clip 0..6, global average pooling) and the classifier (Gemm 1280 -> 1000). This times,
on random data of those shapes (32 images, float32), the forward and the backward pass to the rounding variables
(AdaRound's rectified sigmoid) of each, as the script's two blocks learn them: the head's loss on the pooled
features, the classifier's on the logits. A plain SGD update stands in for Adam's few elementwise passes. Needs
nothing but numpy.

    python bench/tail_step_timing.py
"""
import time

import numpy as np

B, P, CI, CO, K = 32, 49, 320, 1280, 1000  # images a step, 7 x 7 positions, head in/out channels, classes
ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid


def soft(v):
    s = 1 / (1 + np.exp(-v))
    return np.clip(s * (ZETA - GAMMA) + GAMMA, 0, 1), s


def variable_gradient(g_w, h, s, scale):
    """The weight's gradient carried to the rounding variables through w = (floor + h(v)) * scale."""
    return g_w * scale * ((h > 0) & (h < 1)) * (ZETA - GAMMA) * s * (1 - s)


def step_head(x, target, base, v, scale, bias):
    h, s = soft(v)
    z = x @ ((base + h) * scale).T + bias  # [B * P, CO]
    pooled = np.clip(z, 0, 6).reshape(B, P, CO).mean(1)
    g_pooled = 2 * (pooled - target) / B
    g_z = np.repeat(g_pooled[:, None, :] / P, P, axis=1).reshape(B * P, CO) * ((z > 0) & (z < 6))
    return variable_gradient(g_z.T @ x, h, s, scale)


def step_fc(x, target, base, v, scale, bias):
    h, s = soft(v)
    g_y = 2 * (x @ ((base + h) * scale).T + bias - target) / B
    return variable_gradient(g_y.T @ x, h, s, scale)


def layer(rng, rows, inputs, outputs, low, high):
    """A step's arguments: inputs, targets, the weight's floor on its grid, rounding variables, scales, bias."""
    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return (normal(rows, inputs), normal(B, outputs), rng.integers(low, high, (outputs, inputs)).astype(np.float32),
            normal(outputs, inputs), np.full((outputs, 1), 0.01, np.float32), np.zeros(outputs, np.float32))


def main() -> int:
    rng = np.random.default_rng(0)
    for name, step, args in (("head", step_head, layer(rng, B * P, CI, CO, -4, 3)),
                             ("classifier", step_fc, layer(rng, B, CO, K, -2, 1))):
        step(*args)
        started = time.perf_counter()
        for _ in range(20):
            args[3][...] -= 1e-2 * step(*args)  # plain SGD stands in for Adam's few elementwise passes
        print(f"{name}: {(time.perf_counter() - started) / 20 * 1000:.1f} ms a step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

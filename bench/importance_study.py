"""How much MSQ's importance can be trusted, and how strongly the allocator should weigh it.

1. Stability: the per-layer importance from two seeds (k-means pseudo-classes and feature
   hashing both change), from the top-1 leave-one-out accuracy and from the soft score;
   the Pearson correlation of the two seeds' gains.
2. The importance exponent E of the default allocator (damage = importance^E x error),
   E in 0, 0.25, 0.5, 1, at 3.0 / 3.5 / 4.0 average bits, top-1 on the held-out samples.

    python bench/importance_study.py [--model efficientnet|mnist|digits]
Writes docs/bench/importance-<model>.json.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import run_bench  # noqa: E402
from msq_onnx import allocate as alloc  # noqa: E402
from msq_onnx.imprint import imprint_labels, loo_scores  # noqa: E402
from msq_onnx.importance import importance  # noqa: E402
from msq_onnx.instrument import run_pass  # noqa: E402
from msq_onnx.importance import upstream_layers  # noqa: E402
from msq_onnx.pipeline import Options, _Timer, analyse  # noqa: E402


def gains_by_seed(loaded, calib, seed: int) -> dict:
    stats = run_pass(loaded, calib, (1, 2, 4), 1024, quiet=True, seed=seed)
    labels = imprint_labels(None if calib.labels is None else calib.labels[stats.imprinted], stats.outputs, seed)
    scores = {name: loo_scores(stats.features.take(name), labels.values) for name in list(stats.features.names)}
    base = loo_scores(stats.input_features.take("input"), labels.values)
    upstream = upstream_layers(loaded.model, loaded.layers)
    return {kind: importance({n: getattr(s, kind) for n, s in scores.items()}, getattr(base, kind), upstream)
            for kind in ("top1", "soft")}


def main() -> int:
    args, spec, loaded, calib, evaluator = run_bench.study_setup(__doc__)

    first, second = gains_by_seed(loaded, calib, 0), gains_by_seed(loaded, calib, 1)
    stability = {}
    for kind in ("top1", "soft"):
        a = np.array([first[kind][n] for n in first[kind]])
        b = np.array([second[kind][n] for n in first[kind]])
        stability[kind] = round(float(np.corrcoef(a, b)[0, 1]), 3)
    print("correlation of layer gains between seeds 0 and 1:", stability, flush=True)

    analysis = analyse(loaded, calib, Options(quiet=True), _Timer())
    params = {layer.name: layer.params for layer in loaded.layers}
    sweep = []
    for budget in (3.0, 3.5, 4.0):
        for exponent in (0.0, 0.25, 0.5, 1.0):
            damage = alloc.expected_damage(analysis.importance, analysis.choices, exponent)
            bits = alloc.allocate_avg_bits("ilp", analysis.importance, damage, params, (2, 3, 4, 5, 6, 7, 8), budget)
            top1 = run_bench.score(loaded, analysis, evaluator, bits)
            sweep.append({"budget": budget, "exponent": exponent, "top1": round(top1, 2)})
            print(f"budget {budget} exponent {exponent}: top-1 {top1:.2f}", flush=True)
    with open(os.path.join(args.out, f"importance-{spec['name']}.json"), "w") as handle:
        json.dump({"model": spec["name"], "gain_correlation_between_seeds": stability, "exponent_sweep": sweep},
                  handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The tuning protocol: a default is chosen on tuning data and reported on data it was not chosen on.

The evaluation set is cut in two by parity: the even samples are the tuning half, the odd ones
the report half. Every configuration is written as the real QDQ model once and scored on both
halves; the importance exponent (damage = importance^E x error) is chosen on the tuning half
alone (highest mean top-1 over the budgets, ties to the smaller exponent), and the report half
says how the choice holds. Numbers on the tuning half are labelled as such. Every exponent runs with the
residual weights (the default), and the default exponent once more without them. The paper's greedy
rule is scored both ways at the same budgets (`greedy`: straight to the narrowest width;
`greedy-step`: one width at a time from the least important layer).

    python bench/tuning_protocol.py [--model efficientnet|mnist|digits]
Writes docs/bench/tuning-<model>.json and .md.
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
from msq_onnx.pipeline import Options, _damage, _Timer, analyse, candidate_widths  # noqa: E402

EXPONENTS = (0.0, 0.125, 0.25, 0.5, 1.0)
BUDGETS = (2.5, 3.0, 3.5, 4.0)


def main() -> int:
    args, spec, loaded, calib, evaluator = run_bench.study_setup(__doc__)
    halves = {"tuning": np.arange(len(evaluator.labels)) % 2 == 0}
    halves["report"] = ~halves["tuning"]
    analysis = analyse(loaded, calib, Options(quiet=True), _Timer())
    params = {layer.name: layer.params for layer in loaded.layers}
    fp32 = evaluator.predictions(spec["model"])
    rows = []

    def run(allocator: str, exponent: float | None, budget: float, residual: bool = True) -> dict:
        options = Options(allocator=allocator, importance_exponent=exponent or 0.0, quiet=True,
                          residual_weights=residual)
        widths = candidate_widths(options)
        damage = _damage(loaded, calib, analysis, options, analysis.caps)  # the greedy rules read its widths
        bits = alloc.allocate(allocator, analysis.importance, damage, widths,
                              [alloc.bits_budget(params, widths, budget)])
        kept = {}
        run_bench.score(loaded, analysis, evaluator, bits, keep=kept)
        row = {"allocator": allocator, "exponent": exponent, "budget": budget,
               "residual_weights": residual if allocator == "ilp" else None,
               "avg_bits": round(alloc.average_bits(bits, params), 4)}
        for half, mask in halves.items():
            row[f"{half}_top1"] = round(float((kept["predictions"][mask] == evaluator.labels[mask]).mean() * 100), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    for budget in BUDGETS:
        for exponent in EXPONENTS:
            run("ilp", exponent, budget)
        run("ilp", alloc.IMPORTANCE_EXPONENT, budget, residual=False)  # every layer's error weighed alike
        for rule in alloc.GREEDY:
            run(rule, None, budget)

    def mean_on(half: str, exponent: float, residual: bool = True) -> float:
        return float(np.mean([r[f"{half}_top1"] for r in rows if r["allocator"] == "ilp"
                              and r["exponent"] == exponent and r["residual_weights"] == residual]))

    chosen = max(EXPONENTS, key=lambda e: (round(mean_on("tuning", e), 6), -e))
    result = {"model": spec["name"], "halves": {h: int(m.sum()) for h, m in halves.items()},
              "fp32_top1": {h: round(float((fp32[m] == evaluator.labels[m]).mean() * 100), 2)
                            for h, m in halves.items()},
              "chosen_exponent_on_tuning_half": chosen, "default_exponent": alloc.IMPORTANCE_EXPONENT,
              "mean_top1_by_exponent": {str(e): {h: round(mean_on(h, e), 2) for h in halves} for e in EXPONENTS},
              "mean_top1_without_residual_weights": {h: round(mean_on(h, alloc.IMPORTANCE_EXPONENT, False), 2)
                                                     for h in halves},
              "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"tuning-{spec['name']}")
    with open(stem + ".json", "w") as handle:
        json.dump(result, handle, indent=1)
    lines = [f"### {spec['name']}: tuning half {result['halves']['tuning']} / report half "
             f"{result['halves']['report']} samples; FP32 {result['fp32_top1']['tuning']} / "
             f"{result['fp32_top1']['report']}", "",
             "| allocator | exponent | residual weights | budget | top-1 tuning half (chosen on) | top-1 report half |",
             "|---|---:|---|---:|---:|---:|"]
    lines += [f"| {r['allocator']} | {'' if r['exponent'] is None else r['exponent']} | "
              f"{'' if r['residual_weights'] is None else ('on' if r['residual_weights'] else 'off')} | "
              f"{r['budget']} | {r['tuning_top1']:.2f} | {r['report_top1']:.2f} |" for r in rows]
    lines += ["", f"Exponent chosen on the tuning half: {chosen} (default {alloc.IMPORTANCE_EXPONENT}); "
                  f"mean over budgets on the report half: {mean_on('report', chosen):.2f} "
                  f"(default: {mean_on('report', alloc.IMPORTANCE_EXPONENT):.2f}). Residual weights off at the "
                  f"default exponent: {mean_on('tuning', alloc.IMPORTANCE_EXPONENT, False):.2f} on the tuning half, "
                  f"{mean_on('report', alloc.IMPORTANCE_EXPONENT, False):.2f} on the report half."]
    with open(stem + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

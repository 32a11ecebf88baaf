"""Stage 6: per-layer weight bit-widths under an average-bits budget.

Three allocators:
  * ``ilp`` (default): a multiple-choice knapsack solved exactly with HiGHS
    (scipy.optimize.milp). Each layer picks one width; the expected damage of
    a choice is the layer's importance times its measured relative output
    error at that width; the parameter-weighted average width must stay at
    or under the budget.
  * ``sensitivity``: the same knapsack on damage measured by quantizing one
    layer at a time (sensitivity.py; AIMET-style, many forward passes).
  * ``greedy``: the rule of the MSQ paper: start every layer at the widest
    candidate and move the least important layers to the narrowest width
    first, until the budget holds.
  * ``greedy-step``: the same rule read the other way: one width step at a
    time, sweeping the layers from the least important up and starting the
    sweep again, until the budget holds; less important layers end narrower,
    and no layer jumps to the narrowest width while another still has 8 bits.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import numpy as np

from .errors import BadOption
from .ops import FLOAT_BITS

ALLOCATORS = ("ilp", "greedy", "greedy-step", "sensitivity", "msq-task", "output-weighted")
GREEDY = ("greedy", "greedy-step")  # the paper's rule, read two ways: they move between integer widths only
DEFAULT_BITS = (2, 3, 4, 5, 6, 7, 8)
# Damage = importance^exponent x error. 1 is the literal product; it lets a few
# layers with large gains take the budget. The exponent is chosen by the tuning
# protocol (bench/tuning_protocol.py, docs/BENCHMARKS.md): on the even half of
# EfficientNet-Lite0's evaluation images, mean top-1 over 2.5-4.0 bits for
# 0 / 0.125 / 0.25 / 0.5 / 1 was 76.95 / 76.65 / 76.65 / 75.30 / 66.30 with the
# full-range weight grids (74.5 / 74.65 / 73.85 / 72.05 / 55.6 with the symmetric
# ones, when 0.125 was chosen); reported on the odd half (0: 80.40, 0.125: 79.95)
# and on MiniLM-L6. So by default the knapsack weighs each layer's measured error
# alone; MSQ's importance is measured and reported, and weighs with E > 0.
IMPORTANCE_EXPONENT = 0.0


def check_budget(avg_bits: float | None, candidate_bits) -> None:
    if not candidate_bits:
        raise BadOption("--bits is empty; give candidate widths such as 2,3,4,5,6,7,8.")
    bad = [b for b in candidate_bits if not 2 <= b <= 8]
    if bad:
        raise BadOption(f"--bits {bad} out of range; candidate widths must be integers from 2 to 8.")
    if avg_bits is not None and avg_bits < min(candidate_bits):
        raise BadOption(f"--avg-bits {avg_bits} is below the narrowest candidate width {min(candidate_bits)}: "
                        "no allocation can meet it; raise --avg-bits or add narrower --bits.")


# A branch under this share of the power at its join is not discounted: an additive mask's large offsets or a
# stream that dwarfs a branch make such shares, and a layer's error would then count for nothing.
MIN_RESIDUAL_SHARE = 0.01


def residual_weights(residual_share: dict | None) -> dict:
    """layer -> the fraction of its relative error that reaches the stream at its residual join: its branch's share
    of the sum's power (instrument.PassStatistics.residual_share), at most 1; 1 where it has no join or a share
    below MIN_RESIDUAL_SHARE."""
    return {name: min(share, 1.0) for name, share in (residual_share or {}).items() if share >= MIN_RESIDUAL_SHARE}


def expected_damage(importance: dict, choices: dict, exponent: float = IMPORTANCE_EXPONENT,
                    activation: dict | None = None, residual: dict | None = None) -> dict:
    """Per layer and width: (importance / mean importance)^exponent x residual weight x relative output error.

    The error is the weight's at that width plus what the layer's activation
    mode costs (the same at every width; it matters against float). The
    residual weight (residual_weights) is how much of it the rest of the
    model sees: inside a residual block, x + f(x), the error of f's layers
    joins a stream stronger than f.
    """
    mean = float(np.mean(list(importance.values()))) or 1.0
    activation, residual = activation or {}, residual or {}
    return {name: {bits: (importance[name] / mean) ** exponent * residual.get(name, 1.0)
                   * (choice.error + activation.get(name, 0.0)) for bits, choice in table.items()}
            for name, table in choices.items()}


def activation_errors(layers, ranges: dict, input_sq: dict) -> dict:
    """Relative noise power of each layer's uint8 input: (range / 255)^2 / 12 over its mean square, for the
    layers whose input's range the pass measured (those that may end static).

    A range dominated by a few outliers makes the uint8 step coarse for the
    bulk of the values; this is where a 16-bit input can pay.
    """
    errors = {}
    for layer in layers:
        if layer.input_name not in ranges:
            continue
        low, high = ranges[layer.input_name]
        power = float(np.mean(input_sq[layer.name])) if layer.name in input_sq else 0.0
        step = (max(high, 0.0) - min(low, 0.0)) / 255.0
        errors[layer.name] = step * step / 12.0 / power if power > 0 else 0.0
    return errors


def wide_activations(errors: dict, count: int, static=None) -> set:
    """The inputs of the `count` layers with the largest uint8 activation error, among `static` (the static
    layers whose inputs can be uint16, write.uint16_widenable; None: every layer): a dynamic layer quantizes
    its input to int8 at run time, so a uint16 input would widen nothing."""
    ranked = sorted((name for name in errors if errors[name] > 0 and (static is None or name in static)),
                    key=lambda name: -errors[name])
    return set(ranked[:max(count, 0)])


def fixed_sums(fixed) -> tuple[int, float]:
    """(parameters, bits) of the weights no allocation changes: `fixed` is a count of float parameters (32 bits
    each) or width -> parameters (LoadedModel.fixed_weights)."""
    fixed = fixed if isinstance(fixed, dict) else {FLOAT_BITS: fixed}
    return sum(fixed.values()), float(sum(width * count for width, count in fixed.items()))


def average_bits(bits: dict, params: dict, fixed=0) -> float:
    """Parameter-weighted average width, the `fixed` weights (fixed_sums) included at their widths."""
    fixed_params, fixed_bits = fixed_sums(fixed)
    total = sum(params.values()) + fixed_params
    return (sum(bits[name] * params[name] for name in bits) + fixed_bits) / total


@contextlib.contextmanager
def _stdout_silenced():
    """HiGHS prints solver chatter from C to fd 1, which would break --json."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@dataclass
class Budget:
    """sum over layers of costs[layer][width] <= limit: average bits (costs params x width) or bytes."""

    costs: dict
    limit: float
    name: str  # the flag it comes from, for messages
    total: float | None = None  # --max-size: the bytes the whole written file may take
    unit: str = "bits"  # of costs and limit: bits, bytes or seconds

    def show(self, value: float) -> str:
        return f"{value * 1000:.3g} ms" if self.unit == "seconds" else f"{value:,.0f} {self.unit}"


def bits_budget(params: dict, widths, avg_bits: float, fixed=0) -> Budget:
    """--avg-bits: the `fixed` weights (fixed_sums) count at their widths, so the layers get less."""
    fixed_params, fixed_bits = fixed_sums(fixed)
    total = sum(params.values()) + fixed_params
    costs = {name: {b: float(params[name] * b) for b in set(widths) | {FLOAT_BITS}} for name in params}
    return Budget(costs, avg_bits * total - fixed_bits, f"--avg-bits {avg_bits:g}")


def reachable_widths(budgets, widths) -> dict | None:
    """Per layer, the widths that some allocation within every budget can give it: that layer at the width and
    every other at its cheapest option still fits. The others cannot be chosen, so their error tables need not
    be measured (MiniLM-L6 at --avg-bits 4: its embedding table holds half the parameters and cannot go past 5
    bits). Budgets only tighten after this (--max-size retries, --max-latency), so the sets stay supersets. The
    narrowest width is always kept. None: no budget, every width."""
    if not budgets:
        return None
    names = list(budgets[0].costs)
    reachable = {name: {min(widths)} for name in names}
    floors = [sum(min(budget.costs[name].values()) for name in names) for budget in budgets]
    for name in names:
        for bits in widths:
            if all(floor - min(budget.costs[name].values()) + budget.costs[name][bits]
                   <= budget.limit * (1 + 1e-9) + 1e-6 for floor, budget in zip(floors, budgets)):
                reachable[name].add(bits)
    return {name: sorted(found) for name, found in reachable.items()}


def fits(bits: dict, budgets) -> bool:
    return all(sum(b.costs[name][bits[name]] for name in bits) <= b.limit * (1 + 1e-9) + 1e-6 for b in budgets)


def import_solver_in_background():
    """Start importing the knapsack's solver (scipy.optimize: 0.35-0.5 s of one core) on a thread while the
    caller waits on ONNX Runtime, whose session builds leave a core idle and the GIL free; the caller joins the
    thread before it times anything. allocate_ilp's own import then finds the module loaded; its errors are that
    import's to report."""
    import importlib
    import threading

    def load():
        try:
            importlib.import_module("scipy.optimize")
        except Exception:
            pass

    thread = threading.Thread(target=load, name="msq-import-solver", daemon=True)
    thread.start()
    return thread


def allocate_ilp(damage: dict, candidate_bits, budgets) -> dict:
    """Minimise total damage, one width per layer, within every budget (multiple-choice knapsack)."""
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(damage)
    widths = sorted(candidate_bits)
    n, k = len(names), len(widths)
    cost = np.array([[damage[name].get(b, 0.0) for b in widths] for name in names], dtype=np.float64)
    finite = np.isfinite(cost)
    if not finite.all():  # an error that overflowed float32 (weights near 1e30) counts as the worst one measured
        cost = np.where(finite, cost, float(cost[finite].max()) if finite.any() else 1.0)
    # Normalising keeps HiGHS's tolerances meaningful whatever the error scale.
    cost = cost / max(cost.max(), 1e-30)
    allowed = np.array([[b in damage[name] for b in widths] for name in names], dtype=np.float64).ravel()
    constraints = [LinearConstraint(sparse.kron(sparse.identity(n, format="csr"), np.ones((1, k)), format="csr"), 1, 1)]
    for budget in budgets:
        row = np.array([[budget.costs[name][b] for b in widths] for name in names], dtype=np.float64).ravel()
        scale = max(float(np.abs(row).max()), 1e-30)
        constraints.append(LinearConstraint(row[None, :] / scale, -np.inf, budget.limit / scale + 1e-9))
    with _stdout_silenced():  # no time limit: a timed-out solve would depend on the machine's speed
        result = milp(cost.ravel(), constraints=constraints, integrality=np.ones(n * k), bounds=Bounds(0, allowed))
    if result.status != 0 or result.x is None:
        raise BadOption(f"no allocation meets {' and '.join(b.name for b in budgets)} with widths {widths} "
                        f"({result.message}).")
    choice = result.x.reshape(n, k).argmax(axis=1)
    return {name: widths[c] for name, c in zip(names, choice)}


def _greedy_start(importance: dict, widths: list, floats, widest: dict | None) -> dict:
    """Every layer at its own widest width (widest: a capped layer's, allocate's), float ones at float."""
    return {name: FLOAT_BITS if name in floats else (widest or {}).get(name, widths[-1]) for name in importance}


def allocate_greedy(importance: dict, candidate_bits, budgets, floats=frozenset(), widest=None) -> dict:
    widths = sorted(candidate_bits)
    bits = _greedy_start(importance, widths, floats, widest)
    order = sorted((n for n in importance if n not in floats), key=lambda name: importance[name])  # stable
    for name in order:
        if fits(bits, budgets):
            break
        start, bits[name] = bits[name], widths[0]
        if fits(bits, budgets):
            # This layer alone overshot the budget: keep it as wide as still fits.
            bits[name] = next(w for w in reversed(widths) if w <= start and fits({**bits, name: w}, budgets))
    return bits


def allocate_greedy_steps(importance: dict, candidate_bits, budgets, floats=frozenset(), widest=None) -> dict:
    widths = sorted(candidate_bits)
    bits = _greedy_start(importance, widths, floats, widest)
    order = sorted((n for n in importance if n not in floats), key=lambda name: importance[name])  # stable
    while not fits(bits, budgets):
        lowered = False
        for name in order:
            if fits(bits, budgets):
                break
            step = widths.index(bits[name])
            if step > 0:
                bits[name], lowered = widths[step - 1], True
        if not lowered:
            break  # every layer at the narrowest width: allocate() says so if that does not fit either
    return bits


def check_reachable(budgets, widths, allowed: dict | None = None) -> None:
    for budget in budgets:
        lowest = sum(min(budget.costs[name][b] for b in widths if allowed is None or b in allowed[name])
                     for name in budget.costs)
        if lowest > budget.limit * (1 + 1e-9) + 1e-6:
            floats = sorted(name for name, widths_of in (allowed or {}).items() if widths_of == {FLOAT_BITS})
            why = (f"; {len(floats)} layer(s) that no quantized mode keeps faithful stay float, at 32 bits "
                   f"({', '.join(floats[:3])}{' ...' if len(floats) > 3 else ''})" if floats else "")
            narrower = budget.unit != "seconds" and min(b for b in widths if b != FLOAT_BITS) > 2
            raise BadOption(f"{budget.name} cannot be met: even the narrowest widths need more "
                            f"({budget.show(lowest)} against {budget.show(budget.limit)}){why}; raise it"
                            f"{' or add narrower --bits' if narrower else ''}.")


def widest_width(widths) -> int:
    """A layer's own widest integer width among `widths` (a capped one, pipeline.saturation_caps, has lost the wider
    ones); FLOAT_BITS where float is all it has (float activations only)."""
    return max((b for b in widths if b != FLOAT_BITS), default=FLOAT_BITS)


def allocate(method: str, importance: dict, damage: dict | None, candidate_bits, budgets,
             beyond_widest: bool = False) -> dict:
    """Widths per layer; candidate_bits may hold FLOAT_BITS (float), which only the knapsack weighs. A layer
    whose damage table holds only FLOAT_BITS (float activations only) stays float. A budget every layer's widest
    width fits gets them, unless beyond_widest: then the knapsack spends it on float (an accuracy gate's fallback)."""
    integer_widths = [b for b in candidate_bits if b != FLOAT_BITS]
    allowed = {name: set(damage[name]) if damage is not None else set(candidate_bits) for name in importance}
    floats = {name for name, widths in allowed.items() if widths == {FLOAT_BITS}}
    widest = {name: widest_width(allowed[name]) for name in importance}
    if not budgets or (fits(widest, budgets) and method not in GREEDY and not beyond_widest):
        return widest
    # the same knapsack; only the damage was measured differently
    if method in ("ilp", "sensitivity", "msq-task", "output-weighted"):
        check_reachable(budgets, candidate_bits, allowed)
        return allocate_ilp(damage, candidate_bits, budgets)
    if method in GREEDY:
        check_reachable(budgets, integer_widths + [FLOAT_BITS], {n: ({FLOAT_BITS} if n in floats else
                                                                     set(integer_widths)) for n in allowed})
        rule = allocate_greedy if method == "greedy" else allocate_greedy_steps
        bits = rule(importance, integer_widths, budgets, floats, widest)
        if not fits(bits, budgets):  # a narrower width is not always cheaper (time under --max-latency)
            raise BadOption(f"the {method} rule cannot meet {' and '.join(b.name for b in budgets)}: narrowing "
                            "layers in importance order does not get there; use --allocator ilp.")
        return bits
    raise BadOption(f"unknown allocator '{method}'; choose one of {', '.join(ALLOCATORS)}.")


def allocate_avg_bits(method: str, importance: dict, damage: dict | None, params: dict, candidate_bits,
                      avg_bits: float | None, fixed=0) -> dict:
    """allocate() under --avg-bits alone (None: every layer at the widest width)."""
    budgets = [] if avg_bits is None else [bits_budget(params, candidate_bits, avg_bits, fixed)]
    return allocate(method, importance, damage, candidate_bits, budgets)

import itertools

import pytest

from msq_onnx.allocate import (FLOAT_BITS, allocate_avg_bits, allocate_greedy, allocate_ilp, average_bits, bits_budget,
                               check_budget, reachable_widths, wide_activations)
from msq_onnx.errors import BadOption

PARAMS = {"a": 100, "b": 400, "c": 50, "d": 1000}
WIDTHS = (2, 4, 6, 8)
DAMAGE = {name: {b: scale * 4.0 ** -b for b in WIDTHS} for name, scale in
          (("a", 5.0), ("b", 1.0), ("c", 50.0), ("d", 0.5))}


def brute_force(budget):
    best = None
    for combo in itertools.product(WIDTHS, repeat=len(PARAMS)):
        bits = dict(zip(PARAMS, combo))
        if average_bits(bits, PARAMS) <= budget + 1e-9:
            cost = sum(DAMAGE[n][bits[n]] for n in bits)
            if best is None or cost < best[0] - 1e-15:
                best = (cost, bits)
    return best


@pytest.mark.parametrize("budget", [2.5, 3.0, 4.0, 5.5, 7.0])
def test_ilp_is_optimal_and_within_budget(budget):
    bits = allocate_ilp(DAMAGE, WIDTHS, [bits_budget(PARAMS, WIDTHS, budget)])
    assert average_bits(bits, PARAMS) <= budget + 1e-9
    cost = sum(DAMAGE[n][bits[n]] for n in bits)
    assert cost == pytest.approx(brute_force(budget)[0], rel=1e-9)


def test_greedy_lowers_least_important_first():
    importance = {"a": 0.3, "b": 0.1, "c": 0.9, "d": 0.2}
    bits = allocate_greedy(importance, WIDTHS, [bits_budget(PARAMS, WIDTHS, 5.0)])
    assert average_bits(bits, PARAMS) <= 5.0
    assert bits["b"] == 2 and bits["c"] == 8  # least important narrowest, most important untouched


def test_greedy_step_lowers_one_width_at_a_time_from_the_least_important_layer():
    importance = {"a": 0.3, "b": 0.1, "c": 0.9, "d": 0.2}
    budget = [bits_budget(PARAMS, WIDTHS, 5.0)]
    stepped = allocate_avg_bits("greedy-step", importance, None, PARAMS, WIDTHS, 5.0)
    assert average_bits(stepped, PARAMS) <= 5.0
    # widths never rise with importance, and no layer sits at the narrowest while another keeps the widest
    ranked = sorted(importance, key=importance.get)
    assert [stepped[n] for n in ranked] == sorted(stepped[n] for n in ranked)
    assert not (min(stepped.values()) == WIDTHS[0] and max(stepped.values()) == WIDTHS[-1])
    assert stepped != allocate_greedy(importance, WIDTHS, budget)


def test_budget_at_or_above_widest_keeps_everything_wide():
    bits = allocate_avg_bits("ilp", {n: 1 for n in PARAMS}, DAMAGE, PARAMS, WIDTHS, 8.0)
    assert set(bits.values()) == {8}


@pytest.mark.parametrize("avg, widths", [(1.5, (2, 4, 8)), (3.0, (4, 8)), (4.0, ()), (4.0, (1, 4)), (4.0, (9,))])
def test_impossible_or_invalid_budgets_are_refused(avg, widths):
    with pytest.raises(BadOption):
        check_budget(avg, widths)


@pytest.mark.parametrize("budget", [2.5, 3.0, 4.0, 5.5, 7.0])
def test_reachable_widths_are_exactly_those_some_allocation_within_the_budget_gives_and_the_knapsack_needs_no_other(
        budget):
    widths = WIDTHS + (FLOAT_BITS,)
    reachable = reachable_widths([bits_budget(PARAMS, widths, budget)], WIDTHS)
    used = {name: set() for name in PARAMS}
    for combo in itertools.product(widths, repeat=len(PARAMS)):
        bits = dict(zip(PARAMS, combo))
        if average_bits(bits, PARAMS) <= budget + 1e-9:
            for name, b in bits.items():
                used[name].add(b)
    assert {name: set(found) for name, found in reachable.items()} == {name: used[name] - {FLOAT_BITS}
                                                                        for name in PARAMS}
    if budget < 4.0:
        assert reachable["d"] != list(WIDTHS)  # the largest layer cannot take every width
    pruned = {name: {b: DAMAGE[name][b] for b in reachable[name]} for name in PARAMS}
    assert allocate_ilp(pruned, WIDTHS, [bits_budget(PARAMS, WIDTHS, budget)]) == \
        allocate_ilp(DAMAGE, WIDTHS, [bits_budget(PARAMS, WIDTHS, budget)])
    assert reachable_widths([], WIDTHS) is None


def test_act16_ranks_only_the_layers_whose_inputs_are_uint8():
    errors = {"dynamic": 0.5, "static_loud": 0.2, "static_quiet": 0.1, "clean": 0.0}
    assert wide_activations(errors, 1, {"static_loud", "static_quiet", "clean"}) == {"static_loud"}
    assert wide_activations(errors, 5, {"static_loud", "static_quiet", "clean"}) == {"static_loud", "static_quiet"}
    assert wide_activations(errors, 1) == {"dynamic"}  # no modes known: every layer ranks


@pytest.mark.parametrize("method", ["greedy", "greedy-step", "ilp"])
def test_a_capped_layer_starts_at_its_own_widest_width_and_the_budget_goes_to_the_others(method):
    """Layers b and c lost 8 bits (pipeline.saturation_caps: 7 at most). At --avg-bits 7 every layer fits at 7;
    the greedy rules started all at 8 and narrowed a to 5 before the cap, leaving the budget unspent (a review's).
    Now each starts at its own widest width and the average is spent to the budget."""
    from msq_onnx.allocate import allocate

    params = {"a": 100, "b": 100, "c": 100}
    widths = (2, 3, 4, 5, 6, 7, 8, 32)
    damage = {"a": {b: 1.0 / b for b in widths}, "b": {b: 1.0 / b for b in widths if b != 8},
              "c": {b: 1.0 / b for b in widths if b != 8}}
    importance = {"a": 0.5, "b": 0.2, "c": 0.3}
    bits = allocate(method, importance, damage, widths, [bits_budget(params, widths, 7.0)])
    assert bits["b"] <= 7 and bits["c"] <= 7 and average_bits(bits, params) == pytest.approx(7.0)
    if method == "ilp":
        assert bits == {"a": 7, "b": 7, "c": 7}
    assert allocate(method, importance, damage, widths, []) == {"a": 8, "b": 7, "c": 7}


def test_a_layers_damage_is_weighed_by_the_share_of_its_error_the_stream_keeps():
    from types import SimpleNamespace

    from msq_onnx.allocate import MIN_RESIDUAL_SHARE, expected_damage, residual_weights

    weights = residual_weights({"a": 0.2, "b": 1.7, "c": MIN_RESIDUAL_SHARE / 2})
    assert weights == {"a": 0.2, "b": 1.0}  # at most 1; a share too small to be a residual's is not trusted
    choices = {name: {2: SimpleNamespace(error=0.5), 4: SimpleNamespace(error=0.1)} for name in "abc"}
    damage = expected_damage({"a": 1.0, "b": 1.0, "c": 1.0}, choices, 0.0, {"a": 0.05}, weights)
    assert damage["a"][2] == pytest.approx(0.2 * 0.55) and damage["a"][4] == pytest.approx(0.2 * 0.15)
    assert damage["b"][2] == pytest.approx(0.5) and damage["c"][4] == pytest.approx(0.1)
    # the allocation follows: the weighed layer is the one that goes narrow
    params = {"a": 100, "b": 100, "c": 100}
    bits = allocate_ilp(damage, (2, 4), [bits_budget(params, (2, 4), 10 / 3)])
    assert bits == {"a": 2, "b": 4, "c": 4}

"""The greedy rules every allocating stage shares: a size target met at the smallest predicted drop (never exceeded,
the real size deciding), a drop budget met at the smallest cost, and layer patterns that must name real layers."""

from __future__ import annotations

import pytest

from stages.allocation import LayerNameError, allocate, keep_float, match_layers


def test_greedy_takes_the_cheapest_drop_per_unit_saved_until_the_target_holds():
    drops = {"a": {0.25: 0.1, 0.5: 0.2}, "b": {0.25: 2.0, 0.5: 4.0}, "c": {0.25: 0.0, 0.5: 3.0}}
    saved = {"a": {0.25: 10, 0.5: 20}, "b": {0.25: 10, 0.5: 20}, "c": {0.25: 5, 0.5: 10}}

    def size(ratios):  # additive here; the stage counts the real pruned model
        return 100 - sum(saved[g][r] for g, r in ratios.items() if r)

    assert allocate(drops, saved, size, 80, 100) == {"a": 0.5, "c": 0.25}  # c's first step is free, then a twice
    assert size(allocate(drops, saved, size, 80, 100)) <= 80
    assert allocate(drops, saved, size, 100, 100) == {}
    with pytest.raises(ValueError, match="largest allowed"):
        allocate(drops, saved, size, 40, 100)


def test_the_real_size_decides_when_the_savings_alone_overstate():
    drops = {"a": {0.25: 0.1, 0.5: 0.2}, "b": {0.25: 1.0, 0.5: 2.0}}
    saved = {"a": {0.25: 10, 0.5: 20}, "b": {0.25: 10, 0.5: 20}}
    counted = []

    def size(ratios):  # together they save 2 less than the sum of each alone
        counted.append(dict(ratios))
        return 100 - sum(saved[g][r] for g, r in ratios.items()) + (2 if len(ratios) == 2 else 0)

    assert allocate(drops, saved, size, 70, 100) == {"a": 0.5, "b": 0.5}
    assert counted[0] == {"a": 0.5, "b": 0.25}  # counted only from when the sum of savings reached the target


def test_keep_float_buys_back_the_most_drop_per_unit_of_cost_until_the_budget_holds():
    drops = {"stem": 2.0, "mid": 3.0, "head": 1.0, "noise": -0.2}
    costs = {"stem": 1.0, "mid": 100.0, "head": 1.0, "noise": 5.0}
    assert keep_float(drops, costs, 10.0) == []  # 5.8 predicted already fits
    assert keep_float(drops, costs, 4.0) == ["stem"]  # 2.0 per MAC beats head's 1.0 and mid's 0.03
    assert keep_float(drops, costs, 3.0) == ["stem", "head"]
    assert keep_float(drops, costs, 0.0) == ["stem", "head", "mid"]  # a layer int8 does not hurt is never kept
    for budget in (4.0, 3.0, 0.0):
        assert sum(d for n, d in drops.items() if n not in keep_float(drops, costs, budget)) <= budget


def test_layer_patterns_match_names_or_globs_and_refuse_what_names_nothing():
    names = ["conv1", "layer1.conv1", "layer1.conv2", "fc"]
    assert match_layers(["fc", "layer1.*"], names, "f") == {"fc": ["fc"], "layer1.*": ["layer1.conv1", "layer1.conv2"]}
    with pytest.raises(LayerNameError, match=r"^qat\.fp32_layers: 'layer9' matches no conv or linear") as err:
        match_layers(["layer9"], names, "qat.fp32_layers")
    assert err.value.field == "qat.fp32_layers" and "conv1, layer1.conv1" in err.value.detail

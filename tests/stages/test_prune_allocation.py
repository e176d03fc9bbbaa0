"""`prune: {allocation: sensitivity}`: per-layer ratios from measured sensitivity meet the target share of MACs or
parameters, counted independently, never fall short of it, and are recorded with the predicted and measured drop."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.core.metrics import count_macs, count_params
from pipeline.recipe import RecipeError, validate_recipe
from stages.prune import PruneConfig, run_prune
from stages.prune_allocation import group_roots
from tests.conftest import stage_context, synthetic_bundle, tiny_recipe, trained_state


@pytest.fixture(scope="module")
def bundle():
    return synthetic_bundle(n_train=128, n_val=32)


@pytest.fixture(scope="module")
def trained(bundle):
    return trained_state(bundle, epochs=2, lr=0.05)


def test_groups_stand_once_for_coupled_channels(trained):
    roots = group_roots(trained.model, (3, 16, 16))
    assert "fc" not in roots and roots[0] == "conv1.0"
    # the residual stream's convolutions (block outputs and downsamples) are one group each per stage width
    assert "layer1.0.conv1" in roots and len(roots) == len(set(roots))


@pytest.mark.parametrize("target", ["macs", "params"])
def test_the_allocation_meets_its_target_counted_independently(trained, bundle, target):
    state = copy.deepcopy(trained)
    size = (lambda m: count_macs(m, (3, 16, 16))) if target == "macs" else count_params
    before = size(state.model)
    # max_layer_ratio 0.625 leaves 5 candidate ratios per group: fewer evaluations
    config = PruneConfig(allocation="sensitivity", target=target, pruning_ratio=0.5, max_layer_ratio=0.625, epochs=0)
    out = run_prune(state, config, stage_context(bundle))
    after = size(out.state.model)
    assert after <= 0.5 * before  # the target is met, never missed
    assert after >= 0.3 * before  # and not by removing far more than asked
    assert out.metrics["allocation_removed_share"] == pytest.approx(1 - after / before)
    ratios = {
        k.removeprefix("allocation_ratio."): v for k, v in out.metrics.items() if k.startswith("allocation_ratio")
    }
    assert ratios and all(0 < r <= 0.875 for r in ratios.values())
    for key in ("allocation_predicted_drop", "allocation_measured_drop"):
        assert key in out.metrics
    assert out.state.model(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    assert out.state.structure[-1].kind == "prune_channels"  # replayable like any structured prune
    widths = [m.out_channels for m in out.state.model.modules() if isinstance(m, torch.nn.Conv2d)]
    full = [m.out_channels for m in trained.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 8 == 0 or w == f for w, f in zip(widths, full, strict=True))  # round_to: auto, 8


def test_uniform_configs_keep_their_serialised_form():
    assert "allocation" not in PruneConfig().model_dump()  # cache keys of earlier recipes unchanged
    assert PruneConfig(allocation="sensitivity").model_dump()["target"] == "macs"


def test_unsupported_combinations_are_refused_at_load_with_the_field_path():
    with pytest.raises(RecipeError, match=r"stages\[0\]\.prune.*allocation: sensitivity with method: unstructured is "
                                          r"not yet supported"):  # fmt: skip
        validate_recipe(tiny_recipe(stages=[{"prune": {"method": "unstructured", "allocation": "sensitivity"}}]))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.prune\.allocation_images"):
        validate_recipe(tiny_recipe(stages=[{"prune": {"allocation": "sensitivity", "allocation_images": -5}}]))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.prune\.target"):
        validate_recipe(tiny_recipe(stages=[{"prune": {"allocation": "sensitivity", "target": "latency"}}]))

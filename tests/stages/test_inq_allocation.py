"""Mixed INQ bit widths: a per-layer map or `bits: auto` with a size target. Each layer's weights are exact powers of
two at its own width, the packed file holds each layer at its width (its size follows), and the automatic choice meets
its byte target (counted independently), never exceeds it, and records its prediction."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError

from pipeline.core.artifacts import load_artifact, save_artifact
from pipeline.recipe import RecipeError, validate_recipe
from stages.allocation import LayerNameError
from stages.inq import INQConfig, inq_parameters, run_inq
from stages.inq_allocation import packed_bytes, widths_from_map
from tests.conftest import stage_context, synthetic_bundle, tiny_recipe, trained_state

BUNDLE = synthetic_bundle(n_train=128, n_val=64)
WIDTHS = {"conv1.*": 6, "layer4.*": 2, "fc": 8, "*": 3}


@pytest.fixture(scope="module")
def trained():
    return trained_state(BUNDLE, epochs=2, lr=0.05)


def _levels(w: torch.Tensor) -> int:
    """Distinct non-zero magnitudes, each checked to be an exact power of two."""
    nonzero = w[w != 0].abs()
    mantissa, _ = torch.frexp(nonzero)
    assert bool((mantissa == 0.5).all())
    return int(nonzero.unique().numel())


def _run(state, **config):
    return run_inq(copy.deepcopy(state), INQConfig(epochs=0, **config), stage_context(BUNDLE))


def test_the_first_matching_pattern_gives_each_layer_its_width():
    layers = {"conv1.0": 10, "conv1.3": 10, "layer1.conv": 10, "fc": 4}
    assert widths_from_map({"conv1.*": 6, "fc": 8, "*": 3}, layers, "bits") == {
        "conv1.0": 6, "conv1.3": 6, "fc": 8, "layer1.conv": 3}  # fmt: skip
    with pytest.raises(LayerNameError, match="'head' matches no conv or linear layer"):
        widths_from_map({"head": 4, "*": 3}, layers, "bits")
    with pytest.raises(LayerNameError, match=r"no width for layer1\.conv, fc; add a pattern"):
        widths_from_map({"conv1.*": 4}, layers, "bits")


def test_each_layer_is_powers_of_two_at_its_own_width_and_packed_at_it(trained, tmp_path):
    out = _run(trained, bits=WIDTHS)
    expected = widths_from_map(WIDTHS, {n.removesuffix(".weight"): 1 for n in inq_parameters(trained.model)}, "bits")
    grids = out.state.pow2_grids
    assert {n.removesuffix(".weight"): g.bits for n, g in grids.items()} == expected
    for name, param in inq_parameters(out.state.model).items():
        assert _levels(param.detach()) <= 2 ** (grids[name].bits - 2)  # b bits: 2^(b-2) magnitudes, two signs, zero
    counts = {n: p.numel() for n, p in inq_parameters(out.state.model).items()}
    packed = sum(packed_bytes(counts[n], g.bits) for n, g in grids.items())
    assert out.metrics["inq_weight_bytes"] == packed
    assert out.metrics["inq_bits"] == pytest.approx(
        sum(counts[n] * g.bits for n, g in grids.items()) / sum(counts.values())
    )

    save_artifact(out.state, tmp_path / "mixed.pt")
    payload = torch.load(tmp_path / "mixed.pt", weights_only=False)
    stored = payload["payload"]["inq"] if "payload" in payload else _find_inq(payload)
    for name, q in stored.items():  # each layer's codes at its own width: ceil(count x bits / 8) bytes
        assert q["bits"] == grids[name].bits and q["codes"].numel() == math.ceil(counts[name] * q["bits"] / 8)
    loaded = load_artifact(tmp_path / "mixed.pt")
    x = torch.randn(2, *BUNDLE.input_size)
    with torch.inference_mode():
        assert torch.equal(loaded(x), out.state.model.eval()(x))


def _find_inq(payload):
    """The artifact's {layer: packed codes} record, wherever the container keeps it."""
    if isinstance(payload, dict):
        if "inq" in payload and isinstance(payload["inq"], dict):
            return payload["inq"]
        for value in payload.values():
            if (found := _find_inq(value)) is not None:
                return found
    return None


@pytest.mark.parametrize("target", [{"target_bits": 3}, {"target_bytes": 150_000}])
def test_auto_meets_its_byte_target_and_never_exceeds_it(trained, target):
    counts = {n: p.numel() for n, p in inq_parameters(trained.model).items()}
    limit = target.get("target_bytes") or sum(packed_bytes(c, 3) for c in counts.values())
    out = _run(trained, bits="auto", allocation_images=100, **target)
    widths = {n: g.bits for n, g in out.state.pow2_grids.items()}
    counted = sum(packed_bytes(counts[n], b) for n, b in widths.items())  # independently of the stage's own count
    assert counted == out.metrics["inq_weight_bytes"] <= limit
    assert counted > limit - max(packed_bytes(c, 8) for c in counts.values())  # not far below either: one layer's step
    assert len(set(widths.values())) > 1  # mixed: uniform 3 bits is what the target allows, the choice differs
    assert {f"allocation_bits.{n.removesuffix('.weight')}" for n in widths} <= out.metrics.keys()
    assert all(out.metrics[f"allocation_bits.{n.removesuffix('.weight')}"] == b for n, b in widths.items())
    assert {"allocation_predicted_drop", "allocation_measured_drop"} <= out.metrics.keys()
    for name, param in inq_parameters(out.state.model).items():
        assert _levels(param.detach()) <= 2 ** (widths[name] - 2)


def test_a_target_below_the_narrowest_widths_is_refused(trained):
    with pytest.raises(ValueError, match="below the packed weights at 2 bits in every layer"):
        _run(trained, bits="auto", target_bytes=100, allocation_images=100)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"bits": "auto"}, "needs exactly one of target_bytes or target_bits"),
        ({"bits": "auto", "target_bytes": 10, "target_bits": 3}, "needs exactly one"),
        ({"bits": 4, "target_bytes": 10}, "target_bytes is only used with bits: auto"),
        ({"bits": "auto", "target_bytes": -5}, "greater than 0"),
        ({"bits": "auto", "target_bits": 1}, "greater than or equal to 2"),
        ({"bits": {"fc": 9}}, "must be 2..8"),
        ({"bits": {}}, "at least one"),
        ({"bits": "auto", "target_bits": 3, "auto_bits": [1, 4]}, "distinct widths in 2..8"),
    ],
)
def test_bad_width_options_are_refused(config, message):
    with pytest.raises(ValidationError, match=message):
        INQConfig(**config)


def test_recipes_refuse_unknown_layers_and_bad_budgets_with_the_field_path():
    with pytest.raises(RecipeError, match=r"stages\[1\]\.inq\.bits: 'blocks\.\*' matches no conv or linear layer"):
        validate_recipe(tiny_recipe(stages=[{"train": {"epochs": 1}}, {"inq": {"bits": {"blocks.*": 3, "*": 5}}}]))
    with pytest.raises(RecipeError, match=r"stages\[1\]\.inq\.target_bytes"):
        validate_recipe(tiny_recipe(stages=[{"train": {"epochs": 1}},
                                            {"inq": {"bits": "auto", "target_bytes": -1}}]))  # fmt: skip


def test_one_width_keeps_its_cache_key():
    assert "target_bytes" not in INQConfig().model_dump() and INQConfig().model_dump()["bits"] == 5
    assert INQConfig(bits="auto", target_bits=3).model_dump()["target_bits"] == 3

"""Each probe changes one layer as its technique would, leaves the model as it was afterwards, and counts what the
change saves independently of the probe."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipeline.core.metrics import count_macs, count_params
from pipeline.sensitivity.config import SensitivityConfig, SensitivityError
from pipeline.sensitivity.probes import (
    ProbeContext,
    applies,
    calibrate_activations_,
    get_probe,
    grid,
    layers_of,
)
from stages.inq import fit_exponents, quantize_pow2
from tests.conftest import synthetic_bundle, trained_state

INPUT = (3, 16, 16)


@pytest.fixture(scope="module")
def bundle():
    return synthetic_bundle()


@pytest.fixture(scope="module")
def model(bundle) -> nn.Module:
    return trained_state(bundle, epochs=1).model.eval()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_default_grid_and_unknown_techniques():
    assert grid(SensitivityConfig()) == [("prune", 0.25), ("prune", 0.5), ("prune", 0.75), ("int8", 8.0),
                                         ("inq", 3.0), ("inq", 4.0), ("inq", 5.0)]  # fmt: skip
    with pytest.raises(SensitivityError, match="no sensitivity probe for 'fp4'"):
        grid(SensitivityConfig(techniques=("inq", "fp4")))


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_prune_removes_that_share_of_the_layers_channels_on_a_copy(model, ratio):
    name = "layer1.0.conv1"  # inside a residual branch: only its own channels and the next conv's inputs go
    before = _weights(model)
    ctx = ProbeContext(INPUT)
    with get_probe("prune").probe(model, name, ratio, ctx) as (pruned, effect):
        channels = model.get_submodule(name).out_channels
        assert pruned.get_submodule(name).out_channels == channels - int(ratio * channels)
        assert effect.params_removed == count_params(model) - count_params(pruned) > 0
        assert effect.macs_removed == count_macs(model, INPUT) - count_macs(pruned, INPUT) > 0
        assert pruned(torch.zeros(2, *INPUT)).shape == (2, 4)
    assert _unchanged(model, before)


def test_prune_names_the_layers_coupled_through_a_residual_sum(model):
    stem_out = [n for n in layers_of(model) if n.startswith("layer1.0.conv2")][0]
    with get_probe("prune").probe(model, stem_out, 0.5, ProbeContext(INPUT)) as (_pruned, effect):
        assert effect.coupled  # the block's output channels are the stream's: the stem's and the other blocks' too


def test_the_classifier_keeps_its_outputs(model):
    assert not applies("prune", model, "fc")
    assert applies("int8", model, "fc") and applies("inq", model, "fc")


def test_int8_rounds_weights_per_channel_and_inputs_per_tensor_then_restores(model, bundle):
    name = "layer2.0.conv1"
    ctx = ProbeContext(INPUT)
    images = [bundle.val.images[:16].float() / 255]
    calibrate_activations_(model, [name], images, ctx)
    scale, zero = ctx.activation_ranges[name]
    qmin, qmax = 0, ctx.int8_scheme.activation_qmax
    assert scale > 0 and qmin <= zero <= qmax
    before = _weights(model)
    seen = []
    with get_probe("int8").probe(model, name, 8, ctx) as (changed, effect):
        # registered after the probe's own hook, so it sees what the layer gets
        hook = changed.get_submodule(name).register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
        w = changed.get_submodule(name).weight.detach()
        levels = ctx.int8_scheme.weight_qmax - ctx.int8_scheme.weight_qmin + 1  # 128: 7-bit weights by default
        step = w.abs().amax(dim=(1, 2, 3)) / (levels / 2 - 0.5)  # symmetric: the largest magnitude at about +-qmax
        codes = w / step.view(-1, 1, 1, 1)
        assert torch.allclose(codes, codes.round(), atol=0.02 * levels / 2)  # on a per-channel grid
        assert len(torch.unique(w[0])) <= levels
        changed(torch.rand(2, *INPUT))
        assert effect.bytes_saved == 3 * w.numel()
    hook.remove()
    inputs = seen[0]
    levels = torch.unique(torch.round(inputs / scale + zero))
    assert levels.min() >= qmin and levels.max() <= qmax  # the layer saw uint8-rounded inputs
    assert torch.allclose(inputs, (torch.round(inputs / scale + zero) - zero) * scale, atol=1e-5)
    assert _unchanged(model, before)


@pytest.mark.parametrize("bits", [3, 5])
def test_inq_rounds_every_weight_to_its_power_of_two_levels(model, bits):
    name = "layer1.0.conv2"
    w = model.get_submodule(name).weight.detach().clone()
    before = _weights(model)
    with get_probe("inq").probe(model, name, bits, ProbeContext(INPUT)) as (changed, effect):
        rounded = changed.get_submodule(name).weight.detach()
        assert torch.equal(rounded, quantize_pow2(w, *fit_exponents(w[w != 0], bits)))
        magnitudes = torch.unique(rounded.abs()[rounded != 0])
        assert len(magnitudes) <= 2 ** (bits - 2)
        assert torch.equal(torch.log2(magnitudes), torch.log2(magnitudes).round())
        assert effect.bytes_saved == w.numel() * (32 - bits) // 8
    assert _unchanged(model, before)


def test_probes_leave_the_model_restored_when_the_evaluation_fails(model):
    before = _weights(model)
    with pytest.raises(RuntimeError, match="boom"), get_probe("inq").probe(model, "fc", 3, ProbeContext(INPUT)):
        raise RuntimeError("boom")
    assert _unchanged(model, before)
    assert not torch.equal(copy.deepcopy(model).fc.weight, torch.zeros_like(model.fc.weight))

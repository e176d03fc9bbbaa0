"""The quantization-backend protocol: a backend registered by a test (as a plug-in would be) is offered by the recipe
validation and used by the qat stage; the shared calibration keeps BatchNorm's statistics; a plan round-trips."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from pipeline.core.int8 import (
    Int8Plan,
    QuantizationBackend,
    available_backends,
    calibrate_,
    converted_by,
    get_backend,
    is_fake_quantized,
    observers_paused,
    register_backend,
)
from pipeline.core.int8 import backend as registry
from pipeline.recipe import RecipeError, validate_recipe
from stages.qat import QATConfig, run_qat
from tests.conftest import stage_context, synthetic_bundle, tiny_recipe, trained_state

BUNDLE = synthetic_bundle(n_train=32, n_val=16, n_test=16, size=16)


class _Marker(nn.Module):
    """The fake backend's 'fake quantizer': rounds to 1/8 steps, observes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("observer_enabled", torch.ones(1, dtype=torch.long))

    def disable_observer(self) -> None:
        self.observer_enabled.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 8) / 8


class RoundingBackend(QuantizationBackend):
    """A backend in a dozen lines: its 'int8' model rounds the input, its artifact is the float state_dict."""

    name = "rounding"
    summary = "a test backend"
    runtimes = frozenset({"onnxruntime"})
    torch_int8_kernels = False

    def prepare(self, model: nn.Module, plan: Int8Plan) -> nn.Module:
        wrapped = nn.Sequential(_Marker(), model)
        wrapped.plan = plan
        return wrapped.train()

    def convert(self, prepared: nn.Module) -> nn.Module:
        out = copy.deepcopy(prepared).eval()
        out.rounded = True
        return out

    def freeze_(self, prepared: nn.Module, *, observers: bool, bn_stats: bool) -> None:
        if observers:
            prepared[0].disable_observer()

    def encode(self, converted: nn.Module, plan: Int8Plan) -> dict[str, Any]:
        return {"state_dict": converted[1].state_dict()}

    def decode(self, payload: dict[str, Any], model: nn.Module | None) -> nn.Module:
        raise NotImplementedError

    def owns(self, model: nn.Module) -> bool:
        return getattr(model, "rounded", False)

    def is_prepared(self, model: nn.Module) -> bool:
        return any(isinstance(m, _Marker) for m in model.modules()) and not self.owns(model)

    def exportable(self, converted: nn.Module, example: torch.Tensor) -> nn.Module:
        return converted

    def int8_weights(self, converted: nn.Module) -> dict[str, torch.Tensor]:
        return {}

    def weight_tensors(self, converted: nn.Module) -> list[torch.Tensor]:
        return list(converted.parameters())

    def float_ops(self, converted: nn.Module) -> list[str]:
        return ["all of them"]

    def fake_quantizers(self, prepared: nn.Module):
        return [m for m in prepared.modules() if isinstance(m, _Marker)]


@pytest.fixture
def rounding(monkeypatch):
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))  # unregistered after the test
    return register_backend(RoundingBackend())


def test_a_registered_backend_is_offered_by_validation_and_used_by_qat(rounding):
    assert available_backends() == ("pt2e", "rounding") and get_backend("rounding") is rounding
    recipe = validate_recipe(tiny_recipe(stages=[{"qat": {"backend": "rounding", "epochs": 1}}]))
    assert recipe.stage_specs()[0].config.backend == "rounding"
    state = trained_state(BUNDLE, epochs=1, lr=0.05)
    out = run_qat(state, QATConfig(backend="rounding", epochs=1, calibration_batches=1), stage_context(BUNDLE))
    assert is_fake_quantized(out.state.model) and out.state.wrapper.backend == "rounding"
    assert out.state.structure[-1].args["backend"] == "rounding"
    assert out.metrics["int8_fp32_ops"] == 1 and not out.state.model[0].observer_enabled.item()  # frozen on schedule
    assert converted_by(rounding.convert(out.state.model)) is rounding


def test_an_unknown_backend_is_refused_when_the_recipe_loads_with_the_known_ones():
    with pytest.raises(
        RecipeError, match=r"stages\[0\]\.qat\.backend: .*unknown quantization backend 'fx'; available: pt2e"
    ):
        validate_recipe(tiny_recipe(stages=[{"qat": {"backend": "fx"}}]))
    with pytest.raises(ValueError, match="registered twice"):
        register_backend(get_backend("pt2e"))


def test_calibration_keeps_batchnorm_statistics_and_counts_batches():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    assert calibrate_(model, [torch.randn(4, 3, 8, 8) * 5 for _ in range(3)], "cpu", training=True) == 3
    assert model.training and all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    assert calibrate_(model, [], "cpu", training=False) == 0 and not model.training


def test_observers_paused_restores_each_quantizer_as_it_was(rounding):
    prepared = rounding.prepare(nn.Linear(2, 2), Int8Plan((2,)))
    with observers_paused(prepared):
        assert not prepared[0].observer_enabled.item()
    assert prepared[0].observer_enabled.item()
    with observers_paused(nn.Linear(2, 2)):  # a float model: nothing to pause
        pass


def test_a_plan_round_trips_through_plain_data():
    plan = Int8Plan((3, 32, 32), ("layer1.0.conv1",), ("fc",))
    assert Int8Plan.from_dict(plan.to_dict()) == plan
    assert Int8Plan.from_dict({"input_size": [3, 8, 8]}) == Int8Plan((3, 8, 8))

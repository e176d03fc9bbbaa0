"""Layer latency shares read from ONNX Runtime's own profile: every ONNX node traces back to the torch module it was
exported from, each layer gets the time of the nodes inside it, and the shares follow where the compute is."""

from __future__ import annotations

import pytest
import timm
import torch

from pipeline.deploy.layer_latency import layer_latency_shares, node_scopes
from pipeline.deploy.onnx import export_onnx
from tests.conftest import TINY_MODEL

SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model(TINY_MODEL, num_classes=4).eval()


def _layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]


def test_every_conv_node_traces_back_to_its_module(model, tmp_path):
    scopes = node_scopes(export_onnx(model, SIZE, tmp_path / "m.onnx", opset=18))
    convs = [s for s in scopes.values() if any(n in s for n in _layers(model))]
    owners = {next(n for n in reversed(s) if n in _layers(model)) for s in convs}
    assert owners == set(_layers(model))  # each conv and the classifier own at least one node


def test_shares_are_where_the_compute_is(model):
    layers = _layers(model)
    shares = layer_latency_shares(model, SIZE, layers, runs=20, warmup=3)
    assert set(shares) == set(layers) and all(s > 0 for s in shares.values())
    assert 0.3 < sum(shares.values()) <= 1.0 + 1e-9  # the rest: activations, pooling, additions
    # the stem's last conv does 1.18 M MACs per image, layer4's 1x1 downsample 18 k (64x fewer): it takes longer
    assert shares["conv1.6"] > shares["layer4.0.downsample.1"]

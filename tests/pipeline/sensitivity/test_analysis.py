"""The grid over a model: drops measured against the unchanged model on the validation split, layers ranked by
them, cells cached per model and reused, and the ways an analysis is refused."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from torch import nn

from pipeline.core.metrics import predictions
from pipeline.sensitivity.analysis import analyse, select_layers, subset
from pipeline.sensitivity.config import SensitivityConfig, SensitivityError
from pipeline.sensitivity.probes import _PROBES, Effect, register_probe
from tests.conftest import synthetic_bundle, trained_state


@pytest.fixture(scope="module")
def bundle():
    return synthetic_bundle(n_train=128, n_val=64)


@pytest.fixture(scope="module")
def model(bundle) -> nn.Module:
    return trained_state(bundle, epochs=3, lr=0.05).model.eval()


@pytest.fixture
def zero_probe():
    """A probe (registered as a plug-in would be) that zeroes the layer's weights and bias by hand."""

    @register_probe("zero", lambda _c: (1.0,), lambda _s: "zeroed")
    @contextmanager
    def zero(model, name, _setting, _ctx):
        layer = model.get_submodule(name)
        kept = [p.detach().clone() for p in layer.parameters(recurse=False)]
        with torch.no_grad():
            for p in layer.parameters(recurse=False):
                p.zero_()
        try:
            yield model, Effect()
        finally:
            with torch.no_grad():
                for p, value in zip(layer.parameters(recurse=False), kept, strict=True):
                    p.copy_(value)

    yield "zero"
    del _PROBES["zero"]


def test_a_zeroed_layer_ranks_by_the_accuracy_it_takes_away(model, bundle, tmp_path, zero_probe):
    config = SensitivityConfig(techniques=(zero_probe,))
    result = analyse(model, bundle, config, model_name="tiny", model_key="k", cache_dir=tmp_path, progress=False)
    base = predictions(model, bundle.eval_loader("val")).top1
    assert result.base_top1 == base > 50  # the model learned the synthetic task
    ranked = [(info.name, cells["zeroed"]) for info, cells in result.ranked()]
    drops = dict((name, cell.drop) for name, cell in ranked)
    # Zeroing the classifier (its bias left) or the stem's first conv (BatchNorm then outputs its shift) gives every
    # image one class: a quarter of the balanced split, the largest drop there is; they rank first.
    for name in ("fc", "conv1.0"):
        assert result.cells[[c.layer for c in result.cells].index(name)].val_top1 == pytest.approx(25.0)
        assert drops[name] == pytest.approx(base - 25.0)
    assert {name for name, _ in ranked[:2]} <= {name for name, d in drops.items() if d == pytest.approx(base - 25)}
    # A conv inside a residual branch leaves the skip path: zeroing it costs less.
    assert drops["layer1.0.conv1"] < drops["fc"]
    assert [d for _, d in drops.items()] == sorted(drops.values(), reverse=True)


def test_real_probes_fill_the_grid_and_cells_are_cached(model, bundle, tmp_path):
    config = SensitivityConfig(prune_ratios=(0.5,), inq_bits=(2, 5), layers=("layer1.*", "fc"))
    first = analyse(model, bundle, config, model_name="tiny", model_key="k", cache_dir=tmp_path, progress=False)
    names = [info.name for info in first.layers]
    assert names == select_layers(model, ("layer1.*", "fc")) and "fc" in names
    assert first.labels == ["prune 50%", "int8", "inq 2b", "inq 5b"]
    # every layer x setting, but no pruning of the classifier's outputs
    assert len(first.cells) == 4 * len(names) - 1 and first.evaluated == len(first.cells)
    assert all(c.drop == pytest.approx(first.base_top1 - c.val_top1) for c in first.cells)
    assert sum(info.macs_share for info in first.layers) <= 1.0
    again = analyse(model, bundle, config, model_name="tiny", model_key="k", cache_dir=tmp_path, progress=False)
    assert again.evaluated == 0 and [c.val_top1 for c in again.cells] == [c.val_top1 for c in first.cells]
    wider = SensitivityConfig(prune_ratios=(0.5,), inq_bits=(2, 5, 8), layers=("layer1.*", "fc"))
    more = analyse(model, bundle, wider, model_name="tiny", model_key="k", cache_dir=tmp_path, progress=False)
    assert more.evaluated == len(names)  # only the new column
    other = analyse(model, bundle, config, model_name="tiny", model_key="other", cache_dir=tmp_path, progress=False)
    assert other.evaluated == len(first.cells)  # another model: nothing reused


def test_a_subset_is_fixed_and_random(bundle):
    a, b = subset(bundle, 20), subset(bundle, 20)
    assert len(a.val) == 20 and torch.equal(a.val.labels, b.val.labels)
    assert len(set(a.val.labels.tolist())) > 1  # not the first images of one class
    assert subset(bundle, None) is bundle


def test_refusals(model, bundle, tmp_path):
    with pytest.raises(SensitivityError, match="matched no conv or linear layer.*layer1.0.conv1"):
        select_layers(model, ("layer9.*",))
    no_val = replace(bundle, val=None)
    with pytest.raises(SensitivityError, match="validation split"):
        analyse(model, no_val, SensitivityConfig(), model_name="t", model_key="k", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        SensitivityConfig(prune_ratios=(0.5, 1.0))
    with pytest.raises(ValueError, match="2..8"):
        SensitivityConfig(inq_bits=(1,))
    with pytest.raises(ValueError, match="greater than or equal to 100"):
        SensitivityConfig(images=10)

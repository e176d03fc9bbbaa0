"""Pruning: structured pruning really shrinks timm models; unstructured zeros persist and shrink the artifact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.core.artifacts import load_artifact, save_artifact
from pipeline.core.fixed_weights import FixedWeights
from pipeline.core.models import ModelSpec, ModelState
from stages import StageContext, get_stage
from stages.inq import INQConfig, run_inq
from stages.prune import PruneConfig, run_prune, step_ratio, weight_sparsity
from stages.sparsity import magnitude_masks
from tests.conftest import TINY_MODEL, stage_context, synthetic_bundle

BUNDLE32 = synthetic_bundle(n_train=32, n_test=8, classes=4, size=32)


def _ctx(bundle=BUNDLE32, name=TINY_MODEL, kwargs=None) -> StageContext:
    return stage_context(bundle, name=name, kwargs=kwargs, batch_size=8, augment=False)


def _state(name=TINY_MODEL, kwargs=None, bundle=BUNDLE32) -> ModelState:
    spec = ModelSpec(name, bundle.num_classes, kwargs or {})
    torch.manual_seed(0)
    return ModelState(spec.build(), spec, {"mean": bundle.mean, "std": bundle.std, "input_size": bundle.input_size})


def _outputs_match(state: ModelState, path) -> None:
    save_artifact(state, path)
    loaded = load_artifact(path)
    x = torch.randn(2, *BUNDLE32.input_size)
    with torch.inference_mode():
        assert torch.allclose(loaded(x), state.model.eval()(x), atol=1e-6)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet10t", {}),  # residual adds
        ("resnet18", {}),
        ("mobilenetv3_small_100", {}),  # depthwise + squeeze-excite
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}),  # attention heads
    ],
)
def test_structured_pruning_shrinks_and_still_runs(name, kwargs, tmp_path):
    state = _state(name, kwargs)
    params = sum(p.numel() for p in state.model.parameters())
    out = run_prune(state, PruneConfig(pruning_ratio=0.5, epochs=0), _ctx(name=name, kwargs=kwargs))
    assert out.metrics["params_after"] < 0.5 * params and out.metrics["macs_after"] < out.metrics["macs_before"]
    assert out.state.model.get_classifier().out_features == 4  # the head keeps one output per class
    _outputs_match(out.state, tmp_path / "pruned.pt")
    assert (tmp_path / "pruned.pt").stat().st_size < 0.5 * 4 * params


@pytest.mark.parametrize("importance", ["l1", "l2", "group_norm", "bn_scale", "taylor", "random"])
def test_every_importance_criterion_prunes(importance):
    out = run_prune(_state(), PruneConfig(pruning_ratio=0.3, importance=importance, epochs=0), _ctx())
    assert out.metrics["params_after"] < out.metrics["params_before"]


def test_iterative_structured_steps_fine_tune_between():
    seen = []
    ctx = _ctx()
    ctx.on_epoch_end = lambda epoch, stats: seen.append(epoch)
    out = run_prune(_state(), PruneConfig(pruning_ratio=0.5, iterative_steps=2, epochs=1), ctx)
    assert out.report.epochs == 2 and len(seen) == 2


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_reaches_sparsity_and_keeps_zeros_through_training(scope, tmp_path):
    state = _state()
    out = run_prune(state, PruneConfig(method="unstructured", pruning_ratio=0.8, scope=scope, iterative_steps=2,
                                       epochs=1, lr=0.1), _ctx())  # fmt: skip
    assert out.metrics["weight_sparsity"] == pytest.approx(0.8, abs=0.002)
    assert out.state.artifact_format == "sparse"
    zero_masks = {n: out.state.fixed.mask(n) for n in out.state.fixed.names()}
    params = dict(out.state.model.named_parameters())
    assert all(torch.all(params[n][m] == 0) for n, m in zero_masks.items())
    # The sparse artifact stores fewer bytes than the dense fp32 model, and loads back the same.
    dense = ModelState(out.state.model, out.state.spec, out.state.preprocessing)
    dense_bytes = save_artifact(dense, tmp_path / "dense.pt")
    sparse_bytes = save_artifact(out.state, tmp_path / "sparse.pt")
    assert sparse_bytes < 0.4 * dense_bytes
    _outputs_match(out.state, tmp_path / "sparse2.pt")
    # A later training stage keeps the zeros (the shared loop enforces the fixed mask).
    get_stage("train").run(out.state, get_stage("train").config(epochs=1, lr=0.2), _ctx())
    assert weight_sparsity(out.state.model) >= 0.798


def test_magnitude_masks_pick_smallest_and_respect_fixed():
    weights = {"a": torch.tensor([0.1, -0.5, 0.0, 2.0]), "b": torch.tensor([-0.05, 3.0, 0.2, 0.3])}
    fixed = FixedWeights()
    fixed.fix_("a", torch.tensor([False, False, True, False]), torch.zeros(4))  # a pruned zero
    fixed.fix_("b", torch.tensor([True, False, False, False]), torch.tensor([-0.05, 0, 0, 0]))  # a frozen value
    layer = magnitude_masks(weights, fixed, 0.5, "layer")
    assert layer["a"].tolist() == [True, False, False, False]  # one more besides the fixed zero
    assert layer["b"].tolist() == [False, False, True, True]  # the frozen -0.05 is never chosen
    glob = magnitude_masks(weights, fixed, 0.5, "global")
    assert sum(int(m.sum()) for m in glob.values()) == 3  # 4 of 8, one zero already fixed
    assert glob["a"][0] and glob["b"][2] and glob["b"][3]
    assert step_ratio(0.8, 1, 4) == pytest.approx(0.2) and step_ratio(0.8, 4, 4) == pytest.approx(0.8)


def test_fixed_weights_follow_removed_channels():
    """Frozen entries stay with their weights when channels around them are removed."""
    state = _state()
    gen = torch.Generator().manual_seed(0)
    for name, p in state.model.named_parameters():
        if p.dim() == 4:
            state.fixed.fix_(name, torch.rand(p.shape, generator=gen) < 0.3, p.detach().clone())
    out = run_prune(state, PruneConfig(pruning_ratio=0.5, epochs=1, lr=0.1), _ctx())
    params = dict(out.state.model.named_parameters())
    for name in out.state.fixed.names():
        mask = out.state.fixed.mask(name)
        assert mask.shape == params[name].shape
        assert torch.equal(params[name].detach()[mask], out.state.fixed.values(name)[mask])


def test_inq_after_structured_prune_and_prune_after_inq(tmp_path):
    ctx = _ctx()
    pruned = run_prune(_state(), PruneConfig(pruning_ratio=0.5, epochs=0), ctx).state
    quantized = run_inq(pruned, INQConfig(bits=5, epochs=0), ctx).state
    _outputs_match(quantized, tmp_path / "prune-inq.pt")
    again = run_prune(quantized, PruneConfig(pruning_ratio=0.3, epochs=1, lr=0.1), ctx).state
    assert again.artifact_format == "inq"
    _outputs_match(again, tmp_path / "inq-prune.pt")  # still encodable: every weight still on its grid


def test_a_model_that_cannot_be_pruned_fails_clearly():
    class HardCodedReshape(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 32 * 32, 4)

        def forward(self, x):
            return self.fc(self.conv(x).reshape(x.shape[0], 8 * 32 * 32))

    spec = ModelSpec(TINY_MODEL, 4)
    state = ModelState(HardCodedReshape(), spec, {})
    with pytest.raises(
        RuntimeError, match="left HardCodedReshape unable to run: its top-level forward failed.*unstructured"
    ):  # round_to None: 8 channels rounded to 8 would keep them all
        run_prune(state, PruneConfig(pruning_ratio=0.5, epochs=0, round_to=None), _ctx())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pruning_ratio": 1.0}, "less than 1"),
        ({"importance": "vibes"}, "Input should be 'l1', 'l2'"),
        ({"iterative_steps": 0}, "greater than or equal to 1"),
        ({"method": "unstructured", "importance": "taylor"}, "is for structured pruning"),
    ],
)
def test_config_is_validated(fields, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(**fields)


def test_a_criterion_that_removes_nothing_is_an_error():
    vit = {"img_size": 32, "patch_size": 8}
    with pytest.raises(RuntimeError, match="removed no channel .*bn_scale needs BatchNorm"):
        run_prune(_state("vit_tiny_patch16_224", vit), PruneConfig(importance="bn_scale", epochs=0),
                  _ctx(name="vit_tiny_patch16_224", kwargs=vit))  # fmt: skip


def test_whole_attention_heads_can_be_removed(tmp_path):
    vit = {"img_size": 32, "patch_size": 8}
    state = _state("vit_tiny_patch16_224", vit)
    heads = state.model.blocks[0].attn.num_heads
    out = run_prune(state, PruneConfig(pruning_ratio=0.5, prune_heads=True, epochs=0),
                    _ctx(name="vit_tiny_patch16_224", kwargs=vit))  # fmt: skip
    attn = out.state.model.blocks[0].attn
    assert attn.num_heads == heads // 2 and attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
    _outputs_match(out.state, tmp_path / "heads.pt")


def test_unstructured_after_inq_cannot_reach_its_target():
    ctx = _ctx()
    frozen = run_inq(_state(), INQConfig(bits=5, epochs=0), ctx).state
    with pytest.raises(RuntimeError, match="frozen by an earlier stage"):
        run_prune(frozen, PruneConfig(method="unstructured", pruning_ratio=0.8, epochs=0), ctx)


@pytest.mark.parametrize(
    ("channels", "asked", "multiple", "kept"),
    [(24, 17, 8, 16), (24, 21, 8, 24), (64, 3, 8, 8), (8, 5, 8, 8), (6, 3, 8, 6), (20, 19, 8, 16), (40, 27, None, 27)],
)
def test_kept_channels_round_to_the_nearest_multiple_and_never_empty_a_layer(channels, asked, multiple, kept):
    from stages.channels import kept_channels

    assert kept_channels(channels, asked, multiple) == kept


def _widths(model) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_050"])
def test_structured_pruning_keeps_channel_counts_the_runtimes_block(name):
    before = _widths(_state(name).model)
    rounded = _widths(run_prune(_state(name), PruneConfig(pruning_ratio=0.3, epochs=0), _ctx(name=name)).state.model)
    exact = _widths(run_prune(_state(name), PruneConfig(pruning_ratio=0.3, epochs=0, round_to=None),
                              _ctx(name=name)).state.model)  # fmt: skip
    assert all(w % 8 == 0 or w == b for w, b in zip(rounded, before, strict=True))  # auto: 8, or left as it was
    assert any(w % 8 for w in exact) and sum(rounded) < sum(before)


def test_round_to_auto_resolves_to_the_recipes_runtimes_when_it_loads(monkeypatch):
    from pipeline.deploy import Runtime
    from pipeline.deploy import runtimes as registry
    from pipeline.recipe import validate_recipe
    from tests.conftest import tiny_recipe

    def config(**deploy):
        return validate_recipe(tiny_recipe(stages=[{"prune": {}}], deploy=deploy)).stage_specs()[0].config

    assert config(runtimes=["onnxruntime", "openvino"]).round_to == 8 and config(runtimes=[]).round_to == 8
    wide = Runtime(name="wide", short="w", format="w", packages=("numpy",), file="w/model", open=lambda *a: None,
                   channel_multiple=16)  # fmt: skip
    monkeypatch.setitem(registry._RUNTIMES, wide.name, wide)
    assert config(runtimes=["onnxruntime", "wide"]).round_to == 16
    assert validate_recipe(tiny_recipe(stages=[{"prune": {"round_to": None}}])).stage_specs()[0].config.round_to is None
    with pytest.raises(ValueError, match="must be auto, null or 1..256"):
        PruneConfig(round_to=0)


def test_uniform_pruning_of_a_share_of_the_macs_finds_its_channel_ratio():
    from pipeline.core.metrics import count_macs

    state = _state("mobilenetv2_050")
    before = count_macs(state.model, BUNDLE32.input_size)
    out = run_prune(state, PruneConfig(pruning_ratio=0.3, target="macs", epochs=0), _ctx(name="mobilenetv2_050"))
    removed = 1 - count_macs(out.state.model, BUNDLE32.input_size) / before
    assert 0.3 <= removed < 0.45 and out.metrics["uniform_removed_share"] == pytest.approx(removed)
    assert 0 < out.metrics["uniform_channel_ratio"] < 0.3  # pointwise convolutions lose MACs on both sides
    assert "target" not in PruneConfig().model_dump() and PruneConfig(target="macs").model_dump()["target"] == "macs"
    with pytest.raises(ValueError, match="macs and params need method: structured"):
        PruneConfig(method="unstructured", target="macs")
    with pytest.raises(ValueError, match="not channels"):
        PruneConfig(allocation="sensitivity", target="channels")

"""Low-rank factorisation: the SVD factors are the best approximation, the stage shrinks the model, and it
composes with every other stage through the artifact's structural record."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from pipeline.core.artifacts import load_artifact, save_artifact
from pipeline.core.int8 import get_backend
from pipeline.core.models import ModelSpec, ModelState
from pipeline.recipe import validate_recipe
from pipeline.sweep.sweep import plan_sweep
from stages.base import chain_conflict
from stages.distill import DistillConfig, run_distill
from stages.inq import INQConfig, run_inq
from stages.lowrank import LowRankConfig, choose_rank, factorise, lowrank_module, run_lowrank
from stages.prune import PruneConfig, run_prune
from stages.qat import QATConfig, run_qat
from tests.conftest import PROJECT_ROOT, run_cli, stage_context, synthetic_bundle, tiny_recipe, write_recipe

BUNDLE = synthetic_bundle(n_train=32, n_test=8, classes=4, size=32)


def _ctx():
    return stage_context(BUNDLE, name="resnet10t", batch_size=8, augment=False)


def _state() -> ModelState:
    spec = ModelSpec("resnet10t", BUNDLE.num_classes)
    torch.manual_seed(0)
    preprocessing = {"mean": BUNDLE.mean, "std": BUNDLE.std, "input_size": BUNDLE.input_size}
    return ModelState(spec.build().eval(), spec, preprocessing)


def test_full_rank_factors_reproduce_the_weight_and_truncation_is_eckart_young():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    a, b = factorise(w, 6)
    assert a.shape == (6, 3, 3, 3) and b.shape == (6, 6)
    assert torch.allclose(b @ a.flatten(1), w.flatten(1), atol=1e-10)
    s = torch.linalg.svdvals(w.flatten(1))
    a2, b2 = factorise(w, 2)
    error = torch.linalg.matrix_norm(w.flatten(1) - b2 @ a2.flatten(1))  # Frobenius
    assert error.item() == pytest.approx(s[2:].square().sum().sqrt().item(), rel=1e-9)


def test_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert choose_rank(s, 0.5, "rank") == 2
    assert choose_rank(s, 0.01, "rank") == 1
    assert choose_rank(s, 16 / 22, "energy") == 1
    assert choose_rank(s, 0.9, "energy") == 2  # 20/22 = 0.909
    assert choose_rank(s, 1.0, "energy") == 4


def test_the_factorised_conv_computes_the_low_rank_conv():
    conv = nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=True)
    a, b = factorise(conv.weight, 6)  # full rank: the same function
    pair = lowrank_module(conv, 6)
    with torch.no_grad():
        pair.reduce.weight.copy_(a)
        pair.expand.weight.copy_(b[:, :, None, None])
        pair.expand.bias.copy_(conv.bias)
    x = torch.randn(2, 8, 9, 9)
    assert torch.allclose(pair(x), conv(x), atol=1e-5)


def test_stage_shrinks_the_model_and_round_trips_in_a_fresh_process(tmp_path):
    out = run_lowrank(_state(), LowRankConfig(keep=0.25, epochs=1), _ctx())
    assert out.metrics["params_after"] < 0.6 * out.metrics["params_before"]
    assert out.metrics["macs_after"] < out.metrics["macs_before"]
    assert out.metrics["lowrank_layers"] >= 5
    assert [c.kind for c in out.state.structure] == ["lowrank"]
    assert out.state.model.get_classifier().__class__ is not nn.Sequential  # the classifier is left alone
    path = tmp_path / "artifact.pt"
    save_artifact(out.state, path)
    x = torch.randn(2, *BUNDLE.input_size)
    torch.save(x, tmp_path / "x.pt")
    with torch.inference_mode():
        expected = out.state.model.eval()(x)
    code = (f"import torch; from pipeline import load_artifact; m = load_artifact({str(tmp_path)!r}); "
            f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})).detach(), {str(tmp_path / 'y.pt')!r})")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_a_rule_that_shrinks_nothing_is_an_error():
    with pytest.raises(RuntimeError, match="no layer of ResNet shrinks"):
        run_lowrank(_state(), LowRankConfig(keep=1.0, epochs=0), _ctx())


def test_skip_patterns_leave_layers_alone():
    out = run_lowrank(_state(), LowRankConfig(keep=0.25, epochs=0, skip=("stem.*", "layer1.*")), _ctx())
    ranks = out.state.structure[0].args["ranks"]
    assert ranks and not any(n.startswith(("stem.", "layer1.")) for n in ranks)


def _structured(state):
    return run_prune(state, PruneConfig(pruning_ratio=0.5, epochs=0), _ctx()).state


def _unstructured(state):
    return run_prune(state, PruneConfig(method="unstructured", pruning_ratio=0.5, epochs=0), _ctx()).state


def _lowrank(state):
    return run_lowrank(state, LowRankConfig(keep=0.25, epochs=0), _ctx()).state


def _inq(state):
    return run_inq(state, INQConfig(bits=5, epochs=0), _ctx()).state


def _distill(state):
    return run_distill(state, DistillConfig(epochs=1, teacher="input"), _ctx()).state


def _qat(state):
    return run_qat(state, QATConfig(epochs=1, calibration_batches=2, lr=0.02), _ctx()).state


CHAINS = {
    "prune>lowrank": [_structured, _lowrank],
    "lowrank>prune": [_lowrank, _structured],
    "lowrank>unstructured": [_lowrank, _unstructured],
    "unstructured>lowrank": [_unstructured, _lowrank],
    "lowrank>inq": [_lowrank, _inq],
    "prune>lowrank>inq>qat": [_structured, _lowrank, _inq, _qat],
    "lowrank>qat>distill": [_lowrank, _qat, _distill],
    "distill>lowrank>distill": [_distill, _lowrank, _distill],
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_lowrank_composes_with_the_other_stages_through_the_artifact(chain, tmp_path):
    state = _state()
    for step in CHAINS[chain]:
        state = step(state)
    path = tmp_path / "artifact.pt"
    save_artifact(state, path)
    loaded = load_artifact(path)
    x = torch.randn(2, *BUNDLE.input_size)
    with torch.inference_mode():
        int8 = state.artifact_format == "int8"
        expected = get_backend("pt2e").convert(state.model)(x) if int8 else state.model.eval()(x)
        assert torch.equal(loaded(x), expected)
    assert any(isinstance(m, nn.Sequential) and hasattr(m, "reduce") for m in state.model.modules()) or (
        state.artifact_format == "int8"
    )


def test_chains_that_would_undo_a_stage_are_refused_when_the_recipe_loads():
    assert chain_conflict(["inq", "lowrank"]) == (1, "lowrank cannot run after inq; put lowrank before inq")
    assert chain_conflict(["qat", "lowrank"]) == (1, "lowrank cannot run after qat; put lowrank before qat")
    # qat's own may_follow refuses inq: inq does not name qat
    assert chain_conflict(["qat", "inq"]) == (1, "inq cannot run after qat; put inq before qat")
    assert chain_conflict(["qat", "prune"]) is None  # prune works on the float weights under fake quantization
    assert chain_conflict(["qat", "distill"]) is None
    assert chain_conflict(["lowrank", "prune", "inq", "qat", "distill"]) is None


@pytest.mark.slow
def test_lowrank_in_a_sweep_runs_where_it_may_and_is_skipped_where_it_may_not(tmp_path, isolated, cifar_root):
    stages = [
        {"lowrank": {"keep": 0.25, "epochs": 1, "lr": 0.01}},
        {"inq": {"bits": 5, "accumulated_portions": [0.5, 1.0], "epochs": 1, "lr": 0.01}},
    ]
    recipe = tiny_recipe(name="tiny-lowrank-sweep", stages=stages, orderings="all", include_singles=True)
    path = write_recipe(tmp_path / "sweep.yaml", recipe)
    result = run_cli(["sweep", str(path), "--reports-dir", str(tmp_path / "reports")], isolated)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lowrank cannot run after inq" in result.stdout + result.stderr
    sweep_id = plan_sweep(validate_recipe(recipe)).sweep_id
    table = (tmp_path / "reports" / sweep_id / "report.md").read_text()
    assert "lowrank>inq" in table and "inq>lowrank" not in table.split("skipped")[0]

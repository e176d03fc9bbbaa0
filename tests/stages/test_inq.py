"""INQ (Zhou et al. 2017) as the paper defines it: the level set, the Eq. 4 rounding, largest-first
partition, frozen groups that never move while the rest retrains, pruned zeros kept, and a packed
b-bit artifact that loads back bit for bit; plus the optional least-squares n1 rule (not in the paper)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import stages.inq  # noqa: F401  (registers the stage and the artifact format)
from pipeline.core.artifacts import load_artifact, save_artifact
from pipeline.core.models import ModelState, PowerOfTwoGrid
from pipeline.recipe import RecipeError, validate_recipe
from stages.base import StageContext, get_stage
from stages.inq import (
    N1_SEARCH,
    INQConfig,
    fit_exponents,
    inq_exponents,
    inq_parameters,
    inq_schedule,
    pack_bits,
    partition_mask,
    quantize_pow2,
    run_inq,
    unpack_bits,
)
from tests.conftest import stage_context, synthetic_bundle, tiny_recipe


def _context(bundle, on_epoch_end=None) -> StageContext:
    return stage_context(bundle, on_epoch_end=on_epoch_end)


@pytest.fixture(scope="module")
def bundle():
    return synthetic_bundle()


@pytest.fixture(scope="module")
def _trained(bundle) -> ModelState:
    torch.manual_seed(0)
    train = get_stage("train")
    return train.run(None, train.config(epochs=1), _context(bundle)).state


@pytest.fixture
def trained(_trained) -> ModelState:
    """A fresh copy of a briefly trained test ResNet, so tests may change it."""
    return copy.deepcopy(_trained)


def _is_pow2_or_zero(w: torch.Tensor, n1: int, n2: int) -> bool:
    """Every entry is exactly 0 or ±2^k with n2 <= k <= n1 (frexp: 2^k = 0.5 · 2^(k+1))."""
    mantissa, exponent = torch.frexp(w[w != 0])
    return bool((mantissa.abs() == 0.5).all() and ((exponent - 1 >= n2) & (exponent - 1 <= n1)).all())


# --- the level set and the rounding rule (paper Eq. 2-4) ----------------------------------------


@pytest.mark.parametrize("max_abs", [0.5, 0.05, 3.0, 1e-3])
def test_five_bits_give_eight_magnitudes_with_n1_from_the_largest_weight(max_abs):
    n1, n2 = inq_exponents(max_abs, 5)
    assert n1 - n2 + 1 == 8
    assert 2.0**n1 <= 4 * max_abs / 3 < 2.0 ** (n1 + 1)


def test_paper_three_bit_example_and_ternary_two_bits():
    assert inq_exponents(0.5, 3) == (-1, -2)  # the paper's example: n1 = -1 gives n2 = -2
    assert inq_exponents(0.5, 2) == (-1, -1)  # ternary {±2^n1, 0}
    w = torch.linspace(-1, 1, 201)
    assert set(quantize_pow2(w, -1, -1).unique().tolist()) == {-0.5, 0.0, 0.5}
    assert set(quantize_pow2(w, -1, -2).unique().tolist()) == {-0.5, -0.25, 0.0, 0.25, 0.5}


def test_n1_changes_exactly_where_four_thirds_of_max_abs_reaches_a_power_of_two():
    assert inq_exponents(0.75, 5)[0] == 0  # 4/3 · 0.75 = 1 = 2^0
    assert inq_exponents(math.nextafter(0.75, 0), 5)[0] == -1
    with pytest.raises(ValueError, match="max_abs"):
        inq_exponents(0.0, 5)


def _below(x: float) -> float:
    """The float32 just below x: the weights are float32, so the fp64 neighbour would round back to x."""
    return torch.nextafter(torch.tensor(x), torch.tensor(0.0)).item()


# n1 = 0, n2 = -3 (4 bits): P = {0, ±1/8, ±1/4, ±1/2, ±1}.
ROUNDING = [
    (_below(1 / 16), 0.0),  # below 2^(n2-1) = (0 + 2^n2)/2: zero
    (1 / 16, 1 / 8),  # (α+β)/2 with α = 0, β = 1/8 is included
    (_below(3 / 16), 1 / 8),  # just below 3β/2 for β = 1/8
    (3 / 16, 1 / 4),  # 3β/2 of 1/8 is (α+β)/2 of 1/4
    (_below(3 / 8), 1 / 4),
    (3 / 8, 1 / 2),
    (_below(3 / 4), 1 / 2),
    (3 / 4, 1.0),
    (1.49, 1.0),
    (1.5, 1.0),  # beyond 3·2^n1/2: clamped to 2^n1
    (100.0, 1.0),
]


@pytest.mark.parametrize("value, expected", ROUNDING)
def test_rounding_follows_eq4_at_and_around_the_boundaries(value, expected):
    w = torch.tensor([value, -value], dtype=torch.float32)
    assert quantize_pow2(w, 0, -3).tolist() == [expected, -expected]


def test_rounding_writes_positive_zero_and_keeps_dtype():
    q = quantize_pow2(torch.tensor([-0.01, 0.01, -0.0]), 0, -3)
    assert q.tolist() == [0.0, 0.0, 0.0] and not torch.signbit(q).any()
    assert quantize_pow2(torch.randn(10, dtype=torch.float64), 0, -3).dtype == torch.float64


@pytest.mark.parametrize("bits", range(2, 9))
def test_rounding_lands_in_the_level_set_for_every_bit_width(bits):
    w = torch.randn(5000) * 0.1
    n1, n2 = inq_exponents(float(w.abs().max()), bits)
    q = quantize_pow2(w, n1, n2)
    assert _is_pow2_or_zero(q, n1, n2)
    assert q.unique().numel() <= 2 ** (bits - 1) + 1


# --- the partition and the schedule --------------------------------------------------------------


def test_magnitude_partition_takes_the_largest_free_weights_first():
    w = torch.randn(40, 25, generator=torch.Generator().manual_seed(0))
    first = partition_mask(w, torch.zeros_like(w, dtype=torch.bool), 0.3)
    assert int(first.sum()) == 300
    assert w.abs()[first].min() > w.abs()[~first].max()
    second = partition_mask(w, first, 0.5)
    assert int(second.sum()) == 200 and not (second & first).any()
    rest = ~(first | second)
    assert w.abs()[second].min() > w.abs()[rest].max()


def test_random_partition_has_the_same_count_but_other_weights():
    w = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    fixed = partition_mask(w, torch.zeros(1000, dtype=torch.bool), 0.2)
    by_magnitude = partition_mask(w, fixed, 0.6)
    rand = partition_mask(w, fixed, 0.6, "random", torch.Generator().manual_seed(1))
    assert int(rand.sum()) == int(by_magnitude.sum()) == 400
    assert not (rand & fixed).any() and not torch.equal(rand, by_magnitude)
    assert torch.equal(rand, partition_mask(w, fixed, 0.6, "random", torch.Generator().manual_seed(1)))


def test_portions_count_only_eligible_weights():
    w = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    pruned = torch.zeros(1000, dtype=torch.bool)
    pruned[w.abs().argsort(descending=True)[:100]] = True  # even the largest weights are not eligible
    mask = partition_mask(w, pruned, 0.5, eligible=~pruned)
    assert int(mask.sum()) == 450 and not (mask & pruned).any()
    assert int(partition_mask(w, pruned | mask, 1.0, eligible=~pruned).sum()) == 450


def test_max_rule_is_the_papers_n1():
    w = torch.randn(1000) * 0.03
    for bits in range(2, 9):
        assert fit_exponents(w, bits) == fit_exponents(w, bits, "max") == inq_exponents(float(w.abs().max()), bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_mse_rule_picks_the_candidate_n1_with_least_rounding_error(bits):
    torch.manual_seed(bits)
    w = torch.distributions.StudentT(3.0).sample((4000,)) * 0.02  # heavy-tailed, like trained conv weights
    paper_n1, _ = inq_exponents(float(w.abs().max()), bits)

    def error(n1: int) -> float:
        n2 = n1 + 1 - 2 ** (bits - 1) // 2
        return float(((quantize_pow2(w.double(), n1, n2) - w.double()) ** 2).sum())

    n1, n2 = fit_exponents(w, bits, "mse")
    candidates = range(paper_n1 - N1_SEARCH + 1, paper_n1 + 1)
    assert n1 in candidates and n2 == n1 + 1 - 2 ** (bits - 1) // 2
    assert error(n1) == min(error(c) for c in candidates)
    if bits <= 3:  # the paper's n1 wastes the few levels on the tail: the fit moves down and zeroes less
        assert n1 < paper_n1
        paper_zeros = (quantize_pow2(w, *inq_exponents(float(w.abs().max()), bits)) == 0).sum()
        assert (quantize_pow2(w, n1, n2) == 0).sum() < paper_zeros


def test_mse_rule_hand_computed_and_ties_keep_the_larger_n1():
    # Ternary, ten weights at 0.3 and one at 1.0. Squared error per n1 (levels {±2^n1, 0}, zero below 2^(n1-1)):
    # n1=0: 10·0.3² = 0.9; n1=-1: 10·0.2² + 0.5² = 0.65; n1=-2: 10·0.05² + 0.75² = 0.5875; n1=-3: 1.07.
    assert fit_exponents(torch.tensor([0.3] * 10 + [1.0]), 2, "mse") == (-2, -2)
    # 0.75 is 0.25 from both 2^0 (the paper's n1) and 2^-1: the tie keeps the paper's level.
    assert fit_exponents(torch.tensor([0.75]), 2, "mse") == (0, 0)


def test_mse_rule_clips_weights_above_the_top_level():
    w = torch.tensor([1.0] + [0.01] * 19_999)  # one outlier: the fit serves the rest, the outlier becomes 2^n1
    n1, n2 = fit_exponents(w, 2, "mse")
    assert n1 < inq_exponents(1.0, 2)[0]
    assert quantize_pow2(w, n1, n2)[0] == 2.0**n1


def test_schedule_retrains_after_every_portion_but_the_last():
    assert inq_schedule((0.5, 0.75, 0.875, 1.0)) == [(0.5, True), (0.75, True), (0.875, True), (1.0, False)]


# --- the stage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_after_the_last_portion_every_weight_is_a_power_of_two_or_zero(trained, bundle, bits):
    max_abs = {n: float(p.detach().abs().max()) for n, p in inq_parameters(trained.model).items()}
    others = {n: p.detach().clone() for n, p in trained.model.named_parameters() if n not in max_abs}
    out = run_inq(trained, INQConfig(bits=bits), _context(bundle))

    layers = out.state.pow2_grids
    convs = {f"{m}.weight" for m, mod in out.state.model.named_modules() if isinstance(mod, nn.Conv2d | nn.Linear)}
    assert set(layers) == set(max_abs) == convs
    params = dict(out.state.model.named_parameters())
    for name, info in layers.items():
        n1 = inq_exponents(max_abs[name], bits)[0]
        assert info == PowerOfTwoGrid(n1, bits)
        assert _is_pow2_or_zero(params[name].detach(), n1, inq_exponents(max_abs[name], bits)[1]), name
        assert out.state.fixed.mask(name).all()
    for name in others:  # norms and biases: floating point, free, retrained
        assert params[name].dtype == torch.float32 and name not in out.state.fixed and name not in layers
    assert any(not torch.equal(params[n], before) for n, before in others.items())
    assert out.state.artifact_format == "inq"
    assert out.metrics["inq_quantized_fraction"] == 1.0 and out.metrics["inq_bits"] == bits
    assert 0 <= out.metrics["inq_zero_fraction"] < 1  # 8 bits reach 2^-63 below n1: few or no zeros
    assert out.report.epochs == 3  # no retraining after the final 1.0 portion


def test_mse_rule_stage_stores_its_n1_and_quantizes_onto_that_grid(trained, bundle, tmp_path):
    before = {n: p.detach().clone() for n, p in inq_parameters(trained.model).items()}
    paper = run_inq(copy.deepcopy(trained), INQConfig(bits=2), _context(bundle))
    out = run_inq(trained, INQConfig(bits=2, n1_rule="mse"), _context(bundle))
    params = dict(out.state.model.named_parameters())
    for name, info in out.state.pow2_grids.items():
        n1, n2 = fit_exponents(before[name][before[name] != 0], 2, "mse")
        assert info == PowerOfTwoGrid(n1, 2)
        assert _is_pow2_or_zero(params[name].detach(), n1, n2), name
    save_artifact(out.state, tmp_path / "inq.pt")
    reloaded = load_artifact(tmp_path / "inq.pt")
    for name, p in inq_parameters(reloaded).items():
        assert torch.equal(p, params[name]), name
    moved = [n for n, info in out.state.pow2_grids.items() if info.n1 < paper.state.pow2_grids[n].n1]
    assert moved, "the fit should lower n1 somewhere at 2 bits"
    assert out.metrics["inq_zero_fraction"] < paper.metrics["inq_zero_fraction"]


def test_final_epochs_train_only_norms_and_biases(trained, bundle):
    quantized = run_inq(copy.deepcopy(trained), INQConfig(bits=3, lr=0.1), _context(bundle))
    tuned = run_inq(trained, INQConfig(bits=3, final_epochs=2, lr=0.1), _context(bundle))
    assert tuned.report.epochs == quantized.report.epochs + 2
    assert INQConfig(bits=3, final_epochs=2).total_epochs() == 3 + 2
    before, after = dict(quantized.state.model.named_parameters()), dict(tuned.state.model.named_parameters())
    for name in tuned.state.pow2_grids:  # the same partition and rounding: identical power-of-two weights
        assert torch.equal(after[name], before[name]), name
    assert any(not torch.equal(after[n], before[n]) for n in after if n not in tuned.state.pow2_grids)


def test_frozen_weights_never_move_and_the_frozen_set_only_grows(trained, bundle):
    state = trained
    snapshots, epochs = [], []

    def snapshot(epoch, stats):
        epochs.append((epoch, stats["inq_portion"]))
        params = dict(state.model.named_parameters())
        snapshots.append({n: (state.fixed.mask(n).clone(), params[n].detach().clone()) for n in state.fixed.names()})

    # Large lr, momentum and weight decay: without the projection frozen weights would drift.
    config = INQConfig(epochs=2, lr=0.2, momentum=0.9, weight_decay=0.05, schedule="constant")
    out = run_inq(state, config, _context(bundle, on_epoch_end=snapshot))
    final = {
        n: (out.state.fixed.mask(n), p.detach()) for n, p in out.state.model.named_parameters() if n in out.state.fixed
    }
    snapshots.append(final)

    assert epochs == [(0, 0.5), (1, 0.5), (2, 0.75), (3, 0.75), (4, 0.875), (5, 0.875)]
    free_moved = False
    for before, after in zip(snapshots, snapshots[1:], strict=False):
        for name, (mask, values) in before.items():
            new_mask, new_values = after[name]
            assert not (mask & ~new_mask).any(), f"{name}: a frozen weight was released"
            assert torch.equal(new_values[mask], values[mask]), f"{name}: a frozen weight moved"
            free_moved |= not torch.equal(new_values[~new_mask], values[~new_mask])
    assert free_moved  # the retraining did change the free weights
    layer = next(iter(out.state.pow2_grids))
    fractions = [float(s[layer][0].float().mean()) for s in snapshots[::2]]
    assert fractions == pytest.approx([0.5, 0.75, 0.875, 1.0], abs=0.01)


def test_pruned_zeros_stay_zero_and_are_not_counted(trained, bundle):
    state, pruned = trained, {}
    params = inq_parameters(state.model)
    for i, (name, p) in enumerate(params.items()):
        mask = p.detach().abs() <= p.detach().abs().flatten().kthvalue(int(0.4 * p.numel())).values
        if i == 0:  # prune the largest weight too, made huge: the levels must come from survivors only
            p.data.view(-1)[p.detach().abs().argmax()] = 100.0
            mask.view(-1)[p.detach().abs().argmax()] = True
        state.fixed.fix_(name, mask, torch.zeros_like(p))
        pruned[name] = mask.clone()
    survivors_max = {n: float(p.detach().abs()[~pruned[n]].max()) for n, p in params.items()}
    counts = []

    def count(epoch, stats):
        counts.append({n: int((state.fixed.mask(n) & ~pruned[n]).sum()) for n in pruned})

    out = run_inq(state, INQConfig(accumulated_portions=[0.5, 1.0]), _context(bundle, on_epoch_end=count))

    for name, p in inq_parameters(out.state.model).items():
        eligible = int((~pruned[name]).sum())
        assert counts[0][name] == math.floor(0.5 * eligible + 0.5)  # half of the non-pruned weights
        assert (p.detach()[pruned[name]] == 0).all() and (out.state.fixed.values(name)[pruned[name]] == 0).all()
        assert out.state.pow2_grids[name].n1 == inq_exponents(survivors_max[name], 5)[0]
    first = next(iter(params))
    assert out.state.pow2_grids[first].n1 < inq_exponents(100.0, 5)[0]
    assert out.metrics["inq_quantized_fraction"] == 1.0
    total = sum(m.numel() for m in pruned.values())
    assert out.metrics["inq_zero_fraction"] >= sum(int(m.sum()) for m in pruned.values()) / total


def test_random_partition_also_ends_fully_quantized(trained, bundle):
    out = run_inq(trained, INQConfig(partition="random", epochs=0), _context(bundle))
    assert out.metrics["inq_quantized_fraction"] == 1.0 and out.report.epochs == 0
    for name, p in inq_parameters(out.state.model).items():
        n1 = out.state.pow2_grids[name].n1
        assert _is_pow2_or_zero(p.detach(), n1, n1 - 7)


def test_inq_needs_an_input_model(bundle):
    with pytest.raises(ValueError, match="needs a trained input model"):
        run_inq(None, INQConfig(), _context(bundle))


# --- the packed artifact -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
def test_bit_packing_round_trips(bits):
    codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), codes)


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_artifact_loads_back_bit_identical_at_about_the_bit_count(trained, bundle, tmp_path, bits):
    out = run_inq(trained, INQConfig(bits=bits, epochs=0), _context(bundle))
    size = save_artifact(out.state, tmp_path / "inq.pt")
    loaded = load_artifact(tmp_path / "inq.pt")

    expected, got = out.state.model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        if value.is_floating_point():
            assert torch.equal(got[key].view(torch.int32), value.view(torch.int32)), key  # bit for bit
        else:
            assert torch.equal(got[key], value), key
    x = torch.randn(2, *bundle.input_size)
    with torch.inference_mode():
        assert torch.equal(loaded(x), out.state.model.eval()(x))

    quantized = sum(expected[k].numel() for k in out.state.pow2_grids)
    other_bytes = sum(v.numel() * v.element_size() for k, v in expected.items() if k not in out.state.pow2_grids)
    dense_bytes = sum(v.numel() * v.element_size() for v in expected.values())
    overhead = 32 * 1024  # torch.save's zip records and pickled metadata for ~100 tensors
    assert size <= quantized * bits / 8 + other_bytes + overhead
    if bits == 5:
        assert size < 0.2 * dense_bytes


def test_artifact_refuses_weights_moved_off_the_grid(trained, bundle, tmp_path):
    out = run_inq(trained, INQConfig(epochs=0), _context(bundle))
    name = next(iter(out.state.pow2_grids))
    with torch.no_grad():
        dict(out.state.model.named_parameters())[name].view(-1)[0] = 0.3
    with pytest.raises(ValueError, match=f"{name}: weights are not all in"):
        save_artifact(out.state, tmp_path / "inq.pt")
    assert not (tmp_path / "inq.pt").exists()


# --- the config ----------------------------------------------------------------------------------


def test_default_config_suits_fine_tuning():
    cfg = INQConfig()
    assert (cfg.bits, cfg.accumulated_portions, cfg.partition) == (5, (0.5, 0.75, 0.875, 1.0), "magnitude")
    assert (cfg.epochs, cfg.lr, cfg.schedule) == (1, 0.01, "cosine")
    assert all(field.description for field in INQConfig.model_fields.values())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bits": 12}, "must be 2..8, got 12"),
        ({"bits": 1}, "must be 2..8, got 1"),
        ({"accumulated_portions": [0.5, 0.5, 1.0]}, "strictly increasing"),
        ({"accumulated_portions": [0.75, 0.5, 1.0]}, "strictly increasing"),
        ({"accumulated_portions": [0.5, 0.9]}, "last portion must be 1.0"),
        ({"accumulated_portions": [0.0, 1.0]}, r"in \(0, 1\]"),
        ({"accumulated_portions": [0.5, 1.5]}, r"in \(0, 1\]"),
        ({"accumulated_portions": []}, "ending at 1.0"),
        ({"partition": "largest"}, "'magnitude' or 'random'"),
        ({"n1_rule": "quantile"}, "'max' or 'mse'"),
        ({"portions": [0.5, 1.0]}, "Extra inputs are not permitted"),
    ],
)
def test_bad_configs_fail_with_the_allowed_values(change, message):
    with pytest.raises(ValidationError, match=message):
        INQConfig(**change)


def test_recipe_errors_name_the_field_path():
    with pytest.raises(RecipeError, match=r"^stages\[0\]\.inq\.bits: must be 2\.\.8, got 12$"):
        validate_recipe(tiny_recipe(stages=[{"inq": {"bits": 12}}]))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.inq\.portions: unknown key; allowed: .*accumulated_portions"):
        validate_recipe(tiny_recipe(stages=[{"inq": {"portions": [0.5, 1.0]}}]))

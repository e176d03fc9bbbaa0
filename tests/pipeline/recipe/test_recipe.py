"""Recipe validation: every bad recipe fails before compute with one line naming the field."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml

from pipeline.recipe import RECIPES_DIR, ExecutorConfig, RecipeError, apply_override_, load_recipe, validate_recipe
from pipeline.sweep.orderings import sweep_orderings
from tests.conftest import run_cli, tiny_recipe, write_recipe

SHIPPED = sorted(RECIPES_DIR.rglob("*.yaml"))
DATA = "one data fingerprint"  # keys of the same data: scanning CIFAR-10's 60,000 files per call is not the point


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_recipes_validate(path: Path):
    recipe = load_recipe(path)
    assert recipe.name
    assert recipe.baseline.epochs >= 1


def test_top_level_recipes_share_one_baseline_per_kind():
    """Every shipped CPU recipe starts from one of two cached baselines, each trained once for all: the quick 8-epoch
    one (single chains: a first run in minutes) or the converged one (the worked studies: sweeps and searches)."""
    from pipeline.run.keys import plan_chain

    keys: dict[str, set[str]] = {"quick": set(), "converged": set()}
    for path in SHIPPED:
        if path.parent == RECIPES_DIR:
            recipe = load_recipe(path)
            study = recipe.is_sweep or recipe.is_search or path.stem == "baseline-converged"
            keys["converged" if study else "quick"].add(plan_chain(recipe, DATA)[0].key)
    assert len(keys["quick"]) == 1 and len(keys["converged"]) == 1 and keys["quick"] != keys["converged"]
    quick, converged = load_recipe("baseline").baseline, load_recipe("baseline-converged").baseline
    assert converged == quick.model_copy(update={"epochs": 30})  # the same schedule, trained longer


def _set(recipe: dict, dotted: str, value):
    apply_override_(recipe, f"{dotted}={value}")
    return recipe


THREE = [{"prune": {"epochs": 2}}, {"inq": {"epochs": 1}}, {"distill": {"epochs": 3}}]


BAD = [
    # (change to the tiny recipe, expected start of the message)
    (lambda r: r.update(colour="red"), "colour: unknown key; allowed: name, seed, device, data, model"),
    (lambda r: r.pop("model"), "model: required field is missing"),
    (lambda r: r["baseline"].update(lr="fast"), "baseline.lr: Input should be a valid number"),
    (lambda r: r["baseline"].update(lr=-1), "baseline.lr: Input should be greater than 0"),
    (lambda r: r["baseline"].update(optimizer="rmsprop"), "baseline.optimizer: Input should be 'sgd' or 'adamw'"),
    (lambda r: r["baseline"].update(epocs=3), "baseline.epocs: unknown key; allowed: epochs, optimizer, lr"),
    (lambda r: r["data"].update(batch_size=0), "data.batch_size: Input should be greater than or equal to 1"),
    (lambda r: r["data"].update(dataset="mnist"), "data.dataset: Input should be 'cifar10', 'cifar100' or"),
    (lambda r: r["data"].update(root="/nonexistent/data"), "data.root: cifar10 not found under /nonexistent/data"),
    (lambda r: r["model"].update(name="resnet99"), "model.name: unknown timm model 'resnet99'; similar:"),
    (lambda r: r["model"].update(checkpoint="/no/such.pt"), "model.checkpoint: checkpoint file not found"),
    (lambda r: r["model"].update(kwargs={"num_classes": 3}), "model: kwargs may not set ['num_classes']"),
    (
        lambda r: r["model"].update(name="vit_tiny_patch16_224"),
        "model: vit_tiny_patch16_224 cannot run on 3x32x32 inputs: Input height (32) doesn't match model (224); "
        "for ViTs set model.kwargs: {img_size: 32, patch_size: 4}",
    ),
    (lambda r: r["model"].update(kwargs={"in_chans": 1}), "model: test_resnet cannot run on 3x32x32 inputs: Given"),
    (
        lambda r: r["model"].update(kwargs={"bogus": 1}),
        "model.kwargs: timm cannot build test_resnet: ResNet.__init__()",
    ),
    (lambda r: r.update(seed=-1), "seed: Input should be greater than or equal to 0"),
    (lambda r: r.update(name="has space"), "name: String should match pattern"),
    (lambda r: r.update(device="tpu"), "device: Input should be 'auto', 'cpu' or 'cuda'"),
    (lambda r: r["evaluation"].update(threads=0), "evaluation.threads: Input should be greater than or equal to 1"),
    # Sweeps: orderings name the recipe's stages, each once; explicit orderings must be runnable.
    (lambda r: r.update(orderings="al"), "orderings: must be `all` or a list of orderings (lists of stage names)"),
    (lambda r: r.update(orderings=["prune"]), "orderings: must be `all` or a list of orderings"),
    (lambda r: r.update(orderings=[["prune", "distil"]]), "orderings[0][1]: 'distil' is not one of the recipe's"),
    (lambda r: r.update(orderings=[["prune", "prune"]]), "orderings[0][1]: 'prune' appears twice in one ordering"),
    (lambda r: r.update(orderings=[[]]), "orderings[0]: an ordering needs at least one stage"),
    (lambda r: r.update(orderings=[]), "orderings: needs at least one ordering"),
    # Seeds: a count 1..100 or a list of distinct seeds, and a scope.
    (lambda r: r.update(seeds=0), "seeds: a count of seeds must be 1..100, got 0"),
    (lambda r: r.update(seeds=[]), "seeds: must list at least one seed"),
    (lambda r: r.update(seeds=[1, 1]), "seeds: seeds must be distinct, got [1, 1]"),
    (lambda r: r.update(seeds=[-1]), "seeds: each seed must be in 0..2^31-1"),
    (lambda r: r.update(seeds=3, seed_scope="all"), "seed_scope: Input should be 'baseline' or 'stages'"),
    (lambda r: r.update(control="maybe"), "control: Input should be a valid boolean"),
    (lambda r: r.update(executor={"name": "dask"}), "executor.name: Input should be 'local' or 'ray'"),
    (lambda r: r.update(executor={"name": "ray", "cpus": 0}), "executor.cpus: Input should be greater than 0"),
    (lambda r: r.update(executor="dask"), "executor.name: Input should be 'local' or 'ray', got 'dask'"),
    (
        lambda r: r.update(budget={"epochs": 4, "split": [1, 1, 10]}, stages=THREE, orderings="all"),
        "budget: gives a chain of 3 stages [0, 0, 4] epochs",
    ),
    (lambda r: r.update(orderings=[["qat", "inq"]], stages=[{"inq": {}}, {"qat": {}}]), "orderings[0][1]: inq"),
    (lambda r: r.update(stages=[{"qat": {}}, {"inq": {}}]), "stages[1]: inq cannot run after qat; put inq before qat"),
    (lambda r: r.update(orderings="all", stages=[{"prune": {}}, {"prune": {}}]), "stages[1]: a sweep names stages"),
    (lambda r: r.update(orderings="all", stages=[]), "stages: a sweep needs at least one stage"),
    (lambda r: r.update(budget={"epochs": 4, "split": [0, 1]}), "budget.split: must be positive shares"),
    (
        lambda r: r.update(budget={"epochs": 1, "split": [1, 1]}, stages=[{"prune": {}}, {"inq": {}}]),
        "budget: gives a chain of 2",
    ),
    (
        lambda r: r.update(budget={"epochs": 4, "split": [1]}, stages=[{"prune": {}}, {"inq": {}}]),
        "budget.split: needs",
    ),
    (
        lambda r: r.update(stages=[{"bogus": {}}]),
        "stages[0]: unknown stage 'bogus'; available: distill, inq, lowrank, prune, qat, train",
    ),
    (lambda r: r.update(stages=[{"qat": {"epochs": -1}}]), "stages[0].qat.epochs: Input should be greater"),
    (lambda r: r.update(stages=[{"inq": {"bits": 12}}]), "stages[0].inq.bits: must be 2..8, got 12"),
    (lambda r: r.update(stages=[{"distill": {"temperature": 0}}]), "stages[0].distill.temperature: Input should be"),
    (lambda r: r.update(stages=[{"distill": {"alpha": 1.5}}]), "stages[0].distill.alpha: Input should be less"),
    (lambda r: r.update(stages=[{"distill": {"teacher": "nobody"}}]), "stages[0].distill.teacher: teacher 'nobody'"),
    (lambda r: r.update(stages=[{"prune": {"pruning_ratio": 1.5}}]), "stages[0].prune.pruning_ratio: Input should be"),
    (lambda r: r.update(stages=[{"train": {}, "x": {}}]), "stages[0]: must be a one-key mapping"),
    (lambda r: r.update(stages=["train"]), "stages[0]: must be a one-key mapping"),
    (
        lambda r: r.update(stages=[{"train": {"epochs": 1}}, {"train": {"lrr": 1}}]),
        "stages[1].train.lrr: unknown key; allowed: epochs",
    ),
    (lambda r: r.update(stages=[{"train": {"epochs": -2}}]), "stages[0].train.epochs: Input should be greater than"),
    (lambda r: r.update(stages=[{"train": 5}]), "stages[0].train: must be a mapping of config keys"),
]


@pytest.mark.parametrize(("change", "expected"), BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_bad_recipes_fail_with_field_path(change, expected):
    recipe = copy.deepcopy(tiny_recipe())
    change(recipe)
    with pytest.raises(RecipeError) as info:
        validate_recipe(recipe)
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("model", "data"),
    [
        ({"name": "resnet10t"}, {}),
        ({"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 4}}, {}),
        ({"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 48, "patch_size": 8}}, {"img_size": 48}),
    ],
)
def test_models_that_take_the_data_validate_quickly(model, data):
    """The model check builds on the meta device (no weights, no memory): a small share of a second."""
    raw = tiny_recipe(model=model)
    raw["data"].update(data)
    start = time.perf_counter()
    assert validate_recipe(raw).model.name == model["name"]
    assert time.perf_counter() - start < 5


def test_model_check_reads_an_imagefolder_image_size(imagefolder):
    """Without data.img_size the size is one image's header (12x12 here)."""
    raw = tiny_recipe(model={"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 4}})
    raw["data"] = {"dataset": "imagefolder", "root": str(imagefolder)}
    with pytest.raises(RecipeError, match=r"^model: vit_tiny_patch16_224 cannot run on 3x12x12 inputs: .*img_size: 12"):
        validate_recipe(raw)
    raw["model"]["kwargs"] = {"img_size": 12, "patch_size": 4}
    validate_recipe(raw)


def test_overrides_apply_dotted_and_indexed_paths():
    raw = tiny_recipe()
    for item in (
        "data.train_subset=2000",
        "baseline.epochs=1",
        "stages[0].prune.lr=0.5",
        "stages.0.prune.epochs=3",
        "model.kwargs.drop_rate=0.1",
        "baseline.label_smoothing=0.1",
    ):
        apply_override_(raw, item)
    recipe = validate_recipe(raw)
    assert recipe.data.train_subset == 2000 and recipe.baseline.epochs == 1
    assert recipe.stage_specs()[0].config.lr == 0.5 and recipe.stage_specs()[0].config.epochs == 3
    assert recipe.model.kwargs == {"drop_rate": 0.1}


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("nonsense", "override 'nonsense' must look like key.path=value"),
        ("stages[4].train.lr=1", "stages.4: no list item '4' to override"),
        ("name.first=x", "name.first: cannot override inside a str"),
        ("stages[0].inq.bits=4", "stages.0.inq: stages[0] is a 'prune' stage, not 'inq'"),
    ],
)
def test_bad_overrides(item, expected):
    with pytest.raises(RecipeError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        apply_override_(tiny_recipe(), item)


def test_override_values_are_validated_like_the_file(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe())
    with pytest.raises(RecipeError, match=r"^data.train_subset: Input should be greater than or equal to 1"):
        load_recipe(path, ["data.train_subset=0"])


def test_unknown_recipe_name_lists_available():
    with pytest.raises(RecipeError, match="unknown recipe 'nope'; available: .*baseline"):
        load_recipe("nope")


def test_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
    assert not marker.exists()


def test_ordering_names_the_chain():
    recipe = validate_recipe(tiny_recipe())
    assert recipe.ordering == "prune"
    assert validate_recipe(tiny_recipe(stages=[])).ordering == "train"
    two = [{"prune": {}}, {"inq": {"bits": 4}}]
    assert validate_recipe(tiny_recipe(stages=two)).ordering == "prune>inq"


def test_resolved_recipe_round_trips_through_yaml(tmp_path):
    recipe = validate_recipe(tiny_recipe())
    again = load_recipe(write_recipe(tmp_path / "again.yaml", yaml.safe_load(recipe.to_yaml())))
    assert again.to_dict() == recipe.to_dict()


def test_cli_bad_recipe_exits_2_with_one_line_and_writes_nothing(tmp_path, isolated):
    path = write_recipe(tmp_path / "bad.yaml", tiny_recipe())
    result = run_cli(["run", str(path), "baseline.lr=0"], isolated)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: baseline.lr: Input should be greater than 0, got 0"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "cache").exists()


def test_cli_validate_refuses_a_model_that_cannot_take_the_images(tmp_path, isolated):
    path = write_recipe(tmp_path / "vit.yaml", tiny_recipe(model={"name": "vit_tiny_patch16_224"}))
    result = run_cli(["validate", str(path)], isolated)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model: vit_tiny_patch16_224 cannot run on 3x32x32 inputs"), result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_run_of_a_sweep_recipe_points_to_sweep(tmp_path, isolated):
    path = write_recipe(tmp_path / "s.yaml", tiny_recipe(orderings="all"))
    result = run_cli(["run", str(path)], isolated)
    assert result.returncode == 2
    assert "declares a sweep" in result.stderr and f"python -m pipeline sweep {path}" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("name", ["local", "ray"])
def test_executor_may_be_given_by_name_alone(tmp_path, name):
    """`executor: ray` is short for `executor: {name: ray}`; the mapping still sets the Ray options."""
    path = write_recipe(tmp_path / "s.yaml", tiny_recipe(orderings="all", executor=name))
    assert load_recipe(path).executor == ExecutorConfig(name=name)
    assert load_recipe(path, ["executor=local"]).executor.name == "local"
    assert load_recipe(path, ["executor={name: ray, cpus: 2}"]).executor == ExecutorConfig(name="ray", cpus=2)


def test_cli_unknown_executor_exits_2(tmp_path, isolated):
    path = write_recipe(tmp_path / "s.yaml", tiny_recipe())
    result = run_cli(["sweep", str(path), "--executor", "dask"], isolated)
    assert result.returncode == 2 and "invalid choice: 'dask' (choose from 'local', 'ray')" in result.stderr


def _names(orderings):
    return [">".join(o) for o in orderings]


def test_sweep_all_is_every_permutation_then_singles():
    recipe = validate_recipe(tiny_recipe(stages=THREE, orderings="all", include_singles=True))
    orderings, skipped = sweep_orderings(recipe)
    assert _names(orderings) == [
        "prune>inq>distill", "prune>distill>inq", "inq>prune>distill", "inq>distill>prune",
        "distill>prune>inq", "distill>inq>prune", "prune", "inq", "distill",
    ]  # fmt: skip
    assert skipped == []
    chain = recipe.as_chain(("distill", "prune"))
    assert chain.ordering == "distill>prune" and not chain.is_sweep
    assert chain.stage_specs()[0].config.epochs == 3  # configs follow the stage, not the position


def test_sweep_all_skips_orderings_a_stage_cannot_follow():
    recipe = validate_recipe(tiny_recipe(stages=[{"inq": {}}, {"qat": {}}], orderings="all"))
    orderings, skipped = sweep_orderings(recipe)
    assert _names(orderings) == ["inq>qat"]
    assert skipped == [(("qat", "inq"), "inq cannot run after qat; put inq before qat")]
    # Pruning after qat prunes the float weights under the fake quantization: both orders run.
    both = validate_recipe(tiny_recipe(stages=[{"prune": {}}, {"qat": {}}], orderings="all"))
    assert sweep_orderings(both) == ([("prune", "qat"), ("qat", "prune")], [])


def test_explicit_orderings_keep_their_order_and_drop_duplicate_singles():
    recipe = validate_recipe(tiny_recipe(stages=THREE, orderings=[["inq", "prune"], ["prune"]], include_singles=True))
    assert _names(sweep_orderings(recipe)[0]) == ["inq>prune", "prune", "inq", "distill"]


@pytest.mark.parametrize(
    ("epochs", "split", "expected"),
    [(10, (20, 40, 40), [2, 4, 4]), (9, (0.2, 0.4, 0.4), [2, 4, 3]), (7, (1, 1, 1), [3, 2, 2]), (5, (1,), [5])],
)
def test_budget_splits_whole_epochs_by_position(epochs, split, expected):
    from pipeline.recipe import Budget

    budget = Budget(epochs=epochs, split=split)
    assert budget.stage_epochs(len(expected)) == expected
    assert sum(budget.stage_epochs(len(expected))) == epochs


def test_budget_sets_each_stage_epochs_in_its_own_units():
    stages = [{"prune": {"iterative_steps": 2}}, {"inq": {"accumulated_portions": [0.5, 0.75, 1.0]}}, {"distill": {}}]
    recipe = validate_recipe(tiny_recipe(stages=stages, orderings="all", budget={"epochs": 12, "split": [1, 1, 1]}))
    for ordering in sweep_orderings(recipe)[0]:
        chain = recipe.as_chain(ordering)
        configs = {s.name: s.config for s in chain.stage_specs()}
        assert configs["prune"].epochs == 2 and configs["prune"].total_epochs() == 4  # per pruning step
        assert configs["inq"].epochs == 2 and configs["inq"].total_epochs() == 4  # per retraining step
        assert configs["distill"].epochs == 4
    # A single recipe (no sweep) with a budget runs with it applied too.
    single = validate_recipe(tiny_recipe(stages=[{"distill": {}}], budget={"epochs": 3, "split": [1]}))
    assert single.as_chain().stage_specs()[0].config.epochs == 3


def test_seeds_repeat_the_recipes_own_chain_and_scope_decides_what_is_shared():
    from pipeline.run.keys import plan_chain
    from pipeline.sweep.sweep import chain_label, plan_sweep

    two = [{"prune": {"epochs": 1}}, {"inq": {"epochs": 1}}]
    recipe = validate_recipe(tiny_recipe(stages=two, seed=5, seeds=3))
    assert recipe.is_sweep and recipe.seed_list() == [5, 6, 7]
    assert sweep_orderings(recipe) == ([("prune", "inq")], [])  # seeds alone: the recipe's chain, not permutations
    plan = plan_sweep(recipe)
    assert [chain_label(c, recipe) for c in plan.chains] == [f"prune>inq (seed {s})" for s in (5, 6, 7)]
    keys = [[s.key for s in plan_chain(c, DATA)] for c in plan.chains]
    assert len({k[0] for k in keys}) == 3  # seed_scope baseline: every seed retrains the baseline
    unseeded = plan_chain(validate_recipe(tiny_recipe(stages=two, seed=5)), DATA)
    assert keys[0] == [s.key for s in unseeded]  # the first seed is the plain recipe: its cache is reused

    shared = validate_recipe(tiny_recipe(stages=two, seed=5, seeds=[5, 9], seed_scope="stages"))
    chains = plan_sweep(shared).chains
    assert [(c.seed, c.chain_seed) for c in chains] == [(5, 5), (5, 9)]
    first, second = ([s.key for s in plan_chain(c, DATA)] for c in chains)
    assert first[0] == second[0] and first[1] != second[1]  # one baseline, stages seeded apart
    assert first == [s.key for s in unseeded]

    both = validate_recipe(tiny_recipe(stages=two, orderings="all", seeds=2))
    assert [chain_label(c, both) for c in plan_sweep(both).chains] == [
        "prune>inq (seed 0)", "prune>inq (seed 1)", "inq>prune (seed 0)", "inq>prune (seed 1)",
    ]  # fmt: skip


def test_every_sweep_gets_an_equal_training_control_per_epoch_count_unless_it_opts_out():
    from pipeline.run.keys import plan_chain
    from pipeline.run.runner import training_epochs
    from pipeline.sweep.sweep import plan_sweep

    stages = [{"prune": {"epochs": 1, "lr": 0.03, "schedule": "constant"}}, {"distill": {"epochs": 2, "lr": 0.01}}]
    sweep = validate_recipe(tiny_recipe(stages=stages, orderings="all", control=None))
    chains = plan_sweep(sweep).chains
    assert [c.ordering for c in chains] == ["prune>distill", "distill>prune", "control(3 ep)"]
    (control,) = [c for c in chains if c.control_epochs is not None]
    assert [s.name for s in control.stage_specs()] == ["train"] and training_epochs(control) == 3
    train = control.stage_specs()[0].config
    assert (train.lr, train.schedule) == (0.03, "constant")  # the first training stage's, of the first chain
    assert plan_chain(control, DATA)[0].key == plan_chain(chains[0], DATA)[0].key  # it continues the same baseline

    off = validate_recipe(tiny_recipe(stages=stages, orderings="all", control=False))
    assert [c.ordering for c in plan_sweep(off).chains] == ["prune>distill", "distill>prune"]
    chain = validate_recipe(tiny_recipe(stages=stages, control=True))  # a chain asking for its control
    assert chain.is_sweep and [c.ordering for c in plan_sweep(chain).chains] == ["prune>distill", "control(3 ep)"]


def test_a_loader_that_cannot_apply_the_augmentation_is_refused_when_the_recipe_loads(photos):
    data = {"dataset": "imagefolder", "root": str(photos), "img_size": 96, "loader": "memory"}
    with pytest.raises(RecipeError, match="^data.loader: memory augments tensors .* at 96 px .*random_resized_crop"):
        validate_recipe(tiny_recipe(data=data))
    validate_recipe(tiny_recipe(data={**data, "augmentation": {"policy": "pad_crop_flip"}}))  # says how to fix it


def test_bf16_is_refused_where_a_stage_would_train_a_fake_quantized_model():
    """qat, and any stage a chain, sweep or search would run after it, trains in fp32: an explicit bf16 there is
    refused at load with its field path; the same stage before qat may ask for bf16."""
    qat_bf16 = [{"prune": {"epochs": 1}}, {"qat": {"epochs": 1, "precision": "bf16"}}]
    with pytest.raises(RecipeError, match=r"^stages\[1\].qat.precision: bf16 cannot train a fake-quantized model"):
        validate_recipe(tiny_recipe(stages=qat_bf16))
    after = [{"qat": {"epochs": 1}}, {"distill": {"epochs": 1, "precision": "fp16"}}]
    with pytest.raises(RecipeError, match=r"^stages\[1\].distill.precision: fp16 .* after qat in qat>distill"):
        validate_recipe(tiny_recipe(stages=after))
    before = [{"distill": {"epochs": 1, "precision": "bf16"}}, {"qat": {"epochs": 1}}]
    assert validate_recipe(tiny_recipe(stages=before)).stages[0].config.precision == "bf16"
    with pytest.raises(RecipeError, match=r"^stages\[0\].distill.precision: .* in qat>distill"):
        validate_recipe(tiny_recipe(stages=before, orderings="all"))  # a sweep also runs qat>distill


def test_numerics_and_run_settings_validate_and_checkpoints_are_part_of_no_cache_key():
    from pipeline.run.keys import plan_chain

    recipe = validate_recipe(tiny_recipe(baseline={"epochs": 2, "channels_last": True, "compile": False}))
    assert recipe.baseline.precision == "auto" and recipe.checkpoint.every_epochs == 1
    with pytest.raises(RecipeError, match=r"^baseline.precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"):
        validate_recipe(tiny_recipe(baseline={"epochs": 2, "precision": "fp64"}))
    with pytest.raises(RecipeError, match=r"^checkpoint.every_minutes: Input should be greater than 0"):
        validate_recipe(tiny_recipe(checkpoint={"every_minutes": 0}))
    often = validate_recipe(tiny_recipe(checkpoint={"every_epochs": 0, "every_minutes": 5},
                                        distributed={"timeout_minutes": 120, "sync_batchnorm": True}))  # fmt: skip
    assert [s.key for s in plan_chain(often, DATA)] == [s.key for s in plan_chain(validate_recipe(tiny_recipe()), DATA)]
    explicit = validate_recipe(tiny_recipe(baseline={"epochs": 2, "lr": 0.05, "precision": "fp32"}))
    assert plan_chain(explicit, DATA)[0].key != plan_chain(validate_recipe(tiny_recipe()), DATA)[0].key

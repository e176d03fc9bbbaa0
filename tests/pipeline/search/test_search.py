"""Searches: the `search:` block is validated when the recipe loads; the early-stop rule, the Pareto set and the
hypervolume on hand-made trials; and a tiny search through the CLI on real CIFAR-10 images (trials in MLflow with
their settings, constraints respected by the reported set, an early stop after pruning, the registry entry, resume
after an interruption)."""

from __future__ import annotations

import html
import logging
import re
from dataclasses import replace

import mlflow
import numpy as np
import pandas as pd
import pytest
import timm
from mlflow.tracking import MlflowClient

from pipeline import cli
from pipeline.analysis.pareto import hypervolume
from pipeline.core.artifacts import load_artifact
from pipeline.core.metrics import count_params, metric_catalogue
from pipeline.recipe import RecipeError, StageSpec, validate_recipe
from pipeline.reporting.search import search_markdown
from pipeline.search.config import Constraint
from pipeline.search.outcome import TrialRecord, compare_with_sweep, summarize
from pipeline.search.space import search_orderings
from pipeline.search.study import plan_search
from pipeline.search.trial import search_chain, unreachable_constraint
from pipeline.tracking import Tracker
from stages.distill import DistillConfig
from stages.prune import PruneConfig
from stages.qat import QATConfig
from tests.conftest import TINY_MODEL, mlflow_process, rendered_dom, tiny_recipe, write_recipe

TWO = [{"prune": {"pruning_ratio": 0.3, "epochs": 1, "lr": 0.01}}, {"distill": {"epochs": 1, "lr": 0.01}}]


def search_recipe(**search) -> dict:
    block = {
        "orderings": "all",
        "space": {"prune.pruning_ratio": {"choices": [0.3, 0.5]}},
        "objectives": {"val_top1": "max", "artifact_bytes": "min"},
        "trials": 3,
        "sampler": "random",
    }
    return tiny_recipe(name="tiny-search", stages=TWO, search={**block, **search})


# --- validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"space": {"prune.no_such": {"low": 0, "high": 1}}}, "search.space.prune.no_such: prune has no field"),
        ({"space": {"inq.bits": {"choices": [2, 3]}}}, "search.space.inq.bits: must be `stage.field` with a stage"),
        ({"space": {"prune.pruning_ratio": {"low": 0.8, "high": 0.2}}}, "empty range: `low` (0.8) must be below"),
        ({"space": {"prune.pruning_ratio": {"choices": []}}}, "`choices` is empty"),
        ({"space": {"prune.pruning_ratio": {"low": 0.2, "high": 1.5}}}, "search.space.prune.pruning_ratio: 1.5:"),
        ({"space": {"budget.epochs": {"low": 2, "high": 4}}}, "the recipe sets no `budget:` to vary"),
        ({"objectives": {"val_top1": "up"}}, "direction must be max or min, got 'up'"),
        ({"objectives": {"accuracy": "max"}}, "unknown metric 'accuracy' (not a metric the evaluator logs)"),
        ({"objectives": {"openvino.latency_ms_p50": "min"}}, "unknown metric 'openvino.latency_ms_p50' (deploy"),
        ({"objectives": {}}, "name at least one metric to optimise"),
        ({"constraints": ["top1 > 79"]}, "must read `metric <= number` or `metric >= number`"),
        ({"constraints": ["size <= 1e6"]}, "unknown metric 'size'"),
        ({"trials": None}, "a search needs a budget"),
        ({"orderings": [["prune", "nope"]]}, "search.orderings[0][1]: 'nope' is not one of the recipe's stages"),
        ({"sampler": "cmaes"}, "search.sampler: Input should be 'tpe', 'nsga2' or 'random'"),
        ({"unknown": 1}, "search.unknown: unknown key"),
        ({"space": {"prune.iterative_steps": {"low": 1, "high": 4, "step": 0.5}}}, "takes whole numbers: `step`"),
        ({"space": {"prune.pruning_ratio": {"choices": [[0.3]]}}}, "`choices` must be numbers, strings"),
        ({"start_with": [{"ordering": "prune>prune"}]}, "search.start_with[0].ordering: must be one of"),
        ({"start_with": [{"ordering": "prune", "prune.pruning_ratio": 0.4}]}, "0.4 is outside the space: [0.3, 0.5]"),
        ({"start_with": [{"ordering": "distill", "prune.pruning_ratio": 0.3}]}, "distill has no prune stage"),
    ],
)
def test_bad_search_blocks_are_refused_when_the_recipe_loads(change, expected, cifar_root):
    with pytest.raises(RecipeError) as info:
        validate_recipe(search_recipe(**change))
    assert expected in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("change", "path", "instead"),
    [
        ({"objectives": {"top1": "max"}}, "search.objectives.top1", "val_top1"),
        ({"constraints": ["top5 >= 90"]}, "search.constraints[0]", "val_top5"),
        ({"select": "top1"}, "search.select", "val_top1"),
    ],
)
def test_a_test_metric_is_refused_with_the_validation_name(change, path, instead, cifar_root, tmp_path, isolated,
                                                            capsys):  # fmt: skip
    with pytest.raises(RecipeError) as info:
        validate_recipe(search_recipe(**change))
    assert info.value.path == path and f"use {instead}" in info.value.message
    runtime = search_recipe(objectives={"onnxruntime.top1": "max"})
    runtime["deploy"] = {"runtimes": ["onnxruntime"]}
    with pytest.raises(RecipeError, match=r"search.objectives.onnxruntime.top1: .* use onnxruntime.val_top1"):
        validate_recipe(runtime)
    file = write_recipe(tmp_path / "test-metric.yaml", search_recipe(**change))
    assert cli.main(["validate", str(file)]) == 2  # exit 2, one line naming the field, before any run
    assert capsys.readouterr().err.startswith(f"error: {path}: ")


def test_a_search_or_sweep_needs_a_validation_split(cifar_root):
    with pytest.raises(RecipeError, match="^data.val_split: a search chooses on validation metrics"):
        validate_recipe({**search_recipe(), "data": {"dataset": "cifar10", "val_split": 0}})


def test_the_best_model_is_chosen_on_validation_not_on_test():
    objectives = {"val_top1": "max", "artifact_bytes": "min"}
    tests_best = {"val_top1": 70.0, "top1": 90.0, "artifact_bytes": 50}
    validates_best = {"val_top1": 80.0, "top1": 75.0, "artifact_bytes": 50}
    trials = [  # the search registers trial 1
        TrialRecord(0, "COMPLETE", "prune", {"ordering": "prune"}, tests_best, {}, None, "r0", None, {}, 1.0, {}),
        TrialRecord(1, "COMPLETE", "qat", {"ordering": "qat"}, validates_best, {}, None, "r1", None, {}, 1.0, {}),
    ]
    out = summarize("s", trials, objectives, [], ("val_top1", "max"))
    assert out.best.number == 1 and [t.number for t in out.pareto] == [1]
    text = search_markdown(out)
    assert "Every choice" in text and "reads the validation split" in text
    assert "| trial | ordering | settings | val_top1 | artifact_bytes | top1 |" in text  # test reported beside


def test_a_search_does_not_mix_with_a_sweep_and_is_not_a_plain_run(cifar_root, tmp_path, isolated, capsys):
    with pytest.raises(RecipeError, match="^orderings: a search chooses its chains itself"):
        validate_recipe({**search_recipe(), "orderings": "all"})
    path = write_recipe(tmp_path / "s.yaml", search_recipe())
    assert cli.main(["run", str(path)]) == 2
    assert "declares a search; run it with `make search" in capsys.readouterr().err


def test_search_orderings_cover_every_runnable_subset(cifar_root):
    stages = [TWO[1], {"qat": {"epochs": 1}}, {"inq": {"epochs": 1}}]
    recipe = validate_recipe(tiny_recipe(stages=stages, search={"objectives": {"val_top1": "max"}}))
    orderings = search_orderings(recipe)
    assert ("qat", "inq") not in orderings  # inq cannot follow qat
    assert ("qat", "distill") in orderings and ("inq", "qat") in orderings and ("inq",) in orderings
    assert len(orderings) == 3 + 6 + 6 - 1 - 3  # singles, pairs, triples; minus qat>inq and the 3 triples qat…inq
    chain = search_chain(recipe, ["distill", "inq"], {"inq.bits": 3})
    assert chain.ordering == "distill>inq" and chain.stages[1].config.bits == 3
    assert chain.search is None and not chain.is_search


# --- early stop ---------------------------------------------------------------------------------------------------


def test_a_size_bound_ends_a_trial_only_when_no_later_stage_can_lower_size():
    catalogue = metric_catalogue(["onnxruntime"])
    size = [Constraint.parse("artifact_bytes <= 1e6")]
    over = {"artifact_bytes": 2e6}
    distill, prune = StageSpec("distill", DistillConfig()), StageSpec("prune", PruneConfig())
    reason = unreachable_constraint(over, [distill], size, catalogue, 0.1)
    assert reason is not None and "artifact_bytes <= 1e+06 is out of reach" in reason and "(distill)" in reason
    assert unreachable_constraint(over, [distill, prune], size, catalogue, 0.1) is None  # pruning may still shrink it
    assert unreachable_constraint({"artifact_bytes": 5e5}, [distill], size, catalogue, 0.1) is None
    # Unstructured pruning shrinks the stored bytes but not the compute; QAT both.
    macs = [Constraint.parse("macs <= 1e6")]
    unstructured = StageSpec("prune", PruneConfig(method="unstructured"))
    assert unreachable_constraint({"macs": 2e6}, [unstructured], macs, catalogue, 0.1) is not None
    assert unreachable_constraint({"macs": 2e6}, [StageSpec("qat", QATConfig())], macs, catalogue, 0.1) is None
    # Latency is noisy: within the margin it does not end a trial; accuracy bounds never do (training may lift it).
    latency = [Constraint.parse("onnxruntime.latency_ms_p50 <= 1.0")]
    assert unreachable_constraint({"onnxruntime.latency_ms_p50": 1.05}, [distill], latency, catalogue, 0.1) is None
    assert unreachable_constraint({"onnxruntime.latency_ms_p50": 1.2}, [distill], latency, catalogue, 0.1) is not None
    top1 = [Constraint.parse("top1 >= 99")]
    assert unreachable_constraint({"top1": 10.0}, [distill], top1, catalogue, 0.1) is None


# --- Pareto set and hypervolume ----------------------------------------------------------------------------------


def test_hypervolume_of_hand_computed_boxes():
    # Minimise both; reference (4, 4); points (1, 3) and (3, 1): two 3x1 boxes overlapping in a 1x1 square -> 5.
    assert hypervolume(np.array([[1, 3], [3, 1]]), [False, False], np.array([4, 4]), np.ones(2)) == pytest.approx(5)
    # Maximise the first: (-1 -> 1 after flipping) the same geometry; scaling divides each axis.
    assert hypervolume(np.array([[-1, 3]]), [True, False], np.array([-4, 4]), np.array([3, 1])) == pytest.approx(1)
    assert hypervolume(np.array([[5, 5]]), [False, False], np.array([4, 4]), np.ones(2)) == 0.0


def _trial(number, top1, size, *, stopped=None, violation=-1.0, state="COMPLETE") -> TrialRecord:
    return TrialRecord(number, state, "prune", {"ordering": "prune"}, {"top1": top1, "artifact_bytes": size},
                       {"artifact_bytes <= 100": violation}, stopped, f"run{number}", None,
                       {"epochs_trained": 2, "epochs_skipped": 3 if stopped else 0}, 1.0,
                       {"top1": 90.0, "artifact_bytes": 100.0})  # fmt: skip


def test_pareto_set_best_model_and_history_keep_to_feasible_trials():
    objectives = {"top1": "max", "artifact_bytes": "min"}
    trials = [
        _trial(0, 80, 50),
        _trial(1, 85, 70),
        _trial(2, 79, 60),  # dominated by trial 0
        _trial(3, 95, 150, violation=50.0),  # best top1 but infeasible
        _trial(4, 70, 120, stopped="artifact_bytes out of reach", violation=20.0),
        _trial(5, 0, 0, state="FAIL"),
    ]
    trials[4] = replace(trials[4], params={"ordering": "prune", "prune.pruning_ratio": 0.1})  # not a repeat
    out = summarize("s", trials, objectives, [Constraint.parse("artifact_bytes <= 100")], ("top1", "max"))
    assert [t.number for t in out.pareto] == [0, 1]
    assert out.best.number == 1
    numbers, volumes = zip(*out.hypervolume_history, strict=True)
    assert numbers == (0, 1, 2, 3, 4)  # FAIL trials are not counted
    assert volumes[0] > 0 and volumes[1] > volumes[0] and volumes[1:] == (volumes[1],) * 4
    totals = out.totals()
    assert totals["trials_early_stopped"] == 1 and totals["trials_feasible"] == 3 and totals["trials_failed"] == 1
    assert totals["epochs_skipped_share"] == pytest.approx(3 / (5 * 2 + 3))  # of the epochs to train, not reused


def test_a_lone_feasible_point_has_volume_and_integer_fields_are_sampled_as_integers():
    out = summarize("s", [_trial(0, 80, 50)], {"top1": "max", "artifact_bytes": "min"}, [], ("top1", "max"))
    assert out.hypervolume > 0  # the reference lies beyond the worst point, so no point is lost
    from pipeline.search.config import is_integer_field

    assert is_integer_field(PruneConfig, "iterative_steps") and is_integer_field(PruneConfig, "round_to")
    assert not is_integer_field(PruneConfig, "pruning_ratio")


def test_stepped_floats_are_sampled_on_their_grid_exactly(tmp_path):
    import optuna

    from pipeline.search.trial import sample_trial

    raw = search_recipe(orderings=[["prune", "distill"]], space={"prune.pruning_ratio": {"low": 0.3, "high": 0.8,
                                                                                         "step": 0.1}})  # fmt: skip
    plan = plan_search(validate_recipe(raw), tracking_uri=f"sqlite:///{tmp_path}/m.db", cache_dir=tmp_path / "c")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        _, settings = sample_trial(study.ask(), plan)
        seen.add(settings["prune.pruning_ratio"])
    # Optuna gives 0.3 + 3 * 0.1 = 0.6000000000000001; the stage (its MLflow params, its cache key) gets 0.6.
    assert seen == {0.3, 0.4, 0.5, 0.6, 0.7, 0.8}


def test_trials_that_repeat_an_earlier_configuration_are_counted_and_listed_once(tmp_path):
    from pipeline.reporting.search import write_search_report

    def ratio(number, value, state="COMPLETE", **kw):
        trial = _trial(number, 80, 50, state=state, **kw)
        return replace(trial, params={"ordering": "prune", "prune.pruning_ratio": value})

    stopped = {"stopped": "artifact_bytes out of reach", "violation": 20.0}
    trials = [ratio(0, 0.6000000000000001), ratio(1, 0.6), ratio(2, 0.7), ratio(3, 0.7, state="FAIL"), _trial(4, 1, 1),
              ratio(5, 0.9, **stopped), ratio(6, 0.9, **stopped)]  # fmt: skip
    out = summarize("s", trials, {"top1": "max", "artifact_bytes": "min"}, [], ("top1", "max"))
    totals = out.totals()
    assert totals["trials_repeated"] == 2  # 1 (0.6 runs as 0.6) and 6; a failed trial is not counted
    assert totals["epochs_skipped"] == 3  # trial 6's skip is trial 5's again: without early stop, a cache hit
    assert [t.number for t in out.pareto] == [0, 2, 4]  # trial 1 is trial 0 again; 2 another model, equal metrics
    assert "2 repeated the ordering and settings of an earlier trial (4 distinct)" in search_markdown(out)

    write_search_report(out, tmp_path)
    frame = pd.read_csv(tmp_path / "trials.csv").set_index("trial")
    assert frame.loc[1, "repeat_of"] == 0 and frame.loc[6, "repeat_of"] == 5 and pd.isna(frame.loc[2, "repeat_of"])
    assert frame.loc[[0, 1, 2, 4], "pareto"].all() and not frame.loc[[5, 6], "pareto"].any()  # 1 is 0's model
    assert list(pd.read_csv(tmp_path / "pareto.csv").trial) == [0, 2, 4]  # each model once


def test_comparison_with_a_sweep_names_the_points_it_missed():
    objectives = {"top1": "max", "artifact_bytes": "min"}
    trials = [_trial(0, 80, 40), _trial(1, 85, 70)]
    out = summarize("s", trials, objectives, [Constraint.parse("artifact_bytes <= 100")], ("top1", "max"))
    sweep = pd.DataFrame({"top1": [85.0, 78.0, 99.0], "artifact_bytes": [70.0, 60.0, 200.0]}, index=["a", "b", "c"])
    comparison = compare_with_sweep(out, "sw", sweep)
    assert list(comparison.sweep_points.index) == ["a", "b"]  # c breaks the size bound
    assert [t.number for t in comparison.missed] == [0]  # trial 1 equals sweep model a
    assert comparison.sweep_dominated == ["b"] and comparison.sweep_equalled == ["a"]
    assert comparison.sweep_standing == []
    assert comparison.search_volume > comparison.sweep_volume > 0
    with pytest.raises(ValueError, match="did not measure artifact_bytes"):
        compare_with_sweep(out, "sw", sweep[["top1"]])
    with pytest.raises(ValueError, match="no model of sweep 'sw' meets the search's constraints"):
        compare_with_sweep(out, "sw", sweep.loc[["c"]])


# --- a tiny search end to end -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_search_through_the_cli(tmp_path, isolated, cifar_root, monkeypatch, capsys):
    # A parameter bound between the lightly and the heavily pruned model: `distill` alone ends after the baseline,
    # prune(0.1)>distill after pruning (only distillation follows, which cannot shrink it); prune(0.5) meets it.
    full = count_params(timm.create_model(TINY_MODEL, num_classes=10))
    bound = int(full * 0.6)
    raw = search_recipe(
        orderings=[["distill"], ["prune", "distill"], ["prune"]],
        space={"prune.pruning_ratio": {"choices": [0.1, 0.5]}},
        constraints=[f"params <= {bound}", "val_top1 >= 0"],
        trials=4,
        start_with=[
            {"ordering": "prune>distill", "prune.pruning_ratio": 0.1},
            {"ordering": "distill"},
            {"ordering": "prune", "prune.pruning_ratio": 0.5},
        ],
    )
    path = write_recipe(tmp_path / "search.yaml", raw)
    plan = plan_search(validate_recipe(raw), tracking_uri=isolated["MLFLOW_TRACKING_URI"], cache_dir=tmp_path / "c")

    # Interrupt the second trial: the search stops with exit 130; the first trial stays finished.
    from pipeline.run.runner import Runner

    real_run, calls = Runner.run, []

    def interrupted_second(self):
        calls.append(self.recipe.ordering)
        if len(calls) == 2:
            raise KeyboardInterrupt("test")
        return real_run(self)

    monkeypatch.setattr(Runner, "run", interrupted_second)
    optuna_records: list[logging.LogRecord] = []
    catch = logging.Handler()
    catch.emit = optuna_records.append
    logging.getLogger("optuna").addHandler(catch)
    try:
        assert cli.main(["search", str(path), "--quiet", "--no-report"]) == 130
    finally:
        logging.getLogger("optuna").removeHandler(catch)
    monkeypatch.setattr(Runner, "run", real_run)
    # Optuna says the trial failed, in one line: no traceback for an interruption.
    said = [r for r in optuna_records if "KeyboardInterrupt" in r.getMessage()]
    assert said and not any(r.exc_info for r in said)
    trained_before = _trained_keys(isolated)

    assert cli.main(["search", str(path), "--quiet", "--reports-dir", str(tmp_path / "reports")]) == 0
    out = capsys.readouterr().out
    assert f"search {plan.search_id}: 4 trials finished" in out

    client = MlflowClient(isolated["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("compression")
    runs = client.search_runs([exp.experiment_id], f"tags.search = '{plan.search_id}'", max_results=1000)
    search_runs = [r for r in runs if r.data.tags["run_type"] == "search"]
    assert [r.info.status for r in search_runs] == ["FINISHED"]  # the interrupted run, reopened
    trials = [r for r in runs if r.data.tags["run_type"] == "chain"]
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert len(finished) == 4 and all(r.data.tags["mlflow.parentRunId"] == search_runs[0].info.run_id for r in trials)
    for run in finished:  # the trial's sampled settings are params of its run
        assert ("search.prune.pruning_ratio" in run.data.params) == ("prune" in run.data.tags["ordering"])
    # The resumed search reran the interrupted trial (same settings) and retrained nothing the first trial cached.
    trained_after = _trained_keys(isolated)
    assert set(trained_before) <= set(trained_after) and len(trained_after) == len(set(trained_after))

    report = tmp_path / "reports" / plan.search_id
    frame = pd.read_csv(report / "trials.csv")
    assert len(frame[frame.state == "COMPLETE"]) == 4
    complete = frame[frame.state == "COMPLETE"].set_index("trial")
    assert complete.loc[0, "ordering"] == "prune>distill"  # ended after pruning: params still over the bound
    assert "params <= " in complete.loc[0, "early_stopped"] and "(distill)" in complete.loc[0, "early_stopped"]
    assert complete.loc[0, "stages_skipped"] == 1 and complete.loc[0, "epochs_skipped"] == 1
    assert complete.loc[3, "ordering"] == "distill"  # trial 1, interrupted, ran again with its settings as trial 3
    distill = complete[complete.ordering == "distill"]
    assert distill.early_stopped.str.contains("out of reach").all() and (distill.stages_skipped == 1).all()
    assert (complete[complete.early_stopped.isna()].params <= bound).all()
    pareto = pd.read_csv(report / "pareto.csv")
    assert len(pareto) >= 1 and pareto.feasible.all() and (pareto.params <= bound).all()
    text = (report / "report.md").read_text()
    assert "## Pareto set (feasible trials)" in text and "## Best model under the constraints" in text
    assert (report / "frontier.png").stat().st_size > 0 and (report / "hypervolume.png").stat().st_size > 0

    # The best feasible model is in the Model Registry under the recipe's name, alias `best`, with its files.
    version = client.get_model_version_by_alias("tiny-search", "best")
    assert version.tags["search"] == plan.search_id and version.tags["ordering"] in {"prune", "prune>distill"}
    # Chosen on validation: the registered trial is the feasible one with the best validation top-1 (the first
    # objective), its test top-1 only reported beside it.
    best = pareto.sort_values("val_top1", ascending=False).iloc[0]
    assert int(version.tags["trial"]) == int(best.trial)
    assert float(version.tags["metric.val_top1"]) == pytest.approx(best.val_top1, abs=1e-3)
    assert float(version.tags["test.top1"]) == pytest.approx(best.top1, abs=1e-3)
    mlflow.set_tracking_uri(isolated["MLFLOW_TRACKING_URI"])
    folder = mlflow.artifacts.download_artifacts("models:/tiny-search@best", dst_path=str(tmp_path / "dl"))
    model = load_artifact(f"{folder}/model")
    assert sum(p.numel() for p in model.parameters()) <= bound

    # The search's run page holds the answer: the chosen trial, what was registered, the Pareto set, each trial
    # linked to its run, the report one click away; as a browser shows it over `mlflow ui`.
    search_run = client.get_run(search_runs[0].info.run_id)
    note = search_run.data.tags["mlflow.note.content"]
    assert f"**Chosen: trial {int(best.trial)}, `" in note
    assert f"registered as `tiny-search version {version.version}` (alias `best`)" in note
    by_number = {int(r.data.tags["trial"]): r.info.run_id for r in finished}
    for trial in pareto.trial:
        assert (
            f"| [{trial}](#/experiments/{exp.experiment_id}/runs/{by_number[trial]}?workflowType=machine_learning)"
            in note
        )
    assert "/artifacts/report/report.html?workflowType=machine_learning)" in note
    tracker = Tracker(isolated["MLFLOW_TRACKING_URI"])
    with mlflow_process("ui", "--backend-store-uri", tracker.uri) as base:
        dom = rendered_dom(f"{base}/{tracker.run_link(search_run.info.run_id)}", tmp_path / "profile")
    shown = dom.split('data-testid="note-editor-preview-content"', 1)[1]
    assert f"Chosen: trial {int(best.trial)}" in shown and shown.count("<table>") >= 2  # the best, the Pareto set


def _trained_keys(env) -> list[str]:
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("compression")
    runs = client.search_runs([exp.experiment_id], "tags.trained = 'true'", max_results=1000)
    return [r.data.tags["cache_key"] for r in runs]


def test_report_documents_from_hand_made_trials(tmp_path):
    from pipeline.reporting.search import write_search_report

    objectives = {"top1": "max", "artifact_bytes": "min"}
    trials = [_trial(0, 80, 40), _trial(1, 85, 70), _trial(2, 70, 120, stopped="bytes out of reach", violation=20.0)]
    out = summarize("s-1", trials, objectives, [Constraint.parse("artifact_bytes <= 100")], ("top1", "max"))
    sweep = pd.DataFrame({"top1": [85.0, 78.0], "artifact_bytes": [70.0, 60.0]}, index=["a (seed 0)", "b (seed 0)"])
    paths = write_search_report(out, tmp_path, compare_with_sweep(out, "sw", sweep))
    assert {p.name for p in paths} == {"trials.csv", "pareto.csv", "frontier.png", "hypervolume.png", "report.md",
                                       "frontier.svg", "hypervolume.svg", "report.html",
                                       "report-interactive.html"}  # fmt: skip
    text = (tmp_path / "report.md").read_text()
    assert "Trial 1, `prune`" in text and "trial 2 (`prune`): bytes out of reach" in text
    assert "## Against sweep `sw`" in text and "Sweep models a search Pareto point dominates (1): b (seed 0)" in text
    assert "point equals (the same model, from the shared stage cache, or the same metrics) (1): a (seed 0)" in text
    assert "Sweep models neither dominated nor equalled: 0." in text
    static = (tmp_path / "report.html").read_text()  # what MLflow's artifact viewer shows: plots as inline SVG
    assert "<script" not in static and static.count("<svg") == 2 and len(static) < 1_000_000
    assert "Trial 1, <code>prune</code>" in static and "`" not in static  # Markdown code spans
    page = (tmp_path / "report-interactive.html").read_text()
    assert "<table>" in page and 'id="search-frontier"' in page and 'id="search-hypervolume"' in page
    assert "Trial 1, <code>prune</code>" in page and "`" not in page.split("<script", 1)[0]  # Markdown code spans
    assert page.count("<img") == 0 and page.count("plotly.js v") == 1  # interactive plots, plotly.js inlined once

    # Rendered: plotly.js drew, in the one frontier panel, the Pareto set, the trial that ended early and the sweep's
    # models (no trial is feasible but dominated, or infeasible at its end: no trace); the hypervolume curve.
    dom = rendered_dom(tmp_path / "report-interactive.html", tmp_path / "chromium-profile")
    assert dom.count('class="plotly-graph-div') == 2, dom[:500]
    legend = sorted(html.unescape(t) for t in re.findall(r'class="legendtext"[^>]*>([^<]*)<', dom))
    assert legend == ["Pareto set", "ended early", "sweep sw"]
    assert dom.count('class="trace scatter') == 3 + 1


def test_layer_allocation_options_are_search_dimensions(cifar_root):
    """Allocation on/off, the int8 fallback's drop budget and mixed INQ's size target are sampled like any field (a
    max_drop the int8 model already fits keeps every layer int8: the fallback off)."""
    stages = [
        {"prune": {"pruning_ratio": 0.3, "epochs": 1, "lr": 0.01}},
        {"qat": {"epochs": 1, "fp32_layers": "auto", "max_drop": 1.0}},
        {"inq": {"bits": "auto", "target_bits": 4, "epochs": 1}},
    ]
    space = {
        "prune.allocation": {"choices": ["uniform", "sensitivity"]},
        "qat.max_drop": {"choices": [0.25, 1.0, 100.0]},
        "inq.target_bits": {"low": 2.5, "high": 5, "step": 0.5},
    }
    search = {"orderings": "all", "space": space, "objectives": {"val_top1": "max"}, "trials": 2, "sampler": "random"}
    recipe = validate_recipe(tiny_recipe(name="tiny-search", stages=stages, search=search))
    settings = {"prune.allocation": "sensitivity", "qat.max_drop": 0.25, "inq.target_bits": 3.0}
    chain = {s.name: s.config for s in search_chain(recipe, ["prune", "inq", "qat"], settings).stage_specs()}
    assert (chain["prune"].allocation, chain["prune"].share_of) == ("sensitivity", "macs")
    assert (chain["qat"].fp32_layers, chain["qat"].max_drop) == ("auto", 0.25)
    assert (chain["inq"].bits, chain["inq"].target_bits) == ("auto", 3.0)

    fixed = [stages[0], {"qat": {"epochs": 1}}]
    with pytest.raises(RecipeError, match=r"search.space.qat.max_drop: .*only used with fp32_layers: auto"):
        validate_recipe(tiny_recipe(name="tiny-search", stages=fixed, search={
            "orderings": "all", "space": {"qat.max_drop": {"low": 0.2, "high": 1}},
            "objectives": {"val_top1": "max"}, "trials": 2}))  # fmt: skip

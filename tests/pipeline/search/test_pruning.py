"""Multi-fidelity search: the per-epoch validation probe leaves training untouched; a trial's epochs reach Optuna's
pruners through its peer group's fidelity study; and a tiny search through the CLI with a pruner (the trial behind
after its first epoch stopped, recorded PRUNED, off the frontier and in the counts; resumed after a kill with its
fidelity trial failed and the trial rerun) whose frontier is then confirmed with one more seed."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from torch import nn
from torchao.quantization.pt2e.fake_quantize import FakeQuantize

from pipeline import cli
from pipeline.core.metrics import EPOCH_VAL_METRIC, epoch_validation
from pipeline.recipe import RecipeError, validate_recipe
from pipeline.search.config import PrunerConfig
from pipeline.search.pruning import (
    FidelityReporter,
    PrunedChain,
    fail_unfinished,
    fidelity_study_name,
    make_pruner,
    peer_group,
)
from pipeline.search.study import plan_search
from tests.conftest import tiny_recipe, write_recipe
from tests.pipeline.search.test_search import TWO, search_recipe


def test_the_epoch_probe_pauses_fake_quant_observers_and_restores_train_mode():
    torch.manual_seed(0)
    fq = FakeQuantize()  # torchao's, as the PT2E backend inserts them
    model = nn.Sequential(nn.Flatten(), fq, nn.Linear(12, 3)).train()
    fq(torch.randn(4, 12))  # the observer has seen data: its range is set
    before = (fq.activation_post_process.min_val.clone(), fq.activation_post_process.max_val.clone())
    loader = [(torch.randn(8, 3, 2, 2) * 50, torch.arange(8) % 3)]  # far outside the observed range
    stats = epoch_validation(loader, "cpu")(model)
    assert set(stats) == {EPOCH_VAL_METRIC} and 0 <= stats[EPOCH_VAL_METRIC] <= 100
    assert model.training and bool(fq.observer_enabled.item())  # as it was
    assert torch.equal(fq.activation_post_process.min_val, before[0])  # nothing observed during the probe
    assert torch.equal(fq.activation_post_process.max_val, before[1])


def _reporter(study, total=4, offsets=(0, 2)) -> FidelityReporter:
    return FidelityReporter(study, study.ask(), list(offsets), total)


def test_a_median_pruner_stops_the_trial_behind_after_its_first_epoch():
    median = make_pruner(PrunerConfig(method="median", startup_trials=2), 4)
    study = optuna.create_study(direction="maximize", pruner=median)
    for first in (50.0, 60.0):  # two finished peers
        done = _reporter(study)
        for epoch in range(2):
            done(1, epoch, {EPOCH_VAL_METRIC: first + epoch}, False)
            done(2, epoch, {EPOCH_VAL_METRIC: first + 2 + epoch}, False)
        done.finish(TrialState.COMPLETE)
    ahead = _reporter(study)
    ahead(1, 0, {EPOCH_VAL_METRIC: 70.0}, True)  # from the cache: reported all the same
    ahead(0, 0, {EPOCH_VAL_METRIC: 1.0}, False)  # the baseline (stage 0) reports nothing
    assert ahead.reported == {1: 70.0} and (ahead.reused, ahead.trained) == (1, 0)
    behind = _reporter(study)
    with pytest.raises(PrunedChain, match="pruned after 1 of 4 epochs: validation top-1 10.00"):
        behind(1, 0, {EPOCH_VAL_METRIC: 10.0}, False)
    assert behind.accounting() == {"epochs_trained": 1, "epochs_reused": 0, "epochs_pruned": 3}
    behind.finish(TrialState.PRUNED)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED]
    assert study.trials[0].value == 53.0  # a finished fidelity trial's value is its last report


def test_the_last_epoch_is_never_pruned_and_a_trial_without_reports_fails():
    median = make_pruner(PrunerConfig(method="median", startup_trials=0), 2)
    study = optuna.create_study(direction="maximize", pruner=median)
    first = _reporter(study, total=2, offsets=(0,))
    first(1, 0, {EPOCH_VAL_METRIC: 80.0}, False)
    first(1, 1, {EPOCH_VAL_METRIC: 90.0}, False)
    first.finish(TrialState.COMPLETE)
    last = _reporter(study, total=2, offsets=(0,))
    last(1, 0, {EPOCH_VAL_METRIC: 85.0}, False)
    last(1, 1, {EPOCH_VAL_METRIC: 1.0}, False)  # behind, but stopping at the end would save nothing
    silent = _reporter(study, total=2, offsets=(0,))
    silent(1, 0, {"train_loss": 1.0}, False)  # a cached record from before pruning existed: nothing to report
    silent.finish(TrialState.COMPLETE)
    assert study.trials[-1].state == TrialState.FAIL


def test_a_resumed_search_fails_the_fidelity_trials_its_killed_trials_left_running():
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name=fidelity_study_name("s-1", "prune"), direction="maximize")
    for number in (4, 5):  # search trial 4 was killed; 5 is running in another worker right now
        study.ask().set_user_attr("search_trial", number)
    assert fail_unfinished(storage, "s-1", running={5}) == 1
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.RUNNING]


def test_peer_groups_and_pruners_from_the_config():
    params = {"ordering": "prune>qat", "prune.pruning_ratio": 0.5, "qat.lr": 0.01}
    assert peer_group(PrunerConfig(peers="all"), params) == "all"
    assert peer_group(PrunerConfig(), params) == "prune>qat"
    by_ratio = PrunerConfig(peers=["ordering", "prune.pruning_ratio"])
    assert peer_group(by_ratio, params) == peer_group(by_ratio, {**params, "qat.lr": 0.02})
    assert peer_group(by_ratio, params) != peer_group(by_ratio, {**params, "prune.pruning_ratio": 0.6})
    assert fidelity_study_name("s-1", "all") == "s-1:fidelity:all"
    hyperband = make_pruner(PrunerConfig(method="hyperband", min_epochs=1, reduction_factor=3), 9)
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    halving = make_pruner(PrunerConfig(method="successive_halving"), 9)
    assert isinstance(halving, optuna.pruners.SuccessiveHalvingPruner)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"pruner": "asha"}, "search.pruner.method: Input should be 'none', 'median'"),
        ({"pruner": {"method": "median", "peers": ["qat.lr"]}}, "search.pruner.peers[0]: 'qat.lr' is neither"),
        ({"pruner": {"method": "median", "images": 10}}, "search.pruner.images"),
        ({"confirm_seeds": -1}, "search.confirm_seeds"),
    ],
)
def test_bad_pruner_and_confirmation_settings_are_refused(change, expected, cifar_root):
    with pytest.raises(RecipeError) as err:
        validate_recipe(search_recipe(**change))
    assert expected in str(err.value)


def test_a_search_without_a_pruner_keeps_its_id(cifar_root, tmp_path):
    """Searches run before pruners existed resume their own study: `pruner: none` is not part of the id."""
    plain = plan_search(validate_recipe(search_recipe()), tracking_uri="sqlite:///x.db", cache_dir=tmp_path)
    confirmed = validate_recipe(search_recipe(confirm_seeds=2))  # a budget key: it changes no trial
    assert plan_search(confirmed, tracking_uri="sqlite:///x.db", cache_dir=tmp_path).search_id == plain.search_id
    pruned = validate_recipe(search_recipe(pruner="median"))
    assert plan_search(pruned, tracking_uri="sqlite:///x.db", cache_dir=tmp_path).search_id != plain.search_id


@pytest.mark.slow
def test_tiny_search_with_a_pruner_resume_and_confirmation(tmp_path, isolated, cifar_root, monkeypatch, capsys):
    # The probe scores a model by its parameter count (deterministic): the least pruned trial is ahead after every
    # epoch, so with one finished peer the median pruner stops the more heavily pruned ones after their first epoch.
    from pipeline.run import runner as runner_module
    from pipeline.run.runner import Runner

    probes: list[float] = []

    def by_size(_loader, _device):
        def probe(model):
            probes.append(sum(p.numel() for p in model.parameters()) / 1e4)
            return {EPOCH_VAL_METRIC: probes[-1]}

        return probe

    monkeypatch.setattr(runner_module, "epoch_validation", by_size)
    raw = tiny_recipe(name="tiny-pruned", stages=TWO, search={
        "orderings": [["prune", "distill"]],
        "space": {"prune.pruning_ratio": {"choices": [0.1, 0.3, 0.5]}},
        "objectives": {"val_top1": "max", "artifact_bytes": "min"},
        "trials": 3, "sampler": "random",
        "pruner": {"method": "median", "startup_trials": 1, "warmup_epochs": 0, "peers": "all"},
        "confirm_seeds": 1,
        "start_with": [{"ordering": "prune>distill", "prune.pruning_ratio": r} for r in (0.1, 0.5, 0.3)],
    })  # fmt: skip
    path = write_recipe(tmp_path / "search.yaml", raw)
    plan = plan_search(validate_recipe(raw), tracking_uri=isolated["MLFLOW_TRACKING_URI"], cache_dir=tmp_path / "c")

    real_run, calls = Runner.run, []

    def interrupted_second(self):
        calls.append(self.recipe.ordering)
        if len(calls) == 2:  # trial 1 (ratio 0.5) is killed after its fidelity trial was opened
            raise KeyboardInterrupt("test")
        return real_run(self)

    monkeypatch.setattr(Runner, "run", interrupted_second)
    assert cli.main(["search", str(path), "--quiet", "--no-report"]) == 130
    monkeypatch.setattr(Runner, "run", real_run)

    assert cli.main(["search", str(path), "--quiet", "--reports-dir", str(tmp_path / "reports")]) == 0
    out = capsys.readouterr().out
    assert f"search {plan.search_id}: 1 trials finished" in out and "2 pruned" in out
    assert "confirmed with 1 more seed(s): 1 configuration(s) on the frontier" in out

    report = tmp_path / "reports" / plan.search_id
    frame = pd.read_csv(report / "trials.csv").set_index("trial")
    # Trial 1 was interrupted and rerun as trial 3 (after trial 2, which waited in the queue before it).
    assert frame.state.to_dict() == {0: "COMPLETE", 1: "FAIL", 2: "PRUNED", 3: "PRUNED"}
    assert frame.loc[3, "prune.pruning_ratio"] == 0.5 and frame.loc[2, "prune.pruning_ratio"] == 0.3
    assert frame.loc[2, "pruned"].startswith("pruned after 1 of 2 epochs")
    assert (frame.loc[[2, 3], "epochs_pruned"] == 1).all() and (frame.loc[[2, 3], "epochs_trained"] == 1).all()
    assert pd.read_csv(report / "pareto.csv").trial.tolist() == [0]  # pruned trials are never on the frontier
    text = (report / "report.md").read_text()
    assert "Pruner: 2 trials stopped behind their peers" in text and "saved 2 epochs" in text
    assert "## Confirmed frontier (seed means)" in text

    # The fidelity study holds each trial's epochs: the interrupted trial's fidelity trial was failed on resume.
    fidelity = optuna.load_study(study_name=fidelity_study_name(plan.search_id, "all"), storage=plan.storage)
    by_trial = {t.user_attrs["search_trial"]: t for t in fidelity.trials}
    assert {n: t.state for n, t in by_trial.items()} == {
        0: TrialState.COMPLETE, 1: TrialState.FAIL, 2: TrialState.PRUNED, 3: TrialState.PRUNED}  # fmt: skip
    assert sorted(by_trial[0].intermediate_values) == [1, 2] and list(by_trial[2].intermediate_values) == [1]

    client = MlflowClient(isolated["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("compression")
    runs = client.search_runs([exp.experiment_id], f"tags.search = '{plan.search_id}'", max_results=1000)
    chains = {r.data.tags["trial"]: r for r in runs if r.data.tags["run_type"] == "chain" and "trial" in r.data.tags}
    assert chains["2"].info.status == "KILLED" and chains["2"].data.tags["pruned"].startswith("pruned after 1")
    # The per-epoch score is logged on the stage's run; the confirmation is a chain of its own with another seed.
    stage_runs = [r for r in runs if r.data.tags.get("stage") in ("prune", "distill") and r.data.tags.get("trial")]
    assert len(stage_runs) == 4 and all("epoch_val_top1" in r.data.metrics for r in stage_runs)
    confirmations = [r for r in runs if r.data.tags.get("confirms_trial") == "0" and r.data.tags["run_type"] == "chain"]
    assert len(confirmations) == 1 and confirmations[0].data.tags["seed"] == "1"
    version = client.get_model_version_by_alias("tiny-pruned", "best")
    assert version.tags["trial"] == "0" and version.tags["seeds"] == "0, 1"
    assert "over 2 seeds" in version.tags["confirmed.val_top1"]

"""Ordering sweeps end to end on real CIFAR-10 images: shared prefixes run once, MLflow holds one sweep run with
one nested run per ordering, an interrupted sweep resumes, a failing ordering does not stop the others."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipeline.core.config import StrictConfig
from pipeline.recipe import validate_recipe
from pipeline.sweep.sweep import plan_sweep, run_sweep
from pipeline.tracking import Tracker
from stages import base as stage_base
from tests.conftest import PROJECT_ROOT, run_cli, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow

THREE = [
    {"prune": {"pruning_ratio": 0.3, "epochs": 1, "lr": 0.01}},
    {"inq": {"bits": 5, "accumulated_portions": [0.5, 1.0], "epochs": 1, "lr": 0.01}},
    {"distill": {"epochs": 1, "lr": 0.01}},
]


def _sweep_runs(env, sweep_id: str) -> dict[str, list]:
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("compression")
    runs = client.search_runs([exp.experiment_id], f"tags.sweep = '{sweep_id}'", max_results=1000)
    out: dict[str, list] = {"sweep": [], "chain": [], "stage": []}
    for run in runs:
        out[run.data.tags["run_type"]].append(run)
    return out


def test_sweep_of_three_stages_trains_each_prefix_once(tmp_path, isolated, cifar_root):
    path = write_recipe(tmp_path / "sweep.yaml", tiny_recipe(name="tiny-sweep", stages=THREE, orderings="all"))
    reports = tmp_path / "reports"
    result = run_cli(["sweep", str(path), "--reports-dir", str(reports)], isolated)
    assert result.returncode == 0, result.stderr[-3000:]
    # 6 orderings of 3 stages: 3 + 6 + 6 = 15 stage runs plus one baseline, not 6 x 4 = 24.
    assert "stage runs: 16 executed, 8 reused from the cache (16 distinct in the sweep, 24 in all)" in result.stdout

    sweep_id = plan_sweep(validate_recipe(tiny_recipe(name="tiny-sweep", stages=THREE, orderings="all"))).sweep_id
    runs = _sweep_runs(isolated, sweep_id)
    (sweep,) = runs["sweep"]
    assert sweep.info.status == "FINISHED"
    assert sweep.data.metrics["stage_runs_executed"] == 16 and sweep.data.metrics["stage_runs_reused"] == 8
    chains = {r.data.tags["ordering"]: r for r in runs["chain"]}
    assert len(chains) == 6 and {">".join(sorted(o.split(">"))) for o in chains} == {"distill>inq>prune"}
    for chain in chains.values():
        assert chain.data.tags["mlflow.parentRunId"] == sweep.info.run_id and chain.info.status == "FINISHED"
        assert chain.data.params["training_epochs"] == "3"
    assert len(runs["stage"]) == 24
    trained = [r for r in runs["stage"] if r.data.tags["cached"] == "false"]
    assert len({r.data.tags["cache_key"] for r in trained}) == len(trained) == 16  # nothing trained twice
    assert all(r.data.tags["trained"] == "true" for r in trained)
    for stage in runs["stage"]:
        parent = stage.data.tags["mlflow.parentRunId"]
        assert stage.data.tags["chain_ordering"] == next(o for o, c in chains.items() if c.info.run_id == parent)
        assert "ordering" not in stage.data.tags  # grouping runs by `ordering` shows the orderings alone
        assert {"top1", "artifact_bytes", "latency_ms_p50"} <= set(stage.data.metrics)
    # The report was written and logged to the sweep run.
    assert (reports / sweep_id / "report.md").is_file() and (reports / sweep_id / "accuracy_vs_size.png").is_file()
    client = MlflowClient(isolated["MLFLOW_TRACKING_URI"])
    assert "report/report.html" in {a.path for a in client.list_artifacts(sweep.info.run_id, "report")}

    # Latency of every distinct model again, side by side, from the artifacts stored in MLflow.
    remeasured = run_cli(["report", sweep_id, "--remeasure-latency", "--reports-dir", str(tmp_path / "r2")], isolated)
    assert remeasured.returncode == 0, remeasured.stderr[-2000:]
    assert "re-measured at report time side by side" in (tmp_path / "r2" / sweep_id / "report.md").read_text()
    models = (tmp_path / "r2" / sweep_id / "models.csv").read_text().splitlines()
    assert len(models) == 1 + 16

    again = run_cli(["sweep", str(path), "--no-report"], isolated)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "finished in an earlier invocation" in again.stdout and "stage runs: 0 executed" in again.stdout
    assert len(_sweep_runs(isolated, sweep_id)["sweep"]) == 1  # the same sweep, reopened


def _training_a_fourth_stage(stages_dir: Path) -> bool:
    """Three stages are cached and another one has checkpoint files in its work folder."""
    cached = {p.parent.name for p in stages_dir.glob("*/*/record.json")}
    working = [d for d in (stages_dir / "work").glob("*") if d.name not in cached and any(d.rglob("*.pt"))]
    return len(cached) >= 3 and bool(working)


def test_interrupted_sweep_resumes_where_it_stopped(tmp_path, isolated, cifar_root):
    stages = [{"prune": {"pruning_ratio": 0.3, "epochs": 1, "lr": 0.01}}, {"distill": {"epochs": 2, "lr": 0.01}}]
    raw = tiny_recipe(name="tiny-resume", stages=stages, orderings="all")
    path = write_recipe(tmp_path / "sweep.yaml", raw)
    sweep_id = plan_sweep(validate_recipe(raw)).sweep_id
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "sweep", str(path), "--no-report"], env=isolated,
                            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    # Stop it inside the second ordering's (distill>prune) first stage, once that stage has written a checkpoint: the
    # three stages of prune>distill are cached and logged by then. (Stopping as the third cache record appears could
    # catch that stage between its cache entry and its MLflow tags, and it would count as reused.)
    while not _training_a_fourth_stage(tmp_path / "cache" / "stages"):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the first ordering never finished"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    before = len(list((tmp_path / "cache" / "stages").glob("*/*/record.json")))
    runs = _sweep_runs(isolated, sweep_id)
    assert [r.info.status for r in runs["sweep"]] == ["KILLED"]
    assert "KILLED" in {r.info.status for r in runs["chain"]}

    resumed = run_cli(["sweep", str(path), "--no-report", "--quiet"], isolated)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    runs = _sweep_runs(isolated, sweep_id)
    assert [r.info.status for r in runs["sweep"]] == ["FINISHED"]  # the same sweep run, reopened
    finished = sorted(r.data.tags["ordering"] for r in runs["chain"] if r.info.status == "FINISHED")
    assert finished == ["distill>prune", "prune>distill"]
    assert runs["sweep"][0].data.metrics["orderings_finished"] == 2
    # What finished before the interruption was not trained again: 5 distinct stage outputs in all.
    trained = [r for r in runs["stage"] if r.data.tags.get("trained") == "true"]
    assert len({r.data.tags["cache_key"] for r in trained}) == len(trained) == 5
    assert runs["sweep"][0].data.metrics["stage_runs_executed"] == 5
    assert f"stage runs: {5 - before} executed" in resumed.stdout


@pytest.fixture
def failing_stage():
    """A registered stage that always fails, to check that one ordering's failure does not stop the sweep."""

    class BoomConfig(StrictConfig):
        pass

    def run_boom(state, config, ctx):
        raise RuntimeError("boom: this stage always fails")

    stage_base.register_stage("boom", config=BoomConfig)(run_boom)
    yield
    stage_base._REGISTRY.pop("boom")


def test_a_failing_ordering_does_not_stop_the_others(tmp_path, isolated, failing_stage, cifar_root):
    stages = [{"prune": {"pruning_ratio": 0.3, "epochs": 1, "lr": 0.01}}, {"boom": {}}]
    recipe = validate_recipe(tiny_recipe(name="tiny-boom", stages=stages, orderings=[["boom"], ["prune"]]))
    tracker = Tracker(isolated["MLFLOW_TRACKING_URI"])
    summary = run_sweep(recipe, cache_dir=tmp_path / "cache", tracker=tracker, progress=False)
    assert [(r.ordering, r.status) for r in summary.results] == [("boom", "FAILED"), ("prune", "FINISHED")]
    assert "boom: this stage always fails" in summary.failed[0].error
    runs = _sweep_runs(isolated, summary.plan.sweep_id)
    assert {r.data.tags["ordering"]: r.info.status for r in runs["chain"]} == {"boom": "FAILED", "prune": "FINISHED"}
    chains = {r.data.tags["ordering"]: r for r in runs["chain"]}
    # The failed chain does not show its baseline's figures as its result; it names where it stopped.
    assert chains["boom"].data.metrics == {} and chains["boom"].data.tags["stopped_at_stage"] == "1 (boom)"
    note = chains["boom"].data.tags["mlflow.note.content"]
    assert "| 0 | train |" in note and "**Stopped at stage 1 (boom): RuntimeError: boom: this stage" in note
    assert chains["prune"].data.metrics["top1"] > 0 and "stopped_at_stage" not in chains["prune"].data.tags
    assert runs["sweep"][0].info.status == "FINISHED"
    assert runs["sweep"][0].data.metrics["orderings_failed"] == 1


def test_a_sweep_whose_orderings_all_fail_exits_1_without_a_report(tmp_path, isolated, failing_stage, capsys):
    from pipeline.cli import main

    path = write_recipe(tmp_path / "boom.yaml", tiny_recipe(name="all-boom", stages=[{"boom": {}}], orderings="all"))
    assert main(["sweep", str(path), "--quiet", "--reports-dir", str(tmp_path / "reports")]) == 1
    assert "1 ordering(s) failed: boom" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


def test_plan_counts_shared_prefixes_and_sweeps_all_orders_by_default(cifar_root):
    plain = validate_recipe(tiny_recipe(stages=THREE))  # no `orderings:`: the sweep command takes every order
    plan = plan_sweep(plain)
    assert [c.ordering for c in plan.chains][:2] == ["prune>inq>distill", "prune>distill>inq"]
    assert (len(plan.chains), plan.distinct_stages, plan.stage_slots) == (6, 16, 24)
    four = validate_recipe(tiny_recipe(stages=[*THREE, {"qat": {}}], orderings="all"))
    plan = plan_sweep(four)
    # qat cannot be followed by inq (prune may: it prunes the float weights and quantizes again): 24 permutations
    # minus the 12 with inq after qat.
    assert len(plan.chains) == 12 and len(plan.skipped) == 12
    assert all(c.ordering.index("qat") > c.ordering.index("inq") for c in plan.chains)
    # Same plan, same id (so a rerun resumes); another config, another sweep.
    assert plan_sweep(four).sweep_id == plan.sweep_id
    other = validate_recipe(tiny_recipe(stages=[*THREE, {"qat": {"epochs": 1}}], orderings="all"))
    assert plan_sweep(other).sweep_id != plan.sweep_id
    assert plan_sweep(four, new=True).sweep_id.startswith(plan.sweep_id + "-")


def test_four_stages_share_prefixes_64_not_96(cifar_root):
    stages = [*THREE, {"train": {"epochs": 1}}]
    plan = plan_sweep(validate_recipe(tiny_recipe(stages=stages, orderings="all")))
    assert len(plan.chains) == 24
    assert plan.distinct_stages - 1 == 4 + 12 + 24 + 24 == 64  # without the baseline
    assert plan.stage_slots - len(plan.chains) == 96


def test_seeds_repeat_each_chain_the_report_tests_differences_and_a_new_seed_trains_only_its_chains(
    tmp_path, isolated, cifar_root
):
    stages = [{"prune": {"pruning_ratio": 0.3, "epochs": 1, "lr": 0.01}}, {"distill": {"epochs": 1, "lr": 0.01}}]
    seeded = {"seeds": [0, 1], "seed_scope": "stages", "control": None}  # control unset: a sweep's default, on
    two = tiny_recipe(name="tiny-seeds", stages=stages, orderings="all", **seeded)
    path = write_recipe(tmp_path / "seeds.yaml", two)
    reports = tmp_path / "reports"
    first = run_cli(["sweep", str(path), "--reports-dir", str(reports)], isolated)
    assert first.returncode == 0, first.stderr[-3000:]
    # One shared baseline; per seed: 2 first stages + 2 second stages + the control (2 epochs of `train`).
    assert "stage runs: 11 executed, 5 reused from the cache" in first.stdout
    sweep_id = plan_sweep(validate_recipe(two)).sweep_id
    chains = _sweep_runs(isolated, sweep_id)["chain"]
    assert sorted((c.data.tags["ordering"], c.data.tags["seed"]) for c in chains) == [
        ("control(2 ep)", "0"), ("control(2 ep)", "1"),
        ("distill>prune", "0"), ("distill>prune", "1"), ("prune>distill", "0"), ("prune>distill", "1"),
    ]  # fmt: skip
    control = next(c for c in chains if c.data.tags["ordering"] == "control(2 ep)")
    assert control.data.tags["control_epochs"] == "2" and control.data.params["training_epochs"] == "2"

    # The report: mean and 95 % interval over the seeds, the paired tests and the verdict matrix.
    report = (reports / sweep_id / "report.md").read_text()
    assert "val top1 % (mean of 2 seeds [95 % CI]) | test top1 % |" in report
    assert "chosen on the validation split" in report and "x 2 seed(s)" in report
    assert "paired tests on the same 100 validation images" in report
    assert "## Which differences the data supports" in report and "Verdicts, row vs column:" in report
    assert "x 2 seed(s)" in report and "Holm-corrected over 3 pairs" in report
    assert "| Δ top1 (pts) | Δ vs control (pts) |" in report
    orderings = pd.read_csv(reports / sweep_id / "orderings.csv")
    assert set(orderings.ordering) == {"prune>distill", "distill>prune", "control(2 ep)"}
    assert (orderings.seeds == 2).all()
    by_ordering = orderings.set_index("ordering")
    for ordering in ("prune>distill", "distill>prune"):  # against the control of the same seeds and epochs
        expected = by_ordering.val_top1[ordering] - by_ordering.val_top1["control(2 ep)"]
        assert by_ordering.delta_control[ordering] == pytest.approx(expected)
    ci_low, ci_high = orderings.top1_ci_low, orderings.top1_ci_high  # of the validation top-1, chosen on
    assert (ci_low <= orderings.val_top1).all() and (orderings.val_top1 <= ci_high).all()
    assert orderings.top1.notna().all()  # the test split's top-1, reported beside
    pairs = pd.read_csv(reports / sweep_id / "comparisons.csv")
    assert len(pairs) == 3 and set(pairs.verdict) <= {"better", "worse", "tied"}
    by_name = orderings.set_index("ordering").val_top1
    assert pairs.top1_a[0] == pytest.approx(by_name[pairs.a[0]])  # the tests read the same (validation) predictions
    assert pairs.top1_b[0] == pytest.approx(by_name[pairs.b[0]])
    assert "verdicts" in (reports / sweep_id / "report-interactive.html").read_text()  # the heatmap
    # The sweep run's Description: each ordering's mean [interval] as in orderings.csv, its paired test against the
    # most accurate compressed ordering (the control is a reference, marked, never the best).
    sweep_run = _sweep_runs(isolated, sweep_id)["sweep"][0]
    note = sweep_run.data.tags["mlflow.note.content"]
    rows = {r.split("|")[2]: r for r in note.splitlines() if r.startswith("| ") and "[`" in r}
    assert len(rows) == 3
    for ordering, row in by_ordering.iterrows():
        cell = f" {row.val_top1:.2f} [{row.top1_ci_low:.2f}, {row.top1_ci_high:.2f}] "
        assert cell in next(r for name, r in rows.items() if f"`{ordering}`" in name)
    best = by_ordering.drop("control(2 ep)").val_top1.idxmax()
    assert "★" in next(r for name, r in rows.items() if f"`{best}`" in name)
    assert "(equal-training control)" in next(r for name, r in rows.items() if "control" in name)
    verdicts = sorted(r.rsplit("|", 2)[1].strip() for r in rows.values())
    assert verdicts[0] == "**best**" and all(re.fullmatch(r"(better|tied|worse) \(p = \S+\)", v) for v in verdicts[1:])
    assert sweep_run.data.metrics["best.val_top1"] == by_ordering.val_top1[best]

    # A third seed: a new sweep id (its chains differ), and only the new seed's stages train.
    path = write_recipe(tmp_path / "seeds.yaml", {**two, "seeds": [0, 1, 2]})
    again = run_cli(["sweep", str(path), "--no-report"], isolated)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage runs: 5 executed, 19 reused from the cache" in again.stdout


def test_a_retried_ordering_closes_the_runs_its_dead_attempt_left_running(tmp_path, isolated, cifar_root):
    """Ray runs a task again when its worker died: the new attempt closes the chain and stage runs the dead one left
    RUNNING (found by the team-server load benchmark, where a killed worker's retry succeeded)."""
    from pipeline.sweep.sweep import OrderingJob, run_ordering
    from pipeline.tracking import TAGS, RunType

    recipe = validate_recipe(tiny_recipe(name="tiny-retry", stages=[{"prune": {"pruning_ratio": 0.3, "epochs": 1}}]))
    plan = plan_sweep(recipe)
    (chain,) = plan.chains
    tracker = Tracker(isolated["MLFLOW_TRACKING_URI"])
    sweep_tags = {TAGS.sweep: plan.sweep_id}
    create = tracker.client.create_run
    sweep_run = create(tracker.experiment_id, tags={**sweep_tags, TAGS.run_type: RunType.SWEEP}).info.run_id
    chain_tags = {**sweep_tags, TAGS.run_type: RunType.CHAIN, TAGS.ordering: chain.ordering,
                  TAGS.seed: str(chain.chain_seed), TAGS.parent_run_id: sweep_run}  # fmt: skip
    dead_chain = create(tracker.experiment_id, tags={**chain_tags, TAGS.sweep_invocation: "ours"}).info.run_id
    dead_stage = create(tracker.experiment_id, tags={
        **sweep_tags, TAGS.run_type: RunType.STAGE, TAGS.parent_run_id: dead_chain}).info.run_id  # fmt: skip
    # The same sweep run at the same time by a colleague (same recipe, same sweep id): not ours to close.
    theirs = create(tracker.experiment_id, tags={**chain_tags, TAGS.sweep_invocation: "theirs"}).info.run_id

    job = OrderingJob(chain, plan.sweep_id, sweep_run, tmp_path / "cache", tracker.uri, tracker.experiment_id, False,
                      invocation="ours")  # fmt: skip
    assert run_ordering(job).status == "FINISHED"
    for run_id in (dead_chain, dead_stage):
        run = tracker.client.get_run(run_id)
        assert run.info.status == "FAILED" and "worker died" in run.data.tags[TAGS.error]
    assert tracker.client.get_run(theirs).info.status == "RUNNING"

"""Runs a recipe: the baseline, then each stage in order, each evaluated, cached and tracked.

For every stage: reuse the cached output when its key is known, else train it (from the previous
output, loaded lazily; `pipeline.run.stage_training`), write its artifact and state atomically, then evaluate
the artifact as it was written (the deployable form) and log everything to the stage's nested MLflow run.
Under torchrun the ranks other than 0 only train (`follow_chain`); rank 0 does all the rest.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import __version__, load_artifact
from pipeline.core import distributed
from pipeline.core.data import DataBundle, DataIndex, load_data, locate, scan
from pipeline.core.metrics import Predictions, epoch_validation, evaluate_with_predictions
from pipeline.core.models import ModelState, create_model
from pipeline.core.paths import default_cache_dir
from pipeline.deploy import ExportError, export_files, get_runtime, runtime_versions
from pipeline.deploy.measure import runtime_metrics_with_predictions
from pipeline.recipe import Recipe, StageSpec
from pipeline.run.cache import CacheEntry, StageCache
from pipeline.run.keys import PlannedStage, evaluation_key, pick_device, plan_chain
from pipeline.run.notes import chain_note
from pipeline.run.speed import compare_with_input
from pipeline.run.stage_training import StageResult, StageTrainer, follow_chain
from pipeline.tracking import TAGS, RunType, Tracker, mlflow_metric_names
from stages import get_stage

log = logging.getLogger("pipeline")


@dataclass
class RunSummary:
    recipe: str
    ordering: str
    run_id: str
    results: list[StageResult] = field(default_factory=list)
    early_stopped: str | None = None  # why the chain ended before its last stage (`stop_after`), else None

    @property
    def reused(self) -> list[str]:
        return [r.name for r in self.results if r.cached]


def training_epochs(recipe: Recipe) -> int:
    """Epochs over the training split the chain's stages train in all (the baseline excluded)."""
    return sum(getattr(s.config, "total_epochs", lambda: 0)() for s in recipe.stage_specs())


def ordering_detail(recipe: Recipe) -> str:
    """The ordering with each stage's variant as the stage declares it (`register_stage(variant=)`), e.g.
    'prune[structured]>inq[5-bit]>distill', so that structured and unstructured pruning (or INQ at 5 and 2 bits) do
    not read as the same ordering."""
    names = []
    for spec in recipe.stage_specs():
        show = get_stage(spec.name).variant
        names.append(f"{spec.name}[{show(spec.config)}]" if show is not None else spec.name)
    return ">".join(names) or "train"


def resolve_device(name: str) -> torch.device:
    """`pick_device`, ready to train on: the CPU with all cores (or OMP_NUM_THREADS of them)."""
    device = pick_device(name)
    if device.type == "cpu":
        # OMP_NUM_THREADS, when set (e.g. by Ray for a task's CPUs), sizes the thread pool; else every core.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1)
    return device


def machine_tags(recipe: Recipe) -> dict[str, str]:
    """What latency figures depend on: the CPU's instruction set as torch sees it, and the runtimes' versions."""
    return {
        TAGS.cpu_capability: torch.backends.cpu.get_cpu_capability(),
        TAGS.deploy_runtimes: ",".join(recipe.deploy.runtimes) or "none",
        **runtime_versions(recipe.deploy.runtimes),
    }


def check_pretrained(recipe: Recipe) -> None:
    """Fetch pretrained weights up front so an offline machine fails before any run is created."""
    if recipe.model.pretrained:
        create_model(recipe.model, num_classes=2)  # raises PretrainedUnavailableError when offline


@contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """While running, `kill` (SIGTERM) and a closed terminal (SIGHUP) end the run like Ctrl-C, so the open
    MLflow runs are marked KILLED and finished stages stay cached. Previous handlers are restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# After each stage but the last: (its result, the stages still to run) -> why to end the chain there, or None.
StopRule = Callable[[StageResult, list[StageSpec]], "str | None"]
# After each epoch of a stage the chain trains, and replayed from the cache record of a stage it reuses: (stage index,
# epoch within the stage from 0, the epoch's stats, whether replayed). It may end the chain by raising (a pruner).
EpochObserver = Callable[[int, int, dict[str, float], bool], None]


class Runner:
    """Runs one recipe's chain with a cache and a tracker."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        cache_dir: Path | None = None,
        tracker: Tracker | None = None,
        progress: bool = True,
        use_cache: bool = True,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        params: dict[str, object] | None = None,
        stop_after: StopRule | None = None,
        run_name: str | None = None,
        on_epoch: EpochObserver | None = None,
        epoch_validation: int | None = None,
    ) -> None:
        """`parent_run_id` nests this chain's run under another (a sweep's or a search's); `tags` go on all its runs,
        `params` on the chain's run beside its own; `stop_after` may end the chain after a stage (a search's trial
        that can no longer meet its constraints): the chain finishes there, tagged `early_stopped` with the reason.
        `epoch_validation`: score the model on this many validation images after every epoch it trains (stats
        `epoch_val_top1`, logged per epoch and kept in the stage's record); `on_epoch` sees every epoch's stats."""
        if recipe.is_sweep or recipe.is_search:
            kind = "search" if recipe.is_search else "sweep"
            raise ValueError(f"recipe {recipe.name!r} declares a {kind}; run it with `python -m pipeline {kind}`")
        recipe = recipe.as_chain()  # applies a fixed budget, if any
        self.recipe, self.progress, self.use_cache = recipe, progress, use_cache
        self.parent_run_id, self.extra_tags = parent_run_id, {**(tags or {}), **machine_tags(recipe)}
        self.extra_params, self.stop_after, self.run_name = dict(params or {}), stop_after, run_name
        self.on_epoch, self.epoch_validation = on_epoch, epoch_validation
        self.cache_dir = Path(cache_dir or default_cache_dir())
        self.cache = StageCache(self.cache_dir / "stages")
        self.tracker = tracker
        self.index: DataIndex = scan(locate(recipe.data), self.cache_dir / "fingerprints")  # files, fingerprint: once
        self.device = pick_device(recipe.device)
        self.chain = plan_chain(recipe, self.index.fingerprint, self.device)
        self.eval_key = evaluation_key(recipe)
        self.data: DataBundle | None = None

    def cached(self, stage: PlannedStage) -> CacheEntry | None:
        return self.cache.get(stage.key) if self.use_cache else None

    def run(self) -> RunSummary:
        """Run every stage (reusing cached ones) under one MLflow parent run; returns per-stage results.

        Under torchrun only rank 0 evaluates, caches and logs; the other ranks train alongside it (`follow_chain`)
        and return results without metrics."""
        trainer = self._prepare()
        if not distributed.is_main():
            results = follow_chain(trainer, self.cached)
            return RunSummary(self.recipe.name, self.recipe.ordering, "", results)
        return self._run_tracked_chain(trainer, self.tracker or Tracker())

    def _prepare(self) -> StageTrainer:
        """Pick the device and load the data (once per run); fetch pretrained weights first if the baseline runs."""
        recipe = self.recipe
        reusable = [s.name for s in self.chain if self.cached(s)]
        if not self.cached(self.chain[0]):
            check_pretrained(recipe)
        self.device = resolve_device(recipe.device)
        self.data = load_data(recipe.data, recipe.model, index=self.index, cache_dir=self.cache_dir / "datasets")
        if reusable:
            log.info("reusing cached stages: %s", ", ".join(reusable))
        probe = None
        if self.epoch_validation:
            part = self.data.with_val_subset(self.epoch_validation).eval_loader("val")
            probe = epoch_validation(part, self.device)
        return StageTrainer(recipe, self.chain, self.cache, self.data, self.device, self.progress,
                            resume=self.use_cache, epoch_eval=probe)  # fmt: skip

    def _run_tracked_chain(self, trainer: StageTrainer, tracker: Tracker) -> RunSummary:
        """The chain under its MLflow parent run, one nested run per stage (rank 0, or the only process)."""
        recipe = self.recipe
        tags = {
            **self.extra_tags,
            TAGS.run_type: RunType.CHAIN,
            TAGS.recipe: recipe.name,
            TAGS.ordering: recipe.ordering,
            TAGS.ordering_detail: ordering_detail(recipe),
            TAGS.seed: str(recipe.chain_seed),
            **({TAGS.control_epochs: str(recipe.control_epochs)} if recipe.control_epochs is not None else {}),
            TAGS.pipeline_version: __version__,
        }
        name = self.run_name or (recipe.ordering if self.parent_run_id else recipe.name)
        with termination_as_interrupt(), tracker.run(name, tags, parent_id=self.parent_run_id) as parent_id:
            summary = RunSummary(recipe.name, recipe.ordering, parent_id)
            tracker.log_text(parent_id, recipe.to_yaml(), "recipe.yaml")
            tracker.log_params(
                parent_id,
                {
                    "seed": recipe.seed,
                    "stage_seed": recipe.chain_seed,
                    "model": recipe.model.name,
                    "dataset": recipe.data.dataset,
                    "device": str(self.device),
                    **self.data.params(),
                    "stages": recipe.ordering,
                    "training_epochs": training_epochs(recipe),
                    **self.extra_params,
                },
            )
            state: ModelState | None = None
            for stage in self.chain:
                distributed.barrier()  # in step with follow_chain on the other ranks under torchrun
                try:
                    result, state = self._reuse_or_train_under_lock(trainer, tracker, parent_id, stage, state)
                except BaseException as err:
                    self._log_stopped_chain(tracker, parent_id, summary, stage, err)
                    raise
                summary.results.append(result)
                remaining = [later.spec for later in self.chain[stage.index + 1 :]]
                if remaining and self.stop_after and (reason := self.stop_after(result, remaining)):
                    log.info("ending the chain after stage %d (%s): %s", stage.index, stage.name, reason)
                    summary.early_stopped = reason
                    tracker.set_tags(parent_id, {TAGS.early_stopped: reason})
                    break
            self._log_chain_outcome(tracker, parent_id, summary)
        return summary

    def _log_chain_outcome(self, tracker: Tracker, parent_id: str, summary: RunSummary) -> None:
        """What a finished chain logs on its run: each stage's metrics at step = stage index (the charts along the
        chain; the latest values are the final model's), the final model and metrics.json. Only a finished chain
        logs metrics, so a failed one shows no baseline figures as if they were its outcome.

        Instead of `stage_seconds`, whose latest value would be the last stage's alone, the chain logs
        `chain_seconds`: the stages' training seconds summed up to each step, so its latest value is the chain's."""
        chain_seconds = 0.0
        for result in summary.results:
            metrics = dict(result.metrics)
            chain_seconds += metrics.pop("stage_seconds", 0.0)
            tracker.log_metrics(parent_id, {**metrics, "chain_seconds": chain_seconds}, step=result.index)
        tracker.log_artifact(parent_id, summary.results[-1].artifact_path, "model")
        tracker.log_dict(
            parent_id,
            {f"{r.name}[{r.index}]": mlflow_metric_names(r.metrics) for r in summary.results},
            "metrics.json",
        )
        tracker.set_tags(parent_id, {TAGS.note: chain_note(summary)})

    def _log_stopped_chain(
        self, tracker: Tracker, parent_id: str, summary: RunSummary, stage: PlannedStage, err: BaseException
    ) -> None:
        """A chain that stopped in `stage` (failed or interrupted) logs no metrics: a tag naming the stage, and as
        its description the table of the stages that finished and why it stopped."""
        where = f"{stage.index} ({stage.name})"
        first_line = next(iter(str(err).strip().splitlines()), "")
        why = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {first_line}"[:300]
        tags = {TAGS.stopped_at_stage: where, TAGS.note: chain_note(summary, f"{where}: {why}")}
        tracker.set_tags(parent_id, {**tags, **getattr(err, "run_tags", {})})  # what the exception says of the run

    def _reuse_or_train_under_lock(
        self, trainer: StageTrainer, tracker: Tracker, parent_id: str, stage: PlannedStage, state: ModelState | None
    ) -> tuple[StageResult, ModelState | None]:
        """The stage's tracked run; a stage not cached yet is trained holding the cache's lock on its key, since
        another worker may be computing this very stage: it waits, then reuses it."""
        if self.cached(stage):
            return self._tracked_stage(trainer, tracker, parent_id, stage, state)
        with self.cache.lock(stage.key):
            return self._tracked_stage(trainer, tracker, parent_id, stage, state)

    def _tracked_stage(
        self, trainer: StageTrainer, tracker: Tracker, parent_id: str, stage: PlannedStage, state: ModelState | None
    ) -> tuple[StageResult, ModelState | None]:
        """One nested MLflow run: reuse the cached output or train it, then measure the artifact and log it all."""
        entry = self.cached(stage)
        tags = {
            **self.extra_tags,
            TAGS.run_type: RunType.STAGE,
            TAGS.stage: stage.name,
            TAGS.stage_index: str(stage.index),
            TAGS.cached: str(entry is not None).lower(),
            TAGS.input_size: "x".join(str(d) for d in self.data.input_size),
            TAGS.chain_ordering: self.recipe.ordering,
            TAGS.recipe: self.recipe.name,
            TAGS.cache_key: stage.key,
        }
        with tracker.run(f"{stage.index}-{stage.name}", tags, parent_id=parent_id) as run_id:
            tracker.log_params(run_id, stage.spec.config.model_dump(mode="json"))
            start = time.perf_counter()
            if entry is None:
                log.info("stage %d (%s): running", stage.index, stage.name)

                def epoch_end(epoch: int, stats: dict[str, float]) -> None:
                    tracker.log_metrics(run_id, stats, step=epoch)
                    if self.on_epoch is not None:
                        self.on_epoch(stage.index, epoch, stats, False)

                entry, state = trainer.train_and_cache(stage, state, on_epoch_end=epoch_end)
                tracker.set_tags(run_id, {TAGS.trained: "true"})  # cached now, even if evaluation is interrupted
            else:
                log.info("stage %d (%s): reused from cache %s", stage.index, stage.name, stage.key[:12])
                state = None  # loaded only if a later stage needs to run from it
                if self.on_epoch is not None:  # the epochs as they were trained, from the stage's record
                    for epoch, stats in enumerate(entry.record.get("train_history", [])):
                        self.on_epoch(stage.index, epoch, stats, True)
            tracker.set_tags(run_id, _training_tags(entry.record))
            measured = self._measure(entry, stage)
            metrics = {k: float(v) for k, v in measured.items() if not isinstance(v, str)}
            metrics["stage_seconds"] = float(entry.record.get("seconds", 0.0))
            self._log_stage_outputs(tracker, run_id, stage, entry, measured, metrics)
        cached = tags[TAGS.cached] == "true"
        seconds, predictions = time.perf_counter() - start, entry.predictions_path(self.eval_key)
        return StageResult(stage.index, stage.name, stage.key, cached, metrics, seconds, entry.artifact_path,
                           predictions), state  # fmt: skip

    def _log_stage_outputs(
        self,
        tracker: Tracker,
        run_id: str,
        stage: PlannedStage,
        entry: CacheEntry,
        measured: dict[str, float | str],
        metrics: dict[str, float],
    ) -> None:
        """The stage run's metrics (step = stage index), metrics.json, its artifact and its exported files."""
        tracker.log_metrics(run_id, metrics, step=stage.index)
        tracker.log_dict(run_id, {"metrics": mlflow_metric_names(metrics), "record": entry.record}, "metrics.json")
        tracker.log_artifact(run_id, entry.artifact_path, "model")
        tracker.log_artifact(run_id, entry.predictions_path(self.eval_key), "predictions")
        if "deploy_error" in measured:
            tracker.set_tags(run_id, {TAGS.deploy_error: measured["deploy_error"]})
        elif self.recipe.deploy.runtimes and self._deploy_dir(entry).is_dir():
            tracker.log_artifacts(run_id, self._deploy_dir(entry), "deploy")

    def _measure(self, entry: CacheEntry, stage: PlannedStage) -> dict[str, float | str]:
        """Metrics of the stage's artifact in torch and of its exported files in every configured runtime, with their
        speed against the input model's files (numbers; plus `deploy_error`, text, when export failed and
        deploy.required is false)."""
        metrics = entry.metrics(self.eval_key)
        if metrics is None or not entry.predictions_path(self.eval_key).is_file():
            model = load_artifact(entry.artifact_path)  # measure exactly what ships
            metrics, scored = evaluate_with_predictions(
                model, self._eval_loaders(), self.data.input_size, self.recipe.evaluation, device=self.device,
                progress=self.progress,
            )  # fmt: skip
            metrics["artifact_bytes"] = float(entry.artifact_path.stat().st_size)
            predictions = {split: {"torch": p} for split, p in scored.items()}
            metrics.update(self._measure_deployed(entry, model, metrics["top1"], predictions))
            if stage.index > 0 and "deploy_error" not in metrics:
                metrics.update(self._speed_vs_input(entry, stage))
            entry.put_predictions(self.eval_key, predictions)
            entry.put_metrics(self.eval_key, metrics)
        return {**metrics, **entry.record.get("stage_metrics", {})}

    def _speed_vs_input(self, entry: CacheEntry, stage: PlannedStage) -> dict[str, float]:
        """Each runtime's speed-up over the input model's exported files, timed side by side (pipeline.run.speed)."""
        parent = self.cache.get(self.chain[stage.index - 1].key)
        cfg = self.recipe.deploy
        if parent is None or not cfg.runtimes:
            return {}
        files = {r: self._deploy_dir(entry) / get_runtime(r).file for r in cfg.runtimes}
        return compare_with_input(stage.name, stage.spec.config, files, self._deploy_dir(parent), self.data.input_size,
                                  self.recipe.evaluation, threads=cfg.threads)  # fmt: skip

    def _eval_loaders(self) -> dict:
        """The loaders of the evaluated splits: validation (what choices read) and test (what is reported)."""
        return {split: self.data.eval_loader(split) for split in self.data.splits}

    def _deploy_dir(self, entry: CacheEntry) -> Path:
        return entry.path / f"deploy-opset{self.recipe.deploy.opset}"

    def deploy_dir_of(self, result: StageResult) -> Path:
        """The folder of a stage's exported files (ONNX, OpenVINO IR), beside its artifact in the cache."""
        return result.artifact_path.parent / f"deploy-opset{self.recipe.deploy.opset}"

    def _measure_deployed(
        self, entry: CacheEntry, model, torch_top1: float, predictions: dict[str, dict[str, Predictions]]
    ) -> dict[str, float | str]:
        """Export the artifact for each configured runtime and measure the files there (see evaluator); each
        runtime's per-image predictions go into `predictions[split][runtime]`."""
        cfg = self.recipe.deploy
        if not cfg.runtimes:
            return {}
        start = time.perf_counter()
        try:
            files = export_files(model, self.data.input_size, self._deploy_dir(entry), cfg.runtimes, opset=cfg.opset)
            exported = time.perf_counter()
            out: dict[str, float | str] = {"deploy_export_seconds": exported - start}
            for runtime, file in files.items():
                log.info("measuring the exported model in %s", runtime)
                try:
                    measured, scored = runtime_metrics_with_predictions(
                        runtime, file, self._eval_loaders(), self.data.input_size, self.recipe.evaluation,
                        threads=cfg.threads, progress=self.progress)  # fmt: skip
                except Exception as err:
                    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    raise ExportError(f"{runtime} could not run the exported model {file.name}: {first[:400]}") from err
                measured[f"{runtime}.top1_delta_vs_torch"] = measured[f"{runtime}.top1"] - torch_top1
                out.update(measured)
                for split, p in scored.items():
                    predictions[split][runtime] = p
            out["deploy_eval_seconds"] = time.perf_counter() - exported
            return out
        except ExportError as err:
            if cfg.required:
                raise
            log.warning("deploy: %s (deploy.required is false: the chain goes on, the error is on the run)", err)
            return {"deploy_error": str(err)}


def _training_tags(record: dict) -> dict[str, str]:
    """What a stage's training recorded about how it ran: its numerics, and what it resumed from."""
    tags = {}
    if record.get("numerics"):
        tags[TAGS.numerics] = "; ".join(record["numerics"])
    if record.get("resumed"):
        tags[TAGS.resumed] = "; ".join(record["resumed"])
    return tags


__all__ = ["Runner", "RunSummary", "StageResult", "ordering_detail"]

"""Runs a recipe: the baseline, then each stage in order, each evaluated, cached and tracked.

For every stage: reuse the cached output when its key is known, else run it (from the previous
output, loaded lazily), write its artifact and state atomically, then evaluate the artifact as it
was written (the deployable form) and log everything to the stage's nested MLflow run.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

from pipeline import __version__, distributed
from pipeline.artifacts import load_artifact, save_artifact
from pipeline.cache import CacheEntry, StageCache, digest, file_digest, stage_key
from pipeline.data import DataBundle, load_data, locate
from pipeline.deploy import ExportError, export_files, runtime_versions
from pipeline.evaluator import evaluate, runtime_metrics
from pipeline.models import ModelState, create_model, pretrained_normalization
from pipeline.recipe import Recipe, StageSpec
from pipeline.tracking import TAGS, NullTracker, RunType, Tracker
from stages import StageContext, get_stage

log = logging.getLogger("pipeline")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Data settings that change only evaluation, not what a stage trains; they key metrics, not models.
EVAL_ONLY_DATA_FIELDS = {"test_subset", "eval_batch_size"}


def default_cache_dir() -> Path:
    """$PIPELINE_CACHE_DIR, else .cache/ in the project folder."""
    return Path(os.environ.get("PIPELINE_CACHE_DIR") or PROJECT_ROOT / ".cache")


@dataclass(frozen=True)
class PlannedStage:
    """One step of the chain: index 0 is the baseline (`train`)."""

    index: int
    spec: StageSpec
    key: str

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class StageResult:
    index: int
    name: str
    key: str
    cached: bool
    metrics: dict[str, float]  # empty on ranks other than 0 under torchrun
    seconds: float
    artifact_path: Path | None  # None on ranks other than 0 under torchrun


@dataclass
class RunSummary:
    recipe: str
    ordering: str
    run_id: str
    results: list[StageResult] = field(default_factory=list)

    @property
    def reused(self) -> list[str]:
        return [r.name for r in self.results if r.cached]


def plan_chain(recipe: Recipe) -> list[PlannedStage]:
    """The baseline plus the recipe's stages, each keyed by everything that determines its output."""
    checkpoint = recipe.model.checkpoint
    root = digest(
        {
            "version": __version__,
            # The cache pickles whole modules: another torch or timm may not read them, or build them differently.
            "torch": torch.__version__,
            "timm": timm.__version__,
            "seed": recipe.seed,
            "model": recipe.model.model_dump(mode="json", exclude={"checkpoint"}),
            "checkpoint": file_digest(checkpoint.expanduser()) if checkpoint else None,
            "data": recipe.data.model_dump(mode="json", exclude=EVAL_ONLY_DATA_FIELDS | {"root"}),
            "data_source": str(locate(recipe.data).path),
        }
    )
    specs = [StageSpec("train", recipe.baseline), *recipe.stage_specs()]
    chain, parent = [], root
    for index, spec in enumerate(specs):
        parent = stage_key(parent, spec.name, spec.config.model_dump(mode="json"))
        chain.append(PlannedStage(index, spec, parent))
    return chain


def training_epochs(recipe: Recipe) -> int:
    """Epochs over the training split the chain's stages train in all (the baseline excluded)."""
    return sum(getattr(s.config, "total_epochs", lambda: 0)() for s in recipe.stage_specs())


def evaluation_key(recipe: Recipe) -> str:
    """Identifies how metrics were measured; cached metrics are reused only under the same key."""
    return digest(
        {
            "evaluation": recipe.evaluation.model_dump(mode="json"),
            "deploy": recipe.deploy.model_dump(mode="json"),
            "data": recipe.data.model_dump(mode="json", include=EVAL_ONLY_DATA_FIELDS),
            "data_source": str(locate(recipe.data).path),
        }
    )[:16]


def resolve_device(name: str) -> torch.device:
    """'auto': CUDA when present, else the CPU with all cores (or OMP_NUM_THREADS of them)."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    # OMP_NUM_THREADS, when set (e.g. by Ray for a task's CPUs), sizes the thread pool; else every core.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1)
    return torch.device("cpu")


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
    ) -> None:
        """`parent_run_id` nests this chain's run under another (a sweep's); `tags` go on all its runs."""
        if recipe.is_sweep:
            raise ValueError(f"recipe {recipe.name!r} declares a sweep; run it with pipeline.sweep.run_sweep")
        recipe = recipe.as_chain()  # applies a fixed budget, if any
        self.recipe, self.progress, self.use_cache = recipe, progress, use_cache
        self.parent_run_id, self.extra_tags = parent_run_id, {**(tags or {}), **machine_tags(recipe)}
        self.cache_dir = Path(cache_dir or default_cache_dir())
        self.cache = StageCache(self.cache_dir / "stages")
        self.tracker = tracker
        self.chain = plan_chain(recipe)
        self.eval_key = evaluation_key(recipe)
        self.device = torch.device("cpu")
        self.data: DataBundle | None = None

    def cached(self, stage: PlannedStage) -> CacheEntry | None:
        return self.cache.get(stage.key) if self.use_cache else None

    def run(self) -> RunSummary:
        """Run every stage (reusing cached ones) under one MLflow parent run; returns per-stage results."""
        recipe = self.recipe
        reusable = [s.name for s in self.chain if self.cached(s)]
        if not self.cached(self.chain[0]):
            check_pretrained(recipe)
        self.device = resolve_device(recipe.device)
        self.data = load_data(
            recipe.data,
            seed=recipe.seed,
            cache_dir=self.cache_dir / "datasets",
            normalization=pretrained_normalization(recipe.model),
        )
        if reusable:
            log.info("reusing cached stages: %s", ", ".join(reusable))
        tracker = (self.tracker or Tracker()) if distributed.is_main() else NullTracker()
        tags = {
            **self.extra_tags,
            TAGS.run_type: RunType.CHAIN,
            TAGS.recipe: recipe.name,
            TAGS.ordering: recipe.ordering,
            TAGS.pipeline_version: __version__,
        }
        name = recipe.ordering if self.parent_run_id else recipe.name
        with termination_as_interrupt(), tracker.run(name, tags, parent_id=self.parent_run_id) as parent_id:
            summary = RunSummary(recipe.name, recipe.ordering, parent_id)
            tracker.log_text(parent_id, recipe.to_yaml(), "recipe.yaml")
            tracker.log_params(
                parent_id,
                {
                    "seed": recipe.seed,
                    "model": recipe.model.name,
                    "dataset": recipe.data.dataset,
                    "device": str(self.device),
                    "stages": recipe.ordering,
                    "training_epochs": training_epochs(recipe),
                },
            )
            state: ModelState | None = None
            for stage in self.chain:
                result, state = self._run_stage(tracker, parent_id, stage, state)
                summary.results.append(result)
                tracker.log_metrics(parent_id, result.metrics, step=stage.index)
            final = summary.results[-1]
            if final.artifact_path is not None:  # None on ranks other than 0
                tracker.log_artifact(parent_id, final.artifact_path, "model")
            tracker.log_dict(parent_id, {r.name + f"[{r.index}]": r.metrics for r in summary.results}, "metrics.json")
        return summary

    def _run_stage(self, tracker: Tracker, parent_id: str, stage: PlannedStage, state: ModelState | None):
        distributed.barrier()  # under torchrun every rank decides after rank 0 has cached the previous stage
        if not distributed.is_main():
            return self._follow_stage(stage, state)
        if self.cached(stage):
            return self._track_stage(tracker, parent_id, stage, state)
        with self.cache.lock(stage.key):  # another worker may be computing this very stage: wait, then reuse it
            return self._track_stage(tracker, parent_id, stage, state)

    def _track_stage(self, tracker: Tracker, parent_id: str, stage: PlannedStage, state: ModelState | None):
        entry = self.cached(stage)
        tags = {
            **self.extra_tags,
            TAGS.run_type: RunType.STAGE,
            TAGS.stage: stage.name,
            TAGS.stage_index: str(stage.index),
            TAGS.cached: str(entry is not None).lower(),
            TAGS.input_size: "x".join(str(d) for d in self.data.input_size),
            TAGS.ordering: self.recipe.ordering,
            TAGS.recipe: self.recipe.name,
            TAGS.cache_key: stage.key,
        }
        with tracker.run(f"{stage.index}-{stage.name}", tags, parent_id=parent_id) as run_id:
            tracker.log_params(run_id, stage.spec.config.model_dump(mode="json"))
            start = time.perf_counter()
            if entry is None:
                if state is None and stage.index > 0:
                    state = self.cache.get(self.chain[stage.index - 1].key).load_state()
                log.info("stage %d (%s): running", stage.index, stage.name)
                entry, state = self._execute(tracker, run_id, stage, state)
                tracker.set_tags(run_id, {TAGS.trained: "true"})  # cached now, even if evaluation is interrupted
            else:
                log.info("stage %d (%s): reused from cache %s", stage.index, stage.name, stage.key[:12])
                state = None  # loaded only if a later stage needs to run from it
            measured = self._measure(entry)
            metrics = {k: float(v) for k, v in measured.items() if not isinstance(v, str)}
            metrics["stage_seconds"] = float(entry.record.get("seconds", 0.0))
            tracker.log_metrics(run_id, metrics, step=stage.index)
            tracker.log_dict(run_id, {"metrics": metrics, "record": entry.record}, "metrics.json")
            tracker.log_artifact(run_id, entry.artifact_path, "model")
            if "deploy_error" in measured:
                tracker.set_tags(run_id, {TAGS.deploy_error: measured["deploy_error"]})
            elif self.recipe.deploy.runtimes and self._deploy_dir(entry).is_dir():
                tracker.log_artifacts(run_id, self._deploy_dir(entry), "deploy")
        return StageResult(
            stage.index,
            stage.name,
            stage.key,
            tags[TAGS.cached] == "true",
            metrics,
            time.perf_counter() - start,
            entry.artifact_path,
        ), state

    def _follow_stage(self, stage: PlannedStage, state: ModelState | None):
        """A rank other than 0: train the stage in lockstep with rank 0 when it runs; rank 0 evaluates, caches, logs."""
        if self.cached(stage):
            return StageResult(stage.index, stage.name, stage.key, True, {}, 0.0, None), None
        if state is None and stage.index > 0:
            state = self.cache.get(self.chain[stage.index - 1].key).load_state()
        out, seconds = self._train_stage(stage, state, on_epoch_end=None)
        return StageResult(stage.index, stage.name, stage.key, False, {}, seconds, None), out.state

    def _train_stage(self, stage: PlannedStage, state: ModelState | None, on_epoch_end):
        """Run the stage function with its seed and context; returns its output and the seconds it took."""
        seed = (self.recipe.seed * 1_000_003 + int(stage.key[:8], 16)) % 2**31
        torch.manual_seed(seed)
        ctx = StageContext(
            data=self.data,
            data_config=self.recipe.data,
            model_config=self.recipe.model,
            device=self.device,
            seed=seed,
            baseline=lambda: self.cache.get(self.chain[0].key).load_state(),
            progress=self.progress and distributed.is_main(),
            on_epoch_end=on_epoch_end,
        )
        start = time.perf_counter()
        out = get_stage(stage.name).run(state, stage.spec.config, ctx)
        out.state.model.to("cpu").eval()
        return out, time.perf_counter() - start

    def _execute(self, tracker: Tracker, run_id: str, stage: PlannedStage, state: ModelState | None):
        out, seconds = self._train_stage(
            stage, state, on_epoch_end=lambda epoch, stats: tracker.log_metrics(run_id, stats, step=epoch)
        )
        record = {
            "stage": stage.name,
            "index": stage.index,
            "config": stage.spec.config.model_dump(mode="json"),
            "parent": self.chain[stage.index - 1].key if stage.index else None,
            "seconds": seconds,
            "stage_metrics": out.metrics,
            "train_history": out.report.history if out.report else [],
            "version": __version__,
            # The cache pickles whole modules: another torch or timm may not read them, or build them differently.
            "torch": torch.__version__,
            "timm": timm.__version__,
        }
        entry = self.cache.put(stage.key, out.state, record, save_artifact)
        return entry, out.state

    def _measure(self, entry: CacheEntry) -> dict[str, float | str]:
        """Metrics of the stage's artifact in torch and of its exported files in every configured runtime
        (numbers; plus `deploy_error`, text, when export failed and deploy.required is false)."""
        metrics = entry.metrics(self.eval_key)
        if metrics is None:
            model = load_artifact(entry.artifact_path)  # measure exactly what ships
            metrics = evaluate(
                model,
                self.data.test_loader(self.recipe.data.eval_batch_size),
                self.data.input_size,
                self.recipe.evaluation,
                device=self.device,
                progress=self.progress,
            )
            metrics["artifact_bytes"] = float(entry.artifact_path.stat().st_size)
            metrics.update(self._measure_deployed(entry, model, metrics["top1"]))
            entry.put_metrics(self.eval_key, metrics)
        return {**metrics, **entry.record.get("stage_metrics", {})}

    def _deploy_dir(self, entry: CacheEntry) -> Path:
        return entry.path / f"deploy-opset{self.recipe.deploy.opset}"

    def _measure_deployed(self, entry: CacheEntry, model, torch_top1: float) -> dict[str, float | str]:
        """Export the artifact for each configured runtime and measure the files there (see evaluator)."""
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
                    measured = runtime_metrics(runtime, file, self.data.test_loader(self.recipe.data.eval_batch_size),
                                               self.data.input_size, self.recipe.evaluation, threads=cfg.threads,
                                               progress=self.progress)  # fmt: skip
                except Exception as err:
                    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    raise ExportError(f"{runtime} could not run the exported model {file.name}: {first[:400]}") from err
                measured[f"{runtime}.top1_delta_vs_torch"] = measured[f"{runtime}.top1"] - torch_top1
                out.update(measured)
            out["deploy_eval_seconds"] = time.perf_counter() - exported
            return out
        except ExportError as err:
            if cfg.required:
                raise
            log.warning("deploy: %s (deploy.required is false: the chain goes on, the error is on the run)", err)
            return {"deploy_error": str(err)}


__all__ = ["Runner", "RunSummary", "StageResult", "plan_chain"]

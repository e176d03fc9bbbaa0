"""Training one stage of a chain, and what the ranks other than 0 do under `torchrun`.

`StageTrainer` runs a planned stage's registered function from its input model, seeded from the stage's cache
key, and (on rank 0, the only one that writes) puts its output into the stage cache. Under `torchrun` every
rank trains each uncached stage in lockstep through the shared loop (DistributedDataParallel); rank 0 alone
evaluates, caches and logs (`pipeline.run.runner.Runner`), the others only `follow_chain`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import timm
import torch

from pipeline import __version__
from pipeline.core import distributed
from pipeline.core.artifacts import save_artifact
from pipeline.core.checkpoints import StageCheckpoints
from pipeline.core.data import DataBundle
from pipeline.core.models import ModelState
from pipeline.recipe import Recipe
from pipeline.run.cache import CacheEntry, StageCache
from pipeline.run.keys import PlannedStage, code_versions
from stages import StageContext, StageOutput, get_stage

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class StageResult:
    index: int
    name: str
    key: str
    cached: bool
    metrics: dict[str, float]  # empty on ranks other than 0 under torchrun
    seconds: float
    artifact_path: Path | None  # None on ranks other than 0 under torchrun
    predictions_path: Path | None = None  # per-image predictions of the evaluation (pipeline.core.metrics)


@dataclass(frozen=True)
class StageTrainer:
    """Trains the stages of one planned chain on one device, from the chain's stage cache."""

    recipe: Recipe
    chain: list[PlannedStage]
    cache: StageCache
    data: DataBundle
    device: torch.device
    progress: bool
    resume: bool = True  # go on from a stage's checkpoints (False: --no-cache, every stage starts again)
    # Measured after every epoch into its stats (`StageContext.epoch_eval`); rank 0 alone, under torchrun.
    epoch_eval: Callable[[torch.nn.Module], dict[str, float]] | None = None

    def checkpoints(self, stage: PlannedStage) -> StageCheckpoints:
        """The stage's checkpoints in its work folder; only rank 0 writes them."""
        ckpt = StageCheckpoints(self.cache.work_dir(stage.key), self.recipe.checkpoint, write=distributed.is_main())
        if not self.resume:
            ckpt.clear()
        return ckpt

    def input_state(self, stage: PlannedStage, state: ModelState | None) -> ModelState | None:
        """The model the stage starts from: `state` when the previous stage ran here, else the cached output of
        the previous stage (None for the baseline)."""
        if state is None and stage.index > 0:
            return self.cache.get(self.chain[stage.index - 1].key).load_state()
        return state

    def train(
        self,
        stage: PlannedStage,
        state: ModelState | None,
        on_epoch_end: EpochCallback | None = None,
        checkpoints: StageCheckpoints | None = None,
    ) -> tuple[StageOutput, float]:
        """Run the stage function with its seed and context, writing (and resuming from) `checkpoints` (default:
        the stage's own); returns its output and the seconds it took."""
        base = self.recipe.seed if stage.index == 0 else self.recipe.chain_seed
        seed = (base * 1_000_003 + int(stage.key[:8], 16)) % 2**31
        torch.manual_seed(seed)
        ctx = StageContext(
            data=self.data,
            data_config=self.recipe.data,
            model_config=self.recipe.model,
            device=self.device,
            seed=seed,
            baseline=lambda: self.cache.get(self.chain[0].key).load_state(),
            progress=self.progress,
            on_epoch_end=on_epoch_end,
            checkpoints=checkpoints or self.checkpoints(stage),
            sync_batchnorm=self.recipe.distributed.sync_batchnorm,
            epoch_eval=self.epoch_eval if distributed.is_main() and stage.index > 0 else None,  # not the baseline
        )
        start = time.perf_counter()
        out = get_stage(stage.name).run(state, stage.spec.config, ctx)
        out.state.model.to("cpu").eval()
        return out, time.perf_counter() - start

    def train_and_cache(
        self, stage: PlannedStage, state: ModelState | None, on_epoch_end: EpochCallback | None = None
    ) -> tuple[CacheEntry, ModelState]:
        """Train the stage and write its artifact, state and record into the cache (atomically)."""
        checkpoints = self.checkpoints(stage)
        out, seconds = self.train(stage, self.input_state(stage, state), on_epoch_end, checkpoints)
        record = {
            "stage": stage.name,
            "index": stage.index,
            "config": stage.spec.config.model_dump(mode="json"),
            "parent": self.chain[stage.index - 1].key if stage.index else None,
            "seconds": seconds,
            "stage_metrics": out.metrics,
            "train_history": out.report.history if out.report else [],
            "numerics": out.report.numerics if out.report else [],  # precision and memory format it trained in
            "version": __version__,
            # The cache pickles whole modules: another torch or timm may not read them, or build them differently.
            "torch": torch.__version__,
            "timm": timm.__version__,
            # What a killed run left that this one went on from (empty: trained from the start in one go).
            "resumed": list(checkpoints.resumed),
            "code": code_versions(stage.name),  # the versions of the code that made it (pipeline.run.keys)
        }
        entry = self.cache.put(stage.key, out.state, record, save_artifact)
        checkpoints.clear()
        return entry, out.state


def follow_chain(trainer: StageTrainer, is_cached: Callable[[PlannedStage], object]) -> list[StageResult]:
    """A rank other than 0 under torchrun: train every stage rank 0 trains, in lockstep with it (the same
    barrier before each stage), without evaluating, caching or logging; results carry no metrics."""
    trainer = replace(trainer, progress=False)
    results, state = [], None
    for stage in trainer.chain:
        distributed.barrier()  # decide after rank 0 has cached the previous stage
        if is_cached(stage):
            results.append(StageResult(stage.index, stage.name, stage.key, True, {}, 0.0, None))
            state = None
            continue
        out, seconds = trainer.train(stage, trainer.input_state(stage, state))
        results.append(StageResult(stage.index, stage.name, stage.key, False, {}, seconds, None))
        state = out.state
    return results

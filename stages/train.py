"""The `train` stage: trains the baseline from the recipe's model, or fine-tunes the model it is given."""

from __future__ import annotations

from pipeline.models import ModelState, create_model
from pipeline.training import LoopHooks, TrainConfig, train_
from stages.base import StageContext, StageOutput, register_stage


@register_stage("train", config=TrainConfig)
def run_train(state: ModelState | None, config: TrainConfig, ctx: StageContext) -> StageOutput:
    """Train the recipe's model (as the baseline) or fine-tune the input model with cross-entropy."""
    if state is None:
        model, spec = create_model(ctx.model_config, ctx.data.num_classes)
        state = ModelState(
            model,
            spec,
            preprocessing={
                "mean": ctx.data.mean,
                "std": ctx.data.std,
                "input_size": ctx.data.input_size,
            },
        )
    loader = ctx.data.train_loader(ctx.data_config.batch_size, seed=ctx.seed, augment=ctx.data_config.augment)
    report = train_(
        state.model,
        loader,
        config,
        fixed=state.fixed,
        device=ctx.device,
        hooks=LoopHooks(on_epoch_end=ctx.on_epoch_end),
        desc="train",
        progress=ctx.progress,
    )
    return StageOutput(state, report=report)

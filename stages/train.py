"""The `train` stage: trains the baseline from the recipe's model, or fine-tunes the model it is given."""

from __future__ import annotations

from pipeline.core.models import ModelState, create_model
from pipeline.core.training import TrainConfig
from stages.base import StageContext, StageOutput, register_stage


@register_stage("train", config=TrainConfig, lowers=set())
def run_train(state: ModelState | None, config: TrainConfig, ctx: StageContext) -> StageOutput:
    """Train the recipe's model (as the baseline) or fine-tune the input model with cross-entropy."""
    if state is None:
        model, spec = create_model(ctx.model_config, ctx.data.num_classes)
        state = ModelState(model, spec, ctx.data.preprocessing.to_dict())
    return StageOutput(state, report=ctx.fit(state, config, desc="train"))

"""A recipe against what is on disk, checked when it loads (a few tens of milliseconds, no training): the data is
there and has the splits the recipe needs, the model takes the data's images (built on PyTorch's meta device, one
forward), the loader and the augmentation fit together, and a distillation teacher would not teach from a random
head. Each check returns (field path, message) for `pipeline.recipe` to raise, or None."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from pipeline.core.data import DataNotFoundError, DataSource, class_names, locate
from pipeline.core.data.preprocessing import input_size
from pipeline.core.models import ModelConfig, ModelSpec

if TYPE_CHECKING:
    from pipeline.recipe import Recipe

Problem = tuple[str, str]


def resource_problem(recipe: Recipe) -> Problem | None:
    """The first problem of `recipe` against the data and models on disk, or None."""
    try:
        source = locate(recipe.data)
    except DataNotFoundError as err:
        return "data.root", str(err)
    checks = (
        lambda: test_split_problem(recipe, source),
        lambda: validation_problem(recipe, source),
        lambda: model_problem(recipe, source),
        lambda: teacher_problem(recipe, source),
        lambda: layer_names_problem(recipe),
        lambda: stage_support_problem(recipe, source),
    )
    return next((problem for check in checks if (problem := check()) is not None), None)


def test_split_problem(recipe: Recipe, source: DataSource) -> Problem | None:
    """`data.test_split` holds a test split out of one tree of class folders; data with a test split of its own (a
    test/ or val/ folder, CIFAR's test set) would silently ignore it: refused."""
    if recipe.data.test_split is None or source.single_tree:
        return None
    own = f"{source.test_folder}/ under {source.path}" if source.kind == "imagefolder" else f"{source.dataset}'s"
    return "data.test_split", (
        f"the data has a test split of its own ({own}); test_split holds one out of a single tree of class folders: "
        "remove it"
    )


def validation_problem(recipe: Recipe, source: DataSource) -> Problem | None:
    """A sweep or a search chooses on the validation split: refuse one without (val_split 0 and no val/ folder)."""
    if not (recipe.is_sweep or recipe.is_search) or recipe.data.val_split > 0 or source.val_folder:
        return None
    kind = "search" if recipe.is_search else "sweep"
    return "data.val_split", (
        f"a {kind} chooses on validation metrics, and with val_split 0 there is no validation split: set it "
        "above 0 (e.g. 0.1), or give the data a val/ folder beside test/"
    )


def model_problem(recipe: Recipe, source: DataSource) -> Problem | None:
    """The model builds from its kwargs and runs on the input size the run will feed it, and the loader can apply
    the augmentation at that size."""
    model = recipe.model
    build = _forward_failure(ModelSpec(model.name, 10, dict(model.kwargs)), None, "meta")
    if build is not None:
        return ("model.kwargs" if model.kwargs else "model"), f"timm cannot build {model.name}: {build[1]}"
    size = input_size(recipe.data, model, source)
    data = recipe.data
    if (
        data.loader == "memory"
        and data.augment
        and data.augmentation.resolved_policy(size[-1]) == "random_resized_crop"
    ):
        return "data.loader", (
            f"memory augments tensors (pad_crop_flip), but at {size[-1]} px the augmentation is random_resized_crop: "
            "set data.augmentation.policy: pad_crop_flip, or data.loader: stream or auto"
        )
    return _inputs_problem(model, size)


def _inputs_problem(cfg: ModelConfig, size: tuple[int, int, int]) -> Problem | None:
    """Refuse a model that cannot take the data's images (a ViT at 32x32 without model.kwargs img_size), before any
    run exists instead of at its first forward."""
    where = "x".join(map(str, size))
    # The class count does not change which inputs a model takes; pretrained weights or a checkpoint do not either.
    spec = ModelSpec(cfg.name, 10, dict(cfg.kwargs))
    failure = _forward_failure(spec, size, "meta")
    if failure is not None:  # an op without a meta implementation fails there too: only real tensors decide
        failure = _forward_failure(spec, size, "cpu")
    if failure is None:
        return None
    _, error, model = failure
    if hasattr(model, "patch_embed"):
        hint = f"for ViTs set model.kwargs: {{img_size: {size[1]}, patch_size: {max(size[1] // 8, 1)}}}"
    else:
        hint = "set data.img_size or model.kwargs so that they match"
    return "model", f"{cfg.name} cannot run on {where} inputs: {error}; {hint}"


def _forward_failure(spec: ModelSpec, size: tuple[int, int, int] | None, device: str):
    """None when `spec` builds on `device` and runs one image of `size` (None: only builds); else (step, first error
    line, model)."""
    model = None
    try:  # fork_rng: building on the CPU draws initial weights, which must not shift the run's random stream
        with torch.random.fork_rng(devices=[]), torch.device(device):
            model = spec.build()
        if size is not None:
            with torch.no_grad():
                model.eval()(torch.zeros(1, *size, device=device))
    except Exception as err:  # any failure of timm's code: the recipe is refused with its message
        message = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        return ("build" if model is None else "forward"), message[:300], model
    return None


def teacher_problem(recipe: Recipe, source: DataSource) -> Problem | None:
    """A distillation teacher named by timm model without `teacher_checkpoint` gets pretrained weights whose head is
    for other classes (ImageNet's 1000): refused, naming teacher_checkpoint."""
    from stages.distill import DistillConfig, random_head

    classes = None
    for index, spec in enumerate(recipe.stage_specs()):
        if not isinstance(spec.config, DistillConfig):
            continue
        classes = classes if classes is not None else len(class_names(source))
        if (problem := random_head(spec.config, classes)) is not None:
            return f"stages[{index}].{spec.name}.teacher", problem
    return None


def layer_names_problem(recipe: Recipe) -> Problem | None:
    """A stage option naming layers (`qat.fp32_layers`, a per-layer `inq.bits` map) that the model does not have.
    Names are checked on the recipe's model built on the meta device; pruning and quantization keep layer names, a
    stage that renames the layers it changes (`renames_layers`, e.g. low-rank factorisation) defers the check to when
    the stages run."""
    from stages import get_stage
    from stages.allocation import LayerNameError
    from stages.qat_fallback import weighted_layers

    checked = [(i, s) for i, s in enumerate(recipe.stage_specs()) if hasattr(s.config, "check_layer_names")]
    if not checked or any(get_stage(s.name).renames_layers for s in recipe.stage_specs()):
        return None
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = ModelSpec(recipe.model.name, 10, dict(recipe.model.kwargs)).build()
    layers = {n: model.get_submodule(n).weight.numel() for n in weighted_layers(model)}
    for index, spec in checked:
        try:
            spec.config.check_layer_names(layers)
        except LayerNameError as err:
            return f"stages[{index}].{spec.name}.{err.field}", err.detail
    return None


def stage_support_problem(recipe: Recipe, source: DataSource) -> Problem | None:
    """What a stage declares it cannot do on the recipe's model (`register_stage(check=)`: prune's trial step), asked
    on a fresh CPU build of the model at the input size the run will feed it (random weights; a second or two for the
    stages that declare a check, none for the others). Each stage is asked about the recipe's architecture as built,
    not as earlier stages of the chain leave it."""
    from stages import get_stage

    checked = [(i, s) for i, s in enumerate(recipe.stage_specs()) if get_stage(s.name).check is not None]
    if not checked:
        return None
    size = input_size(recipe.data, recipe.model, source)
    spec = ModelSpec(recipe.model.name, len(class_names(source)), dict(recipe.model.kwargs))
    with torch.random.fork_rng(devices=[]):
        model = spec.build()
    for index, stage in checked:
        reason = get_stage(stage.name).check(copy.deepcopy(model), stage.config, size)
        if reason is not None:
            return f"stages[{index}].{stage.name}", reason
    return None

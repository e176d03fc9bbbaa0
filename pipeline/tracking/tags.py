"""The names of the run tags the pipeline writes and reads back, and the kinds of run (the `run_type` tag)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tags:
    """Names of the run tags the pipeline writes and reads back (MLflow's own keys among them)."""

    run_type: str = "run_type"  # RunType.SWEEP, CHAIN or STAGE
    sweep: str = "sweep"  # the sweep's id, on every run of a sweep
    recipe: str = "recipe"  # the recipe's name
    ordering: str = "ordering"  # chain runs only: stage names joined by '>', e.g. 'prune>inq>distill'
    ordering_detail: str = "ordering_detail"  # chain runs: the ordering with variants, 'prune[structured]>inq[5-bit]'
    control_epochs: str = "control_epochs"  # chain runs of an equal-training control: the epochs it matches
    sweep_invocation: str = "sweep_invocation"  # a sweep's chain and stage runs: the invocation that ran them
    seed: str = "seed"  # chain runs: the seed that tells repetitions of one ordering apart (its stages' seed)
    chain_ordering: str = "chain_ordering"  # stage runs: their chain's ordering (grouping by `ordering` shows chains)
    stage: str = "stage"  # stage runs: the registered stage name
    stage_index: str = "stage_index"  # stage runs: position in the chain, the baseline being 0
    cached: str = "cached"  # stage runs: 'true' when the stage's output was reused from the cache
    trained: str = "trained"  # stage runs: 'true' once this run trained the stage and cached its output
    cache_key: str = "cache_key"  # stage runs: the stage cache's key of the output (same key, same model)
    numerics: str = "numerics"  # stage runs: what it trained in (precision, memory format, why), `;`-separated
    resumed: str = "resumed"  # stage runs: where it went on from a killed run's checkpoints, `;`-separated
    input_size: str = "input_size"  # stage runs: the model's input, CxHxW
    pipeline_version: str = "pipeline_version"
    cpu_capability: str = "cpu_capability"  # the CPU's instruction set as torch sees it (AVX2, AVX512, ...)
    deploy_runtimes: str = "deploy_runtimes"  # runtimes measured, comma-separated, or 'none'
    error: str = "error"  # a FAILED or KILLED run's error
    stopped_at_stage: str = "stopped_at_stage"  # a FAILED or KILLED chain run: the stage it stopped in, '2 (inq)'
    deploy_error: str = "deploy_error"  # a stage whose export failed with deploy.required false
    search: str = "search"  # the search's id (its Optuna study name), on the search's run and its trials' runs
    trial: str = "trial"  # a search's chain runs: the Optuna trial number
    confirms_trial: str = "confirms_trial"  # a search's confirmation runs: the trial whose configuration it repeats
    pruned: str = "pruned"  # a search's chain runs its pruner stopped: why (epochs done, its score)
    early_stopped: str = "early_stopped"  # a chain a search ended early: why (the constraint out of reach)
    feasible: str = "feasible"  # a search's chain runs: 'true' when the final model meets every constraint
    registered_model: str = "registered_model"  # a search's run: 'name version N' of the model it registered
    parent_run_id: str = "mlflow.parentRunId"  # MLflow's nesting: the sweep above a chain, the chain above a stage
    note: str = "mlflow.note.content"  # the run's Markdown description, shown on its page in the UI


TAGS = Tags()


class RunType:
    """Values of the `run_type` tag."""

    SWEEP = "sweep"
    SEARCH = "search"
    CHAIN = "chain"
    STAGE = "stage"
    SENSITIVITY = "sensitivity"  # a per-layer sensitivity analysis (pipeline.sensitivity)

"""The search's result in MLflow: the best feasible model registered in the Model Registry, and the plan logged on the
search's run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.core.metrics import test_name
from pipeline.search.study import SearchPlan, safe_url
from pipeline.tracking import Tracker

log = logging.getLogger("pipeline")


def register_best(tracker: Tracker, plan: SearchPlan, outcome) -> tuple[str, int]:
    """Register the chosen trial's model (its artifact and exported files) in the MLflow Model Registry: the best
    feasible trial, or with a confirmed frontier the best configuration by seed mean (tags `confirmed.*`)."""
    best = outcome.chosen
    name = plan.config.registry_name or plan.recipe.name
    confirmed = outcome.confirmed_best
    settings = best.settings
    tags = {
        "ordering": best.chain,
        "settings": json.dumps(settings, sort_keys=True),
        "search": plan.search_id,
        "trial": str(best.number),
        **{f"metric.{m}": f"{best.metrics[m]:.6g}" for m in plan.config.objectives},
        # the test split's figures, reported beside the validation metrics it was chosen on
        **{
            f"test.{t}": f"{best.metrics[t]:.6g}"
            for m in plan.config.objectives
            if (t := test_name(m)) != m and t in best.metrics
        },  # fmt: skip
        "constraints": "; ".join(plan.config.constraints) or "none",
    }
    if confirmed is not None:  # chosen on these: the mean over seeds with its 95 % interval
        for m in plan.config.objectives:
            ci = confirmed.interval(m)
            tags[f"confirmed.{m}"] = f"{ci.mean:.6g} [{ci.low:.6g}, {ci.high:.6g}] over {ci.n} seeds"
            if (t := test_name(m)) != m and t in confirmed.values:
                tags[f"confirmed.{t}"] = f"{confirmed.mean(t):.6g}"
        tags["seeds"] = ", ".join(map(str, confirmed.seeds))
    deploy_dir = Path(best.deploy_dir or "")
    shipped = bool(best.deploy_dir) and deploy_dir.is_dir()
    if shipped:  # the exported files sit in the final stage's cache entry; ship them with the model
        tracker.log_artifacts(best.run_id, deploy_dir, "deploy")
    else:
        log.warning(
            "model registry: no exported files at %s (no deploy runtimes, or a cache this machine cannot "
            "see): registering the artifact alone",
            deploy_dir,
        )
    chosen_by = "its seed mean of " if confirmed is not None else ""
    description = (
        f"Best feasible model of search {plan.search_id} (trial {best.number}, {best.chain}), chosen by "
        f"{chosen_by}{plan.config.selection_metric} (validation split; the test split's figures are tags `test.*`). "
        "Folder: model/ (the pipeline artifact: pipeline.core.artifacts.load_artifact)"
        + (" and deploy/ (the exported ONNX / OpenVINO files)." if shipped else ".")
    )
    version, created = tracker.register_model(name, best.run_id, "", tags, description)
    log.info("model registry: %s version %d %s (alias `best`)", name, version, "registered" if created else "kept")
    return name, version


def log_plan(tracker: Tracker, run_id: str, plan: SearchPlan) -> None:
    cfg = plan.config
    tracker.log_text(run_id, plan.recipe.to_yaml(), "recipe.yaml")
    tracker.log_params(
        run_id,
        {
            "orderings": len(plan.orderings),
            "ordering_list": ", ".join(plan.orderings),
            "space": json.dumps({k: v.model_dump(exclude_none=True) for k, v in cfg.space.items()}),
            "objectives": json.dumps(cfg.objectives),
            "constraints": "; ".join(cfg.constraints) or "none",
            "trials": cfg.trials or "unlimited",
            "timeout_minutes": cfg.timeout_minutes or "none",
            "sampler": cfg.sampler,
            "workers": cfg.workers,
            "early_stop": cfg.early_stop.enabled,
            "storage": safe_url(plan.storage),
            "model": plan.recipe.model.name,
            "dataset": plan.recipe.data.dataset,
        },
    )

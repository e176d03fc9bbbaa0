"""A search with a pruner against the same search without one: the hypervolume each reaches per epoch trained.

    .venv/bin/python bench/multifidelity.py REFERENCE_ID [PRUNED_ID] [--json FILE]

Both searches must share space, objectives, constraints and geometry (the pruner aside). Every hypervolume here is
measured on one geometry, built from the feasible trials of both, on the validation metrics the searches optimise.
For each search, trial by trial: the epochs trained so far (a trial's own, from its accounting: a stage found in the
cache costs nothing; a pruned trial's only up to where it stopped), the trial time so far and the hypervolume of the
feasible trials so far. The goal of issue #26: the pruned search reaches the reference's final hypervolume with at
most a third of the reference's trained epochs.

Replay (`--replay`, on by default): the reference search must have run with a pruner that never stops a trial
(`search.pruner: {method: median, startup_trials: 10000}`), so that every trial's per-epoch validation top-1 is in
its fidelity study. Each pruner method x peer grouping is then replayed on those curves, trial by trial in the
order they ran, with Optuna's own pruner: which trials it would have stopped, the epochs that would have cost
(a stage's epochs are free when an earlier trial trained that stage, as the cache and a stage's checkpoint make
them) and the hypervolume of the feasible trials it let finish. A replay keeps the reference's trials: a real
pruned search's sampler sees the pruned trials and proposes others, which the real run (PRUNED_ID) measures.
The replay also bounds a rule no pruner here has, dominance (compare a trial only with trials whose final model is
no larger), from above: it reads each trial's final size from its record (`replay_dominance`).

Reads the studies and MLflow only; trains nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from pipeline.core.metrics import EPOCH_VAL_METRIC  # noqa: E402
from pipeline.run.keys import plan_chain  # noqa: E402
from pipeline.search.config import ORDERING_PARAM, PrunerConfig  # noqa: E402
from pipeline.search.outcome import Geometry, TrialRecord, geometry, objective_values, outcome_of  # noqa: E402
from pipeline.search.pruning import (  # noqa: E402
    FidelityReporter,
    PrunedChain,
    fidelity_study_name,
    make_pruner,
    peer_group,
)
from pipeline.search.study import SearchPlan, load_search_plan, open_study, search_storage  # noqa: E402
from pipeline.search.trial import longest_chain_epochs, search_chain, stage_epochs  # noqa: E402
from pipeline.tracking import Tracker  # noqa: E402

PEERS: dict[str, list[str] | str] = {
    "ordering": "ordering",
    "all": "all",
    "ordering+ratio": [ORDERING_PARAM, "prune.pruning_ratio"],
}
METHODS = ("median", "successive_halving", "hyperband")


@dataclass
class Point:
    """One trial of a search (or of a replay), in the order they ran."""

    trial: int
    epochs: float  # trained so far, this trial included
    seconds: float  # trial time so far
    volume: float  # of the feasible trials so far


def curve(trials: list[TrialRecord], objectives: dict[str, str], geo: Geometry, cost) -> list[Point]:
    """Epochs, time and hypervolume after each finished (complete or pruned) trial; `cost(trial)`: its epochs."""
    out, seen, epochs, seconds = [], [], 0.0, 0.0
    for t in sorted(trials, key=lambda t: t.number):
        if t.state not in ("COMPLETE", "PRUNED"):
            continue
        epochs += cost(t)
        seconds += t.seconds or 0.0
        if t.feasible:
            seen.append(t)
        out.append(Point(t.number, epochs, seconds, geo.volume(objective_values(seen, objectives))))
    return out


def first_reaching(points: list[Point], volume: float) -> Point | None:
    return next((p for p in points if p.volume >= volume - 1e-12), None)


def volume_at(points: list[Point], epochs: float) -> float:
    """The hypervolume after the last trial whose epochs so far are within `epochs`."""
    return max((p.volume for p in points if p.epochs <= epochs + 1e-9), default=0.0)


# --- replay ----------------------------------------------------------------------------------------------------------


@dataclass
class Trace:
    """A reference trial as a replay needs it: its per-epoch validation top-1 and its stages' cache keys."""

    record: TrialRecord
    values: dict[int, float]  # step (chain epochs so far) -> epoch_val_top1
    stages: list[tuple[str, int, int]]  # (cache key, first step - 1, epochs) per stage
    total: int


def traces(plan: SearchPlan, trials: list[TrialRecord], study) -> list[Trace]:
    """The reference's finished trials with their fidelity curves (read from the fidelity studies they reported to)."""
    storage = search_storage(plan, create=False, heartbeat=False)
    fidelity: dict[str, optuna.Study] = {}
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    out = []
    for record in sorted(trials, key=lambda t: t.number):
        if record.state not in ("COMPLETE", "PRUNED"):
            continue
        where = by_number[record.number].user_attrs.get("fidelity")
        if not where:
            raise SystemExit(
                f"trial {record.number} of {plan.search_id} reported no epochs: rerun the reference with "
                "search.pruner.method=median search.pruner.startup_trials=10000 (records, never stops)"
            )
        name, number = where
        if name not in fidelity:
            fidelity[name] = optuna.load_study(study_name=name, storage=storage)
        values = {int(k): float(v) for k, v in fidelity[name].trials[number].intermediate_values.items()}
        chain = search_chain(plan.recipe, record.chain.split(">"), record.settings)
        epochs = stage_epochs(chain)
        keys = [s.key for s in plan_chain(chain, fingerprint="replay", device=None)[1:]]
        offsets = [sum(epochs[:i]) for i in range(len(epochs))]
        out.append(Trace(record, values, list(zip(keys, offsets, epochs, strict=True)), sum(epochs)))
    return out


def replay(plan: SearchPlan, items: list[Trace], cfg: PrunerConfig) -> tuple[list[TrialRecord], dict[int, float]]:
    """The reference's trials as `cfg`'s pruner would have let them run: the records (pruned ones as PRUNED) and
    each trial's epochs trained."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies: dict[str, optuna.Study] = {}
    trained: dict[str, int] = {}  # stage key -> epochs of it trained so far (by any earlier trial)
    records, cost = [], {}
    longest = longest_chain_epochs(plan)
    for item in items:
        group = peer_group(cfg, item.record.params)
        if group not in studies:  # named as the search would name it: hyperband assigns brackets by name and trial
            name = fidelity_study_name(plan.search_id, group)
            pruner = make_pruner(cfg, longest)
            studies[group] = optuna.create_study(study_name=name, direction="maximize", pruner=pruner)
        # The search's own reporter decides, so a replay stops exactly where a search would.
        firsts = [first for _, first, _ in item.stages]
        reporter = FidelityReporter(studies[group], studies[group].ask(), firsts, item.total)
        stop = None
        try:
            for step in sorted(item.values):
                index = max(i for i, first in enumerate(firsts) if first < step)
                reporter(index + 1, step - firsts[index] - 1, {EPOCH_VAL_METRIC: item.values[step]})
        except PrunedChain:
            stop = reporter.last_step
        ended_early = stop is not None or item.record.early_stopped  # a trial ended by its constraints: pruned too
        reporter.finish(TrialState.PRUNED if ended_early else TrialState.COMPLETE)
        reached = stop if stop is not None else max(item.values, default=0)
        cost[item.record.number] = _epochs_to(item, reached, trained)
        records.append(item.record if stop is None else _pruned(item.record, stop, item.total))
    return records, cost


def _epochs_to(item: Trace, reached: int, trained: dict[str, int]) -> float:
    """The epochs `item` trains to reach step `reached`: a stage's epochs that an earlier trial trained are free
    (`trained`: stage key -> epochs of it trained so far, updated)."""
    epochs = 0
    for key, first, n in item.stages:
        needed = min(max(reached - first, 0), n)
        epochs += max(needed - trained.get(key, 0), 0)
        trained[key] = max(trained.get(key, 0), needed)
    return float(epochs)


COMPRESSING = {"prune", "qat", "inq", "lowrank"}  # stages that shrink the model (distill only retrains it)


def compressed_from(item: Trace) -> int:
    """The first step at which `item`'s chain has trained an epoch of each of its compressing stages."""
    firsts = [first for (_, first, _), name in zip(item.stages, item.record.chain.split(">"), strict=True)
              if name in COMPRESSING]  # fmt: skip
    return max(firsts) + 1 if firsts else 1


def replay_dominance(
    items: list[Trace], min_peers: int, after_compression: bool = False
) -> tuple[list[TrialRecord], dict[int, float]]:
    """An oracle bound for a dominance rule, which no pruner here implements: a trial is stopped after an epoch
    (not its last) when its validation top-1 there is below the median of the earlier trials (any ordering) whose
    *final* model is no larger in bytes, once `min_peers` of them reached that epoch. It reads each trial's final
    size from the record, which a real search would have to predict from the settings: a rule that predicts it
    can only do worse. `after_compression`: compare only at steps where both chains have trained an epoch of every
    compressing stage they have (before that, a chain that has not pruned yet scores like the baseline)."""
    done: list[tuple[float, dict[int, float], int]] = []  # (final bytes, values up to where it ran, compressed from)
    trained: dict[str, int] = {}
    records, cost = [], {}
    for item in items:
        size, stop = item.record.metrics["artifact_bytes"], None
        start = compressed_from(item) if after_compression else 1
        for step in sorted(s for s in item.values if start <= s < item.total):
            peers = [v[step] for b, v, c in done if step in v and b <= size * (1 + 1e-3) and step >= c]
            if len(peers) >= min_peers and item.values[step] < float(np.median(peers)):
                stop = step
                break
        reached = stop if stop is not None else max(item.values, default=0)
        done.append((size, {k: v for k, v in item.values.items() if k <= reached}, start))
        cost[item.record.number] = _epochs_to(item, reached, trained)
        records.append(item.record if stop is None else _pruned(item.record, stop, item.total))
    return records, cost


def _pruned(record: TrialRecord, step: int, total: int) -> TrialRecord:
    return replace(record, state="PRUNED", pruned=f"replay: stopped after {step} of {total} epochs")


# --- main ------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference_id", help="the search without a pruner (or with one that never stops a trial)")
    parser.add_argument("pruned_id", nargs="?", help="the same search with a pruner")
    parser.add_argument("--no-replay", action="store_true", help="skip replaying pruners on the reference's curves")
    parser.add_argument(
        "--leave-out",
        nargs="*",
        default=[],
        metavar="METRIC",
        help="objectives left out of the hypervolume (e.g. a latency: two searches time the same model differently)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    tracker = Tracker()
    plans = {"reference": load_search_plan(tracker, args.reference_id)}
    if args.pruned_id:
        plans["pruned"] = load_search_plan(tracker, args.pruned_id)
    studies = {k: open_study(p, create=False) for k, p in plans.items()}
    outcomes = {k: outcome_of(studies[k], p) for k, p in plans.items()}
    ref = outcomes["reference"]
    objectives, constraints = ref.objectives, ref.constraints
    for name, o in outcomes.items():
        if o.objectives != ref.objectives or [str(c) for c in o.constraints] != [str(c) for c in constraints]:
            raise SystemExit(f"{name} search has other objectives or constraints than the reference")
    unknown = sorted(set(args.leave_out) - set(objectives))
    if unknown:
        raise SystemExit(f"not objectives of the search: {', '.join(unknown)}")
    objectives = {m: d for m, d in objectives.items() if m not in args.leave_out}
    baseline = next((t.baseline for t in ref.trials if t.baseline), {})
    feasible = [objective_values([t for t in o.trials if t.feasible], objectives) for o in outcomes.values()]
    geo = geometry(objectives, constraints, baseline, feasible)

    def own(t: TrialRecord) -> float:
        return float(t.accounting.get("epochs_trained", 0))

    curves = {k: curve(o.trials, objectives, geo, own) for k, o in outcomes.items()}
    goal = curves["reference"][-1].volume if curves["reference"] else 0.0
    total = curves["reference"][-1].epochs if curves["reference"] else 0.0
    result: dict = {"objectives": objectives, "constraints": [str(c) for c in constraints], "searches": {}}

    print(f"objectives {objectives}; constraints {[str(c) for c in constraints]}; one geometry for every volume")
    for name, points in curves.items():
        o = outcomes[name]
        pruned = sum(t.state == "PRUNED" for t in o.trials)
        last = points[-1] if points else Point(-1, 0.0, 0.0, 0.0)
        reach = first_reaching(points, goal)
        print(
            f"\n{name} {o.search_id} (pruner {plans[name].config.pruner.method}): {len(points)} trials "
            f"({pruned} pruned), {last.epochs:.0f} epochs trained, {last.seconds / 60:.1f} min of trials, "
            f"hypervolume {last.volume:.4f}"
        )
        for p in points:
            print(f"  trial {p.trial:3d}  {p.epochs:5.0f} epochs  {p.seconds / 60:6.1f} min  hv {p.volume:.4f}")
        entry = {
            "search_id": o.search_id,
            "trials": len(points),
            "pruned": pruned,
            "epochs": last.epochs,
            "minutes": last.seconds / 60,
            "hypervolume": last.volume,
            "curve": [p.__dict__ for p in points],
        }
        if name != "reference":
            third = volume_at(points, total / 3)
            entry["hypervolume_at_third"] = third
            entry["reached"] = reach.__dict__ if reach else None
            if reach:
                print(
                    f"  -> reaches the reference's {goal:.4f} after {reach.epochs:.0f} epochs "
                    f"({reach.epochs / total:.2f} of its {total:.0f}), {reach.seconds / 60:.1f} min of trials"
                )
            else:
                ratio = last.volume / goal if goal else np.nan
                print(f"  -> never reaches the reference's {goal:.4f} (best {last.volume:.4f}, {ratio:.3f}x)")
            print(f"  -> at a third of the reference's epochs ({total / 3:.0f}): {third:.4f} ({third / goal:.3f}x)")
        result["searches"][name] = entry

    if not args.no_replay:
        plan, items = plans["reference"], traces(plans["reference"], ref.trials, studies["reference"])
        print(
            f"\nreplay on the reference's {len(items)} trials ({total:.0f} epochs trained, hypervolume {goal:.4f}): "
            "pruner, peers -> trials stopped, epochs, share of the reference's, hypervolume, ratio"
        )
        no_pruner, base_cost = replay(plan, items, PrunerConfig(method="median", startup_trials=10_000))
        model = sum(base_cost.values())
        print(f"  (the cost model without a pruner: {model:.0f} epochs against {total:.0f} measured)")
        result["replay"] = {"cost_model_epochs": model}

        def replayed(records: list[TrialRecord], cost: dict[int, float], label: str) -> dict:
            """Print one replayed variant (trials stopped, epochs, their share, hypervolume) and return its figures."""
            points = curve(records, objectives, geo, lambda t: cost[t.number])
            gone = [r for r in records if r.state == "PRUNED" and (r.pruned or "").startswith("replay")]
            end, reach = points[-1], first_reaching(points, goal)
            where = f"reaches it at {reach.epochs:.0f} epochs" if reach else "never reaches it"
            ratio = end.volume / goal if goal else np.nan
            print(
                f"  {label} {len(gone):3d} stopped  {end.epochs:5.0f} epochs  "
                f"{end.epochs / model:5.2f}  hv {end.volume:.4f}  {ratio:.3f}x, {where}"
            )
            for r in gone:
                settings = ", ".join(f"{k.split('.')[-1]} {v:g}" for k, v in r.settings.items())
                print(f"      trial {r.number} {r.chain} {settings}: {r.pruned.removeprefix('replay: ')}")
            return {
                "stopped_trials": [r.number for r in gone],
                "stopped": len(gone),
                "epochs": end.epochs,
                "epochs_share": end.epochs / model if model else None,
                "hypervolume": end.volume,
                "reaches_reference_at_epochs": reach.epochs if reach else None,
            }

        for method in METHODS:
            for label, peers in PEERS.items():
                records, cost = replay(plan, items, PrunerConfig(method=method, peers=peers))
                result["replay"][f"{method}/{label}"] = replayed(records, cost, f"{method:18s} {label:15s}")
        print(
            "  oracle dominance (median of earlier trials with a final model no larger; replay_dominance), min peers:"
        )
        for after in (False, True):
            for min_peers in (1, 2, 3):
                records, cost = replay_dominance(items, min_peers, after_compression=after)
                name = "dominance" + (", compressed" if after else "")
                result["replay"][f"oracle-{name}/min_peers={min_peers}"] = replayed(
                    records, cost, f"{name:22s} {min_peers:11d}"
                )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

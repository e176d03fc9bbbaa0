"""Budgets allocated layer by layer from measured sensitivity, shared by the stages that allocate: prune (a ratio per
layer group), inq (a bit width per layer) and qat (which layers stay in floating point).

Each stage measures its own sensitivity (the validation top-1 drop of its technique applied to one layer alone, without
retraining) and hands the numbers to one of two greedy rules here:

- `allocate`: meet a size target at the smallest predicted drop, raising one layer a step at a time where the next
  step costs the least drop per unit saved (prune's ratios, inq's widths);
- `keep_float`: meet a drop budget at the smallest cost, taking layers out of a technique where that buys back the most
  drop per unit of cost (qat's fp32 fallback, the cost being the MACs left in floating point).

The prediction is additive (the drops of the chosen settings, each measured alone, summed); every allocating stage
records it next to the drop it measures on the allocated model, so a user sees how far it holds.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable


def allocate(
    drops: dict[str, dict[float, float]],
    saved: dict[str, dict[float, float]],
    sizes: Callable[[dict[str, float]], float],
    target: float,
    base: float,
) -> dict[str, float]:
    """Greedy steps per layer (group): from step 0 (unchanged) each round raises the layer whose next step adds the
    least predicted drop per unit saved. `drops[g][s]` and `saved[g][s]` are measured alone for each step `s` > 0
    (an entry for 0 is the unchanged layer's own drop, 0 if absent). The savings measured alone choose the steps;
    `sizes(steps)` (the real size with every chosen step applied) is counted once their sum says `target` (from
    `base`) is reached, and after each step from then on, until it is at most `target`. Returns the layers raised
    above 0 with their step. Raises ValueError when every layer is at its largest step and the target is not met."""
    steps = dict.fromkeys(drops, 0.0)
    checking = False
    while True:
        predicted = base - sum(saved[g][r] for g, r in steps.items() if r)
        checking = checking or predicted <= target
        if checking and sizes(_chosen(steps)) <= target:
            return _chosen(steps)
        step = _cheapest_step(drops, saved, steps)
        if step is None:
            raise ValueError("every layer is at its largest allowed step and the target is not met")
        steps[step[0]] = step[1]


def _chosen(steps: dict[str, float]) -> dict[str, float]:
    return {g: r for g, r in steps.items() if r > 0}


def _cheapest_step(drops, saved, steps: dict[str, float]) -> tuple[str, float] | None:
    """The layer and next step with the least added drop per unit saved (None: every layer at its largest)."""
    best = None
    for group, now in steps.items():
        later = sorted(r for r in drops[group] if r > now)
        if not later:
            continue
        gain = saved[group][later[0]] - saved[group].get(now, 0.0)
        cost = (drops[group][later[0]] - drops[group].get(now, 0.0)) / max(gain, 1e-9)
        if best is None or cost < best[0]:
            best = (cost, group, later[0])
    return None if best is None else best[1:]


def keep_float(drops: dict[str, float], costs: dict[str, float], budget: float) -> list[str]:
    """The layers to leave out of a technique so that the predicted drop (the drops of the layers it still changes,
    summed) is at most `budget`: most drop bought back per unit of cost first (ties: model order). Empty when the
    technique everywhere already fits."""
    predicted = sum(drops.values())
    order = sorted(drops, key=lambda g: -drops[g] / max(costs.get(g, 0.0), 1e-9))
    kept: list[str] = []
    for layer in order:
        if predicted <= budget or drops[layer] <= 0:
            break
        kept.append(layer)
        predicted -= drops[layer]
    return kept


class LayerNameError(ValueError):
    """A stage option naming layers the model does not have (or leaving out layers it must name): `field` is the
    option (`qat.fp32_layers`), `detail` what is wrong."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field, self.detail = field, detail


def match_layers(patterns: Iterable[str], names: list[str], field: str) -> dict[str, list[str]]:
    """pattern -> the layer names it matches (exact or fnmatch glob, model order); a pattern that matches nothing is an
    error naming `field` and a few of the layers there are."""
    out = {}
    for pattern in patterns:
        matched = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            shown = ", ".join(names[:6]) + (", …" if len(names) > 6 else "")
            raise LayerNameError(field, f"{pattern!r} matches no conv or linear layer of the model (layers: {shown})")
        out[pattern] = matched
    return out

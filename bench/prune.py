"""Issue #3 benchmark: structured 50% channel pruning with fine-tuning, and 50% / 80% unstructured
pruning, against the cached baseline of the default recipe model, on CIFAR-10.

    .venv/bin/python bench/prune.py            (or: make bench-prune)
"""

from __future__ import annotations

from common import parse_args, report, run_variant, side_by_side_latency_

VARIANTS = {
    "structured 50% + 6 ep fine-tune": ("prune", []),
    "unstructured 50% + 2 ep": ("prune-unstructured", ["stages[0].prune.pruning_ratio=0.5"]),
    "unstructured 80% + 2 ep": ("prune-unstructured", []),
}


def main() -> None:
    args = parse_args(__doc__)
    rows = []
    for label, (recipe, overrides) in VARIANTS.items():
        baseline, row = run_variant(recipe, label, overrides + args.set)
        rows = rows or [baseline]
        rows.append(row)
    side_by_side_latency_(rows, threads=1, rounds=args.rounds, runs=args.runs)
    report(rows, args, "bench/prune.py " + " ".join(args.set))


if __name__ == "__main__":
    main()

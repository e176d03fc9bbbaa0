"""Issue #3 benchmark: structured 50% channel pruning with fine-tuning, and 50% / 80% unstructured
pruning, against the cached baseline of the default recipe model, on CIFAR-10.

    .venv/bin/python bench/prune.py            (or: make bench-prune)
"""

from __future__ import annotations

from common import parse_args, run_all

VARIANTS = {
    "structured 50% + 6 ep fine-tune": ("prune", []),
    "unstructured 50% + 2 ep": ("prune-unstructured", ["stages[0].prune.pruning_ratio=0.5"]),
    "unstructured 80% + 2 ep": ("prune-unstructured", []),
}

if __name__ == "__main__":
    run_all(VARIANTS, parse_args(__doc__), "bench/prune.py")

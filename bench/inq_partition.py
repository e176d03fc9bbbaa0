"""Issue #26: INQ's Table 2 claim (Zhou et al. 2017): the pruning-inspired partition (largest magnitudes quantized
first: `partition: magnitude`) beats a random partition at the same bits and schedule. Both run side by side from
one baseline, with the same stage seeds, paired over seeds and images on the validation split (test reported).

    .venv/bin/python bench/inq_partition.py [--seeds 0 1 2] [--bits 5] [--set baseline.epochs=30 ...]

The INQ stage is recipes/inq.yaml's (the paper's 5-bit schedule: accumulated portions 0.5, 0.75, 0.875, 1 with an
epoch of retraining after each); only `partition` differs between the two arms.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from allocation import HEAD, compare, per_seed, run  # noqa: E402
from common import machine  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bits", type=int, default=5)
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for both arms")
    args = parser.parse_args()
    arms: dict[str, list] = {"magnitude": [], "random": []}
    for seed in args.seeds:
        for partition, results in arms.items():
            overrides = [f"stages[0].inq.partition={partition}", f"stages[0].inq.bits={args.bits}",
                         f"stage_seed={seed}", "deploy.runtimes=[]", *args.set]  # fmt: skip
            results.append(run("inq", overrides))
    keys = ["artifact_bytes", "inq_weight_bytes"]
    lines = [
        f"\nbench/inq_partition.py {' '.join(sys.argv[1:])}\nmachine: {machine()}\n",
        "| partition | seed | val top-1 | test top-1 | " + " | ".join(keys) + " |",
        "| --- | ---: | ---: | ---: |" + " ---: |" * len(keys),
        *per_seed("magnitude (pruning-inspired)", arms["magnitude"], keys),
        *per_seed("random", arms["random"], keys),
        *HEAD,
        compare("magnitude", arms["magnitude"], "random", arms["random"]),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()

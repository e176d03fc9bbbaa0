"""Issue #4 benchmark: INQ at 5, 4, 3 and 2 bits (the paper's portion schedules) against the cached
fp32 baseline of the default recipe model, on CIFAR-10.

    .venv/bin/python bench/inq.py                          (or: make bench-inq) the paper's n1 rule
    .venv/bin/python bench/inq.py --bits 3 2 --n1-rule mse  a subset, with the least-squares n1 fit
"""

from __future__ import annotations

from common import parse_args, run_all

SCHEDULES = {
    5: [0.5, 0.75, 0.875, 1.0],
    4: [0.3, 0.5, 0.8, 0.9, 0.95, 1.0],
    3: [0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0],
    2: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],  # ternary: ten steps
}


def variants(bits: list[int], n1_rule: str) -> dict[str, tuple[str, list[str]]]:
    """One `inq` recipe variant per bit-width, labelled with its schedule (and the n1 rule if not the paper's)."""
    rule = "" if n1_rule == "max" else f", n1 {n1_rule}"
    return {
        f"INQ {b}-bit ({len(SCHEDULES[b])} steps{rule})": (
            "inq",
            [
                f"stages[0].inq.bits={b}",
                f"stages[0].inq.accumulated_portions={SCHEDULES[b]}".replace(" ", ""),
                f"stages[0].inq.n1_rule={n1_rule}",
            ],
        )
        for b in bits
    }


def _options(parser) -> None:
    parser.add_argument("--bits", type=int, nargs="+", choices=sorted(SCHEDULES), default=list(SCHEDULES))
    parser.add_argument(
        "--n1-rule", choices=["max", "mse"], default="max", help="max: the paper's n1; mse: least-squares fit"
    )


if __name__ == "__main__":
    args = parse_args(__doc__, _options)
    run_all(variants(args.bits, args.n1_rule), args, "bench/inq.py")

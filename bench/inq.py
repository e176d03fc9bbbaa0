"""Issue #4 benchmark: INQ at 5, 4, 3 and 2 bits (the paper's portion schedules) against the cached
fp32 baseline of the default recipe model, on CIFAR-10.

    .venv/bin/python bench/inq.py              (or: make bench-inq)
"""

from __future__ import annotations

from common import parse_args, run_all

SCHEDULES = {
    5: [0.5, 0.75, 0.875, 1.0],
    4: [0.3, 0.5, 0.8, 0.9, 0.95, 1.0],
    3: [0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0],
    2: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],  # ternary: ten steps
}
VARIANTS = {
    f"INQ {bits}-bit ({len(portions)} steps)": (
        "inq",
        [f"stages[0].inq.bits={bits}", f"stages[0].inq.accumulated_portions={portions}".replace(" ", "")],
    )
    for bits, portions in SCHEDULES.items()
}

if __name__ == "__main__":
    run_all(VARIANTS, parse_args(__doc__), "bench/inq.py")

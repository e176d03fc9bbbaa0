"""Issue #38: every stage on the architecture families users fine-tune, at tiny size: does it run, or is it refused
when the recipe loads (never a crash after compute)?

The check is tests/stages/test_families.py's (the suite runs it on timm's tiny test models); this runs the smallest
real member of each family. Prints one row per family: `ok`, `refused` or `CRASH` per stage, then the messages.

    .venv/bin/python bench/families.py [--families NAME ...] [--stages NAME ...] [--export]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.stages.test_families import FAMILIES, STAGES, check  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--stages", nargs="*", default=list(STAGES))
    parser.add_argument("--export", action="store_true", help="also export every artifact to both runtimes")
    args = parser.parse_args()
    outcomes, notes = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            start = time.perf_counter()
            for stage in args.stages:
                outcome, detail = check(family, stage, args.export, Path(tmp))
                outcomes[(family, stage)] = outcome
                if detail:
                    notes.append(f"- {family} / {stage} ({outcome}): {detail}")
            print(f"{family}: " + ", ".join(f"{s} {outcomes[(family, s)]}" for s in args.stages)
                  + f" ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    print("| family | model | " + " | ".join(args.stages) + " |")
    print("| --- | --- |" + " --- |" * len(args.stages))
    for family in args.families:
        print(f"| {family} | {FAMILIES[family][0]} | " + " | ".join(outcomes[(family, s)] for s in args.stages) + " |")
    print("\n" + "\n".join(notes))
    counts = {kind: sum(o == kind for o in outcomes.values()) for kind in ("ok", "refused", "CRASH")}
    print(f"\n{len(outcomes)} checks: {counts['ok']} ok, {counts['refused']} refused at load, "
          f"{counts['CRASH']} crashed after compute")  # fmt: skip
    crashes = counts["CRASH"]
    raise SystemExit(1 if crashes else 0)


if __name__ == "__main__":
    main()

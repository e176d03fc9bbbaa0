"""The declared versions of the code that computes cached results, with a hash of its source as last recorded.

`python -m tests.code_versions --write` (`make versions`) records the current versions and source hashes in
tests/code_versions.json; tests/test_code_versions.py fails while a unit's source differs from what was recorded, so
a change is always looked at: if it changes what the unit computes, its version must go up (old cached results are
then never served); if it does not (a comment, a rename), recording it is all it takes.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LOCK = Path(__file__).with_name("code_versions.json")

# The code each shared version stands for (paths relative to the project root; a folder means every .py in it).
SHARED = {
    "training": ("TRAINING_VERSION", ["pipeline/core/training.py", "pipeline/core/loop.py",
                                      "pipeline/core/fixed_weights.py", "pipeline/core/precision.py",
                                      "pipeline/core/models.py",
                                      "pipeline/core/structure.py", "pipeline/core/distributed.py"]),
    "data": ("DATA_VERSION", ["pipeline/core/data"]),
    "evaluation": ("EVALUATION_VERSION", ["pipeline/core/metrics.py", "pipeline/deploy"]),
    "sensitivity": ("SENSITIVITY_VERSION", ["pipeline/sensitivity/probes.py", "pipeline/sensitivity/analysis.py",
                                            "stages/qat_fallback.py", "stages/pow2.py"]),
}  # fmt: skip


# Modules a stage's function calls into besides its own (its version stands for them too).
STAGE_HELPERS = {
    "prune": ["stages/channels.py", "stages/prune_allocation.py", "stages/allocation.py", "stages/sparsity.py"],
    "inq": ["stages/pow2.py", "stages/inq_allocation.py", "stages/allocation.py"],
    "qat": ["stages/qat_fallback.py", "stages/allocation.py", "pipeline/core/int8"],
}


def _files(paths: list[str]) -> list[Path]:
    out = []
    for path in paths:
        full = PROJECT_ROOT / path
        out += sorted(full.rglob("*.py")) if full.is_dir() else [full]
    return out


def _hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for file in files:
        h.update(file.relative_to(PROJECT_ROOT).as_posix().encode())
        h.update(file.read_bytes())
    return h.hexdigest()[:16]


def current() -> dict[str, dict]:
    """unit -> {version, files, source hash}: every registered stage (its module), every artifact format (the module
    that registers it), and the shared code (SHARED)."""
    import stages
    from pipeline.core import artifacts
    from pipeline.core.data import DATA_VERSION
    from pipeline.core.metrics import EVALUATION_VERSION
    from pipeline.core.training import TRAINING_VERSION
    from pipeline.sensitivity.analysis import SENSITIVITY_VERSION

    shared = {"TRAINING_VERSION": TRAINING_VERSION, "DATA_VERSION": DATA_VERSION,
              "EVALUATION_VERSION": EVALUATION_VERSION, "SENSITIVITY_VERSION": SENSITIVITY_VERSION}  # fmt: skip
    units = {}
    for name in stages.available_stages():
        entry = stages.get_stage(name)
        file = Path(inspect.getsourcefile(entry.run)).resolve()
        units[f"stage:{name}"] = {"version": entry.version, "files": [file, *_files(STAGE_HELPERS.get(name, []))]}
    for name, fmt in artifacts._FORMATS.items():
        file = Path(inspect.getsourcefile(fmt.encode)).resolve()
        units[f"artifact_format:{name}"] = {"version": fmt.version, "files": [file]}
    for unit, (constant, paths) in SHARED.items():
        units[unit] = {"version": shared[constant], "files": _files(paths)}
    return {
        unit: {"version": u["version"], "sha256": _hash(u["files"]),
               "files": [f.relative_to(PROJECT_ROOT).as_posix() for f in u["files"]]}
        for unit, u in sorted(units.items())
        if all(f.is_relative_to(PROJECT_ROOT) for f in u["files"])  # plug-ins from elsewhere keep their own record
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="record the current versions and hashes")
    args = parser.parse_args(argv)
    units = current()
    if args.write:
        LOCK.write_text(json.dumps(units, indent=2) + "\n")
        print(f"recorded {len(units)} code versions in {LOCK.relative_to(PROJECT_ROOT)}")
    else:
        print(json.dumps(units, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

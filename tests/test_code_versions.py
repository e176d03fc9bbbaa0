"""A change of the code that computes cached results is always looked at: its version goes up when what it computes
changes (so old results are never served), and `make versions` records it either way."""

from __future__ import annotations

import json

from tests.code_versions import LOCK, current


def test_every_code_change_was_recorded_with_its_version():
    recorded = json.loads(LOCK.read_text())
    now = current()
    problems = []
    for unit, info in now.items():
        old = recorded.get(unit)
        if old is None:
            problems.append(f"{unit} is new: record it with `make versions`")
        elif old["sha256"] != info["sha256"] and old["version"] == info["version"]:
            problems.append(
                f"{unit}: {', '.join(info['files'][:3])} changed but its version is still {info['version']}. If the "
                "change alters what it computes, bump its version (register_stage(version=), "
                "register_artifact_format(version=), or the *_VERSION constant); then `make versions`"
            )
        elif old["version"] != info["version"] or old["sha256"] != info["sha256"]:
            problems.append(f"{unit}: version {old['version']} -> {info['version']}: record it with `make versions`")
    problems += [f"{unit} is recorded but gone: `make versions`" for unit in set(recorded) - set(now)]
    assert not problems, "\n".join(problems)

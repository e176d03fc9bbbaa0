"""Compression stages, one file each, registered by the name recipes use.

Stages from outside this repository register the same way: list their modules, comma-separated, in
`PIPELINE_PLUGINS` (e.g. `PIPELINE_PLUGINS=my_pkg.my_stage`); they are imported with the built-in ones,
in every process that loads stages (Ray workers included, which inherit the variable).
"""

import importlib
import os

from stages import distill, inq, lowrank, prune, qat, train  # noqa: F401  (registers the stages)
from stages.base import StageContext, StageOutput, available_stages, get_stage, register_stage

for _module in filter(None, (m.strip() for m in os.environ.get("PIPELINE_PLUGINS", "").split(","))):
    try:
        importlib.import_module(_module)
    except ImportError as err:
        raise ImportError(f"PIPELINE_PLUGINS: cannot import stage module {_module!r}: {err}") from err

__all__ = ["StageContext", "StageOutput", "available_stages", "get_stage", "register_stage"]

"""A stage whose process dies mid-stage (as a killed worker would), for the Ray executor test.

Loaded through `PIPELINE_PLUGINS=tests.stages.crashing_stage`, which also shows how an outside stage
registers without touching this repository.
"""

from __future__ import annotations

import os

from pydantic import Field

from pipeline.core.config import StrictConfig
from stages import register_stage


class CrashConfig(StrictConfig):
    exit_code: int = Field(137, description="the process exit code, as if killed with SIGKILL")


@register_stage("crash", config=CrashConfig)
def run_crash(state, config: CrashConfig, ctx):
    """Ends the whole process at once: no exception, no cleanup, like a worker killed by the OOM killer."""
    os._exit(config.exit_code)

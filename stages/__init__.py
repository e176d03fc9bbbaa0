"""Compression stages, one file each, registered by the name recipes use."""

from stages import distill, inq, prune, qat, train  # noqa: F401  (registers the stages)
from stages.base import StageContext, StageOutput, available_stages, get_stage, register_stage

__all__ = ["StageContext", "StageOutput", "available_stages", "get_stage", "register_stage"]

"""Base class shared by every validated configuration (recipe sections and stage configs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictConfig(BaseModel):
    """A frozen config that rejects unknown keys, so a typo never goes silently unused."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

"""Base class shared by every validated configuration (recipe sections and stage configs), and the error a config
problem raises."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictConfig(BaseModel):
    """A frozen config that rejects unknown keys, so a typo never goes silently unused."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ConfigError(ValueError):
    """A config problem: `path` is the field (e.g. 'data.batch_size'), `message` what is wrong and allowed."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path, self.message = path, message

"""`deploy:` in a recipe: which runtimes every stage's model is exported to and measured in, and how."""

from __future__ import annotations

import importlib.util
from typing import Annotated

from pydantic import AfterValidator, Field, field_validator

from pipeline.core.config import StrictConfig
from pipeline.deploy.runtimes import get_runtime, runtime_names


def _registered(name: str) -> str:
    known = runtime_names()
    if name not in known:
        listed = " or ".join(", ".join(repr(r) for r in known).rsplit(", ", 1))
        raise ValueError(f"must be a registered runtime: {listed}; got {name!r}")
    return name


RuntimeName = Annotated[str, AfterValidator(_registered)]


class DeployConfig(StrictConfig):
    """Which deployment runtimes every stage's model is exported to and measured in (`deploy:` in a recipe)."""

    runtimes: list[RuntimeName] = Field(
        default_factory=lambda: list(runtime_names()),
        description="runtimes to export to and evaluate in, in order of preference (the first is the report's "
        "default); [] measures torch only",
    )
    threads: int = Field(1, ge=1, le=256, description="runtime threads for batch-1 latency and batch throughput")
    required: bool = Field(
        True, description="a model that does not export fails the stage; false: the chain goes on, error recorded"
    )
    opset: int = Field(18, ge=17, le=23, description="ONNX opset of the exported file")

    @field_validator("runtimes")
    @classmethod
    def _unique_and_installed(cls, runtimes: list[str]) -> list[str]:
        if len(set(runtimes)) != len(runtimes):
            raise ValueError(f"lists a runtime twice: {runtimes}")
        for runtime in runtimes:
            missing = [p for p in get_runtime(runtime).packages if importlib.util.find_spec(p) is None]
            if missing:
                raise ValueError(
                    f"{runtime} needs the Python package(s) {', '.join(missing)}, which are not installed "
                    f"(`make` installs them; or remove {runtime!r} from deploy.runtimes)"
                )
        return runtimes

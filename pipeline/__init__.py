"""Model-compression pipeline orchestrator: recipes of stages over timm models, tracked in MLflow."""

__version__ = "0.1.0"


def load_artifact(path):
    """Turn any stage's artifact back into a runnable `torch.nn.Module` (see pipeline.core.artifacts), with every
    stage's artifact format and structural changes registered (the built-in stages and PIPELINE_PLUGINS)."""
    import stages  # noqa: F401  (the stages register their formats and structural changes)
    from pipeline.core.artifacts import load_artifact as _load

    return _load(path)


__all__ = ["__version__", "load_artifact"]

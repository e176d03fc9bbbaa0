"""The only module that talks to MLflow.

Default store: SQLite in the project folder (`sqlite:///mlflow.db`), artifacts beside it in
`mlartifacts/`; `MLFLOW_TRACKING_URI` points elsewhere (a team's tracking server).
A run ends FINISHED, FAILED (with the error as a tag) or KILLED (Ctrl-C); never left RUNNING.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXPERIMENT = "compression"
DEFAULT_TRACKING_URI = f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _artifact_root(uri: str) -> str | None:
    """For a SQLite store, keep artifacts in `mlartifacts/` beside the database file."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return None  # a tracking server decides


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}, for MLflow params."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


class Tracker:
    """Creates runs and logs params, metrics, tags and artifacts through MLflow's client API."""

    def __init__(self, uri: str | None = None, experiment: str | None = None, experiment_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient  # imported late: MLflow is slow to import

        self.uri = uri or tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        if experiment_id is not None:  # a worker joining a sweep logs where the sweep does
            self.experiment_id = experiment_id
            return
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        self.experiment_id = (
            found.experiment_id
            if found
            else self.client.create_experiment(name, artifact_location=_artifact_root(self.uri))
        )

    @contextmanager
    def run(
        self, name: str, tags: dict[str, str], parent_id: str | None = None, resume_id: str | None = None
    ) -> Iterator[str]:
        """A run that ends FINISHED, FAILED or KILLED however the block exits; yields its id.

        `resume_id` reopens an existing run (an interrupted sweep continuing) instead of creating one."""
        tags = dict(tags)
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        if resume_id:
            run_id = resume_id
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(run_id, {**tags, "error": ""})
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        try:
            yield run_id
        except KeyboardInterrupt:
            self.client.set_tag(run_id, "error", "interrupted (KeyboardInterrupt)")
            self.client.set_terminated(run_id, "KILLED")
            raise
        except BaseException as err:
            self.client.set_tag(run_id, "error", f"{type(err).__name__}: {err}"[:5000])
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=items)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_dict(self, run_id: str, obj: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    def log_artifact(self, run_id: str, local_path: Path, artifact_path: str) -> None:
        self.client.log_artifact(run_id, str(local_path), artifact_path)

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        """Copy every file under `local_dir` into the run's artifacts at `artifact_path`."""
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    # --- reading back ------------------------------------------------------------------------------

    def find_runs(self, filter_string: str, order_by: tuple[str, ...] = ("attributes.start_time DESC",)) -> list:
        """Every run of the experiment matching an MLflow filter, e.g. "tags.sweep = 'x'" (all pages)."""
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string, max_results=1000, order_by=list(order_by), page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def fail_open_runs(self, filter_string: str, error: str) -> int:
        """Mark the matching runs still RUNNING as FAILED with `error` (their process died); returns how many."""
        runs = self.find_runs(f"{filter_string} and attributes.status = 'RUNNING'")
        for run in runs:
            self.client.set_tag(run.info.run_id, "error", error[:5000])
            self.client.set_terminated(run.info.run_id, "FAILED")
        return len(runs)

    def latest_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of each metric of a run."""
        return dict(self.client.get_run(run_id).data.metrics)

    def runs_frame(self, filter_string: str):
        """The matching runs as a pandas DataFrame (`mlflow.search_runs`): metrics.*, params.*, tags.* columns."""
        import mlflow

        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.uri)  # search_runs reads the global URI; restored below
        try:
            return mlflow.search_runs(experiment_ids=[self.experiment_id], filter_string=filter_string,
                                      max_results=100_000, output_format="pandas")  # fmt: skip
        finally:
            mlflow.set_tracking_uri(previous)

    def download_artifact(self, run_id: str, path: str, dst_dir: Path) -> Path:
        """Copy one artifact of a run (e.g. 'model/artifact.pt') into `dst_dir`; returns its local path."""
        dst_dir.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dst_dir)))


class NullTracker:
    """Logs nothing: the tracker of the ranks other than 0 under torchrun (rank 0 logs for all)."""

    uri, experiment_id = "", ""

    @contextmanager
    def run(self, name: str, tags: dict[str, str], parent_id: str | None = None, resume_id: str | None = None):
        yield ""

    def __getattr__(self, name: str):
        if name.startswith(("log_", "set_")):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

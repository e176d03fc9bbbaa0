"""The only module that talks to MLflow, and the one place that names what the pipeline keeps there.

Default store: SQLite in the project folder (`sqlite:///mlflow.db`), artifacts beside it in
`mlartifacts/`; `MLFLOW_TRACKING_URI` points elsewhere (a team's tracking server).
A run ends FINISHED, FAILED (with the error as a tag) or KILLED (Ctrl-C); never left RUNNING.

Runs come in four kinds (tag `run_type`): a sweep or a search, one chain per ordering (per trial of a search, or one
for `run`), one stage run per stage below its chain. Other modules name tags through `TAGS` and read runs back through
the Tracker's query methods (`sweep_runs`, `chain_runs`, `stage_runs`, `read_sweep`, `search_runs`, `trial_runs`),
which return plain `RunRecord`s: no other module builds an MLflow filter string or holds an MLflow object. The Model
Registry is written here too (`register_model`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.paths import PROJECT_ROOT
from pipeline.tracking import faults
from pipeline.tracking.tags import TAGS, RunType, Tags  # noqa: F401  (re-exported: the pipeline names tags through here)

DEFAULT_EXPERIMENT = "compression"
DEFAULT_TRACKING_URI = f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
# The experiment tag MLflow 3 reads to choose an experiment's UI, and its value for classic model training (the UI
# labels it "Machine learning"; "genai_development" would be "GenAI apps & agents"). MLflow's UI writes this very
# tag when a user picks the experiment type; MLflow 3.17's UI also has a global GenAI / Model training switch.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# A run page opened from a link starts in MLflow 3.17's GenAI view unless its URL asks for the model-training one.
UI_VIEW = "workflowType=machine_learning"
UI_BASE = "http://127.0.0.1:5000"  # where `make ui` serves a local store


# Metrics whose name in MLflow differs from the pipeline's: `params` (the parameter count) would sit beside MLflow's
# "Parameters" column, and the per-epoch `lr` beside the `lr` param of the stage's config.
MLFLOW_METRIC_NAMES = {"params": "param_count", "lr": "lr_epoch"}


def mlflow_metric_names(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` under the names they carry in MLflow (MLFLOW_METRIC_NAMES)."""
    return {MLFLOW_METRIC_NAMES.get(key, key): value for key, value in metrics.items()}


@dataclass(frozen=True)
class RunRecord:
    """One run read back, as plain data: the latest value of each metric, every param and tag."""

    run_id: str
    name: str
    status: str  # RUNNING, FINISHED, FAILED or KILLED
    start_time: int  # ms since the epoch
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    @property
    def parent_id(self) -> str | None:
        return self.tags.get(TAGS.parent_run_id)

    def flag(self, tag: str) -> bool:
        """Whether a true/false tag (`cached`, `trained`) is true."""
        return self.tags.get(tag) == "true"


@dataclass(frozen=True)
class SweepRuns:
    """Every run of one sweep, by kind; each list newest first."""

    sweep_id: str
    sweeps: list[RunRecord]  # the sweep's own run (more than one only if it was started twice without resuming)
    chains: list[RunRecord]
    stages: list[RunRecord]

    @property
    def empty(self) -> bool:
        return not (self.sweeps or self.chains or self.stages)


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

        faults.install_retry_line()
        self.uri = uri or tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        faults.close_remembered(self.client, self.uri, TAGS.error)
        if experiment_id is not None:  # a worker joining a sweep logs where the sweep does
            self.experiment_id = experiment_id
            return
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        kind = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
        if found is None:
            self.experiment_id = self.client.create_experiment(name, _artifact_root(self.uri), tags=kind)
            return
        self.experiment_id = found.experiment_id
        if EXPERIMENT_KIND_TAG not in found.tags:  # an experiment from before; a kind chosen in the UI is kept
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)

    @contextmanager
    def run(
        self, name: str, tags: dict[str, str], parent_id: str | None = None, resume_id: str | None = None
    ) -> Iterator[str]:
        """A run that ends FINISHED, FAILED or KILLED however the block exits; yields its id.

        `resume_id` reopens an existing run (an interrupted sweep continuing) instead of creating one."""
        tags = dict(tags)
        if parent_id:
            tags[TAGS.parent_run_id] = parent_id
        if resume_id:
            run_id = resume_id
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(run_id, {**tags, TAGS.error: ""})
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        try:
            yield run_id
        except KeyboardInterrupt:
            self._end_early(run_id, "KILLED", "interrupted (KeyboardInterrupt)")
            raise
        except BaseException as err:
            # An exception may say how the run ended otherwise (a search's pruned trial: KILLED, not FAILED).
            self._end_early(run_id, getattr(err, "run_status", "FAILED"), f"{type(err).__name__}: {err}")
            raise
        try:
            self.client.set_terminated(run_id, "FINISHED")
        except Exception as err:  # the server went away at the very end: the next command closes it
            if faults.unreachable(err):
                faults.remember_unclosed(self.uri, run_id)
            raise

    def _end_early(self, run_id: str, status: str, error: str) -> None:
        """Close a failed or interrupted run; a server that does not answer its health check now is not waited for
        (MLflow's retries take minutes): the run is remembered, and the next command that reaches it closes it."""
        if not faults.server_answers(self.uri):
            faults.remember_unclosed(self.uri, run_id)
            return
        self.client.set_tag(run_id, TAGS.error, error[:5000])
        self.client.set_terminated(run_id, status)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Log metrics at `step`, under their MLflow names (`params` as `param_count`, `lr` as `lr_epoch`)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in mlflow_metric_names(metrics).items()]
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

    def log_table(self, run_id: str, frame, artifact_file: str) -> None:
        """A DataFrame as an MLflow table artifact (.json), replaced when logged again (log_table would append)."""
        import tempfile

        folder, _, name = artifact_file.rpartition("/")
        if name not in {Path(f.path).name for f in self.client.list_artifacts(run_id, folder or None)}:
            self.client.log_table(run_id, frame, artifact_file)
            return
        with tempfile.TemporaryDirectory() as tmp:  # the same file log_table writes, over the old one
            frame.to_json(Path(tmp) / name, orient="split", index=False, date_format="iso")
            self.client.log_artifact(run_id, str(Path(tmp) / name), folder or None)

    def set_note(self, run_id: str, markdown: str) -> None:
        """The run's Description in the UI (Markdown, shown on its page)."""
        self.client.set_tag(run_id, TAGS.note, markdown)

    # --- links into the MLflow UI --------------------------------------------------------------------

    def run_link(self, run_id: str) -> str:
        """A run's page relative to the UI's root, in the model-training view (what Descriptions link with)."""
        return f"#/experiments/{self.experiment_id}/runs/{run_id}?{UI_VIEW}"

    def artifact_link(self, run_id: str, path: str) -> str:
        """One artifact of a run opened in the UI's artifact viewer (an HTML file is rendered there)."""
        return f"#/experiments/{self.experiment_id}/runs/{run_id}/artifacts/{path}?{UI_VIEW}"

    @property
    def is_server(self) -> bool:  # an http(s) tracking server rather than a local database
        return self.uri.startswith(("http://", "https://"))

    def ui_url(self, run_id: str, ui_base: str = UI_BASE) -> str:
        """A run's page as a full URL: on the tracking server when the store is one, else on `make ui`'s address."""
        base = self.uri if self.is_server else ui_base
        return f"{base.rstrip('/')}/{self.run_link(run_id)}"

    # --- reading back ------------------------------------------------------------------------------

    def sweep_runs(self, sweep_id: str | None = None) -> list[RunRecord]:
        """The top-level runs of sweep `sweep_id` (of every sweep when None), newest first."""
        return self._search({TAGS.sweep: sweep_id, TAGS.run_type: RunType.SWEEP})

    def chain_runs(self, sweep_id: str, *, status: str | None = None) -> list[RunRecord]:
        """The ordering (chain) runs of a sweep, newest first; `status` keeps only those that ended so."""
        return self._search({TAGS.sweep: sweep_id, TAGS.run_type: RunType.CHAIN}, status=status)

    def stage_runs(self, sweep_id: str | None = None, *, status: str | None = None) -> list[RunRecord]:
        """The stage runs of a sweep (of every chain in the experiment when None), newest first."""
        return self._search({TAGS.sweep: sweep_id, TAGS.run_type: RunType.STAGE}, status=status)

    def read_sweep(self, sweep_id: str) -> SweepRuns:
        """Every run of a sweep in one query, split by kind."""
        runs = self._search({TAGS.sweep: sweep_id})
        by_type: dict[str | None, list[RunRecord]] = {}
        for run in runs:
            by_type.setdefault(run.tags.get(TAGS.run_type), []).append(run)
        kinds = (RunType.SWEEP, RunType.CHAIN, RunType.STAGE)
        return SweepRuns(sweep_id, *(by_type.get(kind, []) for kind in kinds))

    def fail_open_ordering_runs(
        self, sweep_id: str, ordering: str, error: str, seed: int | None = None, invocation: str | None = None
    ) -> int:
        """Mark an ordering's chain run (of `seed`, and of the sweep `invocation`, when given: another invocation of
        the same sweep, a colleague's, is left alone) and its stage runs still RUNNING as FAILED with `error` (their
        process died); returns how many."""
        chains = [run for run in self.chain_runs(sweep_id) if run.tags.get(TAGS.ordering) == ordering
                  and (seed is None or run.tags.get(TAGS.seed) in (None, str(seed)))
                  and (invocation is None or run.tags.get(TAGS.sweep_invocation) == invocation)]  # fmt: skip
        chain_ids = {run.run_id for run in chains}
        stages = [run for run in self.stage_runs(sweep_id, status="RUNNING") if run.parent_id in chain_ids]
        open_runs = [run for run in chains if run.status == "RUNNING"] + stages
        for run in open_runs:
            self.client.set_tag(run.run_id, TAGS.error, error[:5000])
            self.client.set_terminated(run.run_id, "FAILED")
        return len(open_runs)

    def plain_runs(self) -> list[RunRecord]:
        """The chain runs of `run` (a recipe's own chain: no sweep or search above it), newest first."""
        return [r for r in self._search({TAGS.run_type: RunType.CHAIN}) if not r.parent_id]

    def search_runs(self, search_id: str | None = None) -> list[RunRecord]:
        """The top-level runs of search `search_id` (of every search when None), newest first."""
        return self._search({TAGS.search: search_id, TAGS.run_type: RunType.SEARCH})

    def trial_runs(self, search_id: str, *, status: str | None = None) -> list[RunRecord]:
        """The chain runs of a search's trials, newest first."""
        return self._search({TAGS.search: search_id, TAGS.run_type: RunType.CHAIN}, status=status)

    def artifact_uri(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.artifact_uri

    def register_model(
        self, name: str, run_id: str, artifact_path: str, tags: dict[str, str], description: str
    ) -> tuple[int, bool]:
        """Register the folder `artifact_path` of run `run_id` as a version of model `name` in the MLflow Model
        Registry (created when missing), with `tags`, and point the alias `best` at it. A version of that run and
        folder registered before is reused. Returns (version, whether it was created now)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description=description)
        source = f"{self.artifact_uri(run_id)}/{artifact_path}" if artifact_path else self.artifact_uri(run_id)
        existing = [v for v in self.client.search_model_versions(f"name = '{name}'") if v.source == source]
        if existing:
            version, created = int(existing[0].version), False
        else:
            found = self.client.create_model_version(name, source, run_id=run_id, tags=tags, description=description)
            version, created = int(found.version), True
        self.client.set_registered_model_alias(name, "best", str(version))
        return version, created

    def _search(self, tags: dict[str, str | None], status: str | None = None) -> list[RunRecord]:
        """Runs whose tags have the given values (None: any), newest first."""
        clauses = [f"tags.{key} = '{value}'" for key, value in tags.items() if value is not None]
        if status is not None:
            clauses.append(f"attributes.status = '{status}'")
        return [_record(run) for run in self.find_runs(" and ".join(clauses))]

    def find_runs(self, filter_string: str, order_by: tuple[str, ...] = ("attributes.start_time DESC",)) -> list:
        """Every run of the experiment matching an MLflow filter, e.g. "tags.sweep = 'x'" (all pages), as MLflow's
        Run objects: a low-level escape hatch for tests and ad-hoc queries; the pipeline uses the methods above."""
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string, max_results=1000, order_by=list(order_by), page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def latest_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of each metric of a run."""
        return dict(self.client.get_run(run_id).data.metrics)

    def runs_frame(self, filter_string: str):
        """The matching runs as a pandas DataFrame (`mlflow.search_runs`): metrics.*, params.*, tags.* columns;
        like `find_runs`, for tests and ad-hoc queries (`records_from_frame` turns it into RunRecords)."""
        import mlflow

        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.uri)  # search_runs reads the global URI; restored below
        try:
            return mlflow.search_runs(experiment_ids=[self.experiment_id], filter_string=filter_string,
                                      max_results=100_000, output_format="pandas")  # fmt: skip
        finally:
            mlflow.set_tracking_uri(previous)

    def download_artifact(self, run_id: str, path: str, dst_dir: Path) -> Path:
        """Copy one artifact of a run (e.g. 'model/artifact.pt') into `dst_dir`; returns its local path. MLflow's
        progress bar is drawn only on a terminal: redirected to a log, it printed a line per download, burying the
        tool's own one line per epoch (an explicit MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR is kept)."""
        dst_dir.mkdir(parents=True, exist_ok=True)
        variable = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
        quiet = variable not in os.environ and not sys.stderr.isatty()
        if quiet:
            os.environ[variable] = "false"
        try:
            return Path(self.client.download_artifacts(run_id, path, str(dst_dir)))
        finally:
            if quiet:
                os.environ.pop(variable, None)


def _record(run) -> RunRecord:
    """An MLflow Run as a RunRecord; metrics an older version logged under the pipeline's names are renamed."""
    info, data = run.info, run.data
    tags, metrics, params = dict(data.tags), _current_names(data.metrics), dict(data.params)
    return RunRecord(info.run_id, info.run_name or "", info.status, info.start_time or 0, tags, metrics, params)


def records_from_frame(frame) -> list[RunRecord]:
    """The rows of a `Tracker.runs_frame` DataFrame as RunRecords (missing values left out)."""
    records = []
    for row in frame.to_dict("records"):
        values = {key: value for key, value in row.items() if value is not None and value == value}  # not NaN
        start = values.get("start_time")
        records.append(
            RunRecord(
                run_id=values["run_id"],
                name=str(values.get("tags.mlflow.runName", "")),
                status=str(values.get("status", "")),
                start_time=int(start.timestamp() * 1000) if hasattr(start, "timestamp") else int(start or 0),
                tags=_under(values, "tags."),
                metrics=_current_names(_under(values, "metrics.")),
                params=_under(values, "params."),
            )
        )
    return records


def _current_names(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics as read back, under today's MLflow names (runs logged before the renames carry the old ones)."""
    renamed = {new: metrics[old] for old, new in MLFLOW_METRIC_NAMES.items() if old in metrics and new not in metrics}
    return {key: value for key, value in metrics.items() if key not in MLFLOW_METRIC_NAMES} | renamed


def _under(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {key[len(prefix) :]: value for key, value in values.items() if key.startswith(prefix)}


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

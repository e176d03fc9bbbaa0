"""The team server under load, then under the same load with faults (issue #42).

One server as `make server auth=true` runs it (PostgreSQL, MLflow's basic-auth app, the artifact proxy), a writer
signed in through `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`, Optuna's studies in the same PostgreSQL.
Each phase runs, at the same time and against that server: a sweep of 12 orderings (every ordered pair of prune,
distill, inq, lowrank) x 2 seeds of tiny CIFAR-10 chains on 4 Ray workers, and a search with 2 Ray workers.

- `undisturbed`: nothing else happens.
- `faults`: MLflow's server restarted twice and PostgreSQL once while the load runs, and one Ray worker killed with
  SIGKILL mid-stage.

Each phase has its own experiment and stage cache. Counted from the server afterwards: the commands' exit codes and
error lines, runs by status, chains and trials against what was asked, duplicates (two FINISHED runs of one ordering
and seed, or of one stage of one chain), runs left RUNNING; the faults phase's sweep results compared with the
undisturbed phase's (validation and test top-1 and bytes per ordering and seed).

    .venv/bin/python bench/team_server_load.py --out /tmp/team-load.json     # about 40 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.server.mlflow_server import TeamServer  # noqa: E402
from pipeline.tracking.users import add_user  # noqa: E402
from tests.conftest import free_port, tiny_recipe  # noqa: E402

STAGES = {
    "prune": {"pruning_ratio": 0.3, "epochs": 1, "lr": 0.01},
    "distill": {"epochs": 1, "lr": 0.01},
    "inq": {"bits": 5, "accumulated_portions": [0.5, 1.0], "epochs": 1, "lr": 0.01},
    "lowrank": {"keep": 0.5, "epochs": 1, "lr": 0.01},
}
WRITER = "loadwriter"


def recipes(folder: Path, phase: str) -> tuple[Path, Path]:
    """The phase's sweep and search recipes; the search is named after the phase, so each phase has a study of its
    own in the shared Optuna database (the same name would resume the finished study and run nothing)."""
    # Every ordered pair but inq > lowrank (refused: low-rank factors cannot hold power-of-two weights), and one triple.
    orderings = [list(p) for p in itertools.permutations(STAGES, 2) if p != ("inq", "lowrank")]
    orderings.append(["prune", "distill", "inq"])
    sweep = tiny_recipe(name="load-sweep", stages=[{k: v} for k, v in STAGES.items()], orderings=orderings,
                        seeds=[0, 1], executor={"name": "ray", "cpus": 0.5})  # fmt: skip
    search = tiny_recipe(
        name=f"load-search-{phase}",
        stages=[{"prune": STAGES["prune"]}, {"distill": STAGES["distill"]}],
        search={"orderings": [["prune"], ["prune", "distill"]],
                "space": {"prune.pruning_ratio": {"choices": [0.3, 0.5]}},
                "objectives": {"val_top1": "max", "artifact_bytes": "min"}, "trials": 6, "workers": 2,
                "sampler": "random", "registry": False},
        executor={"name": "ray", "cpus": 0.5},
    )  # fmt: skip
    paths = folder / f"{phase}-sweep.yaml", folder / f"{phase}-search.yaml"
    for path, raw in zip(paths, (sweep, search), strict=True):
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return paths


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip


def stage_runs(client, experiment: str) -> int:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return 0
    return len(client.search_runs([found.experiment_id], "tags.run_type = 'stage'", max_results=5000))


def kill_one_ray_worker() -> str:
    """SIGKILL one Ray worker running a sweep's ordering (process title `ray::run_ordering`; Ray's own processes,
    `ray::DashboardAgent` and the like, are left alone: killing those takes the whole local instance down)."""
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        pid, _, title = line.strip().partition(" ")
        if title.startswith("ray::run_ordering"):
            os.kill(int(pid), signal.SIGKILL)
            return title
    return ""


def inject_faults(server: TeamServer, client, experiment: str, procs, log: list[str]) -> None:
    """Restart MLflow's server, PostgreSQL, MLflow's server again and kill a Ray worker, spaced by stage runs."""

    def wait_runs(n: int) -> bool:
        while stage_runs(client, experiment) < n:
            if all(p.poll() is not None for p in procs):
                return False
            time.sleep(1)
        return True

    steps = [
        (6, "mlflow server restarted", server.restart),
        (14, "ray worker killed", None),
        (22, "postgresql restarted", server.cluster.restart),
        (30, "mlflow server restarted", server.restart),
    ]
    for n, what, action in steps:
        if not wait_runs(n):
            log.append(f"not done (the load ended first): {what}")
            continue
        started = time.monotonic()
        if action is None:
            what = f"{what}: {kill_one_ray_worker() or 'none running'}"
        else:
            action()
        log.append(f"{what} after {n} stage runs ({time.monotonic() - started:.0f} s)")
        print(f"[faults] {log[-1]}", flush=True)


def count(client, experiment: str, asked_chains: int, asked_trials: int) -> dict:
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], "", max_results=5000)
    by_status: dict[str, int] = {}
    for run in runs:
        by_status[run.info.status] = by_status.get(run.info.status, 0) + 1
    finished = [r for r in runs if r.info.status == "FINISHED"]
    sweep_chains = [r for r in finished if r.data.tags.get("run_type") == "chain" and "sweep" in r.data.tags]
    trials = [r for r in finished if r.data.tags.get("run_type") == "chain" and "search" in r.data.tags]
    chain_keys = [(r.data.tags["ordering"], r.data.tags.get("seed")) for r in sweep_chains]
    stage_keys = [(r.data.tags.get("mlflow.parentRunId"), r.data.tags.get("stage_index"))
                  for r in finished if r.data.tags.get("run_type") == "stage"]  # fmt: skip
    results = {f"{r.data.tags['ordering']}@{r.data.tags.get('seed')}": [r.data.metrics.get(k) for k in
               ("val_top1", "top1", "artifact_bytes")] for r in sweep_chains}  # fmt: skip
    return {
        "runs_by_status": by_status,
        "sweep_chains_finished": len(sweep_chains), "sweep_chains_asked": asked_chains,
        "trials_finished": len({r.data.tags["trial"] for r in trials}), "trials_asked": asked_trials,
        "duplicate_chains": len(chain_keys) - len(set(chain_keys)),
        "duplicate_stage_runs": len(stage_keys) - len(set(stage_keys)),
        "running_left": by_status.get("RUNNING", 0),
        "running_runs": [f"{r.data.tags.get('run_type')} {r.info.run_name} seed {r.data.tags.get('seed')}"
                         for r in runs if r.info.status == "RUNNING"],  # fmt: skip
        "results": results,
    }  # fmt: skip


def phase(name: str, server: TeamServer, env: dict[str, str], folder: Path, faults: bool) -> dict:
    from mlflow.tracking import MlflowClient

    sweep, search = recipes(folder, name)
    env = dict(env, MLFLOW_EXPERIMENT_NAME=f"load-{name}", PIPELINE_CACHE_DIR=str(folder / f"cache-{name}"))
    started = time.monotonic()
    procs = [start(["sweep", str(sweep), "--quiet", "--no-report"], env, folder / f"{name}-sweep.log"),
             start(["search", str(search), "--quiet", "--no-report"], env, folder / f"{name}-search.log")]  # fmt: skip
    log: list[str] = []
    client = MlflowClient(server.url)
    if faults:
        injector = threading.Thread(target=inject_faults, args=(server, client, f"load-{name}", procs, log))
        injector.start()
    codes = [p.wait() for p in procs]
    if faults:
        injector.join()
    logs = [(folder / f"{name}-{k}.log").read_text() for k in ("sweep", "search")]
    errors = [line for text in logs for line in text.splitlines() if re.match(r"^(error|Traceback)", line)]
    retries = sum(text.count("unreachable") for text in logs)
    out = {"phase": name, "exit_codes": codes, "wall_s": round(time.monotonic() - started), "faults": log,
           "error_lines": errors, "retry_lines": retries}  # fmt: skip
    out |= count(client, f"load-{name}", asked_chains=24, asked_trials=6)
    print(json.dumps({k: v for k, v in out.items() if k != "results"}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("team-load.json"))
    parser.add_argument("--phases", default="undisturbed,faults")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pipeline-team-load-"))
    folder.chmod(0o755)
    server = TeamServer(folder / "server", port=free_port(), pg_port=free_port(), auth=True)
    try:
        server.start()
        password = "load-" + os.urandom(12).hex()
        admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": server.admin_password()}
        os.environ.update(admin)
        add_user(server.url, WRITER, password, "writer")
        env = dict(os.environ, MLFLOW_TRACKING_URI=server.url, MLFLOW_TRACKING_USERNAME=WRITER,
                   MLFLOW_TRACKING_PASSWORD=password, OPTUNA_STORAGE=server.cluster.url("optuna"),
                   PGPASSWORD=server.cluster.password(), PYTHONPATH=str(ROOT),
                   RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")  # fmt: skip
        results = [phase(name, server, env, folder, name == "faults") for name in args.phases.split(",")]
    finally:
        server.stop()
        server.cluster.stop()
    if len(results) == 2:
        same = results[0]["results"] == results[1]["results"]
        print(f"faults phase's sweep results equal to the undisturbed phase's: {same}")
        results.append({"results_equal": same})
    args.out.write_text(json.dumps(results, indent=1))
    print(f"written {args.out} (logs in {folder})")


if __name__ == "__main__":
    main()

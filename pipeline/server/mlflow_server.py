"""MLflow's tracking server for a team: its runs and (with `auth`) its users in PostgreSQL, its artifacts proxied by
the server itself (clients never need the artifact store's credentials), started, health-checked, stopped and
restarted as one process group.

Everything it writes lives under one folder (`server/` from `make server`): `postgres/` (the cluster, its log and its
role's password), `artifacts/`, `basic_auth.ini`, `admin-password` (the auth app's first admin, generated once unless
`MLFLOW_AUTH_ADMIN_PASSWORD` is set), `flask-secret-key` (the auth app's CSRF key) and
`mlflow-server.log`. Secrets files are mode 600; no secret is ever passed on
a command line (where `ps` would show it) or written into a URL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.server.postgres import Cluster, secret_file
from pipeline.tracking.faults import server_answers

ADMIN_USER = "admin"
# Who can do what once auth is on: every signed-in user reads every experiment and model (default_permission);
# writing into another user's experiment takes the `writer` role (`pipeline server-user add NAME --role writer`).
DEFAULT_PERMISSION = "READ"
AUTH_CACHE_S = 60


class ServerError(RuntimeError):
    """The server did not start or stop as asked; the message names its log."""


@dataclass
class TeamServer:
    """One tracking server. `db`: 'postgresql' (a cluster of the project's in `root/postgres`), 'sqlite' (one file,
    a single user's server) or a SQLAlchemy URL of a database someone else runs (its auth database: the same URL
    with `_auth` after the database name)."""

    root: Path
    host: str = "127.0.0.1"
    port: int = 5000
    db: str = "postgresql"
    auth: bool = False
    pg_port: int = 5433
    pg_host: str = "127.0.0.1"
    workers: int = 2

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self._process: subprocess.Popen | None = None

    @property
    def cluster(self) -> Cluster | None:
        return Cluster(self.root / "postgres", self.pg_port, self.pg_host) if self.db == "postgresql" else None

    @property
    def url(self) -> str:
        """Where this machine reaches it (loopback when it listens on every interface)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def public_url(self) -> str:
        """Where other machines reach it: this machine's name when it listens on every interface."""
        import socket

        return f"http://{socket.getfqdn()}:{self.port}" if self.host in ("0.0.0.0", "::") else self.url

    @property
    def log(self) -> Path:
        return self.root / "mlflow-server.log"

    def database_url(self, name: str = "mlflow") -> str:
        """Where MLflow keeps its runs (`mlflow`) or its users (`mlflow_auth`)."""
        if self.cluster is not None:
            return self.cluster.url(name)
        if self.db == "sqlite":
            return f"sqlite:///{self.root / ('mlflow.db' if name == 'mlflow' else 'basic_auth.db')}"
        from sqlalchemy.engine import make_url

        url = make_url(self.db).set(password=None)  # its password goes to the server as PGPASSWORD (env())
        if name != "mlflow":
            url = url.set(database=f"{url.database}_auth")
        return url.render_as_string(hide_password=False)

    def admin_password(self) -> str:
        return os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") or secret_file(self.root / "admin-password")

    def write_auth_config(self) -> Path:
        path = self.root / "basic_auth.ini"
        path.touch(mode=0o600)
        path.chmod(0o600)  # a file from before may have been readable by others
        path.write_text(
            "[mlflow]\n"
            f"default_permission = {DEFAULT_PERMISSION}\n"
            f"database_uri = {self.database_url('mlflow_auth')}\n"
            f"admin_username = {os.environ.get('MLFLOW_AUTH_ADMIN_USERNAME', ADMIN_USER)}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # A checked password is remembered for a minute per server worker: without it every request of a
            # sweep pays a PBKDF2 hash. A password changed or a user deleted takes up to that long to apply.
            f"auth_cache_ttl_seconds = {AUTH_CACHE_S}\n"
        )
        return path

    def command(self) -> list[str]:
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        command = [
            mlflow, "server", "--backend-store-uri", self.database_url(), "--serve-artifacts",
            "--artifacts-destination", (self.root / "artifacts").as_uri(),
            "--host", self.host, "--port", str(self.port), "--workers", str(self.workers),
        ]  # fmt: skip
        if self.host in ("0.0.0.0", "::"):  # serving a team: MLflow's DNS-rebinding guard would refuse other hosts
            command += ["--allowed-hosts", "*"]
        return command + (["--app-name", "basic-auth"] if self.auth else [])

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.cluster is not None:
            env.update(self.cluster.client_env())
        elif self.db != "sqlite":
            from sqlalchemy.engine import make_url

            if make_url(self.db).password:  # never on the command line, where `ps` shows it
                env["PGPASSWORD"] = str(make_url(self.db).password)
        if self.auth:
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.write_auth_config())
            env["MLFLOW_AUTH_ADMIN_PASSWORD"] = self.admin_password()
            # Flask's CSRF key: one per server folder, kept across restarts (a browser's session survives them).
            env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secret_file(self.root / "flask-secret-key"))
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # a client's, not the server's
            env.pop(name, None)
        return env

    def start(self, timeout: float = 120) -> None:
        """Start the database (if ours) and the server, and wait until it answers /health."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "artifacts").mkdir(exist_ok=True)
        (self.root / "artifacts").chmod(0o700)  # read through the server, signed in
        if self.healthy():
            raise ServerError(f"something already answers on {self.url}: stop it, or choose another port")
        if self.cluster is not None:
            self.cluster.start()
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                self.command(), env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while self._process.poll() is not None or not self.healthy():
            if self._process.poll() is not None:
                raise ServerError(f"mlflow server exited with {self._process.returncode}: see {self.log}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"mlflow server did not answer {self.url}/health in {timeout:.0f} s: see {self.log}")
            time.sleep(0.5)

    def healthy(self) -> bool:
        return server_answers(self.url, timeout=2)

    def stop(self, timeout: float = 30) -> None:
        """Stop the server (its whole process group: the workers too); the database keeps running."""
        if self._process is None or self._process.poll() is not None:
            return
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def wait(self) -> int:
        """Block until the server exits (the foreground `pipeline server`); Ctrl-C stops it."""
        assert self._process is not None, "start() first"
        try:
            return self._process.wait()
        except KeyboardInterrupt:
            self.stop()
            return 0

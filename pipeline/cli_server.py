"""`python -m pipeline server`: the team's tracking server (`make server`): PostgreSQL for MLflow's runs, its users and
Optuna's studies, MLflow's server with its artifact proxy and, with `--auth`, its basic-auth app. In the foreground;
Ctrl-C stops MLflow's server, `server stop` the database. `server add-user NAME --role writer|reader` adds a user
(the password is asked for, or read from stdin when it is not a terminal)."""

from __future__ import annotations

import getpass
import os
import signal
import sys
from pathlib import Path

from pipeline.core.paths import PROJECT_ROOT


def add_command(sub) -> None:
    cmd = sub.add_parser("server", help="the team's MLflow server on PostgreSQL (start | stop | add-user NAME)")
    cmd.add_argument("action", nargs="?", default="start", choices=["start", "stop", "add-user"])
    cmd.add_argument("username", nargs="?", help="add-user: the new user's name")
    cmd.add_argument("--db", default="postgresql", help="postgresql (default: a cluster in --root), sqlite, or a URL")
    cmd.add_argument("--auth", action="store_true", help="MLflow's basic-auth app: users, roles, 401 without them")
    cmd.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines (put TLS in front)")
    cmd.add_argument("--port", type=int, default=5000)
    cmd.add_argument("--pg-host", default="127.0.0.1", help="where PostgreSQL listens (Optuna's clients connect)")
    cmd.add_argument("--pg-port", type=int, default=5433, help="not 5432: a distribution's own cluster often holds it")
    cmd.add_argument("--root", type=Path, default=PROJECT_ROOT / "server", help="the server's folder")
    cmd.add_argument("--role", default="writer", choices=["writer", "reader"], help="add-user: what they may do")
    cmd.add_argument("--url", help="add-user: the server (default $MLFLOW_TRACKING_URI if http(s), else --host/--port)")


def _server(args):
    from pipeline.server.mlflow_server import TeamServer

    return TeamServer(args.root, args.host, args.port, args.db, args.auth, args.pg_port, args.pg_host)


def _client_lines(server) -> list[str]:
    import socket

    lines = [f"export MLFLOW_TRACKING_URI={server.public_url}"]
    if server.cluster is not None:
        everywhere = server.pg_host in ("0.0.0.0", "*", "::")
        storage = server.cluster.url("optuna", client_host=socket.getfqdn() if everywhere else None)
        lines += [
            f"export OPTUNA_STORAGE={storage}",
            f'export PGPASSWORD="$(cat {server.cluster.password_file})"   # Optuna\'s database role',
        ]
    if server.auth:
        lines += [
            "export MLFLOW_TRACKING_USERNAME=NAME MLFLOW_TRACKING_PASSWORD=...   # a user of `make server-user`",
        ]
    return lines


def _stop_on_signals() -> None:
    """Ctrl-C, a service manager's SIGTERM and a closed terminal's SIGHUP stop the server (MLflow's runs in a session
    of its own, so it would outlive us): SIGINT's handler is set explicitly, since a process started in the
    background by a script (or a test runner) inherits it ignored."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal closed
        signal.signal(signum, interrupt)


def _start(args) -> int:
    _stop_on_signals()
    server = _server(args)
    print(f"starting {'PostgreSQL and ' if server.cluster else ''}MLflow's server in {server.root} ...", flush=True)
    try:
        server.start()
    except KeyboardInterrupt:  # Ctrl-C while it starts: leave nothing running but the database
        server.stop()
        return 130
    print(f"MLflow server: {server.url}  (log: {server.log})")
    if server.auth:
        from_env = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
        source = "$MLFLOW_AUTH_ADMIN_PASSWORD" if from_env else server.root / "admin-password"
        print(f"authentication on: admin's password in {source}; add users with `make server-user name=NAME`")
    print("clients (sweeps, searches, the UI):\n  " + "\n  ".join(_client_lines(server)))
    print("Ctrl-C stops the MLflow server; `make server-stop` stops PostgreSQL", flush=True)
    return server.wait()


def _stop(args) -> int:
    server = _server(args)
    if server.cluster is None or not server.cluster.running():
        print("no PostgreSQL cluster of the project's is running")
        return 0
    server.cluster.stop()
    print(f"stopped PostgreSQL ({server.cluster.data})")
    return 0


def _new_password(username: str) -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(f"password for {username}: ")
    if first != getpass.getpass("again: "):
        raise ValueError("the two passwords differ")
    return first


def _add_user(args) -> int:
    from pipeline.tracking.users import add_user

    if not args.username:
        raise ValueError("add-user needs a NAME: `python -m pipeline server add-user NAME --role writer`")
    server = _server(args)
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    url = args.url or (tracking if tracking.startswith(("http://", "https://")) else server.url)
    if not os.environ.get("MLFLOW_TRACKING_USERNAME"):  # on the server's machine: sign in as its admin
        if not (os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") or (server.root / "admin-password").exists()):
            raise ValueError(
                f"no admin password in $MLFLOW_AUTH_ADMIN_PASSWORD or {server.root / 'admin-password'}: sign in as an "
                "admin with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            )
        os.environ["MLFLOW_TRACKING_USERNAME"] = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
        os.environ["MLFLOW_TRACKING_PASSWORD"] = server.admin_password()
    password = _new_password(args.username)
    if len(password) < 12:
        raise ValueError("a password of at least 12 characters, please")
    from mlflow.exceptions import MlflowException

    try:
        add_user(url, args.username, password, args.role)
    except MlflowException as err:  # 401 (not an admin), the server away, ...
        raise ValueError(f"{url} refused to add {args.username}: {err.message}") from err
    print(f"{args.username}: a {args.role} on {url}")
    return 0


def run(args) -> int:
    from pipeline.cli_exits import guarded
    from pipeline.server.mlflow_server import ServerError
    from pipeline.server.postgres import PostgresUnavailable

    action = {"start": _start, "stop": _stop, "add-user": _add_user}[args.action]
    return guarded(lambda: action(args), invalid=(PostgresUnavailable, ServerError, ValueError))

"""`python -m pipeline server` as `make server auth=true`, `make server-user` and `make server-stop` run it: the
server comes up on PostgreSQL and prints what clients export (no password in it), a user is added with a password
from stdin, Ctrl-C stops MLflow's server, `stop` stops PostgreSQL."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import PROJECT_ROOT, free_port, require_postgres, run_cli, server_folder

pytestmark = pytest.mark.slow


def test_server_start_add_user_and_stop_through_the_cli(isolated):
    require_postgres()
    root = server_folder("pipeline-cli-server-")
    port, pg_port = free_port(), free_port()
    where = ["--root", str(root), "--port", str(port), "--pg-port", str(pg_port)]
    env = {k: v for k, v in isolated.items() if not k.startswith(("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASS"))}
    with open(root / "out.txt", "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "pipeline", "server", "start", "--auth", *where], env=env,
                                  cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C stops" not in (root / "out.txt").read_text():
            assert server.poll() is None, (root / "out.txt").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.5)
        printed = (root / "out.txt").read_text()
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" in printed
        assert f"export OPTUNA_STORAGE=postgresql+psycopg://pipeline@127.0.0.1:{pg_port}/optuna" in printed
        for secret in ("admin-password", "postgres/password"):
            assert (root / secret).read_text().strip() not in printed  # where the secrets are, never what
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            assert response.status == 200

        added = run_cli(["server", "add-user", "carol", "--role", "reader", *where], env, input="carol-password-1\n")
        assert added.returncode == 0, added.stderr[-2000:]
        assert f"carol: a reader on http://127.0.0.1:{port}" in added.stdout
        short = run_cli(["server", "add-user", "dave", *where], env, input="short\n")
        assert short.returncode == 2 and "at least 12 characters" in short.stderr
        server.send_signal(signal.SIGINT)  # Ctrl-C
        assert server.wait(timeout=120) == 0, (root / "out.txt").read_text()[-3000:]
        stopped = run_cli(["server", "stop", *where], env)
        assert stopped.returncode == 0 and "stopped PostgreSQL" in stopped.stdout
    finally:
        if server.poll() is None:
            server.kill()
        run_cli(["server", "stop", *where], env)
        shutil.rmtree(root, ignore_errors=True)

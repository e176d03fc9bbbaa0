"""The project's PostgreSQL cluster: initialised in a folder of its own, password authentication over TCP, the
password in a file only its owner reads and never in a URL, restarted and stopped."""

from __future__ import annotations

import pytest

from pipeline.server.postgres import DATABASES


def test_a_cluster_starts_with_its_databases_and_a_password_no_url_carries(pg_cluster):
    cluster = pg_cluster
    import psycopg

    cluster.start()
    assert cluster.running()
    assert cluster.password_file.stat().st_mode & 0o077 == 0  # only its owner reads it
    password = cluster.password()
    assert len(password) >= 24 and password not in cluster.url("optuna")
    assert cluster.url("optuna") == f"postgresql+psycopg://pipeline@127.0.0.1:{cluster.port}/optuna"
    with cluster.connect() as conn:
        present = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert set(DATABASES) <= present
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host="127.0.0.1", port=cluster.port, user="pipeline", dbname="optuna", password="wrong")


def test_a_restart_keeps_the_data_and_a_stopped_cluster_refuses_connections(pg_cluster):
    cluster = pg_cluster
    import psycopg

    cluster.start()
    with cluster.connect("optuna") as conn:
        conn.execute("CREATE TABLE kept (n int)")
        conn.execute("INSERT INTO kept VALUES (7)")
    cluster.restart()
    with cluster.connect("optuna") as conn:
        assert conn.execute("SELECT n FROM kept").fetchone() == (7,)
    cluster.stop()
    assert not cluster.running()
    with pytest.raises(psycopg.OperationalError):
        cluster.connect("optuna")
    cluster.start()  # started again from its folder: no second initdb, the same password
    with cluster.connect("optuna") as conn:
        assert conn.execute("SELECT n FROM kept").fetchone() == (7,)

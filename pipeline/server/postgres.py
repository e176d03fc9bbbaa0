"""A PostgreSQL cluster the project owns: `initdb` into a folder on first use, `pg_ctl` to start, stop and restart it,
one database per client (MLflow's runs, MLflow's users, Optuna's studies), password authentication over TCP only.

Debian's `postgresql` package provides the binaries (`make server` installs it where apt can). PostgreSQL refuses to
run as root: as root, the cluster runs as the `postgres` system user the package creates, and its folder is owned by
that user. The password of the cluster's role is generated once, kept in a file only its owner can read, and handed
to clients through libpq's own `PGPASSWORD` / `PGPASSFILE`, never inside a URL that could be logged."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROLE = "pipeline"  # the cluster's one role (its superuser): MLflow, its auth app and Optuna connect as it
DATABASES = ("mlflow", "mlflow_auth", "optuna")
SERVICE_USER = "postgres"  # Debian's package creates it; the cluster runs as it when we are root


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's binaries are missing or the cluster cannot start; the message says what to do."""


def bindir() -> Path:
    """The folder of `initdb` and `pg_ctl`: $PG_BINDIR, else Debian's newest /usr/lib/postgresql/N/bin, else PATH."""
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise PostgresUnavailable(
        "PostgreSQL's server binaries (initdb, pg_ctl) were not found: install Debian's `postgresql` package "
        "(`make server` does where apt-get works), or set PG_BINDIR to the folder that holds them"
    )


def _as_service_user() -> list[str]:
    """The prefix that runs a command as the cluster's owner: nothing, or `runuser -u postgres --` for root."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("runuser"):
        raise PostgresUnavailable("running as root needs `runuser` to start PostgreSQL as the postgres user")
    return ["runuser", "-u", SERVICE_USER, "--"]


def secret_file(path: Path, nbytes: int = 18) -> str:
    """The secret in `path`, generated on first use into a file only its owner reads (mode 600)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(nbytes) + "\n")
    return path.read_text().strip()


def _chown_to_service_user(path: Path) -> None:
    if os.geteuid() != 0:
        return
    import pwd

    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root, PostgreSQL needs the `{SERVICE_USER}` system user (Debian's package creates it)"
        ) from None
    shutil.chown(path, SERVICE_USER, SERVICE_USER)


@dataclass(frozen=True)
class Cluster:
    """One cluster: its data in `root/data`, its log in `root/postgres.log`, its role's password in
    `root/password` (mode 600), listening on `host:port`."""

    root: Path
    port: int = 5433  # not 5432: a distribution's own cluster often holds it
    host: str = "127.0.0.1"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    @property
    def password_file(self) -> Path:
        return self.root / "password"

    def password(self) -> str:
        return self.password_file.read_text().strip()

    def url(self, database: str, *, client_host: str | None = None) -> str:
        """A SQLAlchemy URL for `database`, without the password (libpq reads it from `client_env()`)."""
        host = client_host or ("127.0.0.1" if self.host in ("0.0.0.0", "*") else self.host)
        return f"postgresql+psycopg://{ROLE}@{host}:{self.port}/{database}"

    def client_env(self) -> dict[str, str]:
        """What a client process needs to connect: the password through libpq's own variable."""
        return {"PGPASSWORD": self.password()}

    def _pg(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [*_as_service_user(), str(bindir() / args[0]), *args[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise PostgresUnavailable(
                f"{args[0]} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-800:]}"
                f" (server log: {self.log})"
            )
        return done

    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def init(self) -> None:
        """initdb on first use: role `pipeline` with a generated password, scram-sha-256 over TCP, no local socket."""
        if self.initialised():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        secret_file(self.password_file, nbytes=24)
        if os.geteuid() == 0 and subprocess.run([*_as_service_user(), "test", "-x", str(self.root)]).returncode != 0:
            raise PostgresUnavailable(
                f"the {SERVICE_USER} user cannot reach {self.root}: as root, the cluster runs as {SERVICE_USER}, so "
                "every folder above it must be searchable by others (chmod o+x), or choose a folder that is"
            )
        pwfile = self.root / ".initdb-password"
        pwfile.touch(mode=0o600)  # readable by its owner only, before the password goes in
        for path in (self.root, pwfile):
            _chown_to_service_user(path)
        pwfile.write_text(self.password() + "\n")
        try:
            self._pg(
                "initdb", "-D", str(self.data), "-U", ROLE, f"--pwfile={pwfile}", "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256", "-E", "UTF8", "--no-instructions",
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)

    def _allow_remote_clients(self) -> None:
        """Listening beyond loopback (Optuna clients on other machines): password logins from any address.
        initdb's rules cover 127.0.0.1 and ::1 only."""
        if self.host in ("127.0.0.1", "localhost", "::1"):
            return
        hba = self.data / "pg_hba.conf"
        rule = f"host all {ROLE} all scram-sha-256"
        if rule not in hba.read_text():
            with open(hba, "a") as f:
                f.write(f"# compress-pipeline: the team's clients, by password\n{rule}\n")
            if self.running():
                self._pg("pg_ctl", "reload", "-D", str(self.data))

    def running(self) -> bool:
        if not self.initialised():
            return False
        cmd = [*_as_service_user(), str(bindir() / "pg_ctl"), "status", "-D", str(self.data)]
        return subprocess.run(cmd, capture_output=True).returncode == 0

    def start(self) -> None:
        """Start (initialising first if needed) and wait until it accepts connections; create the databases."""
        self.init()
        self._allow_remote_clients()
        if not self.running():
            options = f"-p {self.port} -c listen_addresses={self.host} -c unix_socket_directories=''"
            self._pg("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60")
        self._wait_ready()
        self.create_databases()

    def stop(self, mode: str = "fast") -> None:
        if self.running():
            self._pg("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60")

    def restart(self) -> None:
        self.stop()
        self.start()

    def connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(
            host=self.url(database).split("@")[1].split(":")[0], port=self.port, user=ROLE, dbname=database,
            password=self.password(), autocommit=True, connect_timeout=5,
        )  # fmt: skip

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.connect():
                    return
            except Exception as err:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(
                        f"PostgreSQL did not accept connections: {err} (log: {self.log})"
                    ) from err
                time.sleep(0.3)

    def create_databases(self, names: tuple[str, ...] = DATABASES) -> None:
        with self.connect() as conn:
            present = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
            for name in names:
                if name not in present:
                    conn.execute(f'CREATE DATABASE "{name}"')

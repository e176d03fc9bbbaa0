"""Shared fixtures: a tiny synthetic dataset, a tiny real-data recipe, isolated MLflow and cache folders."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from pipeline.core.data import DataBundle, DataConfig, Preprocessing, Split, default_data_root

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# `make test` runs the suite in several pytest-xdist workers (one per core, at most 4): each keeps to one core, in
# torch's own thread pool and in the processes its tests start (the runner sizes its pool from OMP_NUM_THREADS),
# so the workers do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
TINY_MODEL = "test_resnet"  # timm's own ~0.4M-parameter test ResNet


def synthetic_bundle(
    n_train: int = 64, n_test: int = 32, classes: int = 4, size: int = 16, seed: int = 0, n_val: int = 16
):
    """Random uint8 images whose class is encoded in the mean brightness, so a model can learn it; in memory."""
    gen = torch.Generator().manual_seed(seed)

    def split(n):
        labels = torch.arange(n) % classes
        base = (labels.float() * (200 / max(classes - 1, 1)) + 20).view(-1, 1, 1, 1)
        noise = torch.randint(-15, 16, (n, 3, size, size), generator=gen).float()
        return Split((base + noise).clamp(0, 255).to(torch.uint8), labels)

    pre = Preprocessing((3, size, size), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), origin="synthetic")
    val = split(n_val) if n_val else None
    return DataBundle(split(n_train), val, split(n_test), [f"c{i}" for i in range(classes)], pre)


def stage_context(
    bundle,
    *,
    name: str = TINY_MODEL,
    kwargs=None,
    baseline=None,
    batch_size: int = 16,
    augment: bool = True,
    on_epoch_end=None,
):
    """A StageContext on in-memory data and the CPU, for calling stages directly."""
    from pipeline.core.models import ModelConfig
    from stages import StageContext

    return StageContext(
        data=bundle,
        data_config=DataConfig(batch_size=batch_size, augment=augment),
        model_config=ModelConfig(name=name, kwargs=kwargs or {}),
        device=torch.device("cpu"),
        seed=0,
        baseline=lambda: baseline,
        progress=False,
        on_epoch_end=on_epoch_end,
    )


def trained_state(bundle, **config):
    """The test ResNet trained on `bundle` by the train stage, seeded, with `config` (e.g. epochs=2, lr=0.05)."""
    from stages import get_stage

    torch.manual_seed(0)
    train = get_stage("train")
    return train.run(None, train.config(**config), stage_context(bundle)).state


@pytest.fixture
def tiny_bundle():
    return synthetic_bundle()


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    """A small ImageFolder tree with train/ and test/, 3 classes of 12x12 PNGs."""
    root = tmp_path / "folder"
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("test", 3)):
        for c, name in enumerate(("ant", "bee", "cow")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (12, 12, 3), generator=gen, dtype=torch.uint8).numpy()
                pixels[..., 0] = 80 * c
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def make_photos(root: Path, splits: dict[str, int], *, classes=("ant", "bee", "cow"), size=(48, 36), seed: int = 0):
    """An ImageFolder tree of non-square JPEGs (`size` = width x height), `splits` = {folder: images per class};
    each class has its own colour, plus noise, so a model can learn it."""
    gen = torch.Generator().manual_seed(seed)
    for split, count in splits.items():
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = torch.randint(0, 60, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
                pixels[..., c % 3] += 150
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A small photo-like ImageFolder with train/ and val/ (ImageNet's layout), non-square JPEGs."""
    return make_photos(tmp_path / "photos", {"train": 10, "val": 4})


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    root = default_data_root() / "cifar10"
    if not (root / "train").is_dir():
        pytest.fail(f"CIFAR-10 ImageFolder tree not found at {root} (see ../shared/data/README.md)")
    return root


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch) -> dict[str, str]:
    """Environment for a CLI run whose MLflow store and cache live in tmp_path."""
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env["PIPELINE_CACHE_DIR"] = str(tmp_path / "cache")
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("PIPELINE_CACHE_DIR", env["PIPELINE_CACHE_DIR"])
    return env


def tiny_recipe(**overrides) -> dict:
    """A real CIFAR-10 recipe small enough to run in seconds: a few hundred images, timm's test ResNet."""
    recipe = {
        "name": "tiny",
        "seed": 0,
        "data": {"dataset": "cifar10", "batch_size": 32, "train_subset": 320, "val_subset": 100, "test_subset": 100},
        "model": {"name": TINY_MODEL},
        "baseline": {"epochs": 2, "lr": 0.05},
        "stages": [{"prune": {"pruning_ratio": 0.3, "epochs": 1, "lr": 0.01}}],
        "evaluation": {"latency_runs": 5, "warmup_runs": 2, "throughput_runs": 2, "throughput_batch_size": 8},
        # Export and runtime evaluation have their own tests (tests/pipeline/test_deploy.py); elsewhere torch only.
        "deploy": {"runtimes": []},
        # Sweeps add an equal-training control chain by default; tests that count a sweep's runs opt out, and the
        # control's own test (tests/pipeline/test_sweep.py) turns it on.
        "control": False,
    }
    for key, value in overrides.items():
        recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(args: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


@contextmanager
def mlflow_process(command: str, *args: str) -> Iterator[str]:
    """`mlflow ui` or `mlflow server` on a free 127.0.0.1 port, up (its /health answers) until the block ends;
    yields its base URL."""
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow_cli), command, "--host", "127.0.0.1", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, f"mlflow {command} did not come up in 120 s"
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=15000",
]  # fmt: skip


def rendered_dom(page: Path | str, profile: Path) -> str:
    """The DOM of a local HTML page (or of a URL, e.g. a page of `mlflow ui`) after headless Chromium ran its scripts
    (`make test` installs Chromium)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("Chromium not found: `make test` installs it (Debian packages chromium, chromium-driver)")
    address = page.as_uri() if isinstance(page, Path) else page
    command = [found, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", address]
    return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped, with the reason, where torch sees no CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TeamServerForTests:
    """The team server as `make server auth=true` runs it (PostgreSQL, MLflow's basic-auth app, the artifact proxy),
    with a writer and a reader; `client_env()` is what a team member's shell exports."""

    server: object  # pipeline.server.mlflow_server.TeamServer
    users: dict[str, str]  # name -> password

    WRITER, READER = "alice", "bob"

    @property
    def url(self) -> str:
        return self.server.url

    def client_env(self, base: dict[str, str], user: str = WRITER) -> dict[str, str]:
        cluster = self.server.cluster
        return dict(
            base, MLFLOW_TRACKING_URI=self.url, MLFLOW_TRACKING_USERNAME=user,
            MLFLOW_TRACKING_PASSWORD=self.users[user], OPTUNA_STORAGE=cluster.url("optuna"),
            PGPASSWORD=cluster.password(),
        )  # fmt: skip

    def admin_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": self.server.admin_password()}

    def secrets(self) -> list[str]:
        """Every password the server and its users hold: none may appear in a run, a log or an artifact."""
        return [*self.users.values(), self.server.admin_password(), self.server.cluster.password()]


def require_postgres() -> None:
    """Skip, with the reason, where PostgreSQL's server binaries are missing (`make test` installs them)."""
    from pipeline.server.postgres import PostgresUnavailable, bindir

    try:
        bindir()
    except PostgresUnavailable as err:
        pytest.skip(str(err))


def server_folder(prefix: str) -> Path:
    """A fresh folder the postgres user can reach (as root, a cluster runs as that user; pytest's tmp_path is not
    reachable by other users)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


@pytest.fixture
def pg_cluster() -> Iterator:
    """A PostgreSQL cluster of the project's on a free loopback port, not started yet; stopped and removed after."""
    from pipeline.server.postgres import Cluster

    require_postgres()
    root = server_folder("pipeline-pg-")
    cluster = Cluster(root / "pg", port=free_port())
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def team_server() -> Iterator[TeamServerForTests]:
    """A PostgreSQL cluster and an authenticated MLflow server on free loopback ports, in a fresh folder; skipped only
    where PostgreSQL's binaries are missing (`make test` installs them)."""
    from pipeline.server.mlflow_server import TeamServer
    from pipeline.tracking.users import add_user

    require_postgres()
    root = server_folder("pipeline-team-server-")
    server = TeamServer(root, port=free_port(), pg_port=free_port(), auth=True)
    users = {
        TeamServerForTests.WRITER: "alice-" + os.urandom(9).hex(),
        TeamServerForTests.READER: "bob-" + os.urandom(9).hex(),
    }
    try:
        server.start()  # inside: a start that fails half-way still stops what it started
        with _environ(TeamServerForTests(server, users).admin_env()):
            for name, role in ((TeamServerForTests.WRITER, "writer"), (TeamServerForTests.READER, "reader")):
                add_user(server.url, name, users[name], role)
        yield TeamServerForTests(server, users)
    finally:
        server.stop()
        server.cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

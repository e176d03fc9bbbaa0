"""`python -m pipeline sensitivity`: from a recipe to a ranked table, report files and an MLflow run; bad requests
refused with exit 2 before anything trains."""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import main
from pipeline.tracking import Tracker
from tests.conftest import run_cli, tiny_recipe, write_recipe


def _recipe(tmp_path: Path) -> Path:
    recipe = tiny_recipe(stages=[{"prune": {"pruning_ratio": 0.3, "epochs": 1, "lr": 0.01}}])
    recipe["baseline"] = {"epochs": 1, "lr": 0.05}
    return write_recipe(tmp_path / "tiny.yaml", recipe)


def test_sensitivity_of_the_model_entering_a_stage(tmp_path, isolated):
    path, reports = _recipe(tmp_path), tmp_path / "reports"
    args = ["sensitivity", str(path), "--stage", "prune", "--layers", "layer4.*", "fc", "--techniques", "int8",
            "inq", "--inq-bits", "4", "--reports-dir", str(reports), "--quiet"]  # fmt: skip
    result = run_cli(args, isolated)
    assert result.returncode == 0, result.stderr
    assert "running the chain up to it first" in result.stderr  # the baseline was not cached yet
    assert "evaluations of 100 validation images" in result.stderr
    assert "sensitivity of tiny (the model entering prune)" in result.stdout
    assert "ORT %" in result.stdout  # each layer's share of the batch-1 ONNX Runtime forward
    out = reports / "sensitivity-tiny-prune"
    assert {p.name for p in out.iterdir()} == {"sensitivity.csv", "sensitivity.png", "sensitivity.html",
                                              "sensitivity.txt"}  # fmt: skip
    rows = (out / "sensitivity.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 2  # layer4's three convs and fc, two settings each
    # this store explicitly: another test in the same process may have pointed mlflow's global URI elsewhere
    runs = Tracker(isolated["MLFLOW_TRACKING_URI"]).find_runs("tags.run_type = 'sensitivity'")
    assert len(runs) == 1 and runs[0].data.metrics["evaluations"] == 8
    again = run_cli([*args, "--no-latency"], isolated)
    assert again.returncode == 0 and "8 evaluations (0 run now, the rest cached)" in again.stdout
    assert "ORT %" not in again.stdout


def test_bad_requests_exit_2_before_training(tmp_path, isolated, capsys):
    path = _recipe(tmp_path)
    for extra, message in (
        (["--stage", "qat"], "--stage 'qat' is not in recipe 'tiny'; its stages: prune"),
        (["--prune-ratios", "1.5"], "--prune-ratios: Value error, pruning ratios must lie strictly between 0 and 1"),
        (["--techniques", "fp4"], "no sensitivity probe for 'fp4'"),
    ):
        assert main(["sensitivity", str(path), *extra]) == 2  # in this process: no interpreter start per case
        assert message in capsys.readouterr().err, extra
    assert not (Path(isolated["PIPELINE_CACHE_DIR"]) / "stages").exists()  # nothing trained

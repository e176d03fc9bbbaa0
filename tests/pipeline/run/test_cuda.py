"""The GPU path: every stage trains on CUDA with AMP, a chain runs with `device: cuda`, torchrun uses NCCL.

Marked `cuda`: skipped on machines without a GPU (the suite's usual machines). `bench/gpu_check.py` runs the same
stages on a GPU at 32 and 224 px and prints their speed.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from pipeline.core.artifacts import load_artifact, save_artifact
from pipeline.core.data import DataConfig
from pipeline.core.models import ModelConfig
from stages import StageContext, available_stages, get_stage
from tests.conftest import PROJECT_ROOT, TINY_MODEL, run_cli, synthetic_bundle, tiny_recipe, write_recipe

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def _context(bundle, baseline=None) -> StageContext:
    return StageContext(data=bundle, data_config=DataConfig(batch_size=32), model_config=ModelConfig(name=TINY_MODEL),
                        device=CUDA, seed=0, baseline=lambda: baseline, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def bundle():
    return synthetic_bundle(n_train=256, size=32)


@pytest.fixture(scope="module")
def baseline(bundle):
    torch.manual_seed(0)
    return get_stage("train").run(None, get_stage("train").config(epochs=2, lr=0.05), _context(bundle)).state


@pytest.mark.parametrize("precision", ["auto", "fp16", "fp32"])
@pytest.mark.parametrize("name", available_stages())
def test_every_stage_trains_on_the_gpu(name, precision, bundle, baseline, tmp_path):
    stage = get_stage(name)
    config = stage.config.model_validate({} if stage.fake_quant else {"precision": precision})
    out = stage.run(copy.deepcopy(baseline), config, _context(bundle, baseline))
    assert out.report is None or out.report.numerics
    if out.report is not None and not stage.fake_quant and precision != "fp32":
        assert out.report.numerics[0].startswith(("bf16", "fp16"))
    out.state.model.to("cpu").eval()
    save_artifact(out.state, tmp_path / "artifact.pt")
    model = load_artifact(tmp_path / "artifact.pt")  # what ships: on the CPU, int8 after qat
    with torch.inference_mode():
        assert torch.isfinite(model(torch.randn(2, *bundle.input_size))).all()


def test_fixed_weights_live_on_the_gpu_and_stay_exact(bundle, baseline):
    """INQ's frozen powers of two stay exact under AMP; their masks are copied to the GPU once, not every step."""
    out = get_stage("inq").run(copy.deepcopy(baseline), get_stage("inq").config(bits=5, epochs=1), _context(bundle))
    fixed = out.state.fixed
    assert any(d.type == "cuda" for d in fixed._on_device)
    for name in fixed.names():
        weight = out.state.model.get_parameter(name).detach()
        assert torch.equal(weight[fixed.mask(name).to(weight.device)], fixed.values(name).to(weight.device)[
            fixed.mask(name).to(weight.device)])  # fmt: skip


def test_a_chain_runs_with_device_cuda(tmp_path, isolated, cifar_root):
    path = write_recipe(tmp_path / "gpu.yaml", tiny_recipe(device="cuda"))
    result = run_cli(["run", str(path)], isolated)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training in bf16" in result.stderr or "training in fp16" in result.stderr


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_torchrun_on_two_gpus_uses_nccl_and_sync_batchnorm(tmp_path, isolated, cifar_root):
    path = write_recipe(tmp_path / "ddp.yaml", tiny_recipe(device="cuda", distributed={"sync_batchnorm": True}))
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "pipeline", "run", str(path), "--quiet"], env=isolated, cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("recipe tiny (prune)") == 1

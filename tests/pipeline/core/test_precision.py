"""What `precision: auto` and `channels_last: auto` resolve to, and the CPU bf16 convolution bug auto steers around."""

from __future__ import annotations

import pytest
import timm
import torch

from pipeline.core.precision import CPU_BF16_CONV_BUG, cpu_autocast_hazards, resolve_numerics
from pipeline.core.training import TrainConfig

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with native bf16 (AVX512_BF16), whatever this machine has."""
    monkeypatch.setattr("torch.cpu._is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr("torch.cpu._is_amx_tile_supported", lambda: False)


@pytest.fixture
def avx2_cpu(monkeypatch):
    monkeypatch.setattr("torch.cpu._is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr("torch.cpu._is_amx_tile_supported", lambda: False)


def test_auto_is_bf16_and_channels_last_on_a_cpu_with_native_bf16(bf16_cpu):
    numerics = resolve_numerics("auto", "auto", CPU)
    assert (numerics.precision, numerics.channels_last) == ("bf16", True)
    assert "AVX512_BF16" in numerics.describe() and numerics.dtype == torch.bfloat16


def test_auto_is_plain_fp32_on_a_cpu_without_it(avx2_cpu):
    numerics = resolve_numerics("auto", "auto", CPU)
    assert (numerics.precision, numerics.channels_last, numerics.dtype) == ("fp32", False, None)
    assert "no AVX512_BF16" in numerics.why


def test_auto_is_bf16_on_cuda_with_bf16_and_fp16_without(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda: True)
    assert resolve_numerics("auto", "auto", CUDA).precision == "bf16"
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda: False)
    assert resolve_numerics("auto", "auto", CUDA).precision == "fp16"  # with a gradient scaler (test_training)


def test_explicit_settings_are_kept(avx2_cpu):
    assert resolve_numerics("bf16", True, CPU).precision == "bf16"  # slow without native bf16, but asked for
    assert resolve_numerics("fp32", True, CPU).channels_last


def test_a_fake_quantized_model_trains_in_fp32(bf16_cpu):
    numerics = resolve_numerics("auto", "auto", CPU, fp32_only=True)
    assert (numerics.precision, numerics.channels_last) == ("fp32", False) and "fake quantization" in numerics.why
    with pytest.raises(ValueError, match="fake-quantized"):
        resolve_numerics("bf16", "auto", CPU, fp32_only=True)


def test_the_cpu_bf16_convolution_bug_is_found_by_geometry_and_auto_avoids_it(bf16_cpu):
    """A padded stride-2 convolution whose input is 1x1 (test_resnet's last block at 16 px) gets part of its bf16
    weight gradient unwritten on the CPU; at 32 px its input is 2x2 and nothing is wrong."""
    model = timm.create_model("test_resnet", num_classes=4)
    hazards = cpu_autocast_hazards(model, (3, 16, 16))
    assert hazards and hazards[0].startswith("layer4.0.conv1 (1x1 input, stride 2x2)")
    assert cpu_autocast_hazards(model, (3, 32, 32)) == []
    assert model.training  # the probe leaves the mode as it found it
    numerics = TrainConfig().numerics(CPU, model, (3, 16, 16))
    assert numerics.precision == "fp32" and "layer4.0.conv1" in numerics.why and CPU_BF16_CONV_BUG in numerics.why
    assert TrainConfig().numerics(CPU, model, (3, 32, 32)).precision == "bf16"
    with pytest.raises(ValueError, match="NaN gradients"):
        TrainConfig(precision="bf16").numerics(CPU, model, (3, 16, 16))


def test_channels_last_auto_follows_the_device_and_an_explicit_setting_wins(bf16_cpu):
    assert resolve_numerics("fp32", "auto", CPU).channels_last  # a fast-bf16 CPU: channels_last measured faster
    assert not resolve_numerics("bf16", False, CPU).channels_last
    assert TrainConfig(channels_last=True).channels_last is True
    with pytest.raises(ValueError):
        TrainConfig(precision="fp8")

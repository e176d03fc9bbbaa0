"""Model creation: timm by name, local checkpoints, and pretrained weights that fail fast offline."""

from __future__ import annotations

import socket

import pytest
import timm
import torch

from pipeline import cli
from pipeline.core.models import ModelConfig, ModelSourceError, PretrainedUnavailableError, create_model
from tests.conftest import TINY_MODEL, tiny_recipe, write_recipe


def _unreachable(*args, **kwargs):
    raise OSError(-2, "Name or service not known")


def test_pretrained_offline_fails_in_seconds(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", _unreachable)
    with pytest.raises(PretrainedUnavailableError, match="cannot reach huggingface.co .*pretrained: false"):
        create_model(ModelConfig(name="resnet10t", pretrained=True), num_classes=10)


def test_cli_pretrained_offline_exits_2_before_any_run(monkeypatch, tmp_path, isolated, cifar_root, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", _unreachable)
    path = write_recipe(tmp_path / "pre.yaml", tiny_recipe())
    assert cli.main(["run", str(path), "model.name=resnet10t", "model.pretrained=true"]) == 2
    assert "error: model.pretrained: cannot reach" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_checkpoint_is_loaded(tmp_path):
    source = timm.create_model(TINY_MODEL, num_classes=3)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "ckpt.pt")
    model, spec = create_model(ModelConfig(name=TINY_MODEL, checkpoint=tmp_path / "ckpt.pt"), num_classes=3)
    assert spec.num_classes == 3
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ModelSourceError, match="model.checkpoint: .* does not fit the model"):
        create_model(ModelConfig(name=TINY_MODEL, checkpoint=tmp_path / "other.pt"), num_classes=3)


def test_a_training_checkpoint_loads_its_ema_weights_without_the_ddp_prefix(tmp_path):
    raw, ema = timm.create_model(TINY_MODEL, num_classes=3), timm.create_model(TINY_MODEL, num_classes=3)
    wrapped = {f"module.{k}": v for k, v in ema.state_dict().items()}  # saved from inside DistributedDataParallel
    torch.save({"epoch": 9, "state_dict": raw.state_dict(), "state_dict_ema": wrapped}, tmp_path / "train.pth.tar")
    model, _ = create_model(ModelConfig(name=TINY_MODEL, checkpoint=tmp_path / "train.pth.tar"), num_classes=3)
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in model.state_dict().items())


def test_another_class_count_resets_the_classifier(tmp_path, caplog):
    source = timm.create_model(TINY_MODEL, num_classes=1000)  # e.g. fine-tuned from ImageNet, head untouched
    torch.save(source.state_dict(), tmp_path / "imagenet.pt")
    caplog.set_level("INFO", logger="pipeline")
    model, _ = create_model(ModelConfig(name=TINY_MODEL, checkpoint=tmp_path / "imagenet.pt"), num_classes=10)
    assert "its classifier has 1000 classes, the data 10" in caplog.text
    assert model.fc.weight.shape == (10, model.fc.in_features)
    body = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())
    with pytest.raises(ModelSourceError, match="classifier for 1000 classes, the data has 10; set model.reset_"):
        create_model(ModelConfig(name=TINY_MODEL, checkpoint=tmp_path / "imagenet.pt", reset_classifier=False), 10)
    same = create_model(ModelConfig(name=TINY_MODEL, checkpoint=tmp_path / "imagenet.pt", reset_classifier=True), 1000)
    assert not torch.equal(same[0].fc.weight, source.fc.weight)  # true: a new head even when the classes match

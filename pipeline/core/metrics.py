"""Pure metric functions, and `evaluate`, which measures a model in its deployable form.

Nothing here writes to disk or to MLflow: the runner does that with what these functions return.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from pipeline.core.config import StrictConfig
from pipeline.core.int8 import converted_by, is_int8, observers_paused
from pipeline.core.quiet import quiet_loggers

with quiet_loggers():  # torch.utils.benchmark imports cpp_extension, which warns that a CPU machine has no CUDA
    from torch.utils import benchmark

Loader = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (normalised images, labels) batches of one split


EVALUATION_VERSION = 2  # 2: int8 through PT2E (params of int8 weights), speed against the input model
"""Version of how a model is measured (these metrics, export and runtime measurement in pipeline.deploy): in every
evaluation key, so changed measuring code measures cached models again (it never retrains them)."""


class EvalConfig(StrictConfig):
    """How the evaluator measures latency and throughput (accuracy always uses the whole validation and test splits)."""

    threads: int = Field(1, ge=1, le=256, description="torch CPU threads for latency and throughput")
    latency_runs: int = Field(200, ge=5, le=100_000, description="timed batch-1 forward passes")
    warmup_runs: int = Field(20, ge=1, le=10_000, description="untimed forward passes before timing")
    throughput_batch_size: int = Field(64, ge=1, le=4096, description="batch size of the throughput measurement")
    throughput_runs: int = Field(10, ge=1, le=10_000, description="timed batches for throughput")


# Every metric a stage evaluation logs and a search may optimise or bound: its natural direction ("max" or "min";
# None where neither is better) and its kind in stages.base.METRIC_KINDS (None for accuracy and the rest). Metrics of
# an exported file carry the runtime's name: `onnxruntime.latency_ms_p50`. Accuracy is measured on two splits:
# `val_top1` on the validation split, which every choice reads, and `top1` on the test split, which is only reported.
MODEL_METRICS: dict[str, tuple[str | None, str | None]] = {
    "val_top1": ("max", None),  # percent of validation images
    "val_top5": ("max", None),
    "top1": ("max", None),  # percent of test images
    "top5": ("max", None),
    "params": ("min", "compute"),  # parameter count
    "nonzero_params": ("min", "bytes"),
    "macs": ("min", "compute"),  # multiply-accumulates of one image
    "latency_ms_p50": ("min", "compute"),  # torch eager, batch 1
    "latency_ms_p90": ("min", "compute"),
    "throughput_ips": ("max", "compute"),  # images per second at the throughput batch size
    "artifact_bytes": ("min", "bytes"),  # the saved artifact on disk
}
RUNTIME_METRICS: dict[str, tuple[str | None, str | None]] = {
    "val_top1": ("max", None),
    "val_top5": ("max", None),
    "top1": ("max", None),
    "top5": ("max", None),
    "latency_ms_p50": ("min", "compute"),
    "latency_ms_p90": ("min", "compute"),
    "throughput_ips": ("max", "compute"),
    "file_bytes": ("min", "bytes"),  # the exported file(s)
    "file_bytes_zip": ("min", "bytes"),  # the same, deflated: what sparsity saves in storage
    "top1_delta_vs_torch": (None, None),
}
TEST_ACCURACY = ("top1", "top5")  # the test split's accuracy metrics (and each runtime's): reported, never chosen on


def split_metric(metric: str, split: str) -> str:
    """The name of an accuracy metric on `split`: ('top1', 'val') -> 'val_top1', ('onnxruntime.top1', 'val') ->
    'onnxruntime.val_top1'; the test split keeps the plain name."""
    if split == "test":
        return metric
    runtime, dot, name = metric.rpartition(".")
    return f"{runtime}{dot}{split}_{name}"


def validation_name(metric: str) -> str | None:
    """The validation metric to choose on instead of a test-split accuracy metric (`onnxruntime.top1` ->
    `onnxruntime.val_top1`); None when `metric` is not a test accuracy."""
    return split_metric(metric, "val") if metric.rpartition(".")[2] in TEST_ACCURACY else None


def test_name(metric: str) -> str:
    """The test split's counterpart of a validation accuracy metric (`onnxruntime.val_top1` -> `onnxruntime.top1`);
    any other metric itself."""
    runtime, dot, name = metric.rpartition(".")
    return f"{runtime}{dot}{name.removeprefix('val_')}" if name in ("val_top1", "val_top5") else metric


def metric_catalogue(runtimes: Iterable[str]) -> dict[str, tuple[str | None, str | None]]:
    """name -> (natural direction, kind) of every metric measured with these deploy runtimes."""
    out = dict(MODEL_METRICS)
    for runtime in runtimes:
        out.update({f"{runtime}.{name}": info for name, info in RUNTIME_METRICS.items()})
    return out


@dataclass(frozen=True)
class Predictions:
    """Per test image, in the loader's order: the predicted class, whether the label is in the top 5, the label.

    Stored beside every stage's metrics (`to_npz`: about 10 KB per model for CIFAR-10's 10,000 test images), so
    any two models can be compared image by image (paired tests) without running either again.
    """

    predicted: np.ndarray
    top5_hit: np.ndarray
    labels: np.ndarray

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.labels

    @property
    def top1(self) -> float:
        """Top-1 accuracy in percent."""
        return 100.0 * int(self.correct.sum()) / max(self.labels.size, 1)

    @property
    def top5(self) -> float:
        """Top-5 accuracy in percent."""
        return 100.0 * int(self.top5_hit.sum()) / max(self.labels.size, 1)


def _class_dtype(classes: int) -> np.dtype:
    return np.dtype(np.uint8 if classes <= 256 else np.int32)


def classify(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Predictions:
    """Per-image predictions from (logits, labels) batches."""
    predicted, hits, labels, classes = [], [], [], 1
    for logits, batch_labels in batches:
        classes = max(classes, logits.shape[1])
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        predicted.append(best[:, 0].cpu().numpy())
        hits.append((best == batch_labels[:, None]).any(dim=1).cpu().numpy())
        labels.append(batch_labels.cpu().numpy())
    dtype = _class_dtype(classes)
    join = lambda parts, kind: np.concatenate(parts).astype(kind) if parts else np.zeros(0, kind)  # noqa: E731
    return Predictions(join(predicted, dtype), join(hits, bool), join(labels, dtype))


def save_predictions(path: Path, by_split: Mapping[str, Mapping[str, Predictions]]) -> None:
    """Write each split's (`val`, `test`) predicted classes per runtime, and its labels once, to one .npz file."""
    arrays = {}
    for split, by_runtime in by_split.items():
        arrays[f"{split}.labels"] = next(iter(by_runtime.values())).labels
        arrays.update({f"{split}.{name}.predicted": p.predicted for name, p in by_runtime.items()})
    np.savez_compressed(path, **arrays)


def load_predictions(path: Path, split: str = "test") -> dict[str, np.ndarray]:
    """One split of `save_predictions`' output: {"labels": …, "<runtime>": predicted classes}; empty when the
    file has no such split (files written before validation splits hold the test split alone, unprefixed)."""
    with np.load(path) as data:
        files = list(data.files)
        if "labels" in files:  # the format before validation splits: the test split only
            return {k.removesuffix(".predicted"): data[k] for k in files} if split == "test" else {}
        prefix = f"{split}."
        return {k[len(prefix) :].removesuffix(".predicted"): data[k] for k in files if k.startswith(prefix)}


@torch.inference_mode()
def predictions(
    model: nn.Module, loader: Loader, *, device: torch.device | str = "cpu", progress: bool = False
) -> Predictions:
    """The model's predictions on every image of `loader`."""
    model.eval()
    batches = tqdm(loader, desc="evaluate", unit="batch", leave=False, disable=not progress)
    return classify((model(images.to(device)), labels.to(device)) for images, labels in batches)


def accuracy(
    model: nn.Module, loader: Loader, *, device: torch.device | str = "cpu", progress: bool = False
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent over every batch of `loader`."""
    result = predictions(model, loader, device=device, progress=progress)
    return result.top1, result.top5


TORCH_REFERENCE_OPS = "torch_reference_ops"
"""1 on a model torch eager runs as reference int8 ops (quantize / dequantize around fp32 kernels): its torch latency
describes the simulation, not what ships; the runtimes run it on int8 kernels."""

EPOCH_VAL_METRIC = "epoch_val_top1"  # the per-epoch validation top-1 a search's pruner reads (`epoch_validation`)


def epoch_validation(loader: Loader, device: torch.device | str) -> Callable[[nn.Module], dict[str, float]]:
    """A training-loop probe (`LoopHooks.evaluate`): the model's top-1 on `loader` (a fixed part of the validation
    split) after an epoch, as `epoch_val_top1`. The model is scored in eval mode with its fake-quant observers
    paused, then put back as it was (train mode, observers), so a probed training trains exactly the weights an
    unprobed one does."""

    def probe(model: nn.Module) -> dict[str, float]:
        was_training = model.training
        try:
            with observers_paused(model):
                return {EPOCH_VAL_METRIC: predictions(model, loader, device=device).top1}
        finally:
            model.train(was_training)

    return probe


def top1_top5(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent over (logits, labels) batches."""
    result = classify(batches)
    return result.top1, result.top5


def _int8_tensors(model: nn.Module) -> list[torch.Tensor] | None:
    """The weight tensors of an int8 model as its backend holds them (None for a float model)."""
    backend = converted_by(model)
    return None if backend is None else backend.weight_tensors(model)


def count_params(model: nn.Module) -> int:
    """Number of parameters (learnable tensors' elements); of an int8 model, its weights and biases as converted (int8
    weights are not nn.Parameters there)."""
    tensors = _int8_tensors(model)
    return sum(t.numel() for t in (tensors if tensors is not None else model.parameters()))


def count_nonzero_params(model: nn.Module) -> int:
    """Number of parameter elements that are not exactly zero (an int8 weight: that does not dequantize to 0, as
    symmetric int8 maps 0 to 0)."""
    tensors = _int8_tensors(model)
    return sum(int(torch.count_nonzero(t)) for t in (tensors if tensors is not None else model.parameters()))


@torch.inference_mode()
def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Multiply-accumulates for one image (FLOPs / 2, as counted by torch.utils.flop_counter); an int8 model's
    convolutions and matrix products count as the float ops its graph computes them with."""
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_size))
    return counter.get_total_flops() // 2


def latency_ms(
    model: nn.Module, input_size: tuple[int, ...], *, threads: int, runs: int, warmup: int
) -> tuple[float, float]:
    """Batch-1 CPU latency in milliseconds: (median, 90th percentile) over `runs` single calls."""
    x = torch.randn(1, *input_size)
    timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads)
    model.eval()
    with torch.inference_mode():
        timer.timeit(warmup)
        times = sorted(timer.timeit(1).times[0] * 1e3 for _ in range(runs))
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return statistics.median(times), p90


def latency_side_by_side(
    models: Sequence[nn.Module],
    input_sizes: Sequence[tuple[int, ...]],
    *,
    threads: int = 1,
    rounds: int = 7,
    runs: int = 100,
    warmup: int = 10,
) -> list[float]:
    """Batch-1 p50 latency (ms) of each model: the median over `rounds` of its p50, the models timed in turn
    within each round, so load changes on a shared machine hit them all alike. Compare their ratios."""
    samples: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, (model, size) in enumerate(zip(models, input_sizes, strict=True)):
            samples[i].append(latency_ms(model, size, threads=threads, runs=runs, warmup=warmup)[0])
    return [statistics.median(s) for s in samples]


def throughput_ips(model: nn.Module, input_size: tuple[int, ...], *, batch_size: int, threads: int, runs: int) -> float:
    """Images per second at `batch_size` on the CPU (median batch time over `runs`)."""
    x = torch.randn(batch_size, *input_size)
    timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads)
    model.eval()
    with torch.inference_mode():
        timer.timeit(1)
        seconds = statistics.median(timer.timeit(1).times[0] for _ in range(runs))
    return batch_size / seconds


def evaluate(
    model: nn.Module,
    test_loader: Loader,
    input_size: tuple[int, ...],
    cfg: EvalConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """Every evaluator metric except artifact_bytes (which belongs to the file the runner wrote), with accuracy
    (`top1`, `top5`) on `test_loader`."""
    return evaluate_with_predictions(model, {"test": test_loader}, input_size, cfg, device=device,
                                     progress=progress)[0]  # fmt: skip


def accuracy_metrics(scored: Mapping[str, Predictions], runtime: str | None = None) -> dict[str, float]:
    """top1 / top5 of each split's predictions under the split's metric name (`val_top1`; `onnxruntime.top1`)."""
    prefix = f"{runtime}." if runtime else ""
    out = {}
    for split, p in scored.items():
        out[split_metric(f"{prefix}top1", split)], out[split_metric(f"{prefix}top5", split)] = p.top1, p.top5
    return out


def evaluate_with_predictions(
    model: nn.Module,
    loaders: Mapping[str, Loader],
    input_size: tuple[int, ...],
    cfg: EvalConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[dict[str, float], dict[str, Predictions]]:
    """`evaluate`'s metrics with accuracy on every split of `loaders` ({'val': …, 'test': …}), and the per-image
    predictions of each split."""
    if is_int8(model):
        device = "cpu"  # int8 models are evaluated as they ship: on the CPU
    scored = {split: predictions(model.to(device), loader, device=device, progress=progress)
              for split, loader in loaders.items()}  # fmt: skip
    model = model.to("cpu")
    p50, p90 = latency_ms(model, input_size, threads=cfg.threads, runs=cfg.latency_runs, warmup=cfg.warmup_runs)
    metrics = {
        **accuracy_metrics(scored),
        "params": float(count_params(model)),
        "nonzero_params": float(count_nonzero_params(model)),
        "macs": float(count_macs(model, input_size)),
        "latency_ms_p50": p50,
        "latency_ms_p90": p90,
        "throughput_ips": throughput_ips(
            model, input_size, batch_size=cfg.throughput_batch_size, threads=cfg.threads, runs=cfg.throughput_runs
        ),
        "eval_threads": float(cfg.threads),
    }
    backend = converted_by(model)
    if backend is not None and not backend.torch_int8_kernels:
        metrics[TORCH_REFERENCE_OPS] = 1.0  # torch's latency above is a simulation's, not what ships
    return metrics, scored

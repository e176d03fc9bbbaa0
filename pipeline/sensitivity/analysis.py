"""The sensitivity grid: every selected layer changed alone by every technique setting, each scored by its validation
top-1 drop, with the layer's size and what the change saves; resumable from a per-model cache file."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from pipeline.core.data import DataBundle
from pipeline.core.hashing import digest
from pipeline.core.metrics import EVALUATION_VERSION, predictions
from pipeline.sensitivity.config import SensitivityConfig, SensitivityError
from pipeline.sensitivity.probes import (
    ProbeContext,
    applies,
    get_probe,
    grid,
    layers_of,
    setting_label,
)
from stages import get_stage
from stages.qat_fallback import layer_macs

log = logging.getLogger("pipeline")

SENSITIVITY_VERSION = 2  # 2: the int8 probe simulates the scheme of 8-bit activations and 7-bit weights
"""Goes up when the probes or the scoring change what a cached cell holds."""

SUBSET_SEED = 0


@dataclass(frozen=True)
class LayerInfo:
    """A layer's own size: kind and shape, parameters, MACs for one image, fp32 weight bytes, share of all MACs, share
    of the measured runtime latency (None when not measured)."""

    name: str
    kind: str
    params: int
    macs: int
    weight_bytes: int
    macs_share: float
    latency_share: float | None = None  # of the batch-1 ONNX Runtime forward (pipeline.deploy.layer_latency)


@dataclass
class Cell:
    """One layer changed by one technique setting: validation top-1 and its drop from the unchanged model."""

    layer: str
    technique: str
    setting: float
    val_top1: float
    drop: float
    params_removed: int
    macs_removed: int
    bytes_saved: int
    coupled: tuple[str, ...]
    seconds: float

    @property
    def label(self) -> str:
        return setting_label(self.technique, self.setting)


@dataclass
class SensitivityResult:
    model: str  # what was analysed: the recipe, and the stage whose input it is (or the baseline)
    model_key: str  # the cache key of that model
    images: int  # validation images scored per cell
    base_top1: float
    layers: list[LayerInfo]
    cells: list[Cell]
    config: SensitivityConfig
    seconds: float = 0.0
    evaluated: int = 0  # cells evaluated in this call (the others came from the cache)
    labels: list[str] = field(default_factory=list)  # grid columns in order

    def ranked(self) -> list[tuple[LayerInfo, dict[str, Cell]]]:
        """Layers with their cells by column, the most sensitive first (largest drop over its cells)."""
        by_layer: dict[str, dict[str, Cell]] = {}
        for cell in self.cells:
            by_layer.setdefault(cell.layer, {})[cell.label] = cell
        rows = [(info, by_layer.get(info.name, {})) for info in self.layers]
        return sorted(rows, key=lambda r: -max((c.drop for c in r[1].values()), default=0.0))


def select_layers(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """The layers matching any of `patterns` (all with none); a pattern matching nothing is an error."""
    names = list(layers_of(model))
    if not patterns:
        return names
    unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
    if unmatched:
        raise SensitivityError(
            f"--layers {' '.join(unmatched)} matched no conv or linear layer; the model has: {', '.join(names)}"
        )
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]


def layer_infos(model: nn.Module, names: list[str], input_size: tuple[int, ...]) -> list[LayerInfo]:
    """Each layer's MACs for one image counted from its output shape (output elements x weights per output)."""
    macs = layer_macs(model, input_size)
    modules = layers_of(model)
    total = max(sum(macs.values()), 1)
    out = []
    for name in names:
        m = modules[name]
        params = sum(p.numel() for p in m.parameters(recurse=False))
        shape = "x".join(map(str, m.weight.shape))
        out.append(LayerInfo(name, f"{type(m).__name__} {shape}", params, macs.get(name, 0), 4 * m.weight.numel(),
                             macs.get(name, 0) / total))  # fmt: skip
    return out


def subset(data: DataBundle, images: int | None) -> DataBundle:
    """The data with its validation split cut to a fixed random `images` (all when None or more than it has)."""
    try:
        return data.with_val_subset(images, seed=SUBSET_SEED)
    except ValueError as err:
        raise SensitivityError(f"sensitivity is measured on the validation split: {err}") from None


def cache_path(cache_dir: Path, model_key: str, data: DataBundle, config: SensitivityConfig) -> Path:
    """One file per analysed model, data subset and probe options; cells of any grid over them accumulate in it."""
    key = digest({
        # the probes round and prune with the stages' code, and score with the evaluator's
        "version": SENSITIVITY_VERSION, "prune": get_stage("prune").version, "inq": get_stage("inq").version,
        "evaluation": EVALUATION_VERSION, "model": model_key, "data": data.fingerprint, "images": len(data.val),
        "importance": config.importance, "calibration_batches": config.calibration_batches,
    })  # fmt: skip
    return cache_dir / "sensitivity" / f"{key[:16]}.json"


def analyse(
    model: nn.Module,
    data: DataBundle,
    config: SensitivityConfig,
    *,
    model_name: str,
    model_key: str,
    cache_dir: Path,
    progress: bool = True,
) -> SensitivityResult:
    """Score every (layer, setting) of `config`'s grid on the validation split; cached cells are reused."""
    started = time.perf_counter()
    data = subset(data, config.images)
    model = model.cpu().eval()
    names = select_layers(model, config.layers)
    settings = grid(config)
    cells = [(n, t, s) for n in names for t, s in settings if applies(t, model, n)]
    path = cache_path(cache_dir, model_key, data, config)
    stored = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    loader = data.eval_loader("val")
    if "base_top1" not in stored:
        t0 = time.perf_counter()
        stored["base_top1"] = predictions(model, loader).top1
        stored["eval_seconds"] = time.perf_counter() - t0
    base, todo = stored["base_top1"], [g for g in cells if _cell_key(*g) not in stored["cells"]]
    log.info("sensitivity of %s: %d layers x %d settings = %d evaluations of %d validation images (%d cached); "
             "about %.1f min at %.1f s each (top-1 unchanged: %.2f%%)", model_name, len(names),
             len(settings), len(cells), len(data.val), len(cells) - len(todo),
             len(todo) * stored["eval_seconds"] * 1.15 / 60, stored["eval_seconds"], base)  # fmt: skip
    ctx = ProbeContext(tuple(data.input_size), importance=config.importance)
    for technique in dict.fromkeys(t for _, t, _ in todo):
        if (setup := get_probe(technique).setup) is not None:
            setup(model, sorted({n for n, t, _ in todo if t == technique}), _calibration(data, config), ctx)
    for i, (name, technique, setting) in enumerate(todo, 1):
        t0 = time.perf_counter()
        with get_probe(technique).probe(model, name, setting, ctx) as (changed, effect):
            top1 = predictions(changed, loader).top1
        cell = Cell(name, technique, setting, top1, base - top1, effect.params_removed, effect.macs_removed,
                    effect.bytes_saved, effect.coupled, time.perf_counter() - t0)  # fmt: skip
        stored["cells"][_cell_key(name, technique, setting)] = asdict(cell)
        _write(path, stored)  # an interrupted analysis goes on from here
        if progress or i == len(todo) or i % max(1, len(todo) // 10) == 0:
            log.info("sensitivity %d/%d: %s %s: top-1 %.2f%% (drop %+.2f)", i, len(todo), name, cell.label, top1,
                     base - top1)  # fmt: skip
    results = [_cell(stored["cells"][_cell_key(*g)]) for g in cells]
    infos = layer_infos(model, names, tuple(data.input_size))
    if config.latency:
        infos = _with_latency(model, infos, tuple(data.input_size))
    return SensitivityResult(
        model=model_name, model_key=model_key, images=len(data.val), base_top1=base,
        layers=infos, cells=results, config=config,
        seconds=time.perf_counter() - started, evaluated=len(todo),
        labels=[setting_label(t, s) for t, s in settings],
    )  # fmt: skip


def _with_latency(model: nn.Module, infos: list[LayerInfo], input_size: tuple[int, ...]) -> list[LayerInfo]:
    """The layers with their share of the batch-1 ONNX Runtime forward; unchanged (with a warning) when the model
    does not export or ONNX Runtime is not installed. Measured at every analysis: a property of this machine, never
    cached."""
    from pipeline.deploy.layer_latency import layer_latency_shares

    try:
        shares = layer_latency_shares(model, input_size, [i.name for i in infos])
    except Exception as err:  # the drops stand without it; say why the column is empty
        log.warning("sensitivity: layer latency shares not measured (%s: %s)", type(err).__name__, str(err)[:200])
        return infos
    log.info("sensitivity: layer latency shares measured in ONNX Runtime (batch 1, 1 thread), %.0f%% in the layers",
             100 * sum(shares.values()))  # fmt: skip
    return [replace(info, latency_share=shares[info.name]) for info in infos]


def _calibration(data: DataBundle, config: SensitivityConfig) -> list[torch.Tensor]:
    """The first `calibration_batches` training batches, unaugmented, in a fixed order."""
    batches = []
    for images, _ in data.train_loader(data.config.batch_size, seed=SUBSET_SEED, augment=False):
        batches.append(images)
        if len(batches) == config.calibration_batches:
            break
    return batches


def _cell_key(layer: str, technique: str, setting: float) -> str:
    return f"{layer}|{technique}|{setting:g}"


def _cell(record: dict) -> Cell:
    return Cell(**{**record, "coupled": tuple(record["coupled"])})


def _write(path: Path, stored: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stored, indent=1))
    tmp.replace(path)

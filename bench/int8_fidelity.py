"""Issue #37: the PT2E int8 model in the runtimes against the torch int8 model, on the architectures users bring.

For each model: a short fp32 baseline on CIFAR-10 at 32 px (from scratch: the suite has no pretrained weights but
tf_efficientnet_lite0's), then post-training int8 (`qat: {epochs: 0}`) and quantization-aware int8 (`qat: {epochs:
1}`) from it, each exported and evaluated on the whole 10,000-image test split in torch (reference int8 ops), ONNX
Runtime and OpenVINO. The evaluator records each runtime's `top1_delta_vs_torch`; this prints them.

    .venv/bin/python bench/int8_fidelity.py [--models NAME ...] [--epochs 3] [--train 10000]

Goal (issue #37): every model through PTQ and QAT and both runtimes, runtime top-1 within 0.3 points of torch int8.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import machine, parse_args

from pipeline.recipe import load_recipe
from pipeline.run.runner import Runner

MODELS = {
    "tf_efficientnet_lite0": {},
    "tf_mobilenetv3_large_100": {},
    "efficientnet_b0": {},
    "convnext_atto": {},
    "deit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},
    "resnet10t": {},
    "ghostnet_100": {},
}
RUNTIMES = ("onnxruntime", "openvino")


def recipe(name: str, kwargs: dict, epochs: int, train: int, qat_epochs: int) -> dict:
    return {
        "name": f"int8-fidelity-{name}-qat{qat_epochs}",
        "seed": 0,
        "data": {"dataset": "cifar10", "batch_size": 128, "train_subset": train},
        "model": {"name": name, "kwargs": kwargs},
        "baseline": {"epochs": epochs, "optimizer": "adamw", "lr": 0.002, "weight_decay": 0.05},
        "stages": [{"qat": {"epochs": qat_epochs, "lr": 0.0002, "optimizer": "adamw", "calibration_batches": 8}}],
        "evaluation": {"latency_runs": 20, "warmup_runs": 5, "throughput_runs": 2},
    }


def main() -> None:
    def extra(parser):
        parser.add_argument("--models", nargs="*", default=list(MODELS), help="timm model names")
        parser.add_argument("--epochs", type=int, default=3, help="fp32 baseline epochs")
        parser.add_argument("--train", type=int, default=10000, help="training images")

    args = parse_args(__doc__, extra)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for qat_epochs in (0, 1):
                path = Path(tmp) / f"{name}-{qat_epochs}.yaml"
                path.write_text(yaml.safe_dump(recipe(name, MODELS.get(name, {}), args.epochs, args.train,
                                                      qat_epochs)))  # fmt: skip
                start = time.perf_counter()
                summary = Runner(load_recipe(str(path), args.set), progress=sys.stderr.isatty()).run()
                base, int8 = summary.results[0].metrics, summary.results[-1].metrics
                rows.append((name, "PTQ" if qat_epochs == 0 else "QAT", base, int8, time.perf_counter() - start))
    print(f"\nbench/int8_fidelity.py {' '.join(sys.argv[1:])}\nmachine: {machine()}; CIFAR-10 test split (10,000 "
          "images), top-1 %\n")  # fmt: skip
    print("| model | int8 | fp32 torch | int8 torch | ORT | ORT - torch | OpenVINO | OV - torch | int8 layers | s |")
    print("| --- | --- |" + " ---: |" * 8)
    for name, kind, base, m, seconds in rows:
        cells = " | ".join(f"{m[f'{r}.top1']:.2f} | {m[f'{r}.top1_delta_vs_torch']:+.2f}" for r in RUNTIMES)
        print(f"| {name} | {kind} | {base['top1']:.2f} | {m['top1']:.2f} | {cells} | {m['int8_layers']:.0f} | "
              f"{seconds:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()

"""Issue #25 benchmarks: a budget allocated layer by layer from measured sensitivity against one setting for every
layer, at the same budget, on CIFAR-10; paired over seeds on the validation split (the test split reported).

    .venv/bin/python bench/allocation.py prune [--shares 0.5 0.7] [--seeds 0 1 2] [--epochs 3]
    .venv/bin/python bench/allocation.py inq [--seeds 0 1 2] [--bits 3]
    .venv/bin/python bench/allocation.py qat [--model mobilenetv3_large_100] [--max-drop 0.5] [--seeds 0]

prune: uniform structured pruning at the channel ratio that removes `share` of the MACs (found on the model before
any run), against `allocation: sensitivity` asked to remove exactly the share the uniform model removed.
inq: uniform INQ at `--bits` against `bits: auto` with `target_bits` the same (the same packed bytes).
qat: the fp32 model, full int8 QAT and int8 with `fp32_layers: auto` at `--max-drop`, then the three timed side by
side in OpenVINO and ONNX Runtime (bench/deploy.py's interleaved rounds).

Every chain goes through the real runner (cache, MLflow); the baseline is trained once (`stage_seed` varies the
stages after it). Goals (issue #25): allocated pruning significantly better than uniform at 70 % MACs; int8 with
fallback recovers >= half of full int8's top-1 drop at <= 20 % of int8's latency gain lost in OpenVINO; mixed INQ
better than uniform 3-bit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Row, machine  # noqa: E402

from pipeline.analysis.significance import mcnemar_exact, paired_bootstrap_diff  # noqa: E402
from pipeline.core.metrics import count_macs, load_predictions  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.run.runner import Runner  # noqa: E402
from pipeline.run.stage_training import StageResult  # noqa: E402

PRUNE = (
    "{method: structured, importance: group_norm, epochs: %d, lr: 0.05, schedule: onecycle, "
    "label_smoothing: 0.1, pruning_ratio: %s%s}"
)
INQ = "{bits: %s, accumulated_portions: [0.5, 0.75, 0.875, 1.0], epochs: 1, lr: 0.01, label_smoothing: 0.1%s}"


HEAD = ["\n| split | A | B | A − B (pts) [95 % CI] | McNemar p | verdict |", "| --- | --- | --- | --- | ---: | --- |"]
RUNTIMES = ("openvino", "onnxruntime", "torch")


def run(recipe: str, overrides: list[str]) -> StageResult:
    """The chain's last stage (the runner's cache serves what already ran)."""
    return Runner(load_recipe(recipe, overrides), progress=sys.stderr.isatty()).run().results[-1]


def correct(result: StageResult, split: str) -> np.ndarray:
    """Per image of `split`, whether the torch model of `result` classified it right."""
    arrays = load_predictions(result.predictions_path, split)
    return arrays["torch"] == arrays["labels"]


def compare(label_a: str, a: list[StageResult], label_b: str, b: list[StageResult]) -> str:
    """A minus B on validation (the choice) and test (reported): mean top-1 over seeds, paired bootstrap interval over
    seeds and images, exact McNemar on the pooled pairs."""
    lines = []
    for split in ("val", "test"):
        ca = np.stack([correct(r, split) for r in a])
        cb = np.stack([correct(r, split) for r in b])
        diff = paired_bootstrap_diff(ca, cb, rng=0)
        p = mcnemar_exact(ca.ravel(), cb.ravel()).p_value
        verdict = "better" if diff.low > 0 else "worse" if diff.high < 0 else "not significant"
        lines.append(
            f"| {split} | {label_a} {100 * ca.mean():.2f} | {label_b} {100 * cb.mean():.2f} | {diff.mean:+.2f} "
            f"[{diff.low:+.2f}, {diff.high:+.2f}] | {p:.3g} | {verdict} |"
        )
    return "\n".join(lines)


def per_seed(label: str, results: list[StageResult], keys: list[str]) -> list[str]:
    rows = []
    for seed, r in enumerate(results):
        m = r.metrics
        cells = " | ".join(f"{m[k]:,.4g}" if k in m else "–" for k in keys)
        rows.append(f"| {label} | {seed} | {m.get('val_top1', float('nan')):.2f} | {m['top1']:.2f} | {cells} |")
    return rows


# --- prune -------------------------------------------------------------------------------------------------


def uniform_ratio(model_name: str, share: float, input_size=(3, 32, 32)) -> float:
    """The uniform channel ratio (step 0.01) whose structured pruning removes the MAC share closest to `share`."""
    import timm
    import torch_pruning as tp

    from stages.channels import IMPORTANCES, classifier

    base = timm.create_model(model_name, num_classes=10).eval()
    total = count_macs(base, input_size)
    best = (1.0, 0.0)
    for ratio in np.arange(0.05, 0.9, 0.01):
        model = timm.create_model(model_name, num_classes=10).eval()
        pruner = tp.pruner.BasePruner(
            model,
            torch.zeros(2, *input_size),
            importance=IMPORTANCES["group_norm"](),
            pruning_ratio=float(ratio),
            ignored_layers=[classifier(model)],
        )
        pruner.step()
        removed = 1 - count_macs(model, input_size) / total
        best = min(best, (abs(removed - share), round(float(ratio), 2)))
    return best[1]


def bench_prune(args) -> None:
    common = ["deploy.runtimes=[onnxruntime]", *args.set]
    out = []
    for share in args.shares:
        ratio = uniform_ratio("resnet10t", share)
        uniform, allocated = [], []
        for seed in args.seeds:
            u = run(
                "prune", [f"stages[0]={{prune: {PRUNE % (args.epochs, ratio, '')}}}", f"stage_seed={seed}", *common]
            )
            removed = round(1 - u.metrics["macs_after"] / u.metrics["macs_before"], 4)
            extra = ", allocation: sensitivity, target: macs"
            s = run(
                "prune",
                [f"stages[0]={{prune: {PRUNE % (args.epochs, removed, extra)}}}", f"stage_seed={seed}", *common],
            )
            uniform.append(u)
            allocated.append(s)
        keys = [
            "macs_after",
            "params_after",
            "artifact_bytes",
            "onnxruntime.latency_ms_p50",
            "allocation_predicted_drop",
            "allocation_measured_drop",
        ]
        out += [
            f"\n### {share:.0%} of the MACs (uniform channel ratio {ratio})\n",
            "| variant | seed | val top-1 | test top-1 | " + " | ".join(keys) + " |",
            "| --- | ---: | ---: | ---: |" + " ---: |" * len(keys),
            *per_seed("uniform", uniform, keys),
            *per_seed("allocated", allocated, keys),
            *HEAD,
            compare("allocated", allocated, "uniform", uniform),
        ]
    print(f"\nbench/allocation.py prune {' '.join(sys.argv[2:])}\nmachine: {machine()}\n" + "\n".join(out))


# --- inq ---------------------------------------------------------------------------------------------------


def bench_inq(args) -> None:
    common = ["deploy.runtimes=[]", *args.set]
    uniform, mixed = [], []
    for seed in args.seeds:
        uniform.append(run("inq", [f"stages[0]={{inq: {INQ % (args.bits, '')}}}", f"stage_seed={seed}", *common]))
        extra = f", target_bits: {args.bits}"
        mixed.append(run("inq", [f"stages[0]={{inq: {INQ % ('auto', extra)}}}", f"stage_seed={seed}", *common]))
    keys = ["inq_bits", "inq_weight_bytes", "artifact_bytes", "allocation_predicted_drop", "allocation_measured_drop"]
    lines = [
        "| variant | seed | val top-1 | test top-1 | " + " | ".join(keys) + " |",
        "| --- | ---: | ---: | ---: |" + " ---: |" * len(keys),
        *per_seed(f"uniform {args.bits}-bit", uniform, keys),
        *per_seed("mixed (auto)", mixed, keys),
        *HEAD,
        compare("mixed", mixed, f"uniform {args.bits}-bit", uniform),
    ]
    widths = {
        k.removeprefix("allocation_bits."): int(v)
        for k, v in mixed[0].metrics.items()
        if k.startswith("allocation_bits.")
    }
    print(
        f"\nbench/allocation.py inq {' '.join(sys.argv[2:])}\nmachine: {machine()}\n"
        + "\n".join(lines)
        + f"\n\nwidths chosen (seed {args.seeds[0]}): {widths}"
    )


# --- qat ---------------------------------------------------------------------------------------------------


def bench_qat(args) -> None:
    from deploy import side_by_side

    common = [f"model.name={args.model}", f"baseline.epochs={args.baseline_epochs}", *args.set]
    qat = "{epochs: %d, lr: 0.005, calibration_batches: 8, label_smoothing: 0.1%s}"
    rows, results = [], {}
    for seed in args.seeds:
        full = run("qat", [f"stages[0]={{qat: {qat % (args.epochs, '')}}}", f"stage_seed={seed}", *common])
        extra = f", fp32_layers: auto, max_drop: {args.max_drop}"
        fallback = run("qat", [f"stages[0]={{qat: {qat % (args.epochs, extra)}}}", f"stage_seed={seed}", *common])
        results.setdefault("int8", []).append(full)
        results.setdefault("fallback", []).append(fallback)
    summary = Runner(load_recipe("qat", [f"stages[0]={{qat: {qat % (args.epochs, '')}}}", *common])).run()
    base = summary.results[0]
    rows = [
        Row("fp32 baseline", base.metrics, base.artifact_path),
        Row("int8 (full)", results["int8"][0].metrics, results["int8"][0].artifact_path),
        Row(
            f"int8 + fp32 fallback (max_drop {args.max_drop})",
            results["fallback"][0].metrics,
            results["fallback"][0].artifact_path,
        ),
    ]
    ms = side_by_side(rows, threads=1, rounds=args.rounds)
    keys = [
        "int8_fp32_layers",
        "allocation_fp32_macs_share",
        "allocation_int8_predicted_drop",
        "allocation_predicted_drop",
        "allocation_measured_drop",
    ]
    lines = [
        "| variant | seed | val top-1 | test top-1 | " + " | ".join(keys) + " |",
        "| --- | ---: | ---: | ---: |" + " ---: |" * len(keys),
        f"| fp32 baseline | – | {base.metrics['val_top1']:.2f} | {base.metrics['top1']:.2f} |" + " – |" * len(keys),
        *per_seed("int8 (full)", results["int8"], keys),
        *per_seed("int8 + fallback", results["fallback"], keys),
        *HEAD,
        compare("fallback", results["fallback"], "int8", results["int8"]),
        "\nlatency, batch 1 / batch 64, median ms of interleaved rounds (1 thread):\n",
        "| model | " + " | ".join(f"{r} b{b}" for r in RUNTIMES for b in (1, 64)) + " |",
        "| --- |" + " ---: |" * 6,
    ]
    for i, row in enumerate(rows):
        lines.append(f"| {row.label} | " + " | ".join(f"{ms[(i, r, b)]:.3f}" for r in RUNTIMES for b in (1, 64)) + " |")
    for b in (1, 64):
        fp32, int8, fb = (ms[(i, "openvino", b)] for i in range(3))
        gain, kept = fp32 - int8, fp32 - fb
        lost = 100 * (1 - kept / gain) if gain > 0 else float("nan")
        lines.append(
            f"\nOpenVINO batch {b}: int8 saves {gain:.3f} ms of {fp32:.3f}; the fallback keeps {kept:.3f} ms "
            f"of it ({lost:.0f} % of the gain lost)"
        )
    top = {k: np.mean([r.metrics["val_top1"] for r in v]) for k, v in results.items()}
    int8_drop, fb_drop = base.metrics["val_top1"] - top["int8"], base.metrics["val_top1"] - top["fallback"]
    recovered = 100 * (1 - fb_drop / int8_drop) if int8_drop > 0 else float("nan")
    lines.append(
        f"\nval top-1 drop against fp32: int8 {int8_drop:.2f}, fallback {fb_drop:.2f} "
        f"(recovered {recovered:.0f} % of int8's drop)"
    )
    print(f"\nbench/allocation.py qat {' '.join(sys.argv[2:])}\nmachine: {machine()}\n" + "\n".join(lines))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("technique", choices=["prune", "inq", "qat"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="stage seeds (baseline trained once)")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every chain")
    parser.add_argument("--shares", nargs="+", type=float, default=[0.5, 0.7], help="prune: MAC shares removed")
    parser.add_argument("--epochs", type=int, default=3, help="prune: fine-tuning epochs; qat: QAT epochs (2)")
    parser.add_argument("--bits", type=int, default=3, help="inq: the uniform width (auto meets its packed size)")
    parser.add_argument("--model", default="mobilenetv3_large_100", help="qat: the model")
    parser.add_argument("--baseline-epochs", type=int, default=15, help="qat: the model's fp32 baseline epochs")
    parser.add_argument("--max-drop", type=float, default=0.5, help="qat: the fallback's predicted drop budget")
    parser.add_argument("--rounds", type=int, default=5, help="qat: interleaved latency rounds")
    args = parser.parse_args()
    {"prune": bench_prune, "inq": bench_inq, "qat": bench_qat}[args.technique](args)


if __name__ == "__main__":
    main()

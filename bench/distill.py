"""Issue #6 benchmark: after a 50% structured prune (no fine-tuning), distillation vs plain fine-tuning,
same epochs and learning-rate schedule, from the same pruned model (one cached prefix), on CIFAR-10 with
the default recipe model.

    .venv/bin/python bench/distill.py                                   (or: make bench-distill)
    .venv/bin/python bench/distill.py --epochs 12 --alpha 0.5           a longer schedule
    .venv/bin/python bench/distill.py --epochs 12 --alpha 0.5 --teacher PATH/artifact.pt   another teacher
"""

from __future__ import annotations

from common import parse_args, run_all


def options(parser) -> None:
    parser.add_argument("--epochs", type=int, default=6, help="training epochs of both arms")
    parser.add_argument("--temperature", type=float, default=4.0, help="distillation temperature T")
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the distillation term")
    parser.add_argument("--teacher", default="baseline", help="baseline, or a pipeline artifact path")


def variants(args) -> dict[str, tuple[str, list[str]]]:
    prune = "{prune: {method: structured, pruning_ratio: 0.5, importance: group_norm, epochs: 0}}"
    training = f"epochs: {args.epochs}, lr: 0.05, schedule: onecycle, label_smoothing: 0.1"
    finetune = f"{{train: {{{training}}}}}"
    kd = f"teacher: '{args.teacher}', temperature: {args.temperature}, alpha: {args.alpha}"
    distill = f"{{distill: {{{training}, {kd}}}}}"
    arms = {
        "pruned, no fine-tune": f"[{prune}]",
        f"pruned + fine-tune (CE, {args.epochs} ep)": f"[{prune}, {finetune}]",
        f"pruned + distill ({args.epochs} ep, T={args.temperature:g}, alpha={args.alpha:g})": f"[{prune}, {distill}]",
    }
    return {label: ("baseline", ["name=distill-vs-finetune", f"stages={stages}"]) for label, stages in arms.items()}


if __name__ == "__main__":
    args = parse_args(__doc__, options)
    run_all(variants(args), args, "bench/distill.py")

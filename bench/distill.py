"""Issue #6 benchmark: after a 50% structured prune (no fine-tuning), distillation from the baseline
vs plain fine-tuning, same epochs and learning-rate schedule, from the same pruned model (one cached
prefix), on CIFAR-10 with the default recipe model.

    .venv/bin/python bench/distill.py          (or: make bench-distill)
"""

from __future__ import annotations

from common import parse_args, run_all

PRUNE = "{prune: {method: structured, pruning_ratio: 0.5, importance: group_norm, epochs: 0}}"
TRAINING = "epochs: 6, lr: 0.05, schedule: onecycle"
FINETUNE = f"{{train: {{{TRAINING}, label_smoothing: 0.1}}}}"
DISTILL = f"{{distill: {{{TRAINING}, label_smoothing: 0.1, teacher: baseline, temperature: 4.0, alpha: 0.9}}}}"
VARIANTS = {
    label: ("baseline", ["name=distill-vs-finetune", f"stages={stages}"])
    for label, stages in {
        "pruned, no fine-tune": f"[{PRUNE}]",
        "pruned + fine-tune (CE, 6 ep)": f"[{PRUNE}, {FINETUNE}]",
        "pruned + distill (6 ep)": f"[{PRUNE}, {DISTILL}]",
    }.items()
}


if __name__ == "__main__":
    run_all(VARIANTS, parse_args(__doc__), "bench/distill.py")

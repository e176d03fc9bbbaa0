"""Per-layer sensitivity: each layer changed alone by each technique setting, scored on the validation split."""

"""Search: Optuna over orderings and stage settings under constraints; `config` is the recipe's `search:` block."""

"""Running a recipe's chain: the runner, stage training, the stage cache and every cache key, executors."""

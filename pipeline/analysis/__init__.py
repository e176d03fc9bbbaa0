"""Statistics of measured results: Pareto sets and hypervolume, paired significance tests."""

"""Sweeps: every ordering of a recipe's stages (and seeds, controls), run and compared."""

"""Measuring exits: held-out quality, offline downstream tasks, the lm-eval model type, the speed bench, the quickstart report."""

"""Evaluation: comparing runs (intervals and paired tests from `core.stats`), external validation, subgroups,
batch prediction and the out-of-distribution score."""

"""Evaluation: metrics, statistics (bootstrap intervals, DeLong, McNemar, calibration), comparing runs,
and the HTML report."""

"""How numbers are written for people: intervals, p-values and durations, the same on every page, figure,
table and report. At the bottom of `core/`: it imports nothing of the project."""

from __future__ import annotations

import math


def format_interval(value, low, high, digits: int = 3, signed: bool = False) -> str:
    """'0.520 [0.400, 0.610]' ('+0.52 [...]' when signed); '--' when there is no value."""
    if value is None or not math.isfinite(value):
        return "--"
    sign = "+" if signed else ""
    return f"{value:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def format_p_value(p_value: float) -> str:
    """The one way a p-value is written (tables, figures, readings, reports): '< 0.001' below 0.001,
    else three decimals; '--' when the test could not be run."""
    if p_value is None or not math.isfinite(p_value):
        return "--"
    return "< 0.001" if p_value < 0.001 else f"{p_value:.3f}"


def format_duration(seconds: float) -> str:
    """A duration as people say it: 40 s, 6 min, 1.5 h, 12 h."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    hours = seconds / 3600
    return (f"{hours:.1f}".removesuffix(".0") if hours < 10 else f"{round(hours)}") + " h"

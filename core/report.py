"""The Compare page as one self-contained HTML file (plotly.js inlined once, no network needed)."""

from __future__ import annotations

import html
import time
from pathlib import Path

from core.compare import (
    PAUC_NOTE,
    Comparison,
    best_in_column,
    comparison_figures,
    display_table,
    sensitivity_shortfalls,
)
from core.runs import run_purpose

REPORT_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { border: 1px solid #ddd; padding: 4px 8px; }
th { background: #f1ece6; } td.best { font-weight: bold; background: #e6f2ea; }
.note { color: #555; font-size: 0.9em; }
"""


def table_html(comparison: Comparison) -> str:
    """The metrics table with 95% intervals, as on the page; the best value of each column in bold."""
    shown, best = display_table(comparison), best_in_column(comparison)
    header = "".join(f"<th>{html.escape(title)}</th>" for title in shown.columns)
    rows = []
    for index, row in enumerate(shown.itertuples(index=False)):
        cells = []
        for title, value in zip(shown.columns, row):
            css = ' class="best"' if title in best and best[title][index] else ""
            cells.append(f"<td{css}>{html.escape(str(value))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{header}</tr>{''.join(rows)}</table><p class='note'>{html.escape(PAUC_NOTE)}</p>"


def describe_run(name: str, run: dict) -> str:
    dataset, config = run.get("dataset") or {}, run.get("config") or {}
    return (f"{name}: {run['run_id']} ({run_purpose(run)}), {dataset.get('name')}, {config.get('image_size')} px, "
            f"{config.get('epochs')} epochs, lr {config.get('lr')}, weights {run.get('weights')}")


def report_html(comparison: Comparison, title: str = "Model comparison") -> str:
    """The whole report as one HTML document; the Compare page and `python -m core compare --report`
    both write this, so the same runs at the same operating point give the same report."""
    figures = comparison_figures(comparison)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class='note'>Written {time.strftime('%Y-%m-%d %H:%M')}. Values on the test images, "
             "with 95% bootstrap intervals (test images resampled, seed fixed).</p>",
             f"<p><b>Operating point:</b> {html.escape(comparison.operating_point)}.</p>"]
    parts.extend(f"<p><b>{html.escape(line)}</b></p>" for line in shortfall_lines(comparison))
    if not comparison.paired and len(comparison.entries) > 1:
        parts.append("<p><b>These runs were tested on different images: the comparison is not paired and no "
                     "significance tests are shown.</b></p>")
    parts.append(table_html(comparison))
    parts.extend(f"<p>{html.escape(line)}</p>" for line in comparison.readings)
    for index, (name, figure) in enumerate(figures.items()):
        parts.append(f"<h2>{html.escape(name)}</h2>")
        # Fixed element ids: the same comparison gives a byte-identical report (timestamp aside).
        parts.append(figure.to_html(full_html=False, include_plotlyjs=index == 0, div_id=f"figure-{index}"))
    runs = "".join(f"<li>{html.escape(describe_run(e.name, e.run))}</li>" for e in comparison.entries)
    parts.append(f"<h2>Runs</h2><ul>{runs}</ul>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{REPORT_STYLE}</style></head><body>{''.join(parts)}</body></html>")


def shortfall_lines(comparison: Comparison) -> list[str]:
    """The caveat of a sensitivity target, with the models it concerns (shown on the page and in the report)."""
    shortfalls = sensitivity_shortfalls(comparison)
    if comparison.target_sensitivity is None:
        return []
    line = (f"The thresholds were chosen on validation, so test sensitivity can fall below "
            f"{comparison.target_sensitivity:.2f}")
    if shortfalls:
        line += ": here " + ", ".join(f"{name} {value:.3f}" for name, value in shortfalls)
    return [line + "."]


def write_html_report(comparison: Comparison, path: str | Path, title: str = "Model comparison") -> Path:
    path = Path(path)
    path.write_text(report_html(comparison, title), encoding="utf-8")
    return path

"""The Compare page as one self-contained HTML file (plotly.js inlined once, no network needed)."""

from __future__ import annotations

import html
import time
from pathlib import Path

import numpy as np

from core.compare import COMPARISON_COLUMNS, EXTRA_COLUMNS, Comparison, comparison_figures

REPORT_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { border: 1px solid #ddd; padding: 4px 8px; }
th { background: #f1ece6; } td.best { font-weight: bold; background: #e6f2ea; }
.note { color: #555; font-size: 0.9em; }
"""


def table_html(comparison: Comparison) -> str:
    """The metrics table with 95% intervals; the best value of each column in bold."""
    titles = [title for title, _, _ in COMPARISON_COLUMNS] + [title for title, _ in EXTRA_COLUMNS]
    table = comparison.table
    lower_is_better = {"ECE", "Brier"}
    header = "".join(f"<th>{html.escape(t)}</th>" for t in ["Model", "Threshold", *titles,
                                                            "pAUC (sens >= 0.8)", "ECE", "Brier"])
    rows = []
    for _, row in table.iterrows():
        cells = [f"<td>{html.escape(row['Model'])}</td>", f"<td>{row['Threshold']:.3f}</td>"]
        for title in [*titles, "pAUC (sens >= 0.8)", "ECE", "Brier"]:
            column = table[title].to_numpy(dtype=float)
            best = np.nanmin(column) if title in lower_is_better else np.nanmax(column)
            value = row[title]
            low, high = row.get(f"{title} low", np.nan), row.get(f"{title} high", np.nan)
            text = "--" if not np.isfinite(value) else f"{value:.3f}" + (
                f" [{low:.3f}, {high:.3f}]" if np.isfinite(low) else "")
            css = ' class="best"' if np.isfinite(value) and value == best and len(table) > 1 else ""
            cells.append(f"<td{css}>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{header}</tr>{''.join(rows)}</table>"


def describe_run(name: str, run: dict) -> str:
    dataset, config = run.get("dataset") or {}, run.get("config") or {}
    return (f"{name}: {run['run_id']}, {dataset.get('name')}, {config.get('image_size')} px, "
            f"{config.get('epochs')} epochs, lr {config.get('lr')}, weights {run.get('weights')}")


def write_html_report(comparison: Comparison, path: str | Path, title: str = "Model comparison") -> Path:
    path = Path(path)
    figures = comparison_figures(comparison)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class='note'>Written {time.strftime('%Y-%m-%d %H:%M')}. Values on the test images, "
             "with 95% bootstrap intervals (test images resampled, seed fixed).</p>"]
    if not comparison.paired and len(comparison.entries) > 1:
        parts.append("<p><b>These runs were tested on different images: the comparison is not paired and no "
                     "significance tests are shown.</b></p>")
    parts.append(table_html(comparison))
    parts.extend(f"<p>{html.escape(line)}</p>" for line in comparison.readings)
    for index, (name, figure) in enumerate(figures.items()):
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(figure.to_html(full_html=False, include_plotlyjs=index == 0))
    runs = "".join(f"<li>{html.escape(describe_run(e.name, e.run))}</li>" for e in comparison.entries)
    parts.append(f"<h2>Runs</h2><ul>{runs}</ul>")
    document = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{REPORT_STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path.write_text(document, encoding="utf-8")
    return path

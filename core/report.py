"""The Compare page as one self-contained HTML file (plotly.js inlined once, no network needed)."""

from __future__ import annotations

import html
import time
from pathlib import Path

from core.audit import summary
from core.audit.outputs import artefact_table, faithfulness_table, localisation_table, randomisation_table
from core.audit.runner import CHECK_NAMES, latest_stored_audit
from core.evaluation.compare import (
    PAUC_NOTE,
    Comparison,
    best_in_column,
    comparison_figures,
    describe_test_set,
    display_table,
    sensitivity_shortfalls,
)
from core.figures import artefact_heatmap_figure, audit_localisation_figure, faithfulness_figure, randomisation_figure
from core.runs import run_purpose

REPORT_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { border: 1px solid #ddd; padding: 4px 8px; }
th { background: #f1ece6; } td.best { font-weight: bold; background: #e6f2ea; }
.note { color: #555; font-size: 0.9em; }
td.fails { font-weight: bold; color: #fff; background: #b5483b; }
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
             f"<p class='note'>Written {time.strftime('%Y-%m-%d %H:%M')}. Values on the "
             f"{html.escape(describe_test_set(comparison))}, with 95% bootstrap intervals (its images resampled, "
             "seed fixed).</p>",
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
    parts.extend(audit_section_html(comparison, first_figure=len(figures)))
    runs = "".join(f"<li>{html.escape(describe_run(e.name, e.run))}</li>" for e in comparison.entries)
    parts.append(f"<h2>Runs</h2><ul>{runs}</ul>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{REPORT_STYLE}</style></head><body>{''.join(parts)}</body></html>")


def frame_html(table, highlight: dict[str, str] | None = None) -> str:
    """A table of text cells; `highlight` maps a cell's text to its CSS class (the FAILS verdict)."""
    highlight = highlight or {}
    header = "".join(f"<th>{html.escape(str(title))}</th>" for title in table.columns)
    rows = []
    for row in table.itertuples(index=False):
        cells = []
        for value in row:
            css = f' class="{highlight[value]}"' if isinstance(value, str) and value in highlight else ""
            cells.append(f"<td{css}>{html.escape(str(value))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{header}</tr>{''.join(rows)}</table>"


def audit_section_html(comparison: Comparison, first_figure: int) -> list[str]:
    """The compared runs' newest stored explanation audit (nothing when they have none): the sanity verdicts,
    the artefact test, localisation and faithfulness, each with what it was computed on."""
    if comparison.store is None or not comparison.entries:
        return []
    audit = latest_stored_audit(comparison.store, [entry.run for entry in comparison.entries])
    if not audit.records:
        return []
    sections = {
        "randomisation": (summary.sanity_display, randomisation_table,
                          lambda table: randomisation_figure(table, summary.fail_threshold(audit))),
        "artefacts": (summary.artefact_display, artefact_table, artefact_heatmap_figure),
        "localisation": (summary.localisation_display, localisation_table, audit_localisation_figure),
        "faithfulness": (summary.faithfulness_display, faithfulness_table, faithfulness_figure),
    }
    parts = ["<h2>Explanation audit</h2>",
             "<p class='note'>The newest audit results stored with these runs (<code>python -m core audit</code> "
             "or the Audit page); maps explain the malignant class, faithfulness each image's predicted class.</p>"]
    index = first_figure
    for check, (display, figure_table, draw) in sections.items():
        parts.append(f"<h3>{html.escape(CHECK_NAMES[check])}</h3>")
        if not audit.records_of(check):
            parts.append(f"<p class='note'>{html.escape(summary.missing_text(check))}</p>")
            continue
        parts.append(f"<p class='note'>{html.escape(summary.computed_on(audit, check))} "
                     f"{html.escape(summary.reading(check, audit))}</p>")
        if check == "faithfulness":
            parts.append(f"<p class='note'>{html.escape(summary.baseline_line(audit))}</p>")
        parts.append(frame_html(display(audit), {"FAILS": "fails"}))
        parts.append(draw(figure_table(audit)).to_html(full_html=False, include_plotlyjs=index == 0,
                                                       div_id=f"figure-{index}"))
        index += 1
    return parts


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

"""The explanation audit as people read it: tables with their intervals as text, what each check's results
were computed on, one sentence on how to read each, the files to download and a rough time estimate.
The Audit page and the Compare page's HTML report both use these, so they say the same thing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from core.audit.maps import method_display_name
from core.audit.outputs import (
    artefact_table,
    describe_audit,
    faithfulness_table,
    localisation_table,
    per_image_table,
    sanity_table,
)
from core.audit.randomisation import FAIL_SPEARMAN
from core.audit.runner import CHECK_NAMES, CHECKS, Audit, AuditSettings, planned_steps
from core.audit.store import stored_results
from core.formatting import format_duration, format_interval
from core.runs import RunStore, _json_safe

# How to read each check, one sentence each (the page's and the report's).
CHECK_READINGS = {
    "randomisation": "A map that depends on the model falls towards 0 as the model's layers are randomised "
                     "(head first, the whole network last); a method still above {threshold} after the whole "
                     "network is randomised FAILS: its maps show the image, not what the model learnt.",
    "artefacts": "Pasting an artefact beside the lesion of a benign image should not move P(malignant): a red cell "
                 "whose interval excludes 0 is a shortcut, and CAM energy on the artefact well above the "
                 "artefact's own area share means the map looks at it.",
    "localisation": "A map that looks at the lesion puts more of its energy inside it than the lesion's own area "
                    "share (what a map blind to the lesion scores); pointing game: the share of maps whose peak "
                    "lies inside the lesion.",
    "faithfulness": "Deleting the pixels a faithful map ranks first makes the prediction fall fast (low deletion "
                    "area); inserting them first restores it fast (high insertion area). Ranked by insertion "
                    "minus deletion.",
}
BASELINE_NAMES = {"blur": "blurred image", "mean": "mean colour", "zero": "black"}
BASELINE_PHRASES = {"blur": "a blurred copy of the image", "mean": "the image's mean colour", "zero": "black"}
NO_VERDICT = "no verdict"  # the trained model's maps were all zero: nothing to compare after randomisation
INTERVALS_NOTE = "Each value with its 95% interval over the images."


def interval_text(value, low, high, digits: int = 2, signed: bool = False) -> str:
    """0.52 [0.40, 0.61]; '--' when there is no value (two decimals: the audit's tables)."""
    return format_interval(value, low, high, digits, signed)


def _share(value) -> str:
    return "--" if value is None or not math.isfinite(value) else f"{value:.0%}"


def _span(values: list) -> str:
    """'20', or '12–20' when the results differ."""
    values = sorted(set(values))
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def computed_on(audit: Audit, check: str) -> str:
    """What a check's shown results were computed on: images, seed, its own settings and when."""
    records = audit.records_of(check)
    if not records:
        return ""
    images = _span([len(record["images"]) for record in records])
    seeds = ", ".join(str(seed) for seed in sorted({record.get("seed") for record in records}, key=str))
    what = {"artefacts": "benign test images", "localisation": "test images with a lesion mask"}.get(check,
                                                                                                     "test images")
    parts = [f"{images} {what} per run (seed {seeds})"]
    settings = [record.get("settings") or {} for record in records]
    if check == "randomisation":
        parts.append(f"{_span([s.get('steps') for s in settings if s.get('steps')] or ['?'])} randomisation steps")
    elif check == "artefacts":
        methods = sorted({method_display_name(record["method"]).split(" (")[0] for record in records})
        parts.append(f"maps by {', '.join(methods)}")
    elif check == "localisation":
        sources = sorted({s.get("masks", "?") for s in settings})
        parts.append(f"masks: {', '.join(sources)}")
    elif check == "faithfulness":
        parts.append(f"{', '.join(sorted({s.get('baseline', '?') for s in settings}))} baseline")
    saved = sorted(record.get("saved_at", "") for record in records if record.get("saved_at"))
    if saved:
        first, last = (stamp.replace("T", " ")[:16] for stamp in (saved[0], saved[-1]))
        if first == last:
            parts.append(f"computed {first}")
        else:  # the same day is said once: 2026-11-27 05:36–05:41
            parts.append(f"computed {first}–{last[11:] if last[:10] == first[:10] else last}")
    return "On " + "; ".join(parts) + "."


def fail_threshold(audit: Audit) -> float:
    values = [record["summary"].get("fail_threshold") for record in audit.records_of("randomisation")]
    return next((float(value) for value in values if value is not None), FAIL_SPEARMAN)


def reading(check: str, audit: Audit | None = None) -> str:
    threshold = fail_threshold(audit) if audit is not None else FAIL_SPEARMAN
    return f"{CHECK_READINGS[check].format(threshold=threshold)} {INTERVALS_NOTE}"


def missing_text(check: str) -> str:
    """What to say when the chosen runs have no stored result of a check."""
    if check == "localisation":
        return ("No localisation results for these runs: localisation is skipped when the audited images have no "
                "lesion masks (give a folder of masks, <image_id>_segmentation.png, and run the audit), or the "
                "check was not chosen.")
    return f"No {CHECK_NAMES[check].lower()} results for these runs yet: choose it under Checks and run the audit."


def sanity_display(audit: Audit) -> pd.DataFrame:
    """The verdict per model and method: FAILS or passes, and the similarities behind it."""
    table = sanity_table(audit)
    if table.empty:
        return table
    table = table.drop(columns=["run_id"])
    # A NaN similarity is no evidence either way: the engine's 'passes' would read as a clean bill of health.
    table.loc[table["Spearman, all randomised"] == "--", "Verdict"] = NO_VERDICT
    return table


def artefact_display(audit: Audit) -> pd.DataFrame:
    table = artefact_table(audit)
    if table.empty:
        return table
    return pd.DataFrame({
        "Model": table["Model"], "Artefact": table["Artefact"],
        "ΔP(malignant)": [interval_text(row.mean_change, row.low, row.high, signed=True)
                                   for row in table.itertuples()],
        "Flipped to malignant": table["flipped"].map(_share),
        "CAM energy on artefact": table["cam_energy_on_artefact"].map(_share),
        "Artefact area": table["artefact_area"].map(_share),
        "Images": table["images"],
    })


def localisation_display(audit: Audit) -> pd.DataFrame:
    table = localisation_table(audit)
    if table.empty:
        return table
    share = next((record["settings"].get("top_share") for record in audit.records_of("localisation")), 0.2)
    columns = {"energy_inside": "Energy inside lesion", "pointing_game": "Pointing game",
               "relevance_rank": "Relevance rank", "top_iou": f"Top-{share:.0%} IoU"}
    shown = {"Model": table["Model"], "Method": table["Method"]}
    for measure, title in columns.items():
        shown[title] = [interval_text(*(getattr(row, name) for name in (
            measure, f"{measure}_low", f"{measure}_high"))) for row in table.itertuples()]
    shown["Lesion area"] = table["lesion_area"].map(_share)
    shown["Images"] = table["images"]
    return pd.DataFrame(shown)


def faithfulness_display(audit: Audit) -> pd.DataFrame:
    table = faithfulness_table(audit)
    if table.empty:
        return table
    return pd.DataFrame({
        "Rank": table["Rank"], "Model": table["Model"], "Method": table["Method"],
        "Insertion − deletion": [interval_text(row.score, row.score_low, row.score_high, signed=True)
                                 for row in table.itertuples()],
        "Deletion AUC ↓": [interval_text(row.deletion, row.deletion_low, row.deletion_high)
                           for row in table.itertuples()],
        "Insertion AUC ↑": [interval_text(row.insertion, row.insertion_low, row.insertion_high)
                            for row in table.itertuples()],
        "Baseline": table["baseline"],
        "Images": table["images"],
    })


def baseline_line(audit: Audit) -> str:
    baselines = sorted({record["summary"].get("baseline", "?") for record in audit.records_of("faithfulness")})
    named = "; ".join(f"{BASELINE_PHRASES.get(name, name)} (the {name} baseline)" for name in baselines)
    return f"Removed pixels are replaced by {named}. ↓: lower is better, ↑: higher is better."


def audit_files(audit: Audit) -> list[tuple[str, str, str]]:
    """(file name, content, MIME type): audit.json, settings.json and one per-image CSV per check, as
    `python -m core audit --out` writes them."""
    files = [("audit.json", json.dumps(_json_safe(audit.report), indent=2, allow_nan=False), "application/json"),
             ("settings.json", json.dumps(_json_safe(describe_audit(audit)), indent=2, allow_nan=False),
              "application/json")]
    for check in CHECKS:
        table = per_image_table(audit, check)
        if not table.empty:
            files.append((f"{check}.csv", table.to_csv(index=False), "text/csv"))
    return files


def estimate_audit_seconds(store: RunStore, runs: list[dict], settings: AuditSettings) -> tuple[float, int]:
    """(seconds, steps without a timing): the time the planned steps took in earlier audits of the same
    runs, scaled to the image count; an upper bound, since results stored with the same settings are reused."""
    seconds, unknown = 0.0, 0
    for run in runs:
        folder = Path(store.root) / run["run_id"]
        planned = [(check, method) for method in settings.methods
                   for check in ("randomisation", "localisation", "faithfulness") if check in settings.checks]
        if "artefacts" in settings.checks:
            planned.append(("artefacts", settings.methods[0]))
        for check, method in planned:
            timed = [record for record in stored_results(folder, check, method)
                     if record.get("seconds") and record.get("images")]
            if not timed:
                unknown += 1
                continue
            seconds += float(timed[0]["seconds"]) * settings.images / max(len(timed[0]["images"]), 1)
    return seconds, unknown


def describe_plan(store: RunStore, runs: list[dict], settings: AuditSettings) -> str:
    """One line before an audit is queued: its steps and, when earlier audits timed them, how long."""

    steps = planned_steps(runs, settings)
    line = (f"{len(runs)} run(s) × {len(settings.methods)} method(s), {len(settings.checks)} check(s) on "
            f"{settings.images} test images: {steps} step{'s' if steps != 1 else ''}. Results already stored with "
            "the same images, seed and settings are reused, not computed again")
    seconds, unknown = estimate_audit_seconds(store, runs, settings)
    if unknown == 0:
        return line + f"; computing everything would take roughly {format_duration(seconds)} (from earlier " \
                      "audits of these runs; loading each model and other work on this machine add to it)."
    if seconds > 0:
        return line + f"; the {steps - unknown} steps timed before take about {format_duration(seconds)}, the " \
                      f"other {unknown} are new."
    return line + "; no earlier audit of these runs to time it by."



def sanity_flag(method_name: str, verdict: dict) -> tuple[bool, str]:
    """(fails, text) shown under a model's map on the Explain page, from `core.audit.store.sanity_verdict`."""
    spearman = verdict.get("final_spearman")
    if not isinstance(spearman, (int, float)) or not math.isfinite(spearman):
        return False, f"No sanity-check verdict: its trained {method_name} maps were all zero on the audited images."
    if verdict.get("fails"):
        return True, (f"{method_name} fails the randomisation sanity check for this model (Spearman {spearman:.2f} "
                      "with the trained maps after the whole network is randomised): do not trust this map.")
    return False, f"Passes the randomisation sanity check (Spearman {spearman:.2f})."

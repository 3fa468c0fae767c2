"""An audit as tables, files and figures: what the Audit page shows, `python -m core audit --out DIR` writes
(audit.json, settings.json, one CSV per check, PNG figures) and the Compare page's report includes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from core.audit.artefacts import ARTEFACT_NAMES
from core.audit.maps import method_display_name
from core.audit.runner import CHECKS, LOCALISATION_MEASURES, Audit
from core.audit.store import load_arrays
from core.cams import overlay
from core.formatting import format_interval
from core.models import get_model_spec
from core.runs import _json_safe


def _model_name(record: dict) -> str:
    return get_model_spec(record["model"]).display_name


def _method_name(method: str) -> str:
    return method_display_name(method).split(" (")[0]


def randomisation_table(audit: Audit) -> pd.DataFrame:
    """One row per run, method and step; step 0 is the trained model itself (similarity 1)."""
    rows = []
    for record in audit.records_of("randomisation"):
        base = {"run_id": record["run_id"], "Model": _model_name(record), "Method": _method_name(record["method"]),
                "method": record["method"]}
        rows.append({**base, "step": 0, "randomised": "nothing (trained)", "spearman": 1.0, "spearman_low": 1.0,
                     "spearman_high": 1.0, "ssim": 1.0, "ssim_low": 1.0, "ssim_high": 1.0})
        rows += [{**base, **{key: step[key] for key in ("step", "randomised", "spearman", "spearman_low",
                                                         "spearman_high", "ssim", "ssim_low", "ssim_high")}}
                 for step in record["summary"]["steps"]]
    return pd.DataFrame(rows)


def sanity_table(audit: Audit) -> pd.DataFrame:
    """Per run and method: the verdict, the similarity after the whole network is randomised and the
    other-class check."""
    rows = []
    for record in audit.records_of("randomisation"):
        summary, other = record["summary"], record["summary"]["other_class"]
        last = summary["steps"][-1]
        rows.append({"Model": _model_name(record), "Method": _method_name(record["method"]),
                     "Verdict": {True: "FAILS", False: "passes", None: "no verdict"}[summary["fails"]],
                     "Spearman, all randomised": format_interval(last["spearman"], last["spearman_low"],
                                                                 last["spearman_high"], 2),
                     "SSIM, all randomised": format_interval(last["ssim"], last["ssim_low"], last["ssim_high"], 2),
                     "Spearman, other class": format_interval(other["spearman"], other["spearman_low"],
                                                              other["spearman_high"], 2),
                     "Images": len(record["images"]), "run_id": record["run_id"]})
    return pd.DataFrame(rows)


def artefact_table(audit: Audit) -> pd.DataFrame:
    rows = []
    for record in audit.records_of("artefacts"):
        for kind, summary in record["summary"].items():
            rows.append({"run_id": record["run_id"], "Model": _model_name(record), "Artefact": ARTEFACT_NAMES[kind],
                         "kind": kind, **{key: summary[key] for key in (
                             "mean_change", "low", "high", "flipped", "cam_energy_on_artefact", "artefact_area",
                             "images")}})
    return pd.DataFrame(rows)


def localisation_table(audit: Audit) -> pd.DataFrame:
    rows = []
    for record in audit.records_of("localisation"):
        summary = record["summary"]
        rows.append({"run_id": record["run_id"], "Model": _model_name(record), "Method": _method_name(record["method"]),
                     **{key: summary.get(key) for measure in LOCALISATION_MEASURES
                        for key in (measure, f"{measure}_low", f"{measure}_high")},
                     "lesion_area": summary["lesion_area"], "images": summary["images"]})
    return pd.DataFrame(rows)


def faithfulness_table(audit: Audit) -> pd.DataFrame:
    """Per run and method, ranked by insertion minus deletion (1 = most faithful)."""
    rows = []
    for record in audit.records_of("faithfulness"):
        summary = record["summary"]
        rank = audit.report.get("faithfulness", {}).get(record["run_id"], {}).get(record["method"], {}).get("rank")
        rows.append({"run_id": record["run_id"], "Model": _model_name(record), "Method": _method_name(record["method"]),
                     "Rank": rank, "baseline": summary["baseline"],
                     **{key: summary[key] for name in ("deletion", "insertion", "score", "road") if name in summary
                        for key in (name, f"{name}_low", f"{name}_high")}, "images": summary["images"]})
    table = pd.DataFrame(rows)
    return table.sort_values("Rank") if not table.empty else table


def per_image_table(audit: Audit, check: str) -> pd.DataFrame:
    """Every per-image row of a check, with its run, model and method: the check's CSV."""
    rows = [{"run_id": record["run_id"], "model": record["model"], "method": record["method"], **row}
            for record in audit.records_of(check) for row in record["per_image"]]
    return pd.DataFrame(rows)


def artefact_examples(audit: Audit, opacity: float = 0.5) -> np.ndarray | None:
    """The before/after grid as one image (`core.figures.image_table`): artefacts across; down, the benign
    example as pasted, then each model's malignant-class map of it (one colour scale per model), captioned
    with the model's P(malignant) of that image. None without an artefact test."""
    from core.figures import image_table

    records = [record for record in audit.records_of("artefacts") if record.get("path")]
    stored = [(record, load_arrays(record["path"])) for record in records]
    stored = [(record, arrays) for record, arrays in stored if "before" in arrays]
    if not stored:
        return None
    kinds = [kind for kind in stored[0][0]["summary"] if kind in stored[0][1]]
    images = [stored[0][1]["before"]] + [stored[0][1][kind] for kind in kinds]
    rows, titles, captions = [images], ["image"], [[""] * len(images)]
    for record, arrays in stored:
        maps = [arrays["before_map"]] + [arrays.get(f"{kind}_map", np.zeros_like(arrays["before_map"]))
                                         for kind in kinds]
        top = max(float(cam.max()) for cam in maps) or 1.0
        own_images = [arrays["before"]] + [arrays.get(kind, arrays["before"]) for kind in kinds]
        rows.append([overlay(image, np.clip(cam / top, 0, 1), opacity) for image, cam in zip(own_images, maps)])
        titles.append(_model_name(record))
        captions.append(_example_probabilities(record, kinds))
    return image_table(["without"] + [ARTEFACT_NAMES[kind] for kind in kinds], titles, rows, captions=captions)


def _example_probabilities(record: dict, kinds: list[str]) -> list[str]:
    """'P 0.12' without the artefact, then with each: the model's P(malignant) of the example image."""
    example = record["images"][0] if record.get("images") else None
    rows = {row["artefact"]: row for row in record["per_image"] if row.get("image_id") == example}
    if not rows:
        return [""] * (len(kinds) + 1)
    first = next(iter(rows.values()))
    return [f"P {first['before']:.2f}"] + [f"P {rows[kind]['after']:.2f}" if kind in rows else "" for kind in kinds]


def write_audit_outputs(audit: Audit, out_dir: str | Path) -> list[Path]:
    """audit.json, settings.json, one CSV per check and the figures as PNG; returns the paths written,
    audit.json first."""
    from PIL import Image

    from core.figures import artefact_heatmap_png, grouped_bars_png, randomisation_png

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot write to {out}: {error.strerror or error}") from None
    paths = [out / "audit.json", out / "settings.json"]
    paths[0].write_text(json.dumps(_json_safe(audit.report), indent=2, allow_nan=False))
    paths[1].write_text(json.dumps(_json_safe(describe_audit(audit)), indent=2, allow_nan=False))
    for check in CHECKS:
        table = per_image_table(audit, check)
        if not table.empty:
            paths.append(out / f"{check}.csv")
            table.to_csv(paths[-1], index=False)
    figures = {
        "randomisation.png": (randomisation_table, randomisation_png),
        "artefacts.png": (artefact_table, artefact_heatmap_png),
        "localisation.png": (localisation_table, lambda table, path: grouped_bars_png(
            table, {"energy_inside": "energy inside", "pointing_game": "pointing game",
                    "relevance_rank": "relevance rank", "top_iou": "top-k% IoU"}, path,
            "Localisation against lesion masks", float(table["lesion_area"].mean()))),
        "faithfulness.png": (faithfulness_table, lambda table, path: grouped_bars_png(
            table, {"deletion": "deletion AUC (lower is better)", "insertion": "insertion AUC (higher is better)"},
            path, f"Faithfulness ({table['baseline'].iloc[0]} baseline)")),
    }
    for name, (make_table, draw) in figures.items():
        table = make_table(audit)
        if not table.empty:
            draw(table, out / name)
            paths.append(out / name)
    examples = artefact_examples(audit)
    if examples is not None:
        Image.fromarray(examples).save(out / "artefact_examples.png")
        paths.append(out / "artefact_examples.png")
    return paths


def describe_audit(audit: Audit) -> dict:
    """settings.json: which runs, methods, images and seeds each result used, and the notes."""
    return {
        "runs": [{"run_id": run["run_id"], "model": run["model"]} for run in audit.runs],
        "results": [{"check": r["check"], "run_id": r["run_id"], "method": r["method"], "seed": r["seed"],
                     "images": len(r["images"]), "settings": r["settings"], "seconds": r.get("seconds"),
                     "saved_at": r.get("saved_at")} for r in audit.records],
        "notes": audit.notes, "computed": audit.computed, "reused": audit.reused, "seconds": audit.seconds,
    }

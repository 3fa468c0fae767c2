"""The Explain page in a real browser: each tile's P(malignant) is the run's stored prediction, the row
lines up, the colour scale has a bar, the lesion outline is on. (Score-CAM's progress per forward pass is
tested in test_cams.py: in a browser its pace depends on the machine.)"""

import re

from browser_support import ARTIFACTS, BROWSER_TEST, go_to, no_exceptions

from core.models import MODEL_REGISTRY

pytestmark = BROWSER_TEST


def tile_probabilities(page) -> list[float]:
    captions = [text for text in page.locator("[data-testid='stCaptionContainer']").all_inner_texts()
                if text.startswith("P(malignant)")]
    return [float(re.search(r"P\(malignant\) ([0-9.]+)", text).group(1)) for text in captions]


def test_explain_shows_the_stored_predictions_in_an_aligned_row(five_runs, dashboard, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(dashboard)
    page.get_by_role("heading", name="Data", level=1).wait_for(timeout=60_000)
    go_to(page, "Explain")
    page.get_by_role("button", name="Download the figure (PNG)").wait_for(timeout=180_000)
    no_exceptions(page)
    page.screenshot(path=str(ARTIFACTS / "explain.png"), full_page=True)

    runs = {run["model"]: run for run in five_runs.list_runs()}
    order = [name for name in MODEL_REGISTRY if name in runs]
    reference = five_runs.predictions(runs[order[0]]["run_id"]).query("split == 'test'")
    image_id = reference["image_id"].iloc[0]
    stored = [float(five_runs.predictions(runs[name]["run_id"]).set_index("image_id").loc[image_id, "prob_malignant"])
              for name in order]
    shown = tile_probabilities(page)
    assert len(shown) == len(stored)
    assert all(abs(s - round(p, 3)) < 1e-9 for s, p in zip(shown, stored)), (shown, stored)
    picked = page.get_by_role("combobox", name=re.compile(r"^Image \(")).input_value()
    assert picked.startswith(f"{image_id} · ") and f"P(malignant) {shown[0]:.3f} by" in picked, picked

    titles = [page.locator("[data-testid='stMarkdownContainer'] strong", has_text=re.compile(f"^{name}$")).first
              for name in (MODEL_REGISTRY[model].display_name for model in order)]
    assert len({round(title.bounding_box()["y"]) for title in titles}) == 1, "titles in one row"
    heatmaps = page.locator("[data-testid='stImage'] img")
    assert len({round(heatmaps.nth(index).bounding_box()["y"]) for index in range(len(order))}) == 1
    assert page.get_by_text("Colour scale, each map to its own maximum").count() == 1
    assert page.get_by_role("switch", name="Lesion outline").is_checked()

    page.get_by_text("Shared scale", exact=True).click()
    page.get_by_text("Colour scale, shared by all maps").wait_for(timeout=60_000)
    no_exceptions(page)


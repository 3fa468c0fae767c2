"""The artefact (shortcut) test: does a model call a benign lesion malignant because of what lies beside it?

Surgical ink markings raise the melanoma scores of benign nevi (Winkler et al., JAMA Dermatology 2019);
rulers, dark corners, gel bubbles and hair are known dermoscopy artefacts (Bissoto et al.). Each is
pasted outside the lesion of every benign test image, and the test reports how P(malignant) moves, how
many images cross the run's decision threshold, and how much of the map's energy lands on the artefact.
"""

from __future__ import annotations

import numpy as np

from core.audit.artefacts import ARTEFACT_KINDS, paste_artefact
from core.audit.maps import compute_maps, predict
from core.cams import CamExplainer, energy_inside
from core.stats.uncertainty import mean_interval


def paste_everywhere(images: np.ndarray, masks: np.ndarray | None, kind: str,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The artefact pasted on every image (each from its own generator, so an image's artefact does not
    depend on which other images are audited): (images, footprints N x H x W bool)."""
    kind_number = ARTEFACT_KINDS.index(kind)
    pasted, footprints = [], []
    for index, image in enumerate(images):
        rng = np.random.default_rng([seed, kind_number, index])
        new, footprint = paste_artefact(image, kind, rng, None if masks is None else masks[index])
        pasted.append(new)
        footprints.append(footprint)
    return np.stack(pasted), np.stack(footprints)


def artefact_test(explainer: CamExplainer, images: np.ndarray, masks: np.ndarray | None, threshold: float,
                  kinds=ARTEFACT_KINDS, method: str = "gradcam", seed: int = 0, example: int = 0,
                  stop=None) -> dict:
    """The test on benign images (uint8 at the model's input size) with their lesion masks, if any.
    Returns a summary per artefact kind, per-image rows, and the before/after images and maps of image
    `example` for the example grid."""
    before = predict(explainer, images)
    example_before = compute_maps(explainer, images[example:example + 1], method, 1)[0]
    summaries, rows, examples = {}, [], {"before": images[example], "before_map": example_before}
    for kind in kinds:
        if stop is not None and stop.is_set():
            raise InterruptedError("stopped")
        pasted, footprints = paste_everywhere(images, masks, kind, seed)
        after = predict(explainer, pasted)
        maps = compute_maps(explainer, pasted, method, 1)
        on_artefact = np.array([energy_inside(cam, footprint) for cam, footprint in zip(maps, footprints)])
        change = mean_interval(after - before, seed=seed)
        energy = mean_interval(on_artefact, seed=seed)
        summaries[kind] = {
            "mean_change": change.value, "low": change.low, "high": change.high,
            "flipped": float(np.mean((before < threshold) & (after >= threshold))),
            "cam_energy_on_artefact": energy.value, "cam_energy_low": energy.low, "cam_energy_high": energy.high,
            "artefact_area": float(footprints.mean()), "cam_method": method, "images": len(images),
        }
        rows += [{"artefact": kind, "image": index, "before": float(b), "after": float(a),
                  "change": float(a - b), "flipped": bool(b < threshold <= a),
                  "cam_energy_on_artefact": float(e), "artefact_area": float(f.mean())}
                 for index, (b, a, e, f) in enumerate(zip(before, after, on_artefact, footprints))]
        examples[kind] = pasted[example]
        examples[f"{kind}_map"] = maps[example]
    return {"summary": summaries, "per_image": rows, "examples": examples, "threshold": threshold}

"""The randomisation sanity check (Adebayo et al., NeurIPS 2018, "Sanity checks for saliency maps").

A map that explains the model must change when the model's learnt weights are destroyed. Cascading
model-parameter randomisation re-initialises the network from the output down (head, last stage, ...,
the whole network) and compares each step's maps with the trained model's maps by Spearman rank
correlation and SSIM. A method whose maps stay similar after the whole network is randomised fails the
check: what it shows does not come from what the model learnt. The other-class check compares the map
for the malignant class with the map for the benign class on the trained model.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from scipy import stats as scipy_stats
from torch import nn

from core.audit.localisation import structural_similarity
from core.audit.maps import compute_maps, scaled_to_unit
from core.cams import CamExplainer
from core.models import get_model_spec
from core.stats.uncertainty import mean_interval

# Spearman above this after the whole network is randomised: the maps do not depend on the model.
FAIL_SPEARMAN = 0.5
DEFAULT_STEPS = 4


def cumulative_cuts(stage_count: int, steps: int) -> list[int]:
    """How many stages (from the output down) are randomised at each step: the head alone first, the
    whole network last, the steps between spread evenly."""
    steps = max(2, min(steps, stage_count))
    return sorted({int(round(cut)) for cut in np.linspace(1, stage_count, steps)})


def randomise_modules(modules: list[nn.Module], generator_seed: int) -> None:
    """Re-initialise every layer of the modules as PyTorch initialises a new one (BatchNorm back to its
    identity and fresh running statistics), from a seeded generator so that the check repeats. On a GPU
    the layers draw from its generator, whose state is restored afterwards as the CPU's is."""
    gpus = sorted({p.device.index for module in modules for p in module.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(generator_seed)
        for module in modules:
            for layer in module.modules():
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
                if hasattr(layer, "reset_running_stats"):
                    layer.reset_running_stats()


def similarity_rows(originals: np.ndarray, others: np.ndarray) -> list[dict]:
    """Per image: Spearman rank correlation and SSIM of two maps, each scaled to [0, 1]. An image whose
    original map is all zero has nothing to compare (NaN); a flat map after randomisation keeps none of the
    original's ranking, so its rank correlation counts as 0."""
    rows = []
    for original, other in zip(originals, others):
        if float(original.max()) <= 1e-12:
            rows.append({"spearman": math.nan, "ssim": math.nan})
            continue
        if np.ptp(other) == 0 or np.ptp(original) == 0:
            spearman = 0.0
        else:
            spearman = float(scipy_stats.spearmanr(original.ravel(), other.ravel()).statistic)
        rows.append({"spearman": spearman,
                     "ssim": structural_similarity(scaled_to_unit(original), scaled_to_unit(other))})
    return rows


def summarise(rows: list[dict], seed: int) -> dict:
    spearman = mean_interval([row["spearman"] for row in rows], seed=seed)
    ssim = mean_interval([row["ssim"] for row in rows], seed=seed)
    return {"spearman": spearman.value, "spearman_low": spearman.low, "spearman_high": spearman.high,
            "ssim": ssim.value, "ssim_low": ssim.low, "ssim_high": ssim.high}


def randomisation_check(model: nn.Module, model_name: str, images: np.ndarray, method: str,
                        original_maps: np.ndarray | None = None, steps: int = DEFAULT_STEPS, seed: int = 0,
                        stop=None) -> dict:
    """The cascading randomisation of one trained model for one method on N images (uint8 at the model's
    input size). Maps explain the malignant class. Returns the summary per step, the other-class check,
    whether the method fails, and the per-image rows."""
    explainer = CamExplainer(model, model_name, image_size=images.shape[1])
    originals = original_maps if original_maps is not None else compute_maps(explainer, images, method, 1)
    other_class = similarity_rows(originals, compute_maps(explainer, images, method, 0))
    randomised = copy.deepcopy(model).float().eval()
    stages = get_model_spec(model_name).parameter_stages(randomised)
    total_parameters = sum(p.numel() for p in randomised.parameters())
    step_summaries, per_image, done = [], [], 0
    for number, cut in enumerate(cumulative_cuts(len(stages), steps), start=1):
        if stop is not None and stop.is_set():
            raise InterruptedError("stopped")
        for offset, (_, modules) in enumerate(stages[done:cut], start=done):
            randomise_modules(modules, seed * 1000 + offset)
        done = cut
        layers = " + ".join(name for name, _ in stages[:cut])
        randomised_share = sum(p.numel() for _, modules in stages[:cut] for m in modules
                               for p in m.parameters()) / total_parameters
        randomised_explainer = CamExplainer(randomised, model_name, image_size=images.shape[1])
        rows = similarity_rows(originals, compute_maps(randomised_explainer, images, method, 1))
        step_summaries.append({"step": number, "randomised": layers, "stages": cut,
                               "parameter_share": randomised_share, **summarise(rows, seed)})
        per_image += [{"step": number, "image": index, **row} for index, row in enumerate(rows)]
    final = step_summaries[-1]["spearman"]
    return {
        "steps": step_summaries,
        "other_class": summarise(other_class, seed),
        "final_spearman": final,
        # None: no verdict, the trained model's maps were all zero (nothing to compare).
        "fails": bool(final > FAIL_SPEARMAN) if math.isfinite(final) else None,
        "fail_threshold": FAIL_SPEARMAN,
        "per_image": per_image,
        "other_class_per_image": other_class,
    }

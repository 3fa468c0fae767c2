"""Which test image a student is asked about next."""

from __future__ import annotations

import numpy as np
import pandas as pd


def quiz_pool(test_ids_per_run: list[pd.Index | list[str]]) -> list[str]:
    """The test images every compared run has a stored prediction for, in the first run's order: the
    models' answers on them are their own test predictions, never an image they trained on."""
    if not test_ids_per_run:
        return []
    common = set(test_ids_per_run[0])
    for ids in test_ids_per_run[1:]:
        common &= set(ids)
    return [image_id for image_id in test_ids_per_run[0] if image_id in common]


def next_image(pool: list[str], chosen: list[str], answered: list[str], rng: np.random.Generator) -> str | None:
    """The next image for a student: the teacher's `chosen` images in order (those in the pool), skipping what
    this student `answered`; None when the set is done. Without a set, a random image of the pool, one not
    answered yet while there are any, and any again after that."""
    done = set(answered)
    if chosen:
        return next((image_id for image_id in chosen if image_id in pool and image_id not in done), None)
    if not pool:
        return None
    fresh = [image_id for image_id in pool if image_id not in done]
    candidates = fresh or pool
    return candidates[int(rng.integers(len(candidates)))]

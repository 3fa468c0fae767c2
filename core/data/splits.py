"""Stratified, grouped train/validation/test splits that depend only on the data and the seed.

Grouping keeps every image of one lesion (HAM10000's lesion_id) on one side of a split, which the
paper's image-level split did not: lesions leaking between train and test inflate test scores. Near-duplicate
images (core.data.duplicates) can be joined into one group the same way.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd


def pick_groups(labels: np.ndarray, groups: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask over images selecting about `fraction` of the images of each class, taking
    whole groups. A class with two or more groups keeps at least one on each side."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    group_names, group_index = np.unique(groups, return_inverse=True)
    group_sizes = np.bincount(group_index)
    # A group counts for the class of its most severe image (malignant wins).
    group_labels = np.zeros(len(group_names), dtype=np.int64)
    np.maximum.at(group_labels, group_index, labels)
    chosen_groups = np.zeros(len(group_names), dtype=bool)
    for label in np.unique(group_labels):
        members = rng.permutation(np.flatnonzero(group_labels == label))
        if len(members) < 2:
            continue  # one group cannot be on both sides; it stays unchosen
        target = fraction * group_sizes[members].sum()
        taken = 0
        for count, group in enumerate(members[:-1]):  # the last one always stays unchosen
            if count > 0 and taken + group_sizes[group] / 2 > target:
                break
            chosen_groups[group] = True
            taken += group_sizes[group]
    return chosen_groups[group_index]


def assign_splits(
    table: pd.DataFrame, test_fraction: float, val_fraction: float, seed: int, groups: np.ndarray | None = None
) -> np.ndarray:
    """An array of 'train' / 'val' / 'test' per row of `table` (columns label, group, preset_split).

    Given 'test' and 'val' rows (a split column, train/ and test/ folders) are kept; a missing test part
    is drawn from the other rows with `test_fraction`, and a missing validation part is carved from
    train with `val_fraction`. Rows that share a group stay on one side of every drawn part; `groups`
    replaces the table's group column (lesions joined with their near-duplicates, see core.data.duplicates).
    """
    labels = table["label"].to_numpy()
    groups = np.asarray(groups if groups is not None else table["group"]).astype(str)
    preset = table["preset_split"].fillna("").astype(str).to_numpy() if "preset_split" in table else None
    splits = np.full(len(table), "train", dtype=object)
    rng = np.random.default_rng(seed)
    if preset is not None:
        splits[preset == "val"] = "val"
    if preset is not None and (preset == "test").any():
        splits[preset == "test"] = "test"
    else:
        # No given test part (ISIC 2017's labels have train and val only): draw it from the rest.
        rest = np.flatnonzero(splits == "train")
        splits[rest[pick_groups(labels[rest], groups[rest], test_fraction, rng)]] = "test"
    if not (splits == "val").any():
        train = np.flatnonzero(splits == "train")
        splits[train[pick_groups(labels[train], groups[train], val_fraction, rng)]] = "val"
    return splits


def subsample(table: pd.DataFrame, max_images: int, seed: int) -> pd.DataFrame:
    """A stratified, grouped subset of about `max_images` rows, the same for the same seed."""
    if len(table) <= max_images:
        return table
    rng = np.random.default_rng([seed, 1])
    keep = pick_groups(table["label"].to_numpy(), table["group"].astype(str).to_numpy(),
                       max_images / len(table), rng)
    return table[keep].reset_index(drop=True)


def split_fingerprint(image_ids, splits) -> str:
    """Identifies a split: two runs with the same fingerprint were tested on the same images."""
    digest = hashlib.sha1()
    for image_id, split in sorted(zip(map(str, image_ids), map(str, splits))):
        digest.update(f"{image_id}:{split}\n".encode())
    return digest.hexdigest()[:16]

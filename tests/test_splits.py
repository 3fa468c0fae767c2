import numpy as np
import pandas as pd

from core.data.splits import assign_splits, pick_groups, subsample


def table(count=200, malignant_share=0.3, group_size=1):
    labels = (np.arange(count) % 10 < malignant_share * 10).astype(int)
    groups = [f"g{i // group_size}" for i in range(count)]
    if group_size > 1:
        labels = np.array([labels[(i // group_size) * group_size] for i in range(count)])
    return pd.DataFrame({"image_id": [f"i{i}" for i in range(count)], "label": labels, "group": groups,
                         "preset_split": ""})


def test_split_is_stratified_and_sized():
    frame = table()
    splits = assign_splits(frame, test_fraction=0.2, val_fraction=0.25, seed=0)
    assert abs((splits == "test").mean() - 0.2) < 0.02
    for split in ("train", "val", "test"):
        assert abs(frame["label"][splits == split].mean() - 0.3) < 0.05


def test_split_depends_only_on_data_and_seed():
    frame = table()
    assert (assign_splits(frame, 0.3, 0.2, seed=3) == assign_splits(frame, 0.3, 0.2, seed=3)).all()
    assert (assign_splits(frame, 0.3, 0.2, seed=3) != assign_splits(frame, 0.3, 0.2, seed=4)).any()


def test_groups_never_straddle_splits():
    frame = table(count=300, group_size=3)
    frame["split"] = assign_splits(frame, 0.4, 0.2, seed=1)
    assert (frame.groupby("group")["split"].nunique() == 1).all()


def test_every_class_keeps_a_group_on_both_sides_in_tiny_sets():
    labels, groups = np.array([0, 0, 1, 1]), np.array(["a", "b", "c", "d"])
    chosen = pick_groups(labels, groups, 0.9, np.random.default_rng(0))
    assert chosen.sum() == 2 and chosen[:2].sum() == 1 and chosen[2:].sum() == 1


def test_preset_test_part_is_kept():
    frame = table(count=50)
    frame.loc[40:, "preset_split"] = "test"
    splits = assign_splits(frame, 0.2, 0.2, seed=0)
    assert (splits[40:] == "test").all() and not (splits[:40] == "test").any()


def test_subsample_is_stratified():
    frame = table(count=400)
    subset = subsample(frame, 100, seed=0)
    assert 95 <= len(subset) <= 105 and abs(subset["label"].mean() - 0.3) < 0.03


def test_given_val_part_is_kept_and_test_is_drawn_from_the_rest():
    frame = table(count=100)
    frame.loc[:9, "preset_split"] = "val"
    frame.loc[10:, "preset_split"] = "train"
    splits = assign_splits(frame, 0.2, 0.3, seed=0)
    assert (splits[:10] == "val").all() and (splits[10:] != "val").all()
    assert abs((splits[10:] == "test").mean() - 0.2) < 0.03

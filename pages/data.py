"""Data page: choose the dataset (built-in synthetic set or a local path) and see what is in it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from core.config import FORMATS, DataSpec, TrainConfig
from core.data.datasets import (
    CLASS_NAMES,
    LOCAL_LAYOUTS,
    DatasetError,
    PreparedData,
    UnrecognisedLayoutError,
    describe_given_split,
)
from core.data.duplicates import DEFAULT_THRESHOLD, HASH_BITS
from core.data.synthetic import CONFOUNDER_KINDS, MAX_LESION_SPREAD
from core.figures import class_counts_figure, outline_mask
from pages.common import (
    DATA_SPEC,
    SPLIT_RATIOS,
    can_administer,
    current_config,
    current_data_spec,
    dataset_label,
    persistent,
    prepared_for,
    require_entrypoint,
    stored,
)

SAMPLES_PER_CLASS = 6
PAIRS_SHOWN = 4  # near-duplicate pairs drawn as thumbnails; the table lists them all
PAIR_COLUMN_LABELS = {"id_a": "Image A", "id_b": "Image B", "distance": "Distance (bits)", "split_a": "Split A",
                      "split_b": "Split B", "label_a": "Label A", "label_b": "Label B",
                      "conflicting_labels": "Conflicting labels", "crosses_splits": "Across the split"}


def parse_label_map(text: str) -> dict[str, int]:
    """'mel=1, SebK=0' -> {'mel': 1, 'SebK': 0}; raises ValueError with the offending item."""
    mapping = {}
    for item in filter(None, (part.strip() for part in text.replace(";", ",").split(","))):
        name, _, value = item.partition("=")
        if value.strip() not in ("0", "1") or not name.strip():
            raise ValueError(f"label mapping {item!r}: write NAME=0 (benign) or NAME=1 (malignant)")
        mapping[name.strip()] = int(value)
    return mapping


def synthetic_spec_widgets() -> DataSpec:
    left, middle, right = st.columns(3)
    with left:
        count = persistent(st.number_input, "Images", "synthetic_count", 1000, min_value=40, max_value=20000,
                           step=100)
        size = persistent(st.selectbox, "Drawn at (px)", "synthetic_image_size", 128, options=[64, 96, 128, 160, 224])
    with middle:
        seed = persistent(st.number_input, "Drawing seed", "synthetic_seed", 0, min_value=0, step=1)
        malignant = persistent(st.slider, "Malignant share", "synthetic_malignant_fraction", 0.35,
                               min_value=0.1, max_value=0.9, step=0.05)
        spread = persistent(st.slider, "Lesion placement", "synthetic_lesion_spread",
                            DataSpec().synthetic_lesion_spread, min_value=0.0, max_value=MAX_LESION_SPREAD, step=0.05,
                            help="How far from the image's centre a lesion may lie (1 is the edge). Lesions anywhere "
                                 "make the maps' pointing game a real test: a map stuck at the centre misses them.")
    with right:
        confounder = persistent(st.slider, "Confounder on malignant images", "confounder_fraction", 0.0,
                                min_value=0.0, max_value=1.0, step=0.05,
                                help="Draws an artifact on this share of the malignant images only: a shortcut "
                                     "a model can learn instead of the lesion (see it on the Explain page).")
        kind = persistent(st.selectbox, "Confounder kind", "confounder_kind", "ink", options=list(CONFOUNDER_KINDS))
    return DataSpec(source="synthetic", format="synthetic", synthetic_count=int(count),
                    synthetic_image_size=int(size), synthetic_seed=int(seed),
                    synthetic_malignant_fraction=float(malignant), confounder_fraction=float(confounder),
                    confounder_kind=kind, synthetic_lesion_spread=float(spread))


def local_spec_widgets() -> DataSpec | None:
    path = persistent(st.text_input, "Dataset path", "data_path", "",
                      placeholder="/data/HAM10000, a folder of Cancer/NotCancer folders, or labels.csv")
    left, right = st.columns(2)
    with left:
        data_format = persistent(st.selectbox, "Format", "data_format", "auto", options=["auto", *FORMATS[1:]])
        label_map = persistent(st.text_input, "Label mapping (optional)", "label_map", "",
                               placeholder="e.g. SebK=0, Melanoma=1")
    with right:
        images_dir = persistent(st.text_input, "Images folder (optional)", "images_dir", "")
        masks_dir = persistent(st.text_input, "Lesion masks folder (optional)", "masks_dir", "",
                               help="ISIC naming: <image_id>_segmentation.png")
    if not path.strip():
        st.info("Enter the path of a HAM10000 folder, an image folder or a CSV dataset on this machine.")
        return None
    try:
        mapping = parse_label_map(label_map)
    except ValueError as error:
        st.error(str(error))
        return None
    return DataSpec(source=path.strip(), format=data_format, label_map=mapping,
                    images_dir=images_dir.strip() or None, masks_dir=masks_dir.strip() or None)


def split_widgets() -> None:
    st.subheader("Split")
    columns = st.columns(4)
    with columns[0]:
        persistent(st.selectbox, "Train:test", "split", "80:20", options=SPLIT_RATIOS)
    with columns[1]:
        persistent(st.slider, "Validation share of train", "val_fraction", 0.15, min_value=0.05, max_value=0.4,
                   step=0.05, help="Held out from training to choose the best epoch; the test part is never used.")
    with columns[2]:
        persistent(st.number_input, "Seed", "seed", 42, min_value=0, step=1)
    with columns[3]:
        persistent(st.number_input, "Use at most N images (0 = all)", "max_images", 0, min_value=0, step=100)
    persistent(st.toggle, "Keep near-duplicates together", "group_near_duplicates", True,
               help="Images that are the same picture resized, recompressed or slightly cropped stay on one side "
                    "of the split, as one lesion's images do. Splits the dataset gives itself are kept as given.")


def show_summary(data: PreparedData) -> None:
    counts = data.class_counts()
    total = len(data.table)
    malignant = int(data.table["label"].sum())
    columns = st.columns(4)
    columns[0].metric("Images", total)
    columns[1].metric("Benign", total - malignant)
    columns[2].metric("Malignant", malignant)
    columns[3].metric("Skipped", len(data.skipped))
    grouped = data.table["group"].nunique() < total
    st.caption(f"Stratified split by class{', grouped by lesion (no lesion on both sides)' if grouped else ''}; "
               f"images at {data.images.shape[1]} px; lesion masks: {'yes' if data.masks is not None else 'no'}.")
    if data.spec is not None and data.spec.is_synthetic:
        st.caption(size_note(data.spec.synthetic_image_size, int(data.images.shape[1])))
    given_split = describe_given_split(data, current_config())
    if given_split:
        st.caption(given_split)
    st.plotly_chart(class_counts_figure(counts), width="stretch")
    show_samples(data)
    show_near_duplicates(data, current_config())
    if data.skipped:
        with st.expander(f"Skipped images ({len(data.skipped)})"):
            st.dataframe(pd.DataFrame(data.skipped, columns=["image", "reason"]), hide_index=True, width="stretch")


def size_note(drawn: int, trained: int) -> str:
    # The drawing is cached by its own settings and resized for training, so one drawing serves every image size.
    if drawn == trained:
        return f"The synthetic set is drawn at {drawn} px, the size the models train at."
    return (f"The synthetic set is drawn at {drawn} px; the models see it resized to the training image size, "
            f"{trained} px (Image size on the Train page).")


def local_dataset_error(error: Exception) -> str:
    """The page's words for a dataset that cannot be used: the CLI's list of what --data accepts
    (which starts with 'the word synthetic') does not fit a path field."""
    if isinstance(error, UnrecognisedLayoutError):
        return (f"Cannot use this dataset: {error.problem}. Enter the path of {LOCAL_LAYOUTS}; or choose the "
                "built-in synthetic set above.")
    return f"Cannot use this dataset: {error}"


def show_samples(data: PreparedData) -> None:
    st.subheader("Samples")
    rng = np.random.default_rng(0)
    labels = data.table["label"].to_numpy()
    picked = [row for value in (0, 1) for row in
              rng.permutation(np.flatnonzero(labels == value))[:SAMPLES_PER_CLASS]]
    images, captions = [], []
    for row in picked:
        image = data.images[row]
        if data.masks is not None:
            image = outline_mask(image, data.masks[row])
        images.append(image)
        split = data.table["split"].iloc[row]
        captions.append(f"{'malignant' if labels[row] else 'benign'} · {split}")
    st.image(images, caption=captions, width=150)
    if data.masks is not None:
        st.caption("Green outline: the ground-truth lesion mask.")


@st.cache_data(max_entries=4, show_spinner=False)
def near_duplicate_pairs(spec: DataSpec, config: TrainConfig, _data: PreparedData) -> pd.DataFrame:
    """The pairs core found when it prepared the dataset, as the page shows them (one entry per dataset and split)."""
    pairs = _data.near_duplicate_pairs()
    return pairs.assign(label_a=pairs["label_a"].map(CLASS_NAMES.__getitem__),
                        label_b=pairs["label_b"].map(CLASS_NAMES.__getitem__))


def show_near_duplicates(data: PreparedData, config: TrainConfig) -> None:
    st.subheader("Near-duplicates")
    pairs = near_duplicate_pairs(data.spec, config.resolved(data.spec), data)
    method = (f"Perceptual hashes (pHash and dHash of the whole image and of five 3% crops) at most "
              f"{DEFAULT_THRESHOLD} of {HASH_BITS} bits apart: the same picture resized, recompressed or slightly "
              "cropped.")
    if pairs.empty:
        st.caption(f"No near-duplicate images. {method}")
        return
    columns = st.columns(3)
    columns[0].metric("Pairs", len(pairs))
    columns[1].metric("Across the split", int(pairs["crosses_splits"].sum()))
    columns[2].metric("Conflicting labels", int(pairs["conflicting_labels"].sum()))
    if data.duplicates_grouped:
        kept = ("The split keeps near-duplicates together; the pairs still across it were split by the dataset "
                "itself (its own validation or test part)." if pairs["crosses_splits"].any()
                else "The split keeps near-duplicates together.")
    else:
        kept = "Near-duplicate grouping is off: pairs across the split leak held-out images into training."
    st.caption(f"{kept} {method}")
    if pairs["conflicting_labels"].any():
        st.warning("Some near-duplicate pairs carry different labels: one of each is probably mislabelled.",
                   icon=":material/warning:")
    st.dataframe(pairs, hide_index=True, width="stretch",
                 column_config=PAIR_COLUMN_LABELS)
    rows = {image_id: row for row, image_id in enumerate(data.table["image_id"].astype(str))}
    for column, pair in zip(st.columns(PAIRS_SHOWN), pairs.head(PAIRS_SHOWN).itertuples()):
        flag = " · **conflicting labels**" if pair.conflicting_labels else ""
        column.caption(f"Distance {pair.distance}{flag}")
        column.image([data.images[rows[pair.id_a]], data.images[rows[pair.id_b]]], width=88,
                     caption=[f"{pair.id_a} · {pair.label_a} · {pair.split_a}",
                              f"{pair.id_b} · {pair.label_b} · {pair.split_b}"])


def main() -> None:
    require_entrypoint()
    st.title("Data")
    if can_administer():
        kind = persistent(st.radio, "Dataset", "source_kind", "Built-in synthetic set",
                          options=["Built-in synthetic set", "Local dataset"], horizontal=True)
        spec = synthetic_spec_widgets() if kind == "Built-in synthetic set" else local_spec_widgets()
        split_widgets()
    else:
        # No paths (they read the server's disk) and no new synthetic sets (each is drawn on the server's CPU).
        st.info("Read-only: the teacher chooses the dataset.", icon=":material/lock:")
        spec = current_data_spec()
    if spec is None:
        return
    try:
        data = prepared_for(spec, current_config())
    except (DatasetError, ValueError, OSError) as error:
        st.error(local_dataset_error(error))
        previous = st.session_state.get(DATA_SPEC)
        if previous is not None:
            st.caption(f"The other pages keep using the last good dataset: {dataset_label(previous)}.")
        return
    st.session_state[DATA_SPEC] = spec
    st.success(f"Using {dataset_label(spec)} on every page.", icon=":material/check_circle:")
    show_summary(data)
    if stored("max_images"):
        st.caption("A subset is in use (see 'Use at most N images').")


main()

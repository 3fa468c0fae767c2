"""Dataset formats, their detection, and preparing a dataset for training.

Every format is read into one table with the columns of `TABLE_COLUMNS`; labels are 0 = benign,
1 = malignant everywhere. Images are then decoded once into a uint8 cache (see core.data.images).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import FORMATS, DataSpec, TrainConfig
from core.data.duplicates import (
    DEFAULT_THRESHOLD,
    find_near_duplicates,
    hashes_path,
    load_or_find_near_duplicates,
    load_or_hash_images,
    merge_groups,
    pairs_table,
    summarise_pairs,
)
from core.data.images import IMAGE_SUFFIXES, ImageError, decode_images_cached, decode_mask
from core.data.splits import assign_splits, split_fingerprint, subsample
from core.data.synthetic import load_or_generate_synthetic, synthetic_cache_path

TABLE_COLUMNS = ("image_id", "label", "group", "preset_split", "path", "mask_path")
CLASS_NAMES = ("benign", "malignant")

HAM10000_LABELS = {"mel": 1, "bcc": 1, "akiec": 1, "nv": 0, "bkl": 0, "df": 0, "vasc": 0}
# Folder names and CSV label values, compared lower-case with anything but letters and digits removed.
NAMED_LABELS = {
    "cancer": 1, "malignant": 1, "melanoma": 1, "mel": 1, "positive": 1, "yes": 1, "true": 1, "1": 1,
    "notcancer": 0, "noncancer": 0, "benign": 0, "nevus": 0, "negative": 0, "no": 0, "false": 0, "0": 0,
    **HAM10000_LABELS,
}
IMAGE_COLUMNS = ("image_id", "image", "image_name", "isic_id", "path", "image_path", "filename", "file")
LABEL_COLUMNS = ("label", "melanoma", "malignant", "target", "class", "benign_malignant", "diagnosis", "dx")
SPLIT_COLUMNS = ("split", "official_split", "subset", "partition")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}
TRAIN_TEST_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val",
                      "validation": "val", "test": "test", "testing": "test"}
LOCAL_LAYOUTS = (
    "an image folder with class sub-folders (Cancer/NotCancer or malignant/benign), optionally inside train/ "
    "and test/; a HAM10000 folder with HAM10000_metadata.csv and its image folders; "
    "or a CSV with an image-id column and a label column next to an image folder"
)
EXPECTED_LAYOUTS = "the word 'synthetic'; " + LOCAL_LAYOUTS  # what the CLI's --data accepts


class DatasetError(ValueError):
    """A dataset that cannot be used; the message is one line a user can act on."""


class UnrecognisedLayoutError(DatasetError):
    """A path that holds no dataset. The message lists what the CLI accepts; `problem` is the part
    without that list, so that the dashboard can say what it expects in its own words."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem} (expected {EXPECTED_LAYOUTS})")
        self.problem = problem


@dataclass
class PreparedData:
    """A dataset ready for training: decoded images, the split, and what was skipped."""

    name: str
    format: str
    path: str | None
    table: pd.DataFrame  # TABLE_COLUMNS + split (+ confounded for the synthetic set)
    images: np.ndarray  # N x S x S x 3 uint8, rows of `table`
    masks: np.ndarray | None  # N x S x S uint8 (1 = lesion), or None when the dataset has none
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image_id, reason)
    fingerprint: str = ""
    spec: DataSpec | None = None  # how it was loaded, so a stopped run can load it again to resume
    hashes: np.ndarray | None = None  # perceptual hashes of the rows (core.data.duplicates)
    near_duplicates: np.ndarray | None = None  # K x 3: row a, row b, distance, at DEFAULT_THRESHOLD
    duplicates_grouped: bool = False  # whether the split kept near-duplicates on one side

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.table["split"].to_numpy() == split)

    def class_counts(self) -> dict[str, dict[str, int]]:
        counts = {}
        for split in ("train", "val", "test"):
            labels = self.table.loc[self.table["split"] == split, "label"]
            counts[split] = {name: int((labels == value).sum()) for value, name in enumerate(CLASS_NAMES)}
        return counts

    def near_duplicate_pairs(self, threshold: int = DEFAULT_THRESHOLD) -> pd.DataFrame:
        """The near-duplicate pairs with their ids, splits and labels (core.data.duplicates.PAIR_COLUMNS)."""
        if threshold == DEFAULT_THRESHOLD and self.near_duplicates is not None:
            pairs = self.near_duplicates
        elif self.hashes is not None:
            pairs = find_near_duplicates(self.hashes, threshold)
        else:
            pairs = np.zeros((0, 3), dtype=np.int64)
        return pairs_table(self.table, pairs)

    def describe(self) -> dict:
        """The dataset block of run.json."""
        return {
            "name": self.name,
            "format": self.format,
            "path": self.path,
            "fingerprint": self.fingerprint,
            "split_fingerprint": split_fingerprint(self.table["image_id"], self.table["split"]),
            "image_size": int(self.images.shape[1]),
            "class_counts": self.class_counts(),
            "has_masks": self.masks is not None,
            "skipped": len(self.skipped),
            "spec": self.spec.to_dict() if self.spec is not None else None,
            "near_duplicates": summarise_pairs(self.near_duplicate_pairs(), self.duplicates_grouped),
        }


def normalise_name(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(text).lower())


def allowed_roots() -> list[Path]:
    """Folders named by the DATA_ROOTS environment variable (os.pathsep-separated); empty: any path."""
    return [Path(root).expanduser().resolve() for root in os.environ.get("DATA_ROOTS", "").split(os.pathsep)
            if root.strip()]


def check_allowed(path: str | Path) -> None:
    """Refuse a path outside DATA_ROOTS (classroom deployments). Symlinks are resolved first, so a
    link inside an allowed folder cannot lead outside it."""
    roots = allowed_roots()
    if not roots:
        return
    resolved = Path(path).expanduser().resolve()
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise DatasetError(f"{path} is outside the folders this dashboard may read (DATA_ROOTS: "
                           f"{', '.join(map(str, roots))})")


def detect_format(source: str) -> str:
    """The format of a dataset path, or DatasetError saying what layouts are understood."""
    if source == "synthetic":
        return "synthetic"
    check_allowed(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise UnrecognisedLayoutError(f"dataset path not found: {source}")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "ham10000" if _is_ham10000_csv(path) else "csv"
        raise UnrecognisedLayoutError(f"{source} is a file but not a CSV")
    if (path / "HAM10000_metadata.csv").exists() or any(_is_ham10000_csv(p) for p in path.glob("*.csv")):
        return "ham10000"
    if list(path.glob("*.csv")):
        return "csv"
    if _class_folders(path) or any(_class_folders(path / name) for name in _split_folders(path)):
        return "imagefolder"
    if not any(path.iterdir()):
        raise UnrecognisedLayoutError(f"dataset folder is empty: {source}")
    raise UnrecognisedLayoutError(f"no dataset layout recognised in {source}")


def read_table(spec: DataSpec) -> tuple[str, pd.DataFrame, list[tuple[str, str]]]:
    """The dataset's table (TABLE_COLUMNS) and the rows dropped while reading it (id, reason)."""
    data_format = detect_format(spec.source) if spec.format == "auto" else spec.format
    if data_format not in FORMATS:
        raise DatasetError(f"unknown dataset format {data_format!r} (choose from {', '.join(FORMATS)})")
    if data_format == "synthetic":
        raise DatasetError("the synthetic set has no table on disk; use prepare_data")
    for folder in (spec.source, spec.images_dir, spec.masks_dir):
        if folder:
            check_allowed(folder)
    path = Path(spec.source).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset path not found: {spec.source}")
    readers = {"imagefolder": read_imagefolder, "ham10000": read_ham10000, "csv": read_csv_dataset}
    table, dropped = readers[data_format](path, spec)
    return data_format, table, dropped


def read_imagefolder(path: Path, spec: DataSpec) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Class sub-folders, optionally inside train/ and test/ (and val/) folders."""
    mapping = _label_mapping(spec, NAMED_LABELS)
    split_folders = _split_folders(path)
    roots = [(path / name, TRAIN_TEST_FOLDERS[normalise_name(name)]) for name in split_folders] or [(path, "")]
    rows, unmapped = [], set()
    for root, preset in roots:
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            label = mapping.get(normalise_name(folder.name))
            if label is None:
                unmapped.add(folder.name)
                continue
            for file in sorted(folder.rglob("*")):
                if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                    image_id = str(file.relative_to(path))
                    rows.append((image_id, label, image_id, preset, str(file), ""))
    if not rows:
        found = ", ".join(sorted(unmapped)) or "none"
        raise DatasetError(
            f"no images in class folders under {path} (class folders found: {found}; "
            f"expected names like Cancer/NotCancer or malignant/benign, or give a label mapping)"
        )
    if unmapped:
        raise DatasetError(
            f"cannot map folder(s) {', '.join(sorted(unmapped))} to benign/malignant; give a label mapping "
            f"such as --label-map {sorted(unmapped)[0]}=1"
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS), []


def read_ham10000(path: Path, spec: DataSpec) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """HAM10000_metadata.csv (lesion_id, image_id, dx) and its image folder(s); grouped by lesion."""
    csv_path = path if path.is_file() else _find_ham10000_csv(path)
    root = csv_path.parent
    metadata = _read_csv(csv_path)
    _require_columns(metadata, ("lesion_id", "image_id", "dx"), csv_path)
    mapping = _label_mapping(spec, HAM10000_LABELS)
    labels = metadata["dx"].map(lambda dx: mapping.get(normalise_name(dx)))
    _refuse_unmapped(metadata["dx"], labels, "dx")
    files = _index_image_files(_image_folders(root, spec, named_images=True))
    masks = _index_mask_files(root, spec)
    rows, dropped = [], []
    for image_id, label, lesion in zip(metadata["image_id"].astype(str), labels, metadata["lesion_id"].astype(str)):
        file = files.get(image_id)
        if file is None:
            dropped.append((image_id, "image file not found"))
            continue
        rows.append((image_id, int(label), lesion, "", file, masks.get(image_id, "")))
    return _non_empty(pd.DataFrame(rows, columns=TABLE_COLUMNS), csv_path), dropped


def read_csv_dataset(path: Path, spec: DataSpec) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """A CSV with an image-id (or path) column and a label column beside an image folder."""
    csv_path = path if path.is_file() else _pick_csv(path)
    root = csv_path.parent
    table = _read_csv(csv_path)
    image_column = spec.image_column or _find_column(table, IMAGE_COLUMNS, csv_path, "image-id or path")
    label_column = spec.label_column or _find_column(table, LABEL_COLUMNS, csv_path, "label")
    _require_columns(table, (image_column, label_column), csv_path)
    labels = _csv_labels(table[label_column], spec, label_column)
    split_column = next((c for c in table.columns if c.lower() in SPLIT_COLUMNS), None)
    presets = (table[split_column].map(lambda v: SPLIT_NAMES.get(str(v).strip().lower(), ""))
               if split_column else pd.Series([""] * len(table)))
    group_column = next((c for c in table.columns if c.lower() in ("lesion_id", "patient_id", "group")), None)
    files = _index_image_files(_image_folders(root, spec, named_images=False))
    masks = _index_mask_files(root, spec)
    rows, dropped = [], []
    for position, (raw_id, label) in enumerate(zip(table[image_column].astype(str), labels)):
        file = _resolve_image(raw_id, root, files)
        image_id = Path(raw_id).stem
        if file is None:
            dropped.append((image_id, "image file not found"))
            continue
        group = str(table[group_column].iloc[position]) if group_column else image_id
        rows.append((image_id, int(label), group, presets.iloc[position], file, masks.get(image_id, "")))
    return _non_empty(pd.DataFrame(rows, columns=TABLE_COLUMNS), csv_path), dropped


def prepare_data(
    spec: DataSpec,
    config: TrainConfig,
    cache_dir: Path | str | None,
    progress: Callable[[int, int], None] | None = None,
) -> PreparedData:
    """Load, subsample, decode (cached) and split a dataset for `config` (image size resolved)."""
    config = config.resolved(spec)
    if spec.is_synthetic:
        prepared = _prepare_synthetic(spec, config, cache_dir)
    else:
        prepared = _prepare_files(spec, config, cache_dir, progress)
    _check_classes(prepared)
    if prepared.hashes is not None:
        prepared.near_duplicates = load_or_find_near_duplicates(prepared.hashes, cache_dir)
    groups = None
    if config.group_near_duplicates and prepared.near_duplicates is not None:
        groups = merge_groups(prepared.table["group"].astype(str), prepared.near_duplicates)
        prepared.duplicates_grouped = True
    prepared.table["split"] = assign_splits(prepared.table, config.test_fraction, config.val_fraction, config.seed,
                                            groups)
    prepared.spec = spec
    for split in ("train", "val", "test"):
        if len(prepared.indices(split)) == 0:
            pairs = len(prepared.near_duplicates) if prepared.duplicates_grouped else 0
            grouped = (f"; its {pairs} near-duplicate pairs are kept on one side (near-duplicate grouping can be "
                       "switched off)") if pairs else ""
            raise DatasetError(f"the {split} part is empty: the dataset has too few images for this split{grouped}")
    return prepared


def load_dataset_images(spec: DataSpec, image_size: int, cache_dir: Path | str | None,
                        progress: Callable[[int, int], None] | None = None) -> PreparedData:
    """Every image of a dataset, decoded (cached) at `image_size`, with no split: a set that a stored run
    is evaluated on as a whole (external validation). Unreadable files are skipped and listed."""
    config = TrainConfig(image_size=image_size)
    prepared = _prepare_synthetic(spec, config, cache_dir) if spec.is_synthetic else _prepare_files(
        spec, config, cache_dir, progress)
    if len(prepared.table) == 0:
        raise DatasetError("no readable images in the dataset")
    prepared.table["split"] = "external"
    prepared.spec = spec
    return prepared


def describe_given_split(data: PreparedData, config: TrainConfig) -> str | None:
    """Where validation and test come from when the dataset gives part of its split (a CSV's split
    column, val/ or test/ folders), as core.data.splits.assign_splits does it; None when it gives none."""
    preset = data.table["preset_split"].fillna("").astype(str)
    val_given, test_given = (preset == "val").any(), (preset == "test").any()
    if not (val_given or test_given):
        return None
    counts = data.table["split"].value_counts()

    def given(part: str) -> str:
        where = f"marked {part} in the CSV's split column" if data.format == "csv" else (
            f"in its {'validation' if part == 'val' else part} folder")
        return f"the {counts.get(part, 0)} images {where}"

    if val_given:
        val = f"Validation is the dataset's official split: {given('val')} ('Validation share of train' is not used)"
    else:
        val = f"Validation is about {config.val_fraction:.0%} of the training part, drawn stratified by class"
    if test_given:
        test = f"test is {given('test')}"
    else:
        test = (f"test is drawn from the {'other ' if val_given else ''}{int((preset != 'val').sum()):,} images: "
                f"about {config.test_fraction:.0%} of them (Train:test {config.split}), stratified by class")
    return f"{val}; {test}."


def _prepare_synthetic(spec: DataSpec, config: TrainConfig, cache_dir) -> PreparedData:
    options = spec.synthetic_options()
    generated = load_or_generate_synthetic(cache_dir, **options)
    # Hashed at the drawing size, so the near-duplicates (and the split) do not depend on the training size.
    hashes = load_or_hash_images(
        generated.images, hashes_path(synthetic_cache_path(cache_dir, **options)) if cache_dir else None)
    ids = generated.image_ids
    table = pd.DataFrame({"image_id": ids, "label": generated.labels, "group": ids, "preset_split": "",
                          "path": "", "mask_path": "", "confounded": generated.confounded})
    images, masks = generated.images, generated.masks
    if config.max_images:
        table = subsample(table, config.max_images, config.seed)
        rows = np.array([int(i.rsplit("_", 1)[1]) for i in table["image_id"]], dtype=np.int64)
        images, masks, hashes = images[rows], masks[rows], hashes[rows]
    images, masks = _resize_arrays(images, masks, config.image_size)
    fingerprint = hashlib.sha1(repr(sorted(options.items())).encode()).hexdigest()[:16]
    return PreparedData("synthetic", "synthetic", None, table.reset_index(drop=True), images, masks, [], fingerprint,
                        hashes=hashes)


def _prepare_files(spec: DataSpec, config: TrainConfig, cache_dir, progress) -> PreparedData:
    data_format, table, dropped = read_table(spec)
    if config.max_images:
        table = subsample(table, config.max_images, config.seed)
    decoded = decode_images_cached(table["path"].tolist(), config.image_size, cache_dir, progress)
    skipped = dropped + [(table["image_id"].iloc[index], reason) for index, reason in decoded.skipped]
    table = table.iloc[decoded.kept].reset_index(drop=True)
    masks = _decode_masks(table, config.image_size)
    fingerprint = hashlib.sha1(
        "\n".join(f"{i}:{label}" for i, label in zip(table["image_id"], table["label"])).encode()
    ).hexdigest()[:16]
    name = Path(spec.source).expanduser().resolve().name
    path = str(Path(spec.source).expanduser().resolve())
    return PreparedData(name, data_format, path, table, decoded.images, masks, skipped, fingerprint,
                        hashes=decoded.hashes)


def _resize_arrays(images: np.ndarray, masks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    if images.shape[1] == size:
        return images, masks
    from PIL import Image

    resized = np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR,
                                                                  reducing_gap=2.0)) for image in images])
    resized_masks = np.stack([np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))
                              for mask in masks])
    return resized, resized_masks


def _decode_masks(table: pd.DataFrame, size: int) -> np.ndarray | None:
    """Lesion masks when every kept image has one; a partial set is not used."""
    if not len(table) or (table["mask_path"] == "").any():
        return None
    try:
        return np.stack([decode_mask(path, size) for path in table["mask_path"]])
    except ImageError:
        return None


def _check_classes(prepared: PreparedData) -> None:
    if len(prepared.table) == 0:
        raise DatasetError("no readable images in the dataset")
    present = set(prepared.table["label"].unique())
    if present != {0, 1}:
        only = CLASS_NAMES[present.pop()] if present else "no"
        raise DatasetError(f"the dataset has only {only} images; both benign and malignant are needed")


def _label_mapping(spec: DataSpec, defaults: dict[str, int]) -> dict[str, int]:
    mapping = dict(defaults)
    for key, value in spec.label_map.items():
        if int(value) not in (0, 1):
            raise DatasetError(f"label mapping {key}={value}: labels must be 0 (benign) or 1 (malignant)")
        mapping[normalise_name(key)] = int(value)
    return mapping


def _csv_labels(values: pd.Series, spec: DataSpec, column: str) -> pd.Series:
    mapping = _label_mapping(spec, NAMED_LABELS)

    def to_label(value):
        if isinstance(value, (int, float, np.integer, np.floating)) and not pd.isna(value) and float(value) in (0, 1):
            return mapping.get(str(int(value)), int(value))
        return mapping.get(normalise_name(value))

    labels = values.map(to_label)
    _refuse_unmapped(values, labels, column)
    return labels.astype(int)


def _refuse_unmapped(values: pd.Series, labels: pd.Series, column: str) -> None:
    unmapped = sorted(set(values[labels.isna()].astype(str)))
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (" ..." if len(unmapped) > 5 else "")
        raise DatasetError(
            f"cannot map {column} value(s) {shown} to benign/malignant; give a label mapping "
            f"such as --label-map {unmapped[0]}=1"
        )


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as error:
        raise DatasetError(f"cannot read CSV {path}: {str(error).splitlines()[0] if str(error) else error}") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _require_columns(table: pd.DataFrame, columns, path: Path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DatasetError(
            f"{path.name} lacks column(s) {', '.join(missing)} (it has: {', '.join(map(str, table.columns))})"
        )


def _find_column(table: pd.DataFrame, candidates, path: Path, what: str) -> str:
    lower = {str(c).lower(): c for c in table.columns}
    for name in candidates:
        if name in lower:
            return lower[name]
    raise DatasetError(
        f"{path.name} has no {what} column (looked for {', '.join(candidates)}; "
        f"it has: {', '.join(map(str, table.columns))})"
    )


def _non_empty(table: pd.DataFrame, csv_path: Path) -> pd.DataFrame:
    if table.empty:
        raise DatasetError(f"none of the images listed in {csv_path.name} were found next to it")
    return table


def _is_ham10000_csv(path: Path) -> bool:
    try:
        header = pd.read_csv(path, nrows=0).columns
    except Exception:  # noqa: BLE001 - any unreadable CSV is simply not HAM10000
        return False
    return {"lesion_id", "image_id", "dx"} <= {str(c).strip() for c in header}


def _find_ham10000_csv(path: Path) -> Path:
    named = path / "HAM10000_metadata.csv"
    if named.exists():
        return named
    return next(p for p in sorted(path.glob("*.csv")) if _is_ham10000_csv(p))


def _pick_csv(path: Path) -> Path:
    """The CSV of a folder: the one with an image column and a label column (labels.csv first)."""
    preferred = ("labels.csv", "ground_truth.csv")
    candidates = sorted(path.glob("*.csv"), key=lambda p: (p.name.lower() not in preferred, p.name))
    for candidate in candidates:
        try:
            header = {str(c).strip().lower() for c in pd.read_csv(candidate, nrows=0).columns}
        except Exception:  # noqa: BLE001 - skip unreadable CSVs while looking for the right one
            continue
        if header & set(IMAGE_COLUMNS) and header & set(LABEL_COLUMNS):
            return candidate
    if candidates:
        return candidates[0]  # read it anyway, so that the error names its missing columns
    raise DatasetError(f"no CSV file in {path}")


def _class_folders(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    return [p for p in path.iterdir() if p.is_dir() and normalise_name(p.name) in NAMED_LABELS]


def _split_folders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and normalise_name(p.name) in TRAIN_TEST_FOLDERS)


def _is_mask_folder(path: Path) -> bool:
    return "segment" in path.name.lower() or "mask" in path.name.lower()


def _image_folders(root: Path, spec: DataSpec, named_images: bool) -> list[Path]:
    """The given images folder, else the sub-folders that hold images (HAM10000: those named
    '...images...'), else the root itself."""
    if spec.images_dir:
        return [Path(spec.images_dir)]
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not _is_mask_folder(p)
               and (not named_images or "image" in p.name.lower())]
    return folders + [root] if not named_images else folders or [root]


def _index_image_files(folders: list[Path]) -> dict[str, str]:
    """File stem -> path for every image below the folders (the first folder wins on clashes)."""
    files: dict[str, str] = {}
    for folder in folders:
        if not folder.is_dir():
            raise DatasetError(f"image folder not found: {folder}")
        for directory, _, names in os.walk(folder):
            if _is_mask_folder(Path(directory)):
                continue
            for name in names:
                stem, suffix = os.path.splitext(name)
                if suffix.lower() in IMAGE_SUFFIXES and not stem.endswith("_segmentation"):
                    files.setdefault(stem, os.path.join(directory, name))
    return files


def _index_mask_files(root: Path, spec: DataSpec) -> dict[str, str]:
    """image id -> mask path, from ISIC-style `<id>_segmentation.png` files."""
    folders = [Path(spec.masks_dir)] if spec.masks_dir else [
        p for p in root.iterdir() if p.is_dir() and _is_mask_folder(p)
    ]
    masks = {}
    for folder in folders:
        for file in folder.rglob("*.png"):
            masks[file.stem.removesuffix("_segmentation")] = str(file)
    return masks


def _resolve_image(raw_id: str, root: Path, files: dict[str, str]) -> str | None:
    """An image column value as a file: a path (relative to the CSV) or an id looked up by stem."""
    if Path(raw_id).suffix.lower() in IMAGE_SUFFIXES:
        candidate = Path(raw_id) if Path(raw_id).is_absolute() else root / raw_id
        if candidate.is_file():
            return str(candidate)
    return files.get(Path(raw_id).stem)

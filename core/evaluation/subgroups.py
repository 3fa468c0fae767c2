"""Metrics per subgroup of the test images (sex, age band, body site, acquisition site, diagnosis, skin tone, or
any categorical column of the dataset's metadata), each with its bootstrap interval and its gap to the whole set.

A model that is good on average can still fail a group: Kinyanjui et al. (2020) found ISIC's images almost all
light-skinned, so a classifier's accuracy on darker skin is simply unmeasured there. A group with fewer than
MIN_PER_CLASS positive or negative images is still shown, but marked too small to judge: its interval is wide
and its gap mostly noise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import PAPER_IMAGE_SIZE, DataSpec
from core.data.datasets import (
    IMAGE_COLUMNS,
    DatasetError,
    _find_column,
    _find_ham10000_csv,
    _is_ham10000_csv,
    _pick_csv,
    _read_csv,
    check_allowed,
    detect_format,
    read_table,
)
from core.data.images import DecodedImages, ImageError, decode_images_cached, decode_mask, files_fingerprint
from core.data.skin_tone import ITA_CATEGORY_NAMES, UNKNOWN, individual_typology_angle, ita_category
from core.data.synthetic import load_or_generate_synthetic
from core.stats.uncertainty import DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap_metrics
from core.stored_run import StoredRunError, recorded_data_spec

SUBGROUP_KEYS = ("sex", "age", "localization", "site", "dx", "ita")
# Where each key lives in a metadata file: HAM10000's own column first, then the names ISIC's CSVs use.
# "site" is where the images were taken (HAM10000's `dataset`: vidir_modern, rosendahl, vienna_dias,
# vidir_molemax), not the body site, which is "localization".
METADATA_COLUMNS = {
    "sex": ("sex",),
    "age": ("age", "age_approx"),
    "localization": ("localization", "anatom_site_general_challenge", "anatom_site_general", "anatom_site"),
    "site": ("dataset", "attribution", "site"),
    "dx": ("dx", "diagnosis"),
}
# Upper limits (exclusive) of the age bands: under 30 holds few melanomas, and the risk climbs with each
# band after it; 75 and over is the oldest band in most dermatology cohorts.
AGE_BANDS = ((30, "under 30"), (45, "30-44"), (60, "45-59"), (75, "60-74"), (math.inf, "75 and over"))
AGE_BAND_NAMES = tuple(name for _, name in AGE_BANDS)
ALL = "All"
MIN_PER_CLASS = 10
# More groups than this is an identifier or a number, not a category (a bootstrap per image id helps no one).
MAX_GROUPS = 40
# (column title, metric name of core.stats.metrics)
SUBGROUP_METRICS = (("AUC", "auc"), ("Sensitivity", "recall"), ("Specificity", "specificity"))
# Bumped whenever core.data.skin_tone measures differently, so that cached angles are not reused.
ITA_METHOD_VERSION = 1
DECODE_CHUNK = 256  # images decoded at once for skin tone: bounds memory on large test sets


def read_metadata(spec: DataSpec) -> pd.DataFrame:
    """The metadata file of a HAM10000 or CSV dataset, indexed by image_id (as read_table names images), with
    every column it has; DatasetError for a dataset without one (synthetic, image folders)."""
    if spec.is_synthetic:
        raise DatasetError("the synthetic set has no metadata; of the subgroups only 'ita' (skin tone) works on it")
    data_format = detect_format(spec.source) if spec.format == "auto" else spec.format
    check_allowed(spec.source)
    path = Path(spec.source).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset path not found: {spec.source}")
    if data_format == "ham10000":
        if path.is_dir() and not any(_is_ham10000_csv(p) for p in path.glob("*.csv")):
            raise DatasetError(f"no HAM10000 metadata CSV in {path}")
        csv_path = path if path.is_file() else _find_ham10000_csv(path)
        table = _read_csv(csv_path)
        if "image_id" not in table.columns:
            raise DatasetError(f"{csv_path.name} has no image_id column")
        ids = table["image_id"].astype(str)
    elif data_format == "csv":
        csv_path = path if path.is_file() else _pick_csv(path)
        table = _read_csv(csv_path)
        image_column = spec.image_column or _find_column(table, IMAGE_COLUMNS, csv_path, "image-id or path")
        ids = table[image_column].astype(str).map(lambda raw: Path(raw).stem)
    else:
        raise DatasetError(f"an {data_format} dataset has no metadata file; of the subgroups only 'ita' "
                           "(skin tone) works on it")
    table.index = pd.Index(ids, name="image_id")
    table.attrs["file"] = csv_path.name
    return table[~table.index.duplicated()]


def metadata_column(metadata: pd.DataFrame, by: str) -> str:
    """The column of `metadata` that `by` names: one of METADATA_COLUMNS' keys (looked up by its usual
    names), else a column of that name (any case); DatasetError listing the columns there are otherwise."""
    columns = {str(column).lower(): column for column in metadata.columns}
    candidates = METADATA_COLUMNS.get(by.lower(), (by,))
    if by.lower() not in METADATA_COLUMNS and by in metadata.columns:
        return by
    for candidate in candidates:
        if candidate.lower() in columns:
            return columns[candidate.lower()]
    where = metadata.attrs.get("file", "the dataset's metadata")
    looked = f" (looked for {', '.join(candidates)})" if by.lower() in METADATA_COLUMNS else ""
    usable = [str(column) for column in metadata.columns if column != metadata.index.name]
    raise DatasetError(f"{where} has no {by!r} column{looked}; its columns are: {', '.join(usable)}; "
                       "or group by 'ita' (skin tone, measured on the images)")


def group_values(spec: DataSpec, by: str, image_ids: Sequence[str], cache_dir: Path | str | None,
                 image_size: int = PAPER_IMAGE_SIZE,
                 progress: Callable[[int, int], None] | None = None) -> pd.Series:
    """The group of each image, indexed by image_id: a HAM10000 key (sex, age as AGE_BANDS, localization,
    site, dx), skin tone ('ita': ITA category, measured on the images at `image_size` and cached in
    `cache_dir`), or any other column of the dataset's metadata. Missing values, and images the dataset does
    not list, are 'unknown'. The result is an ordered categorical: age bands youngest first, skin tones
    lightest first, other groups by number or alphabetically, 'unknown' last."""
    ids = pd.Index([str(image_id) for image_id in image_ids], name="image_id")
    by = by.strip()
    if by.lower() == "ita":
        angles = skin_tone_angles(spec, ids, cache_dir, image_size, progress)
        return _ordered(pd.Series([ita_category(angle) for angle in angles], index=ids, name="ita"),
                        ITA_CATEGORY_NAMES)
    metadata = read_metadata(spec)
    column = metadata_column(metadata, by)
    raw = metadata[column].reindex(ids)
    if by.lower() == "age":
        return _ordered(pd.Series(raw.map(age_band).to_numpy(), index=ids, name=by), AGE_BAND_NAMES)
    labels = pd.Series(raw.map(category_text).to_numpy(), index=ids, name=by)
    named = sorted(set(labels) - {UNKNOWN}, key=_numbers_first)
    if len(named) > MAX_GROUPS:
        raise DatasetError(f"column {column!r} has {len(named)} different values among these images: it is not "
                           f"a category (at most {MAX_GROUPS} groups)")
    return _ordered(labels, named)


def age_band(age) -> str:
    """The band of AGE_BANDS an age in years falls in; 'unknown' for a missing or unreadable age."""
    try:
        years = float(age)
    except (TypeError, ValueError):
        return UNKNOWN
    if not math.isfinite(years) or years < 0:
        return UNKNOWN
    return next(name for limit, name in AGE_BANDS if years < limit)


def category_text(value) -> str:
    """A metadata value as a group name: text stripped, whole numbers without '.0' (pandas reads a numeric
    column with gaps as floats), and blanks, NaN and any spelling of 'unknown' as 'unknown'."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return UNKNOWN
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    text = str(value).strip()
    return UNKNOWN if text.lower() in ("", "unknown", "nan", "none") else text


def _ordered(labels: pd.Series, order: Sequence[str]) -> pd.Series:
    categories = [name for name in order if name != UNKNOWN] + [UNKNOWN]
    return labels.astype(pd.CategoricalDtype(categories, ordered=True))


def skin_tone_angles(spec: DataSpec, image_ids: Sequence[str], cache_dir: Path | str | None,
                     image_size: int = PAPER_IMAGE_SIZE,
                     progress: Callable[[int, int], None] | None = None) -> pd.Series:
    """ITA in degrees of each image (core.data.skin_tone, outside its lesion mask when the dataset has one),
    indexed by image_id; NaN for an image too dark, grey or covered to measure, or not in the dataset. File
    datasets are read at `image_size` from the image cache that training or external evaluation left in
    `cache_dir` when there is one, else only the listed images are decoded; the synthetic set is measured as
    drawn. Angles are cached in `cache_dir` per dataset (its files and masks, their sizes and times), so a
    second call decodes nothing."""
    ids = [str(image_id) for image_id in image_ids]
    if spec.is_synthetic:
        options = spec.synthetic_options()
        key_text = json.dumps({"synthetic": options, "version": ITA_METHOD_VERSION}, sort_keys=True)
        table = None
    else:
        _, table, _ = read_table(spec)
        paths = table["path"].tolist()
        images_fingerprint = files_fingerprint(paths)
        table = table.assign(row=np.arange(len(table))).drop_duplicates("image_id").set_index("image_id")
        masks_fingerprint = files_fingerprint([path for path in table["mask_path"] if path])
        key_text = f"ita|{ITA_METHOD_VERSION}|{image_size}|{images_fingerprint}|{masks_fingerprint}"
    cache_path = (Path(cache_dir) / f"ita-{hashlib.sha1(key_text.encode()).hexdigest()[:20]}.json"
                  if cache_dir else None)
    known = _read_angle_cache(cache_path)
    missing = list(dict.fromkeys(image_id for image_id in ids if image_id not in known))
    if missing:
        if table is None:
            known.update(_measure_synthetic(spec, missing, cache_dir))
        else:
            cached = _dataset_image_cache(paths, images_fingerprint, image_size, cache_dir)
            known.update(_measure_files(table, missing, image_size, cached, progress))
        _write_angle_cache(cache_path, known)
    elif progress:
        progress(len(ids), len(ids))
    return pd.Series([known[image_id] for image_id in ids], index=pd.Index(ids, name="image_id"), name="ita",
                     dtype=np.float64)


def _measure_synthetic(spec: DataSpec, image_ids: list[str], cache_dir) -> dict[str, float]:
    generated = load_or_generate_synthetic(cache_dir, **spec.synthetic_options())
    angles = {}
    for image_id in image_ids:
        match = re.fullmatch(r"synthetic_(\d+)", image_id)
        row = int(match.group(1)) if match else -1
        in_set = 0 <= row < len(generated.labels)
        angles[image_id] = (individual_typology_angle(generated.images[row], generated.masks[row])
                            if in_set else math.nan)
    return angles


def _dataset_image_cache(paths: list[str], fingerprint: str, size: int, cache_dir) -> DecodedImages | None:
    """The whole dataset as prepare_data and load_dataset_images decoded it at `size`, when that is in the
    cache (memory-mapped: only the rows measured are read); None otherwise, rather than decoding every image.
    The file name is core.data.images.decode_images_cached's: should it change, this only misses the cache."""
    if not cache_dir:
        return None
    key = hashlib.sha1(f"v1|{size}|{fingerprint}".encode()).hexdigest()[:20]
    if not (Path(cache_dir) / f"images-{key}.npy").exists():
        return None
    return decode_images_cached(paths, size, cache_dir)


def _measure_files(table: pd.DataFrame, image_ids: list[str], image_size: int, cached: DecodedImages | None,
                   progress) -> dict[str, float]:
    """Measure each listed image outside its own mask when it has a readable one, else outside the central
    disc: from the dataset's image cache when given, else decoded in chunks (not cached: the angle cache
    already makes the next call fast, and a second copy of the test images would only take disk)."""
    angles = {image_id: math.nan for image_id in image_ids}
    listed = [image_id for image_id in image_ids if image_id in table.index]
    if cached is not None:
        stored_at = {int(row): position for position, row in enumerate(cached.kept)}
        for done, image_id in enumerate(listed, start=1):
            position = stored_at.get(int(table.at[image_id, "row"]))
            if position is not None:
                angles[image_id] = individual_typology_angle(
                    cached.images[position], _read_mask(table.at[image_id, "mask_path"], image_size))
            if progress and (done % 64 == 0 or done == len(listed)):
                progress(done, len(listed))
        return angles
    for start in range(0, len(listed), DECODE_CHUNK):
        chunk = listed[start : start + DECODE_CHUNK]
        decoded = decode_images_cached(table.loc[chunk, "path"].tolist(), image_size, None)
        for image, position in zip(decoded.images, decoded.kept):
            image_id = chunk[position]
            angles[image_id] = individual_typology_angle(image, _read_mask(table.at[image_id, "mask_path"],
                                                                           image_size))
        if progress:
            progress(min(start + DECODE_CHUNK, len(listed)), len(listed))
    return angles


def _read_mask(path: str, size: int) -> np.ndarray | None:
    if not path:
        return None
    try:
        return decode_mask(path, size)
    except ImageError:
        return None  # an unreadable mask: the central disc stands in for it


def _read_angle_cache(path: Path | None) -> dict[str, float]:
    if path is None or not path.exists():
        return {}
    try:
        stored = json.loads(path.read_text())
        return {str(image_id): math.nan if angle is None else float(angle) for image_id, angle in stored.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}  # a damaged cache is measured again


def _write_angle_cache(path: Path | None, angles: dict[str, float]) -> None:
    if path is None:
        return
    temporary = path.with_name(f"{path.stem}.{os.getpid()}.tmp.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps({image_id: angle if math.isfinite(angle) else None
                                         for image_id, angle in angles.items()}))
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)  # a cache that cannot be written only costs time next call


def subgroup_table(comparison_or_entries, values: pd.Series, resamples: int = DEFAULT_RESAMPLES,
                   seed: int = DEFAULT_SEED) -> pd.DataFrame:
    """One row per model and group, the model's 'All' row first: Model, Group, n, positives, negatives, then
    for AUC, Sensitivity and Specificity the value, '<title> low' and '<title> high' (95% bootstrap interval)
    and '<title> gap' (group minus All), and too_small (fewer than MIN_PER_CLASS positives or negatives).

    `comparison_or_entries` is a core.evaluation.compare.Comparison or its list of ModelPredictions, judged
    at each entry's threshold; `values` gives each test image's group by image_id (group_values), and images
    it does not name go to 'unknown'."""
    entries = getattr(comparison_or_entries, "entries", comparison_or_entries)
    names = _group_names(values)
    order = _group_order(values, names)
    rows = []
    for entry in entries:
        test = entry.test
        if test.empty:
            continue
        labels = test["label"].to_numpy(dtype=np.int64)
        scores = test["prob_malignant"].to_numpy(dtype=np.float64)
        groups = names.reindex(test["image_id"].astype(str)).fillna(UNKNOWN).to_numpy()
        whole = _group_row(entry.name, ALL, labels, scores, entry.threshold, resamples, seed)
        model_rows = [whole] + [
            _group_row(entry.name, group, labels[groups == group], scores[groups == group], entry.threshold,
                       resamples, seed)
            for group in order if (groups == group).any()]
        for row in model_rows:
            for title, _ in SUBGROUP_METRICS:
                row[f"{title} gap"] = row[title] - whole[title]
        rows.extend(model_rows)
    columns = ["Model", "Group", "n", "positives", "negatives"] + [
        f"{title}{part}" for title, _ in SUBGROUP_METRICS for part in ("", " low", " high", " gap")] + ["too_small"]
    return pd.DataFrame(rows, columns=columns)


def _group_names(values: pd.Series) -> pd.Series:
    """Each image's group as text, one per image_id (the first where an id repeats), missing as 'unknown'."""
    values = values[~values.index.duplicated()]
    return pd.Series([UNKNOWN if pd.isna(value) else str(value) for value in values.astype(object)],
                     index=values.index.astype(str), dtype=object)


def _group_order(values: pd.Series, names: pd.Series) -> list[str]:
    """A categorical's own order, else numbers by value and then text alphabetically; 'unknown' last."""
    present = set(names) - {UNKNOWN}
    if isinstance(values.dtype, pd.CategoricalDtype):
        return [str(name) for name in values.cat.categories if str(name) in present] + [UNKNOWN]
    return sorted(present, key=_numbers_first) + [UNKNOWN]


def _numbers_first(name: str) -> tuple:
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def _group_row(model: str, group: str, labels: np.ndarray, scores: np.ndarray, threshold: float,
               resamples: int, seed: int) -> dict:
    positives = int(labels.sum())
    negatives = int(len(labels) - positives)
    intervals = bootstrap_metrics(labels, scores, threshold, resamples, seed)
    row = {"Model": model, "Group": group, "n": int(len(labels)), "positives": positives, "negatives": negatives}
    for title, name in SUBGROUP_METRICS:
        interval = intervals[name]
        row.update({title: interval.value, f"{title} low": interval.low, f"{title} high": interval.high})
    row["too_small"] = positives < MIN_PER_CLASS or negatives < MIN_PER_CLASS
    return row


def format_subgroup_table(table: pd.DataFrame, style: str = "table") -> str:
    """The subgroup table as text ('table'), LaTeX ('latex': value [interval], signed gaps, and a note on
    groups too small to judge) or CSV ('csv': every column of subgroup_table, bounds in their own columns)."""
    if style == "csv":
        return table.to_csv(index=False, float_format="%.4f")
    shown = display_subgroup_table(table)
    if style == "latex":
        return shown.to_latex(index=False, escape=True)
    if style == "table":
        return shown.to_string(index=False)
    raise ValueError(f"unknown format {style!r} (choose from table, csv, latex)")


def display_subgroup_table(table: pd.DataFrame) -> pd.DataFrame:
    """The subgroup table as text columns: n, positives, value [interval] and signed gap per metric, and a
    note on the groups too small to judge (the page's table and the text formats)."""
    shown = table[["Model", "Group", "n", "positives"]].copy()
    is_whole = (table["Group"] == ALL).to_numpy()
    for title, _ in SUBGROUP_METRICS:
        shown[title] = [_interval_text(value, low, high) for value, low, high in
                        zip(table[title], table[f"{title} low"], table[f"{title} high"])]
        shown[f"{title} gap"] = ["" if whole else f"{gap:+.3f}" if math.isfinite(gap) else "--"
                                 for whole, gap in zip(is_whole, table[f"{title} gap"])]
    shown["note"] = [f"too small to judge (< {MIN_PER_CLASS} per class)" if small else ""
                     for small in table["too_small"]]
    return shown


def _interval_text(value: float, low: float, high: float) -> str:
    if not math.isfinite(value):
        return "--"
    return f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if math.isfinite(low) and math.isfinite(high) else "")


def comparison_subgroups(comparison, by: str, cache_dir: Path | str | None, resamples: int = DEFAULT_RESAMPLES,
                         seed: int = DEFAULT_SEED, progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """subgroup_table of a Comparison's test images, grouped `by` the metadata (or skin tone) of the dataset
    those images come from: the runs' own dataset, or the external set the comparison is judged on."""
    if not comparison.entries:
        return subgroup_table([], pd.Series(dtype=object), resamples, seed)
    run = comparison.entries[0].run
    spec = comparison_dataset(comparison)
    image_ids = sorted({str(image_id) for entry in comparison.entries for image_id in entry.test["image_id"]})
    size = int((run.get("config") or {}).get("image_size") or PAPER_IMAGE_SIZE)
    values = group_values(spec, by, image_ids, cache_dir, image_size=size, progress=progress)
    return subgroup_table(comparison, values, resamples, seed)


def comparison_dataset(comparison) -> DataSpec:
    """The dataset a Comparison's test images come from: the external set it is judged on, or the dataset the
    first run was trained on; DatasetError when that is not recorded."""
    from core.evaluation.external import external_spec

    run = comparison.entries[0].run
    if comparison.external:
        spec = external_spec(comparison.store, run["run_id"], comparison.test_set)
    else:
        try:
            spec = recorded_data_spec(run)
        except StoredRunError:
            spec = None
    if spec is None:
        raise DatasetError(f"run {run['run_id']} does not record how its test images' dataset was loaded")
    return spec


def subgroup_choices(spec: DataSpec) -> list[str]:
    """What a dataset's images can be grouped by: skin tone always, the SUBGROUP_KEYS its metadata has, then
    its other categorical columns (at most MAX_GROUPS values, ids left out)."""
    try:
        metadata = read_metadata(spec)
    except DatasetError:
        return ["ita"]
    choices, used = [], set()
    for key in SUBGROUP_KEYS:
        if key == "ita":
            choices.append(key)
            continue
        try:
            used.add(metadata_column(metadata, key))
            choices.append(key)
        except DatasetError:
            continue
    for column in metadata.columns:
        lowered = str(column).lower()
        if column in used or lowered in IMAGE_COLUMNS or lowered.endswith("_id") or lowered == "image_id":
            continue
        if 1 < metadata[column].nunique(dropna=True) <= MAX_GROUPS:
            choices.append(str(column))
    return choices

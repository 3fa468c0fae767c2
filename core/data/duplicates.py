"""Near-duplicate images: the same picture resized, recompressed or slightly cropped.

Each image gets perceptual hashes from imagehash: pHash (low DCT frequencies), dHash and vertical
dHash (signs of horizontal and vertical gradients), 64 bits each, on the grayscale image and on five
views of it cut 3% smaller (one anchored at each corner, one centred). Two images are near-duplicates
when the summed Hamming distance of their whole-image hashes, or of one image's whole-image hashes
and a view of the other, is at most the threshold. The views are what make a slight crop look like
the original: dermoscopy images all show a round lesion on skin, so their global hashes are close to
begin with, and a crop moves the whole-image hash as far as a different lesion does (measurements in
docs/PERFORMANCE.md).

Hashes are computed once per dataset, from the files decoded at HASH_IMAGE_SIZE while the first decoded
image cache is built (core.data.images), and stored beside it; the synthetic set is hashed as drawn.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # imagehash, pandas and scipy load where used: the CLI's help reads this module's constants
    import pandas as pd

# Part of every stored hash file's name: changing how hashes are made must not reuse old files.
HASH_VERSION = 1
HASH_FUNCTIONS = ("phash", "dhash", "dhash_vertical")  # imagehash's, 64 bits each
HASH_BITS = 64 * len(HASH_FUNCTIONS)
HASH_WORDS = HASH_BITS // 64
VIEW_COUNT = 6  # the whole image, four corner-anchored crops and a centred one
WORKING_SIZE = 64  # grayscale size the views are cut from; imagehash shrinks further (32 px for pHash)
# Image files are hashed decoded at this size, whatever size they are trained at: the near-duplicates, and
# so the split, must not change with the image size. Twice WORKING_SIZE, so that JPEG's reduced-size
# decoding (core.data.images.decode_image) does not shrink a file and its crop along different paths.
HASH_IMAGE_SIZE = 128
VIEW_CUT = 0.03
# Summed bits (of HASH_BITS) at or below which two images are near-duplicates: planted copies (90% size,
# JPEG quality 70, 3% cut off two edges) of 128 to 512 px files come within 11, while no two of 3,000
# synthetic images do (the closest are 18 apart). Measurements in docs/PERFORMANCE.md.
DEFAULT_THRESHOLD = 16
PAIR_COLUMNS = ("id_a", "id_b", "distance", "split_a", "split_b", "label_a", "label_b", "conflicting_labels",
                "crosses_splits")


def hash_image(image: np.ndarray) -> np.ndarray:
    """Hashes of one H x W x 3 uint8 image: views x words uint64, the whole image first."""
    import imagehash

    gray = Image.fromarray(image).convert("L")
    if min(gray.size) > WORKING_SIZE:
        gray = gray.resize((WORKING_SIZE, WORKING_SIZE), Image.Resampling.BOX)
    width, height = gray.size
    cut_x, cut_y = max(1, round(width * VIEW_CUT)), max(1, round(height * VIEW_CUT))
    half_x, half_y = max(1, cut_x // 2), max(1, cut_y // 2)
    boxes = [(0, 0, width, height), (0, 0, width - cut_x, height - cut_y), (cut_x, cut_y, width, height),
             (cut_x, 0, width, height - cut_y), (0, cut_y, width - cut_x, height),
             (half_x, half_y, width - half_x, height - half_y)]
    functions = [getattr(imagehash, name) for name in HASH_FUNCTIONS]
    bits = np.stack([np.concatenate([function(gray.crop(box)).hash.ravel() for function in functions])
                     for box in boxes])
    return np.packbits(bits, axis=1).view(np.uint64)


def hash_images(images: np.ndarray, workers: int | None = None) -> np.ndarray:
    """Hashes of N images: N x views x words uint64 (see hash_image)."""
    if len(images) == 0:
        return np.zeros((0, VIEW_COUNT, HASH_WORDS), dtype=np.uint64)
    # PIL's resizing and scipy's DCT release the GIL for part of the work.
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        return np.stack(list(pool.map(hash_image, images, chunksize=32)))


def hashes_path(cache_file: Path) -> Path:
    """Where the hashes of the images cached in `cache_file` (a .npy or .npz) are stored."""
    return cache_file.with_name(f"{cache_file.stem}.hashes-v{HASH_VERSION}.npy")


def read_hashes(path: Path | None, count: int) -> np.ndarray | None:
    """Stored hashes of `count` images, or None when the file is missing, damaged or of another shape."""
    if path is None or not path.exists():
        return None
    try:
        stored = np.load(path)
    except (OSError, ValueError):
        return None
    return stored if stored.shape == (count, VIEW_COUNT, HASH_WORDS) and stored.dtype == np.uint64 else None


def write_hashes(path: Path | None, hashes: np.ndarray) -> None:
    """Store hashes atomically; a cache that cannot be written only costs the hashing again next time."""
    if path is not None:
        _save_atomically(path, hashes)


def _save_atomically(path: Path, array: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(temporary, array)
        os.replace(temporary, path)
    except OSError:
        pass


def load_or_hash_images(images: np.ndarray, path: Path | None) -> np.ndarray:
    """The images' hashes from `path`, computing and storing them when the file is missing or does not fit."""
    hashes = read_hashes(path, len(images))
    if hashes is None:
        hashes = hash_images(images)
        write_hashes(path, hashes)
    return hashes


def load_or_find_near_duplicates(hashes: np.ndarray, cache_dir: Path | str | None,
                                 threshold: int = DEFAULT_THRESHOLD) -> np.ndarray:
    """`find_near_duplicates`, stored in `cache_dir` under a digest of the hashes themselves: comparing all
    pairs grows with the square of the dataset (about a minute at 100,000 images on 2 cores), and the same
    images (hence the same pairs) are loaded again by every run, resume and evaluation."""
    if cache_dir is None:
        return find_near_duplicates(hashes, threshold)
    digest = hashlib.sha1(np.ascontiguousarray(hashes).tobytes()).hexdigest()[:20]
    path = Path(cache_dir) / f"pairs-v{HASH_VERSION}-{digest}-t{threshold}.npy"
    try:
        pairs = np.load(path)
        if pairs.ndim == 2 and pairs.shape[1] == 3 and pairs.dtype == np.int64:
            return pairs
    except (OSError, ValueError):
        pass  # missing or damaged: found again below
    pairs = find_near_duplicates(hashes, threshold)
    _save_atomically(path, pairs)  # one that cannot be written costs the search again next time
    return pairs


def _bit_counts(words: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words)
    return np.unpackbits(words.view(np.uint8).reshape(*words.shape, 8), axis=-1).sum(-1)


def _distances(left: list[np.ndarray], right: list[np.ndarray]) -> np.ndarray:
    """Hamming distances between every hash of `left` and every hash of `right`, each given as one array per
    64-bit word. Word by word and in uint8 (at most HASH_BITS differ): far faster than a short last axis."""
    return sum(_bit_counts(left_word[:, None] ^ right_word[None, :]) for left_word, right_word in zip(left, right))


def find_near_duplicates(hashes: np.ndarray, threshold: int = DEFAULT_THRESHOLD) -> np.ndarray:
    """All pairs of near-duplicate images: K x 3 int64 rows (index a, index b, distance), a < b.

    The whole-image hashes are compared all against all; views are compared only for pairs that can
    still come within the threshold. By the triangle inequality a view of image a is at least
    d(whole a, whole b) - d(whole a, view of a) away from image b, so the rest are skipped unseen.
    """
    count = len(hashes)
    if count < 2:
        return np.zeros((0, 3), dtype=np.int64)
    views = [[np.ascontiguousarray(hashes[:, view, word]) for word in range(hashes.shape[2])]
             for view in range(hashes.shape[1])]
    whole = views[0]
    spread = _bit_counts(hashes ^ hashes[:, :1]).sum(-1, dtype=np.int64).max(1)  # how far an image's views reach
    reach = threshold + spread
    block = max(1, 1_000_000 // count)
    found = []
    for start in range(0, count - 1, block):
        rows, columns = slice(start, min(start + block, count - 1)), slice(start + 1, count)
        distance = _distances([word[rows] for word in whole], [word[columns] for word in whole])
        candidate = (distance <= reach[rows, None]) | (distance <= reach[None, columns])
        dense = candidate.mean() > 0.05
        if dense:
            # Images whose views reach far (noise-like pictures): comparing every view of the block at once
            # is cheaper than gathering the many candidates one by one.
            for view in views[1:]:
                for left, right in ((view, whole), (whole, view)):
                    distance = np.minimum(distance, _distances([word[rows] for word in left],
                                                               [word[columns] for word in right]))
            candidate = distance <= threshold
        a, b = np.nonzero(candidate)
        first, second = a + start, b + start + 1
        keep = first < second
        first, second, best = first[keep], second[keep], distance[a[keep], b[keep]].astype(np.int64)
        if not dense:
            for view in range(1, hashes.shape[1]):
                best = np.minimum(best, _bit_counts(hashes[first, view] ^ hashes[second, 0]).sum(-1, dtype=np.int64))
                best = np.minimum(best, _bit_counts(hashes[first, 0] ^ hashes[second, view]).sum(-1, dtype=np.int64))
        close = best <= threshold
        found.append(np.stack([first[close], second[close], best[close]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 3), dtype=np.int64)


def merge_groups(groups: Sequence[str], pairs: np.ndarray) -> np.ndarray:
    """Each image's group with the groups of near-duplicate pairs joined (a pair's two groups, and any
    group linked to them through other pairs, become one). A joined group takes the smallest of its
    names, so images without near-duplicates keep theirs, and so does a dataset without any."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    names, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    if len(pairs) == 0:
        return names[index]
    links = coo_matrix((np.ones(len(pairs)), (index[pairs[:, 0]], index[pairs[:, 1]])), shape=(len(names),) * 2)
    _, component = connected_components(links, directed=False)
    # names are sorted, so the lowest group number in each component is its smallest name.
    smallest = np.full(component.max() + 1, len(names))
    np.minimum.at(smallest, component, np.arange(len(names)))
    return names[smallest[component[index]]]


def pairs_table(table: pd.DataFrame, pairs: np.ndarray) -> pd.DataFrame:
    """One row per near-duplicate pair (PAIR_COLUMNS) of a table with image_id, label and split columns,
    the closest pairs first."""
    import pandas as pd

    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0], pairs[:, 2]))]
    first, second = pairs[:, 0], pairs[:, 1]
    ids, labels = table["image_id"].astype(str).to_numpy(), table["label"].to_numpy()
    splits = table["split"].astype(str).to_numpy() if "split" in table else np.full(len(table), "")
    return pd.DataFrame({
        "id_a": ids[first], "id_b": ids[second], "distance": pairs[:, 2].astype(int),
        "split_a": splits[first], "split_b": splits[second],
        "label_a": labels[first].astype(int), "label_b": labels[second].astype(int),
        "conflicting_labels": labels[first] != labels[second], "crosses_splits": splits[first] != splits[second],
    }, columns=list(PAIR_COLUMNS))


def summarise_pairs(pairs: pd.DataFrame, grouped: bool, threshold: int = DEFAULT_THRESHOLD) -> dict:
    """The near-duplicate block of run.json: pair counts, and whether the split kept pairs together."""
    return {"pairs": len(pairs), "cross_split_pairs": int(pairs["crosses_splits"].sum()),
            "conflicting_labels": int(pairs["conflicting_labels"].sum()), "grouped": bool(grouped),
            "threshold": int(threshold), "hash": f"phash+dhash+dhash_vertical, 6 views, v{HASH_VERSION}"}

"""Decoding image files into fixed-size uint8 RGB arrays, once, into an on-disk cache."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.data.duplicates import (
    HASH_IMAGE_SIZE,
    HASH_WORDS,
    VIEW_COUNT,
    hash_image,
    hashes_path,
    read_hashes,
    write_hashes,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ImageError(ValueError):
    """An image file that cannot be used; the message says why in a few words."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (grayscale, palette, RGBA, CMYK, 16-bit, float) as 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: scale the used range to 0..255 instead of clipping at 255.
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent parts become white, as an image viewer shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """A file as a size x size x 3 uint8 array; raises ImageError for anything unreadable."""
    try:
        with Image.open(path) as image:
            # JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers `size`.
            image.draft("RGB", (size, size))
            image = ImageOps.exif_transpose(image)
            image = to_rgb(image)
            image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
            return np.asarray(image, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except Image.DecompressionBombError:
        raise ImageError("image too large (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageError("not an image or unknown format") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"corrupt or truncated image ({error})") from None


def decode_mask(path: str | Path, size: int) -> np.ndarray:
    """A lesion mask file as a size x size uint8 array of 0/1."""
    try:
        with Image.open(path) as image:
            mask = np.asarray(image.convert("L").resize((size, size), Image.Resampling.NEAREST))
            # Masks are stored as 0/255 (ISIC) or as 0/1 label images; either way non-background is lesion.
            return (mask > (127 if mask.max() > 1 else 0)).astype(np.uint8)
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"unreadable mask ({error})") from None


@dataclass
class DecodedImages:
    images: np.ndarray  # N x S x S x 3 uint8, only the readable files
    kept: np.ndarray  # indices into the requested list of the readable files
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)
    hashes: np.ndarray | None = None  # N x views x words uint64 perceptual hashes (core.data.duplicates)


def files_fingerprint(paths: Sequence[str]) -> str:
    """A hash of file names, sizes and modification times: changes when any file changes."""
    digest = hashlib.sha1()
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}|missing\n".encode())
    return digest.hexdigest()


def decode_images_cached(
    paths: Sequence[str],
    size: int,
    cache_dir: Path | str | None,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> DecodedImages:
    """Decode and resize every file once; later calls with the same files and size read the cache.

    The cache is a plain .npy array (memory-mapped on read) with a small JSON index beside it. The files'
    perceptual hashes (core.data.duplicates) are stored beside it too, computed from the files decoded at
    HASH_IMAGE_SIZE while the first cache of them is built: one hash file serves every image size, and a
    cache from before hashes existed gets its hash file once.
    """
    fingerprint = files_fingerprint(paths)
    key = hashlib.sha1(f"v1|{size}|{fingerprint}".encode()).hexdigest()[:20]
    array_path = Path(cache_dir) / f"images-{key}.npy" if cache_dir else None
    index_path = array_path.with_suffix(".json") if array_path else None
    files_key = hashlib.sha1(fingerprint.encode()).hexdigest()[:20]
    hashes_file = hashes_path(Path(cache_dir) / f"files-{files_key}") if cache_dir else None
    hashes = read_hashes(hashes_file, len(paths))
    if array_path and array_path.exists() and index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            kept = np.asarray(index["kept"], dtype=np.int64)
            images = np.asarray(np.load(array_path, mmap_mode="r"))
            if hashes is None:
                hashes = _hash_files(paths, kept, workers)
                write_hashes(hashes_file, hashes)
            return DecodedImages(images, kept, [tuple(item) for item in index["skipped"]], hashes[kept])
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    missing_hashes = hashes is None
    if missing_hashes:
        hashes = np.zeros((len(paths), VIEW_COUNT, HASH_WORDS), dtype=np.uint64)
    decoded = _decode_all(paths, size, progress, workers, hashes if missing_hashes else None)
    decoded.hashes = hashes[decoded.kept]
    if array_path:
        _write_cache(array_path, index_path, decoded)
        if missing_hashes:
            write_hashes(hashes_file, hashes)
    return decoded


def hash_file(path: str | Path) -> np.ndarray:
    """A file's perceptual hashes (core.data.duplicates.hash_image) at HASH_IMAGE_SIZE; ImageError if unreadable."""
    return hash_image(decode_image(path, HASH_IMAGE_SIZE))


def _hash_files(paths: Sequence[str], kept: np.ndarray, workers: int | None) -> np.ndarray:
    hashes = np.zeros((len(paths), VIEW_COUNT, HASH_WORDS), dtype=np.uint64)

    def hash_one(index: int) -> None:
        try:
            hashes[index] = hash_file(paths[index])
        except ImageError:
            pass  # changed since it was decoded; its fingerprint, and so this file, will not be used again

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(hash_one, kept))
    return hashes


def _decode_all(paths, size, progress, workers, hashes: np.ndarray | None) -> DecodedImages:
    """Decode every file; also fill `hashes` (one row per file) unless it is None."""
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    skipped: list[tuple[int, str]] = []

    def decode_one(index: int) -> tuple[int, str | None]:
        try:
            images[index] = decode_image(paths[index], size)
            if hashes is not None:  # in the same pool, so that decoding and hashing share the cores
                hashes[index] = hash_file(paths[index])
            return index, None
        except ImageError as error:
            return index, str(error)

    # PIL releases the GIL while decoding, so threads use every core without pickling arrays.
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for done, (index, problem) in enumerate(pool.map(decode_one, range(len(paths))), start=1):
            if problem is None:
                ok[index] = True
            else:
                skipped.append((index, problem))
            if progress and (done % 64 == 0 or done == len(paths)):
                progress(done, len(paths))
    kept = np.flatnonzero(ok)
    return DecodedImages(images[kept] if len(kept) < len(paths) else images, kept, skipped)


def _write_cache(array_path: Path, index_path: Path, decoded: DecodedImages) -> None:
    """Atomic writes: the array first, then the index that makes it valid."""
    try:
        array_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = array_path.with_name(f"{array_path.stem}.{os.getpid()}.tmp.npy")
        np.save(temporary, decoded.images)
        os.replace(temporary, array_path)
        index = {"kept": decoded.kept.tolist(), "skipped": [list(item) for item in decoded.skipped]}
        temporary_index = index_path.with_name(f"{index_path.stem}.{os.getpid()}.tmp.json")
        temporary_index.write_text(json.dumps(index))
        os.replace(temporary_index, index_path)
    except OSError:
        pass  # a cache that cannot be written only costs time on the next run

"""Decoding image files into fixed-size uint8 RGB arrays, once, into an on-disk cache.

The cache is a plain .npy file written row by row while the files decode, and read back a batch at a
time (`DiskImages`): neither building nor reading it holds the whole dataset in memory, so a dataset
larger than RAM (ISIC 2020, SLICE-3D) trains as a small one does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
from core.runs import write_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# A cache that cannot be written (read-only or full disk) is decoded into memory instead, up to this size;
# a larger one is refused with a message, since holding it would take the machine's memory.
IN_MEMORY_FALLBACK_BYTES = 1 << 30


class ImageError(ValueError):
    """An image file that cannot be used; the message says why in a few words."""


class ImageCacheError(ValueError):
    """The image cache of a dataset too large for memory cannot be written; the message says where and why."""


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


class DiskImages:
    """N x S x S x 3 uint8 images stored in a .npy file, read a few rows at a time.

    Indexing (an int, a slice, an index array or a boolean mask) returns an ndarray, as numpy's would; `subset`
    gives a lazy view of some rows. Reads are `os.pread` calls rather than a memory map: the kernel's page cache
    still keeps the hot rows, but a mapped file's pages count in the process's resident memory and an epoch
    touches them all. pread is safe from several threads at once.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, path: str | Path, rows: np.ndarray | None = None) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as file:
            version = np.lib.format.read_magic(file)
            formats = np.lib.format
            read_header = formats.read_array_header_1_0 if version == (1, 0) else formats.read_array_header_2_0
            shape, fortran, dtype = read_header(file)
            self._offset = file.tell()
        if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3:
            raise ValueError(f"{self.path.name} is not an N x S x S x 3 uint8 image cache")
        self._stored = int(shape[0])
        self._row_shape = tuple(int(size) for size in shape[1:])
        self._row_bytes = int(np.prod(self._row_shape))
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        if self._rows is not None and len(self._rows) and (self._rows.min() < 0 or self._rows.max() >= self._stored):
            raise IndexError("rows outside the image cache")
        self._fd: int | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), *self._row_shape)

    @property
    def nbytes(self) -> int:
        return len(self) * self._row_bytes

    def __len__(self) -> int:
        return self._stored if self._rows is None else len(self._rows)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"row {key} of {len(self)}")
            return self._read(np.array([index]))[0]
        if isinstance(key, slice):
            return self._read(np.arange(len(self))[key])
        rows = np.asarray(key)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return self._read(rows.astype(np.int64, copy=False))

    def __iter__(self):
        for start in range(0, len(self), 256):
            yield from self[start: start + 256]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[:]
        return array.astype(dtype) if dtype is not None else array

    def subset(self, rows) -> DiskImages:
        """These rows, still on disk."""
        rows = np.asarray(rows, dtype=np.int64)
        view = DiskImages.__new__(DiskImages)
        view.__dict__.update(self.__dict__)
        view._rows, view._fd = (rows if self._rows is None else self._rows[rows]), None
        return view

    def _physical(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"rows outside 0..{len(self) - 1}")
        rows = np.where(rows < 0, rows + len(self), rows)
        return rows if self._rows is None else self._rows[rows]

    def _read(self, rows: np.ndarray) -> np.ndarray:
        physical = self._physical(rows)
        out = np.empty((len(physical), *self._row_shape), dtype=np.uint8)
        if not len(physical):
            return out
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        order = np.argsort(physical, kind="stable")
        sorted_rows = physical[order]
        # Runs of consecutive rows are read with one call (a slice, or a sorted batch of a small dataset).
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        in_order = not len(breaks) and bool((np.diff(order) == 1).all())
        for run in np.split(np.arange(len(sorted_rows)), breaks):
            first, count = int(sorted_rows[run[0]]), len(run)
            if in_order:  # one ascending run: straight into the result
                _read_exactly(self._fd, memoryview(out).cast("B"), self._offset + first * self._row_bytes)
                break
            buffer = np.empty((count, *self._row_shape), dtype=np.uint8)
            _read_exactly(self._fd, memoryview(buffer).cast("B"), self._offset + first * self._row_bytes)
            out[order[run]] = buffer
        return out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _read_exactly(fd: int, target: memoryview, offset: int) -> None:
    while len(target):
        count = os.preadv(fd, [target], offset)
        if count <= 0:
            raise OSError(f"the image cache ended early at byte {offset}")
        target, offset = target[count:], offset + count


def take_rows(images: np.ndarray | DiskImages, rows: np.ndarray) -> np.ndarray | DiskImages:
    """Some rows of images in memory (a copy) or on disk (a lazy view, nothing read yet)."""
    return images.subset(rows) if isinstance(images, DiskImages) else images[rows]


@dataclass
class DecodedImages:
    images: np.ndarray | DiskImages  # N x S x S x 3 uint8, only the readable files
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

    The cache is a plain .npy array, written row by row as the files decode and read back as `DiskImages`,
    with a small JSON index beside it that is written last: an interrupted or failed build leaves no cache that
    is taken as valid. The files' perceptual hashes (core.data.duplicates) are stored beside it too, computed
    from the files decoded at HASH_IMAGE_SIZE while the first cache of them is built: one hash file serves
    every image size, and a cache from before hashes existed gets its hash file once. Without a cache folder
    the images are decoded into memory.
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
            images = _cached_images(array_path, kept, len(paths), size)
            if hashes is None:
                hashes = _hash_files(paths, kept, workers)
                write_hashes(hashes_file, hashes)
            return DecodedImages(images, kept, [tuple(item) for item in index["skipped"]], hashes[kept])
        except (OSError, ValueError, KeyError, IndexError):
            pass  # a damaged cache is rebuilt below
    missing_hashes = hashes is None
    if missing_hashes:
        hashes = np.zeros((len(paths), VIEW_COUNT, HASH_WORDS), dtype=np.uint64)
    target = hashes if missing_hashes else None
    decoded = None
    if array_path:
        try:
            decoded = _decode_into_cache(paths, size, progress, workers, target, array_path, index_path)
        except OSError as error:
            needed = len(paths) * size * size * 3
            if needed > IN_MEMORY_FALLBACK_BYTES:
                raise ImageCacheError(
                    f"cannot write the image cache in {array_path.parent} ({error.strerror or error}); it needs "
                    f"{needed / 1e9:.1f} GB of disk, too much to hold in memory instead") from None
    if decoded is None:
        decoded = _decode_all(paths, size, progress, workers, target)
    decoded.hashes = hashes[decoded.kept]
    if array_path and missing_hashes:
        write_hashes(hashes_file, hashes)
    return decoded


def _cached_images(array_path: Path, kept: np.ndarray, count: int, size: int) -> DiskImages:
    images = DiskImages(array_path)
    if images.shape[1:] != (size, size, 3):
        raise ValueError("image cache of another size")
    if len(images) == count:  # rows for every file, skipped ones left empty
        return images.subset(kept) if len(kept) < count else images
    if len(images) == len(kept):  # caches written before skipped rows were kept in place
        return images
    raise ValueError("image cache does not match its index")


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
    """Decode every file into memory; also fill `hashes` (one row per file) unless it is None."""
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    ok, skipped = _decode_rows(paths, size, progress, workers, hashes, images.__setitem__)
    kept = np.flatnonzero(ok)
    return DecodedImages(images[kept] if len(kept) < len(paths) else images, kept, skipped)


def _decode_into_cache(paths, size, progress, workers, hashes: np.ndarray | None, array_path: Path,
                       index_path: Path) -> DecodedImages:
    """Decode every file straight into the cache file (one row per file, a skipped file's row left empty),
    then publish it: the array under its name first, then the index that makes it valid. Raises OSError (a
    full or read-only disk) with nothing left behind."""
    shape = (len(paths), size, size, 3)
    row_bytes = size * size * 3
    array_path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(array_path.parent).free
    if free < row_bytes * len(paths) + (64 << 20):
        raise OSError(28, f"No space left on device: {row_bytes * len(paths) / 1e9:.1f} GB needed, "
                          f"{free / 1e9:.1f} GB free")
    temporary = array_path.with_name(f"{array_path.stem}.{os.getpid()}.tmp.npy")
    index_path.unlink(missing_ok=True)  # a damaged cache being rebuilt is invalid until the new index is written
    try:
        with open(temporary, "wb") as file:
            np.lib.format.write_array_header_1_0(file, {"descr": "|u1", "fortran_order": False, "shape": shape})
            offset = file.tell()
            file.truncate(offset + row_bytes * len(paths))
            file.flush()

            def write(index: int, image: np.ndarray) -> None:
                _write_exactly(file.fileno(), image, offset + index * row_bytes)

            ok, skipped = _decode_rows(paths, size, progress, workers, hashes, write)
            os.fsync(file.fileno())
        os.replace(temporary, array_path)
        kept = np.flatnonzero(ok)
        write_json(index_path, {"kept": kept.tolist(), "skipped": [list(item) for item in skipped]})
    except BaseException:
        temporary.unlink(missing_ok=True)
        if not index_path.exists():
            array_path.unlink(missing_ok=True)
        raise
    images = DiskImages(array_path)
    return DecodedImages(images.subset(kept) if len(kept) < len(paths) else images, kept, skipped)


def _write_exactly(fd: int, image: np.ndarray, offset: int) -> None:
    data = memoryview(np.ascontiguousarray(image)).cast("B")
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _decode_rows(paths, size, progress, workers, hashes: np.ndarray | None, store) -> tuple[np.ndarray, list]:
    """Decode every file and hand each image to `store(index, image)`; also fill `hashes` unless it is None.
    Returns which files were readable and (index, reason) for the others."""
    ok = np.zeros(len(paths), dtype=bool)
    skipped: list[tuple[int, str]] = []
    failures: list[OSError] = []  # from `store` (a full disk): the files still queued are then left undecoded

    def decode_one(index: int) -> tuple[int, str | None]:
        if failures:
            return index, None
        try:
            image = decode_image(paths[index], size)
            try:
                store(index, image)
            except OSError as error:
                failures.append(error)
                return index, None
            if hashes is not None:  # in the same pool, so that decoding and hashing share the cores
                hashes[index] = hash_image(image) if size == HASH_IMAGE_SIZE else hash_file(paths[index])
            return index, None
        except ImageError as error:
            return index, str(error)

    # PIL releases the GIL while decoding, so threads use every core without pickling arrays.
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for done, (index, problem) in enumerate(pool.map(decode_one, range(len(paths))), start=1):
            if failures:
                break
            if problem is None:
                ok[index] = True
            else:
                skipped.append((index, problem))
            if progress and (done % 64 == 0 or done == len(paths)):
                progress(done, len(paths))
    if failures:
        raise failures[0]
    return ok, skipped

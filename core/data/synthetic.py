"""The built-in demo dataset: dermoscopy-like images drawn by code, deterministic from a seed.

Lesions follow the ABCD rule of dermoscopy. Benign: small, round, symmetric, one even brown, sharp
border. Malignant: larger, asymmetric, irregular border, several colours (black dots, blue-grey veil,
dark blotches). Both classes share the skin, hair and vignette so that only the lesion tells them
apart, unless a confounder is asked for: an ink marker or ruler on a share of the malignant images
only, which a model can learn as a shortcut (a teaching demo for Grad-CAM).

Every image comes with its ground-truth lesion mask. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SKIN_TONES = np.array(
    [[236, 200, 175], [224, 180, 150], [210, 160, 125], [190, 140, 105], [170, 120, 90]], dtype=np.float32
)
BENIGN_BROWNS = np.array([[150, 100, 65], [130, 85, 55], [165, 115, 75], [115, 75, 50]], dtype=np.float32)
DARK_BROWN = np.array([70, 42, 28], dtype=np.float32)
BLACK = np.array([25, 18, 16], dtype=np.float32)
BLUE_GREY = np.array([105, 115, 140], dtype=np.float32)
LIGHT_BROWN = np.array([160, 110, 75], dtype=np.float32)
# Share of each class drawn "atypical": dysplastic-looking benign lesions (larger, two browns, less
# regular) and early melanomas (smaller, fewer dots, faint veil), so that the classes overlap a little.
ATYPICAL_SHARE = 0.25
INK_COLOURS = np.array([[95, 40, 130], [40, 60, 150], [30, 110, 70]], dtype=np.float32)
CONFOUNDER_KINDS = ("ink", "ruler")
# Lesion centres lie anywhere within this distance of the image's centre (unit grid), so that a map
# pointing at the middle of every image does not find the lesion (issue 15). Runs stored before the option
# existed were drawn at 0.15 (core.config.DataSpec.from_dict); a border may leave the field, as in ISIC images.
LESION_SPREAD = 0.45
CENTRED_LESION_SPREAD = 0.15
MAX_LESION_SPREAD = 0.6


@dataclass
class SyntheticSet:
    images: np.ndarray  # N x S x S x 3, uint8
    masks: np.ndarray  # N x S x S, uint8 (1 inside the lesion)
    labels: np.ndarray  # N, int64 (1 = malignant)
    confounded: np.ndarray  # N, bool: carries the shortcut artifact

    @property
    def image_ids(self) -> list[str]:
        return [f"synthetic_{i:05d}" for i in range(len(self.labels))]


def generate_synthetic(
    count: int = 1200,
    image_size: int = 128,
    seed: int = 0,
    malignant_fraction: float = 0.35,
    confounder_fraction: float = 0.0,
    confounder_kind: str = "ink",
    lesion_spread: float = LESION_SPREAD,
) -> SyntheticSet:
    """Draw `count` images, each lesion centred anywhere within `lesion_spread` of the image's centre (unit
    grid: 1 is the edge). Each image has its own generator seeded by (seed, index), so any image
    can be redrawn alone and the set does not depend on how the work is split."""
    if count < 2:
        raise ValueError("the synthetic set needs at least 2 images")
    if not 32 <= image_size <= 512:
        raise ValueError("synthetic image size must be between 32 and 512 pixels")
    if not 0 < malignant_fraction < 1:
        raise ValueError("malignant fraction must be in (0, 1)")
    if not 0 <= confounder_fraction <= 1:
        raise ValueError("confounder fraction must be in [0, 1]")
    if confounder_kind not in CONFOUNDER_KINDS:
        raise ValueError(f"confounder kind must be one of {', '.join(CONFOUNDER_KINDS)}")
    if not 0 <= lesion_spread <= MAX_LESION_SPREAD:
        raise ValueError(f"lesion spread must be in [0, {MAX_LESION_SPREAD}]")

    plan = np.random.default_rng([seed, 0x5EED])
    labels = np.zeros(count, dtype=np.int64)
    labels[: max(1, round(count * malignant_fraction))] = 1
    plan.shuffle(labels)
    malignant = np.flatnonzero(labels == 1)
    confounded = np.zeros(count, dtype=bool)
    confounded[plan.permutation(malignant)[: round(len(malignant) * confounder_fraction)]] = True

    grid = unit_grid(image_size)
    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    masks = np.empty((count, image_size, image_size), dtype=np.uint8)
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        images[index], masks[index] = draw_image(
            rng, grid, bool(labels[index]), confounder_kind if confounded[index] else None, lesion_spread
        )
    return SyntheticSet(images=images, masks=masks, labels=labels, confounded=confounded)


def load_or_generate_synthetic(cache_dir: Path | str | None, **options) -> SyntheticSet:
    """The synthetic set from the on-disk cache, drawing and caching it on first use."""
    if cache_dir is None:
        return generate_synthetic(**options)
    path = synthetic_cache_path(cache_dir, **options)
    if path.exists():
        try:
            with np.load(path) as stored:
                return SyntheticSet(**{name: stored[name] for name in ("images", "masks", "labels", "confounded")})
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is simply redrawn
    dataset = generate_synthetic(**options)
    temporary = path.with_suffix(f".{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(temporary, images=dataset.images, masks=dataset.masks, labels=dataset.labels,
                 confounded=dataset.confounded)
        os.replace(temporary, path)
    except OSError:  # a read-only or full store: the set is drawn again next time, nothing else changes
        temporary.unlink(missing_ok=True)
    return dataset


def synthetic_cache_path(cache_dir: Path | str, **options) -> Path:
    """The file the synthetic set drawn with `options` is cached in (files beside it share its stem)."""
    options = {"lesion_spread": LESION_SPREAD, **options}  # the same set has one key, named or defaulted
    key = hashlib.sha1(json.dumps({"version": 4, **options}, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"synthetic-{key}.npz"


def unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: (y, x). Lesion centres and radii are in these units."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(axis, axis, indexing="ij")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def draw_image(
    rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray], malignant: bool, confounder: str | None,
    lesion_spread: float = LESION_SPREAD,
) -> tuple[np.ndarray, np.ndarray]:
    """One image and its lesion mask."""
    size = grid[0].shape[0]
    atypical = bool(rng.random() < ATYPICAL_SHARE)
    image, tone = _draw_skin(rng, size)
    alpha, mask, centre, radius = _lesion_shape(rng, grid, malignant, atypical, lesion_spread)
    if malignant:
        lesion = _malignant_colours(rng, grid, centre, radius, size, atypical)
    else:
        lesion = _benign_colours(rng, grid, centre, tone, size, atypical)
    image = image * (1 - alpha[..., None]) + lesion * alpha[..., None]
    image = _draw_hair(rng, image, size)
    if confounder == "ink":
        image = _draw_ink(rng, image, grid, centre, radius)
    elif confounder == "ruler":
        image, transposed = _draw_ruler(rng, image, size)
        if transposed:  # the lesion moved with the image: its mask must move too
            mask = np.ascontiguousarray(mask.T)
    image = _apply_vignette(rng, image, grid)
    image += rng.normal(0, 3.0, image.shape).astype(np.float32)
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    picture = picture.filter(ImageFilter.GaussianBlur(radius=0.5 * size / 128))
    return np.asarray(picture), mask


def _draw_skin(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    tone = SKIN_TONES[rng.integers(len(SKIN_TONES))] + rng.normal(0, 6, 3)
    shade = 1 + 0.06 * _smooth_noise(rng, size, 4)[..., None]
    pores = rng.normal(0, 4.0, (size, size, 1))
    redness = np.array([10, -4, -4], dtype=np.float32) * np.clip(_smooth_noise(rng, size, 6), 0, None)[..., None]
    return (tone * shade + pores + redness).astype(np.float32), tone


def _lesion_shape(rng: np.random.Generator, grid, malignant: bool, atypical: bool, spread: float):
    """Soft alpha, binary mask, centre and mean radius of a lesion whose border r(theta) is a sum
    of harmonics: low orders make it asymmetric, high orders make the border irregular."""
    y, x = grid
    centre = rng.uniform(-spread, spread, 2)
    if malignant and atypical:
        radius = rng.uniform(0.22, 0.40)
        low, high, edge = rng.uniform(0.03, 0.10, 3), rng.uniform(0.005, 0.025, 6), rng.uniform(0.02, 0.06)
    elif malignant:
        radius = rng.uniform(0.30, 0.55)
        low, high, edge = rng.uniform(0.06, 0.18, 3), rng.uniform(0.01, 0.05, 6), rng.uniform(0.03, 0.10)
    elif atypical:
        radius = rng.uniform(0.28, 0.48)
        low, high, edge = rng.uniform(0.03, 0.09, 3), rng.uniform(0.005, 0.02, 6), rng.uniform(0.02, 0.05)
    else:
        radius = rng.uniform(0.17, 0.40)
        low, high, edge = rng.uniform(0.0, 0.04, 3), rng.uniform(0.0, 0.012, 6), rng.uniform(0.015, 0.03)
        low[0] = 0.0  # no first harmonic: stays symmetric about its centre
    dy, dx = y - centre[0], x - centre[1]
    stretch = rng.uniform(0.85, 1.15)
    distance = np.sqrt((dx * stretch) ** 2 + (dy / stretch) ** 2)
    theta = np.arctan2(dy, dx)
    border = np.ones_like(theta)
    for order, amplitude in zip(range(1, 4), low):
        border += amplitude * np.cos(order * theta + rng.uniform(0, 2 * np.pi))
    for order, amplitude in zip(rng.integers(5, 15, 6), high):
        border += amplitude * np.cos(order * theta + rng.uniform(0, 2 * np.pi))
    border *= radius
    alpha = np.clip((border - distance) / edge + 0.5, 0, 1).astype(np.float32)
    mask = (distance < border).astype(np.uint8)
    return alpha, mask, centre, radius


def _benign_colours(rng: np.random.Generator, grid, centre, skin_tone: np.ndarray, size: int,
                    atypical: bool) -> np.ndarray:
    """One even brown, always clearly darker than the skin around it, with a faint darker centre;
    atypical nevi mix two browns."""
    y, x = grid
    brown = BENIGN_BROWNS[rng.integers(len(BENIGN_BROWNS))] + rng.normal(0, 5, 3)
    brown = np.minimum(brown, skin_tone * rng.uniform(0.55, 0.75))
    if atypical:
        darker = brown * rng.uniform(0.6, 0.8)
        mix = np.clip(0.5 + 0.8 * _smooth_noise(rng, size, 4), 0, 1)[..., None]
        brown = brown * (1 - mix) + darker * mix
    centre_weight = np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / 0.05)[..., None]
    texture = rng.normal(0, 3.0, y.shape + (1,))
    return (brown * (1 - 0.08 * centre_weight) + texture).astype(np.float32)


def _malignant_colours(rng: np.random.Generator, grid, centre, radius: float, size: int,
                       atypical: bool) -> np.ndarray:
    """Several colours: dark and light brown blotches, a blue-grey veil, black dots (fainter and
    fewer in an atypical, early lesion)."""
    y, x = grid
    blotches = _smooth_noise(rng, size, 5)[..., None]
    colour = DARK_BROWN + (LIGHT_BROWN - DARK_BROWN) * np.clip(0.5 + 0.6 * blotches, 0, 1)
    black_patches = np.clip(_smooth_noise(rng, size, 7) - 0.6, 0, 1)[..., None]
    colour = colour * (1 - black_patches) + BLACK * black_patches
    veil_offset = rng.uniform(0.8, 1.6) if atypical else rng.uniform(0.0, 0.8)
    veil = np.clip(0.7 * (_smooth_noise(rng, size, 4) - veil_offset), 0, 0.6)[..., None]
    colour = colour * (1 - veil) + BLUE_GREY * veil
    dots = np.zeros(y.shape, dtype=np.float32)
    for _ in range(rng.integers(0, 6) if atypical else rng.integers(6, 25)):
        angle, reach = rng.uniform(0, 2 * np.pi), radius * np.sqrt(rng.uniform(0.2, 0.9))
        dy, dx = centre[0] + reach * np.sin(angle), centre[1] + reach * np.cos(angle)
        dot_radius = rng.uniform(0.012, 0.03)
        dots = np.maximum(dots, ((y - dy) ** 2 + (x - dx) ** 2 < dot_radius**2).astype(np.float32))
    colour = colour * (1 - dots[..., None]) + BLACK * dots[..., None]
    return (colour + rng.normal(0, 4.0, colour.shape)).astype(np.float32)


def _draw_hair(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
    """Dark, thin quadratic Bezier strands, the same for both classes."""
    strands = rng.integers(0, 5)
    if strands == 0:
        return image
    cover, hair_colour = hair_strands(rng, size, strands)
    return image * (1 - cover[..., None]) + hair_colour * cover[..., None]


def hair_strands(rng: np.random.Generator, size: int, strands: int) -> tuple[np.ndarray, np.ndarray]:
    """Opacity (size x size) and colour (3) of `strands` dark, thin quadratic Bezier hairs, 1 or 2 px thick.
    Shared with core.audit.artefacts, so the draw order here is part of the synthetic set's identity."""
    cover = np.zeros((size, size), dtype=np.float32)
    t = np.linspace(0, 1, 3 * size)[:, None]
    for _ in range(strands):
        p0 = rng.uniform(-0.1, 1.1, 2) * size
        p1, p2 = p0 + rng.normal(0, 0.3, 2) * size, p0 + rng.normal(0, 0.45, 2) * size
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        rows, cols = np.round(curve[:, 0]).astype(int), np.round(curve[:, 1]).astype(int)
        thickness = 1 if rng.random() < 0.6 else 2
        for offset in range(thickness):
            inside = (rows + offset >= 0) & (rows + offset < size) & (cols >= 0) & (cols < size)
            cover[rows[inside] + offset, cols[inside]] = rng.uniform(0.6, 0.95)
    hair_colour = np.array([40, 28, 22], dtype=np.float32) + rng.normal(0, 5, 3)
    return cover, hair_colour


def _draw_ink(rng: np.random.Generator, image: np.ndarray, grid, centre, radius: float) -> np.ndarray:
    """A surgeon's ink mark: a thick arc or dot beside the lesion."""
    stroke, ink = ink_stroke(rng, grid, centre, radius)
    return image * (1 - stroke[..., None]) + ink * stroke[..., None]


def ink_stroke(rng: np.random.Generator, grid, centre, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Opacity (at most 0.85) and colour of a surgeon's ink mark: a thick short arc or dot just outside a
    lesion of this centre and radius (unit-grid coordinates). Shared with core.audit.artefacts, so that
    the pasted mark is the confounder itself; the draw order here is part of the synthetic set's identity."""
    y, x = grid
    angle = rng.uniform(0, 2 * np.pi)
    reach = min(radius + rng.uniform(0.15, 0.3), 0.8)
    cy, cx = centre[0] + reach * np.sin(angle), centre[1] + reach * np.cos(angle)
    if max(abs(cy), abs(cx)) > 1:  # off the field beside a lesion near the edge: the mark goes on its other side
        angle += np.pi
        cy, cx = centre[0] + reach * np.sin(angle), centre[1] + reach * np.cos(angle)
    length, width = rng.uniform(0.15, 0.35), rng.uniform(0.025, 0.05)
    along = (x - cx) * np.cos(angle + np.pi / 2) + (y - cy) * np.sin(angle + np.pi / 2)
    across = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    stroke = np.clip(1.5 - np.sqrt((along / length) ** 2 + (across / width) ** 2), 0, 1) * 0.85
    ink = INK_COLOURS[rng.integers(len(INK_COLOURS))]
    return stroke, ink


def _draw_ruler(rng: np.random.Generator, image: np.ndarray, size: int) -> tuple[np.ndarray, bool]:
    """A pale ruler strip with black ticks along one edge of the field; also whether the image was
    transposed to put it along the left edge (the lesion with it, as it always was: stored runs depend on
    these pixels)."""
    cover, paint, transpose = ruler_strip(rng, size)
    image = np.where(cover[..., None] > 0, paint, image)
    if transpose:
        image = np.ascontiguousarray(np.swapaxes(image, 0, 1))
    return image, transpose


def ruler_width(size: int) -> int:
    """Width in pixels of the ruler strip on a size x size image."""
    return max(4, size // 10)


def ruler_strip(
    rng: np.random.Generator, size: int, first_rows: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, bool]:
    """A pale ruler strip with black ticks (every fifth one long) across the image: cover (size x size, 0
    or 1), paint (size x size x 3) and whether it belongs along the left edge instead of the top one (then
    transpose both). The strip starts on a row drawn from `first_rows` (default: size/8 to size/4, the
    confounder's place). Shared with core.audit.artefacts; the draw order is part of the synthetic set's identity."""
    band = ruler_width(size)
    cover = np.zeros((size, size), dtype=np.float32)
    paint = np.zeros((size, size, 3), dtype=np.float32)
    start = rng.integers(*(first_rows or (size // 8, size // 4)))
    cover[start : start + band, :] = 1
    paint[start : start + band, :, :] = np.array([225, 225, 210], dtype=np.float32)
    step = max(3, size // 25)
    for column in range(rng.integers(0, step), size, step):
        tick = band // 2 if (column // step) % 5 else band - 1
        paint[start : start + tick, column, :] = BLACK
    return cover, paint, bool(rng.random() < 0.5)


def _apply_vignette(rng: np.random.Generator, image: np.ndarray, grid) -> np.ndarray:
    """The dark round field edge of a dermatoscope, darkest in the corners."""
    return image * vignette_light(rng, grid)


def vignette_light(
    rng: np.random.Generator,
    grid,
    starts: tuple[float, float] = (0.95, 1.15),
    widths: tuple[float, float] = (0.12, 0.3),
) -> np.ndarray:
    """The light left by a dermatoscope's dark round field edge (size x size x 1, from 0.04 to 1): full inside
    a circle whose radius is drawn from `starts` (unit-grid units), fading to dark over a width drawn from
    `widths`, so darkest in the corners. Shared with core.audit.artefacts."""
    y, x = grid
    distance = np.sqrt(y**2 + x**2)
    start, width = rng.uniform(*starts), rng.uniform(*widths)
    return np.clip(1 - (distance - start) / width, 0.04, 1)[..., None]

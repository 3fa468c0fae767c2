"""Dermoscopy artefacts pasted onto images, for the audit's shortcut test.

A classifier can learn something that merely travels with melanoma in its training images instead of the
lesion itself: Winkler et al. (JAMA Dermatology, 2019) found that surgical ink markings beside a nevus
raised a market-approved CNN's melanoma score, and Bissoto et al. ("(De)Constructing bias on skin lesion
datasets", CVPR workshops 2019; "Debiasing skin lesion datasets and models? Not so fast", 2020) showed that
models lean on dermoscopy artefacts: rulers, dark corners, gel bubbles, hair and ink. The audit pastes each
artefact onto benign images and measures how much P(malignant) rises. So that the rise can only come from
the artefact, it never covers the lesion: with a lesion mask it keeps off the (slightly dilated) lesion,
without one it stays in the image's border band, where dark corners and rulers lie anyway.

The ink mark, ruler, hair and dark corners come from the same code as the synthetic set's own (core.data.synthetic),
so a model that learnt the synthetic ink or ruler confounder meets the very thing it learnt.
Everything is deterministic given the random generator; the input image is never modified.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from core.data.synthetic import hair_strands, ink_stroke, ruler_strip, ruler_width, unit_grid, vignette_light

ARTEFACT_KINDS = ("ink", "ruler", "dark_corners", "gel_bubble", "hair")
ARTEFACT_NAMES = {"ink": "Ink marking", "ruler": "Ruler", "dark_corners": "Dark corners", "gel_bubble": "Gel bubble",
                  "hair": "Hair"}

BORDER_SHARE = 0.22  # without a lesion mask, artefacts stay within this share of the side from each edge
# The mask is dilated by this share of the side: a lesion's soft rim lies just outside its binary mask, and
# an artefact touching the rim would change the lesion itself.
LESION_MARGIN = 0.03
FOOTPRINT_OPACITY = 0.1
PLACEMENT_TRIES = 8
KEEP_ENOUGH = 0.85  # a placement that loses less than this share of its opacity to the lesion is taken at once
PAINT_NOISE = 3.0  # the synthetic images' own pixel noise, so that a pasted artefact is not unnaturally flat
# Without a mask the ink is drawn beside an imaginary lesion this large at the centre: synthetic.ink_stroke
# caps its distance from the centre at 0.8 (unit grid), which then always lies in the border band.
BORDER_INK_RADIUS = 0.65
# Dark corners a little stronger than the vignette that every synthetic image already has, so they show.
CORNER_STARTS, CORNER_WIDTHS = (0.8, 1.0), (0.1, 0.25)
BUBBLE_RADII = (0.06, 0.12)  # share of the side
BUBBLE_WHITE = np.array([250, 250, 248], dtype=np.float32)
BUBBLE_SHADOW = np.array([60, 55, 55], dtype=np.float32)


@dataclass(frozen=True)
class _Field:
    """Where an artefact may go on one image."""

    size: int
    grid: tuple[np.ndarray, np.ndarray]
    allowed: np.ndarray  # size x size bool: outside the dilated lesion, or the border band
    preferred: np.ndarray  # allowed and lit: hair, ink or a bubble in the black outside the field would not show
    centre: np.ndarray  # the lesion's centre and radius in unit-grid coordinates (as core.data.synthetic draws them)
    radius: float


Layer = tuple[np.ndarray, np.ndarray]  # opacity (S x S, 0..1) and paint (S x S x 3, float32)


def paste_artefact(image: np.ndarray, kind: str, rng: np.random.Generator,
                   lesion_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`image`: S x S x 3 uint8. Returns a new uint8 image of the same shape with the artefact pasted, and
    its footprint: S x S bool, the pixels where the artefact's opacity exceeds 0.1. Pixels outside the
    footprint are left exactly as they were (the fainter fringe is dropped), so the footprint is all that
    changed. `lesion_mask` (S x S, nonzero = lesion): the artefact keeps off the lesion; without it (or with
    an empty one) the artefact stays in the outer 22% of the side on each edge. A lesion that leaves no room
    at all gives an empty footprint and the image unchanged."""
    _check_inputs(image, kind, lesion_mask)
    field = _field(image, lesion_mask)
    alpha, paint = _DRAWERS[kind](rng, field)
    footprint = alpha > FOOTPRINT_OPACITY
    paint = paint + rng.normal(0, PAINT_NOISE, paint.shape).astype(np.float32)
    base = image.astype(np.float32)
    blended = base * (1 - alpha[..., None]) + paint * alpha[..., None]
    blended = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return np.where(footprint[..., None], blended, image), footprint


def _check_inputs(image: np.ndarray, kind: str, lesion_mask: np.ndarray | None) -> None:
    if kind not in ARTEFACT_KINDS:
        raise ValueError(f"unknown artefact kind {kind!r}: choose from {', '.join(ARTEFACT_KINDS)}")
    if image.ndim != 3 or image.shape[0] != image.shape[1] or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a square S x S x 3 uint8 image, got {image.shape} {image.dtype}")
    if image.shape[0] < 16:
        raise ValueError("the image is too small for an artefact (at least 16 pixels a side)")
    if lesion_mask is not None and lesion_mask.shape != image.shape[:2]:
        raise ValueError(f"the lesion mask is {lesion_mask.shape}, the image {image.shape[:2]}")


def _field(image: np.ndarray, lesion_mask: np.ndarray | None) -> _Field:
    size = image.shape[0]
    grid = unit_grid(size)
    if lesion_mask is None or not np.any(lesion_mask):
        allowed, centre, radius = border_band(size), np.zeros(2), BORDER_INK_RADIUS
    else:
        lesion = np.asarray(lesion_mask) > 0
        allowed = ~_max_filter(lesion, max(1, round(LESION_MARGIN * size)))
        rows, cols = np.nonzero(lesion)
        centre = (np.array([rows.mean(), cols.mean()]) + 0.5) / size * 2 - 1
        radius = float(np.sqrt(lesion.sum() / np.pi) / size * 2)
    grey = image.mean(axis=-1)
    preferred = allowed & (grey >= 0.5 * np.median(grey))
    return _Field(size, grid, allowed, preferred if preferred.any() else allowed, centre, radius)


def border_band(size: int) -> np.ndarray:
    """S x S bool: the outer BORDER_SHARE of the side on each edge."""
    width = max(1, round(BORDER_SHARE * size))
    band = np.zeros((size, size), dtype=bool)
    band[:width], band[-width:], band[:, :width], band[:, -width:] = True, True, True, True
    return band


def _max_filter(array: np.ndarray, radius: int) -> np.ndarray:
    """Grey dilation by a (2 radius + 1) square, separably (no scipy in the requirements)."""
    if radius <= 0:
        return array.copy()
    padded = np.pad(array, radius)
    rows = sliding_window_view(padded, 2 * radius + 1, axis=0).max(axis=-1)
    return sliding_window_view(rows, 2 * radius + 1, axis=1).max(axis=-1)


def _place(draw: Callable[[np.random.Generator, _Field], Layer], rng: np.random.Generator, field: _Field) -> Layer:
    """Draw placements until one has most of its opacity in the preferred region; after PLACEMENT_TRIES, the
    best one seen. Then clear it off the forbidden region: clearing rather than only rejecting guarantees
    no overlap with the lesion whatever the tries gave."""
    best, best_score = None, -1.0
    for _ in range(PLACEMENT_TRIES):
        alpha, paint = draw(rng, field)
        kept = np.where(field.allowed, alpha, 0).astype(np.float32)
        visible = bool((kept > FOOTPRINT_OPACITY).any())
        score = float(np.where(field.preferred, alpha, 0).sum() / alpha.sum()) if visible else -1.0
        if best is None or score > best_score:
            best, best_score = (kept, paint), score
        if score >= KEEP_ENOUGH:
            break
    return best


def _over(bottom: Layer, top: Layer) -> Layer:
    """Porter-Duff 'over' of two layers."""
    (alpha_b, paint_b), (alpha_t, paint_t) = bottom, top
    alpha = alpha_t + alpha_b * (1 - alpha_t)
    weight_b = (alpha_b * (1 - alpha_t))[..., None]
    premultiplied = paint_t * alpha_t[..., None] + paint_b * weight_b
    paint = np.where(alpha[..., None] > 0, premultiplied / np.maximum(alpha, 1e-6)[..., None], 0)
    return alpha.astype(np.float32), paint.astype(np.float32)


def _empty(size: int) -> Layer:
    return np.zeros((size, size), dtype=np.float32), np.zeros((size, size, 3), dtype=np.float32)


def _solid(colour: np.ndarray, size: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, dtype=np.float32), (size, size, 3)).copy()


def _ink(rng: np.random.Generator, field: _Field) -> Layer:
    return _place(_ink_once, rng, field)


def _ink_once(rng: np.random.Generator, field: _Field) -> Layer:
    stroke, colour = ink_stroke(rng, field.grid, field.centre, field.radius)
    return stroke.astype(np.float32), _solid(colour, field.size)


def _ruler(rng: np.random.Generator, field: _Field) -> Layer:
    return _place(_ruler_once, rng, field)


def _ruler_once(rng: np.random.Generator, field: _Field) -> Layer:
    """The synthetic confounder's ruler, moved into the border band. It lies along the top, left or right
    edge: the places a model trained on the confounder with horizontal flips has seen it."""
    size = field.size
    last_start = max(0, round(BORDER_SHARE * size) - ruler_width(size))
    cover, paint, transpose = ruler_strip(rng, size, first_rows=(0, last_start + 1))
    if transpose:
        cover, paint = cover.T, paint.transpose(1, 0, 2)
    if rng.random() < 0.5:
        cover, paint = cover[:, ::-1], paint[:, ::-1]
    return np.ascontiguousarray(cover), np.ascontiguousarray(paint)


def _dark_corners(rng: np.random.Generator, field: _Field) -> Layer:
    """Darkening as painting black with opacity 1 - light. No retries: it belongs in the dark already, and
    its circle is centred whatever the draw, so only clearing keeps it off a lesion reaching that far."""
    light = vignette_light(rng, field.grid, starts=CORNER_STARTS, widths=CORNER_WIDTHS)[..., 0]
    alpha = np.where(field.allowed, 1 - light, 0).astype(np.float32)
    return alpha, np.zeros((field.size, field.size, 3), dtype=np.float32)


def _hair(rng: np.random.Generator, field: _Field) -> Layer:
    """2 to 5 strands, each placed on its own: a set placed together almost always has one across the lesion
    or out of the border band, and would come back in cut pieces."""
    layer = _empty(field.size)
    for _ in range(int(rng.integers(2, 6))):
        layer = _over(layer, _place(_hair_strand, rng, field))
    return layer


def _hair_strand(rng: np.random.Generator, field: _Field) -> Layer:
    """One of the synthetic set's strands (1 or 2 px), thickened on large images so that it keeps about the
    same width relative to the lesion instead of thinning to a hairline."""
    cover, colour = hair_strands(rng, field.size, 1)
    return _thicken(cover, field.size // 160), _solid(colour, field.size)


def _thicken(cover: np.ndarray, extra: int) -> np.ndarray:
    """Grey dilation by an (extra + 1) square anchored at the pixel: `extra` more pixels of width."""
    thick = cover.copy()
    padded = np.pad(cover, ((extra, 0), (extra, 0)))
    for dy in range(extra + 1):
        for dx in range(extra + 1):
            np.maximum(thick, padded[dy : dy + cover.shape[0], dx : dx + cover.shape[1]], out=thick)
    return thick


def _gel_bubbles(rng: np.random.Generator, field: _Field) -> Layer:
    """One to three bubbles, each placed on its own so that one hitting the lesion does not move the others."""
    layer = _empty(field.size)
    for _ in range(int(rng.integers(1, 4))):
        layer = _over(layer, _place(_gel_bubble_once, rng, field))
    return layer


def _gel_bubble_once(rng: np.random.Generator, field: _Field) -> Layer:
    """An air bubble in immersion gel: a thin bright rim (the light it reflects), a faint dark inner edge
    (refraction), a slightly lighter interior and a small specular highlight towards the light."""
    size = field.size
    radius = rng.uniform(*BUBBLE_RADII) * size
    cy, cx = _bubble_centre(rng, field, radius)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    distance = np.hypot(rows - cy, cols - cx)
    rim_width = max(0.7, 0.1 * radius)
    interior = (0.15 * np.clip(radius - distance, 0, 1), _solid(BUBBLE_WHITE, size))
    shadow = 0.3 * np.exp(-(((distance - (radius - 2 * rim_width)) / rim_width) ** 2))
    rim = 0.8 * np.exp(-(((distance - radius) / rim_width) ** 2))
    spot_radius = max(0.8, 0.2 * radius)
    spot_distance = np.hypot(rows - (cy - 0.4 * radius), cols - (cx - 0.35 * radius))
    highlight = 0.9 * np.clip(1.5 - spot_distance / spot_radius, 0, 1)
    layer = _over(interior, (shadow, _solid(BUBBLE_SHADOW, size)))
    layer = _over(layer, (rim, _solid(BUBBLE_WHITE, size)))
    return _over(layer, (highlight, _solid(BUBBLE_WHITE, size)))


def _bubble_centre(rng: np.random.Generator, field: _Field, radius: float) -> tuple[float, float]:
    """A pixel centre with room for the whole bubble in the preferred region, inside the image if possible:
    a bubble cut straight by the lesion's margin or the border band's inner edge would look pasted."""
    reach = int(np.ceil(radius + 1))
    room = ~_max_filter(~field.preferred, reach)
    inside = room.copy()
    inside[:reach], inside[-reach:], inside[:, :reach], inside[:, -reach:] = False, False, False, False
    # Everything as a last resort: a lesion filling the image, and the bubble is cleared away.
    for candidates in (inside, room, field.preferred, np.ones_like(room)):
        if candidates.any():
            break
    row, col = divmod(int(rng.choice(np.flatnonzero(candidates))), field.size)
    return row + 0.5, col + 0.5


_DRAWERS: dict[str, Callable[[np.random.Generator, _Field], Layer]] = {
    "ink": _ink, "ruler": _ruler, "dark_corners": _dark_corners, "gel_bubble": _gel_bubbles, "hair": _hair,
}

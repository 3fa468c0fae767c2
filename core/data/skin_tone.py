"""Skin tone of a dermoscopic image by the Individual Typology Angle (ITA), measured on the skin around the lesion.

ITA = arctan((L* - 50) / b*) in degrees, in CIELAB (D65): Chardon, Cretois & Hourseau (1991), Int J Cosmet Sci
13:191-208. Its six categories are those of Del Bino & Bernerd (2013), Br J Dermatol 169 Suppl 3:33-40, which
Kinyanjui et al. (2020, MICCAI, "Fairness of classifiers across skin tones in dermatology") used to split ISIC
images by skin tone. Measuring it without a lesion mask, on the skin around a central crop, follows Corbin &
Marques (2023), Multimed Tools Appl, "Exploring strategies to generate Fitzpatrick skin type metadata for
dermoscopic images using individual typology angle techniques".

An image's ITA is the angle of its median skin colour (median L*, median b*), not an average of per-pixel
angles: a pixel's angle swings towards +-90 degrees as its b* nears 0, so a few grey pixels would pull a mean
anywhere, while the medians of L* and b* stay on the skin. Pixels that are not skin are left out first:
- the lesion: the mask grown by a small margin (mask borders are drawn loosely and the skin right around a
  lesion is often reddened), or, without a mask, a central disc, since dermoscopic images centre the lesion;
- black: L* below 10, the dermatoscope's dark round field edge, black frames and corners;
- b* below MIN_SKIN_YELLOWNESS: skin is always clearly yellowish, while grey, white or bluish pixels (gel bubbles,
  glare, ink, rulers, shadows) have b* near or below 0; a grey image's b* is not exactly 0 either;
- pixels far from the skin's typical lightness (more than 20 L* from the median of what is left): the fading
  edge of the vignette, hair and glare, which the absolute limits do not catch; skin itself varies by a few L*
  within one image, so the band keeps it whole.
Too little skin left (a lesion filling the image, a grayscale image) gives NaN: unknown, never a guess.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage.color import rgb2lab

# (category, the angle it must exceed): Del Bino & Bernerd's limits. A value on a limit belongs to the darker
# category (very light is > 55 degrees, light 41 < ITA <= 55, ..., brown -30 < ITA <= 10), and anything at
# or below -30 degrees is DARKEST.
ITA_LIMITS = (("very light", 55.0), ("light", 41.0), ("intermediate", 28.0), ("tan", 10.0), ("brown", -30.0))
DARKEST = "dark"
ITA_CATEGORY_NAMES = tuple(name for name, _ in ITA_LIMITS) + (DARKEST,)
UNKNOWN = "unknown"

LESION_DISC_RADIUS = 0.35  # of the image side: the central disc left out when there is no mask
MASK_MARGIN = 0.02  # of the image side: how far the mask is grown before its pixels are left out
DARKEST_SKIN_LIGHTNESS = 10.0  # L*: darker pixels are the black field edge, not skin
MIN_SKIN_YELLOWNESS = 3.0  # b*: below it a pixel is neutral grey or bluish, not skin
LIGHTNESS_BAND = 20.0  # L* either side of the median lightness that still counts as the same skin
MIN_SKIN_SHARE = 0.02  # of the image's pixels: below this the image has too little skin to measure
MIN_SKIN_PIXELS = 16
# Larger images are measured on every n-th pixel down to about this side: a median of ten thousand pixels is
# as steady as one of fifty thousand, and the colour conversion is most of the time.
MEASURED_SIDE = 112


def srgb_to_lab(image_uint8: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 sRGB as H x W x 3 CIELAB (L* in 0..100; D65 white, 2-degree observer)."""
    return rgb2lab(np.asarray(image_uint8, dtype=np.uint8))


def lesion_exclusion(shape: tuple[int, int], mask: np.ndarray | None = None) -> np.ndarray:
    """H x W bool, True where the lesion may be: the mask grown by MASK_MARGIN, or the central disc of radius
    LESION_DISC_RADIUS when there is no mask or the mask is empty (an empty mask is a failed segmentation
    more often than a lesion-free image)."""
    height, width = shape
    if mask is not None and np.asarray(mask).any():
        margin = max(1, round(MASK_MARGIN * min(height, width)))
        return ndimage.binary_dilation(np.asarray(mask) > 0, iterations=margin)
    rows, columns = np.ogrid[:height, :width]
    distance = np.hypot((rows + 0.5) / height - 0.5, (columns + 0.5) / width - 0.5)
    return distance <= LESION_DISC_RADIUS


def individual_typology_angle(image_uint8: np.ndarray, mask: np.ndarray | None = None) -> float:
    """The ITA in degrees of the skin around the lesion (outside `mask`, or outside a central disc when it is
    None); NaN when too little skin is left to measure. See the module docstring for what counts as skin."""
    image = np.asarray(image_uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {image.shape}")
    if mask is not None and np.shape(mask) != image.shape[:2]:
        raise ValueError(f"the mask's shape {np.shape(mask)} differs from the image's {image.shape[:2]}")
    step = max(1, min(image.shape[:2]) // MEASURED_SIDE)
    image = image[::step, ::step]
    mask = None if mask is None else np.asarray(mask)[::step, ::step]
    lab = srgb_to_lab(image)
    lightness, yellowness = lab[..., 0], lab[..., 2]
    least = max(MIN_SKIN_PIXELS, MIN_SKIN_SHARE * lightness.size)
    skin = ~lesion_exclusion(image.shape[:2], mask)
    skin &= (lightness >= DARKEST_SKIN_LIGHTNESS) & (yellowness >= MIN_SKIN_YELLOWNESS)
    if skin.sum() < least:
        return math.nan
    typical = np.median(lightness[skin])
    skin &= np.abs(lightness - typical) <= LIGHTNESS_BAND
    if skin.sum() < least:
        return math.nan
    return ita_from_lab(float(np.median(lightness[skin])), float(np.median(yellowness[skin])))


def ita_from_lab(lightness: float, yellowness: float) -> float:
    """ITA in degrees of one CIELAB colour (L*, b*); NaN when b* is not positive, where the angle means no skin."""
    if not yellowness > 0:
        return math.nan
    return math.degrees(math.atan((lightness - 50.0) / yellowness))


def ita_category(angle: float) -> str:
    """The skin-tone category of an ITA (very light, light, intermediate, tan, brown, dark); 'unknown' for NaN."""
    if angle is None or not math.isfinite(angle):
        return UNKNOWN
    for name, limit in ITA_LIMITS:
        if angle > limit:
            return name
    return DARKEST


def image_ita(images: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """ITA in degrees of each of N x H x W x 3 uint8 images (NaN where unmeasurable). `masks` is N x H x W
    (1 = lesion), None for no masks, or a sequence holding None for the images that have none."""
    angles = np.full(len(images), np.nan)
    for index, image in enumerate(images):
        mask = None if masks is None else masks[index]
        angles[index] = individual_typology_angle(image, mask)
    return angles

import numpy as np
import pytest
from PIL import Image

from core.data.images import ImageError, decode_image, decode_images_cached, to_rgb
from tests.conftest import write_image


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "1"])
def test_modes_are_converted_to_rgb(tmp_path, mode):
    path = tmp_path / f"image-{mode}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
    write_image(path, mode=mode)
    array = decode_image(path, 16)
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8


def test_16_bit_grayscale_uses_its_whole_range(tmp_path):
    values = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)  # mode I;16
    array = decode_image(path, 32)
    assert array.min() == 0 and array.max() >= 250, "scaled, not clipped at 255"


def test_transparent_parts_become_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba)).min() == 255


def test_exif_orientation_is_honoured(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = 255  # left half white
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    decoded = decode_image(path, 20)
    assert decoded[:5].mean() > 200 and decoded[-5:].mean() < 50, "white half ends on top"


def test_corrupt_and_non_images_raise_a_clear_error(tmp_path):
    truncated = tmp_path / "truncated.jpg"
    write_image(truncated, size=(200, 200))
    truncated.write_bytes(truncated.read_bytes()[:300])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="corrupt|truncated"):
        decode_image(truncated, 16)
    with pytest.raises(ImageError, match="not an image"):
        decode_image(text, 16)
    with pytest.raises(ImageError, match="not found"):
        decode_image(tmp_path / "missing.jpg", 16)


def test_decode_cache_skips_bad_files_and_is_reused(tmp_path, monkeypatch):
    good = [tmp_path / f"good{i}.png" for i in range(3)]
    for path in good:
        write_image(path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    paths = [str(good[0]), str(bad), str(good[1]), str(good[2])]
    decoded = decode_images_cached(paths, 16, tmp_path / "cache")
    assert decoded.images.shape == (3, 16, 16, 3)
    assert decoded.kept.tolist() == [0, 2, 3]
    assert decoded.skipped[0][0] == 1
    import core.data.images

    monkeypatch.setattr(core.data.images, "decode_image", lambda *a: pytest.fail("decoded again"))
    again = decode_images_cached(paths, 16, tmp_path / "cache")
    assert np.array_equal(again.images, decoded.images)

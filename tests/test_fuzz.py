"""Fuzzing with hypothesis: image decoding and the dataset readers fed random bytes, truncated files
and odd CSVs must answer with a clear error (ImageError / DatasetError) or a result; nothing else,
no hang."""

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from core.config import DataSpec
from core.data.datasets import DatasetError, read_table
from core.data.images import ImageError, decode_image

FUZZ = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


JPEG, PNG = encoded("JPEG"), encoded("PNG")


def decodes_or_refuses(data: bytes) -> None:
    try:
        array = decode_image(io.BytesIO(data), 16)
    except ImageError:
        return
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    decodes_or_refuses(data)


@FUZZ
@given(st.sampled_from([JPEG, PNG]), st.integers(min_value=0, max_value=len(JPEG)), st.binary(max_size=64))
def test_truncated_and_corrupted_images(image, cut, garbage):
    decodes_or_refuses(image[:cut] + garbage)
    middle = len(image) // 2
    decodes_or_refuses(image[:middle] + garbage + image[middle + len(garbage):])


@FUZZ
@given(st.text(max_size=400))
def test_odd_csv_files(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("csv")
    (folder / "images").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "images" / "ISIC_0000001.jpg")
    (folder / "labels.csv").write_text(text, encoding="utf-8")
    try:
        data_format, table, _ = read_table(DataSpec(source=str(folder), format="csv"))
    except DatasetError as error:
        assert str(error) and "\n" not in str(error).strip()
        return
    assert set(table["label"]) <= {0, 1}

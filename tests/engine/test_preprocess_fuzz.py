"""Property-based fuzzing of image decoding: any bytes give a tensor or InvalidInput, nothing else.

Seeds are small valid images of every accepted format; hypothesis flips,
inserts, deletes and truncates bytes (headers included), and also feeds raw
byte strings that start with each format's signature.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service import errors
from service.preprocess import Preprocessor
from tests.helpers.tinymodel import tiny_meta

PRE = Preprocessor(tiny_meta(size=16).replace(resize=20), max_pixels=1_000_000)


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    out = []
    for fmt, mode, kwargs in [
        ("JPEG", "RGB", {"quality": 80}),
        ("JPEG", "CMYK", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "P", {}),
        ("GIF", "P", {}),
        ("BMP", "RGB", {}),
        ("WEBP", "RGB", {"quality": 70}),
    ]:
        buf = io.BytesIO()
        image.convert(mode).save(buf, fmt, **kwargs)
        out.append(buf.getvalue())
    return out


SEEDS = _seeds()
SIGNATURES = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP"]


def _check(data: bytes) -> None:
    try:
        out = PRE(data)
    except errors.InvalidInput as exc:
        assert str(exc)
        return
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    assert np.isfinite(out).all()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and data:
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_images_never_escape_invalid_input(data):
    _check(data)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(SIGNATURES), st.binary(max_size=200))
def test_signature_plus_noise(signature, noise):
    _check(signature + noise)


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_seeds_decode(seed):
    assert PRE(SEEDS[seed]).shape == (3, 16, 16)

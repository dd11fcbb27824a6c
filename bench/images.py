"""Realistic request images: 1024x768 JPEGs made from real photographs.

A benchmark of an image API is only as honest as its images: a flat synthetic
picture decodes several times faster than a photograph, because JPEG decoding
cost follows the entropy-coded detail. scikit-image ships a handful of real
photographs; each is cropped to 4:3 and resized to 1024x768 (the size a phone
upload is usually scaled to), with flipped variants so that no two requests
in a row send the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

#: skimage.data photographs that ship with the wheel (no download at run time).
PHOTOGRAPHS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)

WIDTH, HEIGHT = 1024, 768
JPEG_QUALITY = 90


def _photo(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8), "RGB")


def _to_4_3(image: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop to the target aspect ratio, then resize (Lanczos) to width x height."""
    w, h = image.size
    target = width / height
    if w / h > target:
        new_w = round(h * target)
        left = (w - new_w) // 2
        image = image.crop((left, 0, left + new_w, h))
    else:
        new_h = round(w / target)
        top = (h - new_h) // 2
        image = image.crop((0, top, w, top + new_h))
    return image.resize((width, height), Image.Resampling.LANCZOS)


def make_jpegs(
    directory: Path, *, width: int = WIDTH, height: int = HEIGHT, quality: int = JPEG_QUALITY
) -> list[Path]:
    """Write the benchmark JPEGs into ``directory`` (kept if already there) and return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name in PHOTOGRAPHS:
        for flip in ("", "-mirrored"):
            path = directory / f"{name}{flip}-{width}x{height}.jpg"
            paths.append(path)
            if path.is_file():
                continue
            image = _to_4_3(_photo(name), width, height)
            if flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality, optimize=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(buffer.getvalue())
            tmp.replace(path)
    return paths


def load_jpegs(directory: Path, **kwargs) -> list[bytes]:
    """The encoded bytes of every benchmark JPEG (made on first use)."""
    return [p.read_bytes() for p in make_jpegs(directory, **kwargs)]

"""The normalisation step of the image path: OpenCV's fused call against the numpy passes it replaced.

Backs the choice in ``service/preprocess.py`` (``Preprocessor.normalize``'s docstring).

The profile (``bench/profile.py``) showed ``Preprocessor.normalize`` taking
about as many decode-thread samples as the JPEG decode itself when it
converted uint8 HWC to float32 CHW and applied scale and offset in three numpy
passes. It now calls ``cv2.dnn.blobFromImageWithParams``, which does the same
arithmetic (subtract mean*255, multiply by 1/(255*std), HWC->CHW) in one pass
of C++ that releases the GIL. This script times both on the benchmark
photographs' real crops and prints the largest difference, so the change can
be judged by numbers: ``python -m bench.research.normalize_variants``.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

import numpy as np

from service import modelmeta
from service.preprocess import Preprocessor

REPO_ROOT = Path(__file__).resolve().parents[2]


def numpy_passes(meta: modelmeta.ModelMeta):
    """The three numpy passes svertka used before (transpose + astype, multiply, subtract)."""
    mean = np.asarray(meta.mean, np.float64)
    std = np.asarray(meta.std, np.float64)
    scale = (1.0 / (255.0 * std)).astype(np.float32)[:, None, None]
    offset = (mean / std).astype(np.float32)[:, None, None]

    def run(rgb: np.ndarray) -> np.ndarray:
        chw = rgb.transpose(2, 0, 1)
        if meta.color_order == "BGR":
            chw = chw[::-1]
        out = chw.astype(np.float32)
        out *= scale
        out -= offset
        return out

    return run


def main() -> int:
    from bench import images

    meta = modelmeta.ModelMeta(
        labels=("a", "b"), crop=(224, 224), resize=256, mean=modelmeta.IMAGENET_MEAN,
        std=modelmeta.IMAGENET_STD, arch="resnet18",
    )  # fmt: skip
    pre = Preprocessor(meta, max_pixels=40_000_000)
    jpegs = images.load_jpegs(REPO_ROOT / ".bench" / "images")
    crops = [pre.decode(data) for data in jpegs]
    other = numpy_passes(meta)
    err = max(float(np.abs(pre.normalize(c) - other(c)).max()) for c in crops)
    for name, fn in (
        ("three numpy passes (before)", other),
        ("Preprocessor.normalize (OpenCV)", pre.normalize),
    ):
        best = min(timeit.repeat(lambda fn=fn: [fn(c) for c in crops], number=20, repeat=5)) / (
            20 * len(crops)
        )
        print(f"{name:34s} {best * 1e6:8.1f} us per 224x224 image")
    full = min(
        timeit.repeat(
            lambda: [pre(d) for d in images.load_jpegs(REPO_ROOT / ".bench" / "images")], number=3, repeat=3
        )
    )
    print(f"{'whole Preprocessor (1024x768 JPEG)':34s} {full / (3 * len(crops)) * 1e6:8.1f} us per image")
    print(f"largest difference between the two: {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

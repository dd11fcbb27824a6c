"""Small real encoded images for API tests, and the offline reference answer for them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def png(seed: int, size: int = 40, mode: str = "RGB") -> bytes:
    """A random-noise PNG (different seeds give different classes often enough)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def model_path(repository: Path, name: str, version: int) -> Path:
    return Path(repository) / name / str(version) / "model.onnx"


def offline_logits(repository: Path, name: str, version: int, batch: np.ndarray) -> np.ndarray:
    """Direct onnxruntime on the model file: the reference the server must match."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(model_path(repository, name, version)), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def preprocess(repository: Path, name: str, version: int, data: bytes) -> np.ndarray:
    """The model's own preprocessing (service.preprocess, configured from the file's metadata)."""
    import onnx

    from service import config, modelmeta
    from service.preprocess import Preprocessor

    model = onnx.load(str(model_path(repository, name, version)), load_external_data=False)
    meta = modelmeta.from_props({p.key: p.value for p in model.metadata_props})
    return Preprocessor(meta, max_pixels=config.DEFAULT_MAX_IMAGE_PIXELS)(data)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)

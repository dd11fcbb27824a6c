"""The default model through the image API: same top-1 as the offline model on every digits val image.

"Offline" is onnxruntime on the model file with a preprocessing written here
from the metadata alone (PIL, numpy), independent of service.preprocess, so a
server-side decode or resize bug cannot cancel itself out.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.gen.svertka.v1 import classifier_pb2 as pb
from service.gen.svertka.v1 import classifier_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
#: `make model` builds the default repository here (Makefile MODELS); override for a copy elsewhere.
REPOSITORY = Path(os.environ.get("SVERTKA_TEST_REPOSITORY", ROOT / "models"))
MODEL = "digits"


def _reference_tensor(path: Path, meta) -> np.ndarray:
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    w, h = rgb.size
    scale = meta.resize / min(w, h)
    size = (max(meta.resize, round(w * scale)), max(meta.resize, round(h * scale)))
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}.get(
        meta.interpolation, Image.Resampling.NEAREST
    )
    if size != (w, h):
        rgb = rgb.resize(size, resample)
    ch, cw = meta.crop
    left, top = (size[0] - cw) // 2, (size[1] - ch) // 2
    x = np.asarray(rgb.crop((left, top, left + cw, top + ch)), np.float32) / 255.0
    if meta.color_order == "BGR":
        x = x[..., ::-1]
    x = (x - np.asarray(meta.mean, np.float32)) / np.asarray(meta.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


@pytest.mark.slow
@pytest.mark.integration
def test_image_api_top1_equals_the_offline_model_on_digits_val(tmp_path_factory):
    model_file = REPOSITORY / MODEL / "1" / "model.onnx"
    if not model_file.is_file():
        pytest.skip(f"{model_file} is not built: run `make model`")
    import onnxruntime as ort

    from export.data import scan_image_folder, write_digits
    from service import modelmeta
    from tests.api.conftest import InProcessServer

    val = scan_image_folder(write_digits(tmp_path_factory.mktemp("data") / "digits") / "val")
    assert len(val.samples) == 297
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    meta = modelmeta.from_props(session.get_modelmeta().custom_metadata_map)
    paths = [Path(p) for p, _ in val.samples]
    offline = session.run(None, {meta.input_name: np.stack([_reference_tensor(p, meta) for p in paths])})[0]

    repo = tmp_path_factory.mktemp("repo")
    (repo / MODEL).mkdir()
    (repo / MODEL / "1").symlink_to(model_file.parent)
    server = InProcessServer(repo)
    try:
        with server.channel() as channel:
            stub = pb_grpc.ImageClassifierStub(channel)
            requests = (
                pb.ClassifyRequest(model=MODEL, image=p.read_bytes(), top_k=1, id=str(i))
                for i, p in enumerate(paths)
            )
            answers = {int(r.id): r for r in stub.ClassifyStream(requests, timeout=300)}
    finally:
        server.close()
    assert len(answers) == len(paths)
    served_top1 = np.array([answers[i].predictions[0].index for i in range(len(paths))])
    np.testing.assert_array_equal(served_top1, offline.argmax(axis=1))
    labels = np.array([meta.labels.index(val.classes[t]) for _, t in val.samples])
    accuracy = float((served_top1 == labels).mean())
    # The accuracy the export recorded in the file (measured on the same split with torch).
    if meta.val_top1 is not None:
        assert accuracy == pytest.approx(meta.val_top1, abs=1.5 / len(paths))  # within one image

"""``python -m bench.decode_agreement``: do the image API's two JPEG decoders give the same answers?

``--image-decoder cpu`` decodes a JPEG with libjpeg-turbo downscaled while decoding;
``gpu`` decodes it at full size with nvImageCodec; both then resize and crop the same
way. The pixels differ slightly, so this measures what matters:

* top-1 agreement of the bundled digits model (a trained classifier) on every
  validation image, upscaled to 256x256 (so that downscaled decoding happens, as
  with a photograph) and encoded as a quality-90 JPEG;
* the mean absolute difference, in grey levels, of the two preprocessed crops of
  the benchmark photographs (1024x768 JPEGs, ``bench.images``) at 224x224;
* (the command only) the CPU time per photograph of each path, and of the path
  with decoding free: what a GPU decoder cannot take from the CPU (the resize
  from full size).

Without a GPU (``--cpu-backend``, and always in the tests) nvImageCodec decodes with
its own CPU backend (libjpeg-turbo at full size): the same preprocessing difference,
without what nvJPEG's GPU decoders might add.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def _jpeg(image, size: int = 256, quality: int = 90) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def measure(decoder, models: Path, digits: Path, photos: Path) -> dict:
    """The agreement of ``decoder`` (a ``service.gpu_decode.JpegDecoder``) with the CPU path."""
    import onnxruntime as ort
    from PIL import Image

    from bench import images
    from service import modelmeta
    from service.preprocess import Preprocessor

    model = models / "digits" / "1" / "model.onnx"
    meta = modelmeta.read_model_file(str(model))
    paths = sorted(digits.glob("*/*.png"))
    encoded = [_jpeg(Image.open(p)) for p in paths]
    kwargs = {"max_pixels": 10**8, "max_decoded_pixels": 10**8}
    cpu = Preprocessor(meta, jpeg_decoder=None, **kwargs)
    gpu = Preprocessor(meta, jpeg_decoder=decoder, **kwargs)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def classes(pre) -> np.ndarray:
        batch = np.stack([pre(data) for data in encoded])
        return session.run(None, {meta.input_name: batch})[0].argmax(1)

    labels = np.asarray([int(p.parent.name) for p in paths])
    on_cpu, on_gpu = classes(cpu), classes(gpu)
    photo_meta = meta.replace(crop=(224, 224), resize=256)
    diffs = []
    for data in images.load_jpegs(photos):
        a = Preprocessor(photo_meta, jpeg_decoder=None, **kwargs).decode(data)
        b = Preprocessor(photo_meta, jpeg_decoder=decoder, **kwargs).decode(data)
        diffs.append(float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()))
    return {
        "digits_images": len(paths),
        "digits_top1_agreement": float((on_cpu == on_gpu).mean()),
        "digits_accuracy_cpu": float((on_cpu == labels).mean()),
        "digits_accuracy_gpu": float((on_gpu == labels).mean()),
        "photos": len(diffs),
        "photo_mean_abs_diff": {"mean": float(np.mean(diffs)), "max": float(np.max(diffs))},
    }


def cpu_cost(decoder, photos: Path, rounds: int = 60) -> dict:
    """Milliseconds of one core per 1024x768 photograph (10th percentile of interleaved rounds) for
    ``Preprocessor.decode`` on the CPU path, with ``decoder``, and with decoding free: the image
    already decoded, which is the part of the work a GPU decoder cannot take from the CPU."""
    import time

    from PIL import Image

    from bench import images
    from service import modelmeta
    from service.preprocess import Preprocessor

    mean, std = modelmeta.IMAGENET_MEAN, modelmeta.IMAGENET_STD
    meta = modelmeta.ModelMeta(labels=("a", "b"), crop=(224, 224), resize=256, mean=mean, std=std, arch="any")
    data = images.load_jpegs(photos)[2]  # chelsea, as in docs/engine.md's preprocessing table
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    kwargs = {"max_pixels": 10**8, "max_decoded_pixels": 10**8}
    paths = {
        "cpu": Preprocessor(meta, jpeg_decoder=None, **kwargs),
        "nvimagecodec": Preprocessor(meta, jpeg_decoder=decoder, **kwargs),
        "decoding_free": Preprocessor(meta, jpeg_decoder=lambda _data: decoded, **kwargs),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, pre in paths.items():
            start = time.process_time()
            pre.decode(data)
            times[name].append(time.process_time() - start)
    return {name: round(float(np.percentile(t, 10)) * 1e3, 2) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decode_agreement", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--cpu-backend", action="store_true", help="nvImageCodec's CPU backend (no GPU needed)"
    )
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--digits", type=Path, default=REPO_ROOT / "data" / "digits" / "val")
    parser.add_argument("--photos", type=Path, default=REPO_ROOT / ".bench" / "images")
    args = parser.parse_args(argv)
    from service import gpu_decode

    decoder = gpu_decode.JpegDecoder(cpu_backend=args.cpu_backend)
    result = measure(decoder, args.models, args.digits, args.photos)
    result["cpu_ms_per_photo"] = cpu_cost(decoder, args.photos)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""JPEG decoding with nvImageCodec (nvJPEG on the GPU), for the image API where a GPU is present.

``svertka serve --image-decoder gpu`` (``SVERTKA_IMAGE_DECODER``) decodes the
JPEGs the CPU path gives libjpeg-turbo (RGB or grey, baseline or progressive)
with nvImageCodec instead, at full size, then resizes and crops them on the
CPU as before. Everything else stays on the CPU path
(:class:`service.preprocess.Preprocessor`): PNG, WebP, GIF, BMP, CMYK JPEGs,
a JPEG larger than ``max_decoded_pixels`` (full-size decoding would cost what
the limit is there to prevent), and any JPEG nvImageCodec cannot decode,
whose refusal then comes from the CPU decoder, word for word.
The default, ``cpu``, never loads nvImageCodec.

Start-up fails with the reason when ``gpu`` cannot work here (nvImageCodec not
installed, no CUDA driver or device): a server asked to decode on a GPU does
not quietly decode on its CPU. Each decoding thread has its own nvImageCodec
decoder (one per thread of the decode pool).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable

import numpy as np

KINDS = ("cpu", "gpu")
#: What the ``gpu`` decoder needs, said when it is missing.
REQUIREMENT = "nvidia-nvimgcodec-cu13 (svertka's gpu extra), a CUDA driver and a GPU"

#: The decoder of this process (``configure``), or None: the CPU path.
_current: JpegDecoder | None = None


class Unavailable(Exception):
    """``--image-decoder gpu`` cannot work in this process; the message says why."""


class JpegDecoder:
    """Decodes one JPEG to uint8 (H, W, 3) RGB, or answers None where the CPU must do it.

    ``cpu_backend``: nvImageCodec's own CPU backend (libjpeg-turbo), the same calls without a
    GPU; how the tests run this code on machines without one.
    """

    def __init__(self, *, cpu_backend: bool = False) -> None:
        try:
            from nvidia import nvimgcodec
        except ImportError as exc:
            raise Unavailable(f"nvImageCodec is not installed ({exc}); it needs {REQUIREMENT}") from None
        self._nv = nvimgcodec
        self._cpu_backend = cpu_backend
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=False,  # the caller applies the EXIF orientation, as on the CPU path
            color_spec=nvimgcodec.ColorSpec.SRGB,
            sample_format=nvimgcodec.SampleFormat.I_RGB,  # interleaved RGB, grey JPEGs included
        )
        self._local = threading.local()
        self._decoder()  # one now: a machine that cannot decode says so at start-up

    def _decoder(self):
        decoder = getattr(self._local, "decoder", None)
        if decoder is None:
            nv = self._nv
            try:
                if self._cpu_backend:
                    backends = [nv.Backend(nv.BackendKind.CPU_ONLY)]
                    decoder = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=backends)
                else:
                    decoder = nv.Decoder()  # GPU backends first (hardware, then CUDA nvJPEG)
            except RuntimeError as exc:
                raise Unavailable(
                    f"nvImageCodec cannot make a decoder here: {exc}; it needs {REQUIREMENT}"
                ) from None
            self._local.decoder = decoder
        return decoder

    def __call__(self, data: bytes) -> np.ndarray | None:
        try:
            image = self._decoder().decode(data, params=self._params)
            if image is None:  # nvImageCodec's answer for a stream it cannot decode
                return None
            pixels = np.asarray(image.cpu())
        except (RuntimeError, ValueError, Unavailable):
            return None
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            return None
        return pixels


def configure(kind: str) -> None:
    """Choose this process's JPEG decoder: ``cpu`` or ``gpu`` (Unavailable, with why, if it cannot)."""
    global _current
    if kind not in KINDS:
        raise ValueError(f"image decoder: expected one of {list(KINDS)}, got {kind!r}")
    _current = JpegDecoder() if kind == "gpu" else None


def check_in_child(kind: str, timeout_s: float = 120.0) -> None:
    """What ``configure(kind)`` would say, asked of a short-lived child process (Unavailable, with
    why): a supervisor checks its frontends' decoder without holding a CUDA context itself."""
    if kind != "gpu":
        return
    code = (
        "import sys\nfrom service import gpu_decode\ntry:\n    gpu_decode.configure('gpu')\n"
        "except gpu_decode.Unavailable as exc:\n    print(exc)\n    sys.exit(3)\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        raise Unavailable(f"checking nvImageCodec took more than {timeout_s:g} s") from None
    if result.returncode != 0:
        lines = (
            result.stdout.strip() or result.stderr.strip() or f"exit status {result.returncode}"
        ).splitlines()
        raise Unavailable(lines[-1])


def current() -> Callable[[bytes], np.ndarray | None] | None:
    """The decoder ``configure`` chose, or None for the CPU path."""
    return _current

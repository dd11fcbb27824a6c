"""Encoded image bytes -> the tensor row a model expects (float32 (3, H, W) for svertka's own exports).

The pipeline is the one :class:`service.modelmeta.ModelMeta` describes and
torchvision's reference recipe trains with (``Resize(shorter side)`` ->
``CenterCrop`` -> ``ToTensor`` -> ``Normalize``, on an image converted to RGB
the way ``torchvision.datasets.folder.pil_loader`` does), so a served model
sees what it saw in training. What makes it cheaper (and safer) than that recipe,
without changing its geometry:

* the container is pre-scanned (:mod:`service.imagescan`) with caps on the
  structure Pillow would walk in Python, and the pixel limits are checked
  from the header, before any pixel is decoded: decompression bombs and
  files built to be costly to parse cost about a millisecond;
* images decoded at full size (all but baseline JPEGs) have a lower pixel
  limit (``max_decoded_pixels``) than baseline JPEGs (``max_image_pixels``);
* JPEGs are decoded with DCT-domain downscaling (libjpeg-turbo through
  ``simplejpeg``, scale factors n/8) to the smallest size whose shorter side
  still covers the resize target, so a 1024x768 photo for a 224 model is
  decoded at 384x288;
* only the centre crop is resampled: Pillow's ``resize(box=...)`` computes
  the crop's pixels of the full resize directly (same filter, same support),
  so a very long thin image never materialises its full resized size;
* uint8 HWC -> normalised float32 CHW is one fused OpenCV pass
  (``cv2.dnn.blobFromImageWithParams``) instead of three numpy passes.

Measured choices (``python -m bench.research.preprocess``, numbers in
docs/engine.md): simplejpeg beat Pillow ``draft()``; Pillow's antialiased
bilinear resize was kept over OpenCV's faster but non-antialiased
``INTER_LINEAR`` because it matches the training pipeline.

Everything here is thread-safe and the heavy calls (libjpeg-turbo, Pillow's
decoders and resampling) release the GIL, so callers run
:meth:`Preprocessor.__call__` in a thread pool, off the event loop. What
still holds it (Pillow's container parsing, allocation, WebP's canvas copy)
is bounded by the pre-scan and the limits; measured in docs/engine.md,
"Costly images".
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from service import config, errors, gpu_decode, imagescan, modelmeta

# Each decode thread normalises one image at a time; OpenCV's own thread pool would only make
# those threads compete with each other and with onnxruntime for the same cores.
cv2.setNumThreads(1)

#: The formats accepted, by their Pillow names. Limiting Pillow to these keeps
#: its many rarely used (and rarely hardened) decoders away from request bytes.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
_FORMAT_NAMES = "JPEG, PNG, WebP, BMP or GIF"

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}

#: EXIF orientation -> the transpose that makes the image upright (EXIF 2.32, tag 0x0112).
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

#: Pillow modes that hold 16-bit (or wider integer) grey values; Pillow's own
#: ``convert("RGB")`` clips them at 255 instead of scaling, so they are scaled here.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# Errors Pillow raises for malformed data, depending on format and stage.
_PIL_DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError)


def sniff_format(data: bytes) -> str | None:
    """The format named by the file signature, or None. Cheap: looks at 12 bytes."""
    head = bytes(data[:12])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    return None


def resized_geometry(
    width: int, height: int, resize: int, crop: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(resized_w, resized_h, crop_left, crop_top) exactly as torchvision computes them.

    ``Resize(int)`` sets the shorter side to ``resize`` and truncates the
    longer one (``int(resize * long / short)``); ``CenterCrop`` rounds the
    offsets (``int(round((size - crop) / 2))``).
    """
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    crop_h, crop_w = crop
    return new_w, new_h, int(round((new_w - crop_w) / 2.0)), int(round((new_h - crop_h) / 2.0))


def _describe(data: bytes) -> str:
    head = bytes(data[:8])
    if head[:1] in (b"{", b"["):
        return "it looks like JSON text"
    if head and all(32 <= b < 127 for b in head):
        return f"it starts with the text {head.decode('ascii')!r}"
    return f"its first bytes are {head.hex(' ')}"


class Preprocessor:
    """Decode, convert, resize, crop and normalise images for one model.

    Stateless after construction (safe to call from many threads at once).
    Every problem with the image raises :class:`errors.InvalidInput` with a
    message that names the problem; nothing else escapes for bad input.
    """

    def __init__(
        self,
        meta: modelmeta.ModelMeta,
        *,
        max_pixels: int,
        max_decoded_pixels: int = config.DEFAULT_MAX_DECODED_PIXELS,
        jpeg_decoder: Callable[[bytes], np.ndarray | None] | None | str = "configured",
    ) -> None:
        self.meta = meta
        #: Decodes the JPEGs the CPU would decode downscaled, at full size (service.gpu_decode), or
        #: None; "configured": the process's choice (``--image-decoder``).
        self.jpeg_decoder = gpu_decode.current() if jpeg_decoder == "configured" else jpeg_decoder
        self.max_pixels = int(max_pixels)
        #: The limit for images decoded at full size (everything but single-scan sequential JPEGs).
        self.max_decoded_pixels = int(max_decoded_pixels)
        self.resample = _RESAMPLE[meta.interpolation]
        self.bgr = meta.color_order == "BGR"
        mean = np.asarray(meta.mean, np.float64)
        std = np.asarray(meta.std, np.float64)
        # (x / 255 - mean) / std == (x - 255 * mean) * (1 / (255 * std)): one fused OpenCV pass
        # (HWC uint8 -> CHW float32, channel swap, mean, scale) that releases the GIL. mean/std are
        # in the model's channel order (ModelMeta: convert to color_order first, then normalise),
        # which is the order OpenCV applies them in after swapRB. size (0, 0): never resize here.
        self._blob_params = cv2.dnn.Image2BlobParams(
            scalefactor=tuple(float(v) for v in 1.0 / (255.0 * std)),
            size=(0, 0),
            mean=tuple(float(v) for v in 255.0 * mean),
            swapRB=self.bgr,
            ddepth=cv2.CV_32F,
        )

    # -- public -------------------------------------------------------------
    def __call__(self, data: bytes) -> np.ndarray:
        """One encoded image -> the model's input row: ``meta.input_shape`` of ``meta.input_dtype``."""
        rgb = self.decode(data)
        if self.meta.normalized_in_graph:
            return self.pixels(rgb)
        x = self.normalize(rgb)
        if self.meta.layout == "NHWC":
            x = np.ascontiguousarray(x.transpose(1, 2, 0))
        return x if self.meta.input_dtype == "float32" else x.astype(self.meta.input_dtype)

    def pixels(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) RGB -> uint8 pixels in the model's colour order and layout (a model that
        normalises inside its graph)."""
        x = rgb[:, :, ::-1] if self.bgr else rgb
        return np.ascontiguousarray(x.transpose(2, 0, 1) if self.meta.layout == "NCHW" else x)

    def decode(self, data: bytes) -> np.ndarray:
        """One encoded image -> the uint8 (H, W, 3) RGB centre crop, before normalisation."""
        if data is None or len(data) == 0:
            raise errors.InvalidInput("image is empty (0 bytes); expected an encoded " + _FORMAT_NAMES)
        fmt = sniff_format(data)
        if fmt is None:
            raise errors.InvalidInput(
                f"not an image: {len(data)} bytes that are not {_FORMAT_NAMES} ({_describe(data)})"
            )
        # Structure and size from the header, before Pillow walks the file in Python or anything is
        # allocated (service/imagescan.py; docs/engine.md, "Costly images").
        layout = imagescan.scan(data, fmt)
        if layout is not None:
            self._check_decoded_size(layout.what, layout.width, layout.height, layout.full_size)
        image = self._open(data, fmt)
        width, height = image.size
        stored_pixels = width * height
        # The same check on Pillow's reading of the header (also for a file the scan could not follow).
        if layout is not None:
            self._check_decoded_size(layout.what, width, height, layout.full_size)
        else:
            full_size = fmt != "JPEG" or bool(image.info.get("progression"))
            self._check_decoded_size(f"{fmt} image", width, height, full_size)
        fast_jpeg = fmt == "JPEG" and image.mode in ("RGB", "L")
        if not fast_jpeg:
            # Decode before reading the EXIF: a PNG's getexif() decodes the whole image, and
            # _orientation() takes any failure for a broken EXIF block -- a broken pixel
            # stream would then be served as a blank image instead of being refused.
            self._load_pillow(image, fmt)
            self._check_exif(image, layout.what if layout is not None else f"{fmt} image")
        orientation = self._orientation(image)
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        if fast_jpeg:
            image = self._decode_jpeg(data, stored_pixels)
        else:
            image = self._to_rgb(image, fmt)
        if orientation in _TRANSPOSE:
            image = image.transpose(_TRANSPOSE[orientation])
        return self._resize_crop(image, width, height)

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) RGB -> float32 (3, H, W), colour order, mean and std applied.

        Measured by ``python -m bench.research.normalize_variants``: half the time of the three numpy
        passes it replaced, with results within 2.4e-7 of them.
        """
        return cv2.dnn.blobFromImageWithParams(np.ascontiguousarray(rgb), self._blob_params)[0]

    # -- steps ----------------------------------------------------------------
    def _open(self, data: bytes, fmt: str) -> Image.Image:
        """Parse the header only and enforce the pixel limit before any decoding."""
        try:
            image = Image.open(io.BytesIO(data), formats=[fmt])
        except Image.DecompressionBombError as exc:
            # Pillow's own guard (2x its MAX_IMAGE_PIXELS) fired while parsing: same limit, same message.
            raise self._too_many_pixels(fmt, exc) from None
        except (UnidentifiedImageError, *_PIL_DATA_ERRORS) as exc:
            # Pillow's "cannot identify image file <_io.BytesIO object at 0x...>" says nothing more.
            detail = "" if isinstance(exc, UnidentifiedImageError) else f" ({exc})"
            raise errors.InvalidInput(
                f"{fmt} image is corrupt or truncated: cannot read its header{detail}"
            ) from None
        width, height = image.size
        if width < 1 or height < 1:
            raise errors.InvalidInput(f"{fmt} image has no pixels (size {width}x{height})")
        if width * height > self.max_pixels:
            raise errors.InvalidInput(
                f"{fmt} image is {width}x{height} = {width * height} pixels, more than the limit of "
                f"{self.max_pixels} (max_image_pixels)"
            )
        return image

    def _check_decoded_size(self, what: str, width: int, height: int, full_size: bool) -> None:
        """Images decoded at full size get the lower limit; above max_image_pixels, _open's message applies."""
        pixels = width * height
        if full_size and self.max_decoded_pixels < pixels <= self.max_pixels:
            raise errors.InvalidInput(
                f"{what} is {width}x{height} = {pixels} pixels, more than the limit of "
                f"{self.max_decoded_pixels} for images decoded at full size (max_decoded_pixels); "
                f"only baseline JPEGs, decoded downscaled, may have up to {self.max_pixels} (max_image_pixels)"
            )

    @staticmethod
    def _check_exif(image: Image.Image, what: str) -> None:
        """PNG and WebP carry EXIF blocks of any size, which getexif() parses entry by entry in Python."""
        blob = image.info.get("exif")
        if blob is None and "Raw profile type exif" in image.info:
            # What Image.getexif() decodes from a PNG text chunk (at most 1 MB: PngImagePlugin.MAX_TEXT_CHUNK).
            try:
                blob = bytes.fromhex("".join(str(image.info["Raw profile type exif"]).split("\n")[3:]))
            except ValueError:
                return
        imagescan.check_exif(blob, what)

    def _too_many_pixels(self, fmt: str, exc: Exception) -> errors.InvalidInput:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        count = found.group(1) if found else "too many"
        return errors.InvalidInput(
            f"{fmt} image has {count} pixels, more than the limit of {self.max_pixels} (max_image_pixels)"
        )

    @staticmethod
    def _orientation(image: Image.Image) -> int:
        try:
            value = image.getexif().get(_ORIENTATION_TAG, 1)
        except Exception:
            # A broken EXIF block must not reject an otherwise good image: treat it as upright.
            return 1
        return value if isinstance(value, int) else 1

    def _decode_jpeg(self, data: bytes, pixels: int) -> Image.Image:
        """libjpeg-turbo with DCT-domain downscaling to the smallest size covering the target; or the
        JPEG decoder of ``--image-decoder gpu`` at full size, up to max_decoded_pixels, falling back
        to libjpeg-turbo for any image it does not decode."""
        if self.jpeg_decoder is not None and pixels <= self.max_decoded_pixels:
            rgb = self.jpeg_decoder(data)
            if rgb is not None and rgb.shape[0] * rgb.shape[1] == pixels:
                return Image.fromarray(rgb, "RGB")
        target = self.meta.resize
        try:
            pixels = simplejpeg.decode_jpeg(data, "RGB", min_height=target, min_width=target)
        except ValueError as exc:
            raise errors.InvalidInput(f"JPEG image is corrupt or truncated: {exc}") from None
        return Image.fromarray(pixels, "RGB")

    def _load_pillow(self, image: Image.Image, fmt: str) -> None:
        """Pillow decodes everything else (and CMYK/YCCK JPEGs); GIF/WebP give their first frame."""
        if fmt == "JPEG":
            # DCT-domain downscaling in Pillow (scale 1/2, 1/4, 1/8) for the JPEGs simplejpeg can't convert.
            image.draft(None, (self.meta.resize, self.meta.resize))
        try:
            image.load()
        except Image.DecompressionBombError as exc:
            raise self._too_many_pixels(fmt, exc) from None
        except _PIL_DATA_ERRORS as exc:
            raise errors.InvalidInput(f"{fmt} image is corrupt or truncated: {exc}") from None

    @staticmethod
    def _to_rgb(image: Image.Image, fmt: str) -> Image.Image:
        mode = image.mode
        if mode == "RGB":
            return image
        if mode in _WIDE_GREY_MODES:
            grey = np.asarray(image)
            if grey.dtype.kind == "i" and grey.size and int(grey.min()) < 0:
                raise errors.InvalidInput(f"{fmt} image mode {mode} has negative grey values")
            # In place: one float32 copy of the image at a time (a 16-bit PNG is decoded at full size).
            scaled = grey.astype(np.float32)
            scaled *= 255.0 / 65535.0
            np.rint(scaled, out=scaled)
            np.clip(scaled, 0, 255, out=scaled)
            scaled = scaled.astype(np.uint8)
            return Image.fromarray(scaled, "L").convert("RGB")
        if mode in ("P", "PA") and image.palette is None:
            # e.g. a palette PNG without its PLTE chunk; Pillow's convert() would fail an assert.
            raise errors.InvalidInput(f"{fmt} image has palette mode {mode} but no palette")
        try:
            # Alpha is dropped, not composited: that is what torchvision's pil_loader does in training.
            return image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise errors.InvalidInput(
                f"{fmt} image has pixel mode {mode}, which cannot be converted to RGB ({exc})"
            ) from None

    def _resize_crop(self, image: Image.Image, width: int, height: int) -> np.ndarray:
        """Resample only the centre crop of the full resize; ``width``/``height`` are the upright source size."""
        crop_h, crop_w = self.meta.crop
        new_w, new_h, left, top = resized_geometry(width, height, self.meta.resize, self.meta.crop)
        # The decoded image may be smaller than the source (DCT scaling): map the crop into its pixels.
        sx = image.width / new_w
        sy = image.height / new_h
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        if not all(math.isfinite(v) for v in box):  # pragma: no cover - sizes are >= 1
            raise errors.InvalidInput(f"image size {width}x{height} cannot be resized")
        out = image.resize((crop_w, crop_h), self.resample, box=box)
        return np.asarray(out)

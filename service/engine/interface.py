"""The line between frontend and engine: what a frontend may ask of the engine, in plain data.

A frontend (the gRPC servicers: wire format, auth, decoding of the request,
per-request accounting) talks to the engine (repository, versions, batching,
onnxruntime) only through :class:`Engine` and the :class:`Model` it hands
out. What crosses is plain data: numpy arrays, the dataclasses below,
``service.modelmeta.ModelMeta`` and ``service.config.ModelSettings``, and
``service.errors`` exceptions; nothing shaped like grpc, protobuf or a
metrics recorder. ``service.engine.repository.ModelRepository`` is the engine
(in the frontend's process for now).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from service import config, errors, modelmeta

if TYPE_CHECKING:
    from service.engine.batching import BatchInfo, Result
    from service.model_recorder import StatsSnapshot

#: A model's states, as RepositoryIndex and health checks show them.
READY = "READY"
LOADING = "LOADING"
UNAVAILABLE = "UNAVAILABLE"
UNLOADING = "UNLOADING"


#: How a READY status's reason starts while the newest reload failed and an older version serves.
RELOAD_FAILED = "reload failed: "


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    """The state of one model as health checks and RepositoryIndex see it."""

    name: str
    version: int | None
    state: str  # READY | LOADING | UNAVAILABLE | UNLOADING
    reason: str  # "" when READY (or RELOAD_FAILED and why), else a human-readable cause


@dataclasses.dataclass
class Timings:
    """Where one request's time went: a caller passes one to ``infer_*``, which fills it in.

    For a request with several images, ``preprocess_s`` is the sum of the
    decodes, ``queue_s`` the longest wait, and the compute times are summed
    over the distinct batches its images rode in.
    """

    preprocess_s: float = 0.0
    queue_s: float = 0.0
    compute_input_s: float = 0.0
    compute_infer_s: float = 0.0
    compute_output_s: float = 0.0

    @property
    def compute_s(self) -> float:
        return self.compute_input_s + self.compute_infer_s + self.compute_output_s

    def add_results(self, results: list[Result]) -> None:
        """Account for the batches these results rode in (each batch once)."""
        seen: dict[int, BatchInfo] = {}
        for res in results:
            self.queue_s = max(self.queue_s, res.queue_s)
            seen[id(res.batch)] = res.batch
        for info in seen.values():
            self.compute_input_s += info.input_s
            self.compute_infer_s += info.infer_s
            self.compute_output_s += info.output_s


def input_dims_text(meta: modelmeta.ModelMeta) -> str:
    """The model's input shape as messages show it: ``[N,3,224,224]``, ``[N,224,224,3]``, or
    ``[1,3,224,224]`` for a graph whose batch is fixed at 1."""
    return f"[{1 if meta.fixed_batch else 'N'},{','.join(str(d) for d in meta.input_shape)}]"


def batch_shape(meta: modelmeta.ModelMeta, *dims: int) -> list[int]:
    """A tensor's shape as ModelMetadata reports it: the batch dimension -1 (dynamic), or 1 when fixed."""
    return [1 if meta.fixed_batch else -1, *dims]


def input_shape_text(meta: modelmeta.ModelMeta) -> str:
    """The model's input datatype and shape: ``FP32 [N,3,224,224]``, ``UINT8 [N,224,224,3]``."""
    return f"{meta.input_datatype} {input_dims_text(meta)}"


def check_input_shape(meta: modelmeta.ModelMeta, shape: Sequence[int], shown: str) -> None:
    """The rule for a tensor input's shape: ``[N, C, H, W]`` (or ``[N, H, W, C]`` for an NHWC
    model) with the model's sizes.

    ``shown`` is the shape as the message quotes it (the caller bounds a client's shape).
    Frontends check it on the shape a request declares, before reading its data; the engine
    on the array it is given.
    """
    if len(shape) != 4 or tuple(shape[1:]) != meta.input_shape:
        raise errors.InvalidInput(
            f"input '{meta.input_name}': expected {meta.input_datatype} shape {input_dims_text(meta)}, got {shown}"
        )


def check_request_batch(meta: modelmeta.ModelMeta, shape: Sequence[int], shown: str) -> None:
    """A client's tensor for a graph whose batch is fixed at 1 must be exactly ``[1, ...]``, as Triton
    requires for ``max_batch_size: 0``. (Rows the server makes itself, decoded images, run one by one.)"""
    if meta.fixed_batch and shape[0] != 1:
        raise errors.InvalidInput(
            f"input '{meta.input_name}': expected {meta.input_datatype} shape {input_dims_text(meta)}, got "
            f"{shown} (the graph's batch dimension is fixed at 1: max_batch_size 0, one input per request)"
        )


def check_images_allowed(meta: modelmeta.ModelMeta, label: str) -> None:
    """Images need the model's preprocessing; a model file without svertka metadata has none."""
    if not meta.preprocessing_known:
        raise errors.FailedPrecondition(
            f"{label} has no svertka metadata, so its preprocessing is unknown and it takes tensors "
            f"only (ModelInfer with {input_shape_text(meta)}); to send images, serve a file with "
            "svertka's metadata (svertka export writes it; svertka annotate adds it to a file made elsewhere)"
        )


def check_rows(input_name: str, rows: int, limit: int, shown: str = "") -> None:
    """The rule for the rows (images) of one request: 1 to ``max_rows_per_request``."""
    if rows < 1:
        raise errors.InvalidInput(f"input '{input_name}': batch dimension must be >= 1, got {shown or rows}")
    if rows > limit:
        raise errors.InvalidInput(
            f"input '{input_name}': batch of {rows} rows; expected 1 to {limit} rows per request "
            "(max_rows_per_request)"
        )


def top_k(meta: modelmeta.ModelMeta, logits_row: np.ndarray, k: int) -> list[tuple[int, str, float]]:
    """(index, label, probability), best first; ties keep class order. k > classes: all.

    The probability is the softmax of the logits, or the output itself for a model whose output
    holds probabilities already (``meta.output``)."""
    if not isinstance(k, int | np.integer) or k < 1:
        raise errors.InvalidInput(f"top_k must be >= 1, got {k}")
    k = min(int(k), meta.num_classes)
    z = np.asarray(logits_row, np.float64).reshape(-1)[: meta.num_classes]  # extra outputs follow
    if meta.output == "probabilities":
        p = z
    else:
        z = z - z.max()
        p = np.exp(z)
        p /= p.sum()
    order = np.argsort(-p, kind="stable")[:k]
    return [(int(i), meta.labels[i], float(p[i])) for i in order]


class _Entry(Protocol):
    """What :func:`resolve` reads of a model name: its status, its versions on disk, what serves."""

    status: ModelStatus
    versions: list[int]
    serving: Any


def resolve(entries: Mapping[str, _Entry], name: str, version: int | None) -> Any:
    """The serving model a request names (``version`` None: the newest), or the error that says why not.

    The one rule, for the engine's repository and for a frontend's view of it in another
    process. ``name`` and ``version`` have passed the layout rules already.
    """
    entry = entries.get(name)
    if entry is None:
        known = ", ".join(sorted(entries)) or "none"
        raise errors.ModelNotFound(f"model '{name}' is not in the repository (models: {known})")
    served = entry.serving
    if version is None:
        if served is None:
            raise errors.ModelNotReady(_not_ready(name, entry.status))
        return served
    if served is not None and served.version == version:
        return served
    if version in entry.versions:
        now = f"version {served.version} is serving" if served is not None else _not_ready(name, entry.status)
        raise errors.ModelNotReady(f"model '{name}' version {version} is not loaded ({now})")
    listed = ", ".join(map(str, entry.versions)) or "none"
    raise errors.ModelNotFound(
        f"model '{name}' has no version {version} (versions in the repository: {listed})"
    )


def _not_ready(name: str, status: ModelStatus) -> str:
    reason = f": {status.reason}" if status.reason else ""
    return f"model '{name}' is {status.state.lower()}{reason}"


class Model(Protocol):
    """One served (name, version): what a frontend reads of it and asks of it."""

    name: str
    version: int
    meta: modelmeta.ModelMeta
    settings: config.ModelSettings
    #: The onnxruntime execution provider in use, the instances, and the loaded file's sha256 prefix.
    provider: str
    instances: int
    sha256: str

    @property
    def max_decoded_pixels(self) -> int:
        """The pixel limit in force for images decoded at full size."""
        ...

    async def infer_tensor(
        self, batch: np.ndarray, *, deadline: float | None = None, timings: Timings | None = None
    ) -> np.ndarray:
        """Logits (n, classes) for these n float32 rows; raises service.errors."""
        ...

    async def infer_images(
        self, images: Sequence[bytes], *, deadline: float | None = None, timings: Timings | None = None
    ) -> list[np.ndarray | errors.SvertkaError]:
        """One logits row or the InvalidInput per encoded image, in order."""
        ...

    def top_k(self, logits_row: np.ndarray, k: int) -> list[tuple[int, str, float]]:
        """(index, label, probability), best first."""
        ...

    async def statistics(self) -> StatsSnapshot:
        """Triton-style statistics of this (name, version) so far."""
        ...


class Engine(Protocol):
    """The models a frontend can reach, and the engine's lifecycle."""

    def get(self, name: str, version: int | str | None = None) -> Model:
        """The serving version (``None``), or that version; ModelNotFound / ModelNotReady otherwise."""
        ...

    def status(self, name: str) -> ModelStatus: ...

    def statuses(self) -> list[ModelStatus]: ...

    def served(self) -> list[Model]:
        """The serving version of every ready model."""
        ...

    def add_listener(self, callback: Callable[[ModelStatus], None]) -> None:
        """``callback(status)`` on every state change, on the event loop."""
        ...

    async def load(self, name: str) -> ModelStatus: ...

    async def unload(self, name: str) -> None: ...

    async def start(self) -> None: ...

    async def drain(self, timeout_s: float) -> None: ...

    async def close(self) -> None: ...

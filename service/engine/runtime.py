"""onnxruntime, and nothing else: sessions, execution providers, threads, warm-up, IO binding.

One :class:`Session` per model instance. Loading checks that the file is a
model svertka can serve (its metadata parses; its one input and its logits
output have the names, types and shapes the metadata implies, with a dynamic
batch dimension) and fails with a :class:`ModelLoadError` that says what is
wrong, so a bad file marks that model unavailable with a reason instead of
failing requests later.

Execution providers are tried in the order TensorRT -> CUDA -> CPU, keeping
those the settings ask for and this onnxruntime build has; the one that runs
the model is :attr:`Session.provider`. onnxruntime silently retries on CPU when
a GPU provider fails to initialise; svertka logs that as a warning (default
list) or fails the load with the reason (a list that names a GPU provider).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service import config, modelmeta
from service.engine import signature
from service.engine.binding import BatchFeed
from service.engine.signature import CudaGraphSettingError, ModelLoadError, graph_metadata

log = logging.getLogger(__name__)

CPU = config.PROVIDER_NAMES["cpu"]
CUDA = config.PROVIDER_NAMES["cuda"]
TENSORRT = config.PROVIDER_NAMES["tensorrt"]
GPU_PROVIDERS = (TENSORRT, CUDA)

#: ``intra_op_spinning: auto`` spins for models whose input has at least this many pixels
#: (ImageNet-size models, 224x224: compute-bound, a batch is many milliseconds of short parallel
#: sections, each of which pays a thread wake-up when workers sleep) and not for smaller ones
#: (CIFAR-size and digits models: decode-bound on the image API, where spinning workers take the
#: cores the decoders need). Both measurements are in docs/engine.md.
SPIN_MIN_INPUT_PIXELS = 112 * 112

#: The CUDA provider's options. cuDNN picks each convolution's algorithm by its heuristics instead of
#: onnxruntime's default EXHAUSTIVE, which times every candidate algorithm the first time it sees an
#: input shape: a dynamic batcher forms a new shape with every new batch size, and on an H200 each such
#: search stalled resnet50 for about a second (perf_analyzer at concurrency 64, shared memory: 57 images/s
#: and 820 ms of compute per request; 322 images/s with HEURISTIC; docs/benchmarks-gpu.md, runs 1 and 2).
CUDA_OPTIONS: dict[str, str | int | bool] = {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC"}

#: Runs of each padded size at warm-up with CUDA graphs on: onnxruntime runs normally before it captures,
#: and the capture and first replay belong before readiness, not in the first requests.
CUDA_GRAPH_WARM_UP_RUNS = 3

#: Where TensorRT keeps built engines so a restart does not rebuild them.
TRT_CACHE_DIR = Path(tempfile.gettempdir()) / "svertka-trt-cache"


def intra_op_threads(settings: config.ModelSettings, cpu_budget: int = 0) -> int:
    """Threads per instance: the model's setting, or the CPU budget shared among the instances.

    ``cpu_budget`` 0 means the CPUs this process may run on.
    """
    if settings.intra_op_threads:
        return settings.intra_op_threads
    budget = cpu_budget or config.default_intra_op_threads()
    return max(1, budget // settings.instances)


def spinning(settings: config.ModelSettings, meta: modelmeta.ModelMeta) -> bool:
    """Whether the model's idle intra-op threads spin-wait: the setting, or the auto rule."""
    if isinstance(settings.intra_op_spinning, bool):
        return settings.intra_op_spinning
    return meta.crop[0] * meta.crop[1] >= SPIN_MIN_INPUT_PIXELS


def _peek_metadata(
    path: Path, providers: Sequence[str], settings: config.ModelSettings
) -> modelmeta.ModelMeta | None:
    """The model's metadata before any session exists, where the session options depend on it.

    TensorRT needs it (a failure is the load's failure); the auto spinning rule only prefers
    it: an unreadable file is left to onnxruntime, whose error is the more precise one.
    """
    if TENSORRT not in providers and settings.intra_op_spinning != "auto":
        return None
    try:
        return modelmeta.read_model_file(str(path))
    except modelmeta.MetadataError as exc:
        if "has no svertka metadata" in str(exc):
            try:  # what its graph says, from a session that only reads it (no optimisation, CPU)
                options = ort.SessionOptions()
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                reader = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                return graph_metadata(reader, path)
            except Exception as graph_exc:  # ModelLoadError says why; anything else is onnxruntime's
                if TENSORRT in providers:
                    raise ModelLoadError(_first_line(graph_exc)) from None
                return None
        if TENSORRT in providers:
            raise ModelLoadError(str(exc)) from None
        return None


def resolve_providers(settings: config.ModelSettings, available: Sequence[str] | None = None) -> list[str]:
    """The onnxruntime provider names to try, best first.

    Providers missing from this build are skipped when the default list is in
    use; when the settings name providers explicitly, a missing GPU provider
    is an error (the operator asked for a GPU and must not silently get a CPU).
    """
    if available is None:
        available = ort.get_available_providers()
    requested = [config.PROVIDER_NAMES[p] for p in settings.providers]
    explicit = tuple(settings.providers) != config.DEFAULT_PROVIDERS
    missing = [p for p in requested if p not in available]
    if explicit and any(p in GPU_PROVIDERS for p in missing):
        raise ModelLoadError(
            f"providers {list(settings.providers)} were requested but this onnxruntime "
            f"{ort.__version__} build offers only {list(available)} (install onnxruntime-gpu and the "
            "CUDA/TensorRT libraries, or remove the GPU providers from the model's config)"
        )
    chosen = [p for p in requested if p in available]
    if not chosen:
        raise ModelLoadError(
            f"none of the providers {list(settings.providers)} is available here: {list(available)}"
        )
    skipped = [p for p in missing if p in GPU_PROVIDERS]
    if skipped:
        log.info("onnxruntime build has no %s; trying %s", ", ".join(skipped), ", ".join(chosen))
    return chosen


def _provider_options(
    name: str, meta: modelmeta.ModelMeta, max_batch_size: int, trt_cache_dir: Path | None = None
) -> dict[str, str | int | bool]:
    if name == TENSORRT:
        shape = f"{meta.input_name}:{{n}}x" + "x".join(str(d) for d in meta.input_shape)  # its layout's order
        cache = Path(trt_cache_dir) if trt_cache_dir is not None else TRT_CACHE_DIR
        try:
            cache.mkdir(parents=True, exist_ok=True)
            if not os.access(cache, os.W_OK | os.X_OK):
                raise PermissionError(13, "not writable by this process")
        except OSError as exc:
            raise ModelLoadError(
                f"TensorRT engine cache {cache}: {exc.strerror or exc}; point --trt-cache-dir "
                "(SVERTKA_TRT_CACHE_DIR) at a writable directory"
            ) from None
        return {
            "device_id": 0,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            # QDQ (int8) graphs need the INT8 builder flag; fp32 graphs stay fp32.
            "trt_int8_enable": meta.precision == "int8",
            "trt_fp16_enable": meta.precision == "fp16",
            # One optimisation profile covering every batch the batcher can form.
            "trt_profile_min_shapes": shape.format(n=1),
            "trt_profile_opt_shapes": shape.format(n=max_batch_size),
            "trt_profile_max_shapes": shape.format(n=max_batch_size),
        }
    if name == CUDA:
        return dict(CUDA_OPTIONS)
    return {}


def padded_sizes(settings: config.ModelSettings, provider: str) -> tuple[int, ...]:
    """The batch sizes a batch is padded up to (each with its own session), or () for none.

    onnxruntime's CUDA provider pays for every change of input shape in each
    convolution (on an H200, resnet50 batches whose size changed from the last
    took tens of milliseconds instead of two; docs/benchmarks-gpu.md), and a
    dynamic batcher changes the batch size all the time. One session per size,
    each only ever fed its own shape, removes the change; padding a batch of 5
    to 8 costs less than that. ``auto`` does it for the CUDA provider, with
    powers of two up to ``max_batch_size`` (and ``max_batch_size`` itself);
    TensorRT has its own optimisation profile, and the CPU provider has shown no such cost (the CPU
    benchmark serves batches of every size at 0.84-0.91 of its ceiling, docs/benchmarks.md).
    An explicit list applies on any provider; ``max_batch_size`` is always added.
    """
    sizes = settings.padded_batch_sizes
    if sizes == "auto":
        if provider != CUDA:
            return ()
        sizes = tuple(_powers_of_two(settings.max_batch_size))
    if not sizes:
        return ()
    return tuple(sorted({*sizes, settings.max_batch_size}))


def _powers_of_two(limit: int) -> list[int]:
    out, b = [], 1
    while b <= limit:
        out.append(b)
        b *= 2
    return out


class Session:
    """One onnxruntime session (one model instance). ``run`` is blocking; call it from one thread at a time."""

    def __init__(
        self,
        path: str | Path,
        settings: config.ModelSettings,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        instance: int = 0,
        peeked: modelmeta.ModelMeta | None = None,
        known: modelmeta.ModelMeta | None = None,
        trt_cache_dir: Path | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        self.path = Path(path)
        self.instance = instance
        self.threads = threads or intra_op_threads(settings)
        chosen = list(providers) if providers is not None else resolve_providers(settings)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path} does not exist")
        if peeked is None:
            peeked = _peek_metadata(self.path, chosen, settings)
        # What an earlier instance read (``known``), or a plain file's graph, just read by the peek in
        # full: the file is not parsed again (graph_metadata loads it to look for a Softmax).
        self._known = known or (peeked if peeked is not None and not peeked.preprocessing_known else None)
        self.spinning = (
            spinning(settings, peeked) if peeked is not None else settings.intra_op_spinning is True
        )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only; svertka logs what matters itself
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        provider_list: list[tuple[str, dict]] = [(p, {}) for p in chosen]
        if TENSORRT in chosen:
            # TensorRT's optimisation profile needs the input shape before the session exists.
            assert peeked is not None
            provider_list = [
                (p, _provider_options(p, peeked, settings.max_batch_size, trt_cache_dir)) for p in chosen
            ]
        elif CUDA in chosen:
            provider_list = [(p, dict(CUDA_OPTIONS) if p == CUDA else {}) for p in chosen]
        #: Whether each padded size's session captures and replays a CUDA graph (settings.cuda_graphs).
        self.cuda_graphs = settings.cuda_graphs if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and chosen[0] != CUDA:
            raise CudaGraphSettingError(
                f"cuda_graphs: true needs the CUDA execution provider and this model would run on {chosen[0]} "
                "(set cuda_graphs: false, or providers: [cuda] on an onnxruntime-gpu build with a GPU)"
            )
        if self.cuda_graphs:
            provider_list = [
                (p, {**o, "enable_cuda_graph": True} if p == CUDA else o) for p, o in provider_list
            ]
        self._options, self._provider_list = options, provider_list
        self._by_size: dict[int, ort.InferenceSession] = {}
        self.feed: BatchFeed | None = None
        self.batch_difference = float("nan")  # set by warm_up
        self._session = self._open()
        try:
            self._check_and_open_sizes(settings, chosen)
        except BaseException:
            self.close()  # a half-built session frees its onnxruntime sessions (and threads) now
            raise

    def _check_and_open_sizes(self, settings: config.ModelSettings, chosen: list[str]) -> None:
        self.meta = self._known or signature.read_metadata(self._session, self.path)
        signature.check_signature(self._session, self.meta)
        self.provider = self._session.get_providers()[0]
        if self.provider != chosen[0]:
            explicit = tuple(settings.providers) != config.DEFAULT_PROVIDERS
            message = (
                f"{chosen[0]} was requested and is in this onnxruntime build but failed to initialise "
                f"(missing CUDA/cuDNN/TensorRT libraries or no GPU?); onnxruntime fell back to {self.provider}"
            )
            if explicit:
                raise ModelLoadError(message)
            log.warning("%s: %s", self.path, message)
        self._output = self.meta.output_name
        #: Batch size -> the session that runs batches padded to it (empty: one session, any size).
        # A graph with a batch of 1 runs every batch as chunks of one row, each bound (binding.py).
        self.padded_sizes = (1,) if self.meta.fixed_batch else padded_sizes(settings, self.provider)
        if self.cuda_graphs and self.provider != CUDA:
            raise CudaGraphSettingError(
                f"cuda_graphs: true needs the CUDA execution provider, and onnxruntime runs this model on {self.provider}"
            )
        if self.cuda_graphs and not self.padded_sizes:
            raise CudaGraphSettingError(
                "cuda_graphs: true needs padded batch sizes (a graph replays one input shape): "
                "set padded_batch_sizes to auto or a list of sizes"
            )
        for b in self.padded_sizes:  # one at a time, so that close() finds those already open
            self._by_size[b] = self._session if b == self.padded_sizes[-1] else self._open()
        try:
            self.feed = BatchFeed(
                self.meta, self._session, self._by_size, device=self.provider in GPU_PROVIDERS,
                capacity=self.padded_sizes[-1] if self.padded_sizes else settings.max_batch_size,
                pin=settings.pinned_memory,
                label=f"{self.path} instance {self.instance}",
            )  # fmt: skip
        except Exception as exc:  # onnxruntime's binding or device allocation failed
            raise ModelLoadError(
                f"binding {self.path}'s input and output failed: {_first_line(exc)}"
            ) from None
        log.info(
            "loaded %s instance %d on %s (%d intra-op threads, %s%s%s)",
            self.path,
            self.instance,
            self.provider,
            self.threads,
            "spinning" if self.spinning else "not spinning",
            f"; batches padded to {list(self.padded_sizes)}, one session each" if self.padded_sizes else "",
            "; CUDA graphs captured per padded size" if self.cuda_graphs else "",
        )

    def _open(self) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                str(self.path), sess_options=self._options, providers=self._provider_list
            )
        except Exception as exc:  # onnxruntime raises Fail/InvalidGraph/NoSuchFile/RuntimeError...
            raise ModelLoadError(f"onnxruntime cannot load {self.path}: {_first_line(exc)}") from None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The model's input rows (e.g. float32 (n, 3, H, W)) -> float32 (n, classes). Blocking."""
        return self.run_staged(self.stage([batch]))[: len(batch)]

    def stage(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """One batch's input from the requests' rows: gathered once, padded (:class:`BatchFeed`)."""
        return self.feed.stage(arrays)

    def run_staged(self, batch: np.ndarray) -> np.ndarray:
        """The output rows of a staged batch, padding rows included. Blocking; one thread at a time."""
        return self.feed.run(batch)

    def warm_up(self, max_batch_size: int) -> dict[int, float]:
        """Run batch 1, the largest batch and each padded size once (allocations, kernel choice, TensorRT engines).

        Also proves the output really is (n, classes) float32 and finite; returns seconds per batch size.
        Every batch starts with the same row, so :attr:`batch_difference` is how far that row's output
        in the largest batch is from its output alone, relative to the largest (NaN: nothing compared).
        """
        rng = np.random.default_rng(0)
        timings: dict[int, float] = {}
        first = example_batch(self.meta, 1, rng)
        outputs = {}
        if self.meta.fixed_batch:
            max_batch_size = 1
        for n in sorted({1, max_batch_size, *self.padded_sizes}):  # every padded size's session once
            x = np.concatenate([first, example_batch(self.meta, n - 1, rng)])
            start = time.perf_counter()
            try:
                for _ in range(CUDA_GRAPH_WARM_UP_RUNS if self.cuda_graphs else 1):
                    y = self.run(x)
            except Exception as exc:
                raise ModelLoadError(f"warm-up with a batch of {n} failed: {_first_line(exc)}") from None
            timings[n] = time.perf_counter() - start
            expected = (n, self.meta.row_width)
            if not isinstance(y, np.ndarray) or y.shape != expected or y.dtype != np.float32:
                got = getattr(y, "shape", None), getattr(y, "dtype", None)
                raise ModelLoadError(
                    f"warm-up with a batch of {n}: output '{self._output}' is {got}, expected float32 {expected} "
                    f"({self.meta.num_classes} labels in the metadata)"
                )
            if not np.isfinite(y[:, : self.meta.num_classes]).all():
                raise ModelLoadError(f"warm-up with a batch of {n}: the model produced non-finite logits")
            outputs[n] = y[0, : self.meta.num_classes].astype(np.float64)
        alone, batched = outputs[1], outputs[max(outputs)]
        self.batch_difference = float(np.abs(batched - alone).max() / max(np.abs(alone).max(), 1e-12))
        return timings

    def close(self) -> None:
        """Drop the sessions (onnxruntime frees each when the last reference goes) and the batch buffers."""
        if self.feed is not None:
            self.feed.close()
        self._session = None  # type: ignore[assignment]
        self._by_size = {}


def example_batch(meta: modelmeta.ModelMeta, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random rows of the model's input: standard normal values, or any pixels for uint8."""
    shape = (n, *meta.input_shape)
    if meta.input_dtype == "uint8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.standard_normal(shape, dtype=np.float32).astype(meta.input_dtype, copy=False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # onnxruntime prefixes "[ONNXRuntimeError] : 1 : FAIL : "; keep the useful part, one line.
    line = text.splitlines()[0]
    if "] : " in line and line.startswith("[ONNXRuntimeError]"):
        line = line.split(" : ", 3)[-1]
    if line.startswith("Load model from ") and " failed:" in line:
        line = line.split(" failed:", 1)[1].strip()
    return line


def load_instances(
    path: str | Path, settings: config.ModelSettings, cpu_budget: int = 0, trt_cache_dir: Path | None = None
) -> list[Session]:
    """Load and warm up ``settings.instances`` sessions of one model file (blocking).

    With ``cuda_graphs: true``, a model whose graph onnxruntime cannot capture (a node outside
    the CUDA provider, say) fails its load or warm-up; it is then loaded again without graphs,
    with a warning that says why, instead of not being served.
    """
    providers = resolve_providers(settings)
    threads = intra_op_threads(settings, cpu_budget)
    graphs = settings.cuda_graphs
    sessions: list[Session] = []
    try:
        for i in range(settings.instances):
            # The first session reads the file's metadata where its options need it; the others reuse it.
            options = {
                "providers": providers, "threads": threads, "instance": i, "trt_cache_dir": trt_cache_dir,
                "peeked": sessions[0].meta if sessions else None, "known": sessions[0].meta if sessions else None,
            }  # fmt: skip
            try:
                session, warmed = _open_warm(path, settings, graphs, options)
            except CudaGraphSettingError:
                raise
            except ModelLoadError as exc:
                if not graphs:
                    raise
                log.warning(
                    "%s: CUDA graphs are not possible for this model (%s); serving it without them", path, exc
                )
                graphs = False
                session, warmed = _open_warm(path, settings, graphs, options)
            sessions.append(session)
            log.info(
                "%s instance %d on %s: warm-up (kernels chosen, TensorRT engines built) took %s s per batch size",
                path, i, session.provider, {n: round(s, 3) for n, s in warmed.items()},
            )  # fmt: skip
    except BaseException:
        # A failed load keeps nothing: every session opened so far is closed, not left to the collector.
        for session in sessions:
            session.close()
        raise
    return sessions


def _open_warm(
    path: str | Path, settings: config.ModelSettings, cuda_graphs: bool, options: dict
) -> tuple[Session, dict[int, float]]:
    session = Session(path, settings, cuda_graphs=cuda_graphs, **options)
    try:
        return session, session.warm_up(settings.max_batch_size)
    except BaseException:
        session.close()
        raise

"""Server and per-model settings: frozen dataclasses, validated on construction.

Defaults are defined here once; the CLI, the Kubernetes manifests' consistency
test and the docs read them from here. Every ServerConfig field ``foo_bar`` is
the server flag ``--foo-bar`` and the environment variable ``SVERTKA_FOO_BAR``;
its help text, parser kind and argument name are the field's metadata
(``setting``), from which service.server_cli builds both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

from service import errors, layout

ENV_PREFIX = "SVERTKA_"

DEFAULT_HOST = "0.0.0.0"
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
DEFAULT_GRACE_PERIOD_S = 20.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_CONNECTION_AGE_S = 300.0
DEFAULT_MAX_CONNECTION_AGE_GRACE_S = 30.0
DEFAULT_MAX_QUEUE_DELAY_MS = 2.0
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE_SIZE = 256
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
#: Images decoded at full size (PNG, WebP, GIF, BMP, progressive JPEG) allocate 4-20 bytes per pixel
#: while decoding (docs/engine.md, "Costly images"). ``max_decoded_pixels: auto`` gives a model
#: AUTO_DECODED_PIXELS_PER_INPUT_PIXEL times its resize target squared (16x its side), within
#: [AUTO_DECODED_PIXELS_FLOOR, DEFAULT_MAX_DECODED_PIXELS]: a 32 px model takes 1024 x 1024,
#: a 224 px model (resize 256) 4096 x 4096. Pixels beyond what the model looks at are paid for in
#: decode time and memory and then thrown away by the resize.
DEFAULT_MAX_DECODED_PIXELS = 4096 * 4096
AUTO_DECODED_PIXELS_PER_INPUT_PIXEL = 256
AUTO_DECODED_PIXELS_FLOOR = 1024 * 1024


def auto_decoded_pixels(resize: int) -> int:
    """``max_decoded_pixels`` for ``auto``, from the model's resize target (shorter side, pixels)."""
    wanted = AUTO_DECODED_PIXELS_PER_INPUT_PIXEL * resize * resize
    return max(AUTO_DECODED_PIXELS_FLOOR, min(DEFAULT_MAX_DECODED_PIXELS, wanted))


DEFAULT_MAX_ROWS_PER_REQUEST = 64
#: Shared memory per frontend process (``--frontends`` > 1): 256 MiB holds 445 requests of one
#: 224x224 image in flight, or 7 of 64 images.
DEFAULT_FRONTEND_SHM_MIB = 256
MAX_FRONTENDS = 64
#: The latency SLO that the histogram buckets and alert rules are built around.
DEFAULT_LATENCY_SLO_S = 0.1

#: Health service name for the whole server (grpc.health.v1 convention).
SERVER_HEALTH_SERVICE = ""

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
DEFAULT_PROVIDERS = ("tensorrt", "cuda", "cpu")


#: Upper bounds of the per-model settings. Integers go into int32 fields of Triton's ModelConfig
#: (max_batch_size, preferred_batch_size, instance count) and onnxruntime's thread counts.
MAX_INT_SETTING = 2**31 - 1
MAX_INSTANCES = 64
MAX_INTRA_OP_THREADS = 1024
MAX_IMAGE_PIXELS_SETTING = 2**63 - 1
MAX_QUEUE_DELAY_MS = 3_600_000.0  # one hour


class ConfigError(ValueError):
    """A setting is invalid; the message names it and what was expected."""


def _given(value: object) -> str:
    """A configured value as a message quotes it: bounded repr and its YAML/JSON-level type."""
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}.get(
        type(value), type(value).__name__
    )
    return f"{errors.shown(value)} ({kind})"


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(settings: object, name: str, low: int, high: int) -> None:
    """An integer setting (not a bool, a float or a string) within [low, high]; stored as an int."""
    value = getattr(settings, name)
    if not _is_int(value) or not low <= value <= high:
        raise ConfigError(f"{name}: expected an integer from {low} to {high}, got {_given(value)}")
    object.__setattr__(settings, name, int(value))


def _check_number(settings: object, name: str, low: float, high: float) -> None:
    """A finite number setting (an integer or a float, not a bool or a string) within [low, high]."""
    value = getattr(settings, name)
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise ConfigError(f"{name}: expected a finite number from {low:g} to {high:g}, got {_given(value)}")
    object.__setattr__(settings, name, float(value))


def _check_sizes(settings: Any, name: str, *, allow_auto: bool) -> None:
    """A list of batch sizes, each an integer from 1 to max_batch_size; stored as a tuple."""
    sizes = getattr(settings, name)
    limit = settings.max_batch_size
    what = "auto or a list of batch sizes" if allow_auto else "a list of batch sizes"
    if isinstance(sizes, str) or not isinstance(sizes, list | tuple) or not all(_is_int(b) for b in sizes):
        raise ConfigError(f"{name}: expected {what} (integers from 1 to {limit}), got {_given(sizes)}")
    bad = [b for b in sizes if not 1 <= b <= limit]
    if bad:
        raise ConfigError(f"{name}: expected values in [1, {limit}], got {bad}")
    object.__setattr__(settings, name, tuple(int(b) for b in sizes))


def default_intra_op_threads() -> int:
    """Threads for onnxruntime: the CPUs this process may use (cgroup/affinity aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _bound(n: int) -> str:
    """An upper bound as the settings table writes it: 2^31-1, 3,600,000, 1024."""
    if n > 10**6 and (n + 1) & n == 0:
        return f"2^{n.bit_length()}-1"
    return f"{n:,}"


def model_setting(default: Any, accepted: str, *, default_note: str = "") -> Any:
    """A ModelSettings field, with its row of the settings table (``settings_table``).

    ``accepted``: what the setting takes, as the table's third column says it; ``default_note``
    follows the default in parentheses (alone when the default is None).
    """
    return dataclasses.field(default=default, metadata={"accepted": accepted, "default_note": default_note})


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Per-model settings, from ``<repo>/<model>/config.yaml|json`` or defaults.

    Each field is one ``config.yaml`` key; docs/engine.md's table of them is ``settings_table()``
    (``python -m service.config --table``), checked by tests/core/test_config.py.
    """

    max_batch_size: int = model_setting(DEFAULT_MAX_BATCH_SIZE, f"integer 1 .. {_bound(MAX_INT_SETTING)}")
    max_queue_delay_ms: float = model_setting(
        DEFAULT_MAX_QUEUE_DELAY_MS, f"finite number 0 .. {_bound(int(MAX_QUEUE_DELAY_MS))}"
    )
    preferred_batch_sizes: tuple[int, ...] = model_setting((), "list of integers 1 .. `max_batch_size`")
    #: Batches are padded up to the next of these sizes, each of which gets its own onnxruntime
    #: session, so that no session ever sees a new input shape (service.engine.runtime.padded_sizes).
    #: "auto": powers of two up to max_batch_size, with the CUDA provider only; [] : never.
    padded_batch_sizes: tuple[int, ...] | str = model_setting(
        "auto", "`auto` or a list of integers 1 .. `max_batch_size` (Runtime, above)"
    )
    #: Each padded size's session captures a CUDA graph at warm-up and replays it for every batch
    #: (the CUDA provider only; needs padded sizes). Off unless asked for.
    cuda_graphs: bool = model_setting(
        False, "`true` or `false`; `true` needs padded sizes and the CUDA provider (Runtime, above)"
    )
    #: GPU providers: the instance's batch buffer is page-locked, so a batch goes to the GPU as one
    #: DMA (service.engine.pinned). false copies from pageable memory (for comparison).
    pinned_memory: bool = model_setting(
        True, "`true` or `false`: page-lock each instance's batch buffer on a GPU provider (Runtime, above)"
    )
    max_queue_size: int = model_setting(
        DEFAULT_MAX_QUEUE_SIZE, f"integer 1 .. {_bound(MAX_INT_SETTING)} (rows)"
    )
    instances: int = model_setting(1, f"integer 1 .. {MAX_INSTANCES}")
    providers: tuple[str, ...] = model_setting(
        DEFAULT_PROVIDERS, "non-empty list from " + ", ".join(f"`{p}`" for p in PROVIDER_NAMES)
    )
    intra_op_threads: int = model_setting(  # 0: the server's CPU budget divided among instances
        0, f"integer 0 .. {MAX_INTRA_OP_THREADS}", default_note="the CPU budget ÷ instances"
    )
    #: Whether idle onnxruntime worker threads spin-wait (true), sleep (false), or "auto":
    #: decided from the model's input size (service.engine.runtime.spinning).
    intra_op_spinning: bool | str = model_setting("auto", "`true`, `false` or `auto`")
    max_image_pixels: int = model_setting(
        DEFAULT_MAX_IMAGE_PIXELS, f"integer 1 .. {_bound(MAX_IMAGE_PIXELS_SETTING)}"
    )
    #: The pixel limit for images decoded at full size: all but single-scan sequential JPEGs, which are
    #: decoded downscaled and get max_image_pixels (service.preprocess, service.imagescan).
    #: "auto": from the model's input size (auto_decoded_pixels); or an integer.
    max_decoded_pixels: int | str = model_setting(
        "auto",
        f"`auto` or an integer 1 .. {_bound(MAX_IMAGE_PIXELS_SETTING)}: the pixel limit for images decoded "
        'at full size (PNG, WebP, GIF, BMP, progressive JPEG; Preprocessing, "Costly images")',
        default_note=f"{AUTO_DECODED_PIXELS_PER_INPUT_PIXEL} × resize², within "
        f"{math.isqrt(AUTO_DECODED_PIXELS_FLOOR)}×{math.isqrt(AUTO_DECODED_PIXELS_FLOOR)} .. "
        f"{math.isqrt(DEFAULT_MAX_DECODED_PIXELS)}×{math.isqrt(DEFAULT_MAX_DECODED_PIXELS)}",
    )
    max_rows_per_request: int = model_setting(
        DEFAULT_MAX_ROWS_PER_REQUEST,
        f"integer 1 .. {_bound(MAX_INT_SETTING)} (a tensor-API request in typed `bytes_contents` holds at "
        "most about 4,000 images whatever this says: every request is refused unparsed beyond 4,096 "
        "protobuf fields; raw BYTES and FP32 are not limited by it)",
    )
    version: int | None = model_setting(  # serve this version instead of the newest
        None, f"integer 1 .. {_bound(layout.MAX_VERSION)}", default_note="newest"
    )
    #: Refuse FP32 tensor requests holding NaN or +-Inf (INVALID_ARGUMENT). Off by default, as in
    #: Triton, which computes whatever it is sent (perf_analyzer's default random data included).
    reject_non_finite_inputs: bool = model_setting(
        False, "`true` or `false`: refuse FP32 tensors holding NaN/Inf (Request path)"
    )

    def __post_init__(self) -> None:
        _check_int(self, "max_batch_size", 1, MAX_INT_SETTING)
        _check_number(self, "max_queue_delay_ms", 0.0, MAX_QUEUE_DELAY_MS)
        _check_sizes(self, "preferred_batch_sizes", allow_auto=False)
        if self.padded_batch_sizes != "auto":
            _check_sizes(self, "padded_batch_sizes", allow_auto=True)
            object.__setattr__(self, "padded_batch_sizes", tuple(sorted(set(self.padded_batch_sizes))))
        for flag in ("cuda_graphs", "pinned_memory"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag}: expected true or false, got {_given(getattr(self, flag))}")
        if self.cuda_graphs and self.padded_batch_sizes == ():
            raise ConfigError(
                "cuda_graphs: true needs padded batch sizes (a graph replays one input shape); "
                "padded_batch_sizes is [] (use auto or a list of sizes)"
            )
        _check_int(self, "max_queue_size", 1, MAX_INT_SETTING)
        _check_int(self, "instances", 1, MAX_INSTANCES)
        providers = self.providers
        if (
            isinstance(providers, str)
            or not isinstance(providers, list | tuple)
            or not all(isinstance(p, str) for p in providers)
        ):
            raise ConfigError(
                f"providers: expected a list of provider names from {sorted(PROVIDER_NAMES)}, got {_given(providers)}"
            )
        object.__setattr__(self, "providers", tuple(p.lower() for p in providers))
        unknown = [p for p in self.providers if p not in PROVIDER_NAMES]
        if unknown or not self.providers:
            raise ConfigError(
                f"providers: expected a non-empty list from {sorted(PROVIDER_NAMES)}, got {list(self.providers)}"
            )
        _check_int(self, "intra_op_threads", 0, MAX_INTRA_OP_THREADS)
        if not (isinstance(self.intra_op_spinning, bool) or self.intra_op_spinning == "auto"):
            raise ConfigError(
                f"intra_op_spinning: expected true, false or auto, got {_given(self.intra_op_spinning)}"
            )
        _check_int(self, "max_image_pixels", 1, MAX_IMAGE_PIXELS_SETTING)
        if self.max_decoded_pixels != "auto":
            if (
                not _is_int(self.max_decoded_pixels)
                or not 1 <= self.max_decoded_pixels <= MAX_IMAGE_PIXELS_SETTING
            ):
                raise ConfigError(
                    f"max_decoded_pixels: expected auto or an integer from 1 to {MAX_IMAGE_PIXELS_SETTING}, "
                    f"got {_given(self.max_decoded_pixels)}"
                )
            object.__setattr__(self, "max_decoded_pixels", int(self.max_decoded_pixels))
        _check_int(self, "max_rows_per_request", 1, MAX_INT_SETTING)
        if self.version is not None:
            _check_int(self, "version", 1, layout.MAX_VERSION)
        if not isinstance(self.reject_non_finite_inputs, bool):
            raise ConfigError(
                f"reject_non_finite_inputs: expected true or false, got {_given(self.reject_non_finite_inputs)}"
            )

    def decoded_pixels(self, resize: int) -> int:
        """The pixel limit for images decoded at full size, for a model with this resize target."""
        if self.max_decoded_pixels == "auto":
            return auto_decoded_pixels(resize)
        return int(self.max_decoded_pixels)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "config") -> ModelSettings:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((key for key in data if key not in known), key=str)  # YAML keys may be any type
        if unknown:
            shown = ", ".join(errors.shown(key) for key in unknown[:10])
            raise ConfigError(f"{source}: unknown settings [{shown}]; known: {sorted(known)}")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, model_dir: Path) -> ModelSettings:
        """Read ``config.yaml``/``config.yml``/``config.json`` in a model directory, if any."""
        for name in layout.CONFIG_FILES:
            path = Path(model_dir) / name
            if not path.is_file():
                continue
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}: cannot read ({exc})") from None
            try:
                if name.endswith(".json"):
                    data = json.loads(text)
                else:
                    import yaml

                    data = yaml.safe_load(text)
            except Exception as exc:
                raise ConfigError(f"{path}: cannot parse ({exc})") from None
            return cls.from_mapping(data or {}, source=str(path))
        return cls()


def _shown_default(field: dataclasses.Field) -> str:
    """A default as config.yaml would spell it: `true`, `auto`, `[tensorrt, cuda, cpu]`, 40,000,000, 2."""
    value, note = field.default, field.metadata["default_note"]
    if value is None:
        return note
    if isinstance(value, bool):
        shown = f"`{str(value).lower()}`"
    elif isinstance(value, str):
        shown = f"`{value}`"
    elif isinstance(value, tuple):
        shown = f"`[{', '.join(map(str, value))}]`"
    elif isinstance(value, float):
        shown = f"{value:,g}"
    else:
        shown = f"{value:,}"
    return f"{shown} ({note})" if note else shown


def settings_table() -> str:
    """docs/engine.md's table of the ``config.yaml`` keys, one row per ModelSettings field."""
    fields = dataclasses.fields(ModelSettings)
    missing = [f.name for f in fields if "accepted" not in f.metadata]
    if missing:  # a field added without model_setting(...)
        raise TypeError(f"ModelSettings fields without a model_setting(...): {missing}")
    rows = [f"| `{f.name}` | {_shown_default(f)} | {f.metadata['accepted']} |" for f in fields]
    return "\n".join(["| setting | default | accepted |", "|---|---|---|", *rows]) + "\n"


#: How a server setting's text (a flag's argument, an ``SVERTKA_*`` value) becomes its value.
SETTING_KINDS = ("str", "int", "float", "bool", "path")


def setting(kind: str, help: str, *, default: Any = dataclasses.MISSING, metavar: str | None = None) -> Any:
    """A ServerConfig field that is also the flag ``--foo-bar`` and the variable ``SVERTKA_FOO_BAR``.

    ``kind`` (one of SETTING_KINDS) parses its text, ``help`` is the flag's help,
    ``metavar`` names the flag's argument (none for a "bool": it is ``--foo``/``--no-foo``).
    """
    if kind not in SETTING_KINDS or (metavar is None) != (kind == "bool"):
        raise TypeError(f"setting: kind {kind!r} with metavar {metavar!r}")
    return dataclasses.field(default=default, metadata={"kind": kind, "help": help, "metavar": metavar})


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Process-wide settings, built in ``main`` from flags and ``SVERTKA_*`` variables.

    Each field is one flag and one variable (``setting``); their order is the order of ``--help``.
    """

    model_repository: Path = setting(
        "path", "model repository: <dir>/<model>/<version>/model.onnx", metavar="PATH"
    )
    host: str = setting(
        "str", f"address to listen on (default {DEFAULT_HOST})", default=DEFAULT_HOST, metavar="HOST"
    )
    grpc_port: int = setting(
        "int",
        f"gRPC port; 0 picks a free one (default {DEFAULT_GRPC_PORT})",
        default=DEFAULT_GRPC_PORT,
        metavar="PORT",
    )
    metrics_port: int = setting(
        "int",
        f"Prometheus /metrics port; 0 picks a free one (default {DEFAULT_METRICS_PORT})",
        default=DEFAULT_METRICS_PORT,
        metavar="PORT",
    )
    #: Address the metrics port listens on; "" (the default): the same as ``host``.
    metrics_host: str = setting(
        "str",
        "address the metrics port listens on, e.g. 127.0.0.1 to keep it off other interfaces "
        "(default: the same as --host)",
        default="",
        metavar="HOST",
    )
    grace_period_s: float = setting(
        "float",
        "on SIGTERM/SIGINT, seconds to finish accepted requests before exiting "
        f"(default {DEFAULT_GRACE_PERIOD_S:g})",
        default=DEFAULT_GRACE_PERIOD_S,
        metavar="SECONDS",
    )
    max_message_bytes: int = setting(
        "int",
        f"largest request/response message in bytes (default {DEFAULT_MAX_MESSAGE_BYTES})",
        default=DEFAULT_MAX_MESSAGE_BYTES,
        metavar="BYTES",
    )
    max_connection_age_s: float = setting(
        "float",
        "close client connections after this many seconds so clients rebalance across replicas; "
        f"0 disables (default {DEFAULT_MAX_CONNECTION_AGE_S:g})",
        default=DEFAULT_MAX_CONNECTION_AGE_S,
        metavar="SECONDS",
    )
    max_connection_age_grace_s: float = setting(
        "float",
        f"time an aged connection gets to finish its calls (default {DEFAULT_MAX_CONNECTION_AGE_GRACE_S:g})",
        default=DEFAULT_MAX_CONNECTION_AGE_GRACE_S,
        metavar="SECONDS",
    )
    trt_cache_dir: Path | None = setting(
        "path",
        "where TensorRT keeps the engines it builds, so a restart does not build them again "
        "(default: svertka-trt-cache in the temporary directory; in a container, a volume)",
        default=None,
        metavar="DIR",
    )
    repository_poll_s: float = setting(  # 0: no polling
        "float",
        "poll the repository for new/removed versions every N seconds; 0 disables",
        default=0.0,
        metavar="SECONDS",
    )
    enable_model_control: bool = setting(
        "bool", "allow RepositoryModelLoad/Unload (off by default)", default=False
    )
    #: Triton's system shared memory extension for same-host clients (service/shm.py).
    allow_shared_memory: bool = setting(
        "bool",
        "let same-host clients pass tensors in system shared memory regions (/dev/shm; off by default: "
        "any process that can write the client's regions can feed this server)",
        default=False,
    )
    log_format: str = setting("str", "text or json (default text)", default="text", metavar="{text,json}")
    log_level: str = setting(
        "str", "debug, info, warning, error (default info)", default="info", metavar="LEVEL"
    )
    access_log: bool = setting("bool", "log one line per request at INFO", default=False)
    tls_cert: Path | None = setting(
        "path", "PEM certificate chain: serve gRPC over TLS (with --tls-key)", default=None, metavar="PATH"
    )
    tls_key: Path | None = setting("path", "PEM private key for --tls-cert", default=None, metavar="PATH")
    tls_client_ca: Path | None = setting(
        "path",
        "PEM CA bundle: require client certificates signed by it (mutual TLS)",
        default=None,
        metavar="PATH",
    )
    #: CPU threads for onnxruntime and decoding; 0: the CPUs this process may run on.
    #: In a container set it to the CPU limit (the affinity mask shows the whole node).
    intra_op_threads: int = setting(
        "int",
        "CPU threads for onnxruntime and image decoding; 0: the CPUs this process may use "
        "(in a container, set it to the CPU limit)",
        default=0,
        metavar="N",
    )
    auth_token_file: Path | None = setting(
        "path",
        "file holding a bearer token that both APIs require (health and reflection stay open)",
        default=None,
        metavar="PATH",
    )
    #: int after validation, or "auto" (service.supervisor.frontend_count decides).
    frontends: int | str = setting(
        "str",
        "gRPC frontend processes in front of one engine process (tensors pass through shared "
        "memory); 1: one process, no IPC; auto: the count measured fastest for the host, 1 on every "
        "host measured so far (docs/engine.md, Processes) (default auto)",
        default="auto",
        metavar="N",
    )
    frontend_shm_mib: int = setting(
        "int",
        f"shared memory per frontend process for the rows of requests in flight, MiB "
        f"(default {DEFAULT_FRONTEND_SHM_MIB}; /dev/shm must hold frontends x this)",
        default=DEFAULT_FRONTEND_SHM_MIB,
        metavar="MIB",
    )
    image_decoder: str = setting(
        "str",
        "who decodes RGB and grey JPEGs: cpu (libjpeg-turbo, downscaled while decoding), or gpu "
        "(nvImageCodec, full size; PNG and the rest stay on the CPU; start-up fails if it cannot "
        "work here) (default cpu)",
        default="cpu",
        metavar="cpu|gpu",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_repository", Path(self.model_repository))
        if self.image_decoder not in ("cpu", "gpu"):
            raise ConfigError(f"image_decoder: expected cpu or gpu, got {self.image_decoder!r}")
        if self.intra_op_threads < 0:
            raise ConfigError(f"intra_op_threads: expected >= 0, got {self.intra_op_threads}")
        for port_name in ("grpc_port", "metrics_port"):
            port = getattr(self, port_name)
            if not 0 <= int(port) <= 65535:
                raise ConfigError(f"{port_name}: expected 0..65535, got {port}")
        if self.grace_period_s < 0:
            raise ConfigError(f"grace_period_s: expected >= 0, got {self.grace_period_s}")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes: expected >= 1024, got {self.max_message_bytes}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format: expected 'text' or 'json', got {self.log_format!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca: needs tls_cert and tls_key")
        frontends = self.frontends
        if isinstance(frontends, str) and frontends.strip().isdigit():
            frontends = int(frontends)
        if frontends != "auto" and not (_is_int(frontends) and 1 <= frontends <= MAX_FRONTENDS):
            raise ConfigError(
                f"frontends: expected auto or an integer from 1 to {MAX_FRONTENDS}, got {frontends!r}"
            )
        object.__setattr__(self, "frontends", frontends)
        if not (_is_int(self.frontend_shm_mib) and 16 <= self.frontend_shm_mib <= 1 << 20):
            raise ConfigError(
                f"frontend_shm_mib: expected an integer from 16 to {1 << 20}, got {self.frontend_shm_mib!r}"
            )


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m service.config", description="Print what service.config defines, for the docs."
    )
    parser.add_argument(
        "--table", action="store_true", required=True, help="the config.yaml settings table (docs/engine.md)"
    )
    parser.parse_args(argv)
    print(settings_table(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

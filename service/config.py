"""Server and per-model settings: frozen dataclasses, validated on construction.

Defaults are defined here once; the CLI, the Kubernetes manifests' consistency
test and the docs read them from here. Every server flag ``--foo-bar`` can also
be set as the environment variable ``SVERTKA_FOO_BAR``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

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
DEFAULT_MAX_ROWS_PER_REQUEST = 64
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


class ConfigError(ValueError):
    """A setting is invalid; the message names it and what was expected."""


def default_intra_op_threads() -> int:
    """Threads for onnxruntime: the CPUs this process may use (cgroup/affinity aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Per-model settings, from ``<repo>/<model>/config.yaml|json`` or defaults."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue_delay_ms: float = DEFAULT_MAX_QUEUE_DELAY_MS
    preferred_batch_sizes: tuple[int, ...] = ()
    #: Batches are padded up to the next of these sizes, each of which gets its own onnxruntime
    #: session, so that no session ever sees a new input shape (service.runtime.padded_sizes).
    #: "auto": powers of two up to max_batch_size, with the CUDA provider only; [] : never.
    padded_batch_sizes: tuple[int, ...] | str = "auto"
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    instances: int = 1
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    intra_op_threads: int = 0  # 0: the server's CPU budget divided among instances
    #: Whether idle onnxruntime worker threads spin-wait (true), sleep (false), or "auto":
    #: decided from the model's input size (service.runtime.spinning).
    intra_op_spinning: bool | str = "auto"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_rows_per_request: int = DEFAULT_MAX_ROWS_PER_REQUEST
    version: int | None = None  # serve this version instead of the newest

    def _check_batch_sizes(self, name: str, sizes: tuple[int, ...]) -> None:
        bad = [b for b in sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ConfigError(f"{name}: expected values in [1, {self.max_batch_size}], got {bad}")

    def __post_init__(self) -> None:
        object.__setattr__(self, "preferred_batch_sizes", tuple(int(x) for x in self.preferred_batch_sizes))
        object.__setattr__(self, "providers", tuple(str(p).lower() for p in self.providers))
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size: expected >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_ms < 0:
            raise ConfigError(f"max_queue_delay_ms: expected >= 0, got {self.max_queue_delay_ms}")
        self._check_batch_sizes("preferred_batch_sizes", self.preferred_batch_sizes)
        if self.padded_batch_sizes != "auto":
            if isinstance(self.padded_batch_sizes, str | int) or not all(
                isinstance(b, int) and not isinstance(b, bool) for b in self.padded_batch_sizes
            ):
                raise ConfigError(
                    f"padded_batch_sizes: expected auto or a list of batch sizes, got {self.padded_batch_sizes!r}"
                )
            object.__setattr__(self, "padded_batch_sizes", tuple(sorted(set(self.padded_batch_sizes))))
            self._check_batch_sizes("padded_batch_sizes", self.padded_batch_sizes)
        if self.max_queue_size < 1:
            raise ConfigError(f"max_queue_size: expected >= 1, got {self.max_queue_size}")
        if self.instances < 1:
            raise ConfigError(f"instances: expected >= 1, got {self.instances}")
        unknown = [p for p in self.providers if p not in PROVIDER_NAMES]
        if unknown or not self.providers:
            raise ConfigError(
                f"providers: expected a non-empty list from {sorted(PROVIDER_NAMES)}, got {list(self.providers)}"
            )
        if self.intra_op_threads < 0:
            raise ConfigError(f"intra_op_threads: expected >= 0, got {self.intra_op_threads}")
        if not (isinstance(self.intra_op_spinning, bool) or self.intra_op_spinning == "auto"):
            raise ConfigError(
                f"intra_op_spinning: expected true, false or auto, got {self.intra_op_spinning!r}"
            )
        if self.max_image_pixels < 1:
            raise ConfigError(f"max_image_pixels: expected >= 1, got {self.max_image_pixels}")
        if self.max_rows_per_request < 1:
            raise ConfigError(f"max_rows_per_request: expected >= 1, got {self.max_rows_per_request}")
        if self.version is not None and self.version < 1:
            raise ConfigError(f"version: expected >= 1, got {self.version}")

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "config") -> ModelSettings:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown settings {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, model_dir: Path) -> ModelSettings:
        """Read ``config.yaml``/``config.yml``/``config.json`` in a model directory, if any."""
        for name in ("config.yaml", "config.yml", "config.json"):
            path = Path(model_dir) / name
            if not path.is_file():
                continue
            text = path.read_text()
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


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Process-wide settings, built in ``main`` from flags and ``SVERTKA_*`` variables."""

    model_repository: Path
    host: str = DEFAULT_HOST
    grpc_port: int = DEFAULT_GRPC_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    grace_period_s: float = DEFAULT_GRACE_PERIOD_S
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_connection_age_s: float = DEFAULT_MAX_CONNECTION_AGE_S
    max_connection_age_grace_s: float = DEFAULT_MAX_CONNECTION_AGE_GRACE_S
    repository_poll_s: float = 0.0  # 0: no polling
    enable_model_control: bool = False
    #: Triton's system shared memory extension for same-host clients (service/shm.py).
    allow_shared_memory: bool = False
    log_format: str = "text"
    log_level: str = "info"
    access_log: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None
    #: CPU threads for onnxruntime and decoding; 0: the CPUs this process may run on.
    #: In a container set it to the CPU limit (the affinity mask shows the whole node).
    intra_op_threads: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_repository", Path(self.model_repository))
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

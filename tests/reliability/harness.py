"""What the reliability tests share: servers in subprocesses, request builders, metrics and stats readers.

Servers run as real ``svertka serve`` processes (bench/target.py's ServerProcess) so
that signals, resident memory and exit codes are the real ones, and clients
are our own generated stubs over real loopback channels.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.target import ServerProcess
from service.gen.inference import grpc_service_pb2 as kpb
from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from tests.helpers import ROOT
from tests.helpers.layouts import LAYOUTS, layout_args  # noqa: F401  (the tests import them from here)

#: The bundled default model, built by ``make model`` (SVERTKA_RELIABILITY_MODELS: another repository
#: holding a ``digits`` model, e.g. one built with ``svertka build-default --repository DIR``).
DEFAULT_REPOSITORY = Path(os.environ.get("SVERTKA_RELIABILITY_MODELS", ROOT / "models"))
DEFAULT_MODEL = "digits"


def default_model_path() -> Path:
    return DEFAULT_REPOSITORY / DEFAULT_MODEL / "1" / "model.onnx"


def tree_rss(pid: int) -> int:
    """Resident bytes of a server: its process and every process it started (engine, frontends)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


def rss_mb(server: ServerProcess) -> float:
    """``tree_rss`` of a running server, MiB."""
    return tree_rss(server.proc.pid) / 2**20


@contextlib.contextmanager
def running_server(
    repository: Path, log_path: Path, *args: str, wait_serving: bool = True
) -> Iterator[ServerProcess]:
    """A ``svertka serve`` subprocess on loopback; always stopped (SIGTERM, then SIGKILL) afterwards."""
    server = ServerProcess(repository, log_path, *args)
    try:
        server.start()
        if wait_serving:
            server.wait_serving()
        yield server
    finally:
        server.stop(timeout_s=30)


def tensor_request(
    x: np.ndarray | None = None,
    *,
    model: str = "tiny",
    version: str = "",
    rid: str = "",
    size: int = 32,
) -> kpb.ModelInferRequest:
    """A raw FP32 ModelInfer request (a [1,3,size,size] tensor of 0.5 unless ``x`` is given)."""
    if x is None:
        x = np.full((1, 3, size, size), 0.5, np.float32)
    request = kpb.ModelInferRequest(model_name=model, model_version=version, id=rid)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, "<f4").tobytes())
    return request


def logits_of(response: kpb.ModelInferResponse) -> np.ndarray:
    (out,) = response.outputs
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(out.shape))


def offline_logits(model_path: Path, x: np.ndarray) -> np.ndarray:
    """Direct onnxruntime on the file, one row at a time: the reference answers."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: row[None]})[0] for row in x])


def model_stats(channel: grpc.Channel, name: str, version: str = "") -> kpb.ModelStatistics:
    stub = kgrpc.GRPCInferenceServiceStub(channel)
    response = stub.ModelStatistics(kpb.ModelStatisticsRequest(name=name, version=version), timeout=10)
    (stats,) = response.model_stats
    return stats


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, keyed by (sample name, sorted labels)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape(metrics_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on a server's /metrics page (see ``samples_of``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        return samples_of(reply.read().decode())


def sample(samples: dict, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(predicate, *, timeout_s: float = 30.0, interval_s: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; that value, or TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s} s")
        time.sleep(interval_s)


def json_log_records(log_text: str) -> list[dict]:
    """The JSON lines of a server log started with ``--log-format json``."""
    records = []
    for line in log_text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if values else float("nan")


#: Where the tests write the figures they measured (docs/reliability.md quotes them).
FIGURES_DIR = ROOT / "build" / "reliability"


def record_figures(name: str, **figures) -> None:
    """Print the measured figures and keep them in build/reliability/<name>.json."""
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    (FIGURES_DIR / f"{name}.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(f"\n[reliability] {name}: " + json.dumps(figures, sort_keys=True))

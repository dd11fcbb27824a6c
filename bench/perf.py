"""Triton's perf_analyzer (C++) in closed loop against any ``inference.GRPCInferenceService``.

One perf_analyzer process per concurrency level: on a shared, noisy machine a
level whose windows never agree within the stability threshold would
otherwise abort the whole sweep. Such a level is retried once with a looser
threshold and, if it still does not settle, recorded as unstable (no number).
Its CSV (``-f``) is parsed; its server-side columns come from the server's own
ModelStatistics.
"""

from __future__ import annotations

import csv
import dataclasses
import subprocess
from pathlib import Path

from bench import cpu, modelstats
from service.perf_cli import environment, perf_analyzer_path  # as ``svertka perf`` runs it


@dataclasses.dataclass(frozen=True)
class PerfSettings:
    measurement_interval_ms: int = 3000
    stability_percentage: int = 20
    max_trials: int = 6


#: perf_analyzer's per-request stage columns (means, microseconds); the server ones come from ModelStatistics.
BREAKDOWN_COLUMNS = (
    "Client Send",
    "Network+Server Send/Recv",
    "Server Queue",
    "Server Compute Input",
    "Server Compute Infer",
    "Server Compute Output",
    "Client Recv",
)


@dataclasses.dataclass
class PerfPoint:
    """One concurrency level; latencies in ms; ``batches`` maps batch size to batches executed."""

    concurrency: int
    images_per_s: float | None
    latency_ms: dict[str, float]
    breakdown_us: dict[str, float]  # perf_analyzer's mean time per stage, microseconds
    batches: dict[int, int]
    stable: bool
    command: str
    error: str = ""
    #: CPU the measured run cost (``bench.cpu.CpuUse`` fields), when the server's pid was given.
    cpu: dict | None = None


def version() -> str:
    out = subprocess.run(
        [str(perf_analyzer_path()), "--version"], capture_output=True, text=True, env=environment()
    )
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if "Version" in ln]
    return lines[0].strip() if lines else "perf_analyzer (version unknown)"


def parse_csv(path: Path) -> dict[str, float]:
    """The single data row of perf_analyzer's ``-f`` CSV as {column: value}."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != 1:
        raise ValueError(f"{path}: expected one data row, got {len(rows)}")
    return {k.strip(): float(v) for k, v in rows[0].items() if k and v not in (None, "")}


def input_data_file(url: str, model: str, workdir: Path, *, seed: int = 0) -> Path:
    """A perf_analyzer ``--input-data`` JSON file: one standard-normal image (random pixels for a
    UINT8 model), the same for every server.

    perf_analyzer's default random data is random *bytes*, which as FP32 include
    NaN and infinities; svertka rejects non-finite inputs (INVALID_ARGUMENT)
    where Triton passes them on, so both get this finite tensor instead.
    """
    import json

    import numpy as np

    name, shape, datatype = modelstats.model_input(url, model)
    path = workdir / f"input-{model}-{datatype}-{'x'.join(map(str, shape))}.json"
    if not path.is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        if datatype == "UINT8":  # a model that takes pixels
            content = rng.integers(0, 256, int(np.prod(shape))).tolist()
        else:
            content = [round(float(v), 4) for v in rng.standard_normal(int(np.prod(shape)), dtype=np.float32)]
        path.write_text(json.dumps({"data": [{name: {"content": content, "shape": shape}}]}))
    return path


def run_level(
    url: str,
    model: str,
    concurrency: int,
    settings: PerfSettings,
    workdir: Path,
    *,
    shared_memory: bool = False,
    streaming: bool = False,
    server_pid: int | None = None,
) -> PerfPoint:
    """One closed-loop measurement at ``concurrency`` (synchronous gRPC, batch 1 per request).

    ``shared_memory``: tensors travel through system shared memory regions
    (``--shared-memory system``), not in the gRPC messages. ``streaming``: the
    requests go over one bidirectional ModelStreamInfer stream per client thread
    (``--streaming``) instead of one unary call each. ``server_pid``: also
    meter the CPU time of the server's process tree and of perf_analyzer over
    the run (``bench.cpu``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    suffix = ("-shm" if shared_memory else "") + ("-stream" if streaming else "")
    csv_path = workdir / f"{model}-c{concurrency}{suffix}.csv"
    data = input_data_file(url, model, workdir)
    error = ""
    for stability in (settings.stability_percentage, settings.stability_percentage * 2):
        csv_path.unlink(missing_ok=True)
        cmd = [
            str(perf_analyzer_path()), "-i", "grpc", "-u", url, "-m", model, "-b", "1",
            "--concurrency-range", str(concurrency), "--input-data", str(data),
            "--measurement-interval", str(settings.measurement_interval_ms),
            "--stability-percentage", str(stability), "--max-trials", str(settings.max_trials),
            "-f", str(csv_path), *(["--shared-memory", "system"] if shared_memory else []),
            *(["--streaming"] if streaming else []),
        ]  # fmt: skip
        span = cpu.Span(url, model, server_pid, "children")
        result = subprocess.run(cmd, capture_output=True, text=True, env=environment())
        batches, use = span.stop()
        shown = " ".join(["perf_analyzer", *cmd[1:]])
        if result.returncode == 0 and csv_path.is_file():
            row = parse_csv(csv_path)
            return PerfPoint(
                concurrency=concurrency,
                images_per_s=row["Inferences/Second"],
                latency_ms={p: row[f"{p} latency"] / 1e3 for p in ("p50", "p90", "p95", "p99")},
                breakdown_us={k: row[k] for k in BREAKDOWN_COLUMNS if k in row},
                batches=batches,
                stable=True,
                command=shown,
                cpu=dataclasses.asdict(use) if use else None,
            )
        error = (result.stdout + result.stderr).strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        error = error[0]
    return PerfPoint(concurrency, None, {}, {}, {}, stable=False, command=shown, error=error)


def sweep(
    url: str,
    model: str,
    concurrencies: list[int],
    settings: PerfSettings,
    workdir: Path,
    log=print,
    *,
    shared_memory: bool = False,
    streaming: bool = False,
    server_pid: int | None = None,
) -> list[PerfPoint]:
    points = []
    for c in concurrencies:
        point = run_level(url, model, c, settings, workdir, shared_memory=shared_memory, streaming=streaming,
                          server_pid=server_pid)  # fmt: skip
        if point.stable:
            log(f"  c={c:2d}: {point.images_per_s:7.1f} img/s  p50 {point.latency_ms['p50']:6.1f} ms  "
                f"p99 {point.latency_ms['p99']:6.1f} ms  mean batch {modelstats.mean_batch_size(point.batches):.2f}")  # fmt: skip
        else:
            log(f"  c={c:2d}: no stable measurement ({point.error})")
        points.append(point)
    return points

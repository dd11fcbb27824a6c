"""What a ModelInfer request costs in the gRPC stack itself: gRPC Python's asyncio and threaded servers, and C++.

Backs findings 14, 22 and 26 in bench/findings.md (docs/benchmarks.md, "Findings"):
the floor that the gRPC stack alone puts under any frontend and under the
concurrency-1 target.

svertka's frontend is ``grpc.aio``. The null model (``bench/run.py:
bench_frontend``) shows its floor; this experiment asks how much of that floor
belongs to the gRPC Python stack rather than to svertka. It starts a server
whose ModelInfer does no work beyond wrapping the input and answering 1000
floats, once on ``grpc.aio`` and once on the threaded ``grpc.server``, and
drives each from a threaded client (the same for both) with FP32 images of two
sizes. It prints requests per second, the server process's CPU time per
request (``/proc/PID/stat``: user + system, all threads; the number least
disturbed by other work on the machine) and its minor page faults per request.

Both servers start with the malloc thresholds a long-running server has
(``raise_malloc_thresholds``); ``--malloc default`` shows what glibc's
start-up state costs a bare server instead. ``--stacks ... svertka`` adds
``svertka serve`` on the null model (``bench/models.py``), driven by the same
client, so what svertka's own request path adds to the bare stack is measured
the same way (its allocator state is its own: ``--malloc`` does not apply).

``--stacks ... cpp`` adds the floor under any frontend: the same no-op server
written in C++ on Debian's gRPC (``bench/research/cpp_floor/server.cc``, built on first
use by its ``build.sh``; it needs ``apt-get install libgrpc++-dev
protobuf-compiler-grpc pkg-config``). ``--client perf_analyzer`` drives every
stack with Triton's C++ perf_analyzer instead of the Python client, as the
targets are measured, and also prints perf_analyzer's own CPU per request: what
a same-host client takes from the cores whatever the server is.

``python -m bench.research.grpc_stacks [--stacks S ...] [--client python|perf_analyzer] [--seconds S]
[--concurrency C ...] [--malloc raised|default]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from bench.procs import free_port
from service.gen.inference import grpc_service_pb2 as pb
from service.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.gen.inference import model_config_pb2 as mc

WORK = Path(__file__).resolve().parents[2] / ".bench"
_OPTIONS = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]
SIZES = (32, 224)  # the digits model's and resnet18's inputs: 12 KiB and 588 KiB per request


class _NoOp:
    """What both Python no-op servers answer: ModelInfer, and the server's and the model's metadata,
    the model's config and statistics (one batch of one row per request) for perf_analyzer and ``bench.cpu``.

    The first 1000 input values are the logits, as in bench/research/cpp_floor/server.cc.
    """

    def __init__(self) -> None:
        self.requests = 0
        self._lock = threading.Lock()  # the threaded server answers from several threads

    def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        x = np.frombuffer(request.raw_input_contents[0], dtype="<f4")
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.outputs.add(name="logits", datatype="FP32", shape=[1, 1000])
        response.raw_output_contents.append(x[:1000].tobytes())
        with self._lock:
            self.requests += 1
        return response

    @staticmethod
    def server_metadata(request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="no-op", version="1")

    @staticmethod
    def metadata(request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        response = pb.ModelMetadataResponse(name=request.name, versions=["1"], platform="onnxruntime_onnx")
        response.inputs.add(name="input", datatype="FP32", shape=[-1, 3, 224, 224])
        response.outputs.add(name="logits", datatype="FP32", shape=[-1, 1000])
        return response

    @staticmethod
    def config(request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        config = mc.ModelConfig(name=request.name, platform="onnxruntime_onnx", max_batch_size=32)
        config.input.add(name="input", data_type=mc.TYPE_FP32, dims=[3, 224, 224])
        config.output.add(name="logits", data_type=mc.TYPE_FP32, dims=[1000])
        return pb.ModelConfigResponse(config=config)

    def statistics(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        stats = pb.ModelStatistics(name="null", version="1", inference_count=self.requests,
                                   execution_count=self.requests)  # fmt: skip
        stats.batch_stats.add(batch_size=1).compute_infer.count = self.requests
        return pb.ModelStatisticsResponse(model_stats=[stats])


class _AsyncServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.noop = _NoOp()

    async def ModelInfer(self, request, context):
        return self.noop.infer(request)

    async def ServerMetadata(self, request, context):
        return self.noop.server_metadata(request)

    async def ModelMetadata(self, request, context):
        return self.noop.metadata(request)

    async def ModelConfig(self, request, context):
        return self.noop.config(request)

    async def ModelStatistics(self, request, context):
        return self.noop.statistics(request)


class _ThreadedServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.noop = _NoOp()

    def ModelInfer(self, request, context):
        return self.noop.infer(request)

    def ServerMetadata(self, request, context):
        return self.noop.server_metadata(request)

    def ModelMetadata(self, request, context):
        return self.noop.metadata(request)

    def ModelConfig(self, request, context):
        return self.noop.config(request)

    def ModelStatistics(self, request, context):
        return self.noop.statistics(request)


def raise_malloc_thresholds() -> None:
    """Give this process the glibc malloc thresholds a long-running server ends up with.

    glibc raises its mmap and trim thresholds (up to 32 and 64 MiB) the first time the
    process frees a large mmapped block; ``svertka serve`` does that while loading models,
    so its 588 KiB request buffers are reused. A bare server never does, and then pays for
    fresh zero-filled pages on every request: hundreds of minor page faults per request and
    about half its CPU time, which would be measured as the cost of the gRPC stack. Setting
    the thresholds up front compares the stacks, not the allocator states.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    if libc.mallopt(m_mmap_threshold, 32 << 20) != 1 or libc.mallopt(m_trim_threshold, 64 << 20) != 1:
        raise RuntimeError("mallopt refused the thresholds")


def serve(stack: str, port: int, extra_options: list[tuple[str, int]] = (), malloc: str = "raised") -> None:
    """Server mode (a subprocess of the experiment): print "ready" once listening."""
    if malloc == "raised":
        raise_malloc_thresholds()
    address = f"127.0.0.1:{port}"
    options = _OPTIONS + list(extra_options)
    if stack == "aio":

        async def main() -> None:
            server = grpc.aio.server(options=options)
            pb_grpc.add_GRPCInferenceServiceServicer_to_server(_AsyncServicer(), server)
            server.add_insecure_port(address)
            await server.start()
            print("ready", flush=True)
            await server.wait_for_termination()

        asyncio.run(main())
    else:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_ThreadedServicer(), server)
        server.add_insecure_port(address)
        server.start()
        print("ready", flush=True)
        server.wait_for_termination()


def _proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, minor page faults) of a process so far, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


def _request(size: int) -> pb.ModelInferRequest:
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="null")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 3, size, size])
    request.raw_input_contents.append(x.tobytes())
    return request


def measure(url: str, pid: int, size: int, concurrency: int, seconds: float) -> dict:
    request = _request(size)
    with grpc.insecure_channel(url, options=_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(20):
            stub.ModelInfer(request)
        latencies: list[float] = []
        stop = time.monotonic() + seconds

        def client() -> None:
            while time.monotonic() < stop:
                began = time.perf_counter()
                stub.ModelInfer(request)
                latencies.append(time.perf_counter() - began)

        cpu, faults = _proc_stat(pid)
        began = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - began
        cpu_after, faults_after = _proc_stat(pid)
    return {
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(latencies, 50) * 1e3),
        "server_cpu_us_per_request": (cpu_after - cpu) / len(latencies) * 1e6,
        "minor_faults_per_request": (faults_after - faults) / len(latencies),
    }


def cpp_server() -> Path:
    """The C++ no-op server (bench/research/cpp_floor/server.cc), built on first use by its build.sh."""
    binary = WORK / "cpp-floor" / "server"
    source = Path(__file__).resolve().parent / "cpp_floor"
    newest = max(f.stat().st_mtime for f in source.iterdir())
    if not binary.is_file() or binary.stat().st_mtime < newest:
        build = subprocess.run(
            ["bash", str(source / "build.sh"), str(binary.parent)], capture_output=True, text=True
        )
        if build.returncode != 0:
            raise SystemExit(f"bench/research/cpp_floor/build.sh failed:\n{build.stderr.strip()}")
    return binary


def measure_perf_analyzer(url: str, pid: int, concurrency: int, seconds: float) -> dict:
    """The same measurement with Triton's perf_analyzer (C++) as the client, the client of the targets.

    224x224 only (the served model's input). The CPU covers perf_analyzer's whole run, its
    warm-up and trials included, divided by the requests the server counted over it. A level
    that does not stabilise gives ``{"unstable": why}``.
    """
    from bench import perf

    settings = perf.PerfSettings(
        measurement_interval_ms=int(seconds * 1000), stability_percentage=25, max_trials=5
    )
    point = perf.run_level(url, "null", concurrency, settings, WORK / "grpc-stacks" / "perf", server_pid=pid)
    if not point.stable:
        return {"unstable": point.error}
    use = point.cpu
    return {
        "requests_per_s": point.images_per_s,
        "p50_ms": point.latency_ms["p50"],
        "server_cpu_us_per_request": 1e6 * use["server_s"] / use["images"],
        "client_cpu_us_per_request": 1e6 * use["client_s"] / use["images"],
    }


@contextlib.contextmanager
def _server(stack: str, options: list, malloc: str) -> Iterator[tuple[str, int]]:
    """(address, pid) of a server under test: a no-op stack, or ``svertka serve`` on the null model."""
    if stack == "svertka":
        from bench import models, target

        null = models.null_model(WORK / "models")
        repo = target.single_model_repository(null.path, null.name, WORK / "grpc-stacks" / "repos")
        with target.serve(repo, log_path=WORK / "grpc-stacks" / "svertka.log") as server:
            yield server.grpc_url, server.pid
        return
    port = free_port()
    if stack == "cpp":
        cmd = [str(cpp_server()), str(port)]
    else:
        cmd = [sys.executable, "-m", "bench.research.grpc_stacks", "--serve", stack, "--port", str(port),
               "--server-options", json.dumps(options), "--malloc", malloc]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as server:
        try:
            if server.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{stack} server did not start")
            yield f"127.0.0.1:{port}", server.pid
        finally:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.research.grpc_stacks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--serve", choices=["aio", "threaded"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=2, help="alternating passes over both stacks")
    parser.add_argument(
        "--stacks",
        nargs="+",
        choices=["aio", "threaded", "cpp", "svertka"],
        default=["aio", "threaded"],
        help="cpp: a C++ no-op server on Debian's gRPC (bench/research/cpp_floor, built on first use); "
        "svertka: svertka serve on the null model (224x224 requests only), the same client",
    )
    parser.add_argument(
        "--client",
        choices=["python", "perf_analyzer"],
        default="python",
        help="python: a threaded gRPC Python client in this process; perf_analyzer: Triton's C++ "
        "client, as the targets are measured (224x224 only; also its own CPU per request)",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument(
        "--server-options",
        default="{}",
        metavar="JSON",
        help='variants of server channel options to compare, e.g. {"default": [], "big-reads": '
        '[["grpc.experimental.tcp_read_chunk_size", 1048576]]}; each stack runs once per variant',
    )
    parser.add_argument(
        "--malloc",
        choices=["raised", "default"],
        default="raised",
        help="raised: the thresholds a long-running server has (see raise_malloc_thresholds); "
        "default: glibc's start-up state, to see what it costs",
    )
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, [tuple(o) for o in json.loads(args.server_options)], args.malloc)
        return 0
    variants = json.loads(args.server_options) or {"default": []}
    rows = []
    for _ in range(args.repeats):
        for stack, (variant, options) in ((s, v) for s in args.stacks for v in variants.items()):
            with _server(stack, options, args.malloc) as (address, pid):
                sizes = args.sizes if stack != "svertka" and args.client == "python" else [224]
                for size in sizes:
                    for c in args.concurrency:
                        shown = f"{stack:9s} {variant:12s} {size:3d}x{size:<3d} c={c:2d}:"
                        row = {"stack": stack, "options": variant, "size": size, "concurrency": c,
                               "client": args.client}  # fmt: skip
                        if args.client == "python":
                            row |= measure(address, pid, size, c, args.seconds)
                            tail = f"{row['minor_faults_per_request']:6.1f} minor faults/request"
                        else:
                            row |= measure_perf_analyzer(address, pid, c, args.seconds)
                            if "unstable" in row:  # kept in the JSON, so a pass is not silently shorter
                                rows.append(row)
                                print(f"{shown} {row['unstable']}", flush=True)
                                continue
                            tail = f"client CPU {row['client_cpu_us_per_request']:6.0f} us/request"
                        rows.append(row)
                        print(f"{shown} {row['requests_per_s']:7.0f} req/s  "
                              f"p50 {row['p50_ms']:6.2f} ms  server CPU {row['server_cpu_us_per_request']:6.0f} "
                              f"us/request  {tail}", flush=True)  # fmt: skip
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

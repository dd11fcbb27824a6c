"""Batch-size distributions from Triton-style ModelStatistics, for svertka and the peer alike.

Both servers speak ``inference.GRPCInferenceService``; svertka's own generated
stubs are wire-compatible with Triton, so one client reads both. The
difference of two snapshots around a load run gives how many batches of each
size that run executed.
"""

from __future__ import annotations

import grpc

from service.gen.inference import grpc_service_pb2 as pb
from service.gen.inference import grpc_service_pb2_grpc as pb_grpc


def batch_counts(url: str, model: str, timeout_s: float = 10.0) -> dict[int, int]:
    """Batches executed so far per batch size (``batch_stats[].compute_infer.count``)."""
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=timeout_s)
    counts: dict[int, int] = {}
    for stats in response.model_stats:
        for b in stats.batch_stats:
            counts[int(b.batch_size)] = counts.get(int(b.batch_size), 0) + int(b.compute_infer.count)
    return counts


def model_input(url: str, model: str, timeout_s: float = 10.0) -> tuple[str, list[int], str]:
    """Name, per-request shape (batch dimension dropped) and datatype of the model's only input,
    from ModelMetadata."""
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=timeout_s)
    (inp,) = meta.inputs
    return inp.name, [int(d) for d in inp.shape[1:]], inp.datatype


def difference(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    """Batches per size executed between two snapshots (sizes with none left out)."""
    out = {size: n - before.get(size, 0) for size, n in after.items()}
    return {size: n for size, n in sorted(out.items()) if n > 0}


def images(counts: dict[int, int]) -> int:
    """Images computed in the batches ``counts`` describes (batch size times batches, summed)."""
    return sum(size * n for size, n in counts.items())


def mean_batch_size(counts: dict[int, int]) -> float:
    batches = sum(counts.values())
    return images(counts) / batches if batches else float("nan")

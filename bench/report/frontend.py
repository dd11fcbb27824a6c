"""Sections "Frontend alone" (the null model) and the client modes (shared memory, the streaming RPC)."""

from __future__ import annotations

from bench.report.numbers import at_concurrency, best_point, by_server, fmt, table


def frontend_section(frontend: dict) -> list[str]:
    """The null model on both servers: what a request costs with (almost) no compute."""
    lines = [f"## Frontend alone: {frontend['label']}", "",
             "A model with the resnet18 models' input and output (one 588 KiB FP32 image in, 1000 logits out) "
             "whose graph only reshapes and slices its input (`bench/models.py: null_model`), served by both "
             "servers with the same settings and measured with the same perf_analyzer command. Compute is "
             "microseconds, so the latency at concurrency 1 is what the frontend and the transport cost per request "
             "(the floor under the concurrency-1 overhead of the real models) and the best rate is the most requests "
             "per second each frontend answers on this machine, with perf_analyzer on the same cores.", ""]  # fmt: skip
    rows = []
    for server in ("svertka", "peer"):
        points = frontend.get(server)
        if not points:
            continue
        c1 = at_concurrency(points, 1)
        best = best_point(points)
        levels = ", ".join(
            f"c {p['concurrency']}: {fmt(p['images_per_s'])}"
            if p["stable"]
            else f"c {p['concurrency']}: unstable"
            for p in points
        )
        rows.append([
            "svertka" if server == "svertka" else "peer (Triton via PyTriton)",
            fmt(c1["latency_ms"]["p50"], 2) if c1 else "unstable", fmt(c1["latency_ms"]["p99"], 2) if c1 else "n/a",
            f"{fmt(best['images_per_s'])} (c {best['concurrency']})" if best else "unstable", levels,
        ])  # fmt: skip
    lines += table(["server", "c=1 p50 ms", "c=1 p99 ms", "best req/s", "req/s per concurrency"], rows)
    c1 = at_concurrency(frontend.get("svertka") or [], 1)
    if c1:
        lines += ["", "Against the concurrency-1 target (p50 <= raw batch-1 + 1 ms): svertka's frontend alone costs "
                  f"{fmt(c1['latency_ms']['p50'], 2)} ms per request here, so a model whose raw batch-1 latency is "
                  "L ms cannot be served below L + that at concurrency 1 by this frontend."]  # fmt: skip
    return lines + [""]


def mode_rows(label: str, server: str, inline: list[dict], other: list[dict]) -> list[str] | None:
    """One server's row: unary calls with the tensor in the message against another way of carrying it."""
    if not other:
        return None
    levels = [p["concurrency"] for p in other]

    def cell(points: list[dict], c: int, key: str) -> str:
        p = at_concurrency(points, c)
        if p is None:
            return "unstable"
        return fmt(p["latency_ms"]["p50"], 2) if key == "p50" else fmt(p["images_per_s"])

    c1 = [f"{cell(inline, 1, 'p50')} / {cell(other, 1, 'p50')}"] if 1 in levels else ["n/a"]
    rates = [f"c {c}: {cell(inline, c, 'rate')} / {cell(other, c, 'rate')}" for c in levels]
    return [label, server, *c1, "; ".join(rates)]


#: The ways of carrying a request that perf_analyzer measures besides unary calls: (key, heading, intro).
CLIENT_MODES = (
    ("shm", "Same-host clients: system shared memory",
     "The same perf_analyzer command with `--shared-memory system`: the client registers POSIX shared memory "
     "regions and each request names them instead of carrying the tensor (588 KiB at 224x224, 12 KiB at 32x32; "
     "svertka serves it with `--allow-shared-memory`, docs/api.md). Each cell is *in the message / in shared "
     "memory*, measured on the same server minutes apart. What it removes is the transport's share of a request: "
     "serializing, sending, receiving and parsing the tensor, on both sides."),
    ("stream", "Throughput clients: the streaming RPC",
     "The same perf_analyzer command with `--streaming`: each client thread opens one bidirectional "
     "`ModelStreamInfer` stream and sends its requests as messages on it (the tensor still in each message), "
     "instead of one unary `ModelInfer` call per request. Each cell is *unary / streaming*, measured on the same "
     "server minutes apart. What it removes is the per-call cost of gRPC: a new HTTP/2 stream, headers and "
     "trailers, and on a Python server a call object and a task per request."),
)  # fmt: skip


def mode_section(results: dict, key: str, heading: str, intro: str) -> list[str]:
    """perf_analyzer with unary calls and tensors in the messages against the same with another client mode."""
    rows = []
    for entry, server, data in by_server(results):
        name = "svertka" if server == "svertka" else "peer (Triton via PyTriton)"
        row = mode_rows(entry["label"], name, data.get("perf") or [], data.get(f"perf_{key}") or [])
        if row:
            rows.append(row)
    if not rows:
        return []
    lines = [f"## {heading}", "", intro, ""]
    lines += table(["model", "server", "c=1 p50 ms", "img/s per concurrency"], rows)
    return lines + [""]

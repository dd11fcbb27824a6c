"""The numbers the page shows, from the plain results dicts, and how a cell or a table prints them."""

from __future__ import annotations

import math

#: The issue's targets, checked (not asserted) in the report.
TARGET_TENSOR_EFFICIENCY = 0.95
TARGET_IMAGE_EFFICIENCY = 0.75
TARGET_C1_OVERHEAD_MS = 1.0
TARGET_INT8_SPEEDUP = 2.5


def ceiling_best(model: dict) -> dict:
    return max(model["ceiling"]["points"], key=lambda p: p["images_per_s"])


def raw_b1_ms(model: dict) -> float:
    return next(p for p in model["ceiling"]["points"] if p["batch_size"] == 1)["latency_ms"]["p50"]


def stable(points: list[dict]) -> list[dict]:
    return [p for p in points if p.get("images_per_s")]


def best_point(points: list[dict]) -> dict | None:
    points = stable(points)
    return max(points, key=lambda p: p["images_per_s"]) if points else None


def at_concurrency(points: list[dict], c: int) -> dict | None:
    return next((p for p in stable(points) if p["concurrency"] == c), None)


def mean_batch(batches: dict) -> float:
    total = sum(batches.values())
    return sum(int(s) * n for s, n in batches.items()) / total if total else float("nan")


def best_image(model: dict) -> dict | None:
    closed = [r for r in model["svertka"]["image"]["closed"] if r["completed"] and not r["errors"]]
    return max(closed, key=lambda r: r["images_per_s"]) if closed else None


def p99_at_throughput(points: list[dict], throughput: float) -> float | None:
    """The lowest p99 of a closed-loop curve among its points that deliver at least ``throughput``.

    None when no point reaches it. Comparing two servers "at equal throughput"
    this way asks: to serve the peer's load, what tail latency does svertka need?
    """
    enough = [p["latency_ms"]["p99"] for p in stable(points) if p["images_per_s"] >= throughput]
    return min(enough) if enough else None


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def signed(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def found_rate(search: dict) -> float | None:
    """The search's answer; 0 when it tried rates and none passed (even the lowest failed the bound)."""
    if search["best_rate"] is not None:
        return search["best_rate"]
    return 0.0 if search["tried"] else None


def summary(model: dict) -> dict:
    """The headline numbers of one model (None where a measurement is missing)."""
    ceil = ceiling_best(model)
    sv = best_point(model["svertka"]["perf"])
    c1 = at_concurrency(model["svertka"]["perf"], 1)
    img = best_image(model)
    peer = model.get("peer")
    pe = best_point(peer["perf"]) if peer else None
    return {
        "ceiling": ceil["images_per_s"],
        "ceiling_batch": ceil["batch_size"],
        "raw_b1_ms": raw_b1_ms(model),
        "served": sv["images_per_s"] if sv else None,
        "served_c": sv["concurrency"] if sv else None,
        "efficiency": ratio(sv["images_per_s"] if sv else None, ceil["images_per_s"]),
        "c1_p50_ms": c1["latency_ms"]["p50"] if c1 else None,
        "c1_overhead_ms": c1["latency_ms"]["p50"] - raw_b1_ms(model) if c1 else None,
        "image": img["images_per_s"] if img else None,
        "image_c": img["load"] if img else None,
        "image_efficiency": ratio(img["images_per_s"] if img else None, ceil["images_per_s"]),
        "peer": pe["images_per_s"] if pe else None,
        "peer_c": pe["concurrency"] if pe else None,
        "peer_efficiency": ratio(pe["images_per_s"] if pe else None, ceil["images_per_s"]),
        "vs_peer": ratio(sv["images_per_s"] if sv else None, pe["images_per_s"] if pe else None),
        "rate_tensor": found_rate(model["svertka"]["tensor_rate"]),
        "rate_image": found_rate(model["svertka"]["image"]["rate"]),
        "rate_peer": found_rate(peer["tensor_rate"]) if peer else None,
    }


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def by_server(results: dict) -> list[tuple[dict, str, dict]]:
    """(model, server, its results) for each model and the null model, svertka before the peer.

    The null model's results (``svertka``, ``svertka_shm``, ...) are put in the models' shape
    (``perf``, ``perf_shm``, ``perf_stream``), so one loop reads both.
    """
    out = []
    for m in results["models"]:
        out += [(m, server, m[server]) for server in ("svertka", "peer") if m.get(server)]
    frontend = results.get("frontend")
    if frontend:
        for server in ("svertka", "peer"):
            if frontend.get(server):
                data = {"perf": frontend[server]}
                data.update({f"perf_{key}": frontend.get(f"{server}_{key}") for key in ("shm", "stream")})
                out.append((frontend, server, data))
    return out

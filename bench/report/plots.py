"""The three PNG plots per model: throughput, latency and batch sizes against load."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.report.numbers import at_concurrency, ceiling_best, mean_batch, stable

SVERTKA_COLOR, IMAGE_COLOR, PEER_COLOR, CEILING_COLOR = "#1f77b4", "#2ca02c", "#d62728", "#555555"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(model: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sv = stable(model["svertka"]["perf"])
    ax.plot([p["concurrency"] for p in sv], [p["images_per_s"] for p in sv], "o-", color=SVERTKA_COLOR,
            label="svertka, tensor API (perf_analyzer)")  # fmt: skip
    img = [r for r in model["svertka"]["image"]["closed"] if r["completed"]]
    ax.plot([r["load"] for r in img], [r["images_per_s"] for r in img], "s--", color=IMAGE_COLOR,
            label="svertka, image API, 1024x768 JPEG (asyncio client)")  # fmt: skip
    if model.get("peer"):
        pe = stable(model["peer"]["perf"])
        ax.plot([p["concurrency"] for p in pe], [p["images_per_s"] for p in pe], "^-", color=PEER_COLOR,
                label="Triton via PyTriton, tensor API (perf_analyzer)")  # fmt: skip
    ceil = ceiling_best(model)
    ax.axhline(ceil["images_per_s"], color=CEILING_COLOR, linestyle=":",
               label=f"onnxruntime ceiling (batch {ceil['batch_size']})")  # fmt: skip
    ax.set_xlabel("concurrent requests (closed loop)")
    ax.set_ylabel("images / s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{model['label']}: throughput vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(model: dict, path: Path, bound_ms: float) -> None:
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [("svertka tensor", stable(model["svertka"]["perf"]), SVERTKA_COLOR, "images_per_s")]
    if model.get("peer"):
        series.append(("peer tensor", stable(model["peer"]["perf"]), PEER_COLOR, "images_per_s"))
    image_closed = [r for r in model["svertka"]["image"]["closed"] if r["completed"]]
    series.append(("svertka image", image_closed, IMAGE_COLOR, "images_per_s"))
    for name, points, color, key in series:
        xs = [p[key] for p in points]
        left.plot(xs, [p["latency_ms"]["p50"] for p in points], "o-", color=color, label=f"{name} p50")
        left.plot(xs, [p["latency_ms"]["p99"] for p in points], "x--", color=color, label=f"{name} p99")
    _log_latency_axes(
        left, "throughput, images / s (closed loop, concurrency 1..16)", "latency, ms", "closed loop"
    )

    rates = [("svertka tensor", model["svertka"]["tensor_rate"], SVERTKA_COLOR),
             ("svertka image", model["svertka"]["image"]["rate"], IMAGE_COLOR)]  # fmt: skip
    if model.get("peer"):
        rates.append(("peer tensor", model["peer"]["tensor_rate"], PEER_COLOR))
    for name, search, color in rates:
        tried = sorted((r for r in search["tried"] if r["completed"]), key=lambda r: r["load"])
        right.plot([r["load"] for r in tried], [r["latency_ms"]["p99"] for r in tried], "o-", color=color,
                   label=f"{name} p99")  # fmt: skip
        right.plot([r["load"] for r in tried], [r["latency_ms"]["p50"] for r in tried], ".:", color=color,
                   label=f"{name} p50")  # fmt: skip
    right.axhline(bound_ms, color=CEILING_COLOR, linestyle=":", label=f"{bound_ms:g} ms bound")
    _log_latency_axes(
        right,
        "offered load, Poisson arrivals / s",
        "latency from scheduled arrival, ms",
        "open loop (Poisson)",
    )
    fig.suptitle(f"{model['label']}: latency percentiles vs load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_batches(model: dict, path: Path) -> None:
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    servers = [("svertka", model["svertka"]["perf"], SVERTKA_COLOR)]
    if model.get("peer"):
        servers.append(("peer", model["peer"]["perf"], PEER_COLOR))
    width = 0.8 / len(servers)
    top_c = max((p["concurrency"] for p in stable(model["svertka"]["perf"])), default=None)
    for i, (name, points, color) in enumerate(servers):
        pts = stable(points)
        right.plot([p["concurrency"] for p in pts], [mean_batch(p["batches"]) for p in pts], "o-", color=color,
                   label=name)  # fmt: skip
        at_top = at_concurrency(points, top_c) if top_c else None
        if at_top and at_top["batches"]:
            items = sorted((int(size), n) for size, n in at_top["batches"].items())
            sizes = np.array([size for size, _ in items])
            images = np.array([size * n for size, n in items])
            left.bar(sizes + (i - (len(servers) - 1) / 2) * width, images / images.sum(), width,
                     color=color, label=name)  # fmt: skip
    from matplotlib.ticker import MaxNLocator

    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("batch size")
    left.set_ylabel("share of images")
    left.set_title(f"images by the batch they ran in, concurrency {top_c}")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.set_xlabel("concurrent requests (closed loop)")
    right.set_ylabel("mean batch size (images per execution)")
    right.set_title("mean batch size vs concurrency")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(f"{model['label']}: batch-size distribution (ModelStatistics batch_stats)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_latency_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, a log latency scale, a light grid and a small legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)

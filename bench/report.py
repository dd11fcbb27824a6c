"""Turns a results file of ``python -m bench`` into ``docs/benchmarks.md`` and PNG plots.

Works on the plain JSON dicts (not the dataclasses), so a report can be
re-rendered from a saved run: ``python -m bench --report-only RESULTS.json``.
Ratios come first: absolute images/s on a shared 2-core machine move with
whatever else runs, ratios measured minutes apart move much less.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bench import gpu_report

#: The issue's targets, checked (not asserted) in the report.
TARGET_TENSOR_EFFICIENCY = 0.95
TARGET_IMAGE_EFFICIENCY = 0.75
TARGET_C1_OVERHEAD_MS = 1.0
TARGET_INT8_SPEEDUP = 2.5


# --------------------------------------------------------------------------- numbers


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


# --------------------------------------------------------------------------- plots

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
    left.set_xlabel("throughput, images / s (closed loop, concurrency 1..16)")
    left.set_ylabel("latency, ms")
    left.set_yscale("log")
    left.set_title("closed loop")
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=7)

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
    right.set_xlabel("offered load, Poisson arrivals / s")
    right.set_ylabel("latency from scheduled arrival, ms")
    right.set_yscale("log")
    right.set_title("open loop (Poisson)")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=7)
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


# --------------------------------------------------------------------------- markdown


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _with_pairs(headline: float | None, pairs: dict | None) -> tuple[str, float | None]:
    """A ratio target's measured cell and the value its verdict is read from: the median of the rounds in pairs
    (``pairs``, a bench.paired summary) where the run has them, else the headline ratio."""
    if not pairs:
        return fmt(headline, 2), headline
    return (
        f"{fmt(headline, 2)} (headline); median of {pairs['rounds']} rounds in pairs {pairs['median']:.2f}",
        pairs["median"],
    )


def _targets(results: dict) -> list[str]:
    by_name = {m["name"]: m for m in results["models"]}
    sums = {n: summary(m) for n, m in by_name.items()}
    rows = []
    # Where the run measured rounds in pairs (bench.paired), their median decides: the headline's ratio sets
    # the best served window against a ceiling taken minutes away, and the machine's speed drifts between them
    # (a served/ceiling above 1 is that drift, not a server faster than onnxruntime alone).
    for name, m in by_name.items():
        s = sums[name]
        if name.startswith("resnet18"):
            pairs = ((m.get("svertka") or {}).get("paired") or {}).get("summary")
            shown, decide = _with_pairs(s["efficiency"], pairs)
            rows.append([f"tensor API served / ceiling >= {TARGET_TENSOR_EFFICIENCY} ({name})", shown,
                         mark(None if decide is None else decide >= TARGET_TENSOR_EFFICIENCY)])  # fmt: skip
    for name, m in by_name.items():
        s = sums[name]
        ov = s["c1_overhead_ms"]
        shown, decide = f"{fmt(s['c1_p50_ms'], 2)} vs {fmt(s['raw_b1_ms'], 2)} ms ({signed(ov)} ms)", ov
        pairs = ((m.get("svertka") or {}).get("paired_c1") or {}).get("summary") or {}
        if "unary" in pairs:
            shown += f"; median of {pairs['unary']['rounds']} rounds in pairs {signed(pairs['unary']['median'])} ms"
            decide = pairs["unary"]["median"]
        rows.append([f"concurrency-1 p50 <= raw batch-1 p50 + {TARGET_C1_OVERHEAD_MS:g} ms ({name})", shown,
                     mark(None if decide is None else decide <= TARGET_C1_OVERHEAD_MS)])  # fmt: skip
        if "streaming" in pairs:
            med = pairs["streaming"]["median"]
            rows.append([f"the same over the streaming RPC, median of {pairs['streaming']['rounds']} rounds in pairs ({name})",
                         f"{signed(med)} ms", mark(med <= TARGET_C1_OVERHEAD_MS)])  # fmt: skip
    for name, m in by_name.items():
        # The same target for same-host clients, whose tensors travel in system shared memory.
        c1 = at_concurrency(m["svertka"].get("perf_shm") or [], 1)
        raw = sums[name]["raw_b1_ms"]
        if c1 and raw is not None:
            ov = c1["latency_ms"]["p50"] - raw
            rows.append([f"the same, tensors in system shared memory ({name})",
                         f"{fmt(c1['latency_ms']['p50'], 2)} vs {fmt(raw, 2)} ms ({signed(ov)} ms)",
                         mark(ov <= TARGET_C1_OVERHEAD_MS)])  # fmt: skip
    if "resnet18" in sums:
        pairs = ((by_name["resnet18"].get("svertka") or {}).get("paired_image") or {}).get("summary")
        shown, decide = _with_pairs(sums["resnet18"]["image_efficiency"], pairs)
        rows.append([f"image API (1024x768 JPEG) / ceiling >= {TARGET_IMAGE_EFFICIENCY} (resnet18 fp32)",
                     shown, mark(None if decide is None else decide >= TARGET_IMAGE_EFFICIENCY)])  # fmt: skip
    for fp32, int8 in (("resnet18", "resnet18-int8"), ("digits", "digits-int8")):
        if fp32 in sums and int8 in sums:
            served = ratio(sums[int8]["served"], sums[fp32]["served"])
            raw = ratio(sums[int8]["ceiling"], sums[fp32]["ceiling"])
            rows.append([f"int8 served / fp32 served >= {TARGET_INT8_SPEEDUP} ({fp32})",
                         f"{fmt(served, 2)} (raw onnxruntime: {fmt(raw, 2)})",
                         mark(None if served is None or fp32 != "resnet18" else served >= TARGET_INT8_SPEEDUP)])  # fmt: skip
    for name, m in by_name.items():
        if not m.get("peer"):
            continue
        levels = []
        for p in stable(m["svertka"]["perf"]):
            q = at_concurrency(m["peer"]["perf"], p["concurrency"])
            if q:
                levels.append(p["images_per_s"] > q["images_per_s"])
        rows.append([f"throughput above the peer at every concurrency ({name})",
                     f"{sum(levels)} of {len(levels)} levels", mark(bool(levels) and all(levels) if levels else None)])  # fmt: skip
        equal = []
        for q in stable(m["peer"]["perf"]):
            mine = p99_at_throughput(m["svertka"]["perf"], q["images_per_s"])
            equal.append(mine is not None and mine < q["latency_ms"]["p99"])  # never reaching it is a loss
        rows.append([f"p99 below the peer's at equal throughput ({name})", f"{sum(equal)} of {len(equal)} peer points",
                     mark(all(equal) if equal else None)])  # fmt: skip
        s = sums[name]
        rows.append([f"latency-bounded rate above the peer's ({name})",
                     f"{fmt(s['rate_tensor'])} vs {fmt(s['rate_peer'])} req/s",
                     mark(None if s["rate_tensor"] is None or s["rate_peer"] is None else s["rate_tensor"] > s["rate_peer"])])  # fmt: skip
    return _table(["target", "measured", "verdict"], rows)


def _model_section(model: dict, img_rel: str, bound_ms: float) -> list[str]:
    name = model["name"]
    s = summary(model)
    lines = [f"### {model['label']} (`{name}`)", ""]
    lines += [f"![throughput]({img_rel}/{name}-throughput.png)", "",
              f"![latency]({img_rel}/{name}-latency.png)", "",
              f"![batches]({img_rel}/{name}-batches.png)", ""]  # fmt: skip
    lines += [f"Served with max_batch_size {model['max_batch_size']}, max_queue_delay_ms "
              f"{model['max_queue_delay_ms']:g}, {model['threads']} onnxruntime intra-op threads (svertka and the peer alike).", ""]  # fmt: skip
    lines += ["**onnxruntime alone** (the ceiling; "
              f"{len(model['ceiling_passes'])} pass{'es' if len(model['ceiling_passes']) > 1 else ''}, per batch size the faster kept):", ""]  # fmt: skip
    points = model["ceiling"]["points"]
    with_cpu = all(p.get("cpu_ms_per_image") for p in points)  # results from before CPU metering have none
    rows = [[str(p["batch_size"]), fmt(p["images_per_s"]), fmt(p["latency_ms"]["p50"], 2), fmt(p["latency_ms"]["p99"], 2),
             str(p["iterations"]), *([fmt(p["cpu_ms_per_image"], 2)] if with_cpu else [])] for p in points]  # fmt: skip
    header = ["batch", "images/s", "p50 ms per run", "p99 ms per run", "runs"]
    lines += _table(header + (["CPU ms per image"] if with_cpu else []), rows) + [""]

    lines += ["**Tensor API, closed loop** (perf_analyzer, one FP32 image per request; latencies as perf_analyzer "
              "reports them; mean batch from ModelStatistics):", ""]  # fmt: skip
    peer = model.get("peer")
    header = ["concurrency", "svertka img/s", "p50 ms", "p99 ms", "mean batch"]
    if peer:
        header += ["peer img/s", "p50 ms", "p99 ms", "mean batch", "svertka / peer"]
    rows = []
    for p in model["svertka"]["perf"]:
        row = [str(p["concurrency"])]
        if p.get("images_per_s"):
            row += [fmt(p["images_per_s"]), fmt(p["latency_ms"]["p50"], 2), fmt(p["latency_ms"]["p99"], 2),
                    fmt(mean_batch(p["batches"]), 2)]  # fmt: skip
        else:
            row += ["unstable", "", "", ""]
        if peer:
            q = next((q for q in peer["perf"] if q["concurrency"] == p["concurrency"]), None)
            if q and q.get("images_per_s"):
                row += [fmt(q["images_per_s"]), fmt(q["latency_ms"]["p50"], 2), fmt(q["latency_ms"]["p99"], 2),
                        fmt(mean_batch(q["batches"]), 2), fmt(ratio(p.get("images_per_s"), q["images_per_s"]), 2)]  # fmt: skip
            else:
                row += ["unstable", "", "", "", ""]
        rows.append(row)
    lines += _table(header, rows) + [""]

    stages = ["Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
              "Server Compute Infer", "Server Compute Output", "Client Recv"]  # fmt: skip
    rows = []
    for label, points in (("svertka", model["svertka"]["perf"]), ("peer", peer["perf"] if peer else [])):
        p = at_concurrency(points, 1)
        if p and p.get("breakdown_us"):
            rows.append([label, *(fmt(p["breakdown_us"].get(k, float("nan")) / 1e3, 2) for k in stages),
                         fmt(p["latency_ms"]["p50"], 2)])  # fmt: skip
    if rows:
        lines += [f"**Where a request's time goes at concurrency 1** (perf_analyzer's mean per stage, ms; the server "
                  f"stages come from the server's ModelStatistics; onnxruntime alone takes {fmt(raw_b1_ms(model), 2)} ms "
                  "at batch 1):", ""]  # fmt: skip
        lines += _table(["server", *(k.lower() for k in stages), "p50 total"], rows) + [""]

    lines += [
        "**Image API, closed loop** (svertka's asyncio client, `Classify` with 1024x768 JPEGs, top_k 1):",
        "",
    ]
    rows = [[str(int(r["load"])), fmt(r["images_per_s"]), fmt(r["latency_ms"]["p50"], 2), fmt(r["latency_ms"]["p99"], 2),
             str(r["completed"]), str(r["errors"] or "")] for r in model["svertka"]["image"]["closed"]]  # fmt: skip
    lines += _table(["concurrency", "images/s", "p50 ms", "p99 ms", "requests", "errors"], rows) + [""]

    lines += [f"**Latency-bounded throughput** (highest Poisson arrival rate with p99 < {bound_ms:g} ms; "
              "latency from each request's scheduled arrival):", ""]  # fmt: skip
    searches = [
        ("svertka, tensor API", model["svertka"]["tensor_rate"]),
        ("svertka, image API", model["svertka"]["image"]["rate"]),
    ]
    if peer:
        searches.append(("peer, tensor API", peer["tensor_rate"]))
    rows = []
    for label, search in searches:
        tried = ", ".join(
            f"{r['load']:.0f}/s: p99 {fmt(r['latency_ms']['p99'], 0)} ms"
            for r in sorted(search["tried"], key=lambda r: r["load"])
        )
        best = search["best_rate"]
        lowest = min((r["load"] for r in search["tried"]), default=None)
        shown = fmt(best, 1, " req/s") if best is not None else f"none (even {fmt(lowest)} req/s failed)"
        rows.append([label, shown, tried])
    lines += _table(["server", "highest passing rate", "rates tried (p99)"], rows) + [""]
    if s["vs_peer"] is not None:
        lines += [f"Best tensor-API throughput: svertka {fmt(s['served'])} img/s (concurrency {s['served_c']}), "
                  f"peer {fmt(s['peer'])} img/s (concurrency {s['peer_c']}): ratio {fmt(s['vs_peer'], 2)}.", ""]  # fmt: skip
    return lines


def _profile_section(model: dict) -> list[str]:
    prof = model["svertka"].get("profile")
    if not prof:
        return []
    lines = [f"## Profile: where svertka's CPU goes ({model['label']})", "",
             f"py-spy attached to the running server while the asyncio client kept {prof['concurrency']} requests "
             f"in flight, {prof['seconds']:g} s per view (`bench/profile.py`). *active*: samples of every non-idle "
             "thread; native work (onnxruntime kernels, JPEG decoding, grpc's C core) shows as the Python frame that "
             "called it. *gil*: only the thread holding the GIL, i.e. the Python work that competes with everything "
             "else for the interpreter. Shares are of all samples in that view.", ""]  # fmt: skip
    for api in ("tensor", "image"):
        for view in ("active", "gil"):
            summ = prof.get(f"{api}_{view}")
            if not summ:
                continue
            busy = (f"the GIL was held {summ['busy']:.0%} of the time" if view == "gil"
                    else f"{summ['busy']:.2f} Python threads busy on average")  # fmt: skip
            lines += [f"**{api} API, {view}** ({summ['samples']} samples: {busy}; {fmt(summ['images_per_s_while_sampled'])} "
                      f"img/s while sampled; `{summ['command']}`):", ""]  # fmt: skip
            rows = []
            for i in range(min(max(len(summ["threads"]), len(summ["self"])), 8)):
                cells = []
                for key in ("threads", "self"):
                    items = summ[key]
                    cells += [f"`{items[i][0]}`", f"{items[i][1]:.0%}"] if i < len(items) else ["", ""]
                rows.append(cells)
            lines += _table(["thread", "share", "innermost frame", "share"], rows) + [""]
    return lines


#: Hand-written reading of a full run (profile findings, suggestions, A/B results with their commands),
#: appended to the full report. Quick runs leave it out: their numbers are not the ones it cites.
FINDINGS = Path(__file__).resolve().parent / "findings.md"


def _frontend_section(frontend: dict) -> list[str]:
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
    lines += _table(["server", "c=1 p50 ms", "c=1 p99 ms", "best req/s", "req/s per concurrency"], rows)
    c1 = at_concurrency(frontend.get("svertka") or [], 1)
    if c1:
        lines += ["", "Against the concurrency-1 target (p50 <= raw batch-1 + 1 ms): svertka's frontend alone costs "
                  f"{fmt(c1['latency_ms']['p50'], 2)} ms per request here, so a model whose raw batch-1 latency is "
                  "L ms cannot be served below L + that at concurrency 1 by this frontend."]  # fmt: skip
    return lines + [""]


def _mode_rows(label: str, server: str, inline: list[dict], other: list[dict]) -> list[str] | None:
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


def _by_server(results: dict) -> list[tuple[dict, str, dict]]:
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


def _mode_section(results: dict, key: str, heading: str, intro: str) -> list[str]:
    """perf_analyzer with unary calls and tensors in the messages against the same with another client mode."""
    rows = []
    for entry, server, data in _by_server(results):
        name = "svertka" if server == "svertka" else "peer (Triton via PyTriton)"
        row = _mode_rows(entry["label"], name, data.get("perf") or [], data.get(f"perf_{key}") or [])
        if row:
            rows.append(row)
    if not rows:
        return []
    lines = [f"## {heading}", "", intro, ""]
    lines += _table(["model", "server", "c=1 p50 ms", "img/s per concurrency"], rows)
    return lines + [""]


def _cpu_cell(point: dict | None) -> str:
    use = (point or {}).get("cpu")
    if not use or not use["images"] or not use["wall_s"]:
        return ""
    per = 1e3 / use["images"]
    return (f"{fmt(use['server_s'] * per, 2)} + {fmt(use['client_s'] * per, 2)} "
            f"({fmt((use['server_s'] + use['client_s']) / use['wall_s'], 2)})")  # fmt: skip


#: The perf_analyzer loads in the CPU table, by their key in a server's results.
CPU_LOADS = (
    ("perf", "tensor API"),
    ("perf_shm", "tensor API, shared memory"),
    ("perf_stream", "tensor API, streaming"),
)


def _paired_section(results: dict) -> list[str]:
    """Served/ceiling from rounds measured seconds apart (``bench.paired``), per model and API."""
    rows = []
    for model in results["models"]:
        for key, api in (("paired", "tensor"), ("paired_image", "image (JPEG)")):
            data = (model.get("svertka") or {}).get(key)
            if not data or not data.get("summary"):
                continue
            s = data["summary"]
            rounds = ", ".join(
                f"{r / c:.3f}" if r else "unstable"
                for r, c in zip(data["served"], data["ceiling"], strict=True)
            )
            ceilings = f"{fmt(min(data['ceiling']))}-{fmt(max(data['ceiling']))}"
            rows.append([model["label"], api, str(data["concurrency"]), ceilings, rounds, f"**{s['median']:.3f}**",
                         f"{s['min']:.3f}-{s['max']:.3f}"])  # fmt: skip
    if not rows:
        return []
    lines = ["## Served over ceiling, measured in pairs", "",
             "The headline above sets the best served rate against a ceiling measured minutes before and after "
             "the servers. Here each round measures the ceiling (onnxruntime alone at the first pass's three "
             "fastest batch sizes, the best of them) and, seconds later, the served rate at the best concurrency "
             "found (perf_analyzer for the tensor API, the closed loop of JPEGs for the image API), and gives one "
             "ratio (`bench/paired.py`). The median of the rounds is the less flattered reading; their range is "
             "how far a single ratio on this machine can be trusted.", ""]  # fmt: skip
    header = [
        "model",
        "API",
        "concurrency",
        "ceiling img/s, lowest-highest",
        "served/ceiling per round",
        "median",
        "range",
    ]
    return lines + _table(header, rows) + [""]


def _paired_c1_section(results: dict) -> list[str]:
    """The concurrency-1 overhead from rounds measured seconds apart (``bench.paired``), per model and mode."""
    rows = []
    for model in results["models"]:
        data = (model.get("svertka") or {}).get("paired_c1")
        if not data:
            continue
        raw = data["raw_p50"]
        for mode, served in data["served_p50"].items():
            s = data["summary"].get(mode)
            if s is None:
                continue
            rounds = ", ".join(
                signed(v - p) if v is not None else "unstable" for v, p in zip(served, raw, strict=True)
            )
            rows.append([model["label"], mode, f"{fmt(min(raw), 2)}-{fmt(max(raw), 2)}", rounds,
                         f"**{signed(s['median'])}**", f"{signed(s['min'])} to {signed(s['max'])}"])  # fmt: skip
    if not rows:
        return []
    lines = ["## Concurrency-1 overhead, measured in pairs", "",
             "The headline's concurrency-1 overhead sets perf_analyzer's p50 against onnxruntime's batch-1 p50 "
             "measured minutes away. Here each round times onnxruntime alone at batch 1 and, seconds later, "
             "perf_analyzer at concurrency 1 (`bench/paired.py`); each cell is that round's served p50 minus its "
             "raw p50, in ms.", ""]  # fmt: skip
    header = [
        "model",
        "calls",
        "raw batch-1 p50 ms, lowest-highest",
        "overhead per round, ms",
        "median",
        "range",
    ]
    return lines + _table(header, rows) + [""]


def _cpu_section(results: dict) -> list[str]:
    """CPU time per image of each server and its client, at every level measured (``bench/cpu.py``)."""

    def level(p: dict) -> int:
        return int(p.get("concurrency", p.get("load", 0)))

    loads = []  # (model, server, load, points)
    for entry, server, data in _by_server(results):
        loads += [(entry, server, label, data.get(key) or []) for key, label in CPU_LOADS]
        if "image" in data:
            loads.append((entry, server, "image API (JPEG)", data["image"]["closed"]))
    levels = sorted({level(p) for *_, pts in loads for p in pts if p.get("cpu")})
    if not levels:
        return []  # results from before CPU metering
    rows = []
    labelled = set()  # models whose first row (label, onnxruntime alone) is written
    for entry, server, load, points in loads:
        by_level = {level(p): p for p in points if p.get("images_per_s")}
        cells = [_cpu_cell(by_level.get(c)) for c in levels]
        if not any(cells):
            continue
        label = alone = ""
        if id(entry) not in labelled:
            labelled.add(id(entry))
            label = entry["label"]
            best = ceiling_best(entry) if "ceiling" in entry else {}
            if best.get("cpu_ms_per_image"):
                alone = f"{fmt(best['cpu_ms_per_image'], 2)} (b {best['batch_size']})"
        rows.append([label, alone, server, load, *cells])
    cores = results["meta"]["machine"].get("cpus_usable", "the")
    lines = ["## CPU time per image", "",
             "Each cell is *server + client* CPU milliseconds per image *(cores busy)* over one whole perf_analyzer "
             "run or image-API window at that concurrency: user + system time of all threads, the server's process "
             "tree (for the peer: its launcher, Triton and the Python backend stubs) and the client (perf_analyzer, "
             "including its start-up; for the image API, svertka's asyncio client), divided by the images the "
             "server computed meanwhile (ModelStatistics); *cores busy* is both together per second of wall time, "
             f"out of {cores} usable (`bench/cpu.py`). *onnxruntime alone* is the ceiling loop's CPU per image at its "
             "best batch size (the ceiling tables list every batch size). With the client on the same cores, served "
             "images/s cannot exceed cores / (server + client ms per image), while the ceiling is cores / "
             "(onnxruntime alone per image): the gap between the two CPU costs is what stands between a saturated "
             "server and the ceiling. CPU time per image is also moved less than a rate by other work on the "
             "machine, though not unmoved (shared caches and memory bandwidth).", ""]  # fmt: skip
    lines += _table(["model", "onnxruntime alone ms", "server", "load", *(f"c {c}" for c in levels)], rows)
    return lines + [""]


def render(results: dict, img_rel: str, findings: Path | None = None) -> str:
    meta = results["meta"]
    m = meta["machine"]
    plan = meta["plan"]
    bound = plan["latency_bound_ms"]
    cmd = "make bench" if not meta["quick"] else "make bench BENCH_QUICK=1"
    lines = ["# Benchmarks", ""]
    if meta["quick"]:
        lines += ["> **Quick mode** (`BENCH_QUICK=1`): windows of about a second, no peer. These numbers only show",
                  "> that the pipeline works; they are not measurements to quote.", ""]  # fmt: skip
    lines += [
        f"Every number on this page was produced by one run of `{cmd}` (`{' '.join(meta['argv'])}`), "
        f"started {meta['started']} and lasting {meta.get('duration_s', 'n/a')} s, on commit `{m['git_commit']}`. "
        "The page and its plots are generated by `bench/report.py` from the run's results file "
        "(`.bench/full/results.json` for `make bench`; re-render with `python -m bench --report-only FILE`).",
        "",
        "The machine is shared and noisy, so the headline is **ratios** measured minutes apart on the same machine: "
        "served throughput against what onnxruntime alone reaches (the ceiling), int8 against fp32, svertka against "
        "a peer (Triton Inference Server through PyTriton) serving the same ONNX file with the same batching settings.",
        "",
        "## Headline",
        "",
    ]
    rows = []
    for model in results["models"]:
        s = summary(model)
        rows.append([
            model["label"], f"{fmt(s['ceiling'])} (b {s['ceiling_batch']})", fmt(s["raw_b1_ms"], 2),
            f"{fmt(s['served'])} (c {s['served_c']})", fmt(s["efficiency"], 2),
            f"{fmt(s['image'])}", fmt(s["image_efficiency"], 2),
            signed(s["c1_overhead_ms"]),
            f"{fmt(s['peer'])}" + (f" ({fmt(s['peer_efficiency'], 2)})" if s["peer"] else ""), fmt(s["vs_peer"], 2),
            f"{fmt(s['rate_tensor'], 0)} / {fmt(s['rate_image'], 0)} / {fmt(s['rate_peer'], 0)}",
        ])  # fmt: skip
    lines += _table(
        ["model", "ceiling img/s", "raw b1 ms", "svertka tensor img/s", "served / ceiling", "image API img/s",
         "image / ceiling", "c=1 p50 overhead ms", "peer img/s (/ ceiling)", "svertka / peer",
         f"p99<{bound:g} ms rate: tensor / image / peer"],
        rows,
    )  # fmt: skip
    by_name = {x["name"]: summary(x) for x in results["models"]}
    for fp32, int8 in (("resnet18", "resnet18-int8"), ("digits", "digits-int8")):
        if fp32 in by_name and int8 in by_name:
            a, b = by_name[fp32], by_name[int8]
            lines += ["", f"int8 / fp32 ({fp32}): served {fmt(ratio(b['served'], a['served']), 2)}x, "
                      f"image API {fmt(ratio(b['image'], a['image']), 2)}x, onnxruntime alone {fmt(ratio(b['ceiling'], a['ceiling']), 2)}x."]  # fmt: skip
    lines += ["", "### Targets (issue 7; measured, not asserted)", ""] + _targets(results)
    la = meta.get("load_average")
    lines += [
        "",
        "## Machine and versions",
        "",
        f"- CPU: {m['cpu']}, {m['cpus_usable']} usable cores, flags {', '.join(m['cpu_flags']) or 'n/a'}; "
        f"{m['memory_gib']} GiB memory; {m['os']}; Python {m['python']}",
        "- " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- {meta['perf_analyzer']} (from the `tritonclient` wheel)",
    ]
    if meta.get("peer_versions"):
        lines.append("- peer venv (`.bench/pytriton-venv`, made by `bench/setup_peer.sh`): "
                     + ", ".join(f"{k} {v}" for k, v in meta["peer_versions"].items()))  # fmt: skip
    if la:
        lines.append(f"- load average (1/5/15 min) before the run {', '.join(f'{x:.2f}' for x in la['before'])}, "
                     f"after {', '.join(f'{x:.2f}' for x in la['after'])}: above {m['cpus_usable']}, other work competed for the CPUs")  # fmt: skip
    img = meta["images"]
    pa = plan["perf"]
    lines += [
        "",
        "## Method",
        "",
        "- **Ceiling** (`bench/ceiling.py`): the server's own onnxruntime session (`service.runtime.Session`, built from "
        "the model's settings as `svertka serve` builds it: providers, intra-op threads, session options), "
        f"timed for {plan['ceiling_s_per_batch']:g} s at each batch size 1, 2, 4, ..., max_batch_size on a ready "
        "float32 batch. Best images/s is the ceiling; batch-1 p50 is the latency floor. Measured before the servers "
        "and again after them; per batch size the faster pass is kept (the conservative choice for served/ceiling).",
        f"- **Tensor API** (`bench/perf.py`): `perf_analyzer -i grpc -b 1 --concurrency-range C "
        f"--measurement-interval {pa['measurement_interval_ms']} --stability-percentage {pa['stability_percentage']} "
        f"--max-trials {pa['max_trials']} -f out.csv`, one process per concurrency in "
        f"{', '.join(map(str, plan['concurrencies']))}; a level that does not stabilise is retried with twice the "
        "stability percentage, then reported as unstable. Batch sizes come from the difference of ModelStatistics "
        "`batch_stats` before and after each level (both servers report them)."
        + (
            f" Concurrency {', '.join(map(str, plan['shm_concurrencies']))} again with `--shared-memory system`"
            if plan.get("shm_concurrencies")
            else ""
        )
        + (
            f"; concurrency {', '.join(map(str, plan['stream_concurrencies']))} again with `--streaming`"
            if plan.get("stream_concurrencies")
            else ""
        )
        + (" (sections below)." if plan.get("shm_concurrencies") or plan.get("stream_concurrencies") else ""),
        f"- **Image API** (`bench/loadgen.py`): `svertka.v1.ImageClassifier/Classify` calls from an asyncio gRPC "
        f"client, closed loop at concurrency {', '.join(map(str, plan['image_concurrencies']))}, "
        f"{plan['load_s']:g} s windows after {plan['warmup_s']:g} s of warm-up, cycling through {img['count']} "
        f"JPEGs of {img['width']}x{img['height']} (mean {img['mean_kib']} KiB, quality 90) made from the photographs "
        f"scikit-image ships ({', '.join(img['sources'])}) and their mirror images (`bench/images.py`).",
        f"- **Latency-bounded throughput**: open-loop Poisson arrivals from the same client (tensor requests for "
        f"both servers, image requests for svertka), {plan['load_s']:g} s per rate, latency counted from each "
        f"request's scheduled arrival; starting at half the best closed-loop throughput, doubling or halving to bracket "
        f"and then bisecting, {plan['rate_steps']} rates per search. A rate passes when every request succeeded and "
        f"p99 < {bound:g} ms.",
        "- **Peer** (`bench/peer_server.py`): nvidia-pytriton's bundled Triton server, an onnxruntime callable under "
        "`@batch`, `DynamicBatcher(max_queue_delay_microseconds=...)` and `max_batch_size` equal to svertka's, the "
        "same intra-op threads, the same ONNX file. "
        + (
            "Both servers are up at once and take turns at each perf_analyzer level (which goes first alternates "
            "from level to level), so each svertka/peer pair is measured seconds apart. The two Poisson searches "
            "run one after the other."
            if meta.get("peer_in_turn")
            else "The peer was measured after svertka, minutes apart."
        ),
        "- **CPU time** (`bench/cpu.py`): user + system time of the server's process tree and of the client, read "
        "before and after each perf_analyzer run and image-API window, divided by the images the server's "
        "ModelStatistics counted in between; the ceiling loop's own CPU time per image at each batch size.",
        "- **By library** (`python -m bench.native`, a separate command, not part of this run): Linux `perf` on the "
        "served server and then on the same engine in process, CPU per image split by library (onnxruntime and "
        "its spin-waiting, JPEG decoding, Pillow, the interpreter, gRPC's core, the kernel); numbers in the "
        "findings below.",
        "- **In pairs** (`bench/paired.py`; also `python -m bench.paired` on its own): "
        + (
            f"after each model's tensor-API sweep, {plan['paired_rounds']} rounds "
            if plan.get("paired_rounds")
            else "rounds (not in this run) "
        )
        + "of a ceiling window followed within seconds by perf_analyzer at the best concurrency, one served/ceiling "
        "ratio per round, and their median and range; "
        + (
            "as many with the image API's closed loop instead of perf_analyzer; "
            if any((m.get("svertka") or {}).get("paired_image") for m in results["models"])
            else ""
        )
        + (
            "then as many rounds of onnxruntime alone at batch 1 followed by perf_analyzer at concurrency 1 "
            f"({', '.join(plan['paired_c1_modes'])}), one concurrency-1 overhead per round."
            if plan.get("paired_c1_modes")
            else "the concurrency-1 rounds are not in this run."
        ),
        "",
        "## Results per model",
        "",
    ]
    for model in results["models"]:
        lines += _model_section(model, img_rel, bound)
    if results.get("frontend"):
        lines += _frontend_section(results["frontend"])
    for key, heading, intro in CLIENT_MODES:
        lines += _mode_section(results, key, heading, intro)
    lines += _paired_section(results)
    lines += _paired_c1_section(results)
    lines += _cpu_section(results)
    for model in results["models"]:
        lines += _profile_section(model)
    lines += [
        "## GPU",
        "",
        "This run is CPU-only. The GPU benchmark (`python -m bench.gpu`: the CUDA execution provider with IO "
        "binding on resnet50 fp32 and fp16, the ceiling with and without host copies, perf_analyzer over messages "
        "and shared memory, the image API, whether TensorRT loads) runs on a machine with a GPU; its runs, their "
        "tables and what they showed are in [benchmarks-gpu.md](benchmarks-gpu.md). Their summaries:",
        "",
        *gpu_report.headline(gpu_report.committed_runs()),
    ]
    if findings and findings.is_file():
        lines += [findings.read_text().strip(), ""]
    return "\n".join(lines)


def write(results: dict, out: Path) -> list[Path]:
    """Write the markdown report to ``out`` and its plots to ``out.parent/img/benchmarks``; return all paths."""
    out = Path(out)
    img_dir = out.parent / "img" / "benchmarks"
    img_dir.mkdir(parents=True, exist_ok=True)
    bound = results["meta"]["plan"]["latency_bound_ms"]
    written = []
    for model in results["models"]:
        for kind, fn in (
            ("throughput", plot_throughput),
            ("latency", plot_latency),
            ("batches", plot_batches),
        ):
            path = img_dir / f"{model['name']}-{kind}.png"
            if kind == "latency":
                fn(model, path, bound)
            else:
                fn(model, path)
            written.append(path)
    out.write_text(render(results, "img/benchmarks", None if results["meta"]["quick"] else FINDINGS))
    return [out, *written]

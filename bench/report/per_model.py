"""Sections "Results per model" (one per model: ceiling, both APIs, latency-bounded rates) and "Profile"."""

from __future__ import annotations

from bench.report.numbers import at_concurrency, fmt, mean_batch, ratio, raw_b1_ms, summary, table


def model_section(model: dict, img_rel: str, bound_ms: float) -> list[str]:
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
    lines += table(header + (["CPU ms per image"] if with_cpu else []), rows) + [""]

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
    lines += table(header, rows) + [""]

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
        lines += table(["server", *(k.lower() for k in stages), "p50 total"], rows) + [""]

    lines += [
        "**Image API, closed loop** (svertka's asyncio client, `Classify` with 1024x768 JPEGs, top_k 1):",
        "",
    ]
    rows = [[str(int(r["load"])), fmt(r["images_per_s"]), fmt(r["latency_ms"]["p50"], 2), fmt(r["latency_ms"]["p99"], 2),
             str(r["completed"]), str(r["errors"] or "")] for r in model["svertka"]["image"]["closed"]]  # fmt: skip
    lines += table(["concurrency", "images/s", "p50 ms", "p99 ms", "requests", "errors"], rows) + [""]

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
    lines += table(["server", "highest passing rate", "rates tried (p99)"], rows) + [""]
    if s["vs_peer"] is not None:
        lines += [f"Best tensor-API throughput: svertka {fmt(s['served'])} img/s (concurrency {s['served_c']}), "
                  f"peer {fmt(s['peer'])} img/s (concurrency {s['peer_c']}): ratio {fmt(s['vs_peer'], 2)}.", ""]  # fmt: skip
    return lines


def profile_section(model: dict) -> list[str]:
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
            lines += table(["thread", "share", "innermost frame", "share"], rows) + [""]
    return lines

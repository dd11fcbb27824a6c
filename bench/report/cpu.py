"""Section "CPU time per image": each server and its client, at every level measured."""

from __future__ import annotations

from bench.report.numbers import by_server, ceiling_best, fmt, table


def cpu_cell(point: dict | None) -> str:
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


def cpu_section(results: dict) -> list[str]:
    """CPU time per image of each server and its client, at every level measured (``bench/cpu.py``)."""

    def level(p: dict) -> int:
        return int(p.get("concurrency", p.get("load", 0)))

    loads = []  # (model, server, load, points)
    for entry, server, data in by_server(results):
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
        cells = [cpu_cell(by_level.get(c)) for c in levels]
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
    lines += table(["model", "onnxruntime alone ms", "server", "load", *(f"c {c}" for c in levels)], rows)
    return lines + [""]

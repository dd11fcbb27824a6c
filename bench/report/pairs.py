"""Sections "Served over ceiling, measured in pairs" and "Concurrency-1 overhead, measured in pairs"."""

from __future__ import annotations

from bench.report.numbers import fmt, signed, table


def paired_section(results: dict) -> list[str]:
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
    return lines + table(header, rows) + [""]


def paired_c1_section(results: dict) -> list[str]:
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
    return lines + table(header, rows) + [""]

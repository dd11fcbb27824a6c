"""Section "One process or several (`--frontends`)": ``bench.frontends``' pairs and balance."""

from __future__ import annotations

from bench.report.numbers import fmt, table


def _span(values: list[float] | None, digits: int = 1) -> str:
    return "n/a" if not values else f"{fmt(values[0], digits)}-{fmt(values[1], digits)}"


def processes_section(results: dict) -> list[str]:
    data = results.get("processes")
    if not data:
        return []
    n = data["frontends"]
    lines = [
        f"## One process or several (`--frontends 1` against `{n}`)",
        "",
        f"`svertka serve --frontends {n}` runs a supervisor, one engine process and {n} gRPC frontend "
        "processes on one port, each frontend handing request rows to the engine through shared memory "
        '(docs/engine.md, "Processes"). Both layouts are served at once and measured in turn, seconds '
        f"apart, the order alternating by round (`bench/frontends.py`), perf_analyzer at concurrency "
        f"{data['concurrency']}. Server CPU is the whole process tree's, per image.",
        "",
    ]
    rows = []
    for name, layouts in data["pairs"].items():
        for layout in ("1", str(n)):
            got = layouts.get(layout) or {}
            rows.append([
                name, layout, str(len(layouts["windows"][layout])),
                f"{fmt(got.get('images_per_s_median'))} ({_span(got.get('images_per_s_range'))})",
                f"{fmt(got.get('p50_ms_median'), 2)} ({_span(got.get('p50_ms_range'), 2)})",
                f"{fmt(got.get('server_cpu_ms_per_image_median'), 2)} "
                f"({_span(got.get('server_cpu_ms_per_image_range'), 2)})",
            ])  # fmt: skip
    lines += table(
        ["model", "frontends", "rounds", "img/s median (range)", "p50 ms", "server CPU ms/image"], rows
    )
    balance = data.get("balance")
    if balance:
        lines += [
            "",
            f"How each client's calls spread over the {n} frontends of one server (each frontend's share "
            "of the frontends' CPU time over the window; SO_REUSEPORT hands out connections, not calls):",
            "",
        ]
        lines += table(
            ["client", "concurrency", "calls/s", "frontend shares", "frontends used"],
            [
                [w["client"], str(w["concurrency"]), fmt(w["calls_per_s"]),
                 " / ".join(f"{s:.2f}" for s in w["frontend_shares"]), f"{w['frontends_used']} of {n}"]
                for w in balance
            ],
        )  # fmt: skip
    return [*lines, ""]

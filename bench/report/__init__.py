"""Turns a results file of ``python -m bench`` into ``docs/benchmarks.md`` and PNG plots.

Works on the plain JSON dicts (not the dataclasses), so a report can be
re-rendered from a saved run: ``python -m bench --report-only RESULTS.json``.
Ratios come first: absolute images/s on a shared 2-core machine move with
whatever else runs, ratios measured minutes apart move much less.

One module per part of the page, in its order: ``head`` (what the page is, the
headline, the targets, the machine, the method), ``per_model`` (each model's
tables, and the profiles), ``frontend`` (the null model, shared memory and the
streaming RPC), ``pairs`` (rounds measured in pairs), ``cpu`` (CPU time per
image), ``processes`` (``--frontends 1`` against 2, how clients spread);
``numbers`` reads the results and prints cells and tables, ``plots`` draws
the PNGs.
"""

from __future__ import annotations

from pathlib import Path

from bench import gpu_report
from bench.report import cpu, frontend, head, pairs, per_model, processes
from bench.report.numbers import p99_at_throughput, summary
from bench.report.plots import plot_batches, plot_latency, plot_throughput

__all__ = ["FINDINGS", "p99_at_throughput", "render", "summary", "write"]

#: Hand-written reading of a full run (profile findings, suggestions, A/B results with their commands),
#: appended to the full report. Quick runs leave it out: their numbers are not the ones it cites.
FINDINGS = Path(__file__).resolve().parents[1] / "findings.md"


def render(results: dict, img_rel: str, findings: Path | None = None) -> str:
    meta = results["meta"]
    bound = meta["plan"]["latency_bound_ms"]
    lines = head.header(meta)
    lines += head.headline(results)
    lines += ["", "### Targets (issue 7; measured, not asserted)", ""] + head.targets(results)
    lines += head.machine(meta)
    lines += head.method(results)
    lines += ["## Results per model", ""]
    for model in results["models"]:
        lines += per_model.model_section(model, img_rel, bound)
    if results.get("frontend"):
        lines += frontend.frontend_section(results["frontend"])
    for key, heading, intro in frontend.CLIENT_MODES:
        lines += frontend.mode_section(results, key, heading, intro)
    lines += pairs.paired_section(results)
    lines += pairs.paired_c1_section(results)
    lines += cpu.cpu_section(results)
    lines += processes.processes_section(results)
    for model in results["models"]:
        lines += per_model.profile_section(model)
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

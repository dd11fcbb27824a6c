"""``bench.gpu``'s results JSON -> a markdown page (``docs/benchmarks-gpu.md``)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import modelstats


def _f(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _best(points: list[dict]) -> dict | None:
    ok = [p for p in points or [] if p.get("images_per_s")]
    return max(ok, key=lambda p: p["images_per_s"]) if ok else None


def _at(points: list[dict], concurrency: int) -> dict | None:
    return next((p for p in points or [] if p["concurrency"] == concurrency and p.get("images_per_s")), None)


def _ceiling_best(model: dict) -> dict | None:
    return max(model["ceiling"]["points"], key=lambda p: p["images_per_s"]) if model.get("ceiling") else None


def _batch1_ms(model: dict) -> float | None:
    points = (model.get("ceiling") or {}).get("points", [])
    return next((p["latency_ms"]["p50"] for p in points if p["batch_size"] == 1), None)


def summary_rows(results: dict) -> list[str]:
    """One line per model: ceiling, best served (message / shared memory), ratios, c=1 overhead."""
    rows = [
        "| model | GPU alone (no copies), best img/s | ceiling (server's session), best img/s | "
        "served, best img/s (messages) | served, best img/s (shared memory) | served/ceiling "
        "(best of the two) | c=1 p50 (shared memory) vs batch-1 ceiling p50 |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in results["models"]:
        if m.get("error") and not m.get("ceiling"):
            rows.append(f"| {m['name']} | failed: {m['error']} | | | | | |")
            continue
        ceil = _ceiling_best(m)
        alone = max((p["images_per_s"] for p in m.get("device_resident", [])), default=None)
        msg, shm = _best(m.get("perf", [])), _best(m.get("perf_shm", []))
        served = max((p["images_per_s"] for p in (msg, shm) if p), default=None)
        ratio = served / ceil["images_per_s"] if served and ceil else None
        c1 = _at(m.get("perf_shm", []), 1)
        b1 = _batch1_ms(m)
        overhead = (
            f"{c1['latency_ms']['p50']:.2f} vs {b1:.2f} ms ({c1['latency_ms']['p50'] - b1:+.2f} ms)"
            if c1 and b1 is not None
            else "–"
        )
        rows.append(
            f"| {m['name']} | {_f(alone)} | {_f(ceil and ceil['images_per_s'])} (batch {ceil and ceil['batch_size']}) "
            f"| {_f(msg and msg['images_per_s'])} (c={msg and msg['concurrency']}) "
            f"| {_f(shm and shm['images_per_s'])} (c={shm and shm['concurrency']}) | {_f(ratio, 2)} | {overhead} |"
        )
    return rows


def _best_rate(points: list[dict] | None) -> float | None:
    best = _best(points or [])
    return best and best["images_per_s"]


def _variants_summary(m: dict, variants: dict, names: dict) -> list[str]:
    """One row per variant: its best ceiling and its shared-memory rate per concurrency, over the baseline's."""
    base = {p["concurrency"]: p.get("images_per_s") for p in m.get("perf_shm") or []}
    levels = sorted(base)
    out = [
        "One setting changed from the baseline above, served minutes after it (ratios: variant over baseline, "
        "tensors in system shared memory):",
        "",
        "| variant | ceiling, best img/s | over baseline | " + " | ".join(f"c={c}" for c in levels) + " |",
        "|---|---|---|" + "---|" * len(levels),
    ]
    base_ceiling = _best_rate((m.get("ceiling") or {}).get("points"))
    for variant, entry in variants.items():
        if entry.get("error"):
            out.append(f"| {names[variant][1]} | failed: `{entry['error']}` | |" + " |" * len(levels))
            continue
        best = _best_rate((entry.get("ceiling") or {}).get("points"))
        rates = {p["concurrency"]: p.get("images_per_s") for p in entry.get("perf_shm") or []}
        ratios = [_f(rates.get(c) / base[c], 2) if rates.get(c) and base.get(c) else "–" for c in levels]
        over = _f(best / base_ceiling, 2) if best and base_ceiling else "–"
        out.append(f"| {names[variant][1]} | {_f(best)} | {over} | " + " | ".join(ratios) + " |")
    return [*out, ""]


def _model_section(m: dict) -> list[str]:
    out = [f"#### {m['name']}", ""]
    if m.get("error"):
        out += [f"Failed: `{m['error']}`", ""]
    if m.get("model_info"):
        out += ["The server's `svertka_model_info`: `" + "`, `".join(m["model_info"]) + "`", ""]
    if m.get("ceiling"):
        alone = {p["batch_size"]: p for p in m.get("device_resident", [])}
        out += [
            f"Ceiling: onnxruntime {m['ceiling']['provider']} through the server's session (IO binding: one copy "
            "to the GPU and one back per batch), and the same graph with input and output left on the GPU.",
            "",
            "| batch | img/s (server's session) | p50 ms | img/s (GPU alone) | p50 ms |",
            "|---|---|---|---|---|",
        ]
        for p in m["ceiling"]["points"]:
            a = alone.get(p["batch_size"])
            out.append(
                f"| {p['batch_size']} | {_f(p['images_per_s'])} | {p['latency_ms']['p50']:.2f} | "
                f"{_f(a and a['images_per_s'])} | {_f(a and a['latency_ms']['p50'], 2)} |"
            )
        out.append("")
    from bench.gpu import VARIANTS

    tables = [
        ("perf", "tensors in the gRPC messages", m.get("perf")),
        ("perf_shm", "tensors in system shared memory", m.get("perf_shm")),
        # runs before the variants: the one comparison they made
        (
            "unpadded",
            f"tensors in system shared memory, {VARIANTS['unpadded'][1]}",
            m.get("unpadded_perf_shm"),
        ),
    ]
    variants = m.get("variants") or {}
    if variants:
        out += _variants_summary(m, variants, VARIANTS)
    for variant, entry in variants.items():
        title = f"tensors in system shared memory, {VARIANTS[variant][1]}"
        tables.append((variant, title, entry.get("perf_shm")))
    for _key, title, points in tables:
        points = points or []
        if not points:
            continue
        out += [
            f"perf_analyzer, closed loop, batch 1 per request, {title}:",
            "",
            "| concurrency | img/s | p50 ms | p99 ms | mean batch | batch sizes seen | server compute per request, mean ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in points:
            if not p.get("images_per_s"):
                out.append(f"| {p['concurrency']} | no stable measurement ({p.get('error', '')}) | | | | | |")
                continue
            batches = {int(k): v for k, v in p["batches"].items()}
            out.append(
                f"| {p['concurrency']} | {_f(p['images_per_s'])} | {p['latency_ms']['p50']:.2f} | "
                f"{p['latency_ms']['p99']:.2f} | {modelstats.mean_batch_size(batches):.1f} | {len(batches)} | "
                f"{p['breakdown_us'].get('Server Compute Infer', float('nan')) / 1e3:.2f} |"
            )
        out.append("")
    if m.get("image"):
        out += [
            "Image API (1024x768 JPEGs decoded by the server), svertka's closed-loop load generator:",
            "",
            "| concurrency | img/s | p50 ms | p99 ms | errors |",
            "|---|---|---|---|---|",
        ]
        for r in m["image"]:
            out.append(
                f"| {r['load']:g} | {_f(r['images_per_s'])} | {r['latency_ms']['p50']:.2f} | "
                f"{r['latency_ms']['p99']:.2f} | {r['errors']} |"
            )
        out.append("")
    if m.get("image_gpu_decode") or m.get("image_gpu_decode_error"):
        out += ["The same with `--image-decoder gpu` (JPEGs decoded by nvImageCodec, full size):", ""]
        if m.get("image_gpu_decode_error"):
            out += [f"Failed: `{m['image_gpu_decode_error']}`", ""]
        else:
            out += ["| concurrency | img/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|"]
            for r in m["image_gpu_decode"]:
                out.append(
                    f"| {r['load']:g} | {_f(r['images_per_s'])} | {r['latency_ms']['p50']:.2f} | "
                    f"{r['latency_ms']['p99']:.2f} | {r['errors']} |"
                )
            out.append("")
    return out


#: Hand-written reading of the GPU runs (what each showed, what changed between them), put on the page.
FINDINGS = Path(__file__).resolve().parent / "gpu_findings.md"
#: The GPU runs' results files, committed (``run-1.json``, ``run-2.json``, ...).
RUNS = Path(__file__).resolve().parent.parent / "docs" / "gpu"


def committed_runs(folder: Path = RUNS) -> list[dict]:
    """The committed GPU runs, oldest first."""
    paths = sorted(folder.glob("run-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [json.loads(p.read_text()) for p in paths]


def headline(runs: list[dict]) -> list[str]:
    """Each run's summary table, for the CPU page's GPU section."""
    out = []
    for index, results in enumerate(runs, start=1):
        meta = results["meta"]
        gpu = (meta.get("gpu") or {}).get("name", "no GPU")
        out += [
            f"Run {index} ({gpu}, commit {meta['machine']['git_commit']}, {meta['started'][:10]}):",
            "",
            *summary_rows(results),
            "",
        ]
    return out


def _run_section(index: int, results: dict) -> list[str]:
    meta = results["meta"]
    gpu = meta.get("gpu") or {}
    machine = meta["machine"]
    out = [
        f"## Run {index}: commit {machine['git_commit']}",
        "",
        f"- GPU: {gpu.get('name', 'none')} ({gpu.get('memory', '?')}, driver {gpu.get('driver', '?')})",
        f"- CPU: {machine['cpu']}, {machine['cpus_usable']} usable; Python {machine['python']}",
        f"- onnxruntime {meta['onnxruntime']}, providers in the build: {', '.join(meta['available_providers'])}; "
        f"used: {', '.join(meta['providers'])}",
        f"- TensorRT: {meta.get('tensorrt', 'not tried')}",
        f"- {meta['perf_analyzer']}; run {meta['started']} to {meta.get('finished', '(cut short)')}",
        f"- Command: `{' '.join(meta['argv'])}`; plan: {meta['plan']}",
        "",
        "### Summary",
        "",
        *summary_rows(results),
        "",
    ]
    for m in results["models"]:
        out += _model_section(m)
    out += frontends_rows(results.get("frontends") or {})
    out += agreement_rows(results.get("decode_agreement"))
    return out


def agreement_rows(agreement: dict | None) -> list[str]:
    """``bench.decode_agreement``: do ``--image-decoder cpu`` and ``gpu`` classify alike?"""
    if not agreement:
        return []
    out = ["### JPEG decoders: `--image-decoder cpu` against `gpu` (`bench.decode_agreement`)", ""]
    if agreement.get("error"):
        return [*out, f"Failed: `{agreement['error']}`", ""]
    diff = agreement["photo_mean_abs_diff"]
    return [
        *out,
        f"nvImageCodec on its {agreement['backend'].upper()} backend. Digits (trained model, "
        f"{agreement['digits_images']} validation images as 256x256 JPEGs): top-1 agreement "
        f"{agreement['digits_top1_agreement']:.4f}, accuracy {agreement['digits_accuracy_cpu']:.4f} (cpu) and "
        f"{agreement['digits_accuracy_gpu']:.4f} (gpu). The {agreement['photos']} benchmark photographs' 224x224 "
        f"crops differ by {diff['mean']:.2f} grey levels on average (at most {diff['max']:.2f} for one photo).",
        "",
    ]


def frontends_rows(sweeps: dict[str, list[dict]]) -> list[str]:
    """``svertka serve --frontends N`` per model: requests/s, its growth over N=1, CPU, served/ceiling."""
    if not sweeps:
        return []
    out = [
        "### Frontend processes (`svertka serve --frontends N`)",
        "",
        "perf_analyzer with every context on a connection of its own "
        "(`TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT=1`). Growth: requests/s over those of one "
        "process, against N.",
        "",
        "| model | frontends | concurrency | requests/s | growth (vs N) | p50 ms | server CPU ms/request "
        "| served/ceiling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, points in sweeps.items():
        one = next((p.get("images_per_s") for p in points if p.get("frontends") == 1), None)
        for p in points:
            if "frontends" not in p:
                out.append(f"| {name} | failed: {p.get('error')} | | | | | | |")
                continue
            rate = p.get("images_per_s")
            growth = f"{rate / one:.2f} (vs {p['frontends']})" if rate and one else "–"
            out.append(
                f"| {name} | {p['frontends']} | {p['concurrency']} | {_f(rate)} | {growth} "
                f"| {_f(p.get('p50_ms'), 2)} | {_f(p.get('server_cpu_ms_per_request'), 2)} "
                f"| {_f(p.get('served_over_ceiling'), 2)} |"
            )
    return [*out, ""]


def render(runs: list[dict], findings: Path | None = FINDINGS) -> str:
    out = [
        "# svertka on a GPU",
        "",
        "Measured by `python -m bench.gpu` (see its docstring) on a machine lent with a GPU, through "
        "`bash bench/gpu_machine.sh BUNDLE RESULTS` there; the results files are in `docs/gpu/`, and this "
        "page is rendered from them by `python -m bench.gpu --report-only docs/gpu/run-*.json`. The CPU "
        "benchmark is in [benchmarks.md](benchmarks.md).",
        "",
    ]
    if findings and findings.is_file():
        out += [findings.read_text().strip(), ""]
    for index, results in enumerate(runs, start=1):
        out += _run_section(index, results)
    return "\n".join(out) + "\n"


def write(runs: list[dict], path: Path, findings: Path | None = FINDINGS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(runs, findings))

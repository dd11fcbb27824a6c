"""Served over ceiling, measured in pairs: each served window right after its own ceiling window.

The ceiling in ``make bench``'s tables is measured before and after the
servers, minutes apart from the served windows, and on a shared machine
onnxruntime's own speed moves by a tenth or more between such windows
(docs/benchmarks.md, findings). A ratio of two numbers taken minutes apart
carries that movement. Here every round takes both within seconds of each
other and gives one ratio; the spread of the rounds shows how far a single
ratio can be trusted. ``make bench`` runs such rounds (``measure_rounds``)
after each model's tensor-API sweep and again for the image API; on its own::

    python -m bench.paired --model-path M --name N [--api tensor|image] [--concurrency 16] [--rounds 5]
    python -m bench.paired --model-path M --name N --latency [--rounds 5]

Each round: the ceiling (onnxruntime alone, ``bench.ceiling``'s loop on the
server's own session settings, in this process) at each of ``--batches`` for
``--ceiling-s`` seconds, the best of them; then the served rate at
``--concurrency`` on a running ``svertka serve`` (tensor API: perf_analyzer, as
``make bench`` runs it; image API: bench.loadgen's closed loop over the
benchmark's JPEGs). The server is idle while the ceiling runs, and the ceiling's
session is idle while the server is loaded.

``--latency`` asks the same of the concurrency-1 target (served p50 within a
millisecond of onnxruntime's own batch-1 p50): each round times onnxruntime
alone at batch 1, then perf_analyzer at concurrency 1 over unary calls and
over the streaming RPC, and gives the served p50 minus that round's raw p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
WORK = REPO_ROOT / ".bench" / "paired"


def ratios(served: list[float | None], ceilings: list[float]) -> list[float]:
    """One served/ceiling ratio per round; a round whose served rate did not stabilise gives none."""
    return [s / c for s, c in zip(served, ceilings, strict=True) if s]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "rounds": len(values),
    }


def measure_rounds(
    session_run: Callable[[np.ndarray], object],
    inputs: dict[int, np.ndarray],
    ceiling_s: float,
    served: Callable[[], float | None],
    rounds: int,
    log: Callable[[str], None] = print,
) -> dict:
    """``rounds`` pairs of (the ceiling: ``session_run`` on each of ``inputs`` for ``ceiling_s``, the best;
    then ``served()``: the served images/s, None if it did not stabilise) -> rates, one ratio per round, summary.
    """
    from bench import ceiling

    ceilings: list[float] = []
    batches: list[int] = []
    rates: list[float | None] = []
    for r in range(rounds):
        points = [ceiling.time_batch(lambda x=x: session_run(x), b, ceiling_s) for b, x in inputs.items()]
        best = max(points, key=lambda p: p.images_per_s)
        rate = served()
        ceilings.append(best.images_per_s)
        batches.append(best.batch_size)
        rates.append(rate)
        shown = f"{rate:7.1f}" if rate else "unstable"
        ratio = f"{rate / best.images_per_s:.3f}" if rate else "-"
        log(f"round {r + 1}: ceiling {best.images_per_s:7.1f} img/s (batch {best.batch_size}), "
            f"served {shown} img/s, served/ceiling {ratio}")  # fmt: skip
    values = ratios(rates, ceilings)
    return {"ceiling": ceilings, "ceiling_batch": batches, "served": rates, "ratios": values,
            "summary": summary(values) if values else None}  # fmt: skip


def measure_latency_rounds(
    session_run: Callable[[np.ndarray], object],
    x: np.ndarray,
    seconds: float,
    served_p50: dict[str, Callable[[], float | None]],
    rounds: int,
    log: Callable[[str], None] = print,
) -> dict:
    """``rounds`` pairs of (onnxruntime alone: ``session_run(x)`` on one image for ``seconds``, its p50;
    then each of ``served_p50``: the served p50 at concurrency 1 in ms, None if it did not stabilise)
    -> the p50s, the served overhead over the raw p50 of the same round, and its summary per mode.
    """
    from bench import ceiling

    raw: list[float] = []
    served: dict[str, list[float | None]] = {mode: [] for mode in served_p50}
    for r in range(rounds):
        p50 = ceiling.time_batch(lambda: session_run(x), 1, seconds).latency_ms["p50"]
        raw.append(p50)
        shown = []
        for mode, measure in served_p50.items():
            value = measure()
            served[mode].append(value)
            shown.append(
                f"{mode} {value:.2f} ms ({value - p50:+.2f})" if value is not None else f"{mode} unstable"
            )
        log(f"round {r + 1}: onnxruntime alone at batch 1 p50 {p50:.2f} ms; served p50 " + ", ".join(shown))
    overhead = {
        mode: [s - p for s, p in zip(values, raw, strict=True) if s is not None]
        for mode, values in served.items()
    }
    return {"raw_p50": raw, "served_p50": served, "overhead_ms": overhead,
            "summary": {mode: summary(values) for mode, values in overhead.items() if values}}  # fmt: skip


def served_rate(
    url: str,
    name: str,
    concurrency: int,
    settings,
    workdir: Path,
    *,
    jpegs: list[bytes] | None = None,
    seconds: float = 4.0,
    warmup_s: float = 1.0,
) -> float | None:
    """The served images/s at ``concurrency``: perf_analyzer on the tensor API (``bench.perf`` ``settings``),
    or with ``jpegs`` the image API's closed loop for ``seconds``; None if perf_analyzer did not stabilise."""
    from bench import loadgen, perf

    if jpegs:
        return asyncio.run(loadgen.image_closed_loop(url, name, jpegs, concurrency=concurrency, duration_s=seconds,
                                                     warmup_s=warmup_s)).images_per_s  # fmt: skip
    return perf.run_level(url, name, concurrency, settings, workdir).images_per_s


def served_p50(url: str, name: str, settings, workdir: Path, mode: str) -> float | None:
    """perf_analyzer's p50 in ms at concurrency 1 over unary calls or (``mode`` "streaming") the streaming RPC;
    None if it did not stabilise."""
    from bench import perf

    point = perf.run_level(url, name, 1, settings, workdir, streaming=mode == "streaming")
    return point.latency_ms["p50"] if point.images_per_s else None


def _print_now(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--api", choices=["tensor", "image"], default="tensor")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency", action="store_true",
                        help="concurrency-1 overhead (tensor API, unary and streaming) instead of served/ceiling")  # fmt: skip
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32], help="ceiling batch sizes")
    parser.add_argument("--ceiling-s", type=float, default=2.0, help="seconds per ceiling batch size")
    parser.add_argument(
        "--served-s", type=float, default=4.0, help="perf_analyzer interval / image-API window"
    )
    args = parser.parse_args(argv)

    from bench import ceiling, images, perf, target
    from service import config
    from service.engine import runtime

    settings = config.ModelSettings.load(args.model_path.parent.parent)
    session = runtime.Session(args.model_path, settings)
    if args.latency:
        args.api, args.concurrency, args.batches = "tensor", 1, [1]
    inputs = dict(ceiling.ready_batches(session.meta, args.batches))
    jpegs = images.load_jpegs(REPO_ROOT / ".bench" / "images") if args.api == "image" else []
    perf_settings = perf.PerfSettings(round(args.served_s * 1000), 30, 6)
    repo = target.single_model_repository(args.model_path, args.name, WORK / "repos")
    with target.serve(repo, log_path=WORK / f"svertka-{args.name}.log") as server:

        def served() -> float | None:
            return served_rate(server.grpc_url, args.name, args.concurrency, perf_settings, WORK / "perf",
                               jpegs=jpegs, seconds=args.served_s)  # fmt: skip

        if args.latency:
            modes = {
                mode: (
                    lambda mode=mode: served_p50(
                        server.grpc_url, args.name, perf_settings, WORK / "perf", mode
                    )
                )
                for mode in ("unary", "streaming")
            }
            result = measure_latency_rounds(session.run, inputs[1], args.ceiling_s, modes, args.rounds,
                                            log=_print_now)  # fmt: skip
        else:
            result = measure_rounds(session.run, inputs, args.ceiling_s, served, args.rounds, log=_print_now)
    session.close()
    if args.latency:
        for mode, s in result["summary"].items():
            print(f"{args.name}, concurrency 1, {mode}: served p50 - onnxruntime's batch-1 p50, median "
                  f"{s['median']:+.2f} ms (min {s['min']:+.2f}, max {s['max']:+.2f}) over {s['rounds']} rounds")  # fmt: skip
        out = WORK / f"{args.name}-c1-latency.json"
        out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **result}, indent=1))
        print(f"results: {out}")
        return 0 if result["summary"] else 1
    if result["summary"] is None:
        print("no round gave a stable served rate", file=sys.stderr)
        return 1
    s = result["summary"]
    print(f"{args.name}, {args.api} API, concurrency {args.concurrency}: served/ceiling median {s['median']:.3f} "
          f"(min {s['min']:.3f}, max {s['max']:.3f}) over {s['rounds']} rounds")  # fmt: skip
    out = WORK / f"{args.name}-{args.api}-c{args.concurrency}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **result}, indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Served over ceiling, measured in pairs: each served window right after its own ceiling window.

The ceiling in ``make bench``'s tables is measured before and after the
servers, minutes apart from the served windows, and on a shared machine
onnxruntime's own speed moves by a tenth or more between such windows
(docs/benchmarks.md, findings). A ratio of two numbers taken minutes apart
carries that movement. Here every round takes both within seconds of each
other and gives one ratio; the spread of the rounds shows how far a single
ratio can be trusted. ``make bench`` runs such rounds (``measure_rounds``)
after each model's tensor-API sweep; on its own::

    python -m bench.paired --model-path M --name N [--api tensor|image] [--concurrency 16] [--rounds 5]

Each round: the ceiling (onnxruntime alone, ``bench.ceiling``'s loop on the
server's own session settings, in this process) at each of ``--batches`` for
``--ceiling-s`` seconds, the best of them; then the served rate at
``--concurrency`` on a running ``svertka serve`` (tensor API: perf_analyzer, as
``make bench`` runs it; image API: bench.loadgen's closed loop over the
benchmark's JPEGs). The server is idle while the ceiling runs, and the ceiling's
session is idle while the server is loaded.
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


def _print_now(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--api", choices=["tensor", "image"], default="tensor")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32], help="ceiling batch sizes")
    parser.add_argument("--ceiling-s", type=float, default=2.0, help="seconds per ceiling batch size")
    parser.add_argument(
        "--served-s", type=float, default=4.0, help="perf_analyzer interval / image-API window"
    )
    args = parser.parse_args(argv)

    from bench import ceiling, images, loadgen, perf, target
    from service import config, runtime

    settings = config.ModelSettings.load(args.model_path.parent.parent)
    session = runtime.Session(args.model_path, settings)
    inputs = dict(ceiling.ready_batches(session.meta.input_shape, args.batches))
    jpegs = images.load_jpegs(REPO_ROOT / ".bench" / "images") if args.api == "image" else []
    perf_settings = perf.PerfSettings(round(args.served_s * 1000), 30, 6)
    repo = target.single_model_repository(args.model_path, args.name, WORK / "repos")
    with target.serve(repo, log_path=WORK / f"svertka-{args.name}.log") as server:

        def served() -> float | None:
            if args.api == "tensor":
                return perf.run_level(
                    server.grpc_url, args.name, args.concurrency, perf_settings, WORK / "perf"
                ).images_per_s
            return asyncio.run(loadgen.image_closed_loop(
                server.grpc_url, args.name, jpegs, concurrency=args.concurrency, duration_s=args.served_s,
                warmup_s=1.0)).images_per_s  # fmt: skip

        result = measure_rounds(session.run, inputs, args.ceiling_s, served, args.rounds, log=_print_now)
    session.close()
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

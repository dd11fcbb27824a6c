"""``python -m bench``: the whole benchmark in one run, then the report.

For each model: the onnxruntime ceiling; svertka under perf_analyzer (tensor
API, closed loop), under svertka's own load generator (image API with real
JPEGs, closed loop) and under Poisson arrivals (latency-bounded throughput,
both APIs); then the same perf_analyzer and Poisson load against the peer
(Triton via PyTriton) serving the same ONNX file. The ceiling is measured
again after the servers and the higher of the two kept, so that a burst of
background load during the first pass cannot flatter the served/ceiling ratio.
Results go to a JSON file; ``bench.report`` turns that into
``docs/benchmarks.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

from bench import ceiling, cpu, images, loadgen, machine, models, paired, peer, perf, target
from bench import profile as profiler

REPO_ROOT = Path(__file__).resolve().parent.parent
WORK = REPO_ROOT / ".bench"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long and how wide to measure; ``QUICK`` only proves that the pipeline works."""

    ceiling_s_per_batch: float
    perf: perf.PerfSettings
    concurrencies: tuple[int, ...]
    image_concurrencies: tuple[int, ...]
    load_s: float
    warmup_s: float
    rate_steps: int
    #: perf_analyzer levels measured again with tensors in system shared memory (same-host clients).
    shm_concurrencies: tuple[int, ...] = ()
    #: perf_analyzer levels measured again over the streaming RPC (ModelStreamInfer, throughput clients).
    stream_concurrencies: tuple[int, ...] = ()
    latency_bound_ms: float = 100.0
    #: Rounds of (ceiling, served at the best concurrency) measured seconds apart (``bench.paired``).
    paired_rounds: int = 0
    #: The same rounds for the concurrency-1 target: onnxruntime's batch-1 p50, then the served p50 over these
    #: perf_analyzer modes ("unary", "streaming").
    paired_c1_modes: tuple[str, ...] = ()
    #: ``--frontends 1`` against ``--frontends 2``: rounds of pairs per model (``bench.frontends``).
    frontends_rounds: int = 0
    #: How each client's calls spread over two frontends, at these concurrencies (none: skipped).
    balance_concurrencies: tuple[int, ...] = ()


FULL = Plan(
    ceiling_s_per_batch=3.0,
    perf=perf.PerfSettings(measurement_interval_ms=2500, stability_percentage=25, max_trials=5),
    concurrencies=(1, 2, 4, 8, 12, 16),
    image_concurrencies=(1, 4, 8, 16),
    load_s=8.0,
    warmup_s=2.0,
    rate_steps=5,
    shm_concurrencies=(1, 4, 16),
    stream_concurrencies=(1, 4, 16),
    paired_rounds=5,
    paired_c1_modes=("unary", "streaming"),
    frontends_rounds=3,
    balance_concurrencies=(1, 2, 4, 8, 16),
)
QUICK = Plan(
    ceiling_s_per_batch=0.2,
    perf=perf.PerfSettings(measurement_interval_ms=500, stability_percentage=50, max_trials=3),
    concurrencies=(1, 4),
    image_concurrencies=(1, 4),
    load_s=1.0,
    warmup_s=0.3,
    rate_steps=2,
    shm_concurrencies=(1,),
    stream_concurrencies=(1,),
    paired_rounds=1,
    paired_c1_modes=("unary",),
    frontends_rounds=1,
)

#: svertka under test lets perf_analyzer use system shared memory (it changes nothing for other requests).
SERVE_ARGS = ("--allow-shared-memory",)


#: The profiled load: enough concurrency for full batches, long enough for a few thousand samples.
PROFILE_CONCURRENCY = 8
PROFILE_SECONDS = 10.0
#: Profiled models: the big one (compute-bound) and the small one (where per-request work shows).
PROFILED = ("resnet18", "digits")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _asdict(obj):
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


async def _image_api(url: str, model: str, jpegs: list[bytes], plan: Plan, pid: int) -> dict:
    """Closed loop at each image concurrency, metering the server's and this client's CPU; then the rate search."""
    channel = loadgen.channel(url)
    try:
        call = loadgen.image_caller(channel, model, jpegs)
        closed = []
        for c in plan.image_concurrencies:
            span = cpu.Span(url, model, pid, "self")
            result = await loadgen.closed_loop(
                call, concurrency=c, duration_s=plan.load_s, warmup_s=plan.warmup_s
            )
            _, use = span.stop()
            log(f"  image c={c:2d}: {result.images_per_s:7.1f} img/s  p50 {result.latency_ms['p50']:6.1f} ms  "
                f"p99 {result.latency_ms['p99']:6.1f} ms{'  errors ' + str(result.errors) if result.errors else ''}")  # fmt: skip
            closed.append({**_asdict(result), "cpu": _asdict(use)})
        best = max((r["images_per_s"] for r in closed), default=1.0)
        log(f"  image API: highest Poisson rate with p99 < {plan.latency_bound_ms:g} ms")
        rate = await loadgen.latency_bounded_rate(
            call, bound_ms=plan.latency_bound_ms, start_rate=max(1.0, 0.5 * best), duration_s=plan.load_s,
            warmup_s=plan.warmup_s, steps=plan.rate_steps, kind="image", log=log,
        )  # fmt: skip
        return {"closed": closed, "rate": _asdict(rate)}
    finally:
        await channel.close()


async def _tensor_rate(url: str, model: str, start_rate: float, plan: Plan) -> dict:
    channel = loadgen.channel(url)
    try:
        call = await loadgen.tensor_caller(channel, model)
        log(f"  tensor API: highest Poisson rate with p99 < {plan.latency_bound_ms:g} ms")
        rate = await loadgen.latency_bounded_rate(
            call, bound_ms=plan.latency_bound_ms, start_rate=max(1.0, start_rate), duration_s=plan.load_s,
            warmup_s=plan.warmup_s, steps=plan.rate_steps, kind="tensor", log=log,
        )  # fmt: skip
        return _asdict(rate)
    finally:
        await channel.close()


def _best_perf(points: list[perf.PerfPoint]) -> float:
    return max((p.images_per_s for p in points if p.images_per_s), default=1.0)


def _in_turn(servers: dict[str, tuple[str, int]], model: str, levels: list[int], settings: perf.PerfSettings,
             workdir: Path, **flags) -> dict[str, list[perf.PerfPoint]]:  # fmt: skip
    """perf_analyzer at each level on every server (name -> (gRPC address, pid)), one after the other.

    The servers take turns level by level, in alternating order (svertka then the peer, then the peer then
    svertka, ...), so the two points of a level are measured seconds apart: the machine's speed drifts by
    a third or more over the minutes a whole sweep takes, and a sweep of one server followed by a sweep of
    the other would compare two different machines. Each server idles while the other is loaded.
    """
    names = list(servers)
    points: dict[str, list[perf.PerfPoint]] = {name: [] for name in names}
    for i, c in enumerate(levels):
        for name in names if i % 2 == 0 else names[::-1]:
            url, pid = servers[name]
            tag = f"  {name}" if len(names) > 1 else ""
            points[name] += perf.sweep(url, model, [c], settings, workdir / name, lambda s, tag=tag: log(tag + s),
                                       server_pid=pid, **flags)  # fmt: skip
    return points


def _client_modes(
    servers: dict[str, tuple[str, int]], model: str, plan: Plan, workdir: Path
) -> dict[str, dict]:
    """perf_analyzer again, the same requests carried two other ways, the servers in turn (``_in_turn``).

    ``shm``: the tensors in system shared memory instead of the messages (same-host clients);
    ``stream``: one ModelStreamInfer stream per client thread instead of a unary call per request.
    -> server name -> {"shm": [...], "stream": [...]}.
    """
    out: dict[str, dict] = {name: {} for name in servers}
    for key, levels, title, flags in (
        ("shm", plan.shm_concurrencies, "over system shared memory", {"shared_memory": True}),
        ("stream", plan.stream_concurrencies, "over the streaming RPC", {"streaming": True}),
    ):
        if levels:
            log(f"  tensor API {title}, perf_analyzer closed loop")
        points = _in_turn(servers, model, list(levels), plan.perf, workdir, **flags)
        for name in servers:
            out[name][key] = [_asdict(p) for p in points[name]]
    return out


#: Ceiling batch sizes in each paired round: the first ceiling pass's fastest.
PAIRED_BATCHES = 3


def _paired(m: models.BenchModel, settings, url: str, levels: list[tuple[int, float | None]],
            first: ceiling.Ceiling, plan: Plan, workdir: Path, jpegs: list[bytes] | None = None) -> dict | None:  # fmt: skip
    """Rounds of the ceiling (onnxruntime alone, the first pass's fastest batch sizes) followed within seconds
    by the served rate at the best concurrency of ``levels`` ((concurrency, images/s) measured before), while
    the server is idle between them (``bench.paired``): perf_analyzer, or with ``jpegs`` the image API's
    closed loop."""
    from service.engine import runtime

    stable = [(c, rate) for c, rate in levels if rate]
    if not stable:
        return None
    concurrency = max(stable, key=lambda level: level[1])[0]
    fastest = sorted(first.points, key=lambda p: p.images_per_s, reverse=True)[:PAIRED_BATCHES]
    load = "the image API's closed loop" if jpegs else "perf_analyzer"
    log(f"  paired rounds: the ceiling at batch {', '.join(str(p.batch_size) for p in fastest)}, then "
        f"{load} at concurrency {concurrency}; {plan.paired_rounds} rounds")  # fmt: skip
    session = runtime.Session(m.path, settings)
    inputs = dict(ceiling.ready_batches(session.meta, sorted(p.batch_size for p in fastest)))

    def served_rate() -> float | None:
        return paired.served_rate(url, m.name, concurrency, plan.perf, workdir / "perf" / "paired", jpegs=jpegs,
                                  seconds=plan.load_s, warmup_s=plan.warmup_s)  # fmt: skip

    try:
        result = paired.measure_rounds(
            session.run,
            inputs,
            plan.ceiling_s_per_batch,
            served_rate,
            plan.paired_rounds,
            log=lambda s: log("    " + s),
        )
    finally:
        session.close()
    return {"concurrency": concurrency, **result}


def _paired_c1(m: models.BenchModel, settings, url: str, plan: Plan, workdir: Path) -> dict:
    """Rounds of onnxruntime alone at batch 1 followed within seconds by perf_analyzer at concurrency 1
    (each of ``plan.paired_c1_modes``): the concurrency-1 overhead, one per round (``bench.paired``)."""
    from service.engine import runtime

    log(f"  paired concurrency-1 rounds: onnxruntime alone at batch 1, then perf_analyzer at concurrency 1 "
        f"({', '.join(plan.paired_c1_modes)}); {plan.paired_rounds} rounds")  # fmt: skip
    session = runtime.Session(m.path, settings)
    x = dict(ceiling.ready_batches(session.meta, [1]))[1]

    def served_p50(mode: str) -> float | None:
        return paired.served_p50(url, m.name, plan.perf, workdir / "perf" / "paired", mode)

    modes = {mode: (lambda mode=mode: served_p50(mode)) for mode in plan.paired_c1_modes}
    try:
        return paired.measure_latency_rounds(session.run, x, plan.ceiling_s_per_batch, modes, plan.paired_rounds,
                                             log=lambda s: log("    " + s))  # fmt: skip
    finally:
        session.close()


def _serve_peer(m: models.BenchModel, settings, threads: int, workdir: Path):
    """The peer serving ``m`` with svertka's batching settings and thread budget."""
    return peer.serve(m.path, m.name, threads=threads, max_batch_size=settings.max_batch_size,
                      max_queue_delay_ms=settings.max_queue_delay_ms,
                      log_path=workdir / "logs" / f"peer-{m.name}.log")  # fmt: skip


@contextlib.contextmanager
def _servers(m: models.BenchModel, repo: Path, settings, threads: int, with_peer: bool, workdir: Path):
    """svertka serving ``repo`` and, if ``with_peer``, the peer serving the same model, both up until the block
    exits -> (svertka, peer or None, name -> (gRPC address, pid) of each, as ``_in_turn`` takes them)."""
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(
            target.serve(repo, log_path=workdir / "logs" / f"svertka-{m.name}.log", args=SERVE_ARGS)
        )
        p = stack.enter_context(_serve_peer(m, settings, threads, workdir)) if with_peer else None
        yield (
            server,
            p,
            {"svertka": (server.grpc_url, server.pid), **({"peer": (p.grpc_url, p.pid)} if p else {})},
        )


def bench_model(
    m: models.BenchModel, plan: Plan, jpegs: list[bytes], *, with_peer: bool, profile: bool, workdir: Path
) -> dict:
    from service import config
    from service.engine import runtime

    settings = config.ModelSettings.load(m.path.parent.parent)
    threads = runtime.intra_op_threads(settings)  # what svertka serve gives each instance by default
    out: dict = {"name": m.name, "label": m.label, "path": str(m.path), "max_batch_size": settings.max_batch_size,
                 "max_queue_delay_ms": settings.max_queue_delay_ms, "threads": threads}  # fmt: skip

    log(f"{m.label}: onnxruntime ceiling ({threads} intra-op threads, batch 1..{settings.max_batch_size})")
    first = ceiling.measure(
        m.path, model=m.name, settings=settings, seconds_per_batch=plan.ceiling_s_per_batch
    )
    for p in first.points:
        log(f"  batch {p.batch_size:2d}: {p.images_per_s:7.1f} img/s  p50 {p.latency_ms['p50']:7.2f} ms")

    repo = target.single_model_repository(m.path, m.name, workdir / "repos")
    log(f"{m.label}: svertka" + (" and the peer (Triton via PyTriton, onnxruntime callable), in turn" if with_peer else ""))  # fmt: skip
    out["peer"] = None
    with _servers(m, repo, settings, threads, with_peer, workdir) as (server, p, servers):
        log("  tensor API, perf_analyzer closed loop")
        sweeps = _in_turn(servers, m.name, list(plan.concurrencies), plan.perf, workdir / "perf")
        modes = _client_modes(servers, m.name, plan, workdir / "perf")
        sv_perf = sweeps["svertka"]
        sv_image = asyncio.run(_image_api(server.grpc_url, m.name, jpegs, plan, server.pid))
        sv_rate = asyncio.run(_tensor_rate(server.grpc_url, m.name, 0.5 * _best_perf(sv_perf), plan))
        out["svertka"] = {"perf": [_asdict(p) for p in sv_perf], "perf_shm": modes["svertka"]["shm"],
                          "perf_stream": modes["svertka"]["stream"], "image": sv_image, "tensor_rate": sv_rate}  # fmt: skip
        if with_peer:
            log("  the peer:")
            pe_perf = sweeps["peer"]
            pe_rate = asyncio.run(_tensor_rate(p.grpc_url, m.name, 0.5 * _best_perf(pe_perf), plan))
            out["peer"] = {"perf": [_asdict(q) for q in pe_perf], "perf_shm": modes["peer"]["shm"],
                           "perf_stream": modes["peer"]["stream"], "tensor_rate": pe_rate}  # fmt: skip
        if plan.paired_rounds:
            levels = [(q.concurrency, q.images_per_s) for q in sv_perf]
            out["svertka"]["paired"] = _paired(m, settings, server.grpc_url, levels, first, plan, workdir)
            levels = [(int(r["load"]), r["images_per_s"]) for r in sv_image["closed"]]
            out["svertka"]["paired_image"] = _paired(m, settings, server.grpc_url, levels, first, plan, workdir,
                                                     jpegs=jpegs)  # fmt: skip
        if plan.paired_rounds and plan.paired_c1_modes:
            out["svertka"]["paired_c1"] = _paired_c1(m, settings, server.grpc_url, plan, workdir)
        if profile:
            log(f"  profile: py-spy on the server under closed-loop load, concurrency {PROFILE_CONCURRENCY}")
            out["svertka"]["profile"] = asyncio.run(profiler.profile_server(
                server, m.name, jpegs, concurrency=PROFILE_CONCURRENCY, seconds=PROFILE_SECONDS,
                workdir=workdir / "profile"))  # fmt: skip

    passes = [first]
    if plan is not QUICK:
        log(f"{m.label}: onnxruntime ceiling again (per batch size, the faster pass is kept)")
        passes.append(
            ceiling.measure(
                m.path, model=m.name, settings=settings, seconds_per_batch=plan.ceiling_s_per_batch
            )
        )
    out["ceiling_passes"] = [_asdict(c) for c in passes]
    out["ceiling"] = _asdict(ceiling.best_of(passes))
    return out


#: Concurrency levels for the null model (the frontend alone): latency at 1, capacity at the others.
FRONTEND_CONCURRENCIES = (1, 4, 16)


def bench_frontend(plan: Plan, *, with_peer: bool, workdir: Path) -> dict:
    """Both servers on the null model: what the frontend and the transport cost without compute.

    The c=1 latency is the floor under the "overhead at concurrency 1" target of
    the real models; the best rate is the most requests per second the frontend
    can answer on this machine, the ceiling for small models.
    """
    from service import config
    from service.engine import runtime

    m = models.null_model(WORK / "models")
    settings = config.ModelSettings.load(m.path.parent.parent)
    threads = runtime.intra_op_threads(settings)
    levels = [c for c in FRONTEND_CONCURRENCIES if c <= max(plan.concurrencies)]
    out: dict = {"name": m.name, "label": m.label, "path": str(m.path), "concurrencies": levels}
    repo = target.single_model_repository(m.path, m.name, workdir / "repos")
    log(f"{m.label}: svertka{' and the peer, in turn' if with_peer else ''}, perf_analyzer at concurrency "
        f"{', '.join(map(str, levels))}")  # fmt: skip
    out["peer"] = None
    with _servers(m, repo, settings, threads, with_peer, workdir) as (server, p, servers):
        points = _in_turn(servers, m.name, levels, plan.perf, workdir / "perf")
        modes = _client_modes(servers, m.name, plan, workdir / "perf")
    for name in servers:
        out[name] = [_asdict(q) for q in points[name]]
        out[f"{name}_shm"], out[f"{name}_stream"] = modes[name]["shm"], modes[name]["stream"]
    return out


def bench_processes(plan: Plan, names: list[str], available: dict, default_models: Path) -> dict:
    """``svertka serve --frontends 1`` against ``--frontends 2`` in pairs (the digits models of the run,
    only fp32 in a quick run, and in a full run the null model), and how each client's calls
    spread over two frontends."""
    from bench import frontends

    # A quick run (it proves the pipeline, in the test suite) measures one model.
    candidates = ("digits",) if plan.frontends_rounds == 1 else ("digits", "digits-int8")
    chosen = [available[n] for n in candidates if n in names and n in available]
    if "null" in names or plan.balance_concurrencies:
        chosen.append(models.null_model(WORK / "models"))
    out: dict = {"frontends": 2, "concurrency": frontends.DEFAULT_CONCURRENCY, "pairs": {}}
    for m in chosen:
        log(f"{m.label}: --frontends 1 against 2, {plan.frontends_rounds} round(s) in pairs")
        out["pairs"][m.name] = frontends.measure(
            m, 2, plan.frontends_rounds, frontends.DEFAULT_CONCURRENCY, plan.perf
        )
    if plan.balance_concurrencies:
        log("how each client's calls spread over 2 frontends")
        out["balance"] = frontends.balance(
            2,
            list(plan.balance_concurrencies),
            plan.perf.measurement_interval_ms / 1000,
            default_models,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="seconds per step, the digits models only, no peer"
    )
    parser.add_argument("--no-peer", action="store_true", help="skip the Triton peer")
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the py-spy profiles (resnet18 and digits fp32)"
    )
    parser.add_argument(
        "--models",
        default="",
        help="comma-separated subset of: resnet18,resnet18-int8,digits,digits-int8,null (default: all but int8 digits)",
    )
    parser.add_argument(
        "--default-models",
        type=Path,
        default=REPO_ROOT / "models",
        metavar="DIR",
        help="repository holding the default digits models (make model; default models/)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report path (default docs/benchmarks.md; quick: .bench/quick/benchmarks.md)",
    )
    parser.add_argument(
        "--results", type=Path, default=None, help="results JSON (default next to the report's work dir)"
    )
    parser.add_argument(
        "--report-only",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="only re-render the report from a results file",
    )
    args = parser.parse_args(argv)  # fmt: skip

    from bench import report

    quick = args.quick
    out = args.out or (WORK / "quick" / "benchmarks.md" if quick else REPO_ROOT / "docs" / "benchmarks.md")
    if args.report_only:
        report.write(json.loads(args.report_only.read_text()), out)
        log(f"wrote {out}")
        return 0

    plan = QUICK if quick else FULL
    with_peer = not (quick or args.no_peer)
    workdir = WORK / ("quick" if quick else "full")
    results_path = args.results or workdir / "results.json"
    names = [n for n in args.models.split(",") if n] or (
        ["digits", "digits-int8"] if quick else ["resnet18", "resnet18-int8", "digits"]
    )

    started = datetime.datetime.now(datetime.UTC)
    load_before = machine.load_average()
    meta = {"machine": machine.describe(), "quick": quick, "plan": _asdict(plan), "started": started.isoformat(timespec="seconds"),
            "perf_analyzer": perf.version(), "argv": ["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])],
            "peer_in_turn": True}  # fmt: skip
    if with_peer:
        log("peer: bench/setup_peer.sh")
        peer.setup()
        meta["peer_versions"] = peer.versions()

    jpegs = images.load_jpegs(WORK / "images")
    available = {m.name: m for m in models.digits_models(args.default_models)}
    if any(n.startswith("resnet18") for n in names):
        log("models: resnet18 fp32/int8 224x224 (svertka export --weights random, svertka quantize)")
        available.update({m.name: m for m in models.resnet18_models(WORK / "models", WORK / "images")})
    unknown = [n for n in names if n not in available and n != "null"]
    if unknown:
        parser.error(f"unknown or unavailable models {unknown}; available: {sorted(available)}")
    meta["images"] = {"count": len(jpegs), "width": images.WIDTH, "height": images.HEIGHT,
                      "mean_kib": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1), "sources": list(images.PHOTOGRAPHS)}  # fmt: skip

    results = {"meta": meta, "models": []}
    for name in (n for n in names if n != "null"):
        profile = not (quick or args.no_profile) and name in PROFILED and profiler.available()
        results["models"].append(
            bench_model(available[name], plan, jpegs, with_peer=with_peer, profile=profile, workdir=workdir)
        )
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))  # partial results survive a later failure
    if not args.models or "null" in names:
        results["frontend"] = bench_frontend(plan, with_peer=with_peer, workdir=workdir)
        results_path.write_text(json.dumps(results, indent=1))
    if plan.frontends_rounds:
        results["processes"] = bench_processes(plan, names, available, args.default_models)
        results_path.write_text(json.dumps(results, indent=1))
    meta["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    meta["duration_s"] = round((datetime.datetime.now(datetime.UTC) - started).total_seconds())
    meta["load_average"] = {"before": load_before, "after": machine.load_average()}
    results_path.write_text(json.dumps(results, indent=1))
    log(f"results: {results_path}")
    report.write(json.loads(json.dumps(results)), out)  # as re-rendering sees it: JSON keys are strings
    log(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``--frontends 1`` against ``--frontends N``, measured in pairs with perf_analyzer.

For each model both layouts are served at once (the idle one costs nothing),
and each round measures one then the other, the order alternating from round
to round, so the two numbers of a pair are seconds apart. Per window:
images/s, p50 and p99 latency, the server's CPU per image (its whole process
tree: supervisor, engine, frontends) and perf_analyzer's, and how the calls
spread over the frontends (each frontend process's share of the frontends'
CPU time: perf_analyzer's concurrent contexts open connections of their own,
and SO_REUSEPORT balances connections, not calls).

    python -m bench.frontends --models digits,digits-int8,null --frontends 2 --rounds 3

``--balance`` measures instead how the calls of each common client spread
over the frontends of one ``--frontends N`` server, at each concurrency:
perf_analyzer, tritonclient (one client shared by every thread, one per
thread, one per thread with a connection of its own) and svertka's Python
client (one connection, and ``connections=2N``):

    python -m bench.frontends --balance --frontends 2 --concurrency 1,2,4,8,16

Prints one line per window and a JSON summary (``--out``). docs/engine.md
("Processes", "Balancing") quotes its numbers; ``service.supervisor.frontend_count``'s
``auto`` follows them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import balance_load, models, perf, target
from bench.perf import PerfSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
WORK = REPO_ROOT / ".bench" / "frontends"
#: Enough callers for full batches of the digits models on two cores.
DEFAULT_CONCURRENCY = 8


def frontend_cpu_shares(pid: int, before: dict[int, float]) -> list[float]:
    """Each frontend process's share of the frontends' CPU time since ``before`` (pid -> seconds)."""
    now = frontend_cpu(pid)
    spent = [now[p] - before.get(p, 0.0) for p in now]
    total = sum(spent)
    return sorted((s / total for s in spent), reverse=True) if total > 0 else []


def frontend_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each frontend process of the server ``pid`` (``service.ipc.worker frontend``)."""
    import psutil

    out = {}
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "frontend" in child.cmdline() and "service.ipc.worker" in child.cmdline():
                times = child.cpu_times()
                out[child.pid] = times.user + times.system
    return out


def window(
    server: target.Server, model: str, concurrency: int, settings: PerfSettings, workdir: Path
) -> dict:
    before = frontend_cpu(server.pid)
    point = perf.run_level(server.grpc_url, model, concurrency, settings, workdir, server_pid=server.pid)
    cpu = point.cpu or {}
    images = cpu.get("images") or 0
    return {
        "images_per_s": point.images_per_s,
        "p50_ms": point.latency_ms.get("p50"),
        "p99_ms": point.latency_ms.get("p99"),
        "server_cpu_ms_per_image": 1000 * cpu["server_s"] / images if images else None,
        "client_cpu_ms_per_image": 1000 * cpu["client_s"] / images if images else None,
        "frontend_shares": [round(s, 3) for s in frontend_cpu_shares(server.pid, before)],
        "error": point.error,
    }


def measure(
    model: models.BenchModel, frontends: int, rounds: int, concurrency: int, settings: PerfSettings
) -> dict:
    repo = target.single_model_repository(model.path, model.name, WORK / "repos")
    layouts = {"1": ("--frontends", "1"), str(frontends): ("--frontends", str(frontends))}
    results: dict[str, list[dict]] = {name: [] for name in layouts}
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(
                target.serve(repo, log_path=WORK / f"{model.name}-{name}.log", args=args)
            )
            for name, args in layouts.items()
        }
        for i in range(rounds):
            order = list(layouts) if i % 2 == 0 else list(reversed(layouts))
            for name in order:
                got = window(servers[name], model.name, concurrency, settings, WORK / "perf" / name)
                results[name].append(got)
                print(
                    f"[frontends] {model.name} round {i + 1} frontends={name}: {json.dumps(got)}", flush=True
                )
    return {name: summarize(windows) for name, windows in results.items()} | {"windows": results}


def summarize(windows: list[dict]) -> dict:
    def med(key: str) -> float | None:
        values = [w[key] for w in windows if w.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    def span(key: str) -> list[float] | None:
        values = [w[key] for w in windows if w.get(key) is not None]
        return [round(min(values), 3), round(max(values), 3)] if values else None

    return {f"{key}_median": med(key) for key in ("images_per_s", "p50_ms", "server_cpu_ms_per_image")} | {
        f"{key}_range": span(key) for key in ("images_per_s", "p50_ms", "server_cpu_ms_per_image")
    }


#: perf_analyzer (tritonclient's C++ library) shares a gRPC channel among up to this many of its
#: contexts by default; 1 gives each context a channel (a connection) of its own.
SHARE_COUNT_ENV = "TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT"
PERF_OWN_CHANNELS = f"perf_analyzer, {SHARE_COUNT_ENV}=1"
#: The clients ``--balance`` measures: perf_analyzer, and bench.balance_load's.
BALANCE_CLIENTS = ("perf_analyzer", PERF_OWN_CHANNELS, *balance_load.CLIENTS)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """``os.environ`` with ``values`` set for the block (perf_analyzer inherits it)."""
    import os

    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def balance_window(
    server: target.Server, kind: str, concurrency: int, frontends: int, seconds: float
) -> dict:
    """How ``concurrency`` callers of client ``kind`` spread over the frontends for ``seconds``.

    The Python clients run in a process of their own (``bench.balance_load``): tritonclient's
    generated modules and svertka's register the same protobuf package and cannot be imported
    together.
    """
    if kind.startswith("perf_analyzer"):
        settings = PerfSettings(measurement_interval_ms=int(seconds * 1000))
        before = frontend_cpu(server.pid)
        with _environment({SHARE_COUNT_ENV: "1"} if kind == PERF_OWN_CHANNELS else {}):
            point = perf.run_level(
                server.grpc_url, balance_load.MODEL, concurrency, settings, WORK / "perf" / "balance"
            )
        calls_per_s = point.images_per_s
    else:
        command = [
            sys.executable, "-m", "bench.balance_load", kind, server.grpc_url,
            str(concurrency), str(seconds), str(frontends),
        ]  # fmt: skip
        with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as load:
            assert load.stdout.readline().strip() == "ready", f"{kind}: the load process failed"
            before = frontend_cpu(server.pid)
            load.stdin.write("go\n")
            load.stdin.flush()
            calls_per_s = json.loads(load.stdout.readline())["calls_per_s"]
    shares = frontend_cpu_shares(server.pid, before)
    return {
        "client": kind,
        "concurrency": concurrency,
        "calls_per_s": round(calls_per_s, 1),
        "frontend_shares": [round(x, 3) for x in shares],
        # frontends doing at least half their fair share of the work
        "frontends_used": sum(1 for x in shares if x >= 0.5 / frontends),
    }


def balance(frontends: int, concurrencies: list[int], seconds: float, default_models: Path) -> list[dict]:
    (model,) = [m for m in models.digits_models(default_models) if m.name == balance_load.MODEL]
    repo = target.single_model_repository(model.path, model.name, WORK / "repos")
    out = []
    with target.serve(repo, log_path=WORK / "balance.log", args=("--frontends", str(frontends))) as server:
        for kind in BALANCE_CLIENTS:
            for concurrency in concurrencies:
                got = balance_window(server, kind, concurrency, frontends, seconds)
                print(f"[balance] frontends={frontends} {json.dumps(got)}", flush=True)
                out.append(got)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,digits-int8,null")
    parser.add_argument("--frontends", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--concurrency", default=str(DEFAULT_CONCURRENCY), help="one level; with --balance a list: 1,2,4,8,16"
    )
    parser.add_argument("--balance", action="store_true", help="how each client's calls spread instead")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--default-models", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--out", type=Path, default=WORK / "results.json")
    args = parser.parse_args(argv)
    available = {m.name: m for m in models.digits_models(args.default_models)}
    available["null"] = models.null_model(WORK / "models")
    started = time.time()
    levels = [int(c) for c in str(args.concurrency).split(",") if c]
    if args.balance:
        windows = balance(args.frontends, levels, args.seconds, args.default_models)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out = args.out.with_name("balance.json") if args.out == WORK / "results.json" else args.out
        out.write_text(
            json.dumps({"started": started, "frontends": args.frontends, "windows": windows}, indent=2)
        )
        return 0
    settings = PerfSettings(measurement_interval_ms=int(args.seconds * 1000))
    results = {}
    for name in [n for n in args.models.split(",") if n]:
        results[name] = measure(available[name], args.frontends, args.rounds, levels[0], settings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"started": started, "concurrency": levels[0], "models": results}, indent=2)
    )
    for name, result in results.items():
        print(name, json.dumps({k: v for k, v in result.items() if k != "windows"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

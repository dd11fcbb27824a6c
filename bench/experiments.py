"""A/B measurements of server changes proposed by the profile, without editing service/.

``python -m bench.experiments ab --model-path M --name N`` starts two svertka
servers on the same model, the current code (A) and the same code with one
policy patched in at start-up (B), and runs the same perf_analyzer levels
against each in ABBA order, so that drift in the machine's background load
falls on both equally. The patch lives here, applied to the class in the
server's own process (``python -m bench.experiments --policy NAME serve ...``):
the service code stays as it is until the numbers justify changing it.

Policy ``adaptive-idle``: svertka dispatches a batch the moment its instance
is idle. Under a closed loop this splits the callers into a large batch and a
lone request that happened to arrive first: at concurrency 8 the batches
alternate 7 and 1 (``docs/benchmarks.md``, batch-size plots), and the lone
request costs a whole batch-1 run while seven requests wait. The patch keeps
dispatch-when-idle but, when the instance goes idle, expects the rows already
queued plus the rows of the batch just answered (those callers are about to
come back) and waits for them up to ``max_queue_delay`` counted from that
moment. With one caller the expected rows are 1, so nothing ever waits.

Policies ``spinning`` / ``no-spinning``: onnxruntime's idle worker threads
spin-wait / sleep for every model, whatever its ``intra_op_spinning`` setting
(``auto`` by default: see ``service.runtime.spinning``).

Policy ``two-instances``: two sessions of one intra-op thread each.

Policy ``one-decoder``: one image-decoding thread instead of one per core.

Policy ``nice-frontend``: the event loop, gRPC's threads and the decoders run
at nice 5, onnxruntime's threads at 0 (needs the right to raise a thread's
priority back, as root has).

``--api image`` drives the image API instead (``bench.loadgen``'s closed loop
with the benchmark's 1024x768 JPEGs, ``--interval-ms`` per window). Every
level prints the server's CPU time per image (``bench.cpu``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def patch_adaptive_idle() -> None:
    import time

    from service import batching

    original_close, original_take = batching.Batcher._close_time, batching.Batcher._take
    original_execute = batching.Batcher._execute

    def _close_time(self):
        close_at = original_close(self)
        target = getattr(self, "_bench_target", 1)
        if close_at is None and not self._draining and self._queued_rows < target:
            # Counted from when the instance went idle: the lone request may have queued for a whole batch.
            since = max(self._queue[0].enqueued, getattr(self, "_bench_idle_at", 0.0))
            return since + self.max_queue_delay_s
        return close_at

    def _take(self):
        batch = original_take(self)
        self._bench_target = 1  # until the next batch finishes
        return batch

    async def _execute(self, runner, batch):
        try:
            await original_execute(self, runner, batch)
        finally:
            # The callers just answered are about to come back: expect them plus what already waits.
            rows = sum(r.n for r in batch)
            self._bench_target = min(self.max_batch_size, self._queued_rows + rows)
            self._bench_idle_at = time.monotonic()

    batching.Batcher._close_time = _close_time
    batching.Batcher._take = _take
    batching.Batcher._execute = _execute


def override_model_settings(**changes) -> None:
    """Every model this process loads gets ``changes`` applied over its own config (A/B runs).

    A later call replaces the earlier overrides (it does not stack on them).
    """
    import dataclasses

    from service import config

    load = getattr(config.ModelSettings, "_unpatched_load", config.ModelSettings.load)
    config.ModelSettings._unpatched_load = load

    def patched(cls, model_dir):
        return dataclasses.replace(load.__func__(cls, model_dir), **changes)

    config.ModelSettings.load = classmethod(patched)


def patch_spinning() -> None:
    """onnxruntime's idle intra-op threads spin, whatever the model's ``intra_op_spinning`` says."""
    override_model_settings(intra_op_spinning=True)


def patch_no_spinning() -> None:
    """onnxruntime's idle intra-op threads sleep, whatever the model's ``intra_op_spinning`` says."""
    override_model_settings(intra_op_spinning=False)


def patch_one_thread() -> None:
    """One onnxruntime intra-op thread instead of one per core (``--intra-op-threads 1``).

    On two cores shared with the event loop, the decoders and the client, a
    parallel-for over two threads waits for whichever thread was descheduled.
    """
    import os

    os.environ["SVERTKA_INTRA_OP_THREADS"] = "1"


def patch_two_instances() -> None:
    """Two onnxruntime instances of one intra-op thread each instead of one instance of two threads.

    Two batches run at once, each on one thread: no parallel-for ever waits for a
    descheduled partner thread, and a batch forms while the other computes.
    """
    override_model_settings(instances=2)


def patch_one_decoder() -> None:
    """One image-decoding thread instead of one per core.

    Two decoders running at once can take both cores from onnxruntime's two
    intra-op threads; one leaves a core to onnxruntime at all times, and decodes
    a 1024x768 JPEG in a few milliseconds, far faster than the model consumes them.
    """
    import concurrent.futures

    from service import models

    original = models.ModelManager.__init__

    def init(self, repository, metrics, *, executor=None, **kwargs):
        executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="svertka-decode")
        original(self, repository, metrics, executor=executor, **kwargs)
        self._own_executor = True  # shut down with the manager, as its own pool would be

    models.ModelManager.__init__ = init


def patch_nice_frontend() -> None:
    """The server's other threads yield to onnxruntime's: the event loop, gRPC's poller and the decoders at nice 5.

    The threads that run onnxruntime stay at nice 0: its intra-op workers (created
    in the loader thread, whose nice value they inherit) and each instance's run
    thread. The others take the cores from onnxruntime mid-section less often,
    and catch up while it is between batches. Raising a thread back to nice 0
    needs CAP_SYS_NICE (this runs as root); only the measurement is asked for here.
    """
    import concurrent.futures
    import os
    import threading

    from service import batching, models

    def nice(value: int) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)

    nice(5)  # the main thread: the event loop; gRPC's threads and the decode pool inherit it

    serve = batching._Worker._serve

    def _serve(self):
        nice(0)
        serve(self)

    batching._Worker._serve = _serve
    original = models.ModelManager.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._loader.shutdown(wait=False)
        self._loader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="svertka-load", initializer=nice, initargs=(0,)
        )

    models.ModelManager.__init__ = init


def patch_grpc_options() -> None:
    """Extra gRPC channel arguments for the server, from ``SVERTKA_EXPERIMENT_GRPC_OPTIONS``.

    The variable holds a JSON object of argument names and integer values, e.g.
    ``{"grpc.http2.max_frame_size": 1048576}``; they are appended to the server's
    own arguments (``service.server.grpc_options``). Both arms inherit the
    environment; only B applies it.
    """
    import os

    from service import server

    extra = [(k, int(v)) for k, v in json.loads(os.environ["SVERTKA_EXPERIMENT_GRPC_OPTIONS"]).items()]
    original = server.grpc_options

    def grpc_options(config):
        return [*original(config), *extra]

    server.grpc_options = grpc_options


POLICIES = {
    "adaptive-idle": patch_adaptive_idle,
    "spinning": patch_spinning,
    "no-spinning": patch_no_spinning,
    "one-thread": patch_one_thread,
    "two-instances": patch_two_instances,
    "one-decoder": patch_one_decoder,
    "nice-frontend": patch_nice_frontend,
    "grpc-options": patch_grpc_options,
}


def _image_level(
    url: str, model: str, concurrency: int, seconds: float, pid: int, jpegs: list[bytes]
) -> dict:
    """The image API in closed loop (bench.loadgen, 1024x768 JPEGs), with the server's CPU metered."""
    import asyncio

    from bench import cpu, loadgen

    span = cpu.Span(url, model, pid, "self")
    result = asyncio.run(
        loadgen.image_closed_loop(
            url, model, jpegs, concurrency=concurrency, duration_s=seconds, warmup_s=1.0
        )
    )
    batches, use = span.stop()
    return {"concurrency": concurrency, "images_per_s": result.images_per_s, "latency_ms": result.latency_ms,
            "batches": batches, "errors": result.errors, "cpu": dataclasses.asdict(use)}  # fmt: skip


def ab(args: argparse.Namespace) -> int:
    import contextlib

    from bench import cpu, images, modelstats, perf, target

    workdir = REPO_ROOT / ".bench" / "experiments"
    repo = target.single_model_repository(args.model_path, args.name, workdir / "repos")
    settings = perf.PerfSettings(args.interval_ms, args.stability, 6)
    launcher_b = [sys.executable, "-m", "bench.experiments", "--policy", args.policy]
    jpegs = images.load_jpegs(REPO_ROOT / ".bench" / "images") if args.api == "image" else []
    results: dict[str, list] = {"A": [], "B": []}
    with contextlib.ExitStack() as stack:
        servers = {
            "A": stack.enter_context(target.serve(repo, log_path=workdir / "A.log")),
            "B": stack.enter_context(target.serve(repo, log_path=workdir / "B.log", launcher=launcher_b)),
        }
        for i, c in enumerate(args.concurrency):
            for arm in ("AB" if i % 2 == 0 else "BA") * args.repeats:
                server = servers[arm]
                if args.api == "image":
                    point = _image_level(
                        server.grpc_url, args.name, c, args.interval_ms / 1e3, server.pid, jpegs
                    )
                else:
                    point = perf.dataclasses.asdict(perf.run_level(
                        server.grpc_url, args.name, c, settings, workdir / arm, server_pid=server.pid))  # fmt: skip
                results[arm].append(point)
                mean = modelstats.mean_batch_size(point["batches"]) if point["batches"] else float("nan")
                ips = f"{point['images_per_s']:7.1f}" if point["images_per_s"] else "unstable"
                use = cpu.CpuUse(**point["cpu"]) if point.get("cpu") else None
                cpu_text = (f"  server CPU {use.server_ms_per_image:6.2f} ms/img, client {use.client_ms_per_image:5.2f}"
                            if use and use.images else "")  # fmt: skip
                print(f"{arm} c={c:2d}: {ips} img/s  p99 {point['latency_ms'].get('p99', float('nan')):7.1f} ms  mean batch {mean:.2f}{cpu_text}", flush=True)  # fmt: skip
    out = workdir / f"ab-{args.name}-{args.policy}.json"
    out.write_text(json.dumps({"policy": args.policy, "model": args.name, "results": results}, indent=1))
    print("A = current svertka; B = svertka with --policy", args.policy)
    print(
        f"{'c':>3} {'A img/s':>9} {'B img/s':>9} {'B/A':>6} {'A p99':>8} {'B p99':>8} {'A batch':>8} {'B batch':>8}"
        f" {'A CPU ms':>9} {'B CPU ms':>9}"
    )
    for c in args.concurrency:
        row = {}
        for arm in "AB":
            pts = [p for p in results[arm] if p["concurrency"] == c and p["images_per_s"]]
            ips = sum(p["images_per_s"] for p in pts) / len(pts) if pts else float("nan")
            p99 = sum(p["latency_ms"]["p99"] for p in pts) / len(pts) if pts else float("nan")
            counts: dict[int, int] = {}
            for p in pts:
                for size, n in p["batches"].items():
                    counts[int(size)] = counts.get(int(size), 0) + n
            # Server CPU per image over all of this arm's runs at c (total CPU / total images).
            metered = [p["cpu"] for p in pts if p.get("cpu")]
            images = sum(u["images"] for u in metered)
            server_ms = 1e3 * sum(u["server_s"] for u in metered) / images if images else float("nan")
            row[arm] = (ips, p99, modelstats.mean_batch_size(counts), server_ms)
        (a, ap, ab_, ac), (b, bp, bb, bc) = row["A"], row["B"]
        print(
            f"{c:3d} {a:9.1f} {b:9.1f} {b / a:6.2f} {ap:8.1f} {bp:8.1f} {ab_:8.2f} {bb:8.2f} {ac:9.2f} {bc:9.2f}"
        )
    print(f"results: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--policy"]:
        # Server mode: patch, then run the ordinary CLI with the remaining arguments.
        POLICIES[argv[1]]()
        from service.cli import main as svertka_main

        return svertka_main(argv[2:])
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ab", help="perf_analyzer, current server vs a patched policy, ABBA order")
    p.add_argument("--model-path", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--policy", choices=sorted(POLICIES), default="adaptive-idle")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=1, help="ABBA blocks per level")
    p.add_argument("--interval-ms", type=int, default=3000)
    p.add_argument("--stability", type=int, default=25)
    p.add_argument("--api", choices=["tensor", "image"], default="tensor",
                   help="tensor: perf_analyzer; image: bench.loadgen's closed loop (--interval-ms per level)")  # fmt: skip
    args = parser.parse_args(argv)
    return ab(args)


if __name__ == "__main__":
    sys.exit(main())

"""A/B measurements of one server change against the current server, without editing service/.

Backs the A/B results in bench/findings.md (docs/benchmarks.md, "Findings"):
3 (the harness meters CPU), 10 (``no-spinning``, ``one-decoder``), 18
(``two-instances``), 20 (``nice-frontend``), 23 (``grpc-options``); and the
spinning measurements in docs/engine.md ("Thread budget"). ::

    python -m bench.research.experiments ab --model-path M --name N --policy POLICY [--api image]

starts two svertka servers on the same model, the current server (A) and the
same server with one change (B), and runs the same perf_analyzer levels
against each in ABBA order, so that drift in the machine's background load
falls on both equally. The change is made from outside the service code, so it
stays as it is until the numbers justify changing it:

* ``spinning`` / ``no-spinning``: B's model settings say ``intra_op_spinning:
  true`` / ``false`` (onnxruntime's idle worker threads spin-wait / sleep),
  whatever A's ``auto`` decides (``service.engine.runtime.spinning``);
* ``two-instances``: B's model settings say ``instances: 2`` (two sessions of
  one intra-op thread each);
* ``one-decoder``: B decodes images in one thread instead of one per core;
* ``nice-frontend``: B's event loop, gRPC's threads and the decoders run at
  nice 5, onnxruntime's threads at 0 (needs the right to raise a thread's
  priority back, as root has);
* ``grpc-options``: B's gRPC server gets the channel arguments in
  ``SVERTKA_EXPERIMENT_GRPC_OPTIONS`` (a JSON object) after its own.

The settings policies give B a repository of its own whose ``config.json`` has
the change (``with_settings``); the others start B through this module
(``python -m bench.research.experiments --policy NAME serve ...``), which
makes the change at start-up by svertka's thread names (``svertka-decode``,
``svertka-load``, ``svertka-run``) or its public ``service.server.grpc_options``
and then runs the ordinary CLI.

``--api image`` drives the image API instead (``bench.loadgen``'s closed loop
with the benchmark's 1024x768 JPEGs, ``--interval-ms`` per window). Every
level prints the server's CPU time per image (``bench.cpu``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Policies that change the model's settings: B serves a repository whose settings file has these values.
SETTINGS_POLICIES: dict[str, dict] = {
    "spinning": {"intra_op_spinning": True},
    "no-spinning": {"intra_op_spinning": False},
    "two-instances": {"instances": 2},
}


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def with_settings(repository: Path, name: str, root: Path, changes: dict) -> Path:
    """A repository under ``root`` holding only model ``name`` of ``repository``, with ``changes`` over its settings.

    The version directories are hard-linked (copied across file systems); the
    model's own settings file, if any, is read and written back as
    ``config.json`` with ``changes`` applied. Returns the new repository.
    """
    import yaml

    from service.layout import CONFIG_FILES  # the settings file names, in the order the server reads them

    source = Path(repository) / name
    settings: dict = {}
    for file in CONFIG_FILES:
        if (source / file).is_file():
            settings = yaml.safe_load((source / file).read_text()) or {}  # YAML reads JSON too
            break
    target = Path(root) / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(*CONFIG_FILES))
    (target / "config.json").write_text(json.dumps({**settings, **changes}, indent=1))
    return Path(root)


def _at_thread_start(action: Callable[[str], None]) -> None:
    """Call ``action(thread name)`` first thing in every thread the threading module starts from now on."""
    import threading

    def hook(frame, event, arg) -> None:
        sys.setprofile(None)  # once per thread
        action(threading.current_thread().name)

    threading.setprofile(hook)


def patch_one_decoder() -> None:
    """One image-decoding thread instead of one per core.

    Two decoders running at once can take both cores from onnxruntime's two
    intra-op threads; one leaves a core to onnxruntime at all times, and decodes
    a 1024x768 JPEG in a few milliseconds, far faster than the model consumes them.
    The decode pool is the thread pool named ``svertka-decode``.
    """
    import concurrent.futures

    original = concurrent.futures.ThreadPoolExecutor.__init__

    def init(self, max_workers=None, thread_name_prefix="", *args, **kwargs):
        if thread_name_prefix.startswith("svertka-decode"):
            max_workers = 1
        original(self, max_workers, thread_name_prefix, *args, **kwargs)

    concurrent.futures.ThreadPoolExecutor.__init__ = init


def patch_nice_frontend() -> None:
    """The server's other threads yield to onnxruntime's: the event loop, gRPC's poller and the decoders at nice 5.

    The threads that run onnxruntime stay at nice 0: its intra-op workers (created
    in the model loader thread, ``svertka-load``, whose nice value they inherit)
    and each instance's run thread (``svertka-run*``). The others take the cores
    from onnxruntime mid-section less often, and catch up while it is between
    batches. Raising a thread back to nice 0 needs CAP_SYS_NICE (this runs as
    root); only the measurement is asked for here.
    """
    import threading

    def nice(value: int) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)

    def at_start(name: str) -> None:
        if name.startswith(("svertka-load", "svertka-run")):
            nice(0)

    nice(5)  # the main thread: the event loop; gRPC's threads and the decode pool inherit it
    _at_thread_start(at_start)


def patch_grpc_options() -> None:
    """Extra gRPC channel arguments for the server, from ``SVERTKA_EXPERIMENT_GRPC_OPTIONS``.

    The variable holds a JSON object of argument names and integer values, e.g.
    ``{"grpc.http2.max_frame_size": 1048576}``; they are appended to the server's
    own arguments (``service.server.grpc_options``). Both arms inherit the
    environment; only B applies it.
    """
    from service import server

    extra = [(k, int(v)) for k, v in json.loads(os.environ["SVERTKA_EXPERIMENT_GRPC_OPTIONS"]).items()]
    original = server.grpc_options

    def grpc_options(config):
        return [*original(config), *extra]

    server.grpc_options = grpc_options


#: Policies applied in B's own process at start-up, before the server is built.
PROCESS_POLICIES: dict[str, Callable[[], None]] = {
    "one-decoder": patch_one_decoder,
    "nice-frontend": patch_nice_frontend,
    "grpc-options": patch_grpc_options,
}
POLICIES = sorted([*SETTINGS_POLICIES, *PROCESS_POLICIES])


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
    if args.policy in SETTINGS_POLICIES:
        changes = SETTINGS_POLICIES[args.policy]
        repo_b = with_settings(repo, args.name, workdir / f"repos-{args.policy}", changes)
        launcher_b = None
    else:
        repo_b, launcher_b = (
            repo,
            [sys.executable, "-m", "bench.research.experiments", "--policy", args.policy],
        )
    jpegs = images.load_jpegs(REPO_ROOT / ".bench" / "images") if args.api == "image" else []
    results: dict[str, list] = {"A": [], "B": []}
    with contextlib.ExitStack() as stack:
        servers = {
            "A": stack.enter_context(target.serve(repo, log_path=workdir / "A.log")),
            "B": stack.enter_context(target.serve(repo_b, log_path=workdir / "B.log", launcher=launcher_b)),
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
        # B's server process: make the change, then run the ordinary CLI with the remaining arguments.
        PROCESS_POLICIES[argv[1]]()
        from service.cli import main as svertka_main

        return svertka_main(argv[2:])
    parser = argparse.ArgumentParser(
        prog="python -m bench.research.experiments", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "ab", help="perf_analyzer, the current server against one change (--policy), ABBA order"
    )
    p.add_argument("--model-path", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--policy", choices=POLICIES, required=True)
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

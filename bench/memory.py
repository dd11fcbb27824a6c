"""``python -m bench.memory``: the memory a server needs per model: after warm-up, under load, during a swap.

For each model, a real ``svertka serve`` (``bench.target.ServerProcess``) on a
repository holding that model alone (``a+b``: both in one repository, as the
bundled ``models/`` serves digits and digits-int8), with the server's default
settings plus ``--repository-poll-s`` (so that it picks up new versions), at
each ``--frontends`` count, and the memory of its whole process tree:

1. steady: idle after warm-up (health SERVING), the median of a short window;
2. under load: the peak while ``--concurrency`` closed-loop callers send
   tensor-API requests (``bench.loadgen``'s ModelInfer call). The default, the
   queue's capacity (``max_queue_size``, 256 rows), fills the queue: the most
   requests a saturated server holds;
3. swaps: version 2 copied into the repository while idle, then version 3
   while the load goes on; the peak from the copy until the server logs that
   the old version is unloaded (both versions are resident in between);
4. after: idle again once the load and the swaps are over (whether the memory
   comes back).

Memory is read from ``/proc/<pid>/smaps_rollup`` of every process of the tree
every 20 ms, in a thread of its own. With ``--frontends 1`` the server is one
process and the tables give its RSS: everything it has resident, libraries
included, a bound on what its container is charged for it; the peak of each
window is the kernel's high-water mark (``VmHWM``, reset when the window opens),
so no peak falls between two samples. With ``--frontends N`` (a supervisor, an
engine and N frontends) the processes share libraries and the frontends'
shared memory slabs, which a sum of RSS counts once per process mapping them:
the tables give the sum of PSS instead (each shared page split among the
processes that map it), sampled. The JSON file holds both, and PSS's anonymous,
file and shared memory parts.

The suggested limit is the highest peak x :data:`MARGIN`, rounded up to 64 MiB.
Results: ``OUT/memory.json`` and ``OUT/memory.md`` (the tables).

    python -m bench.memory --out .bench/memory
    python -m bench.memory --quick --out /tmp/memory     # digits, seconds: proves the pipeline
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import json
import math
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from bench import gpu, images, loadgen, machine, models, target
from service import config, modelmeta

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH = REPO_ROOT / ".bench"
WORK = BENCH / "memory"

#: The suggested limit over the highest measured peak. What a run here does not exercise: the image
#: API's decode buffers (one decoded image per decode thread, up to ``max_decoded_pixels`` x 3 bytes:
#: 48 MiB at 224x224's auto limit), allocator fragmentation over days of swaps, and the page cache of
#: the model files, which the kernel reclaims before it OOM-kills but which the container is charged.
MARGIN = 1.25
#: Limits are suggested in whole multiples of this.
ROUND_BYTES = 64 << 20
#: ``--repository-poll-s``: how soon the server sees a new version (not a memory setting).
POLL_S = 0.2
#: What each measured window reads from smaps_rollup, summed over the tree (bytes).
#: uss: the pages no other process maps (Private_Clean + Private_Dirty).
FIELDS = ("rss", "pss", "uss", "pss_anon", "pss_file", "pss_shmem")
_ROLLUP = {
    "Rss:": ("rss",), "Pss:": ("pss",), "Private_Clean:": ("uss",), "Private_Dirty:": ("uss",),
    "Pss_Anon:": ("pss_anon",), "Pss_File:": ("pss_file",), "Pss_Shmem:": ("pss_shmem",),
}  # fmt: skip
DEFAULT_MODELS = (
    "digits+digits-int8", "digits", "digits-int8", "resnet18", "resnet18-int8", "resnet50", "resnet50-fp16",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long each window lasts; ``QUICK`` only proves that the pipeline works."""

    #: Idle time after SERVING (and after the load) before the steady window.
    settle_s: float
    #: The steady window (its median).
    steady_s: float
    load_s: float
    #: Closed-loop callers: the default is the queue's capacity in rows (each request is one row).
    concurrency: int
    swap_timeout_s: float = 900.0
    interval_s: float = 0.02


FULL = Plan(settle_s=3.0, steady_s=1.0, load_s=8.0, concurrency=config.ModelSettings().max_queue_size)
QUICK = Plan(settle_s=0.5, steady_s=0.3, load_s=1.0, concurrency=16, swap_timeout_s=120.0)


def log(message: str) -> None:
    print(f"[bench.memory {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- reading memory ------------------------------------------------------------------------------


def parse_rollup(text: str) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` -> :data:`FIELDS` in bytes (absent lines read as 0)."""
    out = dict.fromkeys(FIELDS, 0)
    for line in text.splitlines():
        parts = line.split()
        for field in _ROLLUP.get(parts[0] if parts else "", ()):
            out[field] += int(parts[1]) * 1024
    return out


def tree_pids(pid: int) -> list[int]:
    """``pid`` and every process it started (supervisor, engine, frontends)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.Error:
        return [pid]


def tree_memory(pids: list[int]) -> dict[str, int]:
    """:data:`FIELDS` summed over ``pids``, and ``processes``: how many were read (gone ones are skipped)."""
    total = dict.fromkeys(FIELDS, 0) | {"processes": 0}
    for pid in pids:
        try:
            one = parse_rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())
        except OSError:
            continue
        for key, value in one.items():
            total[key] += value
        total["processes"] += 1
    return total


def processes(pid: int) -> list[dict]:
    """Each process of the tree now: its role (server; or supervisor, engine, frontend N) and memory."""
    import psutil

    pids = tree_pids(pid)
    out = []
    for one in pids:
        try:
            command = psutil.Process(one).cmdline()
            memory = parse_rollup(Path(f"/proc/{one}/smaps_rollup").read_text())
        except (psutil.Error, OSError):
            continue
        if "service.ipc.worker" in command:
            role = " ".join(command[command.index("service.ipc.worker") + 1 :])
        else:
            role = "supervisor" if len(pids) > 1 else "server"
        out.append({"role": role, "pid": one, **memory})
    return out


def reset_peaks(pids: list[int]) -> None:
    """Reset each process's peak RSS (VmHWM) to its current RSS (``clear_refs``, Linux 4.0+)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss(pids: list[int]) -> int | None:
    """VmHWM summed over ``pids``, bytes: exact for one process, an upper bound for several."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
    return total or None


class Sampler:
    """The memory of a process tree every ``interval_s``, in a thread of its own (a busy event loop
    or a busy CPU delays a sample, and ``max_gap_ms`` says by how much), from ``start`` to ``stop``."""

    def __init__(self, pid: int, interval_s: float) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[dict[str, int]] = []
        self._times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._pids: list[int] = []

    def start(self) -> Sampler:
        self._pids = tree_pids(self.pid)
        reset_peaks(self._pids)
        self._sample()
        self._thread.start()
        return self

    def _sample(self) -> None:
        self._times.append(time.monotonic())
        self.samples.append(tree_memory(self._pids))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if len(self.samples) % 25 == 0:  # twice a second: a restarted frontend is a new pid
                self._pids = tree_pids(self.pid)
            self._sample()

    def stop(self) -> dict:
        """The window: its peak and median of each field, the tree's VmHWM, the sampling it got."""
        self._stop.set()
        self._thread.join()
        self._sample()
        gaps = np.diff(self._times) if len(self._times) > 1 else np.zeros(1)
        return {
            "peak": {k: max(s[k] for s in self.samples) for k in FIELDS},
            "median": {k: int(statistics.median(s[k] for s in self.samples)) for k in FIELDS},
            "processes": max(s["processes"] for s in self.samples),
            "peak_rss_hwm": peak_rss(self._pids),
            "samples": len(self.samples),
            "max_gap_ms": round(float(gaps.max()) * 1000, 1),
        }


# -- the measured cases ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One repository under test: its models (the first is loaded and swapped)."""

    name: str
    models: tuple[models.BenchModel, ...]


def available_models(names: list[str], default_models: Path) -> dict[str, models.BenchModel]:
    """The models ``names`` need, made once in ``.bench/models`` (resnets: random weights)."""
    out = {m.name: m for m in models.digits_models(default_models)}
    wanted = {part for name in names for part in name.split("+")}
    if any(n.startswith("resnet18") for n in wanted):
        log("models: resnet18 fp32/int8 224x224 (svertka export --weights random, svertka quantize)")
        images.make_jpegs(BENCH / "images")
        out.update({m.name: m for m in models.resnet18_models(BENCH / "models", BENCH / "images")})
    if any(n.startswith("resnet50") for n in wanted):
        log("models: resnet50 fp32/fp16 224x224 (svertka export --weights random --fp16)")
        made = gpu.make_models(BENCH / "models", "resnet50", 224)
        out.update({n: models.BenchModel(n, p, n) for n, p in made.items() if not n.endswith("u8-fp16")})
    return out


def repository(case: Case, root: Path) -> Path:
    """A fresh repository holding version 1 of each of ``case``'s models (hard links where possible)."""
    repo = root / case.name
    shutil.rmtree(repo, ignore_errors=True)
    for model in case.models:
        _place(model.path, repo / model.name / "1")
    return repo


def _place(model_path: Path, version_dir: Path) -> None:
    version_dir.mkdir(parents=True)
    try:
        os.link(model_path, version_dir / "model.onnx")
    except OSError:
        shutil.copy2(model_path, version_dir / "model.onnx")


def describe(model: models.BenchModel) -> dict:
    """What the table says of a model file: precision, input, size, bytes per queued row."""
    meta = modelmeta.read_model_file(str(model.path))
    row = math.prod(meta.input_shape) * np.dtype(meta.input_dtype).itemsize
    return {
        "name": model.name,
        "precision": meta.precision,
        "arch": meta.arch,
        "input": f"{meta.input_dtype} {list(meta.input_shape)}",
        "file_bytes": model.path.stat().st_size,
        "row_bytes": row,
    }


async def _load(url: str, model: str, concurrency: int, stop: asyncio.Event) -> dict:
    """``concurrency`` callers, each sending its next ModelInfer as soon as the last one answered, until ``stop``."""
    channel = loadgen.channel(url)
    completed = 0
    errors: collections.Counter[str] = collections.Counter()
    try:
        call = await loadgen.tensor_caller(channel, model)

        async def caller(index: int) -> None:
            nonlocal completed
            i = index
            while not stop.is_set():
                try:
                    await call(i)
                    completed += 1
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    await asyncio.sleep(0.01)  # a refusal must not become a busy loop
                i += concurrency

        tasks = [asyncio.create_task(caller(i)) for i in range(concurrency)]
        await stop.wait()
        for task in tasks:  # each call still waiting is cancelled, which the server sees
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await channel.close()
    return {"concurrency": concurrency, "completed": completed, "errors": dict(errors)}


async def _swap(
    server: target.ServerProcess, repo: Path, model: models.BenchModel, version: int, plan: Plan, *,
    under_load: bool,
) -> dict:  # fmt: skip
    """Copy ``version`` of ``model`` in; the window runs until the server logs the old one unloaded."""
    staging = repo.parent / f".staging-{repo.name}" / str(version)
    shutil.rmtree(staging.parent, ignore_errors=True)
    _place(model.path, staging)
    ready = f"model '{model.name}' version {version} ready"
    unloaded = f"model '{model.name}' version {version - 1} unloaded"
    sampler = Sampler(server.proc.pid, plan.interval_s).start()
    started = time.monotonic()
    os.rename(staging, repo / model.name / str(version))  # atomic: the poller sees the whole file
    ready_s = None
    try:
        while True:
            text = server.log()
            if ready_s is None and ready in text:
                ready_s = time.monotonic() - started
            if unloaded in text:
                break
            if server.proc.poll() is not None:
                raise RuntimeError(f"the server exited during the swap:\n{text[-4000:]}")
            if time.monotonic() - started > plan.swap_timeout_s:
                raise TimeoutError(f"no '{unloaded}' within {plan.swap_timeout_s:.0f} s:\n{text[-4000:]}")
            await asyncio.sleep(0.05)
    finally:
        window = sampler.stop()
    return {
        "version": version,
        "under_load": under_load,
        "ready_s": round(ready_s, 2) if ready_s is not None else None,
        "unloaded_s": round(time.monotonic() - started, 2),
        **window,
    }


async def _window(pid: int, plan: Plan, seconds: float) -> dict:
    sampler = Sampler(pid, plan.interval_s).start()
    await asyncio.sleep(seconds)
    return sampler.stop()


async def measure(case: Case, frontends: int, plan: Plan, workdir: Path) -> dict:
    """One server for ``case`` at ``frontends``: steady, a swap, load, a swap under load, after."""
    first = case.models[0]
    repo = repository(case, workdir / "repos")
    server = target.ServerProcess(
        repo, workdir / "logs" / f"{case.name}-frontends{frontends}.log",
        "--repository-poll-s", str(POLL_S), "--frontends", str(frontends),
    )  # fmt: skip
    stop = asyncio.Event()
    load_task = None
    try:
        started = time.monotonic()
        server.start(timeout_s=120).wait_serving(timeout_s=plan.swap_timeout_s)
        serving_s = time.monotonic() - started
        pid = server.proc.pid
        await asyncio.sleep(plan.settle_s)
        steady = await _window(pid, plan, plan.steady_s)
        steady["by_process"] = processes(pid)
        log(f"  {case.name} frontends={frontends}: steady {_mib(steady['median']['rss'])} RSS, "
            f"{_mib(steady['median']['pss'])} PSS ({steady['processes']} processes)")  # fmt: skip
        swaps = [await _swap(server, repo, first, 2, plan, under_load=False)]
        log(
            f"  swap to version 2 (idle): {swaps[-1]['unloaded_s']} s, peak {_mib(_peak(swaps[-1], frontends))}"
        )
        load_task = asyncio.create_task(_load(server.address, first.name, plan.concurrency, stop))
        load = await _window(pid, plan, plan.load_s)
        log(f"  load c={plan.concurrency}: peak {_mib(_peak(load, frontends))}")
        swaps.append(await _swap(server, repo, first, 3, plan, under_load=True))
        log(f"  swap to version 3 (under load): {swaps[-1]['unloaded_s']} s, "
            f"peak {_mib(_peak(swaps[-1], frontends))}")  # fmt: skip
        stop.set()
        load |= await load_task
        load_task = None
        await asyncio.sleep(plan.settle_s)
        after = await _window(pid, plan, plan.steady_s)
    finally:
        stop.set()
        if load_task is not None:
            load_task.cancel()
            with contextlib.suppress(BaseException):
                await load_task
        server.stop(timeout_s=15)
    if load["completed"] == 0:
        raise RuntimeError(f"{case.name}: no request answered under load: {load['errors']}")
    result = {
        "case": case.name,
        "frontends": frontends,
        "measure": measure_name(frontends),
        "models": [describe(m) for m in case.models],
        "serving_s": round(serving_s, 1),
        "steady": steady,
        "load": load,
        "swaps": swaps,
        "after": after,
    }
    result["peak_bytes"] = max(_peak(w, frontends) for w in [load, *swaps])
    result["suggested_limit_bytes"] = suggested_limit(result["peak_bytes"])
    return result


def measure_name(frontends: int) -> str:
    """The tables' measure: RSS for one process, the sum of PSS for a tree that shares pages."""
    return "rss" if frontends == 1 else "pss"


def _peak(window: dict, frontends: int) -> int:
    """A window's peak in its layout's measure (RSS: the kernel's high-water mark if it is higher)."""
    if measure_name(frontends) == "rss":
        return max(window["peak"]["rss"], window.get("peak_rss_hwm") or 0)
    return window["peak"]["pss"]


def steady_bytes(result: dict) -> int:
    return result["steady"]["median"][result["measure"]]


def suggested_limit(peak: int, margin: float = MARGIN) -> int:
    """``peak`` x ``margin``, rounded up to a whole multiple of :data:`ROUND_BYTES`."""
    return math.ceil(peak * margin / ROUND_BYTES) * ROUND_BYTES


# -- the report -----------------------------------------------------------------------------------


def _mib(n: int | float) -> str:
    return f"{n / 2**20:.0f} MiB"


def _limit(n: int) -> str:
    return f"{n >> 30}Gi" if n % (1 << 30) == 0 else f"{n >> 20}Mi"


def table(results: list[dict], concurrency: int) -> str:
    """The markdown tables, one per ``--frontends`` count."""
    out = []
    for frontends in sorted({r["frontends"] for r in results}):
        rows = [r for r in results if r["frontends"] == frontends]
        measure = measure_name(frontends)
        if frontends == 1:
            out.append("One process (`--frontends 1`, the default `auto` today): RSS, MiB.\n")
        else:
            count = max(r["steady"]["processes"] for r in rows)
            out.append(
                f"`--frontends {frontends}` (supervisor, engine, {frontends} frontends: {count} "
                "processes): PSS summed over the processes, MiB.\n"
            )
        out.append(
            f"| model | precision | file, MiB | steady | under load (c={concurrency}) | swap peak, idle "
            f"| swap peak, under load | after | suggested limit (peak x {MARGIN:g}) |"
        )
        out.append("|---|---|--:|--:|--:|--:|--:|--:|--:|")
        for r in rows:
            idle, loaded = r["swaps"]
            cells = [
                " + ".join(m["name"] for m in r["models"]),
                ", ".join(dict.fromkeys(m["precision"] for m in r["models"])),
                f"{sum(m['file_bytes'] for m in r['models']) / 2**20:.1f}",
                *(
                    f"{n / 2**20:.0f}"
                    for n in (
                        steady_bytes(r),
                        _peak(r["load"], frontends),
                        _peak(idle, frontends),
                        _peak(loaded, frontends),
                        r["after"]["median"][measure],
                    )
                ),
                _limit(r["suggested_limit_bytes"]),
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        if frontends > 1:
            out.append("Steady, per process (PSS / USS, MiB):\n")
            for r in rows:
                shown = ", ".join(
                    f"{p['role']} {p['pss'] / 2**20:.0f} / {p['uss'] / 2**20:.0f}"
                    for p in r["steady"]["by_process"]
                )
                out.append(f"- {r['case']}: {shown}")
            out.append("")
    return "\n".join(out)


def markdown(results: dict) -> str:
    meta = results["meta"]
    m = meta["machine"]
    lines = [
        "# Server memory per model",
        "",
        f"`{' '.join(meta['argv'])}` on {m['cpu']} ({m['cpus_usable']} CPUs usable, {m['memory_gib']} GiB), "
        f"onnxruntime {m['versions']['onnxruntime']}, commit {m['git_commit']}, {meta['started']}.",
        "",
        "Steady: idle after warm-up. Under load: the peak while "
        f"{meta['plan']['concurrency']} closed-loop callers send one-image tensor requests. Swap peak: "
        "from the new version's copy into the repository until the old version is unloaded (both "
        "resident), idle and under that load. After: idle once the load and both swaps are over. "
        "The load goes over one connection (with several frontends, to one of them); a call waiting "
        f"longer than {loadgen.CALL_TIMEOUT_S:g} s ends DEADLINE_EXCEEDED (memory.json counts them).",
        "",
        table(results["cases"], meta["plan"]["concurrency"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", help=f"comma-separated; a+b: one repository (default: {','.join(DEFAULT_MODELS)})"
    )
    parser.add_argument("--frontends", default="1,2", help="comma-separated --frontends counts (default 1,2)")
    parser.add_argument("--concurrency", type=int, help=f"closed-loop callers (default {FULL.concurrency})")
    parser.add_argument("--quick", action="store_true", help="digits, short windows: seconds")
    parser.add_argument("--default-models", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--out", type=Path, default=WORK, help="folder for memory.json and memory.md")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.concurrency:
        plan = dataclasses.replace(plan, concurrency=args.concurrency)
    names = [
        n for n in (args.models or ("digits" if args.quick else ",".join(DEFAULT_MODELS))).split(",") if n
    ]
    counts = [int(n) for n in args.frontends.split(",") if n]
    available = available_models(names, args.default_models)
    unknown = sorted({p for n in names for p in n.split("+")} - set(available))
    if unknown:
        parser.error(f"unknown or unavailable models {unknown}; available: {sorted(available)}")
    cases = [Case(n, tuple(available[p] for p in n.split("+"))) for n in names]
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.out / "work"
    meta = {
        "machine": machine.describe(),
        "argv": ["python", "-m", "bench.memory", *(argv if argv is not None else sys.argv[1:])],
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "plan": dataclasses.asdict(plan),
        "margin": MARGIN,
        "load_average": {"before": machine.load_average()},
    }
    results = {"meta": meta, "cases": []}
    for frontends in counts:
        for case in cases:
            log(f"{case.name}, --frontends {frontends}")
            results["cases"].append(asyncio.run(measure(case, frontends, plan, workdir)))
            (args.out / "memory.json").write_text(json.dumps(results, indent=1))  # partial results survive
    meta["load_average"]["after"] = machine.load_average()
    meta["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    (args.out / "memory.json").write_text(json.dumps(results, indent=1))
    (args.out / "memory.md").write_text(markdown(results))
    print(table(results["cases"], plan.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())

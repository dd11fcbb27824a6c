"""Where the CPU goes, by library: Linux ``perf`` on a served model against the same engine in process.

Backs finding 17 in bench/findings.md and the "By library" line of docs/benchmarks.md's Method.

``bench/profile.py`` (py-spy) sees Python frames: onnxruntime's kernels, its
thread pool's waiting, libjpeg-turbo and gRPC's core all show as the Python
frame that called into them. ``perf`` samples every thread's instruction
pointer, so it tells those apart. ::

    python -m bench.research.native --model-path M --name N --api image --concurrency 8 [--seconds 10]

measures twice, one after the other, with the same model, requests and load:

* **served**: ``svertka serve`` on the model, driven over gRPC by bench.loadgen's
  closed loop from this process; ``perf record -p`` on the server;
* **in process**: the same engine (``ModelRepository``, ``infer_images`` /
  ``infer_tensor``) called from this process's event loop by the same number of
  callers, with no gRPC at all; ``perf record -p`` on this process.

Each prints the CPU milliseconds per image that each library took. The
difference between the two is what serving over gRPC costs beyond the engine.

**onnxruntime's spin-waiting.** Its release builds carry no symbols, so the
samples of its thread pool spinning are found by their instruction: a sample
whose address follows a ``pause`` (the x86 spin-loop hint, ``f3 90``) is a
thread waiting for work or for a partner thread. The ELF program headers map a
sampled address to its bytes in the file. It is a lower bound of the time spent
spinning (the loop around the ``pause`` is counted as onnxruntime's own work).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORK = REPO_ROOT / ".bench" / "native"
SAMPLE_HZ = 499  # perf's sampling frequency; prime, so it does not beat with periodic work
WARMUP_S = 3.0

#: Library groups, in the order they are printed: (label, substrings of the DSO name).
GROUPS = (
    ("onnxruntime", ("onnxruntime",)),
    ("JPEG decoding (simplejpeg, libjpeg-turbo)", ("_jpeg", "libjpeg", "libturbojpeg")),
    ("Pillow (resize, crop)", ("_imaging", "libImaging")),
    ("OpenCV (normalisation)", ("cv2",)),
    ("NumPy", ("_multiarray", "numpy")),
    ("Python interpreter", ("libpython", "python3")),
    ("gRPC core", ("cygrpc", "libgrpc")),
    ("protobuf", ("_message", "libprotobuf", "upb")),
    ("Linux kernel", ("[kernel",)),
    ("C/C++ runtime (memcpy, malloc, ...)", ("libc.so", "libm.so", "libstdc++", "libgcc")),
)
SPIN_LABEL = "  of which onnxruntime's spin-wait (pause)"
_REPORT_LINE = re.compile(
    r"^\s*(?P<pct>\d+(?:\.\d+)?)%\s+(?P<samples>\d+)\s+(?P<dso>\S+)\s+\[(?P<kind>.)\]\s+(?P<sym>.+?)\s*$"
)
_EVENT_COUNT = re.compile(r"^# Event count \(approx\.\): (\d+)", re.M)
PAUSE = b"\xf3\x90"


# --------------------------------------------------------------------------- reading perf's report


def parse_report(text: str) -> tuple[int, list[tuple[float, str, str]]]:
    """``perf report -n --sort dso,sym --stdio`` -> (event count, [(share, dso, symbol)]).

    With the default ``cpu-clock`` event the count is nanoseconds of CPU time. The
    share of each row is its samples over all rows' samples (the printed percentages
    are rounded to 0.01 %, and a thousand rows of them lose a per cent).
    """
    found = _EVENT_COUNT.search(text)
    if not found:
        raise ValueError("perf report printed no event count (no samples?)")
    rows = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = _REPORT_LINE.match(line)
        if match:
            rows.append((int(match["samples"]), match["dso"], match["sym"]))
    total = sum(samples for samples, _, _ in rows) or 1
    return int(found.group(1)), [(samples / total, dso, sym) for samples, dso, sym in rows]


def load_segments(path: Path) -> list[tuple[int, int, int]]:
    """The PT_LOAD segments of a 64-bit little-endian ELF file: [(virtual address, file offset, size in file)]."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
        (phoff,) = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    segments = []
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", table, i * phentsize
        )
        if p_type == 1:  # PT_LOAD
            segments.append((p_vaddr, p_offset, p_filesz))
    return segments


def follows_pause(path: Path, addresses: list[int]) -> set[int]:
    """The addresses (file-relative virtual addresses, as perf prints unresolved symbols) right after a ``pause``."""
    segments = load_segments(path)
    hits = set()
    with open(path, "rb") as f:
        for address in addresses:
            for vaddr, offset, size in segments:
                if vaddr + 2 <= address < vaddr + size:
                    f.seek(offset + address - vaddr - 2)
                    if f.read(2) == PAUSE:
                        hits.add(address)
                    break
    return hits


def breakdown(text: str, images: int, onnxruntime_library: Path | None) -> dict[str, float]:
    """CPU milliseconds per image for each library group (and onnxruntime's spin-wait), from a perf report."""
    total_ns, rows = parse_report(text)
    ms: dict[str, float] = {label: 0.0 for label, _ in GROUPS}
    ms["other"] = 0.0
    ort_addresses: dict[int, float] = {}
    for share, dso, sym in rows:
        label = next((label for label, keys in GROUPS if any(k in dso for k in keys)), "other")
        ms[label] += share * total_ns / 1e6 / images
        if label == "onnxruntime" and sym.startswith("0x"):
            address = int(sym, 16)
            ort_addresses[address] = ort_addresses.get(address, 0.0) + share
    if onnxruntime_library is not None:
        spin = follows_pause(onnxruntime_library, sorted(ort_addresses))
        ms[SPIN_LABEL] = sum(ort_addresses[a] for a in spin) * total_ns / 1e6 / images
    ms["total"] = total_ns / 1e6 / images
    return ms


def onnxruntime_library() -> Path:
    import onnxruntime.capi.onnxruntime_pybind11_state as state

    return Path(state.__file__)


# --------------------------------------------------------------------------- recording


def available() -> str | None:
    """None if ``perf`` can sample this user's processes here, else why not."""
    if shutil.which("perf") is None:
        return "perf is not installed (linux-tools / linux-perf)"
    try:
        level = int(Path("/proc/sys/kernel/perf_event_paranoid").read_text())
    except (OSError, ValueError):
        return None
    if level > 2:
        return f"kernel.perf_event_paranoid is {level}; perf needs 2 or less to sample a user's own processes"
    return None


async def record(pid: int, seconds: float, out: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        "perf", "record", "-F", str(SAMPLE_HZ), "-p", str(pid), "-o", str(out), "--", "sleep", f"{seconds:g}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"perf record failed ({proc.returncode}): {err.decode(errors='replace')[-1000:]}")


def report(data: Path) -> str:
    return subprocess.run(
        ["perf", "report", "-i", str(data), "-n", "--no-children", "--sort", "dso,sym", "--stdio", "-g", "none"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


async def _closed_loop(call, concurrency: int, stop: asyncio.Event) -> None:
    async def worker(first: int) -> None:
        i = first
        while not stop.is_set():
            await call(i)
            i += concurrency

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


async def _measure(
    pid: int, call, concurrency: int, seconds: float, count, out: Path
) -> tuple[int, int, float]:
    """Load with ``concurrency`` callers; after the warm-up, perf for ``seconds``.

    ``await count()`` gives the model's (images, batches) so far. -> (images, batches, wall seconds) in perf's window.
    """
    stop = asyncio.Event()
    load = asyncio.create_task(_closed_loop(call, concurrency, stop))
    await asyncio.sleep(WARMUP_S)
    (images0, batches0), start = await count(), time.perf_counter()
    await record(pid, seconds, out)
    (images1, batches1), wall = await count(), time.perf_counter() - start
    stop.set()
    await load
    return images1 - images0, batches1 - batches0, wall


def served(args: argparse.Namespace, jpegs: list[bytes]) -> tuple[int, int, float]:
    from bench import loadgen, modelstats, target

    repo = target.single_model_repository(args.model_path, args.name, WORK / "repos")
    with target.serve(repo, log_path=WORK / f"svertka-{args.name}.log") as server:

        async def count() -> tuple[int, int]:
            counts = modelstats.batch_counts(server.grpc_url, args.name)
            return modelstats.images(counts), sum(counts.values())

        async def main() -> tuple[int, int, float]:
            channel = loadgen.channel(server.grpc_url)
            try:
                if args.api == "image":
                    call = loadgen.image_caller(channel, args.name, jpegs)
                else:
                    call = await loadgen.tensor_caller(channel, args.name)
                return await _measure(server.pid, call, args.concurrency, args.seconds, count,
                                      WORK / "served.data")  # fmt: skip
            finally:
                await channel.close()

        return asyncio.run(main())


def in_process(args: argparse.Namespace, jpegs: list[bytes]) -> tuple[int, int, float]:
    import os

    import numpy as np

    from bench import target
    from service.config import ServerConfig
    from service.metrics import Metrics
    from service.server import build_engine

    repo = target.single_model_repository(args.model_path, args.name, WORK / "repos")

    async def main() -> tuple[int, int, float]:
        # The engine as ``svertka serve`` builds it (server defaults), without the gRPC server around it.
        metrics = Metrics(process_metrics=False, gpu_metrics=False)
        manager = build_engine(ServerConfig(model_repository=repo), metrics)
        await manager.start()
        try:
            model = manager.get(args.name)
            if args.api == "image":

                async def call(i: int) -> None:
                    await model.infer_images([jpegs[i % len(jpegs)]])
            else:
                x = np.random.default_rng(0).standard_normal((1, *model.meta.input_shape), dtype=np.float32)

                async def call(i: int) -> None:
                    await model.infer_tensor(x)

            async def count() -> tuple[int, int]:
                snapshot = await model.statistics()
                return snapshot.inference_count, snapshot.execution_count

            return await _measure(
                os.getpid(), call, args.concurrency, args.seconds, count, WORK / "inprocess.data"
            )
        finally:
            await manager.close()

    return asyncio.run(main())


def _print(title: str, images: int, batches: int, wall: float, ms: dict[str, float]) -> None:
    print(f"{title}: {images / wall:.1f} img/s, mean batch {images / max(batches, 1):.2f}, "
          f"{ms['total']:.2f} ms of CPU per image")  # fmt: skip
    order = ["onnxruntime", SPIN_LABEL, *(label for label in ms if label not in ("onnxruntime", SPIN_LABEL))]
    for label in order:
        value = ms.get(label, 0.0)
        if label != "total" and value >= 0.005:
            print(f"  {label:44s} {value:7.2f} ms  {100 * value / ms['total']:5.1f} %")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.research.native", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model-path", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--api", choices=["image", "tensor"], default="image")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="perf's window, after a warm-up")
    parser.add_argument("--only", choices=["served", "in-process"], help="one of the two measurements")
    args = parser.parse_args(argv)
    missing = available()
    if missing:
        print(f"cannot profile: {missing}", file=sys.stderr)
        return 2
    from bench import images

    WORK.mkdir(parents=True, exist_ok=True)
    jpegs = images.load_jpegs(REPO_ROOT / ".bench" / "images") if args.api == "image" else []
    library = onnxruntime_library()
    results = {}
    for name, run, data in (("served", served, "served.data"), ("in-process", in_process, "inprocess.data")):
        if args.only and args.only != name:
            continue
        images_done, batches, wall = run(args, jpegs)
        ms = breakdown(report(WORK / data), images_done, library)
        _print(f"{name} ({args.api} API, concurrency {args.concurrency})", images_done, batches, wall, ms)
        results[name] = {"images": images_done, "batches": batches, "wall_s": wall, "ms_per_image": ms}
    out = WORK / f"{args.name}-{args.api}-c{args.concurrency}.json"
    out.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
    )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

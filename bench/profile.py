"""Where the server's CPU goes under load: py-spy attached to a running ``svertka serve``.

py-spy samples the Python stacks of another process without stopping it
(``--nonblocking``), so the server runs at full speed while it is watched.
Two views per load:

* **active**: every thread that is not idle, each sample attributed to its
  thread and its innermost frame. Native work (onnxruntime's kernels, the JPEG
  decoder, grpc's C core) shows as the Python frame that called into it.
* **gil**: only the thread holding the GIL. On two cores, Python work per
  request is what stands between the server and the ceiling; this view is
  exactly that work.

``python -m bench.profile --model-path M --name N`` profiles one model on its
own; ``python -m bench`` profiles resnet18 fp32 as part of the full run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import subprocess
import sys
from pathlib import Path

from bench import images, loadgen, target

REPO_ROOT = Path(__file__).resolve().parent.parent
PY_SPY = REPO_ROOT / ".bench" / "pytriton-venv" / "bin" / "py-spy"
PROFILE_RATE_HZ = 100
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def available() -> bool:
    return PY_SPY.is_file()


def _short(path: str) -> str:
    """A file path as a reader recognises it: from the package root (service/..., grpc/..., asyncio/...)."""
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path.rsplit("/", 2)[-1] if "/" in path else path


def _frame(text: str) -> tuple[str, str]:
    match = _FRAME.match(text.strip())
    if not match:
        return text.strip(), ""
    return match["func"], _short(match["file"])


def summarize(raw: str, top: int = 12) -> dict:
    """Aggregate py-spy ``--format raw`` (collapsed stacks, ``--threads``) into shares of samples.

    ``threads``: samples per thread name; ``self``: innermost frames;
    ``inclusive``: frames anywhere on the stack (each counted once per sample).
    """
    threads: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0]
        if thread.startswith("thread ("):
            name = thread.split(":", 1)[1].strip() if ":" in thread else thread
            threads[re.sub(r"_\d+$", "_N", name) or "main"] += n
            frames = frames[1:]
        if not frames:
            continue
        total += n
        func, file = _frame(frames[-1])
        leaf[f"{func} ({file})"] += n
        seen = set()
        for f in frames:
            func, file = _frame(f)
            key = f"{func} ({file})"
            if key not in seen:
                seen.add(key)
                inclusive[key] += n

    def shares(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(k, v / total) for k, v in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "threads": shares(threads),
        "self": shares(leaf),
        "inclusive": shares(inclusive),
    }


def record(
    pid: int, seconds: float, out: Path, *, gil: bool, rate: int = PROFILE_RATE_HZ
) -> subprocess.Popen:
    """Start py-spy on ``pid`` for ``seconds`` (returns the running recorder; wait on it)."""
    cmd = [str(PY_SPY), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
           "--format", "raw", "--threads", "--nonblocking", "-o", str(out)]  # fmt: skip
    if gil:
        cmd.append("--gil")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def _load_while(recorder: subprocess.Popen, call: loadgen.Call, concurrency: int, seconds: float):
    result = await loadgen.closed_loop(call, concurrency=concurrency, duration_s=seconds, warmup_s=0.0)
    while recorder.poll() is None:
        await asyncio.sleep(0.1)
    return result


async def profile_server(server: target.Server, model: str, jpegs: list[bytes], *, concurrency: int,
                         seconds: float, workdir: Path) -> dict:  # fmt: skip
    """Profile ``server`` under a closed loop of tensor and then image requests; both views for each."""
    workdir.mkdir(parents=True, exist_ok=True)
    channel = loadgen.channel(server.grpc_url)
    out: dict = {"concurrency": concurrency, "seconds": seconds}
    try:
        calls = {
            "tensor": await loadgen.tensor_caller(channel, model),
            "image": loadgen.image_caller(channel, model, jpegs),
        }
        for api, call in calls.items():
            await loadgen.closed_loop(
                call, concurrency=concurrency, duration_s=1.0, warmup_s=0.0
            )  # reach steady state
            for view in ("active", "gil"):
                raw = workdir / f"{model}-{api}-{view}.txt"
                recorder = record(server.pid, seconds, raw, gil=view == "gil")
                load = await _load_while(recorder, call, concurrency, seconds + 1.0)
                if recorder.returncode != 0 or not raw.is_file():
                    raise RuntimeError(
                        f"py-spy failed ({recorder.returncode}): {recorder.stderr.read()[-2000:]}"
                    )
                summary = summarize(raw.read_text())
                summary["images_per_s_while_sampled"] = load.images_per_s
                # Samples per sampling tick: the mean number of busy Python threads (active view) or
                # the fraction of wall time some thread held the GIL (gil view).
                summary["busy"] = summary["samples"] / (PROFILE_RATE_HZ * int(seconds))
                summary["command"] = (
                    f"py-spy record --pid PID --duration {int(seconds)} --rate 100 --format raw --threads --nonblocking{' --gil' if view == 'gil' else ''}"
                )
                out[f"{api}_{view}"] = summary
    finally:
        await channel.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, required=True, help="ONNX file (served alone)")
    parser.add_argument("--name", required=True, help="model name")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    if not available():
        parser.error(f"{PY_SPY} is missing: run bash bench/setup_peer.sh")
    workdir = REPO_ROOT / ".bench" / "profile"
    jpegs = images.load_jpegs(REPO_ROOT / ".bench" / "images")
    repo = target.single_model_repository(args.model_path, args.name, workdir / "repos")
    with target.serve(repo, log_path=workdir / "svertka.log") as server:
        result = asyncio.run(profile_server(server, args.name, jpegs, concurrency=args.concurrency,
                                            seconds=args.seconds, workdir=workdir))  # fmt: skip
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

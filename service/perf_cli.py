"""``svertka perf -- ARGS``: Triton's perf_analyzer with what it needs to start, then ARGS.

The tritonclient[grpc] wheel (the dev extra) puts a perf_analyzer binary in the
venv's ``bin/``. That binary links ``libcudart.so.12`` even for a gRPC run
against a CPU-only server; the nvidia-cuda-runtime-cu12 wheel ships the
library, but nothing puts it on the loader's path, so run bare it stops with
"libcudart.so.12: cannot open shared object file". This command finds both,
sets ``LD_LIBRARY_PATH`` and replaces itself with perf_analyzer (its output,
signals and exit status are perf_analyzer's). ``bench.perf`` and the tests run
perf_analyzer through the same two functions.

``PERF_ANALYZER=/path/to/perf_analyzer`` runs another binary (e.g. one from
Triton's SDK image) with the environment as it is: its libraries are its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from service.clierrors import CommandError

BINARY = "perf_analyzer"
#: Another perf_analyzer to run instead of the venv's; its library path is left to the caller.
BINARY_ENV = "PERF_ANALYZER"
CUDART = "libcudart.so.12"
INSTALL_HINT = "pip install 'svertka[dev]', or make setup"


def perf_analyzer_path() -> Path:
    """``PERF_ANALYZER``, else the venv's ``bin/perf_analyzer`` (which may not exist: see ``find``)."""
    return Path(os.environ.get(BINARY_ENV) or Path(sys.prefix) / "bin" / BINARY)


def find() -> Path:
    """The perf_analyzer binary to run; a CommandError naming what is missing if there is none."""
    path = perf_analyzer_path()
    if path.is_file():
        return path
    if os.environ.get(BINARY_ENV):
        raise CommandError(f"{BINARY_ENV}={path}: no such file")
    raise CommandError(
        f"{BINARY} is not installed (no {path}): install tritonclient[grpc] ({INSTALL_HINT}), "
        f"or set {BINARY_ENV} to a {BINARY} binary"
    )


def cuda_runtime_dir() -> Path | None:
    """The nvidia-cuda-runtime-cu12 wheel's ``lib/`` holding libcudart.so.12, or None."""
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except ModuleNotFoundError:  # no nvidia.* wheel at all
        return None
    locations = spec.submodule_search_locations if spec is not None else None
    for location in locations or ():
        lib = Path(location) / "lib"
        if (lib / CUDART).is_file():
            return lib
    return None


def environment() -> dict[str, str]:
    """``os.environ`` with the cuda runtime wheel's ``lib/`` first on ``LD_LIBRARY_PATH``
    (unchanged for a ``PERF_ANALYZER`` binary); a CommandError if the wheel is missing."""
    env = dict(os.environ)
    if os.environ.get(BINARY_ENV):
        return env
    lib = cuda_runtime_dir()
    if lib is None:
        raise CommandError(
            f"{BINARY} needs {CUDART}, even against a CPU server: install nvidia-cuda-runtime-cu12 "
            f"({INSTALL_HINT})"
        )
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(lib), *filter(None, [env.get("LD_LIBRARY_PATH")])])
    return env


def run_perf(args: argparse.Namespace) -> int:
    argv = list(args.args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    binary = find()
    env = environment()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(binary, [str(binary), *argv], env)
    except OSError as exc:
        raise CommandError(f"{binary}: cannot run it ({exc.strerror or exc})") from None
    return 0  # not reached: execve replaced this process


def register(subparsers) -> None:
    perf = subparsers.add_parser(
        "perf",
        help="run Triton's perf_analyzer with the library path it needs (svertka perf -- ARGS)",
        description="Run the perf_analyzer bundled with tritonclient[grpc] (the dev extra) with "
        "LD_LIBRARY_PATH set to the nvidia-cuda-runtime-cu12 wheel's libcudart, passing it every "
        "argument after --. Example: svertka perf -- -i grpc -u localhost:8001 -m digits "
        "--input-data zero --concurrency-range 1:4. Set PERF_ANALYZER to run another binary as it is.",
    )
    perf.add_argument(
        "args", nargs=argparse.REMAINDER, metavar="-- ARGS", help="perf_analyzer's arguments, after --"
    )
    perf.set_defaults(handler=run_perf)

"""The open-file limit: raised to the hard limit at start-up (capped), never lowered, logged.

Each case runs in a fresh interpreter whose soft limit the test sets first,
so the test process's own limits are never touched.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

from service import limits
from tests.helpers import ROOT

_SCRIPT = """
import json, logging, resource, sys
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, ({start}, hard))
from service import limits
result = limits.raise_open_files_limit(cap={cap})
print(json.dumps([result, limits.open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))
"""


def _run(start: int, cap: int) -> tuple[list, str]:
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(start=start, cap=cap)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(run.stdout), run.stderr


def _hard() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def _finite(limit: int) -> int:
    return limits.OPEN_FILES_CAP if limit == resource.RLIM_INFINITY else limit


@pytest.mark.skipif(_finite(_hard()) <= 256, reason="the hard open-files limit leaves nothing to raise")
def test_soft_limit_is_raised_to_the_hard_limit_at_most_the_cap():
    expected = min(_finite(_hard()), limits.OPEN_FILES_CAP)
    (result, seen, soft), log = _run(start=128, cap=limits.OPEN_FILES_CAP)
    assert result == seen == soft == expected
    assert f"raised the soft limit from 128 to {expected}" in log


@pytest.mark.skipif(_finite(_hard()) <= 256, reason="the hard open-files limit leaves nothing to raise")
def test_the_cap_bounds_a_large_hard_limit_and_a_higher_soft_limit_is_kept():
    (result, _seen, soft), _log = _run(start=128, cap=200)
    assert result == soft == 200
    (result, _seen, soft), log = _run(start=250, cap=200)  # already above the cap: never lowered
    assert result == soft == 250
    assert "not changed" in log


@pytest.mark.skipif(_finite(_hard()) <= 256, reason="the hard open-files limit leaves nothing to raise")
@pytest.mark.integration
def test_serve_raises_its_limit_at_start_up(tmp_path):
    """``svertka serve`` started with a soft limit of 128 runs with the raised one, and says so."""
    import signal
    import time

    import psutil

    from tests.helpers.tinymodel import make_repository

    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    launcher = (
        "import os, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'service', *sys.argv[1:]])\n"
    )
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", launcher, "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
             "--grpc-port", "0", "--metrics-port", "0"],
            cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "svertka listening" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        soft, _hard_now = psutil.Process(proc.pid).rlimit(psutil.RLIMIT_NOFILE)
        expected = min(_finite(_hard()), limits.OPEN_FILES_CAP)
        assert soft == expected
        assert f"raised the soft limit from 128 to {expected}" in log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

"""bench.cpu meters real processes: a child that burns a known amount of CPU time is counted.

The children burn CPU *time* (``time.process_time``), not wall time, so the
amounts hold on a busy machine; /proc counts in clock ticks, hence the 10 % slack.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import cpu

BURN_S = 0.3
AT_LEAST = 0.9 * BURN_S
# Wait for a line on stdin, spin for BURN_S of CPU time, say so, then wait for stdin to close (alive to be read).
BURNER = (
    "import sys, time\nsys.stdin.readline()\nt = time.process_time()\n"
    f"while time.process_time() - t < {BURN_S}: pass\nprint('done', flush=True)\nsys.stdin.read()"
)


def _burner() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def _go(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "done"


def test_tree_cpu_counts_a_live_descendant() -> None:
    child = _burner()
    try:
        before = cpu.tree_cpu_s(os.getpid())
        _go(child)
        assert cpu.tree_cpu_s(child.pid) >= AT_LEAST
        assert cpu.tree_cpu_s(os.getpid()) - before >= AT_LEAST  # the child is part of this process's tree
    finally:
        child.communicate("", timeout=30)


def test_meter_divides_server_and_client_cpu_by_the_images() -> None:
    server = _burner()
    try:
        meter = cpu.Meter(server.pid, "children")
        _go(server)
        # The client: a child of this process that has exited and been waited for, as perf_analyzer is.
        subprocess.run(
            [sys.executable, "-c", BURNER], input="go\n", capture_output=True, text=True, check=True
        )
        meter.stop()
    finally:
        server.communicate("", timeout=30)
    use = meter.use(images=10)
    assert use.server_s >= AT_LEAST and use.client_s >= AT_LEAST
    assert use.server_ms_per_image == pytest.approx(100 * use.server_s)
    assert use.client_ms_per_image == pytest.approx(100 * use.client_s)
    assert use.cores_busy == pytest.approx((use.server_s + use.client_s) / use.wall_s)
    with pytest.raises(RuntimeError, match="before stop"):
        cpu.Meter(os.getpid(), "self").use(1)


def test_no_images_means_no_per_image_figure() -> None:
    use = cpu.CpuUse(server_s=1.0, client_s=0.5, images=0, wall_s=1.0)
    assert use.server_ms_per_image is None and use.client_ms_per_image is None
    with pytest.raises(ValueError, match="children"):
        cpu.client_cpu_s("parent")

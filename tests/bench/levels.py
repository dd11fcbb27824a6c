"""perf_analyzer levels in a results file, judged as a reader of the report would judge them."""

from __future__ import annotations

#: perf_analyzer's last line for a level whose windows never agreed within the stability threshold.
#: With half-second windows on a shared machine that is noise, and the report shows "unstable";
#: any other error (a refused request, a crash, no server) is a fault.
UNSTABLE = "Failed to obtain stable measurement"


def assert_measured(points: list[dict], what: str) -> None:
    """Some level measured a positive rate, and every level that did not was only unstable."""
    measured = [p for p in points if (p["images_per_s"] or 0) > 0]
    assert measured, f"{what}: no level measured anything: {[p['error'] for p in points]}"
    for p in points:
        if p not in measured:
            assert UNSTABLE in p["error"], f"{what}, concurrency {p['concurrency']}: {p['error']!r}"

"""``python -m bench.memory`` cannot rot: its quick mode runs end to end on real servers, its arithmetic is checked.

Nothing here asserts how much memory a model takes (the machine is shared and
the numbers belong to docs/deploy.md); only what must hold on any machine: a
swap's peak is at least the steady value, since both versions are resident.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import memory

REPO = Path(__file__).resolve().parents[2]

ROLLUP = """\
55d1c7a2e000-7ffd1b3f2000 ---p 00000000 00:00 0                          [rollup]
Rss:              174208 kB
Pss:              112640 kB
Pss_Dirty:         61440 kB
Pss_Anon:          61440 kB
Pss_File:          51200 kB
Pss_Shmem:             0 kB
Shared_Clean:      69632 kB
Shared_Dirty:          0 kB
Private_Clean:     43008 kB
Private_Dirty:     61568 kB
Referenced:       174208 kB
Anonymous:         61440 kB
"""


def test_smaps_rollup_is_read_in_bytes() -> None:
    got = memory.parse_rollup(ROLLUP)
    assert got["rss"] == 174208 * 1024
    assert got["pss"] == 112640 * 1024
    assert got["uss"] == (43008 + 61568) * 1024  # Private_Clean + Private_Dirty; Pss_Dirty is not Pss
    assert got["pss_anon"] == 61440 * 1024 and got["pss_file"] == 51200 * 1024 and got["pss_shmem"] == 0


def test_suggested_limit_is_the_peak_with_the_margin_rounded_up_to_64_mib() -> None:
    mib = 2**20
    assert memory.suggested_limit(100 * mib, 1.25) == 128 * mib
    assert memory.suggested_limit(512 * mib, 1.25) == 640 * mib  # exact multiples stay
    assert memory.suggested_limit(884 * mib, 1.25) == 1152 * mib
    assert memory.suggested_limit(1, 1.0) == 64 * mib


def test_the_measure_is_rss_for_one_process_and_pss_for_a_tree() -> None:
    window = {"peak": {"rss": 300, "pss": 200}, "peak_rss_hwm": 310}
    assert memory._peak(window, 1) == 310  # the kernel's high-water mark catches what sampling missed
    assert memory._peak(window, 2) == 200


@pytest.mark.slow
@pytest.mark.integration
def test_quick_run_measures_steady_load_and_both_swaps(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--quick", "--frontends", "1,2", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = json.loads((tmp_path / "memory.json").read_text())
    assert results["meta"]["finished"] and results["meta"]["margin"] == memory.MARGIN
    cases = results["cases"]
    assert [(c["case"], c["frontends"], c["measure"]) for c in cases] == [
        ("digits", 1, "rss"),
        ("digits", 2, "pss"),
    ]
    for case in cases:
        (model,) = case["models"]
        assert model["precision"] == "fp32" and model["file_bytes"] > 0
        assert model["row_bytes"] == 3 * 32 * 32 * 4
        assert case["steady"]["processes"] == (1 if case["frontends"] == 1 else 4)
        roles = sorted(p["role"] for p in case["steady"]["by_process"])
        assert roles == (
            ["server"] if case["frontends"] == 1 else ["engine", "frontend 0", "frontend 1", "supervisor"]
        )
        assert case["load"]["completed"] > 0 and not case["load"]["errors"]
        assert [(s["version"], s["under_load"]) for s in case["swaps"]] == [(2, False), (3, True)]
        steady = memory.steady_bytes(case)
        assert steady > 0
        for swap in case["swaps"]:
            assert swap["samples"] >= 2 and swap["ready_s"] is not None
            assert swap["ready_s"] <= swap["unloaded_s"]
            # both versions are resident during a swap: never below the steady value. With several
            # processes compared on private pages (USS): PSS shares pages with whatever else maps the
            # same libraries, so it can move between two samples without svertka doing anything.
            if case["measure"] == "rss":
                assert memory._peak(swap, case["frontends"]) >= steady
            else:
                assert swap["peak"]["uss"] >= case["steady"]["median"]["uss"]
        assert case["peak_bytes"] >= steady
        assert case["suggested_limit_bytes"] >= case["peak_bytes"] * memory.MARGIN
        assert case["suggested_limit_bytes"] % memory.ROUND_BYTES == 0
    page = (tmp_path / "memory.md").read_text()
    assert page.count("| model | precision |") == 2
    assert "| digits | fp32 |" in page and "supervisor" in page

"""The operators' Prometheus artifacts pass promtool: config, rules and rule unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (make system-deps)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=PROM, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_rules_are_valid() -> None:
    files = sorted(str(p.relative_to(PROM)) for p in (PROM / "rules").glob("*.yml"))
    assert len(files) == 2
    res = promtool("check", "rules", *files)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


@needs_promtool
def test_example_scrape_config_is_valid() -> None:
    res = promtool("check", "config", "prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    tests = sorted(str(p.relative_to(PROM)) for p in (PROM / "tests").glob("*.test.yml"))
    assert tests
    res = promtool("test", "rules", *tests)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_severity_and_a_runbook_section_in_the_docs() -> None:
    doc = (ROOT / "docs" / "observability.md").read_text().lower()
    alerts = [
        rule
        for group in yaml.safe_load((PROM / "rules" / "svertka-alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    ]
    assert len(alerts) >= 6
    for rule in alerts:
        assert rule["labels"]["severity"] in {"page", "ticket", "warning", "info"}
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert anchor == rule["alert"].lower()
        assert f"### {rule['alert'].lower()}" in doc, (
            f"docs/observability.md lacks a section for {rule['alert']}"
        )


def test_kubernetes_scrape_snippet_keeps_job_name_the_alerts_use() -> None:
    # Debian's promtool lacks kubernetes_sd, so this snippet is checked structurally.
    snippet = yaml.safe_load((PROM / "scrape-kubernetes.yml").read_text())
    (job,) = snippet["scrape_configs"]
    relabels = job["relabel_configs"]
    assert {"target_label": "job", "replacement": "svertka"} in relabels
    assert any(r.get("regex") == "metrics" and r["action"] == "keep" for r in relabels)


def test_every_alert_fires_in_a_rule_unit_test() -> None:
    """Each alert rule has a promtool unit test in which it fires (not only one where it stays quiet)."""
    alerts = {
        rule["alert"]
        for group in yaml.safe_load((PROM / "rules" / "svertka-alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    fired = set()
    for path in (PROM / "tests").glob("*.test.yml"):
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                if case.get("exp_alerts"):
                    fired.add(case["alertname"])
    assert alerts <= fired, f"alerts never seen firing in deploy/prometheus/tests: {sorted(alerts - fired)}"

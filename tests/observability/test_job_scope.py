"""Every PromQL selector in the rules and the dashboard is scoped to svertka's job.

A selector without a job matcher also takes in another application's series
of the same name, or a second scrape of svertka's own targets (a Prometheus
that runs both the example static job and a Kubernetes one), and the rules
then alert on, and the panels sum, what is not svertka's. The rules select
the job every shipped scrape config gives svertka's targets; the dashboard
selects its ``$job`` variable, which opens on that job. A small PromQL scan
(tests/observability/artifacts.py) finds each selector of each expression.
"""

from __future__ import annotations

import re

import yaml

from tests.observability import artifacts

PROM = artifacts.ROOT / "deploy" / "prometheus"
DASHBOARD_JOB = ("=~", '"$job"')


def scrape_jobs() -> set[str]:
    """The job label svertka's targets get from the shipped scrape configs (after relabelling)."""
    jobs = set()
    for name in ("prometheus.yml", "scrape-kubernetes.yml"):
        for scrape in yaml.safe_load((PROM / name).read_text())["scrape_configs"]:
            relabelled = [
                r["replacement"] for r in scrape.get("relabel_configs", []) if r.get("target_label") == "job"
            ]
            jobs |= set(relabelled) if relabelled else {scrape["job_name"]}
    return jobs


def test_every_rule_selects_svertkas_job_only() -> None:
    (job,) = scrape_jobs()
    problems = {
        rule.get("record") or rule["alert"]: artifacts.unscoped(rule["expr"], ("=", f'"{job}"'))
        for rule in artifacts.rules()
    }
    assert not {name: names for name, names in problems.items() if names}


def test_every_dashboard_query_selects_the_job_variable() -> None:
    problems = [(expr, artifacts.unscoped(expr, DASHBOARD_JOB)) for expr in artifacts.dashboard_exprs()]
    assert not [p for p in problems if p[1]]
    variables = {v["name"]: v for v in artifacts.dashboard()["templating"]["list"]}
    for name, variable in variables.items():
        if variable["type"] != "query" or name == "job":
            continue
        selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"]["query"]).group(1)
        assert not artifacts.unscoped(selector, DASHBOARD_JOB), name
    # The job variable lists the jobs of svertka's own metric, one at a time, and opens on the
    # job the scrape configs give (so the panels show what the rules alert on).
    job = variables["job"]
    assert job["query"]["query"] == "label_values(svertka_build_info, job)"
    assert not job["includeAll"] and not job["multi"]
    assert {artifacts.variable_default("job")} == scrape_jobs()


def test_the_scan_finds_every_selector_without_the_job() -> None:
    svertka = ("=", '"svertka"')
    expr = (
        'sum by (job, model) (rate(a_total{job="svertka", code=~"INTERNAL|UNKNOWN"}[5m])) '
        '/ on (job, model) group_left b_total{model="x"} offset 5m > 1e3 unless c'
    )
    assert artifacts.unscoped(expr, svertka) == ["b_total", "c"]
    assert artifacts.unscoped('a{job="other"} or a{job=~"svertka"} or {job="svertka"}', svertka) == ["a", "a"]
    assert artifacts.unscoped('a{job="svertka"} and {__name__="b"}', svertka) == ["{...}"]
    assert artifacts.unscoped('max(a{le="0.1", job="svertka"}[$__rate_interval:1m])', svertka) == []

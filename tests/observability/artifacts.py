"""Reading the operators' artifacts: the PromQL in the dashboard and rules, and the names it uses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "svertka-dashboard.json"
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))

_FUNCS_AND_KEYWORDS = {
    # aggregations, keywords and modifiers
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "group", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
    "unless", "inf", "nan",
}  # fmt: skip
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, label names and strings removed).

    Good enough for the expressions we write (no ``{__name__=...}`` selectors):
    strings, label matchers, ranges and grouping clauses are cut out first, then
    any identifier not followed by ``(`` is a metric name.
    """
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges / subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?[a-zA-Z_]+\}?", "", e)  # Grafana variables outside selectors
    e = re.sub(
        r"(?<![a-zA-Z0-9_:])\d[0-9.]*(?:[eE][+-]?\d+)?(?:ms|s|m|h|d|w|y)*", " ", e
    )  # numbers, durations
    names = set()
    for m in _IDENT.finditer(e):
        name = m.group(0)
        rest = e[m.end() :].lstrip()
        if rest.startswith("("):
            continue  # a function call
        if name.lower() in _FUNCS_AND_KEYWORDS:
            continue
        names.add(name)
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", []) if t.get("expr")]


def variable_queries() -> list[str]:
    out = []
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", q)
            out.append(m.group(1) if m else q)
    return out


def rules() -> list[dict]:
    return [
        rule
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def recorded_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def rule_exprs() -> list[str]:
    return [r["expr"] for r in rules()]


def variable_default(name: str) -> str:
    """The value a dashboard variable has when the dashboard opens."""
    (variable,) = [v for v in dashboard()["templating"]["list"] if v["name"] == name]
    return variable["current"]["value"]


def concrete(expr: str, rate_interval: str = "30s") -> str:
    """A dashboard expression with Grafana's variables filled in as the dashboard opens:
    the default job, every model and instance ('All')."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace('=~"$job"', f'="{variable_default("job")}"')
        .replace('=~"$model"', '=~".*"')
        .replace('=~"$instance"', '=~".*"')
    )


_STRING = r'"(?:[^"\\]|\\.)*"'
_MATCHER = re.compile(rf"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*({_STRING})")
#: Label lists after these keywords are label names, not selectors.
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def _skip_string(expr: str, i: int) -> int:
    """Index just past the string literal starting at ``i``."""
    match = re.compile(_STRING).match(expr, i)
    assert match, f"unterminated string at {i}: {expr}"
    return match.end()


def _closing(expr: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one at ``i`` (strings skipped)."""
    depth = 0
    while i < len(expr):
        c = expr[i]
        if c == '"':
            i = _skip_string(expr, i)
            continue
        depth += (c == open_) - (c == close)
        i += 1
        if depth == 0:
            return i
    raise AssertionError(f"unbalanced {open_} in {expr}")


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Every series selector of a PromQL expression: (metric name, [(label, op, "value")]).

    A small scanner for the expressions we write: function and aggregation
    calls, grouping clauses, ranges, numbers and durations are not selectors;
    an identifier that is none of those is a metric name, with the matchers in
    the braces that follow it, if any. A selector of braces alone has name "".
    """
    found = []
    i = 0
    while i < len(expr):
        c = expr[i]
        if c == '"':
            i = _skip_string(expr, i)
        elif c == "[":
            i = _closing(expr, i, "[", "]")  # a range or subquery: durations, Grafana's intervals
        elif c == "{":
            end = _closing(expr, i, "{", "}")
            found.append(("", [tuple(m) for m in _MATCHER.findall(expr[i:end])]))
            i = end
        elif c == "$":  # a Grafana variable outside a string
            i = re.compile(r"\$\{?\w+\}?").match(expr, i).end()
        elif re.match(r"[a-zA-Z_:]", c) and not (i and re.match(r"[a-zA-Z0-9_.:]", expr[i - 1])):
            name = _IDENT.match(expr, i).group(0)
            j = _IDENT.match(expr, i).end()
            rest = expr[j:].lstrip()
            k = len(expr) - len(rest)
            if name.lower() in _GROUPING and rest.startswith("("):
                i = _closing(expr, k, "(", ")")
            elif rest.startswith("(") or name.lower() in _FUNCS_AND_KEYWORDS:
                i = j
            elif rest.startswith("{"):
                end = _closing(expr, k, "{", "}")
                found.append((name, [tuple(m) for m in _MATCHER.findall(expr[k:end])]))
                i = end
            else:
                found.append((name, []))
                i = j
        else:
            i += 1
    return found


def unscoped(expr: str, job: tuple[str, str]) -> list[str]:
    """The selectors of ``expr`` without the job matcher ``job`` (operator, quoted value)."""
    return [name or "{...}" for name, matchers in selectors(expr) if ("job", *job) not in matchers]


#: Series Prometheus itself adds to every scrape, not the server.
PROMETHEUS_SYNTHETIC = {"up"}
#: Only exported where NVML finds a GPU (absent, not zero, elsewhere).
GPU_ONLY = {
    "svertka_gpu_utilization_ratio",
    "svertka_gpu_memory_used_bytes",
    "svertka_gpu_memory_total_bytes",
    "svertka_gpu_temperature_celsius",
}


#: Only exported by a server with several processes (``svertka serve --frontends N``, N > 1): the
#: supervisor's series per process and per frontend (docs/observability.md, "Metrics with several
#: processes"). The dashboard's per-process and per-frontend panels are empty with one process; its
#: totals fall back to prometheus_client's ``process_*`` there.
MULTIPROCESS_ONLY = {
    "svertka_frontend_restarts_total",
    "svertka_frontend_in_flight_requests",
    "svertka_process_cpu_seconds_total",
    "svertka_process_resident_memory_bytes",
    "svertka_process_open_fds",
    "svertka_process_start_time_seconds",
}


def referenced_server_metrics() -> set[str]:
    """Every metric name the dashboard and rules need from svertka's scrape."""
    names: set[str] = set()
    for expr in dashboard_exprs() + variable_queries() + rule_exprs():
        names |= metric_names(expr)
    return names - recorded_names() - PROMETHEUS_SYNTHETIC

"""monitoring/ as an operator loads it: promtool (make promtool) accepts the Prometheus config and
the alert rules, the rules fire on synthetic series (alerts_test.yml) and stay silent on healthy
ones, and every series the rules and the Grafana dashboard use is one a live service exports."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import REPO, ApiProcess

MONITORING = REPO / "monitoring"
PROMTOOL = Path(os.environ.get("PROMTOOL", REPO / ".cache" / "promtool" / "promtool"))

# Series the rules or the dashboard use that the service does not export, each with its source.
EXTERNAL_SERIES = {
    "up": "Prometheus's own, one per scrape target (SmallyDown, NodeExporterDown)",
    "node_filesystem_avail_bytes": "node_exporter: free space for the backups (BackupDisk*)",
    "node_filesystem_size_bytes": "node_exporter: the same filesystem's size (BackupDisk*)",
}

# PromQL words that are not series names.
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def series_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions, keywords,
    label names (in `{...}` or a grouping's `(...)`), strings or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: "5..", "/v1/embed"
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    grouping = r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
    expr = re.sub(grouping, "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        name, call = match.groups()
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def promtool(*args: str) -> str:
    assert PROMTOOL.is_file(), f"{PROMTOOL} is missing: run `make promtool`"
    result = subprocess.run(
        [str(PROMTOOL), *args],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_promtool_accepts_the_config_and_the_rules() -> None:
    print(promtool("--version").splitlines()[0])
    assert "SUCCESS: 1 rule files found" in promtool("check", "config", "prometheus.yml")
    rules = alert_rules()
    assert f"SUCCESS: {len(rules)} rules found" in promtool("check", "rules", "alerts.yml")
    # What a person wires up: each rule waits, says how bad it is and what to do.
    for rule in rules:
        assert "for" in rule and rule["labels"]["severity"] in {"critical", "warning"}, rule
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule


def test_the_alerts_fire_on_faulty_series_and_not_on_healthy_ones() -> None:
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")
    # The unit tests cover these alerts both ways: firing on the fault, silent before it.
    cases = [
        case
        for test in yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    rules = {rule["alert"] for rule in alert_rules()}
    for alert in ("SmallyDown", "SmallyUsageDropped", "SmallyRedisDegraded"):
        assert alert in rules
        outcomes = {bool(c["exp_alerts"]) for c in cases if c["alertname"] == alert}
        assert outcomes == {True, False}, alert


def test_series_names_are_found_in_expressions() -> None:
    """The extraction the next test relies on, on the shapes the rules use."""
    expr = (
        "histogram_quantile(0.95, sum by (instance, le) (rate(smally_request_latency_seconds_bucket"
        '{endpoint=~"/v1/embed|/v1/embeddings"}[5m]))) > 0.5 and on (instance) up{job="smally"}'
        " == 0 or min without (role) (smally_redis_up) unless smally_x:ratio5m offset 1d"
    )
    assert series_names(expr) == {
        "smally_request_latency_seconds_bucket",
        "up",
        "smally_redis_up",
        "smally_x:ratio5m",
    }


@pytest.fixture(scope="module")
def scrape(api: ApiProcess, key: str) -> str:
    """/metrics of a live service after an embedding, a 401 and a 404 (so the histograms and the
    error counters have samples)."""
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        auth = {"Authorization": f"Bearer {key}"}
        assert client.post("/v1/embed", json={"text": "hello"}, headers=auth).status_code == 200
        bad = {"Authorization": "Bearer sk-nope"}
        assert client.post("/v1/embed", json={"text": "x"}, headers=bad).status_code == 401
        assert client.get("/no-such-page").status_code == 404
        response = client.get("/metrics")
    assert response.status_code == 200
    return response.text


def exported_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_series_the_rules_and_the_dashboard_use_is_exported(scrape: str) -> None:
    # Sample names as Prometheus stores them (smally_requests_total, ..._bucket, ..._count).
    exported = {name for name, _ in exported_samples(scrape)}
    used: dict[str, list[str]] = {}
    for where, expr in [
        *((f"alerts.yml {r['alert']}", r["expr"]) for r in alert_rules()),
        *(("grafana-dashboard.json", e) for e in dashboard_exprs()),
    ]:
        names = series_names(expr)
        assert names, (where, expr)
        for name in names:
            used.setdefault(name, []).append(where)
    missing = {n: w for n, w in used.items() if n not in exported and n not in EXTERNAL_SERIES}
    assert not missing, f"not in a live /metrics scrape: {missing}"
    # The allow-list names only what is really used, so it cannot hide anything by growing.
    assert set(EXTERNAL_SERIES) <= set(used), set(EXTERNAL_SERIES) - set(used)
    assert not set(EXTERNAL_SERIES) & exported


def test_the_new_series_read_the_live_state(scrape: str) -> None:
    samples = exported_samples(scrape)
    # One Redis for counters and cache (no CACHE_REDIS_URL): the one link reports both roles.
    assert samples[("smally_redis_up", (("role", "counters"),))] == 1
    assert samples[("smally_redis_up", (("role", "cache"),))] == 1
    # The key's user was new: its first embedding built the month's counter from the ledger.
    assert samples[("smally_quota_counter_rebuilds_total", ())] >= 1
    assert samples[("smally_usage_dropped_total", ())] == 0

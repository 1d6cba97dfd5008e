"""The Grafana dashboard only queries metrics this service exports, with bounded labels."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import services.analytics.metrics  # noqa: F401 (registers the metrics)

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/analytics-dashboard.json"


def test_dashboard_queries_exported_metrics_only() -> None:
    """Every metric named in a panel query is registered in this process's registry."""
    families = list(REGISTRY.collect())
    exported = {sample.name for family in families for sample in family.samples}
    # A labelled metric with no child yet has no samples; its series names still exist.
    exported |= {f"{f.name}_total" for f in families if f.type == "counter"}
    exported |= {
        f"{f.name}_{s}"
        for f in families
        if f.type == "histogram"
        for s in ("bucket", "sum", "count")
    }
    exported |= {f.name for f in families}
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {
        n
        for q in queries
        for n in re.findall(r"\b([a-z_]+(?:_total|_bucket|_sum|_count|_messages))\{", q)
    }
    assert names, queries
    assert names <= exported, names - exported
    for name in ("lobby_wait_seconds_bucket", "appointment_duration_seconds_bucket"):
        assert any(name in q for q in queries)


def test_analytics_metric_labels_are_bounded() -> None:
    """The analytics metrics carry environment and department only, never an id."""
    from services.analytics import metrics

    for metric in (metrics.LOBBY_WAIT, metrics.DURATION, metrics.SMS_SENT):
        assert set(metric._labelnames) == {"environment", "department"}
    assert set(metrics.APPOINTMENTS._labelnames) == {"environment", "department", "status"}
    assert set(metrics.EVENT_TO_FACT._labelnames) == {"environment"}

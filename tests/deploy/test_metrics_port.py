"""The rendered manifests keep /metrics inside the cluster: each service's pods open the port
named metrics where EHR_METRICS_PORT says, Prometheus scrapes that port, only the monitoring
namespace may reach it, and no Ingress routes to it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from infra import deploy_check
from infra.deploy_check import by_kind, dig

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / ".local" / "tools" / "bin" / "kustomize"
Obj = dict[str, Any]


@pytest.fixture(scope="module", params=deploy_check.OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[Obj]:
    assert KUSTOMIZE.exists(), "kustomize is missing: run `make deploy-check` once to install it"
    return deploy_check.render(str(KUSTOMIZE), deploy_check.DEPLOY / "overlays" / request.param)


def _selecting(objects: list[Obj], kind: str, path: tuple[str, ...], labels: Obj) -> list[Obj]:
    return [o for o in by_kind(objects, kind) if deploy_check._selects(dig(o, *path), labels)]


def metrics_problems(objects: list[Obj]) -> list[str]:
    problems = []
    for dep in by_kind(objects, "Deployment"):
        name = dig(dep, "metadata", "name")
        pod_labels = dig(dep, "spec", "template", "metadata", "labels") or {}
        metrics_ports: set[Any] = {"metrics", "every port"}
        for container in dig(dep, "spec", "template", "spec", "containers") or []:
            ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
            env = deploy_check._env(objects, container)
            if ports.get("metrics") is None or str(ports["metrics"]) != env.get("EHR_METRICS_PORT"):
                problems.append(f"{name}: container port metrics is not EHR_METRICS_PORT")
            if ports.get("metrics") == ports.get("http"):
                problems.append(f"{name}: metrics shares the http port")
            metrics_ports.add(ports.get("metrics"))
        for svc in _selecting(objects, "Service", ("spec", "selector"), pod_labels):
            svc_name = dig(svc, "metadata", "name")
            targets = {p.get("name"): p.get("targetPort") for p in dig(svc, "spec", "ports") or []}
            if targets.get("metrics") != "metrics":
                problems.append(f"Service {svc_name}: no port metrics")
            svc_labels = dig(svc, "metadata", "labels") or {}
            selector = ("spec", "selector", "matchLabels")
            for monitor in _selecting(objects, "ServiceMonitor", selector, svc_labels):
                scraped = {e.get("port") for e in dig(monitor, "spec", "endpoints") or []}
                if scraped != {"metrics"}:
                    problems.append(f"ServiceMonitor of {svc_name} scrapes {scraped}")
        selector = ("spec", "podSelector", "matchLabels")
        for policy in _selecting(objects, "NetworkPolicy", selector, pod_labels):
            for rule in dig(policy, "spec", "ingress") or []:
                opened = {p.get("port") for p in rule.get("ports") or []} or {"every port"}
                sources = {
                    dig(peer, "namespaceSelector", "matchLabels", "kubernetes.io/metadata.name")
                    for peer in rule.get("from") or [{}]
                }
                if opened & metrics_ports and sources != {"monitoring"}:
                    problems.append(f"{name}: {opened} open to namespaces {sources}")
    for ingress in by_kind(objects, "Ingress"):
        for rule in dig(ingress, "spec", "rules") or []:
            for route in dig(rule, "http", "paths") or []:
                port = dig(route, "backend", "service", "port") or {}
                if port != {"name": "http"}:
                    problems.append(f"Ingress {dig(ingress, 'metadata', 'name')} routes to {port}")
    return problems


def test_metrics_are_scraped_on_their_own_port_that_only_monitoring_reaches(
    rendered: list[Obj],
) -> None:
    """Every Deployment opens port metrics at EHR_METRICS_PORT, its Service exposes it, its
    ServiceMonitor scrapes only it, only the monitoring namespace may reach it, and every
    Ingress backend is a Service's port http."""
    assert len(by_kind(rendered, "Deployment")) == 4
    assert metrics_problems(rendered) == []


def test_catches_metrics_left_on_the_public_port(rendered: list[Obj]) -> None:
    """The check fails when a ServiceMonitor scrapes port http, the ingress controller may
    reach port metrics, or an Ingress routes to port metrics."""
    objects = copy.deepcopy(rendered)
    [monitor, *_] = by_kind(objects, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["port"] = "http"
    [policy] = [
        p for p in by_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == "ehr-launch"
    ]
    # The first rule admits the ingress controller.
    policy["spec"]["ingress"][0]["ports"].append({"port": "metrics", "protocol": "TCP"})
    [ingress, *_] = by_kind(objects, "Ingress")
    ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"] = {
        "name": "metrics"
    }
    problems = metrics_problems(objects)
    assert any("scrapes {'http'}" in p for p in problems), problems
    assert any("open to namespaces" in p for p in problems), problems
    assert any("routes to {'name': 'metrics'}" in p for p in problems), problems

"""The deployment check passes on deploy/, catches broken manifests, and the Postgres roles work."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from infra import deploy_check
from libs.common.db import create_pool, migrate
from libs.common.portal_auth import PORTAL_MIGRATIONS
from services.analytics.app import MIGRATIONS as ANALYTICS_MIGRATIONS
from services.config.app import MIGRATIONS as CONFIG_MIGRATIONS
from services.launch.app import MIGRATIONS as LAUNCH_MIGRATIONS
from services.notify.app import MIGRATIONS as NOTIFY_MIGRATIONS

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / ".local" / "tools" / "bin" / "kustomize"
HADOLINT = ROOT / ".venv" / "bin" / "hadolint"
BASE = ROOT / "deploy" / "base"


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def service_objects(service: str) -> list[dict[str, Any]]:
    """One service's base manifests plus the shared ConfigMap, as kustomize would emit them
    (the pod template labels that kustomize adds are added here)."""
    objects = load(BASE / "common" / "configmap.yaml")
    for path in sorted((BASE / service).glob("*.yaml")):
        if path.name != "kustomization.yaml":
            objects += load(path)
    for obj in objects:
        if obj["kind"] == "Deployment":
            labels = obj["spec"]["template"]["metadata"]["labels"]
            labels["app.kubernetes.io/name"] = f"ehr-{service}"
            obj["spec"]["template"]["spec"]["containers"][0]["image"] = "registry/x:1.0.0"
        if obj["kind"] == "Service":
            obj.setdefault("metadata", {}).setdefault("labels", {})["app.kubernetes.io/name"] = (
                f"ehr-{service}"
            )
    return objects


def deployment_problems(objects: list[dict[str, Any]]) -> list[str]:
    report = deploy_check.Report()
    deploy_check.check_deployments(objects, "fixture", report)
    return report.problems


def test_deploy_check_passes() -> None:
    """make deploy-check's command passes on the committed manifests and Dockerfile."""
    assert KUSTOMIZE.exists(), "kustomize is missing: run `make deploy-check` once to install it"
    result = subprocess.run(
        [sys.executable, "-m", "infra.deploy_check", "--kustomize", str(KUSTOMIZE)]
        + (["--hadolint", str(HADOLINT)] if HADOLINT.exists() else []),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deploy-check: passed" in result.stdout
    # Both overlays rendered, built-in kinds validated, custom resources listed as skipped.
    assert "overlays/test:" in result.stdout
    assert "overlays/production:" in result.stdout
    assert "Deployment (apps/v1) x8" in result.stdout
    assert re.search(r"skipped.*KafkaTopic", result.stdout)


def test_the_base_service_fixture_is_clean() -> None:
    """The fixture below starts from manifests the checker accepts."""
    for service in deploy_check.SERVICES:
        assert deployment_problems(service_objects(service)) == []


def test_catches_a_deployment_without_probes() -> None:
    """A Deployment without liveness and readiness probes fails the check."""
    objects = service_objects("launch")
    container = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    del container["livenessProbe"], container["readinessProbe"]
    problems = deployment_problems(objects)
    assert any("livenessProbe must GET /healthz" in p for p in problems), problems
    assert any("readinessProbe must GET /readyz" in p for p in problems), problems


def test_catches_weak_security_limits_and_drain() -> None:
    """Root, no limits, a writable root filesystem and a short grace period are each caught."""
    objects = service_objects("notify")
    pod = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    pod["securityContext"]["runAsNonRoot"] = False
    container = pod["containers"][0]
    del container["securityContext"]["runAsNonRoot"]
    del container["resources"]["limits"]
    container["securityContext"]["readOnlyRootFilesystem"] = False
    container["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}
    pod["terminationGracePeriodSeconds"] = 20
    container["image"] = "registry/x:latest"
    problems = "\n".join(deployment_problems(objects))
    for expected in (
        "runAsNonRoot must be true",
        "no cpu limit",
        "no memory limit",
        "readOnlyRootFilesystem must be true",
        "capabilities must drop ALL",
        "terminationGracePeriodSeconds 20 must exceed",
        "uses latest",
    ):
        assert expected in problems


@pytest.mark.parametrize("service", deploy_check.SERVICES)
def test_catches_a_service_without_the_field_encryption_key_ring(service: str) -> None:
    """ehr-common sets EHR_FIELD_ENCRYPTION_ACTIVE_KEY for every service; one whose secrets
    lack ehr_field_encryption_keys keeps the dev key ring, which has no such key, and its first
    encryption fails (analytics' portal sign-in was a 500 that way). The check catches it."""
    objects = service_objects(service)
    secret = next(o for o in objects if o["kind"] == "ExternalSecret")
    del secret["spec"]["target"]["template"]["data"]["ehr_field_encryption_keys"]
    secret["spec"]["data"] = [
        d for d in secret["spec"]["data"] if d["secretKey"] != "ehr_field_encryption_keys"
    ]
    assert deployment_problems(objects) == [
        f"fixture Deployment/ehr-{service} container {service}: EHR_FIELD_ENCRYPTION_ACTIVE_KEY"
        " is set but no Secret puts ehr_field_encryption_keys into /run/secrets/ehr-connector"
        " (the key ring must hold the active key)"
    ]


def test_secret_files_follow_the_projected_volume() -> None:
    """The secret files a service sees are its ExternalSecret's template keys plus the KafkaUser
    password projected by item, and nothing from a Secret mounted elsewhere."""
    objects = service_objects("analytics")
    pod = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    files = deploy_check.secret_files(
        objects, pod, pod["containers"][0], deploy_check.DEFAULT_SECRETS_DIR
    )
    assert files == {
        "ehr_database_url",
        "ehr_field_encryption_keys",
        "ehr_entra_client_secret",
        "ehr_kafka_sasl_password",
    }


def test_catches_topics_and_acls_that_drift_from_the_code() -> None:
    """A missing KafkaTopic, a non-compacted config topic and an extra ACL are caught."""
    objects = load(BASE / "kafka" / "topics.yaml") + load(BASE / "kafka" / "users.yaml")
    objects = [o for o in objects if o["metadata"]["name"] != "sms-sent.dlq"]
    config_topic = next(o for o in objects if o["metadata"]["name"] == "integration-config")
    config_topic["spec"]["config"]["cleanup.policy"] = "delete"
    notify = next(o for o in objects if o["metadata"]["name"] == "ehr-notify")
    notify["spec"]["authorization"]["acls"].append(
        {"resource": {"type": "topic", "name": "meeting-ended"}, "operations": ["Read"]}
    )
    report = deploy_check.Report()
    deploy_check.check_kafka(objects, "fixture", True, report)
    problems = "\n".join(report.problems)
    assert "topic sms-sent.dlq (libs/common/events.py) has no KafkaTopic" in problems
    assert "KafkaTopic/integration-config: must be compacted" in problems
    assert "ACL beyond what the code uses: ('topic', 'meeting-ended', 'Read')" in problems
    assert problems.count("\n") == 2, problems


def test_the_inbox_must_outlast_every_record_kafka_can_redeliver() -> None:
    """The committed topics (a week, or a month for dead letters, plus a week until the
    segment rolls) fit the default 45 days of dedupe; a topic kept 40 days, or forever, does
    not."""
    topics = load(BASE / "kafka" / "topics.yaml")
    deployment = {
        "kind": "Deployment",
        "metadata": {"name": "launch"},
        "spec": {"template": {"spec": {"containers": [{"name": "launch"}]}}},
    }
    report = deploy_check.Report()
    deploy_check.check_dedupe_retention([*topics, deployment], "fixture", report)
    assert report.problems == []
    joined = next(o for o in topics if o["metadata"]["name"] == "patient-joined")
    joined["spec"]["config"]["retention.ms"] = str(40 * 24 * 3600 * 1000)
    created = next(o for o in topics if o["metadata"]["name"] == "appointment-created")
    created["spec"]["config"]["retention.ms"] = "-1"
    report = deploy_check.Report()
    deploy_check.check_dedupe_retention([*topics, deployment], "fixture", report)
    problems = "\n".join(report.problems)
    assert "KafkaTopic/appointment-created: infinite retention.ms" in problems
    assert "EHR_DEDUPE_RETENTION_DAYS=45 does not outlast patient-joined's records (47 days" in (
        problems
    )
    assert problems.count("\n") == 1, problems


def strimzi_problems(objects: list[dict[str, Any]]) -> list[str]:
    report = deploy_check.Report()
    deploy_check.check_strimzi_pod_security(objects, "fixture", report)
    return report.problems


def test_catches_strimzi_pods_the_restricted_pod_security_level_refuses() -> None:
    """The namespaces enforce `restricted`; Strimzi's default provider sets no container
    security context, so brokers and the entity operator need one in their templates. The
    committed Kafka passes; a pool without a template inherits the Kafka's; without both, or
    with a weakened entity operator container, the check fails."""
    objects = load(BASE / "kafka" / "kafka.yaml")
    assert strimzi_problems(objects) == []
    pool = next(o for o in objects if o["kind"] == "KafkaNodePool")
    kafka = next(o for o in objects if o["kind"] == "Kafka")
    del pool["spec"]["template"]
    assert strimzi_problems(objects) == []
    del kafka["spec"]["kafka"]["template"]
    sc = kafka["spec"]["entityOperator"]["template"]["userOperatorContainer"]["securityContext"]
    sc["allowPrivilegeEscalation"] = True
    problems = "\n".join(strimzi_problems(objects))
    for expected in (
        "KafkaNodePool/dual-role: template kafkaContainer: runAsNonRoot must be true",
        "KafkaNodePool/dual-role: template kafkaContainer: seccompProfile must be RuntimeDefault",
        "KafkaNodePool/dual-role: template initContainer: capabilities must drop ALL",
        "Kafka/ehr-kafka: entityOperator.template userOperatorContainer:"
        " allowPrivilegeEscalation must be false",
    ):
        assert expected in problems, problems
    assert "topicOperatorContainer" not in problems


def egress_problems(objects: list[dict[str, Any]]) -> list[str]:
    report = deploy_check.Report()
    deploy_check.check_public_egress(objects, "fixture", report)
    return report.problems


def test_catches_public_egress_without_ipv6_or_with_private_ranges() -> None:
    """Each service's HTTPS egress opens 0.0.0.0/0 and ::/0 minus the private, link-local and
    loopback ranges. An IPv4-only rule, or an IPv6 block that lets unique-local addresses
    (where the clouds' IPv6 metadata endpoints are) through, fails the check."""
    policies = {s: load(BASE / s / "networkpolicy.yaml")[0] for s in deploy_check.SERVICES}
    assert egress_problems(list(policies.values())) == []
    launch_peers = policies["launch"]["spec"]["egress"][-1]["to"]
    launch_peers[:] = [p for p in launch_peers if p["ipBlock"]["cidr"] != "::/0"]
    notify_v6 = next(
        p for p in policies["notify"]["spec"]["egress"][-1]["to"] if p["ipBlock"]["cidr"] == "::/0"
    )
    notify_v6["ipBlock"]["except"].remove("fc00::/7")
    assert egress_problems(list(policies.values())) == [
        "fixture NetworkPolicy/ehr-launch: egress rule 3 opens 0.0.0.0/0 but not ::/0 (IPv6)",
        "fixture NetworkPolicy/ehr-notify: egress rule 3 to ::/0 must except fc00::/7",
    ]


def test_catches_a_metric_the_code_does_not_export() -> None:
    """An alert on a misspelt metric fails; suffixes of real metrics pass."""
    rule = copy.deepcopy(load(BASE / "monitoring" / "prometheusrule.yaml")[0])
    rule["spec"]["groups"][0]["rules"].append(
        {"alert": "Typo", "expr": "sum(rate(lobby_wait_second_bucket[5m])) > 1"}
    )
    dashboard = {
        "kind": "ConfigMap",
        "metadata": {"name": "d", "labels": {"grafana_dashboard": "1"}},
        "data": {"d.json": '{"panels": [{"targets": [{"expr": "sum(appointments_total)"}]}]}'},
    }
    report = deploy_check.Report()
    deploy_check.check_metrics([rule, dashboard], "fixture", report)
    assert report.problems == [
        "fixture PrometheusRule/ehr-connector Typo: metric lobby_wait_second_bucket is not"
        " exported by the code"
    ]


def test_catches_committed_secret_values() -> None:
    """A Secret with data in the rendered output fails the check."""
    report = deploy_check.Report()
    secret = {"kind": "Secret", "metadata": {"name": "s"}, "data": {"k": "dmFsdWU="}}
    deploy_check.check_no_secret_values([secret], "fixture", report)
    assert report.problems == ["fixture Secret/s: a Secret with values is committed"]


def test_dockerfile_rules() -> None:
    """The committed Dockerfile passes the image rules; a root, unpinned one does not."""
    dockerignore = (ROOT / ".dockerignore").read_text()
    assert (
        deploy_check.dockerfile_problems((ROOT / "deploy" / "Dockerfile").read_text(), dockerignore)
        == []
    )
    bad = "\n".join(
        [
            "FROM python:latest",
            "ADD https://example.org/tool.tgz /opt/",
            "ENV API_TOKEN=abc",
            "RUN apt-get update && apt-get install -y curl",
            "COPY . /app",
            'CMD ["python", "-m", "services.launch"]',
        ]
    )
    problems = "\n".join(deploy_check.dockerfile_problems(bad, "tests/\n"))
    for expected in (
        "python:latest is not pinned",
        "ADD of a URL",
        "secret-looking ENV",
        "apt-get install without removing /var/lib/apt/lists",
        "non-root USER",
        "no HEALTHCHECK",
        "uv.lock",
        "allow-list",
    ):
        assert expected in problems


def _post_init_sql(database: str, roles: dict[str, str]) -> list[str]:
    cluster = load(BASE / "postgres" / "cluster.yaml")[0]
    statements: list[str] = cluster["spec"]["bootstrap"]["initdb"]["postInitApplicationSQL"]
    out = []
    for statement in statements:
        sql = statement.replace("ehr_connector", f'"{database}"')
        # Roles are cluster-wide: the test gives them unique names; schemas keep theirs.
        if sql.startswith("GRANT "):
            privileges, grantees = sql.split(" TO ")
            sql = f"{privileges} TO " + ", ".join(roles[g] for g in grantees.split(", "))
        else:
            sql = re.sub(
                r"\b(ROLE|AUTHORIZATION) (launch|config|notify|analytics)\b",
                lambda m: f"{m.group(1)} {roles[m.group(2)]}",
                sql,
            )
        out.append(sql)
    return out


async def test_postgres_roles_run_their_migrations_and_see_only_their_schema(
    database_url: str,
) -> None:
    """The CloudNativePG bootstrap SQL gives each service a role that can run its migrations
    behind the advisory lock, and cannot read another service's schema."""
    database = database_url.rsplit("/", 1)[1]
    suffix = uuid.uuid4().hex[:8]
    roles = {s: f"t_{s}_{suffix}" for s in deploy_check.SERVICES}
    migrations = {
        "launch": (LAUNCH_MIGRATIONS, []),
        "config": (CONFIG_MIGRATIONS, [PORTAL_MIGRATIONS]),
        "notify": (NOTIFY_MIGRATIONS, []),
        "analytics": (ANALYTICS_MIGRATIONS, [PORTAL_MIGRATIONS]),
    }
    admin = await asyncpg.connect(database_url)
    try:
        for statement in _post_init_sql(database, roles):
            await admin.execute(statement)
        for role in roles.values():
            # What CloudNativePG's managed roles then apply.
            await admin.execute(f"ALTER ROLE {role} LOGIN PASSWORD 'test-only'")
        for service, role in roles.items():
            dsn = database_url.replace("://postgres@", f"://{role}:test-only@", 1)
            pool = await create_pool(dsn, service)
            try:
                directory, shared = migrations[service]
                assert await migrate(pool, service, directory, shared)
                assert await migrate(pool, service, directory, shared) == []
                other = "notify" if service != "notify" else "launch"
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await pool.fetch(f"SELECT * FROM {other}.outbox")
            finally:
                await pool.close()
    finally:
        for role in roles.values():
            await admin.execute(f"DROP OWNED BY {role} CASCADE")
            await admin.execute(f"DROP ROLE {role}")
        await admin.close()

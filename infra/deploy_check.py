"""`make deploy-check`: render every kustomize overlay and check what it would install.

Offline. Built-in kinds are validated against the Kubernetes JSON schemas that the
`kubernetes-validate` package ships (strict: unknown fields are errors); custom resources
whose schemas no reachable registry ships are listed as skipped, by kind. Then the
project's own rules: every Deployment has probes, limits and a non-root securityContext, and
the field-encryption key ring among its secret files when its ConfigMaps name an active key;
Strimzi's broker and entity operator templates meet the `restricted` Pod Security level; public
egress is IPv4 and IPv6 without private ranges;
every topic in `libs.common.events.Topic` (and its `.dlq`) has a KafkaTopic; each KafkaUser's
ACLs are what the service's code consumes and produces; every metric named in an alert or a
dashboard is exported by the code; no Secret values are committed; the Dockerfile passes
hadolint and a list of image rules.

    python -m infra.deploy_check --kustomize .local/tools/bin/kustomize [--hadolint PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import yaml
from referencing import Registry, Resource

from libs.common.events import COMPACTED_TOPICS, Topic, dead_letter_topic
from libs.common.settings import DEFAULT_SECRETS_DIR as DEFAULT_SECRETS_DIR
from libs.common.settings import ServiceSettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("test", "production")
SERVICES = ("config", "launch", "notify", "analytics")
KUBERNETES_VERSION = "1.33.0"
# Where a read-only container writes its temporary files (an emptyDir).
TMP = "/" + "tmp"

# Custom resources: whose operator defines them. None of these ship a JSON schema in a package
# this machine's registries serve, so they are skipped by schema validation (and checked by
# the rules below instead).
CRD_GROUPS = {
    "kafka.strimzi.io": "Strimzi",
    "postgresql.cnpg.io": "CloudNativePG",
    "monitoring.coreos.com": "Prometheus Operator",
    "external-secrets.io": "External Secrets Operator",
}

Obj = dict[str, Any]


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    validated: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")


def ident(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def by_kind(objects: Iterable[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o.get("kind") == kind]


def dig(obj: Any, *path: str | int) -> Any:
    for key in path:
        if isinstance(obj, dict) and isinstance(key, str):
            obj = obj.get(key)
        elif isinstance(obj, list) and isinstance(key, int) and -len(obj) <= key < len(obj):
            obj = obj[key]
        else:
            return None
    return obj


# --- rendering --------------------------------------------------------------------------------


def render(kustomize: str, directory: Path) -> list[Obj]:
    result = subprocess.run(  # noqa: S603 - a fixed tool on a path of ours
        [kustomize, "build", str(directory)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"kustomize build {directory} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# --- schema validation ------------------------------------------------------------------------


class Schemas:
    """The JSON schemas shipped in the kubernetes-validate package, one validator per kind."""

    def __init__(self, version: str = KUBERNETES_VERSION) -> None:
        spec = importlib.util.find_spec("kubernetes_validate")
        if spec is None or spec.origin is None:
            raise RuntimeError("kubernetes-validate is not installed (uv sync)")
        minor = ".".join(version.split(".")[:2])
        base = Path(spec.origin).parent / "kubernetes-json-schema"
        candidates = sorted(base.glob(f"v{minor}.*-local-strict"))
        if not candidates:
            raise RuntimeError(f"kubernetes-validate has no schemas for Kubernetes {minor}")
        self.directory = candidates[-1]
        self.version = self.directory.name.removesuffix("-local-strict")
        definitions = json.loads((self.directory / "_definitions.json").read_text())
        self._registry: Registry[Any] = Resource.from_contents(definitions) @ Registry()
        self._validators: dict[tuple[str, str], Any] = {}

    def validator(self, kind: str, api_version: str) -> Any | None:
        key = (kind, api_version)
        if key not in self._validators:
            # rbac.authorization.k8s.io/v1 -> rbac-v1, apps/v1 -> apps-v1, v1 -> v1
            group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
            path = self.directory / f"{kind.lower()}-{group_version}.json"
            if not path.exists():
                self._validators[key] = None
            else:
                schema = json.loads(path.read_text())
                registry = Resource.from_contents(schema) @ self._registry
                self._validators[key] = jsonschema.Draft202012Validator(schema, registry=registry)
        return self._validators[key]


def validate_schemas(objects: list[Obj], schemas: Schemas, where: str, report: Report) -> None:
    for obj in objects:
        kind, api_version = str(obj.get("kind")), str(obj.get("apiVersion"))
        group = api_version.split("/")[0] if "/" in api_version else ""
        if group in CRD_GROUPS:
            label = f"{kind} ({api_version}, {CRD_GROUPS[group]})"
            report.skipped[label] = report.skipped.get(label, 0) + 1
            continue
        validator = schemas.validator(kind, api_version)
        if validator is None:
            report.fail(f"{where} {ident(obj)}", f"no schema for {kind} {api_version}")
            continue
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        for error in errors[:5]:
            path = ".".join(str(p) for p in error.absolute_path) or "(root)"
            report.fail(f"{where} {ident(obj)}", f"schema: {path}: {error.message[:300]}")
        label = f"{kind} ({api_version})"
        report.validated[label] = report.validated.get(label, 0) + 1


# --- workloads --------------------------------------------------------------------------------


def _env(objects: list[Obj], container: Obj) -> dict[str, str]:
    """What the container's environment resolves to from its ConfigMaps and literal env."""
    maps = {dig(o, "metadata", "name"): o.get("data") or {} for o in by_kind(objects, "ConfigMap")}
    values: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        name = dig(source, "configMapRef", "name")
        if name is not None:
            values.update(maps.get(name, {}))
    for item in container.get("env") or []:
        if "value" in item:
            values[item["name"]] = str(item["value"])
    return values


def secret_keys(objects: list[Obj], name: str) -> set[str] | None:
    """The keys the Secret `name` will hold, from the ExternalSecret that makes it: its
    template's data (plus its data's keys when the template merges), else its data's keys.
    None when that cannot be known here (no ExternalSecret makes it, or it uses dataFrom)."""
    for es in by_kind(objects, "ExternalSecret"):
        spec = es.get("spec") or {}
        if (dig(spec, "target", "name") or dig(es, "metadata", "name")) != name:
            continue
        if spec.get("dataFrom"):
            return None
        keys = {str(d.get("secretKey")) for d in spec.get("data") or []}
        template = dig(spec, "target", "template") or {}
        if template.get("data") is not None:
            merged = template.get("mergePolicy") == "Merge"
            return set(map(str, template["data"])) | (keys if merged else set())
        return keys
    return None


def secret_files(objects: list[Obj], pod: Obj, container: Obj, directory: str) -> set[str] | None:
    """The files that Secrets put into `directory` of the container (pydantic-settings reads one
    setting per file there); None if a Secret's keys cannot be known from the manifests."""
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    files: set[str] = set()
    for mount in container.get("volumeMounts") or []:
        if mount.get("mountPath") != directory or mount.get("subPath"):
            continue
        volume = volumes.get(mount.get("name")) or {}
        if "projected" in volume:
            projected = dig(volume, "projected", "sources") or []
            sources = [s["secret"] for s in projected if "secret" in s]
        elif "secret" in volume:
            sources = [{**volume["secret"], "name": dig(volume, "secret", "secretName")}]
        else:
            continue
        for source in sources:
            if source.get("items"):
                files |= {str(item.get("path")) for item in source["items"]}
                continue
            keys = secret_keys(objects, str(source.get("name")))
            if keys is None:
                return None
            files |= keys
    return files


def check_deployments(objects: list[Obj], where: str, report: Report) -> None:
    deployments = by_kind(objects, "Deployment")
    if not deployments:
        report.fail(where, "no Deployment rendered")
    for dep in deployments:
        at = f"{where} {ident(dep)}"
        pod = dig(dep, "spec", "template", "spec") or {}
        pod_sc = pod.get("securityContext") or {}
        if pod.get("automountServiceAccountToken") is not False:
            report.fail(at, "automountServiceAccountToken must be false")
        if dig(pod_sc, "seccompProfile", "type") != "RuntimeDefault":
            report.fail(at, "pod seccompProfile must be RuntimeDefault")
        containers = pod.get("containers") or []
        if not containers:
            report.fail(at, "no containers")
        for c in containers:
            cat = f"{at} container {c.get('name')}"
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                if dig(c, probe, "httpGet", "path") != path:
                    report.fail(cat, f"{probe} must GET {path}")
            limits = dig(c, "resources", "limits") or {}
            requests = dig(c, "resources", "requests") or {}
            for resource in ("cpu", "memory"):
                if resource not in limits:
                    report.fail(cat, f"no {resource} limit")
                if resource not in requests:
                    report.fail(cat, f"no {resource} request")
            sc = c.get("securityContext") or {}
            non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
            user = sc.get("runAsUser", pod_sc.get("runAsUser"))
            if non_root is not True:
                report.fail(cat, "runAsNonRoot must be true")
            if user is not None and int(user) == 0:
                report.fail(cat, "runAsUser must not be 0")
            if sc.get("allowPrivilegeEscalation") is not False:
                report.fail(cat, "allowPrivilegeEscalation must be false")
            if sc.get("privileged"):
                report.fail(cat, "must not be privileged")
            if sc.get("readOnlyRootFilesystem") is not True:
                report.fail(cat, "readOnlyRootFilesystem must be true")
            if "ALL" not in (dig(sc, "capabilities", "drop") or []):
                report.fail(cat, "capabilities must drop ALL")
            mounts = {m.get("mountPath"): m.get("name") for m in c.get("volumeMounts") or []}
            empty_dirs = {v.get("name") for v in pod.get("volumes") or [] if "emptyDir" in v}
            if mounts.get(TMP) not in empty_dirs:
                report.fail(cat, f"{TMP} must be an emptyDir (the root filesystem is read-only)")
            image = str(c.get("image", ""))
            if ":" not in image.rsplit("/", 1)[-1] and "@" not in image:
                report.fail(cat, f"image {image!r} has no tag")
            elif image.endswith(":latest"):
                report.fail(cat, f"image {image!r} uses latest")
            env = _env(objects, c)
            if env.get("EHR_KAFKA_CREATE_TOPICS", "true").lower() != "false":
                report.fail(cat, "EHR_KAFKA_CREATE_TOPICS must be false (Strimzi owns topics)")
            # An active key id with no key ring leaves the service on the built-in dev ring,
            # which lacks that id: its first encryption (a portal sign-in, a launch) is a 500.
            if "EHR_FIELD_ENCRYPTION_ACTIVE_KEY" in env and "EHR_FIELD_ENCRYPTION_KEYS" not in env:
                directory = env.get("EHR_SECRETS_DIR", DEFAULT_SECRETS_DIR)
                files = secret_files(objects, pod, c, directory)
                if files is not None and "ehr_field_encryption_keys" not in files:
                    report.fail(
                        cat,
                        "EHR_FIELD_ENCRYPTION_ACTIVE_KEY is set but no Secret puts"
                        f" ehr_field_encryption_keys into {directory} (the key ring must hold"
                        " the active key)",
                    )
            drain = float(env.get("EHR_SHUTDOWN_DRAIN_TIMEOUT_S", "20"))
            pre_stop = float(dig(c, "lifecycle", "preStop", "sleep", "seconds") or 0)
            grace = float(pod.get("terminationGracePeriodSeconds", 30))
            if grace <= drain + pre_stop:
                report.fail(
                    cat,
                    f"terminationGracePeriodSeconds {grace:g} must exceed the drain time"
                    f" {drain:g} s plus preStop {pre_stop:g} s",
                )
        check_companions(objects, dep, where, report)


def _selects(selector: dict[str, str] | None, labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in (selector or {}).items())


def check_companions(objects: list[Obj], dep: Obj, where: str, report: Report) -> None:
    """Each Deployment has a ServiceAccount, Service, PDB, HPA, NetworkPolicy and
    ServiceMonitor that actually select it."""
    at = f"{where} {ident(dep)}"
    name = dig(dep, "metadata", "name")
    labels: dict[str, str] = dig(dep, "spec", "template", "metadata", "labels") or {}
    if not _selects(dig(dep, "spec", "selector", "matchLabels"), labels):
        report.fail(at, "spec.selector does not match the pod template's labels")
    account = dig(dep, "spec", "template", "spec", "serviceAccountName")
    accounts = [
        o for o in by_kind(objects, "ServiceAccount") if dig(o, "metadata", "name") == account
    ]
    if not accounts:
        report.fail(at, f"ServiceAccount {account!r} missing")
    elif accounts[0].get("automountServiceAccountToken") is not False:
        report.fail(at, f"ServiceAccount {account} must set automountServiceAccountToken: false")
    wanted: dict[str, tuple[str, ...]] = {
        "Service": ("spec", "selector"),
        "PodDisruptionBudget": ("spec", "selector", "matchLabels"),
        "NetworkPolicy": ("spec", "podSelector", "matchLabels"),
    }
    for kind, selector in wanted.items():
        if not any(_selects(dig(o, *selector), labels) for o in by_kind(objects, kind)):
            report.fail(at, f"no {kind} selects its pods")
    hpas = [
        o
        for o in by_kind(objects, "HorizontalPodAutoscaler")
        if dig(o, "spec", "scaleTargetRef", "name") == name
    ]
    if not hpas:
        report.fail(at, "no HorizontalPodAutoscaler")
    services = [
        o for o in by_kind(objects, "Service") if _selects(dig(o, "spec", "selector"), labels)
    ]
    for svc in services:
        svc_labels = dig(svc, "metadata", "labels") or {}
        if not any(
            _selects(dig(m, "spec", "selector", "matchLabels"), svc_labels)
            for m in by_kind(objects, "ServiceMonitor")
        ):
            report.fail(at, f"no ServiceMonitor selects Service {dig(svc, 'metadata', 'name')}")


# --- secrets ----------------------------------------------------------------------------------


def check_no_secret_values(objects: list[Obj], where: str, report: Report) -> None:
    for obj in by_kind(objects, "Secret"):
        if obj.get("data") or obj.get("stringData"):
            report.fail(f"{where} {ident(obj)}", "a Secret with values is committed")


# --- Kafka ------------------------------------------------------------------------------------

_MAKE_EVENT = re.compile(r"make_event\(\s*Topic\.([A-Z_]+)")
_HANDLER_KEY = re.compile(r"Topic\.([A-Z_]+)\s*:")


def topic_usage(services_dir: Path = ROOT / "services") -> dict[str, tuple[set[str], set[str]]]:
    """(consumed, produced) topic names per service, read from its code: the keys of its
    consumer handler maps (`Topic.X: handler`) and its `make_event(Topic.X, ...)` calls."""
    usage: dict[str, tuple[set[str], set[str]]] = {}
    for service in SERVICES:
        consumed: set[str] = set()
        produced: set[str] = set()
        for path in sorted((services_dir / service).rglob("*.py")):
            text = path.read_text()
            consumed |= {Topic[m].value for m in _HANDLER_KEY.findall(text)}
            produced |= {Topic[m].value for m in _MAKE_EVENT.findall(text)}
        usage[service] = (consumed, produced)
    return usage


def expected_acls(consumed: set[str], produced: set[str], group: str) -> set[tuple[str, str, str]]:
    acls = {("topic", t, "Read") for t in consumed}
    acls |= {("topic", t, "Write") for t in produced}
    acls |= {("topic", dead_letter_topic(t), "Write") for t in consumed}
    if consumed:
        acls.add(("group", group, "Read"))
    return acls


def actual_acls(user: Obj) -> set[tuple[str, str, str]]:
    acls: set[tuple[str, str, str]] = set()
    for acl in dig(user, "spec", "authorization", "acls") or []:
        resource = acl.get("resource") or {}
        if resource.get("patternType", "literal") != "literal":
            acls.add((resource.get("type", "?"), f"{resource.get('name')}*", "prefix"))
        operations = acl.get("operations") or [acl.get("operation")]
        for op in operations:
            if op != "Describe":  # implied by Read and Write
                acls.add((str(resource.get("type")), str(resource.get("name")), str(op)))
    return acls


def check_kafka(objects: list[Obj], where: str, production: bool, report: Report) -> None:
    topics = {
        dig(t, "spec", "topicName") or dig(t, "metadata", "name"): t
        for t in by_kind(objects, "KafkaTopic")
    }
    wanted = {name for t in Topic for name in (t.value, dead_letter_topic(t.value))}
    for name in sorted(wanted - topics.keys()):
        report.fail(where, f"topic {name} (libs/common/events.py) has no KafkaTopic")
    for name in sorted(topics.keys() - wanted):
        report.fail(where, f"KafkaTopic {name} is not a topic of libs/common/events.py")
    compacted = {t.value for t in COMPACTED_TOPICS}
    for name, topic in topics.items():
        at = f"{where} KafkaTopic/{name}"
        spec = topic.get("spec") or {}
        config = spec.get("config") or {}
        policy = config.get("cleanup.policy", "delete")
        if name in compacted and policy != "compact":
            report.fail(at, "must be compacted (cleanup.policy: compact)")
        if name not in compacted and "compact" in str(policy):
            report.fail(at, "must not be compacted")
        if name not in compacted and "retention.ms" not in config:
            report.fail(at, "no retention.ms")
        if not isinstance(spec.get("partitions"), int) or spec["partitions"] < 1:
            report.fail(at, "no partition count")
        if production:
            if spec.get("replicas") != 3:
                report.fail(at, "replication must be 3 in production")
            if str(config.get("min.insync.replicas")) != "2":
                report.fail(at, "min.insync.replicas must be 2 in production")
    users = {dig(u, "metadata", "name"): u for u in by_kind(objects, "KafkaUser")}
    for service, (consumed, produced) in topic_usage().items():
        user = users.get(f"ehr-{service}")
        if user is None:
            report.fail(where, f"no KafkaUser ehr-{service}")
            continue
        want, have = expected_acls(consumed, produced, service), actual_acls(user)
        at = f"{where} KafkaUser/ehr-{service}"
        for extra in sorted(have - want):
            report.fail(at, f"ACL beyond what the code uses: {extra}")
        for missing in sorted(want - have):
            report.fail(at, f"ACL the code needs is missing: {missing}")


# Kafka deletes a record only with its whole segment, once the segment's newest record is
# older than retention.ms; a segment rolls after segment.ms (the broker's default, a week).
DEFAULT_SEGMENT_MS = 7 * 24 * 3600 * 1000
_DAY_MS = 24 * 3600 * 1000


def check_dedupe_retention(objects: list[Obj], where: str, report: Report) -> None:
    """Every service's inbox must remember an event for longer than Kafka can deliver it again
    (libs/common/housekeeping.py): EHR_DEDUPE_RETENTION_DAYS against the longest life of a
    record in a non-compacted topic, dead-letter topics included (an operator replays a dead
    letter into its topic, where the consumers that did apply it must still know it)."""
    compacted = {t.value for t in COMPACTED_TOPICS}
    longest_ms, longest = 0, ""
    for topic in by_kind(objects, "KafkaTopic"):
        name = dig(topic, "spec", "topicName") or dig(topic, "metadata", "name")
        config = dig(topic, "spec", "config") or {}
        if name in compacted:
            continue
        retention = int(config.get("retention.ms", 7 * _DAY_MS))
        if retention < 0:
            report.fail(f"{where} KafkaTopic/{name}", "infinite retention.ms outlives every inbox")
            continue
        life = retention + int(config.get("segment.ms", DEFAULT_SEGMENT_MS))
        if life > longest_ms:
            longest_ms, longest = life, name
    default_days = ServiceSettings.model_fields["dedupe_retention_days"].default
    for dep in by_kind(objects, "Deployment"):
        for container in dig(dep, "spec", "template", "spec", "containers") or []:
            days = int(_env(objects, container).get("EHR_DEDUPE_RETENTION_DAYS", default_days))
            if days * _DAY_MS <= longest_ms:
                report.fail(
                    f"{where} {ident(dep)}",
                    f"EHR_DEDUPE_RETENTION_DAYS={days} does not outlast {longest}'s records"
                    f" ({longest_ms / _DAY_MS:g} days with segment.ms): a redelivery would be"
                    " applied again",
                )


# --- public egress ----------------------------------------------------------------------------

# What an egress rule open to the internet must keep out: private, shared (CGNAT), link-local
# (the cloud metadata endpoints) and loopback ranges; for IPv6 unique-local (fc00::/7, also where
# the clouds' IPv6 metadata endpoints are), link-local and loopback.
_PUBLIC_EXCEPT = {
    "0.0.0.0/0": ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                  "169.254.0.0/16", "127.0.0.0/8"),
    "::/0": ("fc00::/7", "fe80::/10", "::1/128", "64:ff9b::/96", "64:ff9b:1::/48"),
}  # fmt: skip


def check_public_egress(objects: list[Obj], where: str, report: Report) -> None:
    """An egress rule to 0.0.0.0/0 excludes the private ranges and has the IPv6 twin ::/0
    (same rule, so same ports) excluding their IPv6 counterparts; a ::/0 block excludes them."""
    for policy in by_kind(objects, "NetworkPolicy"):
        at = f"{where} {ident(policy)}"
        for number, rule in enumerate(dig(policy, "spec", "egress") or []):
            blocks = {
                str(dig(peer, "ipBlock", "cidr")): dig(peer, "ipBlock", "except") or []
                for peer in rule.get("to") or []
                if dig(peer, "ipBlock", "cidr") in _PUBLIC_EXCEPT
            }
            if "0.0.0.0/0" in blocks and "::/0" not in blocks:
                report.fail(at, f"egress rule {number} opens 0.0.0.0/0 but not ::/0 (IPv6)")
            for cidr, excepted in blocks.items():
                nets = [ipaddress.ip_network(str(e), strict=False) for e in excepted]
                for required in _PUBLIC_EXCEPT[cidr]:
                    net = ipaddress.ip_network(required)
                    if not any(
                        net.version == e.version and net.subnet_of(e)  # type: ignore[arg-type]
                        for e in nets
                    ):
                        report.fail(at, f"egress rule {number} to {cidr} must except {required}")


# --- Strimzi pods under the `restricted` Pod Security Standard --------------------------------

# Strimzi's default (baseline) security provider gives its containers no security context, which
# the namespaces' `restricted` enforcement refuses; these templates must carry one. Per
# component: where its pod template and its containers' templates sit in `spec`.
_STRIMZI_PODS = {
    "entityOperator": ("pod", {"topicOperator": "topicOperatorContainer",
                               "userOperator": "userOperatorContainer"}),
    "cruiseControl": ("pod", {"": "cruiseControlContainer"}),
    "kafkaExporter": ("pod", {"": "container"}),
}  # fmt: skip


def restricted_problems(pod: Obj | None, containers: dict[str, Obj | None]) -> list[str]:
    """What the `restricted` Pod Security Standard would refuse in a Strimzi pod template
    (PodTemplate.securityContext) and its container templates (ContainerTemplate)."""
    problems: list[str] = []
    pod_sc = dig(pod, "securityContext") or {}
    for name, template in containers.items():
        sc = dig(template, "securityContext") or {}
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot must be true (pod or container)")
        if 0 in (sc.get("runAsUser"), pod_sc.get("runAsUser")):
            problems.append(f"{name}: runAsUser must not be 0")
        seccomp = dig(sc, "seccompProfile", "type") or dig(pod_sc, "seccompProfile", "type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile must be RuntimeDefault (pod or container)")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        if sc.get("privileged"):
            problems.append(f"{name}: must not be privileged")
        if "ALL" not in (dig(sc, "capabilities", "drop") or []):
            problems.append(f"{name}: capabilities must drop ALL")
    return problems


def check_strimzi_pod_security(objects: list[Obj], where: str, report: Report) -> None:
    kafkas = {dig(k, "metadata", "name"): k for k in by_kind(objects, "Kafka")}
    broker = ("kafkaContainer", "initContainer")  # the init container: rack awareness
    for pool in by_kind(objects, "KafkaNodePool"):
        kafka = kafkas.get(dig(pool, "metadata", "labels", "strimzi.io/cluster"))
        # Strimzi does not merge the two templates: a pool's own template replaces the Kafka's.
        template = dig(pool, "spec", "template") or dig(kafka, "spec", "kafka", "template")
        for problem in restricted_problems(
            dig(template, "pod"), {c: dig(template, c) for c in broker}
        ):
            report.fail(f"{where} {ident(pool)}", f"template {problem}")
    for kafka in kafkas.values():
        for component, (pod_key, containers) in _STRIMZI_PODS.items():
            spec = dig(kafka, "spec", component)
            if spec is None:
                continue
            template = spec.get("template") or {}
            wanted = {
                c: template.get(c) for part, c in containers.items() if not part or part in spec
            }
            for problem in restricted_problems(template.get(pod_key), wanted):
                report.fail(f"{where} {ident(kafka)}", f"{component}.template {problem}")


# --- Postgres connection budget ---------------------------------------------------------------


def check_postgres(objects: list[Obj], where: str, report: Report) -> None:
    clusters = by_kind(objects, "Cluster")
    if len(clusters) != 1:
        report.fail(where, "expected one CloudNativePG Cluster")
        return
    spec = clusters[0].get("spec") or {}
    roles = {r.get("name"): r for r in dig(spec, "managed", "roles") or []}
    max_connections = int(dig(spec, "postgresql", "parameters", "max_connections") or 100)
    hpas = {
        dig(h, "spec", "scaleTargetRef", "name"): h
        for h in by_kind(objects, "HorizontalPodAutoscaler")
    }
    deployments = {dig(d, "metadata", "name"): d for d in by_kind(objects, "Deployment")}
    total = 0
    for service in SERVICES:
        role = roles.get(service)
        dep = deployments.get(f"ehr-{service}")
        if role is None or dep is None:
            report.fail(where, f"no managed role or Deployment for {service}")
            continue
        if not dig(role, "passwordSecret", "name"):
            report.fail(where, f"role {service} has no passwordSecret")
        pool = int(
            _env(objects, dig(dep, "spec", "template", "spec", "containers", 0)).get(
                "EHR_DATABASE_POOL_MAX", "10"
            )
        )
        surge = dig(dep, "spec", "strategy", "rollingUpdate", "maxSurge")
        peak = int(dig(hpas.get(f"ehr-{service}"), "spec", "maxReplicas") or 1) + int(surge or 0)
        limit = int(role.get("connectionLimit", -1))
        if limit < 0 or limit < peak * pool:
            report.fail(
                where, f"role {service}: connectionLimit {limit} < {peak} pods x pool {pool}"
            )
        total += max(limit, 0)
    if total + 10 > max_connections:
        report.fail(
            where, f"max_connections {max_connections} < roles' limits {total} + 10 reserved"
        )


# --- metrics ----------------------------------------------------------------------------------

_METRIC_DEF = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"")
# Series the client library exports by itself (process and platform collectors).
_LIBRARY_PREFIXES = ("process_", "python_")
_PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "rate", "irate", "increase", "delta", "idelta",
    "deriv", "predict_linear", "histogram_quantile", "label_values", "label_replace",
    "label_join", "abs", "absent", "absent_over_time", "ceil", "floor", "round", "clamp",
    "clamp_min", "clamp_max", "changes", "resets", "vector", "scalar", "time", "timestamp",
    "sort", "sort_desc", "sqrt", "exp", "ln", "log2", "log10", "avg_over_time",
    "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "last_over_time",
    "quantile_over_time", "stddev_over_time", "inf", "nan", "query_result", "metrics",
}  # fmt: skip


def exported_metrics(roots: Iterable[Path] = (ROOT / "services", ROOT / "libs")) -> set[str]:
    """Every series name the code's prometheus_client metrics expose."""
    names: set[str] = set()
    for root in roots:
        for path in root.rglob("*.py"):
            for kind, name in _METRIC_DEF.findall(path.read_text()):
                if kind == "Counter":
                    base = name.removesuffix("_total")
                    names |= {f"{base}_total", f"{base}_created"}
                elif kind in ("Histogram", "Summary"):
                    names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
                else:
                    names.add(name)
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a Grafana label_values query)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers and template variables
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)  # dashboard variables
    # label_values(metric, label): the second argument is a label.
    text = re.sub(r"(label_values\s*\([^,()]*),[^)]*\)", r"\1)", text)
    tokens = re.findall(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", text)
    return {t for t in tokens if t.lower() not in _PROMQL_WORDS and not re.fullmatch(r"\d.*", t)}


def _dashboard_queries(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            promql = key == "expr" or (key in ("query", "definition") and "(" in str(value))
            if promql and isinstance(value, str):
                yield value
            else:
                yield from _dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _dashboard_queries(item)


def check_metrics(objects: list[Obj], where: str, report: Report) -> None:
    known = exported_metrics()
    queries: list[tuple[str, str]] = []
    for rule in by_kind(objects, "PrometheusRule"):
        for group in dig(rule, "spec", "groups") or []:
            for r in group.get("rules") or []:
                queries.append(
                    (f"{ident(rule)} {r.get('alert') or r.get('record')}", str(r.get("expr")))
                )
    dashboards = [
        c
        for c in by_kind(objects, "ConfigMap")
        if dig(c, "metadata", "labels", "grafana_dashboard")
    ]
    if not dashboards:
        report.fail(where, "no Grafana dashboard ConfigMap (label grafana_dashboard)")
    for cm in dashboards:
        for key, text in (cm.get("data") or {}).items():
            try:
                document = json.loads(text)
            except json.JSONDecodeError as exc:
                report.fail(f"{where} {ident(cm)}", f"{key} is not JSON: {exc}")
                continue
            queries += [(f"{ident(cm)} {key}", q) for q in _dashboard_queries(document)]
    if not any("PrometheusRule" in source for source, _ in queries):
        report.fail(where, "no PrometheusRule alerts")
    for source, query in queries:
        for name in sorted(metric_names(query)):
            if name not in known and not name.startswith(_LIBRARY_PREFIXES):
                report.fail(f"{where} {source}", f"metric {name} is not exported by the code")


def check_dashboard_sources(report: Report) -> None:
    """Every deploy/grafana/*.json is wired into the ConfigMap generator."""
    kustomization = yaml.safe_load((DEPLOY / "grafana" / "kustomization.yaml").read_text())
    listed = {
        Path(f.split("=")[-1]).name
        for gen in kustomization.get("configMapGenerator") or []
        for f in gen.get("files") or []
    }
    for path in sorted((DEPLOY / "grafana").glob("*.json")):
        if path.name not in listed:
            report.fail(
                "deploy/grafana", f"{path.name} is not in kustomization.yaml's configMapGenerator"
            )


# --- image ------------------------------------------------------------------------------------


def dockerfile_problems(text: str, dockerignore: str) -> list[str]:
    """Static image rules, on top of hadolint."""
    problems: list[str] = []
    lines = re.sub(r"\\\n", " ", text).splitlines()
    instructions = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    stages = {
        m.group(1) for ln in instructions if (m := re.match(r"(?i)FROM\s+\S+\s+AS\s+(\S+)", ln))
    }
    for ln in instructions:
        word, _, rest = ln.partition(" ")
        word = word.upper()
        if word == "FROM":
            image = rest.split()[0]
            if image in stages:
                continue
            tag = image.rsplit("/", 1)[-1]
            if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
                problems.append(f"base image {image} is not pinned to a tag or digest")
            elif "@sha256:" not in image and not re.search(r":\d+\.\d+\.\d+", tag):
                problems.append(f"base image {image} is not pinned to an exact version")
        if word == "ADD" and re.search(r"https?://", rest):
            problems.append("ADD of a URL (download in a RUN with a checksum instead)")
        if word in ("ENV", "ARG") and re.search(
            r"(?i)(password|secret|token|api_?key)\w*\s*=", rest
        ):
            problems.append(f"a secret-looking {word}: {rest[:60]}")
        if word == "RUN" and "apt-get install" in rest and "rm -rf /var/lib/apt/lists" not in rest:
            problems.append("apt-get install without removing /var/lib/apt/lists")
    users = [ln.split()[1] for ln in instructions if ln.upper().startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the final stage must switch to a non-root USER")
    elif not users[-1].split(":")[0].isdigit():
        problems.append("USER should be numeric so Kubernetes can verify runAsNonRoot")
    if not any(ln.upper().startswith("HEALTHCHECK") for ln in instructions):
        problems.append("no HEALTHCHECK (or HEALTHCHECK NONE with the reason)")
    if not any(ln.upper().startswith("ENTRYPOINT") for ln in instructions):
        problems.append("no ENTRYPOINT")
    if "uv.lock" not in text or "--frozen" not in text:
        problems.append("dependencies are not installed from uv.lock with --frozen")
    ignored = [
        ln.strip() for ln in dockerignore.splitlines() if ln.strip() and not ln.startswith("#")
    ]
    allowed = {ln[1:].rstrip("/") for ln in ignored if ln.startswith("!")}
    if "*" not in ignored:
        problems.append(".dockerignore must start from '*' (an allow-list)")
    for forbidden in ("tests", "sandbox", ".env", ".local", ".venv"):
        if forbidden in allowed:
            problems.append(f".dockerignore lets {forbidden} into the image")
    return problems


def check_image(hadolint: str | None, report: Report) -> None:
    dockerfile = DEPLOY / "Dockerfile"
    for problem in dockerfile_problems(
        dockerfile.read_text(), (ROOT / ".dockerignore").read_text()
    ):
        report.fail("deploy/Dockerfile", problem)
    if hadolint:
        result = subprocess.run(  # noqa: S603 - the pinned dev tool
            [hadolint, "--failure-threshold", "info", str(dockerfile)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            report.fail("deploy/Dockerfile", f"hadolint:\n{result.stdout}{result.stderr}")


# --- main -------------------------------------------------------------------------------------


def check_rendered(objects: list[Obj], overlay: str, schemas: Schemas, report: Report) -> None:
    where = f"overlays/{overlay}"
    validate_schemas(objects, schemas, where, report)
    check_deployments(objects, where, report)
    check_no_secret_values(objects, where, report)
    check_kafka(objects, where, overlay == "production", report)
    check_dedupe_retention(objects, where, report)
    check_strimzi_pod_security(objects, where, report)
    check_public_egress(objects, where, report)
    check_postgres(objects, where, report)
    check_metrics(objects, where, report)


def run(kustomize: str, hadolint: str | None, overlays: Iterable[str] = OVERLAYS) -> Report:
    report = Report()
    schemas = Schemas()
    for overlay in overlays:
        objects = render(kustomize, DEPLOY / "overlays" / overlay)
        check_rendered(objects, overlay, schemas, report)
        namespaces = {
            dig(o, "metadata", "namespace") for o in objects if o.get("kind") != "Namespace"
        }
        listed = ", ".join(sorted(map(str, namespaces)))
        print(f"deploy-check: overlays/{overlay}: {len(objects)} objects, namespace {listed}")
    check_dashboard_sources(report)
    check_image(hadolint, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kustomize", required=True)
    parser.add_argument("--hadolint")
    args = parser.parse_args(argv)
    started = time.monotonic()
    report = run(args.kustomize, args.hadolint)
    validated = ", ".join(f"{k} x{v}" for k, v in sorted(report.validated.items()))
    skipped = ", ".join(f"{k} x{v}" for k, v in sorted(report.skipped.items()))
    print(f"deploy-check: schema-validated (Kubernetes {Schemas().version}, strict): {validated}")
    print(f"deploy-check: skipped, no schema available offline: {skipped}")
    for problem in report.problems:
        print(f"deploy-check: FAIL {problem}", file=sys.stderr)
    outcome = "failed" if report.problems else "passed"
    print(
        f"deploy-check: {outcome} ({len(report.problems)} problems;"
        f" rules: probes, limits, securityContext, key ring, Strimzi pod security, egress,"
        f" topics, ACLs, metrics, secrets, image;"
        f" {time.monotonic() - started:.1f} s)"
    )
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())

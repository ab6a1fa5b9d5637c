"""deploy/: the image, the Kubernetes manifests, the broker definitions, alerts and dashboard.

Everything here runs offline and in a few seconds:

- Kubernetes manifests: the kustomize builds (base, the example overlay, the overlay with the
  tick-loop component) are rendered by a small renderer below that supports exactly the
  kustomize features deploy/ uses and refuses any other. Where ``kubectl`` is installed, its
  built-in kustomize must produce the same objects. Core kinds are validated with
  kubernetes-validate (strict: unknown fields fail) for the oldest Kubernetes the manifests
  claim and the newest that kubernetes-validate ships; KEDA and Prometheus-operator kinds with
  jsonschema against the CRD schemas kept in deploy/crds/ (see the header of each file for
  its upstream commit: PrometheusRule verbatim, ScaledObject and TriggerAuthentication
  without descriptions, PodMonitor REDUCED to the properties a plain HTTP scrape uses).
- RabbitMQ: deploy/rabbitmq/definitions.json against cscart_fm.core.topology, both ways, and (with
  a broker) imported into a fresh vhost, after which the service's own declaration must pass.
- Metrics: every metric an alert or the dashboard uses is exported by cscart_fm.core.metrics
  (rabbitmq_* are RabbitMQ's, listed in RABBITMQ_METRICS); with promtool, the alert rules are
  checked and unit-tested (deploy/kubernetes/components/monitoring/tests/alerts.test.yaml).
- The Dockerfile's essentials (no Docker engine runs here) and docs/operations.md's runbook.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import schema_contents

from consumers.registry import JOBS
from cscart_fm.core import metrics as service_metrics
from cscart_fm.core import topology
from cscart_fm.core.errors import ERROR_TYPES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
CRDS = DEPLOY / "crds"
DOCS = ROOT / "docs" / "operations.md"
DEFINITIONS = DEPLOY / "rabbitmq" / "definitions.json"
PROMETHEUS_RULE = K8S / "components" / "monitoring" / "prometheusrule.yaml"
DASHBOARD = K8S / "components" / "monitoring" / "dashboards" / "cscart-fm.json"
ALERT_TESTS = K8S / "components" / "monitoring" / "tests" / "alerts.test.yaml"

KUBERNETES_VERSIONS = ("1.29", "1.37")
"""The oldest Kubernetes the manifests claim (docs/operations.md) and the newest schema set
kubernetes-validate carries offline (it ships 1.25 to 1.37)."""

RABBITMQ_METRICS = {
    # rabbitmq_prometheus plugin, per-object metrics (labels: vhost, queue).
    "rabbitmq_queue_messages_ready": {"vhost", "queue"},
    "rabbitmq_queue_messages": {"vhost", "queue"},
}
"""Metrics that RabbitMQ exports, not this service."""

TARGET_LABELS = {"namespace", "pod", "container", "job", "instance", "endpoint", "service"}
"""Labels Prometheus (the operator's PodMonitor) adds to every scraped series."""

CONSUMER_NAMES = JOBS.names
TOPOLOGY = JOBS.topology()
WORK_QUEUES = {TOPOLOGY.consumer(name).queue_name for name in CONSUMER_NAMES}


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


# =============================================================================================
# A minimal kustomize: only what deploy/kubernetes uses; anything else is refused loudly.
# =============================================================================================

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
_KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "configMapGenerator",
    "patches",
    "images",
    "namespace",
}
_GENERATOR_KEYS = {"name", "files", "literals", "options"}
_GENERATOR_OPTIONS = {"disableNameSuffixHash", "labels", "annotations"}
_GENERATED = "__generated__"


class Unsupported(Exception):
    """deploy/ uses a kustomize feature this renderer does not implement: teach it first."""


def _kustomization(directory: Path) -> dict[str, Any]:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no kustomization.yaml")
    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = set(document) - _KUSTOMIZATION_KEYS
    if unknown:
        raise Unsupported(f"{path}: {sorted(unknown)}")
    return document


def _inside(directory: Path, relative: str) -> Path:
    """Kustomize's default load restrictor: files must be under the kustomization root."""
    path = (directory / relative).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise Unsupported(f"{directory}: {relative} is outside the kustomization root")
    return path


def _configmap_hash(obj: dict[str, Any]) -> str:
    """kustomize's name suffix: sha256 of {"data","kind","name":""} as Go's json.Marshal."""
    encoded = json.dumps(
        {"data": obj.get("data", {}), "kind": "ConfigMap", "name": ""},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        encoded = encoded.replace(char, escaped)
    digest = hashlib.sha256(encoded.encode("utf-8")).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _generate(directory: Path, kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    generated = []
    for spec in kustomization.get("configMapGenerator", []):
        unknown = set(spec) - _GENERATOR_KEYS
        options = spec.get("options", {})
        if unknown or set(options) - _GENERATOR_OPTIONS:
            raise Unsupported(f"configMapGenerator {spec.get('name')}: {spec}")
        data: dict[str, str] = {}
        for literal in spec.get("literals", []):
            name, _, value = literal.partition("=")
            data[name] = value
        for file in spec.get("files", []):
            path = _inside(directory, file)
            data[path.name] = path.read_text(encoding="utf-8")
        metadata: dict[str, Any] = {"name": spec["name"]}
        if options.get("labels"):
            metadata["labels"] = dict(options["labels"])
        if options.get("annotations"):
            metadata["annotations"] = dict(options["annotations"])
        generated.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": metadata,
                "data": data,
                _GENERATED: not options.get("disableNameSuffixHash", False),
            }
        )
    return generated


def _merge(target: Any, patch: Any) -> Any:
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = dict(target)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = _merge(target.get(key), value)
        return merged
    if isinstance(patch, list):
        raise Unsupported("lists in patches (strategic-merge list semantics)")
    return copy.deepcopy(patch)


def _apply_patches(
    directory: Path, kustomization: dict[str, Any], objects: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    for entry in kustomization.get("patches", []):
        if set(entry) - {"path", "patch"}:
            raise Unsupported(f"patch options {sorted(entry)} (targets) in {directory}")
        text = (
            _inside(directory, entry["path"]).read_text(encoding="utf-8")
            if "path" in entry
            else entry["patch"]
        )
        for patch in (doc for doc in yaml.safe_load_all(text) if doc):
            key = _key(patch)
            matches = [obj for obj in objects if _key(obj) == key]
            if len(matches) != 1:
                raise AssertionError(f"{directory}: patch for {key} matches {len(matches)}")
            if patch.get("$patch") == "delete":
                objects = [obj for obj in objects if _key(obj) != key]
                continue
            body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
            index = objects.index(matches[0])
            objects[index] = _merge(matches[0], body)
    return objects


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [obj["spec"]["template"]["spec"]]
    if kind == "CronJob":
        return [obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "Pod":
        return [obj["spec"]]
    return []


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        container
        for spec in pod_specs(obj)
        for container in spec.get("initContainers", []) + spec.get("containers", [])
    ]


def _set_images(kustomization: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    for image in kustomization.get("images", []):
        if set(image) - {"name", "newName", "newTag"}:
            raise Unsupported(f"images entry {image}")
        for obj in objects:
            for container in containers(obj):
                name, _, tag = container["image"].partition(":")
                if name != image["name"]:
                    continue
                name = image.get("newName", name)
                tag = image.get("newTag", tag)
                container["image"] = f"{name}:{tag}" if tag else name


def _resources(directory: Path, kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(_build(path, expect="Kustomization"))
        else:
            objects.extend(copy.deepcopy(load_docs(_inside(directory, entry))))
    return objects


def _build(
    directory: Path, expect: str = "Kustomization", extra_components: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    kustomization = _kustomization(directory)
    if kustomization.get("kind", "Kustomization") != expect:
        raise AssertionError(f"{directory}: expected a {expect}")
    objects = _resources(directory, kustomization)
    for entry in [*kustomization.get("components", []), *extra_components]:
        objects = _component((directory / entry).resolve(), objects)
    objects.extend(_generate(directory, kustomization))
    objects = _apply_patches(directory, kustomization, objects)
    _set_images(kustomization, objects)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


def _component(directory: Path, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    kustomization = _kustomization(directory)
    if kustomization.get("kind") != "Component":
        raise AssertionError(f"{directory}: expected a Component")
    objects = objects + _resources(directory, kustomization)
    for entry in kustomization.get("components", []):
        objects = _component((directory / entry).resolve(), objects)
    objects.extend(_generate(directory, kustomization))
    objects = _apply_patches(directory, kustomization, objects)
    _set_images(kustomization, objects)
    return objects


def _rename_generated(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    renames = {}
    for obj in objects:
        if obj.pop(_GENERATED, False):
            new = f"{obj['metadata']['name']}-{_configmap_hash(obj)}"
            renames[obj["metadata"]["name"]] = new
            obj["metadata"]["name"] = new
    for obj in objects:
        for spec in pod_specs(obj):
            for volume in spec.get("volumes", []):
                if "configMap" in volume:
                    name = volume["configMap"]["name"]
                    volume["configMap"]["name"] = renames.get(name, name)
            for container in containers(obj):
                for source in container.get("envFrom", []):
                    if "configMapRef" in source:
                        name = source["configMapRef"]["name"]
                        source["configMapRef"]["name"] = renames.get(name, name)
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("configMapKeyRef")
                    if ref:
                        ref["name"] = renames.get(ref["name"], ref["name"])
    return objects


def kustomize(directory: Path, extra_components: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """``kubectl kustomize directory``, in Python; ``extra_components`` are added to the
    directory's own ``components`` (as if listed there)."""
    return _rename_generated(_build(directory, extra_components=extra_components))


BUILDS = {
    "base": (K8S / "base", ()),
    "overlay": (K8S / "overlays" / "example", ()),
    "overlay+tick-loop": (K8S / "overlays" / "example", ("../../components/tick-loop",)),
}


@cache
def _built(name: str) -> tuple[dict[str, Any], ...]:
    directory, extra = BUILDS[name]
    return tuple(kustomize(directory, extra))


def built(name: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_built(name)))


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def manifest_files() -> list[Path]:
    return sorted(
        path
        for path in K8S.rglob("*.yaml")
        if path.name != "kustomization.yaml"
        and "tests" not in path.relative_to(K8S).parts
        and "patches" not in path.relative_to(K8S).parts
    )


def standalone_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object in every manifest file, the Secrets template included."""
    for path in manifest_files():
        if path.name == "clients.yaml":
            continue
        for index, doc in enumerate(load_docs(path)):
            yield f"{path.relative_to(K8S)}[{index}]", doc


# =============================================================================================
# Validation: core kinds with kubernetes-validate, custom resources against deploy/crds
# =============================================================================================

_INT_FORMATS = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_FORMATS = jsonschema.FormatChecker()


for _name, (_low, _high) in _INT_FORMATS.items():

    def _check(value: object, low: int = _low, high: int = _high) -> bool:
        return not isinstance(value, int) or low <= value <= high

    _FORMATS.checks(_name)(_check)


def _strict(schema: Any) -> Any:
    """kubectl --validate=strict: an unknown field is an error, as in kubernetes-validate's
    strict mode. Objects that declare properties accept no others unless they say so."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict openAPIV3Schema, from every CRD kept in deploy/crds."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in load_docs(path):
            assert crd["kind"] == "CustomResourceDefinition", path
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


@cache
def _object_meta_schema() -> dict[str, Any]:
    """metadata of a custom resource: ObjectMeta, from kubernetes-validate's own schemas."""
    latest = kubernetes_validate.latest_version()
    definitions = schema_contents(
        f"kubernetes-json-schema/v{latest}-local-strict/_definitions.json", latest
    )
    return {**definitions, "$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}


def is_custom(obj: dict[str, Any]) -> bool:
    group = obj["apiVersion"].partition("/")[0] if "/" in obj["apiVersion"] else ""
    return group.endswith((".sh", ".coreos.com"))


def validate(obj: dict[str, Any]) -> None:
    if is_custom(obj):
        schema = crd_schemas().get((obj["apiVersion"], obj["kind"]))
        assert schema is not None, (
            f"{obj['apiVersion']} {obj['kind']}: no CRD schema in deploy/crds for it"
        )
        jsonschema.Draft4Validator(schema, format_checker=_FORMATS).validate(obj)
        jsonschema.Draft202012Validator(_object_meta_schema()).validate(obj["metadata"])
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{_key(obj)} against Kubernetes {version}: {path}: {exc.message}")


def test_kubernetes_validate_ships_the_versions_we_pin() -> None:
    available = {v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()}
    assert set(KUBERNETES_VERSIONS) <= available


@pytest.mark.parametrize("build", list(BUILDS))
def test_every_built_object_validates(build: str) -> None:
    objects = built(build)
    assert objects
    for obj in objects:
        validate(obj)


@pytest.mark.parametrize("where", [name for name, _ in standalone_objects()])
def test_every_manifest_file_validates(where: str) -> None:
    obj = dict(standalone_objects())[where]
    validate(obj)


def test_the_crd_schemas_reject_what_they_should() -> None:
    """The CRD schemas are strict: a typo or a wrong type in a custom resource fails."""
    scaled = copy.deepcopy(by_kind(built("overlay"), "ScaledObject")["cscart-fm-order-poll"])
    scaled["spec"]["maxReplicas"] = 3  # typo for maxReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)
    scaled = copy.deepcopy(by_kind(built("overlay"), "ScaledObject")["cscart-fm-order-poll"])
    scaled["spec"]["triggers"][0]["metadata"]["value"] = 5  # KEDA metadata values are strings
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)
    rule = copy.deepcopy(by_kind(built("overlay"), "PrometheusRule")["cscart-fm"])
    rule["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    with pytest.raises(jsonschema.ValidationError):
        validate(rule)


def test_kubernetes_validate_rejects_what_it_should() -> None:
    deployment = copy.deepcopy(by_kind(built("overlay"), "Deployment")["cscart-fm-order-poll"])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_custom_resources_have_their_crd_kept() -> None:
    kinds = {(o["apiVersion"], o["kind"]) for b in BUILDS for o in built(b) if is_custom(o)}
    assert kinds == set(crd_schemas()), "deploy/crds holds exactly the CRDs the manifests use"


# --- the renderer against the real kustomize ----------------------------------------------


@pytest.mark.parametrize("build", ["base", "overlay"])
def test_kubectl_kustomize_builds_the_same_objects(build: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    directory, _ = BUILDS[build]
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    theirs = {_key(obj): obj for obj in yaml.safe_load_all(result.stdout) if obj}
    ours = {_key(obj): obj for obj in built(build)}
    assert sorted(theirs) == sorted(ours)
    for key, obj in ours.items():
        assert theirs[key] == obj, key


def test_kubectl_kustomize_builds_the_tick_loop_variant(tmp_path: Path) -> None:
    """The example overlay with components/tick-loop added (its `$patch: delete` of the
    CronJob included), built by the real kustomize from a copy of the overlay."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    example = K8S / "overlays" / "example"
    overlay = tmp_path / "overlay"
    shutil.copytree(example, overlay)
    kustomization = _kustomization(example)

    def moved(entry: str) -> str:  # kustomize wants relative paths to other roots
        return os.path.relpath((example / entry).resolve(), overlay)

    kustomization["resources"] = [
        moved(entry) if (example / entry).is_dir() else entry
        for entry in kustomization["resources"]
    ]
    kustomization["components"] = [
        moved(entry) for entry in [*kustomization["components"], "../../components/tick-loop"]
    ]
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    result = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    theirs = {_key(obj): obj for obj in yaml.safe_load_all(result.stdout) if obj}
    ours = {_key(obj): obj for obj in built("overlay+tick-loop")}
    assert sorted(theirs) == sorted(ours)
    for key, obj in ours.items():
        assert theirs[key] == obj, key


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("namePrefix: x-\n")
    with pytest.raises(Unsupported):
        kustomize(tmp_path)


# =============================================================================================
# The workloads
# =============================================================================================


def _consumer_of(obj: dict[str, Any]) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def test_one_deployment_scaledobject_and_pdb_per_consumer() -> None:
    objects = built("overlay")
    deployments = by_kind(objects, "Deployment")
    for kind in ("Deployment", "ScaledObject", "PodDisruptionBudget"):
        found = sorted(_consumer_of(obj) for obj in by_kind(objects, kind).values())
        assert found == sorted(CONSUMER_NAMES), kind
    for name, deployment in deployments.items():
        consumer = _consumer_of(deployment)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["run", consumer], name
        assert "replicas" not in deployment["spec"], f"{name}: KEDA owns the replica count"
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_ticks_come_from_exactly_one_publisher() -> None:
    for build, kind in (("overlay", "CronJob"), ("overlay+tick-loop", "Deployment")):
        objects = built(build)
        tickers = [
            obj for obj in objects if any(c["args"][:1] == ["tick"] for c in containers(obj))
        ]
        assert [obj["kind"] for obj in tickers] == [kind], build
        (ticker,) = tickers
        if kind == "CronJob":
            assert ticker["spec"]["concurrencyPolicy"] == "Forbid"
            assert containers(ticker)[0]["args"] == ["tick", "--due"]
        else:
            assert ticker["spec"]["replicas"] == 1
            assert ticker["spec"]["strategy"]["type"] == "Recreate"
            assert containers(ticker)[0]["args"][:2] == ["tick", "--every"]
        mounts = {m["mountPath"] for m in containers(ticker)[0]["volumeMounts"]}
        assert "/etc/cscart-fm/secrets" not in mounts, "the tick producer needs no API key"


def _env_of(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The CSCART_FM_* values a container gets from ConfigMaps (Secrets are not rendered)."""
    configmaps = by_kind(objects, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def test_probes_use_the_health_endpoints_on_the_metrics_port() -> None:
    objects = built("overlay")
    for name, deployment in by_kind(objects, "Deployment").items():
        (container,) = containers(deployment)
        env = _env_of(objects, container)
        (port,) = container["ports"]
        assert port["name"] == "metrics"
        assert int(env["CSCART_FM_METRICS_PORT"]) == port["containerPort"], name
        for probe, path in (
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
        ):
            assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, name


def test_the_service_serves_the_probed_paths() -> None:
    """/healthz never depends on the broker or a store; /readyz on the consumers only."""
    source = (ROOT / "cscart_fm" / "core" / "observability.py").read_text(encoding="utf-8")
    for path in ("/metrics", "/healthz", "/readyz"):
        assert f'"{path}"' in source


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    for build in BUILDS:
        for obj in built(build):
            for spec in pod_specs(obj):
                where = f"{build} {_key(obj)}"
                pod = spec["securityContext"]
                assert pod["runAsNonRoot"] is True, where
                assert pod["runAsUser"] > 0, where
                assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
                assert spec["automountServiceAccountToken"] is False, where
                assert not spec.get("hostNetwork") and not spec.get("hostPID"), where
                for volume in spec.get("volumes", []):
                    assert volume.keys() & {"configMap", "secret", "emptyDir"}, where
                for container in containers(obj):
                    context = container["securityContext"]
                    assert context["allowPrivilegeEscalation"] is False, where
                    assert context["readOnlyRootFilesystem"] is True, where
                    assert context["capabilities"]["drop"] == ["ALL"], where
                    assert "add" not in context["capabilities"], where
                    assert not context.get("privileged"), where
                    resources = container["resources"]
                    assert {"cpu", "memory"} <= resources["requests"].keys(), where
                    assert "memory" in resources["limits"], where


def test_the_namespace_enforces_the_restricted_standard() -> None:
    (namespace,) = by_kind(built("overlay"), "Namespace").values()
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def _store_call_worst_case() -> float:
    """One store call with the default limits: every attempt times out, with the longest
    wait between attempts (schemas.settings.StoreLimits)."""
    from schemas.settings import StoreLimits

    limits = StoreLimits()
    # An attempt ends at its timeouts, or at attempt_timeout if the store trickles its answer.
    attempt = max(limits.connect_timeout + limits.read_timeout, limits.attempt_timeout)
    return limits.max_attempts * attempt + (limits.max_attempts - 1) * limits.max_retry_wait


def test_termination_grace_outlasts_the_shutdown_grace() -> None:
    """SIGTERM: the runtime waits CSCART_FM_SHUTDOWN_GRACE for the messages in hand, then
    hands the rest back and joins its threads (5 s); Kubernetes must not SIGKILL before."""
    objects = built("overlay")
    for name, deployment in by_kind(objects, "Deployment").items():
        if _consumer_of(deployment) not in CONSUMER_NAMES:
            continue
        (container,) = containers(deployment)
        grace = float(_env_of(objects, container)["CSCART_FM_SHUTDOWN_GRACE"])
        period = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert period >= grace + 20, name
        assert grace >= _store_call_worst_case(), (
            f"{name}: CSCART_FM_SHUTDOWN_GRACE {grace} s is shorter than one store call's "
            f"worst case with the default limits ({_store_call_worst_case()} s)"
        )


def test_environment_variables_are_ones_the_service_reads() -> None:
    config = (ROOT / "cscart_fm" / "core" / "config.py").read_text(encoding="utf-8")
    known = set(re.findall(r'"(CSCART_FM_[A-Z_]+)"', config))
    for consumer in CONSUMER_NAMES:
        stem = "CSCART_FM_" + consumer.upper().replace("-", "_")
        known |= {f"{stem}_PREFETCH", f"{stem}_CONCURRENCY"}
    assert {"CSCART_FM_BROKER_URL", "CSCART_FM_CLIENTS", "CSCART_FM_STATE_URL"} <= known
    names: set[str] = set()
    for build in BUILDS:
        for configmap in by_kind(built(build), "ConfigMap").values():
            names |= {key for key in configmap["data"] if key.startswith("CSCART_FM_")}
    names |= set(_secret_templates()["cscart-fm-connections"]["stringData"])
    assert names - known == set(), "a variable the service does not read (a typo?)"


def test_retry_delays_match_the_definitions() -> None:
    """The retry queues are named after CSCART_FM_RETRY_DELAYS: a deployment that changes
    it must ship definitions generated with the same --retry-delays."""
    definitions = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    ladder = sorted(
        int(match.group(1))
        for queue in definitions["queues"]
        if (match := re.fullmatch(r"cscart\.order-poll\.retry\.(\d+)s", queue["name"]))
    )
    for build in BUILDS:
        for configmap in by_kind(built(build), "ConfigMap").values():
            delays = configmap["data"].get("CSCART_FM_RETRY_DELAYS")
            if delays is not None:
                assert sorted({int(d) for d in delays.split(",")}) == ladder
    assert ladder == sorted(set(topology.DEFAULT_RETRY_DELAYS))


# --- references between objects ------------------------------------------------------------


@cache
def _secret_templates_cached() -> tuple[tuple[str, dict[str, Any]], ...]:
    docs = load_docs(K8S / "base" / "secrets.template.yaml")
    return tuple((doc["metadata"]["name"], doc) for doc in docs)


def _secret_templates() -> dict[str, dict[str, Any]]:
    return copy.deepcopy(dict(_secret_templates_cached()))


def test_references_resolve() -> None:
    """Every ConfigMap a pod uses is built; every Secret is in the template, with the key."""
    secrets = _secret_templates()
    for build in BUILDS:
        objects = built(build)
        configmaps = by_kind(objects, "ConfigMap")
        overlay = build != "base"  # the base leaves the clients file to the overlay
        for obj in objects:
            for spec in pod_specs(obj):
                assert spec["serviceAccountName"] in by_kind(objects, "ServiceAccount")
                for volume in spec.get("volumes", []):
                    if "configMap" in volume and overlay:
                        assert volume["configMap"]["name"] in configmaps, (build, volume)
                    if "secret" in volume:
                        assert volume["secret"]["secretName"] in secrets, (build, volume)
            for container in containers(obj):
                for source in container.get("envFrom", []):
                    if "configMapRef" in source:
                        assert source["configMapRef"]["name"] in configmaps
                    if "secretRef" in source:
                        assert source["secretRef"]["name"] in secrets
    objects = built("overlay")
    (auth,) = by_kind(objects, "TriggerAuthentication").values()
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host"
    assert ref["key"] in secrets[ref["name"]]["stringData"]
    assert ref["key"] == "CSCART_FM_BROKER_URL", "KEDA reads the consumers' broker URL"


def test_scaled_objects_scale_the_work_queues() -> None:
    objects = built("overlay")
    deployments = by_kind(objects, "Deployment")
    auth_names = set(by_kind(objects, "TriggerAuthentication"))
    for name, scaled in by_kind(objects, "ScaledObject").items():
        spec = scaled["spec"]
        target = deployments[spec["scaleTargetRef"]["name"]]
        consumer = _consumer_of(target)
        assert _consumer_of(scaled) == consumer, name
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["queueName"] == TOPOLOGY.consumer(consumer).queue_name
        assert trigger["metadata"]["queueName"] in WORK_QUEUES
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert int(trigger["metadata"]["value"]) >= 1
        assert "host" not in trigger["metadata"], "the broker URL comes from the Secret"
        assert trigger["authenticationRef"]["name"] in auth_names


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}
    return selector["matchLabels"].items() <= labels.items()


def test_disruption_budgets_and_the_pod_monitor_select_the_consumers() -> None:
    objects = built("overlay")
    templates = {
        name: deployment["spec"]["template"]
        for name, deployment in by_kind(objects, "Deployment").items()
    }
    for name, budget in by_kind(objects, "PodDisruptionBudget").items():
        selected = [
            d
            for d, t in templates.items()
            if _selects(budget["spec"]["selector"], t["metadata"]["labels"])
        ]
        assert selected == [name], name
        assert budget["spec"]["maxUnavailable"] == 1
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    (monitor,) = by_kind(objects, "PodMonitor").values()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    scraped = [
        d
        for d, t in templates.items()
        if _selects(monitor["spec"]["selector"], t["metadata"]["labels"])
        and endpoint["port"]
        in {p["name"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
    ]
    assert sorted(scraped) == sorted(f"cscart-fm-{c}" for c in CONSUMER_NAMES)
    assert endpoint["path"] == "/metrics"


def test_generated_configmaps_roll_the_pods_when_they_change() -> None:
    """The env and clients ConfigMaps carry a content hash in their name, so editing them
    rolls every pod (the service reads its settings at start)."""
    objects = built("overlay")
    names = set(by_kind(objects, "ConfigMap"))
    for stem in ("cscart-fm-env", "cscart-fm-clients"):
        assert any(re.fullmatch(rf"{stem}-[a-z0-9]{{10}}", name) for name in names), stem
    assert "cscart-fm-grafana-dashboard" in names  # one stable name for Grafana's sidecar


def test_image_is_pinned_to_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "version"
    ]
    for build in BUILDS:
        for obj in built(build):
            for container in containers(obj):
                assert container["image"].endswith(f"cscart-fm:{version}"), container["image"]


def test_the_example_clients_file_is_valid(tmp_path: Path) -> None:
    """The overlay's clients.yaml passes the service's own loader; every key file it names
    lives in the mounted Secret and has a key in the Secret template."""
    from cscart_fm.core.clients import parse_clients

    document = yaml.safe_load((K8S / "overlays" / "example" / "clients.yaml").read_text())
    secrets = _secret_templates()["cscart-fm-api-keys"]["stringData"]
    for client in document["clients"]:
        path = Path(client["api_key_file"])
        assert path.parent == Path("/etc/cscart-fm/secrets"), path
        assert path.name in secrets, f"{path.name} is not a key of cscart-fm-api-keys"
        local = tmp_path / path.name
        local.write_text("a-key-for-the-test\n", encoding="utf-8")
        client["api_key_file"] = str(local)
    clients = parse_clients(document, environ={"CSCART_FM_SECRETS_DIR": str(tmp_path)})
    assert sorted(clients) == sorted(secrets)


def test_the_secrets_template_is_only_a_template() -> None:
    for directory in [K8S / "base", *K8S.glob("*/*")]:
        if (directory / "kustomization.yaml").is_file():
            kustomization = _kustomization(directory)
            assert "secrets.template.yaml" not in kustomization.get("resources", [])
    for build in BUILDS:
        assert not by_kind(built(build), "Secret"), "Secrets are created, not applied from git"
    for secret in _secret_templates().values():
        for key, value in secret["stringData"].items():
            assert re.search(r"PASSWORD|REPLACE", value), f"{key}: not a placeholder"


# =============================================================================================
# RabbitMQ definitions
# =============================================================================================

REGENERATE = "run `.venv/bin/python deploy/rabbitmq/generate.py` and commit the result"


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "deploy_rabbitmq_generate", DEPLOY / "rabbitmq" / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _definitions() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    return document


def test_definitions_file_is_up_to_date() -> None:
    generator = _generator()
    expected = generator.render(generator.build_definitions())
    assert DEFINITIONS.read_text(encoding="utf-8") == expected, (
        f"deploy/rabbitmq/definitions.json differs from cscart_fm.core.topology: {REGENERATE}"
    )


def test_definitions_match_the_topology_both_ways() -> None:
    """Read independently of the generator: what the module declares, the file holds, and
    nothing else; queue arguments exactly (a difference is a 406 at the service's start)."""
    definitions = _definitions()
    rows = TOPOLOGY.describe()
    queues = {queue.name: queue for queue in TOPOLOGY.queues()}

    want_exchanges = {r["name"]: r["type"] for r in rows if r["kind"] == "exchange"}
    have_exchanges = {e["name"]: e for e in definitions["exchanges"]}
    assert set(have_exchanges) == set(want_exchanges), REGENERATE
    for name, exchange in have_exchanges.items():
        assert exchange["type"] == want_exchanges[name], (name, REGENERATE)
        assert exchange["durable"] is True and exchange["auto_delete"] is False, name
        assert exchange["internal"] is False and exchange["arguments"] == {}, name

    want_queues = {r["name"]: r for r in rows if r["kind"] == "queue"}
    have_queues = {q["name"]: q for q in definitions["queues"]}
    assert set(have_queues) == set(want_queues), REGENERATE
    for name, queue in have_queues.items():
        arguments = want_queues[name]["arguments"]
        assert queue["arguments"] == arguments, (name, REGENERATE)
        assert {type(v) for v in queue["arguments"].values()} == {
            type(v) for v in arguments.values()
        }, name
        assert queue["durable"] is bool(queues[name].durable), name
        assert queue["auto_delete"] is bool(queues[name].auto_delete), name

    want_bindings = {
        (r["exchange"], r["name"], key)
        for r in rows
        if r["kind"] == "queue" and r["exchange"]
        for key in r["routing_keys"]
    }
    have_bindings = set()
    for binding in definitions["bindings"]:
        assert binding["destination_type"] == "queue" and binding["arguments"] == {}
        have_bindings.add((binding["source"], binding["destination"], binding["routing_key"]))
    assert have_bindings == want_bindings, REGENERATE
    assert len(definitions["bindings"]) == len(have_bindings), "a binding listed twice"

    vhosts = {
        item["vhost"] for key in ("exchanges", "queues", "bindings") for item in definitions[key]
    }
    assert vhosts == {"/"} == {v["name"] for v in definitions["vhosts"]}


def test_definitions_hold_the_contract() -> None:
    """FM contract §1: the exchanges, queues and bindings FM relies on."""
    definitions = _definitions()
    exchanges = {e["name"]: e["type"] for e in definitions["exchanges"]}
    assert exchanges["fm.events"] == "topic" and exchanges["fm.orders"] == "topic"
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in definitions["bindings"]}
    assert {
        ("fm.events", "cscart.order-poll", "order-poll.tick"),
        ("fm.events", "cscart.shipment-lodged", "shipment.lodged"),
        ("fm.events", "cscart.stock-snapshot", "stock.snapshot"),
        ("fm.orders", "fm.orders.imported", "order.imported"),
    } <= bindings
    queues = {q["name"]: q["arguments"] for q in definitions["queues"]}
    for name in [*WORK_QUEUES, "fm.orders.imported", *(f"{q}.dlq" for q in WORK_QUEUES)]:
        assert queues[name]["x-queue-type"] == "quorum", name


def test_policies_never_override_queue_arguments() -> None:
    """A policy would change a queue behind the service's back; none may set what a queue
    argument of a queue it matches already sets."""
    definitions = _definitions()
    queues = {q["name"]: q["arguments"] for q in definitions["queues"]}
    for policy in definitions["policies"]:
        matched = [name for name in queues if re.search(policy["pattern"], name)]
        for name in matched:
            for key in policy["definition"]:
                assert f"x-{key}" not in queues[name], (policy["name"], name, key)


def test_the_generator_writes_other_vhosts_and_ladders(tmp_path: Path) -> None:
    generator = _generator()
    output = tmp_path / "definitions.json"
    assert (
        generator.main(["--vhost", "cscart", "--retry-delays", "10,60", "--output", str(output)])
        == 0
    )
    document = json.loads(output.read_text(encoding="utf-8"))
    assert {q["vhost"] for q in document["queues"]} == {"cscart"}
    names = {q["name"] for q in document["queues"]}
    assert {"cscart.stock-snapshot.retry.10s", "cscart.stock-snapshot.retry.60s"} <= names
    assert generator.main(["--check", "--output", str(output)]) == 1


def _rabbitmqctl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is needed to import definitions (the broker tests have it)")
    result = subprocess.run(
        ["rabbitmqctl", *args], input=stdin, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _import_into_vhost(
    definitions: dict[str, Any], vhost: str, users: dict[str, str] | None = None
) -> None:
    """Import into a test's own vhost. The users are the broker's, not the vhost's: without
    ``users`` (name in the file → name for this test) they are left out; with it, they are
    imported under those names, which the test deletes afterwards."""
    document = copy.deepcopy(definitions)
    document["vhosts"] = [{"name": vhost}]
    renamed = users or {}
    document["users"] = [
        {**user, "name": renamed[user["name"]]} for user in document["users"]
        if user["name"] in renamed
    ]
    for key in ("permissions", "topic_permissions"):
        document[key] = [
            {**item, "user": renamed[item["user"]]} for item in document[key]
            if item["user"] in renamed
        ]
    for key in ("exchanges", "queues", "bindings", "policies", "permissions", "topic_permissions"):
        for item in document[key]:
            item["vhost"] = vhost
    # On standard input: rabbitmqctl may run as the rabbitmq user, who cannot read tmp_path.
    _rabbitmqctl("import_definitions", stdin=json.dumps(document))
    wanted = {q["name"] for q in document["queues"]}
    deadline = time.monotonic() + 30  # the import is asynchronous
    while time.monotonic() < deadline:
        listed = _rabbitmqctl("list_queues", "-p", vhost, "name", "--quiet", "--no-table-headers")
        if wanted <= set(listed.stdout.split()):
            return
        time.sleep(0.2)
    pytest.fail(f"the definitions' queues did not appear in vhost {vhost}")


@pytest.mark.broker
def test_imported_definitions_accept_the_services_declaration(
    broker_url: str,
) -> None:
    """On a real broker: import the file, then declare the topology as the service does at
    start. Any argument that differs is a 406 PRECONDITION_FAILED here."""
    from kombu import Connection

    vhost = broker_url.rsplit("/", 1)[1]
    _import_into_vhost(_definitions(), vhost)
    with Connection(broker_url, connect_timeout=10) as connection:
        declared = TOPOLOGY.declare(connection)
    assert set(declared) == {q["name"] for q in _definitions()["queues"]}


@pytest.mark.broker
def test_only_the_service_may_publish_dead_letters_and_orders(broker_url: str) -> None:
    """The permissions of the definitions, on a real broker: FM publishes its events to
    fm.events and reads its queues, and nothing else; only the service publishes to the
    dead-letter exchange and to fm.orders (a forged dead letter or order is refused)."""
    from amqp.exceptions import AccessRefused
    from kombu import Connection

    vhost = broker_url.rsplit("/", 1)[1]
    service, fm = f"svc-{vhost}", f"fm-{vhost}"
    _import_into_vhost(_definitions(), vhost, {"cscart-fm": service, "fm": fm})
    try:
        for user in (service, fm):
            _rabbitmqctl("change_password", user, "test-password-1")
        base = broker_url.split("@", 1)[1]

        def publish(user: str, exchange: str, routing_key: str) -> None:
            with Connection(f"amqp://{user}:test-password-1@{base}", connect_timeout=10,
                            transport_options={"confirm_publish": True}) as conn:
                conn.Producer().publish(b"{}", exchange=exchange, routing_key=routing_key,
                                        serializer=None, content_type="application/json")

        with Connection(f"amqp://{service}:test-password-1@{base}", connect_timeout=10) as conn:
            TOPOLOGY.declare(conn)  # the service declares everything at start
        publish(fm, "fm.events", "shipment.lodged")
        publish(service, "cscart.dead-letter", "cscart.shipment-lodged.dlq")
        publish(service, "fm.orders", "order.imported")
        publish(service, "", "cscart.shipment-lodged.retry.5s")  # a retry
        publish(service, "fm.events", "order-poll.tick")  # the tick producer, a replay
        for exchange, key in [
            ("cscart.dead-letter", "cscart.shipment-lodged.dlq"),  # a forged dead letter
            ("fm.orders", "order.imported"),  # a forged order
            ("fm.events", "order.imported"),  # an event FM does not send
            ("", "cscart.shipment-lodged"),  # straight into a work queue
        ]:
            with pytest.raises(AccessRefused):
                publish(fm, exchange, key)
    finally:
        for user in (service, fm):
            subprocess.run(["rabbitmqctl", "delete_user", user], capture_output=True, timeout=60)


@pytest.mark.broker
def test_a_wrong_argument_in_the_definitions_fails_the_declaration(
    broker_url: str,
) -> None:
    """The control for the test above: one argument off, and the service could not start."""
    from amqp.exceptions import PreconditionFailed
    from kombu import Connection

    definitions = _definitions()
    for queue in definitions["queues"]:
        if queue["name"] == "cscart.shipment-lodged":
            queue["arguments"]["x-delivery-limit"] = topology.DELIVERY_LIMIT + 1
    vhost = broker_url.rsplit("/", 1)[1]
    _import_into_vhost(definitions, vhost)
    with (
        Connection(broker_url, connect_timeout=10) as connection,
        pytest.raises(PreconditionFailed),
    ):
        TOPOLOGY.declare(connection)


# =============================================================================================
# Alerts and dashboard: every metric they use exists
# =============================================================================================

_PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENTIFIER = re.compile(r"(?<![\w:$.])([A-Za-z_:][\w:]*)")
_SELECTOR = re.compile(r"(?<![\w:$.])([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LABEL_REPLACE_TARGET = re.compile(r'label_replace\s*\(.*?,\s*"(\w+)"', re.S)


@cache
def exported_metrics() -> dict[str, frozenset[str]]:
    """Every sample name cscart_fm.core.metrics exposes, with its labels."""
    from prometheus_client.metrics import MetricWrapperBase

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names: dict[str, frozenset[str]] = {}
    for value in vars(service_metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        labels = frozenset(value._labelnames)
        for family in value.describe():
            for suffix in suffixes[family.type]:
                extra = {"le"} if suffix == "_bucket" else set()
                names[family.name + suffix] = labels | extra
    return names


def metric_names(expr: str) -> set[str]:
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        token = match.group(1)
        if token in _PROMQL_WORDS or text[match.end() :].lstrip().startswith("("):
            continue  # a keyword or a function
        names.add(token)
    return names


def _labels_of(name: str) -> frozenset[str]:
    if name in RABBITMQ_METRICS:
        return frozenset(RABBITMQ_METRICS[name])
    return exported_metrics()[name]


def check_expression(expr: str, where: str) -> set[str]:
    """Fail unless every metric (and every label it is filtered or grouped by) exists."""
    names = metric_names(expr)
    assert names, f"{where}: no metric found in {expr!r}"
    for name in names:
        if name.startswith("rabbitmq_"):
            assert name in RABBITMQ_METRICS, f"{where}: {name} is not a listed RabbitMQ metric"
        else:
            assert name.startswith("cscart_fm_"), f"{where}: unknown metric or word {name!r}"
            assert name in exported_metrics(), f"{where}: cscart_fm.core.metrics exports no {name}"
    for match in _SELECTOR.finditer(expr):
        name, matchers = match.groups()
        if name not in names:
            continue
        used = set(_MATCHER.findall(_STRINGS.sub('""', matchers)))
        unknown = used - _labels_of(name) - TARGET_LABELS
        assert not unknown, f"{where}: {name} has no label {sorted(unknown)}"
    available = set(TARGET_LABELS) | set(_LABEL_REPLACE_TARGET.findall(expr))
    for name in names:
        available |= _labels_of(name)
    for grouping in _GROUPING.findall(_STRINGS.sub('""', expr)):
        for label in filter(None, (part.strip() for part in grouping.split(","))):
            assert label in available, f"{where}: grouped by unknown label {label!r}"
    return names


def alert_rules() -> list[dict[str, Any]]:
    (rule,) = load_docs(PROMETHEUS_RULE)
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def dashboard_expressions() -> list[tuple[str, str]]:
    found = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            expr, label = match.groups()
            metric = metric_names(expr).pop()
            assert label in _labels_of(metric) | TARGET_LABELS, variable["name"]
            found.append((f"variable {variable['name']}", expr))
    return found


def test_metric_names_are_checked_for_real() -> None:
    """The checker itself: a misspelt metric, an unknown label, an unlisted RabbitMQ metric."""
    check_expression(
        'sum by (client) (rate(cscart_fm_orders_imported_total{client="A"}[5m]))', "ok"
    )
    for wrong in (
        "rate(cscart_fm_orders_imported[5m])",  # a counter without _total
        'cscart_fm_consumer_connected{client="A"}',  # a label it does not have
        "sum by (reason) (cscart_fm_consumer_connected)",
        "rabbitmq_queue_consumers",
        "up",
    ):
        with pytest.raises(AssertionError):
            check_expression(wrong, "wrong")


def test_every_metric_an_alert_uses_is_exported() -> None:
    rules = alert_rules()
    assert rules
    for rule in rules:
        check_expression(rule["expr"], rule.get("alert") or rule["record"])


def test_every_metric_the_dashboard_uses_is_exported() -> None:
    for where, expr in dashboard_expressions():
        check_expression(expr, where)


def test_the_dashboard_shows_every_service_metric() -> None:
    used = set()
    for _where, expr in dashboard_expressions():
        used |= metric_names(expr)
    families = set()
    for name in exported_metrics():
        for suffix in ("_total", "_created", "_bucket", "_sum", "_count"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        families.add(name)
    shown = {
        name.removesuffix(suffix)
        for name in used
        for suffix in ("_total", "_bucket", "_sum", "_count", "")
        if name.endswith(suffix)
    }
    missing = sorted(families - shown)
    assert not missing, f"metrics exported but not on the dashboard: {missing}"


def test_the_issue_alerts_exist() -> None:
    """Dead-letter queue not empty, stalled sync, consumer down with a backlog, store errors."""
    rules = {rule["alert"]: rule for rule in alert_rules() if "alert" in rule}
    assert "rabbitmq_queue_messages" in metric_names(
        rules["CscartFmDeadLetterQueueNotEmpty"]["expr"]
    )
    stalled = rules["CscartFmOrderSyncStalled"]["expr"]
    assert "cscart_fm_order_poll_last_success_timestamp_seconds" in stalled and "time()" in stalled
    threshold = int(re.search(r">\s*(\d+)\s*$", stalled.strip()).group(1))  # type: ignore[union-attr]
    from schemas.settings import OrderSettings

    interval = OrderSettings.model_fields["poll_interval_seconds"].default
    assert threshold == 3 * interval, "3 x the default poll interval (docs/operations.md)"
    down = rules["CscartFmConsumerDownWithBacklog"]["expr"]
    assert {"rabbitmq_queue_messages_ready", "cscart_fm_consumer_connected"} <= metric_names(down)
    assert "cscart_fm_store_requests_total" in metric_names(rules["CscartFmStoreErrorRate"]["expr"])


def test_alerts_are_actionable() -> None:
    anchors = _doc_anchors()
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"CscartFm[A-Za-z]+", name)
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        document, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert document == "docs/operations.md" and anchor in anchors, (name, anchor)


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "cscart-fm" and board["title"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "client"} <= variables
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        assert panel["targets"], panel["title"]


def _rule_files(tmp_path: Path) -> Path:
    (rule,) = load_docs(PROMETHEUS_RULE)
    groups = rule["spec"]["groups"]
    (tmp_path / "full.yaml").write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    bare = [
        {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
        for g in groups
    ]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": bare}), encoding="utf-8")
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    return tmp_path


def test_promtool_checks_and_unit_tests_the_alerts(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    directory = _rule_files(tmp_path)
    for args in (["check", "rules", "full.yaml"], ["test", "rules", ALERT_TESTS.name]):
        result = subprocess.run(
            [promtool, *args], cwd=directory, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    tested = {
        case["alertname"]
        for group in tests["tests"]
        for case in group["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == {rule["alert"] for rule in alert_rules()}


# =============================================================================================
# The Dockerfile (no Docker engine here: `docker build -f deploy/Dockerfile .` elsewhere)
# =============================================================================================


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    logical = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last:]


def test_dockerfile_is_multi_stage_on_slim_python() -> None:
    froms = [rest for keyword, rest in dockerfile_instructions() if keyword == "FROM"]
    assert len(froms) >= 2
    args = dict(
        rest.split("=", 1)
        for keyword, rest in dockerfile_instructions()
        if keyword == "ARG" and "=" in rest
    )
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    assert final_stage()[0][1].startswith("${PYTHON_IMAGE}")
    copies = [rest for keyword, rest in final_stage() if keyword == "COPY"]
    assert copies and all(rest.startswith("--from=") for rest in copies), (
        "the runtime stage copies only the built environment"
    )


def test_dockerfile_runs_as_non_root_with_an_init_and_the_entrypoint() -> None:
    stage = final_stage()
    users = [rest for keyword, rest in stage if keyword == "USER"]
    assert users, "no USER in the runtime stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "a numeric non-root uid (runAsNonRoot checks it)"
    deployment_uid = by_kind(built("overlay"), "Deployment")["cscart-fm-order-poll"]["spec"][
        "template"
    ]["spec"]["securityContext"]["runAsUser"]
    assert int(uid) == deployment_uid
    (entrypoint,) = [json.loads(rest) for keyword, rest in stage if keyword == "ENTRYPOINT"]
    assert entrypoint[-1] == "cscart-fm"
    assert entrypoint[0].endswith("tini"), "a proper PID 1 forwards SIGTERM"
    runs = " ".join(rest for keyword, rest in stage if keyword == "RUN")
    assert "tzdata" in runs and "tini" in runs
    assert "rm -rf /var/lib/apt/lists" in runs


def test_dockerfile_bakes_in_no_secret() -> None:
    secretish = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|BROKER_URL|STATE_URL|CLIENTS", re.I)
    for keyword, rest in dockerfile_instructions():
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"(\w+)=", rest) or [rest.split()[0]]
            for name in names:
                assert not secretish.search(name), f"{keyword} {name}"
        if keyword == "COPY":
            assert not re.search(r"clients|secret|\.env|\.sqlite|\.git\b", rest, re.I), rest
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*", "the build context starts from nothing"
    assert {"**/.env", "**/*.sqlite"} <= set(rules)


def test_dockerfile_copies_every_package_of_the_wheel() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    top_level = {
        path.name
        for path in ROOT.iterdir()
        if (path / "__init__.py").is_file()
        and any(re.fullmatch(p.replace("*", ".*"), path.name) for p in patterns)
    }
    copied = {
        rest.split()[0]
        for keyword, rest in dockerfile_instructions()
        if keyword == "COPY" and not rest.startswith("--from")
    }
    assert top_level <= copied, (
        f"packages the wheel needs but the image misses: {top_level - copied}"
    )
    assert "pyproject.toml" in copied
    ignore = set((DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines())
    for name in copied:
        assert f"!{name}" in ignore or f"!{name}/" in ignore, f"{name} is not in the context"
    version = project["project"]["version"]
    labels = " ".join(rest for keyword, rest in final_stage() if keyword == "LABEL")
    assert f'org.opencontainers.image.version="{version}"' in labels


def test_dockerfile_exposes_the_metrics_port_the_manifests_use() -> None:
    stage = final_stage()
    (expose,) = [rest for keyword, rest in stage if keyword == "EXPOSE"]
    env = " ".join(rest for keyword, rest in stage if keyword == "ENV")
    port = re.search(r"CSCART_FM_METRICS_PORT=(\d+)", env).group(1)  # type: ignore[union-attr]
    assert expose == port
    objects = built("overlay")
    for deployment in by_kind(objects, "Deployment").values():
        (container,) = containers(deployment)
        assert container["ports"][0]["containerPort"] == int(port)


# =============================================================================================
# docs/operations.md
# =============================================================================================


def _doc_text() -> str:
    return DOCS.read_text(encoding="utf-8")


def _slug(heading: str) -> str:
    """GitHub's heading anchors."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _doc_anchors() -> set[str]:
    return {_slug(match.group(1)) for match in re.finditer(r"^#{1,6}\s+(.+)$", _doc_text(), re.M)}


def _runbook() -> str:
    text = _doc_text()
    start = re.search(r"^## Dead-letter runbook$", text, re.M)
    assert start, "docs/operations.md has no '## Dead-letter runbook' section"
    end = re.search(r"^## ", text[start.end() :], re.M)
    return text[start.end() : start.end() + end.start()] if end else text[start.end() :]


def _error_types() -> set[str]:
    """Every error type a dead letter can carry: the typed errors (ERROR_TYPES and any other
    BridgeError subclass the service defines, e.g. the state store's lock) and the broker's
    delivery limit (``delivery_limit`` in x-death, shown as ``delivery-limit``)."""
    import cscart_fm.core.state  # noqa: F401 - defines LockBusy ("busy")
    from cscart_fm.core.errors import BridgeError, StoreError

    found = {error.error_type for error in ERROR_TYPES}
    pending = [BridgeError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls is not StoreError:  # abstract: never raised, its subclasses are
            found.add(cls.error_type)
    return found | {"delivery-limit"}


def test_the_runbook_covers_every_dead_letter_error_type() -> None:
    runbook = _runbook()
    headings = set(re.findall(r"^### `([\w-]+)`", runbook, re.M))
    missing = sorted(_error_types() - headings)
    assert not missing, f"error types without a runbook entry: {missing}"
    assert "delivery_limit" in runbook, "the broker's own name for it"
    for command in ("list", "show", "replay", "discard", "stats"):
        assert f"cscart-fm dlq {command}" in runbook, command


def test_operations_doc_has_the_sections_the_issue_asks_for() -> None:
    anchors = _doc_anchors()
    for anchor in (
        "deploying",
        "building-the-image",
        "scaling",
        "rotating-a-key",
        "adding-a-client",
        "dead-letter-runbook",
        "monitoring",
        "stalled-sync",
    ):
        assert anchor in anchors, anchor
    text = _doc_text()
    assert "docker build -f deploy/Dockerfile" in text
    assert "deploy/rabbitmq/generate.py" in text
    assert "return_per_object_metrics" in text

#!/usr/bin/env python3
"""Offline checks of the Herald Helm chart (helm/herald).

Run from anywhere: `python3 helm/tests/check.py`. It needs the packages in
helm/tests/requirements.txt, which `tests/setup.sh chart` installs into helm/tests/.venv;
when they are not importable, this script re-runs itself with that venv's
Python.

What it checks, without a cluster or network:
  1. `helm lint --strict` (Helm SDK v4 through helm-python-sdk) against
     Kubernetes v1.31.0, with default values and with values-all.yaml.
  2. Renders the chart for each scenario in SCENARIOS (defaults,
     every feature on, existing Secrets, HS256 with features off).
  3. Validates every rendered manifest with kubernetes-validate in strict
     mode against Kubernetes 1.31.0. CRD objects (ServiceMonitor) are not in
     its bundled schemas: they are validated against a hand-written subset of
     the Prometheus Operator schema (SERVICE_MONITOR_SCHEMA) instead.
  4. Asserts invariants on the rendered objects (drain vs termination grace
     period, gRPC probes, hardened security contexts, migration hook and the
     Secret it reads, no HERALD_DEV, selectors, ...).
  5. Checks that bad values fail to render with a clear message (schema type
     errors, unknown keys, unsafe combinations).
  6. Checks that every value is documented: a comment in values.yaml, a row
     in the chart README, and a schema entry.
  7. Checks that the chart's default settings are the server's own defaults
     (the Configuration table of the repository's README.md) for the
     settings in SERVER_DEFAULTS.

Prints one line per check and exits 1 if any failed, 3 if the Python
packages are missing.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
CHART = HERE.parent / "herald"
VENV_PYTHON = HERE / ".venv" / "bin" / "python"
KUBE_VERSION = "1.31.0"
RELEASE = "herald"
NAMESPACE = "herald-test"


def _import_or_reexec() -> None:
    """Import the pinned packages, or re-run under the venv that has them."""
    try:
        import helm_python  # noqa: F401
        import kubernetes_validate  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as e:
        running_venv = Path(sys.prefix).resolve() == (HERE / ".venv").resolve()
        if VENV_PYTHON.exists() and not running_venv:
            os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])
        print(
            f"FAIL missing Python package ({e.name}): run tests/setup.sh chart, or install "
            f"helm/tests/requirements.txt into helm/tests/.venv",
            file=sys.stderr,
        )
        sys.exit(3)


_import_or_reexec()

import helm_python  # noqa: E402
import jsonschema  # noqa: E402
import yaml  # noqa: E402
from helm_python.chart import Chart, lint, values_from_yaml  # noqa: E402


# ---------------------------------------------------------------- scenarios

def load_values(name: str) -> dict[str, Any]:
    """A values file, parsed the way `helm -f` parses it."""
    return values_from_yaml((HERE / name).read_text())


def merged(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge overlay into a copy of base (dicts merge, the rest replaces)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


ALL = load_values("values-all.yaml")

# name -> (values, kinds expected in the output with their counts)
SCENARIOS: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    # Chart defaults: credentials from an existing Secret named "herald".
    "defaults": (
        {},
        {"ConfigMap": 1, "Deployment": 1, "Job": 1, "PodDisruptionBudget": 1,
         "Service": 1, "ServiceAccount": 1},
    ),
    # Every feature on; the chart creates the Secrets (public key, hook copy).
    "all": (
        ALL,
        {"ConfigMap": 1, "Deployment": 1, "HorizontalPodAutoscaler": 1,
         "Ingress": 1, "Job": 1, "PodDisruptionBudget": 1, "Secret": 3,
         "Service": 2, "ServiceAccount": 1, "ServiceMonitor": 1},
    ),
    # Every feature on, with credentials and public key from existing Secrets
    # (custom key names) and an existing ServiceAccount.
    "all-existing-secrets": (
        merged(ALL, {
            "secret": {"create": False, "databaseUrl": "", "listenerDatabaseUrl": ""},
            "existingSecret": {
                "name": "herald-credentials",
                "databaseUrlKey": "pooled-url",
                "listenerDatabaseUrlKey": "direct-url",
                "jwtSecretKey": "",
            },
            "jwtPublicKey": {"existingSecret": "herald-jwt-keys", "pem": ""},
            "serviceAccount": {"create": False, "name": "herald-workload"},
        }),
        {"ConfigMap": 1, "Deployment": 1, "HorizontalPodAutoscaler": 1,
         "Ingress": 1, "Job": 1, "PodDisruptionBudget": 1, "Service": 2,
         "ServiceMonitor": 1},
    ),
    # HS256 secret created by the chart; optional parts switched off.
    "hs256-minimal": (
        {
            "secret": {
                "create": True,
                "databaseUrl": "postgres://herald:test@postgres.db:5432/herald",
                "jwtSecret": "0123456789abcdef0123456789abcdef-test",
            },
            "migration": {"enabled": False},
            "serviceAccount": {"create": False},
            "pdb": {"enabled": False},
            "topologySpread": {"enabled": False},
            "preStopSleepSeconds": 0,
            "config": {"shutdownGraceSeconds": 10},
            "terminationGracePeriodSeconds": 15,
            "resources": {},
        },
        {"ConfigMap": 1, "Deployment": 1, "Secret": 1, "Service": 1},
    ),
}

# Values (a values file's text, or a dict) that must not render, and a
# fragment of the error they must give.
BAD_VALUES: list[tuple[str, str | dict[str, Any], str]] = [
    ("values file with a wrong type (replicaCount: \"three\")", 'replicaCount: "three"\n',
     "/replicaCount"),
    ("wrong nested type (config.poolSize: \"16\")", {"config": {"poolSize": "16"}},
     "/config/poolSize"),
    ("unknown top-level key", {"replicas": 3}, "additional properties 'replicas'"),
    ("unknown nested key", {"config": {"poolsize": 3}}, "additional properties 'poolsize'"),
    ("bad enum (config.logFormat: yaml)", {"config": {"logFormat": "yaml"}},
     "/config/logFormat"),
    ("termination grace not above drain", {"terminationGracePeriodSeconds": 30},
     "must be greater than preStopSleepSeconds"),
    ("HERALD_DEV in extraEnv", {"extraEnv": [{"name": "HERALD_DEV", "value": "true"}]},
     "must not set HERALD_DEV"),
    ("HERALD_SHUTDOWN_GRACE in extraEnv",
     {"extraEnv": [{"name": "HERALD_SHUTDOWN_GRACE", "value": "90s"}]},
     "config.shutdownGraceSeconds"),
    ("secret.create without databaseUrl", {"secret": {"create": True, "jwtSecret": "x" * 32}},
     "secret.databaseUrl is empty"),
    ("two token keys",
     {"secret": {"create": True, "databaseUrl": "postgres://h@db/h", "jwtSecret": "x" * 32},
      "jwtPublicKey": {"enabled": True, "pem": "pem"}},
     "exactly one token verification key"),
    ("short HS256 secret",
     {"secret": {"create": True, "databaseUrl": "postgres://h@db/h", "jwtSecret": "short"}},
     "at least 32 bytes"),
    ("no token key with existing Secret", {"existingSecret": {"jwtSecretKey": ""}},
     "no token verification key"),
    ("credentials in values without secret.create", {"secret": {"jwtSecret": "x" * 32}},
     "only used with secret.create"),
    ("public key without PEM or Secret", {"jwtPublicKey": {"enabled": True}},
     "jwtPublicKey.pem"),
]

# The parts of the Prometheus Operator ServiceMonitor (monitoring.coreos.com/v1)
# schema the chart uses; anything else the chart renders is an error.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "minProperties": 1,
                            "additionalProperties": {"type": "string"},
                        },
                    },
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                        "any": {"type": "boolean"},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            # Prometheus duration, as the CRD's pattern.
                            "interval": {"type": "string",
                                         "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string",
                                              "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                        },
                    },
                },
            },
        },
    },
}


# ------------------------------------------------------------------ results

class Results:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"PASS {what}")
        else:
            self.failed += 1
            print(f"FAIL {what}" + (f"\n     {detail}" if detail else ""))
        return ok

    def run(self, what: str, fn: Callable[[], None]) -> None:
        """Run fn; an AssertionError fails the check with its message."""
        try:
            fn()
        except AssertionError as e:
            self.check(False, what, str(e))
        except Exception as e:  # a crash in a check is a failure, not an abort
            self.check(False, what, f"{type(e).__name__}: {e}")
        else:
            self.check(True, what)


R = Results()


# ------------------------------------------------------------------ helpers

def render(chart: Chart, values: dict[str, Any]) -> dict[str, str]:
    return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(rendered[path]) if d)
    return docs


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def seconds(duration: str) -> int:
    m = re.fullmatch(r"(\d+)s", duration)
    assert m, f"HERALD_SHUTDOWN_GRACE {duration!r} is not whole seconds"
    return int(m.group(1))


def effective_env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The container's environment: its ConfigMaps, then env (which wins)."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            cm = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == ref["name"]]
            assert cm, f"envFrom ConfigMap {ref['name']} is not rendered"
            env.update(cm[0].get("data", {}))
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", var.get("valueFrom"))
    return env


def hook_weight(doc: dict[str, Any]) -> int:
    return int(doc["metadata"].get("annotations", {}).get("helm.sh/hook-weight", "0"))


def assert_hardened(spec: dict[str, Any], what: str) -> None:
    pod_sc = spec.get("securityContext", {})
    assert pod_sc.get("runAsNonRoot") is True, f"{what}: pod runAsNonRoot is not true"
    assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", \
        f"{what}: pod seccompProfile is not RuntimeDefault"
    for c in spec["containers"]:
        sc = c.get("securityContext", {})
        name = f"{what} container {c['name']}"
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{name}: runAsNonRoot"
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        assert isinstance(uid, int) and uid > 0, f"{name}: runAsUser {uid!r} is not a non-root UID"
        assert sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem"
        assert sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation"
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{name}: capabilities not dropped"
        assert not sc.get("capabilities", {}).get("add"), f"{name}: capabilities added"
        assert not sc.get("privileged"), f"{name}: privileged"
    assert spec.get("enableServiceLinks") is False, f"{what}: enableServiceLinks is not false"


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --------------------------------------------------------------- invariants

def invariants(name: str, values: dict[str, Any], docs: list[dict[str, Any]],
               rendered: dict[str, str]) -> None:
    text = "\n".join(rendered.values())
    assert "HERALD_DEV" not in text, "HERALD_DEV appears in the rendered chart"

    for d in docs:
        labels = d["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == RELEASE, \
            f"{d['kind']}/{d['metadata']['name']}: no app.kubernetes.io/instance label"
        assert d["metadata"].get("namespace") == NAMESPACE, \
            f"{d['kind']}/{d['metadata']['name']}: namespace is not the release's"

    deploy = one(docs, "Deployment")
    pod = deploy["spec"]["template"]
    spec = pod["spec"]
    herald = next(c for c in spec["containers"] if c["name"] == "herald")
    env = effective_env(herald, docs)
    ports = {p["name"]: p["containerPort"] for p in herald["ports"]}

    # Drain: the kubelet must not kill a replica before it has drained.
    drain = seconds(env["HERALD_SHUTDOWN_GRACE"])
    sleep = herald.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = spec.get("terminationGracePeriodSeconds")
    assert isinstance(grace, int) and grace > drain + sleep, \
        f"terminationGracePeriodSeconds {grace} is not > drain {drain}s + preStop sleep {sleep}s"

    # Probes: native gRPC health checks on the gRPC port.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        p = herald.get(probe)
        assert p and set(p) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, \
            f"{probe} is not a gRPC probe: {p}"
        assert p["grpc"]["port"] == ports["grpc"], f"{probe} does not probe the gRPC port"
    # Liveness must not follow the database (that would restart every
    # replica during a database outage): Herald's "liveness" service.
    assert herald["livenessProbe"]["grpc"].get("service") == "liveness", \
        f"livenessProbe checks {herald['livenessProbe']['grpc'].get('service')!r}, not 'liveness'"

    assert herald["args"] == ["serve"], f"herald container args {herald['args']}"
    assert_hardened(spec, "Deployment")
    assert env["HERALD_LISTEN"] == f"0.0.0.0:{ports['grpc']}", "HERALD_LISTEN is not the gRPC port"
    assert env["HERALD_METRICS_LISTEN"] == f"0.0.0.0:{ports['metrics']}", \
        "HERALD_METRICS_LISTEN is not the metrics port"
    assert "DATABASE_URL" in env, "DATABASE_URL is not set"
    keys = {"HERALD_JWT_SECRET", "HERALD_JWT_SECRET_FILE", "HERALD_JWT_PUBLIC_KEY_FILE"} & set(env)
    assert len(keys) == 1, f"token verification keys set: {sorted(keys)} (want exactly one)"
    if "HERALD_JWT_PUBLIC_KEY_FILE" in env:
        mount = next(m for m in herald["volumeMounts"] if env["HERALD_JWT_PUBLIC_KEY_FILE"].startswith(m["mountPath"] + "/"))
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        key = env["HERALD_JWT_PUBLIC_KEY_FILE"][len(mount["mountPath"]) + 1:]
        assert any(i["path"] == key for i in volume["secret"]["items"]), "public key file not projected"

    # Config and Secret changes roll the pods.
    annotations = pod["metadata"].get("annotations", {})
    assert "checksum/config" in annotations, "no checksum/config annotation"
    release_secrets = [s for s in of_kind(docs, "Secret") if "helm.sh/hook" not in s["metadata"].get("annotations", {})]
    for s in release_secrets:
        assert any(k.startswith("checksum/") and k != "checksum/config" for k in annotations), \
            f"Secret {s['metadata']['name']} has no checksum annotation on the pods"

    # Every Secret the pods read is rendered here or external (existing).
    for var in herald.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            hits = [s for s in release_secrets if s["metadata"]["name"] == ref["name"]]
            if hits:
                assert ref["key"] in hits[0]["data"], f"{var['name']}: key {ref['key']} not in Secret"

    selector = deploy["spec"]["selector"]["matchLabels"]
    assert matches(selector, pod["metadata"]["labels"]), "Deployment selector does not match its pods"
    if "HorizontalPodAutoscaler" in {d["kind"] for d in docs}:
        assert "replicas" not in deploy["spec"], "replicas set while the HPA owns them"
        hpa = one(docs, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"], "HPA target"
    if values.get("topologySpread", {}).get("enabled", True):
        topologies = {c["topologyKey"] for c in spec.get("topologySpreadConstraints", [])}
        assert topologies == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, \
            f"topology spread over {topologies}"

    # Services: gRPC port named grpc with h2c, selecting the serving pods only.
    services = of_kind(docs, "Service")
    for svc in services:
        assert svc["spec"]["selector"] == selector, f"Service {svc['metadata']['name']} selector"
        grpc = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc and grpc[0].get("appProtocol") == "kubernetes.io/h2c", \
            f"Service {svc['metadata']['name']}: no grpc port with appProtocol kubernetes.io/h2c"
    main = [s for s in services if s["spec"].get("clusterIP") != "None"]
    assert len(main) == 1 and any(p["name"] == "metrics" for p in main[0]["spec"]["ports"]), \
        "the main Service has no metrics port"
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"] == selector, "PDB selector"

    # Migration hook Job.
    jobs = of_kind(docs, "Job")
    assert len(jobs) == (1 if values.get("migration", {}).get("enabled", True) else 0), \
        f"{len(jobs)} migration Jobs"
    for job in jobs:
        ann = job["metadata"].get("annotations", {})
        assert ann.get("helm.sh/hook") == "pre-install,pre-upgrade", f"Job hook annotation {ann.get('helm.sh/hook')!r}"
        assert "helm.sh/hook-delete-policy" in ann, "Job has no hook-delete-policy"
        assert isinstance(job["spec"].get("backoffLimit"), int), "Job has no backoffLimit"
        jspec = job["spec"]["template"]["spec"]
        assert_hardened(jspec, "migration Job")
        assert jspec["restartPolicy"] == "Never", "Job restartPolicy"
        c = jspec["containers"][0]
        assert c["args"] == ["migrate"], f"Job args {c['args']}"
        assert c["image"] == herald["image"], "Job image differs from the Deployment's"
        assert not c.get("envFrom"), "Job reads a ConfigMap that does not exist at pre-install"
        assert not matches(selector, job["spec"]["template"]["metadata"]["labels"]), \
            "the Job's pod matches the Services' selector"
        sa = jspec.get("serviceAccountName")
        if sa:
            assert not [a for a in of_kind(docs, "ServiceAccount") if a["metadata"]["name"] == sa], \
                "Job uses a ServiceAccount created by the release (absent at pre-install)"
        for var in c.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if not ref:
                continue
            secret = [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == ref["name"]]
            if not secret:
                continue  # an existing Secret, created before install
            s_ann = secret[0]["metadata"].get("annotations", {})
            assert "pre-install" in s_ann.get("helm.sh/hook", ""), \
                f"Job reads Secret {ref['name']}, which is not a pre-install hook"
            assert hook_weight(secret[0]) < hook_weight(job), \
                f"Secret {ref['name']} is not created before the Job (hook weights)"
            assert ref["key"] in secret[0]["data"], f"Job: key {ref['key']} not in Secret"

    if values.get("image", {}).get("tag", "") == "" and not values.get("image", {}).get("digest"):
        app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
        assert herald["image"] == f"ghcr.io/herald-notify/herald:{app_version}", \
            f"default image is {herald['image']}"

    for ingress in of_kind(docs, "Ingress"):
        ann = ingress["metadata"].get("annotations", {})
        timeout = str(values["ingress"].get("streamTimeoutSeconds", 3600))
        for key, want in (("proxy-read-timeout", timeout), ("proxy-send-timeout", timeout),
                          ("proxy-buffering", "off")):
            assert ann.get(f"nginx.ingress.kubernetes.io/{key}") == want, f"Ingress {key} annotation"
        for rule in ingress["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                assert p["backend"]["service"]["name"] == main[0]["metadata"]["name"], "Ingress backend"
                assert p["backend"]["service"]["port"]["name"] == "grpc", "Ingress backend port"

    for sm in of_kind(docs, "ServiceMonitor"):
        sel = sm["spec"]["selector"]["matchLabels"]
        scraped = [s for s in services if matches(sel, s["metadata"]["labels"])
                   and any(p["name"] == e["port"] for p in s["spec"]["ports"] for e in sm["spec"]["endpoints"])]
        assert [s["metadata"]["name"] for s in scraped] == [main[0]["metadata"]["name"]], \
            f"ServiceMonitor scrapes {[s['metadata']['name'] for s in scraped]}"

    notes = next((v for k, v in rendered.items() if k.endswith("NOTES.txt")), "")
    assert "port-forward" in notes and "grpcurl" in notes, "NOTES.txt lacks the port-forward/grpcurl example"


# -------------------------------------------------------- value documentation

def schema_leaves(schema: dict[str, Any], prefix: str = "") -> set[str]:
    """Value paths the schema describes field by field (its strict objects)."""
    out: set[str] = set()
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        if sub.get("additionalProperties") is False and "properties" in sub:
            out |= schema_leaves(sub, path + ".")
        else:
            out.add(path)
    return out


def values_yaml_comments() -> tuple[set[str], set[str]]:
    """(every key path in values.yaml, those with a comment right above)."""
    paths: set[str] = set()
    commented: set[str] = set()
    stack: list[tuple[int, str]] = []
    previous = ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        m = re.match(r"^( *)([A-Za-z][A-Za-z0-9]*):", line)
        if m:
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m.group(2)))
            path = ".".join(k for _, k in stack)
            paths.add(path)
            if previous.lstrip().startswith("#"):
                commented.add(path)
        if line.strip():
            previous = line
    return paths, commented


def check_documentation(chart: Chart) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    leaves = schema_leaves(schema) - {"global"}
    defaults = chart.values

    def lookup(path: str) -> bool:
        node: Any = defaults
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return True

    missing_defaults = sorted(p for p in leaves if not lookup(p))
    assert not missing_defaults, f"schema values without a default in values.yaml: {missing_defaults}"

    paths, commented = values_yaml_comments()
    undocumented = sorted(p for p in leaves if p not in commented)
    assert not undocumented, f"values without a comment in values.yaml: {undocumented}"
    unknown = sorted(p for p in paths if not any(p == l or p.startswith(l + ".") or l.startswith(p + ".") for l in leaves))
    assert not unknown, f"values.yaml keys missing from values.schema.json: {unknown}"

    readme = (CHART / "README.md").read_text()
    table = set(re.findall(r"^\| `([A-Za-z0-9.]+)` \|", readme, re.MULTILINE))
    assert not sorted(leaves - table), f"values missing from the README table: {sorted(leaves - table)}"
    assert not sorted(table - leaves), f"README table rows that are not values: {sorted(table - leaves)}"


# Settings whose chart default must be the server's default: the
# transport bounds (their trade-offs are the server's) and the tuning knobs.
SERVER_DEFAULTS = (
    "HERALD_HANDSHAKE_TIMEOUT", "HERALD_REQUEST_BODY_TIMEOUT", "HERALD_CALL_TIMEOUT",
    "HERALD_MAX_CONCURRENT_STREAMS", "HERALD_MAX_RESETS_PER_CONNECTION",
    "HERALD_POOL_SIZE", "HERALD_HEARTBEAT_INTERVAL", "HERALD_STREAM_QUEUE",
    "HERALD_RETENTION", "HERALD_SHUTDOWN_GRACE", "HERALD_TRANSPARENT_HUGE_PAGES",
)


def check_server_defaults(docs: list[dict[str, Any]]) -> None:
    readme = (CHART.parent.parent / "README.md").read_text()
    server = dict(re.findall(r"^\| `--[a-z-]+` \| `(HERALD_[A-Z_]+)` \| `([^`]+)` \|", readme,
                             re.MULTILINE))
    container = next(c for c in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
                     if c["name"] == "herald")
    env = effective_env(container, docs)
    differing = {var: (env.get(var), server.get(var)) for var in SERVER_DEFAULTS
                 if env.get(var) is None or env.get(var) != server.get(var)}
    assert not differing, f"chart default vs the server's (README.md): {differing}"


# --------------------------------------------------------------------- main

def main() -> int:
    started = time.monotonic()
    print("Herald chart checks (helm/herald)")
    print(f"helm-python-sdk {helm_python.helm_sdk_version()} (Helm SDK), kubernetes-validate "
          f"{__import__('kubernetes_validate.version').version.__version__}, Kubernetes {KUBE_VERSION}")

    # 1. Lint.
    for label, values in (("default values", None), ("values-all.yaml", ALL)):
        report = lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSION}")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + \
            [{"error": e} for e in report.get("errors", []) if e]
        infos = [m["error"] for m in report["messages"] if m["severity"] < 2]
        R.check(not problems, f"helm lint --strict --kube-version v{KUBE_VERSION} ({label})"
                + (f" [info: {'; '.join(infos)}]" if infos else ""),
                "; ".join(str(p.get("error")) for p in problems))
    report = lint(str(CHART), {"replicaCount": "three"}, strict=True, kube_version=f"v{KUBE_VERSION}")
    R.check(bool(report.get("errors")), "helm lint reports replicaCount: \"three\" as an error")

    with Chart.load(str(CHART)) as chart, tempfile.TemporaryDirectory(prefix="herald-chart-") as tmp:
        # 2. Render every scenario.
        to_validate: list[Path] = []
        crds: list[tuple[str, dict[str, Any]]] = []
        manifests = 0
        scenario_docs: dict[str, tuple[list[dict[str, Any]], dict[str, str]]] = {}
        for name, (values, expected) in SCENARIOS.items():
            try:
                rendered = render(chart, values)
            except helm_python.HelmError as e:
                R.check(False, f"render {name}", str(e))
                continue
            docs = documents(rendered)
            kinds: dict[str, int] = {}
            for d in docs:
                kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
            R.check(kinds == expected, f"render {name}: {len(docs)} manifests "
                    f"({', '.join(f'{k}×{v}' for k, v in sorted(kinds.items()))})",
                    f"expected {expected}")
            scenario_docs[name] = (docs, rendered)
            core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
            crds += [(name, d) for d in docs if d not in core]
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump_all(core, sort_keys=False))
            to_validate.append(path)
            manifests += len(core)

        # 3. Schema validation: kubernetes-validate for built-in kinds...
        proc = subprocess.run(
            [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBE_VERSION,
             *map(str, to_validate)],
            capture_output=True, text=True, timeout=240,
        )
        lines = (proc.stdout + proc.stderr).splitlines()
        passed = [l for l in lines if l.startswith("INFO") and " passed " in l]
        bad = [l for l in lines if not (l.startswith("INFO") and " passed " in l)]
        R.check(proc.returncode == 0 and not bad and len(passed) == manifests,
                f"kubernetes-validate --strict -k {KUBE_VERSION}: {len(passed)}/{manifests} manifests valid",
                "\n     ".join(bad) or f"exit code {proc.returncode}")
        # ... and the CRD subset schema for ServiceMonitors.
        validator = jsonschema.Draft7Validator(SERVICE_MONITOR_SCHEMA)
        for name, doc in crds:
            errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
            R.check(not errors, f"{doc['kind']} ({name}) valid against the chart's subset of "
                    f"the monitoring.coreos.com/v1 schema (not in kubernetes-validate)", "; ".join(errors))

        # 4. Invariants.
        for name, (docs, rendered) in scenario_docs.items():
            R.run(f"invariants ({name}): drain < termination grace, gRPC probes, non-root, "
                  f"read-only root FS, hook Job and its Secret, no HERALD_DEV",
                  lambda: invariants(name, SCENARIOS[name][0], docs, rendered))

        # 5. Bad values must not render.
        for label, values, fragment in BAD_VALUES:
            try:
                render(chart, values_from_yaml(values) if isinstance(values, str) else values)
            except helm_python.HelmError as e:
                R.check(fragment in str(e), f"refused: {label}",
                        f"error does not mention {fragment!r}: {e}")
            else:
                R.check(False, f"refused: {label}", "rendered without error")

        # 6. Documentation of every value.
        R.run("every value has a comment in values.yaml, a README row and a schema entry",
              lambda: check_documentation(chart))

        # 7. The chart's defaults are the server's.
        if "defaults" in scenario_docs:
            R.run("the chart's default settings are the server's (README.md configuration table)",
                  lambda: check_server_defaults(scenario_docs["defaults"][0]))

    elapsed = time.monotonic() - started
    print(f"\n{R.passed} passed, {R.failed} failed; {manifests} manifests validated by "
          f"kubernetes-validate, {len(crds)} ServiceMonitor(s) structurally; {elapsed:.1f}s")
    return 1 if R.failed else 0


if __name__ == "__main__":
    sys.exit(main())

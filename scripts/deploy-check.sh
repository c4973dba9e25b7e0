#!/usr/bin/env bash
# Offline checks of the deployment files: deploy/kubernetes/** and
# compose.yaml (and the Dockerfile, for checkov). Nothing here talks to a
# cluster or a registry; the tools come from scripts/setup.sh, which it
# runs when they are missing.
#   1. Every built-in Kubernetes object against the OpenAPI schemas of one
#      Kubernetes version (1.34; KUBE_VERSION=1.35.0 picks another), strict
#      (an unknown field fails), with kubernetes-validate.
#   2. The PodMonitors against the Prometheus Operator's PodMonitor CRD schema
#      kept in deploy/kubernetes/schemas/podmonitor.json, unknown fields
#      refused as the API server's strict field validation would; their
#      metadata against ObjectMeta.
#   3. What no schema sees: each kustomization lists every manifest beside
#      it; selectors of Services, PDBs, PodMonitors and NetworkPolicies
#      select a pod template; named ports exist and fit in 15 characters;
#      the container ports are those of the rooms it serves (rooms.toml);
#      the ConfigMap, Secret and ServiceAccount a pod names exist;
#      CHOCO_CONFIG names a mounted key, its factory.toml parses, the secret
#      files it names are keys of the mounted Secret, and
#      terminationGracePeriodSeconds exceeds preStop + shutdown_grace.
#   4. compose.yaml against the Compose Specification's JSON schema
#      (deploy/compose/compose-spec.json), plus its references: named
#      volumes declared, depends_on and the NATS URLs naming its services,
#      the factory's published ports those of rooms.toml.
#   5. checkov (kubernetes and dockerfile frameworks) on all of it; a check
#      that does not apply is skipped in the manifest with a reason
#      (checkov.io/skipN annotations).
set -euo pipefail
cd "$(dirname "$0")/.."
KUBE_VERSION="${KUBE_VERSION:-1.34.0}"
KUBE_PY=.tools/venv-kube/bin/python
CHECKOV=.tools/venv-checkov/bin/checkov
if [ ! -x "${KUBE_PY}" ] || [ ! -x "${CHECKOV}" ]; then
  scripts/setup.sh >/dev/null
fi

status=0
"${KUBE_PY}" - "${KUBE_VERSION}" <<'PY' || status=1
import copy
import glob
import json
import os
import re
import sys
import tomllib

import jsonschema
import referencing
import yaml
import kubernetes_validate.utils as kv

KUBE_VERSION = sys.argv[1]
errors = []


def fail(where, message):
    errors.append(f"{where}: {message}")


def load_all(path):
    try:
        with open(path) as f:
            return [doc for doc in yaml.safe_load_all(f) if doc]
    except yaml.YAMLError as e:
        fail(path, f"not YAML: {e}")
        return []


def strict(schema):
    """Refuse unknown fields wherever the schema lists the known ones and
    does not say it keeps unknown ones (as the API server's strict field
    validation does for a CRD)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def schema_errors(validator, instance):
    return sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.path])


def duration_seconds(text):
    """A humantime duration as the factory reads it ("25s", "1m 30s")."""
    parts = re.findall(r"(\d+)\s*(ms|s|m|h)", text)
    if not parts or re.sub(r"(\d+)\s*(ms|s|m|h)|\s", "", text):
        raise ValueError(f"unreadable duration {text!r}")
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(int(n) * unit[u] for n, u in parts)


# ---- the schemas ---------------------------------------------------------
podmonitor_validator = jsonschema.Draft202012Validator(
    strict(json.load(open("deploy/kubernetes/schemas/podmonitor.json"))))
strict_dir = f"kubernetes-json-schema/v{kv.major_minor(KUBE_VERSION)}.0-local-strict"
definitions = kv.schema_contents(f"{strict_dir}/_definitions.json", KUBE_VERSION)
registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()
objectmeta_validator = jsonschema.Draft202012Validator(
    {"$ref": "https://kubernetes.io/api/_definitions.json#/$defs/"
             "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
    registry=registry)

rooms_table = tomllib.load(open("rooms.toml", "rb"))["rooms"]
ROOM_PORTS = {room: {t["http_port"], t["grpc_port"], t["metrics_port"]}
              for room, t in rooms_table.items()}
PORT_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")

# ---- 1, 2: every manifest against its schema -----------------------------
manifest_files = sorted(
    p for p in glob.glob("deploy/kubernetes/**/*.yaml", recursive=True))
objects = []          # (file, doc) of every Kubernetes object
counts = {"kubernetes": 0, "podmonitor": 0}
for path in manifest_files:
    for doc in load_all(path):
        where = f"{path}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        if doc.get("kind") == "Kustomization":
            where, base = path, os.path.dirname(path)
            listed = doc.get("resources", [])
            for resource in listed:
                if not os.path.isfile(os.path.join(base, resource)):
                    fail(where, f"resource {resource} does not exist")
            for other in sorted(glob.glob(os.path.join(base, "*.yaml"))):
                name = os.path.basename(other)
                if (name not in listed and name != "kustomization.yaml"
                        and not name.endswith(".example.yaml")):
                    fail(where, f"{name} is beside it but not in resources")
            continue
        objects.append((path, doc))
        if doc.get("apiVersion") == "monitoring.coreos.com/v1" and doc.get("kind") == "PodMonitor":
            counts["podmonitor"] += 1
            for e in schema_errors(podmonitor_validator, doc):
                fail(where, f"PodMonitor CRD schema: {'.'.join(map(str, e.path))}: {e.message}")
            for e in schema_errors(objectmeta_validator, doc.get("metadata", {})):
                fail(where, f"ObjectMeta: {'.'.join(['metadata', *map(str, e.path)])}: {e.message}")
            continue
        counts["kubernetes"] += 1
        try:
            kv.validate(doc, KUBE_VERSION, strict=True)
        except kv.ValidationError as e:
            fail(where, f"Kubernetes {kv.major_minor(KUBE_VERSION)} schema (strict): "
                        f"{'.'.join(map(str, e.path))}: {e.message}")
        except kv.SchemaNotFoundError:
            fail(where, f"no {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes "
                        f"{kv.major_minor(KUBE_VERSION)}, nor a CRD schema kept here")

# ---- 3: what the schemas do not see --------------------------------------

def references():
    by_kind = {}
    for path, doc in objects:
        meta = doc.get("metadata") or {}
        by_kind.setdefault(doc.get("kind"), {})[(meta.get("namespace"), meta.get("name"))] = (path, doc)

    templates = []  # (where, namespace, labels, pod spec)
    for (ns, name), (path, doc) in by_kind.get("Deployment", {}).items():
        where = f"{path}: Deployment/{name}"
        spec = doc["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"]["metadata"].get("labels", {})
        selector = spec["selector"].get("matchLabels", {})
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            fail(where, "spec.selector does not match the pod template's labels")
        templates.append((where, ns, labels, pod))
        if pod.get("serviceAccountName") and (ns, pod["serviceAccountName"]) not in by_kind.get("ServiceAccount", {}):
            fail(where, f"service account {pod['serviceAccountName']} is not defined here")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            cwhere = f"{where} container {container['name']}"
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for port_name in ports:
                if not PORT_NAME.match(port_name):
                    fail(cwhere, f"port name {port_name!r} is not an IANA service name of at most 15 characters")
            # The ports are those of the rooms the container serves.
            args = container.get("args", [])
            rooms = list(ROOM_PORTS)
            if "--rooms" in args:
                rooms = args[args.index("--rooms") + 1].split(",")
            unknown = [r for r in rooms if r not in ROOM_PORTS]
            if unknown:
                fail(cwhere, f"serve --rooms names unknown rooms {unknown}")
            expected = set().union(*(ROOM_PORTS[r] for r in rooms if r in ROOM_PORTS))
            if set(ports.values()) != expected:
                fail(cwhere, f"container ports {sorted(ports.values())} are not those of rooms "
                             f"{rooms} in rooms.toml {sorted(expected)}")
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe not in container:
                    fail(cwhere, f"no {probe}")
                    continue
                port = container[probe].get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports:
                    fail(cwhere, f"{probe} asks port {port}, which the container does not declare")
            mounts = {}
            for mount in container.get("volumeMounts", []):
                volume = volumes.get(mount["name"])
                if volume is None:
                    fail(cwhere, f"volumeMount {mount['name']} names no volume")
                    continue
                mounts[mount["mountPath"].rstrip("/")] = volume
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            config_path = env.get("CHOCO_CONFIG")
            if not config_path:
                fail(cwhere, "CHOCO_CONFIG is not set")
                continue
            config_volume = mounts.get(os.path.dirname(config_path))
            config_map = (config_volume or {}).get("configMap", {}).get("name")
            found = by_kind.get("ConfigMap", {}).get((ns, config_map))
            if not found or os.path.basename(config_path) not in found[1].get("data", {}):
                fail(cwhere, f"CHOCO_CONFIG={config_path} is no key of a mounted ConfigMap of this set")
                continue
            try:
                factory = tomllib.loads(found[1]["data"][os.path.basename(config_path)])
            except tomllib.TOMLDecodeError as e:
                fail(f"{found[0]}: ConfigMap/{config_map}", f"{os.path.basename(config_path)} does not parse: {e}")
                continue
            grace = duration_seconds(factory.get("shutdown_grace", "20s"))
            pre_stop = (container.get("lifecycle", {}).get("preStop", {})
                        .get("sleep", {}).get("seconds", 0))
            termination = pod.get("terminationGracePeriodSeconds", 30)
            if termination <= grace + pre_stop:
                fail(where, f"terminationGracePeriodSeconds {termination} is not above preStop "
                            f"{pre_stop} s + shutdown_grace {grace:g} s")

            def strings(node):
                if isinstance(node, dict):
                    for value in node.values():
                        yield from strings(value)
                elif isinstance(node, list):
                    for value in node:
                        yield from strings(value)
                elif isinstance(node, str):
                    yield node

            for value in strings(factory):
                volume = mounts.get(os.path.dirname(value))
                if volume and "secret" in volume:
                    secret_name = volume["secret"]["secretName"]
                    secret = by_kind.get("Secret", {}).get((ns, secret_name))
                    keys = set() if not secret else {*secret[1].get("data", {}), *secret[1].get("stringData", {})}
                    if os.path.basename(value) not in keys:
                        fail(cwhere, f"factory.toml names {value}, no key of Secret {secret_name} "
                                     f"(kept in deploy/kubernetes/secret.example.yaml)")


    def selected(where, ns, selector):
        """The pod templates a label selector picks; an error when none."""
        picked = [t for t in templates if t[1] == ns and selector
                  and all(t[2].get(k) == v for k, v in selector.items())]
        if not picked:
            fail(where, f"selector {selector} selects no pod template here")
        return picked


    def pod_ports(picked):
        return {p["name"] for t in picked for c in t[3]["containers"] for p in c.get("ports", [])}


    for kind, selector_of, ports_of in (
            ("Service", lambda d: d["spec"].get("selector"),
             lambda d: [p.get("targetPort") for p in d["spec"]["ports"]]),
            ("PodDisruptionBudget", lambda d: d["spec"]["selector"].get("matchLabels"), lambda d: []),
            ("PodMonitor", lambda d: d["spec"]["selector"].get("matchLabels"),
             lambda d: [e.get("port") for e in d["spec"]["podMetricsEndpoints"]]),
            ("NetworkPolicy", lambda d: d["spec"]["podSelector"].get("matchLabels"),
             lambda d: [p.get("port") for rule in d["spec"].get("ingress", []) for p in rule.get("ports", [])]),
    ):
        for (ns, name), (path, doc) in by_kind.get(kind, {}).items():
            where = f"{path}: {kind}/{name}"
            picked = selected(where, ns, selector_of(doc))
            if picked:
                names = pod_ports(picked)
                for port in ports_of(doc):
                    if isinstance(port, str) and port not in names:
                        fail(where, f"port {port} is no named port of the pods it selects")


try:
    references()
except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
    fail("deploy/kubernetes", f"references not (fully) checked, a malformed object: {type(e).__name__} {e}")


# ---- 4: compose.yaml ----------------------------------------------------
compose_schema = json.load(open("deploy/compose/compose-spec.json"))
compose = (load_all("compose.yaml") or [{}])[0]
compose_validator = jsonschema.Draft7Validator(compose_schema)
for e in schema_errors(compose_validator, compose):
    fail("compose.yaml", f"Compose Specification: {'.'.join(map(str, e.path))}: {e.message}")
services = compose.get("services") or {}


def compose_references():
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source and not source.startswith((".", "/", "~")) and source not in declared_volumes:
                fail(f"compose.yaml: {name}", f"volume {source} is not declared under volumes:")
        depends = service.get("depends_on", [])
        for other in (depends if isinstance(depends, list) else list(depends)):
            if other not in services:
                fail(f"compose.yaml: {name}", f"depends_on {other}: no such service")
        for arg in service.get("command", []) if isinstance(service.get("command"), list) else []:
            if arg.startswith("--routes="):
                for host in re.findall(r"nats://([^:,/]+)", arg):
                    if host not in services:
                        fail(f"compose.yaml: {name}", f"route to {host}: no such service")
    factory = services.get("factory")
    if factory is None:
        fail("compose.yaml", "no factory service")
    else:
        url = (factory.get("environment") or {}).get("CHOCO_NATS__URL", "")
        hosts = re.findall(r"nats://([^:,/]+)", url)
        nats_services = [n for n, s in services.items() if str(s.get("image", "")).startswith("nats:")]
        if sorted(hosts) != sorted(nats_services):
            fail("compose.yaml: factory", f"CHOCO_NATS__URL names {hosts}, the NATS services are {nats_services}")
        published = set()
        for spec in factory.get("ports", []):
            match = re.fullmatch(r"(?:[\d.]+:)?(\d+)(?:-(\d+))?:(\d+)(?:-(\d+))?", str(spec))
            if not match:
                fail("compose.yaml: factory", f"port {spec!r} is not host:container")
                continue
            low, high = int(match[3]), int(match[4] or match[3])
            published |= set(range(low, high + 1))
        every_port = set().union(*ROOM_PORTS.values())
        if published != every_port:
            fail("compose.yaml: factory", f"publishes {sorted(published)}, rooms.toml has {sorted(every_port)}")


try:
    compose_references()
except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
    fail("compose.yaml", f"references not (fully) checked, a malformed file: {type(e).__name__} {e}")

if errors:
    for line in errors:
        print(f"deploy-check: {line}", file=sys.stderr)
    sys.exit(1)
print(f"deploy-check: {counts['kubernetes']} Kubernetes objects valid for "
      f"{kv.major_minor(KUBE_VERSION)} (strict), {counts['podmonitor']} PodMonitors valid "
      f"for their CRD, references consistent; compose.yaml valid "
      f"({len(services)} services)")
PY

# checkov: the kubernetes and dockerfile frameworks only, no download of
# policies or guidelines (--skip-download: it would call a SaaS API).
mapfile -t manifests < <(find deploy/kubernetes -name '*.yaml' -not -path '*/schemas/*' | sort)
checkov_out="$(mktemp)"
trap 'rm -f "${checkov_out}"' EXIT
if "${CHECKOV}" --quiet --compact --skip-download --framework kubernetes dockerfile \
  -f Dockerfile "${manifests[@]}" >"${checkov_out}" 2>&1; then
  awk '/ scan results:$/ { framework = $1 } /^Passed checks/ { print "deploy-check: checkov " framework ": " $0 }' "${checkov_out}"
else
  cat "${checkov_out}" >&2
  echo "deploy-check: checkov found problems (above)" >&2
  status=1
fi
exit "${status}"

"""
The deployment manifests in etc/k8s hold together, and hold together with the code.

Every file is parsed, and every reference between the objects is followed:
namespaces, service accounts, role bindings, selectors, Service ports,
ConfigMap volumes. The contiv containers' command lines are expanded the way
the kubelet expands them (downward API and Service variables), parsed by
contiv's own options and validated with its own configuration code, and what
that configuration says (the HTTP port, the store, the OVS sockets, the
leader election) is held against the probes, the memcached Service, the host
paths and the RBAC rules. The API access netmaster needs is read from the
code (the reflectors' resource table, the Lease client's requests), so a new
watched kind without a rule fails here.

Each check is a function returning a list of problems; every check is also
run against a copy of the manifests broken on purpose, to show it can fail.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from unittest import mock

import pytest
import yaml

from contiv import config as configuration
from contiv import tap
from contiv.k8s import lease, reflector

K8S_DIR = Path(__file__).resolve().parents[2] / "etc" / "k8s"

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass",
                  "CustomResourceDefinition"}
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet"}
# Kinds that need a CRD the cluster may not have: present or not, they are
# checked only against what they name.
OPTIONAL_KINDS = {"PrometheusRule"}
READ_VERBS = {"get", "list", "watch"}
HTTP_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch",
              "DELETE": "delete"}

# What the downward API gives a pod, for the checks: any values of the right
# shape will do, as long as the checks can recognise them afterwards.
SAMPLE_NODE = "node-sample-1"
SAMPLE_POD_IP = "10.244.7.9"
SERVICE_NETWORK = ipaddress.ip_network("10.96.0.0/16")


# -- loading


class Manifests:
    """Every object of every file, by kind, with the file it came from."""

    def __init__(self, documents: list[tuple[str, dict]]):
        self.documents = documents

    @property
    def objects(self) -> list[dict]:
        return [obj for _, obj in self.documents]

    def of_kind(self, kind: str) -> list[dict]:
        return [obj for obj in self.objects if obj.get("kind") == kind]

    def find(self, kind: str, name: str, namespace: Optional[str] = None) -> Optional[dict]:
        for obj in self.of_kind(kind):
            if name_of(obj) == name and (namespace is None or namespace_of(obj) == namespace):
                return obj
        return None

    def workloads(self) -> list[dict]:
        return [obj for obj in self.objects if obj.get("kind") in WORKLOADS]

    def copy(self) -> "Manifests":
        return Manifests(copy.deepcopy(self.documents))


def load(directory: Path = K8S_DIR) -> Manifests:
    documents = []
    for path in sorted(directory.rglob("*")):
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            continue
        with open(path, encoding="utf-8") as f:
            for obj in yaml.safe_load_all(f):
                if obj is None:
                    continue
                assert isinstance(obj, dict), f"{path}: a document that is not a mapping"
                documents.append((str(path.relative_to(directory)), obj))
    return Manifests(documents)


@pytest.fixture(scope="module")
def manifests() -> Manifests:
    return load()


def name_of(obj: dict) -> str:
    return (obj.get("metadata") or {}).get("name", "")


def namespace_of(obj: dict) -> Optional[str]:
    return (obj.get("metadata") or {}).get("namespace")


def describe(obj: dict) -> str:
    namespace = namespace_of(obj)
    return f"{obj.get('kind')} {namespace + '/' if namespace else ''}{name_of(obj)}"


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def template_labels(workload: dict) -> dict:
    return (workload["spec"]["template"].get("metadata") or {}).get("labels") or {}


def selects(selector: Optional[dict], labels: dict) -> bool:
    """A label selector (matchLabels and matchExpressions) against labels."""
    if not selector:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or ():
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


# -- the containers as the kubelet starts them


def is_contiv(container: dict) -> bool:
    return "contiv" in (container.get("command") or []) + (container.get("args") or [])


def contiv_containers(manifests: Manifests) -> Iterator[tuple[dict, dict]]:
    for workload in manifests.workloads():
        for container in pod_spec(workload).get("containers") or ():
            if is_contiv(container):
                yield workload, container


def service_ip(manifests: Manifests, service: dict) -> str:
    """A ClusterIP for each Service of the files, distinct, in the service network."""
    index = manifests.of_kind("Service").index(service)
    return str(SERVICE_NETWORK[10 + index])


def service_variables(manifests: Manifests, namespace: str) -> dict[str, str]:
    """What the kubelet sets for the Services of the pod's namespace (service links)."""
    variables = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    for service in manifests.of_kind("Service"):
        if namespace_of(service) != namespace:
            continue
        prefix = name_of(service).upper().replace("-", "_")
        ports = service["spec"].get("ports") or []
        variables[f"{prefix}_SERVICE_HOST"] = service_ip(manifests, service)
        if ports:
            variables[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        for port in ports:
            if port.get("name"):
                variables[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = \
                    str(port["port"])
    return variables


def sample_pod_name(workload: dict) -> str:
    return f"{name_of(workload)}-7d9f8-sample"


def container_environment(manifests: Manifests, workload: dict, container: dict) -> dict:
    """The container's environment: service links, then its env (downward API sampled)."""
    namespace = namespace_of(workload) or "default"
    spec = pod_spec(workload)
    env = service_variables(manifests, namespace) if spec.get("enableServiceLinks", True) \
        else {}
    fields = {"metadata.name": sample_pod_name(workload), "metadata.namespace": namespace,
              "spec.nodeName": SAMPLE_NODE, "status.podIP": SAMPLE_POD_IP,
              "spec.serviceAccountName": spec.get("serviceAccountName", "default")}
    for variable in container.get("env") or ():
        if "value" in variable:
            env[variable["name"]] = expand(variable["value"], env)
        elif "fieldRef" in (variable.get("valueFrom") or {}):
            field = variable["valueFrom"]["fieldRef"]["fieldPath"]
            env[variable["name"]] = fields.get(field, f"<{field}>")
    return env


def expand(text: str, env: dict) -> str:
    """The kubelet's $(VAR) expansion: $$ escapes, an unknown $(VAR) stays as written."""

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, text)


def command_line(manifests: Manifests, workload: dict, container: dict) -> list[str]:
    env = container_environment(manifests, workload, container)
    return [expand(word, env) for word in
            (container.get("command") or []) + (container.get("args") or [])]


class _ArgsOnly(tap.Options):
    """contiv's options without postOptions: it would read the files and the API config."""

    def postOptions(self) -> None:
        pass


def file_in_pod(manifests: Manifests, workload: dict, container: dict,
                path: str) -> tuple[Optional[str], str]:
    """
    The text a path in the container holds when it comes from a ConfigMap
    volume: (text, where); (None, why not) otherwise.
    """
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes") or ()}
    for mount in container.get("volumeMounts") or ():
        root = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(root):
            continue
        volume = volumes.get(mount["name"])
        if volume is None or "configMap" not in volume:
            return None, f"{path} is on volume {mount['name']!r}, which is not a ConfigMap"
        name = volume["configMap"]["name"]
        config_map = manifests.find("ConfigMap", name, namespace_of(workload))
        if config_map is None:
            return None, f"ConfigMap {name} does not exist"
        relative = path[len(root):]
        items = volume["configMap"].get("items")
        key = relative if not items else \
            next((i["key"] for i in items if i["path"] == relative), None)
        data = config_map.get("data") or {}
        if key is None or key not in data:
            return None, f"ConfigMap {name} has no key for {relative}"
        return data[key], f"ConfigMap {namespace_of(config_map)}/{name} key {key}"
    return None, f"no volume is mounted at {path}"


class Loaded:
    """One contiv container's configuration, as the daemon would build it."""

    def __init__(self, workload: dict, container: dict, argv: list[str],
                 options: tap.Options, file_values: dict, config: configuration.Config):
        self.workload = workload
        self.container = container
        self.argv = argv
        self.options = options
        self.file_values = file_values
        self.config = config

    @property
    def where(self) -> str:
        return f"{describe(self.workload)} container {self.container['name']}"


def load_config(manifests: Manifests, workload: dict, container: dict) -> Loaded:
    """Raises ConfigError (or usage.UsageError) as the daemon would refuse to start."""
    argv = command_line(manifests, workload, container)
    options = _ArgsOnly()
    options.parseOptions(argv[argv.index("contiv") + 1:])
    file_values: dict = {}
    if options["config"]:
        text, where = file_in_pod(manifests, workload, container, options["config"])
        if text is None:
            raise configuration.ConfigError("config", where)
        document = yaml.safe_load(text) or {}
        file_values = configuration.flatten(document, where)
    env = container_environment(manifests, workload, container)
    # The defaults that read the environment (election.identity) see the pod's.
    with mock.patch.dict(os.environ, env, clear=True):
        config = configuration.build(file_values, options.command_line_values(),
                                     options["config"] or "")
    return Loaded(workload, container, argv, options, file_values, config)


def loaded_configs(manifests: Manifests) -> tuple[list[Loaded], list[str]]:
    loaded, problems = [], []
    for workload, container in contiv_containers(manifests):
        try:
            loaded.append(load_config(manifests, workload, container))
        except Exception as e:
            problems.append(f"{describe(workload)} container {container['name']}: contiv "
                            f"would refuse to start: {e}")
    return loaded, problems


def container_port(container: dict, port: Any) -> Optional[int]:
    """A port as probes and Services name it (number or name) -> the container's number."""
    if isinstance(port, int):
        return port
    for declared in container.get("ports") or ():
        if declared.get("name") == port:
            return declared["containerPort"]
    return None


def listen_port(description: str) -> int:
    """The port of a Twisted server endpoint description (tcp:PORT..., tcp6:...)."""
    kind, _, rest = description.partition(":")
    assert kind in ("tcp", "tcp6", "ssl"), f"{description!r} is not a TCP endpoint"
    return int(rest.split(":")[0].replace("port=", ""))


# -- what the code says netmaster needs


def api_group_and_resource(path: str) -> tuple[str, str]:
    """/api/v1/pods -> ('', 'pods'); /apis/networking.k8s.io/v1/x -> ('networking.k8s.io', 'x')."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        return "", parts[2]
    return parts[1], parts[3]


def watched_resources() -> list[tuple[str, str, str]]:
    """(group, resource, kind) for every kind netmaster's reflectors follow."""
    return [(*api_group_and_resource(r.path), r.kind) for r in reflector.RESOURCES]


def reflector_verbs() -> set[str]:
    """The API calls a reflector makes (client.list, client.watch) as RBAC verbs."""
    calls = set(re.findall(r"self\.client\.(\w+)\(", inspect.getsource(reflector.Reflector)))
    verbs = calls & READ_VERBS
    assert {"list", "watch"} <= verbs, f"reflector calls changed: {calls}"
    return verbs


def lease_verbs() -> set[str]:
    """The requests the Lease client makes, as RBAC verbs."""
    methods = re.findall(r'_request\("(\w+)"', inspect.getsource(lease.LeaseApi))
    assert methods, "the Lease client makes no requests any more"
    return {HTTP_VERBS[method] for method in methods}


def lease_group() -> str:
    return lease.API_VERSION.split("/")[0]


def rule_allows(rule: dict, verb: str, group: str, resource: str,
                name: Optional[str] = None) -> bool:
    def has(values: Any, value: str) -> bool:
        return "*" in (values or ()) or value in (values or ())

    if not (has(rule.get("verbs"), verb) and has(rule.get("apiGroups"), group)
            and has(rule.get("resources"), resource)):
        return False
    names = rule.get("resourceNames")
    if not names:
        return True
    # A create (and a list or watch of the collection) has no name when it
    # is authorized: a rule limited to names never allows it.
    return name is not None and verb not in ("create", "list", "watch") and name in names


def account_rules(manifests: Manifests, namespace: str,
                  account: str) -> tuple[list[dict], dict[str, list[dict]]]:
    """The service account's rules: (cluster-wide, {namespace: rules})."""
    cluster: list[dict] = []
    namespaced: dict[str, list[dict]] = {}

    def bound(binding: dict) -> bool:
        return any(s.get("kind") == "ServiceAccount" and s.get("name") == account
                   and s.get("namespace") == namespace for s in binding.get("subjects") or ())

    for binding in manifests.of_kind("ClusterRoleBinding"):
        role = manifests.find("ClusterRole", binding["roleRef"]["name"])
        if bound(binding) and role is not None:
            cluster += role.get("rules") or []
    for binding in manifests.of_kind("RoleBinding"):
        if not bound(binding):
            continue
        ref = binding["roleRef"]
        role = manifests.find(ref["kind"], ref["name"],
                              namespace_of(binding) if ref["kind"] == "Role" else None)
        if role is not None:
            namespaced.setdefault(namespace_of(binding), []).extend(role.get("rules") or [])
    return cluster, namespaced


def election_namespace(loaded: Loaded) -> str:
    """
    Where the Lease lives: election.namespace when given; otherwise the
    daemon reads its own namespace from the service account mount
    (configuration.SERVICE_ACCOUNT_NAMESPACE), which in a pod is the pod's.
    """
    given = {**loaded.file_values, **loaded.options.command_line_values()}
    if "election.namespace" in given:
        return loaded.config["election.namespace"]
    return namespace_of(loaded.workload) or "default"


# -- the checks


def check_namespaces(manifests: Manifests) -> list[str]:
    defined = {name_of(ns) for ns in manifests.of_kind("Namespace")}
    problems = []
    for obj in manifests.objects:
        kind, namespace = obj.get("kind"), namespace_of(obj)
        if kind in CLUSTER_SCOPED:
            if namespace:
                problems.append(f"{describe(obj)}: a cluster-scoped kind with a namespace")
            continue
        if not namespace:
            problems.append(f"{describe(obj)}: no metadata.namespace (kubectl would put it "
                            "in the current context's namespace)")
        elif namespace not in defined:
            problems.append(f"{describe(obj)}: namespace {namespace} is not defined here")
        for subject in obj.get("subjects") or ():
            if subject.get("kind") == "ServiceAccount" and \
                    subject.get("namespace") not in defined:
                problems.append(f"{describe(obj)}: subject {subject.get('name')} is in "
                                f"namespace {subject.get('namespace')}, not defined here")
    return problems


def check_service_accounts(manifests: Manifests) -> list[str]:
    problems = []
    for workload in manifests.workloads():
        spec = pod_spec(workload)
        account = spec.get("serviceAccountName")
        if account is None:
            if spec.get("automountServiceAccountToken") is not False:
                problems.append(f"{describe(workload)}: runs as the namespace's default "
                                "service account with a token; name an account or mount none")
            continue
        if manifests.find("ServiceAccount", account, namespace_of(workload)) is None:
            problems.append(f"{describe(workload)}: service account {account} does not exist "
                            f"in {namespace_of(workload)}")
    return problems


def check_bindings(manifests: Manifests) -> list[str]:
    problems = []
    for binding in manifests.of_kind("RoleBinding") + manifests.of_kind("ClusterRoleBinding"):
        ref = binding.get("roleRef") or {}
        if ref.get("apiGroup") != "rbac.authorization.k8s.io":
            problems.append(f"{describe(binding)}: roleRef.apiGroup is {ref.get('apiGroup')!r}")
        if binding["kind"] == "ClusterRoleBinding" and ref.get("kind") != "ClusterRole":
            problems.append(f"{describe(binding)}: a ClusterRoleBinding can only name a "
                            "ClusterRole")
        namespace = namespace_of(binding) if ref.get("kind") == "Role" else None
        if manifests.find(ref.get("kind", ""), ref.get("name", ""), namespace) is None:
            where = f" in {namespace}" if namespace else ""
            problems.append(f"{describe(binding)}: {ref.get('kind')} {ref.get('name')}"
                            f"{where} does not exist")
        subjects = binding.get("subjects") or []
        if not subjects:
            problems.append(f"{describe(binding)}: no subjects")
        for subject in subjects:
            if subject.get("kind") != "ServiceAccount":
                continue
            if manifests.find("ServiceAccount", subject.get("name", ""),
                              subject.get("namespace")) is None:
                problems.append(f"{describe(binding)}: service account "
                                f"{subject.get('namespace')}/{subject.get('name')} does not "
                                "exist")
    return problems


def check_netmaster_rbac(manifests: Manifests) -> list[str]:
    """Every API call the code makes is allowed, and nothing beyond reading cluster-wide."""
    loaded, problems = loaded_configs(manifests)
    if problems:
        return problems
    watched = watched_resources()
    verbs = reflector_verbs()
    found_api_user = False
    for item in loaded:
        spec = pod_spec(item.workload)
        namespace = namespace_of(item.workload) or "default"
        account = spec.get("serviceAccountName", "default")
        cluster, namespaced = account_rules(manifests, namespace, account)
        api = item.config["source.in_cluster"]
        if not api:
            # netplugin: no source, no API access, no token.
            if cluster or namespaced:
                problems.append(f"{item.where}: has no API source but its service account "
                                f"{account} is bound to roles")
            if spec.get("automountServiceAccountToken") is not False and \
                    (manifests.find("ServiceAccount", account, namespace) or {}).get(
                        "automountServiceAccountToken") is not False:
                problems.append(f"{item.where}: has no API source but mounts a token")
            continue
        if "netmaster" not in item.config.roles:
            continue
        found_api_user = True
        if spec.get("automountServiceAccountToken") is False:
            problems.append(f"{item.where}: --in-cluster needs the service account token")
        for group, resource, kind in watched:
            for verb in sorted(verbs):
                if not any(rule_allows(r, verb, group, resource) for r in cluster):
                    problems.append(f"{item.where}: the reflector for {kind} needs "
                                    f"{verb} on {group or 'core'}/{resource} cluster-wide, "
                                    f"and {account}'s ClusterRoles do not allow it")
        for rule in cluster:
            extra = set(rule.get("verbs") or ()) - READ_VERBS
            if extra:
                problems.append(f"{item.where}: cluster-wide verbs {sorted(extra)} on "
                                f"{rule.get('resources')}: netmaster only reads")
        replicas = item.workload["spec"].get("replicas", 1)
        if replicas > 1 and not item.config["election.enabled"]:
            problems.append(f"{item.where}: {replicas} replicas without leader election "
                            "would all publish")
        if not item.config["election.enabled"]:
            continue
        election_ns = election_namespace(item)
        lease_name = item.config["election.lease"]
        rules = namespaced.get(election_ns, []) + cluster
        for verb in sorted(lease_verbs()):
            if not any(rule_allows(r, verb, lease_group(), "leases", lease_name)
                       for r in rules):
                problems.append(f"{item.where}: leader election needs {verb} on "
                                f"{lease_group()}/leases {election_ns}/{lease_name}, which "
                                f"{account} is not allowed")
        identity = item.config["election.identity"]
        if identity != sample_pod_name(item.workload):
            problems.append(f"{item.where}: the election identity is {identity!r}, not the "
                            "pod's name (set POD_NAME from metadata.name): replicas must "
                            "differ")
    if not found_api_user:
        problems.append("no contiv container runs netmaster with --in-cluster")
    return problems


def check_selectors(manifests: Manifests) -> list[str]:
    problems = []
    for workload in manifests.workloads():
        selector = workload["spec"].get("selector")
        labels = template_labels(workload)
        if not selects(selector, labels):
            problems.append(f"{describe(workload)}: spec.selector {selector} does not match "
                            f"its template's labels {labels}")
        affinity = pod_spec(workload).get("affinity") or {}
        for term in (affinity.get("podAntiAffinity") or {}).get(
                "requiredDuringSchedulingIgnoredDuringExecution") or ():
            if not selects(term.get("labelSelector"), labels):
                problems.append(f"{describe(workload)}: its pod anti-affinity does not select "
                                "its own pods, so replicas may share a node")
    for budget in manifests.of_kind("PodDisruptionBudget"):
        if not any(namespace_of(w) == namespace_of(budget)
                   and selects(budget["spec"].get("selector"), template_labels(w))
                   for w in manifests.workloads()):
            problems.append(f"{describe(budget)}: selects no workload's pods")
    return problems


def check_services(manifests: Manifests) -> list[str]:
    problems = []
    for service in manifests.of_kind("Service"):
        selected = [w for w in manifests.workloads() if namespace_of(w) == namespace_of(service)
                    and selects({"matchLabels": service["spec"].get("selector")},
                                template_labels(w))]
        if not selected:
            problems.append(f"{describe(service)}: its selector "
                            f"{service['spec'].get('selector')} matches no pods")
        for port in service["spec"].get("ports") or ():
            target = port.get("targetPort", port["port"])
            for workload in selected:
                matches = [c for c in pod_spec(workload)["containers"]
                           for p in c.get("ports") or ()
                           if container_port(c, target) == p["containerPort"]
                           and p.get("protocol", "TCP") == port.get("protocol", "TCP")]
                if not matches:
                    problems.append(f"{describe(service)}: port {port.get('name')} targets "
                                    f"{target!r}, which {describe(workload)} does not "
                                    f"declare ({port.get('protocol', 'TCP')})")
    return problems


def check_volumes(manifests: Manifests) -> list[str]:
    problems = []
    for workload in manifests.workloads():
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec.get("volumes") or ()}
        for volume in volumes.values():
            if "configMap" not in volume:
                continue
            name = volume["configMap"]["name"]
            config_map = manifests.find("ConfigMap", name, namespace_of(workload))
            if config_map is None:
                problems.append(f"{describe(workload)}: volume {volume['name']} names "
                                f"ConfigMap {name}, which does not exist in "
                                f"{namespace_of(workload)}")
                continue
            for item in volume["configMap"].get("items") or ():
                if item["key"] not in (config_map.get("data") or {}):
                    problems.append(f"{describe(workload)}: volume {volume['name']} takes key "
                                    f"{item['key']!r}, which ConfigMap {name} does not have")
        for container in spec.get("containers") or ():
            for mount in container.get("volumeMounts") or ():
                if mount["name"] not in volumes:
                    problems.append(f"{describe(workload)} container {container['name']}: "
                                    f"mounts volume {mount['name']!r}, which the pod does "
                                    "not have")
    return problems


def check_contiv_config(manifests: Manifests) -> list[str]:
    """The config file and command line pass contiv's own validation, for each role."""
    loaded, problems = loaded_configs(manifests)
    roles = {role for item in loaded for role in item.config.roles}
    for role in ("netmaster", "netplugin"):
        if role not in roles:
            problems.append(f"no contiv container runs {role}")
    for item in loaded:
        argv = item.argv
        if argv[0] != "twistd" or "--nodaemon" not in argv[:argv.index("contiv")]:
            problems.append(f"{item.where}: not `twistd --nodaemon ... contiv` (a daemonised "
                            "twistd leaves the container at once)")
        for word in argv:
            if "$(" in word:
                problems.append(f"{item.where}: {word!r} would reach the daemon unexpanded "
                                "(no such variable in the container)")
    return problems


def check_probes(manifests: Manifests) -> list[str]:
    """Probes and the scrape annotation use the port http.listen opens."""
    loaded, problems = loaded_configs(manifests)
    for item in loaded:
        if not item.config["http.listen"]:
            problems.append(f"{item.where}: no http.listen, so no probes can be answered")
            continue
        port = listen_port(item.config["http.listen"])
        listen = item.config["http.listen"]
        if "interface=" in listen and "interface=0.0.0.0" not in listen and \
                "interface=::" not in listen:
            problems.append(f"{item.where}: http.listen {listen!r} is not reachable at the "
                            "pod's IP, where the kubelet probes")
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            http = (item.container.get(probe) or {}).get("httpGet")
            if not http:
                problems.append(f"{item.where}: no {probe} over HTTP")
                continue
            if http.get("path") != path:
                problems.append(f"{item.where}: {probe} asks {http.get('path')}, not {path}")
            if container_port(item.container, http.get("port")) != port:
                problems.append(f"{item.where}: {probe} port {http.get('port')!r} is not "
                                f"http.listen's port {port}")
        annotations = (item.workload["spec"]["template"].get("metadata") or {}).get(
            "annotations") or {}
        if "prometheus.io/port" in annotations and \
                int(annotations["prometheus.io/port"]) != port:
            problems.append(f"{item.where}: prometheus.io/port {annotations['prometheus.io/port']}"
                            f" is not http.listen's port {port}")
    return problems


def check_store(manifests: Manifests) -> list[str]:
    """The store URL names the memcached Service (its address and port)."""
    loaded, problems = loaded_configs(manifests)
    by_ip = {service_ip(manifests, s): s for s in manifests.of_kind("Service")}
    for item in loaded:
        url = item.config["store"]
        if not url.startswith("memcached://"):
            problems.append(f"{item.where}: store is {url!r}; netmaster and netplugin in "
                            "different pods must share memcached")
            continue
        for server in url[len("memcached://"):].split(","):
            host, port = configuration.parse_host_port(server)
            service = by_ip.get(host)
            if service is None:
                problems.append(f"{item.where}: store server {server} is not a Service of "
                                "these files (name it with $(<SERVICE>_SERVICE_HOST))")
                continue
            if namespace_of(service) != namespace_of(item.workload):
                problems.append(f"{item.where}: store Service {describe(service)} is in "
                                "another namespace: its variables are not set in this pod")
            ports = [p["port"] for p in service["spec"].get("ports") or ()]
            if port not in ports:
                problems.append(f"{item.where}: store port {port} is not a port of "
                                f"{describe(service)} ({ports})")
            backends = [w for w in manifests.workloads()
                        if namespace_of(w) == namespace_of(service)
                        and selects({"matchLabels": service["spec"].get("selector")},
                                    template_labels(w))]
            if not any("memcached" in c.get("image", "") for w in backends
                       for c in pod_spec(w)["containers"]):
                problems.append(f"{item.where}: store Service {describe(service)} does not "
                                "select memcached pods")
    return problems


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == os.path.normpath(directory)


def check_ovs_mounts(manifests: Manifests) -> list[str]:
    """netplugin reaches the host's OVS sockets at the paths its config names."""
    loaded, problems = loaded_configs(manifests)
    for item in loaded:
        if "netplugin" not in item.config.roles:
            continue
        connect = item.config["openflow.connect"]
        if not connect or not connect.startswith("unix:"):
            problems.append(f"{item.where}: openflow.connect {connect!r} is not the bridge's "
                            "unix management socket")
            continue
        sockets = {"openflow.connect": connect[len("unix:"):].split(":")[0]}
        ovsdb = item.config["openflow.ovsdb"] or "unix:/var/run/openvswitch/db.sock"
        if ovsdb.startswith("unix:"):
            sockets["openflow.ovsdb"] = ovsdb[len("unix:"):]
        volumes = {v["name"]: v for v in pod_spec(item.workload).get("volumes") or ()}
        for key, path in sockets.items():
            mounts = [m for m in item.container.get("volumeMounts") or ()
                      if _inside(path, m["mountPath"])]
            host = [m for m in mounts if "hostPath" in volumes.get(m["name"], {})]
            if not host:
                problems.append(f"{item.where}: {key} {path} is not on a hostPath mount")
                continue
            mount = max(host, key=lambda m: len(m["mountPath"]))
            host_path = volumes[mount["name"]]["hostPath"]["path"]
            on_host = host_path.rstrip("/") + path[len(mount["mountPath"].rstrip("/")):]
            if on_host != path:
                problems.append(f"{item.where}: {key} {path} is {on_host} on the host, not "
                                "where OVS puts it")
            if mount.get("readOnly"):
                # connect(2) on a unix socket needs write access to it.
                problems.append(f"{item.where}: the OVS directory is mounted read-only; "
                                "sockets cannot be connected to")
        if item.config["node"] != SAMPLE_NODE:
            problems.append(f"{item.where}: node is {item.config['node']!r}, not the pod's "
                            "spec.nodeName")
        spec = pod_spec(item.workload)
        if spec.get("hostNetwork") and spec.get("dnsPolicy") != "ClusterFirstWithHostNet":
            problems.append(f"{item.where}: hostNetwork without dnsPolicy "
                            "ClusterFirstWithHostNet")
    return problems


def check_netplugin_daemonset(manifests: Manifests) -> list[str]:
    problems = []
    daemonsets = manifests.of_kind("DaemonSet")
    if not daemonsets:
        return ["no DaemonSet"]
    for daemonset in daemonsets:
        spec = pod_spec(daemonset)
        strategy = daemonset["spec"].get("updateStrategy") or {}
        if strategy.get("type") != "RollingUpdate" or \
                (strategy.get("rollingUpdate") or {}).get("maxUnavailable") != 1:
            problems.append(f"{describe(daemonset)}: updateStrategy is not RollingUpdate "
                            "with maxUnavailable 1")
        if not any(t.get("operator") == "Exists" and not t.get("key")
                   for t in spec.get("tolerations") or ()):
            problems.append(f"{describe(daemonset)}: does not tolerate every taint")
        if not spec.get("hostNetwork"):
            problems.append(f"{describe(daemonset)}: not on the host network")
        for container in spec["containers"]:
            context = container.get("securityContext") or {}
            if context.get("privileged"):
                problems.append(f"{describe(daemonset)}: privileged, which the datapath "
                                "does not need")
    return problems


def metric_names() -> set[str]:
    """Every sample name /metrics can serve (importing what registers metrics)."""
    from contiv import metrics

    # The modules that define metrics, as the daemon imports them.
    for module in ("contiv.datapath.manager", "contiv.dns.datapath", "contiv.dns.server",
                   "contiv.k8s.lease", "contiv.roles.netmaster"):
        importlib.import_module(module)

    statuses = {"netmaster": {"in_sync": True, "generation": 1}}
    names = set()
    for registry in (metrics.REGISTRY, metrics.instance_registry(lambda: statuses)):
        for family in registry.collect():
            # Labelled series have no samples until first used: the names
            # come from the family's type.
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                        "summary": ("_count", "_sum"), "info": ("_info",)}
            names.add(family.name)
            names.update(family.name + s for s in suffixes.get(family.type, ()))
            names.update(sample.name for sample in family.samples)
    return names


def check_alerts(manifests: Manifests) -> list[str]:
    """Optional PrometheusRules: every contiv_ metric they use exists."""
    known = metric_names()
    problems = []
    for rule_set in manifests.of_kind("PrometheusRule"):
        for group in rule_set["spec"]["groups"]:
            for rule in group["rules"]:
                for name in set(re.findall(r"\bcontiv_[a-z0-9_]+", rule["expr"])):
                    if name not in known:
                        problems.append(f"{describe(rule_set)} alert {rule.get('alert')}: "
                                        f"metric {name} is not served")
    return problems


CHECKS: dict[str, Callable[[Manifests], list[str]]] = {
    "namespaces": check_namespaces,
    "service_accounts": check_service_accounts,
    "bindings": check_bindings,
    "netmaster_rbac": check_netmaster_rbac,
    "selectors": check_selectors,
    "services": check_services,
    "volumes": check_volumes,
    "contiv_config": check_contiv_config,
    "probes": check_probes,
    "store": check_store,
    "ovs_mounts": check_ovs_mounts,
    "netplugin_daemonset": check_netplugin_daemonset,
    "alerts": check_alerts,
}


# -- the manifests as they are


def test_files_parse(manifests: Manifests) -> None:
    kinds = {obj.get("kind") for obj in manifests.objects}
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
            "RoleBinding", "ConfigMap", "Deployment", "DaemonSet", "Service"} <= kinds
    for path, obj in manifests.documents:
        assert obj.get("apiVersion") and obj.get("kind") and name_of(obj), \
            f"{path}: a document without apiVersion, kind or metadata.name"
    keys = [(o["kind"], namespace_of(o), name_of(o)) for o in manifests.objects]
    assert len(keys) == len(set(keys)), "an object is defined twice"


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_check_passes(manifests: Manifests, check: str) -> None:
    assert CHECKS[check](manifests) == []


def test_reflector_kinds_are_derived_from_code() -> None:
    """The RBAC check follows the code's table, so it sees a kind added there."""
    derived = {(group, resource) for group, resource, _ in watched_resources()}
    assert ("", "pods") in derived and ("networking.k8s.io", "networkpolicies") in derived
    assert lease_verbs() == {"get", "create", "update"}


def test_optional_kinds_stay_out_of_the_plain_directory(manifests: Manifests) -> None:
    """`kubectl apply -f etc/k8s/` must not fail on a cluster without the CRDs."""
    for path, obj in manifests.documents:
        if obj.get("kind") in OPTIONAL_KINDS:
            assert "/" in path, f"{path}: {obj['kind']} belongs in a subdirectory"


# -- each check catches what it is for


def _first(manifests: Manifests, kind: str, name: Optional[str] = None) -> dict:
    for obj in manifests.of_kind(kind):
        if name is None or name_of(obj) == name:
            return obj
    raise AssertionError(f"no {kind} {name or ''}")


def _netmaster(m: Manifests) -> dict:
    return next(w for w, c in contiv_containers(m) if "--role=netmaster" in c["args"])


def _netplugin(m: Manifests) -> dict:
    return next(w for w, c in contiv_containers(m) if "--role=netplugin" in c["args"])


def _cluster_role_rules(m: Manifests) -> list[dict]:
    return _first(m, "ClusterRole")["rules"]


def _drop_resource(m: Manifests, resource: str) -> None:
    for rule in _cluster_role_rules(m):
        rule["resources"] = [r for r in rule["resources"] if r != resource]


def _set_arg(container: dict, prefix: str, value: Optional[str]) -> None:
    args = [a for a in container["args"] if not a.startswith(prefix)]
    if value is not None:
        args.append(value)
    container["args"] = args


def _netplugin_container(m: Manifests) -> dict:
    return next(c for c in pod_spec(_netplugin(m))["containers"] if is_contiv(c))


def _netmaster_container(m: Manifests) -> dict:
    return next(c for c in pod_spec(_netmaster(m))["containers"] if is_contiv(c))


def _config_text(m: Manifests, edit: Callable[[dict], None]) -> None:
    config_map = _first(m, "ConfigMap")
    document = yaml.safe_load(config_map["data"]["contiv.yaml"])
    edit(document)
    config_map["data"]["contiv.yaml"] = yaml.safe_dump(document)


BREAKAGES: list[tuple[str, str, Callable[[Manifests], None], str]] = [
    ("namespaces", "object in an undefined namespace",
     lambda m: _first(m, "ConfigMap")["metadata"].update(namespace="contiv"),
     "namespace contiv is not defined"),
    ("namespaces", "namespaced object without a namespace",
     lambda m: _first(m, "Service")["metadata"].pop("namespace"),
     "no metadata.namespace"),
    ("service_accounts", "pod names a missing service account",
     lambda m: pod_spec(_netmaster(m)).update(serviceAccountName="contiv-master"),
     "service account contiv-master does not exist"),
    ("bindings", "binding names a missing ClusterRole",
     lambda m: _first(m, "ClusterRoleBinding")["roleRef"].update(name="contiv-netmastr"),
     "ClusterRole contiv-netmastr does not exist"),
    ("bindings", "binding's subject in the wrong namespace",
     lambda m: _first(m, "RoleBinding")["subjects"][0].update(namespace="kube-system"),
     "service account kube-system/contiv-netmaster does not exist"),
    ("bindings", "RoleBinding names a Role of another namespace",
     lambda m: _first(m, "Role")["metadata"].update(namespace="default"),
     "Role contiv-netmaster-election in contiv-system does not exist"),
    ("netmaster_rbac", "a watched resource without a rule",
     lambda m: _drop_resource(m, "endpointslices"),
     "EndpointSlice needs list on discovery.k8s.io/endpointslices"),
    ("netmaster_rbac", "a rule in the wrong API group",
     lambda m: _cluster_role_rules(m)[1].update(apiGroups=["extensions"]),
     "NetworkPolicy needs list on networking.k8s.io/networkpolicies"),
    ("netmaster_rbac", "watch verb missing",
     lambda m: [r.update(verbs=["get", "list"]) for r in _cluster_role_rules(m)],
     "needs watch on core/pods"),
    ("netmaster_rbac", "write access cluster-wide",
     lambda m: _cluster_role_rules(m)[0].update(verbs=["get", "list", "watch", "patch"]),
     "cluster-wide verbs ['patch']"),
    ("netmaster_rbac", "lease update limited to another name",
     lambda m: _first(m, "Role")["rules"][1].update(resourceNames=["contiv"]),
     "needs get on coordination.k8s.io/leases contiv-system/contiv-netmaster"),
    ("netmaster_rbac", "lease create limited by name",
     lambda m: _first(m, "Role")["rules"][0].update(resourceNames=["contiv-netmaster"]),
     "needs create on coordination.k8s.io/leases"),
    ("netmaster_rbac", "Role for leases in another namespace than the election's",
     lambda m: _set_arg(_netmaster_container(m), "--election-namespace",
                        "--election-namespace=kube-system"),
     "leases kube-system/contiv-netmaster"),
    ("netmaster_rbac", "no POD_NAME: replicas share an identity",
     lambda m: _netmaster_container(m).update(env=[]),
     "not the pod's name"),
    ("netmaster_rbac", "netplugin bound to a role",
     lambda m: _first(m, "ClusterRoleBinding")["subjects"].append(
         {"kind": "ServiceAccount", "name": "contiv-netplugin",
          "namespace": "contiv-system"}),
     "has no API source but its service account contiv-netplugin is bound"),
    ("netmaster_rbac", "two replicas without election",
     lambda m: _set_arg(_netmaster_container(m), "--election-enabled",
                        "--election-enabled=false"),
     "2 replicas without leader election"),
    ("selectors", "Deployment selector does not match its template",
     lambda m: template_labels(_netmaster(m)).update(
         {"app.kubernetes.io/component": "master"}),
     "does not match its template's labels"),
    ("selectors", "anti-affinity selects other pods",
     lambda m: pod_spec(_netmaster(m))["affinity"]["podAntiAffinity"][
         "requiredDuringSchedulingIgnoredDuringExecution"][0]["labelSelector"][
         "matchLabels"].update({"app.kubernetes.io/component": "memcached"}),
     "anti-affinity does not select its own pods"),
    ("selectors", "PodDisruptionBudget selects nothing",
     lambda m: _first(m, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].update(
         {"app.kubernetes.io/component": "netmastr"}),
     "selects no workload's pods"),
    ("services", "Service selector matches no pods",
     lambda m: _first(m, "Service")["spec"]["selector"].update(
         {"app.kubernetes.io/component": "memcache"}),
     "matches no pods"),
    ("services", "Service targets an undeclared port name",
     lambda m: _first(m, "Service")["spec"]["ports"][0].update(targetPort="memcached"),
     "targets 'memcached'"),
    ("services", "Service targets the wrong port number",
     lambda m: _first(m, "Service")["spec"]["ports"][0].update(targetPort=11212),
     "targets 11212"),
    ("volumes", "volume names a missing ConfigMap",
     lambda m: next(v for v in pod_spec(_netplugin(m))["volumes"] if "configMap" in v)[
         "configMap"].update(name="contiv"),
     "ConfigMap contiv, which does not exist"),
    ("volumes", "volume takes a key the ConfigMap lacks",
     lambda m: next(v for v in pod_spec(_netmaster(m))["volumes"] if "configMap" in v)[
         "configMap"]["items"][0].update(key="config.yaml"),
     "takes key 'config.yaml'"),
    ("volumes", "mount of a volume the pod lacks",
     lambda m: _netplugin_container(m)["volumeMounts"][0].update(name="settings"),
     "mounts volume 'settings'"),
    ("contiv_config", "unknown key in contiv.yaml",
     lambda m: _config_text(m, lambda d: d["openflow"].update(colour="blue")),
     "openflow.colour: unknown key"),
    ("contiv_config", "bad value in contiv.yaml",
     lambda m: _config_text(m, lambda d: d["dns"].update(ttl=-1)),
     "dns.ttl: expected whole seconds"),
    ("contiv_config", "config file path not mounted",
     lambda m: _set_arg(_netplugin_container(m), "--config=",
                        "--config=/etc/contiv/config.yaml"),
     "has no key for config.yaml"),
    ("contiv_config", "an unknown option on the command line",
     lambda m: _set_arg(_netmaster_container(m), "--leader", "--leader"),
     "option --leader not recognized"),
    ("contiv_config", "variable in the arguments that the pod does not set",
     lambda m: _set_arg(_netplugin_container(m), "--node=", "--node=$(MY_NODE)"),
     "'--node=$(MY_NODE)' would reach the daemon unexpanded"),
    ("contiv_config", "twistd without --nodaemon",
     lambda m: _netmaster_container(m).update(command=["twistd", "contiv"]),
     "not `twistd --nodaemon"),
    ("probes", "readiness probe on another port",
     lambda m: _netplugin_container(m)["readinessProbe"]["httpGet"].update(port=9100),
     "readinessProbe port 9100 is not http.listen's port 9590"),
    ("probes", "http.listen moved without the probes",
     lambda m: _config_text(m, lambda d: d["http"].update(listen="tcp:9591")),
     "is not http.listen's port 9591"),
    ("probes", "http.listen on loopback only",
     lambda m: _config_text(m, lambda d: d["http"].update(
         listen="tcp:9590:interface=127.0.0.1")),
     "not reachable at the pod's IP"),
    ("probes", "liveness asks /readyz",
     lambda m: _netmaster_container(m)["livenessProbe"]["httpGet"].update(path="/readyz"),
     "livenessProbe asks /readyz"),
    ("probes", "scrape annotation on another port",
     lambda m: _netmaster(m)["spec"]["template"]["metadata"]["annotations"].update(
         {"prometheus.io/port": "9100"}),
     "prometheus.io/port 9100"),
    ("store", "store names another Service's port",
     lambda m: _set_arg(_netmaster_container(m), "--store=",
                        "--store=memcached://$(CONTIV_MEMCACHED_SERVICE_HOST):11212"),
     "store port 11212 is not a port of Service contiv-system/contiv-memcached"),
    ("store", "Service renamed under the store URL",
     lambda m: _first(m, "Service")["metadata"].update(name="memcached"),
     "would refuse to start"),
    ("store", "store back to memory",
     lambda m: _set_arg(_netplugin_container(m), "--store=", "--store=memory"),
     "store is 'memory'"),
    ("ovs_mounts", "hostPath elsewhere than the socket's directory",
     lambda m: next(v for v in pod_spec(_netplugin(m))["volumes"] if "hostPath" in v)[
         "hostPath"].update(path="/run/ovs"),
     "is /run/ovs/br0.mgmt on the host"),
    ("ovs_mounts", "socket outside every mount",
     lambda m: _config_text(m, lambda d: d["openflow"].update(
         connect="unix:/run/openvswitch/br0.mgmt")),
     "openflow.connect /run/openvswitch/br0.mgmt is not on a hostPath mount"),
    ("ovs_mounts", "OVS directory mounted read-only",
     lambda m: next(x for x in _netplugin_container(m)["volumeMounts"]
                    if x["name"] == "openvswitch").update(readOnly=True),
     "mounted read-only"),
    ("ovs_mounts", "node from the pod name, not spec.nodeName",
     lambda m: _netplugin_container(m)["env"][0]["valueFrom"]["fieldRef"].update(
         fieldPath="metadata.name"),
     "not the pod's spec.nodeName"),
    ("ovs_mounts", "host network with the host's DNS",
     lambda m: pod_spec(_netplugin(m)).update(dnsPolicy="ClusterFirst"),
     "dnsPolicy ClusterFirstWithHostNet"),
    ("netplugin_daemonset", "update two nodes at once",
     lambda m: _netplugin(m)["spec"]["updateStrategy"]["rollingUpdate"].update(
         maxUnavailable=2),
     "maxUnavailable 1"),
    ("netplugin_daemonset", "skips tainted nodes",
     lambda m: pod_spec(_netplugin(m)).update(tolerations=[]),
     "does not tolerate every taint"),
]


@pytest.mark.parametrize("check,what,breakage,expected",
                         BREAKAGES, ids=[f"{b[0]}:{b[1]}" for b in BREAKAGES])
def test_check_catches(manifests: Manifests, check: str, what: str,
                       breakage: Callable[[Manifests], None], expected: str) -> None:
    broken = manifests.copy()
    breakage(broken)
    problems = CHECKS[check](broken)
    assert any(expected in problem for problem in problems), problems


def test_every_check_has_a_breakage() -> None:
    broken = {check for check, *_ in BREAKAGES}
    assert set(CHECKS) - broken <= {"alerts"}


def test_rbac_check_sees_a_kind_added_to_the_reflectors(
        manifests: Manifests, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new watched kind in the code, without a rule, fails the RBAC check."""
    added = reflector.Resource("Node", "/api/v1/nodes", "v1")
    monkeypatch.setattr(reflector, "RESOURCES", (*reflector.RESOURCES, added))
    problems = check_netmaster_rbac(manifests)
    assert any("the reflector for Node needs list on core/nodes" in p for p in problems), \
        problems


def test_alerts_check_catches_an_unknown_metric(manifests: Manifests) -> None:
    broken = manifests.copy()
    broken.documents.append(("monitoring/x.yaml", {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
        "metadata": {"name": "x", "namespace": "contiv-system"},
        "spec": {"groups": [{"name": "x", "rules": [
            {"alert": "Typo", "expr": "contiv_role_insync == 0"}]}]}}))
    assert any("metric contiv_role_insync is not served" in p
               for p in check_alerts(broken))


def test_operations_doc_names_every_metric() -> None:
    """docs/operations.md documents every contiv metric the code registers."""
    from contiv import metrics

    metric_names()  # imports the modules that define metrics
    doc = (K8S_DIR.parents[1] / "docs" / "operations.md").read_text(encoding="utf-8")
    statuses = {"netmaster": {"in_sync": True, "generation": 1}}
    missing = []
    for registry in (metrics.REGISTRY, metrics.instance_registry(lambda: statuses)):
        for family in registry.collect():
            if not family.name.startswith("contiv_"):
                continue
            shown = family.name + {"counter": "_total", "info": "_info"}.get(family.type, "")
            if f"`{shown}`" not in doc:
                missing.append(shown)
    assert missing == []

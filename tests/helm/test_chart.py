"""The Helm chart, rendered with the value sets the README shows and more: every object valid against the
Kubernetes OpenAPI schemas of current releases, every config key the chart writes accepted by the agent, the
agents' ClusterRole and the relay's Role exactly what the code's Kubernetes API calls need, the password only in
its Secret, and the rules and dashboards of deploy/ shipped whole."""

from __future__ import annotations

import ast
import base64
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes.client.api
import kubernetes_validate
import pytest
import yaml

from flowscope.config import BY_ENV, ENV_PREFIX
from tests.helm.chart import CHART, ROOT, find, manifests, render_text, renderer
from tests.kernel.image import SMALLEST

FLOWSCOPE = str(Path(sys.executable).with_name("flowscope"))
KUBERNETES_VERSIONS = ("1.33.0", "1.35.0", "1.37.0")
PASSWORD = "Pw-7f3a9c-only-in-the-secret"
VALUE_SETS = {
    "defaults": {},
    "flowlog": yaml.safe_load((CHART / "values" / "flowlog.yaml").read_text()),
    "prometheus": yaml.safe_load((CHART / "values" / "prometheus.yaml").read_text()),
    "clickhouse": yaml.safe_load((CHART / "values" / "clickhouse.yaml").read_text()),
    "relay": {
        "relay": {
            "enabled": True, "peers": ["10.0.0.1:4244", "10.0.0.2:4244"], "config": {"relay": {"sort_window": 5000}},
        },
        "agent": {"config": {"probes": {"interval": 0.5, "flow_map_size": 131072}, "stop_timeout": "15s"}},
    },
    "discovery": {"relay": {"enabled": True}},
    "relay-plaintext": {"relay": {"enabled": True, "peers": ["10.0.0.1:4244"], "tls": {"enabled": False}}},
    "relay-own-cert": {
        "relay": {"enabled": True, "peers": ["10.0.0.1:4244"],
                  "tls": {"existingSecret": "relay-cert", "clientAuth": True}},
        "tls": {"existingSecret": "agent-certs"},
    },
    "metrics-tls": {
        "metrics": {"enabled": True, "tls": {"enabled": True}, "serviceMonitor": {"enabled": True},
                    "podMonitor": {"enabled": True}},
    },
    "everything": {
        "fullnameOverride": "observe",
        "relay": {"enabled": True, "peers": ["10.0.0.1:4244"]},
        "metrics": {"enabled": True, "podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
        "clickhouse": {
            "enabled": True, "url": "clickhouse://flowscope@ch:9000/flows?secure=1", "cluster": "shards",
            "passwordSecret": {"create": True, "password": PASSWORD},
        },
        "dashboards": {"enabled": True},
        "agent": {
            "priorityClassName": "system-node-critical", "startupSeconds": 603,
            "tmp": {"medium": "Memory", "sizeLimit": "128Mi"},
            "hostPaths": {"cgroup": "/sys/fs/cgroup/unified"},
        },
    },
}  # fmt: skip
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}  # prometheus-operator's, not in Kubernetes' schemas


@pytest.fixture(scope="module")
def render(tmp_path_factory: pytest.TempPathFactory):
    binary = renderer(tmp_path_factory.mktemp("render"))
    values_dir = tmp_path_factory.mktemp("values")

    def rendered(name: str, kube_version: str = "v1.35.0", cluster: list[dict] | None = None) -> list[dict[str, Any]]:
        path = values_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(VALUE_SETS[name]))
        objects = None
        if cluster is not None:
            objects = values_dir / f"{name}-cluster.yaml"
            objects.write_text(yaml.safe_dump_all(cluster))
        return manifests(render_text(binary, path, kube_version=kube_version, cluster=objects))

    rendered.binary = binary  # type: ignore[attr-defined]
    return rendered


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_object_is_valid_for_current_kubernetes(render, value_set: str) -> None:
    for version in KUBERNETES_VERSIONS:
        docs = render(value_set, f"v{version}")
        for doc in docs:
            if doc["kind"] in CUSTOM_KINDS:
                assert doc["apiVersion"] == "monitoring.coreos.com/v1"
                continue
            kubernetes_validate.validate(doc, version, strict=True)
        kinds = sorted(doc["kind"] for doc in docs)
        assert {"ConfigMap", "DaemonSet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= set(kinds)


def test_a_broken_object_fails_the_schema_check(render) -> None:
    daemonset = find(render("defaults"), "DaemonSet")
    daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = "BPF"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSIONS[-1], strict=True)


def config_files(docs: list[dict[str, Any]]) -> dict[str, str]:
    return find(docs, "ConfigMap", "-config")["data"]


def leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= leaves(value, (*prefix, key))
        else:
            out[(*prefix, key)] = value
    return out


# What flowscope reads the chart's text values as, by hand (durations in seconds, sizes in bytes).
PARSED = {"7d": 604800.0, "1GiB": 1 << 30, "15s": 15.0}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_the_agent_accepts_every_key_the_chart_writes(render, value_set: str, tmp_path: Path) -> None:
    docs = render(value_set)
    files = config_files(docs)
    # the FLOWSCOPE_* variables of the agent's container, in the config file's keys
    agent_env = find(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["env"]
    variables = {e["name"]: e["value"] for e in agent_env if e["name"].startswith(ENV_PREFIX)}
    assert variables == {"FLOWSCOPE_HOST_ROOT": "/host"}
    for name, text in files.items():
        written = yaml.safe_load(text)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(written))
        environ = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
        if name == "agent.yaml":
            environ |= variables
        result = subprocess.run(
            [FLOWSCOPE, "agent", "--print-config", "--config", str(path)], capture_output=True, text=True, timeout=60,
            env=environ,
        )  # fmt: skip
        assert result.returncode == 0, f"{name}: {result.stderr}"
        printed = leaves(yaml.safe_load(result.stdout))
        for key, value in leaves(written).items():
            expected = PARSED.get(value, value) if isinstance(value, str) else value
            assert printed.get(key, "absent") == expected, f"{name}: {'.'.join(key)}"
        if name == "agent.yaml":
            assert {BY_ENV[v].path: printed.get(BY_ENV[v].path) for v in variables} == {
                ("probes", "host_root"): "/host"
            }


def test_the_chart_wires_the_agent_to_its_probes_and_secrets(render) -> None:
    docs = render("everything")
    agent = yaml.safe_load(config_files(docs)["agent.yaml"])
    assert agent["status"] == {"address": "127.0.0.1:9465"}
    assert agent["clickhouse"] == {
        "url": "clickhouse://flowscope@ch:9000/flows?secure=1", "cluster": "shards", "ttl_days": 30,
        "password_file": "/etc/flowscope/clickhouse/password",
    }  # fmt: skip
    assert agent["grpc"]["address"] == "0.0.0.0:4244"
    pod = find(docs, "DaemonSet")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert (pod["hostNetwork"], pod["hostPID"], pod["terminationGracePeriodSeconds"]) == (True, True, 30)
    assert container["readinessProbe"]["httpGet"] == {"host": "127.0.0.1", "port": 9465, "path": "/healthz"}
    assert container["env"] == [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "FLOWSCOPE_HOST_ROOT", "value": "/host"},
    ]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": [*SMALLEST, "SYS_PTRACE"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    host_paths = {path: (volumes[name]["hostPath"]["path"], volumes[name]["hostPath"]["type"])
                  for path, name in mounts.items() if "hostPath" in volumes[name]}  # fmt: skip
    # the node's kernel headers under /host, beside the image's own /lib/modules and /usr/src (its fallback), and
    # made empty where the node has none, so that the pod starts there too
    assert host_paths == {
        "/sys/fs/bpf": ("/sys/fs/bpf", "DirectoryOrCreate"),
        "/sys/kernel/tracing": ("/sys/kernel/tracing", "Directory"),
        "/sys/kernel/debug": ("/sys/kernel/debug", "Directory"),
        "/sys/fs/cgroup/unified": ("/sys/fs/cgroup/unified", "Directory"),
        "/host/lib/modules": ("/lib/modules", "DirectoryOrCreate"), "/host/usr/src": ("/usr/src", "DirectoryOrCreate"),
        "/var/lib/flowscope": ("/var/lib/flowscope", "DirectoryOrCreate"),
        "/var/cache/flowscope": ("/var/cache/flowscope", "DirectoryOrCreate"),
        "/run/flowscope": ("/run/flowscope", "DirectoryOrCreate"),
    }  # fmt: skip
    read_only = {m["mountPath"] for m in container["volumeMounts"] if m.get("readOnly")}
    assert {"/host/lib/modules", "/host/usr/src"} <= read_only
    secret = volumes[mounts["/etc/flowscope/clickhouse"]]["secret"]
    assert secret["items"] == [{"key": "password", "path": "password"}]


def test_the_password_is_only_in_its_secret(render) -> None:
    docs = render("everything")
    encoded = base64.b64encode(PASSWORD.encode()).decode()
    holders = [d for d in docs if PASSWORD in json.dumps(d) or encoded in json.dumps(d)]
    assert [(d["kind"], d["metadata"]["name"]) for d in holders] == [("Secret", "flowscope-clickhouse")]
    assert base64.b64decode(holders[0]["data"]["password"]).decode() == PASSWORD


def test_the_relay_gets_the_agents_and_their_certificates(render) -> None:
    docs = render("relay")
    relay = yaml.safe_load(config_files(docs)["relay.yaml"])
    assert relay["relay"] == {"peers": ["10.0.0.1:4244", "10.0.0.2:4244"], "sort_window": 5000}
    assert relay["client"]["tls_server_name"] == "agent.fs-flowscope.flowscope"
    tls = find(docs, "Secret", "-tls")["data"]
    certificate = base64.b64decode(tls["tls.crt"]).decode()
    result = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName"], input=certificate, capture_output=True, text=True
    )
    assert "DNS:agent.fs-flowscope.flowscope" in result.stdout, result.stderr
    pod = find(docs, "Deployment", "-relay")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_a_relay_without_peers_discovers_the_release_agent_pods_by_their_port_name(render) -> None:
    docs = render("discovery")
    relay = yaml.safe_load(config_files(docs)["relay.yaml"])
    agent = find(docs, "DaemonSet", "-agent")["spec"]["template"]
    selector = dict(requirement.split("=") for requirement in relay["relay"]["discover_selector"].split(","))
    assert selector == {
        "app.kubernetes.io/name": "flowscope", "app.kubernetes.io/instance": "fs",
        "app.kubernetes.io/component": "agent",
    }  # fmt: skip
    assert selector.items() <= agent["metadata"]["labels"].items()  # the agents' pods, and only theirs
    daemonset = find(docs, "DaemonSet", "-agent")["metadata"]["namespace"]
    assert relay["relay"]["discover_namespace"] == daemonset == "flowscope"  # in the release's namespace only
    relay_pod = find(docs, "Deployment", "-relay")["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= relay_pod.items()
    assert relay["relay"]["discover_port"] == "grpc"
    ports = {p["name"]: p["containerPort"] for p in agent["spec"]["containers"][0]["ports"]}
    assert ports["grpc"] == 4244


# ---- RBAC from the code --------------------------------------------------------------------------------


def api_methods() -> dict[str, tuple[str, str]]:
    """Every read method of the Kubernetes client's API classes -> (API group, resource), from its request path."""
    methods: dict[str, tuple[str, str]] = {}
    api_classes = [
        api_class
        for module in pkgutil.iter_modules(kubernetes.client.api.__path__)
        for name, api_class in vars(importlib.import_module(f"kubernetes.client.api.{module.name}")).items()
        if name.endswith("Api") and inspect.isclass(api_class)
    ]
    for api_class in api_classes:
        for method in vars(api_class):
            variant = method.endswith(("_with_http_info", "_without_preload_content"))
            if variant or not method.startswith(("list_", "read_")):
                continue
            # the request path is in the method's serializer (client 29+) or its _with_http_info (older clients)
            helpers = (f"_{method}_serialize", f"{method}_with_http_info")
            sources = [inspect.getsource(getattr(api_class, h)) for h in helpers if hasattr(api_class, h)]
            path = next(filter(None, (re.search(r"'(/apis?/[^']+)'", text) for text in sources)), None)
            if path is None:
                continue
            # /api/v1/[namespaces/{ns}/]pods[/{name}/log], /apis/GROUP/VERSION/...; shorter paths are discovery
            parts = [p for p in path.group(1).split("/") if p and not p.startswith("{")]
            group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1] if len(parts) > 1 else "", parts[3:])
            if rest:
                methods[method] = (group, "/".join([p for p in rest if p != "namespaces"] or ["namespaces"]))
    return methods


def rules_from_code() -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every Kubernetes API call in flowscope's code: a method named in the code
    (as an attribute or a string), list_* is list, read_* is get, and list_* in a module that passes
    watch=True is watch as well."""
    methods = api_methods()
    rules = set()
    for source in [*ROOT.joinpath("flowscope").rglob("*.py"), *ROOT.joinpath("exporters").rglob("*.py")]:
        tree = ast.parse(source.read_text())
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        watches = any(
            isinstance(n, ast.keyword) and n.arg == "watch" and isinstance(n.value, ast.Constant) and n.value.value
            for n in ast.walk(tree)
        )
        for name in names & methods.keys():
            group, resource = methods[name]
            verbs = ["get"] if name.startswith("read_") else ["list", "watch"] if watches else ["list"]
            rules |= {(group, resource, verb) for verb in verbs}
    return rules


def granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def rules_of_source(path: Path) -> tuple[set[tuple[str, str, str]], str]:
    """(group, resource, verb) of the KubernetesSource the module at `path` makes, and the scope they need
    ("cluster" or "namespace"): its `resources=` (default: every one of flowscope.enrich.kube.RESOURCES), each
    listed with the list function RESOURCES names (kube.NAMESPACED's, in one namespace, when it passes
    `namespace=`) and watched (kube.py's reflectors list, then watch)."""
    from flowscope.enrich import kube

    calls = [
        node
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", getattr(node.func, "attr", None)) == "KubernetesSource"
    ]
    assert len(calls) == 1, f"{path}: {len(calls)} KubernetesSource calls"
    given = [ast.literal_eval(k.value) for k in calls[0].keywords if k.arg == "resources"]
    resources = given[0] if given else tuple(kube.RESOURCES)
    namespaced = any(k.arg == "namespace" for k in calls[0].keywords)
    functions = [kube.NAMESPACED[r] if namespaced else kube.RESOURCES[r][1] for r in resources]
    assert all(("_namespaced_" in f) == namespaced for f in functions), functions
    methods = api_methods()
    rules = {(*methods[function], verb) for function in functions for verb in ("list", "watch")}
    return rules, "namespace" if namespaced else "cluster"


def test_the_roles_are_exactly_what_the_code_calls(render) -> None:
    docs = render("discovery")
    agent_role, relay_role = find(docs, "ClusterRole", "fs-flowscope"), find(docs, "Role", "-relay")
    agent, relay = granted(agent_role), granted(relay_role)
    derived = rules_from_code()
    assert ("", "pods", "watch") in derived and ("apps", "replicasets", "list") in derived  # the scan finds calls
    assert agent | relay == derived  # every call the code makes is granted, nothing else
    # the identity source: every namespace's objects (and nodes), so a ClusterRole
    assert rules_of_source(ROOT / "flowscope" / "enrich" / "__init__.py") == (agent, "cluster")
    # the relay's discovery: the agents' pods in its own namespace, so a Role there
    assert rules_of_source(ROOT / "exporters" / "grpc" / "relay.py") == (relay, "namespace")
    assert relay_role["metadata"]["namespace"] == "flowscope"
    # and exactly these: list + watch (what a reflector does), no get (the code reads no object by name)
    assert agent_role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes", "pods", "services"], "verbs": ["list", "watch"]},
        {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["list", "watch"]},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["list", "watch"]},
    ]
    assert relay_role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"] == ["fs-flowscope"]


def test_the_relay_has_its_own_service_account_bound_to_its_role_only(render) -> None:
    docs = render("discovery")
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    assert sorted(accounts) == ["fs-flowscope", "fs-flowscope-relay"]
    relay_pod = find(docs, "Deployment", "-relay")["spec"]["template"]["spec"]
    agent_pod = find(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]
    assert (relay_pod["serviceAccountName"], relay_pod["automountServiceAccountToken"]) == ("fs-flowscope-relay", True)
    assert agent_pod["serviceAccountName"] == "fs-flowscope"
    bindings = {
        (d["kind"], d["metadata"].get("namespace"), d["roleRef"]["kind"], d["roleRef"]["name"]): [
            (s["kind"], s["name"], s["namespace"]) for s in d["subjects"]
        ]
        for d in docs
        if d["kind"] in ("ClusterRoleBinding", "RoleBinding")
    }
    assert bindings == {
        ("ClusterRoleBinding", None, "ClusterRole", "fs-flowscope"): [("ServiceAccount", "fs-flowscope", "flowscope")],
        ("RoleBinding", "flowscope", "Role", "fs-flowscope-relay"): [
            ("ServiceAccount", "fs-flowscope-relay", "flowscope")
        ],
    }


def test_a_relay_given_its_peers_gets_no_role_and_no_token(render) -> None:
    docs = render("relay")
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"] == ["fs-flowscope"]
    assert [d["roleRef"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"] == ["fs-flowscope"]
    assert [d for d in docs if d["kind"] in ("Role", "RoleBinding")] == []
    account = find(docs, "ServiceAccount", "-relay")
    pod = find(docs, "Deployment", "-relay")["spec"]["template"]["spec"]
    assert (account["automountServiceAccountToken"], pod["automountServiceAccountToken"]) == (False, False)
    assert pod["serviceAccountName"] == "fs-flowscope-relay"


def test_the_scan_reads_a_method_path_as_its_resource() -> None:
    methods = api_methods()
    assert methods["list_pod_for_all_namespaces"] == ("", "pods")
    assert methods["list_namespaced_endpoint_slice"] == ("discovery.k8s.io", "endpointslices")
    assert methods["read_namespaced_pod"] == ("", "pods")
    assert methods["list_node"] == ("", "nodes")


# ---- what the chart takes from deploy/ -------------------------------------------------------------------


def test_the_prometheus_rule_has_every_group_of_deploy_prometheus(render) -> None:
    expected = []
    for path in sorted((ROOT / "deploy" / "prometheus").glob("*.yml")):
        content = yaml.safe_load(path.read_text()) or {}
        if "groups" in content and "tests" not in content:
            expected += content["groups"]
    rules = [d for d in render("everything") if d["kind"] == "PrometheusRule"]
    assert [r["spec"]["groups"] for r in rules] == ([expected] if expected else [])


def test_the_dashboards_are_shipped_whole_per_folder(render) -> None:
    expected = {
        folder.name: {p.name: p.read_text() for p in folder.glob("*.json")}
        for folder in (ROOT / "deploy" / "grafana").iterdir()
        if folder.is_dir() and any(folder.glob("*.json"))
    }
    assert "clickhouse" in expected
    maps = [d for d in render("everything") if d["kind"] == "ConfigMap" and "-dashboards-" in d["metadata"]["name"]]
    shipped = {m["metadata"]["annotations"]["grafana_folder"].removeprefix("flowscope-"): m["data"] for m in maps}
    assert shipped == expected
    assert {m["metadata"]["labels"]["grafana_dashboard"] for m in maps} == {"1"}


# ---- probes, scratch space, certificates, service accounts ------------------------------------------------


def test_the_startup_probe_waits_startup_seconds(render) -> None:
    probe = find(render("defaults"), "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert (probe["periodSeconds"], probe["failureThreshold"]) == (5, 60)  # 300 s to compile and load the probes
    probe = find(render("everything"), "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert (probe["periodSeconds"], probe["failureThreshold"]) == (5, 121)  # 603 s, rounded up to a period


TLS_KEYS = ("ca.crt", "tls.crt", "tls.key", "client.crt", "client.key", "relay.crt", "relay.key")


def tls_secret(namespace: str, keys: tuple[str, ...] = TLS_KEYS) -> dict[str, Any]:
    data = {key: base64.b64encode(f"kept {key}".encode()).decode() for key in keys}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fs-flowscope-tls", "namespace": namespace},
            "type": "Opaque", "data": data}  # fmt: skip


def test_an_upgrade_keeps_the_certificates_of_the_existing_secret(render) -> None:
    existing = tls_secret("flowscope")
    secret = find(render("discovery", cluster=[existing]), "Secret", "-tls")
    assert secret["data"] == existing["data"]  # the same CA: agents and relays of both revisions trust each other
    fresh = [find(render("discovery"), "Secret", "-tls")["data"] for _ in range(2)]
    assert fresh[0]["ca.crt"] != fresh[1]["ca.crt"]  # without a Secret (install, helm template): a new CA
    assert sorted(fresh[0]) == sorted(TLS_KEYS)


def test_an_incomplete_or_foreign_secret_is_not_kept(render) -> None:
    # an earlier chart's Secret had no relay.crt and relay.key: it is made anew, relay certificate and all
    for existing in (tls_secret("flowscope", TLS_KEYS[:3]), tls_secret("flowscope", TLS_KEYS[:5]),
                     tls_secret("elsewhere")):  # fmt: skip
        data = find(render("discovery", cluster=[existing]), "Secret", "-tls")["data"]
        assert sorted(data) == sorted(TLS_KEYS)
        assert not {base64.b64decode(value) for value in data.values()} & {f"kept {k}".encode() for k in TLS_KEYS}


def test_the_agent_has_a_writable_tmp_on_its_read_only_root(render) -> None:
    pod = find(render("defaults"), "DaemonSet")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert [v for v in pod["volumes"] if v["name"] == "tmp"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]
    assert container["securityContext"]["seccompProfile"] == {"type": "Unconfined"}  # values.yaml says why
    pod = find(render("everything"), "DaemonSet")["spec"]["template"]["spec"]
    tmp = {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "128Mi"}}
    assert [v for v in pod["volumes"] if v["name"] == "tmp"] == [tmp]


def test_every_helm_install_of_the_readme_names_the_image_and_an_existing_value_set() -> None:
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    commands = [line.split() for line in text.splitlines() if line.startswith("helm install ")]
    assert len(commands) == 3  # flow log only, + Prometheus, + ClickHouse
    for argv in commands:
        settings = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
        files = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-f"]
        assert "image.repository=REGISTRY/flowscope" in settings, argv  # the chart's default is a local name
        assert len(files) == 1 and (ROOT / files[0]).is_file(), argv


# ---- the relay's API and /metrics: TLS unless a value says plaintext ---------------------------------------


def openssl(*args: str, stdin: str = "") -> str:
    result = subprocess.run(["openssl", *args], input=stdin, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


RELAY_SOCKETS = {"socket": "/run/flowscope/flowscope.sock", "hubble_socket": "/run/flowscope/hubble.sock"}


def test_the_relay_serves_its_api_over_tls_by_default(render, tmp_path: Path) -> None:
    docs = render("discovery")
    relay = yaml.safe_load(config_files(docs)["relay.yaml"])
    assert relay["grpc"] == {
        "address": "0.0.0.0:4245", **RELAY_SOCKETS,
        "tls_cert": "/etc/flowscope/relay-tls/tls.crt", "tls_key": "/etc/flowscope/relay-tls/tls.key",
    }  # fmt: skip
    pod = find(docs, "Deployment", "-relay")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["server-tls"] == {"name": "server-tls", "mountPath": "/etc/flowscope/relay-tls", "readOnly": True}
    volume = next(v for v in pod["volumes"] if v["name"] == "server-tls")
    assert volume["secret"] == {
        "secretName": "fs-flowscope-tls", "defaultMode": 0o440,
        "items": [{"key": "relay.crt", "path": "tls.crt"}, {"key": "relay.key", "path": "tls.key"}],
    }  # fmt: skip
    # the relay's certificate: the Service's names, signed by the CA the agents' and the clients' trust
    data = {k: base64.b64decode(v).decode() for k, v in find(docs, "Secret", "-tls")["data"].items()}
    assert sorted(data) == sorted(TLS_KEYS)
    assert openssl("x509", "-noout", "-ext", "subjectAltName", stdin=data["relay.crt"]).split("\n")[1].strip() == (
        "DNS:fs-flowscope-relay.flowscope.svc, DNS:fs-flowscope-relay.flowscope.svc.cluster.local, "
        "DNS:fs-flowscope-relay.flowscope, DNS:fs-flowscope-relay"
    )
    service = find(docs, "Service", "-relay")
    assert (service["metadata"]["name"], service["metadata"]["namespace"]) == ("fs-flowscope-relay", "flowscope")
    assert openssl("x509", "-noout", "-subject", "-nameopt", "RFC2253", stdin=data["relay.crt"]) == (
        "subject=CN=fs-flowscope-relay.flowscope.svc\n"
    )
    (tmp_path / "ca.crt").write_text(data["ca.crt"])
    verified = openssl("verify", "-CAfile", str(tmp_path / "ca.crt"), "-purpose", "sslserver", stdin=data["relay.crt"])
    assert verified == "stdin: OK\n"
    modulus = [openssl(kind, "-noout", "-modulus", stdin=data[key]) for kind, key in
               (("x509", "relay.crt"), ("rsa", "relay.key"))]  # fmt: skip
    assert modulus[0] == modulus[1]


def test_the_relay_serves_plaintext_only_when_a_value_says_so(render) -> None:
    docs = render("relay-plaintext")
    relay = yaml.safe_load(config_files(docs)["relay.yaml"])
    assert relay["grpc"] == {"address": "0.0.0.0:4245", **RELAY_SOCKETS, "plaintext_anywhere": True}
    pod = find(docs, "Deployment", "-relay")["spec"]["template"]["spec"]
    assert "server-tls" not in {v["name"] for v in pod["volumes"]}
    assert "server-tls" not in {m["name"] for m in pod["containers"][0]["volumeMounts"]}


def test_the_relay_takes_its_certificate_from_a_secret_of_yours(render) -> None:
    docs = render("relay-own-cert")
    relay = yaml.safe_load(config_files(docs)["relay.yaml"])
    assert relay["grpc"] == {
        "address": "0.0.0.0:4245", **RELAY_SOCKETS, "tls_cert": "/etc/flowscope/relay-tls/tls.crt",
        "tls_key": "/etc/flowscope/relay-tls/tls.key", "tls_client_ca": "/etc/flowscope/tls/ca.crt",
    }  # fmt: skip
    assert [d for d in docs if d["kind"] == "Secret"] == []  # both Secrets are the operator's
    volumes = {v["name"]: v for v in find(docs, "Deployment", "-relay")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["server-tls"]["secret"] == {
        "secretName": "relay-cert", "defaultMode": 0o440,
        "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}],
    }  # fmt: skip
    assert volumes["tls"]["secret"]["secretName"] == "agent-certs"


def test_metrics_are_plaintext_unless_metrics_tls_is_enabled(render) -> None:
    agent = yaml.safe_load(config_files(render("prometheus"))["agent.yaml"])
    assert agent["metrics"] == {"address": "0.0.0.0:9464", "plaintext_anywhere": True}  # values.yaml says why
    docs = render("metrics-tls")
    agent = yaml.safe_load(config_files(docs)["agent.yaml"])
    assert agent["metrics"] == {
        "address": "0.0.0.0:9464", "tls_cert": "/etc/flowscope/tls/tls.crt", "tls_key": "/etc/flowscope/tls/tls.key",
    }  # fmt: skip
    assert "grpc" not in agent  # no relay, no agent.grpc.tcp: the flow API stays on the node's sockets
    pod = find(docs, "DaemonSet", "-agent")["spec"]["template"]["spec"]
    assert {"name": "tls", "mountPath": "/etc/flowscope/tls", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert next(v for v in pod["volumes"] if v["name"] == "tls")["secret"]["secretName"] == "fs-flowscope-tls"
    assert sorted(find(docs, "Secret", "-tls")["data"]) == sorted(TLS_KEYS)
    scrape = {"scheme": "https", "tlsConfig": {"ca": {"secret": {"name": "fs-flowscope-tls", "key": "ca.crt"}},
                                               "serverName": "agent.fs-flowscope.flowscope"}}  # fmt: skip
    service_monitor = find(docs, "ServiceMonitor")["spec"]["endpoints"][0]
    pod_monitor = find(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]
    for endpoint in (service_monitor, pod_monitor):
        assert {key: endpoint.get(key) for key in scrape} == scrape
    plain = find(render("everything"), "PodMonitor")["spec"]["podMetricsEndpoints"][0]
    assert ("scheme" in plain, "tlsConfig" in plain) == (False, False)


def test_the_readme_and_the_notes_reach_the_default_relay_over_tls(render, tmp_path: Path) -> None:
    """The README's and NOTES.txt's lines through the relay (release and namespace flowscope, as the README
    installs it) give the CA of the chart's Secret and a name the relay's certificate carries."""
    values = tmp_path / "relay.yaml"
    values.write_text(yaml.safe_dump({"relay": {"enabled": True}}))
    docs = manifests(render_text(render.binary, values, name="flowscope"))
    secret = find(docs, "Secret", "-tls")
    relay_cert = base64.b64decode(secret["data"]["relay.crt"]).decode()
    sans = openssl("x509", "-noout", "-ext", "subjectAltName", stdin=relay_cert).split("\n")[1]
    names = {name.strip().removeprefix("DNS:") for name in sans.split(",")}
    notes = render_text(render.binary, values, name="flowscope", notes=True)
    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")
    for text in (notes, readme):
        lines = [line.split() for line in text.splitlines() if "observe --server 127.0.0.1:4245" in line]
        commands = [argv[argv.index("observe") - 1 :] for argv in lines]
        assert [argv[0] for argv in commands] == ["flowscope", "hubble"]
        for argv, ca_flag in zip(commands, ("--tls-ca", "--tls-ca-cert-files"), strict=True):
            assert argv[argv.index(ca_flag) + 1] == "ca.crt", argv
            assert argv[argv.index("--tls-server-name") + 1] == "flowscope-relay.flowscope.svc", argv
        assert "--tls" in commands[1]  # hubble's CLI wants it besides the CA
        assert "flowscope-relay.flowscope.svc" in names
        [fetch] = [line.split() for line in text.splitlines() if "get secret" in line]
        fetch = fetch[fetch.index("kubectl") :]
        assert fetch[:6] == ["kubectl", "-n", "flowscope", "get", "secret", secret["metadata"]["name"]], fetch
        assert fetch[6:] == ["-o", "jsonpath='{.data.ca\\.crt}'", "|", "base64", "-d", ">", "ca.crt"], fetch
        forward = [line.split() for line in text.splitlines() if "port-forward" in line]
        assert [argv[argv.index("kubectl") :] for argv in forward] == [
            ["kubectl", "-n", "flowscope", "port-forward", "svc/flowscope-relay", "4245:4245"]
        ]
        service = find(docs, "Service", "-relay")
        assert (service["metadata"]["name"], service["spec"]["ports"][0]["port"]) == ("flowscope-relay", 4245)

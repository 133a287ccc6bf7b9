"""The Helm chart in k8s/, rendered by Helm's own engine (helm-python-sdk), checked for the rules
that no schema sees: selectors, DNS names, probes, Guaranteed QoS, the peer list, non-root."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest

helm = pytest.importorskip("helm_python")
yaml = pytest.importorskip("yaml")

from tools import k8s  # noqa: E402

CHART = Path(__file__).resolve().parents[2] / "k8s"
NS = "llm-prod"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # RFC 1123, at most 63
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # Service names
PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # IANA_SVC_NAME, at most 15
TLS_CURVE = {"tls": {"enabled": True}, "curve": {"enabled": True}}
AUTH = {"auth": {"internalToken": {"enabled": True}, "apiKeys": {"enabled": True}}}
# (release, values): the sizes the issue names, plus mTLS + CURVE, hostPath and a long name.
CASES = [("r", {"tp": tp}) for tp in (1, 2, 3, 8)] + [
    ("prod", {"tp": 3, **TLS_CURVE, **AUTH, "image": {"repository": "reg/cpumesh", "tag": "v1",
                                              "pullSecrets": ["pull"]}}),
    ("edge", {"tp": 2, "model": {"dir": "Qwen2.5-72B", "volume": {"type": "hostPath",
                                                                 "hostPath": "/srv/models"}},
              "shard": {"antiAffinity": "preferred", "nodeSelector": {"cpu": "xeon"}}}),
    ("a-very-long-release-name-for-a-tensor-parallel-group", {"tp": 12}),
]


@cache
def _render(release: str, values_json: str) -> tuple[dict[str, Any], ...]:
    return tuple(k8s.render_manifests(CHART, json.loads(values_json), release, NS))


def render(release: str = "r", values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return list(_render(release, json.dumps(values or {}, sort_keys=True)))


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


def argv(objs: list[dict[str, Any]], workload: dict[str, Any], rank: int = 0) -> list[str]:
    """The container's command line as the kubelet expands it: ConfigMap env (envFrom), then
    env (downward API resolved for pod `rank`), then $(VAR) in the arguments."""
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    configmaps = {c["metadata"]["name"]: c["data"] for c in by_kind(objs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])

    def expand(s: str) -> str:
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), s)

    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"])
            continue
        ref = var["valueFrom"]
        if "resourceFieldRef" in ref:
            assert ref["resourceFieldRef"]["resource"] == "limits.cpu"
            env[var["name"]] = container["resources"]["limits"]["cpu"]
        else:
            assert ref["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
            env[var["name"]] = str(rank)
    return [expand(a) for a in container["args"]]


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} in {args}"
    return args[args.index(name) + 1]


def test_helm_lint_passes_for_every_case():
    for _, values in CASES:
        report = helm.lint(str(CHART), values, strict=True, namespace=NS)
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize(("release", "values"), CASES, ids=[f"{r}-tp{v['tp']}" for r, v in CASES])
class TestRenderedRules:
    def test_names_are_dns_labels(self, release, values):
        objs = render(release, values)
        for o in objs:
            name = o["metadata"]["name"]
            assert DNS_LABEL.match(name) and len(name) <= 63, name
            if o["kind"] == "Service":
                assert DNS_1035.match(name), name
        for w in workloads(objs):
            pod = w["spec"]["template"]["spec"]
            if w["kind"] == "StatefulSet":  # pod names and the controller-revision-hash label
                last = f"{w['metadata']['name']}-{values['tp'] - 1}"
                assert DNS_LABEL.match(last) and len(last) <= 63
                assert len(w["metadata"]["name"]) + 11 <= 63
            for c in pod["containers"]:
                assert DNS_LABEL.match(c["name"])
                for p in c["ports"]:
                    assert PORT_NAME.match(p["name"]) and len(p["name"]) <= 15
            for v in pod["volumes"]:
                assert DNS_LABEL.match(v["name"])
            for label in w["spec"]["template"]["metadata"]["labels"].values():
                assert re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]", label)
                assert len(label) <= 63

    def test_selectors_match_pod_labels(self, release, values):
        objs = render(release, values)
        pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"]
                for w in workloads(objs)}

        def selected(selector: dict[str, str]) -> list[str]:
            return [n for n, labels in pods.items()
                    if all(labels.get(k) == v for k, v in selector.items())]

        for w in workloads(objs):
            assert selected(w["spec"]["selector"]["matchLabels"]) == [w["metadata"]["name"]]
        for svc in by_kind(objs, "Service"):
            # The router's HTTP API has a Service of its own: <router>-http.
            assert selected(svc["spec"]["selector"]) == [
                svc["metadata"]["name"].removesuffix("-http")]
        for pdb in by_kind(objs, "PodDisruptionBudget"):
            assert selected(pdb["spec"]["selector"]["matchLabels"]) == [pdb["metadata"]["name"]]
        (sts,) = by_kind(objs, "StatefulSet")
        affinity = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        preferred = affinity.get("preferredDuringSchedulingIgnoredDuringExecution", [])
        terms = affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or [
            t["podAffinityTerm"] for t in preferred]
        assert [t["topologyKey"] for t in terms] == ["kubernetes.io/hostname"]
        assert selected(terms[0]["labelSelector"]["matchLabels"]) == [sts["metadata"]["name"]]

    def test_every_container_has_grpc_probes_on_an_integer_port(self, release, values):
        objs = render(release, values)
        tls = values.get("tls", {}).get("enabled", False)
        for w in workloads(objs):
            (c,) = w["spec"]["template"]["spec"]["containers"]
            ports = {p["containerPort"] for p in c["ports"]}
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c[kind]["grpc"]
                assert isinstance(probe["port"], int) and probe["port"] in ports
                assert probe["port"] == (50052 if tls else 50051)
            # Liveness never depends on peers: the "liveness" service, not "" (readiness).
            assert c["livenessProbe"]["grpc"]["service"] == "liveness"
            assert c["startupProbe"]["grpc"]["service"] == "liveness"
            assert c["readinessProbe"]["grpc"].get("service", "") == ""
            if w["kind"] == "StatefulSet":  # weight loading: 20 minutes by default
                startup = c["startupProbe"]
                assert startup["periodSeconds"] * startup["failureThreshold"] >= 1200
            if tls:
                assert flag(argv(objs, w), "--health-listen") == "0.0.0.0:50052"
            else:
                assert "--health-listen" not in argv(objs, w)

    def test_guaranteed_qos_and_threads_from_the_cpu_limit(self, release, values):
        objs = render(release, values)
        for w in workloads(objs):
            (c,) = w["spec"]["template"]["spec"]["containers"]
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            assert requests == limits and set(requests) == {"cpu", "memory"}
            assert re.fullmatch(r"[1-9][0-9]*", requests["cpu"])  # whole CPUs
        (sts,) = by_kind(objs, "StatefulSet")
        assert flag(argv(objs, sts), "--threads") == "8"
        (c,) = sts["spec"]["template"]["spec"]["containers"]
        assert flag(c["args"], "--threads") == "$(CPUMESH_THREADS)"

    def test_peer_list_has_tp_entries_that_resolve_to_the_headless_service(self, release, values):
        objs = render(release, values)
        tp = values["tp"]
        (sts,) = by_kind(objs, "StatefulSet")
        headless = [s for s in by_kind(objs, "Service") if s["spec"].get("clusterIP") == "None"]
        assert [s["metadata"]["name"] for s in headless] == [sts["spec"]["serviceName"]]
        assert headless[0]["spec"]["publishNotReadyAddresses"] is True
        name, svc = sts["metadata"]["name"], sts["spec"]["serviceName"]
        assert sts["spec"]["replicas"] == tp
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        assert sts["spec"]["updateStrategy"] == {"type": "OnDelete"}
        expected = [f"{name}-{rank}.{svc}.{NS}.svc.cluster.local" for rank in range(tp)]
        for rank in range(tp):
            args = argv(objs, sts, rank)
            peers = flag(args, "--peers").split(",")
            assert peers == [f"{host}:5555" for host in expected]
            assert flag(args, "--tp-size") == str(tp) and flag(args, "--tp-rank") == "auto"
        (router,) = [d for d in by_kind(objs, "Deployment") if d["metadata"]["name"].endswith(
            "-router")]
        assert flag(argv(objs, router), "--shards").split(",") == [f"{h}:50051" for h in expected]

    def test_no_container_runs_as_root(self, release, values):
        for w in workloads(render(release, values)):
            pod = w["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] > 0
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["automountServiceAccountToken"] is False
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["runAsNonRoot"] is True and sc.get("runAsUser", 1) > 0
                assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["capabilities"] == {"drop": ["ALL"]}

    def test_weights_are_read_only_and_secrets_mounted(self, release, values):
        objs = render(release, values)
        for w in workloads(objs):
            pod = w["spec"]["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
            assert set(mounts) == set(volumes)
            if "models" in volumes:
                assert mounts["models"]["readOnly"] is True
                claim = volumes["models"].get("persistentVolumeClaim")
                assert claim is None or claim["readOnly"] is True
            if values.get("tls", {}).get("enabled"):
                assert volumes["tls"]["secret"]["secretName"] == "cpumesh-tls"
        (sts,) = by_kind(objs, "StatefulSet")
        args = argv(objs, sts, rank=values["tp"] - 1)
        model_dir = values.get("model", {}).get("dir", "SmolLM2-135M-Instruct")
        assert flag(args, "--model-dir") == f"/models/{model_dir}"
        if values.get("curve", {}).get("enabled"):
            key = f"/etc/cpumesh/curve/secret/shard-{values['tp'] - 1}.key_secret"
            assert flag(args, "--curve-secret-key") == key
            assert flag(args, "--curve-public-keys") == "/etc/cpumesh/curve/public"


def test_shard_command_line_is_exactly_the_contract():
    objs = render("r", {"tp": 2})
    (sts,) = by_kind(objs, "StatefulSet")
    host = "r-cpumesh-shard-{}.r-cpumesh-shard.llm-prod.svc.cluster.local"
    assert argv(objs, sts) == [
        "shard", "--model-dir", "/models/SmolLM2-135M-Instruct", "--tp-size", "2",
        "--tp-rank", "auto", "--peers", f"{host.format(0)}:5555,{host.format(1)}:5555",
        "--listen", "0.0.0.0:50051", "--threads", "8", "--dtype", "bfloat16",
        "--kv-capacity-tokens", "32768"]
    deployments = {d["metadata"]["name"]: d for d in by_kind(objs, "Deployment")}
    tokenizer, router = deployments["r-cpumesh-tokenizer"], deployments["r-cpumesh-router"]
    assert argv(objs, tokenizer) == [
        "tokenizer", "--model-dir", "/models/SmolLM2-135M-Instruct", "--listen", "0.0.0.0:50051"]
    assert argv(objs, router) == [
        "router", "--listen", "0.0.0.0:50051", "--http-listen", "0.0.0.0:8000", "--tokenizer",
        "r-cpumesh-tokenizer.llm-prod.svc.cluster.local:50051", "--shards",
        f"{host.format(0)}:50051,{host.format(1)}:50051"]


def test_group_revision_changes_with_the_shards_only():
    def revision(values: dict[str, Any]) -> str:
        (sts,) = by_kind(render("r", values), "StatefulSet")
        return sts["spec"]["template"]["metadata"]["labels"]["cpumesh.io/group-revision"]

    base = revision({"tp": 2})
    assert revision({"tp": 2, "router": {"replicas": 3}}) == base
    assert revision({"tp": 2, "tokenizer": {"replicas": 2}}) == base
    for change in ({"tp": 3}, {"tp": 2, "shard": {"dtype": "float32"}},
                   {"tp": 2, "image": {"tag": "v2"}}, {"tp": 2, "model": {"dir": "other"}}):
        assert revision(change) != base, change


def test_burstable_shards_pick_their_threads_themselves():
    objs = render("r", {"shard": {"guaranteed": False}})
    (sts,) = by_kind(objs, "StatefulSet")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert "cpu" not in c["resources"]["limits"] and flag(c["args"], "--threads") == "auto"


@pytest.mark.parametrize(("values", "message"), [
    ({"tp": 0}, "at '/tp': minimum: got 0, want 1"),
    ({"tp": "2"}, "at '/tp': got string, want integer"),
    ({"tp": 1.5}, "at '/tp': got number, want integer"),
    ({"shard": {"resources": {"cpu": -4}}}, "at '/shard/resources/cpu': minimum: got -4, want 1"),
    ({"router": {"resources": {"cpu": "500m"}}}, "at '/router/resources/cpu': got string"),
    ({"router": {"replicas": 0}}, "at '/router/replicas': minimum: got 0, want 1"),
    ({"shard": {"dtype": "int2"}}, "at '/shard/dtype'"),
    ({"model": {"volume": {"type": "nfs"}}}, "at '/model/volume/type'"),
    ({"shards": 2}, "additional properties 'shards' not allowed"),
])
def test_schema_rejects_bad_values_with_a_clear_message(values, message):
    with pytest.raises(k8s.InvalidArgument, match=re.escape(message)):
        k8s.render_manifests(CHART, values, "r", NS)


def test_render_subcommand_writes_the_manifests(tmp_path, capsys):
    import argparse

    values = tmp_path / "v.yaml"
    values.write_text("tp: 3\nshard:\n  resources:\n    cpu: 16\n    memory: 64Gi\n")
    parser = argparse.ArgumentParser()
    k8s.add_arguments(parser)
    args = parser.parse_args(["render", "-f", str(values), "--set", "shard.dtype=float32",
                              "--release", "r", "-n", NS, "-o", str(tmp_path / "out.yaml")])
    assert k8s.run(args) == 0
    objs = [o for o in yaml.safe_load_all((tmp_path / "out.yaml").read_text()) if o]
    assert objs[0]["kind"] == "ConfigMap" and objs[-1]["kind"] == "StatefulSet"
    (sts,) = by_kind(objs, "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    assert flag(argv(objs, sts), "--threads") == "16"
    assert flag(argv(objs, sts), "--dtype") == "float32"

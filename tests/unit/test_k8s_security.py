"""Who may reach what in the chart (SECURITY.md), rendered by Helm's engine: NetworkPolicies that
admit the shards' and tokenizer's gRPC only from router pods and the mesh only from shard pods;
the router's HTTP API on a Service of its own, HTTPS with TLS; the internal token
and API keys mounted from Secrets and passed to exactly the services that take them. Strict
schema validation of these objects is in test_k8s_validate.py (CASES include auth)."""

from __future__ import annotations

import re
from typing import Any

import pytest

pytest.importorskip("helm_python")

from tests.unit.test_k8s_chart import CASES, CHART, argv, by_kind, render, workloads
from tools import k8s

AUTH = {"auth": {"internalToken": {"enabled": True, "secretName": "internal"},
                 "apiKeys": {"enabled": True, "secretName": "keys"}}}


def component(w: dict[str, Any]) -> str:
    return w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def selects(selector: dict[str, Any], objs: list[dict[str, Any]]) -> list[str]:
    """The components whose pods `selector` (a LabelSelector) matches."""
    labels = selector["matchLabels"]
    return sorted(component(w) for w in workloads(objs)
                  if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v
                         for k, v in labels.items()))


def admitted(objs: list[dict[str, Any]], target: str, port: int) -> list[str] | None:
    """Who the policies let reach `port` of `target`'s pods: component names, or None for
    anyone (a rule without `from`)."""
    (policy,) = [p for p in by_kind(objs, "NetworkPolicy")
                 if selects(p["spec"]["podSelector"], objs) == [target]]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    sources: set[str] = set()
    for rule in policy["spec"]["ingress"]:
        if not any(p["port"] <= port <= p.get("endPort", p["port"]) for p in rule["ports"]):
            continue
        if "from" not in rule:
            return None
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}  # no namespace or IP blocks
            sources.update(selects(peer["podSelector"], objs))
    return sorted(sources)


@pytest.mark.parametrize(("release", "values"), CASES, ids=[f"{r}-tp{v['tp']}" for r, v in CASES])
def test_only_the_router_reaches_internal_grpc_and_only_shards_the_mesh(release, values):
    objs = render(release, values)
    assert len(by_kind(objs, "NetworkPolicy")) == 3
    tls = values.get("tls", {}).get("enabled", False)
    for target in ("shard", "tokenizer"):
        assert admitted(objs, target, 50051) == ["router"]  # not even another shard
    # The plaintext health port (with TLS) is open to probes; without TLS nothing listens there.
    assert admitted(objs, "tokenizer", 50052) == (None if tls else [])
    assert admitted(objs, "shard", 50052) == (None if tls else ["shard"])
    # The mesh port and the tcp mesh's data links (ports the kernel picks): shards only.
    for port in (5555, 1, 40000, 50050, 50053, 65535):
        assert admitted(objs, "shard", port) == ["shard"], port
    assert admitted(objs, "tokenizer", 5555) == []
    assert admitted(objs, "router", 50051) is None
    assert admitted(objs, "router", 8000) is None  # the HTTP API (HTTPS with TLS)


def test_the_http_api_has_its_own_service_and_is_https_with_tls():
    def router_view(values: dict[str, Any]) -> tuple[dict[str, list[str]], list[str],
                                                     dict[str, str]]:
        objs = render("r", values)
        services = {s["metadata"]["name"]: [(p["name"], p.get("appProtocol"))
                                            for p in s["spec"]["ports"]]
                    for s in by_kind(objs, "Service")}
        (router,) = [w for w in workloads(objs) if component(w) == "router"]
        return services, argv(objs, router), router["spec"]["template"]["metadata"]["annotations"]

    services, args, notes = router_view({})
    assert services["r-cpumesh-router"] == [("grpc", "grpc")]
    assert services["r-cpumesh-router-http"] == [("http", "http")]
    assert args[args.index("--http-listen") + 1] == "0.0.0.0:8000"
    assert "--tls-cert" not in args and notes["prometheus.io/scheme"] == "http"

    # With TLS the router serves HTTPS on the same port, from the same certificate flags as gRPC.
    for enabled in (True, "auto"):
        services, args, notes = router_view({"tls": {"enabled": True},
                                             "router": {"http": {"enabled": enabled}}})
        assert services["r-cpumesh-router-http"] == [("https", "https")]
        assert args[args.index("--http-listen") + 1] == "0.0.0.0:8000"
        assert {"--tls-cert", "--tls-key", "--tls-ca"} <= set(args)
        assert notes["prometheus.io/scheme"] == "https"
        assert services["r-cpumesh-router"] == [("grpc", "grpc")]

    objs = render("r", {"tls": {"enabled": True}, "router": {"http": {
        "enabled": True, "service": {"type": "LoadBalancer"}}}})
    types = {s["metadata"]["name"]: s["spec"].get("type") for s in by_kind(objs, "Service")}
    assert types["r-cpumesh-router-http"] == "LoadBalancer"
    assert types["r-cpumesh-router"] == "ClusterIP"

    services, args, notes = router_view({"router": {"http": {"enabled": False}}})
    assert "r-cpumesh-router-http" not in services and "--http-listen" not in args
    assert "prometheus.io/scheme" not in notes


def mounted_file(w: dict[str, Any], path: str) -> tuple[str, str]:
    """The (Secret name, key) that the file at `path` in `w`'s container comes from."""
    pod = w["spec"]["template"]["spec"]
    for mount in pod["containers"][0]["volumeMounts"]:
        prefix = mount["mountPath"] + "/"
        if path.startswith(prefix):
            assert mount["readOnly"] is True
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            (item,) = [i for i in volume["secret"]["items"] if i["path"] == path[len(prefix):]]
            return volume["secret"]["secretName"], item["key"]
    raise AssertionError(f"{path} is not mounted in {w['metadata']['name']}")


def test_internal_token_on_every_service_and_api_keys_on_the_router():
    objs = render("r", {"tp": 2, **AUTH})
    seen = []
    for w in workloads(objs):
        args = argv(objs, w)
        token = args[args.index("--internal-token-file") + 1]
        assert mounted_file(w, token) == ("internal", "token")
        if component(w) == "router":
            keys = args[args.index("--api-keys-file") + 1]
            assert mounted_file(w, keys) == ("keys", "keys")
        else:
            assert "--api-keys-file" not in args
        seen.append(component(w))
    assert sorted(seen) == ["router", "shard", "tokenizer"]
    plain = render("r", {"tp": 2})
    for w in workloads(plain):  # off by default
        assert not {"--internal-token-file", "--api-keys-file"} & set(argv(plain, w))


def test_network_policies_can_be_turned_off():
    assert by_kind(render("r", {"networkPolicy": {"enabled": False}}), "NetworkPolicy") == []


@pytest.mark.parametrize(("values", "message"), [
    ({"router": {"http": {"enabled": "yes"}}}, "at '/router/http/enabled'"),
    ({"networkPolicy": {"enabled": 1}}, "at '/networkPolicy/enabled'"),
    ({"auth": {"apiKeys": {"enabled": True, "secretName": "Bad_Name"}}},
     "at '/auth/apiKeys/secretName'"),
    ({"auth": {"tokens": {}}}, "additional properties 'tokens' not allowed"),
])
def test_schema_rejects_bad_security_values(values, message):
    with pytest.raises(k8s.InvalidArgument, match=re.escape(message)):
        k8s.render_manifests(CHART, values, "r", "ns")

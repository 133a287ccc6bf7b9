"""`cpumesh k8s apply|status` against kmock's in-memory Kubernetes API emulator.

The official `kubernetes` client talks HTTP to kmock's `KubernetesEmulator` (objects stored in
memory, served on list/get/patch/delete). kmock validates nothing and runs no controllers, so
this file adds the least a real cluster would do for these code paths: server-side apply
creates missing objects, list honours equality label selectors, and a toy controller creates
StatefulSet pods (one node each) that become ready only when every rank runs the same revision
(the mesh rule), and rolls Deployments out.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

kmock = pytest.importorskip("kmock")
pytest.importorskip("kubernetes")
pytest.importorskip("helm_python")

from services.errors import DeadlineExceeded, FailedPrecondition  # noqa: E402
from tools import k8s  # noqa: E402

NS = "llm"
PODS = kmock.resource("", "v1", "pods")
STS = kmock.resource("apps", "v1", "statefulsets")
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
SERVICES = kmock.resource("", "v1", "services")
REVISION = "cpumesh.io/group-revision"


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator, plus: apply creates a missing object; list filters by label selector."""

    async def _handle(self, request: Any) -> Any:
        content_type = request.headers.get("Content-Type", "")
        if (request.method == "PATCH" and request.name and "apply-patch" in content_type):
            key = (request.resource, request.namespace, request.name)
            if key not in self.objects:
                self.objects[key] = request.data
            elif self.objects[key].deleted:
                self.objects[key].create(request.data)
        return await super()._handle(request)

    async def _serve_list(self, request: Any) -> Any:
        payload = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            wanted = dict(term.split("=", 1) for term in selector.split(","))
            payload["items"] = [
                o for o in payload["items"]
                if all(o.get("metadata", {}).get("labels", {}).get(k) == v
                       for k, v in wanted.items())]
        return payload


class Controller:
    """Toy StatefulSet and Deployment controllers and kubelet, ticking in the server's loop."""

    def __init__(self, api: ApiServer) -> None:
        self.api, self.ages, self.mixed_ready = api, {}, False
        self.pods_ready = True  # False: pods start but never pass readiness
        self.paused = False  # True: no background ticks

    def live(self, resource: Any) -> list[tuple[Any, Any]]:
        """(key, plain dict) of every live object of a resource; write back with `put`."""
        return [(key, copy.deepcopy(self.api.objects[key].raw)) for key in list(self.api.objects)
                if key[0] == resource and not self.api.objects[key].deleted]

    def put(self, key: Any, field: str, value: Any) -> None:
        self.api.objects[key][field] = value

    def tick(self) -> None:
        for sts_key, sts in self.live(STS):
            _, ns, name = sts_key
            template = sts["spec"]["template"]
            replicas = sts["spec"]["replicas"]
            for rank in range(replicas):
                pod = (PODS, ns, f"{name}-{rank}")
                if pod not in self.api.objects or self.api.objects[pod].deleted:
                    self.api.objects[pod] = {
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": pod[2], "namespace": ns,
                                     "labels": dict(template["metadata"]["labels"])},
                        "spec": {**template["spec"], "nodeName": f"node-{rank}"},
                        "status": {"phase": "Pending"}}
                    self.ages[pod] = 0
            pods = [(key, obj) for key, obj in self.live(PODS) if key[1:] in
                    {(ns, f"{name}-{r}") for r in range(replicas)}]
            for key, _ in pods:
                self.ages[key] = self.ages.get(key, 0) + 1
            # DNS: a peer resolves only if the headless Service selects its pod. The mesh is
            # whole when every rank resolves and is up (age >= 4).
            svc = dict(self.live(SERVICES)).get((SERVICES, ns, sts["spec"]["serviceName"]))
            selector = svc["spec"]["selector"] if svc else {}
            whole = len(pods) == replicas and all(
                self.ages[key] >= 4 and all(obj["metadata"]["labels"].get(k) == v
                                            for k, v in selector.items())
                for key, obj in pods)
            for key, obj in pods:
                age = self.ages[key]
                ready = self.pods_ready and whole and age >= 6
                obj["status"] = status = {
                    "phase": "Running" if age >= 2 else "Pending",
                    "conditions": [{"type": "Ready", "status": str(ready)}],
                    "containerStatuses": [{
                        "name": "shard", "image": "i", "imageID": "", "restartCount": 0,
                        "ready": ready, "started": age >= 4}]}
                self.put(key, "status", status)
            ready_revisions = {obj["metadata"]["labels"][REVISION] for _, obj in pods
                               if obj["status"]["containerStatuses"][0]["ready"]}
            self.mixed_ready |= len(ready_revisions) > 1
            self.put(sts_key, "status", {"replicas": len(pods), "readyReplicas": sum(
                o["status"]["containerStatuses"][0]["ready"] for _, o in pods)})
        for dep_key, dep in self.live(DEPLOYMENTS):
            n = dep["spec"]["replicas"]
            self.put(dep_key, "status", {"replicas": n, "updatedReplicas": n, "readyReplicas": n,
                             "availableReplicas": n})

    async def run(self) -> None:
        while True:
            if not self.paused:
                self.tick()
            await asyncio.sleep(0.01)


class Cluster:
    def __init__(self, box: dict[str, Any], kubeconfig: Path) -> None:
        self.api, self.controller, self.loop = box["api"], box["controller"], box["loop"]
        self.kubeconfig = kubeconfig

    def in_loop(self, fn: Any) -> None:
        """Run `fn()` in the server's thread, between two requests."""
        async def call() -> None:
            fn()
        asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def cli(self, *argv: str, environ: dict[str, str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog="cpumesh k8s")
        k8s.add_arguments(parser)
        args = parser.parse_args(argv)
        args.environ = {"KUBECONFIG": str(self.kubeconfig)} if environ is None else environ
        return k8s.run(args)

    def shard_pods(self) -> dict[str, Any]:
        return {key[2]: obj for key, obj in self.controller.live(PODS)}

    def requests(self, method: str, path_part: str) -> list[Any]:
        return [r for r in list(self.api) if r.method == method and path_part in r.url.path]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    loop = asyncio.new_event_loop()
    ready, box = threading.Event(), {}

    async def serve() -> None:
        async with ApiServer() as api, kmock.Server(api) as server:
            for plural, kind in (("v1/pods", "Pod"), ("apps/v1/statefulsets", "StatefulSet"),
                                 ("apps/v1/deployments", "Deployment")):
                api.resources[plural] = kmock.ResourceInfo(kind=kind, namespaced=True)
            controller = Controller(api)
            task = asyncio.create_task(controller.run())
            box.update(api=api, url=str(server.url), controller=controller,
                       stop=asyncio.Event(), loop=loop)
            ready.set()
            await box["stop"].wait()
            task.cancel()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10), "kmock did not start"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: kmock, cluster: {{server: "{box['url'].rstrip('/')}"}}}}]
users: [{{name: tester, user: {{token: t0k3n}}}}]
contexts: [{{name: kmock, context: {{cluster: kmock, user: tester, namespace: {NS}}}}}]
current-context: kmock
""")
    yield Cluster(box, kubeconfig)
    loop.call_soon_threadsafe(box["stop"].set)
    thread.join(10)
    loop.close()


FAST = ("--poll", "0.02", "--timeout", "20")


def test_apply_server_side_applies_and_waits_until_the_group_is_ready(cluster, capsys):
    assert cluster.cli("apply", "--release", "r", "--set", "tp=3", *FAST) == 0
    out = capsys.readouterr().out
    for name in ("ConfigMap/r-cpumesh-config", "Service/r-cpumesh-shard",
                 "StatefulSet/r-cpumesh-shard", "Deployment/r-cpumesh-router",
                 "PodDisruptionBudget/r-cpumesh-shard", "NetworkPolicy/r-cpumesh-shard",
                 "Service/r-cpumesh-router-http"):
        assert f"applied {name}" in out
    assert "shards 0/3 joined" in out and "ready: 3 shards at revision" in out
    patches = cluster.requests("PATCH", f"/namespaces/{NS}/")
    # 1 ConfigMap, 3 NetworkPolicies, 4 Services, 3 PDBs, 2 Deployments, 1 StatefulSet
    assert len(patches) == 14
    for r in patches:  # server-side apply, our field manager, conflicts taken over
        assert r.headers["Content-Type"] == "application/apply-patch+yaml"
        assert r.params == {"fieldManager": "cpumesh", "force": "true"}
    pods = cluster.shard_pods()
    assert sorted(pods) == [f"r-cpumesh-shard-{i}" for i in range(3)]
    assert cluster.requests("DELETE", "/pods/") == []  # a first install replaces nothing


def test_a_changed_group_is_replaced_whole_and_never_runs_mixed(cluster, capsys):
    assert cluster.cli("apply", "--release", "r", *FAST) == 0
    old = {name: pod["metadata"]["labels"][REVISION] for name, pod in cluster.shard_pods().items()}
    assert len(set(old.values())) == 1
    # Same values again: nothing to replace.
    assert cluster.cli("apply", "--release", "r", *FAST) == 0
    assert cluster.requests("DELETE", "/pods/") == []
    capsys.readouterr()

    assert cluster.cli("apply", "--release", "r", "--set", "shard.dtype=float32", *FAST) == 0
    out = capsys.readouterr().out
    assert "replacing the shard group as a whole: deleting 2 pod(s)" in out
    deleted = sorted(r.url.path.rsplit("/", 1)[1] for r in cluster.requests("DELETE", "/pods/"))
    assert deleted == sorted(old)
    new = {pod["metadata"]["labels"][REVISION] for pod in cluster.shard_pods().values()}
    assert len(new) == 1 and new != set(old.values())
    assert not cluster.controller.mixed_ready


def test_status_shows_rank_node_readiness_and_mesh_state(cluster, capsys):
    assert cluster.cli("status", "--release", "r") == 1
    assert "no shard group in namespace llm" in capsys.readouterr().out

    assert cluster.cli("apply", "--release", "r", "--set", "tp=2", *FAST) == 0
    capsys.readouterr()
    assert cluster.cli("status", "--release", "r") == 0
    lines = capsys.readouterr().out.splitlines()
    assert "2/2 ranks joined" in lines[0] and "mesh whole" in lines[0]
    assert lines[1].split() == ["RANK", "POD", "NODE", "READY", "MESH", "RESTARTS"]
    assert [line.split() for line in lines[2:]] == [
        ["0", "r-cpumesh-shard-0", "node-0", "yes", "joined", "0"],
        ["1", "r-cpumesh-shard-1", "node-1", "yes", "joined", "0"]]

    def lose_rank_1() -> None:  # its pod is gone and not yet rescheduled: rank 0 waits
        cluster.controller.paused = True
        del cluster.api.objects[PODS, NS, "r-cpumesh-shard-1"]
        cluster.controller.tick()

    cluster.in_loop(lose_rank_1)
    assert cluster.cli("status", "--release", "r", "-n", NS) == 1
    out = capsys.readouterr().out
    assert "mesh incomplete" in out
    assert [line.split()[4] for line in out.splitlines()[2:]] == ["waiting", "pending"]


def test_apply_gives_up_at_its_timeout_with_the_last_progress(cluster):
    cluster.controller.pods_ready = False
    with pytest.raises(DeadlineExceeded, match=r"not ready after 0 s: shards 0/1 joined"):
        cluster.cli("apply", "--release", "r", "--set", "tp=1", "--poll", "0.02",
                    "--timeout", "0.3")


def test_a_missing_kube_context_is_a_clear_error(cluster, tmp_path):
    with pytest.raises(FailedPrecondition, match="no kube context named 'nope'"):
        cluster.cli("status", "--context", "nope")
    with pytest.raises(FailedPrecondition, match="no usable kube context"):
        cluster.cli("status", environ={"KUBECONFIG": str(tmp_path / "absent")})

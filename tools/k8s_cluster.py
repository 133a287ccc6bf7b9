"""The cluster side of `cpumesh k8s`: server-side apply, whole-group replacement, readiness.

Only the official `kubernetes` client is used, imported inside the functions.

A shard group is one StatefulSet (rank = pod ordinal) with `updateStrategy: OnDelete`, so the
controller never replaces its pods one at a time. Every shard pod carries the group revision
(`cpumesh.io/group-revision`, a hash of everything the shards depend on). After applying, `apply`
deletes every pod whose revision is not the applied one, all at once; with
`podManagementPolicy: Parallel` the controller recreates every rank together at the new revision.
The headless Service selects only the current revision, so pods of two revisions never find each
other and a mixed group can never form a mesh.

Mesh state of one rank, as the API shows it (the readiness probe is "weights loaded, mesh whole,
warm-up done"; startup and liveness only "process alive"):
    missing      no pod for this rank
    terminating  being deleted
    stale        running an older revision; `apply` replaces it
    pending      not running yet (scheduling, pulling the image)
    starting     running, its gRPC server not up yet (typically loading weights)
    waiting      alive, not ready: waiting for peers to join the mesh, or warming up
    joined       ready: weights loaded and the mesh whole
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from services.errors import CpumeshError, DeadlineExceeded, FailedPrecondition, Unavailable

FIELD_MANAGER = "cpumesh"
REVISION_LABEL = "cpumesh.io/group-revision"
_TIMEOUT = 30  # seconds for one API call
# kind -> (API class, method) for a server-side apply of one namespaced object
_APPLY = {
    "ConfigMap": ("CoreV1Api", "patch_namespaced_config_map"),
    "Secret": ("CoreV1Api", "patch_namespaced_secret"),
    "Service": ("CoreV1Api", "patch_namespaced_service"),
    "NetworkPolicy": ("NetworkingV1Api", "patch_namespaced_network_policy"),
    "PodDisruptionBudget": ("PolicyV1Api", "patch_namespaced_pod_disruption_budget"),
    "Deployment": ("AppsV1Api", "patch_namespaced_deployment"),
    "StatefulSet": ("AppsV1Api", "patch_namespaced_stateful_set"),
}


@dataclass(frozen=True)
class ShardPod:
    rank: int
    name: str
    node: str
    phase: str
    started: bool
    ready: bool
    revision: str
    restarts: int
    terminating: bool


@dataclass(frozen=True)
class Group:
    """One release's shard group as the API shows it."""

    name: str  # the StatefulSet's; "" when there is none
    namespace: str
    tp: int
    revision: str
    shards: dict[int, ShardPod] = field(default_factory=dict)

    def mesh_state(self, rank: int) -> str:
        pod = self.shards.get(rank)
        if pod is None:
            return "missing"
        if pod.terminating:
            return "terminating"
        if pod.revision != self.revision:
            return "stale"
        if pod.phase != "Running":
            return "pending"
        if pod.ready:
            return "joined"
        return "waiting" if pod.started else "starting"

    @property
    def joined(self) -> int:
        return sum(self.mesh_state(rank) == "joined" for rank in range(self.tp))

    @property
    def ready(self) -> bool:
        return bool(self.name) and self.tp > 0 and self.joined == self.tp


def connect(kubeconfig: Path | None, context: str | None) -> tuple[Any, str]:
    """An ApiClient for the kube context, and that context's namespace (else "default")."""
    try:
        from kubernetes import config
    except ImportError as e:
        raise FailedPrecondition("`cpumesh k8s` needs the kubernetes client (the optional "
                                 "extra: pip install 'cpumesh[k8s]')") from e
    path = str(kubeconfig) if kubeconfig else None
    try:
        contexts, active = config.list_kube_config_contexts(config_file=path)
        chosen = next((c for c in contexts if c["name"] == context), None) if context else active
        if chosen is None:
            raise FailedPrecondition(f"no kube context named {context!r}")
        api = config.new_client_from_config(config_file=path, context=context)
    except (config.ConfigException, OSError) as e:
        raise FailedPrecondition(f"no usable kube context: {e}") from e
    return api, chosen.get("context", {}).get("namespace") or "default"


def _api_error(what: str, e: Exception) -> CpumeshError:
    message = getattr(e, "reason", None) or str(e)
    with contextlib.suppress(ValueError, AttributeError):
        message = json.loads(getattr(e, "body", "") or "{}").get("message") or message
    return Unavailable(f"{what}: {getattr(e, 'status', '')} {message}".replace("  ", " "))


def _call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, _request_timeout=_TIMEOUT, **kwargs)
    except (ApiException, HTTPError) as e:
        raise _api_error(what, e) from e


def apply_object(api: Any, obj: dict[str, Any], namespace: str) -> Any:
    """Server-side-apply one object (field manager "cpumesh", taking over conflicting fields)."""
    from kubernetes import client

    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind not in _APPLY:
        raise FailedPrecondition(f"cpumesh k8s cannot apply a {kind}")
    api_class, method = _APPLY[kind]
    patch = getattr(getattr(client, api_class)(api), method)
    return _call(f"apply {kind}/{name}", patch, name, namespace, obj, field_manager=FIELD_MANAGER,
                 force=True, _content_type="application/apply-patch+yaml")


def _selector(release: str, component: str) -> str:
    return f"app.kubernetes.io/instance={release},app.kubernetes.io/component={component}"


def read_group(api: Any, release: str, namespace: str) -> Group:
    from kubernetes import client

    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    selector = _selector(release, "shard")
    sets = _call("list StatefulSets", apps.list_namespaced_stateful_set, namespace,
                 label_selector=selector).items
    if not sets:
        return Group(name="", namespace=namespace, tp=0, revision="")
    sts = sets[0]
    name = sts.metadata.name
    labels = (sts.spec.template.metadata.labels or {}) if sts.spec.template.metadata else {}
    pods = _call("list shard pods", core.list_namespaced_pod, namespace,
                 label_selector=selector).items
    shards = {}
    for pod in pods:
        match = re.fullmatch(rf"{re.escape(name)}-(\d+)", pod.metadata.name)
        if match:
            shards[int(match.group(1))] = _shard_pod(int(match.group(1)), pod)
    return Group(name=name, namespace=namespace, tp=sts.spec.replicas or 0,
                 revision=labels.get(REVISION_LABEL, ""), shards=shards)


def _shard_pod(rank: int, pod: Any) -> ShardPod:
    status = pod.status
    containers = (status.container_statuses or []) if status else []
    conditions = (status.conditions or []) if status else []
    ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
    return ShardPod(
        rank=rank, name=pod.metadata.name, node=(pod.spec.node_name or "") if pod.spec else "",
        phase=(status.phase or "Pending") if status else "Pending",
        started=bool(containers) and all(c.started for c in containers), ready=ready,
        revision=(pod.metadata.labels or {}).get(REVISION_LABEL, ""),
        restarts=sum(c.restart_count or 0 for c in containers),
        terminating=pod.metadata.deletion_timestamp is not None)


def format_status(group: Group) -> str:
    if not group.name:
        return f"no shard group in namespace {group.namespace}\n"
    whole = "whole" if group.ready else "incomplete"
    lines = [f"shard group {group.name} in {group.namespace}: {group.joined}/{group.tp} ranks "
             f"joined, revision {group.revision}, mesh {whole}",
             f"{'RANK':<5} {'POD':<40} {'NODE':<24} {'READY':<6} {'MESH':<12} RESTARTS"]
    ranks = sorted(set(range(group.tp)) | set(group.shards))
    for rank in ranks:
        pod = group.shards.get(rank)
        extra = "" if rank < group.tp else "  (beyond tp)"
        name, node = (pod.name, pod.node or "-") if pod else ("-", "-")
        lines.append(f"{rank:<5} {name:<40} {node:<24} {'yes' if pod and pod.ready else 'no':<6} "
                     f"{group.mesh_state(rank):<12} {pod.restarts if pod else '-'}{extra}")
    return "\n".join(lines) + "\n"


def _deployment_progress(api: Any, name: str, namespace: str) -> tuple[int, int, bool]:
    """(available, wanted, rolled out) like `kubectl rollout status`."""
    from kubernetes import client

    dep = _call(f"read Deployment/{name}", client.AppsV1Api(api).read_namespaced_deployment,
                name, namespace)
    want, st = dep.spec.replicas or 0, dep.status
    available = (st.available_replicas or 0) if st else 0
    done = (st is not None and (st.observed_generation or 0) >= (dep.metadata.generation or 0)
            and (st.updated_replicas or 0) == want and available == want
            and (st.replicas or 0) == want)
    return available, want, done


def replace_stale_shards(api: Any, release: str, namespace: str, out: TextIO) -> int:
    """Delete every shard pod of another revision, all at once; return how many."""
    from kubernetes import client

    group = read_group(api, release, namespace)
    stale = [pod for pod in group.shards.values()
             if pod.revision != group.revision and not pod.terminating]
    if stale:
        print(f"replacing the shard group as a whole: deleting {len(stale)} pod(s) of an older "
              f"revision, the controller recreates them at revision {group.revision}", file=out)
    core = client.CoreV1Api(api)
    for pod in stale:
        _call(f"delete Pod/{pod.name}", core.delete_namespaced_pod, pod.name, namespace)
    return len(stale)


def _wait_observed(api: Any, name: str, namespace: str, generation: int | None,
                   deadline: float, poll: float, clock: Callable[[], float],
                   sleep: Callable[[float], None]) -> None:
    """Wait until the StatefulSet controller has seen the applied spec (else it would recreate
    deleted pods from the old one)."""
    from kubernetes import client

    apps = client.AppsV1Api(api)
    while generation is not None:
        sts = _call(f"read StatefulSet/{name}", apps.read_namespaced_stateful_set, name, namespace)
        if sts.status is not None and (sts.status.observed_generation or 0) >= generation:
            return
        if clock() > deadline:
            raise DeadlineExceeded(f"StatefulSet {name} did not observe generation {generation}")
        sleep(poll)


def apply(api: Any, objs: Sequence[dict[str, Any]], namespace: str, *, out: TextIO,
          wait: bool = True, timeout: float = 1800.0, poll: float = 2.0,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> None:
    """Apply the objects, replace a changed shard group whole, and wait until all are ready."""
    start = clock()
    deadline = start + timeout
    release, sts_name, deployments = "", "", []
    for obj in objs:
        applied = apply_object(api, obj, namespace)
        print(f"applied {obj['kind']}/{obj['metadata']['name']}", file=out)
        if obj["kind"] == "StatefulSet":
            release = obj["metadata"]["labels"]["app.kubernetes.io/instance"]
            sts_name = obj["metadata"]["name"]
            generation = applied.metadata.generation if applied.metadata else None
            _wait_observed(api, sts_name, namespace, generation, deadline, poll, clock, sleep)
        elif obj["kind"] == "Deployment":
            deployments.append(obj["metadata"]["name"])
    if not sts_name:
        raise FailedPrecondition("the rendered manifests hold no shard StatefulSet")
    replace_stale_shards(api, release, namespace, out)
    if not wait:
        return
    last = ""
    while True:
        group = read_group(api, release, namespace)
        progress = [_deployment_progress(api, name, namespace) for name in deployments]
        states = ", ".join(f"{rank}:{group.mesh_state(rank)}" for rank in range(group.tp))
        line = f"shards {group.joined}/{group.tp} joined ({states})" + "".join(
            f"; {name} {avail}/{want} available"
            for name, (avail, want, _) in zip(deployments, progress, strict=True))
        if line != last:
            print(f"[{clock() - start:5.0f}s] {line}", file=out, flush=True)
            last = line
        if group.ready and all(done for _, _, done in progress):
            print(f"ready: {group.tp} shards at revision {group.revision}, mesh whole", file=out)
            return
        if clock() > deadline:
            raise DeadlineExceeded(f"not ready after {timeout:.0f} s: {line}")
        sleep(poll)

"""`cpumesh k8s render|apply|status`: the Helm chart in k8s/, rendered, applied and watched.

    render  write the manifests for given values (Helm's own engine, from helm-python-sdk);
    apply   server-side-apply them to the current kube context, replace a shard group whose
            revision changed as a whole, and wait until every component is ready;
    status  show each shard's rank, node, readiness and mesh state.

helm-python-sdk, the `kubernetes` client and PyYAML are the optional extra "k8s"; they are
imported inside the functions that use them, never at import of this module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from services.errors import FailedPrecondition, InvalidArgument

DEFAULT_CHART = Path(__file__).resolve().parent.parent / "k8s"
DEFAULT_RELEASE = "cpumesh"
# Apply order: what others refer to first.
KIND_ORDER = ("ConfigMap", "NetworkPolicy", "Service", "PodDisruptionBudget", "Deployment",
              "StatefulSet")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `render`, `apply` and `status` under the `k8s` subcommand."""
    sub = parser.add_subparsers(dest="k8s_command", metavar="ACTION", required=True)
    render = sub.add_parser("render", help="write the manifests for given values")
    apply = sub.add_parser(
        "apply", help="server-side-apply the manifests and wait until the group is ready")
    status = sub.add_parser(
        "status", help="show each shard's rank, node, readiness and mesh state; exit 1 unless "
        "the group is ready")
    for p in (render, apply):
        p.add_argument("--chart", type=Path, default=DEFAULT_CHART,
                       help="the chart directory (default: %(default)s)")
        p.add_argument("-f", "--values", type=Path, action="append", default=[],
                       metavar="FILE", help="a YAML values file (repeatable; later ones win)")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="a value, as helm --set (repeatable; wins over files)")
    for p in (render, apply, status):
        p.add_argument("--release", default=DEFAULT_RELEASE,
                       help="the release name (default: %(default)s)")
        p.add_argument("-n", "--namespace", default=None,
                       help="namespace (default: the kube context's, else 'default')")
    render.add_argument("-o", "--output", type=Path, default=None,
                        help="write to this file instead of standard output")
    for p in (apply, status):
        p.add_argument("--kubeconfig", type=Path, default=None,
                       help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")
        p.add_argument("--context", default=None, help="kube context (default: the current one)")
    apply.add_argument("--timeout", type=float, default=1800.0,
                       help="seconds to wait for readiness (default: %(default)s)")
    apply.add_argument("--poll", type=float, default=2.0,
                       help="seconds between progress checks (default: %(default)s)")
    apply.add_argument("--no-wait", action="store_true", help="apply and return at once")


def run(args: argparse.Namespace) -> int:
    """Run one of render, apply, status; return the exit status."""
    out: TextIO = sys.stdout
    environ: Mapping[str, str] = getattr(args, "environ", None) or {}
    if args.k8s_command == "render":
        namespace = args.namespace or "default"
        values = load_values(args.values, args.sets)
        text = dump_manifests(render_manifests(args.chart, values, args.release, namespace))
        if args.output is None:
            out.write(text)
        else:
            args.output.write_text(text)
            print(f"wrote {args.output}", file=out)
        return 0

    from tools import k8s_cluster

    kubeconfig = args.kubeconfig or _first_path(environ.get("KUBECONFIG"))
    api, context_namespace = k8s_cluster.connect(kubeconfig, args.context)
    namespace = args.namespace or context_namespace
    with api:
        if args.k8s_command == "apply":
            values = load_values(args.values, args.sets)
            objs = render_manifests(args.chart, values, args.release, namespace)
            k8s_cluster.apply(api, objs, namespace, out=out, wait=not args.no_wait,
                              timeout=args.timeout, poll=args.poll)
            return 0
        group = k8s_cluster.read_group(api, args.release, namespace)
        out.write(k8s_cluster.format_status(group))
        return 0 if group.ready else 1


# The CLI registry's names for the same two functions (services/cli.py).
cli_arguments = add_arguments
cli_run = run


def _first_path(kubeconfig_env: str | None) -> Path | None:
    """KUBECONFIG may list several files; the client reads one, so take the first."""
    first = (kubeconfig_env or "").split(":")[0]
    return Path(first) if first else None


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise FailedPrecondition(
            f"`cpumesh k8s` needs {module.split('.')[0]} (the optional extra: "
            "pip install 'cpumesh[k8s]')") from e


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` merged into a copy of `base`, recursively for dicts (Helm's rule for -f)."""
    merged = dict(base)
    for key, value in override.items():
        old = merged.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            merged[key] = deep_merge(old, value)
        else:
            merged[key] = value
    return merged


def load_values(files: Iterable[Path], sets: Iterable[str]) -> dict[str, Any]:
    """User values: YAML files in order, then --set strings, each merged over the last."""
    helm = _require("helm_python")
    values: dict[str, Any] = {}
    for path in files:
        try:
            layer = helm.values_from_yaml(path.read_text())
        except helm.HelmError as e:
            raise InvalidArgument(f"values file {path}: {e}") from e
        values = deep_merge(values, layer or {})
    for item in sets:
        try:
            values = deep_merge(values, helm.parse_set_string(item))
        except helm.HelmError as e:
            raise InvalidArgument(f"--set {item!r}: {e}") from e
    return values


def render_manifests(
    chart_dir: Path, values: Mapping[str, Any], release: str, namespace: str
) -> list[dict[str, Any]]:
    """Render the chart with Helm's engine (values checked against values.schema.json).

    Returns the objects in apply order; raises InvalidArgument with Helm's message on bad values.
    """
    helm = _require("helm_python")
    yaml = _require("yaml")
    if not (chart_dir / "Chart.yaml").is_file():
        raise InvalidArgument(f"no Helm chart at {chart_dir} (pass --chart DIR)")
    try:
        helm.validate_release_name(release)
        with helm.Chart.load(str(chart_dir)) as chart:
            rendered = chart.render(dict(values), name=release, namespace=namespace,
                                    is_install=True)
    except helm.HelmError as e:
        raise InvalidArgument(str(e).strip()) from e
    objs = [doc for path, text in sorted(rendered.items()) if path.endswith((".yaml", ".yml"))
            for doc in yaml.safe_load_all(text) if doc]
    rank = {kind: i for i, kind in enumerate(KIND_ORDER)}
    return sorted(objs, key=lambda o: (rank.get(o["kind"], len(rank)), o["metadata"]["name"]))


def dump_manifests(objs: Sequence[Mapping[str, Any]]) -> str:
    """A multi-document YAML stream, as `kubectl apply -f` reads it."""
    yaml = _require("yaml")
    return yaml.safe_dump_all([dict(o) for o in objs], sort_keys=False, explicit_start=True)

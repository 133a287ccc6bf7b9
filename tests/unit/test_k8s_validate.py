"""Every rendered manifest against the official schemas (kubernetes-validate, strict: unknown
fields are errors) of the oldest and newest Kubernetes the chart supports."""

from __future__ import annotations

import json
import re

import pytest

kv = pytest.importorskip("kubernetes_validate")
pytest.importorskip("helm_python")

from tests.unit.test_k8s_chart import CASES, CHART, render  # noqa: E402

# The chart's README names these two; Chart.yaml's kubeVersion starts at the oldest.
OLDEST, NEWEST = "1.28.0", "1.37.0"


def test_supported_versions_are_the_ones_the_chart_declares():
    assert re.search(r'^kubeVersion: ">=1\.28\.0-0"$', (CHART / "Chart.yaml").read_text(), re.M)
    readme = (CHART / "README.md").read_text()
    assert "1.28" in readme and "1.37" in readme
    assert kv.utils.latest_version().startswith(NEWEST.rsplit(".", 1)[0])


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_every_manifest_passes_strict_validation(version):
    seen: set[str] = set()
    for release, values in CASES:
        for obj in render(release, values):
            key = json.dumps(obj, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {path}: "
                            f"{e.message}")


def test_strict_validation_catches_what_we_rely_on():
    """A named port in a gRPC probe and a misspelled field both fail (the checker works)."""
    (sts,) = [o for o in render("r", {"tp": 2}) if o["kind"] == "StatefulSet"]
    bad = json.loads(json.dumps(sts))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, NEWEST, strict=True)
    bad = json.loads(json.dumps(sts))
    bad["spec"]["podManagmentPolicy"] = "Parallel"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, OLDEST, strict=True)

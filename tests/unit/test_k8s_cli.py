"""`cpumesh k8s` through the installed console script, as a user runs it, and the one limit on
`tp` that the chart and the shards share."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("helm_python")

CPUMESH = Path(sys.executable).parent / "cpumesh"
SCHEMA = Path(__file__).resolve().parents[2] / "k8s" / "values.schema.json"


def cpumesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CPUMESH), *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_k8s_is_a_command_of_the_console_script() -> None:
    top = cpumesh("--help")
    assert top.returncode == 0, top.stderr
    assert "k8s" in top.stdout.split("options:")[0]
    run = cpumesh("k8s", "--help")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: cpumesh k8s")
    for action in ("render", "apply", "status"):
        assert action in run.stdout


def test_k8s_render_writes_a_group_of_the_given_size() -> None:
    run = cpumesh("k8s", "render", "--set", "tp=2")
    assert run.returncode == 0, run.stderr
    objs = [o for o in yaml.safe_load_all(run.stdout) if o]
    (sts,) = [o for o in objs if o["kind"] == "StatefulSet"]
    assert sts["spec"]["replicas"] == 2
    (config,) = [o for o in objs if o["kind"] == "ConfigMap"]
    assert len(config["data"]["CPUMESH_PEERS"].split(",")) == 2


def test_the_schema_allows_exactly_the_tp_sizes_a_shard_accepts() -> None:
    from shard_svc.mesh.config import MAX_TP_SIZE

    tp = json.loads(SCHEMA.read_text())["properties"]["tp"]
    assert (tp["minimum"], tp["maximum"]) == (1, MAX_TP_SIZE)


def test_k8s_render_refuses_a_tp_no_shard_accepts() -> None:
    run = cpumesh("k8s", "render", "--set", "tp=32")
    assert run.returncode != 0
    assert run.stdout == ""
    assert run.stderr.startswith("cpumesh k8s: error:")
    assert "'/tp': maximum: got 32, want 16" in run.stderr
    assert "Traceback" not in run.stderr

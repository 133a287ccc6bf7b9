"""The Dockerfile the chart's image comes from, and its dependency locks (no container engine
runs here, so these are static checks)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

packaging = pytest.importorskip("packaging.requirements")

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "k8s" / "image"
REGENERATE = "run `.venv/bin/python k8s/image/lock.py > k8s/image/requirements.lock`"


def stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split by FROM."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    result: list[list[str]] = []
    for line in lines:
        if line.startswith("FROM "):
            result.append([])
        if result:
            result[-1].append(line)
    return result


def lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (LOCKS / name).read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*==[0-9][^\s]*", line), line
            name_, version = line.split("==")
            pins[name_] = version
    return pins


def test_dockerfile_is_multi_stage_non_root_with_the_cpumesh_entrypoint():
    build, runtime = stages()
    assert build[0].endswith(" AS build") and runtime[0].endswith(" AS runtime")
    (user,) = [line for line in runtime if line.startswith("USER ")]
    uid, gid = user.split()[1].split(":")
    assert int(uid) > 0 and int(gid) > 0
    values = (ROOT / "k8s" / "values.yaml").read_text()
    assert f"runAsUser: {uid}" in values and f"runAsGroup: {gid}" in values
    assert json.loads(next(line for line in runtime if line.startswith("ENTRYPOINT "))[11:]) == [
        "cpumesh"]
    # The runtime stage takes only the installed virtualenv from the build stage.
    assert [line for line in runtime if line.startswith("COPY ")] == [
        "COPY --from=build /opt/cpumesh /opt/cpumesh"]
    installs = " ".join(line for line in build if "pip install" in line)
    assert "-r requirements.lock" in installs and "--no-deps" in installs
    # shards build their C++ kernels and inductor its compiled steps at start: a compiler, and
    # the ninja that torch's extension builder runs
    assert any(re.search(r"apt-get install .*\bg\+\+", line) for line in runtime)
    assert "ninja" in lock("requirements.lock")


def test_dockerignore_keeps_the_locks_and_drops_the_virtualenv():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".git", ".venv", "k8s", "!k8s/image/requirements.lock",
            "!k8s/image/build.lock"} <= set(ignore)


def test_the_lock_pins_every_runtime_dependency_within_its_range():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = lock("requirements.lock")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in k8s/image/requirements.lock: {REGENERATE}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} does not satisfy {req}: {REGENERATE}")
    assert pins["torch"].endswith("+cpu")  # never the CUDA build
    assert "grpcio-tools" in lock("build.lock")

"""The chart's serving options (issues 17 and 18): shard.dtype, kernels, kvCacheMb, kvDtype and
prefixCache, router.kvReservation and defaultMaxNewTokens. Each reaches its container as the
binary's own flag; default values pass none (the manifests of a chart without these values); bad
values are refused at render, naming the key; and every value the schema allows is parsed by the
binaries' own command lines, whose choices the schema lists exactly."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("helm_python")
yaml = pytest.importorskip("yaml")

from services.cli import build_parser, subcommand  # noqa: E402
from tests.unit.test_k8s_chart import CHART, argv, by_kind, flag, render  # noqa: E402

CPUMESH = Path(sys.executable).parent / "cpumesh"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
# (component, chart key) -> the binary's flag
FLAGS = {("shard", "dtype"): "--dtype", ("shard", "kernels"): "--kernels",
         ("shard", "kvDtype"): "--kv-dtype", ("shard", "prefixCache"): "--prefix-cache",
         ("router", "kvReservation"): "--kv-reservation"}
SERVING_FLAGS = ("--kernels", "--kv-dtype", "--prefix-cache", "--kv-cache-mb",
                 "--kv-reservation", "--default-max-new-tokens")


def parse(args: list[str]) -> argparse.Namespace:
    """A rendered command line (`shard ...`, `router ...`) through the `cpumesh` parser."""
    return build_parser(subcommand(args[0]), args[0]).parse_args(args)


def action(component: str, option: str) -> argparse.Action:
    """The flag `option` of `cpumesh <component>` as its parser declares it."""
    p = argparse.ArgumentParser()
    subcommand(component).add_arguments(p)
    (found,) = [a for a in p._actions if option in a.option_strings]
    return found


def workload(objs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (w,) = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")
            and o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return w


def revision(objs: list[dict[str, Any]]) -> str:
    labels = workload(objs, "shard")["spec"]["template"]["metadata"]["labels"]
    return str(labels["cpumesh.io/group-revision"])


def test_default_values_render_the_manifests_of_a_chart_without_them():
    """Null deletes a key from the chart's defaults (Helm's rule): a chart without the serving
    values renders exactly what the defaults render, shard group revision included, so an
    upgrade with default values replaces nothing; and no serving flag is passed."""
    unset = {"shard": {"kernels": None, "kvDtype": None, "prefixCache": None, "kvCacheMb": None},
             "router": {"kvReservation": None, "defaultMaxNewTokens": None}}
    objs = render("r", {"tp": 2})
    assert render("r", {"tp": 2, **unset}) == objs
    for component in ("shard", "router"):
        args = argv(objs, workload(objs, component))
        assert not set(SERVING_FLAGS) & set(args), args
    assert flag(argv(objs, workload(objs, "shard")), "--kv-capacity-tokens") == "32768"


@pytest.mark.parametrize(("values", "component", "expected"), [
    ({"shard": {"dtype": "int8"}}, "shard", ["--dtype", "int8"]),
    ({"shard": {"dtype": "int4"}}, "shard", ["--dtype", "int4"]),
    ({"shard": {"kernels": "onednn"}}, "shard", ["--kernels", "onednn"]),
    ({"shard": {"kvDtype": "int8"}}, "shard", ["--kv-dtype", "int8"]),
    ({"shard": {"prefixCache": False}}, "shard", ["--prefix-cache", "off"]),
    ({"shard": {"prefixCache": "off"}}, "shard", ["--prefix-cache", "off"]),
    ({"shard": {"kvCacheMb": 4096}}, "shard", ["--kv-cache-mb", "4096"]),
    ({"shard": {"kvCacheMb": 0.5}}, "shard", ["--kv-cache-mb", "0.5"]),
    ({"router": {"kvReservation": "full"}}, "router", ["--kv-reservation", "full"]),
    ({"router": {"defaultMaxNewTokens": 256}}, "router", ["--default-max-new-tokens", "256"]),
])
def test_each_value_reaches_its_container_as_the_binary_flag(values, component, expected):
    base = render("r", {"tp": 2})
    objs = render("r", {"tp": 2, **values})
    args = argv(objs, workload(objs, component))
    assert flag(args, expected[0]) == expected[1]
    if component == "shard":  # the shard group is replaced as a whole when its flags change
        assert revision(objs) != revision(base)
    else:  # the router rolls by itself; the shards stay
        assert revision(objs) == revision(base)
        assert argv(objs, workload(objs, "shard")) == argv(base, workload(base, "shard"))


def test_kv_cache_mb_replaces_the_token_capacity():
    """--kv-cache-mb and --kv-capacity-tokens are mutually exclusive in the shard."""
    objs = render("r", {"tp": 2, "shard": {"kvCacheMb": 1024, "kvDtype": "int8"}})
    args = argv(objs, workload(objs, "shard"))
    assert "--kv-capacity-tokens" not in args
    parsed = parse(args)
    assert (parsed.kv_cache_mb, parsed.kv_capacity_tokens, parsed.kv_dtype) == (1024.0, None,
                                                                               "int8")
    (config,) = by_kind(objs, "ConfigMap")
    assert "CPUMESH_KV_CAPACITY_TOKENS" not in config["data"]


def test_the_values_defaults_are_the_binaries_defaults():
    shard, router = VALUES["shard"], VALUES["router"]
    assert shard["kernels"] == action("shard", "--kernels").default
    assert shard["kvDtype"] == action("shard", "--kv-dtype").default
    assert action("shard", "--prefix-cache").default == ("on" if shard["prefixCache"] else "off")
    assert shard["kvCacheMb"] is action("shard", "--kv-cache-mb").default is None
    assert router["kvReservation"] == action("router", "--kv-reservation").default
    assert router["defaultMaxNewTokens"] == action("router", "--default-max-new-tokens").default


@pytest.mark.parametrize(("component", "key"), list(FLAGS))
def test_the_schema_allows_exactly_the_binary_choices(component, key):
    allowed = SCHEMA["properties"][component]["properties"][key]["enum"]
    choices = action(component, FLAGS[component, key]).choices
    assert choices is not None
    if key == "prefixCache":  # true/false, or the flag's own words
        assert sorted(map(str, allowed)) == sorted(["True", "False", *choices])
    else:
        assert sorted(allowed) == sorted(choices)


def test_every_value_the_schema_allows_is_parsed_by_the_binaries():
    """Render with each allowed choice (several keys per render) and with numbers at the edges of
    the ranges; parse the rendered command lines with the shard's and the router's own parsers
    and build their configs (which check ranges the parsers do not)."""
    from router_svc.cli import build_config as router_config
    from shard_svc.cli import build_config as shard_config

    props = {c: SCHEMA["properties"][c]["properties"] for c in ("shard", "router")}
    enums = {(c, k): props[c][k]["enum"] for c, k in FLAGS}
    rows = max(map(len, enums.values()))
    mbs, max_new = [0.001, 0.5, 1, 65536], [props["router"]["defaultMaxNewTokens"]["minimum"],
                                            100_000]
    assert props["shard"]["kvCacheMb"]["exclusiveMinimum"] == 0
    for i in range(rows):
        values: dict[str, Any] = {"tp": 2, "shard": {"kvCacheMb": mbs[i % len(mbs)]},
                                  "router": {"defaultMaxNewTokens": max_new[i % len(max_new)]}}
        # kernels one step on, so that packed meets a float dtype and cpumesh int8 (the schema
        # refuses other pairs, as the shard does at start: tested below)
        picked = {ck: choices[(i + (ck == ("shard", "kernels"))) % len(choices)]
                  for ck, choices in enums.items()}
        for (component, key), choice in picked.items():
            values[component][key] = choice
        objs = render("r", values)
        shard_args = argv(objs, workload(objs, "shard"), rank=1)
        shard = parse(shard_args)
        shard.environ = {"HOSTNAME": "r-cpumesh-shard-1"}
        config = shard_config(shard)
        assert (config.tp_rank, config.dtype, config.kernels, config.kv_dtype) == (
            1, picked["shard", "dtype"], picked["shard", "kernels"], picked["shard", "kvDtype"])
        assert config.prefix_cache is (str(picked["shard", "prefixCache"]) in ("True", "on"))
        assert config.kv_cache_mb == pytest.approx(values["shard"]["kvCacheMb"])
        router = router_config(parse(argv(objs, workload(objs, "router"))))
        assert router.kv_reservation == picked["router", "kvReservation"]
        assert router.default_max_new_tokens == values["router"]["defaultMaxNewTokens"]


def test_manifests_with_every_serving_value_pass_strict_validation():
    kv = pytest.importorskip("kubernetes_validate")
    values = {"tp": 2, "shard": {"dtype": "int4", "kernels": "onednn", "kvCacheMb": 0.5,
                                 "kvDtype": "int8", "prefixCache": False},
              "router": {"kvReservation": "full", "defaultMaxNewTokens": 64}}
    for obj in render("r", values):
        kv.validate(obj, "1.37.0", strict=True)


@pytest.mark.parametrize(("setting", "message"), [
    ("shard.dtype=int2", "at '/shard/dtype': value must be one of"),
    ("shard.kernels=mkl", "at '/shard/kernels': value must be one of"),
    ("shard.kvDtype=int9", "at '/shard/kvDtype': value must be one of 'auto', 'int8'"),
    ("shard.prefixCache=maybe", "at '/shard/prefixCache': value must be one of"),
    ("shard.kvCacheMb=0", "at '/shard/kvCacheMb': exclusiveMinimum: got 0"),
    ("router.kvReservation=lazy", "at '/router/kvReservation': value must be one of"),
    ("router.defaultMaxNewTokens=0", "at '/router/defaultMaxNewTokens': minimum: got 0, want 1"),
    ("shard.dtype=int8,shard.kernels=packed",
     "at '/shard/kernels': value must be one of 'auto', 'aten', 'onednn', 'cpumesh', 'ipex'"),
    ("shard.dtype=bfloat16,shard.kernels=cpumesh",
     "at '/shard/dtype': value must be one of 'int8', 'int4'"),
])
def test_render_refuses_a_value_the_binary_would_refuse(setting, message):
    sets = [arg for s in setting.split(",") for arg in ("--set", s)]
    run = subprocess.run([str(CPUMESH), "k8s", "render", *sets], capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode != 0 and run.stdout == ""
    assert run.stderr.startswith("cpumesh k8s: error:")
    assert message in run.stderr
    assert "Traceback" not in run.stderr


def test_each_schema_refusal_is_one_the_binary_makes_too():
    """The refused values above are refused by the binaries as well (exit 2 from argparse, or
    the config's own check), so the schema refuses nothing a binary would run."""
    refused = [("shard", ["--dtype", "int2"]), ("shard", ["--kernels", "mkl"]),
               ("shard", ["--kv-dtype", "int9"]), ("shard", ["--prefix-cache", "maybe"]),
               ("router", ["--tokenizer", "t:1", "--kv-reservation", "lazy"])]
    for component, args in refused:
        with pytest.raises(SystemExit):
            parse([component, *args])
    from router_svc.cli import build_config as router_config
    from shard_svc.cli import build_config as shard_config

    shard = parse(["shard", "--model-dir", "/m", "--kv-cache-mb", "0"])
    shard.environ = {}
    with pytest.raises(ValueError, match="kv_cache_mb"):
        shard_config(shard)
    router = parse(["router", "--tokenizer", "t:1", "--default-max-new-tokens", "0"])
    with pytest.raises(ValueError, match="default_max_new_tokens"):
        router_config(router)


def test_the_shard_refuses_packed_kernels_with_quantized_weights_at_start():
    """The schema's rules across values (no packed with int8/int4, cpumesh with them only) are
    the shard's own start checks, which it runs on its config's dtype before loading anything
    (shard_svc/service.py)."""
    torch = pytest.importorskip("torch")
    from services.errors import InvalidArgument
    from shard_svc.kernels import check_library

    quantized = SCHEMA["properties"]["shard"]["if"]["properties"]["dtype"]["enum"]
    allowed = SCHEMA["properties"]["shard"]["then"]["properties"]["kernels"]["enum"]
    every = SCHEMA["properties"]["shard"]["properties"]["kernels"]["enum"]
    assert sorted(quantized) == ["int4", "int8"] and sorted(set(every) - set(allowed)) == [
        "packed"]
    only = SCHEMA["properties"]["shard"]["allOf"][0]
    assert only["if"]["properties"]["kernels"]["const"] == "cpumesh"
    assert sorted(only["then"]["properties"]["dtype"]["enum"]) == sorted(quantized)
    for dtype in quantized:
        with pytest.raises(InvalidArgument, match="'packed' is for float weights"):
            check_library("packed", getattr(torch, dtype))
        for kernels in set(allowed) - {"ipex"}:  # ipex: whether it is installed, tested apart
            check_library(kernels, getattr(torch, dtype))
    for dtype in ("float32", "bfloat16", "float16"):
        with pytest.raises(InvalidArgument, match="'cpumesh' is cpumesh's int8 / int4 kernel"):
            check_library("cpumesh", getattr(torch, dtype))


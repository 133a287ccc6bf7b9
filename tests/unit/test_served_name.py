"""The model's name in the router's APIs: `--served-model-name`, else the shards' model name
without the cache hash that a converted model's directory carries."""

from __future__ import annotations

import argparse

import pytest

from router_svc.cli import build_config, cli_arguments
from router_svc.config import RouterConfig, default_served_name


@pytest.mark.parametrize(("model_name", "served"), [
    ("SmolLM2-135M-Instruct-24c136db3f51", "SmolLM2-135M-Instruct"),
    ("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
    ("Qwen2.5-0.5B", "Qwen2.5-0.5B"),
    ("model-24C136DB3F51", "model-24C136DB3F51"),  # not a cache hash: those are lower case
    ("model-24c136db3f5", "model-24c136db3f5"),  # 11 digits
    ("m-24c136db3f51-x", "m-24c136db3f51-x"),  # not at the end
    ("-24c136db3f51", "-24c136db3f51"),  # nothing would be left
])
def test_the_default_drops_only_a_trailing_cache_hash(model_name: str, served: str) -> None:
    assert default_served_name(model_name) == served


def test_the_flag_reaches_the_config_and_a_blank_name_is_refused() -> None:
    parser = argparse.ArgumentParser()
    cli_arguments(parser)
    base = ["--tokenizer", "127.0.0.1:1", "--shards", "127.0.0.1:2"]
    assert build_config(parser.parse_args(base)).served_model_name is None
    named = build_config(parser.parse_args([*base, "--served-model-name", "smol"]))
    assert named.served_model_name == "smol"
    with pytest.raises(ValueError, match="served_model_name"):
        RouterConfig("127.0.0.1:1", ("127.0.0.1:2",), served_model_name=" ")

"""The KV dtype and size flags through `cpumesh shard` and `cpumesh local`: parsed into the
configs, tokens from MiB per KV dtype, sizes in tokens and in MiB refused together."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import build_parser, main, subcommand
from shard_svc.config import ShardConfig
from tools.local import LocalConfig, plan


def shard_config(argv: list[str]) -> ShardConfig:
    args = build_parser(subcommand("shard"), "shard").parse_args(["shard", *argv])
    args.environ = {}
    from shard_svc.cli import build_config
    return build_config(args)


def test_shard_flags_and_defaults(tmp_path: Path) -> None:
    base = ["--model-dir", str(tmp_path)]
    default = shard_config(base)
    assert (default.kv_dtype, default.kv_cache_mb, default.kv_capacity_tokens) == (
        "auto", None, 16384)
    assert default.kv_tokens(1000) == 16384  # the size in tokens, whatever a token costs
    cfg = shard_config([*base, "--kv-dtype", "int8", "--kv-cache-mb", "2", "--kv-page-size", "8"])
    assert (cfg.kv_dtype, cfg.kv_cache_mb) == ("int8", 2.0)
    assert cfg.kv_tokens(1000) == 2 * 2**20 // 8000 * 8  # whole pages of 8 tokens: 2096
    assert cfg.kv_tokens(10**9) == 8  # never less than one page


def test_a_size_in_tokens_and_in_mib_are_refused_together(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["shard", "--model-dir", str(tmp_path), "--kv-capacity-tokens", "64",
              "--kv-cache-mb", "1"], environ={})
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["shard", "--model-dir", str(tmp_path), "--kv-cache-mb", "0"], environ={})
    assert "kv_cache_mb must be > 0, got 0.0" in str(e.value)


def test_local_passes_the_kv_flags_to_every_shard() -> None:
    config = LocalConfig(Path("m"), "m", tp=2, port=0, http_port=0, kv_cache_mb=64.0,
                         kv_dtype="int8")
    children, _, _ = plan(config, {})
    for shard in children[1:3]:
        assert "--kv-cache-mb=64.0" in shard.args and "--kv-dtype=int8" in shard.args
    plain, _, _ = plan(LocalConfig(Path("m"), "m", tp=1, port=0, http_port=0), {})
    assert not any(a.startswith("--kv-") for a in plain[1].args)

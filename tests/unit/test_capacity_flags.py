"""The capacity flags through `cpumesh router` / `cpumesh shard`: parsed into their configs,
defaults as documented, bad values refused with one line before anything starts."""

from __future__ import annotations

import pytest

from services.cli import build_parser, main, subcommand


def parse(argv: list[str]):  # type: ignore[no-untyped-def]
    chosen = subcommand(argv[0])
    args = build_parser(chosen, argv[0]).parse_args(argv)
    args.environ = {}
    if argv[0] == "router":
        from router_svc.cli import build_config
        return build_config(args)
    from shard_svc.cli import build_config as build_shard_config
    return build_shard_config(args)


def test_router_flags_and_defaults() -> None:
    base = ["router", "--tokenizer", "127.0.0.1:1"]
    default = parse(base)
    assert (default.kv_reservation, default.default_max_new_tokens) == ("on_demand", 1024)
    old = parse([*base, "--kv-reservation", "full", "--default-max-new-tokens", "64"])
    assert (old.kv_reservation, old.default_max_new_tokens) == ("full", 64)


def test_shard_prefix_cache_flag(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = ["shard", "--model-dir", str(tmp_path)]
    assert parse(base).prefix_cache is True
    assert parse([*base, "--prefix-cache", "off"]).prefix_cache is False


@pytest.mark.parametrize(("argv", "message"), [
    (["router", "--tokenizer", "127.0.0.1:1", "--default-max-new-tokens", "0"],
     "cpumesh router: error: default_max_new_tokens must be an integer >= 1, got 0"),
])
def test_bad_values_exit_with_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv, environ={})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_an_unknown_reservation_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    with pytest.raises(SystemExit):
        main(["router", "--tokenizer", "127.0.0.1:1", "--kv-reservation", "lazy"], environ={})
    assert "invalid choice: 'lazy'" in capsys.readouterr().err

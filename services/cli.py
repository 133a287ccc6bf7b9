"""The `cpumesh` command line: one subcommand per entry in `SUBCOMMANDS`.

Each subcommand lives in its own module as two functions, `cli_arguments(parser)` to declare its
flags and `cli_run(args) -> int` to run it. To add one, add a line to `_subcommands`; modules are
imported only when the command line is built, never at import of this module.

This is the entry point: the only place that reads the process environment. It is handed to the
subcommand as `args.environ`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from services.errors import CpumeshError


class Subcommand(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# name → (module holding cli_arguments/cli_run, help). Modules are named, not imported here:
# `services` never imports a service package at module level.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("model_formats.gguf.convert",
                "convert a GGUF file into a Hugging Face model directory"),
    "prepare-default": ("model_formats.embedded",
                        "convert the embedded SmolLM2 model once into the cache; print its dir"),
    "shard": ("shard_svc.cli", "run one tensor-parallel shard (one rank of the model)"),
    "tokenizer": ("tokenizer_svc.cli", "run the tokenizer service (text <-> token ids)"),
    "router": ("router_svc.cli", "run the router: the API clients talk to (batching, sampling)"),
    "local": ("tools.local",
              "run tokenizer, shards and router on this machine until Ctrl-C (make serve)"),
    "generate": ("tools.generate", "stream one completion of a prompt from a router"),
    "chat": ("tools.generate", "chat with the model, turn by turn, through a router"),
    "loadtest": ("tools.loadtest", "load-test a router (gRPC) or an OpenAI-compatible server"),
}


def _subcommands() -> dict[str, Subcommand]:
    commands = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        commands[name] = Subcommand(help_text, module.cli_arguments, module.cli_run)
    return commands


def build_parser(subcommands: Mapping[str, Subcommand]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpumesh", description="Tensor-parallel LLM serving across CPU servers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in subcommands.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one subcommand; return its exit status. Errors print one line, never a traceback."""
    subcommands = _subcommands()
    args = build_parser(subcommands).parse_args(argv)
    args.environ = dict(os.environ if environ is None else environ)
    try:
        return subcommands[args.command].run(args)
    except (CpumeshError, OSError) as e:
        print(f"cpumesh {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cpumesh {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

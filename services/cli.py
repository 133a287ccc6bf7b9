"""The `cpumesh` command line: one subcommand per entry in `SUBCOMMANDS`.

Each subcommand lives in its own module as two functions, `cli_arguments(parser)` to declare its
flags and `cli_run(args) -> int` to run it. To add one, add a line to `_subcommands`; modules are
imported only when the command line is built, never at import of this module.

This is the entry point: the only place that reads the process environment. It is handed to the
subcommand as `args.environ`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from services.errors import CpumeshError


class Subcommand(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _subcommands() -> dict[str, Subcommand]:
    from services import embedded, gguf_convert

    return {
        "convert": Subcommand("convert a GGUF file into a Hugging Face model directory",
                              gguf_convert.cli_arguments, gguf_convert.cli_run),
        "prepare-default": Subcommand(
            "convert the embedded SmolLM2 model once into the cache; print its directory",
            embedded.cli_arguments, embedded.cli_run),
    }


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

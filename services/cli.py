"""The `cpumesh` command line: one subcommand per entry in `COMMANDS`.

Each subcommand lives in its own module as two functions, `cli_arguments(parser)` to declare its
flags and `cli_run(args) -> int` to run it. To add one, add a line to `COMMANDS`. Only the chosen
subcommand's module is imported (`cpumesh router` never loads the shard's torch); the top-level
parser, and so `cpumesh --help`, needs only the names and help texts.

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
    "k8s": ("tools.k8s", "render, apply and watch the Helm chart in k8s/ (one tensor-parallel "
            "group on Kubernetes)"),
}


# What a command's libraries read from the environment once, before its module imports them.
# Under THP_MEM_ALLOC_ENABLE torch's CPU allocator advises its allocations of 2 MiB and more into
# transparent huge pages (shard_svc/huge_pages.py places the weights and the KV cache itself;
# this catches the rest, such as a compiled graph's packed weights: the 1B bfloat16 step 73.7 ->
# 70.7, 53.2 -> 50.4, 73.9 -> 71.4 ms in alternating processes, AMD EPYC, 2 threads; RSS the
# same). An operator's own setting wins.
LIBRARY_ENVIRONMENT: dict[str, dict[str, str]] = {"shard": {"THP_MEM_ALLOC_ENABLE": "1"}}


def subcommand(name: str) -> Subcommand:
    """Import the module of the command `name` and return its two functions."""
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    return Subcommand(help_text, module.cli_arguments, module.cli_run)


def _subcommands() -> dict[str, Subcommand]:
    """Every command, each module imported (for tests that look at all of them)."""
    return {name: subcommand(name) for name in COMMANDS}


def build_parser(chosen: Subcommand | None = None, name: str | None = None
                 ) -> argparse.ArgumentParser:
    """The parser: every command by name and help text; only `chosen` (the command `name`)
    with its own flags."""
    parser = argparse.ArgumentParser(
        prog="cpumesh", description="Tensor-parallel LLM serving across CPU servers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(command, help=help_text, description=help_text)
        if chosen is not None and command == name:
            chosen.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one subcommand; return its exit status. Errors print one line, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The top level has no flags but --help, so the command is the first word, if any.
    name = argv[0] if argv and argv[0] in COMMANDS else None
    if environ is None and name is not None:  # this process's own environment
        for key, value in LIBRARY_ENVIRONMENT.get(name, {}).items():
            os.environ.setdefault(key, value)
    chosen = subcommand(name) if name is not None else None
    args = build_parser(chosen, name).parse_args(argv)
    assert chosen is not None  # parse_args exits unless a known command was given
    args.environ = dict(os.environ if environ is None else environ)
    try:
        return chosen.run(args)
    except (CpumeshError, OSError) as e:
        print(f"cpumesh {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cpumesh {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`cpumesh generate` and `cpumesh chat`: the command-line client of a router.

    cpumesh generate "Once upon a time" --max-new-tokens 64 --temperature 0
    cpumesh generate --chat "What is the capital of France?"   # one user message, chat template
    cpumesh chat --system "You answer in one sentence."         # interactive, multi-turn

Text streams to stdout as it arrives; a usage line goes to stderr (not with --quiet). With
--json, stdout carries JSON Lines: one object per streamed chunk ({"text", "token_ids"}), then
one with "done": true, the whole text, the finish reason and usage; an error is an object with
"error". In chat, /reset clears the conversation and /exit (or Ctrl-D) quits; Ctrl-C stops the
reply being streamed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_ROUTER = "127.0.0.1:50051"


def cli_arguments(p: argparse.ArgumentParser) -> None:
    chat = p.prog.split()[-1] == "chat"  # one module serves both commands
    p.add_argument("prompt", nargs=None if not chat else "?",
                   help="an optional first message" if chat else "the prompt ('-' reads stdin)")
    p.add_argument("--router", metavar="HOST:PORT",
                   help=f"the router (default: $CPUMESH_ROUTER, else {DEFAULT_ROUTER})")
    if not chat:
        p.add_argument("--chat", action="store_true",
                       help="send the prompt as one user message (with the chat template)")
    p.add_argument("--system", metavar="TEXT", help="a system message before the conversation")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="most tokens to generate")
    s.add_argument("--temperature", type=float, metavar="T", help="0 is greedy (default: 1)")
    s.add_argument("--top-k", type=int, default=0, metavar="K", help="0: no limit")
    s.add_argument("--top-p", type=float, metavar="P",
                   help="nucleus sampling, 0 < p <= 1 (default: 1)")
    s.add_argument("--seed", type=int, metavar="N", help="for reproducible sampling")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable)")
    s.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                   help="stop after this token (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    p.add_argument("--api-key-file", type=Path, metavar="FILE",
                   help="a file holding the API key for a router started with --api-keys-file "
                   "(default: $CPUMESH_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds per generation")
    p.add_argument("--json", action="store_true", help="JSON Lines on stdout")
    p.add_argument("--quiet", action="store_true", help="no usage line on stderr")


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos)


class Printer:
    """Writes a streamed generation as text or as JSON Lines."""

    def __init__(self, as_json: bool, quiet: bool) -> None:
        self.as_json, self.quiet = as_json, quiet
        self.midline = False  # text was printed without a final newline

    def chunk(self, text: str, token_ids: list[int]) -> None:
        if self.as_json:
            print(json.dumps({"text": text, "token_ids": token_ids}), flush=True)
        elif text:
            print(text, end="", flush=True)
            self.midline = not text.endswith("\n")

    def done(self, c: Any, **extra: object) -> None:
        u = c.usage
        if self.as_json:
            stop = c.stop_string if c.stop_string is not None else c.stop_token_id
            print(json.dumps({"done": True, **extra, "request_id": c.request_id,
                              "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_name, "finish_detail": c.finish_detail,
                              "stop": stop, "usage": {
                                  "prompt_tokens": u.prompt_tokens,
                                  "generated_tokens": u.generated_tokens,
                                  "time_to_first_token_s": round(u.time_to_first_token_s, 4),
                                  "total_s": round(u.total_s, 4)}}), flush=True)
            return
        print(flush=True)
        self.midline = False
        if not self.quiet:
            decode_s = u.total_s - u.time_to_first_token_s
            rate = (f", {(u.generated_tokens - 1) / decode_s:.1f} tokens/s"
                    if u.generated_tokens > 1 and decode_s > 0 else "")
            print(f"[{c.finish_name}: {c.finish_detail}; {u.prompt_tokens} prompt + "
                  f"{u.generated_tokens} generated tokens in {u.total_s:.2f} s, first after "
                  f"{u.time_to_first_token_s:.2f} s{rate}]", file=sys.stderr, flush=True)

    def error(self, command: str, router: str, e: Any) -> None:
        code, details = e.code().name, e.details() or ""
        if self.as_json:
            print(json.dumps({"error": {"code": code, "message": details}}), flush=True)
        hint = (f" (is a router running at {router}? `make serve` starts one)"
                if code == "UNAVAILABLE" and "connect" in details.lower() else "")
        print(f"{chr(10) if self.midline else ''}cpumesh {command}: error: {code}: {details}{hint}",
              file=sys.stderr, flush=True)
        self.midline = False


async def stream(client: Any, out: Printer, prompt: str | None,
                 messages: list[tuple[str, str]] | None, params: dict[str, Any],
                 timeout: float, parts: list[str] | None = None) -> Any:
    """One generation streamed to `out`; returns the joined Completion. `parts` collects the
    text as it arrives, so an interrupted caller keeps what was shown."""
    from tools.client import Completion

    done = Completion()
    async for r in client.generate(prompt, messages=messages, timeout=timeout, **params):
        out.chunk(r.text, list(r.token_ids))
        done.add(r)
        if parts is not None:
            parts.append(r.text)
    return done


async def generate(args: argparse.Namespace, router: str, out: Printer) -> int:
    import grpc

    from tools.client import RouterClient

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise SystemExit("cpumesh generate: error: give a prompt (or '-' to read stdin)")
    messages = None
    if args.chat or args.system:
        messages = [*([("system", args.system)] if args.system else []), ("user", prompt)]
    async with RouterClient(router, api_key=args.api_key) as client:
        try:
            done = await stream(client, out, None if messages else prompt, messages,
                                sampling(args), args.timeout)
        except grpc.aio.AioRpcError as e:
            out.error("generate", router, e)
            return 1
    out.done(done)
    return 0


def chat(args: argparse.Namespace, router: str, out: Printer) -> int:
    import grpc

    from tools.client import RouterClient

    system = [("system", args.system)] if args.system else []
    messages, pending, failed = list(system), args.prompt, False
    interactive = sys.stdin.isatty() and not args.json
    if interactive:
        print(f"chatting through {router}: /reset clears the conversation, /exit or Ctrl-D "
              "quits, Ctrl-C stops a reply", file=sys.stderr)
    with asyncio.Runner() as runner:
        client = runner.run(_open(RouterClient, router, args.api_key))
        try:
            while True:
                if pending is not None:
                    line, pending = pending, None
                else:
                    try:
                        line = input("you> " if interactive else "")
                    except (EOFError, KeyboardInterrupt):
                        break
                line = line.strip()
                if line in ("/exit", "/quit"):
                    break
                if line == "/reset":
                    messages = list(system)
                    continue
                if not line:
                    continue
                messages.append(("user", line))
                parts: list[str] = []
                try:
                    done = runner.run(stream(client, out, None, messages, sampling(args),
                                             args.timeout, parts))
                except KeyboardInterrupt:
                    print("\n[stopped]", file=sys.stderr, flush=True)
                    done = None
                except grpc.aio.AioRpcError as e:
                    out.error("chat", router, e)
                    messages.pop()
                    failed = True
                    continue
                if done is not None:
                    out.done(done, turn=sum(r == "user" for r, _ in messages))
                reply = done.text if done is not None else "".join(parts)
                if reply:
                    messages.append(("assistant", reply))
                else:
                    messages.pop()
        finally:
            runner.run(client.close())
    return 1 if failed else 0


async def _open(client_class: Any, router: str, api_key: str | None) -> Any:
    # created inside the runner's loop, which it then belongs to
    return client_class(router, api_key=api_key)


def cli_run(args: argparse.Namespace) -> int:
    router = args.router or args.environ.get("CPUMESH_ROUTER") or DEFAULT_ROUTER
    args.api_key = (args.api_key_file.read_text().strip() if args.api_key_file
                    else args.environ.get("CPUMESH_API_KEY")) or None
    out = Printer(args.json, args.quiet)
    if args.command == "chat":
        return chat(args, router, out)
    return asyncio.run(generate(args, router, out))

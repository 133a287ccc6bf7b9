"""`cpumesh loadtest`: a bounded asyncio load generator for a cpumesh router or any
OpenAI-compatible HTTP server.

    cpumesh loadtest grpc://127.0.0.1:50051 --users 16 --requests 200 --duration 60
    cpumesh loadtest http://127.0.0.1:8000 --rate 2.5 --prompt-tokens 16:128 --output-tokens 64

Closed loop (`--users N`): N users, each sends its next request when the last one ends. Open
loop (`--rate R`): Poisson arrivals at R requests/s, whatever the server's state. Both stop
issuing at `--requests` or `--duration`, whichever comes first, then wait for what is in flight
(each request bounded by `--timeout`). Prompt and output lengths are drawn from distributions:
`N` (fixed), `A:B` (uniform integers) or `exp:MEAN` (exponential, at least 1). Prompts are
words of a fixed list (about one token each); outputs ignore EOS where the server allows it.

Reports time to first token (TTFT), inter-token latency (ITL: the gap between streamed chunks,
per token) and end-to-end latency at p50/p90/p99, throughput in output tokens/s and requests/s,
goodput (requests/s that met `--slo-ttft` and `--slo-itl`), errors by code, and the mean output
tokens per request against the mean asked for, with the requests not of the asked length (a
server that ended them early, at EOS, is not comparable on tokens/s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tools.loadtest_clients import Sample, make_client

_WORD_TEXT = (
    "the of and to in is it that was for on are with as his they be at one have this from or "
    "had by word but what some we can out other were all there when up use your how said an "
    "each she which do their time if will way about many then them write would like so these "
    "her long make thing see him two has look more day could go come did number sound no most "
    "people my over know water than call first who may down side been now find any new work "
    "part take get place made live where after back little only round man year came show "
    "every good me give our under name very through just form sentence great think say help "
    "low line differ turn cause much mean before move right boy old too same tell does set "
    "three want air well also play small end put home read hand port large spell add even "
    "land here must big high such follow act why ask men change went light kind off need "
    "house picture try us again animal point mother world near build self earth father head "
    "stand own page should country found answer school grow study still learn plant cover "
    "food sun four between state keep eye never last let thought city tree cross farm hard "
    "start might story saw far sea draw left late run while press close night real life few "
    "north open seem together next white children begin got walk example ease paper group "
    "always music those both mark often letter until mile river car feet care second book "
    "carry took science eat room friend began idea fish mountain stop once base hear horse "
    "cut sure watch color face wood main enough plain girl usual young ready above ever red "
    "list though feel talk bird soon body dog family direct pose leave song measure door "
    "product black short numeral class wind question happen complete ship area half rock "
    "order fire south problem piece told knew pass since top whole king space heard best hour "
    "better true during hundred five remember step early hold west ground interest reach fast "
    "verb sing listen six table travel less morning ten simple several vowel toward war lay "
    "against pattern slow center love person money serve appear road map rain rule govern "
    "pull cold notice voice unit power town fine certain fly fall lead cry dark machine note "
    "wait plan figure star box noun field rest correct able pound done beauty drive stood "
    "contain front teach week final gave green oh quick develop ocean warm free minute strong "
    "special mind behind clear tail produce fact street inch multiply nothing course stay "
    "wheel full force blue object decide surface deep moon island foot system busy test "
    "record boat common gold possible plane stead dry wonder laugh thousand ago ran check "
    "game shape equate hot miss brought heat snow tire bring yes distant fill east paint "
    "language among "
)
WORDS = tuple(_WORD_TEXT.split())  # common English words, about one token each


def parse_dist(spec: str) -> Any:
    """`N`, `A:B` (uniform) or `exp:MEAN` → a function of a `random.Random` giving an int >= 1."""
    try:
        if spec.startswith("exp:"):
            mean = float(spec[4:])
            if mean <= 0:
                raise ValueError
            return lambda rng: max(1, round(rng.expovariate(1 / mean)))
        if ":" in spec:
            lo, hi = (int(x) for x in spec.split(":"))
            if not 1 <= lo <= hi:
                raise ValueError
            return lambda rng: rng.randint(lo, hi)
        n = int(spec)
        if n < 1:
            raise ValueError
        return lambda rng: n
    except ValueError:
        raise ValueError(f"bad length distribution {spec!r}: use N, A:B or exp:MEAN") from None


def make_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass(frozen=True)
class LoadConfig:
    target: str
    users: int | None = None  # closed loop
    rate: float | None = None  # open loop, requests/s
    requests: int = 100
    duration_s: float = 60.0
    prompt_tokens: str = "32"
    output_tokens: str = "32"
    timeout_s: float = 300.0
    slo_ttft_s: float = 2.0
    slo_itl_s: float = 0.5
    model: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.users is None) == (self.rate is None):
            raise ValueError("give exactly one of users (closed loop) or rate (open loop)")
        if self.users is not None and self.users < 1:
            raise ValueError(f"users must be >= 1, got {self.users}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.requests < 1 or self.duration_s <= 0 or self.timeout_s <= 0:
            raise ValueError("requests, duration and timeout must be positive")
        parse_dist(self.prompt_tokens), parse_dist(self.output_tokens)


async def run_load(cfg: LoadConfig) -> dict[str, Any]:
    client = make_client(cfg.target, cfg.model)
    rng = random.Random(cfg.seed)
    prompt_len, output_len = parse_dist(cfg.prompt_tokens), parse_dist(cfg.output_tokens)
    samples: list[Sample] = []
    issued = 0
    t_start = time.perf_counter()
    deadline = t_start + cfg.duration_s

    def next_job() -> tuple[str, int] | None:
        nonlocal issued
        if issued >= cfg.requests or time.perf_counter() >= deadline:
            return None
        issued += 1
        return make_prompt(rng, prompt_len(rng)), output_len(rng)

    async def one(job: tuple[str, int]) -> None:
        sample = await client.request(job[0], job[1], cfg.timeout_s)
        sample.requested_tokens = job[1]
        samples.append(sample)

    try:
        if cfg.users is not None:
            async def user() -> None:
                while (job := next_job()) is not None:
                    await one(job)
            await asyncio.gather(*(user() for _ in range(cfg.users)))
        else:
            assert cfg.rate is not None
            tasks, t_next = [], time.perf_counter()
            while (job := next_job()) is not None:
                tasks.append(asyncio.create_task(one(job)))
                t_next += rng.expovariate(cfg.rate)
                await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
            await asyncio.gather(*tasks)
    finally:
        await client.close()
    return summarize(cfg, samples, time.perf_counter() - t_start)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    s = sorted(values)

    def at(q: float) -> float:
        return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": sum(s) / len(s)}


def summarize(cfg: LoadConfig, samples: list[Sample], wall_s: float) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            errors[s.code] = errors.get(s.code, 0) + 1
    good = [s for s in ok if s.ttft_s is not None and s.ttft_s <= cfg.slo_ttft_s
            and (s.mean_itl_s() or 0.0) <= cfg.slo_itl_s]
    tokens = sum(s.output_tokens for s in ok)
    asked = sum(s.requested_tokens for s in ok)
    return {
        "config": asdict(cfg), "requests": len(samples), "ok": len(ok), "errors": errors,
        "wall_s": wall_s, "output_tokens": tokens,
        "tokens_per_s": tokens / wall_s, "requests_per_s": len(ok) / wall_s,
        "goodput_requests_per_s": len(good) / wall_s,
        # EOS is ignored where the server allows: a mean below the asked one shows it did not
        "output_tokens_per_request": tokens / len(ok) if ok else None,
        "requested_tokens_per_request": asked / len(ok) if ok else None,
        "length_mismatches": sum(s.output_tokens != s.requested_tokens for s in ok),
        "ttft_s": percentiles([s.ttft_s for s in ok if s.ttft_s is not None]),
        "itl_s": percentiles([g for s in ok for g in s.itl_s]),
        "e2e_s": percentiles([s.e2e_s for s in ok]),
    }


def format_report(r: dict[str, Any]) -> str:
    c = r["config"]
    mode = f"closed loop, {c['users']} users" if c["users"] else f"open loop, {c['rate']}/s"
    lines = [f"{c['target']}: {mode}; {r['requests']} requests in {r['wall_s']:.1f} s, "
             f"{r['ok']} ok, errors {r['errors'] or 'none'}",
             f"{'':<6}{'p50':>10}{'p90':>10}{'p99':>10}  (ms)"]
    for key in ("ttft_s", "itl_s", "e2e_s"):
        p = r[key]
        cells = "".join(f"{'-' if p[q] is None else format(p[q] * 1e3, '.1f'):>10}"
                        for q in ("p50", "p90", "p99"))
        lines.append(f"{key[:-2]:<6}{cells}")
    lines.append(f"throughput {r['tokens_per_s']:.1f} tokens/s, {r['requests_per_s']:.2f} req/s;"
                 f" goodput {r['goodput_requests_per_s']:.2f} req/s (TTFT <= "
                 f"{c['slo_ttft_s']} s, mean ITL <= {c['slo_itl_s']} s)")
    if r["ok"]:
        lines.append(f"output tokens per request: mean {r['output_tokens_per_request']:.1f}, "
                     f"asked {r['requested_tokens_per_request']:.1f}; "
                     f"{r['length_mismatches']} of {r['ok']} requests not of the asked length"
                     + (" (the server stopped early: tokens/s not comparable)"
                        if r["length_mismatches"] else ""))
    return "\n".join(lines)


def cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="grpc://HOST:PORT (a cpumesh router) or http(s)://HOST:PORT "
                   "(an OpenAI-compatible server; /v1/completions is used)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--users", type=int, help="closed loop: this many concurrent users")
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals, requests/s")
    p.add_argument("--requests", type=int, default=100, help="most requests to issue")
    p.add_argument("--duration", type=float, default=60.0, help="most seconds to issue them")
    p.add_argument("--prompt-tokens", default="32", help="N, A:B or exp:MEAN")
    p.add_argument("--output-tokens", default="32", help="N, A:B or exp:MEAN")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput: TTFT objective, s")
    p.add_argument("--slo-itl", type=float, default=0.5, help="goodput: mean ITL objective, s")
    p.add_argument("--model", default="", help="model name sent to an HTTP server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the report here")


def cli_run(args: argparse.Namespace) -> int:
    try:
        cfg = LoadConfig(args.target, args.users, args.rate, args.requests, args.duration,
                         args.prompt_tokens, args.output_tokens, args.timeout, args.slo_ttft,
                         args.slo_itl, args.model, args.seed)
    except ValueError as e:
        raise SystemExit(f"cpumesh loadtest: error: {e}") from None
    report = asyncio.run(run_load(cfg))
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


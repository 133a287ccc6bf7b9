"""BENCHMARKS.md's multi-host emulation section (item 4), from bench/results/multihost.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.figures import plot_multihost


def multihost_section(mh: dict[str, Any], plots: Path) -> list[str]:
    probe = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in mh["probe"].items())
    netem = "the kernel has it here, but" if mh["probe"].get("netem") else \
        "`tc qdisc ... netem` fails here (the sch_netem module is missing), so"
    out = ["## Multi-host emulation (item 4)", "",
           f"tp {mh['tp']}, batch {mh['batch']}, {mh['steps']} decode steps per point (medians),"
           " one core per shard. Each shard runs in its own network namespace, joined to the "
           "root namespace by a veth pair with a `tbf` rate limit on both ends; the driver steps "
           "the shards over gRPC from there without added delay; the mesh (forced to tcp) goes "
           "through delay relays in the root namespace (per receiving rank: one for ZeroMQ "
           f"control, one for the tcp data connection). **The delay is emulated in user space**: "
           f"{netem} bench/delay_relay.py holds each chunk of mesh bytes until the set delay has "
           "passed since it was read. That adds a pass through user space even at 0 µs, and "
           f"wakes late by some µs; the ping-pong below measures both. Probe: {probe}."
           + (f" Load average {mh['load_avg_before']:.1f} at the start, "
              f"{mh['load_avg_after']:.1f} at the end." if "load_avg_after" in mh else ""), ""]
    if mh.get("skipped"):
        out += [f"**Not run:** {mh['skipped']}.", ""]
    if mh.get("accuracy"):
        out += ["Relay accuracy (ping-pong of 2,304 bytes, one hidden vector, on loopback: "
                "direct against through the relay; *added* = half the difference of median round "
                "trips; *held* = time from reading a chunk to having written it):", "",
                "| setting µs | round trip direct µs | via relay µs | added one-way µs "
                "(median / p90) | held µs (median / p99) |", "|---|---|---|---|---|"]
        out += [f"| {a['delay_us']:g} | {a['rtt_direct_us']:.0f} | {a['rtt_relay_us']:.0f} | "
                f"{a['added_one_way_us']:.0f} / {a['added_one_way_p90_us']:.0f} | "
                f"{a['held_us_median']:.0f} / {a['held_us_p99']:.0f} |" for a in mh["accuracy"]]
        out.append("")
    if mh.get("links"):
        out += ["Rate check, bulk TCP from a namespace through its shaped veth: " + "; ".join(
            f"{k['rate']} (tbf burst {k['burst']}): {k['bulk_gbit']:.1f} Gbit/s"
            for k in mh["links"]) + ". A decode allreduce message (2.3 KB) is far below the "
            "burst, so at batch 1 the rate hardly matters; the delay does.", ""]
    rows = ([("loopback, no relay", None, mh["baseline"])] if mh.get("baseline") else [])
    rows += [(r["rate"], r["delay_us"], r) for r in mh.get("sweep") or []]
    if rows:
        out += ["| link | one-way delay µs: set / held median (p90) | ms/token | compute | "
                "allreduce wait | overhead | + ms/token vs 0 µs |", "|---|---|---|---|---|---|---|"]
    for link, d, r in rows:
        zero = next((z for z in mh.get("sweep") or [] if d is not None and
                     z["rate"] == link and z["delay_us"] == 0), None)
        held = [(x["held_us_median"], x["held_us_p90"]) for x in r.get("relays", [])
                if x.get("path") == "data" and "held_us_median" in x]
        setting = "-" if d is None else f"{d:g}" + "".join(
            f" / {med:.0f} ({p90:.0f})" for med, p90 in held)
        more = f"{r['wall_ms'] - zero['wall_ms']:+.1f}" if zero else "-"
        out.append(f"| {link} | {setting} | {r['wall_ms']:.1f} | {r['compute_ms']:.1f} | "
                   f"{r['allreduce_ms']:.2f} | {r['other_ms']:.1f} | {more} |")
    if mh.get("sweep"):
        plot_multihost(mh, plots / "multihost.png")
        out += ["", "*allreduce wait* is the shards' own (mean over ranks; it includes rank "
                "skew, which absorbs part of the delay); *held*: how long the data relay held "
                "each chunk during the sweep (both directions; two shards and the relay share 2 "
                "cores, hence the tail); the loopback row is two shards on 127.0.0.1 over tcp "
                "without namespaces or relay.", "",
                "![multihost](bench/plots/multihost.png)", ""]
    return [*out, f"Command: `{mh['command']}`", ""] if "command" in mh else out

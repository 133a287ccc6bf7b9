"""`python -m bench.allreduce` runs end to end on one small size (its code paths, not timings):
every system is measured at tp 2, the table, the target lines and the plot are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.allreduce import main


@pytest.mark.timeout(120)
def test_allreduce_bench_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, plot = tmp_path / "allreduce.json", tmp_path / "allreduce.png"
    main(["--tp", "2", "--sizes", "2K", "--budget-s", "0.001", "--out", str(out),
          "--plot", str(plot)])
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert set(run["latency"]) == {"raw rtt", "raw exch", "gloo", "tcp", "zmq", "shm"}
    assert run["transports"] == {"tcp": "tcp", "zmq": "zmq", "shm": "shm"}
    assert all(row["2048"]["samples"] >= 30 and row["2048"]["p50_us"] > 0
               for row in run["latency"].values())
    assert "tp 2   2 KiB: tcp <= 1.2 x raw rtt" in capsys.readouterr().out
    assert plot.stat().st_size > 10_000

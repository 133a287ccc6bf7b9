"""`cpumesh loadtest`'s HTTP client against a real llama-cpp-python OpenAI server (SmolLM2 F16,
exported by bench/gguf_export.py), started the way bench/serving.py starts it.

That server ignores `ignore_eos`, and by default ends a streaming request as soon as another one
waits; the client's `min_tokens` and the bench's `--interrupt_requests False` make every request
generate exactly the asked number of tokens, so its rows compare with cpumesh's. Skipped where
llama-cpp-python is not installed in build/bench-venv (`make bench-env`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.gguf_export import export_gguf
from bench.machine import llama_cpp_version
from bench.serving import llama_server
from tools.loadtest import LoadConfig, run_load

pytestmark = [pytest.mark.asyncio, pytest.mark.skipif(
    llama_cpp_version() is None, reason="llama-cpp-python is not in build/bench-venv")]


async def test_concurrent_requests_get_exactly_the_asked_tokens(smollm2_dir: Path,
                                                               tmp_path: Path) -> None:
    gguf = export_gguf(smollm2_dir, tmp_path / "smollm2.F16.gguf", "F16")
    with llama_server(gguf, 2, tmp_path, n_ctx=1024) as url:
        report = await run_load(LoadConfig(url, users=4, requests=8, duration_s=60,
                                           prompt_tokens="8:24", output_tokens="12:20",
                                           timeout_s=120))
    assert report["ok"] == 8 and not report["errors"]
    assert report["length_mismatches"] == 0
    assert report["output_tokens_per_request"] == report["requested_tokens_per_request"] >= 12

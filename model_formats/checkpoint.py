"""Model directories: a Hugging Face layout (config.json, *.safetensors, tokenizer files)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from services.config import ModelConfig
from services.errors import CheckpointError


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read `config.json`; refuse unknown architectures with an error that names them."""
    path = Path(model_dir) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{model_dir} is not a model directory: no config.json") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    try:
        return ModelConfig.from_hf(hf)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: missing or malformed field {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def model_fingerprint(model_dir: Path) -> str:
    """A short identity of a checkpoint: its config and the names and sizes of its weight files.

    Cheap (no weights are read) and equal on every node that holds the same files.
    """
    model_dir = Path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted([*model_dir.glob("*.safetensors"), *model_dir.glob("*.gguf")]):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]

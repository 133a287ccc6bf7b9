"""A GGUF file as a model directory without converting its weights: config, tokenizer and a link
`model.gguf` to the file, which the shard reads at its own precision (shard_svc.weights with
--dtype int8 / int4; float dtypes expand it per slice). Made once per file, in the cache."""

from __future__ import annotations

import fcntl
import hashlib
from pathlib import Path

from model_formats.gguf.convert import GGUF_LINK, convert_gguf

NAMES = ("config.json", "tokenizer.json", "tokenizer_config.json", GGUF_LINK)


def linked_model_dir(gguf: Path, cache_dir: Path) -> Path:
    """`cache_dir/models/<stem>-gguf-<key>`, keyed by the file's path, size and mtime."""
    gguf = Path(gguf).resolve()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf} {st.st_size} {st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = Path(cache_dir) / "models" / f"{gguf.stem}-gguf-{key}"
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(target):
            convert_gguf(gguf, target, overwrite=True, link=True)
    return target


def _complete(model_dir: Path) -> bool:
    return all((model_dir / name).exists() for name in NAMES)

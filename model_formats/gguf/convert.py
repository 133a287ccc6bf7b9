"""Converting a GGUF file into a Hugging Face model directory, once.

The result is what every other part of cpumesh reads: `model.safetensors` (dequantized, under
Hugging Face names and in Hugging Face layout), `config.json`, `tokenizer.json` and
`tokenizer_config.json`. Quantized blocks are expanded with `gguf.quants.dequantize`; the config
comes from `model_formats.gguf.config`.

llama.cpp's converter permutes the rows of Q and K of `llama` models for its interleaved rotary
layout; `_unpermute` restores the Hugging Face (half-split) layout. Qwen2 files are not permuted.

The directory is written under a temporary sibling name and renamed into place at the end, so a
failed conversion leaves nothing behind and a reader never sees a half-written model.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import secrets
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from model_formats.gguf.config import hf_config
from services.config import ModelConfig
from services.errors import CheckpointError

Progress = Callable[[int, int, str], None]  # (tensors done, tensors in all, tensor name)
Weight = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]  # (name, shape, loader)

# output dtype → (safetensors dtype name, numpy dtype of the stored bits)
DTYPES: dict[str, tuple[str, type[np.generic]]] = {
    "float32": ("F32", np.float32), "float16": ("F16", np.float16), "bfloat16": ("BF16", np.uint16)}
GGUF_LINK = "model.gguf"  # in a linked model directory: the GGUF file the weights are read from
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def convert_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                 dtype: str = "float32", progress: Progress | None = None,
                 overwrite: bool = False, link: bool = False) -> Path:
    """Write the Hugging Face form of `gguf_path` to `out_dir`; return `out_dir`.

    With `link`, no weights are converted: `model.gguf` is a symbolic link to the (absolute)
    GGUF file, which the shard reads directly at its own precision (model_formats.gguf.tensors).

    Raises `CheckpointError` for a missing, corrupt, truncated or unsupported file, and
    `FileExistsError` when `out_dir` exists, is not empty and `overwrite` is false.
    """
    from model_formats.gguf.tokenizer import TokenizerBuildError, build_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    src, out_dir = Path(gguf_path), Path(out_dir)
    if not overwrite and _occupied(out_dir):
        raise FileExistsError(f"{out_dir} already exists and is not empty")
    reader, meta = _read(src)
    try:
        config = hf_config(src, meta, {t.name: t for t in reader.tensors}, dtype)
        ModelConfig.from_hf(config)  # the checks every loader applies: refuse now, not later
        tensors = _plan(src, reader.tensors, config)
        tokenizer, tokenizer_config = build_tokenizer(meta)
    except (TokenizerBuildError, ValueError, TypeError, KeyError, ArithmeticError) as e:
        raise CheckpointError(e if isinstance(e, CheckpointError) else f"{src}: {e}") from None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    tmp.mkdir()  # not mkdtemp: the published directory keeps the umask's usual permissions
    try:
        if link:
            os.symlink(src.resolve(), tmp / GGUF_LINK)
        else:
            _write_safetensors(tmp / "model.safetensors", tensors, dtype, src, progress)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        _publish(tmp, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _read(src: Path) -> tuple[Any, dict[str, Any]]:
    from gguf import GGUFReader

    if not src.is_file():
        raise CheckpointError(f"{src}: no such GGUF file")
    try:
        reader = GGUFReader(src)
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:  # untrusted bytes: any parse failure means a corrupt or truncated file
        raise CheckpointError(f"{src}: not a readable GGUF file (corrupt or truncated?): "
                              f"{type(e).__name__}: {e}") from None
    return reader, meta




def _plan(src: Path, tensors: list[Any], config: dict[str, Any]) -> list[Weight]:
    """(Hugging Face name, shape, loader) for every weight, each checked against the config."""
    return [(hf, shape, functools.partial(_load, src, t, shape, heads))
            for hf, (t, shape, heads) in hf_tensors(src, tensors, config).items()]


def hf_tensors(src: Path, tensors: list[Any], config: dict[str, Any]
               ) -> dict[str, tuple[Any, tuple[int, ...], int | None]]:
    """Hugging Face name → (GGUF tensor, Hugging Face shape, heads whose Q/K rows llama.cpp
    permuted or None), every tensor checked against the config and its type readable."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    vocab = config["vocab_size"]
    shapes = {"token_embd": (vocab, hidden), "output": (vocab, hidden),
              "output_norm": (hidden,), "attn_norm": (hidden,), "ffn_norm": (hidden,),
              "attn_q": (q_rows, hidden), "attn_k": (kv_rows, hidden), "attn_v": (kv_rows, hidden),
              "attn_output": (hidden, q_rows), "ffn_gate": (inter, hidden),
              "ffn_up": (inter, hidden), "ffn_down": (hidden, inter)}
    permute = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    plan: dict[str, tuple[Any, tuple[int, ...], int | None]] = {}
    for t in tensors:
        if t.name == "rope_freqs.weight":
            continue  # already folded into the config's rope parameters
        parts = t.name.split(".")
        if len(parts) == 2 and parts[0] in _GLOBAL_NAMES and parts[1] == "weight":
            kind, hf = parts[0], f"{_GLOBAL_NAMES[parts[0]]}.weight"
        elif (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] in
              ("weight", "bias") and int(parts[1]) < config["num_hidden_layers"]
              and parts[2] in _LAYER_NAMES):
            kind, hf = parts[2], f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
        else:
            raise CheckpointError(
                f"{src}: unexpected tensor {t.name!r} for a {config['model_type']} model")
        shape = shapes[kind] if parts[-1] == "weight" else shapes[kind][:1]
        if tuple(int(d) for d in reversed(t.shape)) != shape:
            raise CheckpointError(f"{src}: tensor {t.name} has shape {list(reversed(t.shape))}, "
                                  f"expected {list(shape)} from the metadata")
        _check_type(src, t)
        heads = permute.get(kind) if config["model_type"] == "llama" else None
        plan[hf] = (t, shape, heads)
    expected = {f"model.layers.{i}.{n}.weight" for i in range(config["num_hidden_layers"])
                for n in _LAYER_NAMES.values()} | {"model.embed_tokens.weight", "model.norm.weight"}
    if missing := sorted(expected - set(plan)):
        raise CheckpointError(f"{src}: {len(missing)} tensors missing, first {missing[0]}")
    return plan


def _load(src: Path, tensor: Any, shape: tuple[int, ...], heads: int | None) -> np.ndarray:
    from gguf import quants

    try:
        array = quants.dequantize(tensor.data, tensor.tensor_type)
    except (ValueError, IndexError) as e:
        raise CheckpointError(f"{src}: tensor {tensor.name} is corrupt: {e}") from None
    array = np.asarray(array, dtype=np.float32).reshape(shape)
    return array if heads is None else _unpermute(array, heads)


def _check_type(src: Path, tensor: Any) -> None:
    """Refuse a quantization type gguf-py cannot expand before any work is done."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(tensor.tensor_type)
    try:
        quants.dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], np.uint8), qtype)
    except NotImplementedError:
        raise CheckpointError(
            f"{src}: tensor {tensor.name}: unsupported type {qtype.name}") from None


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute`: rows (head, half, pair) ← (head, pair, half)."""
    pairs = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:])
    return pairs.swapaxes(1, 2).reshape(w.shape)



def _write_safetensors(path: Path, tensors: list[Weight], dtype: str, src: Path,
                       progress: Progress | None) -> None:
    """Stream tensors into one safetensors file, holding one tensor in memory at a time."""
    st_dtype, np_dtype = DTYPES[dtype]
    itemsize, header, offset = np.dtype(np_dtype).itemsize, {}, 0
    for name, shape, _ in tensors:
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "source": src.name}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for done, (name, _, load) in enumerate(tensors, 1):
            f.write(np.ascontiguousarray(_cast(load(), dtype)).data)  # no extra copy
            if progress is not None:
                progress(done, len(tensors), name)


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return array
    if dtype == "float16":
        return array.astype(np.float16)
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
    return np.where(np.isnan(array), 0x7FC0, rounded).astype(np.uint16)


def _occupied(path: Path) -> bool:
    return path.is_symlink() or path.is_file() or (path.is_dir() and any(path.iterdir()))


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if not _occupied(out_dir):
        os.rename(tmp, out_dir)  # replaces only an empty directory: a concurrent writer wins
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty")
    old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def stderr_progress(done: int, total: int, name: str) -> None:
    """Progress on stderr: one line redrawn in place on a terminal, every 50 tensors elsewhere."""
    line = f"converting: {done}/{total} tensors ({name})"
    if sys.stderr.isatty():
        print(f"\r{line}\033[K", end="\n" if done == total else "", file=sys.stderr, flush=True)
    elif done == total or done % 50 == 0:
        print(line, file=sys.stderr, flush=True)


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", type=Path, metavar="MODEL.gguf", help="the GGUF file to convert")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="model directory to write")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="dtype of the written weights (default: float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def cli_run(args: argparse.Namespace) -> int:
    out = convert_gguf(args.gguf, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                       progress=None if args.quiet else stderr_progress)
    print(out)
    return 0

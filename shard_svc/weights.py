"""Loading one rank's slice of a safetensors checkpoint (or a linked GGUF file), and nothing more.

Each tensor is memory-mapped on its own, only the plan's rows or columns are copied out, and the
map is dropped before the next tensor: the process never holds more than its slice plus one
mapped tensor. Sharded checkpoints (`model.safetensors.index.json`) are supported.

With dtype torch.int8 / torch.int4 the layers' matrices are quantized slice by slice, right
after each is read (shard_svc.quant; a GGUF's Q4 and Q8_0 blocks are taken as they are), so at
most one fused matrix (or the embedding table) is ever in float. int8 is in groups of 32 where
cpumesh's kernels build (shard_svc.quant_groups: the embedding too, a tied LM head its view),
with float32 activations and norms; else int8 per row. int4's embedding is int8 per row, its
norms and activations in bfloat16 where the CPU runs it, else float32
(shard_svc.quant.activations_dtype).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.config import ModelConfig
from services.errors import CheckpointError
from shard_svc import quant_groups
from shard_svc.heap import release_freed_memory
from shard_svc.quant import (
    INT4,
    INT4_GROUP,
    Codes,
    Int4Codes,
    Int8GroupCodes,
    Int8Weight,
    Matrix,
    activations_dtype,
    cat_codes,
    finish,
    kind_name,
    quantize,
    quantize_int8,
)
from shard_svc.quant_groups import GROUP, Int8GroupWeight, fits
from shard_svc.quant_linear import int4_kernel, int8_group_kernel
from shard_svc.sharding import Range, ShardPlan

QUANT = {torch.int8: "int8", INT4: "int4"}

# safetensors dtype → (numpy dtype of the same width, torch dtype it really is)
_DTYPES: dict[str, tuple[type[np.generic], torch.dtype]] = {
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.uint16, torch.bfloat16),
    "F64": (np.float64, torch.float64),
}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file


class SafetensorsReader:
    """Random access to the tensors of a model directory, by name, by row or column range."""

    def __init__(self, model_dir: Path) -> None:
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({model_dir / f for f in weight_map.values()})
        else:
            files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {model_dir}")
        self.entries: dict[str, _Entry] = {}
        self.served: dict[str, str] = {}  # name → how it was quantized
        for f in files:
            self.entries.update(_read_header(f))

    def read(self, name: str, dtype: torch.dtype, rows: Range | None = None,
             cols: Range | None = None) -> torch.Tensor:
        try:
            e = self.entries[name]
        except KeyError:
            raise CheckpointError(f"checkpoint has no tensor {name!r}") from None
        np_dtype, torch_dtype = _DTYPES[e.dtype]
        mapped = np.memmap(e.file, dtype=np_dtype, mode="r", offset=e.offset, shape=e.shape)
        part: np.ndarray = mapped
        if rows is not None:
            part = part[rows[0]:rows[1]]
        if cols is not None:
            part = part[:, cols[0]:cols[1]]
        out = torch.from_numpy(np.array(part)).view(torch_dtype)  # np.array copies
        del part, mapped  # the last reference: the file is unmapped here, not at some later GC
        return out.to(dtype)

    def read_codes(self, name: str, kind: str, group: int, rows: Range | None = None,
                   cols: Range | None = None) -> Codes:
        e = self.entries.get(name)
        self.served[name] = f"{e.dtype if e else '?'} -> {kind_name(kind, group)}"
        return quantize(self.read(name, torch.float32, rows, cols), kind, group)


def _read_header(path: Path) -> dict[str, _Entry]:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        begin, end = meta["data_offsets"]
        if 8 + n + end > size:
            raise CheckpointError(f"{path}: tensor {name} runs past the end of the file")
        entries[name] = _Entry(path, meta["dtype"], tuple(meta["shape"]), 8 + n + begin)
    return entries


@dataclass
class LayerWeights:
    """One layer's slice. Q, K and V are one matrix (and gate and up another), fused at load, so
    each is one matrix product; the properties name their parts."""

    input_norm: torch.Tensor  # [H]
    qkv: Matrix  # [(Hq_local + 2 Hkv_local) * D, H]: Q rows, then K, then V
    qkv_bias: torch.Tensor | None  # [(Hq_local + 2 Hkv_local) * D]
    wo: Matrix  # [H, Hq_local * D]
    post_norm: torch.Tensor  # [H]
    gate_up: Matrix  # [2 I_local, H]: gate rows, then up rows
    w_down: Matrix  # [H, I_local]
    qkv_split: tuple[int, int, int]  # rows of Q, K and V in `qkv`

    # The parts, as views (float weights only)
    @property
    def wq(self) -> torch.Tensor:
        return _float(self.qkv)[:self.qkv_split[0]]

    @property
    def wk(self) -> torch.Tensor:
        return _float(self.qkv)[self.qkv_split[0]:self.qkv_split[0] + self.qkv_split[1]]

    @property
    def wv(self) -> torch.Tensor:
        return _float(self.qkv)[self.qkv_split[0] + self.qkv_split[1]:]

    @property
    def bk(self) -> torch.Tensor | None:
        if self.qkv_bias is None:
            return None
        return self.qkv_bias[self.qkv_split[0]:self.qkv_split[0] + self.qkv_split[1]]

    @property
    def w_gate(self) -> torch.Tensor:
        return _float(self.gate_up)[:self.gate_up.shape[0] // 2]

    @property
    def w_up(self) -> torch.Tensor:
        return _float(self.gate_up)[self.gate_up.shape[0] // 2:]


def _float(w: Matrix) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError("the parts of a quantized matrix are not views")
    return w


@dataclass
class ShardWeights:
    embed: Matrix  # [V, H], the whole table on every rank (int8 per row with int8 / int4)
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [H]
    lm_head: Matrix  # [V_local, H] (a view of `embed` when tied)
    packed: bool = False  # matrices reordered for oneDNN (shard_svc.kernels); views unusable
    served: str = ""  # what precision each kind of tensor is served at, for the log
    huge_pages: bool = False  # the tensors moved into a huge-page arena (shard_svc.huge_pages)


def open_reader(model_dir: Path) -> Any:
    """The model directory's tensors: a linked GGUF file (convert_gguf's `link`) or
    safetensors."""
    from model_formats.gguf.convert import GGUF_LINK

    if (Path(model_dir) / GGUF_LINK).exists():
        from model_formats.gguf.tensors import GGUFTensors

        return GGUFTensors(Path(model_dir) / GGUF_LINK)
    return SafetensorsReader(model_dir)


def load_shard_weights(model_dir: Path, config: ModelConfig, plan: ShardPlan,
                       dtype: torch.dtype = torch.float32, int8_groups: bool = True
                       ) -> ShardWeights:
    """Read exactly this rank's slice; fail if the checkpoint lacks any tensor we need.
    torch.int8 / torch.int4: the layers' matrices quantized (see the module's docstring);
    int8_groups=False: int8 per row even where the group kernel builds (IPEX's weight-only
    int8 kernel reads per-row codes)."""
    reader = open_reader(model_dir)
    kind = QUANT.get(dtype)
    if kind == "int8" and int8_groups and int8_group_kernel():
        kind = "int8g"  # in groups of 32, float32 activations (quant_groups' docstring)
    act = quant_groups.ACTIVATIONS if kind == "int8g" else activations_dtype() if kind else dtype
    d = config.head_dim
    q_rows = (plan.q_head_range[0] * d, plan.q_head_range[1] * d)
    kv_rows = (plan.kv_head_range[0] * d, plan.kv_head_range[1] * d)
    inter = plan.intermediate_range
    used: set[str] = set()

    def get(name: str, rows: Range | None = None, cols: Range | None = None) -> torch.Tensor:
        used.add(name)
        return reader.read(name, act, rows, cols)

    def checked(name: str, x: torch.Tensor, rows: Range | None, cols: Range | None) -> None:
        want: tuple[int, ...] = (rows[1] - rows[0],) if rows else (x.shape[0],)
        if x.dim() == 2:
            want += (cols[1] - cols[0],) if cols else (config.hidden_size,)
        if tuple(x.shape) != want:
            raise CheckpointError(f"{name}: slice shape {tuple(x.shape)} does not match "
                                  f"config {want}")

    def matrix(parts: Sequence[tuple[str, Range | None, Range | None]],
               as_kind: str | None = None) -> Matrix:
        """Slices of several tensors stacked by rows (each checked), quantized when asked:
        each part as soon as it is read."""
        k = parts[0][2][1] - parts[0][2][0] if parts[0][2] else config.hidden_size
        how = _kind_for(as_kind or kind, k) if kind else None
        out: list[Any] = []
        for name, rows, cols in parts:
            used.add(name)
            if how is None:
                x = reader.read(name, act, rows, cols)
            else:
                x = reader.read_codes(name, how[0], how[1], rows, cols)
            checked(name, x.q if how else x, rows, cols)
            out.append(x)
        if how is None:
            return torch.cat(out)
        codes = cat_codes(out)
        if isinstance(codes, (Int4Codes, Int8GroupCodes)) and codes.q.shape[0] % 16:
            codes = quantize_int8(codes.dequantize())  # (the group kernels' rule)
            for name, _, _ in parts:
                reader.served[name] += " -> int8 (groups need rows in 16s)"
        # int4 in cpumesh's layout wherever its kernel runs (only that kernel reads it)
        return finish(codes, act, isinstance(codes, Int4Codes) and int4_kernel())

    def qkv(p: str, part: str) -> Any:
        rows = (q_rows, kv_rows, kv_rows)
        parts = [(f"{p}self_attn.{x}_proj.{part}", r, None) for x, r in zip("qkv", rows,
                                                                             strict=True)]
        if part == "bias":
            return torch.cat([get(name, r) for name, r, _ in parts])
        return matrix(parts)

    split = (q_rows[1] - q_rows[0], kv_rows[1] - kv_rows[0], kv_rows[1] - kv_rows[0])
    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        layers.append(LayerWeights(
            input_norm=get(p + "input_layernorm.weight"),
            qkv=qkv(p, "weight"),
            qkv_bias=qkv(p, "bias") if config.attention_bias else None,
            wo=matrix([(p + "self_attn.o_proj.weight", None, q_rows)]),
            post_norm=get(p + "post_attention_layernorm.weight"),
            gate_up=matrix([(p + "mlp.gate_proj.weight", inter, None),
                            (p + "mlp.up_proj.weight", inter, None)]),
            w_down=matrix([(p + "mlp.down_proj.weight", None, inter)]),
            qkv_split=split,
        ))
    vocab = plan.vocab_range
    tied = config.tie_word_embeddings or "lm_head.weight" not in reader.entries
    embed: Matrix
    lm_head: Matrix
    if kind == "int8g" and fits(config.vocab_size, config.hidden_size) and all(
            v % 16 == 0 for v in vocab):  # the lookup expands the step's rows
        used.add("model.embed_tokens.weight")
        table = reader.read_codes("model.embed_tokens.weight", "int8g", GROUP)
        assert isinstance(table, Int8GroupCodes)
        embed = finish(table, act)
        assert isinstance(embed, Int8GroupWeight)
        lm_head = embed.slice_rows(*vocab) if tied else matrix([("lm_head.weight", vocab, None)])
    elif kind:  # int8 per row: the lookup expands the step's rows, the LM head reads it as is
        used.add("model.embed_tokens.weight")
        embed = finish(reader.read_codes("model.embed_tokens.weight", "int8", 0), act)
        assert isinstance(embed, Int8Weight)
        lm_head = (Int8Weight(embed.q[vocab[0]:vocab[1]], embed.scales[vocab[0]:vocab[1]])
                           if tied else matrix([("lm_head.weight", vocab, None)], "int8"))
    else:
        embed = get("model.embed_tokens.weight")
        lm_head = embed[vocab[0]:vocab[1]] if tied else get("lm_head.weight", vocab)
    weights = ShardWeights(embed, layers, get("model.norm.weight"), lm_head,
                           served=_served(reader.served, act))
    _check_shapes(weights, config, plan)
    release_freed_memory()
    unused = {n for n in reader.entries if n not in used and "rotary_emb" not in n}
    if unused - {"lm_head.weight"}:
        raise CheckpointError(f"tensors the model does not use: {sorted(unused)[:5]}")
    return weights


def _kind_for(kind: str, k: int) -> tuple[str, int]:
    """(kind, group) for a matrix of `k` inputs: int4 and int8 in groups need their group to
    divide k, else the matrix is int8 per row."""
    if kind == "int4" and k % INT4_GROUP == 0:
        return ("int4", INT4_GROUP)
    if kind == "int8g" and k % GROUP == 0:
        return ("int8g", GROUP)
    return ("int8", 0)


def _served(served: dict[str, str], act: torch.dtype) -> str:
    """'how: count' over the quantized tensors, and the float ones' dtype."""
    counts: dict[str, int] = {}
    for how in served.values():
        counts[how] = counts.get(how, 0) + 1
    parts = [f"{how} x{n}" for how, n in sorted(counts.items())]
    rest = "activations and norms" if parts else "activations, norms, embedding, LM head"
    return "; ".join([*parts, f"{rest} {str(act)[6:]}"])


def _check_shapes(w: ShardWeights, config: ModelConfig, plan: ShardPlan) -> None:
    h, d = config.hidden_size, config.head_dim
    i_local = plan.intermediate_range[1] - plan.intermediate_range[0]
    v_local = plan.vocab_range[1] - plan.vocab_range[0]
    expect: list[tuple[str, Any, tuple[int, ...]]] = [
        ("embed", w.embed, (config.vocab_size, h)), ("lm_head", w.lm_head, (v_local, h))]
    qkv_rows = (plan.num_q_heads + 2 * plan.num_kv_heads) * d
    for n, layer in enumerate(w.layers):
        expect += [
            (f"layer {n} qkv_proj", layer.qkv, (qkv_rows, h)),
            (f"layer {n} o_proj", layer.wo, (h, plan.num_q_heads * d)),
            (f"layer {n} gate_up_proj", layer.gate_up, (2 * i_local, h)),
            (f"layer {n} down_proj", layer.w_down, (h, i_local)),
        ]
    for name, t, shape in expect:
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{name}: shape {tuple(t.shape)} does not match config {shape}")

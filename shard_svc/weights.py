"""Loading one rank's slice of a safetensors checkpoint, and nothing more.

Each tensor is memory-mapped on its own, only the plan's rows or columns are copied out, and the
map is dropped before the next tensor: the process never holds more than its slice plus one
mapped tensor. Sharded checkpoints (`model.safetensors.index.json`) are supported.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.config import ModelConfig
from services.errors import CheckpointError
from shard_svc.sharding import Range, ShardPlan

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
    qkv: torch.Tensor  # [(Hq_local + 2 Hkv_local) * D, H]: Q rows, then K, then V
    qkv_bias: torch.Tensor | None  # [(Hq_local + 2 Hkv_local) * D]
    wo: torch.Tensor  # [H, Hq_local * D]
    post_norm: torch.Tensor  # [H]
    gate_up: torch.Tensor  # [2 I_local, H]: gate rows, then up rows
    w_down: torch.Tensor  # [H, I_local]
    qkv_split: tuple[int, int, int]  # rows of Q, K and V in `qkv`

    @property
    def wq(self) -> torch.Tensor:
        return self.qkv[:self.qkv_split[0]]

    @property
    def wk(self) -> torch.Tensor:
        return self.qkv[self.qkv_split[0]:self.qkv_split[0] + self.qkv_split[1]]

    @property
    def wv(self) -> torch.Tensor:
        return self.qkv[self.qkv_split[0] + self.qkv_split[1]:]

    @property
    def bk(self) -> torch.Tensor | None:
        if self.qkv_bias is None:
            return None
        return self.qkv_bias[self.qkv_split[0]:self.qkv_split[0] + self.qkv_split[1]]

    @property
    def w_gate(self) -> torch.Tensor:
        return self.gate_up[:self.gate_up.shape[0] // 2]

    @property
    def w_up(self) -> torch.Tensor:
        return self.gate_up[self.gate_up.shape[0] // 2:]


@dataclass
class ShardWeights:
    embed: torch.Tensor  # [V, H], the whole table on every rank
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V_local, H] (a view of `embed` when tied)
    packed: bool = False  # matrices reordered for oneDNN (shard_svc.kernels); views unusable


def load_shard_weights(model_dir: Path, config: ModelConfig, plan: ShardPlan,
                       dtype: torch.dtype = torch.float32) -> ShardWeights:
    """Read exactly this rank's slice; fail if the checkpoint lacks any tensor we need."""
    reader = SafetensorsReader(model_dir)
    d = config.head_dim
    q_rows = (plan.q_head_range[0] * d, plan.q_head_range[1] * d)
    kv_rows = (plan.kv_head_range[0] * d, plan.kv_head_range[1] * d)
    inter = plan.intermediate_range
    used: set[str] = set()

    def get(name: str, rows: Range | None = None, cols: Range | None = None) -> torch.Tensor:
        used.add(name)
        return reader.read(name, dtype, rows, cols)

    def fuse(parts: list[tuple[str, Range]]) -> torch.Tensor:
        """Row slices of several tensors, stacked: each checked before it is joined."""
        out = []
        for name, rows in parts:
            x = get(name, rows)
            want = (rows[1] - rows[0], *([config.hidden_size] if x.dim() == 2 else []))
            if tuple(x.shape) != want:
                raise CheckpointError(f"{name}: slice shape {tuple(x.shape)} does not match "
                                      f"config {want}")
            out.append(x)
        return torch.cat(out)

    def qkv(p: str, part: str) -> torch.Tensor:
        rows = (q_rows, kv_rows, kv_rows)
        return fuse([(f"{p}self_attn.{x}_proj.{part}", r)
                     for x, r in zip("qkv", rows, strict=True)])

    split = (q_rows[1] - q_rows[0], kv_rows[1] - kv_rows[0], kv_rows[1] - kv_rows[0])
    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        layers.append(LayerWeights(
            input_norm=get(p + "input_layernorm.weight"),
            qkv=qkv(p, "weight"),
            qkv_bias=qkv(p, "bias") if config.attention_bias else None,
            wo=get(p + "self_attn.o_proj.weight", cols=q_rows),
            post_norm=get(p + "post_attention_layernorm.weight"),
            gate_up=fuse([(p + "mlp.gate_proj.weight", inter), (p + "mlp.up_proj.weight", inter)]),
            w_down=get(p + "mlp.down_proj.weight", cols=inter),
            qkv_split=split,
        ))
    embed = get("model.embed_tokens.weight")
    vocab = plan.vocab_range
    tied = config.tie_word_embeddings or "lm_head.weight" not in reader.entries
    lm_head = embed[vocab[0]:vocab[1]] if tied else get("lm_head.weight", vocab)
    weights = ShardWeights(embed, layers, get("model.norm.weight"), lm_head)
    _check_shapes(weights, config, plan)
    unused = {n for n in reader.entries if n not in used and "rotary_emb" not in n}
    if unused - {"lm_head.weight"}:
        raise CheckpointError(f"tensors the model does not use: {sorted(unused)[:5]}")
    return weights


def _check_shapes(w: ShardWeights, config: ModelConfig, plan: ShardPlan) -> None:
    h, d = config.hidden_size, config.head_dim
    i_local = plan.intermediate_range[1] - plan.intermediate_range[0]
    v_local = plan.vocab_range[1] - plan.vocab_range[0]
    expect = [("embed", w.embed, (config.vocab_size, h)), ("lm_head", w.lm_head, (v_local, h))]
    for n, layer in enumerate(w.layers):
        expect += [
            (f"layer {n} q_proj", layer.wq, (plan.num_q_heads * d, h)),
            (f"layer {n} k_proj", layer.wk, (plan.num_kv_heads * d, h)),
            (f"layer {n} o_proj", layer.wo, (h, plan.num_q_heads * d)),
            (f"layer {n} v_proj", layer.wv, (plan.num_kv_heads * d, h)),
            (f"layer {n} gate_proj", layer.w_gate, (i_local, h)),
            (f"layer {n} up_proj", layer.w_up, (i_local, h)),
            (f"layer {n} down_proj", layer.w_down, (h, i_local)),
        ]
    for name, t, shape in expect:
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{name}: shape {tuple(t.shape)} does not match config {shape}")

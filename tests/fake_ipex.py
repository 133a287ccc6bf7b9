"""A stand-in for `intel_extension_for_pytorch`: the parts of the IPEX 2.8 API the backend calls,
with the same signatures and semantics (read from the installed 2.8.0 package), in plain torch.
Each call is recorded in `calls`, so a test can show the backend really went through IPEX.

Installed with `install(monkeypatch)`, which puts it in `sys.modules` for the test only.
"""

from __future__ import annotations

import enum
import math
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

NAME = "intel_extension_for_pytorch"
# A torch version other than the installed one (an IPEX built for it must be refused)
OTHER = f"{torch.__version__.split('.')[0]}.{int(torch.__version__.split('.')[1]) + 1}.0"


class WoqWeightDtype(enum.IntEnum):
    INT8 = 1
    INT4 = 2


class WoqLowpMode(enum.IntEnum):
    NONE = 0
    FP16 = 1
    BF16 = 2
    INT8 = 3


class WoqWeightQScheme(enum.IntEnum):
    UNDEFINED = 0
    ASYMMETRIC = 1
    SYMMETRIC = 2


def build(version: str) -> Any:
    calls: list[str] = []

    def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        calls.append("rms_norm")
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return (weight.float() * x).to(hidden_states.dtype)

    def rotary_embedding(query: torch.Tensor, key: torch.Tensor, sin: torch.Tensor,
                         cos: torch.Tensor, rotary_dim: int, rotary_half: bool,
                         position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        calls.append("rotary_embedding")
        assert query.dim() == key.dim() == 3, "[num_tokens, heads, head_dim] expected"
        assert rotary_half and rotary_dim == query.shape[-1] == sin.shape[-1] == cos.shape[-1]
        assert sin.shape[0] == cos.shape[0] == query.shape[0] and position_ids is None
        half = rotary_dim // 2
        for t in (query, key):  # in place, as IPEX does ("keep the inplace context")
            x = t.float()
            rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
            t.copy_(x * cos.float().unsqueeze(1) + rotated * sin.float().unsqueeze(1))
        return query, key

    def single_query_cached_kv_attention(
            output: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
            value_cache: torch.Tensor, head_mapping: torch.Tensor, scale: float,
            block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
            max_context_len: int, alibi_slopes: torch.Tensor | None, window_size: int = -1,
            k_scale: float = 1.0, v_scale: float = 1.0, softcap: float = -1.0) -> None:
        calls.append("single_query_cached_kv_attention")
        # query [num_seqs, num_heads, D]; caches [num_blocks, num_kv_heads, block_size, D]
        assert key_cache.shape[2] == block_size and alibi_slopes is None
        assert block_tables.dtype == context_lens.dtype == head_mapping.dtype == torch.int32
        assert int(context_lens.max()) <= max_context_len
        for b in range(query.shape[0]):
            length = int(context_lens[b])
            pages = block_tables[b, :math.ceil(length / block_size)].long()
            k = key_cache[pages].transpose(0, 1).reshape(key_cache.shape[1], -1,
                                                         key_cache.shape[3])[:, :length]
            v = value_cache[pages].transpose(0, 1).reshape(value_cache.shape[1], -1,
                                                           value_cache.shape[3])[:, :length]
            heads = head_mapping.long()
            scores = torch.einsum("hd,hld->hl", query[b].float(), k[heads].float()) * scale
            out = torch.einsum("hl,hld->hd", scores.softmax(-1), v[heads].float())
            output[b] = out.to(output.dtype)

    class WeightOnlyQuantizedLinear(torch.nn.Module):
        def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
            super().__init__()
            self.dequantized, self.bias_ = weight, bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append("ipex_woq_linear")
            return F.linear(x.float(), self.dequantized,
                            None if self.bias_ is None else self.bias_.float()).to(x.dtype)

        @classmethod
        def from_float_and_qweight(cls, mod: torch.nn.Module, qweight: torch.Tensor,
                                   dtype: int, scales: torch.Tensor,
                                   zero_points: torch.Tensor | None,
                                   bias: torch.Tensor | None = None, group_size: int = -1,
                                   g_idx: torch.Tensor | None = None,
                                   weight_format: int = 0) -> WeightOnlyQuantizedLinear:
            calls.append("from_float_and_qweight")
            assert isinstance(mod, torch.nn.Linear) and hasattr(mod, "qconfig")
            assert qweight.dtype == torch.int8 and dtype == WoqWeightDtype.INT8
            assert qweight.shape == (mod.out_features, mod.in_features)
            assert group_size == -1 and scales.shape == (mod.out_features,)
            qconfig: Any = mod.qconfig
            assert zero_points is None and qconfig.weight_qscheme == WoqWeightQScheme.SYMMETRIC
            return cls(qweight.float() * scales.float()[:, None], bias)

    def get_weight_only_quant_qconfig_mapping(
            *, weight_dtype: int = WoqWeightDtype.INT8, lowp_mode: int = WoqLowpMode.NONE,
            act_quant_mode: int = 7, group_size: int = -1,
            weight_qscheme: int = WoqWeightQScheme.UNDEFINED) -> SimpleNamespace:
        calls.append("get_weight_only_quant_qconfig_mapping")
        return SimpleNamespace(global_qconfig=SimpleNamespace(
            weight_dtype=weight_dtype, lowp_mode=lowp_mode, act_quant_mode=act_quant_mode,
            group_size=group_size, weight_qscheme=weight_qscheme))

    module = ModuleType(NAME)
    fake: Any = module
    fake.__version__ = version
    fake.calls = calls
    fake.llm = SimpleNamespace(
        functional=SimpleNamespace(rms_norm=rms_norm, rotary_embedding=rotary_embedding),
        modules=SimpleNamespace(PagedAttention=SimpleNamespace(
            single_query_cached_kv_attention=single_query_cached_kv_attention)))
    fake.quantization = SimpleNamespace(
        WoqWeightDtype=WoqWeightDtype, WoqLowpMode=WoqLowpMode,
        WoqWeightQScheme=WoqWeightQScheme,
        get_weight_only_quant_qconfig_mapping=get_weight_only_quant_qconfig_mapping)
    fake.nn = SimpleNamespace(modules=SimpleNamespace(
        WeightOnlyQuantizedLinear=WeightOnlyQuantizedLinear))
    return fake


def install(monkeypatch: pytest.MonkeyPatch, version: str | None = None) -> Any:
    """Put a fake IPEX of `version` (default: one matching the installed torch) in
    sys.modules for this test."""
    fake = build(version or torch.__version__.split("+")[0] + "+cpu")
    monkeypatch.setitem(sys.modules, NAME, fake)
    return fake


def stand_in_package(root: Path, version: str, body: str) -> None:
    """An installed-looking `intel_extension_for_pytorch` on `root`: dist metadata + module."""
    (root / NAME).mkdir(parents=True)
    (root / NAME / "__init__.py").write_text(body)
    info = root / f"intel_extension_for_pytorch-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: intel-extension-for-pytorch\nVersion: {version}\n")

"""The IPEX backend: Intel Extension for PyTorch's LLM kernels behind the kernel seam.

`IpexPlan` has `KernelPlan`'s interface (`linear`, `prepare`, `for_step`, `describe`) and wraps
the plain plan chosen for this shard (`fallback`), which keeps every product IPEX does not take.
It adds the model's other hot operations, each the plain model's math through one IPEX call:

  linear          weight-only int8 (`WeightOnlyQuantizedLinear.from_float_and_qweight`, symmetric,
                  one scale per output row): int8 weights a loader made (anything with `.q` int8
                  [N, K] and `.scales` [N]) are packed as they are; float ones when the plan was
                  made with `quantize=True`. Only where `IpexStatus.fast_linear` (AVX512-FP16):
                  elsewhere IPEX dequantizes the whole weight per call and the fallback keeps them.
  rms_norm        `ipex.llm.functional.rms_norm`
  apply_rope      `ipex.llm.functional.rotary_embedding` (rotate-half), in place on the Q and K
                  heads of the fused QKV product
  attend_decode   `ipex.llm.modules.PagedAttention.single_query_cached_kv_attention` reading the
                  KV cache where it lies: its [Hkv, P*S, D] layer is viewed as [P, Hkv, S, D]
                  (IPEX follows the strides), each sequence's pages as its block table.

The shard takes it with --kernels auto where IPEX is usable, or --kernels ipex (refused where
it is not): `with_ipex` wraps the plain plan, and ShardModel, given an IpexPlan, calls these
three in place of its plain functions (decode attention only over a float KV cache).

Activations are bfloat16 or float32; weight-only int8 computes in bfloat16 for bfloat16
activations (IPEX's fast case) and in float32 otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shard_svc.ipex_detect import IpexStatus, select_backend
from shard_svc.kernels import KernelPlan
from shard_svc.weights import ShardWeights

MATRICES = ("qkv", "wo", "gate_up", "w_down")


@dataclass
class IpexLinear:
    """A matrix in IPEX's packed weight-only int8 layout."""

    module: Any  # WeightOnlyQuantizedLinear
    shape: tuple[int, int]  # [N, K] of the float matrix it stands for
    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class IpexPlan:
    def __init__(self, status: IpexStatus, fallback: KernelPlan, quantize: bool = False) -> None:
        if status.module is None:
            raise ValueError(f"IPEX is not usable here: {status.reason}")
        self.status, self.ipex, self.fallback = status, status.module, fallback
        self.quantize = quantize
        self.dtype = fallback.dtype
        self.libraries = fallback.libraries
        self.timings_us = fallback.timings_us
        self.int8_matrices = 0  # how many matrices `prepare` handed to IPEX

    @property
    def packed(self) -> bool:
        return self.fallback.packed

    @property
    def quantized(self) -> bool:
        """Whether any matrix is int8 / int4 (the fallback's, or IPEX's weight-only int8)."""
        return self.fallback.quantized or self.int8_matrices > 0

    def describe(self) -> str:
        """The plain plan's line (the backend has its own, `IpexStatus.describe`), and the
        matrices `prepare` handed to IPEX."""
        ipex = (f"; {self.int8_matrices} matrices in IPEX weight-only int8"
                if self.int8_matrices else "")
        return self.fallback.describe() + ipex

    def for_step(self, tokens: int) -> None:
        self.fallback.for_step(tokens)

    def embedding(self, tokens: torch.Tensor, table: Any) -> torch.Tensor:
        return self.fallback.embedding(tokens, table)

    def linear(self, x: torch.Tensor, w: Any, b: torch.Tensor | None = None) -> torch.Tensor:
        """x @ w.T + b, with w as `prepare` left it."""
        if isinstance(w, IpexLinear):
            y = w(x)
            return y if b is None else y + b
        return self.fallback.linear(x, w, b)

    def prepare(self, w: ShardWeights) -> ShardWeights:
        """Hand the layers' matrices IPEX serves to it (one at a time; the plain ones are
        dropped as each is packed), then let the fallback lay out the rest."""
        if self.status.fast_linear:
            for layer in w.layers:
                for name in MATRICES:
                    packed = self.woq_linear(getattr(layer, name))
                    if packed is not None:
                        setattr(layer, name, packed)
                        self.int8_matrices += 1
        if self.int8_matrices:
            return w  # float32/bf16 packing of the remaining (LM head) is the fallback's call
        return self.fallback.prepare(w)

    def woq_linear(self, m: Any) -> IpexLinear | None:
        """`m` in IPEX's weight-only int8 layout, or None when IPEX does not take it."""
        if isinstance(m, torch.Tensor):
            if not self.quantize or not m.is_floating_point():
                return None
            q, scales = quantize_int8_rows(m)
        elif isinstance(getattr(m, "q", None), torch.Tensor) and m.q.dtype == torch.int8:
            q, scales = m.q, m.scales.float()
        else:  # int4 and other layouts stay with the fallback
            return None
        quant = self.ipex.quantization
        lowp = quant.WoqLowpMode.BF16 if self.dtype == torch.bfloat16 else quant.WoqLowpMode.NONE
        shell = torch.nn.Linear(q.shape[1], q.shape[0], bias=False, device="meta")
        shell.qconfig = quant.get_weight_only_quant_qconfig_mapping(
            weight_dtype=quant.WoqWeightDtype.INT8, lowp_mode=lowp,
            weight_qscheme=quant.WoqWeightQScheme.SYMMETRIC).global_qconfig
        module = self.ipex.nn.modules.WeightOnlyQuantizedLinear.from_float_and_qweight(
            shell, q, quant.WoqWeightDtype.INT8, scales, None)
        return IpexLinear(module, (q.shape[0], q.shape[1]), q.nbytes + scales.nbytes)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.ipex.llm.functional.rms_norm(x, weight, eps)

    def apply_rope(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   q_heads: int) -> torch.Tensor:
        """qk [N, Hq + Hkv, D] (a view of the QKV product), rotated in place and returned;
        cos, sin [N, D] in the rotate-half layout."""
        d = qk.shape[-1]
        self.ipex.llm.functional.rotary_embedding(qk[:, :q_heads], qk[:, q_heads:], sin, cos,
                                                  d, True)
        return qk

    def attend_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      tables: torch.Tensor, lengths: torch.Tensor, page_size: int,
                      scale: float) -> torch.Tensor:
        """One query per sequence against its cached history: q [B, Hkv, G, D], a layer's
        k_cache, v_cache [Hkv, P*S, D], tables int32 [B, pages] and lengths int32 [B] from
        `block_tables` → [B, Hkv, G, D]."""
        b, hkv, group, d = q.shape
        query = q.reshape(b, hkv * group, d).contiguous()
        out = torch.empty_like(query)
        paged = (k_cache.view(hkv, -1, page_size, d).transpose(0, 1),  # [P, Hkv, S, D] views
                 v_cache.view(hkv, -1, page_size, d).transpose(0, 1))
        head_mapping = torch.arange(hkv, dtype=torch.int32).repeat_interleave(group)
        self.ipex.llm.modules.PagedAttention.single_query_cached_kv_attention(
            out, query, paged[0], paged[1], head_mapping, scale, tables, lengths, page_size,
            int(lengths.max()), None)
        return out.view(b, hkv, group, d)


def with_ipex(library: str, plain: KernelPlan, quantize: bool = False) -> KernelPlan | IpexPlan:
    """The shard's kernels for --kernels `library`: auto, IPEX around `plain` where it is usable,
    else `plain`; ipex, IPEX or InvalidArgument saying why not; any other, `plain`. Logs the one
    line saying which (`ipex_detect.select_backend`)."""
    status = select_backend(library)
    return IpexPlan(status, plain, quantize) if status.usable else plain


def block_tables(cache: Any, seq_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's pages (int32 [B, most pages], padded with page 0) and token count
    (int32 [B]), from the cache's `slots` and `page_size`."""
    s = cache.page_size
    lengths = [cache.length(i) for i in seq_ids]
    pages = [cache.slots(i, 0, n)[::s] // s for i, n in zip(seq_ids, lengths, strict=True)]
    tables = torch.zeros(len(pages), max(len(p) for p in pages), dtype=torch.int32)
    for row, p in zip(tables, pages, strict=True):
        row[:len(p)] = p
    return tables, torch.tensor(lengths, dtype=torch.int32)


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per row: w ≈ q * s[:, None], q in -127..127."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales

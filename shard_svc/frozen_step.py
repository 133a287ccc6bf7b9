"""The decode step with the weights frozen into the graph: what `--compile decode` compiles.

Inductor's freezing folds a module's parameters into the graph as constants; with them constant,
`max-autotune` packs each matrix once, at compile time, for its own C++ GEMM template (AMX or
AVX-512 micro-kernels where the CPU has them) and fuses the element-wise work around it. Measured
on SmolLM2's 120 layer products (bench/frozen_gemm.py, bfloat16, one token, 2 threads, AMX Xeon):
9.9 ms against 14.3 ms through oneDNN's packed weights and 22.3 ms through its plain ones.

Weight-only int8 and int4 matrices are frozen too. int8 ones go to cpumesh's int8 kernel (an
opaque op, shard_svc/quant_linear.py) in the batch buckets whose kernel plan chose it, else are
written in the form inductor lowers to its weight-only GEMM, `(x @ q.T.to(x.dtype)) * s` (its
`_weight_int8pack_mm` pattern, with bfloat16 activations); int4 ones go to cpumesh's int4
kernel where they are in its layout (wherever it builds), else to ATen's
`_weight_int4pack_mm_for_cpu` on the packed codes.
Measured on 30 matrices of 3072 x 576 (one token, bfloat16, 2 threads, AMX Xeon): int8 2.0 ms
(26 GB/s of codes) against 4.2 ms in bfloat16; int4 2.1 ms against 2.5 ms eager.

The modules here only hold the model's tensors: each parameter *is* the model's tensor (no copy);
inductor's packed constants are its own, one set per compiled batch bucket (see the README).
The math is `CompiledDecode`'s, the same as `ShardModel.forward` plus the LM head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from shard_svc.kernels import embedding_rows
from shard_svc.model import ShardModel, rms_norm, rope_cos_sin
from shard_svc.quant import Int4Weight, Int8Weight, Matrix
from shard_svc.quant_groups import Int8GroupWeight
from shard_svc.quant_linear import int4_linear, int8_group_linear, int8_linear

LAYER_TENSORS = ("input_norm", "qkv", "qkv_bias", "wo", "post_norm", "gate_up", "w_down")


def layer_tensors(layer: Any) -> tuple[Matrix | None, ...]:
    """A layer's tensors in the order `CompiledDecode._layer` takes them."""
    return tuple(getattr(layer, name) for name in LAYER_TENSORS)


class FrozenWeights(torch.nn.Module):
    """The model's weights as parameters of one module, so that freezing can see them: a float
    matrix as itself, an int8 one as `<name>__q` and `<name>__s`, an int4 one as `<name>__p`
    and `<name>__sz` (its group and width kept as plain numbers), int8 in groups as
    `<name>__gq` and `<name>__gso`."""

    inv_freq: Tensor
    final_norm: Tensor

    def __init__(self, model: ShardModel) -> None:
        super().__init__()
        w = model.w
        self.num_layers = len(w.layers)
        self.int4: dict[str, tuple[int, int]] = {}  # name: (group, k)
        self.act = torch.float32  # int8 in groups: the activations' dtype
        named: dict[str, Matrix | None] = {
            "embed": w.embed, "inv_freq": model.inv_freq, "final_norm": w.final_norm,
            "lm_head": w.lm_head}
        for i, layer in enumerate(w.layers):
            named |= {f"l{i}_{name}": t for name, t in zip(LAYER_TENSORS, layer_tensors(layer),
                                                          strict=True)}
        for name, m in named.items():
            if isinstance(m, Int8Weight):
                self._freeze(f"{name}__q", m.q)
                self._freeze(f"{name}__s", m.scales)
            elif isinstance(m, Int8GroupWeight):
                self._freeze(f"{name}__gq", m.q)
                self._freeze(f"{name}__gso", m.so)
                self.act = m.dtype
            elif isinstance(m, Int4Weight):
                self._freeze(f"{name}__p", m.packed)
                self._freeze(f"{name}__sz", m.scale_zeros)
                self.int4[name] = (m.group, m.k)
            elif m is not None:
                self._freeze(name, m)

    def _freeze(self, name: str, t: Tensor) -> None:
        assert isinstance(t, Tensor) and not t.is_mkldnn, f"{name}: plain tensors only"
        self.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))

    def matrix(self, name: str) -> Matrix | None:
        if name in self.int4:
            group, k = self.int4[name]
            return Int4Weight(getattr(self, f"{name}__p"), getattr(self, f"{name}__sz"), group,
                              k, None)
        if hasattr(self, f"{name}__gq"):
            return Int8GroupWeight(getattr(self, f"{name}__gq"), getattr(self, f"{name}__gso"),
                                   self.act)
        if hasattr(self, f"{name}__q"):
            return Int8Weight(getattr(self, f"{name}__q"), getattr(self, f"{name}__s"))
        return getattr(self, name, None)

    def layer(self, i: int) -> tuple[Matrix | None, ...]:
        return tuple(self.matrix(f"l{i}_{name}") for name in LAYER_TENSORS)


def linear(x: Tensor, w: Matrix, b: Tensor | None = None,
           int8_kernel: bool = False) -> Tensor:
    """x @ w.T + b, in the forms inductor lowers to its GEMMs, or by cpumesh's int8 kernel
    (see above)."""
    if isinstance(w, Int8Weight) and (int8_kernel or w.blocked):
        y = int8_linear(x, w)
    elif isinstance(w, Int8Weight):
        y = (x @ w.q.t().to(x.dtype)) * w.scales
    elif isinstance(w, Int8GroupWeight):
        y = int8_group_linear(x, w)
    elif isinstance(w, Int4Weight) and w.blocked:
        y = int4_linear(x, w)
    elif isinstance(w, Int4Weight):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, w.group, w.scale_zeros)
    else:
        return F.linear(x, w, b)
    return y if b is None else y + b


class FrozenStep(torch.nn.Module):
    """A decode step of Bb rows (one token each) from token ids to this rank's logits."""

    def __init__(self, model: ShardModel, layer: Callable[..., Tensor], eps: float,
                 int8_kernel_rows: frozenset[int] = frozenset()) -> None:
        """int8_kernel_rows: the batch buckets whose int8 products take cpumesh's kernel."""
        super().__init__()
        self.w = FrozenWeights(model)
        self.decode_layer, self.eps, self.int8_kernel_rows = layer, eps, int8_kernel_rows

    def forward(self, tokens: Tensor, positions: Tensor, write_slots: Tensor, src: Tensor,
                index: Tensor, lengths: Tensor, mask: Tensor | None, k: list[Tensor],
                v: list[Tensor]) -> Tensor:
        """k, v: each layer's cache [Hkv, P*S, D] (separate inputs, so that each is written
        in place); returns float32 logits [Bb, V]."""
        w = self.w
        x = embedding_rows(tokens, w.matrix("embed"))  # type: ignore[arg-type]  # [Bb, H]
        cos, sin = rope_cos_sin(w.inv_freq, positions, x.dtype)
        for i in range(w.num_layers):
            x = self.decode_layer(x, cos, sin, write_slots, src, index, lengths, mask, k[i],
                                  v[i], w.layer(i))
        head = w.matrix("lm_head")
        assert head is not None
        return linear(rms_norm(x, w.final_norm, self.eps), head,
                      int8_kernel=len(tokens) in self.int8_kernel_rows).float()

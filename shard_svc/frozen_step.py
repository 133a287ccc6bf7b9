"""The decode step with the weights frozen into the graph: what `--compile decode` compiles.

Inductor's freezing folds a module's parameters into the graph as constants; with them constant,
`max-autotune` packs each matrix once, at compile time, for its own C++ GEMM template (AMX or
AVX-512 micro-kernels where the CPU has them) and fuses the element-wise work around it. Measured
on SmolLM2's 120 layer products (bench/frozen_gemm.py, bfloat16, one token, 2 threads, AMX Xeon):
9.9 ms against 14.3 ms through oneDNN's packed weights and 22.3 ms through its plain ones.

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

from shard_svc.model import ShardModel, rms_norm, rope_cos_sin

LAYER_TENSORS = ("input_norm", "qkv", "qkv_bias", "wo", "post_norm", "gate_up", "w_down")


def layer_tensors(layer: Any) -> tuple[Tensor | None, ...]:
    """A layer's tensors in the order `CompiledDecode._layer` takes them."""
    return tuple(getattr(layer, name) for name in LAYER_TENSORS)


class FrozenWeights(torch.nn.Module):
    """The model's weights as parameters of one module, so that freezing can see them."""

    embed: Tensor
    inv_freq: Tensor
    final_norm: Tensor
    lm_head: Tensor

    def __init__(self, model: ShardModel) -> None:
        super().__init__()
        w = model.w
        self.num_layers = len(w.layers)
        named = {"embed": w.embed, "inv_freq": model.inv_freq, "final_norm": w.final_norm,
                 "lm_head": w.lm_head}
        for i, layer in enumerate(w.layers):
            named |= {f"l{i}_{name}": t for name, t in zip(LAYER_TENSORS, layer_tensors(layer),
                                                          strict=True) if t is not None}
        for name, t in named.items():
            assert isinstance(t, Tensor) and not t.is_mkldnn, f"{name}: plain tensors only"
            self.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))

    def layer(self, i: int) -> tuple[Tensor | None, ...]:
        return tuple(getattr(self, f"l{i}_{name}", None) for name in LAYER_TENSORS)


class FrozenStep(torch.nn.Module):
    """A decode step of Bb rows (one token each) from token ids to this rank's logits."""

    def __init__(self, model: ShardModel, layer: Callable[..., Tensor], eps: float) -> None:
        super().__init__()
        self.w = FrozenWeights(model)
        self.decode_layer, self.eps = layer, eps

    def forward(self, tokens: Tensor, positions: Tensor, write_slots: Tensor, src: Tensor,
                index: Tensor, mask: Tensor, k: list[Tensor], v: list[Tensor]) -> Tensor:
        """k, v: each layer's cache [Hkv, P*S, D] (separate inputs, so that each is written
        in place); returns float32 logits [Bb, V]."""
        w = self.w
        x = F.embedding(tokens, w.embed)  # [Bb, H]
        cos, sin = rope_cos_sin(w.inv_freq, positions, w.embed.dtype)
        for i in range(w.num_layers):
            x = self.decode_layer(x, cos, sin, write_slots, src, index, mask, k[i], v[i],
                                  w.layer(i))
        return F.linear(rms_norm(x, w.final_norm, self.eps), w.lm_head).float()

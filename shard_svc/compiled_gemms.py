"""Which GEMMs a compiled decode graph (shard_svc/compiled_step.py) may take, from the weights and
inductor's vector ISA (`gemm_backends`):
- int8 weights (where the plan did not choose cpumesh's kernel): inductor's C++ template only,
  never ATen's `_weight_int8pack_mm`. max-autotune times the two on weights its repeated runs
  keep in cache, where ATen's wins for a matrix that fits (SmolLM2's 3072 x 576 gate/up: 54 us
  against 72); serving reads them from memory, where it loses (177 us a call in the step).
  Interleaved steps, 2 threads, AMD EPYC: SmolLM2 int8 13.9 -> 9.8 ms/step, the 1B 38.4 ->
  35.7; 8 rows unchanged.
- half precision where inductor vectorizes with AVX2 only: ATen's only. Its C++ template gave
  NaN logits in every SmolLM2 bfloat16 step at 2 threads there (ATEN_CPU_CAPABILITY=avx2 on an
  AVX-512 EPYC; right at 1 thread, and with ATen's GEMMs alone: 17.2 ms/step against 13.9).
- otherwise max-autotune's choice: the C++ template alone doubled SmolLM2's bfloat16 8-row step
  (51 ms against 27), and ATen's alone float32's 1-row step under AVX2 (54 against 22).
A graph for which the allowed backends offer no kernel (inductor's NoValidChoicesError) compiles
with max-autotune's choice instead, logged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shard_svc.model import ShardModel


def gemm_backends(model: ShardModel) -> str | None:
    """The GEMM backends inductor may choose from for this model's graph (None: max-autotune's
    own choice); see this module's docstring."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    if isa and model.kernels.dtype == torch.int8:  # then every matrix is int8 (weights.py)
        return "CPP"
    if str(isa) == "avx2" and model.dtype in (torch.bfloat16, torch.float16):
        return "ATEN"
    return None

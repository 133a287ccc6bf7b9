"""A GGUF file's tensors read in place, one rank's slice at a time, as float or as int8 / int4
codes (shard_svc.quant) straight from its quantized blocks.

Served at their own precision (no float copy on disk or of the model in RAM):
  Q4_0, Q4_1, Q4_K  → int4 in groups of 32, exactly: the kernel's (q - 8)·s + z holds Q4_0
                      (s = d, z = 0), Q4_1 (z = m + 8d) and Q4_K (s = d·sc, z = 8s - dmin·m);
                      only the scales' rounding to the activations' dtype (bf16) differs.
  Q8_0              → int8 in groups of 32 (shard_svc.quant_groups), exactly: q = q8 + 128,
                      s = d, o = -128 d; where int8 is per row (cpumesh's kernels not built) the
                      slice's blocks are expanded to float32 (this slice only, transiently) and
                      requantized per row: lossy, measured in bench/quality.py.
Anything else (F16/F32, Q6_K, Q5_x, a Q4 tensor asked for as int8, a column split that cuts a
block) is expanded per slice with gguf-py and quantized like float weights. The report of what
was served how is `served` (name → how).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_formats.gguf.config import hf_config
from model_formats.gguf.convert import _read, _unpermute, hf_tensors
from services.errors import CheckpointError
from shard_svc.quant import Codes, Int4Codes, Int8GroupCodes, kind_name, quantize

Range = tuple[int, int]
NATIVE_INT4 = ("Q4_0", "Q4_1", "Q4_K")


class GGUFTensors:
    """Random access to the tensors of a GGUF file under Hugging Face names."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        reader, meta = _read(self.path)
        try:
            config = hf_config(self.path, meta, {t.name: t for t in reader.tensors}, "float32")
            self.entries = hf_tensors(self.path, reader.tensors, config)
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        self.served: dict[str, str] = {}

    def _entry(self, name: str) -> tuple[Any, tuple[int, ...], int | None]:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor {name!r}") from None

    def _rows(self, name: str, rows: Range | None) -> np.ndarray:
        """The stored rows (quantized: their bytes) of HF rows `rows`, un-permuted."""
        t, shape, heads = self._entry(name)
        data = t.data if len(shape) > 1 else t.data.reshape(1, -1)
        lo, hi = rows or (0, data.shape[0])
        if heads is None:
            return np.array(data[lo:hi])  # copies the slice out of the map
        order = _unpermute(np.arange(shape[0])[:, None], heads)[lo:hi, 0]
        return np.asarray(data[order])

    def read(self, name: str, dtype: torch.dtype, rows: Range | None = None,
             cols: Range | None = None) -> torch.Tensor:
        from gguf import quants

        t, shape, _ = self._entry(name)
        try:
            x = np.asarray(quants.dequantize(self._rows(name, rows), t.tensor_type), np.float32)
        except (ValueError, IndexError) as e:
            raise CheckpointError(f"{self.path}: tensor {t.name} is corrupt: {e}") from None
        if len(shape) == 1:
            x = x.reshape(-1)
        elif cols is not None:
            x = x[:, cols[0]:cols[1]]
        self.served.setdefault(name, f"{t.tensor_type.name} -> {str(dtype)[6:]}")
        return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)

    def read_codes(self, name: str, kind: str, group: int, rows: Range | None = None,
                   cols: Range | None = None) -> Codes:
        """`kind` ("int8" / "int4") codes of the slice; int4 from Q4 blocks at group 32."""
        t, shape, _ = self._entry(name)
        qtype = t.tensor_type.name
        lo, hi = cols or (0, shape[1])
        block = 256 if qtype == "Q4_K" else 32
        if kind == "int4" and qtype in NATIVE_INT4 and lo % block == 0 and hi % block == 0:
            codes = _int4_codes(qtype, self._rows(name, rows), (lo, hi))
            self.served[name] = f"{qtype} -> int4 g32 (its own blocks)"
            return codes
        if kind == "int8g" and qtype == "Q8_0" and lo % 32 == 0 and hi % 32 == 0:
            self.served[name] = "Q8_0 -> int8 g32 (its own blocks)"
            return _q8_0_codes(self._rows(name, rows), (lo, hi))
        how = "requantized per row" if qtype == "Q8_0" and kind == "int8" else "quantized"
        self.served[name] = f"{qtype} -> {kind_name(kind, group)} ({how})"
        return quantize(self.read(name, torch.float32, rows, cols), kind, group)


def _q8_0_codes(raw: np.ndarray, cols: Range) -> Int8GroupCodes:
    """Q8_0 rows (their bytes: per 32 weights an fp16 d, then 32 int8) → codes of `cols`."""
    r = raw.shape[0]
    b = raw[:, cols[0] // 32 * 34:cols[1] // 32 * 34].reshape(r, -1, 34)
    d = torch.from_numpy(b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    q8 = torch.from_numpy(b[..., 2:].copy().view(np.int8).astype(np.int16))  # [r, n, 32]
    return Int8GroupCodes((q8 + 128).to(torch.uint8).view(r, -1), d, -128 * d)


def _int4_codes(qtype: str, raw: np.ndarray, cols: Range) -> Int4Codes:
    """Q4_0 / Q4_1 / Q4_K rows (their bytes) → codes, scales and zeros of columns `cols`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    r = raw.shape[0]
    b = raw[:, cols[0] // block * size:cols[1] // block * size].reshape(r, -1, size)
    half = lambda a: a.copy().view(np.float16).astype(np.float32)[..., 0]  # noqa: E731
    if qtype in ("Q4_0", "Q4_1"):
        d = half(b[..., 0:2])
        m = half(b[..., 2:4]) if qtype == "Q4_1" else -8 * d  # Q4_0: w = d (q - 8)
        qs = b[..., 4:] if qtype == "Q4_1" else b[..., 2:]  # [r, n, 16]: element j low, j+16 high
        q = np.concatenate((qs & 15, qs >> 4), axis=-1)  # [r, n, 32]
        scales, zeros = d, m + 8 * d
    else:  # Q4_K: 256 per block, 8 sub-blocks of 32 with 6-bit scales and mins
        d, dmin = half(b[..., 0:2])[..., None], half(b[..., 2:4])[..., None]
        sc, mn = quants.Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12))
        scales = d * sc.reshape(r, -1, 8).astype(np.float32)
        qs = b[..., 16:].reshape(r, -1, 4, 1, 32)  # four 64-runs: low nibbles, then high
        q = np.concatenate((qs & 15, qs >> 4), axis=3)  # [r, n, 4, 2, 32]
        zeros = 8 * scales - dmin * mn.reshape(r, -1, 8).astype(np.float32)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a).reshape(r, -1))  # noqa: E731
    return Int4Codes(t(q), t(scales).float(), t(zeros).float())

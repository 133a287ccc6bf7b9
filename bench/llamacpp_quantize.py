"""Quantize a GGUF with llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`).

    build/bench-venv/bin/python bench/llamacpp_quantize.py IN.gguf OUT.gguf Q8_0|Q4_0|Q4_1

Runs in the bench environment (no torch, no cpumesh imports), llama.cpp's default mixes (as
`llama-quantize IN OUT TYPE` would write them).
"""

from __future__ import annotations

import sys

import llama_cpp as L

FTYPES = {"Q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": L.LLAMA_FTYPE_MOSTLY_Q4_0,
          "Q4_1": L.LLAMA_FTYPE_MOSTLY_Q4_1}


def main() -> None:
    src, dst, qtype = sys.argv[1:4]
    params = L.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = 2
    if L.llama_model_quantize(src.encode(), dst.encode(), L.byref(params)) != 0:
        sys.exit(f"llama.cpp could not quantize {src} to {qtype}")


if __name__ == "__main__":
    main()

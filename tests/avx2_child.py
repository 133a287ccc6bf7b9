"""Run a piece of Python in a process of its own whose torch and inductor vectorize with AVX2
only (ATEN_CPU_CAPABILITY=avx2; an AVX2-only CPU's own setting), and read the JSON object its
last line of output prints. `AVX2_ENV` also caps oneDNN and MKL at AVX2: without it, on an
AMX Xeon, torch's bfloat16 SDPA chose oneDNN's AMX packing and then failed in its AVX2 build
("pack_vnni2 is only supported when avx512 is supported"), which no AVX2 CPU can meet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def run_avx2(code: str, timeout: float = 280) -> dict[str, Any]:
    env = os.environ | AVX2_ENV | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


CASES = """
import json, torch
from shard_svc import native
from {module} import case
import {module} as cases
isa = native.load()
errors = {{}}
for dtype in (torch.float32, torch.bfloat16):
    for rows, n in ((5, 48), (1, 112)):  # tiles of rows; one row (7 blocks: streams and rest)
        for variant in getattr(cases, "AVX2_VARIANTS", ({{}},)):
            got, want, _ = case(dtype, rows, n, 2048, **variant)
            error = ((got.double() - want).abs().max() / want.abs().max()).item()
            errors[str(dtype)] = max(errors.get(str(dtype), 0.0), error)
print(json.dumps({{"isa": isa, "errors": errors}}))
"""


def avx2_case_errors(module: str) -> dict[str, Any]:
    """`module`'s `case(dtype, rows, n, 2048, **variant)` (a kernel's product and its float64
    emulation) in an AVX2 process, 5 rows x 48 outputs and 1 row x 112, float32 and bfloat16,
    for each variant of its AVX2_VARIANTS (default: none): {"isa": ..., "errors": {dtype: the
    largest relative error}}."""
    return run_avx2(CASES.format(module=module))

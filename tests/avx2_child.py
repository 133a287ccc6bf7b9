"""Run a piece of Python in a process of its own whose torch and inductor vectorize with AVX2
only (ATEN_CPU_CAPABILITY=avx2; an AVX2-only CPU's own setting), and read the JSON object its
last line of output prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_avx2(code: str, timeout: float = 280) -> dict[str, Any]:
    env = os.environ | {"ATEN_CPU_CAPABILITY": "avx2", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result

"""Run a worker script of tests/ under Triton's CPU interpreter, in a fresh process.

TRITON_INTERPRET must be set before a kernel module is imported (triton.jit reads it when it wraps
each kernel), so the kernel tests that run on the CPU start their worker in a subprocess. The
worker prints OK as its last line when every case passed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(worker: str, timeout: int = 300) -> None:
    """Run tests/<worker> with TRITON_INTERPRET=1; fail with its output unless it ends with OK."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / worker)], env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr[-4000:]

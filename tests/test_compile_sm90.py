"""The newer Triton kernels compile for Hopper (sm_90): the interpreter that runs the other tests accepts
code that the compiler rejects (a plain global in a kernel, say). A subprocess, without TRITON_INTERPRET.
Kernels tuned to spill no registers stay so."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_kernels_compile_for_hopper():
    script = Path(__file__).parent.parent / "scripts" / "compile_kernels_sm90.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    if "ptxas" in result.stdout + result.stderr and "OK" not in result.stdout:
        pytest.skip("no ptxas for sm_90 on this machine")
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    sys.path.insert(0, str(script.parent))
    try:
        import compile_kernels_sm90
    finally:
        sys.path.remove(str(script.parent))
    assert result.stdout.count("OK ") == len(compile_kernels_sm90.KERNELS) and "FAIL" not in result.stdout
    # ptxas' report: the pooled correction, farthest-point sampling, winding numbers, the quantiser and the
    # pyramid build keep all in registers
    for line in result.stdout.splitlines():
        tuned = any(name in line for name in ("_pooled_kernel", "_fps_kernel", "_winding_kernel", "_quantize_kernel",
                                              "_pyramid_build_kernel"))
        if tuned and "? registers" not in line:
            assert "spills 0 / 0 B" in line, line
        # the quantised forward at its library launches (64 rows): capped at QUANT_LAUNCH's 168 registers, so that
        # three programs fit per SM, and not spilling there
        if "_quant_fwd_kernel" in line and "'ROWS': 64" in line and "? registers" not in line:
            assert "spills 0 / 0 B" in line and int(line.split(" registers")[0].rsplit(" ", 1)[-1]) <= 168, line

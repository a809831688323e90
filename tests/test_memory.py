"""awp_jax.memory: the allocator settings the command line makes, and that trimming changes nothing."""

import subprocess
import sys

import numpy as np

from awp_jax import memory


def test_configure_and_trim_in_a_fresh_process():
    code = ("from awp_jax import memory; import numpy as np, sys\n"
            "ok = memory.configure()\n"
            "a = np.ones((64, 1 << 20), np.uint8); peak = memory.peak_rss_mb(); del a; memory.trim()\n"
            "print(ok, peak)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if sys.platform.startswith("linux"):
        assert out[0] == "True" and float(out[1]) >= 64  # the 64 MB array was resident at its peak
    else:
        assert out[0] == "False"


def test_trim_keeps_values():
    a = np.arange(1 << 20, dtype=np.float32)
    b = a.copy()
    memory.trim()
    np.testing.assert_array_equal(a, b)

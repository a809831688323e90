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


_SCHEDULED = """
import os, sys
from awp_jax import memory
took = memory.configure_xla() if sys.argv[1] == "configure" else None
import jax, jax.numpy as jnp
def chain(x, ws):  # bfloat16 weights, float32 activations: each weight promoted for its matmul
    for w in ws:
        x = jnp.tanh(jnp.einsum("ti,oi->to", x, w))
    return x
ws = [jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16)] * 4
compiled = jax.jit(chain).lower(jax.ShapeDtypeStruct((256, 1024), jnp.float32), ws).compile()
print(took, os.environ.get("XLA_FLAGS", ""), compiled.memory_analysis().temp_size_in_bytes / 2**20)
"""


def test_configure_xla_holds_one_promoted_weight_at_a_time():
    """The claim behind :func:`memory.configure_xla`: with XLA's default CPU scheduler all four
    weights' float32 copies (4 MiB each) are temporaries at once; with the flag, one at a time."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    runs = {how: subprocess.run([sys.executable, "-c", _SCHEDULED, how], capture_output=True, text=True, env=env, check=True).stdout.split()
            for how in ("default", "configure")}
    assert runs["default"][0] == "None" and float(runs["default"][-1]) >= 16, runs
    assert runs["configure"][0] == "True" and memory.XLA_SCHEDULER_FLAG in runs["configure"][1], runs
    assert float(runs["configure"][-1]) <= 6, runs  # one 4 MiB copy and the 1 MiB activations
    # a user's own setting stands
    mine = subprocess.run([sys.executable, "-c", _SCHEDULED, "configure"], capture_output=True, text=True, check=True,
                          env={**env, "XLA_FLAGS": f"--{memory.XLA_SCHEDULER_FLAG}=true"}).stdout.split()
    assert mine[0] == "False" and mine[1] == f"--{memory.XLA_SCHEDULER_FLAG}=true" and float(mine[-1]) >= 16, mine
    assert not memory._jaxlib_knows("xla_cpu_no_such_flag_for_this_test")

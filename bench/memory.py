"""Peak host memory of the default run, and where it goes.

    python bench/memory.py            # about 12 minutes on 2 cores: two runs of the default command

1. ``awp-jax compress --out TMP`` (the README's first command) in a child process; its peak resident
   set size from ``getrusage(RUSAGE_CHILDREN)``, next to the model's float32 size.
2. The same steps in this process (:mod:`awp_jax.memory` configured as the CLI does), with the
   resident size after each step and the peak within it (``VmHWM``, reset between steps through
   ``/proc/self/clear_refs``; Linux only).

Writes bench/results/memory.md.
"""

from __future__ import annotations

import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

RESULTS = pathlib.Path(__file__).parent / "results"


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Phases:
    def __init__(self):
        self.rows = []
        self.t0 = time.perf_counter()
        self._reset()

    def _reset(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
        except OSError:
            pass

    def __call__(self, name):
        self.rows.append((name, _status("VmRSS"), _status("VmHWM"), time.perf_counter() - self.t0))
        print(f"{name:<34} resident {self.rows[-1][1]:6.0f} MB, peak in step {self.rows[-1][2]:6.0f} MB", flush=True)
        self._reset()


def in_process():
    from awp_jax import memory

    memory.configure()
    memory.configure_xla()
    ph = Phases()
    from awp_jax import checkpoints, compress, data, export, methods, perplexity, recipes

    ph("imports")
    tok = checkpoints.model_tokenizer(None)
    calib = data.calibration_windows(data.tokenize(tok, data.calibration_text()), 32, 512, 0)
    ev = data.eval_windows(data.tokenize(tok, data.evaluation_text()), 512, 32)
    ph("tokenizer and texts")
    model, _ = checkpoints.load_model(None, storage_dtype="auto", with_tokenizer=False)
    ph("load the model (bf16 values, float32 forward)")
    perplexity.perplexity(model, ev, progress=False)
    ph("dense perplexity (32 x 512)")
    recipe = recipes.get_recipe(recipes.DEFAULT)
    constraint = methods.Constraint(sparsity=0.5)
    options = recipe.options_for(constraint)
    enc = {}
    rep = compress.compress_model(model, calib, "awp", constraint, options, progress=False, encoded=enc)
    ph("calibrate and compress (awp 50 %)")
    perplexity.perplexity(model, ev, progress=False)
    ph("compressed perplexity")
    out = pathlib.Path(tempfile.mkdtemp()) / "out"
    export.save_hf_dir(model, out, tokenizer=tok, report={"layers": rep}, encoded=enc)
    ph("write the output")
    shutil.rmtree(out.parent, ignore_errors=True)
    return ph.rows


def main():
    from awp_jax.cli import matmul_gflops

    gflops = matmul_gflops()
    out = pathlib.Path(tempfile.mkdtemp()) / "run"
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "awp_jax.cli", "compress", "--out", str(out)], check=True)
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    wall = time.perf_counter() - t0
    shutil.rmtree(out.parent, ignore_errors=True)
    assert before < child_peak * 1024
    rows = in_process()
    lines = ["# Host memory of the default run", "",
             "Command: `python bench/memory.py` (Linux). The model: SmolLM2-135M, 134.5M parameters = 538 MB in float32.", "",
             "## `awp-jax compress --out DIR` (the README's first command)", "",
             f"Peak resident set size: **{child_peak:.0f} MB** ({child_peak / 538:.1f}x the float32 weights); "
             f"{wall:.0f} s wall on {os.cpu_count()} cores, float32 matmul {gflops:.0f} GFLOP/s.", "",
             "## The same steps in one process", "",
             "| step | resident after (MB) | peak within the step (MB) | seconds (cumulative) |", "|---|---|---|---|"]
    lines += [f"| {n} | {r:.0f} | {h:.0f} | {t:.0f} |" for n, r, h, t in rows]
    lines += ["", f"python {platform.python_version()}, {platform.machine()}.", ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.md").write_text("\n".join(lines))
    print("wrote", RESULTS / "memory.md")


if __name__ == "__main__":
    main()

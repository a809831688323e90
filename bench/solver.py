"""Cost of one AWP iteration against the dense matmul it is built on.

For each Llama-shaped layer this measures, in one run on one device:
  * matmul: an unprojected step ``Θ + ε (W − Θ) C`` in a jitted loop (the FLOP-bound part of an
    iteration), timed the same way as the solver's iterations;
  * iteration: a PGD iteration of ``solve_pgd`` (pruning 50 %, and INT4 g128 quantization),
    as (t(N2 iterations) − t(N1 iterations)) / (N2 − N1), so initialisation and step size cancel;
  * projection: the row top-k projection alone (bisection) and the ``lax.top_k`` reference;
and reports the fraction of matmul throughput an iteration reaches and the projection's share.
It also times a stack of equal-shape layers solved with ``solve_pgd_stack`` (vmap) against a
Python loop over ``solve_pgd``.

    python bench/solver.py                 # SmolLM2 shapes + one Llama-2-7B shape
    python bench/solver.py --full          # all Llama-2-7B shapes (slow on CPU)
    python bench/solver.py --out bench/results/solver.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import awp_jax as aj
from awp_jax import solver as solver_lib
from awp_jax.projections import keep_count, row_topk_mask, row_topk_mask_sort

SMOL = [("q/o 576x576", 576, 576), ("k/v 192x576", 192, 576), ("gate/up 1536x576", 1536, 576), ("down 576x1536", 576, 1536)]
LLAMA7B = [("7B q/k/v/o 4096x4096", 4096, 4096), ("7B gate/up 11008x4096", 11008, 4096), ("7B down 4096x11008", 4096, 11008)]


def timeit(fn, *args, reps: int = 5) -> float:
    """Median wall seconds of ``fn(*args)`` after one warm-up call (compilation excluded)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def problem(d_out, d_in, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((d_in, 2 * d_in)).astype(np.float32)
    x[:4] *= 20
    c = jnp.asarray(x @ x.T / x.shape[1])
    w = jnp.asarray(rng.standard_normal((d_out, d_in)).astype(np.float32) / np.sqrt(d_in))
    return w, c


def iteration_time(w, c, make_cfg, n1, n2, reps):
    cfg1, cfg2 = make_cfg(n1), make_cfg(n2)
    t1 = timeit(lambda: aj.solve_pgd(w, c, cfg1).theta, reps=reps)
    t2 = timeit(lambda: aj.solve_pgd(w, c, cfg2).theta, reps=reps)
    return max(t2 - t1, 1e-9) / (n2 - n1)


def bench_shape(name, d_out, d_in, n1, n2, reps):
    w, c = problem(d_out, d_in)
    theta = w * 0.5
    # the dense reference: the same number of unprojected steps Θ + ε (W − Θ) C inside one
    # jitted loop, so per-call dispatch cancels as it does for the solver
    def dense_steps(n):
        step = lambda _, t: t + 1e-9 * jnp.matmul(w - t, c, precision="highest")  # noqa: E731
        return jax.jit(lambda t: jax.lax.fori_loop(0, n, step, t))

    t_mm = max(timeit(dense_steps(n2), theta, reps=reps) - timeit(dense_steps(n1), theta, reps=reps), 1e-9) / (n2 - n1)
    k = keep_count(0.5, d_in)
    t_proj = timeit(jax.jit(lambda z: row_topk_mask(jnp.abs(z), k)), w, reps=reps)
    # what the solver does: the previous iterate's support as the hint, on a real PGD step
    cfg20 = aj.awp_pruning(0.5, max_iter=20, tol=0.0)
    th = aj.solve_pgd(w, c, cfg20).theta
    z = th + solver_lib.step_size(c, cfg20) * jnp.matmul(w - th, c, precision="highest")
    t_hint = timeit(jax.jit(lambda z, hint: row_topk_mask(jnp.abs(z), k, hint=hint)), z, th != 0, reps=reps)
    t_topk = timeit(jax.jit(lambda z: row_topk_mask_sort(jnp.abs(z), k)), w, reps=reps)
    t_it = iteration_time(w, c, lambda n: aj.awp_pruning(0.5, max_iter=n, tol=0.0), n1, n2, reps)
    t_itq = iteration_time(w, c, lambda n: aj.awp_quantization(4, 128, iters=n, partial_groups=True), n1, n2, reps)
    compile_s, peak = compile_stats(w, c, aj.awp_pruning(0.5, max_iter=200))
    flops = 2.0 * d_out * d_in * d_in
    return {
        "layer": name,
        "matmul ms": 1e3 * t_mm,
        "matmul GFLOP/s": flops / t_mm / 1e9,
        "prune iter ms": 1e3 * t_it,
        "prune: matmul fraction": t_mm / t_it,
        "projection ms (no hint)": 1e3 * t_proj,
        "projection ms (support hint)": 1e3 * t_hint,
        "projection share": t_hint / t_it,
        "lax.top_k mask ms": 1e3 * t_topk,
        "top_k / no-hint bisection": t_topk / t_proj,
        "int4 iter ms": 1e3 * t_itq,
        "int4: matmul fraction": t_mm / t_itq,
        "compile s (prune)": compile_s,
        "peak MiB (prune)": peak / 2**20,
        "peak / (W + C)": peak / (4.0 * (d_out * d_in + d_in * d_in)),
    }


def compile_stats(w, c, cfg):
    """Seconds to trace, lower and compile one solve, and its peak device memory in bytes as XLA
    plans it (arguments + outputs + temporaries, from ``memory_analysis``)."""
    t0 = time.perf_counter()
    compiled = jax.jit(lambda w, c: aj.solve_pgd(w, c, cfg).theta).lower(w, c).compile()
    secs = time.perf_counter() - t0
    m = compiled.memory_analysis()
    return secs, float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def bench_stack(d_out, d_in, layers, iters, reps):
    ws, cs = zip(*(problem(d_out, d_in, seed=s) for s in range(layers)))
    ws, cs = jnp.stack(ws), jnp.stack(cs)
    cfg = aj.awp_pruning(0.5, max_iter=iters, tol=0.0)
    t_stack = timeit(lambda: aj.solve_pgd_stack(ws, cs, cfg).theta, reps=reps)
    t_loop = timeit(lambda: [aj.solve_pgd(ws[i], cs[i], cfg).theta for i in range(layers)], reps=reps)
    return t_stack, t_loop


def fmt_table(rows):
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(v if isinstance(v, str) else f"{v:.3g}" for v in r.values()) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="all Llama-2-7B shapes")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="write a markdown report here")
    args = ap.parse_args()

    shapes = [(n, o, i, 5, 25) for n, o, i in SMOL]
    shapes += [(n, o, i, 1, 3) for n, o, i in (LLAMA7B if args.full else LLAMA7B[:1])]
    rows = []
    for name, o, i, n1, n2 in shapes:
        reps = args.reps if o * i < 4e6 else 2
        rows.append(bench_shape(name, o, i, n1, n2, reps))
        print(fmt_table([rows[-1]]).splitlines()[-1], flush=True)
    t_stack, t_loop = bench_stack(576, 576, 8, 50, args.reps)

    dev = jax.devices()[0]
    cmd = "python bench/solver.py" + (" --full" if args.full else "") + (f" --reps {args.reps}" if args.reps != 5 else "")
    report = f"""# Solver iteration cost vs dense matmul

Command: `{cmd}`
Device: {dev.platform} ({dev.device_kind}), {os.cpu_count()} host cores, jax {jax.__version__}, {platform.python_version()}

Per layer shape (fp32, precision highest): an unprojected step `Θ + ε (W − Θ) C`, one AWP iteration
(pruning 50 % and INT4 g128), and the projection alone: row top-k by bisection without a hint
(31 counting passes), with the previous iterate's support as the hint (what the solver does: only
rows whose support changes are searched; measured on the step after 20 PGD iterations), and
`lax.top_k` for reference. "projection share" = hinted projection / iteration. "matmul fraction" = matmul time /
iteration time, i.e. the share of dense-matmul throughput an iteration reaches. Iteration time is
(t(N2 iterations) − t(N1 iterations)) / (N2 − N1), medians of repeated runs, compile excluded.
"compile s": tracing + lowering + compiling one 200-iteration pruning solve (one measurement).
"peak MiB": arguments + outputs + temporaries of that compiled solve as XLA plans them
(`memory_analysis`); "peak / (W + C)" divides by the float32 bytes of W and C.

{fmt_table(rows)}

Stacked solve of 8 layers 576x576, 50 iterations each: `solve_pgd_stack` (vmap) {t_stack:.3f} s,
Python loop over `solve_pgd` {t_loop:.3f} s, ratio loop/stack = {t_loop / t_stack:.2f}.
"""
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

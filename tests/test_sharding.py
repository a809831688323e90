"""The solver on a device mesh: sharded equals unsharded, with C split by rows over the model axis
(the default) or replicated there, and the compiled solve communicates only what the placement
predicts. Runs on 4 fake CPU devices in a subprocess (the device count is fixed at import)."""


import numpy as np
from conftest import run_on_fake_devices

import awp_jax as aj
from awp_jax import sharding
from awp_jax.cli import synthetic_layer

SCRIPT = r"""
import os, re, sys
import numpy as np, jax, jax.numpy as jnp
import awp_jax as aj
from awp_jax import sharding
from awp_jax.cli import synthetic_layer

L, d_out, d_in = 3, 51, 64          # 3 layers on a stack axis of 2, 51 rows on a model axis of 2: both padded
w, c = (np.stack(a) for a in zip(*[synthetic_layer(s, d_out, d_in, 512) for s in range(L)]))
configs = {"prune": aj.awp_pruning(0.5, max_iter=40), "quant": aj.awp_quantization(3, 32),
           "nm+momentum": aj.awp_nm(2, 4, max_iter=30, momentum=True), "joint": aj.awp_joint(0.5, 4, 32, init="wanda"),
           "bf16 matmuls, Frobenius step": aj.awp_pruning(0.5, max_iter=20, matmul_dtype="bfloat16", step_rule="frobenius"),
           "recipe fast (refit)": aj.awp_pruning(0.5, max_iter=5, momentum=True, step_rule="lambda_max", step_scale=1.0,
                                                 refit_iters=10, refit_damping=0.1)}
for explicit in (False, True):
    mesh = sharding.make_mesh(model=2, stack=2, explicit=explicit)
    for name, cfg in configs.items():
        if explicit and name not in ("prune", "quant"):  # Explicit mode: the placements, not every solver again
            continue
        ref = aj.solve_pgd_stack(w, c, cfg)
        res = sharding.solve_sharded(w, c, cfg, mesh)
        # the CG refit's per-row linear solve amplifies the sums' order (~1e-7) by C's condition number
        atol = 1e-5 if cfg.refit_iters else 1e-6
        np.testing.assert_allclose(np.asarray(res.theta), np.asarray(ref.theta), rtol=0, atol=atol, err_msg=name)
        assert np.array_equal(np.asarray(res.iterations), np.asarray(ref.iterations)), name
        np.testing.assert_allclose(np.asarray(res.obj_final), np.asarray(ref.obj_final), rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(np.asarray(res.step_size), np.asarray(ref.step_size), rtol=1e-5, err_msg=name)
        if not explicit and name in ("prune", "recipe fast (refit)"):  # C replicated over the model axis instead
            rep = sharding.solve_sharded(w, c, cfg, mesh, split_c=False)
            np.testing.assert_allclose(np.asarray(rep.theta), np.asarray(ref.theta), rtol=0, atol=atol, err_msg=name)
            assert np.array_equal(np.asarray(rep.iterations), np.asarray(ref.iterations)), name
            # C split, its products summed by an all-to-all (accelerators' way) instead of the CPU devices' all-reduces
            a2a = sharding.solve_sharded(w, c, cfg, mesh, sum_by="all-to-all")
            np.testing.assert_allclose(np.asarray(a2a.theta), np.asarray(ref.theta), rtol=0, atol=atol, err_msg=name)
            assert np.array_equal(np.asarray(a2a.iterations), np.asarray(ref.iterations)), name

# a layer over the chunk size: the same row chunks as the unsharded solve, each chunk sharded (17 rows: padded to 18)
cfg = configs["recipe fast (refit)"]
ref = aj.solve_pgd_stack(w, c, cfg, max_chunk_bytes=L * 17 * d_in * 4)
res = sharding.solve_sharded(w, c, cfg, sharding.make_mesh(model=2, stack=2), max_chunk_bytes=L * 17 * d_in * 4)
np.testing.assert_allclose(np.asarray(res.theta), np.asarray(ref.theta), rtol=0, atol=1e-5)
np.testing.assert_allclose(np.asarray(res.obj_final), np.asarray(ref.obj_final), rtol=1e-5)

# ADMM: one penalty schedule for the whole layer (its support counts are summed across devices), so the
# same iterations; its masks react to float noise (eigh of a different batch of layers differs in the
# last bits), so the masks and objectives agree closely, not bit for bit
cfg = aj.awp_pruning(0.5, max_iter=60, algorithm="admm", refit_iters=5)
assert not sharding.splits_c(cfg, sharding.make_mesh(model=2, stack=2), d_in)  # it diagonalises the whole C
try:
    sharding.solve_sharded(w, c, cfg, sharding.make_mesh(model=2, stack=2), split_c=True)
except ValueError as e:
    assert "cannot be split" in str(e) and "admm" in str(e), e
else:
    raise AssertionError("ADMM with C split was accepted")
ref = aj.solve_pgd_stack(w, c, cfg)
res = sharding.solve_sharded(w, c, cfg, sharding.make_mesh(model=2, stack=2))
assert np.array_equal(np.asarray(res.iterations), np.asarray(ref.iterations))
np.testing.assert_allclose(np.asarray(res.step_size), np.asarray(ref.step_size), rtol=1e-6)
assert np.mean((np.asarray(res.theta) != 0) == (np.asarray(ref.theta) != 0)) > 0.97
np.testing.assert_allclose(np.asarray(res.obj_final), np.asarray(ref.obj_final), rtol=0.05)

# the compiled solve: no gather of W or Θ. C replicated: only all-reduces of per-layer scalars. C split
# (rows 32 of 64 per device; W − Θ 26 of 52 rows): C never moves; each product trades W − Θ's column
# blocks (all-to-all, [2 layers, 26 rows, 32 columns] per operand) and sums the partial products of
# each device's rows: on CPU devices (they share one memory) by one all-reduce of [2 layers, 26 rows,
# 64] per device's rows, within a model group (no device holds every row's partial product), else by
# an all-to-all of [2 layers, 26 rows, 64] blocks, one per device, and a local sum (no reduce-scatter,
# no collective-permute); gathers of [2 layers, 64] vectors (C's diagonal, the power iteration's
# vector); one scalar all-reduce over every device in the loop's test (all run the same trips)
mesh = sharding.make_mesh(model=2, stack=2)
pl = sharding.placements(mesh)
wp = jax.device_put(jnp.zeros((4, 52, 64)), pl.weights)
cfg = aj.awp_pruning(0.5, max_iter=40, step_rule="lambda_max")
assert sharding.shares_memory(mesh)
for split, sum_by, expect in ((False, None, {"all-reduce"}), (True, None, {"all-reduce", "all-to-all", "all-gather"}),
                              (True, "all-to-all", {"all-reduce", "all-to-all", "all-gather"})):
    cp = jax.device_put(jnp.zeros((4, 64, 64)), pl.stats_split if split else pl.stats)
    hlo = sharding.sharded_solver(cfg, mesh, split, sum_by).lower(wp, cp).compile().as_text()
    ops = [l for l in hlo.splitlines() if re.search(r"= .*\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\(", l)]
    kinds = {re.search(r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)", l).group(1) for l in ops}
    assert kinds == expect, (split, kinds)
    for l in ops:  # "%name = (result types) kind(operands)": the result's shapes
        result, kind = re.search(r"= (.*?)\b(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)(?:-start)?\(", l).groups()
        shapes = re.findall(r"\b[a-z]+[0-9]*\[([0-9,]*)\]", result)
        products = split and sum_by is None  # the partial products' all-reduces (CPU devices' default)
        allowed = {"all-reduce": ("", "2", "2,26,64") if products else ("", "2"),
                   "all-to-all": ("2,26,32",) if sum_by is None else ("2,26,32", "2,1,26,64"), "all-gather": ("2,64",)}[kind]
        assert shapes and all(s in allowed for s in shapes), l  # scalars per local layer (2 per device); rows of W − Θ; d_in vectors
        if split and shapes == [""] and "while/cond/pmax" in l:  # the stopping test: run while any layer on the mesh runs
            assert "replica_groups={{0,1,2,3}}" in l, l
            continue
        assert "replica_groups={{0,1},{2,3}}" in l, l  # within a model group only
    if split:  # the partial products: all-reduced (CPU default) or returned by a second all-to-all
        summed = [l for l in ops if re.search(r"= \(?f32\[2,26,64\]", l) and "all-reduce" in l]
        assert bool(summed) == (sum_by is None), (sum_by, summed)

# layers of different shapes are grouped, not rejected
layers = [synthetic_layer(9, 30, 64, 256), synthetic_layer(10, 40, 96, 256), synthetic_layer(11, 30, 64, 256)]
got = sharding.solve_layers(layers, aj.awp_pruning(0.5, max_iter=20), mesh)
for (lw, lc), r in zip(layers, got):
    np.testing.assert_allclose(np.asarray(r.theta), np.asarray(aj.solve_pgd(lw, lc, aj.awp_pruning(0.5, max_iter=20)).theta), atol=1e-6)
print("ok", len(ops))
"""


def test_sharded_solve_equals_unsharded_and_communicates_what_its_placement_predicts():
    # 4 devices, not 8: eight device threads on a 2-core machine deadlocked XLA's CPU collectives in 3
    # of 4 attempts on one day (see conftest.run_on_fake_devices); test_mesh covers 8
    r = run_on_fake_devices(4, "-c", SCRIPT, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-4000:]


def test_one_device_mesh_works_in_process():
    mesh = sharding.make_mesh()
    w, c = synthetic_layer(0, 24, 64, 256)
    res = sharding.solve_sharded(w[None], c[None], aj.awp_pruning(0.5, max_iter=15), mesh)
    ref = aj.solve_pgd(w, c, aj.awp_pruning(0.5, max_iter=15))
    np.testing.assert_allclose(np.asarray(res.theta[0]), np.asarray(ref.theta), atol=1e-6)


CACHE_SCRIPT = r"""
import sys, numpy as np, jax
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
import awp_jax as aj
from awp_jax import sharding
from awp_jax.cli import synthetic_layer

w, c = (np.stack(a) for a in zip(*[synthetic_layer(s, 51, 64, 512) for s in range(3)]))
cfg = aj.awp_pruning(0.5, max_iter=5, momentum=True, step_rule="lambda_max", step_scale=1.0, refit_iters=10, refit_damping=0.1)
ref = np.asarray(aj.solve_pgd_stack(w, c, cfg).theta)
mesh = sharding.make_mesh(model=2, stack=2)
errs = [float(np.abs(np.asarray(sharding.solve_sharded(w, c, cfg, mesh).theta) - ref).max()) for _ in range(int(sys.argv[2]))]
assert max(errs) <= 1e-5, errs
print("ok", errs)
"""


def test_a_sharded_solve_loaded_from_the_compilation_cache_equals_the_unsharded_one(tmp_path):
    # the split C's products summed by a ring of collective-permutes returned wrong values in 18 of
    # 80 calls of this solve once loaded from JAX's persistent compilation cache (jax 0.10.2, CPU)
    cache = tmp_path / "xla-cache"
    first = run_on_fake_devices(4, "-c", CACHE_SCRIPT, str(cache), "1", timeout=600)
    assert first.returncode == 0 and "ok" in first.stdout, first.stderr[-4000:]
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "nothing was written to the compilation cache"
    again = run_on_fake_devices(4, "-c", CACHE_SCRIPT, str(cache), "10", timeout=600)
    assert again.returncode == 0 and "ok" in again.stdout, again.stderr[-4000:]
    assert sorted(p.name for p in cache.iterdir()) == entries  # every compilation came from the cache

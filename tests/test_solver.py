import jax
import dataclasses
import jax.numpy as jnp
import numpy as np
import hypothesis
import hypothesis.strategies as st
import pytest

import awp_jax as aj
from awp_jax import methods, solver
from awp_jax.projections import keep_count, row_topk
from awp_jax.quantizers import QuantSpec
from awp_jax.saliency import wanda_score
from awp_jax.schedules import Phase, Schedule, joint
from conftest import correlated_activations


def _levels_per_group(theta, g):
    t = np.asarray(theta).reshape(theta.shape[0], -1, g)
    return max(len(np.unique(grp)) for row in t for grp in row)


def test_awp_pruning_beats_wanda_start_and_magnitude(layer_problem):
    w, c = layer_problem
    for p in (0.5, 0.7):
        res = aj.solve_pgd(w, c, aj.awp_pruning(p))
        k = keep_count(p, w.shape[1])
        wanda = aj.objective(w, aj.project(w, k=k, score=wanda_score(w, c)), c)
        magnitude = aj.objective(w, row_topk(w, k), c)
        np.testing.assert_allclose(res.obj_init, wanda, rtol=1e-5)  # it starts at Wanda
        assert float(res.obj_final) < 0.95 * float(wanda)
        assert float(res.obj_final) < float(magnitude)
        assert np.all(np.asarray(res.theta != 0).sum(axis=1) <= k)
        np.testing.assert_allclose(res.obj_final, aj.objective(w, res.theta, c), rtol=1e-4)


def test_awp_nm_beats_wanda_nm(layer_problem):
    w, c = layer_problem
    res = aj.solve_pgd(w, c, aj.awp_nm(2, 4, max_iter=100))
    mask = np.asarray(res.theta != 0).reshape(w.shape[0], -1, 4)
    assert np.all(mask.sum(-1) <= 2)
    assert float(res.obj_final) < 0.95 * float(res.obj_init)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_awp_quantization_beats_rtn_and_stays_on_grid(layer_problem, bits):
    w, c = layer_problem
    res = aj.solve_pgd(w, c, aj.awp_quantization(bits, 128, iters=30))
    rtn = aj.objective(w, aj.rtn(w, QuantSpec(bits=bits, group_size=128)), c)
    np.testing.assert_allclose(res.obj_init, rtn, rtol=1e-5)
    assert float(res.obj_final) < float(rtn)
    assert _levels_per_group(res.theta, 128) <= 2**bits


def test_joint_schedule_as_data():
    s = joint(0.5, QuantSpec(bits=4, group_size=128))
    tab = s.tables(256)
    assert s.max_iter == 100 and tab.final_start == 50
    # ramp 0 → 50% over the first 25 updates, linear, then constant
    expected = np.round((1 - 0.5 * np.arange(1, 26) / 25) * 256).astype(int)
    np.testing.assert_array_equal(tab.keep[:25], expected)
    assert np.all(tab.keep[25:] == 128)
    assert not tab.quantize[:50].any() and tab.quantize[50:].all()


@pytest.mark.parametrize("init", ["dense", "wanda"])
def test_joint_result_is_sparse_and_quantized(layer_problem, init):
    w, c = layer_problem
    res = aj.solve_pgd(w, c, aj.awp_joint(0.5, 4, 128, init=init))
    theta = np.asarray(res.theta)
    assert np.all((theta != 0).sum(axis=1) <= 128)
    assert _levels_per_group(res.theta, 128) <= 16
    assert int(res.best_iteration) > 50  # returned iterate comes from the joint phase
    # it improves on its own starting mask followed by RTN of the kept weights
    k = keep_count(0.5, 256)
    spec = QuantSpec(bits=4, group_size=128)
    score = wanda_score(w, c) if init == "wanda" else None  # the paper's ramp from W ends near magnitude
    start = aj.project(w, k=k, quant=spec, score=score)
    assert float(res.obj_final) < float(aj.objective(w, start, c))


def test_compiles_once_per_shape_and_config(rng):
    cfg = aj.awp_pruning(0.5, max_iter=5)
    w = rng.standard_normal((8, 32)).astype(np.float32)
    c = correlated_activations(rng, 32, 256)
    before = solver.trace_count()
    for scale in (1.0, 2.0, 3.0):
        aj.solve_pgd(scale * w, c, cfg).theta.block_until_ready()
    assert solver.trace_count() - before == 1
    # another sparsity is data (the keep table), not a new program: blocks of a non-uniform allocation share it
    other = aj.solve_pgd(w, c, aj.awp_pruning(0.6, max_iter=5))
    assert solver.trace_count() - before == 1
    assert np.all((np.asarray(other.theta) != 0).sum(axis=1) == 13)  # round(0.4 * 32): the 0.6 table was used
    aj.solve_pgd(w, c, aj.awp_pruning(0.6, max_iter=6))  # new structure: one more
    assert solver.trace_count() - before == 2


def test_vmap_lanes_equal_single_solves_bit_for_bit(rng):
    # planted k-sparse rows: IHT from zero converges, faster on better-conditioned C
    L, d_out, d_in = 4, 16, 64
    ws = (rng.standard_normal((L, d_out, d_in)) * (rng.random((L, d_out, d_in)) < 0.25)).astype(np.float32)
    cs = []
    for kappa in (2.0, 4.0, 8.0, 16.0):
        q, _ = np.linalg.qr(rng.standard_normal((d_in, d_in)))
        cs.append((q * np.geomspace(1, kappa, d_in)) @ q.T)
    cs = np.stack(cs).astype(np.float32)
    cfg = aj.awp_pruning(0.5, max_iter=300, tol=1e-4, init="zeros", step_rule="lambda_max", step_scale=1.0)
    stacked = aj.solve_pgd_stack(ws, cs, cfg)
    iters = []
    for i in range(L):
        single = aj.solve_pgd(ws[i], cs[i], cfg)
        np.testing.assert_array_equal(stacked.theta[i], single.theta)
        assert int(stacked.iterations[i]) == int(single.iterations)
        assert int(stacked.stop_reason[i]) == int(single.stop_reason) == aj.StopReason.CONVERGED
        iters.append(int(single.iterations))
    assert iters == sorted(iters) and iters[0] < iters[-1], iters  # lanes stopped at different iterations
    # explicit theta0 per lane
    th0 = np.zeros_like(ws)
    stacked0 = aj.solve_pgd_stack(ws, cs, cfg, theta0=th0)
    np.testing.assert_array_equal(stacked0.theta[2], aj.solve_pgd(ws[2], cs[2], cfg, theta0=th0[2]).theta)


def test_converged_stop_reason_and_tolerance(rng):
    # C = I: one step with η = 1 lands on H_k(W), whose gradient W − H_k(W) is then fixed.
    w = rng.standard_normal((8, 32)).astype(np.float32)
    c = np.eye(32, dtype=np.float32)
    k = 16
    resid = np.linalg.norm(w - np.asarray(row_topk(w, k))) / np.linalg.norm(w)
    cfg = aj.PGDConfig(
        schedule=Schedule(phases=(Phase(iters=50, sparsity=0.5),)), step_rule="absolute", step_scale=1.0,
        init="zeros", tol=float(resid) * 1.001,
    )
    res = aj.solve_pgd(w, c, cfg)
    assert aj.StopReason(int(res.stop_reason)) is aj.StopReason.CONVERGED
    assert int(res.iterations) == 1
    np.testing.assert_allclose(res.theta, row_topk(w, k), rtol=1e-6)
    cfg_never = aj.PGDConfig(schedule=cfg.schedule, step_rule="absolute", step_scale=1.0, init="zeros", tol=0.0)
    res = aj.solve_pgd(w, c, cfg_never)
    assert aj.StopReason(int(res.stop_reason)) is aj.StopReason.MAX_ITER and int(res.iterations) == 50


def test_nonfinite_update_is_rejected_and_reported(rng):
    # finite inputs whose objective overflows float32 after the first step
    w = np.full((4, 16), 1e18, np.float32)
    c = (np.eye(16) * 1e6).astype(np.float32)
    cfg = aj.PGDConfig(schedule=Schedule(phases=(Phase(iters=20, sparsity=0.5),)), init="zeros", tol=0.0)
    res = aj.solve_pgd(w, c, cfg)
    assert aj.StopReason(int(res.stop_reason)) is aj.StopReason.NONFINITE
    assert np.all(np.isfinite(np.asarray(res.theta)))


def test_trace_records_objective_of_each_iterate(layer_problem):
    w, c = layer_problem
    cfg = aj.awp_pruning(0.5, max_iter=20, trace=True, keep_best=False)
    res = aj.solve_pgd(w, c, cfg)
    path, _ = aj.pgd_path(w, c, aj.awp_pruning(0.5, max_iter=20))
    objs = [float(aj.objective(w, p, c)) for p in path]
    np.testing.assert_allclose(res.trace_obj, objs, rtol=1e-4)
    np.testing.assert_allclose(res.theta, path[-1], rtol=1e-6, atol=1e-8)


def test_keep_best_returns_lowest_final_phase_objective(layer_problem):
    w, c = layer_problem
    res = aj.solve_pgd(w, c, aj.awp_pruning(0.7, max_iter=40, trace=True))
    tr = np.asarray(res.trace_obj)  # includes the (feasible) Wanda start at index 0
    assert float(res.obj_final) == pytest.approx(np.nanmin(tr), rel=1e-6)
    assert int(res.best_iteration) == int(np.nanargmin(tr))
    assert float(res.obj_final) <= float(res.obj_init)


def test_result_never_worse_than_a_feasible_start(layer_problem):
    w, c = layer_problem
    # a step far too large: iterates get worse than RTN, and the RTN start is returned
    res = aj.solve_pgd(w, c, aj.awp_quantization(3, 128, iters=5, step_scale=50.0))
    assert int(res.best_iteration) == 0 and float(res.obj_final) == float(res.obj_init)
    np.testing.assert_array_equal(res.theta, aj.rtn(w, QuantSpec(bits=3, group_size=128)))


def test_step_rules(layer_problem):
    w, c = layer_problem
    lam = np.linalg.eigvalsh(c.astype(np.float64))[-1]
    r = aj.solve_pgd(w, c, aj.awp_pruning(0.5, max_iter=2, step_rule="lambda_max", step_scale=1.0))
    np.testing.assert_allclose(r.step_size, 1.0 / lam, rtol=1e-3)
    r = aj.solve_pgd(w, c, aj.awp_pruning(0.5, max_iter=2))
    np.testing.assert_allclose(r.step_size, 2.0 / np.linalg.norm(c.astype(np.float64)), rtol=1e-5)


def test_float64_inputs_compute_in_float64(layer_problem):
    w, c = layer_problem
    with jax.enable_x64(True):
        res = aj.solve_pgd(w.astype(np.float64), c.astype(np.float64), aj.awp_pruning(0.5, max_iter=5))
        assert res.theta.dtype == jnp.float64


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda w, c: (w[None], c), "W must have 2 dimensions"),
        (lambda w, c: (w, c[:, :10]), r"C must be \[d_in, d_in\]"),
        (lambda w, c: (w.astype(np.int32), c), "floating-point"),
        (lambda w, c: (np.where(np.eye(*w.shape, dtype=bool), np.nan, w), c), "W contains NaN"),
        (lambda w, c: (w, np.where(np.eye(*c.shape, dtype=bool), np.inf, c)), "C contains NaN or Inf"),
    ],
)
def test_bad_inputs_rejected_before_compiling(layer_problem, make, match):
    w, c = layer_problem
    before = solver.trace_count()
    with pytest.raises((ValueError, TypeError), match=match):
        aj.solve_pgd(*make(w, c), aj.awp_pruning(0.5))
    assert solver.trace_count() == before


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: aj.awp_pruning(1.0), r"sparsity must be a number in \[0, 1\)"),
        (lambda: aj.awp_pruning(-0.1), "sparsity"),
        (lambda: aj.awp_pruning(float("nan")), "sparsity"),
        (lambda: aj.awp_quantization(bits=1), "bits must be an integer in 2..8"),
        (lambda: aj.awp_quantization(bits=9), "bits"),
        (lambda: aj.awp_nm(4, 2), "1 <= N <= M"),
        (lambda: aj.awp_pruning(0.5, step_rule="newton"), "step_rule"),
        (lambda: aj.awp_pruning(0.5, init="rtn"), "init='rtn' needs"),
        (lambda: aj.awp_quantization(4, 128, init="wanda"), "needs a schedule that prunes"),
        (lambda: aj.awp_pruning(0.5, matmul_dtype="float16"), "matmul_dtype must be 'float32' or 'bfloat16'"),
    ],
)
def test_bad_configs_rejected(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_schedule_incompatible_with_layer_rejected(layer_problem):
    w, c = layer_problem  # d_in = 256
    with pytest.raises(ValueError, match="does not divide d_in=256"):
        aj.solve_pgd(w, c, aj.awp_quantization(4, 96))
    w6 = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match="multiple of 4"):
        aj.solve_pgd(w6, np.eye(6, dtype=np.float32), aj.awp_nm(2, 4))


def test_awq_grid_in_scaled_space_and_beats_rtn(layer_problem):
    from awp_jax.awq import awq

    w, c = layer_problem
    spec = QuantSpec(bits=3, group_size=128)
    q, alpha = awq(w, c, spec)
    theta = q.dense()
    assert 0.0 <= float(alpha) < 1.0
    assert float(aj.objective(w, theta, c)) < float(aj.objective(w, aj.rtn(w, spec), c))
    # theta · diag(s) lies on a 3-bit group grid for the chosen s (the typed result's column scales are 1/s)
    a = np.sqrt(np.diagonal(c))
    s = a ** float(alpha)
    s = s / np.sqrt(s.max() * s.min())
    np.testing.assert_allclose(np.asarray(q.col_scale_inv), 1 / s, rtol=1e-5)
    scaled = np.asarray(theta) * s[None, :]
    assert _levels_per_group(scaled.round(5), 128) <= 8
    assert int(np.asarray(q.codes).max()) < 8


def test_momentum_reaches_lower_objective_in_fewer_iterations(layer_problem):
    w, c = layer_problem
    plain_200 = aj.solve_pgd(w, c, aj.awp_pruning(0.5, max_iter=200))
    fast_50 = aj.solve_pgd(w, c, aj.awp_pruning(0.5, max_iter=50, momentum=True))
    assert float(fast_50.obj_final) < float(plain_200.obj_final)
    assert np.all(np.asarray(fast_50.theta != 0).sum(axis=1) <= 128)
    # stacked momentum lanes equal single solves too
    cfg = aj.awp_pruning(0.5, max_iter=20, momentum=True)
    stacked = aj.solve_pgd_stack(np.stack([w, 2 * w]), np.stack([c, c]), cfg)
    np.testing.assert_array_equal(stacked.theta[1], aj.solve_pgd(2 * w, c, cfg).theta)
    # the path driver runs the same solver object: its iterate n is the solve stopped after n steps
    path, _ = aj.pgd_path(w, c, cfg)
    last = aj.solve_pgd(w, c, aj.awp_pruning(0.5, max_iter=20, momentum=True, tol=0.0, keep_best=False))
    np.testing.assert_array_equal(path[-1], last.theta)
    assert not np.array_equal(path[-1], aj.pgd_path(w, c, aj.awp_pruning(0.5, max_iter=20))[0][-1])


def test_bf16_matmuls_reach_nearly_the_float32_objective_and_report_it_exactly(layer_problem):
    w, c = layer_problem
    for cfg in (aj.awp_pruning(0.5, max_iter=100, momentum=True, step_rule="lambda_max", step_scale=1.0),
                aj.awp_quantization(4, 128, iters=30)):
        full = aj.solve_pgd(w, c, cfg)
        half = aj.solve_pgd(w, c, dataclasses.replace(cfg, matmul_dtype="bfloat16"))
        # the reported figures are float32 ones, of the returned point and of the start
        np.testing.assert_allclose(half.obj_final, aj.objective(w, half.theta, c), rtol=1e-4)
        np.testing.assert_allclose(half.obj_init, full.obj_init, rtol=1e-5)
        # bf16 operands (8-bit mantissa) cost at most a few percent of the objective, and still improve on the start
        assert float(half.obj_final) < float(half.obj_init)
        assert float(half.obj_final) < 1.03 * float(full.obj_final)
        assert not np.array_equal(np.asarray(half.theta), np.asarray(full.theta))  # the option is really used
    assert _levels_per_group(half.theta, 128) <= 16  # the last config is INT4: still on its grid
    pruned = aj.solve_pgd(w, c, aj.awp_pruning(0.5, max_iter=20, matmul_dtype="bfloat16"))
    assert np.all(np.asarray(pruned.theta != 0).sum(axis=1) <= 128)


def test_refit_support_reaches_the_least_squares_optimum_on_the_mask(rng):
    d_out, d = 6, 24
    x = rng.standard_normal((d, 400)) * np.geomspace(1, 30, d)[:, None]
    c = x @ x.T / 400
    w = rng.standard_normal((d_out, d))
    theta = np.asarray(aj.project(w, k=10))
    with jax.enable_x64(True):
        refit = np.asarray(aj.refit_support(w, c, theta, iters=2 * d))
    mask = theta != 0
    assert np.array_equal(refit != 0, mask)  # the support is kept
    for i in range(d_out):  # row i: C_SS θ_S = (W C)_S
        s = mask[i]
        exact = np.linalg.solve(c[np.ix_(s, s)], (w[i] @ c)[s])
        np.testing.assert_allclose(refit[i, s], exact, rtol=1e-6, atol=1e-9)


def test_refit_lowers_the_objective_and_keeps_the_constraint(layer_problem):
    w, c = layer_problem
    base = aj.solve_pgd(w, c, aj.awp_pruning(0.6, max_iter=30))
    res = aj.solve_pgd(w, c, aj.awp_pruning(0.6, max_iter=30, refit_iters=40))
    assert float(res.obj_final) < 0.97 * float(base.obj_final)
    assert np.all(np.sum(np.asarray(res.theta) != 0, axis=1) <= aj.keep_count(0.6, w.shape[1]))
    with pytest.raises(ValueError, match="refit_iters needs a pruning schedule without quantization"):
        aj.awp_joint(0.5, 4, 64, refit_iters=5)


def test_layer_scope_keeps_the_layer_count_and_rows_may_differ(layer_problem):
    w, c = layer_problem
    res = aj.solve_pgd(w, c, aj.awp_pruning(0.5, max_iter=30, scope="layer"))
    per_row = np.sum(np.asarray(res.theta) != 0, axis=1)
    assert per_row.sum() == aj.keep_count(0.5, w.shape[1]) * w.shape[0]
    assert per_row.min() < per_row.max()
    with pytest.raises(ValueError, match="scope='layer' applies to unstructured"):
        aj.awp_nm(2, 4, scope="layer")


def test_awp_from_sparsegpt_is_never_worse_than_sparsegpt(layer_problem):
    from awp_jax import methods

    w, c = layer_problem
    for spec in (methods.Constraint(sparsity=0.7), methods.Constraint(nm=(2, 4))):
        sg = methods.compress_layer("sparsegpt", w, c, spec).theta
        th = np.asarray(methods.compress_layer("awp", w, c, spec, methods.AWPOptions(init="sparsegpt", refit_iters=40, max_iter=20)).theta)
        assert float(aj.objective(w, th, c)) < 0.98 * float(aj.objective(w, sg, c))
        if spec.nm:
            assert np.all((th != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2)
        else:
            assert np.sum(th != 0) <= aj.keep_count(0.7, w.shape[1]) * w.shape[0]
    with pytest.raises(ValueError, match="SparseGPT's mask is not per row"):
        methods.compress_layer("awp", w, c, methods.Constraint(sparsity=0.5), methods.AWPOptions(init="sparsegpt", scope="row"))


def test_damped_refit_minimises_the_damped_objective_on_the_mask(rng):
    d_out, d = 4, 16
    x = rng.standard_normal((d, 300)) * np.geomspace(1, 10, d)[:, None]
    c = x @ x.T / 300
    w = rng.standard_normal((d_out, d))
    cfg = aj.awp_pruning(0.5, max_iter=1, init="magnitude", refit_iters=3 * d, refit_damping=0.1, tol=0.0)
    with jax.enable_x64(True):
        res = aj.solve_pgd(w, c, cfg)
        plain = aj.solve_pgd(w, c, dataclasses.replace(cfg, refit_damping=0.0))
    theta = np.asarray(res.theta)
    cd = c + 0.1 * np.mean(np.diag(c)) * np.eye(d)
    for i in range(d_out):
        s = theta[i] != 0
        np.testing.assert_allclose(theta[i, s], np.linalg.solve(cd[np.ix_(s, s)], (w[i] @ cd)[s]), rtol=1e-6)
    assert float(plain.obj_final) <= float(res.obj_final)  # the undamped refit fits the sample best
    with pytest.raises(ValueError, match="refit_damping must be >= 0"):
        aj.awp_pruning(0.5, refit_damping=-1.0)


def test_awp_from_awq_keeps_awqs_scales_and_lowers_its_objective(layer_problem):
    from awp_jax import methods, packed

    w, c = layer_problem
    for base, spec in (("awq", methods.Constraint(bits=3, group_size=64)),
                       ("wanda_awq", methods.Constraint(sparsity=0.5, bits=4, group_size=64))):
        ref = methods.compress_layer(base, w, c, spec)
        res = methods.compress_layer("awp", w, c, spec, methods.AWPOptions(init="awq"))
        # the same per-channel scales as AWQ's result, and a lower layer objective
        np.testing.assert_array_equal(np.asarray(res.q.col_scale_inv), np.asarray(ref.q.col_scale_inv))
        assert float(aj.objective(w, res.theta, c)) < 0.99 * float(aj.objective(w, ref.theta, c))
        theta = np.asarray(res.theta)
        # exactly on the scaled grid: the lossless encoding round-trips, ≤ 2^b levels per group
        enc = packed.encode(theta, q=res.q, pruned=spec.prunes)
        np.testing.assert_array_equal(packed.decode(enc), theta)
        q = np.asarray(res.q.grid_values()).reshape(w.shape[0], -1, 64)
        assert max(len(np.unique(g[g != 0] if spec.prunes else g)) for g in q.reshape(-1, 64)) <= 2**spec.bits
        if spec.prunes:
            assert np.all(np.sum(theta != 0, axis=1) <= aj.keep_count(0.5, w.shape[1]))
    with pytest.raises(ValueError, match="init='awq' is for quantization"):
        methods.compress_layer("awp", w, c, methods.Constraint(sparsity=0.5), methods.AWPOptions(init="awq"))


@pytest.mark.parametrize("sparsity,nm,scope", [(0.7, None, "row"), (0.7, None, "layer"), (0.0, (2, 4), "row")])
def test_admm_is_feasible_and_no_worse_than_its_start(layer_problem, sparsity, nm, scope):
    """ALPS's splitting as a solver object on the same driver: the result keeps the constraint and
    lowers the objective below its Wanda start (and, on this layer, below 200 PGD iterations)."""
    w, c = layer_problem
    con = methods.Constraint(sparsity=sparsity, nm=nm)
    opts = methods.AWPOptions(algorithm="admm", **({"scope": scope} if nm is None else {}))
    res = methods.compress_layer("awp", w, c, con, opts)
    theta = np.asarray(res.theta)
    if nm is None and scope == "row":
        assert np.all((theta != 0).sum(axis=1) <= round(0.3 * w.shape[1]))
    elif nm is None:
        assert (theta != 0).sum() <= round(0.3 * w.shape[1]) * w.shape[0]
    else:
        assert np.all((theta.reshape(w.shape[0], -1, 4) != 0).sum(axis=-1) <= 2)
    start = float(aj.objective(w, np.asarray(methods.compress_layer("wanda", w, c, con).theta), c))
    assert float(aj.objective(w, theta, c)) < start
    assert res.info.stop in ("converged", "max_iter") and res.info.iterations <= 300
    if nm is None and scope == "row":
        pgd = methods.compress_layer("awp", w, c, con)
        assert float(aj.objective(w, theta, c)) < float(aj.objective(w, np.asarray(pgd.theta), c))
    with pytest.raises(ValueError, match="algorithm='admm' is for pruning only"):
        methods.awp_config(methods.Constraint(bits=4), methods.AWPOptions(algorithm="admm"))


# --- row chunks: a large layer solved a slice of rows at a time -----------------------------------


def test_row_chunks_cover_the_rows_in_pieces_within_the_budget():
    for d_out, row_bytes, budget in [(4096, 11008 * 4, 64 * 2**20), (11008, 4096 * 4, 64 * 2**20), (97, 40, 400), (10, 8, 8)]:
        chunks = solver.row_chunks(d_out, row_bytes, budget)
        assert chunks[0][0] == 0 and chunks[-1][1] == d_out
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))  # contiguous, in order
        assert all(0 < (r1 - r0) * row_bytes <= budget for r0, r1 in chunks), (d_out, chunks)
    assert solver.row_chunks(4096, 11008 * 4, 64 * 2**20) == [(i * 1024, (i + 1) * 1024) for i in range(4)]  # 3 needed, 4 divide
    assert len({r1 - r0 for r0, r1 in solver.row_chunks(11008, 4096 * 4, 64 * 2**20)}) == 1
    assert solver.row_chunks(100, 4, None) == solver.row_chunks(100, 4, 0) == solver.row_chunks(100, 4, 400) == [(0, 100)]


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.integers(1, 5000), st.integers(1, 64), st.integers(1, 10**5))
def test_row_chunks_property(d_out, row_bytes, budget):
    chunks = solver.row_chunks(d_out, row_bytes, budget)
    assert chunks[0][0] == 0 and chunks[-1][1] == d_out and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert all((r1 - r0) * row_bytes <= max(budget, row_bytes) for r0, r1 in chunks)  # one row at least
    assert len(chunks) == 1 or d_out * row_bytes > budget


def test_chunked_solve_equals_the_whole_layer_for_plain_iterations(layer_problem):
    # plain PGD for a fixed number of iterations treats every row on its own: chunks change nothing
    w, c = layer_problem
    cfg = aj.awp_pruning(0.5, max_iter=20, tol=0.0, keep_best=False)
    whole = aj.solve_pgd(w, c, cfg)
    budget = 40 * w.shape[1] * 4  # 96 rows: 3 chunks of 32
    part = aj.solve_pgd(w, c, cfg, max_chunk_bytes=budget)
    assert isinstance(part.theta, np.ndarray)  # combined on the host
    np.testing.assert_allclose(part.theta, np.asarray(whole.theta), rtol=0, atol=1e-6)
    for f in ("obj_init", "obj_final", "obj_dense", "grad_norm"):
        np.testing.assert_allclose(getattr(part, f), getattr(whole, f), rtol=1e-5, err_msg=f)
    assert int(part.iterations) == 20 and int(part.stop_reason) == solver.StopReason.MAX_ITER
    # a stack: every lane's same rows form a chunk
    ws, cs = np.stack([w, 0.5 * w]), np.stack([c, c])
    whole = aj.solve_pgd_stack(ws, cs, cfg)
    part = aj.solve_pgd_stack(ws, cs, cfg, max_chunk_bytes=2 * budget)
    np.testing.assert_allclose(part.theta, np.asarray(whole.theta), rtol=0, atol=1e-6)
    np.testing.assert_allclose(part.obj_final, whole.obj_final, rtol=1e-5)


def test_chunked_default_recipe_solve_is_feasible_and_never_worse_than_its_start(layer_problem):
    # the default recipe's solve (momentum restarts, keep-best, CG refit) decides per chunk; each chunk keeps
    # its best point, and the objective is a sum over rows, so the whole is never worse than the Wanda start
    w, c = layer_problem
    cfg = aj.awp_pruning(0.5, max_iter=5, momentum=True, step_rule="lambda_max", step_scale=1.0, refit_iters=10,
                         refit_damping=0.1)
    whole = aj.solve_pgd(w, c, cfg)
    part = aj.solve_pgd(w, c, cfg, max_chunk_bytes=24 * w.shape[1] * 4)  # 4 chunks of 24 rows
    k = keep_count(0.5, w.shape[1])
    assert np.all((part.theta != 0).sum(axis=1) <= k)
    np.testing.assert_allclose(part.obj_init, whole.obj_init, rtol=1e-5)  # the same Wanda start
    np.testing.assert_allclose(part.obj_final, aj.objective(w, part.theta, c), rtol=1e-4)  # the sum is the objective
    assert float(part.obj_final) < 0.9 * float(part.obj_init)
    assert abs(float(part.obj_final) / float(whole.obj_final) - 1) < 0.02


def test_solves_that_do_not_separate_over_rows_are_not_chunked(layer_problem):
    w, c = layer_problem
    budget = 24 * w.shape[1] * 4
    for cfg in (aj.awp_pruning(0.5, max_iter=10, scope="layer"), aj.awp_pruning(0.5, max_iter=30, algorithm="admm"),
                aj.awp_pruning(0.5, max_iter=10, trace=True)):
        assert not solver.chunkable(cfg)
        np.testing.assert_array_equal(np.asarray(aj.solve_pgd(w, c, cfg, max_chunk_bytes=budget).theta),
                                      np.asarray(aj.solve_pgd(w, c, cfg).theta))


def test_awp_reports_its_row_chunks_and_takes_the_chunk_size_as_an_option():
    from awp_jax.cli import synthetic_layer
    w, c = synthetic_layer(0, 512, 1024, 2048)  # 2 MiB of float32 weights
    con = methods.Constraint(sparsity=0.5)
    res = methods.compress_layer("awp", w, c, con, methods.AWPOptions(max_iter=5, momentum=True, chunk_mb=1))
    assert res.info.note == "solved in 2 row chunks"
    assert methods.compress_layer("awp", w, c, con, methods.AWPOptions(max_iter=5, chunk_mb=0)).info.note is None
    whole = methods.compress_layer("awp", w, c, con, methods.AWPOptions(max_iter=5, scope="layer", chunk_mb=1))
    assert whole.info.note.startswith("solved whole though over chunk_mb=1 (layer scope")
    with pytest.raises(ValueError, match="chunk_mb must be an integer >= 0"):
        methods.AWPOptions(chunk_mb=-1)

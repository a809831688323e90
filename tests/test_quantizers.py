import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awp_jax.quantizers import QuantSpec, dequantize, fake_quantize, quantize, rtn

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def quant_case(draw):
    bits = draw(st.integers(2, 8))
    # a few fixed shapes keep compilation out of the loop; the values vary freely
    n_groups = draw(st.sampled_from([1, 4]))
    gs = draw(st.sampled_from([4, 8, 32]))
    per_row = draw(st.booleans())
    sym = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    rows = draw(st.sampled_from([1, 6]))
    partial = not per_row and draw(st.booleans())  # a shorter last group (GPTQ convention)
    r = np.random.default_rng(seed)
    w = r.standard_normal((rows, n_groups * gs + (gs // 2 if partial else 0))) * r.uniform(0.01, 10)
    if draw(st.booleans()):  # some all-positive groups and exact zeros
        w[:, :gs] = np.abs(w[:, :gs])
        w[r.random(w.shape) < 0.3] = 0.0
    spec = QuantSpec(bits=bits, group_size=None if per_row else gs, symmetric=sym, partial_groups=partial)
    return jnp.asarray(w, jnp.float32), spec


@SETTINGS
@given(quant_case())
def test_at_most_2_pow_b_levels_per_group(case):
    w, spec = case
    q = quantize(w, spec)
    deq = np.asarray(dequantize(q, spec))
    g = spec.group_size or w.shape[1]
    assert q.scale.shape == (w.shape[0], -(-w.shape[1] // g))
    for row in deq:
        for start in range(0, w.shape[1], g):
            assert len(np.unique(row[start : start + g])) <= 2**spec.bits
    assert int(np.max(np.asarray(q.codes))) <= 2**spec.bits - 1


@SETTINGS
@given(quant_case())
def test_error_at_most_half_a_step_and_zero_exact(case):
    w, spec = case
    q = quantize(w, spec)
    deq = dequantize(q, spec)
    g = spec.group_size or w.shape[1]
    step = np.repeat(np.asarray(q.scale), g, axis=1)[:, : w.shape[1]]
    err = np.abs(np.asarray(deq) - np.asarray(w))
    assert np.all(err <= 0.5 * step * (1 + 1e-5) + 1e-30)
    assert np.all(np.asarray(deq)[np.asarray(w) == 0] == 0)


@SETTINGS
@given(quant_case())
def test_fake_quantize_equals_codes_roundtrip(case):
    w, spec = case
    np.testing.assert_allclose(fake_quantize(w, spec), dequantize(quantize(w, spec), spec), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rtn(w, spec), fake_quantize(w, spec), rtol=0, atol=0)


@SETTINGS
@given(quant_case())
def test_quantization_is_idempotent(case):
    w, spec = case
    once = fake_quantize(w, spec)
    twice = fake_quantize(once, spec)
    step = float(jnp.max(quantize(w, spec).scale))
    np.testing.assert_allclose(twice, once, rtol=0, atol=1e-4 * step)


def test_straight_through_gradient_is_identity():
    spec = QuantSpec(bits=3, group_size=8)
    w = jnp.linspace(-1.0, 1.0, 32).reshape(2, 16)
    target = jnp.arange(32.0).reshape(2, 16)
    g = jax.grad(lambda x: jnp.sum(fake_quantize(x, spec) * target))(w)
    np.testing.assert_array_equal(g, target)
    # the forward value is the quantized one, not w
    assert not np.allclose(fake_quantize(w, spec), w)


def test_symmetric_grid_is_symmetric_around_zero():
    spec = QuantSpec(bits=4, group_size=None, symmetric=True)
    w = jnp.array([[-1.0, -0.5, 0.0, 0.5, 1.0, 0.3, -0.3, 0.9]])
    deq = np.asarray(rtn(w, spec))
    np.testing.assert_allclose(deq, -np.asarray(rtn(-w, spec)), atol=1e-7)
    assert np.asarray(quantize(w, spec).zero).item() == 8


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True])
def test_bad_bits_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("gs", [0, -8, 2.5])
def test_bad_group_size_rejected(gs):
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(bits=4, group_size=gs)


def test_group_size_must_divide_d_in_unless_partial_groups_allowed():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 576)), jnp.float32)
    with pytest.raises(ValueError, match="does not divide d_in=576"):
        quantize(w, QuantSpec(bits=4, group_size=128))
    spec = QuantSpec(bits=4, group_size=128, partial_groups=True)
    q = quantize(w, spec)
    assert q.scale.shape == (3, 5)
    # the last group (64 columns) is quantized on its own grid, exactly as if alone
    alone = rtn(w[:, 512:], QuantSpec(bits=4, group_size=None))
    np.testing.assert_allclose(dequantize(q, spec)[:, 512:], alone, rtol=1e-6)


@SETTINGS
@given(quant_case(), st.sampled_from(["float16", "bfloat16"]), st.booleans())
def test_grids_for_storage_formats_hold_their_scales_exactly(case, scale_dtype, float_min):
    """A grid made for a format's scale type (GGUF: float16; compressed-tensors: the model's dtype)
    has scales (and a float minimum) of that type and ≤ 2^b levels per group."""
    import dataclasses

    w, spec = case
    spec = dataclasses.replace(spec, scale_dtype=scale_dtype, float_min=float_min and not spec.symmetric and not spec.partial_groups,
                               full_range=float_min and spec.symmetric)
    q = quantize(w, spec)
    dt = {"float16": np.float16, "bfloat16": jnp.bfloat16}[scale_dtype]
    for field in (q.scale,) + ((q.zero,) if spec.float_min else ()):
        f = np.asarray(field, np.float32)
        np.testing.assert_array_equal(np.asarray(jnp.asarray(f).astype(dt).astype(jnp.float32)), f)
    vals = q.dense()
    g = spec.group_size or w.shape[1]
    for row in np.asarray(vals):
        for i in range(0, row.size, g):
            assert len(np.unique(row[i:i + g])) <= 2**spec.bits
    # the typed result is the projection: its codes and grid give rtn's values exactly
    np.testing.assert_array_equal(np.asarray(rtn(w, spec)), np.asarray(vals))
    if spec.symmetric:
        # symmetric grids are fixed points of the projection (the largest magnitude keeps its code), so
        # their values give back the same grid; with a zero point or a float minimum the top code can be
        # lost when the scale is rounded, which is why the solver hands over the point it fitted the
        # grid on (PGDResult.source), not its values
        np.testing.assert_array_equal(np.asarray(rtn(vals, spec)), np.asarray(vals))
        np.testing.assert_array_equal(np.asarray(quantize(vals, spec).dense()), np.asarray(vals))


def test_grid_settings_are_checked():
    with pytest.raises(ValueError, match="scale_dtype must be one of"):
        QuantSpec(scale_dtype="float64")
    with pytest.raises(ValueError, match="either symmetric or has a float minimum"):
        QuantSpec(symmetric=True, float_min=True)
    with pytest.raises(ValueError, match="full_range is a kind of symmetric grid"):
        QuantSpec(full_range=True)
    from awp_jax.methods import Constraint

    with pytest.raises(ValueError, match="does not hold 0"):
        Constraint(sparsity=0.5, bits=4, float_min=True, partial_groups=False)
    with pytest.raises(ValueError, match="shorter last group"):
        QuantSpec(float_min=True, partial_groups=True)


def test_scales_are_rounded_like_a_cast_even_inside_a_fused_computation():
    """The scales' rounding survives XLA's fusion: a float32 → bfloat16 → float32 pair of converts is
    dropped inside a jitted ``quantize`` (every scale of this matrix came out unrounded that way);
    ``reduce_precision`` is kept. float16 subnormals are rounded as a cast rounds them."""
    import ml_dtypes

    from awp_jax.quantizers import _round_scale

    r = np.random.default_rng(0)
    w = (r.standard_normal((576, 1536)) * 0.05).astype(np.float32)
    for name, dt in (("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        spec = QuantSpec(bits=4, group_size=64, scale_dtype=name)
        s = np.asarray(jax.jit(lambda v: quantize(v, spec))(w).scale)
        np.testing.assert_array_equal(s.astype(dt).astype(np.float32), s)
        x = (r.standard_normal(20000) * 10.0 ** r.uniform(-9, 4, 20000)).astype(np.float32)
        got = np.asarray(jax.jit(lambda v: _round_scale(v, spec))(x))
        with np.errstate(over="ignore"):
            ref = x.astype(dt).astype(np.float32)
        ok = np.isfinite(ref)
        np.testing.assert_array_equal(got[ok], ref[ok])


GRIDS = {
    "asymmetric g64": QuantSpec(bits=3, group_size=64),
    "asymmetric g100 partial": QuantSpec(bits=3, group_size=100, partial_groups=True),
    "symmetric": QuantSpec(bits=4, group_size=64, symmetric=True),
    "float minimum": QuantSpec(bits=3, group_size=64, float_min=True),
    "float16 scales": QuantSpec(bits=2, group_size=128, scale_dtype="float16"),
}


@pytest.mark.parametrize("name", GRIDS)
def test_refit_grid_lowers_every_row_and_keeps_the_codes(name, layer_problem):
    """The refit solves each row's scales (and float minima) by least squares with the codes fixed:
    no row's objective rises, the total falls, the codes and integer zero points are the same (so the
    grid still has at most 2^b levels per group), zeros of a pruned matrix stay zero."""
    from awp_jax.quantizers import refit_grid

    spec = GRIDS[name]
    w, c = layer_problem
    w = jnp.asarray(w)
    if not spec.float_min:
        w = jnp.where(jnp.abs(w) < 0.03, 0.0, w)  # pruned entries
    q = quantize(w, spec)
    r = refit_grid(q, w, jnp.asarray(c))

    def rows(q):
        d = np.asarray(w - q.dense(), np.float64)
        return np.einsum("ri,ij,rj->r", d, np.asarray(c, np.float64), d)

    before, after = rows(q), rows(r)
    assert np.all(after <= before * (1 + 1e-5))
    assert after.sum() < 0.97 * before.sum()
    np.testing.assert_array_equal(r.codes, q.codes)
    if not spec.float_min:
        np.testing.assert_array_equal(r.zero, q.zero)
        assert np.all(np.asarray(r.dense())[np.asarray(w) == 0] == 0)
    if spec.scale_dtype == "float16":
        np.testing.assert_array_equal(np.asarray(r.scale, np.float16).astype(np.float32), r.scale)


def test_refit_grid_works_in_awq_and_act_order_coordinates(layer_problem):
    """With AWQ's column scales and GPTQ's act-order permutation the refit is done where the grid
    lives (scaled, permuted columns); the objective of the dense matrix falls."""
    import dataclasses

    from awp_jax.quantizers import refit_grid
    from awp_jax.solver import objective

    w, c = (jnp.asarray(a) for a in layer_problem)
    spec = QuantSpec(bits=3, group_size=64)
    s = jnp.sqrt(jnp.diagonal(c)) ** 0.5
    perm = jnp.argsort(-jnp.diagonal(c))
    q = dataclasses.replace(quantize((w * s[None, :])[:, perm], spec), perm=perm, col_scale_inv=1.0 / s)
    r = refit_grid(q, w, c)
    assert float(objective(w, r.dense(), c)) < 0.97 * float(objective(w, q.dense(), c))


def test_grid_refit_option_lowers_gptq_and_awp_and_is_refused_for_pruning(layer_problem):
    from awp_jax import methods
    from awp_jax.solver import objective

    w, c = (jnp.asarray(a) for a in layer_problem)
    con = methods.Constraint(bits=3, group_size=64)
    for name, extra in (("gptq", {}), ("awp", {"init": "awq"})):
        plain = methods.compress_layer(name, w, c, con, methods.make_options(name, **extra))
        refit = methods.compress_layer(name, w, c, con, methods.make_options(name, grid_refit=True, **extra))
        assert float(objective(w, refit.theta, c)) < float(objective(w, plain.theta, c))
        np.testing.assert_array_equal(refit.q.codes, plain.q.codes)
        np.testing.assert_allclose(refit.q.dense(), refit.theta)
    with pytest.raises(ValueError, match="grid_refit is for quantization"):
        methods.compress_layer("awp", w, c, methods.Constraint(sparsity=0.5), methods.make_options("awp", grid_refit=True))


def test_gptq_on_awqs_grid_keeps_awqs_scales_and_grid_and_lowers_its_objective(layer_problem):
    """``grid="awq"`` (AWQ + GPTQ): the sweep rounds onto AWQ's clipped group grid in AWQ's scaled
    coordinates, so the result has AWQ's column scales, scales and zero points exactly, at most 2^b
    levels per group, a lower layer objective than AWQ's, and with act-order no permutation (each
    column keeps its own group's grid); a given grid of the wrong shape is an error naming it."""
    from awp_jax import methods, obs
    from awp_jax.solver import objective

    w, c = (jnp.asarray(a) for a in layer_problem)
    con = methods.Constraint(bits=3, group_size=64)
    awq = methods.compress_layer("awq", w, c, con)
    f_awq = float(objective(w, awq.theta, c))
    for act_order in (False, True):
        r = methods.compress_layer("gptq", w, c, con, methods.GPTQOptions(grid="awq", act_order=act_order))
        assert r.q.perm is None
        assert r.info.damping_retries == 0  # the damping is judged against the statistic the sweep saw (AWQ's coordinates)
        np.testing.assert_array_equal(r.q.col_scale_inv, awq.q.col_scale_inv)
        np.testing.assert_array_equal(r.q.scale, awq.q.scale)
        np.testing.assert_array_equal(r.q.zero, awq.q.zero)
        np.testing.assert_allclose(r.q.dense(), r.theta)
        assert not np.array_equal(r.q.codes, awq.q.codes)
        assert float(objective(w, r.theta, c)) < 0.9 * f_awq, act_order
        levels = np.asarray(r.q.grid_values()).reshape(w.shape[0], -1, 64)
        assert max(len(np.unique(g)) for g in levels.reshape(-1, 64)) <= 8
    # AWP from that start (act-order, damping 0.1), in AWQ's coordinates: never above its start, AWQ's column scales kept
    start = methods.compress_layer("gptq", w, c, con, methods.AWQ_GPTQ_START)
    awp = methods.compress_layer("awp", w, c, con, methods.AWPOptions(init="awq_gptq"))
    assert float(objective(w, awp.theta, c)) <= float(objective(w, start.theta, c))
    np.testing.assert_array_equal(awp.q.col_scale_inv, awq.q.col_scale_inv)
    np.testing.assert_allclose(awp.q.dense(), awp.theta)
    assert methods.column_scales("awp", methods.AWPOptions(init="awq_gptq"))
    with pytest.raises(ValueError, match="init='awq_gptq' is for quantization"):
        methods.compress_layer("awp", w, c, methods.Constraint(sparsity=0.5), methods.AWPOptions(init="awq_gptq"))
    assert methods.column_scales("gptq", methods.GPTQOptions(grid="awq"))
    assert not methods.column_scales("gptq", methods.GPTQOptions())
    with pytest.raises(ValueError, match=r"grid scale and zero must be \[d_out, G\] = \(96, 4\)"):
        obs.gptq(w, c, con.quant, grid=(awq.q.scale[:, :2], awq.q.zero[:, :2]))
    with pytest.raises(ValueError, match="grid must be one of minmax, awq"):
        methods.GPTQOptions(grid="mse")

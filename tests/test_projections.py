import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from awp_jax.projections import keep_count, nm_mask, nm_prune, project, row_topk, row_topk_mask, row_topk_mask_sort
from awp_jax.quantizers import QuantSpec, dequantize, quantize

SETTINGS = settings(max_examples=30, deadline=None)


@st.composite
def tied_matrix(draw, m=None):
    """Small-integer matrices: lots of exact ties in |z| (the hard case for exact k)."""
    # a few fixed shapes keep compilation out of the loop; the values vary freely
    rows = draw(st.sampled_from([1, 5]))
    cols = m * draw(st.sampled_from([1, 6])) if m else draw(st.sampled_from([1, 7, 24]))
    seed = draw(st.integers(0, 2**31 - 1))
    z = np.random.default_rng(seed).integers(-3, 4, (rows, cols)).astype(np.float32)
    return jnp.asarray(z)


@SETTINGS
@given(tied_matrix(), st.floats(0, 1))
def test_row_topk_keeps_exactly_k_and_matches_lax_top_k(z, frac):
    k = int(round(frac * z.shape[1]))
    mask = row_topk_mask(jnp.abs(z), k)
    assert np.all(np.asarray(mask).sum(axis=1) == k)
    np.testing.assert_array_equal(mask, row_topk_mask_sort(jnp.abs(z), k))
    kept = np.where(mask, np.abs(z), np.inf).min(axis=1)
    dropped = np.where(mask, -np.inf, np.abs(z)).max(axis=1)
    assert np.all(kept >= dropped)  # it is the Euclidean projection: no dropped entry beats a kept one


def test_tie_rule_lower_index_wins():
    z = jnp.array([[1.0, 2.0, 2.0, 2.0, -2.0]])
    np.testing.assert_array_equal(row_topk_mask(jnp.abs(z), 2), [[False, True, True, False, False]])
    np.testing.assert_array_equal(nm_mask(jnp.abs(z[:, :4]), 2, 4), [[False, True, True, False]])


@SETTINGS
@given(tied_matrix(), st.floats(0, 1))
def test_row_topk_idempotent(z, frac):
    k = int(round(frac * z.shape[1]))
    once = row_topk(z, k)
    np.testing.assert_array_equal(row_topk(once, k), once)


def test_row_topk_traced_k_and_per_row_k():
    z = jnp.asarray(np.random.default_rng(0).standard_normal((4, 50)), jnp.float32)
    f = jax.jit(lambda z, k: row_topk_mask(jnp.abs(z), k))
    for k in (0, 1, 17, 50):
        assert np.all(np.asarray(f(z, k)).sum(1) == k)
    ks = jnp.array([0, 3, 25, 50])
    np.testing.assert_array_equal(np.asarray(f(z, ks)).sum(1), ks)


def test_row_topk_float64_and_bfloat16():
    z = np.random.default_rng(1).standard_normal((3, 40))
    with jax.enable_x64(True):
        m64 = row_topk_mask(jnp.abs(jnp.asarray(z, jnp.float64)), 11)
        np.testing.assert_array_equal(m64, row_topk_mask_sort(jnp.abs(jnp.asarray(z, jnp.float64)), 11))
    zb = jnp.abs(jnp.asarray(z, jnp.bfloat16))
    np.testing.assert_array_equal(row_topk_mask(zb, 11), row_topk_mask_sort(zb.astype(jnp.float32), 11))


def test_keep_count_rounds():
    assert keep_count(0.5, 576) == 288
    assert keep_count(0.0, 7) == 7
    assert keep_count(0.9, 10) == 1


@SETTINGS
@given(st.sampled_from([(2, 4), (4, 8), (1, 4), (3, 4)]), st.data())
def test_nm_pattern_holds_and_is_idempotent(nm, data):
    n, m = nm
    z = data.draw(tied_matrix(m=m))
    mask = np.asarray(nm_mask(jnp.abs(z), n, m))
    assert np.all(mask.reshape(z.shape[0], -1, m).sum(-1) == n)
    once = nm_prune(z, n, m)
    np.testing.assert_array_equal(nm_prune(once, n, m), once)
    # each group keeps its n largest |z|
    a = np.abs(np.asarray(z)).reshape(z.shape[0], -1, m)
    mk = mask.reshape(a.shape)
    assert np.all(np.where(mk, a, np.inf).min(-1) >= np.where(mk, -np.inf, a).max(-1))


def test_nm_needs_multiple_of_m():
    with pytest.raises(ValueError, match="multiple of m=4"):
        nm_mask(jnp.ones((2, 10)), 2, 4)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 3, 4, 8]), st.floats(0.1, 0.9), st.booleans())
def test_joint_projection_keeps_mask_and_grid(seed, bits, p, nm):
    z = jnp.asarray(np.random.default_rng(seed).standard_normal((6, 64)), jnp.float32)
    spec = QuantSpec(bits=bits, group_size=16)
    if nm:
        out = project(z, nm=(2, 4), quant=spec)
        mask = nm_mask(jnp.abs(z), 2, 4)
    else:
        k = keep_count(p, 64)
        out = project(z, k=k, quant=spec)
        mask = row_topk_mask(jnp.abs(z), k)
    out = np.asarray(out)
    assert np.all(out[~np.asarray(mask)] == 0)  # quantize ∘ mask keeps the mask
    for grp in out.reshape(6, 4, 16).reshape(-1, 16):
        assert len(np.unique(grp)) <= 2**bits
    # the values are the grid points of the pruned matrix's codes
    deq = dequantize(quantize(jnp.where(mask, z, 0), spec), spec)
    np.testing.assert_allclose(out, np.where(mask, deq, 0), rtol=1e-6, atol=1e-7)


def test_project_rejects_k_and_nm_together():
    with pytest.raises(ValueError, match="either k"):
        project(jnp.ones((2, 8)), k=2, nm=(2, 4))


def test_project_quantize_flag_can_be_traced():
    z = jnp.asarray(np.random.default_rng(3).standard_normal((4, 32)), jnp.float32)
    spec = QuantSpec(bits=2, group_size=8)
    f = jax.jit(lambda z, on: project(z, k=16, quant=spec, quantize_now=on))
    np.testing.assert_array_equal(f(z, False), row_topk(z, 16))
    np.testing.assert_array_equal(f(z, True), project(z, k=16, quant=spec))


@settings(max_examples=4, deadline=None)
@given(st.integers(0, 10_000))
@example(0).via("ties, zeros, per-row k")
@example(3).via("ties, one k")
@example(5).via("zeros, one k")
@example(8).via("per-row k")
def test_a_hint_never_changes_the_row_topk_mask(seed):
    """The hinted search (the previous support in PGD) returns the unhinted mask for any hint:
    exact, near-exact (a few rows changed) and random hints, ties, zeros, k outside [0, d],
    several chunks of searched rows, and leading axes."""
    rng = np.random.default_rng(seed)
    lead = tuple(rng.integers(1, 4, size=rng.integers(0, 2)))
    n, d = int(rng.integers(1, 70)), int(rng.integers(1, 50))
    s = np.abs(rng.standard_normal(lead + (n, d))).astype(np.float32)
    if seed % 3 == 0:
        s = np.round(s * 3) / 3  # many ties
    if seed % 5 == 0:
        s[..., : d // 3] = 0
    k = int(rng.integers(-1, d + 2)) if seed % 4 else rng.integers(0, d + 1, size=lead + (n,))
    ref = np.asarray(row_topk_mask(jnp.asarray(s), k))
    near = np.asarray(row_topk_mask(jnp.asarray(s + 0.05 * rng.random(s.shape).astype(np.float32)), k))
    for hint in (ref, near, rng.random(s.shape) < rng.random(), np.zeros(s.shape, bool)):
        got = np.asarray(row_topk_mask(jnp.asarray(s), k, hint=jnp.asarray(hint)))
        np.testing.assert_array_equal(got, ref)


def test_pgd_with_the_support_hint_equals_pgd_without(layer_problem):
    """The solver passes the previous iterate's support as the hint: same iterates bit for bit."""
    import awp_jax as aj
    from awp_jax import solver

    w, c = layer_problem
    cfg = aj.awp_pruning(0.6, max_iter=25)
    path, _ = solver.pgd_path(w, c, cfg)
    path = np.asarray(path)
    eta = float(solver.step_size(jnp.asarray(c), cfg))
    k = aj.keep_count(0.6, w.shape[1])
    for t in (1, 10, 24):
        z = path[t] + eta * (w - path[t]) @ c
        np.testing.assert_array_equal(np.asarray(row_topk_mask(jnp.abs(jnp.asarray(z)), k, hint=jnp.asarray(path[t] != 0))),
                                      np.asarray(row_topk_mask(jnp.abs(jnp.asarray(z)), k)))

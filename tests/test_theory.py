"""Property tests of the paper's theory (appendix A) on synthetic problems, in float64.

* Thm A.1/A.2 (IHT under RIP): with A = C^{1/2} satisfying β_3k < 1/8, η = 1 and Θ0 = 0,
  every iterate obeys ||θ_t − θ_k|| ≤ ||θ_k|| / 2^t + 4 ||e|| for y = A θ_k + e.
* RSC/RSM (Jain et al.; Liu & Foygel Barber): f is (2λ_min, k)-RSC and (2λ_max, k)-RSM. With a
  step η ≤ 1/(2 λ_max) (ours: Θ + η (W − Θ) C) the objective never increases, and it converges
  linearly, f(θ_t) ≤ (1 − 1/(12κ))^t f(θ_0), towards a planted solution sparse enough for the
  theorem (s ≤ k / (32 κ²)); the measured rate slows as κ = λ_max / λ_min grows.
"""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import awp_jax as aj
from awp_jax.schedules import Phase, Schedule


def _iht_config(keep: int, d: int, iters: int, step_rule: str, step_scale: float) -> aj.PGDConfig:
    return aj.PGDConfig(
        schedule=Schedule(phases=(Phase(iters=iters, sparsity=1.0 - keep / d),)),
        step_rule=step_rule, step_scale=step_scale, init="zeros", tol=0.0, keep_best=False,
    )


def _path(w, c, cfg):
    with jax.enable_x64(True):
        path, eta = aj.pgd_path(np.asarray(w, np.float64), np.asarray(c, np.float64), cfg)
        return np.asarray(path), float(eta)


def _spectrum_c(rng, d, kappa):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.geomspace(1.0, kappa, d)) @ q.T


D_RIP, RATIO = 64, 400  # C from 64 × 25600 Gaussian activations: eigenvalues within ~[0.9, 1.1]


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, 8),
    noise=st.sampled_from([0.0, 1e-3, 0.03, 0.1]),
)
def test_iht_recovery_bound_under_rip(seed, k, noise):
    rng = np.random.default_rng(seed)
    d, rows = D_RIP, 6
    x = rng.standard_normal((d, d * RATIO))
    c = x @ x.T / x.shape[1]
    lam, q = np.linalg.eigh(c)
    beta = np.max(np.abs(lam - 1.0))  # bounds β_s for every s, so also β_3k
    assert beta < 1 / 8, f"precondition of Thm A.1 not met (β = {beta:.3f})"
    a_inv = (q / np.sqrt(lam)) @ q.T  # C^{-1/2}
    theta_k = np.zeros((rows, d))
    for i in range(rows):
        theta_k[i, rng.choice(d, k, replace=False)] = rng.standard_normal(k)
    e = noise * rng.standard_normal((rows, d))
    w = theta_k + e @ a_inv  # so that W C^{1/2} = θ_k C^{1/2} + e, i.e. y = A θ_k + e row-wise

    path, eta = _path(w, c, _iht_config(k, d, 12, "absolute", 1.0))
    assert eta == 1.0
    err = np.linalg.norm(path - theta_k[None], axis=-1)  # [t, rows]
    t = np.arange(path.shape[0])[:, None]
    bound = np.linalg.norm(theta_k, axis=-1)[None] / 2.0**t + 4 * np.linalg.norm(e, axis=-1)[None]
    assert np.all(err <= bound * (1 + 1e-9)), np.max(err / bound)
    # and after t' = ceil(log2(||θ_k|| / ||e||)) iterations: within 5 ||e||
    if noise > 0:
        tp = int(np.max(np.ceil(np.log2(np.linalg.norm(theta_k, axis=-1) / np.linalg.norm(e, axis=-1)))))
        if 0 <= tp < path.shape[0]:
            assert np.all(err[tp] <= 5 * np.linalg.norm(e, axis=-1) * (1 + 1e-9))


def _objective_path(w, c, path):
    d = w[None] - path
    return np.einsum("tij,jk,tik->t", d, c, d)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kappa=st.sampled_from([1.5, 10.0, 100.0, 1e3]), sparsity=st.sampled_from([0.5, 0.8]))
def test_objective_never_increases_with_step_below_1_over_2lambda_max(seed, kappa, sparsity):
    rng = np.random.default_rng(seed)
    d = 48
    c = _spectrum_c(rng, d, kappa)
    w = rng.standard_normal((5, d))  # a general (not sparse) layer
    keep = round((1 - sparsity) * d)
    eta = 1 / (2 * np.linalg.eigvalsh(c)[-1])  # exact λ_max (power iteration slightly underestimates it)
    path, _ = _path(w, c, _iht_config(keep, d, 60, "absolute", eta))
    f = _objective_path(w, c, path)
    assert np.all(np.diff(f[1:]) <= 1e-10 * f[1]), np.max(np.diff(f[1:]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_convergence_rate_tied_to_kappa(seed):
    rng = np.random.default_rng(seed)
    d, keep, rows = 512, 256, 6
    rates = []
    for kappa in (1.5, 2.5, 8.0, 32.0):
        c = _spectrum_c(rng, d, kappa)
        w = np.zeros((rows, d))
        s = 1  # planted sparsity; the theorem needs s <= keep / (32 κ²), true for κ <= 2.8
        for i in range(rows):
            w[i, rng.choice(d, s, replace=False)] = rng.standard_normal(s)
        path, _ = _path(w, c, _iht_config(keep, d, 120, "absolute", 1 / (2 * np.linalg.eigvalsh(c)[-1])))
        f = _objective_path(w, c, path)
        assert np.all(np.diff(f) <= 1e-12 * f[0])
        if s <= keep / (32 * kappa**2):
            rho = 1 - 1 / (12 * kappa)
            assert np.all(f <= rho ** np.arange(len(f)) * f[0] * (1 + 1e-9))
        n = 30
        rates.append((f[n] / f[0]) ** (1 / n))
    assert all(a < b for a, b in zip(rates, rates[1:])), rates  # slower as κ grows

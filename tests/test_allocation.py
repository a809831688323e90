"""Non-uniform sparsity (OWL): the blocks' sparsities follow the outlier ratios and the model keeps
exactly as many weights as the uniform allocation."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awp_jax import allocation, compress, methods
from awp_jax.models import Llama, random_weights
from awp_jax.projections import keep_count
from tests.test_pipeline import SMALL, _windows


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 0.2), min_size=1, max_size=80), st.sampled_from([0.5, 0.6, 0.7, 0.8]),
       st.sampled_from([0.0, 0.04, 0.08, 0.12]), st.sampled_from([64, 128, 192, 256]))
def test_owl_rule_is_exact_bounded_and_ordered(ratios, target, lam, g):
    sp = np.asarray(allocation.owl_sparsities(ratios, target, lam, g))
    units = (sp - target) * g
    np.testing.assert_allclose(units, np.round(units), atol=1e-6)  # whole units of 1/g
    assert int(np.round(units).sum()) == 0  # so the blocks' mean is exactly the target
    assert sp.max() - sp.min() <= 2 * lam + 2.0 / g + 1e-9  # the blocks span at most 2 lambda
    r = np.asarray(ratios)
    order = np.argsort(r, kind="stable")
    assert np.all(np.diff(sp[order]) <= 1.0 / g + 1e-9)  # more outliers, never more than one unit sparser


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    w = [np.array([[1.0, 1.0, 1.0, 100.0]]), np.array([[1.0, 1.0]])]
    norms = [np.ones(4), np.ones(2)]
    # scores 1,1,1,100,1,1: mean 17.5; above 5 x mean (87.5): one of six
    assert allocation.outlier_ratio(w, norms, 5.0) == pytest.approx(1 / 6)
    assert allocation.outlier_ratio(w, norms, 6.0) == 0.0


def test_owl_model_keeps_exactly_the_uniform_count():
    cfg = dataclasses.replace(SMALL, num_layers=4)
    target, method, opts = 0.7, "wanda", None
    sp = allocation.allocate(Llama(cfg, random_weights(cfg, 2)), _windows(), target, allocation.Allocation("owl", lam=0.1))
    assert len(set(sp)) > 1 and np.mean(sp) == pytest.approx(target, abs=1e-12)
    # every row-wise method (magnitude, Wanda, AWP's projection, HWPQ's N:M) keeps keep_count entries a row:
    # each block moves by whole units, so every layer's count moves by a whole number of entries
    g = allocation.granularity([cfg.hidden_size, cfg.intermediate_size])
    for s in sp:
        u = round((s - target) * g)
        for d_in in (cfg.hidden_size, cfg.intermediate_size):
            assert keep_count(s, d_in) == keep_count(target, d_in) - u * d_in // g
    counts = {}
    for label, con in (("uniform", methods.Constraint(sparsity=target)),
                       ("owl", [methods.Constraint(sparsity=s) for s in sp])):
        model = Llama(cfg, random_weights(cfg, 2))
        compress.compress_model(model, _windows(), method, con, opts, progress=False)
        per_block = [sum(int(np.sum(np.asarray(b.linear(n).weight[...]) == 0)) for n in b.LINEARS) for b in model.layers]
        counts[label] = per_block
    assert sum(counts["owl"]) == sum(counts["uniform"])  # the global ratio, exactly
    assert counts["owl"] != counts["uniform"]  # and the blocks differ


def test_allocation_settings_are_checked():
    with pytest.raises(ValueError, match="'uniform' or 'owl'"):
        allocation.Allocation("random")
    with pytest.raises(ValueError, match="lambda must be in"):
        allocation.Allocation("owl", lam=-0.1)
    with pytest.raises(ValueError, match="out of"):
        allocation.owl_sparsities([0.0, 1.0], 0.95, 0.08, 128)
    cfg = dataclasses.replace(SMALL, num_layers=2)
    with pytest.raises(ValueError, match="one per block"):
        compress.compress_model(Llama(cfg, random_weights(cfg, 2)), _windows(), "wanda", [methods.Constraint(sparsity=0.5)],
                                progress=False)

"""The sparse marginal likelihood equals the dense one on crossed and nested designs.

Penicillin (``(1 | plate) + (1 | sample)``, crossed) and Pastes
(``(1 | batch/cask)``, nested) are lme4's own data sets, exported by
tests/reference/lme4_datasets.R.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness.checks import marginal as marginal_module
from harness.checks.marginal import MarginalLikelihood, choose_method, pymc_model_loglik
from harness.model.spec import ModelSpec, build_design
from harness.user_data import read_data

ROOT = Path(__file__).resolve().parents[1]
MODELS = json.loads((ROOT / "tests" / "reference" / "lme4_datasets.json").read_text())["models"]


def _design(name):
    ref = MODELS[name]
    return build_design(ModelSpec(ref["formula"]), read_data(ROOT / ref["csv"]))


def _random_point(design, marginal, seed):
    rng = np.random.default_rng(seed)
    scale = float(np.std(design.y))
    beta = np.mean(design.y, keepdims=True) + rng.normal(0, 0.5, design.X.shape[1])
    factors = [np.diag(rng.uniform(0.1, 1.5, b.n_terms) * scale) for b in design.blocks]
    sigma = rng.uniform(0.2, 1.0, marginal.n_sigma) * scale
    return beta, factors, sigma


@pytest.mark.parametrize("name", ["penicillin", "pastes"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_equals_dense(name, seed):
    design = _design(name)
    dense = MarginalLikelihood(design, method="dense")
    sparse = MarginalLikelihood(design, method="sparse")
    assert (dense.method, sparse.method) == ("dense", "sparse")
    beta, factors, sigma = _random_point(design, dense, seed)
    a, b = dense.evaluate(beta, factors, sigma), sparse.evaluate(beta, factors, sigma)
    for key in ("loglik", "reml_criterion", "loglik_profiled"):
        assert b[key] == pytest.approx(a[key], abs=1e-10), key
    np.testing.assert_allclose(b["beta_gls"], a["beta_gls"], rtol=0, atol=1e-10)
    modes_a, logdet_a, quad_a = dense.conditional_modes(beta, factors, sigma)
    modes_b, logdet_b, quad_b = sparse.conditional_modes(beta, factors, sigma)
    assert logdet_b == pytest.approx(logdet_a, abs=1e-10)
    for x, y in zip(modes_a, modes_b, strict=True):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-10)
    delta = [np.full_like(m, 0.1) for m in modes_a]
    assert quad_b(delta) == pytest.approx(quad_a(delta), rel=1e-12)


@pytest.mark.parametrize("name", ["penicillin", "pastes"])
def test_sparse_maximiser_reaches_lme4s_likelihood(name):
    """From the neutral start, and again from the dense optimum (the warm start same_model uses)."""
    design = _design(name)
    sparse = MarginalLikelihood(design, method="sparse")
    optimum = sparse.maximise()
    assert optimum.converged
    assert optimum.loglik == pytest.approx(MODELS[name]["loglik_ml"], abs=1e-6)
    warm = sparse.maximise(start=sparse.pack(optimum.factors, optimum.sigma))
    assert warm.converged
    assert warm.loglik == pytest.approx(optimum.loglik, abs=1e-8)
    for F, G in zip(optimum.factors, warm.factors, strict=True):
        np.testing.assert_allclose(G, F, rtol=1e-4)


def test_pack_inverts_unpack():
    design = _design("pastes")
    marginal = MarginalLikelihood(design, method="sparse")
    theta = np.array([0.3, -0.2, 0.1])
    *factors, sigma = marginal.unpack(theta)
    np.testing.assert_allclose(marginal.pack(factors, sigma), theta, atol=1e-14)


def test_auto_picks_sparse_above_the_threshold(monkeypatch):
    design = _design("penicillin")
    assert choose_method(design) == "dense"
    monkeypatch.setattr(marginal_module, "SPARSE_THRESHOLD", 10)
    assert choose_method(design) == "sparse"
    assert MarginalLikelihood(design).method == "sparse"
    with pytest.raises(ValueError, match="one grouping factor"):
        MarginalLikelihood(design, method="grouped")
    with pytest.raises(ValueError, match="method must be one of"):
        MarginalLikelihood(design, method="cholmod")


def test_pymc_model_density_with_sparse_marginal():
    design = _design("penicillin")
    dense = MarginalLikelihood(design, method="dense")
    sparse = MarginalLikelihood(design, method="sparse")
    beta, factors, sigma = _random_point(design, dense, 3)
    tie = pymc_model_loglik(design, beta, factors, sigma, marginal=sparse)
    assert tie["at_mode"] == pytest.approx(dense.loglik(beta, factors, sigma), abs=1e-6)
    assert tie["max_probe_gap"] < 1e-6


@pytest.mark.r
def test_same_model_picks_the_sparse_path(monkeypatch):
    """Above the threshold same_model factorises sparsely, warm-started, and still agrees."""
    import harness as hz

    ref = MODELS["penicillin"]
    data = read_data(ROOT / ref["csv"])
    monkeypatch.setattr(marginal_module, "SPARSE_THRESHOLD", 10)
    result = hz.same_model(ModelSpec(ref["formula"]), data)
    assert result.optimizer["linear_algebra"] == "sparse"
    assert result.ok, result.reasons
    assert result.loglik_pymc == pytest.approx(ref["loglik_ml"], abs=1e-6)
    assert result.reml_criterion_pymc == pytest.approx(ref["reml_criterion"], abs=1e-5)


@pytest.mark.parametrize("name", ["penicillin", "pastes"])
def test_one_ordering_serves_every_point_including_a_boundary(name):
    """M's ordering is found once per design; with it the factor equals SuperLU's own."""
    from harness.checks import marginal_sparse

    design = _design(name)
    sparse = MarginalLikelihood(design, method="sparse")
    dense = MarginalLikelihood(design, method="dense")
    ordering = marginal_sparse.fill_reducing_ordering(sparse.stats, design.blocks)
    assert sorted(ordering) == list(range(sparse.stats.n_columns))
    assert marginal_sparse.fill_reducing_ordering(sparse.stats, design.blocks) is ordering
    for seed in (3, 4):
        beta, factors, sigma = _random_point(design, dense, seed)
        if seed == 4:  # a boundary: the first factor's SD is zero
            factors[0] = np.zeros_like(factors[0])
        M, B, _, _ = marginal_sparse.weighted_system(sparse.stats, design.blocks, factors, sigma)
        own, ordered = marginal_sparse.SparseFactor(M), marginal_sparse.SparseFactor(M, ordering)
        assert ordered.logdet == pytest.approx(own.logdet, abs=1e-10)
        np.testing.assert_allclose(ordered.solve(B), own.solve(B), rtol=0, atol=1e-10)
        a, b = dense.evaluate(beta, factors, sigma), sparse.evaluate(beta, factors, sigma)
        assert b["loglik"] == pytest.approx(a["loglik"], abs=1e-10)
    assert sparse.stats.sparse_ordering is ordering

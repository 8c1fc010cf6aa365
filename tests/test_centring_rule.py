"""The information rule at the likelihood's maximum: the first run's parameterisation before any draw.

Golden values come from the closed form of the balanced one-way random-effects
model: with ``J`` groups of ``n`` rows, the ML estimates are
``sigma^2 = SSW / (J (n - 1))`` and ``tau^2 = SSB / (J n) - sigma^2 / n``
(``SSB = n sum_j (ybar_j - ybar)^2``), so the rule's ratio for a random
intercept is ``n tau^2 / sigma^2``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harness.engines.adaptive import AdaptiveSettings, sample_adaptively
from harness.engines.centring_rule import (
    centring_at_maximum,
    choose,
    group_level_terms,
    maximum_point,
    ratios_at,
)
from harness.model.priors import resolve_priors
from harness.model.spec import ModelSpec, build_design


def one_way(groups: int, per_group: int, tau: float, sigma: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat([f"g{j:02d}" for j in range(groups)], per_group)
    effect = np.repeat(rng.normal(0.0, tau, groups), per_group)
    return pd.DataFrame({"y": 3.0 + effect + rng.normal(0.0, sigma, g.size), "g": g})


def closed_form_ratio(data: pd.DataFrame) -> float:
    """``n tau^2 / sigma^2`` at the ML estimates of the balanced one-way model."""
    groups = data.groupby("g")["y"]
    n, J = int(groups.size().iloc[0]), groups.ngroups
    means = groups.transform("mean")
    ssw = float(((data["y"] - means) ** 2).sum())
    ssb = float(n * ((groups.mean() - data["y"].mean()) ** 2).sum())
    sigma2 = ssw / (J * (n - 1))
    tau2 = max(ssb / (J * n) - sigma2 / n, 0.0)
    return n * tau2 / sigma2


SPEC = ModelSpec("y ~ 1 + (1 | g)", name="one-way")


@pytest.mark.parametrize(
    ("tau", "sigma", "choice"),
    [(3.0, 1.0, "centred"), (0.3, 4.0, "non-centred")],
)
def test_rule_at_the_maximum_matches_the_closed_form(tau, sigma, choice):
    data = one_way(groups=12, per_group=6, tau=tau, sigma=sigma, seed=4)
    design = build_design(SPEC, data)
    point = maximum_point(design)
    assert not isinstance(point, str), point
    ratio = ratios_at(design, point.covariances, point.row_weight)["g"]["min_eigenvalue"]
    expected = closed_form_ratio(data)
    # The maximiser stops at gtol 1e-5 on the deviance: a few digits are what the rule needs.
    assert ratio == pytest.approx(expected, rel=1e-3, abs=1e-4)
    blocks, evidence, text = centring_at_maximum(design)
    entry = evidence["centring_at_maximum"]["g"]
    assert entry["choice"] == choice
    # Read at the low end of tau's range: chi^2_11's 10% quantile / 11 for 12 groups.
    assert entry["covariance_scale"] == pytest.approx(5.5778 / 11, rel=1e-4)
    assert entry["min_eigenvalue"] == pytest.approx(expected * 5.5778 / 11, rel=1e-3, abs=1e-4)
    assert (blocks == {"g"}) == (choice == "centred")
    assert choice in text and "ML maximum" in text


def test_rule_at_the_maximum_for_a_binomial_model():
    # Many trials per group and well separated group rates: the data pin the offsets down.
    rng = np.random.default_rng(7)
    groups = 15
    effect = rng.normal(0.0, 1.5, groups)
    trials = np.full(groups * 2, 200)
    p = 1.0 / (1.0 + np.exp(-np.repeat(effect, 2)))
    data = pd.DataFrame(
        {
            "k": rng.binomial(trials, p),
            "n_fail": 0,
            "g": np.repeat([f"g{j}" for j in range(groups)], 2),
        }
    )
    data["n_fail"] = trials - data["k"]
    design = build_design(
        ModelSpec("cbind(k, n_fail) ~ 1 + (1 | g)", name="binomial", family="binomial"), data
    )
    blocks, evidence, text = centring_at_maximum(design)
    entry = evidence["centring_at_maximum"]["g"]
    # Two rows of 200 trials at rates near 1/2 carry about 2 * 200 * 0.2 = 80 units of
    # information against a prior precision of 1 / 1.5^2: a ratio in the hundreds.
    assert entry["min_eigenvalue"] > 20
    assert blocks == {"g"} and "Laplace maximum" in text


def test_no_maximum_means_the_former_first_run():
    rng = np.random.default_rng(2)
    data = pd.DataFrame(
        {"y": rng.negative_binomial(3, 0.4, 60), "g": np.repeat([f"g{j}" for j in range(10)], 6)}
    )
    design = build_design(ModelSpec("y ~ 1 + (1 | g)", name="nb", family="negbin"), data)
    blocks, evidence, text = centring_at_maximum(design)
    assert blocks == frozenset() and evidence == {}
    # The shape theta is the family's own parameter: no Laplace maximum without it.
    assert "theta" in text and text.startswith("first run non-centred")


def test_choose_centres_above_one_only():
    ratios = {"a": {"min_eigenvalue": 1.5, "terms": {}}, "b": {"min_eigenvalue": 0.5, "terms": {}}}
    blocks, evidence = choose(ratios)
    assert blocks == {"a"}
    assert evidence["b"]["choice"] == "non-centred"


class _Stop(Exception):
    """Raised by the recording sampler: the test needs the first run's arguments only."""


def test_adaptive_first_run_uses_the_rule_unless_told():
    data = one_way(groups=12, per_group=6, tau=3.0, sigma=1.0, seed=4)
    design = build_design(SPEC, data)
    priors = resolve_priors(design)
    seen: list[frozenset[str]] = []

    def recording_sampler(*args, centered, **kwargs):
        seen.append(frozenset(centered))
        raise _Stop

    for centered in (None, ()):
        with pytest.raises(_Stop):
            sample_adaptively(
                design,
                priors,
                seed=1,
                draws=100,
                tune=100,
                chains=2,
                sampler="pymc",
                target_accept=0.8,
                centered=centered,
                settings=AdaptiveSettings(),
                sample_once=recording_sampler,
            )
    assert seen == [frozenset({"g"}), frozenset()]


def test_a_block_nested_in_a_fixed_factor_stays_non_centred():
    # Replicates nest in the fixed factor "recipe" (as in lme4's cake): the data outweigh
    # the prior, but the centred form would tie recipe's effects to the replicates' offsets.
    rng = np.random.default_rng(5)
    recipe = np.repeat(["A", "B", "C"], 5 * 8)
    replicate = np.repeat([f"r{j}" for j in range(15)], 8)
    effect = np.repeat(rng.normal(0.0, 3.0, 15), 8)
    data = pd.DataFrame(
        {
            "y": np.select([recipe == "B", recipe == "C"], [1.0, 2.0], 0.0)
            + effect
            + rng.normal(0.0, 1.0, recipe.size),
            "recipe": recipe,
            "replicate": replicate,
        }
    )
    design = build_design(ModelSpec("y ~ recipe + (1 | replicate)", name="nested"), data)
    assert group_level_terms(design, design.blocks[0]) == ["recipeB", "recipeC"]
    blocks, evidence, text = centring_at_maximum(design)
    entry = evidence["centring_at_maximum"]["replicate"]
    assert entry["min_eigenvalue"] > 1 and entry["choice"] == "non-centred"
    assert blocks == frozenset() and "recipeB, recipeC constant within its groups" in text
    # Without the nesting (recipe varies within each replicate) the rule centres.
    data["recipe"] = np.tile(["A", "B", "C", "A", "B", "C", "A", "B"], 15)
    design = build_design(ModelSpec("y ~ recipe + (1 | replicate)", name="crossed"), data)
    assert group_level_terms(design, design.blocks[0]) == []
    assert centring_at_maximum(design)[0] == {"replicate"}


def test_few_groups_need_the_data_to_outweigh_the_prior_at_a_smaller_sd():
    # Six groups: at the maximum the data outweigh the prior twofold, but tau's
    # plausible range reaches a third of its estimate, where they no longer do.
    data = one_way(groups=6, per_group=5, tau=0.6, sigma=1.2, seed=2)
    design = build_design(SPEC, data)
    point = maximum_point(design)
    at_maximum = ratios_at(design, point.covariances, point.row_weight)["g"]["min_eigenvalue"]
    blocks, evidence, _ = centring_at_maximum(design)
    entry = evidence["centring_at_maximum"]["g"]
    assert at_maximum > 1 > entry["min_eigenvalue"]
    assert entry["covariance_scale"] == pytest.approx(1.6103 / 5, rel=1e-4)
    assert blocks == frozenset()
